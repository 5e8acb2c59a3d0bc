//! The plugin registry: every built-in plugin (collected with `inventory`), the engine's
//! training objectives, and plugins from external libraries. `sipt plugins list` and the config
//! validator are both views of it.
//!
//! Objectives compute losses on tensors, so they are built by the engine (sipt-core); the
//! registry knows them by their [`ObjectiveInfo`] (name, summary, options and their check),
//! which is all that listing and validation need.

mod external;

pub use external::Library;

use serde::Serialize;
use sipt_api::{ConfigProblem, Instance, PluginContext, PluginKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a plugin comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "origin", content = "path")]
pub enum PluginOrigin {
    BuiltIn,
    Library(PathBuf),
}

impl std::fmt::Display for PluginOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginOrigin::BuiltIn => f.write_str("built-in"),
            PluginOrigin::Library(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A training objective as the registry knows it. The engine submits one per objective
/// (`inventory::submit!`) next to the code that builds it.
pub struct ObjectiveInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub defined_at: &'static str,
    pub fields: fn() -> Vec<&'static str>,
    pub check: fn(&serde_json::Value) -> Result<(), ConfigProblem>,
}

inventory::collect!(ObjectiveInfo);

enum Backend {
    Native(&'static sipt_api::Registration),
    Objective(&'static ObjectiveInfo),
    External(Arc<Library>),
}

/// The kinds a `[judges]` table may name.
pub const JUDGE_KINDS: &[PluginKind] = &[PluginKind::PointwiseJudge, PluginKind::PairwiseJudge];

/// One plugin the registry knows.
pub struct Entry {
    pub kind: PluginKind,
    pub name: String,
    pub summary: String,
    pub origin: PluginOrigin,
    /// Keys its table accepts besides `type`.
    pub fields: Vec<String>,
    /// Where it was registered (source location, or library path), to explain duplicates.
    pub defined_at: String,
    backend: Backend,
}

/// A registry problem: a duplicate name or a library that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistryError(pub String);

#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
    /// Set by [`Registry::without_libraries`]: libraries are not loaded, and a plugin name the
    /// registry does not know may be one of theirs.
    without_libraries: bool,
}

impl Registry {
    /// Every plugin linked into this binary. A duplicate name is an error naming both.
    pub fn builtin() -> Result<Self, RegistryError> {
        let mut registry = Registry::default();
        for r in sipt_api::registrations() {
            registry.add(Entry {
                kind: r.kind,
                name: r.name.to_string(),
                summary: r.summary.to_string(),
                origin: PluginOrigin::BuiltIn,
                fields: (r.fields)().into_iter().map(String::from).collect(),
                defined_at: r.defined_at.to_string(),
                backend: Backend::Native(r),
            })?;
        }
        for r in inventory::iter::<ObjectiveInfo> {
            registry.add(Entry {
                kind: PluginKind::Objective,
                name: r.name.to_string(),
                summary: r.summary.to_string(),
                origin: PluginOrigin::BuiltIn,
                fields: (r.fields)().into_iter().map(String::from).collect(),
                defined_at: r.defined_at.to_string(),
                backend: Backend::Objective(r),
            })?;
        }
        registry.sort();
        Ok(registry)
    }

    /// The built-in plugins only, for checking a file without running any library's code
    /// (`sipt validate --no-plugins`): [`Registry::load_library`] then loads nothing.
    pub fn without_libraries() -> Result<Self, RegistryError> {
        let mut registry = Registry::builtin()?;
        registry.without_libraries = true;
        Ok(registry)
    }

    /// Whether names it does not know may belong to libraries it did not load.
    pub fn skips_libraries(&self) -> bool {
        self.without_libraries
    }

    fn sort(&mut self) {
        self.entries
            .sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    }

    fn add(&mut self, entry: Entry) -> Result<(), RegistryError> {
        if let Some(existing) = self
            .entries
            .iter()
            .find(|e| e.kind == entry.kind && e.name == entry.name)
        {
            return Err(RegistryError(format!(
                "two {} plugins are named '{}': one registered at {} ({}), the other at {} ({})",
                entry.kind,
                entry.name,
                existing.defined_at,
                existing.origin,
                entry.defined_at,
                entry.origin
            )));
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Load an external plugin library and register what it exports.
    pub fn load_library(&mut self, path: &Path) -> Result<(), RegistryError> {
        if self.without_libraries {
            return Ok(());
        }
        let library = Library::open(path).map_err(RegistryError)?;
        let manifest = library.manifest().map_err(RegistryError)?;
        for m in manifest {
            if m.kind == PluginKind::Objective {
                return Err(RegistryError(format!(
                    "{}: objective plugins cannot be loaded from libraries (they need the engine's tensors)",
                    path.display()
                )));
            }
            self.add(Entry {
                kind: m.kind,
                name: m.name,
                summary: m.summary,
                origin: PluginOrigin::Library(library.path().to_path_buf()),
                fields: m.fields,
                defined_at: format!("{} ({})", m.defined_at, library.path().display()),
                backend: Backend::External(library.clone()),
            })?;
        }
        self.sort();
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn find(&self, kind: PluginKind, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.kind == kind && e.name == name)
    }

    /// The judge registered as `name`, pointwise or pairwise (a name is one or the other).
    pub fn find_judge(&self, name: &str) -> Option<&Entry> {
        JUDGE_KINDS.iter().find_map(|k| self.find(*k, name))
    }

    pub fn names(&self, kind: PluginKind) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.name.as_str())
            .collect()
    }

    /// Check a plugin's options (its table without `type`); the first problem, with its path.
    pub fn check(&self, entry: &Entry, options: &serde_json::Value) -> Result<(), ConfigProblem> {
        match &entry.backend {
            Backend::Native(r) => (r.check)(options),
            Backend::Objective(r) => (r.check)(options),
            Backend::External(lib) => lib.check(entry.kind, &entry.name, options),
        }
    }

    /// Build a plugin from its options. Objectives are built by the engine
    /// (`sipt_core::objective::build`).
    pub fn build(
        &self,
        entry: &Entry,
        options: serde_json::Value,
        context: &PluginContext,
    ) -> Result<Instance, String> {
        let built = match &entry.backend {
            Backend::Native(r) => (r.build)(options, context),
            Backend::External(lib) => lib.build(entry.kind, &entry.name, options, context),
            Backend::Objective(_) => Err("objectives are built by the engine".into()),
        };
        built.map_err(|e| format!("cannot build {} '{}': {e}", entry.kind, entry.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static INFO: ObjectiveInfo = ObjectiveInfo {
        name: "same",
        summary: "",
        defined_at: "here",
        fields: Vec::new,
        check: |_| Ok(()),
    };

    #[test]
    fn duplicate_names_are_errors_naming_both() {
        let mut registry = Registry::default();
        let entry = |at: &str| Entry {
            kind: PluginKind::Reward,
            name: "same".into(),
            summary: String::new(),
            origin: PluginOrigin::BuiltIn,
            fields: vec![],
            defined_at: at.into(),
            backend: Backend::Objective(&INFO),
        };
        registry.add(entry("a.rs:1")).unwrap();
        let err = registry.add(entry("b.rs:2")).unwrap_err().to_string();
        assert!(err.contains("a.rs:1") && err.contains("b.rs:2"), "{err}");
    }
}
