//! Pools: per prefix, the candidates the step judges — the original suffix, the rewrite and
//! the K rollouts, as the plan asks — and, once judged, one reward each.

use super::batch::Batch;
use crate::sample::Generated;
use crate::tokenizer::Tokenizer;
use sipt_api::{CandidateScores, RewardFn, Source, StepPlan};
use sipt_experiment::plugins::ScoreMap;

/// A candidate continuation of one prefix.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub source: Source,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Criterion → score; filled by the judges.
    pub scores: ScoreMap,
    /// `None` until rewarded, and when the reward failed (then it is never selected).
    pub reward: Option<f64>,
}

/// The candidates of one prefix.
pub type Pool = Vec<Candidate>;

/// One pool per prefix of `batch`: [original?] [rewrite?] [rollout × K]. Originals and
/// rewrites come with the batch's judgments; rollouts are judged next.
pub fn build(
    batch: &Batch,
    plan: &StepPlan,
    rollouts: &Generated,
    tokenizer: &Tokenizer,
) -> Vec<Pool> {
    let k = plan.rollouts as usize;
    let mut pools = Vec::with_capacity(batch.cuts.len());
    for (i, cut) in batch.cuts.iter().enumerate() {
        let mut pool = Vec::new();
        if plan.original {
            pool.push(Candidate {
                source: Source::Original,
                tokens: cut.suffix.clone(),
                text: batch.suffixes[i].clone(),
                scores: batch.scores[i].0.clone(),
                reward: None,
            });
        }
        if plan.rewrite {
            if let (Some((text, ids)), Some(scores)) = (&batch.rewrites[i], &batch.scores[i].1) {
                pool.push(Candidate {
                    source: Source::Rewrite,
                    tokens: ids.clone(),
                    text: text.clone(),
                    scores: scores.clone(),
                    reward: None,
                });
            }
        }
        for tokens in &rollouts.tokens[i * k..(i + 1) * k] {
            pool.push(Candidate {
                source: Source::Rollout,
                text: tokenizer.decode(tokens),
                tokens: tokens.clone(),
                scores: ScoreMap::new(),
                reward: None,
            });
        }
        pools.push(pool);
    }
    pools
}

/// One reward per candidate from the reward plugin, which sees whole pools; a failed or
/// non-finite reward leaves the candidate unrewarded.
pub fn reward(reward: &dyn RewardFn, pools: &mut [Pool]) {
    let input: Vec<Vec<CandidateScores>> = pools
        .iter()
        .map(|pool| {
            pool.iter()
                .map(|c| CandidateScores {
                    source: c.source,
                    scores: c.scores.clone(),
                })
                .collect()
        })
        .collect();
    for (pool, rewards) in pools.iter_mut().zip(reward.rewards(&input)) {
        for (c, r) in pool.iter_mut().zip(rewards) {
            c.reward = r.ok().filter(|x| x.is_finite());
        }
    }
}
