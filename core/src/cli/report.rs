//! `sipt report` and `sipt status`: a sweep's (or a run's) results and live state.

use super::Exit;
use sipt_experiment::sweep;
use std::path::Path;

pub(super) fn report(dir: &Path) -> Result<(), Exit> {
    let md = sweep::report(dir)?;
    print!("{md}");
    println!(
        "\nwritten: {} and {}",
        dir.join("results.md").display(),
        dir.join("results.csv").display()
    );
    Ok(())
}

pub(super) fn status(dir: &Path) -> Result<(), Exit> {
    print!("{}", sweep::monitor::describe(dir)?);
    Ok(())
}
