//! Causal-LM loss: mean next-token cross-entropy over the target (non-masked) tokens.
use crate::data::Example;
use candle_core::{DType, Device, Result, Tensor};

/// A padded batch: ids `[b, s]`, attention mask `[b, s]` (1 = token), and the predicted
/// positions: `positions[k]` (a flat index into `b × s`) must predict token `labels[k]` — or,
/// for classified examples, example `positions[k]` has class `labels[k]`.
/// Only those positions go through the output head, which on a large vocabulary is a good
/// share of a small model's compute.
pub struct Batch {
    pub ids: Tensor,
    pub attention: Tensor,
    pub positions: Tensor,
    pub labels: Tensor,
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
        let (mut positions, mut labels) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        for (i, e) in examples.iter().enumerate() {
            if let Some(l) = e.label {
                // a classified example: one target, its class
                labels.push(l);
                positions.push(i as u32);
            }
            for (t, id) in e.ids.iter().enumerate() {
                ids[i * s + t] = *id;
                att[i * s + t] = 1;
                if t > 0 && e.targets[t] && e.label.is_none() {
                    positions.push((i * s + t - 1) as u32);
                    labels.push(*id);
                }
            }
            tokens += e.ids.len();
        }
        let targets = positions.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            attention: Tensor::from_vec(att, (b, s), device)?,
            positions: Tensor::from_vec(positions, targets, device)?,
            labels: Tensor::from_vec(labels, targets, device)?,
            targets,
            tokens,
        })
    }
}

/// Sum of cross-entropies of `logits` `[n, vocab]` against `labels` `[n]`.
pub fn summed_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    lorakit_ops::fused::cross_entropy(&logits.to_dtype(DType::F32)?, labels)?.sum_all()
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
            label: None,
        };
        let b = Example {
            ids: vec![4, 5],
            targets: vec![true, true],
            label: None,
        };
        let batch = Batch::new(&[&a, &b], 0, &dev)?;
        assert_eq!(batch.targets, 2);
        // row 0 predicts its token 2 (3) at position 1; row 1 its token 1 (5) at position 0
        assert_eq!(batch.positions.to_vec1::<u32>()?, vec![1, 3]);
        assert_eq!(batch.labels.to_vec1::<u32>()?, vec![3, 5]);
        let rows = |logits: &Tensor| -> Result<Tensor> {
            logits.reshape((6, 7))?.index_select(&batch.positions, 0)
        };
        // uniform logits: each target costs ln(vocab)
        let logits = Tensor::zeros((2, 3, 7), DType::F32, &dev)?;
        let l = summed_loss(&rows(&logits)?, &batch.labels)?.to_scalar::<f32>()?;
        assert!((l - 2.0 * (7f32).ln()).abs() < 1e-5);
        // a confident right answer on a target costs ~0; on a non-target it is ignored
        let at = |row: usize, pos: usize, tok: usize| (row * 3 + pos) * 7 + tok;
        let mut v = vec![0f32; 2 * 3 * 7];
        v[at(0, 1, 3)] = 50.0; // position 1 of row 0 predicts token 3 (a target)
        v[at(0, 0, 6)] = 50.0; // position 0 of row 0 predicts a wrong token (not a target)
        let logits = Tensor::from_vec(v, (2, 3, 7), &dev)?;
        let l = summed_loss(&rows(&logits)?, &batch.labels)?.to_scalar::<f32>()?;
        assert!((l - (7f32).ln()).abs() < 1e-4, "{l}");
        Ok(())
    }
}
