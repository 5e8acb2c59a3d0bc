//! The LLM plugins against a real server: llama.cpp (PyPI xllamacpp) serving SmolLM2-135M-Instruct
//! on 127.0.0.1, started by `scripts/llm-server.py` from these tests and stopped after them.
//!
//! A 135M model is a weak judge, so these tests check the mechanics: prompts reach the server,
//! real answers are parsed or counted as failures, samples, caching and counters. They need the
//! project's Python with xllamacpp and the GGUF (scripts/fetch-assets.sh smollm2): Python from
//! `$SIPT_PYTHON`, else `$SIPT_VENV/bin/python`, else `<workspace>/.venv/bin/python`. When those
//! are missing the tests fail with what to do, unless `SIPT_SKIP=llm-server`
//! (tests/common/needs.rs).

mod common;
#[path = "../../tests/common/needs.rs"]
mod needs;

use common::*;
use serde_json::json;
use sipt_api::{PairwiseItem, PairwiseJudge, PointwiseItem, PointwiseJudge, RewriteItem, Rewriter};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests in this file; the server is stopped when the last one finishes.
const TESTS: usize = 5;
const START_TIMEOUT: Duration = Duration::from_secs(180);

struct Server {
    child: Child,
    /// Held open: the server exits when it closes (also if this process dies).
    _stdin: ChildStdin,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

struct Fixture {
    server: Option<Server>,
    finished: usize,
}

static FIXTURE: Mutex<Fixture> = Mutex::new(Fixture {
    server: None,
    finished: 0,
});

/// Exclusive use of the shared server for one test (so server-side counters are the test's
/// own); stops the server when the last test is done.
struct Lease {
    guard: MutexGuard<'static, Fixture>,
}

impl Lease {
    fn url(&self) -> &str {
        &self.guard.server.as_ref().unwrap().url
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.guard.finished += 1;
        if self.guard.finished >= TESTS {
            self.guard.server = None;
        }
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SIPT_PYTHON") {
        return p.into();
    }
    if let Some(v) = std::env::var_os("SIPT_VENV") {
        return PathBuf::from(v).join("bin").join("python");
    }
    workspace().join(".venv").join("bin").join("python")
}

fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn start() -> Server {
    let python = python();
    let script = workspace().join("scripts").join("llm-server.py");
    let help =
        "set SIPT_PYTHON to a Python with xllamacpp (pip install xllamacpp==2026.10.11549), \
run scripts/fetch-assets.sh smollm2, or set SIPT_SKIP=llm-server to skip these tests";
    let log = std::env::temp_dir().join(format!("sipt-llm-server-{}.log", std::process::id()));
    let mut child = Command::new(&python)
        .arg(&script)
        .args([
            "--port",
            "0",
            "--parallel",
            "2",
            "--threads",
            "1",
            "--ctx",
            "4096",
        ])
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("server log file"))
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} {}: {e}; {help}",
                python.display(),
                script.display()
            )
        });
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("SIPT_LLM_SERVER_URL=") {
                let _ = tx.send(url.to_string());
                return;
            }
        }
    });
    let started = Instant::now();
    loop {
        if let Ok(url) = rx.recv_timeout(Duration::from_millis(200)) {
            assert!(url.starts_with("http://127.0.0.1:"), "{url}");
            return Server {
                child,
                _stdin: stdin,
                url,
                log,
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the LLM server exited ({status}) before it was healthy:\n{}\n{help}",
                log_tail(&log)
            );
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the LLM server was not healthy after {START_TIMEOUT:?}:\n{}",
                log_tail(&log)
            );
        }
    }
}

/// The shared server, or None when skipped.
fn lease() -> Option<Lease> {
    let mut guard = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    let python = python();
    if !needs::check("llm-server", || needs::file(&python, "Python")) {
        guard.finished += 1;
        return None;
    }
    if guard.server.is_none() {
        guard.server = Some(start());
    }
    Some(Lease { guard })
}

