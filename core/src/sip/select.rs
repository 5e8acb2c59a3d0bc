//! Selection: the objective picks what to learn from in each rewarded pool — a DPO pair, an
//! NLL target, or nothing (ties and failed rewards are the objective's to handle).

use super::batch::Batch;
use super::pool::Pool;
use crate::objective::{Judged, Objective, Target};
use sipt_api::Source;
use std::collections::BTreeMap;

/// A DPO pair: raise `chosen` over `rejected` after `prefix`.
pub struct Pair<'a> {
    pub prefix: &'a [u32],
    pub chosen: &'a [u32],
    pub rejected: &'a [u32],
}

/// An NLL target: the likelihood of `continuation` after `prefix`.
pub struct Nll<'a> {
    pub prefix: &'a [u32],
    pub continuation: &'a [u32],
}

/// What one step learns from, in pool order.
pub struct Selection<'a> {
    /// Per pool, the objective's targets (indices into the pool).
    pub targets: Vec<Vec<Target>>,
    pub pairs: Vec<Pair<'a>>,
    pub nll: Vec<Nll<'a>>,
    /// How often each source was chosen (a pair's chosen member or an NLL target).
    pub chosen: BTreeMap<Source, f64>,
    /// Pools that gave at least one target.
    pub selected_pools: usize,
}

impl<'a> Selection<'a> {
    pub fn new(objective: &dyn Objective, batch: &'a Batch, pools: &'a [Pool]) -> Selection<'a> {
        let targets: Vec<Vec<Target>> = pools
            .iter()
            .map(|pool| {
                let judged: Vec<Judged> = pool
                    .iter()
                    .map(|c| Judged {
                        source: c.source,
                        reward: c.reward,
                    })
                    .collect();
                objective.select(&judged)
            })
            .collect();
        let mut selection = Selection {
            targets: Vec::new(),
            pairs: Vec::new(),
            nll: Vec::new(),
            chosen: BTreeMap::new(),
            selected_pools: targets.iter().filter(|t| !t.is_empty()).count(),
        };
        for (p, ts) in targets.iter().enumerate() {
            let prefix = batch.cuts[p].prefix.as_slice();
            for target in ts {
                let chosen = match *target {
                    Target::Pair { chosen, rejected } => {
                        selection.pairs.push(Pair {
                            prefix,
                            chosen: &pools[p][chosen].tokens,
                            rejected: &pools[p][rejected].tokens,
                        });
                        chosen
                    }
                    Target::Nll { index } => {
                        selection.nll.push(Nll {
                            prefix,
                            continuation: &pools[p][index].tokens,
                        });
                        index
                    }
                };
                *selection.chosen.entry(pools[p][chosen].source).or_default() += 1.0;
            }
        }
        selection.targets = targets;
        selection
    }

    /// Continuation tokens the update trains on (both members of each pair).
    pub fn tokens(&self) -> u64 {
        let pairs: usize = self
            .pairs
            .iter()
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum();
        let nll: usize = self.nll.iter().map(|n| n.continuation.len()).sum();
        (pairs + nll) as u64
    }
}
