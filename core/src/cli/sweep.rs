//! `sipt sweep`: the trials of an experiment's `[sweep]`, locally or as a Slurm job array.

use super::{Exit, FileArgs};
use sipt_experiment::config::{ExecutorKind, Resolved, SetOverride, SweepSection};
use sipt_experiment::sweep::{self, Executor, DEFAULT_STATUS_EVERY};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub(super) struct SweepArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Write the sweep here instead of <output_dir>/<name>/sweep-<timestamp>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Trials run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// CUDA devices to hand out to running trials (e.g. 0,1), `[sweep] ranks` each.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    /// Where trials run: `local` child processes or a `slurm` job array (resources from
    /// [sweep.slurm]). Default: the file's `sweep.executor`, else local.
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Continue the sweep in --out: skip finished trials, rerun failed or interrupted ones
    /// (from their last checkpoint). Under Slurm, attach to the sweep's job if it still runs.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Stop launching trials after the first failure (Slurm: cancel the job array).
    #[arg(long)]
    fail_fast: bool,
    /// Slurm: submit the job array and return; `sipt status DIR` follows it.
    #[arg(long)]
    detach: bool,
    /// Seconds between status lines of the running trials when not on a terminal.
    #[arg(long, default_value_t = DEFAULT_STATUS_EVERY, value_name = "SECONDS")]
    status_every: f64,
}

pub(super) fn sweep(args: SweepArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let (resolved, _) = args.file.load(libraries)?;
    let from_file = Executor::from_file(
        resolved
            .experiment
            .sweep
            .as_ref()
            .unwrap_or(&SweepSection::default()),
    );
    let kind = match args.executor.as_deref() {
        Some(name) => name.parse::<ExecutorKind>().map_err(Exit::usage)?,
        None => from_file.kind,
    };
    if args.detach && kind != ExecutorKind::Slurm {
        return Err(Exit::usage(
            "--detach needs the Slurm executor (--executor slurm)",
        ));
    }
    let executor = Executor {
        kind,
        jobs: args.jobs,
        devices: args.devices,
        ranks: from_file.ranks,
        fail_fast: args.fail_fast || from_file.fail_fast,
        resume: args.resume,
        detach: args.detach,
        status_every: args.status_every,
    };
    run_sweep(&resolved, &args.file.sets, args.out, &executor, libraries)
}

/// Run the sweep of `resolved` into `out` (or a new timestamped folder).
pub(super) fn run_sweep(
    resolved: &Resolved,
    sets: &[SetOverride],
    out: Option<PathBuf>,
    executor: &Executor,
    libraries: &[PathBuf],
) -> Result<(), Exit> {
    let dir = match out {
        Some(d) => d,
        None => {
            let e = &resolved.experiment.experiment;
            let stamp = chrono::Utc::now().format("sweep-%Y%m%d-%H%M%S").to_string();
            Path::new(&e.output_dir).join(&e.name).join(stamp)
        }
    };
    let failed = sweep::run(resolved, sets, &dir, executor, libraries)?;
    println!("results: {}", dir.join("results.md").display());
    if failed > 0 {
        return Err(Exit::invalid(format!(
            "{failed} trial(s) did not finish; see their log.txt; --resume reruns them"
        )));
    }
    Ok(())
}
