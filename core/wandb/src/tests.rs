use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::format::{read_run_file, Item, Record, RecordKind};

fn options(id: &str) -> RunOptions {
    RunOptions {
        project: "proj".into(),
        entity: Some("team".into()),
        run_id: id.into(),
        display_name: Some("first try".into()),
        tags: vec!["a".into(), "b c".into()],
        config: json!({"lr": 0.001, "model": {"layers": 2, "name": "tiny"}, "seed": 7}),
        resume: false,
    }
}

fn row(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn item_map(items: &[Item]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|i| (i.key_string(), i.value_json.clone()))
        .collect()
}

fn history(records: &[Record]) -> Vec<(Option<i64>, BTreeMap<String, String>)> {
    records
        .iter()
        .filter_map(|r| match &r.kind {
            RecordKind::History { step, items } => Some((*step, item_map(items))),
            _ => None,
        })
        .collect()
}

#[test]
fn utc_stamps_match_known_dates() {
    assert_eq!(utc_stamp(0), "19700101_000000");
    assert_eq!(utc_stamp(951_782_400), "20000229_000000");
    assert_eq!(utc_stamp(1_795_765_112), "20261127_073832");
    assert_eq!(utc_stamp(4_102_444_799), "20991231_235959");
    // 2100 is not a leap year.
    assert_eq!(utc_stamp(4_107_542_399), "21000228_235959");
    assert_eq!(utc_stamp(4_107_542_400), "21000301_000000");
}

#[test]
fn run_ids_are_eight_lowercase_alphanumerics_and_differ() {
    let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_run_id()).collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_eq!(id.len(), 8);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{id}"
        );
        validate_run_id(id).unwrap();
    }
}

#[test]
fn floats_are_written_as_wandb_json() {
    assert_eq!(json_f64(0.5), "0.5");
    assert_eq!(json_f64(1.0), "1.0");
    assert_eq!(json_f64(-2.5e-12), "-2.5e-12");
    assert_eq!(json_f64(f64::NAN), "NaN");
    assert_eq!(json_f64(f64::INFINITY), "Infinity");
    assert_eq!(json_f64(f64::NEG_INFINITY), "-Infinity");
    assert_eq!(
        serde_json::from_str::<f64>(&json_f64(0.1 + 0.2)).unwrap(),
        0.1 + 0.2
    );
}

#[test]
fn a_finished_run_reads_back_record_by_record() {
    let root = tempfile::tempdir().unwrap();
    let mut run = OfflineRun::create(root.path(), options("abc123")).unwrap();
    let dir_name = run
        .dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        dir_name.starts_with("offline-run-") && dir_name.ends_with("-abc123"),
        "{dir_name}"
    );
    assert_eq!(dir_name.len(), "offline-run-YYYYMMDD_HHMMSS-abc123".len());
    assert_eq!(run.dir().parent().unwrap(), root.path().join("wandb"));
    assert!(run.dir().join("files").is_dir() && run.dir().join("logs").is_dir());
    assert_eq!(run.file_path(), run.dir().join("run-abc123.wandb"));

    run.log(0, &row(&[("loss", 2.0), ("acc", 0.25)])).unwrap();
    run.log(10, &row(&[("loss", f64::NAN)])).unwrap();
    run.finish(3).unwrap();
    assert_eq!(run.last_step(), Some(10));

    let records = read_run_file(run.file_path()).unwrap();
    let nums: Vec<i64> = records.iter().map(|r| r.num).collect();
    assert_eq!(nums, (1..=records.len() as i64).collect::<Vec<_>>());
    assert_eq!(records[0].kind, RecordKind::Header);
    let RecordKind::Run(info) = &records[1].kind else {
        panic!("{:?}", records[1])
    };
    assert_eq!(info.run_id, "abc123");
    assert_eq!(
        (info.entity.as_str(), info.project.as_str()),
        ("team", "proj")
    );
    assert_eq!(info.display_name, "first try");
    assert_eq!(info.tags, ["a", "b c"]);
    assert!(!info.resume);
    let (secs, _) = info.start_time.unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - secs).abs() < 60);
    assert_eq!(
        item_map(&info.config),
        BTreeMap::from([
            ("lr".into(), "0.001".into()),
            ("model".into(), r#"{"layers":2,"name":"tiny"}"#.into()),
            ("seed".into(), "7".into()),
        ])
    );

    let rows = history(&records);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, Some(0));
    assert_eq!(rows[0].1["loss"], "2.0");
    assert_eq!(rows[0].1["acc"], "0.25");
    assert_eq!(rows[0].1["_step"], "0");
    assert_eq!(rows[1].0, Some(10));
    assert_eq!(rows[1].1["loss"], "NaN");
    assert_eq!(rows[1].1["_step"], "10");
    let runtime: f64 = rows[1].1["_runtime"].parse().unwrap();
    assert!((0.0..60.0).contains(&runtime));
    let ts: f64 = rows[1].1["_timestamp"].parse().unwrap();
    assert!((ts - now as f64).abs() < 60.0);

    // Every history record is followed by a summary record with the same values.
    for (i, r) in records.iter().enumerate() {
        if let RecordKind::History { items, .. } = &r.kind {
            assert_eq!(
                records[i + 1].kind,
                RecordKind::Summary {
                    update: items.clone()
                }
            );
        }
    }
    assert!(matches!(
        records.last().unwrap().kind,
        RecordKind::Exit { exit_code: 3, .. }
    ));
    assert_eq!(records.len(), 2 + 2 * 2 + 1);
}

