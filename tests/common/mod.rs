//! Helpers shared by the end-to-end tests of the `sipt` binary.
#![allow(dead_code)]

pub mod needs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn sipt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sipt"));
    c.current_dir(root()).env_remove("RUST_LOG");
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("cannot start sipt");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Every row of a run's `metrics.jsonl`.
pub fn metric_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every metric row of a run without the timing keys, which differ from run to run.
pub fn untimed_rows(run_dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    metric_rows(run_dir)
        .into_iter()
        .map(|row| {
            let serde_json::Value::Object(mut v) = row else {
                panic!("a metrics row is not an object: {row}")
            };
            v.retain(|k, _| !k.starts_with("time/") && !k.starts_with("perf/"));
            v
        })
        .collect()
}

/// The step of every row of a run's `metrics.jsonl`, in file order.
pub fn logged_steps(run_dir: &Path) -> Vec<u64> {
    metric_rows(run_dir)
        .iter()
        .map(|row| row["step"].as_u64().unwrap())
        .collect()
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Build the example plugin library once per test binary and return its path. It builds in a
/// target folder of its own: the outer `cargo test` holds the workspace's.
pub fn example_plugin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"))
                .join("plugin-examples");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet", "--manifest-path"])
                .arg(root().join("plugins/examples/hedging-judge/Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .expect("cannot run cargo");
            assert!(status.success(), "the example plugin did not build");
            target.join("release/libhedging_judge.so")
        })
        .clone()
}

/// The assets folder (scripts/fetch-assets.sh fills it).
pub fn assets() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIPT_ASSETS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("SIPT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sipt")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sipt")
        });
    cache.join("assets")
}

/// The project's venv (`SIPT_VENV`, else `.venv` in the project): its programs, such as
/// `bin/python` and `bin/torchrun`.
pub fn venv_bin(program: &str) -> PathBuf {
    let venv = std::env::var_os("SIPT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv"));
    venv.join("bin").join(program)
}

/// A small model the end-to-end tests train from scratch, big enough that training moves its
/// loss (an experiment file's `[model]`).
pub const SMALL_MODEL: &str = "[model]
vocab_size = 512
hidden_size = 64
layers = 2
heads = 4
kv_heads = 2
intermediate_size = 128
max_position = 128
";

/// The smallest model the end-to-end tests train from scratch (an experiment file's `[model]`).
pub const TINY_MODEL: &str = "[model]
vocab_size = 512
hidden_size = 32
layers = 1
heads = 2
kv_heads = 1
intermediate_size = 64
max_position = 64
";

/// Start `cmd` (a `sipt run` into `run_dir`), SIGKILL it as soon as its first checkpoint is on
/// disk (unless it ends first), and wait for it.
pub fn kill_after_first_checkpoint(cmd: &mut Command, run_dir: &Path) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot start sipt");
    let started = std::time::Instant::now();
    while !run_dir.join("checkpoints/latest").exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoint appeared"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}
