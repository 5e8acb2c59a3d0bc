//! Live status of a sweep's trials: on a terminal, one bar per running trial (steps, loss,
//! current reward, ETA) under a line of counts; otherwise plain log lines every few seconds.
//! Each trial's numbers come from its run's `progress.json`.

use super::{Status, SweepState};
use crate::progress::{self, RunStatus};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Monitor {
    dir: PathBuf,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    bars: HashMap<usize, ProgressBar>,
    every: Duration,
    last_lines: Option<Instant>,
    total: usize,
}

/// "2 done, 1 failed, 1 running, 2 queued, 0 pending".
pub fn counts(state: &SweepState) -> String {
    let n = |s: Status| state.trials.iter().filter(|t| t.status == s).count();
    let mut parts = vec![
        format!("{} done", n(Status::Done)),
        format!("{} failed", n(Status::Failed)),
        format!("{} running", n(Status::Running)),
    ];
    if n(Status::Queued) > 0 {
        parts.push(format!("{} queued", n(Status::Queued)));
    }
    parts.push(format!("{} pending", n(Status::Pending)));
    parts.join(", ")
}

impl Monitor {
    pub fn new(dir: &Path, total: usize, status_every: f64) -> Monitor {
        let (multi, overall) = if std::io::stderr().is_terminal() {
            let multi = MultiProgress::new();
            let overall = multi.add(ProgressBar::new(total as u64));
            overall.set_style(
                ProgressStyle::with_template(
                    "sweep [{elapsed_precise}] {bar:20} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            (Some(multi), Some(overall))
        } else {
            (None, None)
        };
        Monitor {
            dir: dir.to_path_buf(),
            multi,
            overall,
            bars: HashMap::new(),
            every: Duration::from_secs_f64(status_every.max(0.5)),
            last_lines: None,
            total,
        }
    }

    /// A line that must show (trial started, finished).
    pub fn event(&self, text: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| tracing::info!("{text}")),
            None => tracing::info!("{text}"),
        }
    }

    /// An error as it happens.
    pub fn error(&self, text: &str) {
        match &self.multi {
            Some(m) => m.suspend(|| tracing::error!("{text}")),
            None => tracing::error!("{text}"),
        }
    }

    /// Refresh the display from `state` and the running trials' status files.
    pub fn update(&mut self, state: &SweepState) {
        let finished = state
            .trials
            .iter()
            .filter(|t| matches!(t.status, Status::Done | Status::Failed))
            .count();
        let running: Vec<usize> = (0..state.trials.len())
            .filter(|&i| state.trials[i].status == Status::Running)
            .collect();
        if let (Some(multi), Some(overall)) = (&self.multi, &self.overall) {
            overall.set_position(finished as u64);
            overall.set_message(counts(state));
            self.bars.retain(|i, bar| {
                let keep = running.contains(i);
                if !keep {
                    bar.finish_and_clear();
                    multi.remove(bar);
                }
                keep
            });
            for &i in &running {
                let name = &state.trials[i].trial.name;
                let bar = self.bars.entry(i).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(1));
                    bar.set_style(
                        ProgressStyle::with_template("  {prefix} {bar:20} {pos}/{len} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_prefix(name.clone());
                    bar
                });
                if let Some(s) = RunStatus::read(&self.dir.join(name)) {
                    bar.set_length(s.total.max(1));
                    bar.set_position(s.step);
                    let eta = if s.eta_seconds.is_finite() {
                        format!(", ETA {}", progress::duration(s.eta_seconds))
                    } else {
                        String::new()
                    };
                    bar.set_message(format!("{}{eta}", s.summary));
                } else {
                    bar.set_message("starting".to_string());
                }
            }
            return;
        }
        let due = self.last_lines.map_or(true, |t| t.elapsed() >= self.every);
        if !due || running.is_empty() {
            return;
        }
        self.last_lines = Some(Instant::now());
        tracing::info!(
            "sweep: {finished}/{} finished ({})",
            self.total,
            counts(state)
        );
        for &i in &running {
            let name = &state.trials[i].trial.name;
            let line = RunStatus::read(&self.dir.join(name))
                .map(|s| s.line())
                .unwrap_or_else(|| "starting".into());
            tracing::info!("  {name}: {line}");
        }
    }

    /// Clear the bars and print the final counts.
    pub fn finish(&mut self, state: &SweepState) {
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
        self.bars.clear();
        if let Some(overall) = &self.overall {
            overall.finish_and_clear();
        }
        tracing::info!("sweep finished: {}", counts(state));
    }
}

/// `sipt status DIR`: one line per trial of a sweep (or one for a run): its status and, from
/// its `progress.json`, steps, loss, reward and ETA.
pub fn describe(dir: &Path) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    if dir.join(super::STATE_FILE).exists() {
        let mut state = SweepState::read(dir)?;
        let _ = write!(out, "sweep {} ({} executor", dir.display(), state.executor);
        if state.executor == "slurm" {
            if let Some(job) = state.slurm_jobs.last() {
                let _ = write!(out, ", job {}", job.id);
            }
            // Bring statuses up to date without waiting for the sweep's own tracker.
            if let Err(e) = super::slurm::refresh(dir, &mut state) {
                let _ = write!(out, "; Slurm not reachable: {e:#}");
            }
        }
        let _ = writeln!(out, "): {}", counts(&state));
        let width = state
            .trials
            .iter()
            .map(|t| t.trial.name.len())
            .max()
            .unwrap_or(0);
        for t in &state.trials {
            let status = format!("{:?}", t.status).to_lowercase();
            let detail = RunStatus::read(&dir.join(&t.trial.name))
                .map(|s| detail(&s, t.status == Status::Running))
                .unwrap_or_default();
            let _ = writeln!(out, "{:width$}  {status:8} {detail}", t.trial.name);
        }
    } else if let Some(s) = RunStatus::read(dir) {
        let _ = writeln!(out, "run {}: {}", dir.display(), detail(&s, !s.finished));
    } else {
        anyhow::bail!(
            "{} is neither a sweep directory ({}) nor a run with a {} yet",
            dir.display(),
            super::STATE_FILE,
            progress::STATUS_FILE
        );
    }
    Ok(out)
}

fn detail(s: &RunStatus, running: bool) -> String {
    let mut line = s.line();
    if running {
        line.push_str(&format!(" (updated {} ago)", progress::duration(s.age())));
    }
    line
}
