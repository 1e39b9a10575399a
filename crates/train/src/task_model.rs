//! The model a recipe trains: a causal LM (loss on target tokens) or a sequence classifier
//! (loss on the class of each example), behind one loss and one eval.
use crate::error::Result;
use crate::loss::{summed_loss, Batch};
use candle_core::{Tensor, D};
use lorakit_models::bert::BertClassifier;
use lorakit_models::CausalLm;

pub enum TaskModel {
    CausalLm(CausalLm),
    Classifier(BertClassifier),
}

impl TaskModel {
    /// Summed loss over the batch's targets (tokens, or examples for a classifier).
    pub fn summed_loss(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let logits = self.target_logits(batch, train)?;
        Ok(summed_loss(&logits, &batch.labels)?)
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

    pub fn is_classifier(&self) -> bool {
        matches!(self, TaskModel::Classifier(_))
    }

    /// "llama", "qwen2", "bert", ...
    pub fn arch(&self) -> &'static str {
        match self {
            TaskModel::CausalLm(m) => m.config().arch.name(),
            TaskModel::Classifier(_) => "bert",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TaskModel::CausalLm(m) => m.config().vocab_size,
            TaskModel::Classifier(m) => m.config().vocab_size,
        }
    }
}
