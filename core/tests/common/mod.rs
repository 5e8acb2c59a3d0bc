//! Helpers shared by the engine's tests against transformers.

use std::path::PathBuf;

/// The Python with transformers: `SIPT_PYTHON`, else the venv's (`SIPT_VENV`, else the
/// project's `.venv`).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SIPT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("SIPT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    venv.join("bin/python")
}
