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

{TINY_MODEL}

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
    let fonts = needs::check("fonts", || {
        sipt_experiment::sweep::plots::find_font()
            .map(|_| ())
            .ok_or_else(|| "no TrueType font for plot text".to_string())
    });
    let plots: &[&str] = if fonts {
        &[
            "loss-total.png",
            "reward-original-mean.png",
            "reward-rollout-mean.png",
            "chosen-rollout.png",
        ]
    } else {
        &[]
    };
    for plot in plots {
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

fn long_ntp(dir: &std::path::Path, steps: u32) -> std::path::PathBuf {
    write(
        dir,
        "long.toml",
        &format!(
            r#"[experiment]
name = "long"
device = "cpu"
threads = 1

{TINY_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 16

[train]
steps = {steps}
batch_size = 2
eval_every = 0
checkpoint_every = 5
log_every = 1

[train.objective]
type = "ntp"

[sweep]
grid = {{ "experiment.seed" = [3] }}
"#
        ),
    )
}

fn progress_step(run: &std::path::Path) -> (u64, u32) {
    std::fs::read_to_string(run.join("progress.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            (
                v["step"].as_u64().unwrap_or(0),
                v["pid"].as_u64().unwrap_or(0) as u32,
            )
        })
        .unwrap_or((0, 0))
}

fn wait_for_step(run: &std::path::Path, step: u64) -> u32 {
    let started = std::time::Instant::now();
    loop {
        let (s, pid) = progress_step(run);
        if s >= step {
            return pid;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{} did not reach step {step}",
            run.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_killed_sweep_takes_its_trials_along_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 1500;
    let file = long_ntp(dir.path(), steps);
    let out_dir = dir.path().join("sweep");
    let mut sweep = sipt()
        .arg("sweep")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let trial = out_dir.join("seed-3");
    let pid = wait_for_step(&trial, 12);
    sweep.kill().unwrap(); // SIGKILL: nothing of the sweep runs after this
    sweep.wait().unwrap();
    let started = std::time::Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the trial outlived its sweep"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let state = std::fs::read_to_string(out_dir.join("sweep.json")).unwrap();
    assert!(state.contains("\"running\""), "{state}");

    let out = run(sipt()
        .arg("sweep")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("(resuming)"), "{}", out.stderr);
    assert_eq!(logged_steps(&trial), (1..=steps as u64).collect::<Vec<_>>());
}

#[test]
fn a_run_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = long_ntp(dir.path(), 3000);
    // The same experiment without its [sweep] table, as a plain run.
    let text = std::fs::read_to_string(&file).unwrap();
    let plain = write(
        dir.path(),
        "plain.toml",
        &text[..text.find("[sweep]").unwrap()],
    );
    let run_dir = dir.path().join("run");
    let mut first = sipt()
        .arg("run")
        .arg(&plain)
        .arg("--out")
        .arg(&run_dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = wait_for_step(&run_dir, 2);
    let second = run(sipt()
        .arg("run")
        .arg(&plain)
        .arg("--out")
        .arg(&run_dir)
        .arg("--resume"));
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert!(
        second
            .stderr
            .contains(&format!("is in use by another sipt process (pid {pid})")),
        "{}",
        second.stderr
    );
}
