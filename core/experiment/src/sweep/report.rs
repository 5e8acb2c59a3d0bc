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
    // Health monitors: how many steps each alarmed (listed only when it did).
    let mut alarms: BTreeMap<&str, f64> = BTreeMap::new();
    for row in rows {
        for (key, value) in &row.values {
            if let Some(name) = key
                .strip_prefix("health/")
                .and_then(|k| k.strip_suffix("/alarm"))
            {
                *alarms.entry(name).or_default() += *value;
            }
        }
    }
    for (name, steps) in alarms.into_iter().filter(|(_, steps)| *steps > 0.0) {
        out.insert(format!("health/{name} (alarm steps)"), steps);
    }
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
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let runs: Vec<(String, String, PathBuf)> = if state_path.exists() {
        let state = SweepState::read(dir)?;
        groups = seed_groups(&state);
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
    if !groups.is_empty() {
        md.push_str(&grouped_table(&groups, &table, &columns));
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

/// Trials that differ only in `experiment.seed`, grouped (in order of first appearance) under
/// the name the other overrides give them. Empty when the sweep does not vary the seed.
fn seed_groups(state: &SweepState) -> Vec<(String, Vec<usize>)> {
    const SEED: &str = "experiment.seed";
    let seeds: std::collections::BTreeSet<String> = state
        .trials
        .iter()
        .filter_map(|t| t.trial.overrides.iter().find(|(k, _)| k == SEED))
        .map(|(_, v)| v.to_string())
        .collect();
    if seeds.len() < 2 {
        return Vec::new();
    }
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, t) in state.trials.iter().enumerate() {
        let rest: Vec<(String, toml::Value)> = t
            .trial
            .overrides
            .iter()
            .filter(|(k, _)| k != SEED)
            .cloned()
            .collect();
        let name = if rest.is_empty() {
            "all".to_string()
        } else {
            super::trial_name(&rest)
        };
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, members)) => members.push(i),
            None => groups.push((name, vec![i])),
        }
    }
    groups
}

/// Mean ± sample standard deviation over seeds of each metric, for finished trials.
fn grouped_table(
    groups: &[(String, Vec<usize>)],
    table: &[(String, String, BTreeMap<String, f64>)],
    columns: &[String],
) -> String {
    let mut md = format!(
        "\n## Mean ± standard deviation over seeds (finished trials)\n\n| group | seeds | {} |\n|---|---|{}\n",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    for (name, members) in groups {
        let done: Vec<&BTreeMap<String, f64>> = members
            .iter()
            .filter(|&&i| table[i].1 == "done")
            .map(|&i| &table[i].2)
            .collect();
        let cells: Vec<String> = columns
            .iter()
            .map(|c| {
                let values: Vec<f64> = done.iter().filter_map(|m| m.get(c).copied()).collect();
                mean_sd(&values)
            })
            .collect();
        md.push_str(&format!(
            "| {name} | {} | {} |\n",
            done.len(),
            cells.join(" | ")
        ));
    }
    md
}

/// "0.1234 ± 0.0100"; one value alone has no spread.
fn mean_sd(values: &[f64]) -> String {
    match values.len() {
        0 => String::new(),
        1 => format!("{:.4}", values[0]),
        n => {
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            format!("{mean:.4} ± {:.4}", var.sqrt())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_over_seeds() {
        assert_eq!(mean_sd(&[]), "");
        assert_eq!(mean_sd(&[2.0]), "2.0000");
        assert_eq!(mean_sd(&[1.0, 2.0, 3.0]), "2.0000 ± 1.0000");
    }
}
