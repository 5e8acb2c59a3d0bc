//! Where sipt keeps things outside the project: downloaded assets and shared caches.

use std::path::PathBuf;

/// `$SIPT_CACHE`, else `$XDG_CACHE_HOME/sipt`, else `~/.cache/sipt`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIPT_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
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
    std::env::var_os("SIPT_ASSETS")
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
    }
}
