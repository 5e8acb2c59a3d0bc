//! End to end: runs written by sipt-wandb, uploaded by the official `wandb sync` to a
//! loopback stand-in for the W&B backend, checked by what the backend received.

mod common;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{require_wandb, rows, steps, wandb_sync, Backend};
use serde_json::{json, Value};
use sipt_wandb::{OfflineRun, RunOptions};

fn row(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn options(entity: Option<&str>, id: &str, resume: bool) -> RunOptions {
    RunOptions {
        project: "sipt-e2e".into(),
        entity: entity.map(Into::into),
        run_id: id.into(),
        display_name: Some(format!("run {id}")),
        tags: vec!["e2e".into(), "rust".into()],
        config: json!({"lr": 0.0003, "model": {"layers": 4, "dim": 256}, "data": "shards/*.bin"}),
        resume,
    }
}

/// A JSON number as f64 (wandb writes 4.0 back as 4).
fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn assert_config(run: &Value) {
    let config = &run["config"];
    assert_eq!(num(&config["lr"]["value"]), 0.0003, "{config:#}");
    assert_eq!(config["model"]["value"], json!({"layers": 4, "dim": 256}));
    assert_eq!(config["data"]["value"], json!("shards/*.bin"));
}

#[test]
fn finished_runs_sync_history_summary_config_and_exit_code() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let backend = Backend::start(&common::python_for(&wandb));
    let root = tempfile::tempdir().unwrap();
    let started = now();

    let mut ok =
        OfflineRun::create(root.path(), options(Some("team-a"), "okrun001", false)).unwrap();
    ok.log(0, &row(&[("train/loss", 2.5), ("lr", 0.0)]))
        .unwrap();
    ok.log(
        5,
        &row(&[("train/loss", 1.25), ("lr", 1.5e-4), ("eval/ppl", 40.0)]),
    )
    .unwrap();
    ok.log(10, &row(&[("train/loss", f64::NAN), ("lr", 3e-4)]))
        .unwrap();
    ok.finish(0).unwrap();

    let mut failed =
        OfflineRun::create(root.path(), options(Some("team-a"), "bad00001", false)).unwrap();
    failed.log(1, &row(&[("train/loss", 9.0)])).unwrap();
    failed.finish(2).unwrap();

    // Both offline-run folders in one call, as `wandb sync <root>/wandb` does it.
    wandb_sync(&wandb, &backend, &[&root.path().join("wandb")]);

    let run = backend.run("team-a/sipt-e2e/okrun001");
    assert_eq!(steps(&run), [0, 5, 10]);
    let history = rows(&run);
    assert_eq!(num(&history[0]["train/loss"]), 2.5);
    assert_eq!(num(&history[0]["lr"]), 0.0);
    assert_eq!(num(&history[1]["train/loss"]), 1.25);
    assert_eq!(num(&history[1]["lr"]), 1.5e-4);
    assert_eq!(num(&history[1]["eval/ppl"]), 40.0);
    assert_eq!(
        history[2]["train/loss"],
        json!("NaN"),
        "NaN arrives as W&B's NaN"
    );
    assert!(history[2].get("eval/ppl").is_none());
    let mut last_runtime = 0.0;
    for r in &history {
        let runtime = r["_runtime"].as_f64().unwrap();
        assert!(runtime >= last_runtime && runtime < 60.0, "{r}");
        last_runtime = runtime;
        let ts = r["_timestamp"].as_f64().unwrap();
        assert!(ts >= started - 1.0 && ts <= now() + 1.0, "{r}");
    }

    let summary = &run["summary"];
    assert_eq!(summary["_step"], json!(10));
    assert_eq!(num(&summary["lr"]), 3e-4);
    assert_eq!(num(&summary["eval/ppl"]), 40.0);
    assert_eq!(summary["train/loss"], json!("NaN"));
    assert_config(&run);
    assert_eq!(run["tags"], json!(["e2e", "rust"]));
    assert_eq!(run["display_name"], json!("run okrun001"));
    assert_eq!(run["complete"], json!(true));
    assert_eq!(run["exitcode"], json!(0));

    let run = backend.run("team-a/sipt-e2e/bad00001");
    assert_eq!(steps(&run), [1]);
    assert_eq!(num(&run["summary"]["train/loss"]), 9.0);
    assert_eq!(run["complete"], json!(true));
    assert_eq!(run["exitcode"], json!(2));

    let state = backend.state();
    let ops: Vec<&str> = state["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(ops.contains(&"UpsertBucket"), "{ops:?}");
    assert!(
        !ops.contains(&"RunResumeStatus"),
        "a fresh run is not resumed: {ops:?}"
    );
    assert_eq!(
        state["unknown"],
        json!([]),
        "requests the stand-in did not know"
    );
}

#[test]
fn crashed_run_syncs_with_exit_code_1() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let backend = Backend::start(&common::python_for(&wandb));
    let root = tempfile::tempdir().unwrap();
    let dir = {
        // No entity: the backend's default entity for the key is used.
        let mut run = OfflineRun::create(root.path(), options(None, "crash001", false)).unwrap();
        run.log(3, &row(&[("train/loss", 4.0)])).unwrap();
        run.log(4, &row(&[("train/loss", 3.5)])).unwrap();
        run.dir().to_path_buf()
        // Dropped without finish(): what a panic or a killed process leaves.
    };
    wandb_sync(&wandb, &backend, &[&dir]);

    let run = backend.run("sipt-test/sipt-e2e/crash001");
    assert_eq!(steps(&run), [3, 4]);
    assert_eq!(num(&rows(&run)[1]["train/loss"]), 3.5);
    assert_eq!(num(&run["summary"]["train/loss"]), 3.5);
    assert_config(&run);
    // W&B's own rule for a file without an exit record: finished with exit code 1,
    // which the UI shows as crashed/failed.
    assert_eq!(run["exitcode"], json!(1));
    assert_eq!(run["complete"], json!(true));
}

