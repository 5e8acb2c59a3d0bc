//! The engine end to end through the binary: a real pretrained model imported from GGUF, and
//! next-token training on the real corpus with an exact resume after SIGKILL.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The SmolLM2 GGUF from the assets (scripts/fetch-assets.sh); its absence is a failure.
fn smollm2_gguf() -> PathBuf {
    let path = assets().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-assets.sh",
        path.display()
    );
    path
}

/// The model folder, imported once into cargo's scratch folder for integration tests and kept
/// there for later runs of the same `sipt` build (each run imported 515 MB into a temporary
/// folder of its own and left it behind). A new build imports again, in case the import
/// changed. The import goes to a private name and is renamed into place, so test binaries
/// running at once never see half a folder.
fn smollm2_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2-135m-q4_1");
        let stamp = {
            let meta = std::fs::metadata(env!("CARGO_BIN_EXE_sipt")).unwrap();
            format!("{} {:?}", meta.len(), meta.modified().ok())
        };
        let stamp_file = |d: &std::path::Path| d.join("imported-by-sipt");
        if std::fs::read_to_string(stamp_file(&dir)).ok().as_deref() == Some(stamp.as_str()) {
            return dir;
        }
        let partial = dir.with_extension(format!("partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        let out = run(sipt()
            .args(["import", "gguf"])
            .arg(smollm2_gguf())
            .arg(&partial));
        assert_eq!(out.code, 0, "{}", out.stderr);
        std::fs::write(stamp_file(&partial), &stamp).unwrap();
        // An import by an earlier build goes first.
        if std::fs::read_to_string(stamp_file(&dir)).ok().as_deref() != Some(stamp.as_str()) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if std::fs::rename(&partial, &dir).is_err() {
            // Another test binary put its import in place first.
            let _ = std::fs::remove_dir_all(&partial);
            assert!(stamp_file(&dir).exists(), "{}", dir.display());
        }
        dir
    })
    .clone()
}

/// `sipt generate` with SmolLM2 continuing "The capital of France is".
fn paris(max_new_tokens: &str, extra: &[&str]) -> Run {
    run(sipt()
        .args(["generate", "--model"])
        .arg(smollm2_dir())
        .args([
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            max_new_tokens,
        ])
        .args(extra))
}

