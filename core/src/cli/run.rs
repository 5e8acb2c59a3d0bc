//! `sipt run`: validate an experiment file, create its run directory and run it (a file with a
//! `[sweep]` table runs its sweep).

use super::{Exit, FileArgs};
use sipt_experiment::rundir;
use sipt_experiment::sweep::Executor;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Train data-parallel over N ranks on this machine (Gloo on CPUs, one GPU per rank with
    /// NCCL), started and watched by this command; torchrun and srun start ranks themselves.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nproc_per_node: usize,
}

pub(super) fn run(args: RunArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let (resolved, registry) = args.file.load(libraries)?;
    if let Some(sweep) = &resolved.experiment.sweep {
        let from_file = Executor::from_file(sweep);
        let executor = Executor {
            resume: args.resume,
            // `--nproc-per-node` on a sweep gives each trial that many ranks.
            ranks: match args.nproc_per_node {
                0 | 1 => from_file.ranks,
                n => n,
            },
            ..from_file
        };
        return super::sweep::run_sweep(&resolved, &args.file.sets, args.out, &executor, libraries);
    }
    if args.nproc_per_node == 0 {
        return Err(Exit::usage("--nproc-per-node must be at least 1"));
    }
    let world = crate::dist::World::from_env()?;
    if args.nproc_per_node > 1 && world.is_single() {
        // The launcher: the ranks are this command again, with one run directory for all.
        let out = match &args.out {
            Some(dir) => dir.clone(),
            None => rundir::new_run_path(&resolved.experiment)?,
        };
        let mut rank_args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if args.out.is_none() {
            rank_args.extend([OsString::from("--out"), out.into_os_string()]);
        }
        crate::dist::launch::launch(args.nproc_per_node, &rank_args, GRACE)?;
        return Ok(());
    }
    if args.nproc_per_node > 1 && world.local_size != args.nproc_per_node {
        return Err(Exit::usage(format!(
            "--nproc-per-node {} but the environment makes this one of {} local ranks (started by torchrun or srun: leave --nproc-per-node out)",
            args.nproc_per_node, world.local_size
        )));
    }
    crate::engine::run_experiment(&resolved, &registry, args.out.as_deref(), args.resume)?;
    Ok(())
}

/// How long the other ranks may take to stop by themselves after one fails (they notice at
/// their next collective); then they are killed. Only rank 0 writes, and its writes are atomic,
/// so no file is left half-written either way.
const GRACE: Duration = Duration::from_secs(5);
