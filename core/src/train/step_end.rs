//! The end of every training step, shared by the NTP and SIP loops: evaluate when due, log the
//! step's metrics, show progress, write a checkpoint when due, and close the run.

use super::checkpoint::{self, TrainState};
use super::optim::AdamW;
use crate::data::Corpus;
use crate::dist::Dist;
use crate::eval::Periodic;
use crate::model::Policy;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use sipt_experiment::config::Experiment;
use sipt_experiment::metrics::Row;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::progress::Reporter;
use sipt_experiment::rundir::{RunDir, CHECKPOINTS_DIR, METRICS_FILE};
use sipt_experiment::tracking::Tracker;
use std::path::PathBuf;

/// Evaluation, metrics sinks, progress display and checkpoints of one run. In a job of several
/// ranks every rank evaluates its share, and only rank 0 has the sinks and writes checkpoints:
/// its metrics are the job's, reduced over the ranks by the loops.
pub struct StepEnd<'a> {
    e: &'a Experiment,
    periodic: Periodic<'a>,
    sinks: Option<Sinks>,
    checkpoints: PathBuf,
    tokenizer: &'a Tokenizer,
    dist: &'a Dist,
}

/// What the writing rank keeps.
struct Sinks {
    tracker: Tracker,
    reporter: Reporter,
}

impl<'a> StepEnd<'a> {
    /// Open the run's sinks and prepare the periodic evaluation (which saves the starting model
    /// of a from-scratch run that has no checkpoint yet). `continue_after`: the step a resumed
    /// run continues after (0 when it was stopped before its first checkpoint); rows logged
    /// past it are dropped, since the run logs them again, and W&B continues the same run.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        e: &'a Experiment,
        run: &RunDir,
        plugins: &'a Plugins,
        corpus: &'a Corpus,
        tokenizer: &'a Tokenizer,
        policy: &Policy,
        continue_after: Option<u64>,
        dist: &'a Dist,
    ) -> Result<StepEnd<'a>> {
        let start = continue_after.unwrap_or(0);
        let sinks = if dist.is_writer() {
            let tracker = Tracker::open(e, run, continue_after)?;
            let reporter =
                Reporter::new(e.train.steps, start, e.train.log_every).with_status_file(run.path());
            Some(Sinks { tracker, reporter })
        } else {
            None
        };
        let periodic = Periodic::new(e, plugins, corpus, tokenizer, policy, run, start > 0, dist)?;
        Ok(StepEnd {
            e,
            periodic,
            sinks,
            checkpoints: run.path().join(CHECKPOINTS_DIR),
            tokenizer,
            dist,
        })
    }

    /// Close step `state.step`: evaluation metrics join `row` when due, the row is logged,
    /// `summary(row)` is shown as progress, and a checkpoint (with the optimizer and the DPO
    /// reference, if any) is written every `train.checkpoint_every` steps and at the end.
    pub fn finish_step(
        &mut self,
        state: &TrainState,
        mut row: Row,
        summary: impl FnOnce(&Row) -> String,
        policy: &Policy,
        optimizer: &AdamW,
        reference: Option<&Policy>,
    ) -> Result<()> {
        let t = &self.e.train;
        let last = state.step == t.steps;
        self.periodic.maybe_run(
            state.step,
            last,
            policy,
            self.tokenizer,
            &mut row,
            self.sinks.as_ref().map(|s| &s.reporter),
            self.dist,
        )?;
        let Some(sinks) = self.sinks.as_mut() else {
            return Ok(());
        };
        sinks.tracker.log(&row)?;
        sinks.reporter.step(state.step, &summary(&row));
        if (t.checkpoint_every > 0 && state.step % t.checkpoint_every == 0) || last {
            self.checkpoint(state, policy, optimizer, reference)?;
        }
        Ok(())
    }

    /// Write a checkpoint of step `state.step` now (unless that step's is the latest already).
    pub fn checkpoint(
        &self,
        state: &TrainState,
        policy: &Policy,
        optimizer: &AdamW,
        reference: Option<&Policy>,
    ) -> Result<()> {
        let Some(sinks) = &self.sinks else {
            return Ok(());
        };
        let this_step = checkpoint::step_dir(&self.checkpoints, state.step);
        if checkpoint::latest(&self.checkpoints)? == Some(this_step) {
            return Ok(());
        }
        let dir = checkpoint::save(
            &self.checkpoints,
            policy,
            Some(optimizer),
            reference,
            self.tokenizer.path(),
            state,
            self.e.train.keep_checkpoints,
        )?;
        sinks
            .reporter
            .note(&format!("checkpoint {}", dir.display()));
        Ok(())
    }

    /// The run is done: final status, sinks closed, and one line saying where things are
    /// (`also`: further files worth naming, e.g. the samples).
    pub fn close(
        mut self,
        run: &RunDir,
        state: &TrainState,
        also: &[(&str, PathBuf)],
    ) -> Result<()> {
        let Some(mut sinks) = self.sinks.take() else {
            return Ok(());
        };
        sinks.reporter.finish();
        sinks.tracker.finish(true)?;
        let mut places = format!("metrics in {}", run.file(METRICS_FILE).display());
        for (what, path) in also {
            places.push_str(&format!(", {what} in {}", path.display()));
        }
        println!(
            "finished {} steps; {places}, final model in {}",
            state.step,
            checkpoint::step_dir(&self.checkpoints, state.step).display()
        );
        Ok(())
    }
}
