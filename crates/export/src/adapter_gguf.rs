//! LoRA adapters as llama.cpp reads them (`llama --lora FILE.gguf`): `general.type = adapter`,
//! `adapter.type = lora`, one F32 `adapter.lora.alpha`, and per adapted weight `W` the tensors
//! `<W>.lora_a` (ggml `[in, r]`, PEFT's A `[r, in]`) and `<W>.lora_b` (ggml `[r, out]`). llama.cpp
//! applies `y += user_scale · alpha / r · B(A x)` with `r` read from each B, so a per-module
//! scale that differs (rsLoRA, `rank_pattern`, `alpha_pattern`) is folded into that module's B,
//! and B's rows follow the base weight's row order (Llama's permuted q/k).
use crate::error::{ExportError, Result};
use crate::gguf_writer::{self, TensorSpec};
use crate::llama_cpp::Layout;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lorakit_adapter::{LoraConfig, ModuleSpec, PeftAdapter};
use lorakit_models::gguf::{GgufHeader, Value as Read};
use lorakit_models::BaseModel;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What `export` wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub arch: &'static str,
    pub modules: usize,
    pub bytes: u64,
    pub alpha: f32,
    /// Modules whose B carries a folded scale (rsLoRA, rank or alpha patterns).
    pub folded: usize,
    /// Tensors written as F16 because their rows are not whole blocks of the requested type.
    pub fell_back: usize,
}

/// The base model's layout for llama.cpp, and a way to check an adapted weight's shape.
pub struct Base {
    pub model: BaseModel,
    pub layout: Layout,
    gguf: Option<GgufHeader>,
}

impl Base {
    pub fn open(path: &Path) -> Result<Base> {
        let model = BaseModel::open(path)?;
        let layout = Layout::of(&*model.config).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "{}: lorakit knows no llama.cpp architecture for model_type {:?} (GGUF adapters: llama, mistral, qwen2, qwen3, phi3, gemma3, gpt2)",
                path.display(),
                model.config.model_type()
            ))
        })?;
        let gguf = if lorakit_models::is_gguf(path) {
            let h = GgufHeader::from_file(path)?;
            let arch = h.architecture().unwrap_or("");
            if arch != layout.arch {
                return Err(ExportError::invalid(
                    path,
                    "general.architecture",
                    format!("{arch:?}, but lorakit reads the model as {:?}", layout.arch),
                ));
            }
            Some(h)
        } else {
            None
        };
        Ok(Base {
            model,
            layout,
            gguf,
        })
    }

    /// The `[out, in]` shape of the base weight `module` adapts, if the base has that weight.
    fn weight_shape(&self, module: &str, gguf_name: &str) -> Option<(usize, usize)> {
        if let Some(h) = &self.gguf {
            let d = h.tensor_dims(gguf_name)?;
            return Some((*d.get(1)? as usize, d[0] as usize));
        }
        let meta = self
            .model
            .checkpoint()?
            .meta(&format!("{module}.weight"))
            .ok()?;
        let (a, b) = (meta.shape.first().copied()?, meta.shape.get(1).copied()?);
        Some(if self.model.config.stores_transposed(module) {
            (b, a)
        } else {
            (a, b)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterDType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl AdapterDType {
    fn ggml(self) -> GgmlDType {
        match self {
            AdapterDType::F32 => GgmlDType::F32,
            AdapterDType::F16 => GgmlDType::F16,
            AdapterDType::BF16 => GgmlDType::BF16,
            AdapterDType::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// What llama.cpp loads: one alpha, and (A, B) per llama.cpp weight name.
#[derive(Debug)]
pub struct GgufPairs {
    pub alpha: f32,
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
    /// Modules whose B carries a folded scale.
    pub folded: usize,
}

/// The (A, B) pairs llama.cpp should load for `adapter` on `base`, keyed by llama.cpp weight
/// name, with the one alpha they share: B scaled and row-permuted as llama.cpp needs.
pub fn gguf_pairs(adapter: &PeftAdapter, base: &Base) -> Result<GgufPairs> {
    adapter.check_pairs_only("llama.cpp")?;
    let config = &adapter.config;
    let alpha = if config.lora_alpha > 0.0 && config.lora_alpha.is_finite() {
        config.lora_alpha
    } else {
        config.r as f64
    };
    let mut folded = 0;
    let mut out = BTreeMap::new();
    for (module, (a, b)) in adapter.pairs() {
        let name = base.layout.gguf_weight(module).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "{}: module `{module}` has no llama.cpp counterpart in a {} model (llama.cpp adapts its attention and MLP projections and `output`)",
                adapter.weights_file(),
                base.layout.arch
            ))
        })?;
        let (r, in_dim, out_dim) = (a.dim(0)?, a.dim(1)?, b.dim(0)?);
        match base.weight_shape(module, &name) {
            Some(s) if s == (out_dim, in_dim) => {}
            Some((o, i)) => {
                return Err(ExportError::Unsupported(format!(
                    "{}: module `{module}` is [{out_dim}, {in_dim}] in the adapter, the base's `{name}` is [{o}, {i}]: is the adapter made for another base model?",
                    adapter.weights_file()
                )))
            }
            None => {
                return Err(ExportError::Unsupported(format!(
                    "{}: module `{module}`: the base model {} has no weight `{name}` for llama.cpp to adapt{}",
                    adapter.weights_file(),
                    base.model.path.display(),
                    if name == "output.weight" { " (its output head is tied to the embeddings)" } else { "" }
                )))
            }
        }
        let scale = config.for_module(module).scaling;
        let factor = scale * r as f64 / alpha;
        let b = if (factor - 1.0).abs() > 1e-12 {
            folded += 1;
            b.affine(factor, 0.0)?
        } else {
            b.clone()
        };
        let b = base.layout.rows_to_gguf(module, &b)?;
        out.insert(name, (a.clone(), b));
    }
    Ok(GgufPairs {
        alpha: alpha as f32,
        pairs: out,
        folded,
    })
}

/// Writes `adapter` (for the base model at `base`) as a llama.cpp GGUF LoRA adapter at `out`.
pub fn export(
    adapter: &PeftAdapter,
    base: &Base,
    out: &Path,
    dtype: AdapterDType,
) -> Result<ExportReport> {
    let GgufPairs {
        alpha,
        pairs,
        folded,
    } = gguf_pairs(adapter, base)?;
    let mut specs = Vec::new();
    let mut tensors = Vec::new();
    let mut fell_back = 0;
    for (name, (a, b)) in &pairs {
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            let cols = t.dim(1)?;
            let want = dtype.ggml();
            let ty = if gguf_writer::fits(want, cols) {
                want
            } else {
                fell_back += 1;
                GgmlDType::F16
            };
            specs.push(TensorSpec {
                name: format!("{name}.{suffix}"),
                dims: t.dims().to_vec(),
                dtype: ty,
            });
            tensors.push(t.clone());
        }
    }
    let adapter_name = adapter
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(base.layout.arch.into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(adapter_name)),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha)),
    ];
    let bytes = gguf_writer::write(out, &metadata, &specs, |i| {
        gguf_writer::encode(&tensors[i], specs[i].dtype)
    })?;
    Ok(ExportReport {
        arch: base.layout.arch,
        modules: pairs.len(),
        bytes,
        alpha,
        folded,
        fell_back,
    })
}

