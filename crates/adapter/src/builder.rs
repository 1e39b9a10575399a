//! `LayerBuilder`: what model code uses instead of a bare `VarBuilder`. It hands out frozen base
//! tensors and `LoraLinear`s, deciding per module (by its full Hugging Face path) whether the
//! layer gets an adapter — fresh trainable tensors, or tensors loaded from a PEFT file — and
//! records every linear module so targets that match nothing can be reported.
use crate::config::{LoraConfig, ModuleLora};
use crate::error::{AdapterError, Result};
use crate::lora_linear::{LoraLinear, LowRank};
use crate::peft_format::{lora_key, PeftAdapter, KEY_PREFIX};
use crate::target::TargetSelector;
use crate::variant::{InitInput, LoraVariant};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit_ops::dropout::{Dropout, StepSeed};
use lorakit_ops::quantized::{Frozen, QuantMatrix};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where adapter tensors come from.
pub enum Adapters {
    /// The plain base model.
    None,
    /// Trainable adapters: `A` seeded-uniform like PEFT's kaiming init, `B` zero. Vars already
    /// in `varmap` under their PEFT key are reused (resuming).
    Train {
        config: LoraConfig,
        varmap: VarMap,
        seed: u64,
        /// Drives LoRA dropout masks; the trainer sets it before each forward pass.
        dropout_seed: StepSeed,
    },
    /// Adapters read from a PEFT directory.
    Loaded(PeftAdapter),
}

/// Frozen weights that stay in GGML blocks (QLoRA): those a GGUF base holds quantized, and/or
/// every other linear weight quantized at load.
#[derive(Clone, Debug, Default)]
pub struct QuantizedBase {
    /// Weights kept as they are stored, by the full tensor name the model asks for.
    pub kept: std::collections::HashMap<String, QuantMatrix>,
    /// A prefix the model's names carry and `kept`'s names do not (`language_model.`).
    pub strip_prefix: Option<&'static str>,
    /// Quantize every linear weight not in `kept` to this type at load (rows that are not
    /// whole blocks stay dense).
    pub quantize: Option<candle_core::quantized::GgmlDType>,
}

impl QuantizedBase {
    fn kept(&self, name: &str) -> Option<&QuantMatrix> {
        self.kept.get(name).or_else(|| {
            self.strip_prefix
                .and_then(|p| name.strip_prefix(p))
                .and_then(|n| self.kept.get(n))
        })
    }
}

/// One linear module of a model, as built.
#[derive(Clone, Debug)]
pub struct LinearInfo {
    pub path: String,
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
    /// Rank, alpha and scaling when the module is wrapped.
    pub lora: Option<ModuleLora>,
}

struct Shared {
    adapters: Adapters,
    selector: Option<TargetSelector>,
    modules: Mutex<Vec<LinearInfo>>,
    /// Every base tensor handed out, so tests can check none receives a gradient.
    base_tensors: Mutex<Vec<(String, Tensor)>>,
    /// Tensors trained whole (`modules_to_save`), by full name.
    whole: Mutex<Vec<String>>,
    /// A₀, B₀ of modules whose init rewrote the base, by module path.
    initial: Mutex<BTreeMap<String, (Tensor, Tensor)>>,
    quantized: QuantizedBase,
    /// Weights handed out in GGML blocks: full name, type, bytes.
    quantized_used: Mutex<Vec<(String, candle_core::quantized::GgmlDType, usize)>>,
    /// Linear weights `quantize` left dense (rows that are not whole blocks).
    left_dense: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `VarBuilder` for base weights plus the adapter decision, at one module path.
#[derive(Clone)]
pub struct LayerBuilder<'a> {
    vb: VarBuilder<'a>,
    path: String,
    shared: Arc<Shared>,
}