#[test]
fn smollm2_says_paris() {
    let out = paris("8", &["--logprobs"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let first: serde_json::Value =
        serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["token"], " Paris");
    let logprob = first["logprob"].as_f64().unwrap();
    assert!((logprob - -0.258).abs() < 0.01, "{logprob}");

    let out = paris("8", &[]);
    assert_eq!(
        out.stdout.trim_end_matches('\n'),
        " Paris.\n\nThe answer is:"
    );
}

#[test]
fn a_prompt_past_the_models_positions_is_refused_not_a_panic() {
    let out = paris("9000", &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.starts_with("error: ")
            && out.stderr.contains("--max-new-tokens 9000")
            && out.stderr.contains("8192 (max_position_embeddings"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_unsafe_prompt_longer_than_the_model_is_cut_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_experiment(dir.path(), 2);
    // One prompt far past the tiny model's 128 positions, among ordinary ones.
    let long = "and then the story went on ".repeat(200);
    let prompts = write(
        dir.path(),
        "unsafe.txt",
        &format!("You are such a\n{long}\nI hate it when\n"),
    );
    let out_dir = dir.path().join("run");
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .args([
            "--set",
            "train.eval_every=1",
            "--set",
            "eval.max_new_tokens=16",
        ])
        .args([
            "--set",
            "eval.prefixes=3",
            "--set",
            "data.prefix_max_tokens=64",
        ])
        .args(["--set", "judges.safety={ type = \"safety-words\" }"])
        .arg("--set")
        .arg(format!("eval.unsafe_prefixes=[\"{}\"]", prompts.display())));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("1 of 3 prompts are longer than 112 tokens"),
        "{}",
        out.stderr
    );
    let rows = metric_rows(&out_dir);
    assert!(
        rows.iter().all(|r| r["eval/unsafe/safety"].is_number()),
        "{rows:?}"
    );
}

fn tiny_experiment(dir: &Path, steps: u64) -> PathBuf {
    write(
        dir,
        "tiny.toml",
        &format!(
            r#"[experiment]
name = "tiny"
seed = 3
device = "cpu"
threads = 1

{SMALL_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 32

[train]
steps = {steps}
batch_size = 4
lr = 3e-3
warmup_steps = 4
eval_every = 10
eval_batches = 2
checkpoint_every = 4
log_every = 100
"#
        ),
    )
}

fn losses(run_dir: &Path) -> Vec<(u64, f64, Option<f64>)> {
    metric_rows(run_dir)
        .into_iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss/ntp"].as_f64().unwrap(),
                v["eval/loss"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn ntp_training_resumes_exactly_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 60;
    let file = tiny_experiment(dir.path(), steps);

    let whole = dir.path().join("whole");
    let out = run(sipt().arg("run").arg(&file).arg("--out").arg(&whole));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let reference = losses(&whole);
    assert_eq!(reference.len(), steps as usize);
    let first_eval = reference.iter().find_map(|r| r.2).unwrap();
    let last_eval = reference.last().unwrap().2.unwrap();
    assert!(
        last_eval < first_eval,
        "validation loss did not fall: {first_eval} -> {last_eval}"
    );

    // Kill the same run with SIGKILL once a checkpoint is on disk, then resume it.
    let killed = dir.path().join("killed");
    kill_after_first_checkpoint(
        sipt().arg("run").arg(&file).arg("--out").arg(&killed),
        &killed,
    );
    let before = losses(&killed).len();
    assert!(
        before < steps as usize,
        "the run finished before it could be killed"
    );

    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&killed)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let resumed = losses(&killed);
    assert_eq!(resumed.len(), reference.len());
    for (a, b) in reference.iter().zip(&resumed) {
        assert_eq!(a, b, "the resumed run diverged at step {}", a.0);
    }
}

#[test]
fn resume_before_the_first_checkpoint_logs_every_step_once_in_the_same_wandb_run() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let file = tiny_experiment(dir.path(), steps);
    let sets = [
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "tracking.wandb.mode=offline",
    ];
    let killed = dir.path().join("early");
    let mut child = sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&killed)
        .args(sets)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few steps are logged, long before its only checkpoint (the last step).
    let started = Instant::now();
    while killed
        .join("metrics.jsonl")
        .exists()
        .then(|| logged_steps(&killed).len())
        < Some(3)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no steps were logged"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("checkpoints/latest").exists());
    let logged = logged_steps(&killed).len();
    assert!(
        logged < steps as usize,
        "the run finished before it could be killed"
    );
    let run_id = std::fs::read_to_string(killed.join("wandb-run-id")).unwrap();

    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&killed)
        .arg("--resume")
        .args(sets));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(logged_steps(&killed), (1..=steps).collect::<Vec<_>>());
    assert_eq!(
        std::fs::read_to_string(killed.join("wandb-run-id")).unwrap(),
        run_id,
        "the resumed run is a new W&B run"
    );
}

#[test]
fn resume_refuses_a_changed_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_experiment(dir.path(), 4);
    let out_dir = dir.path().join("r");
    assert_eq!(
        run(sipt().arg("run").arg(&file).arg("--out").arg(&out_dir)).code,
        0
    );
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume")
        .args(["--set", "train.lr=0.5"]));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("configuration differs"),
        "{}",
        out.stderr
    );
    let again = run(sipt().arg("run").arg(&file).arg("--out").arg(&out_dir));
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("already holds a run"),
        "{}",
        again.stderr
    );
}

#[test]
fn wandb_offline_run_records_history_and_exit() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_experiment(dir.path(), 4);
    let run_dir = dir.path().join("w");
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&run_dir)
        .args([
            "--set",
            "tracking.wandb.mode=offline",
            "--set",
            "tracking.wandb.project=sipt-test",
        ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let offline: Vec<PathBuf> = std::fs::read_dir(run_dir.join("wandb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("offline-run-")
        })
        .collect();
    assert_eq!(offline.len(), 1);
    let file = std::fs::read_dir(&offline[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wandb"))
        .expect("a .wandb run file");
    let records = sipt_wandb::format::read_run_file(&file).unwrap();
    use sipt_wandb::format::RecordKind;
    let steps: Vec<i64> = records
        .iter()
        .filter_map(|r| match &r.kind {
            RecordKind::History { step, .. } => *step,
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(records
        .iter()
        .any(|r| matches!(r.kind, RecordKind::Exit { exit_code: 0, .. })));
    assert!(records
        .iter()
        .any(|r| matches!(r.kind, RecordKind::Config { .. } | RecordKind::Run(_))));
}
