//! Progress of long work: a live bar on a terminal (steps, ETA, tokens/s, a headline metric),
//! plain log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    start_step: u64,
    log_every: u64,
}

impl Progress {
    pub fn new(total: u64, start_step: u64, log_every: u64) -> Progress {
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
        Progress {
            bar,
            total,
            started: Instant::now(),
            start_step,
            log_every: log_every.max(1),
        }
    }

    /// After each step: `summary` is a short "loss 3.21, 1234 tok/s" text.
    pub fn step(&self, step: u64, summary: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(summary.to_string());
            }
            None => {
                if step % self.log_every == 0 || step == self.total {
                    let done = step.saturating_sub(self.start_step) as f64;
                    let elapsed = self.started.elapsed().as_secs_f64();
                    let eta = if done > 0.0 {
                        elapsed / done * (self.total.saturating_sub(step)) as f64
                    } else {
                        0.0
                    };
                    tracing::info!("step {step}/{}: {summary} (ETA {:.0}s)", self.total, eta);
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

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
