//! Checkpoints: the model in Hugging Face layout (so any checkpoint is also a model folder for
//! `sipt generate` or `model.path`), the optimizer, and the training state. Each is written into
//! a temporary folder that is renamed into place only when complete, and `latest` is updated
//! atomically after that: a kill at any moment leaves the previous checkpoint intact.

use crate::data::StreamPosition;
use crate::model::{Policy, TOKENIZER_JSON};
use crate::train::optim::AdamW;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sipt_experiment::rundir::write_atomic;
use std::path::{Path, PathBuf};

pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";
pub const LATEST: &str = "latest";
/// The DPO reference model, when the run has one (a model folder of its own).
pub const REFERENCE_DIR: &str = "reference";

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens: u64,
    pub data: StreamPosition,
    pub seed: u64,
    /// Anything a training loop keeps between steps (e.g. moving averages), as JSON.
    #[serde(default)]
    pub extra: serde_json::Value,
}

pub fn step_dir(checkpoints: &Path, step: u64) -> PathBuf {
    checkpoints.join(format!("step-{step:08}"))
}

/// Write a checkpoint, then point `latest` at it, then drop all but the newest `keep`.
pub fn save(
    checkpoints: &Path,
    policy: &Policy,
    optimizer: Option<&AdamW>,
    reference: Option<&Policy>,
    tokenizer: &Path,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = step_dir(checkpoints, state.step);
    let tmp = checkpoints.join(format!(".step-{:08}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    policy.save(&tmp)?;
    std::fs::copy(tokenizer, tmp.join(TOKENIZER_JSON))
        .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
    if let Some(r) = reference {
        r.save(&tmp.join(REFERENCE_DIR))?;
    }
    if let Some(opt) = optimizer {
        opt.save(&tmp.join(OPTIMIZER))?;
        crate::model::sync_file(&tmp.join(OPTIMIZER))?;
    }
    write_atomic(
        &tmp.join(STATE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    if let Ok(d) = std::fs::File::open(checkpoints) {
        let _ = d.sync_all();
    }
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_atomic(&checkpoints.join(LATEST), name.as_bytes())?;
    prune(checkpoints, keep, &final_dir);
    Ok(final_dir)
}

fn prune(checkpoints: &Path, keep: usize, newest: &Path) {
    let Ok(entries) = std::fs::read_dir(checkpoints) else {
        return;
    };
    let mut steps: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    let keep = keep.max(1);
    if steps.len() > keep {
        for old in &steps[..steps.len() - keep] {
            if old != newest {
                let _ = std::fs::remove_dir_all(old);
            }
        }
    }
}

/// The newest complete checkpoint, if any.
pub fn latest(checkpoints: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints.join(LATEST);
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer)
        .with_context(|| format!("cannot read {}", pointer.display()))?;
    let dir = checkpoints.join(name.trim());
    if !dir.join(STATE).exists() {
        bail!(
            "{} points at {}, which is not a complete checkpoint",
            pointer.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a training state", path.display()))
}
