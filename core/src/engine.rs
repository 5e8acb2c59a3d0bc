//! Running an experiment.

use crate::config::Resolved;
use crate::registry::Registry;
use crate::rundir::RunDir;

/// Run the experiment into `run`.
pub fn run(
    _resolved: &Resolved,
    _registry: &Registry,
    run: &RunDir,
    _resume: bool,
) -> anyhow::Result<()> {
    println!(
        "The configuration is valid and {} holds it. The training engine is not built yet, so sipt stops here.",
        run.path().display()
    );
    Ok(())
}
