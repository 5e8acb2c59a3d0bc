//! The self-improving step end to end through the binary: identical results with and without
//! overlapping the rewrite/judge work, and an exact resume after SIGKILL.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn experiment(dir: &Path, steps: u64) -> PathBuf {
    write(
        dir,
        "sip.toml",
        &format!(
            r#"[experiment]
name = "sip-test"
seed = 5
device = "cpu"
threads = 1

{SMALL_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 32
suffix_tokens = 8
prefix_min_tokens = 16
prefix_max_tokens = 32

[sip]
rewrite = true
rollouts = 3
tournament = "swiss"
sample_every = 2

[judges.safety]
type = "safety-words"

[judges.quality]
type = "quality-proxy-pairwise"
sharpness = 10.0

[rewriter]
type = "redact"

[health]
# Short windows and a source-share threshold every step crosses: the monitors alarm before the
# first checkpoint, so a resumed run must carry their windows to log the same rows.
window = 2
max_source_share = 0.01

[train]
steps = {steps}
batch_size = 4
lr = 3e-3
warmup_steps = 2
checkpoint_every = 3
log_every = 100

[train.objective]
type = "online-dpo"
beta = 0.2
reference = "sync"
sync_every = 4
ntp_weight = 0.5
"#
        ),
    )
}

#[test]
fn overlap_changes_nothing_and_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 12;
    let file = experiment(dir.path(), steps);

    let overlapped = dir.path().join("overlapped");
    let out = run(sipt().arg("run").arg(&file).arg("--out").arg(&overlapped));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let reference = untimed_rows(&overlapped);
    assert_eq!(reference.len(), steps as usize);
    let last = reference.last().unwrap();
    for key in [
        "loss/dpo",
        "reward/rollout/mean",
        "chosen/original",
        "judge/quality/calls",
        "judge/safety/calls",
        "health/alarms",
    ] {
        assert!(last.contains_key(key), "no {key} in {last:?}");
    }
    assert!(
        reference[2]["health/alarms"].as_f64() > Some(0.0),
        "no monitor alarms by the first checkpoint: {:?}",
        reference[2]
    );
    assert!(std::fs::read_to_string(overlapped.join("samples.jsonl"))
        .unwrap()
        .contains("\"role\":\"chosen\""));

    let sequential = dir.path().join("sequential");
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&sequential)
        .args(["--set", "sip.overlap=false"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        untimed_rows(&sequential),
        reference,
        "overlap changed the results"
    );

    let killed = dir.path().join("killed");
    kill_after_first_checkpoint(
        sipt().arg("run").arg(&file).arg("--out").arg(&killed),
        &killed,
    );
    assert!(
        untimed_rows(&killed).len() < steps as usize,
        "the run finished before it could be killed"
    );
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&killed)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(untimed_rows(&killed), reference, "the resumed run diverged");
}

#[test]
fn every_shipped_experiment_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("experiments")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = run(sipt().arg("validate").arg(&path));
        assert_eq!(out.code, 0, "{}: {}", path.display(), out.stderr);
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn micro_batched_updates_match_one_pass_and_chunked_sampling_runs() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 4;
    let file = experiment(dir.path(), steps);
    let whole = dir.path().join("whole");
    let out = run(sipt().arg("run").arg(&file).arg("--out").arg(&whole));
    assert_eq!(out.code, 0, "{}", out.stderr);
    // 4 prefixes -> up to 8 DPO sequences and 4 NTP rows, replayed 3 at a time.
    let micro = dir.path().join("micro");
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .args(["--set", "train.micro_batch=3", "--out"])
        .arg(&micro));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (a, b) = (untimed_rows(&whole), untimed_rows(&micro));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss/total", "loss/dpo", "loss/ntp", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 2e-3 * p.abs().max(1.0),
                "step {}: {key} {p} in one pass, {q} micro-batched",
                x["step"]
            );
        }
    }
    // Sampling one prefix per call: a complete, reproducible run.
    let chunked = |name: &str| {
        let d = dir.path().join(name);
        let out = run(sipt()
            .arg("run")
            .arg(&file)
            .args(["--set", "sip.rollout_prefixes=1", "--out"])
            .arg(&d));
        assert_eq!(out.code, 0, "{}", out.stderr);
        untimed_rows(&d)
    };
    let (c1, c2) = (chunked("chunked1"), chunked("chunked2"));
    assert_eq!(c1, c2);
    assert!(c1.iter().all(|r| r.contains_key("reward/rollout/mean")));
}
