//! Metrics: one JSON object per line in the run directory's `metrics.jsonl`, flushed line by
//! line so that a killed run keeps everything it logged.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One row: the step and named values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub step: u64,
    pub values: BTreeMap<String, f64>,
}

impl Row {
    pub fn new(step: u64) -> Row {
        Row {
            step,
            values: BTreeMap::new(),
        }
    }

    pub fn set(&mut self, key: impl Into<String>, value: f64) -> &mut Self {
        self.values.insert(key.into(), value);
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).copied()
    }

    fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("step".into(), self.step.into());
        for (k, v) in &self.values {
            // JSON has no NaN or infinity: write them as null rather than corrupt the file.
            let value = serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null);
            map.insert(k.clone(), value);
        }
        serde_json::Value::Object(map)
    }
}

/// Where rows go. The JSON-lines file always; other trackers (W&B) alongside.
pub trait Sink: Send {
    fn log(&mut self, row: &Row) -> Result<()>;
    fn finish(&mut self, _success: bool) -> Result<()> {
        Ok(())
    }
}

pub struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonLines {
    /// Open for appending. `resume_from`: drop rows after this step first (they will be
    /// recomputed by the resumed run), rewriting the file atomically.
    pub fn open(path: &Path, resume_from: Option<u64>) -> Result<JsonLines> {
        if let Some(step) = resume_from {
            drop_rows_after(path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(JsonLines {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Sink for JsonLines {
    fn log(&mut self, row: &Row) -> Result<()> {
        let mut line = row.to_json().to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Rewrite a JSON-lines file (atomically) without the rows whose `step` is past `step`: a
/// resumed run recomputes them.
pub fn drop_rows_after(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::rundir::write_atomic(path, kept.as_bytes())
}

/// Read all rows of a metrics file (for reports and tests).
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: a line is not JSON", path.display()))?;
        let mut row = Row::new(v.get("step").and_then(|s| s.as_u64()).unwrap_or(0));
        if let Some(map) = v.as_object() {
            for (k, x) in map {
                if k != "step" {
                    if let Some(f) = x.as_f64() {
                        row.values.insert(k.clone(), f);
                    }
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut sink = JsonLines::open(&path, None).unwrap();
        for s in 1..=5 {
            sink.log(Row::new(s).set("loss", s as f64 / 10.0)).unwrap();
        }
        drop(sink);
        let mut sink = JsonLines::open(&path, Some(3)).unwrap();
        sink.log(Row::new(4).set("loss", f64::NAN)).unwrap();
        let rows = read(&path).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(rows[2].get("loss"), Some(0.3));
        assert_eq!(rows[3].get("loss"), None);
    }
}
