//! Where sipt keeps things outside the project: downloaded assets and shared caches.

use std::path::{Path, PathBuf};

/// A set, non-empty environment variable.
fn var(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// `$SIPT_CACHE`, else `$XDG_CACHE_HOME/sipt`, else `~/.cache/sipt` (unset and empty variables
/// alike skipped; scripts/fetch-assets.sh, scripts/llm-server.py and sipt-gguf use this rule).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = var("SIPT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("sipt");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache").join("sipt")
}

/// Downloaded models, corpora and word lists (scripts/fetch-assets.sh fills it):
/// `$SIPT_ASSETS`, else `<cache root>/assets`.
pub fn assets_dir() -> PathBuf {
    var("SIPT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_root().join("assets"))
}

/// The context plugins are built with, for an experiment file.
pub fn plugin_context(resolved: &crate::config::Resolved) -> sipt_api::PluginContext {
    sipt_api::PluginContext {
        seed: resolved.experiment.experiment.seed,
        assets_dir: Some(assets_dir().display().to_string()),
        config_dir: resolved.file.parent().map(|p| p.display().to_string()),
        cache_dir: Some(cache_root().join("judgments").display().to_string()),
        ranks: 1,
    }
}

/// `~/x` → home, `@assets/x` → the assets folder; other paths unchanged.
pub fn expand_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("@assets/") {
        return assets_dir().join(rest).display().to_string();
    }
    if let Some(rest) = path.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest).display().to_string();
        }
    }
    path.to_string()
}

fn fnv(bytes: &[u8], mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash
}

/// A stable fingerprint of files (names, sizes, modification times) and extra text.
pub fn fingerprint(files: &[PathBuf], extra: &str) -> u64 {
    let mut h = fnv(extra.as_bytes(), 0xcbf29ce484222325);
    for f in files {
        h = fnv(f.display().to_string().as_bytes(), h);
        if let Ok(meta) = std::fs::metadata(f) {
            h = fnv(&meta.len().to_le_bytes(), h);
            if let Ok(modified) = meta.modified() {
                if let Ok(d) = modified.duration_since(std::time::UNIX_EPOCH) {
                    h = fnv(&d.as_nanos().to_le_bytes(), h);
                }
            }
        }
    }
    h
}
