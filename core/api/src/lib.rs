//! The sipt plugin API.
//!
//! sipt's training engine calls out to plugins at its extension points: pointwise judges,
//! pairwise judges, rewriters, reward functions and curricula. A plugin is an ordinary Rust type
//! that implements one of the traits below and [`FromConfig`]. One line registers it:
//!
//! - built into the `sipt` binary: [`register_plugin!`] (collected with `inventory`);
//! - as an external shared library: [`export_plugins!`] in a `cdylib` crate, loaded at run time
//!   through a versioned C ABI ([`abi`]).
//!
//! Both are written the same way, and this crate does not depend on libtorch, so a plugin builds
//! in seconds. Every method takes a batch: plugins that call remote servers need the whole batch
//! to run it concurrently.

pub mod abi;
pub mod introspect;
mod types;

pub use types::*;

// Re-exported for the macros, so plugin crates need no direct dependency on them.
#[doc(hidden)]
pub use inventory;
#[doc(hidden)]
pub use serde_json;

use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// Result of one pointwise judgment.
pub type Verdict = Result<Scores, Failure>;

/// Cumulative counters a plugin reports (calls, failures, cache hits, seconds, ...).
pub type Counters = BTreeMap<String, f64>;

/// Scores each candidate on its own, optionally against the reference suffix.
pub trait PointwiseJudge: Send + Sync {
    /// The criteria this judge scores (keys of the returned [`Scores`]).
    fn criteria(&self) -> Vec<String>;
    /// One verdict per item, in order.
    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict>;
    /// Cumulative counters since the plugin was built.
    fn counters(&self) -> Counters {
        Counters::new()
    }
}

/// Compares two candidates. A tournament in the engine turns comparisons into scores.
pub trait PairwiseJudge: Send + Sync {
    /// The criterion the comparison decides (e.g. "quality").
    fn criterion(&self) -> String;
    /// One preference per item, in order.
    fn compare(&self, items: &[PairwiseItem]) -> Vec<Result<Preference, Failure>>;
    fn counters(&self) -> Counters {
        Counters::new()
    }
}

/// Rewrites original suffixes into better ones. A failed rewrite drops that candidate.
pub trait Rewriter: Send + Sync {
    fn rewrite(&self, items: &[RewriteItem]) -> Vec<Result<String, Failure>>;
    fn counters(&self) -> Counters {
        Counters::new()
    }
}

/// Turns each candidate's judgments into one scalar reward. Called with whole candidate pools
/// (one pool per prefix), so a reward may normalise within a pool.
pub trait RewardFn: Send + Sync {
    /// For each pool, one reward per candidate (a failure leaves the candidate out).
    fn rewards(&self, pools: &[Vec<CandidateScores>]) -> Vec<Vec<Result<f64, Failure>>>;
}

/// Decides what each step does, from the training progress and the experiment's base plan.
pub trait Curriculum: Send + Sync {
    fn plan(&self, progress: &Progress, base: &StepPlan) -> StepPlan;
}

/// How a plugin is built from its table in the experiment file. `Config` should use
/// `#[serde(deny_unknown_fields)]` and defaults, so that a misspelt key is an error.
pub trait FromConfig: Sized {
    type Config: DeserializeOwned;
    fn from_config(config: Self::Config, context: &PluginContext) -> Result<Self, String>;
}

/// The kinds of extension point.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    PointwiseJudge,
    PairwiseJudge,
    Rewriter,
    Reward,
    Curriculum,
    /// Training objectives need tensors, so they are built into the engine (not in this crate).
    Objective,
}

