//! Training objectives: what the policy learns from a step.
//!
//! An objective first *selects* what to train on from each judged candidate pool (a DPO pair,
//! an NLL target, nothing), then turns the engine's log-probabilities of those selections into a
//! loss. Objectives need tensors, so unlike the other extension points they live in the engine
//! and are registered here, with the same `type = "name"` tables in experiment files.

use serde::Deserialize;
use sipt_api::{introspect, Source};
use sipt_experiment::registry::ObjectiveInfo;
use tch::Tensor;

/// A judged candidate, as an objective sees it when selecting.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub source: Source,
    /// `None` when its judgment failed: such a candidate is never selected.
    pub reward: Option<f64>,
}

/// What to train on from one pool (indices into the pool).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// A DPO pair: raise `chosen` over `rejected`.
    Pair { chosen: usize, rejected: usize },
    /// NLL on one candidate's suffix tokens.
    Nll { index: usize },
}

/// How the frozen reference model of DPO follows the policy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ReferenceUpdate {
    /// Frozen at the starting weights.
    #[default]
    Frozen,
    /// Copied from the policy every `every` steps.
    Sync { every: u64 },
    /// Exponential moving average of the policy with this decay per step.
    Ema { decay: f64 },
}

/// Log-probabilities the engine computed for the selected targets, in selection order.
pub struct LossInputs {
    /// Summed suffix log-probs of pair members under the policy (with grad) and reference.
    pub policy_chosen: Option<Tensor>,
    pub policy_rejected: Option<Tensor>,
    pub reference_chosen: Option<Tensor>,
    pub reference_rejected: Option<Tensor>,
    /// Summed suffix log-probs of NLL targets (with grad) and their token counts.
    pub nll_logp: Option<Tensor>,
    pub nll_tokens: Option<Tensor>,
    /// Mean next-token loss on plain documents, when the objective asked for it.
    pub ntp: Option<Tensor>,
}

/// A loss and the named scalars worth logging.
pub struct LossTerms {
    pub loss: Tensor,
    pub metrics: Vec<(String, f64)>,
}

/// What the engine must compute for an objective.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Needs {
    pub candidates: bool,
    pub reference: Option<ReferenceUpdate>,
    /// Weight of a next-token loss on plain documents (0 = none).
    pub ntp_weight: f64,
}

pub trait Objective: Send {
    fn needs(&self) -> Needs;
    /// Targets from one judged pool. Ties and failed judgments are handled here, explicitly.
    fn select(&self, pool: &[Judged]) -> Vec<Target>;
    fn loss(&self, inputs: &LossInputs) -> LossTerms;
}

/// Builds an objective from its checked options.
pub type BuildFn = fn(serde_json::Value) -> Result<Box<dyn Objective>, String>;

/// How the engine builds a registered objective; the registry lists and validates it through
/// the [`ObjectiveInfo`] submitted beside it.
pub struct Builder {
    pub name: &'static str,
    pub build: BuildFn,
}

inventory::collect!(Builder);

/// The objective `name`, built from its table's options.
pub fn build(name: &str, options: serde_json::Value) -> Result<Box<dyn Objective>, String> {
    match inventory::iter::<Builder>
        .into_iter()
        .find(|b| b.name == name)
    {
        Some(b) => (b.build)(options),
        None => Err(format!("unknown objective '{name}'")),
    }
}

