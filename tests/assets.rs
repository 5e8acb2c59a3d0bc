//! One rule for where the downloaded assets live, in every part of sipt: the engine, the GGUF
//! crate, scripts/fetch-assets.sh and scripts/llm-server.py. `$SIPT_ASSETS`, else
//! `<cache root>/assets`, the cache root being `$SIPT_CACHE`, else `$XDG_CACHE_HOME/sipt`, else
//! `$HOME/.cache/sipt`.

use std::path::{Path, PathBuf};
use std::process::Command;

const VARS: [&str; 4] = ["SIPT_ASSETS", "SIPT_CACHE", "XDG_CACHE_HOME", "HOME"];
const MODEL: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The assets folder as each part finds it, with the process environment as it is now.
fn found() -> Vec<(&'static str, PathBuf)> {
    let script = Command::new(root().join("scripts/fetch-assets.sh"))
        .arg("--where")
        .output()
        .expect("fetch-assets.sh runs");
    assert!(
        script.status.success(),
        "{}",
        String::from_utf8_lossy(&script.stderr)
    );
    let server = Command::new("python3")
        .arg(root().join("scripts/llm-server.py"))
        .arg("--print-model")
        .output()
        .expect("llm-server.py runs");
    assert!(
        server.status.success(),
        "{}",
        String::from_utf8_lossy(&server.stderr)
    );
    let model = PathBuf::from(String::from_utf8_lossy(&server.stdout).trim());
    let served = model
        .to_str()
        .and_then(|m| m.strip_suffix(MODEL))
        .map(|d| PathBuf::from(d.trim_end_matches('/')))
        .expect("the served model lies in the assets folder");
    vec![
        ("the engine", sipt_experiment::paths::assets_dir()),
        ("sipt-gguf", sipt_gguf::default_assets_dir().unwrap()),
        (
            "fetch-assets.sh",
            PathBuf::from(String::from_utf8_lossy(&script.stdout).trim()),
        ),
        ("llm-server.py", served),
    ]
}

#[test]
fn every_part_finds_the_assets_in_the_same_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    let home = d("home");
    let cases: Vec<(Vec<(&str, PathBuf)>, PathBuf)> = vec![
        (
            vec![("HOME", home.clone())],
            home.join(".cache/sipt/assets"),
        ),
        (
            vec![("HOME", home.clone()), ("XDG_CACHE_HOME", d("xdg"))],
            d("xdg/sipt/assets"),
        ),
        (
            vec![
                ("HOME", home.clone()),
                ("XDG_CACHE_HOME", d("xdg")),
                ("SIPT_CACHE", d("cache")),
            ],
            d("cache/assets"),
        ),
        (
            vec![
                ("HOME", home.clone()),
                ("SIPT_CACHE", d("cache")),
                ("SIPT_ASSETS", d("assets")),
            ],
            d("assets"),
        ),
    ];
    for (vars, expected) in cases {
        for name in VARS {
            std::env::remove_var(name);
        }
        for (name, value) in &vars {
            std::env::set_var(name, value);
        }
        for (part, path) in found() {
            assert_eq!(
                Path::new(&path),
                expected,
                "{part} looks elsewhere with {vars:?}"
            );
        }
    }
}
