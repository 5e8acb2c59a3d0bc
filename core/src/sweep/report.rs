//! Results of a sweep or a run: a table of each trial's final and best metrics (Markdown and
//! CSV) and PNG plots of the key curves across trials.

use super::{SweepState, STATE_FILE};
use crate::metrics;
use crate::rundir::write_atomic;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where `report` puts the PNG plots, inside the sweep or run directory.
pub const PLOTS_DIR: &str = "plots";

/// Final and best value of each metric worth comparing, per trial.
fn summarize(rows: &[metrics::Row]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let wanted = |k: &str| {
        k.starts_with("eval/") && !k.ends_with("failures")
            || k.starts_with("loss/")
            || k.starts_with("chosen/")
            || (k.starts_with("reward/") && k.ends_with("/mean"))
            || k == "judge/calls_per_prefix"
            || k == "time/step"
    };
    let mut keys: Vec<&String> = rows
        .iter()
        .flat_map(|r| r.values.keys())
        .filter(|k| wanted(k))
        .collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let values: Vec<f64> = rows.iter().filter_map(|r| r.get(key)).collect();
        if let Some(last) = values.last() {
            out.insert(format!("{key} (final)"), *last);
        }
        if key.starts_with("eval/") {
            let lower_is_better = key.ends_with("loss") || key.ends_with("perplexity");
            let best = values
                .iter()
                .copied()
                .fold(None, |acc: Option<f64>, v| match acc {
                    Some(a) if (lower_is_better && a <= v) || (!lower_is_better && a >= v) => {
                        Some(a)
                    }
                    _ => Some(v),
                });
            if let Some(b) = best {
                out.insert(format!("{key} (best)"), b);
            }
        }
    }
    out
}

/// Write `results.md` and `results.csv` for a sweep directory, or summarize one run.
pub fn report(dir: &Path) -> Result<String> {
    let state_path = dir.join(STATE_FILE);
    let runs: Vec<(String, String, PathBuf)> = if state_path.exists() {
        let state = SweepState::read(dir)?;
        state
            .trials
            .iter()
            .map(|t| {
                let status = format!("{:?}", t.status).to_lowercase();
                (t.trial.name.clone(), status, dir.join(&t.trial.name))
            })
            .collect()
    } else if dir.join(crate::rundir::METRICS_FILE).exists() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![(name, "run".into(), dir.to_path_buf())]
    } else {
        bail!(
            "{} is neither a sweep directory ({STATE_FILE}) nor a run ({})",
            dir.display(),
            crate::rundir::METRICS_FILE
        );
    };
    let mut table: Vec<(String, String, BTreeMap<String, f64>)> = Vec::new();
    let mut curves = Vec::new();
    for (name, status, path) in runs {
        let rows = metrics::read(&path.join(crate::rundir::METRICS_FILE)).unwrap_or_default();
        table.push((name.clone(), status, summarize(&rows)));
        curves.push((name, rows));
    }
    let mut columns: Vec<String> = table
        .iter()
        .flat_map(|(_, _, m)| m.keys().cloned())
        .collect();
    columns.sort();
    columns.dedup();
    let mut md = format!(
        "# Results: {}\n\n| trial | status | {} |\n|---|---|{}\n",
        dir.display(),
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    let mut csv = format!(
        "trial,status,{}\n",
        columns
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    for (name, status, m) in &table {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| m.get(c).map(|v| format!("{v:.4}")).unwrap_or_default())
            .collect();
        md.push_str(&format!("| {name} | {status} | {} |\n", cells.join(" | ")));
        csv.push_str(&format!("{name},{status},{}\n", cells.join(",")));
    }
    match super::plots::write(&dir.join(PLOTS_DIR), &curves) {
        Ok(drawn) if !drawn.is_empty() => {
            md.push_str("\n## Plots\n\n");
            for (key, file) in drawn {
                md.push_str(&format!("### {key}\n\n![{key}]({PLOTS_DIR}/{file})\n\n"));
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("PNG plots skipped: {e:#}"),
    }
    write_atomic(&dir.join("results.md"), md.as_bytes())?;
    write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
    Ok(md)
}
