//! The YAML recipe: the user-facing contract of `lorakit train`. Unknown keys are errors with a
//! suggestion, wrong types and impossible values name the field (and line where there is one).
use crate::error::{Result, TrainError};
pub use crate::preference::Objective;
use lorakit_adapter::{LoraConfig, ModuleSpec};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default = "default_lora")]
    pub lora: LoraConfig,
    #[serde(default)]
    pub train: TrainSection,
    pub output: OutputSection,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory, a `.gguf` file, or a hub id (`org/name[@revision]`).
    pub path: PathBuf,
    /// causal_lm (Llama family) | sequence_classification (BERT with a classification head).
    #[serde(default)]
    pub task: Task,
    /// sequence_classification: number of classes (defaults to the number of labels).
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// auto | f32 | bf16 | f16 (auto: bf16 on GPU, f32 on CPU).
    #[serde(default = "auto")]
    pub dtype: String,
    /// auto | cpu | cuda | cuda:N.
    #[serde(default = "auto")]
    pub device: String,
    /// keep | dequantize: a GGUF base's quantized weights stay in their GGML blocks during
    /// training, eval and generation (QLoRA; the default), or are dequantized at load.
    #[serde(default)]
    pub quantized: QuantizedMode,
    /// q8_0 | q4_0 | q4_k | q5_k | q6_k: quantize the frozen linear weights at load (QLoRA for a
    /// safetensors or f16/f32 GGUF base).
    #[serde(default)]
    pub quantize: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QuantizedMode {
    #[default]
    Keep,
    Dequantize,
}

impl ModelSection {
    /// How the base's frozen weights are held (`model.quantized`, `model.quantize`); the type
    /// name was checked when the recipe was read.
    pub fn quantization(&self) -> lorakit_models::Quantization {
        lorakit_models::Quantization {
            keep: self.quantized == QuantizedMode::Keep,
            quantize: self.quantize.as_deref().and_then(quantize_type),
        }
    }
}

/// The GGML type of a `model.quantize` name.
pub fn quantize_type(name: &str) -> Option<candle_core::quantized::GgmlDType> {
    lorakit_models::QUANTIZE_TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, t)| *t)
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    CausalLm,
    SequenceClassification,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Completion,
    Instruction,
    Chat,
    /// `{"text", "label"}` for sequence classification.
    Classification,
    /// `{"prompt", "chosen", "rejected"}` (or their conversational form) for `train.objective:
    /// dpo | orpo`.
    Preference,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: PathBuf,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Fraction of `train` held out (seeded) for evaluation when `eval` is not given.
    #[serde(default)]
    pub eval_split: Option<f64>,
    pub format: DataFormat,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// instruction/chat: also compute the loss on prompt tokens.
    #[serde(default)]
    pub train_on_inputs: bool,
    /// classification: the label names in class-index order (default: the sorted distinct
    /// labels of the training data).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Causal-LM formats: pack examples first-fit into rows of `max_seq_len` tokens, each
    /// example attending only to itself; `train.batch_size` then counts rows.
    #[serde(default)]
    pub packing: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training data (ignored when `max_steps` is set).
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: Scheduler,
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "one_f")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate every N optimizer steps (and always at the end of each epoch).
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N optimizer steps (and always at the end).
    #[serde(default)]
    pub save_every: Option<usize>,
    /// Stop after this many evaluations without a new best eval loss.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Log the training loss every N steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward pass: activation memory of one layer instead of all, for one more forward pass.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// LoRA+: B matrices and 1-D tensors learn at `learning_rate` × this (PEFT's
    /// `loraplus_lr_ratio`; the LoRA+ paper suggests 16).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
    /// sft (next-token loss) | dpo | orpo (on `data.format: preference`).
    #[serde(default)]
    pub objective: Objective,
    /// DPO's β (default 0.1), ORPO's λ (default 0.1).
    #[serde(default)]
    pub beta: Option<f64>,
    /// DPO: the reference's log-probabilities computed once per pair before training
    /// (`precomputed`), in every step for the step's pairs (`per_step`), or (`auto`, the
    /// default) precomputed when the run visits every pair at least once, else per step — the
    /// reference pass costs the same per pair either way.
    #[serde(default)]
    pub reference_logps: ReferenceLogps,
}

