//! The batch: the policy-independent half of a step. Cut documents into prefixes and their
//! original suffixes, rewrite the suffixes, and judge the originals and rewrites. Nothing here
//! reads the policy, so with `sip.overlap` step t+1's batch is made on a second thread while
//! step t samples and trains — and the results are the same as without overlap.

use super::STREAM_CUTS;
use crate::data::{Cut, Cutter};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use sipt_api::{PointwiseItem, RewriteItem};
use sipt_experiment::plugins::{judge_pointwise, JudgeStats, Plugins, ScoreMap};
use sipt_experiment::rng::SplitMix;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

/// A rewrite's text and tokens.
pub type Rewritten = (String, Vec<u32>);

/// One step's prefixes with their originals and rewrites, judged: the whole batch, or in a job
/// of several ranks one rank's share of it.
pub struct Batch {
    /// The index in the whole batch of the first prefix here.
    pub first: usize,
    pub cuts: Vec<Cut>,
    /// The prefixes and original suffixes as text.
    pub prefixes: Vec<String>,
    pub suffixes: Vec<String>,
    /// Per prefix: the rewrite's text and tokens, or `None` (no rewriter, or it failed).
    pub rewrites: Vec<Option<Rewritten>>,
    pub rewrite_failures: usize,
    /// Pointwise scores of (original, rewrite) per prefix.
    pub scores: Vec<(ScoreMap, Option<ScoreMap>)>,
    pub judge_stats: JudgeStats,
    pub seconds_rewrite: f64,
    pub seconds_judge: f64,
}

impl Batch {
    /// The prefixes' tokens, one vector each (what sampling takes).
    pub fn prefix_tokens(&self) -> Vec<Vec<u32>> {
        self.cuts.iter().map(|c| c.prefix.clone()).collect()
    }

    /// A batch of bare prefixes (no suffixes, rewrites or judgments), for benchmarks.
    pub fn of_prefixes(prefixes: Vec<Vec<u32>>) -> Batch {
        let n = prefixes.len();
        Batch {
            first: 0,
            cuts: prefixes
                .into_iter()
                .map(|prefix| Cut {
                    prefix,
                    suffix: Vec::new(),
                })
                .collect(),
            prefixes: vec![String::new(); n],
            suffixes: vec![String::new(); n],
            rewrites: vec![None; n],
            rewrite_failures: 0,
            scores: vec![(ScoreMap::new(), None); n],
            judge_stats: JudgeStats::new(),
            seconds_rewrite: 0.0,
            seconds_judge: 0.0,
        }
    }
}

/// What making a batch needs; shared by reference with the prefetch thread.
pub struct BatchMaker<'a> {
    pub tokens: &'a crate::data::Tokens,
    pub cutter: &'a Cutter,
    pub tokenizer: &'a Tokenizer,
    pub plugins: &'a Plugins,
    pub batch_size: usize,
    pub suffix_tokens: usize,
    pub seed: u64,
    /// Whether pools hold rewrites and originals at all (the experiment's base plan).
    pub rewrite: bool,
    pub original: bool,
    /// The prefixes of each step's batch this process makes (all of them alone; a rank's
    /// share in a job of several).
    pub share: std::ops::Range<usize>,
}

