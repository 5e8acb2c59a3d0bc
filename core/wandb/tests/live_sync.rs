//! End to end: `wandb beta sync --live` started by `spawn_live_sync` streams a run while
//! sipt-wandb writes it. One test per binary: it points the process environment (which
//! the CLI inherits) at the loopback stand-in.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{require_wandb, steps, Backend, API_KEY};
use serde_json::json;
use sipt_wandb::{spawn_live_sync, OfflineRun, RunOptions};

#[test]
fn live_sync_streams_rows_before_the_run_finishes() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let backend = Backend::start(&common::python_for(&wandb));
    let scratch = tempfile::tempdir().unwrap();
    // The only test in this binary, so no other thread reads the environment meanwhile.
    for var in [
        "WANDB_MODE",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_DIR",
    ] {
        std::env::remove_var(var);
    }
    std::env::set_var("WANDB_BASE_URL", backend.url());
    std::env::set_var("WANDB_API_KEY", API_KEY);
    std::env::set_var("WANDB_CONFIG_DIR", scratch.path().join("config"));
    std::env::set_var("WANDB_CACHE_DIR", scratch.path().join("cache"));
    std::env::set_var("WANDB_DATA_DIR", scratch.path().join("data"));
    std::env::set_var("NO_PROXY", "127.0.0.1");

    let root = tempfile::tempdir().unwrap();
    let mut run = OfflineRun::create(
        root.path(),
        RunOptions {
            project: "sipt-live".into(),
            entity: Some("team-l".into()),
            run_id: "live0001".into(),
            config: json!({"batch": 32}),
            ..Default::default()
        },
    )
    .unwrap();
    let live = spawn_live_sync(&wandb, run.dir()).unwrap();
    assert!(live.log_path().starts_with(run.dir()));

    for step in 0..3u64 {
        run.log(
            step,
            &BTreeMap::from([("loss".to_string(), 3.0 - step as f64)]),
        )
        .unwrap();
    }
    // Rows arrive while the run is still going (the CLI polls the file about once a second).
    backend.wait_for(
        Duration::from_secs(60),
        "the first rows to stream in",
        |state| {
            state["runs"]["team-l/sipt-live/live0001"]["history"]
                .as_array()
                .is_some_and(|h| h.len() == 3)
        },
    );
    let run_state = backend.run("team-l/sipt-live/live0001");
    assert!(
        run_state["complete"].is_null(),
        "not complete before finish(): {run_state:#}"
    );

    run.log(3, &BTreeMap::from([("loss".to_string(), 0.5)]))
        .unwrap();
    run.finish(0).unwrap();
    let status = live.wait(Duration::from_secs(60));
    let log = std::fs::read_to_string(
        root.path()
            .join("wandb")
            .join(run.dir().file_name().unwrap())
            .join("logs/live-sync.log"),
    )
    .unwrap_or_default();
    let status = status.unwrap_or_else(|e| panic!("{e}; live sync output:\n{log}"));
    assert!(
        status.success(),
        "wandb beta sync --live failed: {status}; output:\n{log}"
    );

    let run_state = backend.run("team-l/sipt-live/live0001");
    assert_eq!(steps(&run_state), [0, 1, 2, 3]);
    assert_eq!(run_state["summary"]["loss"].as_f64(), Some(0.5));
    assert_eq!(run_state["config"]["batch"]["value"], json!(32));
    assert_eq!(run_state["complete"], json!(true));
    assert_eq!(run_state["exitcode"], json!(0));
    // The CLI ran in the run's root: its own debug logs went to <root>/wandb, not here.
    assert!(
        root.path().join("wandb/logs").is_dir()
            || root.path().join("wandb/debug-cli.root.log").is_file()
    );
    assert!(
        !std::path::Path::new("wandb").exists(),
        "nothing written to the test's working directory"
    );

    // A run that never finishes keeps `--live` waiting: `wait` gives up at its timeout
    // and stops the CLI.
    let mut unfinished = OfflineRun::create(
        root.path(),
        RunOptions {
            project: "sipt-live".into(),
            run_id: "live0002".into(),
            ..Default::default()
        },
    )
    .unwrap();
    unfinished
        .log(0, &BTreeMap::from([("loss".to_string(), 1.0)]))
        .unwrap();
    let live = spawn_live_sync(&wandb, unfinished.dir()).unwrap();
    let pid = live.id();
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let result = live.wait(Duration::from_secs(4));
    assert!(
        matches!(result, Err(sipt_wandb::Error::Timeout(_))),
        "{result:?}"
    );
    assert!(
        !proc_dir.exists(),
        "the CLI (pid {pid}) was stopped and reaped"
    );
}