/// The outcome of building a model: wrapped modules and warnings.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    pub linears: Vec<LinearInfo>,
    /// Every frozen base tensor the model holds, by full name.
    pub frozen: Vec<(String, Tensor)>,
    /// Tensors trained whole (PEFT `modules_to_save`, e.g. a classification head), by full name.
    pub whole: Vec<String>,
    pub warnings: Vec<String>,
    /// The LoRA variant of the wrapped modules (plain LoRA when `None`).
    pub variant: Option<Arc<dyn LoraVariant>>,
    /// A₀, B₀ of modules whose init rewrote the base (PiSSA, OLoRA), by module path.
    pub initial: BTreeMap<String, (Tensor, Tensor)>,
    /// Frozen weights held in GGML blocks: full name, type, bytes.
    pub quantized: Vec<(String, candle_core::quantized::GgmlDType, usize)>,
    /// Linear weights the load-time quantization left dense (rows that are not whole blocks).
    pub left_dense: Vec<String>,
}

impl BuildReport {
    pub fn wrapped(&self) -> impl Iterator<Item = &LinearInfo> {
        self.linears.iter().filter(|l| l.lora.is_some())
    }

    /// The tensors trained whole, as (PEFT key, tensor) read from `varmap` (for saving).
    pub fn trained_whole(&self, varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
        let vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        self.whole
            .iter()
            .map(|name| {
                let key = format!("{}{name}", crate::peft_format::KEY_PREFIX);
                let t = vars
                    .get(&key)
                    .map(|v| v.as_tensor().clone())
                    .ok_or_else(|| AdapterError::MissingTensor {
                        file: "training state".into(),
                        name: key.clone(),
                        why: "the module is trained whole".into(),
                    })?;
                Ok((key, t))
            })
            .collect()
    }

    /// The trained tensors of the wrapped modules, read from `varmap` (for saving).
    pub fn trained_modules(&self, varmap: &VarMap) -> Result<Vec<(String, LowRank)>> {
        let vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        self.wrapped()
            .map(|l| {
                let get = |key: String| {
                    vars.get(&key)
                        .map(|v| v.as_tensor().clone())
                        .ok_or_else(|| AdapterError::MissingTensor {
                            file: "training state".into(),
                            name: key,
                            why: "the module is wrapped".into(),
                        })
                };
                let info = l.lora.unwrap_or(ModuleLora {
                    r: 0,
                    alpha: 0.0,
                    scaling: 0.0,
                });
                let variant = self.variant.clone().unwrap_or_else(crate::variant::lora);
                let mut extra = BTreeMap::new();
                for &which in variant.extra_tensors() {
                    extra.insert(which, get(format!("{KEY_PREFIX}{}.{which}", l.path))?);
                }
                let low = LowRank::new(
                    get(lora_key(&l.path, "A"))?,
                    get(lora_key(&l.path, "B"))?,
                    info.scaling,
                )
                .with_variant(variant, extra)
                .with_initial(self.initial.get(&l.path).cloned());
                Ok((l.path.clone(), low))
            })
            .collect()
    }
}

impl<'a> LayerBuilder<'a> {
    pub fn new(vb: VarBuilder<'a>, adapters: Adapters) -> Result<Self> {
        Self::with_quantized(vb, adapters, QuantizedBase::default())
    }

