//! `MergedBackend`: a candle `SimpleBackend` that serves `W + s·B·A` for adapted weights, so any
//! candle-transformers model runs a PEFT adapter at full speed without knowing about LoRA.
//! The merged tensor is a snapshot: never train through it (a `Var` updated in place would not
//! change it).
use crate::checkpoint::Checkpoint;
use crate::peft_format::PeftAdapter;
use candle_core::{DType, Device, Result, Shape, Tensor};

pub struct MergedBackend {
    base: Checkpoint,
    adapter: PeftAdapter,
}

impl MergedBackend {
    pub fn new(base: Checkpoint, adapter: PeftAdapter) -> Self {
        MergedBackend { base, adapter }
    }

    /// The f32 tensor `name` with the adapter folded in.
    pub fn merged_f32(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let w = match self.adapter.replacements().get(name) {
            Some(t) => t.to_device(dev)?,
            None => self
                .base
                .load(name, dev)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .to_dtype(DType::F32)?,
        };
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(w);
        };
        let Ok((out_dim, in_dim)) = w.dims2() else {
            return Ok(w);
        };
        match self
            .adapter
            .low_rank(module, in_dim, out_dim, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        {
            Some(l) => l.merged_weight(&w),
            None => Ok(w),
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for MergedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("{name}: shape {:?}, expected {:?}", t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.merged_f32(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains(name)
    }
}
