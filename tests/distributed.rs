//! Data-parallel training over real c10d process groups (Gloo over loopback): 2 ranks train
//! like 1 (next-token and SIP training), a killed rank ends the job promptly and `--resume`
//! completes it, and the refusals that need the world size come before any work.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The quickstart experiment made short: `steps` steps, no periodic evaluation, one thread a
/// rank, and `extra` settings (`key=value`).
fn quickstart(steps: u64, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("train.steps={steps}"),
        "train.eval_every=0".into(),
        "train.checkpoint_every=2".into(),
        "train.log_every=100".into(),
        "experiment.threads=1".into(),
        "experiment.device=\"cpu\"".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args = vec!["run".to_string(), "experiments/quickstart.toml".into()];
    for s in sets {
        args.push("--set".into());
        args.push(s);
    }
    args
}

fn train(out: &Path, args: &[String], ranks: usize) -> Run {
    let mut cmd = sipt();
    cmd.args(args).arg("--out").arg(out);
    if ranks > 1 {
        cmd.args(["--nproc-per-node", &ranks.to_string()]);
    }
    run(&mut cmd)
}

fn final_weights(run_dir: &Path, step: u64) -> Vec<(String, tch::Tensor)> {
    let file = run_dir
        .join("checkpoints")
        .join(format!("step-{step:08}"))
        .join("model.safetensors");
    let mut named = tch::Tensor::read_safetensors(&file).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// max |a - b| over every weight, relative to the largest |weight|.
fn relative_difference(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> f64 {
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    let mut diff = 0f64;
    let mut scale = 0f64;
    for ((_, x), (_, y)) in a.iter().zip(b) {
        diff = diff.max((x - y).abs().max().double_value(&[]));
        scale = scale.max(x.abs().max().double_value(&[]));
    }
    diff / scale
}

/// Each row's value of `key`, for every row.
fn series(run_dir: &Path, key: &str) -> Vec<f64> {
    metric_rows(run_dir)
        .iter()
        .map(|r| r[key].as_f64().unwrap_or_else(|| panic!("no {key} in {r}")))
        .collect()
}

fn assert_close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1.0),
            "{what}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn next_token_training_on_two_ranks_matches_one() {
    let dir = tempfile::tempdir().unwrap();
    let args = quickstart(4, &["train.objective={ type = \"ntp\" }"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let out = train(&one, &args, 1);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = train(&two, &args, 2);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // One writer: rank 0 speaks, the other rank is quiet.
    assert!(
        out.stderr.contains("2 ranks, Some(Gloo) backend"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("rank 1"), "{}", out.stderr);

    let d = relative_difference(&final_weights(&one, 4), &final_weights(&two, 4));
    assert!(d <= 1e-4, "final weights differ by {d} of the weight scale");
    for key in ["loss/ntp", "grad_norm", "lr", "tokens"] {
        assert_close(key, &series(&one, key), &series(&two, key));
    }
    assert_eq!(logged_steps(&two), vec![1, 2, 3, 4]);
    // The rows say how long the gradients took to travel.
    assert!(series(&two, "time/all_reduce").iter().all(|&s| s > 0.0));
}

#[test]
fn self_improving_training_on_two_ranks_matches_one() {
    let dir = tempfile::tempdir().unwrap();
    // The quickstart's SIP step (online DPO with a next-token term, rewrites, 4 rollouts, an
    // all-pairs tournament) with its evaluation (sharded over the ranks), and its swiss variant
    // whose draws are keyed by pool. Two rank counts add the gradients in different orders, so
    // the weights agree to float noise only, and a token sampled at temperature 1 flips where
    // its uniform draw falls within that noise of a boundary between two tokens (at the third
    // step, on this data). Rollouts are greedy here: a flip then needs two logits within float
    // noise of each other, and the comparison below can be exact. One step at temperature 1
    // (the ranks start from the same weights, so nothing can flip yet) checks that every
    // rollout row draws from its own stream whichever rank samples it.
    for (name, steps, extra) in [
        ("sampled", 1, vec![]),
        (
            "all-pairs",
            3,
            vec![
                "sip.temperature=0",
                "train.eval_every=3",
                "eval.prefixes=4",
                "eval.max_new_tokens=8",
            ],
        ),
        (
            "swiss",
            3,
            vec![
                "sip.temperature=0",
                "sip.tournament=\"swiss\"",
                "train.micro_batch=5",
            ],
        ),
    ] {
        let args = quickstart(steps, &extra);
        let (one, two) = (
            dir.path().join(format!("{name}-1")),
            dir.path().join(format!("{name}-2")),
        );
        let out = train(&one, &args, 1);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let out = train(&two, &args, 2);
        assert_eq!(out.code, 0, "{}", out.stderr);

        let d = relative_difference(&final_weights(&one, steps), &final_weights(&two, steps));
        assert!(
            d <= 1e-4,
            "{name}: final weights differ by {d} of the weight scale"
        );
        // The same prefixes, rollouts and judgments: every metric of every step agrees.
        let (a, b) = (untimed_rows(&one), untimed_rows(&two));
        assert_eq!(a.len(), steps as usize);
        for (x, y) in a.iter().zip(&b) {
            let keys: Vec<&String> = x.keys().collect();
            assert_eq!(keys, y.keys().collect::<Vec<_>>(), "{name}");
            for (k, v) in x {
                let (v, w) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!(
                    (v - w).abs() <= 1e-4 * v.abs().max(1.0),
                    "{name}: {k} = {v} vs {w}"
                );
            }
        }
        assert!(a[0]["chosen/rollout"].as_f64().is_some(), "{:?}", a[0]);
        if name == "all-pairs" {
            for key in ["eval/loss", "eval/heldout/win_rate", "eval/unsafe/safety"] {
                assert!(a[2].contains_key(key), "no {key} in {:?}", a[2]);
            }
        }
        // Samples (written by rank 0) hold the same candidates and judgments.
        let samples = |d: &Path| std::fs::read_to_string(d.join("samples.jsonl")).unwrap();
        assert_eq!(samples(&one), samples(&two), "{name}");
    }
}

/// The launcher's ranks (its children), by rank.
fn ranks_of(launcher: u32) -> Vec<(usize, u32)> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .unwrap_or_default();
    let mut out = Vec::new();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for var in environ.split(|&b| b == 0) {
            if let Some(rank) = var.strip_prefix(b"RANK=") {
                if let Ok(r) = String::from_utf8_lossy(rank).parse() {
                    out.push((r, pid));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let timeout_s = 30.0;
    let args = quickstart(
        steps,
        &[
            "train.objective={ type = \"ntp\" }",
            &format!("distributed.timeout_s={timeout_s}"),
        ],
    );
    let out = dir.path().join("killed");
    let mut launcher = sipt()
        .args(&args)
        .arg("--out")
        .arg(&out)
        .args(["--nproc-per-node", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill rank 1 once the first checkpoint is there.
    let started = Instant::now();
    while !out.join("checkpoints/latest").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the job ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let ranks = ranks_of(launcher.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &ranks[1].1.to_string()])
        .status()
        .unwrap();
    let status = launcher.wait().unwrap();
    let waited = killed_at.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        waited < Duration::from_secs_f64(timeout_s),
        "the job took {waited:?} to end"
    );
    assert!(
        stderr.contains("error: rank 1 of 2 was killed (SIGKILL)"),
        "{stderr}"
    );
    let logged = logged_steps(&out).len() as u64;
    assert!(logged < steps, "the job finished before the kill");

    let resumed =
        run(sipt()
            .args(&args)
            .arg("--out")
            .arg(&out)
            .args(["--resume", "--nproc-per-node", "2"]));
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(logged_steps(&out), (1..=steps).collect::<Vec<_>>());
}

#[test]
fn what_the_world_size_forbids_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    // A global batch that 2 ranks cannot split.
    let out = train(
        &dir.path().join("odd"),
        &quickstart(
            2,
            &["train.objective={ type = \"ntp\" }", "train.batch_size=3"],
        ),
        2,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "train.batch_size = 3 is not divisible by the world size 2: every rank takes an equal share of the global batch"
        ),
        "{}",
        out.stderr
    );

    // A failure on one rank (rank 0 refuses an --out that holds a run): the other rank stops at
    // its next collective and names rank 0 and its error.
    let taken = dir.path().join("taken");
    let args = quickstart(1, &["train.objective={ type = \"ntp\" }"]);
    assert_eq!(train(&taken, &args, 1).code, 0);
    let out = train(&taken, &args, 2);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("rank 1: error: rank 0 failed: ")
            && out.stderr.contains("already holds a run"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("error: rank 0 of 2 exited with status 1"),
        "{}",
        out.stderr
    );

    // A rendezvous address something else holds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let started = Instant::now();
    let out = run(sipt()
        .args(quickstart(
            2,
            &[
                "train.objective={ type = \"ntp\" }",
                "distributed.timeout_s=20",
            ],
        ))
        .arg("--out")
        .arg(dir.path().join("busy"))
        .args(["--nproc-per-node", "2"])
        .env("MASTER_PORT", port.to_string()));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "rank 0 cannot join the gloo group of 2 at 127.0.0.1:{port}"
        )),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(busy);

    // Ranks started by hand (torchrun's contract) with different configurations.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawn = |rank: usize, lr: &str| {
        sipt()
            .args(quickstart(
                2,
                &[
                    "train.objective={ type = \"ntp\" }",
                    &format!("train.lr={lr}"),
                ],
            ))
            .arg("--out")
            .arg(dir.path().join("disagree"))
            .envs([
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".into()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.to_string()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children = [spawn(0, "1e-3"), spawn(1, "2e-3")];
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("rank(s) 1 have a different configuration than rank 0"),
            "{stderr}"
        );
    }
    assert!(
        !dir.path().join("disagree").exists(),
        "a run directory was made"
    );
}

/// A small next-token experiment with a sweep table (`sweep` holds its keys).
fn sweep_file(dir: &Path, sweep: &str) -> std::path::PathBuf {
    write(
        dir,
        "sweep.toml",
        &format!(
            r#"[experiment]
name = "dp-sweep"
seed = 3
device = "cpu"
threads = 1

{SMALL_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 32

[train]
steps = 3
batch_size = 4
lr = 3e-3
warmup_steps = 1
checkpoint_every = 3
eval_every = 0

[train.objective]
type = "ntp"

[sweep]
grid = {{ "train.lr" = [1e-3, 3e-3] }}
{sweep}
"#
        ),
    )
}

#[test]
fn a_sweep_gives_each_trial_its_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let file = sweep_file(dir.path(), "ranks = 2");
    let out_dir = dir.path().join("sweep");
    let out = run(sipt().arg("sweep").arg(&file).arg("--out").arg(&out_dir));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("on 2 ranks"), "{}", out.stderr);
    let mut trials = 0;
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let trial = entry.unwrap().path();
        if !trial.join("log.txt").exists() {
            continue;
        }
        trials += 1;
        let log = std::fs::read_to_string(trial.join("log.txt")).unwrap();
        assert!(log.contains("(2 ranks, Some(Gloo) backend)"), "{log}");
        assert_eq!(logged_steps(&trial), vec![1, 2, 3]);
    }
    assert_eq!(trials, 2);
}

