//! Running the official `wandb` CLI next to a run: live streaming with
//! `wandb beta sync --live`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// Finds the `wandb` CLI: `$SIPT_WANDB` (a path to the executable), then `wandb` on
/// `PATH`, then `$SIPT_VENV/bin/wandb`.
pub fn find_wandb_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SIPT_WANDB").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("wandb"));
    let in_venv = std::env::var_os("SIPT_VENV").map(|v| PathBuf::from(v).join("bin").join("wandb"));
    on_path.chain(in_venv).find(|p| p.is_file())
}

/// A running `wandb beta sync --live DIR`: it uploads the run while sipt writes it, and
/// exits by itself once it has read the exit record that [`crate::OfflineRun::finish`]
/// writes. Dropping the handle stops it.
pub struct LiveSync {
    child: Option<Child>,
    log_path: PathBuf,
}

/// Starts `wandb beta sync --live DIR` (wandb >= 0.24) as a child process, its output
/// going to `DIR/logs/live-sync.log`. The CLI takes its credentials and host from the
/// environment as usual (`WANDB_API_KEY` or `wandb login`, `WANDB_BASE_URL`). It runs in
/// the root that holds `wandb/` (so its own debug logs land in that `wandb/` folder).
pub fn spawn_live_sync(wandb_bin: &Path, dir: &Path) -> Result<LiveSync, Error> {
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    let parent = dir.parent().unwrap_or(&dir);
    let cwd = match parent.file_name() {
        Some(name) if name == "wandb" => parent.parent().unwrap_or(parent),
        _ => parent,
    };
    let logs = dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| Error::io(format!("creating {}", logs.display()), e))?;
    let log_path = logs.join("live-sync.log");
    let log = File::create(&log_path)
        .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("duplicating the log file handle", e))?;
    let child = Command::new(wandb_bin)
        .args(["beta", "sync", "--live"])
        .arg(&dir)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| {
            Error::io(
                format!("starting {} beta sync --live", wandb_bin.display()),
                e,
            )
        })?;
    Ok(LiveSync {
        child: Some(child),
        log_path,
    })
}

impl LiveSync {
    /// Where the CLI's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `timeout` for the CLI to exit by itself (it does once the run is
    /// finished and uploaded) and returns its exit status. On timeout it is stopped and
    /// the result is [`Error::Timeout`].
    pub fn wait(mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("child present until drop");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    self.kill();
                    return Err(Error::Timeout(format!(
                        "wandb beta sync --live did not exit within {timeout:?} (see {})",
                        self.log_path.display()
                    )));
                }
                Err(e) => return Err(Error::io("waiting for wandb beta sync --live", e)),
            }
        }
    }

    /// Stops the CLI now. Whatever it had not uploaded yet is uploaded by a later
    /// `wandb sync DIR`.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LiveSync {
    fn drop(&mut self) {
        self.kill();
    }
}
