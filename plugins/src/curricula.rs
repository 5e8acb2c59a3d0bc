//! Curricula: what each step does, as training goes on.

use serde::Deserialize;
use sipt_api::{Curriculum, FromConfig, PluginContext, Progress, StepPlan};

/// Every step follows the experiment's `[sip]` plan.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConstantConfig {}

pub struct Constant;

impl FromConfig for Constant {
    type Config = ConstantConfig;
    fn from_config(_: ConstantConfig, _: &PluginContext) -> Result<Self, String> {
        Ok(Constant)
    }
}

impl Curriculum for Constant {
    fn plan(&self, _: &Progress, base: &StepPlan) -> StepPlan {
        base.clone()
    }
}

sipt_api::register_plugin!(
    Curriculum,
    "constant",
    Constant,
    "every step uses the experiment's [sip] plan unchanged"
);

/// A linear ramp over training: the number of rollouts from `rollouts_from` to `rollouts_to`,
/// and the mix of next-token and SIP loss from `ntp_from` to `ntp_to` (SIP weight = 1 - ntp).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampConfig {
    pub rollouts_from: Option<u32>,
    pub rollouts_to: Option<u32>,
    pub ntp_from: Option<f64>,
    pub ntp_to: Option<f64>,
    /// Share of training over which the ramp runs (then it holds its end values).
    #[serde(default = "one")]
    pub over: f64,
}

fn one() -> f64 {
    1.0
}

pub struct Ramp(RampConfig);

impl FromConfig for Ramp {
    type Config = RampConfig;
    fn from_config(c: RampConfig, _: &PluginContext) -> Result<Self, String> {
        if c.rollouts_from.is_some() != c.rollouts_to.is_some() {
            return Err("give both rollouts_from and rollouts_to, or neither".into());
        }
        if c.ntp_from.is_some() != c.ntp_to.is_some() {
            return Err("give both ntp_from and ntp_to, or neither".into());
        }
        for w in [c.ntp_from, c.ntp_to].into_iter().flatten() {
            if !(0.0..=1.0).contains(&w) {
                return Err(format!("ntp weights must be in [0, 1], got {w}"));
            }
        }
        if !(c.over > 0.0 && c.over <= 1.0) {
            return Err(format!("over must be in (0, 1], got {}", c.over));
        }
        Ok(Ramp(c))
    }
}

impl Curriculum for Ramp {
    fn plan(&self, progress: &Progress, base: &StepPlan) -> StepPlan {
        let span = (progress.total_steps as f64 * self.0.over).max(1.0);
        let t = (progress.step as f64 / span).min(1.0);
        let mut plan = base.clone();
        if let (Some(a), Some(b)) = (self.0.rollouts_from, self.0.rollouts_to) {
            plan.rollouts = (a as f64 + (b as f64 - a as f64) * t).round() as u32;
        }
        if let (Some(a), Some(b)) = (self.0.ntp_from, self.0.ntp_to) {
            plan.ntp_weight = a + (b - a) * t;
            plan.sip_weight = 1.0 - plan.ntp_weight;
        }
        plan
    }
}

sipt_api::register_plugin!(
    Curriculum,
    "ramp",
    Ramp,
    "linear schedules over steps: number of rollouts, and the next-token / SIP loss mix"
);

/// Driven by what the judge prefers: while the policy's rollouts rarely win, train more on
/// the original suffixes (next-token loss); as rollouts win more, shift weight to SIP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WinRateConfig {
    /// Rollout chosen rate at which the SIP loss gets its full weight.
    #[serde(default = "half")]
    pub target_rate: f64,
    /// Next-token weight when rollouts never win.
    #[serde(default = "one")]
    pub max_ntp: f64,
    /// Rollouts to sample while the rollout chosen rate is below `target_rate`, and at it.
    pub rollouts_low: Option<u32>,
    pub rollouts_high: Option<u32>,
}

fn half() -> f64 {
    0.5
}

pub struct WinRate(WinRateConfig);

impl FromConfig for WinRate {
    type Config = WinRateConfig;
    fn from_config(c: WinRateConfig, _: &PluginContext) -> Result<Self, String> {
        if !(c.target_rate > 0.0 && c.target_rate <= 1.0) {
            return Err(format!(
                "target_rate must be in (0, 1], got {}",
                c.target_rate
            ));
        }
        if !(0.0..=1.0).contains(&c.max_ntp) {
            return Err(format!("max_ntp must be in [0, 1], got {}", c.max_ntp));
        }
        Ok(WinRate(c))
    }
}

impl Curriculum for WinRate {
    fn plan(&self, progress: &Progress, base: &StepPlan) -> StepPlan {
        let rate = progress
            .chosen_rate
            .get(&sipt_api::Source::Rollout)
            .copied()
            .unwrap_or(0.0);
        let t = (rate / self.0.target_rate).clamp(0.0, 1.0);
        let mut plan = base.clone();
        plan.ntp_weight = self.0.max_ntp * (1.0 - t);
        plan.sip_weight = 1.0 - plan.ntp_weight;
        if let (Some(lo), Some(hi)) = (self.0.rollouts_low, self.0.rollouts_high) {
            plan.rollouts = (lo as f64 + (hi as f64 - lo as f64) * t).round() as u32;
        }
        plan
    }
}

sipt_api::register_plugin!(
    Curriculum,
    "win-rate",
    WinRate,
    "follows the measured rollout chosen rate: next-token loss while rollouts lose, SIP as they win"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: u64, rollout_rate: f64) -> Progress {
        Progress {
            step,
            total_steps: 100,
            chosen_rate: [(sipt_api::Source::Rollout, rollout_rate)].into(),
            ..Progress::default()
        }
    }

    #[test]
    fn ramp_interpolates_and_holds() {
        let r = Ramp::from_config(
            RampConfig {
                rollouts_from: Some(2),
                rollouts_to: Some(8),
                ntp_from: Some(1.0),
                ntp_to: Some(0.0),
                over: 0.5,
            },
            &PluginContext::default(),
        )
        .unwrap();
        let base = StepPlan::default();
        assert_eq!(r.plan(&progress(0, 0.0), &base).rollouts, 2);
        let mid = r.plan(&progress(25, 0.0), &base);
        assert_eq!(mid.rollouts, 5);
        assert!((mid.ntp_weight - 0.5).abs() < 1e-12 && (mid.sip_weight - 0.5).abs() < 1e-12);
        assert_eq!(r.plan(&progress(90, 0.0), &base).rollouts, 8);
        assert!(Ramp::from_config(
            RampConfig {
                rollouts_from: Some(2),
                rollouts_to: None,
                ntp_from: None,
                ntp_to: None,
                over: 1.0
            },
            &PluginContext::default()
        )
        .is_err());
    }

    #[test]
    fn win_rate_shifts_weight_as_rollouts_win() {
        let w = WinRate::from_config(
            WinRateConfig {
                target_rate: 0.5,
                max_ntp: 0.8,
                rollouts_low: None,
                rollouts_high: None,
            },
            &PluginContext::default(),
        )
        .unwrap();
        let base = StepPlan::default();
        assert!((w.plan(&progress(0, 0.0), &base).ntp_weight - 0.8).abs() < 1e-12);
        assert!((w.plan(&progress(0, 0.25), &base).ntp_weight - 0.4).abs() < 1e-12);
        assert_eq!(w.plan(&progress(0, 0.9), &base).ntp_weight, 0.0);
    }
}
