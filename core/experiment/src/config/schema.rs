//! The experiment file's typed schema: one struct per section, every field with a default, and
//! unknown keys rejected, so that a misspelt key is an error rather than silently ignored.

pub use crate::tournament::Design as Tournament;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Declares a closed set of names an experiment file may choose from: a serde enum (so a bad
/// name is reported with the valid ones and the nearest, like any schema problem) that also
/// parses from and prints as its name.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every valid name, in order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "'{text}': expected one of: {}{}",
                        Self::NAMES.join(", "),
                        crate::suggest::hint(text, Self::NAMES.iter().copied())
                    )),
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}
pub(crate) use choice;

choice! {
    /// The type weights are computed in.
    Dtype {
        /// 32-bit floats.
        F32 = "f32",
        /// bfloat16.
        Bf16 = "bf16",
    }
}

choice! {
    /// Where a sweep's trials run.
    ExecutorKind {
        /// Child processes on this machine.
        Local = "local",
        /// One Slurm job array.
        Slurm = "slurm",
    }
}

choice! {
    /// What a health monitor does when its threshold is crossed.
    HealthAction {
        /// Log one warning (and keep the alarm in the metrics).
        Warn = "warn",
        /// Warn, write a checkpoint and stop the run (resumable with `--resume`).
        Stop = "stop",
    }
}

choice! {
    /// Whether and how a run is tracked in Weights & Biases.
    WandbMode {
        Off = "off",
        /// Write the run file; `wandb sync` later.
        Offline = "offline",
        /// Stream the run file to W&B while training.
        Live = "live",
    }
}

/// A whole experiment file, after layering (see [`super::load`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Experiment {
    /// Base file(s) this one extends, relative to this file. Consumed while loading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<Extends>,
    /// External plugin libraries to load (paths to shared libraries).
    pub plugins: Vec<String>,
    pub experiment: ExperimentSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub sip: SipSection,
    pub train: TrainSection,
    /// Pointwise and pairwise judges by name; the name is how rewards refer to them.
    pub judges: BTreeMap<String, PluginTable>,
    pub rewriter: Option<PluginTable>,
    pub reward: Option<PluginTable>,
    pub curriculum: Option<PluginTable>,
    pub eval: EvalSection,
    pub tracking: TrackingSection,
    /// Judge-health and reward-hacking monitors of SIP runs.
    pub health: HealthSection,
    /// Data-parallel runs over several processes (`sipt run --nproc-per-node`, torchrun, srun).
    pub distributed: DistributedSection,
    pub sweep: Option<SweepSection>,
}

/// `[distributed]`: how ranks of a data-parallel run wait for each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedSection {
    /// The deadline of every collective and of the rendezvous, in seconds: a rank that stops or
    /// stalls makes the others fail within it, naming what happened. It must cover the longest
    /// gap between two collectives (an evaluation, a checkpoint write on rank 0).
    pub timeout_s: f64,
}

impl Default for DistributedSection {
    fn default() -> Self {
        DistributedSection { timeout_s: 600.0 }
    }
}

/// One kind of sequence a run makes; every one must fit the model's positions (rotary tables
/// cover only that many).
pub struct SequenceLength {
    /// The key that sets it, where a problem is reported.
    pub key: &'static str,
    /// How it is made up, for messages.
    pub what: &'static str,
    pub tokens: usize,
}

impl Experiment {
    /// The longest sequences the run makes: next-token windows; prefix + suffix when it learns
    /// from candidates (any objective but `ntp`); prefix + continuation when its periodic
    /// evaluation is judged.
    pub fn sequence_lengths(&self) -> Vec<SequenceLength> {
        let d = &self.data;
        let mut out = vec![SequenceLength {
            key: "data.seq_len",
            what: "data.seq_len",
            tokens: d.seq_len,
        }];
        if self.train.objective.name != "ntp" {
            out.push(SequenceLength {
                key: "data.prefix_max_tokens",
                what: "data.prefix_max_tokens + data.suffix_tokens",
                tokens: d.prefix_max_tokens + d.suffix_tokens,
            });
        }
        if !self.judges.is_empty() && self.train.eval_every > 0 {
            out.push(SequenceLength {
                key: "eval.max_new_tokens",
                what: "data.prefix_max_tokens + eval.max_new_tokens",
                tokens: d.prefix_max_tokens + self.eval.max_new_tokens,
            });
        }
        out
    }
}

