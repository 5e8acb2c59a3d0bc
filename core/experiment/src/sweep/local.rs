//! The local executor: trials as `sipt run` child processes, `jobs` at a time, one CUDA device
//! each when devices are given.

use super::monitor::Monitor;
use super::{save_state, Executor, Status, SweepState, TRIAL_CONFIG};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The last non-empty line of a trial's log, to show with its failure.
pub(super) fn last_log_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

pub(super) fn run(
    dir: &Path,
    state: &mut SweepState,
    executor: &Executor,
    plugins: &[PathBuf],
    monitor: &mut Monitor,
) -> Result<()> {
    for t in state.trials.iter_mut() {
        if matches!(t.status, Status::Running | Status::Queued | Status::Failed) {
            t.status = Status::Pending; // interrupted or failed before: run again
        }
    }
    save_state(dir, state)?;
    let jobs = executor.jobs.max(1);
    let ranks = executor.ranks.max(1);
    if !executor.devices.is_empty() && executor.devices.len() < ranks {
        anyhow::bail!(
            "sweep.ranks = {ranks} but --devices gives {} device(s): a trial of {ranks} ranks needs {ranks}",
            executor.devices.len()
        );
    }
    let mut running: Vec<(usize, Child, Instant, Vec<usize>)> = Vec::new();
    let mut free_devices = executor.devices.clone();
    let mut stop_launching = false;
    monitor.event(&format!(
        "sweep of {} trial(s) in {}, {jobs} at a time",
        state.trials.len(),
        dir.display()
    ));
    loop {
        // Launch while there is room.
        while !stop_launching
            && running.len() < jobs
            && (executor.devices.is_empty() || free_devices.len() >= ranks)
        {
            let Some(i) = state
                .trials
                .iter()
                .position(|t| t.status == Status::Pending)
            else {
                break;
            };
            let tdir = dir.join(&state.trials[i].trial.name);
            let resume_trial = tdir.join(crate::rundir::CONFIG_FILE).exists();
            let devices: Vec<usize> = if executor.devices.is_empty() {
                Vec::new()
            } else {
                free_devices.split_off(free_devices.len() - ranks)
            };
            let mut cmd = Command::new(super::sipt_exe()?);
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
            match devices.as_slice() {
                [] => {}
                [d] => {
                    cmd.args(["--set", &format!("experiment.device=cuda:{d}")]);
                }
                many => {
                    // Rank r of the trial uses cuda:r of the devices it is shown.
                    let list: Vec<String> = many.iter().map(|d| d.to_string()).collect();
                    cmd.env("CUDA_VISIBLE_DEVICES", list.join(","));
                    cmd.args(["--set", "experiment.device=cuda"]);
                }
            }
            if ranks > 1 {
                cmd.args(["--nproc-per-node", &ranks.to_string()]);
            }
            // A trial ends with the sweep: if the sweep is killed, even by SIGKILL, its trials
            // stop too, and `--resume` continues them from their checkpoints.
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let log = std::fs::File::create(tdir.join("log.txt"))?;
            cmd.stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log));
            let child = cmd.spawn().context("cannot start a trial")?;
            state.trials[i].status = Status::Running;
            save_state(dir, state)?;
            monitor.event(&format!(
                "trial {} started{}{}",
                state.trials[i].trial.name,
                if resume_trial { " (resuming)" } else { "" },
                match devices.as_slice() {
                    [] if ranks > 1 => format!(" on {ranks} ranks"),
                    [] => String::new(),
                    ds => format!(
                        " on cuda:{}",
                        ds.iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                }
            ));
            running.push((i, child, Instant::now(), devices));
        }
        monitor.update(state);
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
                    let (i, _, started, devices) = running.swap_remove(k);
                    free_devices.extend(devices);
                    let t = &mut state.trials[i];
                    t.seconds = started.elapsed().as_secs_f64();
                    if status.success() {
                        t.status = Status::Done;
                        monitor.event(&format!(
                            "trial {} done in {}",
                            t.trial.name,
                            crate::progress::duration(t.seconds)
                        ));
                    } else {
                        t.status = Status::Failed;
                        let log = dir.join(&t.trial.name).join("log.txt");
                        monitor.error(&format!(
                            "trial {} failed: {} (log: {})",
                            t.trial.name,
                            last_log_line(&log),
                            log.display()
                        ));
                        if executor.fail_fast {
                            stop_launching = true;
                        }
                    }
                    save_state(dir, state)?;
                }
            }
        }
    }
    Ok(())
}
