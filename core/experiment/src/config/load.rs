//! "Nothing runs until it is valid": the pipeline every command that reads an experiment file
//! goes through. Resolve the layers, load the plugin libraries the file and the command line
//! name, check every plugin table against the registry, and check every sweep trial as an
//! experiment of its own — collecting all problems before reporting any.

use super::{resolve_lenient, validate_plugins, Problems, Resolved, SetOverride};
use crate::registry::{Registry, RegistryError};
use std::path::{Path, PathBuf};

/// Why an experiment could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Problems with the file, each with its place.
    #[error("{0}")]
    Invalid(Problems),
    /// The registry itself could not be built (duplicate names, a `--plugin` library).
    #[error("{0}")]
    Registry(RegistryError),
}

/// The built-in plugins plus the libraries given on the command line (`--plugin`).
pub fn registry_with(libraries: &[PathBuf]) -> Result<Registry, RegistryError> {
    let mut registry = Registry::builtin()?;
    for path in libraries {
        registry
            .load_library(path)
            .map_err(|e| RegistryError(format!("--plugin {}: {e}", path.display())))?;
    }
    Ok(registry)
}

/// Resolve `file` with `sets`, build the registry (with `libraries` and the file's own
/// `plugins`), and validate everything, sweep trials included; every problem at once.
pub fn load(
    file: &Path,
    sets: &[SetOverride],
    libraries: &[PathBuf],
) -> Result<(Resolved, Registry), LoadError> {
    let registry = registry_with(libraries).map_err(LoadError::Registry)?;
    load_into(file, sets, registry)
}

/// [`load`] without loading any plugin library (the file's or the command line's): everything
/// is checked except the tables of plugins that are not built in.
pub fn load_without_libraries(
    file: &Path,
    sets: &[SetOverride],
) -> Result<(Resolved, Registry), LoadError> {
    let registry = Registry::without_libraries().map_err(LoadError::Registry)?;
    load_into(file, sets, registry)
}

fn load_into(
    file: &Path,
    sets: &[SetOverride],
    mut registry: Registry,
) -> Result<(Resolved, Registry), LoadError> {
    let (resolved, mut problems) = resolve_lenient(file, sets).map_err(LoadError::Invalid)?;
    for (i, lib) in resolved.experiment.plugins.iter().enumerate() {
        if let Err(e) = registry.load_library(Path::new(lib)) {
            problems.push(resolved.problem(&["plugins".into(), i.to_string()], e.0));
        }
    }
    problems.extend(validate_plugins(&resolved, &registry));
    if let (true, Some(sweep)) = (problems.is_empty(), &resolved.experiment.sweep) {
        // Every trial must be a valid experiment too.
        match crate::sweep::trials(sweep) {
            Err(e) => problems.push(resolved.problem(&["sweep".into()], format!("{e:#}"))),
            Ok(trials) => {
                for t in trials {
                    let found = match crate::sweep::trial_config(&resolved.file, sets, &t) {
                        Err(p) => p.0,
                        Ok(trial) => validate_plugins(&trial, &registry),
                    };
                    for mut problem in found {
                        problem.message = format!("in trial {}: {}", t.name, problem.message);
                        problems.push(problem);
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((resolved, registry))
    } else {
        Err(LoadError::Invalid(Problems::sorted(problems)))
    }
}