impl PluginKind {
    pub const ALL: [PluginKind; 6] = [
        PluginKind::PointwiseJudge,
        PluginKind::PairwiseJudge,
        PluginKind::Rewriter,
        PluginKind::Reward,
        PluginKind::Curriculum,
        PluginKind::Objective,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::PointwiseJudge => "pointwise-judge",
            PluginKind::PairwiseJudge => "pairwise-judge",
            PluginKind::Rewriter => "rewriter",
            PluginKind::Reward => "reward",
            PluginKind::Curriculum => "curriculum",
            PluginKind::Objective => "objective",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A built plugin.
pub enum Instance {
    PointwiseJudge(Box<dyn PointwiseJudge>),
    PairwiseJudge(Box<dyn PairwiseJudge>),
    Rewriter(Box<dyn Rewriter>),
    Reward(Box<dyn RewardFn>),
    Curriculum(Box<dyn Curriculum>),
}

impl Instance {
    pub fn kind(&self) -> PluginKind {
        match self {
            Instance::PointwiseJudge(_) => PluginKind::PointwiseJudge,
            Instance::PairwiseJudge(_) => PluginKind::PairwiseJudge,
            Instance::Rewriter(_) => PluginKind::Rewriter,
            Instance::Reward(_) => PluginKind::Reward,
            Instance::Curriculum(_) => PluginKind::Curriculum,
        }
    }
}

/// A problem in a plugin's configuration table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConfigProblem {
    /// Key path inside the plugin's table (empty for the table itself).
    pub path: Vec<String>,
    pub message: String,
}

/// Check a plugin table against `C`, reporting the key path of the first problem.
pub fn check_config<C: DeserializeOwned>(table: &serde_json::Value) -> Result<C, ConfigProblem> {
    serde_path_to_error::deserialize::<_, C>(table).map_err(|e| {
        let path = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        ConfigProblem {
            path,
            message: e.into_inner().to_string(),
        }
    })
}

/// One registered plugin: its kind, name, summary, and how to check and build it.
pub struct Registration {
    pub kind: PluginKind,
    pub name: &'static str,
    pub summary: &'static str,
    /// Where the registration was written (`file:line`), to name both sides of a duplicate.
    pub defined_at: &'static str,
    /// Keys its table accepts (besides `type`), for suggestions.
    pub fields: fn() -> Vec<&'static str>,
    pub check: fn(&serde_json::Value) -> Result<(), ConfigProblem>,
    pub build: fn(serde_json::Value, &PluginContext) -> Result<Instance, String>,
}

inventory::collect!(Registration);

/// All registrations linked into this binary (or this shared library).
pub fn registrations() -> impl Iterator<Item = &'static Registration> {
    inventory::iter::<Registration>.into_iter()
}

/// Build a [`Registration`] for a type. Used by the macros; rarely called directly.
#[macro_export]
#[doc(hidden)]
macro_rules! __registration {
    ($kind:ident, $name:expr, $ty:ty, $summary:expr) => {
        $crate::Registration {
            kind: $crate::PluginKind::$kind,
            name: $name,
            summary: $summary,
            defined_at: concat!(file!(), ":", line!()),
            fields: $crate::introspect::field_names::<<$ty as $crate::FromConfig>::Config>,
            check: |table| {
                $crate::check_config::<<$ty as $crate::FromConfig>::Config>(table).map(|_| ())
            },
            build: |table, context| {
                let config = $crate::check_config::<<$ty as $crate::FromConfig>::Config>(&table)
                    .map_err(|p| {
                        if p.path.is_empty() {
                            p.message
                        } else {
                            format!("{}: {}", p.path.join("."), p.message)
                        }
                    })?;
                let plugin = <$ty as $crate::FromConfig>::from_config(config, context)?;
                Ok($crate::Instance::$kind(Box::new(plugin)))
            },
        }
    };
}

/// Register a built-in plugin next to its definition.
///
/// ```ignore
/// sipt_api::register_plugin!(PointwiseJudge, "length", LengthJudge, "scores short suffixes higher");
/// ```
/// The kind is one of `PointwiseJudge`, `PairwiseJudge`, `Rewriter`, `Reward`, `Curriculum`.
#[macro_export]
macro_rules! register_plugin {
    ($kind:ident, $name:expr, $ty:ty, $summary:expr) => {
        $crate::inventory::submit! { $crate::__registration!($kind, $name, $ty, $summary) }
    };
}
