//! Checkpoints: `checkpoints/step-N/` holds the adapter (PEFT format), the optimizer moments and
//! `state.json` (step, data position, best eval loss, early-stopping count). The learning rate
//! and every random draw are functions of the step and the seed, so this is all a resume needs.
use crate::error::{Result, TrainError};
use candle_core::{Device, Tensor};
use lorakit_adapter::fsutil::{atomic_write, AtomicDir};
use lorakit_adapter::{save_adapter_with, LoraConfig, LowRank};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A loaded checkpoint: adapter tensors by PEFT key, optimizer tensors, state.
pub type Checkpoint = (
    BTreeMap<String, Tensor>,
    BTreeMap<String, Tensor>,
    TrainState,
);

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress (0-based) and optimizer steps done within it.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_since_best: usize,
    pub stopped_early: bool,
    /// The LoRA block of the recipe that produced this state; resuming with another is refused.
    pub lora: serde_json::Value,
    pub seed: u64,
}

/// Writes `dir` (a `step-N` directory) all at once.
pub fn save(
    dir: &Path,
    config: &LoraConfig,
    modules: &[(String, LowRank)],
    whole: &[(String, Tensor)],
    optimizer: &BTreeMap<String, Tensor>,
    state: &TrainState,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let tmp = AtomicDir::create(dir, true)?;
    save_adapter_with(tmp.path(), config, modules, whole, metadata)?;
    let tensors: Vec<(String, Tensor)> = optimizer
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    lorakit_adapter::safetensors_writer::write_atomic(
        &tmp.path().join(OPTIMIZER_FILE),
        &tensors,
        &[],
    )?;
    let json =
        serde_json::to_vec_pretty(state).map_err(|e| TrainError::io(dir.join(STATE_FILE), e))?;
    atomic_write(&tmp.path().join(STATE_FILE), &json)?;
    tmp.commit()?;
    Ok(())
}

/// The newest complete checkpoint under `out/checkpoints`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let dir = out.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries {
        let e = e.map_err(|e| TrainError::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if e.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads a checkpoint: adapter tensors by PEFT key, optimizer tensors, state.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let read = |name: &str| -> Result<BTreeMap<String, Tensor>> {
        let p = dir.join(name);
        let map =
            candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| TrainError::io(&p, e))?;
        Ok(map.into_iter().collect())
    };
    let adapter = read(lorakit_adapter::peft_format::WEIGHTS_FILE)?;
    let optimizer = read(OPTIMIZER_FILE)?;
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| TrainError::io(&p, format!("invalid checkpoint state: {e}")))?;
    Ok((adapter, optimizer, state))
}
