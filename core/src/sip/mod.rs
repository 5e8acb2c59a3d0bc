//! The self-improving training step, phase by phase as method.md describes it. Each phase is a
//! module; [`train`] is the loop that calls them in order:
//!
//! 1. [`batch`]: cut documents into prefixes and original suffixes, rewrite the suffixes, judge
//!    originals and rewrites — the policy-independent half, made one step ahead on a second
//!    thread with `sip.overlap`;
//! 2. plan: the curriculum decides the step's pool and loss weights from [`observe`]'s averages;
//! 3. [`rollouts`]: K samples per prefix from the policy;
//! 4. [`pool`]: per prefix, the original, the rewrite and the rollouts as candidates;
//! 5. [`judge`]: pointwise judges score the rollouts, pairwise judges run a tournament per pool;
//! 6. reward ([`pool::reward`]): one reward per candidate from the reward plugin (in a job of
//!    several ranks, each samples and judges its share of the batch, and the shares are joined
//!    here: [`shard`]);
//! 7. [`select`]: the objective picks DPO pairs or NLL targets from each pool;
//! 8. [`update`]: log-probs, the weighted loss (in micro-batches: `micro`), one optimizer step,
//!    the reference follows;
//! 9. [`observe`]: the curriculum's moving averages; [`health`]: the monitors that catch a
//!    gamed or broken judge;
//! 10. step end: [`record`] makes the metrics row and samples; evaluation, logging and
//!     checkpoints are the [`StepEnd`] shared with the next-token loop.

pub mod batch;
pub mod health;
pub mod judge;
mod micro;
pub mod observe;
pub mod pool;
pub mod record;
pub mod rollouts;
pub mod select;
mod shard;
pub mod update;

use crate::data::{Cutter, Windows};
use crate::dist::Dist;
use crate::model::{eos_tokens, Policy, Sampler};
use crate::objective::{Needs, Objective, Target};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{TrainState, REFERENCE_DIR, STATE};
use crate::train::optim::{cosine_lr, AdamW};
use crate::train::{Prepared, StepEnd};
use anyhow::{bail, Context, Result};
use batch::{Batch, BatchMaker, Prefetch};
use observe::{Averages, SourceStats};
use pool::Pool;
use record::{StepRecord, Timings, SAMPLES_FILE};
use rollouts::Rollouts;
use select::Selection;
use serde::{Deserialize, Serialize};
use sipt_api::StepPlan;
use sipt_experiment::config::Experiment;
use sipt_experiment::metrics::Row;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::rundir::RunDir;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;
use update::Learner;

/// Independent random streams of a run.
const STREAM_CUTS: u64 = 1;
const STREAM_ROLLOUTS: u64 = 2;
const STREAM_TOURNAMENT: u64 = 3;

