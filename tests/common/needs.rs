//! The one rule for tests that need something a machine may lack (a real Slurm, the real LLM
//! server, the `wandb` CLI, a font for plots):
//!
//! - present: the test runs;
//! - absent: the test fails, saying what is missing and how to get it — `scripts/test.sh` sets
//!   every one of them up, so in CI an absent need is a broken set-up, never a silent pass;
//! - named in `SIPT_SKIP` (comma-separated, or `all`): the test prints one `skipped:` line
//!   naming itself and the need, and passes, whether or not the need is present.
//!
//! Every test crate of the workspace includes this file, so the rule and its wording are one.

#![allow(dead_code)]

/// The needs a test can name, with how to provide each.
pub const NEEDS: &[(&str, &str)] = &[
    (
        "tensorboard",
        "scripts/setup.sh --test installs the tensorboard package into the venv",
    ),
    (
        "slurm",
        "scripts/slurm-local.sh start, then export the SLURM_CONF it prints",
    ),
    (
        "llm-server",
        "scripts/setup.sh --test (xllamacpp) and scripts/fetch-assets.sh smollm2",
    ),
    (
        "wandb",
        "scripts/setup.sh --test installs the wandb CLI into the venv",
    ),
    (
        "fonts",
        "apt-get install fonts-dejavu-core, or SIPT_PLOT_FONT=/path/to/font.ttf",
    ),
];

/// Whether `SIPT_SKIP` names `need` (or is `all`).
pub fn skip_requested(need: &str) -> bool {
    std::env::var("SIPT_SKIP")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .any(|s| s == need || s == "all")
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

fn how(need: &str) -> &'static str {
    NEEDS
        .iter()
        .find(|(n, _)| *n == need)
        .map(|(_, h)| *h)
        .unwrap_or_else(|| panic!("needs.rs has no need named {need:?}"))
}

/// Whether the test should go on with `need`: `present` says whether it is there (`Err` says
/// what is missing). See the module docs for the rule.
pub fn check(need: &str, present: impl FnOnce() -> Result<(), String>) -> bool {
    let how = how(need);
    if skip_requested(need) {
        eprintln!(
            "skipped: {}: needs {need} (SIPT_SKIP names it)",
            test_name()
        );
        return false;
    }
    if let Err(missing) = present() {
        panic!(
            "{} needs {need}: {missing}. To provide it: {how}. To skip the tests that need it: SIPT_SKIP={need}",
            test_name()
        );
    }
    true
}

/// `present` for a need that is a file: `Err` names what is missing where.
pub fn file(path: &std::path::Path, what: &str) -> Result<(), String> {
    if path.exists() {
        Ok(())
    } else {
        Err(format!("no {what} at {}", path.display()))
    }
}
