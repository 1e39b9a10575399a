//! Opening a base model of any registered architecture: a Hugging Face model directory
//! (config.json + safetensors, single or sharded) or a llama.cpp GGUF file (under Hugging Face
//! names and in the Hugging Face layout; its quantized weights kept in their GGML blocks unless
//! [`Quantization::keep`] is off, and any model's linear weights optionally quantized at load).
use crate::error::{ModelError, Result};
use crate::gguf::GgufHeader;
use crate::model::{CausalLm, Model, ModelConfig, SequenceClassifier, Task};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lorakit_adapter::{
    Adapters, BuildReport, Checkpoint, LayerBuilder, LinearInfo, QuantizedBase, ShapeOnly,
};
use std::path::{Path, PathBuf};

/// A base model's parsed config and its (not yet read) weights.
pub struct BaseModel {
    /// The model directory, or the `.gguf` file.
    pub path: PathBuf,
    pub config: Box<dyn ModelConfig>,
    weights: Weights,
    quantization: Quantization,
}

/// How frozen weights are held in memory (QLoRA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantization {
    /// Keep a GGUF base's block-quantized weights in their blocks (dequantized just in time
    /// for each product); off, they are dequantized at load.
    pub keep: bool,
    /// Quantize the other linear weights (any base's) to this type at load.
    pub quantize: Option<GgmlDType>,
}

impl Default for Quantization {
    fn default() -> Self {
        Quantization {
            keep: true,
            quantize: None,
        }
    }
}

/// The GGML types `model.quantize` offers, by their recipe names.
pub const QUANTIZE_TYPES: &[(&str, GgmlDType)] = &[
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

enum Weights {
    Safetensors(Checkpoint),
    /// Dequantised on `load`, not on `open`, so `inspect`-like uses stay cheap.
    Gguf,
}

/// Whether `path` names a GGUF file rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}

impl BaseModel {
    /// Reads the config (config.json, or the GGUF header) and the weights' headers, and checks
    /// that the two agree on the layer count.
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            let header = GgufHeader::from_file(path)?;
            let json = crate::gguf::hf_config_json(&header, path)?;
            let config = crate::registry::parse_config(json, path)?;
            return Ok(BaseModel {
                path: path.to_path_buf(),
                config,
                weights: Weights::Gguf,
                quantization: Quantization::default(),
            });
        }
        if !path.is_dir() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory or a .gguf file (expected a Hugging Face model directory with config.json and model.safetensors, or a .gguf file)",
                ),
            });
        }
        let config = crate::registry::read_config(&path.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(path)?;
        crate::layer_count::check(
            config.dimensions().layers as u64,
            checkpoint.names(),
            &path.join("config.json"),
            "num_hidden_layers",
            &checkpoint.describe(),
        )?;
        Ok(BaseModel {
            path: path.to_path_buf(),
            config,
            weights: Weights::Safetensors(checkpoint),
            quantization: Quantization::default(),
        })
    }

    /// How `load` holds the frozen weights (default: a GGUF base's quantized weights kept).
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    /// The safetensors checkpoint, for callers that read tensors directly (merge).
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        match &self.weights {
            Weights::Safetensors(c) => Some(c),
            Weights::Gguf => None,
        }
    }

    /// The dtype the checkpoint declares, else the dtype of its first float tensor.
    pub fn stored_dtype(&self) -> DType {
        let Weights::Safetensors(checkpoint) = &self.weights else {
            return DType::F32; // GGUF tensors are dequantised to f32
        };
        self.config.declared_dtype().unwrap_or_else(|| {
            checkpoint
                .names()
                .filter_map(|n| checkpoint.meta(n).ok())
                .map(|m| m.dtype)
                .find(|d| d.is_float())
                .unwrap_or(DType::F32)
        })
    }

    /// The model for `task` with `adapters`, in `dtype` on `device`.
    pub fn load(
        self,
        adapters: Adapters,
        task: Task,
        dtype: DType,
        device: &Device,
    ) -> Result<(Model, BuildReport)> {
        self.check_task(task)?;
        let mut quantized = QuantizedBase {
            quantize: self.quantization.quantize,
            ..Default::default()
        };
        let (backend, mut names, describe) = match self.weights {
            Weights::Safetensors(checkpoint) => {
                let names: Vec<String> = checkpoint.names().map(String::from).collect();
                let describe = checkpoint.describe();
                let backend: Box<dyn SimpleBackend> = Box::new(checkpoint);
                (backend, names, describe)
            }
            Weights::Gguf if self.quantization.keep => {
                let (_, tensors, kept) = crate::gguf::load_hf_kept(&self.path, device)?;
                let names = tensors.keys().cloned().collect();
                quantized.kept = kept.into_iter().collect();
                let backend: Box<dyn SimpleBackend> = Box::new(tensors);
                (backend, names, self.path.display().to_string())
            }
            Weights::Gguf => {
                let (_, tensors) = crate::gguf::load_hf(&self.path, &Device::Cpu)?;
                let names = tensors.keys().cloned().collect();
                let backend: Box<dyn SimpleBackend> = Box::new(tensors);
                (backend, names, self.path.display().to_string())
            }
        };
        let prefix = self.config.optional_prefix();
        let strip = prefix.filter(|p| !names.iter().any(|n| n.starts_with(p)));
        let backend = with_prefix(backend, &names, prefix);
        quantized.strip_prefix = strip;
        names.extend(quantized.kept.keys().cloned());
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        let lb = LayerBuilder::with_quantized(vb, adapters, quantized)?;
        let model = self.config.build(&lb, task)?;
        let report = lb.finish()?;
        let used = report
            .frozen
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(report.quantized.iter().map(|(n, _, _)| n.as_str()));
        check_all_used(&*self.config, &names, used, prefix, &describe)?;
        Ok((model, report))
    }

    /// [`BaseModel::load`] for a causal language model.
    pub fn load_causal_lm(
        self,
        adapters: Adapters,
        dtype: DType,
        device: &Device,
    ) -> Result<(Box<dyn CausalLm>, BuildReport)> {
        let (m, r) = self.load(adapters, Task::CausalLm, dtype, device)?;
        Ok((m.into_causal_lm()?, r))
    }

    /// [`BaseModel::load`] for a sequence classifier with `num_labels` classes.
    pub fn load_classifier(
        self,
        adapters: Adapters,
        num_labels: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Box<dyn SequenceClassifier>, BuildReport)> {
        let task = Task::SequenceClassification { num_labels };
        let (m, r) = self.load(adapters, task, dtype, device)?;
        Ok((m.into_classifier()?, r))
    }

    /// Walks the model's structure (its default task) against the weights' headers without
    /// reading weights: every linear module with its shape, and which ones `adapters` would wrap.
    pub fn linear_modules(self, adapters: Adapters) -> Result<Vec<LinearInfo>> {
        let Weights::Safetensors(checkpoint) = self.weights else {
            return Err(ModelError::Input(
                "linear_modules reads safetensors headers; GGUF headers are read by gguf::GgufHeader"
                    .into(),
            ));
        };
        let names: Vec<String> = checkpoint.names().map(String::from).collect();
        let describe = checkpoint.describe();
        let backend: Box<dyn SimpleBackend> = Box::new(ShapeOnly(checkpoint));
        let prefix = self.config.optional_prefix();
        let vb = VarBuilder::from_backend(
            with_prefix(backend, &names, prefix),
            DType::F32,
            Device::Cpu,
        );
        let lb = LayerBuilder::new(vb, adapters)?;
        self.config.build(&lb, self.config.default_task())?;
        let used = lb.base_tensors();
        check_all_used(
            &*self.config,
            &names,
            used.iter().map(|(n, _)| n.as_str()),
            prefix,
            &describe,
        )?;
        Ok(lb.linears())
    }

    /// The task must be one the architecture builds; said before any weight is read.
    pub fn check_task(&self, task: Task) -> Result<()> {
        let natural = self.config.default_task();
        if std::mem::discriminant(&natural) == std::mem::discriminant(&task) {
            return Ok(());
        }
        let file = if is_gguf(&self.path) {
            self.path.clone()
        } else {
            self.path.join("config.json")
        };
        Err(ModelError::Config {
            file,
            key: "model_type".into(),
            message: format!(
                "{:?} models are built for {}, not {}",
                self.config.model_type(),
                natural.name(),
                task.name()
            ),
        })
    }
}

