//! Sweeps: a `[sweep]` table turns one experiment file into trials — a grid over any keys
//! (plugin choices included), lists zipped together, and seeded random draws — run by the local
//! executor as separate `sipt run` processes, one directory per trial.
//!
//! The sweep directory holds `sweep.json` (the definition's fingerprint and each trial's
//! status, rewritten atomically), one folder per trial (with its own complete
//! `experiment.toml`, so any trial can be rerun alone), and at the end `results.md` and
//! `results.csv`. `--resume` skips finished trials, reruns failed or interrupted ones, and
//! refuses a sweep whose definition changed.

use crate::config::{to_toml, Resolved, SweepSection};
use crate::metrics;
use crate::rng::SplitMix;
use crate::rundir::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn trial_name(overrides: &[(String, toml::Value)]) -> String {
    // A sweep that names its trials (experiment.name) is taken at its word.
    if let Some((_, toml::Value::String(name))) =
        overrides.iter().find(|(k, _)| k == "experiment.name")
    {
        return short(&toml::Value::String(name.clone()));
    }
    overrides
        .iter()
        .map(|(k, v)| format!("{}-{}", k.rsplit('.').next().unwrap_or(k), short(v)))
        .collect::<Vec<_>>()
        .join("_")
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
}

pub const STATE_FILE: &str = "sweep.json";
pub const TRIAL_CONFIG: &str = "experiment.toml";

fn save_state(dir: &Path, state: &SweepState) -> Result<()> {
    write_atomic(
        &dir.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// How to run the trials.
pub struct Executor {
    pub jobs: usize,
    /// CUDA devices handed out one per running trial (`experiment.device = "cuda:N"`).
    pub devices: Vec<usize>,
    pub fail_fast: bool,
    pub resume: bool,
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
        crate::data::fingerprint(&[], &configs.join("\n---\n"))
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let state_path = dir.join(STATE_FILE);
    let mut state = if executor.resume {
        let text = std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot resume: {} has no {STATE_FILE}", dir.display()))?;
        let state: SweepState = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", state_path.display()))?;
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
        }
    };
    for (t, config) in state.trials.iter_mut().zip(&configs) {
        let tdir = dir.join(&t.trial.name);
        std::fs::create_dir_all(&tdir)?;
        write_atomic(&tdir.join(TRIAL_CONFIG), config.as_bytes())?;
        if t.status == Status::Running || t.status == Status::Failed {
            t.status = Status::Pending; // interrupted or failed before: run again
        }
    }
    save_state(dir, &state)?;
    let exe = std::env::current_exe().context("cannot find the sipt executable")?;
    let jobs = executor.jobs.max(1);
    let mut running: Vec<(usize, Child, Instant, Option<usize>)> = Vec::new();
    let mut free_devices = executor.devices.clone();
    let total = state.trials.len();
    let mut stop_launching = false;
    tracing::info!(
        "sweep of {total} trial(s) in {}, {jobs} at a time",
        dir.display()
    );
    loop {
        // Launch while there is room.
        while !stop_launching && running.len() < jobs {
            let Some(i) = state
                .trials
                .iter()
                .position(|t| t.status == Status::Pending)
            else {
                break;
            };
            let tdir = dir.join(&state.trials[i].trial.name);
            let resume_trial = tdir.join(crate::rundir::CONFIG_FILE).exists();
            let device = if executor.devices.is_empty() {
                None
            } else {
                free_devices.pop()
            };
            let mut cmd = Command::new(&exe);
            cmd.arg("run")
                .arg(tdir.join(TRIAL_CONFIG))
                .arg("--out")
                .arg(&tdir);
            for p in plugins {
                cmd.arg("--plugin").arg(p);
            }
            if resume_trial {
                cmd.arg("--resume");
            }
            if let Some(d) = device {
                cmd.args(["--set", &format!("experiment.device=cuda:{d}")]);
            }
            let log = std::fs::File::create(tdir.join("log.txt"))?;
            cmd.stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log));
            let child = cmd.spawn().context("cannot start a trial")?;
            state.trials[i].status = Status::Running;
            save_state(dir, &state)?;
            tracing::info!(
                "trial {} started{}",
                state.trials[i].trial.name,
                if resume_trial { " (resuming)" } else { "" }
            );
            running.push((i, child, Instant::now(), device));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < running.len() {
            let finished = running[k].1.try_wait()?;
            match finished {
                None => k += 1,
                Some(status) => {
                    let (i, _, started, device) = running.swap_remove(k);
                    if let Some(d) = device {
                        free_devices.push(d);
                    }
                    let t = &mut state.trials[i];
                    t.seconds = started.elapsed().as_secs_f64();
                    if status.success() {
                        t.status = Status::Done;
                        tracing::info!("trial {} done in {:.0}s", t.trial.name, t.seconds);
                    } else {
                        t.status = Status::Failed;
                        let log = dir.join(&t.trial.name).join("log.txt");
                        let tail = std::fs::read_to_string(&log).unwrap_or_default();
                        let last = tail
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("");
                        tracing::error!(
                            "trial {} failed: {last} (log: {})",
                            t.trial.name,
                            log.display()
                        );
                        if executor.fail_fast {
                            stop_launching = true;
                        }
                    }
                    save_state(dir, &state)?;
                    let done = state
                        .trials
                        .iter()
                        .filter(|t| matches!(t.status, Status::Done | Status::Failed))
                        .count();
                    tracing::info!("sweep: {done}/{total} trials finished");
                }
            }
        }
    }
    report(dir)?;
    Ok(state
        .trials
        .iter()
        .filter(|t| t.status != Status::Done)
        .count())
}

