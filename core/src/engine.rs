//! `sipt run` for one experiment: build its objective and plugins, prepare the tokenizer, data
//! and policy, and hand them to the loop the objective calls for — the SIP loop when it learns
//! from judged candidates, the next-token loop otherwise.

use crate::{objective, sip, train};
use anyhow::{anyhow, Result};
use sipt_experiment::config::Resolved;
use sipt_experiment::paths;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::registry::Registry;
use sipt_experiment::rundir::RunDir;

/// Run the experiment into `run` (continuing its latest checkpoint when `resume`).
pub fn run(resolved: &Resolved, registry: &Registry, run: &RunDir, resume: bool) -> Result<()> {
    let e = &resolved.experiment;
    let objective = objective::build(&e.train.objective.name, e.train.objective.options_value())
        .map_err(|err| anyhow!("train.objective: {err}"))?;
    let prepared = train::prepare(resolved, run, resume)?;
    train::check_lengths(e, &prepared.policy)?;
    let plugins = Plugins::build(e, registry, &paths::plugin_context(resolved))?;
    if objective.needs().candidates {
        sip::train(e, run, prepared, &plugins, objective)
    } else {
        train::ntp::train(e, run, prepared, &plugins)
    }
}
