//! Causal-LM loss: mean next-token cross-entropy over the target (non-masked) tokens.
use crate::data::Example;
use candle_core::{DType, Device, Result, Tensor};

/// A padded batch: ids `[b, s]`, attention mask `[b, s]` (u32: 0 = padding, else the number of
/// the example the token belongs to, 1, 2, ... along a row that packs several), and the
/// predicted positions: `positions[k]` (a flat index into `b × s`) must predict token
/// `labels[k]` — or, for classified examples, example `positions[k]` has class `labels[k]`.
/// Only those positions go through the output head, which on a large vocabulary is a good
/// share of a small model's compute.
pub struct Batch {
    pub ids: Tensor,
    pub attention: Tensor,
    pub positions: Tensor,
    pub labels: Tensor,
    /// Number of target tokens (the loss denominator).
    pub targets: usize,
    /// Number of real tokens, never padding (for throughput).
    pub tokens: usize,
    /// Number of examples.
    pub examples: usize,
}

impl Batch {
    /// One example per row, padded to the longest.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let rows: Vec<Vec<&Example>> = examples.iter().map(|e| vec![*e]).collect();
        Self::packed(&rows, pad_id, device)
    }

    /// Rows that each hold one or more examples back to back (see `crate::packing`), padded to
    /// the longest row. The first token of each example predicts nothing and is predicted by
    /// nothing, exactly as in a row of its own.
    pub fn packed(rows: &[Vec<&Example>], pad_id: u32, device: &Device) -> Result<Self> {
        let b = rows.len();
        let row_len = |r: &Vec<&Example>| r.iter().map(|e| e.ids.len()).sum::<usize>();
        let s = rows.iter().map(row_len).max().unwrap_or(1).max(2);
        let mut ids = vec![pad_id; b * s];
        let mut att = vec![0u32; b * s];
        let (mut positions, mut labels) = (Vec::new(), Vec::new());
        let (mut tokens, mut examples) = (0, 0);
        for (i, row) in rows.iter().enumerate() {
            let mut start = i * s;
            for (n, e) in row.iter().enumerate() {
                if let Some(l) = e.label {
                    if row.len() > 1 {
                        candle_core::bail!("classified examples are not packed");
                    }
                    // a classified example: one target, its class
                    labels.push(l);
                    positions.push(i as u32);
                }
                for (t, id) in e.ids.iter().enumerate() {
                    ids[start + t] = *id;
                    att[start + t] = n as u32 + 1;
                    if t > 0 && e.targets[t] && e.label.is_none() {
                        positions.push((start + t - 1) as u32);
                        labels.push(*id);
                    }
                }
                start += e.ids.len();
                tokens += e.ids.len();
                examples += 1;
            }
        }
        let targets = positions.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            attention: Tensor::from_vec(att, (b, s), device)?,
            positions: Tensor::from_vec(positions, targets, device)?,
            labels: Tensor::from_vec(labels, targets, device)?,
            targets,
            tokens,
            examples,
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

    /// Packed, the same examples predict the same tokens from the same example's positions;
    /// the mask numbers the examples of a row.
    #[test]
    fn a_packed_row_scores_the_same_targets() -> Result<()> {
        let dev = Device::Cpu;
        let a = Example {
            ids: vec![1, 2, 3],
            targets: vec![true, false, true],
            label: None,
        };
        let b = Example {
            ids: vec![4, 5],
            targets: vec![true, true],
            label: None,
        };
        let batch = Batch::packed(&[vec![&a, &b]], 0, &dev)?;
        assert_eq!(batch.ids.to_vec2::<u32>()?, vec![vec![1, 2, 3, 4, 5]]);
        assert_eq!(batch.attention.to_vec2::<u32>()?, vec![vec![1, 1, 1, 2, 2]]);
        // token 3 from position 1, token 5 from position 3; token 4 (b's first) from nothing
        assert_eq!(batch.positions.to_vec1::<u32>()?, vec![1, 3]);
        assert_eq!(batch.labels.to_vec1::<u32>()?, vec![3, 5]);
        assert_eq!((batch.targets, batch.tokens, batch.examples), (2, 5, 2));
        let unpacked = Batch::new(&[&a, &b], 0, &dev)?;
        assert_eq!(unpacked.labels.to_vec1::<u32>()?, vec![3, 5]);
        assert_eq!(unpacked.attention.to_vec2::<u32>()?[1], vec![1, 1, 0]);
        Ok(())
    }
}
