//! The model a recipe trains: a causal LM (loss on target tokens) or a sequence classifier
//! (loss on the class of each example), behind one loss and one eval.
use crate::error::Result;
use crate::loss::{summed_loss, Batch};
use candle_core::{Tensor, D};
use lorakit_models::{CausalLm, Model, SequenceClassifier};

pub enum TaskModel {
    CausalLm(Box<dyn CausalLm>),
    Classifier(Box<dyn SequenceClassifier>),
}

impl From<Model> for TaskModel {
    fn from(m: Model) -> Self {
        match m {
            Model::CausalLm(m) => TaskModel::CausalLm(m),
            Model::Classifier(m) => TaskModel::Classifier(m),
        }
    }
}

impl TaskModel {
    /// Summed loss over the batch's targets (tokens, or examples for a classifier). A causal
    /// LM never holds the batch's full-vocabulary logits (chunked output head).
    pub fn summed_loss(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        Ok(match self {
            TaskModel::CausalLm(m) => m.summed_loss(
                &batch.ids,
                Some(&batch.attention),
                train,
                &batch.positions,
                &batch.labels,
            )?,
            TaskModel::Classifier(_) => {
                summed_loss(&self.target_logits(batch, train)?, &batch.labels)?
            }
        })
    }

    /// `scale ×` the summed training loss, and the gradients of `vars` (in their order, `None`
    /// where none arrived); `checkpointing` recomputes each layer's activations in the backward
    /// pass instead of keeping them (causal LMs).
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        scale: f64,
        checkpointing: bool,
        vars: &[Tensor],
    ) -> Result<(f32, Vec<Option<Tensor>>)> {
        if let (TaskModel::CausalLm(m), true) = (self, checkpointing) {
            return Ok(m.checkpointed_loss_and_grads(
                &batch.ids,
                Some(&batch.attention),
                &batch.positions,
                &batch.labels,
                scale,
                vars,
            )?);
        }
        let loss = (self.summed_loss(batch, true)? * scale)?;
        let store = loss.backward()?;
        let grads = vars.iter().map(|v| store.get(v).cloned()).collect();
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    /// Logits `[targets, classes]` whose rows line up with `batch.labels`.
    pub fn target_logits(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        Ok(match self {
            TaskModel::CausalLm(m) => {
                m.logits_at(&batch.ids, Some(&batch.attention), train, &batch.positions)?
            }
            TaskModel::Classifier(m) => m.forward(&batch.ids, &batch.attention, train)?,
        })
    }

    /// Number of correct argmax predictions in the batch (classifiers only).
    pub fn correct(&self, logits: &Tensor, batch: &Batch) -> Result<usize> {
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let gold = batch.labels.to_vec1::<u32>()?;
        Ok(pred.iter().zip(&gold).filter(|(p, g)| p == g).count())
    }

    /// The language model, for objectives that read it directly (preference tuning).
    pub fn causal_lm(&self) -> Option<&dyn CausalLm> {
        match self {
            TaskModel::CausalLm(m) => Some(m.as_ref()),
            TaskModel::Classifier(_) => None,
        }
    }

    pub fn is_classifier(&self) -> bool {
        matches!(self, TaskModel::Classifier(_))
    }

    /// The Hugging Face `model_type`: "llama", "qwen2", "bert", ...
    pub fn arch(&self) -> &'static str {
        match self {
            TaskModel::CausalLm(m) => m.config().model_type(),
            TaskModel::Classifier(m) => m.config().model_type(),
        }
    }

    /// Whether any of `modules` stores its weight `[in, out]` (GPT-2's Conv1D).
    pub fn stores_transposed<'a>(&self, mut modules: impl Iterator<Item = &'a str>) -> bool {
        let config = match self {
            TaskModel::CausalLm(m) => m.config(),
            TaskModel::Classifier(m) => m.config(),
        };
        modules.any(|m| config.stores_transposed(m))
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TaskModel::CausalLm(m) => m.vocab_size(),
            TaskModel::Classifier(m) => m.vocab_size(),
        }
    }
}