impl BatchMaker<'_> {
    /// Step `step`'s batch (this process's share of it): a pure function of the seed, the step
    /// and the share.
    pub fn make(&self, step: u64) -> Batch {
        let mut cuts = self.cut(step);
        cuts.truncate(self.share.end);
        let cuts = cuts.split_off(self.share.start.min(cuts.len()));
        let prefixes: Vec<String> = cuts
            .iter()
            .map(|c| self.tokenizer.decode(&c.prefix))
            .collect();
        let suffixes: Vec<String> = cuts
            .iter()
            .map(|c| self.tokenizer.decode(&c.suffix))
            .collect();
        let started = Instant::now();
        let (rewrites, rewrite_failures) = self.rewrite(&prefixes, &suffixes);
        let seconds_rewrite = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (scores, judge_stats) = self.judge(&prefixes, &suffixes, &rewrites);
        Batch {
            first: self.share.start,
            cuts,
            prefixes,
            suffixes,
            rewrites,
            rewrite_failures,
            scores,
            judge_stats,
            seconds_rewrite,
            seconds_judge: started.elapsed().as_secs_f64(),
        }
    }

    fn cut(&self, step: u64) -> Vec<Cut> {
        let mut rng = SplitMix::derive(self.seed, STREAM_CUTS, step);
        (0..self.batch_size)
            .map(|_| self.cutter.cut(self.tokens, &mut rng))
            .collect()
    }

    /// Rewrites cut to the original suffix's token budget (the paper keeps N tokens); a failed
    /// or empty rewrite is no rewrite (counted).
    fn rewrite(&self, prefixes: &[String], suffixes: &[String]) -> (Vec<Option<Rewritten>>, usize) {
        let Some(rewriter) = self.plugins.rewriter.as_ref().filter(|_| self.rewrite) else {
            return (vec![None; prefixes.len()], 0);
        };
        let items: Vec<RewriteItem> = prefixes
            .iter()
            .zip(suffixes)
            .map(|(p, s)| RewriteItem {
                prefix: p.clone(),
                suffix: s.clone(),
            })
            .collect();
        let mut failures = 0;
        let rewrites = rewriter
            .rewrite(&items)
            .into_iter()
            .map(|out| {
                let mut ids = out
                    .ok()
                    .map(|text| self.tokenizer.encode(&text).unwrap_or_default())
                    .unwrap_or_default();
                ids.truncate(self.suffix_tokens);
                if ids.is_empty() {
                    failures += 1;
                    None
                } else {
                    Some((self.tokenizer.decode(&ids), ids))
                }
            })
            .collect();
        (rewrites, failures)
    }

    /// Pointwise judgments of the originals (when pools hold them) and the rewrites, each
    /// against the original suffix as reference.
    fn judge(
        &self,
        prefixes: &[String],
        suffixes: &[String],
        rewrites: &[Option<Rewritten>],
    ) -> (Vec<(ScoreMap, Option<ScoreMap>)>, JudgeStats) {
        let mut items = Vec::new();
        for (i, (p, s)) in prefixes.iter().zip(suffixes).enumerate() {
            let item = |candidate: &str| PointwiseItem {
                prefix: p.clone(),
                candidate: candidate.to_string(),
                reference: Some(s.clone()),
            };
            if self.original {
                items.push(item(s));
            }
            if let Some((text, _)) = &rewrites[i] {
                items.push(item(text));
            }
        }
        let (judged, stats) = judge_pointwise(&self.plugins.pointwise, &items);
        let mut judged = judged.into_iter();
        let scores = rewrites
            .iter()
            .map(|r| {
                let original = if self.original {
                    judged.next().unwrap_or_default()
                } else {
                    ScoreMap::new()
                };
                (
                    original,
                    r.as_ref().map(|_| judged.next().unwrap_or_default()),
                )
            })
            .collect();
        (scores, stats)
    }
}

/// Makes each step's batch, one step ahead on a second thread when overlapping.
pub struct Prefetch<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    maker: &'env BatchMaker<'env>,
    overlap: bool,
    steps: u64,
    next: Option<ScopedJoinHandle<'scope, Batch>>,
}

impl<'scope, 'env> Prefetch<'scope, 'env> {
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        maker: &'env BatchMaker<'env>,
        overlap: bool,
        steps: u64,
    ) -> Self {
        Prefetch {
            scope,
            maker,
            overlap,
            steps,
            next: None,
        }
    }

    /// Step `step`'s batch (made now, or taken from the thread that made it), and with
    /// overlap the start of step `step + 1`'s.
    pub fn take(&mut self, step: u64) -> Result<Batch> {
        let batch = match self.next.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow!("the rewrite/judge thread panicked"))?,
            None => self.maker.make(step),
        };
        if self.overlap && step + 1 < self.steps {
            let maker = self.maker;
            self.next = Some(self.scope.spawn(move || maker.make(step + 1)));
        }
        Ok(batch)
    }

    /// Wait for a batch still being made (the loop ended early with an error).
    pub fn finish(&mut self) {
        if let Some(handle) = self.next.take() {
            let _ = handle.join();
        }
    }
}
