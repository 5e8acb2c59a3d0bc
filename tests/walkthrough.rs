//! docs/writing-plugins.md, run exactly as written: every `<!-- run -->` block is executed and
//! every `<!-- file: PATH -->` block written, in order, in one bash session.

mod common;
use common::*;

fn doc_as_script(doc: &str) -> String {
    let mut script = String::from("set -euo pipefail\n");
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let marker = line.trim();
        let file = marker
            .strip_prefix("<!-- file: ")
            .and_then(|r| r.strip_suffix(" -->"));
        let is_run = marker == "<!-- run -->";
        if file.is_none() && !is_run {
            continue;
        }
        let fence = lines.next().expect("a code block follows the marker");
        assert!(
            fence.starts_with("```"),
            "marker not followed by a code block: {fence}"
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        match file {
            Some(path) => {
                script.push_str(&format!("cat > {path} <<'SIPT_DOC_EOF'\n"));
                for l in &body {
                    script.push_str(l);
                    script.push('\n');
                }
                script.push_str("SIPT_DOC_EOF\n");
            }
            None => {
                for l in &body {
                    script.push_str(l);
                    script.push('\n');
                }
            }
        }
    }
    script
}

#[test]
fn writing_plugins_walkthrough_works_as_written() {
    let doc = std::fs::read_to_string(root().join("docs/writing-plugins.md")).unwrap();
    let script = doc_as_script(&doc);
    assert!(
        script.contains("cargo new"),
        "the walkthrough lost its steps"
    );
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_sipt"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The plugin builds in a target folder of its own (the outer cargo holds the workspace's).
    let out = run(std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root())
        .env("PATH", path)
        .env_remove("CARGO_TARGET_DIR"));
    assert_eq!(
        out.code, 0,
        "script:\n{script}\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    let listing = &out.stdout;
    assert!(
        listing.contains("shouty") && listing.contains("libshouty_judge.so"),
        "{listing}"
    );
    assert!(
        listing.contains(r#"{"candidate":"is mild and dry.","scores":{"calm":1.0}}"#),
        "{listing}"
    );
    assert!(
        listing.contains(r#"{"candidate":"IS TERRIBLE!!!","scores":{"calm":0.0}}"#),
        "{listing}"
    );
    assert!(
        out.stderr.contains("my-experiment.toml:8: judges.calm.tolerence = 0.1: unknown key 'tolerence'; did you mean 'tolerance'?"),
        "{}",
        out.stderr
    );
}
