//! Shared helpers of the end-to-end tests: finding the official `wandb` CLI, running the
//! loopback stand-in for the W&B backend, and running `wandb sync` against it.
#![allow(dead_code)]

#[path = "../../../../tests/common/needs.rs"]
mod needs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A dummy API key: wandb only checks that it has 40 characters.
pub const API_KEY: &str = "0123456789abcdef0123456789abcdef01234567";

/// The pip requirement the tests are written against.
pub const WANDB_REQUIREMENT: &str = "wandb==0.31.0";

/// Finds the `wandb` CLI: `$SIPT_WANDB`, `wandb` on `PATH`, `$SIPT_VENV/bin/wandb`, then
/// the workspace's `.venv/bin/wandb`.
pub fn find_wandb() -> Option<PathBuf> {
    sipt_wandb::find_wandb_cli().or_else(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/wandb");
        venv.is_file().then_some(venv)
    })
}

/// The `wandb` CLI, under the workspace's one rule for needs (tests/common/needs.rs): a
/// missing CLI fails the test, `SIPT_SKIP=wandb` skips it. CI installs wandb, so a silent skip
/// would hide breakage.
pub fn require_wandb() -> Option<PathBuf> {
    let mut found = None;
    let go_on = needs::check("wandb", || {
        found = find_wandb();
        found.as_ref().map(|_| ()).ok_or_else(|| {
            format!(
                "the official W&B CLI ({WANDB_REQUIREMENT}) is not in $SIPT_WANDB, on PATH, in \
                 $SIPT_VENV/bin or in the workspace .venv/bin (or: python3 -m venv /tmp/wandb-venv \
                 && /tmp/wandb-venv/bin/pip install {WANDB_REQUIREMENT}, then \
                 SIPT_WANDB=/tmp/wandb-venv/bin/wandb)"
            )
        })
    });
    if go_on {
        found
    } else {
        None
    }
}

/// The Python interpreter beside the `wandb` script (its venv's), else `python3`.
pub fn python_for(wandb: &Path) -> PathBuf {
    let dir = wandb.parent().unwrap_or(Path::new("."));
    ["python3", "python"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `cmd` with its output captured, killing it after `timeout`. Returns whether it
/// exited successfully and its combined output.
pub fn run_bounded(mut cmd: Command, timeout: Duration, what: &str) -> (bool, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("output.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) => (s.success(), output),
        None => panic!("{what} did not finish within {timeout:?}; its output:\n{output}"),
    }
}

/// The environment every `wandb` child of the tests gets: the stand-in as the host, a
/// dummy key, and private config/cache/data folders.
pub fn wandb_env(cmd: &mut Command, backend: &Backend, scratch: &Path) {
    for var in [
        "WANDB_MODE",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("WANDB_BASE_URL", backend.url())
        .env("WANDB_API_KEY", API_KEY)
        .env("WANDB_CONFIG_DIR", scratch.join("config"))
        .env("WANDB_CACHE_DIR", scratch.join("cache"))
        .env("WANDB_DATA_DIR", scratch.join("data"))
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .current_dir(scratch);
}

/// Runs `wandb sync PATHS...` against `backend` and panics with its output if it fails.
pub fn wandb_sync(wandb: &Path, backend: &Backend, paths: &[&Path]) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(wandb);
    cmd.arg("sync").args(paths);
    wandb_env(&mut cmd, backend, scratch.path());
    let (ok, output) = run_bounded(cmd, Duration::from_secs(120), "wandb sync");
    assert!(ok, "wandb sync failed:\n{output}");
    output
}

/// The loopback stand-in for the W&B backend (`tests/fake_wandb_server.py`). It exits
/// when this handle is dropped (its stdin closes), or after 10 minutes in any case.
pub struct Backend {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
}

impl Backend {
    pub fn start(python: &Path) -> Backend {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_wandb_server.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--max-seconds", "600"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {}: {e}", python.display(), script.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("the W&B stand-in did not report its port (got {line:?})")
            });
        Backend { child, stdin, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Everything the stand-in received, as JSON (see the script for the shape).
    pub fn state(&self) -> serde_json::Value {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the stand-in");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET /_test/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("reading the stand-in's state");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("bad state JSON ({e}): {response}"))
    }

    /// The state of one run, `entity/project/name`.
    pub fn run(&self, path: &str) -> serde_json::Value {
        let state = self.state();
        state["runs"]
            .get(path)
            .cloned()
            .unwrap_or_else(|| panic!("run {path} never reached the stand-in; state: {state:#}"))
    }

    /// Polls `check` on the state until it holds or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state();
            if check(&state) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; state: {state:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The history rows of a run state.
pub fn rows(run: &serde_json::Value) -> Vec<serde_json::Value> {
    run["history"].as_array().cloned().unwrap_or_default()
}

/// The `_step` of each history row.
pub fn steps(run: &serde_json::Value) -> Vec<u64> {
    rows(run)
        .iter()
        .map(|r| r["_step"].as_u64().expect("_step"))
        .collect()
}
