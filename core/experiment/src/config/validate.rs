//! Checking a configuration completely: every problem at once, not the first one only.
//!
//! serde stops at the first error, so [`check_all`] records it, removes the offending key (its
//! default then applies) and checks again, until the value passes.

use super::{value_at, Problem, Resolved};
use crate::registry::{Registry, JUDGE_KINDS};
use crate::suggest;
use serde_json::Value;
use sipt_api::{ConfigProblem, Instance, PluginKind};

/// Check `value` with `check` repeatedly, collecting `(key path, message)` for every problem.
/// Returns the value with the offending keys removed when what is left passes.
pub fn check_all(
    mut value: Value,
    check: impl Fn(&Value) -> Result<(), ConfigProblem>,
) -> (Option<Value>, Vec<(Vec<String>, String)>) {
    let mut found = Vec::new();
    for _ in 0..256 {
        match check(&value) {
            Ok(()) => return (Some(value), found),
            Err(problem) => {
                let (path, message) = explain(&value, problem);
                let removed = !path.is_empty() && remove_at(&mut value, &path);
                found.push((path, message));
                if !removed {
                    return (None, found);
                }
            }
        }
    }
    (None, found)
}

fn remove_at(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for seg in parents {
        current = match current {
            Value::Object(map) => match map.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(items) => match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match current {
        Value::Object(map) => map.remove(last).is_some(),
        // A bad array element: drop the whole array so its default applies.
        Value::Array(_) => false,
        _ => false,
    }
}

/// Backticked names in a serde message: "unknown field `x`, expected one of `a`, `b`".
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// Turn serde's wording into ours: unknown keys get a suggestion, type names read as English.
fn explain(value: &Value, problem: ConfigProblem) -> (Vec<String>, String) {
    let ConfigProblem { mut path, message } = problem;
    if message.starts_with("unknown field") {
        let names = backticked(&message);
        if let Some((unknown, expected)) = names.split_first() {
            // serde_path_to_error points at the table; name the key itself.
            if path.last().map(String::as_str) != Some(*unknown) {
                path.push(unknown.to_string());
            }
            let hint = suggest::hint(unknown, expected.iter().copied());
            let message = if expected.is_empty() {
                format!("unknown key '{unknown}': this table takes no options")
            } else if hint.is_empty() {
                format!(
                    "unknown key '{unknown}' (valid keys: {})",
                    expected.join(", ")
                )
            } else {
                format!("unknown key '{unknown}'{hint}")
            };
            return (path, message);
        }
    }
    if message.starts_with("unknown variant") {
        let names = backticked(&message);
        if let Some((unknown, expected)) = names.split_first() {
            let hint = suggest::hint(unknown, expected.iter().copied());
            return (
                path,
                format!("expected one of: {}{hint}", expected.join(", ")),
            );
        }
    }
    if message.starts_with("missing field") {
        let names = backticked(&message);
        if let Some(field) = names.first() {
            return (path, format!("missing required key '{field}'"));
        }
    }
    // A problem inside an array element is reported on the array.
    if let Some(pos) = path.iter().position(|s| s.parse::<usize>().is_ok()) {
        if matches!(value_at(value, &path[..pos]), Some(Value::Array(_))) {
            path.truncate(pos + 1);
        }
    }
    (path, plain_types(&message))
}

fn plain_types(message: &str) -> String {
    let mut out = message.to_string();
    for (serde_name, plain) in [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u64", "expected a whole number >= 0"),
        ("expected u32", "expected a whole number >= 0"),
        ("expected usize", "expected a whole number >= 0"),
        ("expected i64", "expected a whole number"),
        ("expected a boolean", "expected true or false"),
        (
            "expected struct PluginTable",
            "expected a plugin table (with type = \"...\")",
        ),
    ] {
        out = out.replace(serde_name, plain);
    }
    // Any other section: its Rust type name means nothing in an experiment file.
    if let Some(at) = out.find("expected struct ") {
        let rest = &out[at + "expected struct ".len()..];
        let name_len = rest
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        out = format!("{}expected a table{}", &out[..at], &rest[name_len..]);
    }
    out
}

/// A value that must be one of a fixed set of names.
pub fn check_choice(
    resolved: &Resolved,
    path: &str,
    value: &str,
    choices: &[&str],
    problems: &mut Vec<Problem>,
) {
    if !choices.contains(&value) {
        let key: Vec<String> = path.split('.').map(String::from).collect();
        let hint = suggest::hint(value, choices.iter().copied());
        let message = if hint.is_empty() {
            format!("expected one of: {}", choices.join(", "))
        } else {
            format!("expected one of: {}{hint}", choices.join(", "))
        };
        problems.push(resolved.problem(&key, message));
    }
}

/// The longest `experiment.name`: folder names are at most 255 bytes on common file systems,
/// and a run's folder may add a suffix.
pub const MAX_NAME_BYTES: usize = 200;

/// Checks that need more than a type: names from fixed sets, ranges, consistency.
pub(super) fn check_values(resolved: &Resolved) -> Vec<Problem> {
    let e = &resolved.experiment;
    let problem = |path: &str, message: String| {
        let key: Vec<String> = path.split('.').map(String::from).collect();
        resolved.problem(&key, message)
    };
    let mut out = Vec::new();

    let device = e.experiment.device.as_str();
    let cuda_index = device
        .strip_prefix("cuda:")
        .map(|i| i.parse::<usize>().is_ok())
        .unwrap_or(false);
    if !(matches!(device, "auto" | "cpu" | "cuda") || cuda_index) {
        out.push(problem(
            "experiment.device",
            "expected auto, cpu, cuda or cuda:N".into(),
        ));
    }
    let name = &e.experiment.name;
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || name.chars().all(|c| c == '.')
        || name.contains(|c: char| c == '/' || c == '\\' || c.is_control())
    {
        out.push(problem(
            "experiment.name",
            format!("expected a non-empty name usable as a folder name (no slashes, not . or .., at most {MAX_NAME_BYTES} bytes)"),
        ));
    }
    let m = &e.model;
    if m.path.is_empty() {
        for (key, value) in [
            ("model.vocab_size", m.vocab_size),
            ("model.hidden_size", m.hidden_size),
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.kv_heads", m.kv_heads),
            ("model.intermediate_size", m.intermediate_size),
            ("model.max_position", m.max_position),
        ] {
            if value == 0 {
                out.push(problem(key, "expected a positive number".into()));
            }
        }
        if m.heads > 0 && m.hidden_size % m.heads != 0 {
            out.push(problem(
                "model.heads",
                format!("hidden_size {} is not divisible by heads", m.hidden_size),
            ));
        }
        if m.kv_heads > 0 && m.heads % m.kv_heads != 0 {
            out.push(problem(
                "model.kv_heads",
                format!("heads {} is not divisible by kv_heads", m.heads),
            ));
        }
        if m.heads > 0 && m.hidden_size % m.heads == 0 && (m.hidden_size / m.heads) % 2 != 0 {
            out.push(problem(
                "model.heads",
                "the head size (hidden_size / heads) must be even for rotary embeddings".into(),
            ));
        }
    }
    let t = &e.train;
    for (key, ok) in [
        ("train.steps", t.steps > 0),
        ("train.batch_size", t.batch_size > 0),
        ("train.grad_accum", t.grad_accum > 0),
        ("train.lr", t.lr > 0.0 && t.lr.is_finite()),
        ("train.min_lr_ratio", (0.0..=1.0).contains(&t.min_lr_ratio)),
        ("train.weight_decay", t.weight_decay >= 0.0),
        ("train.beta1", (0.0..1.0).contains(&t.beta1)),
        ("train.beta2", (0.0..1.0).contains(&t.beta2)),
        ("train.grad_clip", t.grad_clip >= 0.0),
        ("data.seq_len", e.data.seq_len >= 2),
        ("data.suffix_tokens", e.data.suffix_tokens > 0),
        (
            "data.validation_fraction",
            (0.0..1.0).contains(&e.data.validation_fraction),
        ),
        ("sip.top_p", e.sip.top_p > 0.0 && e.sip.top_p <= 1.0),
        ("sip.temperature", e.sip.temperature >= 0.0),
        ("health.window", e.health.window > 0),
        (
            "health.max_source_share",
            (0.0..=1.0).contains(&e.health.max_source_share),
        ),
        (
            "health.min_distinct_ratio",
            e.health.min_distinct_ratio >= 0.0,
        ),
        ("health.max_length_ratio", e.health.max_length_ratio >= 1.0),
        ("health.max_kl", e.health.max_kl >= 0.0),
        (
            "health.max_judge_failure_rate",
            (0.0..=1.0).contains(&e.health.max_judge_failure_rate),
        ),
        (
            "health.max_order_disagreement",
            (0.0..=1.0).contains(&e.health.max_order_disagreement),
        ),
        (
            "health.min_reward_spread",
            e.health.min_reward_spread >= 0.0,
        ),
        ("health.max_reward_gap", e.health.max_reward_gap.is_finite()),
        (
            "distributed.timeout_s",
            e.distributed.timeout_s > 0.0 && e.distributed.timeout_s.is_finite(),
        ),
        (
            "sweep.ranks",
            e.sweep.as_ref().map_or(true, |s| s.ranks > 0),
        ),
    ] {
        if !ok {
            let what = match key {
                "train.min_lr_ratio" => "expected a number between 0 and 1",
                "train.beta1" | "train.beta2" | "data.validation_fraction" => {
                    "expected a number in [0, 1)"
                }
                "sip.top_p" => "expected a number in (0, 1]",
                "health.max_source_share"
                | "health.max_judge_failure_rate"
                | "health.max_order_disagreement" => "expected a number between 0 and 1",
                "health.max_length_ratio" => "expected a number >= 1",
                "health.min_distinct_ratio" | "health.max_kl" | "health.min_reward_spread" => {
                    "expected a number >= 0"
                }
                "health.max_reward_gap" => "expected a finite number",
                "data.seq_len" => "expected at least 2",
                "train.weight_decay" | "train.grad_clip" | "sip.temperature" => {
                    "expected a number >= 0"
                }
                _ => "expected a positive number",
            };
            out.push(problem(key, what.into()));
        }
    }
    if e.data.train.is_empty() {
        out.push(problem(
            "data.train",
            "no training data: list files, folders or globs (e.g. [\"@assets/corpora/shakespeare\"])".into(),
        ));
    }
    if e.sip.tournament == crate::tournament::Design::Adaptive && e.sip.tournament_prior.is_empty()
    {
        out.push(problem(
            "sip.tournament_prior",
            "the adaptive tournament needs a prior: the criterion of a pointwise judge whose scores order each pool first (e.g. \"quality\")".into(),
        ));
    }
    if e.sip.rewrite && e.rewriter.is_none() {
        out.push(problem(
            "sip.rewrite",
            "rewrites are asked for but there is no [rewriter] table".into(),
        ));
    }
    if m.path.is_empty() && m.max_position > 0 {
        for seq in e.sequence_lengths() {
            if seq.tokens > m.max_position {
                out.push(problem(
                    seq.key,
                    format!(
                        "sequences of {} tokens do not fit model.max_position = {}",
                        seq.tokens, m.max_position
                    ),
                ));
            }
        }
    }
    if e.data.prefix_min_tokens > e.data.prefix_max_tokens {
        out.push(problem(
            "data.prefix_min_tokens",
            format!(
                "larger than data.prefix_max_tokens ({})",
                e.data.prefix_max_tokens
            ),
        ));
    }
    let mut problems = Vec::new();
    check_choice(
        resolved,
        "data.format",
        &e.data.format,
        &["auto", "text", "jsonl", "parquet"],
        &mut problems,
    );
    if let Some(sweep) = &e.sweep {
        let s = &sweep.slurm;
        if !s.time.is_empty() && !slurm_time_ok(&s.time) {
            problems.push(problem(
                "sweep.slurm.time",
                "expected a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
                    .into(),
            ));
        }
        if !s.mem.is_empty() && !slurm_mem_ok(&s.mem) {
            problems.push(problem(
                "sweep.slurm.mem",
                "expected a memory size: a whole number with an optional K, M, G or T unit (e.g. 16G)".into(),
            ));
        }
        for (i, arg) in s.sbatch_args.iter().enumerate() {
            if !arg.starts_with('-') || arg.contains('\n') {
                problems.push(problem(
                    &format!("sweep.slurm.sbatch_args.{i}"),
                    "expected one sbatch option starting with '-' on one line (e.g. --exclusive)"
                        .into(),
                ));
            }
        }
        for (key, value) in [
            ("sweep.slurm.partition", &s.partition),
            ("sweep.slurm.account", &s.account),
            ("sweep.slurm.qos", &s.qos),
        ] {
            if value.contains(|c: char| c.is_whitespace() || c.is_control()) {
                problems.push(problem(key, "expected a name without spaces".into()));
            }
        }
    }
    if !e.eval.judge.is_empty() && !e.judges.contains_key(&e.eval.judge) {
        let names: Vec<&str> = e.judges.keys().map(String::as_str).collect();
        let hint = suggest::hint(&e.eval.judge, names.iter().copied());
        problems.push(resolved.problem(
            &["eval".into(), "judge".into()],
            format!("no judge of that name in [judges]{hint}"),
        ));
    }
    out.extend(problems);
    out
}

/// Slurm's `--time` formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
/// days-hours:minutes, days-hours:minutes:seconds.
pub fn slurm_time_ok(text: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    let (days, rest) = match text.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, text),
    };
    if days.is_some_and(|d| !number(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    parts.iter().all(|p| number(p)) && (1..=3).contains(&parts.len())
}

/// `--mem` sizes: digits with an optional K/M/G/T unit.
pub fn slurm_mem_ok(text: &str) -> bool {
    let digits = text.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    text.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Check every plugin table against the registry: the `type` names a registered plugin of the
/// right kind, and the plugin accepts the rest of the table.
pub fn validate_plugins(resolved: &Resolved, registry: &Registry) -> Vec<Problem> {
    let mut problems = check_tables(resolved, registry);
    if problems.is_empty() {
        problems.extend(check_reward_criteria(resolved, registry));
    }
    problems
}

fn check_tables(resolved: &Resolved, registry: &Registry) -> Vec<Problem> {
    let e = &resolved.experiment;
    let mut tables: Vec<(Vec<String>, &[PluginKind], &super::PluginTable)> = Vec::new();
    for (name, table) in &e.judges {
        tables.push((vec!["judges".into(), name.clone()], JUDGE_KINDS, table));
    }
    if let Some(t) = &e.rewriter {
        tables.push((vec!["rewriter".into()], &[PluginKind::Rewriter], t));
    }
    if let Some(t) = &e.reward {
        tables.push((vec!["reward".into()], &[PluginKind::Reward], t));
    }
    if let Some(t) = &e.curriculum {
        tables.push((vec!["curriculum".into()], &[PluginKind::Curriculum], t));
    }
    tables.push((
        vec!["train".into(), "objective".into()],
        &[PluginKind::Objective],
        &e.train.objective,
    ));

    let mut problems = Vec::new();
    // The win-rate judge must compare (pairwise); a pointwise one would give no win rate.
    if let Some(table) = e.judges.get(&e.eval.judge) {
        if registry
            .find_judge(&table.name)
            .is_some_and(|entry| entry.kind == PluginKind::PointwiseJudge)
        {
            problems.push(resolved.problem(
                &["eval".into(), "judge".into()],
                format!(
                    "judge '{}' is pointwise; win rates need a pairwise judge",
                    e.eval.judge
                ),
            ));
        }
    }
    for (path, kinds, table) in tables {
        let entry = kinds.iter().find_map(|k| registry.find(*k, &table.name));
        if entry.is_none() && registry.skips_libraries() {
            // Perhaps a library's plugin; its table is checked when libraries are loaded.
            continue;
        }
        let Some(entry) = entry else {
            let names: Vec<&str> = kinds.iter().flat_map(|k| registry.names(*k)).collect();
            let what = if kinds.len() > 1 {
                "judge".to_string()
            } else {
                kinds[0].to_string()
            };
            let hint = suggest::hint(&table.name, names.iter().copied());
            let other_kind = registry
                .entries()
                .iter()
                .find(|entry| entry.name == table.name)
                .map(|entry| entry.kind);
            let message = if let Some(kind) = other_kind {
                format!(
                    "'{}' is a {kind} plugin, not a {what} (known: {})",
                    table.name,
                    names.join(", ")
                )
            } else if hint.is_empty() {
                format!(
                    "unknown {what} type '{}' (known: {})",
                    table.name,
                    names.join(", ")
                )
            } else {
                format!("unknown {what} type '{}'{hint}", table.name)
            };
            let mut key = path.clone();
            key.push("type".into());
            problems.push(resolved.problem(&key, message));
            continue;
        };
        let (_, found) = check_all(table.options_value(), |v| registry.check(entry, v));
        for (sub, message) in found {
            let mut key = path.clone();
            key.extend(sub);
            problems.push(resolved.problem(&key, message));
        }
    }
    problems
}

/// The criteria the experiment's judges give, or `None` when a judge cannot be built here
/// (building may need what only the run has, such as an API key or a word list; the run then
/// reports it) or its library was not loaded.
fn judge_criteria(resolved: &Resolved, registry: &Registry) -> Option<Vec<String>> {
    let context = crate::paths::plugin_context(resolved);
    let mut criteria = Vec::new();
    for table in resolved.experiment.judges.values() {
        let entry = registry.find_judge(&table.name)?;
        match registry
            .build(entry, table.options_value(), &context)
            .ok()?
        {
            Instance::PointwiseJudge(j) => criteria.extend(j.criteria()),
            Instance::PairwiseJudge(j) => criteria.push(j.criterion()),
            _ => return None,
        }
    }
    criteria.sort();
    criteria.dedup();
    Some(criteria)
}

/// A reward's `weights` (keys), `optional` (list) and `gate` options name judge criteria: each
/// must be one the judges give, or the reward would silently ignore it.
fn check_reward_criteria(resolved: &Resolved, registry: &Registry) -> Vec<Problem> {
    let Some(reward) = &resolved.experiment.reward else {
        return Vec::new();
    };
    let mut named: Vec<(Vec<String>, String)> = Vec::new();
    let key = |parts: &[&str]| -> Vec<String> {
        std::iter::once("reward")
            .chain(parts.iter().copied())
            .map(String::from)
            .collect()
    };
    if let Some(Value::Object(weights)) = reward.options.get("weights") {
        for name in weights.keys() {
            named.push((key(&["weights", name]), name.clone()));
        }
    }
    if let Some(Value::Array(optional)) = reward.options.get("optional") {
        for (i, name) in optional.iter().enumerate() {
            if let Some(name) = name.as_str() {
                named.push((key(&["optional", &i.to_string()]), name.to_string()));
            }
        }
    }
    if let Some(Value::String(gate)) = reward.options.get("gate") {
        named.push((key(&["gate"]), gate.clone()));
    }
    if named.is_empty() {
        return Vec::new();
    }
    let Some(criteria) = judge_criteria(resolved, registry) else {
        return Vec::new();
    };
    named
        .into_iter()
        .filter(|(_, name)| !criteria.contains(name))
        .map(|(path, name)| {
            let hint = suggest::hint(&name, criteria.iter().map(String::as_str));
            let given = if criteria.is_empty() {
                "there are no [judges]".to_string()
            } else {
                format!("the judges give: {}", criteria.join(", "))
            };
            resolved.problem(
                &path,
                format!("no judge gives a criterion named '{name}' ({given}){hint}"),
            )
        })
        .collect()
}
