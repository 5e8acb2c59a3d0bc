//! Experiment files: layering, the typed schema, and problems reported with file, key and line.
//!
//! Layers, lowest first: built-in defaults (the schema's `Default`s), the `extends` chain (paths
//! relative to the file that names them; cycles are errors), the file itself, `SIPT_`-prefixed
//! environment variables with `__` between key segments (`SIPT_TRAIN__LR=3e-4`), and
//! `--set a.b=value` overrides whose values are read as TOML (numbers, booleans, arrays), or as
//! plain strings when they are not valid TOML.

mod load;
pub mod locate;
mod problems;
mod redact;
pub mod schema;
mod validate;

pub use load::{load, load_without_libraries, registry_with, LoadError};
pub use problems::{Origin, Problem, Problems};
pub use redact::{redact_value, redacted};
pub use schema::*;
pub use validate::{check_choice, validate_plugins};

use figment::providers::{Format, Toml};
use figment::Figment;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One `--set key.path=value` override, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SetOverride {
    pub key: Vec<String>,
    pub value: toml::Value,
    pub raw: String,
}

impl std::str::FromStr for SetOverride {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let (key, value) = raw
            .split_once('=')
            .ok_or_else(|| format!("'{raw}' is not KEY=VALUE (e.g. train.lr=3e-4)"))?;
        let key = parse_key(key.trim());
        if key.iter().any(String::is_empty) {
            return Err(format!("'{raw}' has an empty key segment"));
        }
        let value = parse_value(value.trim());
        Ok(SetOverride {
            key,
            value,
            raw: raw.to_string(),
        })
    }
}

/// A dotted key path as TOML reads it, so quoted segments may hold dots
/// (`sweep.grid."sip.rollouts"`); a key TOML cannot read is split on dots.
fn parse_key(key: &str) -> Vec<String> {
    if let Ok(mut table) = toml::from_str::<toml::Table>(&format!("{key} = 0")) {
        let mut path = Vec::new();
        loop {
            if table.len() != 1 {
                break;
            }
            let Some((k, v)) = table.into_iter().next() else {
                break;
            };
            path.push(k);
            match v {
                toml::Value::Table(inner) => table = inner,
                _ => return path,
            }
        }
    }
    key.split('.').map(|s| s.trim().to_string()).collect()
}