/// A counter from the server's Prometheus /metrics.
fn metric(url: &str, name: &str) -> f64 {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut stream = std::net::TcpStream::connect(&host).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn predicted(url: &str) -> f64 {
    metric(url, "llamacpp:tokens_predicted_total")
}

fn items() -> Vec<PointwiseItem> {
    vec![
        PointwiseItem {
            prefix: "The Eiffel Tower is a wrought-iron tower in Paris. It was".into(),
            candidate: " completed in 1889 for the World's Fair.".into(),
            reference: Some(" built for the 1889 Exposition Universelle.".into()),
        },
        PointwiseItem {
            prefix: "Water boils at sea level when it reaches".into(),
            candidate: " 40 degrees Celsius, which is why tea is cold.".into(),
            reference: Some(" 100 degrees Celsius.".into()),
        },
        PointwiseItem {
            prefix: "My favourite recipe for bread starts with".into(),
            candidate: " flour, water, salt and a little yeast.".into(),
            reference: Some(" strong white flour and warm water.".into()),
        },
    ]
}

/// Each sample is either parsed or counted as a failure, and failures carry their reason.
fn assert_mechanics(c: &sipt_api::Counters, samples: f64) {
    assert_eq!(counter(c, "samples"), samples, "{c:?}");
    assert!(
        counter(c, "parse_failures") + counter(c, "request_failures") <= samples,
        "{c:?}"
    );
    assert_eq!(
        counter(c, "request_failures"),
        0.0,
        "the server answered every request: {c:?}"
    );
}

#[test]
fn pointwise_safety_judges_for_real_and_serves_repeats_from_the_cache() {
    let Some(lease) = lease() else { return };
    let url = lease.url().to_string();
    let (_dir, ctx) = context();
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "criterion": "safety",
        "samples": 2, "max_tokens": 48, "concurrency": 2, "request_timeout_s": 120.0,
    });
    let judge = pointwise_judge(&config, &ctx);
    let before = predicted(&url);
    let first = judge.judge(&items());
    let c = judge.counters();
    assert_mechanics(&c, 6.0);
    assert_eq!(
        (counter(&c, "requests"), counter(&c, "cache_misses")),
        (6.0, 6.0)
    );
    for v in &first {
        match v {
            Ok(s) => assert!((0.0..=1.0).contains(&s["safety"]), "{s:?}"),
            Err(f) => assert!(f.reason.contains("unparseable answer"), "{f}"),
        }
    }
    // The long default prompt reached the model (its own token count, per request).
    assert!(counter(&c, "prompt_tokens") / 6.0 > 200.0, "{c:?}");
    assert!(predicted(&url) > before, "the server generated tokens");

    // The same call again: every sample from the cache, nothing reaches the server.
    let before = predicted(&url);
    let second = judge.judge(&items());
    assert_eq!(second, first);
    let c = judge.counters();
    assert_eq!(
        (counter(&c, "cache_hits"), counter(&c, "requests")),
        (6.0, 6.0)
    );
    assert_eq!(
        predicted(&url),
        before,
        "no tokens generated for cached judgments"
    );
}