/// `extends = "base.toml"` or `extends = ["a.toml", "b.toml"]` (later ones win).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Extends {
    One(String),
    Many(Vec<String>),
}

impl Extends {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            Extends::One(p) => vec![p.as_str()],
            Extends::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentSection {
    /// Names the run directory: `<output_dir>/<name>/<run>`.
    pub name: String,
    pub seed: u64,
    pub output_dir: String,
    /// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Intra-op threads for CPU work; 0 lets libtorch decide.
    pub threads: usize,
}

impl Default for ExperimentSection {
    fn default() -> Self {
        ExperimentSection {
            name: "experiment".into(),
            seed: 0,
            output_dir: "runs".into(),
            device: "auto".into(),
            threads: 0,
        }
    }
}

/// The policy: a pretrained Hugging Face-layout folder, or a from-scratch architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Folder with config.json, model.safetensors and tokenizer.json. Empty = from scratch.
    pub path: String,
    /// tokenizer.json for from-scratch models (a pretrained folder brings its own).
    pub tokenizer: String,
    /// `f32` or `bf16` (bf16 autocast applies on CUDA only).
    pub dtype: Dtype,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate_size: usize,
    pub max_position: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: String::new(),
            tokenizer: String::new(),
            dtype: Dtype::F32,
            vocab_size: 8192,
            hidden_size: 256,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            intermediate_size: 688,
            max_position: 1024,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Files, folders or globs of training documents (text or JSON lines). By default the
    /// real corpora that scripts/fetch-assets.sh downloads (Shakespeare, the Brown corpus).
    pub train: Vec<String>,
    /// Held-out documents; empty = carve `validation_fraction` out of `train`.
    pub validation: Vec<String>,
    pub validation_fraction: f64,
    /// `auto` (by extension), `text`, `jsonl` or `parquet`.
    pub format: String,
    /// The field (JSON Lines) or column (Parquet) holding each document's text.
    #[serde(alias = "jsonl_field")]
    pub text_field: String,
    pub shuffle: bool,
    /// Sequence length for next-token training.
    pub seq_len: usize,
    /// Suffix length N: the tokens that candidates continue with.
    pub suffix_tokens: usize,
    /// Shortest and longest prefix, in tokens.
    pub prefix_min_tokens: usize,
    pub prefix_max_tokens: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: vec![
                "@assets/corpora/shakespeare".into(),
                "@assets/corpora/brown".into(),
            ],
            validation: Vec::new(),
            validation_fraction: 0.02,
            format: "auto".into(),
            text_field: "text".into(),
            shuffle: true,
            seq_len: 256,
            suffix_tokens: 128,
            prefix_min_tokens: 32,
            prefix_max_tokens: 256,
        }
    }
}

/// How each step builds its candidate pool and picks from it (the base plan; a curriculum may
/// change it step by step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipSection {
    pub original: bool,
    pub rewrite: bool,
    pub rollouts: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// How pairwise judges are run over a pool: `all-pairs`, `pivot`, `swiss`, `sort`,
    /// `adaptive`.
    pub tournament: Tournament,
    /// The criterion of a pointwise judge whose scores give the `adaptive` tournament its
    /// starting order (e.g. "quality" of a `quality-proxy` judge).
    pub tournament_prior: String,
    /// Prepare step t+1's batch (cut, rewrite, judge the originals and rewrites: the work that
    /// does not depend on the policy) on a second thread while step t samples and trains.
    pub overlap: bool,
    /// Weights the rollouts are sampled with: `f32` (the policy itself) or `bf16` (a bf16 copy
    /// of the policy, refreshed every step: 1.6-1.8x faster decoding on a CPU with AVX-512
    /// BF16, see docs/benchmarks.md; the update still uses the f32 policy).
    pub sample_dtype: Dtype,
    /// Prefixes per sampling call (each call holds its own KV cache for prefixes x rollouts
    /// rows); 0 = all of a step's prefixes at once.
    pub rollout_prefixes: usize,
    /// Candidates (with their judgments) written to the run directory every N steps.
    pub sample_every: u64,
}

