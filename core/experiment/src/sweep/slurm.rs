//! The Slurm executor: the sweep's trials as one job array (`sbatch --array`), with each
//! trial's time, GPUs, CPUs, memory, partition and the array's parallelism taken from
//! `[sweep.slurm]`.
//!
//! Each array task runs `sipt run` on its trial's `experiment.toml` (with `--resume` when the
//! trial already started, so a rerun continues from its last checkpoint) and, when that ends,
//! writes the exit status to the trial's `exit_code` file. The tracker (the `sipt sweep`
//! process) follows the array with `squeue` and those files: it needs no Slurm accounting.
//! A task that leaves the queue without an `exit_code` was killed (time limit, cancellation,
//! node failure) and counts as failed. Interrupting the tracker leaves the job running;
//! `sipt sweep --resume` attaches to it again, or submits the unfinished trials anew once it
//! is gone; `sipt status DIR` shows where it stands.

use super::monitor::Monitor;
use super::{save_state, Executor, Status, SweepState, TrialState, TRIAL_CONFIG};
use crate::config::SlurmSection;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One submitted job array.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Slurm's job id.
    pub id: String,
    /// The trials it runs: array index = trial index in `sweep.json`.
    pub trials: Vec<usize>,
    /// The batch script submitted.
    pub script: PathBuf,
    /// UTC time of submission.
    pub submitted: String,
}

/// The file a finished array task leaves in its trial directory.
pub const EXIT_FILE: &str = "exit_code";

/// What an `exit_code` file says: the exit status and seconds the trial ran.
fn read_exit(trial_dir: &Path) -> Option<(i32, f64)> {
    let text = std::fs::read_to_string(trial_dir.join(EXIT_FILE)).ok()?;
    let mut code = None;
    let mut seconds = 0.0;
    for part in text.split_whitespace() {
        if let Some(v) = part.strip_prefix("rc=") {
            code = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("seconds=") {
            seconds = v.parse().unwrap_or(0.0);
        }
    }
    code.map(|c| (c, seconds))
}

/// Quote for bash: single quotes, with embedded single quotes closed and escaped.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// What each array task starts: the `sipt` binary (visible from the compute nodes), the
/// directory it runs in, and external plugin libraries to load.
pub struct Launch {
    pub exe: PathBuf,
    pub workdir: PathBuf,
    pub plugins: Vec<PathBuf>,
}

/// The batch script of one job array over `indices`.
pub fn script(
    dir: &Path,
    state: &SweepState,
    indices: &[usize],
    slurm: &SlurmSection,
    name: &str,
    launch: &Launch,
) -> String {
    let Launch {
        exe,
        workdir,
        plugins,
    } = launch;
    let mut array = indices
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if slurm.max_parallel > 0 {
        array.push_str(&format!("%{}", slurm.max_parallel));
    }
    let job_name: String = format!("sipt-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut s = String::from("#!/bin/bash\n");
    s.push_str("# Written by `sipt sweep` (Slurm executor); one array task per trial.\n");
    let mut opt = |o: String| s.push_str(&format!("#SBATCH {o}\n"));
    opt(format!("--job-name={job_name}"));
    opt(format!("--array={array}"));
    opt(format!(
        "--output={}",
        dir.join("slurm").join("%A_%a.out").display()
    ));
    opt(format!("--chdir={}", workdir.display()));
    if !slurm.time.is_empty() {
        opt(format!("--time={}", slurm.time));
    }
    if !slurm.partition.is_empty() {
        opt(format!("--partition={}", slurm.partition));
    }
    if slurm.gpus > 0 {
        opt(format!("--gres=gpu:{}", slurm.gpus));
    }
    if slurm.cpus > 0 {
        opt(format!("--cpus-per-task={}", slurm.cpus));
    }
    let ranks = slurm.nodes.max(1) * slurm.tasks_per_node.max(1);
    if slurm.nodes > 0 {
        opt(format!("--nodes={}", slurm.nodes));
    }
    if slurm.tasks_per_node > 0 {
        opt(format!("--ntasks-per-node={}", slurm.tasks_per_node));
    }
    if !slurm.mem.is_empty() {
        opt(format!("--mem={}", slurm.mem));
    }
    if !slurm.account.is_empty() {
        opt(format!("--account={}", slurm.account));
    }
    if !slurm.qos.is_empty() {
        opt(format!("--qos={}", slurm.qos));
    }
    for a in &slurm.sbatch_args {
        opt(a.clone());
    }
    s.push_str("set -u\n");
    s.push_str("trials=(\n");
    for t in &state.trials {
        s.push_str(&format!("  {}\n", sh_quote(&t.trial.name)));
    }
    s.push_str(")\n");
    s.push_str(&format!(
        "trial_dir={}/\"${{trials[$SLURM_ARRAY_TASK_ID]}}\"\n",
        sh_quote(&dir.display().to_string())
    ));
    for line in &slurm.setup {
        s.push_str(line);
        s.push('\n');
    }
    s.push_str("resume=()\n");
    s.push_str(&format!(
        "[ -f \"$trial_dir/{}\" ] && resume=(--resume)\n",
        crate::rundir::CONFIG_FILE
    ));
    // A trial of several ranks: one task each, started by srun (the ranks find each other
    // through Slurm's environment); a failing task ends the step.
    let launcher = if ranks > 1 {
        "srun --kill-on-bad-exit=1 "
    } else {
        ""
    };
    let mut cmd = format!(
        "{launcher}{} run \"$trial_dir/{TRIAL_CONFIG}\" --out \"$trial_dir\" \"${{resume[@]}}\"",
        sh_quote(&exe.display().to_string())
    );
    for p in plugins {
        cmd.push_str(&format!(" --plugin {}", sh_quote(&p.display().to_string())));
    }
    s.push_str(
        "echo \"sipt trial ${trials[$SLURM_ARRAY_TASK_ID]} on $(hostname), job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"\n",
    );
    s.push_str(&format!("{cmd} > \"$trial_dir/log.txt\" 2>&1\n"));
    s.push_str("rc=$?\n");
    s.push_str(&format!(
        "printf 'rc=%s seconds=%s\\n' \"$rc\" \"$SECONDS\" > \"$trial_dir/.{EXIT_FILE}.tmp\" && mv \"$trial_dir/.{EXIT_FILE}.tmp\" \"$trial_dir/{EXIT_FILE}\"\n"
    ));
    s.push_str("exit $rc\n");
    s
}

/// The job's tasks still known to Slurm: array index → state (PENDING, RUNNING, ...).
fn squeue(job: &str) -> Result<HashMap<usize, String>> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-j", job, "-o", "%i|%T"])
        .output()
        .context("cannot run squeue (is Slurm installed and SLURM_CONF set?)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // A job that ended and was purged is "invalid" to squeue: none of its tasks remain.
        if stderr.contains("Invalid job id") {
            return Ok(HashMap::new());
        }
        bail!("squeue failed: {}", stderr.trim());
    }
    let mut tasks = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((id, state)) = line.split_once('|') else {
            continue;
        };
        let Some((_, index)) = id.trim().rsplit_once('_') else {
            continue;
        };
        if let Ok(i) = index.parse::<usize>() {
            tasks.insert(i, state.trim().to_string());
        }
    }
    Ok(tasks)
}

