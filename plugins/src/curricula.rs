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
