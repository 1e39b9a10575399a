//! Opening a base model: a Hugging Face model directory (config.json + safetensors, single or
//! sharded) or a llama.cpp GGUF file (dequantised, with Hugging Face names and q/k layout).
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::llama::CausalLm;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lorakit_adapter::{Adapters, BuildReport, Checkpoint, LayerBuilder, LinearInfo, ShapeOnly};
use std::path::{Path, PathBuf};

/// A base model with its parsed config and opened weights.
pub struct ModelDir {
    /// The directory, or the `.gguf` file.
    pub dir: PathBuf,
    pub config: LlamaConfig,
    weights: Weights,
}

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

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if is_gguf(dir) {
            let header = crate::gguf::GgufHeader::from_file(dir)?;
            let config = crate::gguf::llama_config(&header, dir)?;
            return Ok(ModelDir {
                dir: dir.to_path_buf(),
                config,
                weights: Weights::Gguf,
            });
        }
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory or a .gguf file (expected a Hugging Face model directory with config.json and model.safetensors, or a .gguf file)",
                ),
            });
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        crate::layer_count::check(
            config.num_hidden_layers as u64,
            checkpoint.names(),
            &dir.join("config.json"),
            "num_hidden_layers",
            &checkpoint.describe(),
        )?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            weights: Weights::Safetensors(checkpoint),
        })
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
        self.config.dtype.unwrap_or_else(|| {
            checkpoint
                .names()
                .filter_map(|n| checkpoint.meta(n).ok())
                .map(|m| m.dtype)
                .find(|d| d.is_float())
                .unwrap_or(DType::F32)
        })
    }

    /// Loads the model with `adapters` in `dtype` on `device`.
    pub fn load(
        self,
        adapters: Adapters,
        dtype: DType,
        device: &Device,
    ) -> Result<(CausalLm, BuildReport)> {
        let config = self.config.clone();
        let (vb, names, describe) = match self.weights {
            Weights::Safetensors(checkpoint) => {
                let names: Vec<String> = checkpoint.names().map(String::from).collect();
                let describe = checkpoint.describe();
                let backend: Box<dyn SimpleBackend> = Box::new(checkpoint);
                (
                    VarBuilder::from_backend(backend, dtype, device.clone()),
                    names,
                    describe,
                )
            }
            Weights::Gguf => {
                let (_, tensors) = crate::gguf::load_llama(&self.dir, &Device::Cpu)?;
                let names = tensors.keys().cloned().collect();
                (
                    VarBuilder::from_tensors(tensors, dtype, device),
                    names,
                    self.dir.display().to_string(),
                )
            }
        };
        let (model, report) = build(&config, vb, adapters)?;
        check_all_used(
            &config,
            &names,
            report.frozen.iter().map(|(n, _)| n.as_str()),
            &describe,
        )?;
        Ok((model, report))
    }

    /// Walks the model's structure against the checkpoint headers without reading weights:
    /// every linear module with its shape, and which ones `adapters` would wrap.
    pub fn linear_modules(self, adapters: Adapters) -> Result<Vec<LinearInfo>> {
        let config = self.config.clone();
        let Weights::Safetensors(checkpoint) = self.weights else {
            return Err(ModelError::Input(
                "linear_modules reads safetensors headers; GGUF headers are read by gguf::GgufHeader"
                    .into(),
            ));
        };
        let names: Vec<String> = checkpoint.names().map(String::from).collect();
        let describe = checkpoint.describe();
        let backend: Box<dyn SimpleBackend> = Box::new(ShapeOnly(checkpoint));
        let vb = VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
        let lb = LayerBuilder::new(vb, adapters)?;
        CausalLm::new(&config, &lb)?;
        let used = lb.base_tensors();
        check_all_used(
            &config,
            &names,
            used.iter().map(|(n, _)| n.as_str()),
            &describe,
        )?;
        Ok(lb.linears())
    }
}

/// Builds a model from any `VarBuilder` (a checkpoint, a merged backend, a test's tensors).
pub fn build(
    config: &LlamaConfig,
    vb: VarBuilder<'static>,
    adapters: Adapters,
) -> Result<(CausalLm, BuildReport)> {
    let lb = LayerBuilder::new(vb, adapters)?;
    let model = CausalLm::new(config, &lb)?;
    let report = lb.finish()?;
    Ok((model, report))
}

/// A checkpoint tensor the model never asked for means config.json and the weights disagree (a
/// layer count, a tied head); refuse rather than run a silently different model. Tensors
/// transformers itself skips are allowed.
fn check_all_used<'a>(
    config: &LlamaConfig,
    names: &[String],
    used: impl Iterator<Item = &'a str>,
    file: &str,
) -> Result<()> {
    let used: std::collections::HashSet<&str> = used.collect();
    let unused: Vec<&String> = names
        .iter()
        .filter(|n| !used.contains(n.as_str()))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(config.tie_word_embeddings && n.as_str() == "lm_head.weight"))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    Err(ModelError::Config {
        file: PathBuf::from(file),
        key: unused.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        message: format!(
            "{} tensor(s) are not used by a {} model with this config.json (num_hidden_layers = {}, tie_word_embeddings = {}); do config.json and the weights belong together?",
            unused.len(),
            config.arch.name(),
            config.num_hidden_layers,
            config.tie_word_embeddings
        ),
    })
}