/// Train with a candidate-based objective (online DPO, RF-NLL, SFT, ...).
pub fn train(
    e: &Experiment,
    run: &RunDir,
    prepared: Prepared,
    plugins: &Plugins,
    objective: Box<dyn Objective>,
) -> Result<()> {
    let Prepared {
        device,
        tokenizer,
        corpus,
        policy,
        resume,
        resuming,
        dist,
    } = prepared;
    let t = &e.train;
    let base = base_plan(e);
    if base.rewrite && plugins.rewriter.is_none() {
        bail!("sip.rewrite is on but no [rewriter] is configured");
    }
    let (d, seed) = (&e.data, e.experiment.seed);
    let cutter = Cutter::new(
        &corpus.train,
        d.prefix_min_tokens,
        d.prefix_max_tokens,
        d.suffix_tokens,
    )?;
    let mut windows = Windows::new(&corpus.train, d.seq_len + 1, seed, d.shuffle)?;
    let (optimizer, state) = crate::train::start(e, &policy, &mut windows, &resume)?;
    let (learner, carried) = restore(
        e,
        &policy,
        objective.needs(),
        optimizer,
        &resume,
        Rc::clone(&dist),
    )?;
    let continue_after = resuming.then_some(state.step);
    let mut end = StepEnd::open(
        e,
        run,
        plugins,
        &corpus,
        &tokenizer,
        &policy,
        continue_after,
        &dist,
    )?;
    let mut samples = match dist.is_writer() {
        true => Some(record::open_samples(run, state.step)?),
        false => None,
    };
    let maker = BatchMaker {
        tokens: &corpus.tokens,
        cutter: &cutter,
        tokenizer: &tokenizer,
        plugins,
        batch_size: t.batch_size,
        suffix_tokens: d.suffix_tokens,
        seed,
        rewrite: base.rewrite,
        original: base.original,
        // Each rank makes, samples and judges its share of every batch.
        share: dist.share(t.batch_size),
    };
    let mut trainer = Trainer {
        e,
        plugins,
        objective: objective.as_ref(),
        tokenizer: &tokenizer,
        corpus: &corpus.tokens,
        policy: &policy,
        // Rollouts from a bf16 copy of the policy when asked; log-probs always from the policy.
        sampler: Sampler::new(&policy, e.sip.sample_dtype)?,
        rollouts: Rollouts {
            e,
            device,
            eos: eos_tokens(&policy.model.config, &tokenizer),
        },
        learner,
        averages: carried.averages,
        health: health::Health::restore(&e.health, &carried.health),
        windows,
        base,
        state,
        dist: Rc::clone(&dist),
    };
    if e.sip.tournament == sipt_experiment::tournament::Design::Adaptive {
        let criteria: Vec<String> = plugins
            .pointwise
            .iter()
            .flat_map(|(_, j)| j.criteria())
            .collect();
        if !criteria.contains(&e.sip.tournament_prior) {
            bail!(
                "sip.tournament_prior = \"{}\": no pointwise judge scores this criterion (they score: {}); the adaptive tournament orders each pool by it first",
                e.sip.tournament_prior,
                if criteria.is_empty() { "nothing".to_string() } else { criteria.join(", ") }
            );
        }
    }
    tracing::info!(
        "SIP training: {} steps of {} prefixes, objective {}, {} pointwise and {} pairwise judge(s), tournament {}",
        t.steps, t.batch_size, t.objective.name, plugins.pointwise.len(), plugins.pairwise.len(), e.sip.tournament
    );

    std::thread::scope(|scope| -> Result<()> {
        // The batch (cut, rewrite, judge the originals) needs no policy: made a step ahead.
        let mut prefetch = Prefetch::new(scope, &maker, e.sip.overlap, t.steps);
        while trainer.state.step < t.steps {
            let started = Instant::now();
            let batch = prefetch.take(trainer.state.step)?;
            let StepOutput {
                row,
                batch,
                pools,
                targets,
            } = trainer.step(batch, started)?;
            let step = trainer.state.step;
            let due = e.sip.sample_every > 0 && (step % e.sip.sample_every == 0 || step == 1);
            if let (true, Some(samples)) = (due, samples.as_mut()) {
                record::write_samples(samples, step, &batch, &pools, &targets)?;
            }
            let summary = |row: &_| record::summary(row, started.elapsed().as_secs_f64());
            let (learner, state) = (&trainer.learner, &trainer.state);
            let reference = learner.reference.as_ref();
            end.finish_step(state, row, summary, &policy, &learner.optimizer, reference)?;
            if trainer.health.stop() && trainer.state.step < t.steps {
                end.checkpoint(state, &policy, &learner.optimizer, reference)?;
                let alarms: Vec<String> = trainer
                    .health
                    .alarming()
                    .iter()
                    .map(|(name, since)| format!("health/{name} since step {since}"))
                    .collect();
                bail!(
                    "stopped at step {} by [health] (action = \"stop\"): {}; the checkpoint is written, --resume continues",
                    state.step,
                    alarms.join(", ")
                );
            }
        }
        prefetch.finish();
        Ok(())
    })?;
    end.close(run, &trainer.state, &[("samples", run.file(SAMPLES_FILE))])
}

/// Everything a SIP step reads and changes, set up once by [`train`].
struct Trainer<'a> {
    e: &'a Experiment,
    plugins: &'a Plugins,
    objective: &'a dyn Objective,
    tokenizer: &'a Tokenizer,
    /// The corpus's token stream (next-token batches come from it).
    corpus: &'a crate::data::Tokens,
    policy: &'a Policy,
    sampler: Sampler,
    rollouts: Rollouts<'a>,
    learner: Learner,
    averages: Averages,
    health: health::Health,
    windows: Windows,
    base: StepPlan,
    state: TrainState,
    dist: Rc<Dist>,
}