/// Final and best value of each metric worth comparing, per trial.
fn summarize(rows: &[metrics::Row]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let wanted = |k: &str| {
        k.starts_with("eval/") && !k.ends_with("failures")
            || k.starts_with("loss/")
            || k.starts_with("chosen/")
            || (k.starts_with("reward/") && k.ends_with("/mean"))
            || k == "judge/calls_per_prefix"
            || k == "time/step"
    };
    let mut keys: Vec<&String> = rows
        .iter()
        .flat_map(|r| r.values.keys())
        .filter(|k| wanted(k))
        .collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let values: Vec<f64> = rows.iter().filter_map(|r| r.get(key)).collect();
        if let Some(last) = values.last() {
            out.insert(format!("{key} (final)"), *last);
        }
        if key.starts_with("eval/") {
            let lower_is_better = key.ends_with("loss") || key.ends_with("perplexity");
            let best = values
                .iter()
                .copied()
                .fold(None, |acc: Option<f64>, v| match acc {
                    Some(a) if (lower_is_better && a <= v) || (!lower_is_better && a >= v) => {
                        Some(a)
                    }
                    _ => Some(v),
                });
            if let Some(b) = best {
                out.insert(format!("{key} (best)"), b);
            }
        }
    }
    out
}

/// Write `results.md` and `results.csv` for a sweep directory, or summarize one run.
pub fn report(dir: &Path) -> Result<String> {
    let state_path = dir.join(STATE_FILE);
    let runs: Vec<(String, String, PathBuf)> = if state_path.exists() {
        let state: SweepState = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
            .with_context(|| format!("{} is damaged", state_path.display()))?;
        state
            .trials
            .iter()
            .map(|t| {
                let status = format!("{:?}", t.status).to_lowercase();
                (t.trial.name.clone(), status, dir.join(&t.trial.name))
            })
            .collect()
    } else if dir.join(crate::rundir::METRICS_FILE).exists() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![(name, "run".into(), dir.to_path_buf())]
    } else {
        bail!(
            "{} is neither a sweep directory ({STATE_FILE}) nor a run ({})",
            dir.display(),
            crate::rundir::METRICS_FILE
        );
    };
    let mut table: Vec<(String, String, BTreeMap<String, f64>)> = Vec::new();
    for (name, status, path) in runs {
        let rows = metrics::read(&path.join(crate::rundir::METRICS_FILE)).unwrap_or_default();
        table.push((name, status, summarize(&rows)));
    }
    let mut columns: Vec<String> = table
        .iter()
        .flat_map(|(_, _, m)| m.keys().cloned())
        .collect();
    columns.sort();
    columns.dedup();
    let mut md = format!(
        "# Results: {}\n\n| trial | status | {} |\n|---|---|{}\n",
        dir.display(),
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    let mut csv = format!(
        "trial,status,{}\n",
        columns
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    for (name, status, m) in &table {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| m.get(c).map(|v| format!("{v:.4}")).unwrap_or_default())
            .collect();
        md.push_str(&format!("| {name} | {status} | {} |\n", cells.join(" | ")));
        csv.push_str(&format!("{name},{status},{}\n", cells.join(",")));
    }
    write_atomic(&dir.join("results.md"), md.as_bytes())?;
    write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

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