#[test]
fn invalid_calls_are_refused() {
    let root = tempfile::tempdir().unwrap();
    for bad in ["", "a/b", "a b", "../x", "é"] {
        let err = OfflineRun::create(root.path(), options(bad)).err().unwrap();
        assert!(matches!(err, Error::InvalidOptions(_)), "{bad:?}: {err}");
    }
    let mut o = options("x1");
    o.project = " ".into();
    assert!(matches!(
        OfflineRun::create(root.path(), o),
        Err(Error::InvalidOptions(_))
    ));
    let mut o = options("x2");
    o.config = json!([1, 2]);
    assert!(matches!(
        OfflineRun::create(root.path(), o),
        Err(Error::InvalidOptions(_))
    ));
    let mut o = options("x3");
    o.config = serde_json::Value::Null;
    OfflineRun::create(root.path(), o).unwrap();

    let mut run = OfflineRun::create(root.path(), options("x4")).unwrap();
    for key in ["", "_step", "_runtime", "_timestamp", "_wandb"] {
        assert!(matches!(run.log(1, &row(&[(key, 1.0)])), Err(Error::InvalidKey(k)) if k == key));
    }
    run.log(5, &row(&[("a", 1.0)])).unwrap();
    assert!(matches!(
        run.log(5, &row(&[("a", 1.0)])),
        Err(Error::StepNotIncreasing {
            previous: 5,
            step: 5
        })
    ));
    assert!(matches!(
        run.log(4, &row(&[])),
        Err(Error::StepNotIncreasing { .. })
    ));
    run.log(6, &row(&[])).unwrap();
    run.finish(0).unwrap();
    assert!(matches!(
        run.log(7, &row(&[("a", 1.0)])),
        Err(Error::Finished)
    ));
    assert!(matches!(run.finish(0), Err(Error::Finished)));
    // Refused calls wrote nothing.
    assert_eq!(history(&read_run_file(run.file_path()).unwrap()).len(), 2);
}

#[test]
fn a_dropped_run_is_readable_and_has_no_exit_record() {
    let root = tempfile::tempdir().unwrap();
    let path = {
        let mut run = OfflineRun::create(root.path(), options("crash1")).unwrap();
        run.log(1, &row(&[("loss", 1.5)])).unwrap();
        run.file_path().to_path_buf()
    };
    let records = read_run_file(&path).unwrap();
    assert_eq!(history(&records).len(), 1);
    assert!(!records
        .iter()
        .any(|r| matches!(r.kind, RecordKind::Exit { .. })));
}