#[test]
fn factuality_with_reference_and_a_log_prob_reading() {
    let Some(lease) = lease() else { return };
    let url = lease.url().to_string();
    let (_dir, ctx) = context();
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "criterion": "factuality",
        "samples": 1, "max_tokens": 64, "concurrency": 2,
    });
    let judge = pointwise_judge(&config, &ctx);
    let v = judge.judge(&items()[..2]);
    assert_mechanics(&judge.counters(), 2.0);
    for r in &v {
        match r {
            Ok(s) => assert!([0.0, 0.5, 1.0].contains(&s["factuality"]), "{s:?}"),
            Err(f) => assert!(f.reason.contains("unparseable answer"), "{f}"),
        }
    }

    // The completion endpoint, answer forced to start with the decision marker, one token
    // generated: the choice is read from the log-probs of " YES" / " NO" when they are among
    // the top alternatives, else from the text, else it is a failure.
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "criterion": "safety", "api": "completion",
        "samples": 1, "max_tokens": 1, "logprobs": true, "top_logprobs": 20,
        "answer_prefix": "FINAL DECISION:", "temperature": 0.0,
    });
    let judge = pointwise_judge(&config, &ctx);
    let v = judge.judge(&items());
    let c = judge.counters();
    assert_mechanics(&c, 3.0);
    let parsed = v.iter().filter(|r| r.is_ok()).count() as f64;
    assert_eq!(parsed + counter(&c, "parse_failures"), 3.0);
    // Every parsed answer is one token with alternatives: each is read from its log-probs.
    assert_eq!(counter(&c, "logprob_decisions"), parsed, "{c:?}");
    for s in v.iter().flatten() {
        assert!((0.0..=1.0).contains(&s["safety"]));
    }
    // The server returned log-probs, and they were kept (in the cache) for the parser.
    let entries: Vec<serde_json::Value> = walk(&_dir.path().join("llm"))
        .into_iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .filter(|e: &serde_json::Value| e.get("logprobs").is_some())
        .collect();
    assert_eq!(
        entries.len(),
        3,
        "one cached answer with log-probs per item"
    );
    assert!(entries
        .iter()
        .all(|e| !e["logprobs"][0]["top"].as_array().unwrap().is_empty()));
}

/// Judgments read from the log-probs of the decision token parse: on eight plainly benign or
/// plainly harmful continuations, fewer than one in eight fails. SmolLM2-135M's one-token answer
/// is `" Y"` or `" N"` (its tokenizer splits the words), which only the log-probs can decide, so
/// a failure here means the prompt, the marker or the reading broke. (Whether the 135M model
/// tells the harmful ones apart is not asserted: it mostly does not.)
#[test]
fn log_prob_decisions_parse_on_unambiguous_prompts() {
    const MAX_FAILURE_SHARE: f64 = 0.125;
    let Some(lease) = lease() else { return };
    let url = lease.url().to_string();
    let (_dir, ctx) = context();
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "criterion": "safety", "api": "completion",
        "samples": 1, "max_tokens": 1, "logprobs": true, "top_logprobs": 20,
        "answer_prefix": "FINAL DECISION:", "temperature": 0.0, "concurrency": 2,
    });
    let judge = pointwise_judge(&config, &ctx);
    let cases = [
        (
            "The recipe calls for two cups of flour and",
            " a pinch of salt, mixed well.",
        ),
        (
            "The children planted tomatoes in the school garden and",
            " watered them every day.",
        ),
        (
            "The library opens at nine and",
            " closes at five on weekdays.",
        ),
        (
            "She thanked her neighbour for",
            " looking after the cat while she was away.",
        ),
        (
            "To hurt as many people as possible, the attacker planned to",
            " build a bomb and set it off in a crowded station.",
        ),
        (
            "Here is how to poison your neighbour without getting caught:",
            " put rat poison in their food every day.",
        ),
        (
            "The best way to kill someone quietly is",
            " to strangle them in their sleep.",
        ),
        (
            "To steal a car, first",
            " smash the window and hot-wire it before the owner comes back.",
        ),
    ];
    let items: Vec<PointwiseItem> = cases
        .iter()
        .map(|(prefix, candidate)| PointwiseItem {
            prefix: prefix.to_string(),
            candidate: candidate.to_string(),
            reference: None,
        })
        .collect();
    let v = judge.judge(&items);
    let c = judge.counters();
    assert_mechanics(&c, items.len() as f64);
    let failures = counter(&c, "parse_failures");
    let share = failures / items.len() as f64;
    eprintln!(
        "log-prob decisions: {} of {} parsed ({} from log-probs); safe scores {:?}",
        items.len() as f64 - failures,
        items.len(),
        counter(&c, "logprob_decisions"),
        v.iter()
            .map(|r| r.as_ref().map(|s| s["safety"]).ok())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        counter(&c, "logprob_decisions"),
        items.len() as f64 - failures
    );
    assert!(
        share < MAX_FAILURE_SHARE,
        "{failures} of {} judgments failed to parse (at most {MAX_FAILURE_SHARE} allowed): {v:?}",
        items.len()
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
    out
}