/// When DPO computes the reference model's log-probabilities.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceLogps {
    #[default]
    Auto,
    Precomputed,
    PerStep,
}

impl TrainSection {
    /// β for DPO, λ for ORPO: the recipe's, else 0.1 (TRL's default for both).
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or(0.1)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// PiSSA / OLoRA: save the final adapter in residual form (rank r, `init_lora_weights`
    /// naming the method), which applies to the base the initialisation rewrote — PEFT and
    /// lorakit derive it again when loading. By default the adapter is converted to plain LoRA
    /// of rank 2r for the original base, which every tool reads.
    #[serde(default)]
    pub residual_form: bool,
}

fn auto() -> String {
    "auto".into()
}
fn default_max_seq_len() -> usize {
    512
}
fn default_epochs() -> usize {
    3
}
fn default_batch_size() -> usize {
    8
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    2e-4
}
fn default_scheduler() -> Scheduler {
    Scheduler::Cosine
}
fn default_seed() -> u64 {
    42
}
/// PEFT's defaults (r 8, alpha 8, no dropout); target modules are filled in after parsing.
fn default_lora() -> LoraConfig {
    LoraConfig::default()
}

impl Default for TrainSection {
    /// The same defaults serde fills in for a missing key.
    fn default() -> Self {
        TrainSection {
            epochs: default_epochs(),
            max_steps: None,
            batch_size: default_batch_size(),
            grad_accum_steps: one(),
            learning_rate: default_lr(),
            lr_scheduler: default_scheduler(),
            warmup_steps: None,
            warmup_ratio: None,
            weight_decay: 0.0,
            max_grad_norm: one_f(),
            seed: default_seed(),
            eval_every: None,
            save_every: None,
            early_stopping_patience: None,
            log_every: one(),
            gradient_checkpointing: false,
            loraplus_lr_ratio: None,
            objective: Objective::Sft,
            beta: None,
            reference_logps: ReferenceLogps::Auto,
        }
    }
}

/// Valid keys per section, for unknown-key messages.
const SECTIONS: &[(&str, &[&str])] = &[
    ("", &["model", "data", "lora", "train", "output"]),
    (
        "model",
        &[
            "path",
            "task",
            "num_labels",
            "dtype",
            "device",
            "quantized",
            "quantize",
        ],
    ),
    (
        "data",
        &[
            "train",
            "eval",
            "eval_split",
            "format",
            "max_seq_len",
            "train_on_inputs",
            "labels",
            "packing",
        ],
    ),
    ("lora", lorakit_adapter::config::LORA_FIELDS),
    (
        "train",
        &[
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "learning_rate",
            "lr_scheduler",
            "warmup_steps",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "eval_every",
            "save_every",
            "early_stopping_patience",
            "log_every",
            "gradient_checkpointing",
            "loraplus_lr_ratio",
            "objective",
            "beta",
            "reference_logps",
        ],
    ),
    ("output", &["dir", "residual_form"]),
];

/// Builds a recipe error for a field, with the line the field's key is on.
struct FieldError<'a> {
    file: &'a str,
    text: &'a str,
}

impl FieldError<'_> {
    fn at(&self, field: &str, message: String) -> TrainError {
        let key = field.rsplit('.').next().unwrap_or(field);
        let message = match line_of_key(self.text, key) {
            Some(l) => format!("{message} (line {l})"),
            None => message,
        };
        TrainError::InvalidRecipe {
            file: self.file.into(),
            field: field.into(),
            message,
        }
    }
}

