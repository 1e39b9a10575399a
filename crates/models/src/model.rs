//! The interface every architecture implements. Training, evaluation, generation, merging and
//! the CLI see a model only through these traits, never through a concrete architecture:
//! [`ModelConfig`] (a parsed config: sizes, and how to build the model), [`CausalLm`] (decoder
//! language models) and [`SequenceClassifier`] (encoders with a class head).
use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};
use lorakit_adapter::LayerBuilder;

/// What a model is built to do; an architecture builds the tasks it supports and refuses others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Next-token prediction with the language-model head.
    CausalLm,
    /// One label per sequence from a classification head with `num_labels` outputs.
    SequenceClassification { num_labels: usize },
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::CausalLm => "causal_lm",
            Task::SequenceClassification { .. } => "sequence_classification",
        }
    }
}

/// The sizes `inspect` reports, for any architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Dimensions {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
}

/// A parsed model config (config.json, or a GGUF header turned into one).
pub trait ModelConfig: std::fmt::Debug + Send + Sync {
    /// The Hugging Face `model_type` this config describes ("llama", "qwen2", "bert", ...).
    fn model_type(&self) -> &'static str;
    fn dimensions(&self) -> Dimensions;
    /// The dtype config.json declares (`torch_dtype` / `dtype`), if any.
    fn declared_dtype(&self) -> Option<DType>;
    /// The task a bare checkpoint of this architecture is for (what `inspect` walks).
    fn default_task(&self) -> Task;
    /// Builds the model for `task` from `lb`'s weights, named as in the Hugging Face checkpoint.
    fn build(&self, lb: &LayerBuilder, task: Task) -> Result<Model>;
    /// A stored tensor this model does not read and transformers does not either (rotary
    /// caches, an untied copy of a tied head, a pretraining head): not a config/weights mismatch.
    fn may_leave_unused(&self, _name: &str) -> bool {
        false
    }
    /// A prefix the module paths carry (`bert.` in `BertForSequenceClassification`) that a
    /// checkpoint of the bare base model omits; the loader adds it back.
    fn optional_prefix(&self) -> Option<&'static str> {
        None
    }
    /// Whether the linear module at `module` stores its weight `[in, out]` (GPT-2's `Conv1D`;
    /// PEFT's `fan_in_fan_out`): a merge adds the transposed update.
    fn stores_transposed(&self, _module: &str) -> bool {
        false
    }
}

/// Keys and values (after RoPE, before head repetition) of the tokens seen so far, per layer.
#[derive(Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of tokens cached.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
        }
    }
}

/// A decoder-only language model. Logits are f32; `attention_mask` `[batch, seq]` is 1 for real
/// tokens and 0 for padding; `train` switches LoRA dropout on.
pub trait CausalLm {
    fn config(&self) -> &dyn ModelConfig;
    fn vocab_size(&self) -> usize {
        self.config().dimensions().vocab
    }
    /// The longest sequence the model's positions cover.
    fn max_positions(&self) -> usize;

    /// Logits `[batch, seq, vocab]` for every position.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;

    /// The final normalised hidden states `[batch, seq, hidden]`, before the output head.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;

    /// Summed cross-entropy of the output head over `hidden` at `positions` (flat indices into
    /// `batch × seq`) against `labels`.
    fn head_loss(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        labels: &Tensor,
        train: bool,
    ) -> Result<Tensor>;

    /// Logits `[n, vocab]` only at `positions` (flat indices into `batch × seq`): a loss needs
    /// a few positions, and the head over a large vocabulary is a good share of the compute.
    fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        positions: &Tensor,
    ) -> Result<Tensor>;

    /// Summed next-token cross-entropy at `positions` against `labels`.
    fn summed_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
        positions: &Tensor,
        labels: &Tensor,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, train)?;
        self.head_loss(&hidden, positions, labels, train)
    }

    /// `scale ×` the summed loss (training mode) and the gradients of `vars` (in their order;
    /// `None` where none arrived), keeping only each layer's input in the forward pass and
    /// recomputing one layer at a time in the backward pass.
    fn checkpointed_loss_and_grads(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &Tensor,
        labels: &Tensor,
        scale: f64,
        vars: &[Tensor],
    ) -> Result<(f32, Vec<Option<Tensor>>)>;

    /// Logits `[n, vocab]` at `at` of rows that pack several sequences sharing a prefix: each
    /// token has an explicit position (`positions`, `[b][s]`) and `bias` `[b, 1, s, s]` (0 = may
    /// attend, large negative = may not) says what it sees. Inference only.
    fn logits_packed(
        &self,
        input_ids: &Tensor,
        positions: &[Vec<usize>],
        bias: &Tensor,
        at: &Tensor,
    ) -> Result<Tensor>;

    /// An empty key/value cache for [`CausalLm::forward_cached`].
    fn new_cache(&self) -> KvCache;

    /// Logits `[1, s, vocab]` of `input_ids` `[1, s]` continuing the tokens in `cache`
    /// (inference only).
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
}

impl candle_core::Module for dyn CausalLm + '_ {
    fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        CausalLm::forward(self, input_ids, None, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// An encoder with a sequence-classification head.
pub trait SequenceClassifier {
    fn config(&self) -> &dyn ModelConfig;
    fn vocab_size(&self) -> usize {
        self.config().dimensions().vocab
    }
    fn num_labels(&self) -> usize;
    /// The encoder's last hidden states `[batch, seq, hidden]`, before pooling and the head.
    fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor>;
    /// Class logits `[batch, num_labels]` (f32); `attention_mask`: 1 = token, 0 = pad.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor>;
}

/// A built model, by what it does.
pub enum Model {
    CausalLm(Box<dyn CausalLm>),
    Classifier(Box<dyn SequenceClassifier>),
}

impl Model {
    pub fn config(&self) -> &dyn ModelConfig {
        match self {
            Model::CausalLm(m) => m.config(),
            Model::Classifier(m) => m.config(),
        }
    }

    /// The language model, or an error naming the architecture and what it is instead.
    pub fn into_causal_lm(self) -> Result<Box<dyn CausalLm>> {
        match self {
            Model::CausalLm(m) => Ok(m),
            Model::Classifier(m) => Err(ModelError::Input(format!(
                "a {} model is a sequence classifier, not a causal language model",
                m.config().model_type()
            ))),
        }
    }

    /// The classifier, or an error naming the architecture and what it is instead.
    pub fn into_classifier(self) -> Result<Box<dyn SequenceClassifier>> {
        match self {
            Model::Classifier(m) => Ok(m),
            Model::CausalLm(m) => Err(ModelError::Input(format!(
                "a {} model is a causal language model, not a sequence classifier",
                m.config().model_type()
            ))),
        }
    }
}
