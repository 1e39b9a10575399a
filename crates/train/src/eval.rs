//! Evaluation: mean token cross-entropy (the training loss, without dropout) and perplexity.
use crate::data::Dataset;
use crate::error::Result;
use crate::loss::Batch;
use crate::task_model::TaskModel;
use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all target tokens.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    /// Classifiers: share of examples whose most likely class is the label.
    pub accuracy: Option<f64>,
    /// Preference objectives: TRL's reward figures (then `loss` is the objective's mean over
    /// pairs and `tokens` counts pairs).
    pub preference: Option<crate::preference::PairMeans>,
}

/// The loss of `ds` in batches of `batch_size` rows; `packing: Some(n)` packs the examples into
/// rows of `n` tokens (see [`crate::packing`]): the same loss, with less padding to compute.
pub fn evaluate(
    model: &TaskModel,
    ds: &Dataset,
    pad_id: u32,
    batch_size: usize,
    packing: Option<usize>,
    device: &Device,
) -> Result<EvalResult> {
    let mut total = 0f64;
    let mut tokens = 0usize;
    let mut correct = 0usize;
    let rows = match packing {
        Some(capacity) => {
            let lengths: Vec<usize> = ds.examples.iter().map(|e| e.ids.len()).collect();
            crate::packing::pack(&lengths, capacity)
        }
        None => crate::packing::one_per_row(ds.examples.len()),
    };
    for chunk in rows.chunks(batch_size.max(1)) {
        let chunk: Vec<Vec<_>> = chunk
            .iter()
            .map(|r| r.iter().map(|i| &ds.examples[*i]).collect())
            .collect();
        let batch = Batch::packed(&chunk, pad_id, device)?;
        if batch.targets == 0 {
            continue;
        }
        if model.is_classifier() {
            let logits = model.target_logits(&batch, false)?;
            total += crate::loss::summed_loss(&logits, &batch.labels)?.to_scalar::<f32>()? as f64;
            correct += model.correct(&logits, &batch)?;
        } else {
            // chunked output head: no full-vocabulary logits for the batch
            total += model.summed_loss(&batch, false)?.to_scalar::<f32>()? as f64;
        }
        tokens += batch.targets;
    }
    let loss = total / tokens.max(1) as f64;
    if !loss.is_finite() {
        return Err(crate::error::TrainError::NonFiniteOutput {
            what: "a loss",
            value: loss,
        });
    }
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
        accuracy: model
            .is_classifier()
            .then(|| correct as f64 / tokens.max(1) as f64),
        preference: None,
    })
}
