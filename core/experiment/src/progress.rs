//! Progress of long work: a live bar on a terminal (steps, ETA, tokens/s, a headline metric),
//! plain log lines otherwise.

//!
//! A run also keeps `progress.json` in its directory up to date (at most once a second), so a
//! sweep, `sipt status` or a person with `cat` can see how far it is without parsing logs.

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The name of a run's live status file.
pub const STATUS_FILE: &str = "progress.json";

/// What `progress.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStatus {
    pub step: u64,
    pub total: u64,
    /// Short text: loss, current reward, speed.
    pub summary: String,
    /// Estimated seconds left, from this process's pace.
    pub eta_seconds: f64,
    /// Seconds since the Unix epoch when this was written.
    pub updated: f64,
    /// The run's process id.
    pub pid: u32,
    pub finished: bool,
}

impl RunStatus {
    /// Read a run directory's status, if it has one.
    pub fn read(run_dir: &Path) -> Option<RunStatus> {
        let text = std::fs::read_to_string(run_dir.join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Seconds since this status was written.
    pub fn age(&self) -> f64 {
        (now() - self.updated).max(0.0)
    }

    /// "40/100 steps, loss 3.2, ETA 1m20s" (the ETA only while running).
    pub fn line(&self) -> String {
        let mut s = format!("{}/{} steps", self.step, self.total);
        if !self.summary.is_empty() {
            s.push_str(", ");
            s.push_str(&self.summary);
        }
        if !self.finished && self.step < self.total {
            s.push_str(&format!(", ETA {}", duration(self.eta_seconds)));
        }
        s
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// "1h02m", "3m05s", "42s".
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    start_step: u64,
    log_every: u64,
    status_file: Option<PathBuf>,
    last_write: Cell<Option<Instant>>,
    /// The latest step and its summary, for the final status.
    last: std::cell::RefCell<(u64, String)>,
}

impl Reporter {
    pub fn new(total: u64, start_step: u64, log_every: u64) -> Reporter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(start_step);
            bar
        });
        Reporter {
            bar,
            total,
            started: Instant::now(),
            start_step,
            log_every: log_every.max(1),
            status_file: None,
            last_write: Cell::new(None),
            last: std::cell::RefCell::new((start_step, String::new())),
        }
    }

    /// Also keep `progress.json` in `run_dir` up to date.
    pub fn with_status_file(mut self, run_dir: &Path) -> Reporter {
        self.status_file = Some(run_dir.join(STATUS_FILE));
        self
    }

    fn eta(&self, step: u64) -> f64 {
        let done = step.saturating_sub(self.start_step) as f64;
        let elapsed = self.started.elapsed().as_secs_f64();
        if done > 0.0 {
            elapsed / done * (self.total.saturating_sub(step)) as f64
        } else {
            f64::NAN
        }
    }

    fn write_status(&self, step: u64, summary: &str, finished: bool) {
        let Some(path) = &self.status_file else {
            return;
        };
        let due = match self.last_write.get() {
            None => true,
            Some(t) => t.elapsed() >= Duration::from_secs(1),
        };
        if !(due || finished || step == self.total) {
            return;
        }
        self.last_write.set(Some(Instant::now()));
        let status = RunStatus {
            step,
            total: self.total,
            summary: summary.to_string(),
            eta_seconds: if finished { 0.0 } else { self.eta(step) },
            updated: now(),
            pid: std::process::id(),
            finished,
        };
        // A status file is advisory: a failure to write it never stops training. It is
        // replaced by rename, so readers never see half of one.
        if let Ok(text) = serde_json::to_vec(&status) {
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }

    /// After each step: `summary` is a short "loss 3.21, 1234 tok/s" text.
    pub fn step(&self, step: u64, summary: &str) {
        *self.last.borrow_mut() = (step, summary.to_string());
        self.write_status(step, summary, false);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(summary.to_string());
            }
            None => {
                if step % self.log_every == 0 || step == self.total {
                    let eta = self.eta(step);
                    tracing::info!(
                        "step {step}/{}: {summary} (ETA {})",
                        self.total,
                        duration(if eta.is_nan() { 0.0 } else { eta })
                    );
                }
            }
        }
    }

    /// A line that must not be lost under the bar (evaluations, checkpoints).
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{text}")),
            None => tracing::info!("{text}"),
        }
    }

    /// The run ended: its status shows the last step's summary.
    pub fn finish(&self) {
        let (step, summary) = self.last.borrow().clone();
        self.write_status(step, &summary, true);
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
