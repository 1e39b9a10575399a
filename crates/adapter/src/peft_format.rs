//! The Hugging Face PEFT on-disk format: `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.
use crate::checkpoint::Checkpoint;
use crate::config::LoraConfig;
use crate::error::{AdapterError, Result};
use crate::fsutil::atomic_write;
use crate::lora_linear::LowRank;
use crate::target::TargetSelector;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Every key PEFT writes starts with this.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT key of a LoRA tensor: `which` is `"A"` or `"B"`.
pub fn lora_key(module: &str, which: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_{which}.weight")
}

/// An adapter read from disk: config plus f32 tensors on the CPU.
#[derive(Debug)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    /// Things worth telling the user (ignored config keys).
    pub warnings: Vec<String>,
    pub dir: PathBuf,
    /// dtype the weights were stored in.
    pub stored_dtype: DType,
    /// module path → (A, B)
    lora: BTreeMap<String, (Tensor, Tensor)>,
    /// module path → the variant's own tensors (`LoraVariant::extra_tensors`)
    extra: BTreeMap<String, BTreeMap<&'static str, Tensor>>,
    /// full base tensor name → replacement (PEFT `modules_to_save`)
    replacements: BTreeMap<String, Tensor>,
}

impl PeftAdapter {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32, bf16 or f16).
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(AdapterError::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found: an adapter directory holds adapter_config.json and adapter_model.safetensors",
                ),
            ));
        }
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(AdapterError::io(
                &weights,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found; only a pickled adapter_model.bin is present, which lorakit does not execute. Re-save it with safetensors (PEFT: save_pretrained(..., safe_serialization=True))",
                ),
            ));
        }
        let (config, warnings) = LoraConfig::from_peft_file(&config_path)?;
        let ckpt = Checkpoint::open_files(std::slice::from_ref(&weights))?;
        Self::from_parts(dir, config, warnings, ckpt)
    }

    /// An adapter from in-memory `adapter_config.json` and `adapter_model.safetensors` bytes
    /// (`dir` only names them in messages).
    pub fn from_bytes(dir: &Path, config_json: &[u8], weights: Vec<u8>) -> Result<Self> {
        let file = dir.join(CONFIG_FILE);
        let value: serde_json::Value =
            serde_json::from_slice(config_json).map_err(|e| AdapterError::Json {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let (config, warnings) = LoraConfig::from_peft_json(value, &file.display().to_string())?;
        let ckpt = Checkpoint::from_bytes(&dir.join(WEIGHTS_FILE).display().to_string(), weights)?;
        Self::from_parts(dir, config, warnings, ckpt)
    }

    fn from_parts(
        dir: &Path,
        config: LoraConfig,
        warnings: Vec<String>,
        ckpt: Checkpoint,
    ) -> Result<Self> {
        let file = dir.join(WEIGHTS_FILE).display().to_string();
        let bad = |name: &str, message: String| AdapterError::BadTensor {
            file: file.clone(),
            name: name.into(),
            message,
        };
        let mut a_map = BTreeMap::new();
        let mut b_map = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        let mut extra: BTreeMap<String, BTreeMap<&'static str, Tensor>> = BTreeMap::new();
        let variant = config.variant();
        let mut stored_dtype = DType::F32;
        for name in ckpt.names() {
            let meta = ckpt.meta(name)?;
            if !matches!(
                meta.dtype,
                DType::F32 | DType::BF16 | DType::F16 | DType::F64
            ) {
                return Err(bad(
                    name,
                    format!("dtype {:?}, expected F32, BF16 or F16", meta.dtype),
                ));
            }
            stored_dtype = meta.dtype;
            let Some(rest) = name.strip_prefix(KEY_PREFIX) else {
                return Err(bad(
                    name,
                    format!("key does not start with `{KEY_PREFIX}` (not a PEFT adapter file?)"),
                ));
            };
            let own = variant.extra_tensors().iter().find_map(|n| {
                rest.strip_suffix(n)
                    .and_then(|m| m.strip_suffix('.'))
                    .map(|m| (m, *n))
            });
            if let Some((module, which)) = own {
                let t = ckpt.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
                extra
                    .entry(module.to_string())
                    .or_default()
                    .insert(which, t);
                continue;
            }
            if rest.contains(crate::dora::MAGNITUDE) {
                return Err(AdapterError::BadTensor {
                    file: file.clone(),
                    name: name.into(),
                    message: "a DoRA magnitude vector, but adapter_config.json does not say use_dora: true".into(),
                });
            }
            if rest.contains("lora_embedding_") {
                return Err(AdapterError::Unsupported {
                    file: file.clone(),
                    key: name.into(),
                    value: "present".into(),
                    feature: "LoRA on embedding layers".into(),
                });
            }
            let t = ckpt.load(name, &Device::Cpu)?.to_dtype(DType::F32)?;
            let finite = t
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?
                .is_finite();
            if !finite && t.elem_count() > 0 {
                return Err(bad(name, "holds NaN or infinite values".into()));
            }
            if let Some(module) = rest.strip_suffix(".lora_A.weight") {
                a_map.insert(module.to_string(), t);
            } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
                b_map.insert(module.to_string(), t);
            } else if let Some(module) = rest.strip_suffix(".base_layer.weight") {
                // PEFT saves the base weight of an output/embedding layer it adapts
                // (`save_embedding_layers`); loading it replaces the base tensor.
                replacements.insert(format!("{module}.weight"), t);
            } else if rest.contains(".lora_") {
                return Err(bad(
                    name,
                    "unrecognised LoRA tensor (expected .lora_A.weight or .lora_B.weight)".into(),
                ));
            } else if config.modules_to_save.iter().flatten().any(|m| {
                rest == m || rest.starts_with(&format!("{m}.")) || rest.contains(&format!(".{m}."))
            }) {
                replacements.insert(rest.to_string(), t);
            } else {
                return Err(AdapterError::UnusedTensors {
                    file: file.clone(),
                    names: vec![name.to_string()],
                });
            }
        }
        let mut lora = BTreeMap::new();
        for (module, a) in a_map {
            let b = b_map
                .remove(&module)
                .ok_or_else(|| AdapterError::MissingTensor {
                    file: file.clone(),
                    name: lora_key(&module, "B"),
                    why: format!("{} is present", lora_key(&module, "A")),
                })?;
            let r = config.for_module(&module).r;
            if a.dims().len() != 2 || a.dim(0)? != r {
                return Err(AdapterError::ShapeMismatch {
                    file: file.clone(),
                    name: lora_key(&module, "A"),
                    expected: vec![r, a.dims().get(1).copied().unwrap_or(0)],
                    got: a.dims().to_vec(),
                    why: "rank from `r` / `rank_pattern` in adapter_config.json".into(),
                });
            }
            if b.dims().len() != 2 || b.dim(1)? != r {
                return Err(AdapterError::ShapeMismatch {
                    file: file.clone(),
                    name: lora_key(&module, "B"),
                    expected: vec![b.dims().first().copied().unwrap_or(0), r],
                    got: b.dims().to_vec(),
                    why: "rank from `r` / `rank_pattern` in adapter_config.json".into(),
                });
            }
            lora.insert(module, (a, b));
        }
        if let Some(module) = b_map.keys().next() {
            return Err(AdapterError::MissingTensor {
                file,
                name: lora_key(module, "A"),
                why: format!("{} is present", lora_key(module, "B")),
            });
        }
        // PEFT builds LoRA layers only where the config's targets (target_modules,
        // exclude_modules, layers_to_transform, ...) say; tensors for any other module are not
        // this config's adapter. Refused here, so every command reads the same adapter.
        if config.target_modules.is_some() {
            let selector = TargetSelector::new(&config)?;
            let untargeted: Vec<String> = lora
                .keys()
                .filter(|m| !selector.matches(m))
                .map(|m| lora_key(m, "A"))
                .collect();
            if !untargeted.is_empty() {
                return Err(AdapterError::UntargetedTensors {
                    file,
                    config: dir.join(CONFIG_FILE).display().to_string(),
                    names: untargeted,
                });
            }
        }
        Ok(PeftAdapter {
            config,
            warnings,
            dir: dir.to_path_buf(),
            stored_dtype,
            lora,
            extra,
            replacements,
        })
    }

    /// An adapter built in memory (combined, or read from another format): plain LoRA pairs
    /// `module → (A [r, in], B [out, r])`, each rank checked against `config` as [`PeftAdapter::load`]
    /// checks a file's. `dir` names the adapter in messages.
    pub fn from_pairs(
        dir: &Path,
        config: LoraConfig,
        pairs: BTreeMap<String, (Tensor, Tensor)>,
    ) -> Result<Self> {
        let file = dir.display().to_string();
        for (module, (a, b)) in &pairs {
            let r = config.for_module(module).r;
            for (t, which, ok) in [
                (a, "A", a.dims().len() == 2 && a.dim(0)? == r),
                (b, "B", b.dims().len() == 2 && b.dim(1)? == r),
            ] {
                if !ok {
                    return Err(AdapterError::ShapeMismatch {
                        file: file.clone(),
                        name: lora_key(module, which),
                        expected: if which == "A" {
                            vec![r, t.dims().last().copied().unwrap_or(0)]
                        } else {
                            vec![t.dims().first().copied().unwrap_or(0), r]
                        },
                        got: t.dims().to_vec(),
                        why: "rank from `r` / `rank_pattern`".into(),
                    });
                }
            }
        }
        for (module, (a, b)) in &pairs {
            for (t, which) in [(a, "A"), (b, "B")] {
                let finite = t.elem_count() == 0
                    || t.to_dtype(DType::F32)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?
                        .is_finite();
                if !finite {
                    return Err(AdapterError::BadTensor {
                        file: file.clone(),
                        name: lora_key(module, which),
                        message: "holds NaN or infinite values".into(),
                    });
                }
            }
        }
        let pairs = pairs
            .into_iter()
            .map(|(m, (a, b))| Ok((m, (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))))
            .collect::<Result<_>>()?;
        Ok(PeftAdapter {
            config,
            warnings: Vec::new(),
            dir: dir.to_path_buf(),
            stored_dtype: DType::F32,
            lora: pairs,
            extra: BTreeMap::new(),
            replacements: BTreeMap::new(),
        })
    }

    /// The LoRA pairs, module path → (A `[r, in]`, B `[out, r]`), f32 on the CPU.
    pub fn pairs(&self) -> &BTreeMap<String, (Tensor, Tensor)> {
        &self.lora
    }

    /// `scaling · B · A` of `module` (`[out, in]`, the update the module adds to its weight in
    /// the `y = W x` orientation), if the adapter holds it.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.lora.get(module) else {
            return Ok(None);
        };
        Ok(Some(
            (b.matmul(a)? * self.config.for_module(module).scaling)?,
        ))
    }

    /// The module's layer-replacing tensors and variant tensors must be absent: what a consumer
    /// of plain low-rank pairs needs (combining, llama.cpp), refused naming `what`.
    pub fn check_pairs_only(&self, what: &str) -> Result<()> {
        self.check_plain_lora(what)?;
        if let Some(name) = self.replacements.keys().next() {
            return Err(AdapterError::InvalidConfig {
                file: self.dir.join(CONFIG_FILE).display().to_string(),
                key: "modules_to_save".into(),
                message: format!(
                    "the adapter replaces `{name}` whole ({} tensor(s) trained in full: a classifier head, embeddings or output layer); {what} takes low-rank LoRA pairs only",
                    self.replacements.len()
                ),
            });
        }
        Ok(())
    }

    /// Refuses, naming the variant's tensor and "merge first", an adapter that is not plain
    /// LoRA on disk (DoRA's magnitudes), for an exporter to a format `target` that reads plain
    /// LoRA only.
    pub fn check_plain_lora(&self, target: &str) -> Result<()> {
        let variant = self.config.variant();
        let tensor = if variant.rewrites_base() {
            // residual form: A and B apply to W − s·B₀·A₀, not to the base the target loads
            "init_lora_weights (an adapter for the residual base)".to_string()
        } else if !variant.saved_as_plain_lora() {
            variant.extra_tensors().join(", ")
        } else {
            return Ok(());
        };
        Err(AdapterError::NotPlainLora {
            file: self.dir.join(CONFIG_FILE).display().to_string(),
            variant: variant.name().into(),
            tensor,
            target: target.into(),
        })
    }

    /// The weights file, for messages.
    pub fn weights_file(&self) -> String {
        self.dir.join(WEIGHTS_FILE).display().to_string()
    }

    /// Paths of the modules this adapter holds LoRA tensors for.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.lora.keys().map(String::as_str)
    }

    /// Full base tensor names replaced whole (`modules_to_save`, saved embedding/output layers).
    pub fn replacements(&self) -> &BTreeMap<String, Tensor> {
        &self.replacements
    }

    /// The low-rank pair for `module` on `device`, checked against the base layer's shape.
    pub fn low_rank(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<LowRank>> {
        let Some((a, b)) = self.lora.get(module) else {
            return Ok(None);
        };
        let r = a.dim(0)?;
        for (t, which, expected) in [(a, "A", vec![r, in_dim]), (b, "B", vec![out_dim, r])] {
            if t.dims() != expected.as_slice() {
                return Err(AdapterError::ShapeMismatch {
                    file: self.weights_file(),
                    name: lora_key(module, which),
                    expected,
                    got: t.dims().to_vec(),
                    why: format!("the base layer `{module}` is [{out_dim}, {in_dim}]; is the adapter made for another base model?"),
                });
            }
        }
        let variant = self.config.variant();
        let mut extra = BTreeMap::new();
        for &which in variant.extra_tensors() {
            let name = format!("{KEY_PREFIX}{module}.{which}");
            let t = self
                .extra
                .get(module)
                .and_then(|m| m.get(which))
                .ok_or_else(|| AdapterError::MissingTensor {
                    file: self.weights_file(),
                    name: name.clone(),
                    why: format!("a {} adapter stores it for every module", variant.name()),
                })?;
            let expected = variant.extra_shape(which, in_dim, out_dim);
            if t.dims() != expected.as_slice() {
                return Err(AdapterError::ShapeMismatch {
                    file: self.weights_file(),
                    name,
                    expected,
                    got: t.dims().to_vec(),
                    why: format!("the base layer `{module}` is [{out_dim}, {in_dim}]"),
                });
            }
            extra.insert(which, t.to_device(device)?);
        }
        Ok(Some(
            LowRank::new(
                a.to_device(device)?,
                b.to_device(device)?,
                self.config.for_module(module).scaling,
            )
            .with_variant(variant, extra),
        ))
    }
}

