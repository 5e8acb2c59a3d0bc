//! A short SIP run with a real LLM server (llama.cpp's server through PyPI xllamacpp, serving
//! SmolLM2-135M-Instruct on 127.0.0.1) as both the judge and the rewriter.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn python() -> std::path::PathBuf {
    match std::env::var_os("SIPT_PYTHON") {
        Some(p) => p.into(),
        None => venv_bin("python"),
    }
}

/// The server, stopped when dropped.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Option<Server> {
    let python = python();
    if !needs::check("llm-server", || needs::file(&python, "Python")) {
        return None;
    }
    let mut child = Command::new(&python)
        .arg(root().join("scripts/llm-server.py"))
        .args(["--port", "0", "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} scripts/llm-server.py ({e}); run scripts/setup.sh --test",
                python.display()
            )
        });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("SIPT_LLM_SERVER_URL=") {
                let _ = tx.send(url.to_string());
                break;
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("the LLM server did not come up within 180 s");
    Some(Server { child, url })
}

#[test]
fn sip_run_with_an_llm_judge_and_rewriter() {
    let Some(server) = start_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "llm.toml",
        &format!(
            r#"[experiment]
name = "llm-sip"
device = "cpu"
threads = 1

{TINY_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 16
suffix_tokens = 8
prefix_min_tokens = 8
prefix_max_tokens = 16

[sip]
rewrite = true
rollouts = 2

[judges.safety]
type = "llm-pointwise"
criterion = "safety"
endpoints = ["{url}"]
model = "smollm2"
samples = 1
max_tokens = 48
cache_dir = "{cache}"

[rewriter]
type = "llm-rewriter"
endpoints = ["{url}"]
model = "smollm2"
max_tokens = 48
cache_dir = "{cache}"

[train]
steps = 2
batch_size = 2
eval_every = 0

[train.objective]
type = "online-dpo"
"#,
            url = server.url,
            cache = dir.path().join("cache").display()
        ),
    );
    let started = Instant::now();
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("run")));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = metric_rows(&dir.path().join("run"));
    assert_eq!(rows.len(), 2);
    let calls: f64 = rows
        .iter()
        .map(|r| r["judge/safety/calls"].as_f64().unwrap())
        .sum();
    let failures: f64 = rows
        .iter()
        .map(|r| r["judge/safety/failures"].as_f64().unwrap())
        .sum();
    // 2 prefixes x (original + rewrite when it succeeded + 2 rollouts), over 2 steps.
    assert!(calls >= 2.0 * 2.0 * 3.0, "{calls} judge calls");
    assert!(failures <= calls);
    let served = rows.last().unwrap()["judge/safety/total/requests"]
        .as_f64()
        .unwrap_or(0.0)
        + rows.last().unwrap()["judge/safety/total/cache_hits"]
            .as_f64()
            .unwrap_or(0.0);
    assert!(
        served > 0.0,
        "the judge never reached the server: {:?}",
        rows.last()
    );
    assert!(
        rows.last().unwrap()["rewriter/total/calls"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    eprintln!(
        "SIP run against the LLM server took {:.0}s",
        started.elapsed().as_secs_f64()
    );
}
