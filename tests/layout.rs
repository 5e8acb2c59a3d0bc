//! The shape of the code, checked so that it stays: the experiment crate needs no libtorch, and
//! the engine's modules depend on each other in one direction only.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_experiment_crate_does_not_depend_on_libtorch() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "sipt-experiment",
            "-e",
            "normal,build,dev",
            "--prefix",
            "none",
        ])
        .current_dir(root())
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("sipt-experiment ")),
        "{tree}"
    );
    for crate_name in ["tch ", "torch-sys ", "sipt-core ", "sipt-build "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(crate_name)),
            "sipt-experiment depends on {crate_name}:\n{tree}"
        );
    }
}

/// The engine's layers, top first: a module may use the ones after it, never one before it.
const LAYERS: &[&str] = &["cli", "engine", "sip", "train", "eval", "dist"];

fn layer_of(path: &Path, src: &Path) -> Option<usize> {
    let first = path.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?.trim_end_matches(".rs");
    LAYERS.iter().position(|l| *l == name)
}

/// The top-level modules a source names through `crate::` (`crate::sip::x`, `crate::{a, b}`),
/// outside comments.
fn crate_modules(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = code.as_str();
    let mut out = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let names = match rest.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or_default().to_string(),
            None => rest.to_string(),
        };
        for name in names.split(',') {
            let name: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn engine_modules_depend_in_one_direction() {
    let src = root().join("core/src");
    let mut wrong = Vec::new();
    for file in sources(&src) {
        let Some(layer) = layer_of(&file, &src) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for used in crate_modules(&text) {
            if LAYERS[..layer].contains(&used.as_str()) {
                wrong.push(format!("{} uses crate::{used}", file.display()));
            }
        }
    }
    wrong.dedup();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_module_scan_sees_grouped_and_plain_paths() {
    let found = crate_modules(
        "use crate::{objective, sip, train};\n//! see crate::cli\nlet x = crate::eval::run();",
    );
    assert_eq!(found, ["objective", "sip", "train", "eval"]);
}

/// Every test that needs something a machine may lack goes through tests/common/needs.rs: no
/// test reads a skip variable of its own or prints a skip line of its own.
#[test]
fn tests_skip_by_one_rule() {
    let needs = root().join("tests/common/needs.rs");
    let mut files = Vec::new();
    for dir in [
        "tests",
        "core/tests",
        "plugins/tests",
        "core/wandb/tests",
        "core/experiment/tests",
    ] {
        if root().join(dir).is_dir() {
            files.extend(sources(&root().join(dir)));
        }
    }
    assert!(files.len() > 10, "found only {files:?}");
    let this = root().join("tests/layout.rs");
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| **f != needs && **f != this) {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, line) in text.lines().enumerate() {
            let own_variable =
                line.contains("env::var") && (line.contains("SKIP") || line.contains("REQUIRE"));
            let own_line = line.contains("eprintln!(\"skipped") || line.contains("skipped:");
            if own_variable || own_line {
                offenders.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "skips outside tests/common/needs.rs:\n{}",
        offenders.join("\n")
    );
}
