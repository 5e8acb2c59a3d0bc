//! Run directories: `<output_dir>/<experiment>/<run>/` with the resolved configuration, metrics,
//! samples, checkpoints and logs. Files are written atomically (temporary file, fsync, rename),
//! so a crash or kill never leaves a half-written file behind.

use crate::config::{Experiment, Resolved};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: readers see the old file or the new one, never a mix.
/// Writers racing for the same path (processes or threads) each write their own temporary file;
/// the last rename wins.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A fresh, unused run path: `<output_dir>/<name>/<UTC timestamp>[-N]`.
pub fn new_run_path(experiment: &Experiment) -> Result<PathBuf> {
    let base = Path::new(&experiment.experiment.output_dir).join(&experiment.experiment.name);
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let mut candidate = base.join(&stamp);
    let mut n = 2;
    while candidate.exists() {
        candidate = base.join(format!("{stamp}-{n}"));
        n += 1;
    }
    Ok(candidate)
}

/// An open run directory. It holds an exclusive lock on the directory (`.lock`, with the
/// holder's pid) for as long as it lives, so two processes never train into one directory —
/// e.g. a trial left running by a killed sweep and the same trial started again on resume.
pub struct RunDir {
    path: PathBuf,
    /// Held by the process that writes the run (`None` for the other ranks of a job).
    _lock: Option<DirLock>,
}

pub const LOCK_FILE: &str = ".lock";

/// An advisory `flock` on a directory's lock file, released when the process ends (whatever
/// way it ends), so a crash never leaves a stale lock behind.
struct DirLock {
    _file: std::fs::File,
}

fn lock_dir(dir: &Path) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "{} is in use by another sipt process{}; wait for it to end or stop it",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            );
        }
    }
    file.set_len(0)
        .and_then(|_| file.write_all(std::process::id().to_string().as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DirLock { _file: file })
}

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";

impl RunDir {
    /// Create the directory and write the resolved configuration into it. With `resume`, the
    /// directory must exist and hold the same configuration.
    pub fn create(path: &Path, resolved: &Resolved, resume: bool) -> Result<RunDir> {
        let config = resolved.to_record();
        let config_path = path.join(CONFIG_FILE);
        if resume && !path.is_dir() {
            bail!("cannot resume: {} does not exist", path.display());
        }
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let lock = lock_dir(path)?;
        if resume {
            let existing = std::fs::read_to_string(&config_path).with_context(|| {
                format!("cannot resume: {} has no {CONFIG_FILE}", path.display())
            })?;
            if existing != config {
                bail!(
                    "cannot resume {}: its configuration differs from this one (compare {} with `sipt config show`)",
                    path.display(),
                    config_path.display()
                );
            }
        } else {
            if config_path.exists() {
                bail!(
                    "{} already holds a run; pass --resume to continue it, or choose another --out",
                    path.display()
                );
            }
            write_atomic(&config_path, config.as_bytes())?;
        }
        std::fs::create_dir_all(path.join(CHECKPOINTS_DIR))
            .with_context(|| format!("cannot create {}", path.join(CHECKPOINTS_DIR).display()))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: Some(lock),
        })
    }

    /// The run directory another process (rank 0 of a data-parallel job) created and writes:
    /// read, never written, by this one.
    pub fn follow(path: &Path) -> Result<RunDir> {
        if !path.join(CONFIG_FILE).is_file() {
            bail!(
                "{} holds no run: rank 0 should have created it (do the ranks share a file system?)",
                path.display()
            );
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.txt");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