/// What one look at the queue and the trial directories says about a trial of the job.
enum Seen {
    Finished(i32, f64),
    Queued,
    Running,
    /// Neither in the queue nor finished: killed, or its file not visible yet.
    Gone,
}

impl Seen {
    /// Set a trial's status from what was seen, except after `Gone`, which the caller judges
    /// (a kill, or a finished task's file not visible yet). Returns whether Slurm still has
    /// the task.
    fn apply(&self, t: &mut TrialState) -> bool {
        match *self {
            Seen::Finished(rc, secs) => {
                t.seconds = secs;
                t.status = if rc == 0 {
                    Status::Done
                } else {
                    Status::Failed
                };
                false
            }
            Seen::Queued => {
                t.status = Status::Queued;
                true
            }
            Seen::Running => {
                t.status = Status::Running;
                true
            }
            Seen::Gone => false,
        }
    }
}

fn look(dir: &Path, state: &SweepState, job: &Job) -> Result<Vec<(usize, Seen)>> {
    let queue = squeue(&job.id)?;
    Ok(job
        .trials
        .iter()
        .map(|&i| {
            let tdir = dir.join(&state.trials[i].trial.name);
            let seen = if let Some((rc, secs)) = read_exit(&tdir) {
                Seen::Finished(rc, secs)
            } else {
                match queue.get(&i).map(String::as_str) {
                    Some("PENDING") | Some("REQUEUED") | Some("SUSPENDED") => Seen::Queued,
                    Some(_) => Seen::Running,
                    None => Seen::Gone,
                }
            };
            (i, seen)
        })
        .collect())
}

