//! The Slurm executor against a real single-node Slurm (Debian slurm-wlm + munge), which
//! `scripts/slurm-local.sh start` brings up and `scripts/test.sh` starts before the tests:
//! a sweep as one job array with the file's resources, exit statuses and failures, a detached
//! sweep followed by `sipt status`, a trial killed by `scancel` and resumed from its checkpoint.
//!
//! They need Slurm (tests/common/needs.rs: absent, they fail with how to start it;
//! `SIPT_SKIP=slurm` skips them).

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn slurm_available() -> bool {
    needs::check("slurm", || {
        if std::env::var_os("SLURM_CONF").is_none() {
            return Err("SLURM_CONF is not set".into());
        }
        match std::process::Command::new("sinfo").arg("-h").output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "sinfo failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run sinfo: {e}")),
        }
    })
}

fn experiment(
    dir: &Path,
    name: &str,
    steps: u32,
    objective: &str,
    sweep: &str,
) -> std::path::PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &format!(
            r#"[experiment]
name = "{name}"
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
steps = {steps}
batch_size = 2
eval_every = 0
checkpoint_every = 5
log_every = 1

[train.objective]
type = "{objective}"

[sweep]
executor = "slurm"
{sweep}

[sweep.slurm]
partition = "debug"
time = "00:10:00"
cpus = 1
max_parallel = 1
"#
        ),
    )
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap()
}

fn statuses(dir: &Path) -> Vec<String> {
    state(dir)["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sweep_runs_as_a_job_array_and_reports_failures() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Two trials: one trains from scratch, one names a model folder that does not exist and
    // fails when it starts.
    let file = experiment(
        dir.path(),
        "slurm-array",
        3,
        "online-dpo",
        r#"grid = { "model.path" = ["", "/nonexistent/model"] }"#,
    );
    let out_dir = dir.path().join("sweep");
    let out = run(sipt().arg("sweep").arg(&file).arg("--out").arg(&out_dir));
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("submitted Slurm job"), "{}", out.stderr);
    assert!(
        out.stderr.contains("failed: exit status 1"),
        "{}",
        out.stderr
    );
    let s = state(&out_dir);
    assert_eq!(s["executor"], "slurm");
    let jobs = s["slurm_jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let script = std::fs::read_to_string(jobs[0]["script"].as_str().unwrap()).unwrap();
    for want in [
        "#SBATCH --array=0,1%1",
        "#SBATCH --time=00:10:00",
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=1",
    ] {
        assert!(script.contains(want), "{want} missing from\n{script}");
    }
    let names: Vec<String> = s["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["trial"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses(&out_dir), ["done", "failed"], "{names:?}");
    let good = out_dir.join(&names[0]);
    assert!(std::fs::read_to_string(good.join("exit_code"))
        .unwrap()
        .starts_with("rc=0 "));
    assert!(good.join("metrics.jsonl").exists());
    let bad = std::fs::read_to_string(out_dir.join(&names[1]).join("log.txt")).unwrap();
    assert!(bad.contains("/nonexistent/model"), "{bad}");
    // Results were written for the finished trial.
    let table = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    assert!(
        table.contains(&format!("| {} | done |", names[0])),
        "{table}"
    );

    // `sipt status` shows both.
    let out = run(sipt().arg("status").arg(&out_dir));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("slurm executor"), "{}", out.stdout);
    assert!(out.stdout.contains("1 done, 1 failed"), "{}", out.stdout);

    // Resume submits only the failed trial again (it fails again: the model is still missing).
    let out = run(sipt()
        .arg("sweep")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let s = state(&out_dir);
    let jobs = s["slurm_jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1]["trials"], serde_json::json!([1]));
}

#[test]
fn detached_sweep_killed_by_scancel_resumes_from_its_checkpoint() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = 1500;
    let file = experiment(
        dir.path(),
        "slurm-kill",
        steps,
        "ntp",
        r#"grid = { "experiment.seed" = [7] }"#,
    );
    let out_dir = dir.path().join("sweep");
    let out = run(sipt()
        .arg("sweep")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--detach"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("submitted"), "{}", out.stdout);
    let job = state(&out_dir)["slurm_jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let trial = out_dir.join("seed-7");

    // Wait until it trained past a checkpoint, then kill the job.
    let started = Instant::now();
    loop {
        let step = std::fs::read_to_string(trial.join("progress.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0);
        if step >= 12 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the trial did not start training; {}",
            run(sipt().arg("status").arg(&out_dir)).stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = run(sipt().arg("status").arg(&out_dir));
    assert!(status.stdout.contains("running"), "{}", status.stdout);
    assert!(std::process::Command::new("scancel")
        .arg(&job)
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    loop {
        let out = std::process::Command::new("squeue")
            .args(["-h", "-j", &job])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "scancel did not end the job"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = run(sipt().arg("status").arg(&out_dir));
    assert!(status.stdout.contains("failed"), "{}", status.stdout);
    assert!(!trial.join("exit_code").exists());

    // Resume: a new array for the killed trial, which continues from its last checkpoint.
    let out = run(sipt()
        .arg("sweep")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("(resuming)"), "{}", out.stderr);
    assert_eq!(statuses(&out_dir), ["done"]);
    assert_eq!(state(&out_dir)["slurm_jobs"].as_array().unwrap().len(), 2);
    let log = std::fs::read_to_string(trial.join("log.txt")).unwrap();
    assert!(log.contains("resum"), "{log}");
    // Every step is in the metrics exactly once, despite the kill.
    assert_eq!(logged_steps(&trial), (1..=steps as u64).collect::<Vec<_>>());
}

#[test]
fn a_trial_of_two_tasks_runs_its_ranks_with_srun() {
    if !slurm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = experiment(
        dir.path(),
        "slurm-ranks",
        3,
        "ntp",
        "grid = { \"train.lr\" = [1e-3] }",
    );
    let out_dir = dir.path().join("sweep");
    let out = run(sipt()
        .arg("sweep")
        .arg(&file)
        .args(["--set", "sweep.slurm.tasks_per_node=2"])
        .arg("--out")
        .arg(&out_dir));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let s = state(&out_dir);
    let script = std::fs::read_to_string(s["slurm_jobs"][0]["script"].as_str().unwrap()).unwrap();
    assert!(script.contains("#SBATCH --ntasks-per-node=2"), "{script}");
    assert!(script.contains("srun --kill-on-bad-exit=1 "), "{script}");
    assert_eq!(statuses(&out_dir), ["done"]);
    let name = s["trials"][0]["trial"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let trial = out_dir.join(&name);
    let log = std::fs::read_to_string(trial.join("log.txt")).unwrap();
    assert!(log.contains("(2 ranks, Some(Gloo) backend)"), "{log}");
    assert_eq!(logged_steps(&trial), vec![1, 2, 3]);
}