/// Builds a model from any `VarBuilder` (a checkpoint, a merged backend, a test's tensors).
pub fn build(
    config: &dyn ModelConfig,
    vb: VarBuilder<'static>,
    adapters: Adapters,
    task: Task,
) -> Result<(Model, BuildReport)> {
    let lb = LayerBuilder::new(vb, adapters)?;
    let model = config.build(&lb, task)?;
    let report = lb.finish()?;
    Ok((model, report))
}

/// [`build`] for a causal language model.
pub fn build_causal_lm(
    config: &dyn ModelConfig,
    vb: VarBuilder<'static>,
    adapters: Adapters,
) -> Result<(Box<dyn CausalLm>, BuildReport)> {
    let (m, r) = build(config, vb, adapters, Task::CausalLm)?;
    Ok((m.into_causal_lm()?, r))
}

/// Serves `PREFIX.X` from weights that store the bare base model's `X`, when none of the stored
/// names carries the prefix.
fn with_prefix(
    backend: Box<dyn SimpleBackend>,
    names: &[String],
    prefix: Option<&'static str>,
) -> Box<dyn SimpleBackend> {
    match prefix {
        Some(p) if !names.iter().any(|n| n.starts_with(p)) => Box::new(StripPrefix(backend, p)),
        _ => backend,
    }
}

struct StripPrefix(Box<dyn SimpleBackend>, &'static str);

impl StripPrefix {
    fn name<'a>(&self, name: &'a str) -> &'a str {
        name.strip_prefix(self.1).unwrap_or(name)
    }
}

impl SimpleBackend for StripPrefix {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, self.name(name), h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(self.name(name), dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(self.name(name))
    }
}

/// A stored tensor the model never asked for means the config and the weights disagree (a layer
/// count, a tied head); refuse rather than run a silently different model. Tensors the
/// architecture says transformers itself skips are allowed.
fn check_all_used<'a>(
    config: &dyn ModelConfig,
    names: &[String],
    used: impl Iterator<Item = &'a str>,
    prefix: Option<&str>,
    file: &str,
) -> Result<()> {
    let stripped = prefix.filter(|p| !names.iter().any(|n| n.starts_with(p)));
    let used: std::collections::HashSet<&str> = used
        .map(|n| stripped.and_then(|p| n.strip_prefix(p)).unwrap_or(n))
        .collect();
    let unused: Vec<&String> = names
        .iter()
        .filter(|n| !used.contains(n.as_str()))
        .filter(|n| !config.may_leave_unused(n))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    let d = config.dimensions();
    Err(ModelError::Config {
        file: PathBuf::from(file),
        key: unused.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        message: format!(
            "{} tensor(s) are not used by a {} model with this config.json (num_hidden_layers = {}, tie_word_embeddings = {}); do config.json and the weights belong together?",
            unused.len(),
            config.model_type(),
            d.layers,
            d.tied_embeddings
        ),
    })
}
