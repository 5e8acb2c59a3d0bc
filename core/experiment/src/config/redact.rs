//! What a run records of its configuration (`config.toml` in the run directory, the W&B config)
//! leaves credentials out: a key pasted into an endpoint URL or an `extra_body` table would
//! otherwise be copied into every run directory and uploaded with every W&B run. Keys belong in
//! the environment variable that `api_key_env` names.

use super::Experiment;
use serde_json::Value;

/// Replaces whatever was removed.
pub const REDACTED: &str = "REDACTED";

/// Names of settings that hold credentials (compared in lower case, as parts of the name).
const SECRET_PARTS: &[&str] = &[
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "credential",
    "signature",
];

fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARTS.iter().any(|part| name.contains(part))
}

/// `scheme://user:password@host/...?api_key=...` without the user information and the values
/// of credential-like query parameters.
fn redact_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("{REDACTED}@{host}"),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        None => tail.to_string(),
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, format!("#{f}")),
                None => (query, String::new()),
            };
            let params: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if secret_name(name) => format!("{name}={REDACTED}"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}{fragment}", params.join("&"))
        }
    };
    let redacted = format!("{scheme}://{host}{tail}");
    (redacted != url).then_some(redacted)
}

fn walk(value: &mut Value, in_body: bool) {
    match value {
        Value::String(text) => {
            if let Some(clean) = redact_url(text) {
                *text = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk(v, in_body)),
        Value::Object(map) => {
            for (name, v) in map.iter_mut() {
                if in_body && secret_name(name) && !v.is_object() && !v.is_array() {
                    *v = Value::String(REDACTED.into());
                } else {
                    walk(v, in_body || name == "extra_body" || name == "headers");
                }
            }
        }
        _ => {}
    }
}

/// `value` (a configuration as JSON) without credentials.
pub fn redact_value(value: &mut Value) {
    walk(value, false);
}

/// The configuration as a run records it: credentials in URLs and in `extra_body` and
/// `headers` tables replaced by `REDACTED`.
pub fn redacted(experiment: &Experiment) -> Experiment {
    let Ok(mut value) = serde_json::to_value(experiment) else {
        return experiment.clone();
    };
    redact_value(&mut value);
    serde_json::from_value(value).unwrap_or_else(|_| experiment.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_user_information_and_key_parameters() {
        assert_eq!(
            redact_url("https://me:s3cret@api.example.com/v1?api_key=abc&model=x#top").unwrap(),
            "https://REDACTED@api.example.com/v1?api_key=REDACTED&model=x#top"
        );
        assert_eq!(redact_url("http://127.0.0.1:8080/v1"), None);
        assert_eq!(redact_url("not a url"), None);
    }

    #[test]
    fn a_recorded_configuration_holds_no_credential() {
        let mut e = Experiment::default();
        let table: super::super::PluginTable = serde_json::from_value(serde_json::json!({
            "type": "llm-pointwise",
            "endpoints": ["https://user:hunter2@judge.example/v1", "http://127.0.0.1:1/v1"],
            "extra_body": {"api_key": "hunter2", "top_k": 5, "auth": {"token": "hunter2"}},
            "api_key_env": "JUDGE_KEY",
        }))
        .unwrap();
        e.judges.insert("safety".into(), table);
        let text = super::super::to_toml(&redacted(&e));
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("http://127.0.0.1:1/v1") && text.contains("top_k = 5"),
            "{text}"
        );
        // The name of the environment variable is not a secret.
        assert!(text.contains("JUDGE_KEY"), "{text}");
    }
}
