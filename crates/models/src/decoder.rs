//! What every decoder language model does the same way, whatever its layers: reading its
//! inputs, the loss of the output head, and the
//! checkpointed backward pass over a stack of layers.
use crate::error::{ModelError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use lorakit_adapter::LoraLinear;
use lorakit_ops::chunked_loss::{chunk_rows, frozen_linear_cross_entropy};

/// The segment numbers `[b][s]` of a full-sequence pass's rows ([`lorakit_ops::layers::mask_segments`]:
/// 0 = padding, 1, 2, … = the examples packed into a row; all 1 without a mask), after
/// checking that the rows are non-empty and the mask has the ids' shape.
pub fn segments(input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Vec<Vec<u32>>> {
    let (b, s) = input_ids.dims2()?;
    if s == 0 {
        return Err(ModelError::Input("empty input sequence".into()));
    }
    match attention_mask {
        Some(m) if m.dims() != [b, s] => Err(ModelError::Input(format!(
            "attention mask has shape {:?}, input ids {:?}",
            m.dims(),
            [b, s]
        ))),
        Some(m) => Ok(lorakit_ops::layers::mask_segments(m)?),
        None => Ok(vec![vec![1; s]; b]),
    }
}

/// The length of `input_ids` `[1, s]` for cached decoding, which takes one non-empty row.
pub fn cached_len(input_ids: &Tensor) -> Result<usize> {
    let (b, s) = input_ids.dims2()?;
    if b != 1 || s == 0 {
        return Err(ModelError::Input(format!(
            "cached forward takes one non-empty sequence, got shape {:?}",
            [b, s]
        )));
    }
    Ok(s)
}

/// Summed cross-entropy of `lm_head` over `hidden` `[batch, seq, hidden]` at `positions` (flat
/// indices into `batch × seq`) against `labels`. A frozen head without bias goes through the
/// chunked loss, which never holds the `[n, vocab]` logits of a large vocabulary at once.
pub fn head_loss(
    lm_head: &LoraLinear,
    vocab: usize,
    hidden: &Tensor,
    positions: &Tensor,
    labels: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let (b, s, d) = hidden.dims3()?;
    let rows = hidden.reshape((b * s, d))?.index_select(positions, 0)?;
    let head = lm_head;
    let loss = if head.lora().is_none() && head.bias().is_none() && !head.is_trainable() {
        frozen_linear_cross_entropy(
            &rows,
            head.weight(),
            head.weight_t(train)?,
            labels,
            chunk_rows(vocab),
            train,
        )?
    } else {
        let logits = head.forward_t(&rows, train)?.to_dtype(DType::F32)?;
        lorakit_ops::fused::cross_entropy(&logits, labels)?
    };
    Ok(loss.sum_all()?)
}

/// `scale × loss` and the gradients of `vars` (in their order; `None` where none arrived),
/// computed with activation checkpointing: the forward pass through `layers` layers
/// (`layer(i, x)`, training mode) keeps only each layer's input; `top` turns the last output
/// into the loss; the backward pass recomputes one layer at a time and backpropagates through
/// it, so at most one layer's activations are alive. Costs one more forward pass of the
/// layers. LoRA dropout masks are a function of the step seed, so a recomputed layer is the
/// same function.
pub fn checkpointed_loss_and_grads(
    x: Tensor,
    layers: usize,
    layer: impl Fn(usize, &Tensor) -> Result<Tensor>,
    top: impl FnOnce(&Tensor) -> Result<Tensor>,
    scale: f64,
    vars: &[Tensor],
) -> Result<(f32, Vec<Option<Tensor>>)> {
    let mut inputs = Vec::with_capacity(layers);
    let mut x = x.detach();
    for i in 0..layers {
        let out = layer(i, &x)?.detach();
        inputs.push(std::mem::replace(&mut x, out));
    }
    let last = Var::from_tensor(&x)?;
    drop(x);
    let loss = (top(last.as_tensor())? * scale)?;
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    // Only the wanted gradients are kept from each backward pass: a GradStore also holds
    // gradients of untracked operands (e.g. a broadcast attention bias), views that keep
    // that layer's activation buffers alive.
    let mut wanted: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut collect = |store: &GradStore| -> Result<()> {
        for (slot, v) in wanted.iter_mut().zip(vars) {
            if let Some(g) = store.get(v) {
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    };
    let lost = || ModelError::Input("checkpointed backward: no gradient reached a layer".into());
    let mut grads = loss.backward()?;
    drop(loss);
    collect(&grads)?;
    let mut g = grads.remove(last.as_tensor()).ok_or_else(lost)?;
    drop(grads);
    for (i, input) in inputs.into_iter().enumerate().rev() {
        // the first layer's input (the embeddings) needs no gradient
        let var = if i > 0 {
            Some(Var::from_tensor(&input)?)
        } else {
            None
        };
        let x = var.as_ref().map(|v| v.as_tensor()).unwrap_or(&input);
        let out = layer(i, x)?;
        let mut lg = (out * &g)?.sum_all()?.backward()?;
        collect(&lg)?;
        if let Some(v) = &var {
            g = lg.remove(v.as_tensor()).ok_or_else(lost)?;
        }
    }
    Ok((value, wanted))
}
