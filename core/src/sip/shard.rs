//! Shares: in a job of several ranks, each rank makes, samples and judges its share of the
//! step's batch (the expensive, independent part); [`gather`] joins the shares in batch order so
//! that every rank holds the whole judged step. Rewards, selection, the loss, the curriculum's
//! averages, the monitors and the metrics are then those of one process running the whole
//! batch, on every rank alike.

use super::batch::Batch;
use super::judge::Judging;
use super::pool::{Candidate, Pool};
use crate::data::Cut;
use crate::dist::Dist;
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use sipt_api::Source;
use sipt_experiment::plugins::{JudgeStats, ScoreMap};
use std::collections::BTreeMap;

/// A candidate as it travels: source, tokens, text, scores (rewards come after the gather).
type Travelling = (Source, Vec<u32>, String, ScoreMap);

/// One rank's share of a judged step, as it travels.
#[derive(Serialize, Deserialize)]
struct Share {
    first: usize,
    cuts: Vec<(Vec<u32>, Vec<u32>)>,
    prefixes: Vec<String>,
    suffixes: Vec<String>,
    rewrites: Vec<Option<(String, Vec<u32>)>>,
    rewrite_failures: usize,
    scores: Vec<(ScoreMap, Option<ScoreMap>)>,
    batch_stats: JudgeStats,
    seconds_rewrite: f64,
    seconds_judge: f64,
    pools: Vec<Vec<Travelling>>,
    judging_stats: JudgeStats,
    pairwise_calls: usize,
}

fn add_stats(into: &mut JudgeStats, from: JudgeStats) {
    for (name, (calls, failures)) in from {
        let e = into.entry(name).or_insert((0, 0));
        e.0 += calls;
        e.1 += failures;
    }
}

/// The whole step from every rank's share (alone: the share is the whole step).
pub fn gather(
    dist: &Dist,
    batch: Batch,
    pools: Vec<Pool>,
    judging: Judging,
) -> Result<(Batch, Vec<Pool>, Judging)> {
    if dist.size() == 1 {
        return Ok((batch, pools, judging));
    }
    let share = Share {
        first: batch.first,
        cuts: batch
            .cuts
            .into_iter()
            .map(|c| (c.prefix, c.suffix))
            .collect(),
        prefixes: batch.prefixes,
        suffixes: batch.suffixes,
        rewrites: batch.rewrites,
        rewrite_failures: batch.rewrite_failures,
        scores: batch.scores,
        batch_stats: batch.judge_stats,
        seconds_rewrite: batch.seconds_rewrite,
        seconds_judge: batch.seconds_judge,
        pools: pools
            .into_iter()
            .map(|pool| {
                pool.into_iter()
                    .map(|c| (c.source, c.tokens, c.text, c.scores))
                    .collect()
            })
            .collect(),
        judging_stats: judging.stats,
        pairwise_calls: judging.pairwise_calls,
    };
    let bytes = serde_json::to_vec(&share)?;
    let mut shares: Vec<Share> = dist
        .all_gather_bytes(&bytes)?
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b).map_err(|e| anyhow!("rank {r}'s share of the step: {e}"))
        })
        .collect::<Result<_>>()?;
    shares.sort_by_key(|s| s.first);
    let mut whole = Batch::of_prefixes(Vec::new());
    let mut all_pools = Vec::new();
    let mut judging = Judging {
        stats: JudgeStats::new(),
        pairwise_calls: 0,
    };
    for s in shares {
        whole.cuts.extend(
            s.cuts
                .into_iter()
                .map(|(prefix, suffix)| Cut { prefix, suffix }),
        );
        whole.prefixes.extend(s.prefixes);
        whole.suffixes.extend(s.suffixes);
        whole.rewrites.extend(s.rewrites);
        whole.rewrite_failures += s.rewrite_failures;
        whole.scores.extend(s.scores);
        add_stats(&mut whole.judge_stats, s.batch_stats);
        // The ranks work at once: the step waited for the slowest.
        whole.seconds_rewrite = whole.seconds_rewrite.max(s.seconds_rewrite);
        whole.seconds_judge = whole.seconds_judge.max(s.seconds_judge);
        all_pools.extend(s.pools.into_iter().map(|pool| {
            pool.into_iter()
                .map(|(source, tokens, text, scores)| Candidate {
                    source,
                    tokens,
                    text,
                    scores,
                    reward: None,
                })
                .collect::<Pool>()
        }));
        add_stats(&mut judging.stats, s.judging_stats);
        judging.pairwise_calls += s.pairwise_calls;
    }
    Ok((whole, all_pools, judging))
}

/// The plugins' counters of the job: summed over the ranks (counters are counts), with the
/// pairwise judges' `agreement` recomputed from its summed parts.
pub fn counters(dist: &Dist, own: Vec<(String, f64)>) -> Result<Vec<(String, f64)>> {
    if dist.size() == 1 {
        return Ok(own);
    }
    let bytes = serde_json::to_vec(&own)?;
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for (r, part) in dist.all_gather_bytes(&bytes)?.iter().enumerate() {
        let part: Vec<(String, f64)> =
            serde_json::from_slice(part).map_err(|e| anyhow!("rank {r}'s plugin counters: {e}"))?;
        for (k, v) in part {
            *sums.entry(k).or_default() += v;
        }
    }
    let ratios: Vec<String> = sums
        .keys()
        .filter(|k| k.ends_with("/agreement"))
        .cloned()
        .collect();
    for key in ratios {
        let agreed = sums.get(&format!("{key}_agreed")).copied();
        let checked = sums.get(&format!("{key}_checked")).copied();
        if let (Some(a), Some(c)) = (agreed, checked) {
            if c > 0.0 {
                sums.insert(key, a / c);
            }
        }
    }
    let mut out: Vec<(String, f64)> = own
        .into_iter()
        .map(|(k, _)| {
            let v = sums.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect();
    // Counters another rank has and this one has not (yet).
    out.extend(sums);
    Ok(out)
}
