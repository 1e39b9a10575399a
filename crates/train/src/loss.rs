//! Causal-LM loss: mean next-token cross-entropy over the target (non-masked) tokens.
use crate::data::Example;
use candle_core::{DType, Device, Result, Tensor, D};

/// A padded batch: ids `[b, s]`, attention mask `[b, s]` (1 = token), and the loss weight of
/// each predicted position `[b, s-1]` (1 where token t+1 is a target and real).
pub struct Batch {
    pub ids: Tensor,
    pub attention: Tensor,
    pub weights: Tensor,
    /// Number of target tokens (the loss denominator).
    pub targets: usize,
    /// Number of real tokens (for throughput).
    pub tokens: usize,
}

impl Batch {
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let b = examples.len();
        let s = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(1)
            .max(2);
        let mut ids = vec![pad_id; b * s];
        let mut att = vec![0u8; b * s];
        let mut w = vec![0f32; b * (s - 1)];
        let (mut targets, mut tokens) = (0, 0);
        for (i, e) in examples.iter().enumerate() {
            for (t, id) in e.ids.iter().enumerate() {
                ids[i * s + t] = *id;
                att[i * s + t] = 1;
                if t > 0 && e.targets[t] {
                    w[i * (s - 1) + t - 1] = 1.0;
                    targets += 1;
                }
            }
            tokens += e.ids.len();
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            attention: Tensor::from_vec(att, (b, s), device)?,
            weights: Tensor::from_vec(w, (b, s - 1), device)?,
            targets,
            tokens,
        })
    }
}

/// Sum of token cross-entropies over weighted positions (divide by `batch.targets` for the mean).
pub fn summed_loss(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let pred = logits
        .narrow(1, 0, s - 1)?
        .reshape((b * (s - 1), v))?
        .to_dtype(DType::F32)?;
    let target = batch
        .ids
        .narrow(1, 1, s - 1)?
        .flatten_all()?
        .to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let picked = logp.gather(&target.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked.neg()? * batch.weights.flatten_all()?)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_only_target_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let a = Example {
            ids: vec![1, 2, 3],
            targets: vec![false, false, true],
        };
        let b = Example {
            ids: vec![4, 5],
            targets: vec![true, true],
        };
        let batch = Batch::new(&[&a, &b], 0, &dev)?;
        assert_eq!(batch.targets, 2);
        assert_eq!(
            batch.weights.to_vec2::<f32>()?,
            vec![vec![0., 1.], vec![1., 0.]]
        );
        // uniform logits: each target costs ln(vocab)
        let logits = Tensor::zeros((2, 3, 7), DType::F32, &dev)?;
        let l = summed_loss(&logits, &batch)?.to_scalar::<f32>()?;
        assert!((l - 2.0 * (7f32).ln()).abs() < 1e-5);
        // a confident right answer on a target costs ~0; on a non-target it is ignored
        let at = |row: usize, pos: usize, tok: usize| (row * 3 + pos) * 7 + tok;
        let mut v = vec![0f32; 2 * 3 * 7];
        v[at(0, 1, 3)] = 50.0; // position 1 of row 0 predicts token 3 (a target)
        v[at(0, 0, 6)] = 50.0; // position 0 of row 0 predicts a wrong token (not a target)
        let logits = Tensor::from_vec(v, (2, 3, 7), &dev)?;
        let l = summed_loss(&logits, &batch)?.to_scalar::<f32>()?;
        assert!((l - (7f32).ln()).abs() < 1e-4, "{l}");
        Ok(())
    }
}
