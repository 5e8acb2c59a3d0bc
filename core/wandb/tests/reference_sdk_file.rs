//! Reader check: a run file written by the official W&B Python SDK (offline mode) reads
//! back with sipt-wandb's reader, and a sipt run resumed on top of it continues it.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{python_for, require_wandb, run_bounded};
use sipt_wandb::format::{read_run_file, RecordKind};
use sipt_wandb::{OfflineRun, RunOptions};

#[test]
fn official_sdk_offline_file_reads_back() {
    let Some(wandb) = require_wandb() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/make_reference_run.py");
    let mut cmd = Command::new(python_for(&wandb));
    cmd.arg(&script)
        .arg(root.path())
        .env("WANDB_CONFIG_DIR", scratch.path().join("config"))
        .env("WANDB_CACHE_DIR", scratch.path().join("cache"))
        .env("WANDB_DATA_DIR", scratch.path().join("data"))
        .current_dir(scratch.path());
    let (ok, output) = run_bounded(cmd, Duration::from_secs(120), "the W&B SDK reference run");
    assert!(ok, "the W&B SDK reference run failed:\n{output}");

    let dirs: Vec<PathBuf> = std::fs::read_dir(root.path().join("wandb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("offline-run-")
        })
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let file = dirs[0].join("run-sdkref01.wandb");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        size > 3 * 32 * 1024,
        "the 100 kB config spans several blocks ({size} bytes)"
    );

    let records = read_run_file(&file).unwrap();
    assert_eq!(records[0].kind, RecordKind::Header);
    assert!(
        records.windows(2).all(|w| w[0].num < w[1].num),
        "record numbers increase"
    );

    let run = records
        .iter()
        .find_map(|r| match &r.kind {
            RecordKind::Run(info) => Some(info),
            _ => None,
        })
        .expect("a run record");
    assert_eq!(run.run_id, "sdkref01");
    assert_eq!(
        (run.entity.as_str(), run.project.as_str()),
        ("ref-ent", "ref-proj")
    );
    assert_eq!(run.display_name, "reference");
    assert_eq!(run.tags, ["ref", "sdk"]);
    assert!(!run.resume);
    assert!(run.start_time.is_some());
    let config: BTreeMap<String, String> = run
        .config
        .iter()
        .map(|i| (i.key_string(), i.value_json.clone()))
        .collect();
    assert_eq!(config["lr"], "0.5");
    assert_eq!(config["nested"].replace(' ', ""), r#"{"a":1}"#);
    assert_eq!(config["blob"].len(), 100_002, "the quoted 100 kB string");

    let mut rows = Vec::new();
    for r in &records {
        if let RecordKind::History { items, .. } = &r.kind {
            let row: BTreeMap<String, f64> = items
                .iter()
                .map(|i| (i.key_string(), i.as_f64().unwrap()))
                .collect();
            rows.push(row);
        }
    }
    assert_eq!(rows.len(), 5);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["_step"], (i * 10) as f64);
        assert_eq!(row["loss"], 1.0 / (i + 1) as f64);
        assert_eq!(row["acc"], i as f64 / 4.0);
        assert!(row["_runtime"] >= 0.0 && row["_timestamp"] > 1.5e9);
    }
    assert!(records
        .iter()
        .any(|r| matches!(r.kind, RecordKind::Summary { .. })));
    assert!(matches!(
        records.last().unwrap().kind,
        RecordKind::Exit { exit_code: 3, .. }
    ));

    // A sipt segment resuming the SDK's run under the same root continues after it.
    let sdk_runtime = rows.iter().map(|r| r["_runtime"]).fold(0.0, f64::max);
    let mut resumed = OfflineRun::create(
        root.path(),
        RunOptions {
            project: "ref-proj".into(),
            run_id: "sdkref01".into(),
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!resumed
        .log(40, &BTreeMap::from([("loss".to_string(), 9.0)]))
        .unwrap());
    assert!(resumed
        .log(41, &BTreeMap::from([("loss".to_string(), 0.1)]))
        .unwrap());
    resumed.finish(0).unwrap();
    let records = read_run_file(resumed.file_path()).unwrap();
    let carried = records
        .iter()
        .find_map(|r| match &r.kind {
            RecordKind::Summary { update } => Some(update.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        carried
            .iter()
            .any(|i| i.key_string() == "acc" && i.as_f64() == Some(1.0)),
        "{carried:?}"
    );
    let runtime = records
        .iter()
        .find_map(|r| match &r.kind {
            RecordKind::History { items, .. } => items
                .iter()
                .find(|i| i.key_string() == "_runtime")
                .and_then(|i| i.as_f64()),
            _ => None,
        })
        .unwrap();
    assert!(runtime >= sdk_runtime, "{runtime} < {sdk_runtime}");
}
