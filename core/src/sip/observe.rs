//! Observing a step: per source, the mean and spread of rewards and how often it was chosen.
//! The curriculum plans from moving averages of these (kept in checkpoints), and the metrics
//! log them; computing them here keeps training independent of what is logged.

use super::pool::Pool;
use super::select::Selection;
use serde::{Deserialize, Serialize};
use sipt_api::{Progress, Source};
use std::collections::BTreeMap;

/// Per source: reward (mean, standard deviation) and chosen rate, for sources present.
pub struct SourceStats {
    pub reward: BTreeMap<Source, (f64, f64)>,
    /// Chosen targets from a source per selected pool (when any pool was selected).
    pub chosen_rate: BTreeMap<Source, f64>,
}

impl SourceStats {
    pub fn new(pools: &[Pool], selection: &Selection) -> SourceStats {
        let mut reward = BTreeMap::new();
        let mut chosen_rate = BTreeMap::new();
        for source in Source::ALL {
            let rewards: Vec<f64> = pools
                .iter()
                .flatten()
                .filter(|c| c.source == source)
                .filter_map(|c| c.reward)
                .collect();
            if !rewards.is_empty() {
                reward.insert(source, mean_std(&rewards));
            }
            let present = pools.iter().any(|p| p.iter().any(|c| c.source == source));
            if selection.selected_pools > 0 && present {
                let chosen = selection.chosen.get(&source).copied().unwrap_or(0.0);
                chosen_rate.insert(source, chosen / selection.selected_pools as f64);
            }
        }
        SourceStats {
            reward,
            chosen_rate,
        }
    }
}

/// Mean and (population) standard deviation of a non-empty list.
pub(super) fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Moving averages the curriculum sees, kept in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Averages {
    chosen_rate: BTreeMap<Source, f64>,
    mean_reward: BTreeMap<Source, f64>,
}

impl Averages {
    /// Fold in one step (an exponential moving average with weight 0.1 on the new step).
    pub fn observe(&mut self, stats: &SourceStats) {
        for (&source, &(mean, _)) in &stats.reward {
            ema(&mut self.mean_reward, source, mean);
        }
        for (&source, &rate) in &stats.chosen_rate {
            ema(&mut self.chosen_rate, source, rate);
        }
    }

    /// What the curriculum plans step `step` from.
    pub fn progress(&self, step: u64, total_steps: u64, tokens: u64) -> Progress {
        Progress {
            step,
            total_steps,
            tokens,
            chosen_rate: self.chosen_rate.clone(),
            mean_reward: self.mean_reward.clone(),
        }
    }
}

fn ema(map: &mut BTreeMap<Source, f64>, source: Source, value: f64) {
    let e = map.entry(source).or_insert(value);
    *e = 0.9 * *e + 0.1 * value;
}