impl Trainer<'_> {
    /// One step on `batch` after the batch phase: plan, rollouts, pools, judging, reward,
    /// selection, update, observation. Returns the step's metrics row, its pools and targets.
    /// In a job of several ranks, `batch` is this rank's share: sampling and judging work on
    /// it, and from the reward on every rank holds the whole step ([`shard::gather`]); the
    /// whole batch is returned.
    fn step(&mut self, batch: Batch, started: Instant) -> Result<StepOutput> {
        let (e, t, step) = (self.e, &self.e.train, self.state.step);
        // Plan: the curriculum decides this step's pool and loss weights.
        let progress = self.averages.progress(step, t.steps, self.state.tokens);
        let plan = self.plugins.curriculum.plan(&progress, &self.base);
        // Rollouts: K continuations per prefix from the current policy.
        let clock = Instant::now();
        let model = self.sampler.model(self.policy)?;
        let generated =
            self.rollouts
                .sample(model, &batch.prefix_tokens(), batch.first, &plan, step);
        let seconds_sample = clock.elapsed().as_secs_f64();
        // Pools, judged (pointwise, then a tournament per pairwise judge) and rewarded.
        let pools = pool::build(&batch, &plan, &generated, self.tokenizer);
        let generated_tokens = generated.tokens.len() * e.data.suffix_tokens * self.dist.size();
        drop(generated);
        let mut pools = pools;
        let clock = Instant::now();
        let judging = judge::judge(
            self.plugins,
            &batch,
            &mut pools,
            e.sip.tournament,
            &e.sip.tournament_prior,
            e.experiment.seed,
            step,
        );
        let seconds_judge = clock.elapsed().as_secs_f64() + batch.seconds_judge;
        // The ranks' shares joined: every rank holds the whole judged step from here on.
        let gathering = Instant::now();
        let (batch, mut pools, judging) = shard::gather(&self.dist, batch, pools, judging)?;
        let seconds_gather = gathering.elapsed().as_secs_f64();
        pool::reward(self.plugins.reward.as_ref(), &mut pools);
        // Select what to learn from; update the policy (and the reference after it).
        let clock = Instant::now();
        let selection = Selection::new(self.objective, &batch, &pools);
        let ntp = self.learner.wants_ntp(&plan).then(|| {
            let rows = t.batch_size;
            update::ntp_batch(
                &mut self.windows,
                self.corpus,
                rows,
                e.data.seq_len + 1,
                self.learner.device,
            )
        });
        let lr = cosine_lr(step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        let updated =
            self.learner
                .update(self.policy, self.objective, &selection, ntp, &plan, lr)?;
        self.learner.follow(self.policy, step)?;
        let seconds_update = clock.elapsed().as_secs_f64();
        // Observe: what the curriculum plans from, computed apart from the metrics.
        let stats = SourceStats::new(&pools, &selection);
        self.averages.observe(&stats);

        let trained_tokens = selection.tokens() + updated.ntp_tokens;
        self.state.step += 1;
        self.state.tokens += trained_tokens;
        self.state.data = self.windows.position;
        let counters = shard::counters(&self.dist, self.plugins.counters())?;
        let record = StepRecord {
            step: self.state.step,
            lr,
            tokens: self.state.tokens,
            trained_tokens,
            generated_tokens,
            plan: &plan,
            batch: &batch,
            pools: &pools,
            judging: &judging,
            updated: &updated,
            stats: &stats,
            counters: &counters,
            selected_pools: selection.selected_pools,
            timings: Timings {
                sample: seconds_sample,
                judge: seconds_judge,
                update: seconds_update,
                step: started.elapsed().as_secs_f64(),
                gather: seconds_gather,
                all_reduce: updated.seconds_all_reduce,
            },
        };
        let mut row = record.row();
        if e.health.enabled {
            let values =
                health::measure(&pools, &batch, &stats, &judging.stats, &counters, &updated);
            for change in self.health.observe(self.state.step, values, &mut row) {
                tracing::warn!("{change}");
            }
        }
        self.state.extra = serde_json::to_value(Carried {
            averages: self.averages.clone(),
            health: self.health.windows(),
        })?;
        let targets = selection.targets;
        Ok(StepOutput {
            row,
            batch,
            pools,
            targets,
        })
    }
}

/// What a step leaves for the step end: its metrics row, the whole batch, its pools and targets.
struct StepOutput {
    row: Row,
    batch: Batch,
    pools: Vec<Pool>,
    targets: Vec<Vec<Target>>,
}

/// The plan of every step before the curriculum changes it: `[sip]` as written.
fn base_plan(e: &Experiment) -> StepPlan {
    StepPlan {
        original: e.sip.original,
        rewrite: e.sip.rewrite,
        rollouts: e.sip.rollouts,
        temperature: e.sip.temperature,
        top_p: e.sip.top_p,
        sip_weight: 1.0,
        ntp_weight: 0.0,
    }
}

/// What the SIP loop carries from step to step besides tensors, in `state.json`'s `extra`: the
/// curriculum's averages (at the top level, as checkpoints before the health windows have
/// them) and the health monitors' windows.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Carried {
    #[serde(flatten)]
    averages: Averages,
    #[serde(default)]
    health: BTreeMap<String, health::Window>,
}

/// The update phase's state (optimizer, DPO reference), the curriculum's averages and the
/// health monitors, as the checkpoint being resumed left them (or fresh).
fn restore(
    e: &Experiment,
    policy: &Policy,
    needs: Needs,
    optimizer: AdamW,
    resume: &Option<(PathBuf, TrainState)>,
    dist: Rc<Dist>,
) -> Result<(Learner, Carried)> {
    let mut reference = match needs.reference {
        Some(_) => Some(update::reference_of(policy)?),
        None => None,
    };
    let mut carried = Carried::default();
    if let Some((dir, saved)) = resume {
        if let Some(r) = reference.as_mut() {
            let ref_dir = dir.join(REFERENCE_DIR);
            if ref_dir.exists() {
                r.load_weights(&ref_dir)?;
            }
        }
        if !saved.extra.is_null() {
            carried = serde_json::from_value(saved.extra.clone()).with_context(|| {
                format!(
                    "{}: `extra` is not the SIP loop's state",
                    dir.join(STATE).display()
                )
            })?;
        }
    }
    let learner = Learner {
        needs,
        optimizer,
        reference,
        device: policy.device(),
        micro_batch: e.train.micro_batch,
        dtype: e.model.dtype,
        grad_clip: e.train.grad_clip,
        dist,
        scoring: Default::default(),
    };
    Ok((learner, carried))
}
