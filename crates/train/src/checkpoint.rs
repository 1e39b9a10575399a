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

/// A training run's saved point, as read back: everything a resume needs.
pub struct SavedStep {
    /// Adapter tensors by PEFT key.
    pub adapter: BTreeMap<String, Tensor>,
    /// AdamW's moments, by `optim::AdamW::state` name.
    pub optimizer: OptimizerState,
    pub state: TrainState,
}

/// AdamW's saved tensors by name.
pub type OptimizerState = BTreeMap<String, Tensor>;

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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

/// Refuses a state this recipe and data could not have produced: a step past the run's
/// `total`, a data position past the epoch, or step, epoch and position that disagree
/// (`step = epoch · steps_per_epoch + step_in_epoch` for the same data and batch settings).
pub fn check_state(
    state: &TrainState,
    dir: &Path,
    steps_per_epoch: usize,
    total: usize,
) -> Result<()> {
    let file = dir.join(STATE_FILE);
    let bad = |message: String| {
        Err(TrainError::Resume(format!(
            "{}: {message}; resume with the recipe and data that made it, or start over with --force",
            file.display()
        )))
    };
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<usize>().ok());
    if named.is_some_and(|n| n != state.step) {
        return bad(format!(
            "`step` is {} but the directory is {}",
            state.step,
            dir.display()
        ));
    }
    if state.step > total {
        return bad(format!(
            "`step` is {} but this recipe runs {total} steps",
            state.step
        ));
    }
    if state.step_in_epoch >= steps_per_epoch.max(1) {
        return bad(format!(
            "`step_in_epoch` is {} but an epoch of this data has {steps_per_epoch} steps",
            state.step_in_epoch
        ));
    }
    let expected = state
        .epoch
        .checked_mul(steps_per_epoch)
        .and_then(|s| s.checked_add(state.step_in_epoch));
    if expected != Some(state.step) {
        return bad(format!(
            "`step` {} does not match `epoch` {} and `step_in_epoch` {} with {steps_per_epoch} steps per epoch (was the data or the batch size changed?)",
            state.step, state.epoch, state.step_in_epoch
        ));
    }
    if state.best_step.is_some_and(|b| b > state.step)
        || state.best_eval_loss.is_some_and(|l| !l.is_finite())
    {
        return bad("`best_step` / `best_eval_loss` are not a past, finite evaluation".into());
    }
    Ok(())
}

/// Reads a checkpoint: adapter tensors by PEFT key, optimizer tensors, state.
pub fn load(dir: &Path) -> Result<SavedStep> {
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
    let state = parse_state(&text, &p)?;
    Ok(SavedStep {
        adapter,
        optimizer,
        state,
    })
}

/// A `state.json`'s text as a [`TrainState`]; `file` names it in errors.
pub fn parse_state(text: &str, file: &Path) -> Result<TrainState> {
    serde_json::from_str(text)
        .map_err(|e| TrainError::io(file, format!("invalid checkpoint state: {e}")))
}
