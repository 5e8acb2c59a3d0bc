//! Plain data that crosses the plugin boundary: requests, outcomes, progress and step plans.
//!
//! Everything here is `serde`-serializable because external plugins receive it as JSON over the
//! C ABI; built-in plugins receive the same values directly.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a candidate continuation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The document's own next tokens.
    Original,
    /// The rewriter's improved version of the original suffix.
    Rewrite,
    /// A sample from the policy being trained.
    Rollout,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Original, Source::Rewrite, Source::Rollout];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Original => "original",
            Source::Rewrite => "rewrite",
            Source::Rollout => "rollout",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A judgment or rewrite that could not be made. It is an outcome of its own: counted, logged,
/// and the candidate is left out of selection. It is never read as a score of 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: String,
}

impl Failure {
    pub fn new(reason: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Scores by criterion name, e.g. `{"safety": 1.0}`.
pub type Scores = BTreeMap<String, f64>;

/// One pointwise judgment to make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointwiseItem {
    pub prefix: String,
    pub candidate: String,
    /// The original (human) suffix, for judges that compare against a reference.
    pub reference: Option<String>,
}

/// One pairwise comparison to make: which continuation of `prefix` is better?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairwiseItem {
    pub prefix: String,
    pub first: String,
    pub second: String,
    pub reference: Option<String>,
}

/// The outcome of a pairwise comparison: the probability that `first` is the better one
/// (1.0 = first wins, 0.0 = second wins, fractions when several samples are averaged).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    pub first_wins: f64,
}

/// One suffix to rewrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewriteItem {
    pub prefix: String,
    pub suffix: String,
}

/// What the judges said of one candidate, as a reward function sees it. A criterion whose
/// judgment failed is present with `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScores {
    pub source: Source,
    pub scores: BTreeMap<String, Option<f64>>,
}

/// Training progress, as a curriculum sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub tokens: u64,
    /// Recent rate at which each source was chosen as the best candidate (moving average).
    pub chosen_rate: BTreeMap<Source, f64>,
    /// Recent mean reward of each source.
    pub mean_reward: BTreeMap<Source, f64>,
}

/// What one step does: which candidate sources it builds and how it weighs its losses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    pub original: bool,
    pub rewrite: bool,
    pub rollouts: u32,
    pub temperature: f64,
    pub top_p: f64,
    /// Weight of the self-improving objective (DPO / RF-NLL / SFT).
    pub sip_weight: f64,
    /// Weight of a plain next-token loss on the documents, mixed in.
    pub ntp_weight: f64,
}

impl Default for StepPlan {
    fn default() -> Self {
        StepPlan {
            original: true,
            rewrite: false,
            rollouts: 4,
            temperature: 1.0,
            top_p: 1.0,
            sip_weight: 1.0,
            ntp_weight: 0.0,
        }
    }
}

/// Facts about the run that a plugin may need when it is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PluginContext {
    /// The experiment's seed; plugins that sample derive their streams from it.
    pub seed: u64,
    /// Folder holding downloaded assets (word lists, corpora), if known.
    pub assets_dir: Option<String>,
    /// Folder of the experiment file, for resolving relative paths in plugin tables.
    pub config_dir: Option<String>,
    /// Folder for persistent caches shared across runs.
    pub cache_dir: Option<String>,
    /// Ranks of the job, each building its own instance of every plugin (1, or 0 from an older
    /// caller, when the run is one process). A plugin that limits its load on a server (requests
    /// in flight, requests per minute) divides the limits by it, so that they hold for the job.
    #[serde(default)]
    pub ranks: u32,
}

impl PluginContext {
    /// Resolve a path from a plugin table: absolute paths stay, relative ones are taken from
    /// the experiment file's folder.
    pub fn resolve(&self, path: &str) -> std::path::PathBuf {
        let p = std::path::Path::new(path);
        match (&self.config_dir, p.is_absolute()) {
            (Some(dir), false) => std::path::Path::new(dir).join(p),
            _ => p.to_path_buf(),
        }
    }
}