/// Bring the statuses of the latest job's trials up to date (for `sipt status`).
pub fn refresh(dir: &Path, state: &mut SweepState) -> Result<()> {
    let Some(job) = state.slurm_jobs.last().cloned() else {
        return Ok(());
    };
    for (i, seen) in look(dir, state, &job)? {
        let t = &mut state.trials[i];
        seen.apply(t);
        if matches!(seen, Seen::Gone) && matches!(t.status, Status::Queued | Status::Running) {
            t.status = Status::Failed;
        }
    }
    Ok(())
}

fn submit(
    dir: &Path,
    state: &mut SweepState,
    indices: &[usize],
    slurm: &SlurmSection,
    name: &str,
    plugins: &[PathBuf],
) -> Result<Job> {
    let launch = Launch {
        exe: super::sipt_exe()?,
        workdir: std::env::current_dir().context("cannot read the current directory")?,
        plugins: plugins
            .iter()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            .collect(),
    };
    for &i in indices {
        let _ = std::fs::remove_file(dir.join(&state.trials[i].trial.name).join(EXIT_FILE));
    }
    let text = script(dir, state, indices, slurm, name, &launch);
    let scripts = dir.join("slurm");
    std::fs::create_dir_all(&scripts)
        .with_context(|| format!("cannot create {}", scripts.display()))?;
    let path = scripts.join(format!("array-{}.sbatch", state.slurm_jobs.len() + 1));
    crate::rundir::write_atomic(&path, text.as_bytes())?;
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(&path)
        .output()
        .context("cannot run sbatch (is Slurm installed and SLURM_CONF set?)")?;
    if !out.status.success() {
        bail!(
            "sbatch refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed no job id: {stdout:?}");
    }
    let job = Job {
        id,
        trials: indices.to_vec(),
        script: path,
        submitted: chrono::Utc::now().to_rfc3339(),
    };
    for &i in indices {
        state.trials[i].status = Status::Queued;
    }
    state.slurm_jobs.push(job.clone());
    save_state(dir, state)?;
    Ok(job)
}