impl Recipe {
    /// Reads a recipe file and applies `--set key.path=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        // read at most one byte past the limit: a device or a pipe may never end
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                use std::io::Read as _;
                f.take(MAX_RECIPE_BYTES + 1).read_to_end(&mut bytes)
            })
            .map_err(|e| TrainError::io(path, e))?;
        if bytes.len() as u64 > MAX_RECIPE_BYTES {
            return Err(TrainError::io(
                path,
                format!("larger than {MAX_RECIPE_BYTES} bytes: a recipe is a few hundred"),
            ));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| TrainError::io(path, format!("not UTF-8 text: {e}")))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parses recipe text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, overrides: &[String]) -> Result<Self> {
        let bad = |field: &str, message: String| TrainError::InvalidRecipe {
            file: file.into(),
            field: field.into(),
            message: plain_type_words(
                message
                    .strip_prefix(&format!("{field}: "))
                    .unwrap_or(&message),
            ),
        };
        if let Some((line, why)) = too_deep(text) {
            return Err(bad("(syntax)", format!("{why} (line {line})")));
        }
        let mut value: Value =
            serde_yaml::from_str(text).map_err(|e| bad("(syntax)", yaml_error(&e)))?;
        if value.is_null() {
            return Err(bad("(top level)", "the recipe is empty".into()));
        }
        if !value.is_mapping() {
            return Err(bad(
                "(top level)",
                "expected a mapping with model:, data:, lora:, train:, output:".into(),
            ));
        }
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| bad(&format!("--set {o}"), m))?;
        }
        check_keys(&value, "", text).map_err(|(field, m)| bad(&field, m))?;
        let recipe: Recipe = if overrides.is_empty() {
            serde_yaml::from_str(text).map_err(|e| bad(&serde_field(&e, text), yaml_error(&e)))?
        } else {
            // Round-trip through text so type errors carry the key path; their line numbers would
            // point into the generated text, so they are dropped.
            let merged = serde_yaml::to_string(&value).map_err(|e| bad("--set", e.to_string()))?;
            serde_yaml::from_str(&merged).map_err(|e| {
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                bad(&serde_field(&e, &merged), format!("{msg} (after --set)"))
            })?
        };
        let mut recipe = recipe;
        let cls = recipe.model.task == Task::SequenceClassification;
        if recipe.lora.target_modules.is_none() {
            let (q, v) = if cls {
                ("query", "value")
            } else {
                ("q_proj", "v_proj")
            };
            recipe.lora.target_modules = Some(ModuleSpec::List(vec![q.into(), v.into()]));
        }
        if cls && recipe.lora.modules_to_save.is_none() {
            // the classification head is trained whole and saved with the adapter, as PEFT does
            recipe.lora.modules_to_save = Some(vec!["classifier".into()]);
        }
        if recipe.lora.base_model_name_or_path.is_none() {
            recipe.lora.base_model_name_or_path = Some(recipe.model.path.display().to_string());
        }
        if recipe.lora.task_type.is_none() {
            recipe.lora.task_type = Some(if cls { "SEQ_CLS" } else { "CAUSAL_LM" }.into());
        }
        recipe.validate(file, text)?;
        Ok(recipe)
    }

    /// Every section's rules, in the order a reader meets them; the first broken one is
    /// reported with its field and line.
    fn validate(&self, file: &str, text: &str) -> Result<()> {
        let bad = FieldError { file, text };
        self.check_task(&bad)?;
        self.check_model(&bad)?;
        self.check_data(&bad)?;
        self.check_lora(&bad)?;
        self.check_train(&bad)
    }

    /// `model.task` against the data format, labels and the features it supports.
    fn check_task(&self, bad: &FieldError) -> Result<()> {
        let t = &self.train;
        let cls = self.model.task == Task::SequenceClassification;
        if cls != (self.data.format == DataFormat::Classification) {
            return Err(bad.at(
                "data.format",
                if cls {
                    "task sequence_classification reads format: classification ({\"text\", \"label\"})".into()
                } else {
                    "format classification needs model.task: sequence_classification".into()
                },
            ));
        }
        if let Some(labels) = &self.data.labels {
            let mut seen = std::collections::HashSet::new();
            if labels.len() < 2 || labels.iter().any(|l| l.is_empty() || !seen.insert(l)) {
                return Err(bad.at(
                    "data.labels",
                    "needs at least two distinct, non-empty labels".into(),
                ));
            }
            if self.model.num_labels.is_some_and(|n| n != labels.len()) {
                return Err(bad.at(
                    "model.num_labels",
                    format!(
                        "is {:?} but data.labels lists {}",
                        self.model.num_labels,
                        labels.len()
                    ),
                ));
            }
        }
        if t.gradient_checkpointing && cls {
            return Err(bad.at(
                "train.gradient_checkpointing",
                "is implemented for causal language models, not sequence_classification".into(),
            ));
        }
        let preference = self.data.format == DataFormat::Preference;
        if preference != t.objective.is_preference() {
            return Err(bad.at(
                "train.objective",
                if preference {
                    "data.format: preference needs train.objective: dpo or orpo".into()
                } else {
                    format!(
                        "{} reads data.format: preference ({{\"prompt\", \"chosen\", \"rejected\"}})",
                        t.objective.name()
                    )
                },
            ));
        }
        if preference {
            if self.data.packing {
                return Err(bad.at(
                    "data.packing",
                    "is not implemented for preference pairs (each pair is two rows)".into(),
                ));
            }
            if t.gradient_checkpointing {
                return Err(bad.at(
                    "train.gradient_checkpointing",
                    format!(
                        "is not implemented for train.objective: {}",
                        t.objective.name()
                    ),
                ));
            }
            if t.objective == Objective::Dpo
                && self
                    .lora
                    .modules_to_save
                    .as_ref()
                    .is_some_and(|m| !m.is_empty())
            {
                return Err(bad.at(
                    "lora.modules_to_save",
                    "dpo's reference is the model with its adapters switched off, which a module trained whole is not; leave modules_to_save out".into(),
                ));
            }
        }
        if let Some(b) = t.beta {
            if !preference {
                return Err(bad.at(
                    "train.beta",
                    "applies to train.objective: dpo (β) or orpo (λ)".into(),
                ));
            }
            if !(b > 0.0 && b.is_finite()) {
                return Err(bad.at(
                    "train.beta",
                    format!("must be a positive number (0.1 by default), got {b}"),
                ));
            }
        }
        if self.data.packing && cls {
            return Err(bad.at(
                "data.packing",
                "packs causal-LM examples; a sequence_classification example is one row".into(),
            ));
        }
        if self.model.num_labels.is_some() && !cls {
            return Err(bad.at(
                "model.num_labels",
                "only applies to task: sequence_classification".into(),
            ));
        }
        Ok(())
    }

    /// `model.dtype` and `model.device`.
    fn check_model(&self, bad: &FieldError) -> Result<()> {
        if !matches!(self.model.dtype.as_str(), "auto" | "f32" | "bf16" | "f16") {
            return Err(bad.at(
                "model.dtype",
                format!("{:?} is not one of auto, f32, bf16, f16", self.model.dtype),
            ));
        }
        if let Some(q) = &self.model.quantize {
            if quantize_type(q).is_none() {
                let names: Vec<&str> = lorakit_models::QUANTIZE_TYPES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Err(bad.at(
                    "model.quantize",
                    format!("{q:?} is not one of {}", names.join(", ")),
                ));
            }
        }
        let dev = self.model.device.as_str();
        let cuda_n = dev
            .strip_prefix("cuda:")
            .map(|n| n.parse::<usize>().is_ok())
            .unwrap_or(false);
        if !(matches!(dev, "auto" | "cpu" | "cuda") || cuda_n) {
            return Err(bad.at(
                "model.device",
                format!("{dev:?} is not one of auto, cpu, cuda, cuda:N"),
            ));
        }
        Ok(())
    }

    /// The data files, the eval split and the sequence length.
    fn check_data(&self, bad: &FieldError) -> Result<()> {
        if let Some(why) = crate::data::not_a_data_file(&self.data.train) {
            return Err(bad.at("data.train", why));
        }
        if let Some(e) = &self.data.eval {
            if let Some(why) = crate::data::not_a_data_file(e) {
                return Err(bad.at("data.eval", why));
            }
            if self.data.eval_split.is_some() {
                return Err(bad.at(
                    "data.eval_split",
                    "give either data.eval or data.eval_split, not both".into(),
                ));
            }
        }
        if let Some(s) = self.data.eval_split {
            if !(s > 0.0 && s < 1.0) {
                return Err(bad.at(
                    "data.eval_split",
                    format!("must be between 0 and 1 (exclusive), got {s}"),
                ));
            }
        }
        if self.data.max_seq_len < 2 {
            return Err(bad.at(
                "data.max_seq_len",
                format!("must be at least 2, got {}", self.data.max_seq_len),
            ));
        }
        Ok(())
    }

    /// The `lora:` block, by its own rules (shared with adapter_config.json).
    fn check_lora(&self, bad: &FieldError) -> Result<()> {
        self.lora.validate(bad.file).map_err(|e| match e {
            lorakit_adapter::AdapterError::InvalidConfig { key, message, .. } => {
                bad.at(&format!("lora.{key}"), message)
            }
            other => bad.at("lora", other.to_string()),
        })?;
        use lorakit_adapter::config::LoraInit;
        let init = self.lora.init();
        if init == LoraInit::OtherPlain {
            return Err(bad.at(
                "lora.init_lora_weights",
                format!(
                    "{:?} is read in saved adapters but not used for training; use true (Kaiming-uniform A, zero B), \"pissa\", \"pissa_niter_N\" or \"olora\"",
                    self.lora.init_lora_weights
                ),
            ));
        }
        if self.output.residual_form && !matches!(init, LoraInit::Pissa | LoraInit::Olora) {
            return Err(bad.at(
                "output.residual_form",
                "applies to lora.init_lora_weights: \"pissa\" or \"olora\" (a randomized pissa_niter_N residual cannot be derived again when loading)".into(),
            ));
        }
        if let Some(r) = self.train.loraplus_lr_ratio {
            if !(r > 0.0 && r.is_finite()) {
                return Err(bad.at(
                    "train.loraplus_lr_ratio",
                    format!("must be a positive number (16 in the LoRA+ paper), got {r}"),
                ));
            }
        }
        Ok(())
    }

    /// Step counts, rates and the early-stopping rule.
    fn check_train(&self, bad: &FieldError) -> Result<()> {
        let t = &self.train;
        if t.epochs == 0 && t.max_steps.is_none() {
            return Err(bad.at("train.epochs", "must be at least 1".into()));
        }
        if t.max_steps == Some(0) {
            return Err(bad.at("train.max_steps", "must be at least 1".into()));
        }
        for (name, v) in [
            ("train.batch_size", t.batch_size),
            ("train.grad_accum_steps", t.grad_accum_steps),
            ("train.log_every", t.log_every),
        ] {
            if v == 0 {
                return Err(bad.at(name, "must be at least 1".into()));
            }
        }
        for (name, v) in [
            ("train.eval_every", t.eval_every),
            ("train.save_every", t.save_every),
        ] {
            if v == Some(0) {
                return Err(bad.at(name, "must be at least 1 (or leave it out)".into()));
            }
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(bad.at(
                "train.learning_rate",
                format!("must be a positive number, got {}", t.learning_rate),
            ));
        }
        if t.weight_decay.is_nan() || t.weight_decay < 0.0 {
            return Err(bad.at(
                "train.weight_decay",
                format!("must be ≥ 0, got {}", t.weight_decay),
            ));
        }
        if t.max_grad_norm.is_nan() || t.max_grad_norm < 0.0 {
            return Err(bad.at(
                "train.max_grad_norm",
                format!("must be ≥ 0 (0 disables clipping), got {}", t.max_grad_norm),
            ));
        }
        if let Some(r) = t.warmup_ratio {
            if !(0.0..1.0).contains(&r) {
                return Err(bad.at("train.warmup_ratio", format!("must be in [0, 1), got {r}")));
            }
            if t.warmup_steps.is_some() {
                return Err(bad.at(
                    "train.warmup_ratio",
                    "give either warmup_steps or warmup_ratio, not both".into(),
                ));
            }
        }
        if t.early_stopping_patience.is_some()
            && self.data.eval.is_none()
            && self.data.eval_split.is_none()
        {
            return Err(bad.at(
                "train.early_stopping_patience",
                "needs evaluation data (data.eval or data.eval_split)".into(),
            ));
        }
        Ok(())
    }

    /// The resolved recipe as YAML (every default spelled out).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