/// torchrun from the venv that provides libtorch (it comes with PyTorch).
fn torchrun() -> std::path::PathBuf {
    let path = venv_bin("torchrun");
    assert!(
        path.exists(),
        "no torchrun at {} (scripts/setup.sh installs PyTorch there)",
        path.display()
    );
    path
}

#[test]
fn torchrun_starts_the_ranks_through_its_own_store() {
    let dir = tempfile::tempdir().unwrap();
    let args = quickstart(2, &["train.objective={ type = \"ntp\" }"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("torchrun"));
    let out = train(&one, &args, 1);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(Command::new(torchrun())
        .current_dir(root())
        .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_sipt"))
        .args(&args)
        .arg("--out")
        .arg(&two));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("2 ranks, Some(Gloo) backend"),
        "{}",
        out.stderr
    );
    let d = relative_difference(&final_weights(&one, 2), &final_weights(&two, 2));
    assert!(d <= 1e-4, "final weights differ by {d} of the weight scale");
}

#[test]
fn a_job_resumes_on_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    // Greedy rollouts, as in `self_improving_training_on_two_ranks_matches_one`.
    let args = quickstart(4, &["train.keep_checkpoints=3", "sip.temperature=0"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let out = train(&one, &args, 1);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = train(&two, &args, 2);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // As if the 2-rank job had died after its step-2 checkpoint: resume it on 1 rank.
    let checkpoints = two.join("checkpoints");
    std::fs::remove_dir_all(checkpoints.join("step-00000004")).unwrap();
    std::fs::write(checkpoints.join("latest"), "step-00000002").unwrap();
    let out = run(sipt().args(&args).arg("--out").arg(&two).arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("resuming from"), "{}", out.stderr);
    assert_eq!(logged_steps(&two), vec![1, 2, 3, 4]);
    let d = relative_difference(&final_weights(&one, 4), &final_weights(&two, 4));
    assert!(d <= 1e-4, "final weights differ by {d} of the weight scale");
    let (a, b) = (untimed_rows(&one), untimed_rows(&two));
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x {
            let (v, w) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((v - w).abs() <= 1e-4 * v.abs().max(1.0), "{k} = {v} vs {w}");
        }
    }
}