macro_rules! register_objective {
    ($name:expr, $config:ty, $summary:expr, $build:expr) => {
        inventory::submit! {
            ObjectiveInfo {
                name: $name,
                summary: $summary,
                defined_at: concat!(file!(), ":", line!()),
                fields: introspect::field_names::<$config>,
                check: |v| sipt_api::check_config::<$config>(v).map(|_| ()),
            }
        }
        inventory::submit! {
            Builder {
                name: $name,
                build: |v| {
                    let config = sipt_api::check_config::<$config>(&v).map_err(|p| p.message)?;
                    #[allow(clippy::redundant_closure_call)]
                    ($build)(config)
                },
            }
        }
    };
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

fn zero() -> Tensor {
    Tensor::from(0.0f32)
}

// ---------------------------------------------------------------------------------------------
// Next-token prediction: the paper's "standard pretraining" baseline.

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NtpConfig {}

struct Ntp;

impl Objective for Ntp {
    fn needs(&self) -> Needs {
        Needs {
            candidates: false,
            reference: None,
            ntp_weight: 1.0,
        }
    }
    fn select(&self, _: &[Judged]) -> Vec<Target> {
        Vec::new()
    }
    fn loss(&self, inputs: &LossInputs) -> LossTerms {
        let loss = inputs
            .ntp
            .as_ref()
            .map(|t| t.shallow_clone())
            .unwrap_or_else(zero);
        LossTerms {
            metrics: vec![("loss/ntp".into(), scalar(&loss))],
            loss,
        }
    }
}

register_objective!(
    "ntp",
    NtpConfig,
    "next-token prediction on the documents (standard pretraining)",
    |_: NtpConfig| Ok(Box::new(Ntp) as Box<dyn Objective>)
);

// ---------------------------------------------------------------------------------------------
// Online DPO: chosen = best candidate, rejected = worst.

fn default_beta() -> f64 {
    0.1
}

fn default_min_margin() -> f64 {
    0.0
}

fn non_negative<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let x = f64::deserialize(d)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(serde::de::Error::custom(format!(
            "expected a number >= 0, found {x}"
        )))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the implicit KL penalty towards the reference.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Pairs whose reward gap is at most this are ties and are skipped (>= 0, so that a
    /// candidate is never paired against an equal one).
    #[serde(default = "default_min_margin", deserialize_with = "non_negative")]
    pub min_margin: f64,
    /// How the reference follows the policy: `frozen`, `sync` (every `sync_every` steps) or
    /// `ema` (decay `ema_decay` per step).
    #[serde(default)]
    pub reference: ReferenceKind,
    #[serde(default = "default_sync_every")]
    pub sync_every: u64,
    #[serde(default = "default_ema_decay")]
    pub ema_decay: f64,
    /// Weight of a next-token loss on the documents, mixed in.
    #[serde(default)]
    pub ntp_weight: f64,
    /// Fixed roles instead of judged ones (the paper's "DPO without judge" ablation): this
    /// source is always chosen ...
    pub chosen_source: Option<Source>,
    /// ... over this one.
    pub rejected_source: Option<Source>,
}

/// Best and worst judged candidates, or nothing when fewer than two were judged or all tie.
fn best_and_worst(pool: &[Judged], min_margin: f64) -> Option<(usize, usize)> {
    let judged: Vec<(usize, f64)> = pool
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.reward.filter(|r| r.is_finite()).map(|r| (i, r)))
        .collect();
    // Earliest index wins ties so that selection is deterministic.
    let best = judged
        .iter()
        .copied()
        .fold(None, |acc: Option<(usize, f64)>, x| match acc {
            Some(a) if a.1 >= x.1 => Some(a),
            _ => Some(x),
        })?;
    let worst = judged
        .iter()
        .copied()
        .fold(None, |acc: Option<(usize, f64)>, x| match acc {
            Some(a) if a.1 <= x.1 => Some(a),
            _ => Some(x),
        })?;
    (best.1 - worst.1 > min_margin).then_some((best.0, worst.0))
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceKind {
    #[default]
    Frozen,
    Sync,
    Ema,
}

fn default_sync_every() -> u64 {
    100
}

fn default_ema_decay() -> f64 {
    0.99
}

impl DpoConfig {
    fn reference_update(&self) -> Result<ReferenceUpdate, String> {
        match self.reference {
            ReferenceKind::Frozen => Ok(ReferenceUpdate::Frozen),
            ReferenceKind::Sync if self.sync_every >= 1 => Ok(ReferenceUpdate::Sync {
                every: self.sync_every,
            }),
            ReferenceKind::Sync => Err("sync_every must be at least 1".into()),
            ReferenceKind::Ema if (0.0..1.0).contains(&self.ema_decay) => {
                Ok(ReferenceUpdate::Ema {
                    decay: self.ema_decay,
                })
            }
            ReferenceKind::Ema => Err(format!(
                "ema_decay must be in [0, 1), got {}",
                self.ema_decay
            )),
        }
    }
}

struct Dpo {
    config: DpoConfig,
    reference: ReferenceUpdate,
}

impl Objective for Dpo {
    fn needs(&self) -> Needs {
        Needs {
            candidates: true,
            reference: Some(self.reference),
            ntp_weight: self.config.ntp_weight,
        }
    }

    fn select(&self, pool: &[Judged]) -> Vec<Target> {
        if let (Some(c), Some(r)) = (self.config.chosen_source, self.config.rejected_source) {
            let chosen = pool.iter().position(|j| j.source == c);
            let rejected = pool.iter().position(|j| j.source == r);
            return match (chosen, rejected) {
                (Some(chosen), Some(rejected)) => vec![Target::Pair { chosen, rejected }],
                _ => Vec::new(),
            };
        }
        best_and_worst(pool, self.config.min_margin)
            .map(|(chosen, rejected)| vec![Target::Pair { chosen, rejected }])
            .unwrap_or_default()
    }

    fn loss(&self, inputs: &LossInputs) -> LossTerms {
        let mut metrics = Vec::new();
        let mut loss = zero();
        if let (Some(pc), Some(pr), Some(rc), Some(rr)) = (
            &inputs.policy_chosen,
            &inputs.policy_rejected,
            &inputs.reference_chosen,
            &inputs.reference_rejected,
        ) {
            if pc.numel() > 0 {
                let chosen_reward = (pc - rc) * self.config.beta;
                let rejected_reward = (pr - rr) * self.config.beta;
                let margin = &chosen_reward - &rejected_reward;
                let dpo = -margin.log_sigmoid().mean(tch::Kind::Float);
                metrics.push(("loss/dpo".into(), scalar(&dpo)));
                metrics.push(("dpo/margin".into(), scalar(&margin.mean(tch::Kind::Float))));
                metrics.push((
                    "dpo/accuracy".into(),
                    scalar(
                        &margin
                            .gt(0.0)
                            .to_kind(tch::Kind::Float)
                            .mean(tch::Kind::Float),
                    ),
                ));
                metrics.push(("dpo/pairs".into(), pc.numel() as f64));
                loss = dpo;
            }
        }
        if let Some(ntp) = &inputs.ntp {
            if self.config.ntp_weight > 0.0 {
                metrics.push(("loss/ntp".into(), scalar(ntp)));
                loss = &loss + ntp * self.config.ntp_weight;
            }
        }
        metrics.push(("loss/total".into(), scalar(&loss)));
        LossTerms { loss, metrics }
    }
}

register_objective!(
    "online-dpo",
    DpoConfig,
    "online DPO: best candidate over worst, against a reference model (frozen, synced or EMA)",
    |c: DpoConfig| {
        if c.beta.is_nan() || c.beta <= 0.0 {
            return Err(format!("beta must be positive, got {}", c.beta));
        }
        if c.chosen_source.is_some() != c.rejected_source.is_some() {
            return Err("give both chosen_source and rejected_source, or neither".into());
        }
        let reference = c.reference_update()?;
        Ok(Box::new(Dpo {
            config: c,
            reference,
        }) as Box<dyn Objective>)
    }
);

// ---------------------------------------------------------------------------------------------
// NLL on selected candidates: reward-filtered (best) or fixed source (SFT).

fn nll_loss(inputs: &LossInputs, name: &str, ntp_weight: f64) -> LossTerms {
    let mut metrics = Vec::new();
    let mut loss = zero();
    if let (Some(logp), Some(tokens)) = (&inputs.nll_logp, &inputs.nll_tokens) {
        if logp.numel() > 0 {
            // Mean over tokens of all targets, so long and short suffixes weigh per token.
            let nll = -logp.sum(tch::Kind::Float) / tokens.sum(tch::Kind::Float).clamp_min(1.0);
            metrics.push((format!("loss/{name}"), scalar(&nll)));
            metrics.push((format!("{name}/targets"), logp.numel() as f64));
            loss = nll;
        }
    }
    if let Some(ntp) = &inputs.ntp {
        if ntp_weight > 0.0 {
            metrics.push(("loss/ntp".into(), scalar(ntp)));
            loss = &loss + ntp * ntp_weight;
        }
    }
    metrics.push(("loss/total".into(), scalar(&loss)));
    LossTerms { loss, metrics }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfNllConfig {
    /// Skip the pool when its best reward is below this.
    #[serde(default = "neg_infinity")]
    pub min_reward: f64,
    #[serde(default)]
    pub ntp_weight: f64,
}

fn neg_infinity() -> f64 {
    f64::NEG_INFINITY
}

struct RfNll(RfNllConfig);

impl Objective for RfNll {
    fn needs(&self) -> Needs {
        Needs {
            candidates: true,
            reference: None,
            ntp_weight: self.0.ntp_weight,
        }
    }
    fn select(&self, pool: &[Judged]) -> Vec<Target> {
        let best = pool
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.reward.filter(|r| r.is_finite()).map(|r| (i, r)))
            .fold(None, |acc: Option<(usize, f64)>, x| match acc {
                Some(a) if a.1 >= x.1 => Some(a),
                _ => Some(x),
            });
        match best {
            Some((index, reward)) if reward >= self.0.min_reward => vec![Target::Nll { index }],
            _ => Vec::new(),
        }
    }
    fn loss(&self, inputs: &LossInputs) -> LossTerms {
        nll_loss(inputs, "rf_nll", self.0.ntp_weight)
    }
}

register_objective!(
    "rf-nll",
    RfNllConfig,
    "reward-filtered NLL: plain NLL on the best-judged candidate",
    |c: RfNllConfig| Ok(Box::new(RfNll(c)) as Box<dyn Objective>)
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Train on candidates from this source, judged or not (e.g. "rewrite").
    pub source: Source,
    #[serde(default)]
    pub ntp_weight: f64,
}

struct Sft(SftConfig);

impl Objective for Sft {
    fn needs(&self) -> Needs {
        Needs {
            candidates: true,
            reference: None,
            ntp_weight: self.0.ntp_weight,
        }
    }
    fn select(&self, pool: &[Judged]) -> Vec<Target> {
        pool.iter()
            .position(|c| c.source == self.0.source)
            .map(|index| vec![Target::Nll { index }])
            .unwrap_or_default()
    }
    fn loss(&self, inputs: &LossInputs) -> LossTerms {
        nll_loss(inputs, "sft", self.0.ntp_weight)
    }
}

register_objective!(
    "sft",
    SftConfig,
    "supervised NLL on one source's candidates (e.g. rewrites), without a judge",
    |c: SftConfig| Ok(Box::new(Sft(c)) as Box<dyn Objective>)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(rewards: &[Option<f64>]) -> Vec<Judged> {
        rewards
            .iter()
            .map(|r| Judged {
                source: Source::Rollout,
                reward: *r,
            })
            .collect()
    }

    fn dpo(beta: f64) -> Dpo {
        let config: DpoConfig = serde_json::from_value(serde_json::json!({"beta": beta})).unwrap();
        Dpo {
            reference: config.reference_update().unwrap(),
            config,
        }
    }

    #[test]
    fn dpo_skips_ties_and_failures() {
        let dpo = dpo(0.1);
        assert_eq!(
            dpo.select(&pool(&[Some(0.2), None, Some(0.9), Some(0.1)])),
            vec![Target::Pair {
                chosen: 2,
                rejected: 3
            }]
        );
        assert!(dpo.select(&pool(&[Some(0.5), Some(0.5)])).is_empty());
        assert!(dpo.select(&pool(&[Some(0.5), None])).is_empty());
    }

    #[test]
    fn dpo_loss_is_log_sigmoid_of_margin() {
        let dpo = dpo(0.5);
        let t = |v: f32| Some(Tensor::from_slice(&[v]));
        let terms = dpo.loss(&LossInputs {
            policy_chosen: t(-1.0),
            policy_rejected: t(-3.0),
            reference_chosen: t(-2.0),
            reference_rejected: t(-2.0),
            nll_logp: None,
            nll_tokens: None,
            ntp: None,
        });
        // margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 1.0
        let expected = -(1.0f64 / (1.0 + (-1.0f64).exp())).ln();
        assert!((scalar(&terms.loss) - expected).abs() < 1e-6);
    }

    #[test]
    fn rf_nll_picks_best_above_threshold() {
        let rf = RfNll(RfNllConfig {
            min_reward: 0.5,
            ntp_weight: 0.0,
        });
        assert_eq!(
            rf.select(&pool(&[Some(0.2), Some(0.7), None])),
            vec![Target::Nll { index: 1 }]
        );
        assert!(rf.select(&pool(&[Some(0.2), Some(0.4)])).is_empty());
    }

    #[test]
    fn reference_update_parses_from_table() {
        let c: DpoConfig =
            serde_json::from_value(serde_json::json!({"reference": "sync", "sync_every": 10}))
                .unwrap();
        assert_eq!(
            c.reference_update(),
            Ok(ReferenceUpdate::Sync { every: 10 })
        );
        let c: DpoConfig = serde_json::from_value(serde_json::json!({"beta": 0.2})).unwrap();
        assert_eq!(c.reference_update(), Ok(ReferenceUpdate::Frozen));
        assert!(
            sipt_api::check_config::<DpoConfig>(&serde_json::json!({"reference": "emma"})).is_err()
        );
    }
}