#[test]
fn rows_larger_than_a_block_are_split_and_read_back() {
    let root = tempfile::tempdir().unwrap();
    let mut run = OfflineRun::create(root.path(), options("big1")).unwrap();
    let wide: BTreeMap<String, f64> = (0..3000)
        .map(|i| (format!("layer{i:04}/grad_norm"), i as f64 / 7.0))
        .collect();
    for step in 0..4 {
        run.log(step, &wide).unwrap();
    }
    run.finish(0).unwrap();
    let size = fs::metadata(run.file_path()).unwrap().len();
    assert!(size > 6 * log::BLOCK_SIZE as u64, "{size}");
    let rows = history(&read_run_file(run.file_path()).unwrap());
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3].1.len(), 3003);
    assert_eq!(
        rows[3].1["layer2999/grad_norm"].parse::<f64>().unwrap(),
        2999.0 / 7.0
    );
}

#[test]
fn a_resumed_segment_gets_its_own_folder_the_resume_flag_and_continued_runtime() {
    let root = tempfile::tempdir().unwrap();
    let mut first = OfflineRun::create(root.path(), options("res1")).unwrap();
    first.log(1, &row(&[("loss", 3.0)])).unwrap();
    first.finish(0).unwrap();
    // Pretend the first segment ran for an hour.
    let first_path = first.file_path().to_path_buf();
    let records = read_run_file(&first_path).unwrap();
    drop(first);
    {
        let mut w = LogWriter::new(File::create(&first_path).unwrap()).unwrap();
        for r in &records {
            let raw = match &r.kind {
                RecordKind::Run(_) | RecordKind::Header | RecordKind::Exit { .. } => continue,
                RecordKind::History { items, .. } => {
                    let mut h = Msg::new();
                    for i in items {
                        let v = if i.key == ["_runtime"] {
                            "3600.5".to_string()
                        } else {
                            i.value_json.clone()
                        };
                        h.message(field::ITEMS, &proto::item_path(&i.key, &v));
                    }
                    proto::record(r.num, field::RECORD_HISTORY, &h)
                }
                RecordKind::Summary { update } => {
                    let mut m = Msg::new();
                    for i in update {
                        m.message(field::ITEMS, &proto::item_path(&i.key, &i.value_json));
                    }
                    // A nested key, as the official SDK writes some.
                    m.message(
                        field::ITEMS,
                        &proto::item_path(&["eval".into(), "ppl".into()], "12.5"),
                    );
                    proto::record(r.num, field::RECORD_SUMMARY, &m)
                }
                other => panic!("unexpected {other:?}"),
            };
            w.append(&raw).unwrap();
        }
    }

    let mut o = options("res1");
    o.resume = true;
    let mut second = OfflineRun::create(root.path(), o).unwrap();
    assert_ne!(second.dir(), first_path.parent().unwrap());
    // Steps the first segment logged are skipped; later ones are written.
    assert!(!second.log(0, &row(&[("loss", 9.0)])).unwrap());
    assert!(!second.log(1, &row(&[("loss", 9.0)])).unwrap());
    assert!(second.log(2, &row(&[("loss", 2.0)])).unwrap());
    second.finish(0).unwrap();
    let records = read_run_file(second.file_path()).unwrap();
    let RecordKind::Run(info) = &records[1].kind else {
        panic!()
    };
    assert!(info.resume);
    // The first segment's summary is carried over before anything is logged.
    let RecordKind::Summary { update } = &records[2].kind else {
        panic!("{:?}", records[2])
    };
    let carried = item_map(update);
    assert_eq!(carried["loss"], "3.0");
    assert_eq!(carried["_step"], "1");
    assert_eq!(carried["eval.ppl"], "12.5");
    assert!(update.iter().any(|i| i.key == ["eval", "ppl"]));
    let rows = history(&records);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, Some(2));
    let runtime: f64 = rows[0].1["_runtime"].parse().unwrap();
    assert!((3600.5..3700.0).contains(&runtime), "{runtime}");

    // Same id in the same second: a third segment still gets a fresh folder.
    let mut o = options("res1");
    o.resume = true;
    let third = OfflineRun::create(root.path(), o).unwrap();
    let dirs = fs::read_dir(root.path().join("wandb")).unwrap().count();
    assert_eq!(dirs, 3);
    assert!(third.file_path().is_file());

    // Without resume, earlier segments are not consulted.
    let mut fresh = OfflineRun::create(root.path(), options("res1")).unwrap();
    fresh.log(0, &row(&[])).unwrap();
    let rows = history(&read_run_file(fresh.file_path()).unwrap());
    assert!(rows[0].1["_runtime"].parse::<f64>().unwrap() < 100.0);
}