#[test]
fn resumed_run_continues_the_same_wandb_run() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let backend = Backend::start(&common::python_for(&wandb));
    let root = tempfile::tempdir().unwrap();

    // Segment 1 logs steps 0..=4 and crashes; it is synced right away.
    let first = {
        let mut run =
            OfflineRun::create(root.path(), options(Some("team-r"), "resume01", false)).unwrap();
        for step in 0..5 {
            run.log(
                step,
                &row(&[
                    ("train/loss", 10.0 - step as f64),
                    ("warmup/lr", step as f64),
                ]),
            )
            .unwrap();
        }
        run.dir().to_path_buf()
    };
    wandb_sync(&wandb, &backend, &[&first]);
    let run = backend.run("team-r/sipt-e2e/resume01");
    assert_eq!(steps(&run), [0, 1, 2, 3, 4]);
    assert_eq!(run["exitcode"], json!(1));

    // Segment 2 restarts from a checkpoint at step 3: steps 3 and 4 are replayed.
    let mut run2 =
        OfflineRun::create(root.path(), options(Some("team-r"), "resume01", true)).unwrap();
    assert_ne!(run2.dir(), first.as_path());
    let mut written = Vec::new();
    for step in 3..8 {
        written.push(
            run2.log(step, &row(&[("train/loss", 20.0 + step as f64)]))
                .unwrap(),
        );
    }
    assert_eq!(written, [false, false, true, true, true]);
    run2.finish(0).unwrap();
    wandb_sync(&wandb, &backend, &[run2.dir()]);

    let run = backend.run("team-r/sipt-e2e/resume01");
    assert_eq!(
        steps(&run),
        [0, 1, 2, 3, 4, 5, 6, 7],
        "one run, steps continued"
    );
    let history = rows(&run);
    assert_eq!(
        num(&history[4]["train/loss"]),
        6.0,
        "segment 1's rows are kept"
    );
    assert_eq!(num(&history[5]["train/loss"]), 25.0);
    assert_eq!(num(&history[7]["train/loss"]), 27.0);
    // `_runtime` continues from segment 1.
    assert!(history[5]["_runtime"].as_f64().unwrap() >= history[4]["_runtime"].as_f64().unwrap());
    // The summary has segment 2's values and keeps the keys only segment 1 logged.
    assert_eq!(num(&run["summary"]["train/loss"]), 27.0);
    assert_eq!(run["summary"]["_step"], json!(7));
    assert_eq!(num(&run["summary"]["warmup/lr"]), 4.0);
    assert_config(&run);
    assert_eq!(run["complete"], json!(true));
    assert_eq!(
        run["exitcode"],
        json!(0),
        "the resumed segment's exit code wins"
    );
    let state = backend.state();
    let ops: Vec<&str> = state["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(
        ops.contains(&"RunResumeStatus"),
        "the resume flag makes wandb ask for the run: {ops:?}"
    );
    assert_eq!(
        state["runs"].as_object().unwrap().len(),
        1,
        "no second run was created"
    );
}

#[test]
fn resumed_segments_synced_together_form_one_run() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let backend = Backend::start(&common::python_for(&wandb));
    let root = tempfile::tempdir().unwrap();

    let mut first =
        OfflineRun::create(root.path(), options(Some("team-t"), "twoseg01", false)).unwrap();
    for step in [0, 100, 200] {
        first
            .log(step, &row(&[("loss", step as f64 / 100.0)]))
            .unwrap();
    }
    first.finish(0).unwrap();
    let mut second =
        OfflineRun::create(root.path(), options(Some("team-t"), "twoseg01", true)).unwrap();
    for step in [300, 400] {
        second
            .log(step, &row(&[("loss", step as f64 / 100.0)]))
            .unwrap();
    }
    second.finish(0).unwrap();
    assert_ne!(first.dir(), second.dir());

    wandb_sync(&wandb, &backend, &[first.dir(), second.dir()]);

    let run = backend.run("team-t/sipt-e2e/twoseg01");
    assert_eq!(steps(&run), [0, 100, 200, 300, 400]);
    let losses: Vec<f64> = rows(&run)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses, [0.0, 1.0, 2.0, 3.0, 4.0]);
    assert_eq!(num(&run["summary"]["loss"]), 4.0);
    assert_eq!(run["complete"], json!(true));
    assert_eq!(run["exitcode"], json!(0));
    assert_eq!(backend.state()["runs"].as_object().unwrap().len(), 1);
}
