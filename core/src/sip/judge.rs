//! Judging the pools: the pointwise judges score the rollouts (originals and rewrites were
//! scored with the batch), then every pairwise judge runs the configured tournament over each
//! whole pool, one batch of comparisons per round across all pools.

use super::batch::Batch;
use super::pool::Pool;
use super::STREAM_TOURNAMENT;
use sipt_api::{PairwiseItem, PointwiseItem, Source};
use sipt_experiment::plugins::{judge_pointwise, JudgeStats, Plugins};
use sipt_experiment::rng::SplitMix;
use sipt_experiment::tournament::{self, Design, Match};

/// What judging a step cost: per judge (calls, failures), the batch's pointwise calls
/// included, and the pairwise calls of all tournaments.
pub struct Judging {
    pub stats: JudgeStats,
    pub pairwise_calls: usize,
}

/// Judge the rollouts of `pools` pointwise and every pool pairwise; scores land in the pools.
pub fn judge(
    plugins: &Plugins,
    batch: &Batch,
    pools: &mut [Pool],
    design: Design,
    prior: &str,
    seed: u64,
    step: u64,
) -> Judging {
    let mut stats = judge_rollouts(plugins, batch, pools);
    for (name, (calls, failures)) in &batch.judge_stats {
        let entry = stats.entry(name.clone()).or_insert((0, 0));
        entry.0 += calls;
        entry.1 += failures;
    }
    let mut pairwise_calls = 0;
    let rng = SplitMix::derive(seed, STREAM_TOURNAMENT, step);
    for (name, outcome) in tournaments(plugins, batch, pools, design, prior, &rng) {
        pairwise_calls += outcome.calls;
        stats.insert(name, (outcome.calls, outcome.failures));
    }
    Judging {
        stats,
        pairwise_calls,
    }
}

/// Pointwise scores of every rollout, against the original suffix as reference.
fn judge_rollouts(plugins: &Plugins, batch: &Batch, pools: &mut [Pool]) -> JudgeStats {
    let mut items = Vec::new();
    let mut slots = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        for (c, cand) in pool.iter().enumerate() {
            if cand.source == Source::Rollout {
                items.push(PointwiseItem {
                    prefix: batch.prefixes[p].clone(),
                    candidate: cand.text.clone(),
                    reference: Some(batch.suffixes[p].clone()),
                });
                slots.push((p, c));
            }
        }
    }
    let (scores, stats) = judge_pointwise(&plugins.pointwise, &items);
    for ((p, c), s) in slots.into_iter().zip(scores) {
        pools[p][c].scores = s;
    }
    stats
}

/// Each pairwise judge's tournament over the pools; its scores (win rates within the pool)
/// become the judge's criterion. The pivot design compares against the original suffix. Every
/// judge's tournament draws from its own copy of `rng`.
fn tournaments(
    plugins: &Plugins,
    batch: &Batch,
    pools: &mut [Pool],
    design: Design,
    prior: &str,
    rng: &SplitMix,
) -> Vec<(String, tournament::Outcome)> {
    let sizes: Vec<usize> = pools.iter().map(Vec::len).collect();
    let pivots: Vec<Option<usize>> = pools
        .iter()
        .map(|pool| pool.iter().position(|c| c.source == Source::Original))
        .collect();
    // The adaptive design's starting order: a pointwise criterion's scores, read before any
    // pairwise judge writes its own (other designs take none).
    let priors: Vec<Vec<Option<f64>>> = match design {
        Design::Adaptive => pools
            .iter()
            .map(|pool| {
                pool.iter()
                    .map(|c| c.scores.get(prior).copied().flatten())
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut outcomes = Vec::new();
    for (name, judge) in &plugins.pairwise {
        let mut referee = |matches: &[Match]| -> Vec<Option<f64>> {
            let items: Vec<PairwiseItem> = matches
                .iter()
                .map(|&(p, a, b)| PairwiseItem {
                    prefix: batch.prefixes[p].clone(),
                    first: pools[p][a].text.clone(),
                    second: pools[p][b].text.clone(),
                    reference: Some(batch.suffixes[p].clone()),
                })
                .collect();
            judge
                .compare(&items)
                .into_iter()
                .map(|r| r.ok().map(|p| p.first_wins))
                .collect()
        };
        let outcome = tournament::run(
            design,
            &sizes,
            &pivots,
            &priors,
            &mut referee,
            rng,
            batch.first,
        );
        let criterion = judge.criterion();
        for (p, scores) in outcome.scores.iter().enumerate() {
            for (c, s) in scores.iter().enumerate() {
                pools[p][c].scores.insert(criterion.clone(), *s);
            }
        }
        outcomes.push((name.clone(), outcome));
    }
    outcomes
}