/// Submit (or, on resume, attach to) the sweep's job array and follow it until every trial
/// of it ended. Returns false when detached (submitted, not followed).
pub(super) fn run(
    dir: &Path,
    state: &mut SweepState,
    slurm: &SlurmSection,
    name: &str,
    executor: &Executor,
    plugins: &[PathBuf],
    monitor: &mut Monitor,
) -> Result<bool> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let dir = dir.as_path();
    // Attach to the latest job if Slurm still runs some of it; otherwise account for what it
    // finished and submit what is left.
    let mut job = None;
    if let Some(last) = state.slurm_jobs.last().cloned() {
        refresh(dir, state)?;
        let alive = last
            .trials
            .iter()
            .any(|&i| matches!(state.trials[i].status, Status::Queued | Status::Running));
        if alive {
            monitor.event(&format!("attaching to Slurm job {}", last.id));
            job = Some(last);
        }
    }
    let job = match job {
        Some(j) => j,
        None => {
            let todo: Vec<usize> = (0..state.trials.len())
                .filter(|&i| state.trials[i].status != Status::Done)
                .collect();
            if todo.is_empty() {
                return Ok(true);
            }
            let job = submit(dir, state, &todo, slurm, name, plugins)?;
            monitor.event(&format!(
                "submitted Slurm job {} ({} trial(s), script {})",
                job.id,
                todo.len(),
                job.script.display()
            ));
            for &i in &todo {
                let name = &state.trials[i].trial.name;
                if dir.join(name).join(crate::rundir::CONFIG_FILE).exists() {
                    monitor.event(&format!("trial {name} queued (resuming)"));
                }
            }
            job
        }
    };
    save_state(dir, state)?;
    if executor.detach {
        println!(
            "Slurm job {} submitted; `sipt status {}` shows its trials, `sipt sweep ... --out {} --resume` follows it",
            job.id,
            dir.display(),
            dir.display()
        );
        return Ok(false);
    }
    let poll = Duration::from_secs(2);
    let mut gone_since: HashMap<usize, Instant> = HashMap::new();
    let mut cancelled = false;
    loop {
        let seen = look(dir, state, &job)?;
        let mut changed = false;
        let mut any_active = false;
        for (i, s) in seen {
            let t = &mut state.trials[i];
            let before = t.status;
            any_active |= s.apply(t);
            if matches!(s, Seen::Gone) && matches!(t.status, Status::Queued | Status::Running) {
                // Give a finished task's file a moment to become visible.
                let since = *gone_since.entry(i).or_insert_with(Instant::now);
                if since.elapsed() < Duration::from_secs(10) {
                    any_active = true;
                } else if cancelled && t.status == Status::Queued {
                    t.status = Status::Pending; // never started before fail-fast cancelled it
                } else {
                    t.status = Status::Failed;
                }
            }
            if t.status != before {
                changed = true;
                let name = t.trial.name.clone();
                let tdir = dir.join(&name);
                match t.status {
                    Status::Running => monitor.event(&format!(
                        "trial {name} started (job {}_{i}){}",
                        job.id,
                        if tdir.join(crate::rundir::CONFIG_FILE).exists()
                            && crate::progress::RunStatus::read(&tdir).is_some_and(|s| s.step > 0)
                        {
                            " (resuming)"
                        } else {
                            ""
                        }
                    )),
                    Status::Done => monitor.event(&format!(
                        "trial {name} done in {}",
                        crate::progress::duration(t.seconds)
                    )),
                    Status::Failed => {
                        let reason = match read_exit(&tdir) {
                            Some((rc, _)) => format!(
                                "exit status {rc}: {}",
                                super::local::last_log_line(&tdir.join("log.txt"))
                            ),
                            None => format!(
                                "ended without an exit status (time limit, cancelled or node failure; see {})",
                                dir.join("slurm").join(format!("{}_{i}.out", job.id)).display()
                            ),
                        };
                        monitor.error(&format!(
                            "trial {name} failed: {reason} (log: {})",
                            tdir.join("log.txt").display()
                        ));
                        if executor.fail_fast && !cancelled {
                            cancelled = true;
                            monitor.event(&format!("fail-fast: cancelling Slurm job {}", job.id));
                            let _ = Command::new("scancel").arg(&job.id).status();
                        }
                    }
                    _ => {}
                }
            }
        }
        if changed {
            save_state(dir, state)?;
        }
        monitor.update(state);
        if !any_active {
            break;
        }
        std::thread::sleep(poll);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Trial, TrialState};

    #[test]
    fn script_carries_resources_and_quotes_paths() {
        let state = SweepState {
            definition: "x".into(),
            trials: ["a-1", "it's"]
                .iter()
                .map(|n| TrialState {
                    trial: Trial {
                        name: n.to_string(),
                        overrides: vec![],
                    },
                    status: Status::Pending,
                    seconds: 0.0,
                })
                .collect(),
            executor: "slurm".into(),
            slurm_jobs: vec![],
        };
        let slurm = SlurmSection {
            partition: "gpu".into(),
            time: "02:00:00".into(),
            gpus: 1,
            cpus: 8,
            mem: "32G".into(),
            max_parallel: 4,
            account: "lab".into(),
            qos: String::new(),
            sbatch_args: vec!["--exclusive".into()],
            setup: vec!["module load cuda".into()],
            nodes: 0,
            tasks_per_node: 0,
        };
        let s = script(
            Path::new("/runs/my sweep"),
            &state,
            &[0, 1],
            &slurm,
            "abl k",
            &Launch {
                exe: PathBuf::from("/bin/sipt"),
                workdir: PathBuf::from("/work"),
                plugins: vec![PathBuf::from("/p/lib.so")],
            },
        );
        for want in [
            "#SBATCH --job-name=sipt-abl_k\n",
            "#SBATCH --array=0,1%4\n",
            "#SBATCH --time=02:00:00\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --gres=gpu:1\n",
            "#SBATCH --cpus-per-task=8\n",
            "#SBATCH --mem=32G\n",
            "#SBATCH --account=lab\n",
            "#SBATCH --exclusive\n",
            "#SBATCH --chdir=/work\n",
            "'it'\\''s'",
            "trial_dir='/runs/my sweep'/",
            "module load cuda\n",
            "--plugin '/p/lib.so'",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert!(!s.contains("--qos"));
        // One rank: the trial runs directly, no srun, no task counts.
        assert!(!s.contains("srun") && !s.contains("--ntasks"), "{s}");
        // Two nodes of four ranks: srun starts them.
        let slurm = SlurmSection {
            nodes: 2,
            tasks_per_node: 4,
            ..slurm
        };
        let launch = Launch {
            exe: PathBuf::from("/bin/sipt"),
            workdir: PathBuf::from("/work"),
            plugins: vec![],
        };
        let s = script(Path::new("/runs/x"), &state, &[0], &slurm, "x", &launch);
        for want in [
            "#SBATCH --nodes=2\n",
            "#SBATCH --ntasks-per-node=4\n",
            "srun --kill-on-bad-exit=1 '/bin/sipt' run",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }

    #[test]
    fn exit_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_exit(dir.path()), None);
        std::fs::write(dir.path().join(EXIT_FILE), "rc=3 seconds=12\n").unwrap();
        assert_eq!(read_exit(dir.path()), Some((3, 12.0)));
    }
}
