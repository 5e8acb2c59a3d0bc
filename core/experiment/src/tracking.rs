//! Where metrics go: always `metrics.jsonl` in the run directory; with `tracking.wandb.mode`,
//! also a Weights & Biases offline run (`<run>/wandb/offline-run-*`) that the official `wandb`
//! CLI syncs (`wandb sync`), or streams while training runs (`live`); with
//! `tracking.tensorboard`, also TensorBoard event files (`crate::tensorboard`).

use crate::config::{Experiment, WandbMode};
use crate::metrics::{JsonLines, Row, Sink};
use crate::rundir::{write_atomic, RunDir, METRICS_FILE};
use anyhow::{Context, Result};

/// The run's W&B id, kept so that a resumed run continues the same W&B run.
const WANDB_ID_FILE: &str = "wandb-run-id";

struct Wandb {
    run: sipt_wandb::OfflineRun,
    live: Option<sipt_wandb::LiveSync>,
}

impl Sink for Wandb {
    fn log(&mut self, row: &Row) -> Result<()> {
        self.run
            .log(row.step, &row.values)
            .map(|_| ())
            .context("cannot write the W&B run file")
    }

    fn finish(&mut self, success: bool) -> Result<()> {
        self.run
            .finish(if success { 0 } else { 1 })
            .context("cannot finish the W&B run file")?;
        if let Some(live) = self.live.take() {
            // Give the live sync a moment to send the last rows and the exit record.
            let _ = live.wait(std::time::Duration::from_secs(60));
        }
        Ok(())
    }
}

/// Every sink of a run.
pub struct Tracker {
    sinks: Vec<Box<dyn Sink>>,
}

impl Tracker {
    /// Open the sinks; `resume_step` drops rows past the checkpoint (they will be recomputed).
    pub fn open(e: &Experiment, run: &RunDir, resume_step: Option<u64>) -> Result<Tracker> {
        let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(JsonLines::open(
            &run.file(METRICS_FILE),
            resume_step,
        )?)];
        if e.tracking.tensorboard {
            let events = crate::tensorboard::EventFile::create(run.path(), resume_step)?;
            tracing::info!(
                "TensorBoard events: {} (tensorboard --logdir {})",
                events.path().display(),
                run.path().display()
            );
            sinks.push(Box::new(events));
        }
        let w = &e.tracking.wandb;
        if w.mode != WandbMode::Off {
            let id_file = run.file(WANDB_ID_FILE);
            let (run_id, resume) = match std::fs::read_to_string(&id_file) {
                Ok(id) if resume_step.is_some() => (id.trim().to_string(), true),
                _ => (sipt_wandb::new_run_id(), false),
            };
            write_atomic(&id_file, run_id.as_bytes())?;
            let mut config = serde_json::to_value(e).unwrap_or_default();
            crate::config::redact_value(&mut config);
            let offline = sipt_wandb::OfflineRun::create(
                run.path(),
                sipt_wandb::RunOptions {
                    project: w.project.clone(),
                    entity: (!w.entity.is_empty()).then(|| w.entity.clone()),
                    run_id,
                    display_name: Some(e.experiment.name.clone()),
                    tags: w.tags.clone(),
                    config,
                    resume,
                },
            )
            .context("cannot create the W&B offline run")?;
            tracing::info!(
                "W&B offline run: {} (upload with `wandb sync {}`)",
                offline.dir().display(),
                offline.dir().display()
            );
            let live = if w.mode == WandbMode::Live {
                match sipt_wandb::find_wandb_cli() {
                    Some(cli) => Some(
                        sipt_wandb::spawn_live_sync(&cli, offline.dir())
                            .context("cannot start `wandb beta sync --live`")?,
                    ),
                    None => {
                        tracing::warn!("tracking.wandb.mode = \"live\" but no `wandb` CLI was found (pip install wandb, or set SIPT_WANDB); the run is written offline");
                        None
                    }
                }
            } else {
                None
            };
            sinks.push(Box::new(Wandb { run: offline, live }));
        }
        Ok(Tracker { sinks })
    }

    pub fn log(&mut self, row: &Row) -> Result<()> {
        for s in &mut self.sinks {
            s.log(row)?;
        }
        Ok(())
    }

    pub fn finish(&mut self, success: bool) -> Result<()> {
        for s in &mut self.sinks {
            s.finish(success)?;
        }
        Ok(())
    }
}
