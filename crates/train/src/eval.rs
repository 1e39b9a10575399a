//! Evaluation: mean token cross-entropy (the training loss, without dropout) and perplexity.
use crate::data::Dataset;
use crate::error::Result;
use crate::loss::{summed_loss, Batch};
use candle_core::Device;
use lorakit_models::CausalLm;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all target tokens.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

pub fn evaluate(
    model: &CausalLm,
    ds: &Dataset,
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<EvalResult> {
    let mut total = 0f64;
    let mut tokens = 0usize;
    let refs: Vec<_> = ds.examples.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad_id, device)?;
        let logits = model.forward(&batch.ids, Some(&batch.attention), false)?;
        total += summed_loss(&logits, &batch)?.to_scalar::<f32>()? as f64;
        tokens += batch.targets;
    }
    let loss = total / tokens.max(1) as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}