/// `a.b.c=value`: sets a nested key, creating mappings on the way; the value is parsed as YAML.
fn apply_override(root: &mut Value, o: &str) -> std::result::Result<(), String> {
    let (path, raw) = o.split_once('=').ok_or("expected KEY.PATH=VALUE")?;
    let value: Value = serde_yaml::from_str(raw).map_err(|e| format!("value {raw:?}: {e}"))?;
    let mut node = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(format!("empty component in {path:?}"));
        }
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("{} is not a mapping", parts[..i].join(".")))?;
        let key = Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        if !map.contains_key(&key) {
            map.insert(key.clone(), Value::Mapping(Default::default()));
        }
        node = map.get_mut(&key).ok_or("unreachable")?;
    }
    Ok(())
}

/// Rejects keys the schema does not know, suggesting the closest valid one.
fn check_keys(v: &Value, section: &str, text: &str) -> std::result::Result<(), (String, String)> {
    let Some(map) = v.as_mapping() else {
        return Ok(());
    };
    let Some((_, valid)) = SECTIONS.iter().find(|(s, _)| *s == section) else {
        return Ok(());
    };
    for (k, child) in map {
        let key = match k.as_str() {
            Some(k) => k,
            None => {
                return Err((
                    section.to_string(),
                    format!("keys must be strings, found {k:?}"),
                ))
            }
        };
        let field = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        if !valid.contains(&key) {
            let hint = closest(key, valid)
                .map(|c| format!("; did you mean {c}?"))
                .unwrap_or_else(|| format!("; valid keys: {}", valid.join(", ")));
            let at = line_of_key(text, key)
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            return Err((field, format!("unknown key{hint}{at}")));
        }
        if section.is_empty() {
            if !child.is_mapping() && !child.is_null() {
                return Err((field, "expected a mapping of keys".into()));
            }
            check_keys(child, key, text)?;
        }
    }
    Ok(())
}

