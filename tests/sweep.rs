//! Sweeps end to end: trials from a grid, one directory each, a results table, resume that
//! skips finished trials, and refusal of a changed definition.

mod common;
use common::*;

fn sweep_file(dir: &std::path::Path, rollouts: &str) -> std::path::PathBuf {
    write(
        dir,
        "sweep.toml",
        &format!(
            r#"[experiment]
name = "sweep-test"
device = "cpu"
threads = 1

[model]
vocab_size = 512
hidden_size = 32
layers = 1
heads = 2
kv_heads = 1
intermediate_size = 64
max_position = 64

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 16
suffix_tokens = 4
prefix_min_tokens = 8
prefix_max_tokens = 16

[judges.quality]
type = "quality-proxy-pairwise"

[train]
steps = 2
batch_size = 2
eval_every = 0

[train.objective]
type = "online-dpo"

[sweep]
grid = {{ "sip.rollouts" = [{rollouts}] }}
"#
        ),
    )
}

#[test]
fn grid_sweep_runs_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let file = sweep_file(dir.path(), "1, 2");
    let out_dir = dir.path().join("sweep");
    let out = run(sipt()
        .args(["sweep"])
        .arg(&file)
        .args(["--jobs", "2", "--status-every", "0.5", "--out"])
        .arg(&out_dir));
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Live status lines name each running trial (not a terminal: plain lines).
    assert!(out.stderr.contains("sweep: 0/2 finished"), "{}", out.stderr);
    assert!(out.stderr.contains("  rollouts-1: "), "{}", out.stderr);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("sweep.json")).unwrap())
            .unwrap();
    let trials = state["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    assert!(trials.iter().all(|t| t["status"] == "done"));
    let table = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(
        table.contains("| rollouts-1 | done |") && table.contains("| rollouts-2 | done |"),
        "{table}"
    );
    let csv = std::fs::read_to_string(out_dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    // PNG plots of the key curves, one line per trial, linked from the table.
    for plot in [
        "loss-total.png",
        "reward-original-mean.png",
        "reward-rollout-mean.png",
        "chosen-rollout.png",
    ] {
        let png = std::fs::read(out_dir.join("plots").join(plot))
            .unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{plot} is not a PNG");
        assert!(table.contains(&format!("](plots/{plot})")), "{table}");
    }
    // Each trial's progress file says it finished all its steps.
    let out = run(sipt().arg("status").arg(&out_dir));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("2 done, 0 failed"), "{}", out.stdout);
    assert!(
        out.stdout.contains("rollouts-2  done     2/2 steps, loss"),
        "{}",
        out.stdout
    );
    for t in ["rollouts-1", "rollouts-2"] {
        assert!(out_dir.join(t).join("metrics.jsonl").exists());
        assert!(out_dir.join(t).join("experiment.toml").exists());
    }

    // Resume: finished trials are not run again.
    let metrics = out_dir.join("rollouts-1/metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let out = run(sipt()
        .args(["sweep"])
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );

    // A changed definition is refused.
    let changed = sweep_file(dir.path(), "1, 3");
    let out = run(sipt()
        .args(["sweep"])
        .arg(&changed)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("definition changed"), "{}", out.stderr);

    // `sipt report` rebuilds the table.
    std::fs::remove_file(out_dir.join("results.md")).unwrap();
    let out = run(sipt().arg("report").arg(&out_dir));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out_dir.join("results.md").exists());
}