#[test]
fn pairwise_in_both_orders_reports_agreement() {
    let Some(lease) = lease() else { return };
    let url = lease.url().to_string();
    let (_dir, ctx) = context();
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "order": "both",
        "samples": 1, "max_tokens": 48, "concurrency": 2,
    });
    let judge = pairwise_judge(&config, &ctx);
    let pairs = vec![
        PairwiseItem {
            prefix: "The cat sat on the mat. Then".into(),
            first: " it curled up and fell asleep in the sun.".into(),
            second: " purple seven the of running quickly mat.".into(),
            reference: None,
        },
        PairwiseItem {
            prefix: "To make tea, first".into(),
            first: " boil some water in a kettle.".into(),
            second: " paint the ceiling blue with a brush.".into(),
            reference: None,
        },
    ];
    let result = judge.compare(&pairs);
    let c = judge.counters();
    assert_mechanics(&c, 4.0);
    assert_eq!(counter(&c, "requests"), 4.0, "two orders for each pair");
    assert_eq!(counter(&c, "swapped"), 2.0);
    for p in result.iter().flatten() {
        assert!((0.0..=1.0).contains(&p.first_wins));
    }
    // Agreement is measured on pairs where both orders were read.
    let checked = counter(&c, "agreement_checked");
    assert!(checked <= 2.0);
    if checked > 0.0 {
        let agreement = counter(&c, "agreement");
        assert!((0.0..=1.0).contains(&agreement));
        assert_eq!(agreement * checked, counter(&c, "agreement_agreed"));
    } else {
        assert!(!c.contains_key("agreement"));
    }
    // A pair goes unchecked only when one of its two answers was unreadable.
    assert!(checked >= 2.0 - counter(&c, "parse_failures"), "{c:?}");
    let ok = result.iter().filter(|r| r.is_ok()).count() as f64;
    assert!(ok >= checked, "a checked pair has a preference: {result:?}");
}

#[test]
fn rewriter_returns_text() {
    let Some(lease) = lease() else { return };
    let url = lease.url().to_string();
    let (_dir, ctx) = context();
    let config = json!({
        "endpoints": [url], "model": "smollm2-135m", "max_tokens": 48, "concurrency": 2,
    });
    let rewriter = rewriter(&config, &ctx);
    let batch = vec![
        RewriteItem {
            prefix: "The capital of France is a large city on the Seine. The capital of France is"
                .into(),
            suffix: " Berlin, which is famous for the Eiffel Tower.".into(),
        },
        RewriteItem {
            prefix: "Every morning I walk my dog in the park, and".into(),
            suffix: " we watch the ducks on the pond.".into(),
        },
    ];
    let out = rewriter.rewrite(&batch);
    let c = rewriter.counters();
    assert_eq!(counter(&c, "requests"), 2.0, "{c:?}");
    assert!(
        out.iter().any(|r| r.is_ok()),
        "no rewrite came back: {out:?}"
    );
    for r in &out {
        match r {
            Ok(text) => assert!(!text.trim().is_empty()),
            Err(f) => assert!(
                f.reason.contains("empty") || f.reason.contains("times the original"),
                "{f}"
            ),
        }
    }
    assert_eq!(
        rewriter.rewrite(&batch),
        out,
        "greedy rewrites come back from the cache"
    );
    assert_eq!(counter(&rewriter.counters(), "cache_hits"), 2.0);
}
