//! Sweeps: a `[sweep]` table turns one experiment file into trials — a grid over any keys
//! (plugin choices included), lists zipped together, and seeded random draws — each run as a
//! separate `sipt run` process in its own directory, by the local executor (child processes)
//! or the Slurm executor (one job array).
//!
//! The sweep directory holds `sweep.json` (the definition's fingerprint and each trial's
//! status, rewritten atomically), one folder per trial (with its own complete
//! `experiment.toml`, so any trial can be rerun alone), and at the end `results.md` and
//! `results.csv` plus PNG plots of the key curves across trials. `--resume` skips finished
//! trials, reruns failed or interrupted ones (continuing from their last checkpoint), and
//! refuses a sweep whose definition changed.

mod local;
pub mod monitor;
pub mod plots;
mod report;
pub mod slurm;

pub use report::report;

use crate::config::{to_toml, ExecutorKind, Resolved, SweepSection};
use crate::rng::SplitMix;
use crate::rundir::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One trial: its name and the overrides that make it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub name: String,
    pub overrides: Vec<(String, toml::Value)>,
}

fn short(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        // A plugin table is known by its type.
        toml::Value::Table(t) if t.get("type").is_some_and(|v| v.is_str()) => {
            t["type"].as_str().unwrap_or_default().to_string()
        }
        other => other.to_string(),
    };
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The longest trial folder name; longer ones are cut and keep a fingerprint of the whole.
const MAX_TRIAL_NAME: usize = 120;

pub(crate) fn trial_name(overrides: &[(String, toml::Value)]) -> String {
    // A sweep that names its trials (experiment.name) is taken at its word.
    let name = match overrides.iter().find(|(k, _)| k == "experiment.name") {
        Some((_, toml::Value::String(name))) => short(&toml::Value::String(name.clone())),
        _ => overrides
            .iter()
            .map(|(k, v)| format!("{}-{}", k.rsplit('.').next().unwrap_or(k), short(v)))
            .collect::<Vec<_>>()
            .join("_"),
    };
    folder_name(name)
}

/// `name` as one folder inside the sweep's: never `.` or `..` (`short` already removed
/// separators), and not longer than [`MAX_TRIAL_NAME`] characters.
fn folder_name(name: String) -> String {
    let name = if name.chars().all(|c| c == '.') {
        name.replace('.', "_")
    } else {
        name
    };
    if name.chars().count() <= MAX_TRIAL_NAME {
        return name;
    }
    let hash = crate::paths::fingerprint(&[], &name);
    let head: String = name.chars().take(MAX_TRIAL_NAME - 17).collect();
    format!("{head}-{hash:016x}")
}