/// Writes a PEFT-format adapter into `dir` (created if needed), each file atomically.
/// `modules` pairs module paths with their low-rank tensors; `metadata` goes into the
/// safetensors header next to `format: pt`.
pub fn save_adapter(
    dir: &Path,
    config: &LoraConfig,
    modules: &[(String, LowRank)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    save_adapter_with(dir, config, modules, &[], metadata)
}

/// [`save_adapter`] plus tensors trained whole (`modules_to_save`), given by PEFT key
/// (`base_model.model.classifier.weight`).
pub fn save_adapter_with(
    dir: &Path,
    config: &LoraConfig,
    modules: &[(String, LowRank)],
    whole: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    // modules trained on a residual base are saved for the original base (`crate::residual`)
    let converted;
    let (config, modules) = if modules.iter().any(|(_, l)| l.initial.is_some()) {
        let mut out = Vec::with_capacity(modules.len());
        for (m, l) in modules {
            out.push(match &l.initial {
                Some((a0, b0)) => (
                    m.clone(),
                    crate::residual::module_for_original_base(l, a0, b0)?,
                ),
                None => (m.clone(), l.clone()),
            });
        }
        converted = (crate::residual::config_for_original_base(config), out);
        (&converted.0, converted.1.as_slice())
    } else {
        (config, modules)
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(modules.len() * 2);
    for (key, t) in whole {
        let t = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        tensors.push((key.clone(), t));
    }
    for (module, l) in modules {
        let pair = [("A", &l.a), ("B", &l.b)].map(|(which, t)| (lora_key(module, which), t));
        let own = l
            .extra
            .iter()
            .map(|(which, t)| (format!("{KEY_PREFIX}{module}.{which}"), t));
        for (key, t) in pair.into_iter().chain(own) {
            let t = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            tensors.push((key, t));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta: Vec<(String, String)> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.sort();
    crate::safetensors_writer::write_atomic(&dir.join(WEIGHTS_FILE), &tensors, &meta)?;
    let json =
        serde_json::to_string_pretty(&config.to_peft_json()).map_err(|e| AdapterError::Json {
            path: dir.join(CONFIG_FILE),
            message: e.to_string(),
        })?;
    atomic_write(&dir.join(CONFIG_FILE), json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModuleSpec;

    fn config() -> LoraConfig {
        LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: Some(ModuleSpec::List(vec!["q_proj".into()])),
            ..Default::default()
        }
    }

    fn pair(r: usize, inp: usize, out: usize) -> LowRank {
        let dev = Device::Cpu;
        LowRank::new(
            lorakit_ops::seeded::randn(0f32, 1., (r, inp), &dev).unwrap(),
            lorakit_ops::seeded::randn(0f32, 1., (out, r), &dev).unwrap(),
            2.0,
        )
    }

    #[test]
    fn save_then_load_round_trips_and_checks_shapes() {
        let d = tempfile::tempdir().unwrap();
        let l = pair(2, 6, 4);
        save_adapter(
            d.path(),
            &config(),
            &[("model.layers.0.self_attn.q_proj".into(), l.clone())],
            &HashMap::new(),
        )
        .unwrap();
        let ad = PeftAdapter::load(d.path()).unwrap();
        assert_eq!(
            ad.modules().collect::<Vec<_>>(),
            vec!["model.layers.0.self_attn.q_proj"]
        );
        let got = ad
            .low_rank("model.layers.0.self_attn.q_proj", 6, 4, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            got.a.to_vec2::<f32>().unwrap(),
            l.a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(got.scaling, 2.0);
        let err = ad
            .low_rank("model.layers.0.self_attn.q_proj", 8, 4, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora_A.weight") && err.contains("[2, 8]"),
            "{err}"
        );
        // no temp files left behind
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// DoRA adapters are refused by exporters that read plain LoRA; PiSSA adapters, saved for
    /// the original base as plain LoRA, are not.
    #[test]
    fn only_plain_lora_on_disk_passes_the_exporters_check() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/peft/variants/adapters");
        let dora = PeftAdapter::load(&fixtures.join("dora")).unwrap();
        let err = dora.check_plain_lora("llama.cpp").unwrap_err().to_string();
        assert!(
            err.contains("merge first")
                && err.contains("lora_magnitude_vector")
                && err.contains("dora"),
            "{err}"
        );
        for ok in ["pissa_converted", "olora_converted"] {
            PeftAdapter::load(&fixtures.join(ok))
                .unwrap()
                .check_plain_lora("llama.cpp")
                .unwrap();
        }
        let residual = PeftAdapter::load(&fixtures.join("pissa_residual")).unwrap();
        let err = residual.check_plain_lora("vLLM").unwrap_err().to_string();
        assert!(
            err.contains("residual") && err.contains("merge first"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_lora_b_is_named() {
        let d = tempfile::tempdir().unwrap();
        let l = pair(2, 6, 4);
        let mut map = HashMap::new();
        map.insert(lora_key("m.q_proj", "A"), l.a.clone());
        candle_core::safetensors::save(&map, d.path().join(WEIGHTS_FILE)).unwrap();
        std::fs::write(
            d.path().join(CONFIG_FILE),
            config().to_peft_json().to_string(),
        )
        .unwrap();
        let err = PeftAdapter::load(d.path()).unwrap_err().to_string();
        assert!(
            err.contains("m.q_proj.lora_B.weight") && err.contains(WEIGHTS_FILE),
            "{err}"
        );
    }

    #[test]
    fn a_rank_that_disagrees_with_the_config_is_named() {
        let d = tempfile::tempdir().unwrap();
        save_adapter(
            d.path(),
            &config(),
            &[("m.q_proj".into(), pair(3, 6, 4))],
            &HashMap::new(),
        )
        .unwrap();
        std::fs::write(
            d.path().join(CONFIG_FILE),
            config().to_peft_json().to_string(),
        )
        .unwrap();
        let err = PeftAdapter::load(d.path()).unwrap_err().to_string();
        assert!(err.contains("rank") && err.contains("[3, 6]"), "{err}");
    }
}
