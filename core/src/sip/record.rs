//! What a SIP step leaves behind: its metrics row (names as documented in docs/guide.md) and,
//! every `sip.sample_every` steps, a few pools with their judgments in `samples.jsonl`.

use super::batch::Batch;
use super::judge::Judging;
use super::observe::SourceStats;
use super::pool::Pool;
use super::update::Updated;
use crate::objective::Target;
use anyhow::{Context, Result};
use sipt_api::StepPlan;
use sipt_experiment::metrics::{drop_rows_after, Row};
use sipt_experiment::rundir::RunDir;
use std::io::Write;

pub const SAMPLES_FILE: &str = "samples.jsonl";

/// Seconds spent in each phase of a step.
pub struct Timings {
    pub sample: f64,
    pub judge: f64,
    pub update: f64,
    pub step: f64,
    /// Joining the ranks' shares of the judged step, and summing gradients over the ranks
    /// (0 alone).
    pub gather: f64,
    pub all_reduce: f64,
}

/// Everything a step's row is made of.
pub struct StepRecord<'a> {
    pub step: u64,
    pub lr: f64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub generated_tokens: usize,
    pub plan: &'a StepPlan,
    pub batch: &'a Batch,
    pub pools: &'a [Pool],
    pub judging: &'a Judging,
    pub updated: &'a Updated,
    pub stats: &'a SourceStats,
    /// The plugins' own counters (`Plugins::counters`).
    pub counters: &'a [(String, f64)],
    pub selected_pools: usize,
    pub timings: Timings,
}

impl StepRecord<'_> {
    /// The step's metrics row.
    pub fn row(&self) -> Row {
        let (u, t) = (self.updated, &self.timings);
        let mut row = Row::new(self.step);
        row.set("lr", self.lr)
            .set("grad_norm", u.grad_norm)
            .set("updated", if u.updated { 1.0 } else { 0.0 })
            .set("plan/rollouts", self.plan.rollouts as f64)
            .set("plan/sip_weight", self.plan.sip_weight)
            .set("plan/ntp_weight", self.plan.ntp_weight)
            .set("tokens", self.tokens as f64)
            .set("time/sample", t.sample)
            .set("time/rewrite", self.batch.seconds_rewrite)
            .set("time/judge", t.judge)
            .set("time/update", t.update)
            .set("time/step", t.step)
            .set("time/gather", t.gather)
            .set("time/all_reduce", t.all_reduce)
            .set("time/update/policy", u.phases.policy)
            .set("time/update/reference", u.phases.reference)
            .set("time/update/ntp", u.phases.ntp)
            .set("time/update/backward", u.phases.backward)
            .set("time/update/optimizer", u.phases.optimizer)
            .set(
                "perf/generated_tokens_per_second",
                self.generated_tokens as f64 / t.sample.max(1e-9),
            )
            .set(
                "perf/trained_tokens_per_second",
                self.trained_tokens as f64 / t.update.max(1e-9),
            )
            .set("rewrite/failures", self.batch.rewrite_failures as f64);
        for (name, value) in &u.metrics {
            row.set(name.clone(), *value);
        }
        // The objective's terms, then the loss actually optimized (curriculum weights applied).
        row.set("loss/total", u.loss);
        if let Some(ntp) = u.ntp_loss {
            row.set("loss/ntp", ntp);
        }
        let prefixes = self.pools.len().max(1) as f64;
        let mut all_calls = 0usize;
        for (name, (calls, failures)) in &self.judging.stats {
            row.set(format!("judge/{name}/calls"), *calls as f64)
                .set(format!("judge/{name}/failures"), *failures as f64);
            all_calls += calls;
        }
        row.set("judge/calls_per_prefix", all_calls as f64 / prefixes)
            .set(
                "judge/pairwise_calls_per_prefix",
                self.judging.pairwise_calls as f64 / prefixes,
            );
        // Cumulative, not per step: the prefetch thread works on the next step concurrently.
        for (key, value) in self.counters {
            row.set(key.clone(), *value);
        }
        for (source, (mean, std)) in &self.stats.reward {
            row.set(format!("reward/{source}/mean"), *mean)
                .set(format!("reward/{source}/std"), *std);
        }
        for (source, rate) in &self.stats.chosen_rate {
            row.set(format!("chosen/{source}"), *rate);
        }
        row.set("selected_pools", self.selected_pools as f64);
        row
    }
}

/// The progress line of a step.
pub fn summary(row: &Row, seconds: f64) -> String {
    let rollout_reward = row
        .get("reward/rollout/mean")
        .map(|r| format!(", rollout reward {r:.3}"))
        .unwrap_or_default();
    let alarms = match row.get("health/alarms") {
        Some(n) if n > 0.0 => format!(", {n} health alarm(s)"),
        _ => String::new(),
    };
    format!(
        "loss {:.4}{rollout_reward}, {seconds:.1}s/step{alarms}",
        row.get("loss/total").unwrap_or(f64::NAN)
    )
}

/// `samples.jsonl`, continued after `resumed_step` (later lines of an interrupted run dropped).
pub fn open_samples(run: &RunDir, resumed_step: u64) -> Result<std::fs::File> {
    let path = run.file(SAMPLES_FILE);
    drop_rows_after(&path, resumed_step)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// The first two pools of a step, every candidate with its scores, reward and role.
pub fn write_samples(
    out: &mut std::fs::File,
    step: u64,
    batch: &Batch,
    pools: &[Pool],
    targets: &[Vec<Target>],
) -> Result<()> {
    for (p, pool) in pools.iter().enumerate().take(2) {
        let role = |c: usize| -> &'static str {
            for t in &targets[p] {
                match *t {
                    Target::Pair { chosen, .. } if chosen == c => return "chosen",
                    Target::Pair { rejected, .. } if rejected == c => return "rejected",
                    Target::Nll { index } if index == c => return "target",
                    _ => {}
                }
            }
            ""
        };
        let candidates: Vec<serde_json::Value> = pool
            .iter()
            .enumerate()
            .map(|(c, cand)| {
                serde_json::json!({
                    "source": cand.source,
                    "text": cand.text,
                    "scores": cand.scores,
                    "reward": cand.reward,
                    "role": role(c),
                })
            })
            .collect();
        let line = serde_json::json!({
            "step": step,
            "prefix": batch.prefixes[p],
            "original": batch.suffixes[p],
            "candidates": candidates,
        });
        writeln!(out, "{line}").context("cannot write samples")?;
    }
    out.flush().context("cannot write samples")
}