/// Expand a sweep into its trials: grid × zip, plus `samples` random draws.
pub fn trials(sweep: &SweepSection) -> Result<Vec<Trial>> {
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (key, values) in &sweep.grid {
        if values.is_empty() {
            bail!("sweep.grid.\"{key}\" has no values");
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    if !sweep.zip.is_empty() {
        let lengths: Vec<usize> = sweep.zip.values().map(Vec::len).collect();
        if lengths.iter().any(|&l| l != lengths[0]) {
            bail!("sweep.zip lists must all have the same length (found {lengths:?})");
        }
        let zipped: Vec<Vec<(String, toml::Value)>> = (0..lengths[0])
            .map(|i| {
                sweep
                    .zip
                    .iter()
                    .map(|(k, vs)| (k.clone(), vs[i].clone()))
                    .collect()
            })
            .collect();
        combos = combos
            .into_iter()
            .flat_map(|c| {
                zipped.iter().map(move |z| {
                    let mut c = c.clone();
                    c.extend(z.iter().cloned());
                    c
                })
            })
            .collect();
    }
    if !sweep.random.is_empty() {
        if sweep.samples == 0 {
            bail!("sweep.random needs sweep.samples > 0");
        }
        let mut rng = SplitMix::new(sweep.seed);
        let base = combos;
        combos = Vec::new();
        for c in &base {
            for _ in 0..sweep.samples {
                let mut c = c.clone();
                for (key, values) in &sweep.random {
                    if values.is_empty() {
                        bail!("sweep.random.\"{key}\" has no values");
                    }
                    c.push((
                        key.clone(),
                        values[rng.below(values.len() as u64) as usize].clone(),
                    ));
                }
                combos.push(c);
            }
        }
    }
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for overrides in combos {
        let mut name = trial_name(&overrides);
        if name.is_empty() {
            name = "base".into();
        }
        let n = seen.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            name = format!("{name}_{n}");
        }
        out.push(Trial { name, overrides });
    }
    Ok(out)
}

/// A trial's complete experiment: the sweep's file with the trial's overrides applied and the
/// sweep table removed. Checked like any experiment file.
pub fn trial_config(
    file: &Path,
    base: &[crate::config::SetOverride],
    trial: &Trial,
) -> Result<Resolved, crate::config::Problems> {
    // The command line's --set first, then the trial's own values.
    let mut sets: Vec<crate::config::SetOverride> = base.to_vec();
    sets.extend(
        trial
            .overrides
            .iter()
            .map(|(k, v)| crate::config::SetOverride {
                key: k.split('.').map(String::from).collect(),
                value: v.clone(),
                raw: format!("{k}={v}"),
            }),
    );
    let mut resolved = crate::config::resolve(file, &sets)?;
    resolved.experiment.sweep = None;
    Ok(resolved)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    /// Submitted to a scheduler, waiting for resources.
    Queued,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialState {
    pub trial: Trial,
    pub status: Status,
    #[serde(default)]
    pub seconds: f64,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepState {
    /// Fingerprint of every trial's resolved configuration.
    pub definition: String,
    pub trials: Vec<TrialState>,
    /// `local` or `slurm`.
    #[serde(default = "local_name")]
    pub executor: String,
    /// Slurm job arrays submitted for this sweep, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slurm_jobs: Vec<slurm::Job>,
}

fn local_name() -> String {
    "local".into()
}

impl SweepState {
    /// Read a sweep directory's `sweep.json`.
    pub fn read(dir: &Path) -> Result<SweepState> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }
}

pub const STATE_FILE: &str = "sweep.json";
pub const TRIAL_CONFIG: &str = "experiment.toml";

pub(crate) fn save_state(dir: &Path, state: &SweepState) -> Result<()> {
    write_atomic(
        &dir.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// The `sipt` binary trials are started with. When the binary was rebuilt or reinstalled while
/// the sweep runs, Linux reports this process's file as "... (deleted)"; new trials then use the
/// file now at that path, with a warning.
pub(crate) fn sipt_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the sipt executable")?;
    if exe.exists() {
        return Ok(exe);
    }
    let text = exe.to_string_lossy();
    if let Some(path) = text.strip_suffix(" (deleted)") {
        let path = PathBuf::from(path);
        if path.exists() {
            tracing::warn!(
                "{} changed since this sweep started; new trials run the new binary",
                path.display()
            );
            return Ok(path);
        }
    }
    bail!("the sipt executable {} is gone", exe.display())
}

/// Seconds between status lines of running trials when not on a terminal, by default.
pub const DEFAULT_STATUS_EVERY: f64 = 30.0;

/// How to run the trials.
pub struct Executor {
    pub kind: ExecutorKind,
    pub jobs: usize,
    /// CUDA devices handed out to running trials, `ranks` each (`experiment.device = "cuda:N"`
    /// for a trial of one rank).
    pub devices: Vec<usize>,
    /// Ranks of each trial (local executor).
    pub ranks: usize,
    pub fail_fast: bool,
    pub resume: bool,
    /// Slurm: submit and return without tracking the job.
    pub detach: bool,
    /// Seconds between status lines when not on a terminal.
    pub status_every: f64,
}

impl Executor {
    /// What the sweep table asks for (executor, fail-fast), one trial at a time, no devices
    /// handed out; the command line adjusts the rest.
    pub fn from_file(sweep: &SweepSection) -> Executor {
        Executor {
            kind: sweep.executor,
            jobs: 1,
            devices: Vec::new(),
            ranks: sweep.ranks.max(1),
            fail_fast: sweep.fail_fast,
            resume: false,
            detach: false,
            status_every: DEFAULT_STATUS_EVERY,
        }
    }
}

/// Run a sweep into `dir`. Returns the number of failed trials.
pub fn run(
    resolved: &Resolved,
    base: &[crate::config::SetOverride],
    dir: &Path,
    executor: &Executor,
    plugins: &[PathBuf],
) -> Result<usize> {
    let sweep = resolved
        .experiment
        .sweep
        .as_ref()
        .context("this experiment has no [sweep] table")?;
    let trials = trials(sweep)?;
    let mut configs = Vec::new();
    let mut problems = Vec::new();
    for t in &trials {
        match trial_config(&resolved.file, base, t) {
            Ok(c) => configs.push(to_toml(&c.experiment)),
            Err(p) => {
                for mut problem in p.0 {
                    problem.message = format!("in trial {}: {}", t.name, problem.message);
                    problems.push(problem);
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(crate::config::Problems(problems).into());
    }
    let fingerprint = format!(
        "{:016x}",
        crate::paths::fingerprint(&[], &configs.join("\n---\n"))
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let mut state = if executor.resume {
        if !state_path.exists() {
            bail!("cannot resume: {} has no {STATE_FILE}", dir.display());
        }
        let state = SweepState::read(dir)?;
        if state.definition != fingerprint {
            bail!(
                "cannot resume {}: the sweep's definition changed since it started (its trials' configurations differ)",
                dir.display()
            );
        }
        state
    } else {
        if state_path.exists() {
            bail!(
                "{} already holds a sweep; pass --resume to continue it, or choose another --out",
                dir.display()
            );
        }
        SweepState {
            definition: fingerprint,
            trials: trials
                .iter()
                .map(|t| TrialState {
                    trial: t.clone(),
                    status: Status::Pending,
                    seconds: 0.0,
                })
                .collect(),
            executor: executor.kind.as_str().into(),
            slurm_jobs: Vec::new(),
        }
    };
    if executor.resume && state.executor != executor.kind.as_str() {
        bail!(
            "cannot resume {} with the {} executor: it was started with the {} executor",
            dir.display(),
            executor.kind.as_str(),
            state.executor
        );
    }
    for (t, config) in state.trials.iter_mut().zip(&configs) {
        let tdir = dir.join(&t.trial.name);
        std::fs::create_dir_all(&tdir)?;
        write_atomic(&tdir.join(TRIAL_CONFIG), config.as_bytes())?;
    }
    save_state(dir, &state)?;
    let mut monitor = monitor::Monitor::new(dir, state.trials.len(), executor.status_every);
    match executor.kind {
        ExecutorKind::Local => local::run(dir, &mut state, executor, plugins, &mut monitor)?,
        ExecutorKind::Slurm => {
            let name = &resolved.experiment.experiment.name;
            let finished = slurm::run(
                dir,
                &mut state,
                &sweep.slurm,
                name,
                executor,
                plugins,
                &mut monitor,
            )?;
            if !finished {
                // Detached: the job runs on; `sipt status` follows it, `--resume` attaches.
                return Ok(0);
            }
        }
    }
    monitor.finish(&state);
    report(dir)?;
    Ok(state
        .trials
        .iter()
        .filter(|t| t.status != Status::Done)
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_names_stay_inside_the_sweep_folder() {
        let named = |n: &str| vec![("experiment.name".to_string(), toml::Value::String(n.into()))];
        for escape in ["..", ".", "../up", "a/../../b", "/abs"] {
            let name = trial_name(&named(escape));
            assert!(
                !name.contains('/') && name != ".." && name != "." && !name.is_empty(),
                "{escape} -> {name}"
            );
        }
        let long = trial_name(&[(
            "data.train".to_string(),
            toml::Value::String("x".repeat(500)),
        )]);
        assert!(long.chars().count() <= MAX_TRIAL_NAME, "{long}");
        let other = trial_name(&[(
            "data.train".to_string(),
            toml::Value::String("x".repeat(501)),
        )]);
        assert_ne!(long, other, "cut names must stay distinct");
    }

    fn v(i: i64) -> toml::Value {
        toml::Value::Integer(i)
    }

    #[test]
    fn grid_zip_and_random() {
        let mut s = SweepSection::default();
        s.grid.insert("sip.rollouts".into(), vec![v(1), v(2)]);
        s.grid
            .insert("experiment.seed".into(), vec![v(0), v(1), v(2)]);
        let t = trials(&s).unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0].name, "seed-0_rollouts-1");
        s.zip.insert(
            "train.lr".into(),
            vec![toml::Value::Float(0.1), toml::Value::Float(0.2)],
        );
        s.zip.insert("train.steps".into(), vec![v(10), v(20)]);
        assert_eq!(trials(&s).unwrap().len(), 12);
        s.zip.insert("train.batch_size".into(), vec![v(1)]);
        assert!(trials(&s).is_err());
        let mut r = SweepSection::default();
        r.random.insert(
            "train.lr".into(),
            vec![
                toml::Value::Float(0.1),
                toml::Value::Float(0.2),
                toml::Value::Float(0.3),
            ],
        );
        r.samples = 5;
        r.seed = 9;
        let a = trials(&r).unwrap();
        assert_eq!(a.len(), 5);
        assert_eq!(a, trials(&r).unwrap());
        assert!(a.iter().all(|t| t.name.starts_with("lr-")));
    }
}
