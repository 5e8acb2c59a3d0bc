//! TensorBoard event files read back by the real `tensorboard` package: every metric of every
//! step once, with the value in metrics.jsonl, also across a resume.

mod common;
use common::*;
use std::collections::BTreeMap;

#[test]
fn tensorboard_reads_every_step_once_across_a_resume() {
    let python = venv_bin("python");
    let has_package = || {
        let ok = std::process::Command::new(&python)
            .args(["-c", "import tensorboard"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            Ok(())
        } else {
            Err(format!("{} cannot import tensorboard", python.display()))
        }
    };
    if !needs::check("tensorboard", has_package) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tb.toml",
        &format!(
            r#"[experiment]
name = "tb"
device = "cpu"
threads = 1

{TINY_MODEL}

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 16

[train]
steps = 4
batch_size = 2
checkpoint_every = 2
keep_checkpoints = 3
eval_every = 0

[train.objective]
type = "ntp"

[tracking]
tensorboard = true
"#
        ),
    );
    let out_dir = dir.path().join("run");
    let out = run(sipt().arg("run").arg(&file).arg("--out").arg(&out_dir));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("TensorBoard events:"), "{}", out.stderr);
    // As if the run had died after its step-2 checkpoint, having logged steps 3 and 4 already.
    let checkpoints = out_dir.join("checkpoints");
    std::fs::remove_dir_all(checkpoints.join("step-00000004")).unwrap();
    std::fs::write(checkpoints.join("latest"), "step-00000002").unwrap();
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let files = std::fs::read_dir(out_dir.join("tensorboard"))
        .unwrap()
        .count();
    assert_eq!(files, 2, "one event file per process");

    let read = std::process::Command::new(&python)
        .arg(root().join("tests/tensorboard_scalars.py"))
        .arg(out_dir.join("tensorboard"))
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let scalars: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&read.stdout).unwrap();
    let rows = metric_rows(&out_dir);
    assert_eq!(logged_steps(&out_dir), vec![1, 2, 3, 4]);
    for key in ["loss/ntp", "lr", "grad_norm", "tokens"] {
        let series = &scalars[key];
        let steps: Vec<u64> = series.iter().map(|p| p.0).collect();
        assert_eq!(steps, vec![1, 2, 3, 4], "{key}: {series:?}");
        for ((_, got), row) in series.iter().zip(&rows) {
            let want = row[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{key}: {got} vs {want}"
            );
        }
    }
}