/// The valid key nearest to `key` by edit distance, if it is near enough to be a typo.
fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (levenshtein(key, v), *v))
        .filter(|(d, v)| *d <= (v.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + (ca != *cb) as usize)
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// 1-based line where `key:` first appears in the text.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// serde's Rust type names in a type error, in the recipe's words
/// (`invalid type: integer `-4`, expected usize` → `..., expected a whole number >= 0`).
fn plain_type_words(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number >= 0"),
        ("expected u64", "expected a whole number >= 0"),
        ("expected u32", "expected a whole number >= 0"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(rust, plain);
    }
    m
}

/// The largest recipe file read (a recipe is a few hundred bytes).
const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// The deepest nesting a recipe may have: recipes have three levels; the YAML parser's work
/// grows faster than linearly with depth, so deep input is refused before parsing.
const MAX_RECIPE_DEPTH: usize = 32;

/// Where `text` nests deeper than [`MAX_RECIPE_DEPTH`]: `[`/`{` flow collections (outside
/// quotes and comments), or block nesting by indentation and `- ` items on one line.
fn too_deep(text: &str) -> Option<(usize, String)> {
    let mut flow = 0usize;
    for (i, line) in text.lines().enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let mut dashes = 0;
        let mut rest = body;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
            dashes += 1;
            rest = r.trim_start();
        }
        if indent / 2 + dashes > MAX_RECIPE_DEPTH * 2 {
            return Some((i + 1, format!("nested deeper than a recipe can be ({indent} columns of indentation, {dashes} list markers)")));
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow > MAX_RECIPE_DEPTH {
                        return Some((
                            i + 1,
                            format!("brackets nested more than {MAX_RECIPE_DEPTH} levels deep"),
                        ));
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    None
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(loc) if !msg.contains("line") => {
            format!("{msg} (line {}, column {})", loc.line(), loc.column())
        }
        _ => msg,
    }
}

/// serde_yaml prefixes type errors with the key path (`train.learning_rate: invalid type ...`);
/// where it does not (a value read by a hand-written deserializer), the key path is read off
/// the recipe text at the error's line.
fn serde_field(e: &serde_yaml::Error, text: &str) -> String {
    let msg = e.to_string();
    let at_line = e.location().and_then(|l| key_path_at_line(text, l.line()));
    match (msg.split_once(": "), at_line) {
        // a section named, the key inside it found at the line
        (Some((path, _)), Some(l)) if !path.contains(' ') && l.starts_with(&format!("{path}.")) => {
            l
        }
        (Some((path, _)), _) if !path.contains(' ') => path.to_string(),
        (_, Some(l)) => l,
        _ => "(recipe)".into(),
    }
}

/// The dotted key path of the block-style `key:` on 1-based line `line` (`lora.r` for the
/// `  r: -4` under `lora:`), found by walking up to lines with less indentation.
fn key_path_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let key_of = |l: &str| -> Option<(usize, String)> {
        let indent = l.len() - l.trim_start().len();
        let body = l.trim_start().trim_start_matches("- ");
        let (k, _) = body.split_once(':')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('#') && !k.contains(' ')).then(|| {
            (
                indent,
                k.trim_matches(|c| c == '"' || c == '\'').to_string(),
            )
        })
    };
    let (mut indent, key) = key_of(lines.get(line.checked_sub(1)?)?)?;
    let mut path = vec![key];
    for l in lines[..line - 1].iter().rev() {
        if indent == 0 {
            break;
        }
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
            }
        }
    }
    path.reverse();
    Some(path.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_data(dir: &Path) -> String {
        let p = dir.join("train.jsonl");
        std::fs::write(&p, "{\"text\": \"hello\"}\n").unwrap();
        p.display().to_string()
    }

    fn minimal(dir: &Path) -> String {
        format!(
            "model:\n  path: m\ndata:\n  train: {}\n  format: completion\noutput:\n  dir: out\n",
            write_data(dir)
        )
    }

    #[test]
    fn an_absent_train_section_equals_an_empty_one() {
        let empty: TrainSection = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty, TrainSection::default());
    }

    #[test]
    fn minimal_recipe_gets_documented_defaults() {
        let d = tempfile::tempdir().unwrap();
        let r = Recipe::parse(&minimal(d.path()), "r.yaml", &[]).unwrap();
        assert_eq!(r.train.batch_size, 8);
        assert_eq!(r.train.learning_rate, 2e-4);
        assert_eq!(r.train.lr_scheduler, Scheduler::Cosine);
        assert_eq!(r.data.max_seq_len, 512);
        assert_eq!(r.lora.r, 8);
        assert_eq!(r.lora.lora_alpha, 8.0);
        assert_eq!(
            r.lora.target_modules,
            Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert_eq!(r.model.dtype, "auto");
        // the resolved recipe parses back to itself
        let again = Recipe::parse(&r.to_yaml(), "resolved.yaml", &[]).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn variant_settings_parse_and_bad_ones_name_their_field() {
        let d = tempfile::tempdir().unwrap();
        let with = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Recipe::parse(&minimal(d.path()), "r.yaml", &sets)
        };
        let r = with(&["lora.use_dora=true", "train.loraplus_lr_ratio=16"]).unwrap();
        assert!(r.lora.use_dora);
        assert_eq!(r.train.loraplus_lr_ratio, Some(16.0));
        assert_eq!(r.lora.variant().name(), "dora");
        let r = with(&["lora.init_lora_weights=pissa_niter_4"]).unwrap();
        assert_eq!(
            r.lora.init(),
            lorakit_adapter::config::LoraInit::PissaNiter(4)
        );
        for (sets, field) in [
            (
                &["lora.init_lora_weights=false"][..],
                "lora.init_lora_weights",
            ),
            (
                &["lora.init_lora_weights=corda"][..],
                "lora.init_lora_weights",
            ),
            (
                &["lora.init_lora_weights=olora", "lora.use_dora=true"][..],
                "lora.init_lora_weights",
            ),
            (
                &["train.loraplus_lr_ratio=0"][..],
                "train.loraplus_lr_ratio",
            ),
            (&["output.residual_form=true"][..], "output.residual_form"),
        ] {
            let e = with(sets).unwrap_err().to_string();
            assert!(e.contains(field), "{sets:?}: {e}");
        }
    }

    #[test]
    fn gradient_checkpointing_is_refused_for_classifiers_by_name() {
        let d = tempfile::tempdir().unwrap();
        let on = |text: String| text + "train:\n  gradient_checkpointing: true\n";
        let r = Recipe::parse(&on(minimal(d.path())), "r.yaml", &[]).unwrap();
        assert!(r.train.gradient_checkpointing);
        let cls = minimal(d.path())
            .replace("format: completion", "format: classification")
            .replace("path: m", "path: m\n  task: sequence_classification");
        let e = Recipe::parse(&on(cls), "r.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.gradient_checkpointing") && e.contains("causal language models"),
            "{e}"
        );
    }

    #[test]
    fn misspelt_keys_get_a_suggestion_and_line() {
        let d = tempfile::tempdir().unwrap();
        let text = minimal(d.path()) + "train:\n  learnig_rate: 0.1\n";
        let e = Recipe::parse(&text, "r.yaml", &[]).unwrap_err().to_string();
        assert!(
            e.contains("r.yaml")
                && e.contains("train.learnig_rate")
                && e.contains("did you mean learning_rate?")
                && e.contains("line 9"),
            "{e}"
        );
        let text = minimal(d.path()).replace("model:", "modle:");
        let e = Recipe::parse(&text, "r.yaml", &[]).unwrap_err().to_string();
        assert!(e.contains("did you mean model?"), "{e}");
    }

    #[test]
    fn wrong_types_and_impossible_values_name_the_field() {
        let d = tempfile::tempdir().unwrap();
        let e = Recipe::parse(
            &(minimal(d.path()) + "train:\n  batch_size: many\n"),
            "r.yaml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("train.batch_size") && e.contains("line"), "{e}");
        let e = Recipe::parse(
            &(minimal(d.path()) + "train:\n  learning_rate: -1\n"),
            "r.yaml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("train.learning_rate") && e.contains("positive") && e.contains("line 9"),
            "{e}"
        );
        let e = Recipe::parse(&(minimal(d.path()) + "lora:\n  r: 0\n"), "r.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r") && e.contains("at least 1"), "{e}");
        let e = Recipe::parse(
            &(minimal(d.path()).replace("completion", "poetry")),
            "r.yaml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("data.format") && e.contains("poetry"), "{e}");
        let e = Recipe::parse(
            &(minimal(d.path()).replace(
                "  format: completion\n",
                "  format: completion\n  eval: nowhere.jsonl\n",
            )),
            "r.yaml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("data.eval") && e.contains("nowhere.jsonl"),
            "{e}"
        );
        let e = Recipe::parse("model: [\n", "r.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.yaml") && e.contains("line"), "{e}");
        let e = Recipe::parse(
            &minimal(d.path()).replace("output:\n  dir: out\n", ""),
            "r.yaml",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("output"), "{e}");
    }

    #[test]
    fn set_overrides_keys_with_yaml_values() {
        let d = tempfile::tempdir().unwrap();
        let r = Recipe::parse(
            &minimal(d.path()),
            "r.yaml",
            &[
                "train.learning_rate=1e-3".into(),
                "lora.target_modules=[q_proj, k_proj]".into(),
                "train.max_steps=5".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.learning_rate, 1e-3);
        assert_eq!(r.train.max_steps, Some(5));
        assert_eq!(
            r.lora.target_modules,
            Some(ModuleSpec::List(vec!["q_proj".into(), "k_proj".into()]))
        );
        let e = Recipe::parse(
            &minimal(d.path()),
            "r.yaml",
            &["train.learnig_rate=1".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean learning_rate"), "{e}");
        let e = Recipe::parse(
            &minimal(d.path()),
            "r.yaml",
            &["train.learning_rate".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("KEY.PATH=VALUE"), "{e}");
        let e = Recipe::parse(
            &minimal(d.path()),
            "r.yaml",
            &["train.learning_rate=abc".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("train.learning_rate"), "{e}");
    }
}
