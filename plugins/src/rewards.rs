//! Reward functions: how judgments on several criteria become one reward per candidate.

use serde::Deserialize;
use sipt_api::{CandidateScores, Failure, FromConfig, PluginContext, RewardFn};
use std::collections::BTreeMap;

/// The paper's combination: criteria added, optionally weighted.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WeightedSumConfig {
    /// Weight per criterion; criteria not listed weigh 1. Empty = every criterion, weight 1.
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    /// Criteria whose judgment may fail without failing the reward (they then count 0).
    #[serde(default)]
    pub optional: Vec<String>,
}

pub struct WeightedSum(WeightedSumConfig);

impl FromConfig for WeightedSum {
    type Config = WeightedSumConfig;
    fn from_config(config: WeightedSumConfig, _: &PluginContext) -> Result<Self, String> {
        if let Some((k, w)) = config.weights.iter().find(|(_, w)| !w.is_finite()) {
            return Err(format!("weight of '{k}' must be a finite number, got {w}"));
        }
        Ok(WeightedSum(config))
    }
}

impl WeightedSum {
    fn one(&self, c: &CandidateScores) -> Result<f64, Failure> {
        let mut total = 0.0;
        for (criterion, score) in &c.scores {
            let weight = self.0.weights.get(criterion).copied().unwrap_or(1.0);
            match score {
                Some(s) => total += weight * s,
                None if self.0.optional.contains(criterion) => {}
                None => return Err(Failure::new(format!("no '{criterion}' judgment"))),
            }
        }
        Ok(total)
    }
}

impl RewardFn for WeightedSum {
    fn rewards(&self, pools: &[Vec<CandidateScores>]) -> Vec<Vec<Result<f64, Failure>>> {
        pools
            .iter()
            .map(|pool| pool.iter().map(|c| self.one(c)).collect())
            .collect()
    }
}

sipt_api::register_plugin!(
    Reward,
    "weighted-sum",
    WeightedSum,
    "sum of criteria scores, each with a weight (the paper adds quality, safety, factuality)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use sipt_api::Source;

    fn candidate(scores: &[(&str, Option<f64>)]) -> CandidateScores {
        CandidateScores {
            source: Source::Rollout,
            scores: scores.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn weights_and_failures() {
        let config = WeightedSumConfig {
            weights: [("safety".to_string(), 2.0)].into(),
            optional: vec!["factuality".into()],
        };
        let r = WeightedSum::from_config(config, &PluginContext::default()).unwrap();
        let out = r.rewards(&[vec![
            candidate(&[("safety", Some(1.0)), ("quality", Some(0.5))]),
            candidate(&[("safety", None), ("quality", Some(0.5))]),
            candidate(&[("factuality", None), ("quality", Some(0.25))]),
        ]]);
        assert_eq!(out[0][0], Ok(2.5));
        assert!(out[0][1].is_err());
        assert_eq!(out[0][2], Ok(0.25));
    }
}

/// A gate, then a sum: candidates failing a criterion's threshold (e.g. safety < 1) get
/// `gated_reward`; the others the weighted sum of the remaining criteria.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedConfig {
    /// The criterion that must pass.
    pub gate: String,
    #[serde(default = "one")]
    pub threshold: f64,
    #[serde(default)]
    pub gated_reward: f64,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
}

fn one() -> f64 {
    1.0
}

pub struct Gated {
    config: GatedConfig,
    sum: WeightedSum,
}

impl FromConfig for Gated {
    type Config = GatedConfig;
    fn from_config(config: GatedConfig, context: &PluginContext) -> Result<Self, String> {
        let sum = WeightedSum::from_config(
            WeightedSumConfig {
                weights: config.weights.clone(),
                optional: Vec::new(),
            },
            context,
        )?;
        Ok(Gated { config, sum })
    }
}

impl RewardFn for Gated {
    fn rewards(&self, pools: &[Vec<CandidateScores>]) -> Vec<Vec<Result<f64, Failure>>> {
        pools
            .iter()
            .map(|pool| {
                pool.iter()
                    .map(|c| match c.scores.get(&self.config.gate) {
                        None => Err(Failure::new(format!(
                            "no judge scores the gate criterion '{}'",
                            self.config.gate
                        ))),
                        Some(None) => {
                            Err(Failure::new(format!("no '{}' judgment", self.config.gate)))
                        }
                        Some(Some(g)) if *g < self.config.threshold => Ok(self.config.gated_reward),
                        Some(Some(_)) => {
                            let mut rest = c.clone();
                            rest.scores.remove(&self.config.gate);
                            self.sum.one(&rest)
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    Reward,
    "gated",
    Gated,
    "a criterion must pass (e.g. safety) before the others count; failing candidates get a fixed reward"
);

#[cfg(test)]
mod gated_tests {
    use super::*;
    use sipt_api::Source;

    #[test]
    fn gate_then_sum() {
        let g = Gated::from_config(
            GatedConfig {
                gate: "safety".into(),
                threshold: 1.0,
                gated_reward: -1.0,
                weights: BTreeMap::new(),
            },
            &PluginContext::default(),
        )
        .unwrap();
        let c = |s: f64, q: f64| CandidateScores {
            source: Source::Rollout,
            scores: [
                ("safety".to_string(), Some(s)),
                ("quality".to_string(), Some(q)),
            ]
            .into(),
        };
        let out = g.rewards(&[vec![c(1.0, 0.7), c(0.0, 0.9)]]);
        assert_eq!(out[0][0], Ok(0.7));
        assert_eq!(out[0][1], Ok(-1.0));
    }
}