impl Default for SipSection {
    fn default() -> Self {
        SipSection {
            original: true,
            rewrite: false,
            rollouts: 4,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            tournament: Tournament::AllPairs,
            tournament_prior: String::new(),
            overlap: true,
            sample_dtype: Dtype::F32,
            rollout_prefixes: 0,
            sample_every: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub steps: u64,
    /// Sequences (NTP) or prefixes (SIP) per optimizer step.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// SIP updates: sequences per forward/backward pass (the gradient is the same as one pass
    /// over all of them); 0 = all at once.
    pub micro_batch: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub checkpoint_every: u64,
    /// Checkpoints kept in the run directory (the newest ones).
    pub keep_checkpoints: usize,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub log_every: u64,
    /// The training objective: `ntp`, `online-dpo`, `rf-nll` or `sft` (see `sipt plugins list`).
    pub objective: PluginTable,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            micro_batch: 0,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            eval_every: 50,
            eval_batches: 4,
            log_every: 10,
            objective: PluginTable::named("ntp"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Held-out prefixes evaluated with greedy continuations.
    pub prefixes: usize,
    pub max_new_tokens: usize,
    /// Prefix files of unsafe prompts (one per line), e.g. RealToxicityPrompts subsets.
    pub unsafe_prefixes: Vec<String>,
    /// Baseline checkpoint to compute the judged win rate against.
    pub baseline: String,
    /// The pairwise judge (by name in `[judges]`) that decides win rates.
    pub judge: String,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            prefixes: 64,
            max_new_tokens: 64,
            unsafe_prefixes: Vec::new(),
            baseline: String::new(),
            judge: String::new(),
        }
    }
}

/// `[health]`: monitors computed every SIP step from what the step already has, each over the
/// last `window` steps; crossing a threshold logs one warning (and with `action = "stop"` stops
/// the run at a checkpoint). Values are logged under `health/` whether or not they alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub enabled: bool,
    /// Steps each monitor averages over; an alarm needs a full window.
    pub window: u64,
    pub action: HealthAction,
    /// Source dominance: one source chosen in more than this share of selected pools.
    pub max_source_share: f64,
    /// Rollout degeneration: rollouts' distinct bigram share below this fraction of the
    /// original suffixes'.
    pub min_distinct_ratio: f64,
    /// Rollout degeneration: rollouts' decoded length outside [1/x, x] times the originals'.
    pub max_length_ratio: f64,
    /// Divergence: per-token KL estimate (nats) of chosen continuations, policy vs reference.
    pub max_kl: f64,
    /// Judge failures per judge call.
    pub max_judge_failure_rate: f64,
    /// Position bias: disagreement between the two orders of pairwise judgments.
    pub max_order_disagreement: f64,
    /// Reward collapse: mean spread (standard deviation) of rewards within a pool below this.
    pub min_reward_spread: f64,
    /// Reward gap: rollouts' mean reward above the originals' by more than this.
    pub max_reward_gap: f64,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            enabled: true,
            window: 20,
            action: HealthAction::Warn,
            max_source_share: 0.9,
            min_distinct_ratio: 0.5,
            max_length_ratio: 2.0,
            max_kl: 1.0,
            max_judge_failure_rate: 0.2,
            max_order_disagreement: 0.3,
            min_reward_spread: 1e-3,
            max_reward_gap: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSection {
    /// Metrics always go to `metrics.jsonl` in the run directory; this adds W&B.
    pub wandb: WandbSection,
    /// Also write every row as TensorBoard scalars under `<run>/tensorboard/`.
    pub tensorboard: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WandbSection {
    /// `off`, `offline` (write the run file; `wandb sync` later) or `live` (stream it).
    pub mode: WandbMode,
    pub project: String,
    pub entity: String,
    pub tags: Vec<String>,
}

impl Default for WandbSection {
    fn default() -> Self {
        WandbSection {
            mode: WandbMode::Off,
            project: "sipt".into(),
            entity: String::new(),
            tags: Vec::new(),
        }
    }
}

/// A sweep over configuration keys: grid (cartesian product), zip (lists walked together) and
/// seeded random samples, combined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSection {
    /// key path → values; every combination is a trial.
    pub grid: BTreeMap<String, Vec<toml::Value>>,
    /// key path → values; all lists the same length, walked together.
    pub zip: BTreeMap<String, Vec<toml::Value>>,
    /// key path → values to draw from; `samples` trials drawn with `seed`.
    pub random: BTreeMap<String, Vec<toml::Value>>,
    pub samples: usize,
    pub seed: u64,
    pub fail_fast: bool,
    /// Where trials run: `local` (child processes) or `slurm` (one job array).
    /// `sipt sweep --executor` overrides it.
    pub executor: ExecutorKind,
    /// Ranks of each trial under the local executor: a data-parallel trial of N processes
    /// (`sipt run --nproc-per-node N`), taking N of `--devices` when devices are given.
    /// The Slurm executor asks for `[sweep.slurm] nodes` and `tasks_per_node` instead.
    pub ranks: usize,
    /// Resources and limits of each trial under the Slurm executor.
    pub slurm: SlurmSection,
}

impl Default for SweepSection {
    fn default() -> Self {
        SweepSection {
            grid: BTreeMap::new(),
            zip: BTreeMap::new(),
            random: BTreeMap::new(),
            samples: 0,
            seed: 0,
            fail_fast: false,
            executor: ExecutorKind::Local,
            ranks: 1,
            slurm: SlurmSection::default(),
        }
    }
}

/// `[sweep.slurm]`: how the job array asks for resources. Every trial gets the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSection {
    /// `--partition`; empty: the cluster's default partition.
    pub partition: String,
    /// Wall-clock limit per trial (`--time`) in Slurm's notation: `MM`, `MM:SS`, `HH:MM:SS`,
    /// `D-HH`, `D-HH:MM`, `D-HH:MM:SS`; empty: the partition's default.
    pub time: String,
    /// GPUs per trial and node (`--gres=gpu:N`).
    pub gpus: u32,
    /// CPU cores per trial and rank (`--cpus-per-task`); 0: the cluster's default.
    pub cpus: u32,
    /// Nodes per trial (`--nodes`); 0: one.
    pub nodes: u32,
    /// Ranks per node (`--ntasks-per-node`; one per GPU on a GPU cluster); 0: one. A trial of
    /// more than one rank in all runs its ranks with `srun`.
    pub tasks_per_node: u32,
    /// Memory per trial (`--mem`), e.g. `16G`; empty: the cluster's default.
    pub mem: String,
    /// At most this many trials at once (`--array=...%N`); 0: no limit.
    pub max_parallel: u32,
    /// `--account`, `--qos`; empty: none.
    pub account: String,
    pub qos: String,
    /// Further `sbatch` options, e.g. `["--constraint=a100", "--exclusive"]`.
    pub sbatch_args: Vec<String>,
    /// Shell lines run before each trial (e.g. `module load cuda`).
    pub setup: Vec<String>,
}

/// A plugin choice: `type = "name"` plus that plugin's own options, which the plugin checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginTable {
    #[serde(rename = "type")]
    pub name: String,
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl PluginTable {
    pub fn named(name: &str) -> Self {
        PluginTable {
            name: name.to_string(),
            options: serde_json::Map::new(),
        }
    }

    pub fn options_value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.options.clone())
    }
}
