//! `sipt run` for one experiment: find the world this process belongs to (one process, or one
//! rank of a data-parallel job), make or follow the run directory, build the objective and
//! plugins, prepare the tokenizer, data and policy, and hand them to the loop the objective
//! calls for — the SIP loop when it learns from judged candidates, the next-token loop
//! otherwise.

use crate::dist::{Dist, World};
use crate::{objective, sip, train};
use anyhow::{anyhow, bail, Result};
use sipt_experiment::config::{Experiment, Resolved};
use sipt_experiment::paths;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::registry::Registry;
use sipt_experiment::rundir::{self, RunDir};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use tch::Device;

/// Run the experiment into `out` (a new timestamped folder when `None`), continuing its latest
/// checkpoint when `resume`: alone, or as one rank of the job the environment describes.
pub fn run_experiment(
    resolved: &Resolved,
    registry: &Registry,
    out: Option<&Path>,
    resume: bool,
) -> Result<()> {
    let e = &resolved.experiment;
    let world = World::from_env()?;
    if world.is_single() {
        let dir = match out {
            Some(dir) => dir.to_path_buf(),
            None => rundir::new_run_path(e)?,
        };
        let run = RunDir::create(&dir, resolved, resume)?;
        tracing::info!("run directory: {}", run.path().display());
        return run_in(resolved, registry, &run, resume, Rc::new(Dist::single()));
    }
    check_world(e, &world)?;
    let device = rank_device(&e.experiment.device, &world)?;
    let timeout = Duration::from_secs_f64(e.distributed.timeout_s);
    let dist = Rc::new(Dist::join(world, device, timeout)?);
    let result = (|| {
        dist.agree("configuration", &resolved.to_record())?;
        dist.agree("sipt build", &build_id())?;
        // Rank 0 makes the run directory and tells the others where it is.
        let made = if dist.is_writer() {
            let dir = match out {
                Some(dir) => dir.to_path_buf(),
                None => rundir::new_run_path(e)?,
            };
            Some(RunDir::create(&dir, resolved, resume)?)
        } else {
            None
        };
        let mine = made
            .as_ref()
            .map(|r| r.path().to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = PathBuf::from(
            String::from_utf8_lossy(&dist.all_gather_bytes(mine.as_bytes())?[0]).into_owned(),
        );
        let run = match made {
            Some(run) => run,
            None => RunDir::follow(&path)?,
        };
        if dist.is_writer() {
            tracing::info!(
                "run directory: {} ({} ranks, {:?} backend)",
                run.path().display(),
                dist.size(),
                dist.group().map(|g| g.backend)
            );
        }
        run_in(resolved, registry, &run, resume, Rc::clone(&dist))
    })();
    if let Err(err) = &result {
        dist.post_error(&format!("{err:#}"));
        if dist.is_writer() {
            // Rank 0 serves the store the others read errors from: it wakes the ranks waiting
            // for it in a collective and keeps the store up until they have read this error.
            dist.close_after_error(ERROR_LINGER);
        }
    }
    result
}

/// How long rank 0 keeps the rendezvous store up at most, after posting its error, for the
/// other ranks to read it.
const ERROR_LINGER: Duration = Duration::from_secs(10);

/// Refusals that need the world size, before any work: each in one line.
fn check_world(e: &Experiment, world: &World) -> Result<()> {
    let n = world.size;
    if e.train.batch_size % n != 0 {
        bail!(
            "train.batch_size = {} is not divisible by the world size {n}: every rank takes an equal share of the global batch",
            e.train.batch_size
        );
    }
    if e.eval.prefixes % n != 0 {
        bail!(
            "eval.prefixes = {} is not divisible by the world size {n}: every rank evaluates an equal share",
            e.eval.prefixes
        );
    }
    Ok(())
}

/// The device of this rank: `cuda:LOCAL_RANK` on a GPU machine (one device per rank), else the
/// CPU.
fn rank_device(spec: &str, world: &World) -> Result<Device> {
    let cuda = match spec {
        "cpu" => false,
        "auto" => tch::Cuda::is_available(),
        "cuda" => true,
        other => bail!(
            "experiment.device = \"{other}\" names one device; a run of {} ranks gives rank r the GPU cuda:LOCAL_RANK: set device = \"cuda\" (or \"auto\", or \"cpu\")",
            world.size
        ),
    };
    if !cuda {
        return Ok(Device::Cpu);
    }
    let count = tch::Cuda::device_count() as usize;
    if world.local_size > count {
        bail!(
            "{} local ranks but this machine has {count} CUDA device(s): start at most one rank per GPU",
            world.local_size
        );
    }
    Ok(Device::Cuda(world.local_rank))
}

/// What makes two sipt programs the same build: their executables' contents.
fn build_id() -> String {
    use std::hash::{Hash, Hasher};
    let exe = std::env::current_exe().ok();
    let bytes = exe.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{} {:016x}", env!("CARGO_PKG_VERSION"), h.finish())
}

/// Run the experiment into `run` (continuing its latest checkpoint when `resume`) over `dist`.
pub fn run_in(
    resolved: &Resolved,
    registry: &Registry,
    run: &RunDir,
    resume: bool,
    dist: Rc<Dist>,
) -> Result<()> {
    let e = &resolved.experiment;
    let objective = objective::build(&e.train.objective.name, e.train.objective.options_value())
        .map_err(|err| anyhow!("train.objective: {err}"))?;
    let prepared = train::prepare(resolved, run, resume, Rc::clone(&dist))?;
    train::check_lengths(e, &prepared.policy)?;
    let context = sipt_api::PluginContext {
        ranks: dist.size() as u32,
        ..paths::plugin_context(resolved)
    };
    let plugins = Plugins::build(e, registry, &context)?;
    if objective.needs().candidates {
        sip::train(e, run, prepared, &plugins, objective)
    } else {
        train::ntp::train(e, run, prepared, &plugins)
    }
}

/// Run the experiment alone into `run` (sweep trials and tests).
pub fn run(resolved: &Resolved, registry: &Registry, run: &RunDir, resume: bool) -> Result<()> {
    run_in(resolved, registry, run, resume, Rc::new(Dist::single()))
}
