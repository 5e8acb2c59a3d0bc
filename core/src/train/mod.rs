//! Training building blocks shared by every loop: the optimizer and schedule, checkpoints.

pub mod checkpoint;
pub mod optim;

use crate::config::Experiment;
use crate::data::Windows;
use crate::model::Policy;
use anyhow::Result;
use checkpoint::TrainState;
use optim::AdamW;
use std::path::PathBuf;

/// The optimizer and training state a loop starts from: fresh, or restored from the checkpoint
/// being resumed (optimizer moments, step, tokens, data position).
pub fn start(
    e: &Experiment,
    policy: &Policy,
    windows: &mut Windows,
    resume: &Option<(PathBuf, TrainState)>,
) -> Result<(AdamW, TrainState)> {
    let t = &e.train;
    let mut optimizer = AdamW::new(
        policy.vs.variables().into_iter().collect(),
        t.beta1,
        t.beta2,
        t.weight_decay,
    );
    let mut state = TrainState {
        step: 0,
        tokens: 0,
        data: windows.position,
        seed: e.experiment.seed,
        extra: serde_json::Value::Null,
    };
    if let Some((dir, saved)) = resume {
        optimizer.load(&dir.join(checkpoint::OPTIMIZER))?;
        windows.seek(saved.data);
        state = saved.clone();
        tracing::info!("resuming from {} (step {})", dir.display(), state.step);
    }
    Ok((optimizer, state))
}