/// A value as typed on a command line: TOML when it parses as TOML, a string otherwise.
pub fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Apply `--set` overrides to the merged values. An override *replaces* what it names: a
/// table given inline (e.g. a different plugin with its own options) does not inherit the keys
/// of the table it replaces.
fn apply_sets(raw: &mut Value, sets: &[SetOverride]) {
    for o in sets {
        let value = serde_json::to_value(&o.value).unwrap_or(Value::Null);
        let mut current = &mut *raw;
        for (i, seg) in o.key.iter().enumerate() {
            if !current.is_object() {
                *current = Value::Object(Default::default());
            }
            let Value::Object(map) = current else { break };
            if i + 1 == o.key.len() {
                map.insert(seg.clone(), value.clone());
                break;
            }
            current = map
                .entry(seg.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
    }
}

const ENV_PREFIX: &str = "SIPT_";

/// `SIPT_A__B=value` variables as overrides of `a.b`, values read like `--set` values. Only
/// nested keys (with `__`) are configuration, so that variables such as SIPT_ASSETS that
/// configure the tool itself never clash with the schema.
fn env_overrides() -> Vec<(SetOverride, String)> {
    let mut out: Vec<(SetOverride, String)> = std::env::vars()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            if !rest.contains("__") {
                return None;
            }
            let key: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if key.iter().any(String::is_empty) {
                return None;
            }
            Some((
                SetOverride {
                    key,
                    value: parse_value(value.trim()),
                    raw: format!("{name}={value}"),
                },
                name,
            ))
        })
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

/// An experiment file with its layers resolved and checked against the schema.
pub struct Resolved {
    pub file: PathBuf,
    /// The typed configuration (keys with problems fall back to their defaults).
    pub experiment: Experiment,
    /// The merged raw values, as written (before defaults).
    pub raw: Value,
    /// Every file of the `extends` chain, bases first, the experiment file last.
    pub files: Vec<PathBuf>,
    figment: Figment,
    texts: HashMap<PathBuf, String>,
    /// Environment overrides with their variable names, then `--set` overrides.
    env: Vec<(SetOverride, String)>,
    sets: Vec<SetOverride>,
}

impl Resolved {
    /// Which layer set `path`, and the line when it came from a file.
    pub fn origin(&self, path: &[String]) -> (Origin, Option<usize>) {
        if self.sets.iter().any(|s| path.starts_with(&s.key)) {
            return (Origin::Set, None);
        }
        if let Some((_, name)) = self
            .env
            .iter()
            .rev()
            .find(|(s, _)| path.starts_with(&s.key))
        {
            return (Origin::Env(name.clone()), None);
        }
        let Some(meta) = self.figment.find_metadata(&path.join(".")) else {
            return (Origin::Default, None);
        };
        if let Some(figment::Source::File(file)) = &meta.source {
            let line = self
                .texts
                .get(file)
                .and_then(|text| locate::line_of(text, path));
            return (Origin::File(file.clone()), line);
        }
        (Origin::Default, None)
    }

    /// A problem at `path`, located and showing the value found there.
    pub fn problem(&self, path: &[String], message: impl Into<String>) -> Problem {
        let (origin, line) = self.origin(path);
        let origin = match origin {
            // A key absent from every layer: the problem is still the experiment file's.
            Origin::Default => Origin::File(self.file.clone()),
            other => other,
        };
        Problem {
            origin,
            line,
            key: path.join("."),
            value: value_at(&self.raw, path).map(show_value),
            message: message.into(),
        }
    }

    /// The resolved configuration as TOML (what `sipt config show` prints).
    pub fn to_toml(&self) -> String {
        to_toml(&self.experiment)
    }

    /// The resolved configuration as a run directory records it: TOML without credentials
    /// (see [`redacted`]).
    pub fn to_record(&self) -> String {
        to_toml(&redacted(&self.experiment))
    }
}

/// Serialize a configuration as TOML.
pub fn to_toml(experiment: &Experiment) -> String {
    toml::to_string_pretty(experiment).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
}

pub(crate) fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn show_value(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// Read one file of the chain: its text and its `extends` list.
fn read_layer(path: &Path, problems: &mut Vec<Problem>) -> Option<(String, Vec<PathBuf>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem::file(
                path,
                None,
                format!("cannot read the file: {e}"),
            ));
            return None;
        }
    };
    let table: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            problems.push(Problem::file(
                path,
                line,
                format!("invalid TOML: {}", e.message()),
            ));
            return None;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let bases = match table.get("extends") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![dir.join(s)],
        Some(toml::Value::Array(items)) if items.iter().all(|v| v.is_str()) => items
            .iter()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect(),
        Some(other) => {
            problems.push(Problem {
                origin: Origin::File(path.to_path_buf()),
                line: locate::line_of(&text, &["extends".to_string()]),
                key: "extends".into(),
                value: Some(other.to_string()),
                message: "expected a file name or a list of file names".into(),
            });
            Vec::new()
        }
    };
    Some((text, bases))
}

/// Walk the `extends` chain depth-first, bases before the files that extend them.
fn collect_chain(
    path: &Path,
    stack: &mut Vec<PathBuf>,
    order: &mut Vec<PathBuf>,
    texts: &mut HashMap<PathBuf, String>,
    problems: &mut Vec<Problem>,
) {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(pos) = stack.iter().position(|p| *p == key) {
        let cycle: Vec<String> = stack[pos..]
            .iter()
            .chain(std::iter::once(&key))
            .map(|p| p.display().to_string())
            .collect();
        let from = stack.last().cloned().unwrap_or_else(|| key.clone());
        problems.push(Problem::file(
            &from,
            texts
                .get(&from)
                .and_then(|t| locate::line_of(t, &["extends".to_string()])),
            format!("extends forms a cycle: {}", cycle.join(" -> ")),
        ));
        return;
    }
    if order.contains(&key) {
        return;
    }
    let Some((text, bases)) = read_layer(path, problems) else {
        return;
    };
    texts.insert(key.clone(), text);
    stack.push(key.clone());
    for base in bases {
        collect_chain(&base, stack, order, texts, problems);
    }
    stack.pop();
    order.push(key);
}

/// Resolve an experiment file's layers and check them against the schema; any problem fails.
/// Plugin tables are checked separately ([`validate_plugins`]), once the registry is known.
pub fn resolve(file: &Path, sets: &[SetOverride]) -> Result<Resolved, Problems> {
    let (resolved, problems) = resolve_lenient(file, sets)?;
    if problems.is_empty() {
        Ok(resolved)
    } else {
        Err(Problems(problems))
    }
}

/// Key paths of the plugin tables of a merged configuration.
fn plugin_tables(raw: &Value) -> Vec<Vec<String>> {
    let mut paths: Vec<Vec<String>> = [
        &["rewriter"][..],
        &["reward"],
        &["curriculum"],
        &["train", "objective"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| s.to_string()).collect())
    .collect();
    if let Some(Value::Object(judges)) = raw.get("judges") {
        paths.extend(
            judges
                .keys()
                .map(|name| vec!["judges".to_string(), name.clone()]),
        );
    }
    paths
}

