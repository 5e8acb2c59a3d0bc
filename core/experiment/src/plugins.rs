//! The plugins of one experiment, built once from its tables and handed to whatever needs
//! them: the SIP loop, the NTP loop (whose evaluation uses the same judges) and `sipt eval`.

use crate::config::{Experiment, PluginTable};
use crate::registry::Registry;
use anyhow::{anyhow, Context, Result};
use sipt_api::{
    Curriculum, Instance, PairwiseJudge, PluginContext, PluginKind, PointwiseItem, PointwiseJudge,
    RewardFn, Rewriter,
};
use std::collections::BTreeMap;

/// Criterion → score (`None`: that judgment failed).
pub type ScoreMap = BTreeMap<String, Option<f64>>;

/// Per judge name: (calls, failures).
pub type JudgeStats = BTreeMap<String, (usize, usize)>;

/// An experiment's judges (by their name in `[judges]`), rewriter, reward and curriculum.
pub struct Plugins {
    pub pointwise: Vec<(String, Box<dyn PointwiseJudge>)>,
    pub pairwise: Vec<(String, Box<dyn PairwiseJudge>)>,
    pub rewriter: Option<Box<dyn Rewriter>>,
    pub reward: Box<dyn RewardFn>,
    pub curriculum: Box<dyn Curriculum>,
}

fn build(
    registry: &Registry,
    kind: PluginKind,
    table: &PluginTable,
    ctx: &PluginContext,
) -> Result<Instance> {
    let entry = registry
        .find(kind, &table.name)
        .ok_or_else(|| anyhow!("unknown {kind} '{}'", table.name))?;
    registry
        .build(entry, table.options_value(), ctx)
        .map_err(|e| anyhow!(e))
}

impl Plugins {
    /// Build every plugin table of `e` (a missing `[reward]` is `weighted-sum`, a missing
    /// `[curriculum]` is `constant`).
    pub fn build(e: &Experiment, registry: &Registry, ctx: &PluginContext) -> Result<Plugins> {
        let mut pointwise = Vec::new();
        let mut pairwise = Vec::new();
        for (name, table) in &e.judges {
            let entry = registry
                .find_judge(&table.name)
                .ok_or_else(|| anyhow!("judges.{name}: unknown judge '{}'", table.name))?;
            let built = registry
                .build(entry, table.options_value(), ctx)
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("judges.{name}"))?;
            match built {
                Instance::PointwiseJudge(j) => pointwise.push((name.clone(), j)),
                Instance::PairwiseJudge(j) => pairwise.push((name.clone(), j)),
                other => return Err(anyhow!("judges.{name}: a {} is not a judge", other.kind())),
            }
        }
        let rewriter = match &e.rewriter {
            Some(t) => match build(registry, PluginKind::Rewriter, t, ctx).context("rewriter")? {
                Instance::Rewriter(r) => Some(r),
                _ => return Err(anyhow!("rewriter: not a rewriter")),
            },
            None => None,
        };
        let default_reward = PluginTable::named("weighted-sum");
        let reward_table = e.reward.as_ref().unwrap_or(&default_reward);
        let reward =
            match build(registry, PluginKind::Reward, reward_table, ctx).context("reward")? {
                Instance::Reward(r) => r,
                _ => return Err(anyhow!("reward: not a reward function")),
            };
        let default_curriculum = PluginTable::named("constant");
        let curriculum_table = e.curriculum.as_ref().unwrap_or(&default_curriculum);
        let curriculum = match build(registry, PluginKind::Curriculum, curriculum_table, ctx)
            .context("curriculum")?
        {
            Instance::Curriculum(c) => c,
            _ => return Err(anyhow!("curriculum: not a curriculum")),
        };
        Ok(Plugins {
            pointwise,
            pairwise,
            rewriter,
            reward,
            curriculum,
        })
    }

    /// The pairwise judge named `name` in `[judges]`.
    pub fn pairwise_judge(&self, name: &str) -> Option<&dyn PairwiseJudge> {
        self.pairwise
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, j)| j.as_ref())
    }

    /// The plugins' own counters (cache hits, retries, order agreement, ...), cumulative since
    /// the run started, keyed as they are logged: `judge/<name>/total/<counter>` and
    /// `rewriter/total/<counter>`.
    pub fn counters(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let judges = self
            .pointwise
            .iter()
            .map(|(n, j)| (n.as_str(), j.counters()))
            .chain(
                self.pairwise
                    .iter()
                    .map(|(n, j)| (n.as_str(), j.counters())),
            );
        for (name, counters) in judges {
            for (k, v) in counters {
                out.push((format!("judge/{name}/total/{k}"), v));
            }
        }
        if let Some(r) = &self.rewriter {
            for (k, v) in r.counters() {
                out.push((format!("rewriter/total/{k}"), v));
            }
        }
        out
    }
}

/// Run every pointwise judge over `items`; per item, the scores of all criteria, and per judge
/// (calls, failures).
pub fn judge_pointwise(
    judges: &[(String, Box<dyn PointwiseJudge>)],
    items: &[PointwiseItem],
) -> (Vec<ScoreMap>, JudgeStats) {
    let mut scores = vec![ScoreMap::new(); items.len()];
    let mut stats = BTreeMap::new();
    if items.is_empty() {
        return (scores, stats);
    }
    for (name, judge) in judges {
        let criteria = judge.criteria();
        let verdicts = judge.judge(items);
        let mut failures = 0;
        for (i, scores) in scores.iter_mut().enumerate() {
            match verdicts.get(i) {
                Some(Ok(s)) => {
                    for c in &criteria {
                        scores.insert(c.clone(), s.get(c).copied());
                    }
                }
                _ => {
                    failures += 1;
                    for c in &criteria {
                        scores.insert(c.clone(), None);
                    }
                }
            }
        }
        stats.insert(name.clone(), (items.len(), failures));
    }
    (scores, stats)
}