    /// [`LayerBuilder::new`] with frozen weights kept in (or quantized to) GGML blocks.
    pub fn with_quantized(
        vb: VarBuilder<'a>,
        adapters: Adapters,
        quantized: QuantizedBase,
    ) -> Result<Self> {
        let selector = match &adapters {
            Adapters::None => None,
            Adapters::Train { config, .. } => Some(TargetSelector::new(config)?),
            Adapters::Loaded(a) => Some(TargetSelector::new(&a.config)?),
        };
        Ok(LayerBuilder {
            vb,
            path: String::new(),
            shared: Arc::new(Shared {
                adapters,
                selector,
                modules: Mutex::new(Vec::new()),
                base_tensors: Mutex::new(Vec::new()),
                whole: Mutex::new(Vec::new()),
                initial: Mutex::new(BTreeMap::new()),
                quantized,
                quantized_used: Mutex::new(Vec::new()),
                left_dense: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The builder for a child module.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        LayerBuilder {
            vb: self.vb.pp(&name),
            path: if self.path.is_empty() {
                name
            } else {
                format!("{}.{name}", self.path)
            },
            shared: self.shared.clone(),
        }
    }

    /// Where adapter tensors come from.
    pub fn adapters(&self) -> &Adapters {
        &self.shared.adapters
    }

    /// This module's full path, e.g. `model.layers.0.self_attn`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// A frozen base tensor of this module (a norm weight, a bias, an embedding table);
    /// `modules_to_save` replacements from a loaded adapter take precedence.
    pub fn tensor(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.full_name(name);
        let t = match &self.shared.adapters {
            Adapters::Loaded(a) if a.replacements().contains_key(&full) => {
                let t = &a.replacements()[&full];
                if t.shape() != &shape {
                    return Err(AdapterError::ShapeMismatch {
                        file: a.weights_file(),
                        name: full,
                        expected: shape.dims().to_vec(),
                        got: t.dims().to_vec(),
                        why: "a `modules_to_save` tensor must have the base tensor's shape".into(),
                    });
                }
                t.to_device(self.device())?.to_dtype(self.dtype())?
            }
            _ => match self.shared.quantized.kept(&full) {
                // asked for dense (a module trained whole, a base weight a variant rewrites)
                Some(q) => {
                    if q.dims() != shape.dims2()? {
                        return Err(self.kept_shape_error(&full, shape.dims(), q));
                    }
                    q.dequantize(self.dtype())?.to_device(self.device())?
                }
                None => self.vb.get(shape, name)?,
            },
        };
        lock(&self.shared.base_tensors).push((full, t.clone()));
        Ok(t)
    }

    fn kept_shape_error(&self, full: &str, expected: &[usize], q: &QuantMatrix) -> AdapterError {
        let (o, i) = q.dims();
        AdapterError::ShapeMismatch {
            file: "base model".into(),
            name: full.to_string(),
            expected: expected.to_vec(),
            got: vec![o, i],
            why: "the model's config implies this shape".into(),
        }
    }

    /// A frozen matrix `[out, in]` at `name`: kept in GGML blocks when the base stores it so,
    /// quantized at load when asked (`quantize`), else dense.
    fn frozen_matrix(&self, out: usize, inp: usize, name: &str, quantize: bool) -> Result<Frozen> {
        let full = self.full_name(name);
        let replaced = matches!(&self.shared.adapters,
            Adapters::Loaded(a) if a.replacements().contains_key(&full));
        if !replaced {
            if let Some(q) = self.shared.quantized.kept(&full) {
                if q.dims() != (out, inp) {
                    return Err(self.kept_shape_error(&full, &[out, inp], q));
                }
                let q = q.to_device(self.device())?;
                return Ok(self.record_quantized(full, q));
            }
        }
        let dense = self.tensor((out, inp), name)?;
        self.maybe_quantize(full, dense, quantize && !replaced)
    }

    /// `dense` quantized to the load-time type when one is set and its rows are whole blocks.
    fn maybe_quantize(&self, full: String, dense: Tensor, quantize: bool) -> Result<Frozen> {
        match self.shared.quantized.quantize {
            Some(ty) if quantize && dense.dim(1)?.is_multiple_of(ty.block_size()) => {
                let q = QuantMatrix::quantize(&dense, ty)?;
                Ok(self.record_quantized(full, q))
            }
            Some(_) if quantize => {
                lock(&self.shared.left_dense).push(full);
                Ok(Frozen::Dense(dense))
            }
            _ => Ok(Frozen::Dense(dense)),
        }
    }

    fn record_quantized(&self, full: String, q: QuantMatrix) -> Frozen {
        lock(&self.shared.quantized_used).push((full, q.ggml_dtype(), q.size_in_bytes()));
        Frozen::Quant(q)
    }

    /// An embedding table `[vocab, hidden]` (kept in GGML blocks when the base stores it so;
    /// never quantized at load). Adapters on embeddings are refused.
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Frozen> {
        if let Some(sel) = &self.shared.selector {
            // "all-linear" means linear layers only; an explicit entry naming an embedding is refused.
            if let Some(entry) = sel
                .matching_entry(&self.path)
                .filter(|e| e != crate::target::ALL_LINEAR)
            {
                return Err(AdapterError::Unsupported {
                    file: "LoRA config".into(),
                    key: "target_modules".into(),
                    value: format!("{entry:?} (matches `{}`)", self.path),
                    feature: "LoRA on embedding layers".into(),
                });
            }
        }
        self.frozen_matrix(vocab, hidden, "weight", false)
    }

    /// The linear layer at this path (`weight: [out, in]`, optional `bias: [out]`).
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<LoraLinear> {
        let weight = self.frozen_matrix(out_dim, in_dim, "weight", true)?;
        let bias = if bias {
            Some(self.tensor(out_dim, "bias")?)
        } else {
            None
        };
        self.linear_from(weight, bias)
    }

    /// A GPT-2-style `Conv1D` at this path: `weight` stored `[in, out]` (what PEFT calls
    /// `fan_in_fan_out`) and `bias: [out]`. The layer keeps the weight transposed, so adapters
    /// (A `[r, in]`, B `[out, r]`, as PEFT stores them) apply as on any linear layer; only a
    /// merge must transpose the update back.
    pub fn conv1d(&self, in_dim: usize, out_dim: usize) -> Result<LoraLinear> {
        let weight = self
            .tensor((in_dim, out_dim), "weight")?
            .t()?
            .contiguous()?;
        let weight = self.maybe_quantize(self.full_name("weight"), weight, true)?;
        let bias = self.tensor(out_dim, "bias")?;
        self.linear_from(weight, Some(bias))
    }

    /// A linear layer at this path over an existing weight (e.g. a tied output head).
    pub fn linear_from(
        &self,
        weight: impl Into<Frozen>,
        bias: Option<Tensor>,
    ) -> Result<LoraLinear> {
        let weight: Frozen = weight.into();
        // PEFT stores the base weight of an adapted output head (`lm_head.base_layer.weight`),
        // also when the head is tied to the embeddings; use it like any replacement.
        let weight = match &self.shared.adapters {
            Adapters::Loaded(a) if a.replacements().contains_key(&self.full_name("weight")) => {
                Frozen::Dense(self.tensor(weight.dims2()?, "weight")?)
            }
            _ => weight,
        };
        let (out_dim, in_dim) = weight.dims2()?;
        let wrapped = self
            .shared
            .selector
            .as_ref()
            .is_some_and(|s| s.matches(&self.path));
        let (lora, info, weight) = if wrapped {
            // a quantized weight is dequantized for the init alone
            let dense = match &weight {
                Frozen::Dense(w) => w.clone(),
                Frozen::Quant(q) => q.dequantize(self.dtype())?,
            };
            let (l, info) = self.low_rank(&dense, in_dim, out_dim)?;
            drop(dense);
            // an init that rewrote the base: the layer runs on the residual
            let weight = match (&l.initial, weight) {
                (Some(_), Frozen::Quant(q)) => {
                    return Err(AdapterError::Unsupported {
                        file: "LoRA config".into(),
                        key: "init_lora_weights".into(),
                        value: format!("{} on `{}` ({:?})", l.variant.name(), self.path, q.ggml_dtype()),
                        feature: "an initialisation that rewrites the base weight on a base kept quantized (set model.quantized: dequantize)".into(),
                    })
                }
                (Some((a0, b0)), Frozen::Dense(weight)) => {
                    lock(&self.shared.initial).insert(self.path.clone(), (a0.clone(), b0.clone()));
                    Frozen::Dense(crate::residual::residual_weight(
                        &weight, a0, b0, l.scaling,
                    )?)
                }
                (None, weight) => weight,
            };
            (Some(l), Some(info), weight)
        } else {
            (None, None, weight)
        };
        lock(&self.shared.modules).push(LinearInfo {
            path: self.path.clone(),
            in_dim,
            out_dim,
            bias: bias.is_some(),
            lora: info,
        });
        Ok(LoraLinear::new(weight, bias, lora))
    }

    /// A linear module trained whole and saved with the adapter (PEFT `modules_to_save`), such
    /// as a classification head the base model lacks: fresh trainable tensors when training
    /// (weight seeded-uniform with std 0.02, like transformers' init; bias zero), the adapter's
    /// saved tensors when loading one, else the base model's own.
    pub fn saved_linear(&self, in_dim: usize, out_dim: usize) -> Result<LoraLinear> {
        let (weight, bias) = match &self.shared.adapters {
            Adapters::Train { varmap, seed, .. } => {
                let mut vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
                let mut get = |name: &str, shape: Vec<usize>| -> Result<Tensor> {
                    let full = self.full_name(name);
                    let key = format!("{}{full}", crate::peft_format::KEY_PREFIX);
                    let t = match vars.get(&key) {
                        Some(v) => v.as_tensor().clone(),
                        None => {
                            let n = shape.iter().product();
                            let init = if name == "weight" {
                                seeded_uniform(*seed, &key, n, 0.02 * 3f64.sqrt())
                            } else {
                                vec![0.0; n]
                            };
                            let t = Tensor::from_vec(init, shape.clone(), self.device())?;
                            let v = Var::from_tensor(&t)?;
                            vars.insert(key.clone(), v.clone());
                            v.as_tensor().clone()
                        }
                    };
                    if t.dims() != shape.as_slice() {
                        return Err(AdapterError::ShapeMismatch {
                            file: "resumed adapter state".into(),
                            name: key,
                            expected: shape,
                            got: t.dims().to_vec(),
                            why: "the model config implies this shape".into(),
                        });
                    }
                    lock(&self.shared.whole).push(full);
                    Ok(t)
                };
                let w = get("weight", vec![out_dim, in_dim])?;
                let b = get("bias", vec![out_dim])?;
                (w, b)
            }
            _ => (
                self.tensor((out_dim, in_dim), "weight")?,
                self.tensor(out_dim, "bias")?,
            ),
        };
        lock(&self.shared.modules).push(LinearInfo {
            path: self.path.clone(),
            in_dim,
            out_dim,
            bias: true,
            lora: None,
        });
        Ok(LoraLinear::trainable(weight, Some(bias)))
    }

    fn low_rank(
        &self,
        weight: &Tensor,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<(LowRank, ModuleLora)> {
        let dev = self.device();
        match &self.shared.adapters {
            // only called for selected modules, and `None` selects nothing
            Adapters::None => Err(AdapterError::InvalidConfig {
                file: "LoRA config".into(),
                key: "target_modules".into(),
                message: "no adapters configured".into(),
            }),
            Adapters::Loaded(a) => {
                let info = a.config.for_module(&self.path);
                let mut l = a
                    .low_rank(&self.path, in_dim, out_dim, dev)?
                    .ok_or_else(|| AdapterError::MissingTensor {
                        file: a.weights_file(),
                        name: lora_key(&self.path, "A"),
                        why: "adapter_config.json targets this module".into(),
                    })?;
                if l.variant.rewrites_base() {
                    // saved in residual form: derive A₀, B₀ from this base again, as PEFT does
                    if matches!(a.config.init(), crate::config::LoraInit::PissaNiter(_)) {
                        return Err(AdapterError::Unsupported {
                            file: a.dir.join(crate::peft_format::CONFIG_FILE).display().to_string(),
                            key: "init_lora_weights".into(),
                            value: format!("{:?}", a.config.init_lora_weights),
                            feature: "an adapter in residual form from a randomized SVD (its A₀, B₀ cannot be derived again); save it for the original base (PEFT: path_initial_model_for_weight_conversion)".into(),
                        });
                    }
                    let initial = crate::residual::initial_of(&*l.variant, weight, &l)?;
                    l = l.with_initial(Some(initial));
                }
                Ok((l, info))
            }
            Adapters::Train {
                config,
                varmap,
                seed,
                dropout_seed,
            } => {
                let info = config.for_module(&self.path);
                let variant = config.variant();
                let mut vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
                let key_a = lora_key(&self.path, "A");
                let key_b = lora_key(&self.path, "B");
                let extra_key = |which: &str| format!("{KEY_PREFIX}{}.{which}", self.path);
                let mut initial = None;
                // fresh tensors from the variant's init, unless a resumed run already holds them
                if !vars.contains_key(&key_a) {
                    let uniform =
                        |key: &str, n: usize, bound: f64| seeded_uniform(*seed, key, n, bound);
                    let init = variant.init(&InitInput {
                        weight,
                        rank: info.r,
                        scaling: info.scaling,
                        uniform: &uniform,
                        key_a: &key_a,
                        seed: name_seed(*seed, &key_a),
                        device: dev,
                    })?;
                    if variant.rewrites_base() {
                        initial = Some((init.a.clone(), init.b.clone()));
                    }
                    let own = init.extra.into_iter().map(|(w, t)| (extra_key(w), t));
                    for (key, t) in [(key_a.clone(), init.a), (key_b.clone(), init.b)]
                        .into_iter()
                        .chain(own)
                    {
                        vars.entry(key).or_insert(Var::from_tensor(&t)?);
                    }
                } else if variant.rewrites_base() {
                    // a checkpoint holds the adapter for the original base, [A; A₀] and
                    // [B, −B₀]: split it back (exactly)
                    let saved_a = vars[&key_a].as_tensor().clone();
                    let saved_b =
                        vars.get(&key_b)
                            .map(|v| v.as_tensor().clone())
                            .ok_or_else(|| AdapterError::MissingTensor {
                                file: "resumed adapter state".into(),
                                name: key_b.clone(),
                                why: format!("{key_a} is present"),
                            })?;
                    if saved_a.dims() != [2 * info.r, in_dim]
                        || saved_b.dims() != [out_dim, 2 * info.r]
                    {
                        return Err(AdapterError::ShapeMismatch {
                            file: "resumed adapter state".into(),
                            name: key_a,
                            expected: vec![2 * info.r, in_dim],
                            got: saved_a.dims().to_vec(),
                            why: format!(
                                "a {} checkpoint holds [A; A₀] for the original base",
                                variant.name()
                            ),
                        });
                    }
                    let [a, b, a0, b0] =
                        crate::residual::split_converted(&saved_a, &saved_b, info.r)?;
                    vars.insert(key_a.clone(), Var::from_tensor(&a.contiguous()?)?);
                    vars.insert(key_b.clone(), Var::from_tensor(&b.contiguous()?)?);
                    initial = Some((a0.contiguous()?, b0.contiguous()?));
                }
                let fetch = |key: String, shape: Vec<usize>| -> Result<Tensor> {
                    let t = vars
                        .get(&key)
                        .map(|v| v.as_tensor().clone())
                        .ok_or_else(|| AdapterError::MissingTensor {
                            file: "resumed adapter state".into(),
                            name: key.clone(),
                            why: format!("a {} adapter holds it for every module", variant.name()),
                        })?;
                    if t.dims() != shape.as_slice() {
                        return Err(AdapterError::ShapeMismatch {
                            file: "resumed adapter state".into(),
                            name: key,
                            expected: shape,
                            got: t.dims().to_vec(),
                            why: "the LoRA config and base model imply this shape".into(),
                        });
                    }
                    Ok(t)
                };
                let a = fetch(key_a, vec![info.r, in_dim])?;
                let b = fetch(key_b, vec![out_dim, info.r])?;
                let mut extra = BTreeMap::new();
                for &which in variant.extra_tensors() {
                    let shape = variant.extra_shape(which, in_dim, out_dim);
                    extra.insert(which, fetch(extra_key(which), shape)?);
                }
                let dropout = (config.lora_dropout > 0.0).then(|| {
                    Dropout::new(config.lora_dropout as f32, &self.path, dropout_seed.clone())
                });
                let low = LowRank::new(a, b, info.scaling)
                    .with_dropout(dropout)
                    .with_variant(variant, extra)
                    .with_initial(initial);
                Ok((low, info))
            }
        }
    }

    /// Every linear module built so far.
    pub fn linears(&self) -> Vec<LinearInfo> {
        lock(&self.shared.modules).clone()
    }

    /// Every frozen base tensor handed out so far, by full name.
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        lock(&self.shared.base_tensors).clone()
    }

    /// Call after the model is built: fails if a target entry wrapped nothing or if a loaded
    /// adapter holds tensors for modules the model does not have.
    pub fn finish(&self) -> Result<BuildReport> {
        let linears = self.linears();
        let mut warnings = Vec::new();
        if let Some(sel) = &self.shared.selector {
            let paths: Vec<String> = linears.iter().map(|l| l.path.clone()).collect();
            sel.check_all_matched(&paths)?;
        }
        if let Adapters::Loaded(a) = &self.shared.adapters {
            warnings.extend(a.warnings.iter().cloned());
            let wrapped: BTreeSet<&str> = linears
                .iter()
                .filter(|l| l.lora.is_some())
                .map(|l| l.path.as_str())
                .collect();
            let unused: Vec<String> = a
                .modules()
                .filter(|m| !wrapped.contains(m))
                .map(|m| lora_key(m, "A"))
                .collect();
            if !unused.is_empty() {
                return Err(AdapterError::UnusedTensors {
                    file: a.weights_file(),
                    names: unused,
                });
            }
            let base: BTreeSet<String> = self.base_tensors().into_iter().map(|(n, _)| n).collect();
            let unused: Vec<String> = a
                .replacements()
                .keys()
                .filter(|k| !base.contains(*k))
                .cloned()
                .collect();
            if !unused.is_empty() {
                return Err(AdapterError::UnusedTensors {
                    file: a.weights_file(),
                    names: unused,
                });
            }
        }
        Ok(BuildReport {
            linears,
            frozen: self.base_tensors(),
            whole: lock(&self.shared.whole).clone(),
            warnings,
            variant: match &self.shared.adapters {
                Adapters::Train { config, .. } => Some(config.variant()),
                Adapters::Loaded(a) => Some(a.config.variant()),
                Adapters::None => None,
            },
            initial: lock(&self.shared.initial).clone(),
            quantized: lock(&self.shared.quantized_used).clone(),
            left_dense: lock(&self.shared.left_dense).clone(),
        })
    }
}

/// The run seed mixed with a tensor's name (FNV-1a), so draws do not depend on construction
/// order or thread.
fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deterministic U(-bound, bound) values for one tensor: SplitMix64 seeded by [`name_seed`].
fn seeded_uniform(seed: u64, name: &str, n: usize, bound: f64) -> Vec<f32> {
    let mut state = name_seed(seed, name);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_is_reproducible_and_bounded() {
        let a = seeded_uniform(7, "x", 1000, 0.25);
        assert_eq!(a, seeded_uniform(7, "x", 1000, 0.25));
        assert_ne!(a, seeded_uniform(8, "x", 1000, 0.25));
        assert_ne!(a, seeded_uniform(7, "y", 1000, 0.25));
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        let mean: f32 = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!(a.iter().any(|v| *v > 0.2) && a.iter().any(|v| *v < -0.2));
    }
}