/// Merge `top` into `base`: tables key by key, anything else replaced (as figment merges).
fn merge_into(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(base), Value::Object(top)) => {
            for (k, v) in top {
                match base.get_mut(&k) {
                    Some(slot) => merge_into(slot, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

/// A file that changes a plugin table's `type` from the one its bases chose starts that table
/// afresh: the base plugin's options would not fit the new plugin (e.g. a reward's `weights`
/// under a reward that has none). The table is then what that file and the files after it
/// say; environment variables and `--set` still apply on top.
fn restart_switched_tables(raw: &mut Value, files: &[PathBuf], texts: &HashMap<PathBuf, String>) {
    let layers: Vec<Value> = files
        .iter()
        .map(|f| {
            texts
                .get(f)
                .and_then(|t| toml::from_str::<toml::Table>(t).ok())
                .and_then(|t| serde_json::to_value(t).ok())
                .unwrap_or(Value::Null)
        })
        .collect();
    for path in plugin_tables(raw) {
        let types: Vec<(usize, &str)> = layers
            .iter()
            .enumerate()
            .filter_map(|(i, layer)| {
                let t = value_at(layer, &path)?.get("type")?.as_str()?;
                Some((i, t))
            })
            .collect();
        let Some(switch) = types
            .windows(2)
            .rev()
            .find(|w| w[0].1 != w[1].1)
            .map(|w| w[1].0)
        else {
            continue;
        };
        let mut table = Value::Object(Default::default());
        for layer in &layers[switch..] {
            if let Some(part) = value_at(layer, &path) {
                merge_into(&mut table, part.clone());
            }
        }
        let (last, parents) = path.split_last().expect("plugin table paths are not empty");
        if let Some(Value::Object(parent)) = parents
            .iter()
            .try_fold(&mut *raw, |v, seg| v.get_mut(seg.as_str()))
        {
            parent.insert(last.clone(), table);
        }
    }
}

/// Like [`resolve`], but schema problems come back beside the configuration (whose offending
/// keys fell back to defaults), so that later checks can still run and report theirs too.
/// Only problems that leave nothing to check (unreadable files, bad TOML) are errors.
pub fn resolve_lenient(
    file: &Path,
    sets: &[SetOverride],
) -> Result<(Resolved, Vec<Problem>), Problems> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut texts = HashMap::new();
    collect_chain(file, &mut Vec::new(), &mut files, &mut texts, &mut problems);
    if !problems.is_empty() {
        return Err(Problems(problems));
    }

    let env = env_overrides();
    let mut figment = Figment::new();
    for f in &files {
        figment = figment.merge(Toml::file_exact(f));
    }

    let mut raw: Value = match figment.extract() {
        Ok(v) => v,
        Err(e) => {
            return Err(Problems(vec![Problem::file(
                file,
                None,
                format!("cannot merge the configuration layers: {e}"),
            )]))
        }
    };
    if let Value::Object(map) = &mut raw {
        map.remove("extends");
    }
    restart_switched_tables(&mut raw, &files, &texts);
    let env_sets: Vec<SetOverride> = env.iter().map(|(s, _)| s.clone()).collect();
    apply_sets(&mut raw, &env_sets);
    apply_sets(&mut raw, sets);

    let mut resolved = Resolved {
        file: file.to_path_buf(),
        experiment: Experiment::default(),
        raw: raw.clone(),
        files,
        figment,
        texts,
        env,
        sets: sets.to_vec(),
    };
    let (experiment, found) =
        validate::check_all(raw, |v| sipt_api::check_config::<Experiment>(v).map(|_| ()));
    for (path, message) in found {
        problems.push(resolved.problem(&path, message));
    }
    resolved.experiment = experiment
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    problems.extend(validate::check_values(&resolved));
    Ok((resolved, problems))
}

/// Every leaf of the resolved configuration with where it came from, for `config show --origins`.
pub fn origins(resolved: &Resolved) -> Vec<(String, String, String)> {
    let full = serde_json::to_value(&resolved.experiment).unwrap_or(Value::Null);
    let mut rows = Vec::new();
    walk_leaves(&full, &mut Vec::new(), &mut |path, value| {
        let (origin, line) = resolved.origin(path);
        let place = match (origin, line) {
            (Origin::File(f), Some(l)) => format!("{}:{l}", f.display()),
            (origin, _) => origin.to_string(),
        };
        rows.push((path.join("."), value.to_string(), place));
    });
    rows
}

fn walk_leaves(value: &Value, path: &mut Vec<String>, f: &mut dyn FnMut(&[String], &Value)) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                path.push(k.clone());
                walk_leaves(v, path, f);
                path.pop();
            }
        }
        Value::Null => {}
        _ => f(path, value),
    }
}

#[cfg(test)]
mod tests;
