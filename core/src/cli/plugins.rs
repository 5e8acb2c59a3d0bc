//! `sipt plugins list`: every registered plugin, as a table or JSON.

use super::Exit;
use clap::Subcommand;
use sipt_experiment::config::registry_with;
use sipt_experiment::registry::{PluginOrigin, Registry};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum PluginsCommand {
    /// List every registered plugin: kind, name, origin and summary.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn plugins(command: PluginsCommand, libraries: &[PathBuf]) -> Result<(), Exit> {
    let PluginsCommand::List { json } = command;
    let registry = registry_with(libraries).map_err(|e| Exit::invalid(e.0))?;
    if json {
        print_json(&registry);
    } else {
        print_table(&registry);
    }
    Ok(())
}

fn print_json(registry: &Registry) {
    let rows: Vec<serde_json::Value> = registry
        .entries()
        .iter()
        .map(|e| {
            serde_json::json!({
                "kind": e.kind,
                "name": e.name,
                "origin": match &e.origin {
                    PluginOrigin::BuiltIn => "built-in".to_string(),
                    PluginOrigin::Library(_) => "library".to_string(),
                },
                "path": match &e.origin {
                    PluginOrigin::BuiltIn => serde_json::Value::Null,
                    PluginOrigin::Library(p) => p.display().to_string().into(),
                },
                "summary": e.summary,
                "options": e.fields,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    );
}

fn print_table(registry: &Registry) {
    let entries = registry.entries();
    let width = |f: &dyn Fn(&sipt_experiment::registry::Entry) -> usize, min: usize| {
        entries.iter().map(f).max().unwrap_or(min)
    };
    let kind_w = width(&|e| e.kind.as_str().len(), 4);
    let name_w = width(&|e| e.name.len(), 4);
    let origin_w = width(&|e| e.origin.to_string().len(), 6);
    println!(
        "{:kind_w$}  {:name_w$}  {:origin_w$}  SUMMARY",
        "KIND", "NAME", "ORIGIN"
    );
    for e in entries {
        println!(
            "{:kind_w$}  {:name_w$}  {:origin_w$}  {}",
            e.kind.as_str(),
            e.name,
            e.origin.to_string(),
            e.summary
        );
    }
}
