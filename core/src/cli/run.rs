//! `sipt run`: validate an experiment file, create its run directory and run it (a file with a
//! `[sweep]` table runs its sweep).

use super::{Exit, FileArgs};
use sipt_experiment::rundir::{self, RunDir};
use sipt_experiment::sweep::Executor;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub(super) struct RunArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Write the run here instead of <experiment.output_dir>/<experiment.name>/<timestamp>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, requires = "out")]
    resume: bool,
}

pub(super) fn run(args: RunArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let (resolved, registry) = args.file.load(libraries)?;
    if let Some(sweep) = &resolved.experiment.sweep {
        let executor = Executor {
            resume: args.resume,
            ..Executor::from_file(sweep)
        };
        return super::sweep::run_sweep(&resolved, &args.file.sets, args.out, &executor, libraries);
    }
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => rundir::new_run_path(&resolved.experiment)?,
    };
    let run = RunDir::create(&dir, &resolved, args.resume)?;
    tracing::info!("run directory: {}", run.path().display());
    crate::engine::run(&resolved, &registry, &run, args.resume)?;
    Ok(())
}