/// Whether `path` is a GGUF file holding a LoRA adapter (not a model).
pub fn is_gguf_adapter(path: &Path) -> bool {
    lorakit_models::is_gguf(path)
        && GgufHeader::from_file(path)
            .is_ok_and(|h| h.metadata.get("general.type").and_then(Read::as_str) == Some("adapter"))
}

/// A llama.cpp GGUF LoRA adapter for the base model `base`, in PEFT's layout and scales (the
/// inverse of [`export`]: rows back in Hugging Face order, one alpha over per-module ranks).
pub fn import(path: &Path, base: &Base) -> Result<PeftAdapter> {
    let bytes = std::fs::read(path).map_err(|e| ExportError::io(path, e))?;
    import_bytes(&bytes, path, base)
}

/// [`import`] of a file's bytes (`path` names it in messages).
pub fn import_bytes(bytes: &[u8], path: &Path, base: &Base) -> Result<PeftAdapter> {
    let header =
        GgufHeader::parse(bytes).map_err(|m| ExportError::invalid(path, "GGUF header", m))?;
    let key = |k: &str| header.metadata.get(k).and_then(Read::as_str);
    let expect = |k: &str, want: &str| -> Result<()> {
        match key(k) {
            Some(v) if v == want => Ok(()),
            other => Err(ExportError::invalid(
                path,
                k,
                format!("{other:?}, expected {want:?} (a llama.cpp LoRA adapter)"),
            )),
        }
    };
    expect("general.type", "adapter")?;
    expect("adapter.type", "lora")?;
    let arch = key("general.architecture").unwrap_or("");
    if arch != base.layout.arch {
        return Err(ExportError::invalid(
            path,
            "general.architecture",
            format!(
                "{arch:?}: the adapter is for a {arch} model, the base {} is {:?}",
                base.model.path.display(),
                base.layout.arch
            ),
        ));
    }
    let alpha = match header.metadata.get("adapter.lora.alpha") {
        None => None,
        Some(Read::F64(v)) if v.is_finite() => Some(*v),
        Some(other) => {
            return Err(ExportError::invalid(
                path,
                "adapter.lora.alpha",
                format!("{other:?}, expected a finite float"),
            ))
        }
    };
    let mut names: BTreeMap<String, [bool; 2]> = BTreeMap::new();
    for t in &header.tensors {
        let (w, which) = if let Some(w) = t.name.strip_suffix(".lora_a") {
            (w, 0)
        } else if let Some(w) = t.name.strip_suffix(".lora_b") {
            (w, 1)
        } else {
            return Err(ExportError::invalid(
                path,
                &t.name,
                "not a LoRA tensor (names end in .lora_a or .lora_b)",
            ));
        };
        names.entry(w.to_string()).or_default()[which] = true;
    }
    // the header above bounded every count and byte range; candle's reader does the rest
    let mut file = std::io::Cursor::new(bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| ExportError::invalid(path, "GGUF header", e.to_string()))?;
    let mut load = |name: &str| -> Result<Tensor> {
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| ExportError::invalid(path, name, e.to_string()))?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    let mut pairs = BTreeMap::new();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    for (w, have) in &names {
        if let Some(missing) = ["lora_a", "lora_b"].iter().zip(have).find(|(_, h)| !**h) {
            return Err(ExportError::invalid(
                path,
                &format!("{w}.{}", missing.0),
                "missing: llama.cpp needs both halves of each pair",
            ));
        }
        let module = base.layout.hf_module(w).ok_or_else(|| {
            ExportError::invalid(
                path,
                w,
                format!("not a weight lorakit can name in a {arch} model"),
            )
        })?;
        let a = load(&format!("{w}.lora_a"))?;
        let b = load(&format!("{w}.lora_b"))?;
        let (r, in_dim) = a.dims2()?;
        let (out_dim, rb) = b.dims2()?;
        if rb != r {
            return Err(ExportError::invalid(
                path,
                &format!("{w}.lora_b"),
                format!("rank {rb}, but {w}.lora_a has rank {r}"),
            ));
        }
        match base.weight_shape(&module, w) {
            Some(s) if s == (out_dim, in_dim) => {}
            other => {
                return Err(ExportError::invalid(
                    path,
                    w,
                    format!(
                        "the pair is [{out_dim}, {in_dim}], the base's weight is {other:?}: is the adapter made for another base model?"
                    ),
                ))
            }
        }
        let b = base.layout.rows_to_hf(&module, &b)?;
        *ranks.entry(r).or_default() += 1;
        pairs.insert(module, (a, b));
    }
    if pairs.is_empty() {
        return Err(ExportError::invalid(
            path,
            "tensors",
            "the adapter holds no LoRA pairs",
        ));
    }
    let r = ranks
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(r, _)| *r)
        .unwrap_or(1);
    let targets = exact_targets(
        pairs.keys().map(String::as_str),
        base.model.config.dimensions().layers,
    );
    let mut config = LoraConfig::from_peft_json(
        serde_json::json!({
            "target_modules": serde_json::to_value(&targets).unwrap_or_default(),
            "r": r,
            "lora_alpha": alpha.unwrap_or(r as f64),
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base.model.path.display().to_string(),
        }),
        &path.display().to_string(),
    )?
    .0;
    for (m, (a, _)) in &pairs {
        let rm = a.dim(0)?;
        if rm != r {
            config.rank_pattern.insert(m.clone(), rm.into());
            if alpha.is_none() {
                // no alpha: llama.cpp applies the pair unscaled
                config.alpha_pattern.insert(m.clone(), rm.into());
            }
        }
    }
    config.fan_in_fan_out = base
        .model
        .config
        .stores_transposed(pairs.keys().next().map(String::as_str).unwrap_or(""));
    Ok(PeftAdapter::from_pairs(path, config, pairs)?)
}

/// `target_modules` selecting exactly `modules`: the leaf names when each is adapted in every
/// one of `layers` layers (as a trainer writes it), else the escaped paths as one regex.
pub fn exact_targets<'a>(modules: impl Iterator<Item = &'a str>, layers: usize) -> ModuleSpec {
    let modules: Vec<&str> = modules.collect();
    let mut by_leaf: BTreeMap<&str, BTreeSet<Option<usize>>> = BTreeMap::new();
    for m in &modules {
        let leaf = m.rsplit('.').next().unwrap_or(m);
        let layer = m
            .split('.')
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[0] == "layers" || w[0] == "h")
            .and_then(|w| w[1].parse().ok());
        by_leaf.entry(leaf).or_default().insert(layer);
    }
    let complete = by_leaf
        .values()
        .all(|l| l.len() == layers && (0..layers).all(|i| l.contains(&Some(i))));
    if complete {
        ModuleSpec::List(by_leaf.keys().map(|s| s.to_string()).collect())
    } else {
        lorakit_adapter::target::exact_regex(modules)
    }
}
