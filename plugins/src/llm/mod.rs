//! LLM judges and rewriter: the paper's judges and rewriter, served by any OpenAI-compatible
//! server (llama.cpp, vLLM, hosted APIs).
//!
//! - `llm-pointwise`: safety (`FINAL DECISION: YES/NO`) or factuality against the reference
//!   suffix (JSON label: no hallucination 1, possible 0.5, definite 0);
//! - `llm-pairwise`: quality (`Conclusion: Option 1/2`), with position-bias control;
//! - `llm-rewriter`: rewrites the original suffix (safer, factual, same length).
//!
//! All three share the connection keys (endpoints, concurrency, rate limit, deadlines, retries),
//! the sampling keys, the persistent answer cache and the prompt templates; see [`Connection`].
//! Prompts default to the paper's designs in our own words ([`prompts`]) and can be replaced with
//! `prompt` / `prompt_file` and `system` / `system_file`, using named placeholders.

use sipt_api::{Failure, PluginContext};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Declares a plugin's config struct: its own fields followed by the shared ones, flat in the
/// plugin's table (so unknown keys are still rejected and listed for suggestions).
macro_rules! llm_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            /// Base URLs of OpenAI-compatible servers, e.g. "http://127.0.0.1:8080/v1". Several
            /// are load-balanced (least busy first; failing ones are avoided for a while).
            pub endpoints: Vec<String>,
            /// Model name sent to the servers; part of the cache key.
            pub model: String,
            /// "chat" (messages; the server applies the chat template) or "completion".
            #[serde(default)]
            pub api: $crate::llm::client::Api,
            /// Name of an environment variable holding the API key (sent as a bearer token).
            #[serde(default)]
            pub api_key_env: Option<String>,
            /// Requests in flight at once, over all endpoints (for the whole job: each of N ranks
            /// keeps 1/N, rounded up).
            #[serde(default = "crate::llm::defaults::concurrency")]
            pub concurrency: usize,
            /// Requests started per minute, over all endpoints (0: no limit; for the whole job).
            #[serde(default)]
            pub requests_per_minute: f64,
            /// Limit of one request, in seconds.
            #[serde(default = "crate::llm::defaults::request_timeout_s")]
            pub request_timeout_s: f64,
            /// Limit on opening a connection, in seconds.
            #[serde(default = "crate::llm::defaults::connect_timeout_s")]
            pub connect_timeout_s: f64,
            /// Overall limit of one batch call, in seconds: what is unfinished then fails.
            #[serde(default = "crate::llm::defaults::deadline_s")]
            pub deadline_s: f64,
            /// Retries after connection errors, HTTP 429 and 5xx (never after other errors).
            #[serde(default = "crate::llm::defaults::max_retries")]
            pub max_retries: u32,
            /// First retry delay in seconds; it doubles per retry, with jitter, up to
            /// `backoff_max_s` (which also caps a server's Retry-After).
            #[serde(default = "crate::llm::defaults::backoff_initial_s")]
            pub backoff_initial_s: f64,
            #[serde(default = "crate::llm::defaults::backoff_max_s")]
            pub backoff_max_s: f64,
            /// Sampling temperature (judges 1.0, rewriter 0.0 by default).
            #[serde(default)]
            pub temperature: Option<f64>,
            /// Nucleus sampling (judges 0.6, rewriter 1.0 by default).
            #[serde(default)]
            pub top_p: Option<f64>,
            /// Most tokens to generate (judges 512, rewriter 384 by default).
            #[serde(default)]
            pub max_tokens: Option<u32>,
            /// Seed of the request seeds (default: the experiment's seed).
            #[serde(default)]
            pub seed: Option<u64>,
            /// Send a `seed` with each request (derived from the seed and the request content).
            #[serde(default = "crate::llm::defaults::yes")]
            pub send_seed: bool,
            /// More fields for the request body (e.g. `{ repeat_penalty = 1.1 }`); part of the
            /// cache key.
            #[serde(default)]
            pub extra_body: std::collections::BTreeMap<String, serde_json::Value>,
            /// Keep answers in the persistent cache and reuse them.
            #[serde(default = "crate::llm::defaults::yes")]
            pub cache: bool,
            /// Cache folder (default: `llm/` in the run's shared cache folder).
            #[serde(default)]
            pub cache_dir: Option<String>,
            /// Put the seed in the cache key (default: runs with other seeds share answers).
            #[serde(default)]
            pub cache_per_seed: bool,
            /// The user message template, inline.
            #[serde(default)]
            pub prompt: Option<String>,
            /// The user message template, from a file (relative to the experiment file).
            #[serde(default)]
            pub prompt_file: Option<String>,
            /// The system message template, inline ("" for none).
            #[serde(default)]
            pub system: Option<String>,
            /// The system message template, from a file.
            #[serde(default)]
            pub system_file: Option<String>,
            /// Keep at most this many characters of the end of the prefix (0: all).
            #[serde(default = "crate::llm::defaults::max_prefix_chars")]
            pub max_prefix_chars: usize,
        }

        impl $name {
            pub(crate) fn connection(&self) -> $crate::llm::Connection {
                $crate::llm::Connection {
                    endpoints: self.endpoints.clone(),
                    model: self.model.clone(),
                    api: self.api,
                    api_key_env: self.api_key_env.clone(),
                    concurrency: self.concurrency,
                    requests_per_minute: self.requests_per_minute,
                    request_timeout_s: self.request_timeout_s,
                    connect_timeout_s: self.connect_timeout_s,
                    deadline_s: self.deadline_s,
                    max_retries: self.max_retries,
                    backoff_initial_s: self.backoff_initial_s,
                    backoff_max_s: self.backoff_max_s,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    max_tokens: self.max_tokens,
                    seed: self.seed,
                    send_seed: self.send_seed,
                    extra_body: self.extra_body.clone(),
                    cache: self.cache,
                    cache_dir: self.cache_dir.clone(),
                    cache_per_seed: self.cache_per_seed,
                    prompt: self.prompt.clone(),
                    prompt_file: self.prompt_file.clone(),
                    system: self.system.clone(),
                    system_file: self.system_file.clone(),
                    max_prefix_chars: self.max_prefix_chars,
                }
            }
        }
    };
}

pub mod cache;
pub mod client;
pub mod pairwise;
pub mod parse;
pub mod pointwise;
pub mod prompts;
pub mod rewriter;
pub mod template;

pub(crate) mod defaults {
    pub fn concurrency() -> usize {
        8
    }
    pub fn request_timeout_s() -> f64 {
        120.0
    }
    pub fn connect_timeout_s() -> f64 {
        10.0
    }
    pub fn deadline_s() -> f64 {
        900.0
    }
    pub fn max_retries() -> u32 {
        4
    }
    pub fn backoff_initial_s() -> f64 {
        0.5
    }
    pub fn backoff_max_s() -> f64 {
        30.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_prefix_chars() -> usize {
        6000
    }
    pub fn samples() -> u32 {
        5
    }
    pub fn min_samples() -> u32 {
        1
    }
    pub fn top_logprobs() -> u32 {
        10
    }
}

/// The keys every LLM plugin shares (see the config structs for their meaning).
#[derive(Debug, Clone)]
pub struct Connection {
    pub endpoints: Vec<String>,
    pub model: String,
    pub api: client::Api,
    pub api_key_env: Option<String>,
    pub concurrency: usize,
    pub requests_per_minute: f64,
    pub request_timeout_s: f64,
    pub connect_timeout_s: f64,
    pub deadline_s: f64,
    pub max_retries: u32,
    pub backoff_initial_s: f64,
    pub backoff_max_s: f64,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub send_seed: bool,
    pub extra_body: BTreeMap<String, serde_json::Value>,
    pub cache: bool,
    pub cache_dir: Option<String>,
    pub cache_per_seed: bool,
    pub prompt: Option<String>,
    pub prompt_file: Option<String>,
    pub system: Option<String>,
    pub system_file: Option<String>,
    pub max_prefix_chars: usize,
}

/// A plugin's sampling defaults.
pub struct SamplingDefaults {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
}

fn seconds(key: &str, value: f64) -> Result<Duration, String> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!(
            "{key} must be a positive number of seconds, got {value}"
        ))
    }
}

/// `$SIPT_CACHE`, else `$XDG_CACHE_HOME/sipt`, else `~/.cache/sipt` (as the engine uses).
fn cache_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("SIPT_CACHE") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return std::path::PathBuf::from(dir).join("sipt");
    }
    std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ".".into())
        .join(".cache")
        .join("sipt")
}

impl Connection {
    /// The checked client settings.
    pub fn settings(
        &self,
        defaults: SamplingDefaults,
        top_logprobs: Option<u32>,
        context: &PluginContext,
    ) -> Result<client::Settings, String> {
        let api_key = match &self.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => Some(client::Secret(key.trim().to_string())),
                _ => {
                    return Err(format!(
                        "api_key_env: the environment variable {var} is not set (or empty)"
                    ))
                }
            },
        };
        let ranks = context.ranks.max(1) as usize;
        let temperature = self.temperature.unwrap_or(defaults.temperature);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(format!("temperature must be 0 or more, got {temperature}"));
        }
        let top_p = self.top_p.unwrap_or(defaults.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {top_p}"));
        }
        let max_tokens = self.max_tokens.unwrap_or(defaults.max_tokens);
        if max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.model.trim().is_empty() {
            return Err("model: give the model name the servers serve".into());
        }
        let backoff_initial = seconds("backoff_initial_s", self.backoff_initial_s)?;
        let backoff_max = seconds("backoff_max_s", self.backoff_max_s)?;
        if backoff_max < backoff_initial {
            return Err("backoff_max_s must not be below backoff_initial_s".into());
        }
        let cache = if self.cache {
            let dir = match (&self.cache_dir, &context.cache_dir) {
                (Some(dir), _) => context.resolve(dir),
                (None, Some(dir)) => std::path::Path::new(dir).join("llm"),
                (None, None) => cache_root().join("judgments").join("llm"),
            };
            Some(cache::Cache::open(dir)?)
        } else {
            None
        };
        Ok(client::Settings {
            endpoints: self.endpoints.clone(),
            model: self.model.clone(),
            api: self.api,
            api_key,
            // The limits are the job's: in a job of N ranks (each with its own client), each
            // rank keeps 1/N of them, so N ranks load a server as one process would.
            concurrency: self.concurrency.div_ceil(ranks).max(1),
            requests_per_minute: self.requests_per_minute / ranks as f64,
            request_timeout: seconds("request_timeout_s", self.request_timeout_s)?,
            connect_timeout: seconds("connect_timeout_s", self.connect_timeout_s)?,
            deadline: seconds("deadline_s", self.deadline_s)?,
            max_retries: self.max_retries,
            backoff_initial,
            backoff_max,
            temperature,
            top_p,
            max_tokens,
            seed: self.seed.unwrap_or(context.seed),
            send_seed: self.send_seed,
            top_logprobs,
            extra_body: self.extra_body.clone(),
            cache,
            cache_per_seed: self.cache_per_seed,
        })
    }

    /// The user and system templates: the configured ones, else the defaults. An empty system
    /// template means no system message.
    pub fn templates(
        &self,
        default_prompt: String,
        default_system: &str,
        allowed: &[&str],
        required: &[&str],
        context: &PluginContext,
    ) -> Result<Messages, String> {
        let prompt = template::choose(
            "prompt",
            &self.prompt,
            &self.prompt_file,
            default_prompt,
            context,
        )?;
        let prompt =
            template::Template::parse(&prompt, allowed).map_err(|e| format!("prompt: {e}"))?;
        prompt.require("prompt", required)?;
        let system = template::choose(
            "system",
            &self.system,
            &self.system_file,
            default_system.to_string(),
            context,
        )?;
        let system = if system.trim().is_empty() {
            None
        } else {
            Some(template::Template::parse(&system, allowed).map_err(|e| format!("system: {e}"))?)
        };
        Ok(Messages { prompt, system })
    }
}

/// A plugin's user and (optional) system message templates.
pub struct Messages {
    prompt: template::Template,
    system: Option<template::Template>,
}

impl Messages {
    /// What identifies these messages in the answer cache, with the plugin's name.
    pub fn cache_key(&self, plugin: &str) -> serde_json::Value {
        serde_json::json!({
            "plugin": plugin,
            "prompt": self.prompt.source(),
            "system": self.system.as_ref().map(|s| s.source()),
        })
    }

    /// The rendered `(system, user)` messages. `reference` fills `{reference}`; a template
    /// that uses it when there is none is an error for this item.
    pub fn render<'a>(
        &self,
        mut values: BTreeMap<&'a str, &'a str>,
        reference: Option<&'a str>,
    ) -> Result<(Option<String>, String), String> {
        match reference {
            Some(r) => {
                values.insert("reference", r);
            }
            None => {
                if self.prompt.uses("reference")
                    || self.system.as_ref().is_some_and(|s| s.uses("reference"))
                {
                    return Err(
                        "the prompt needs the reference suffix, and the item has none".into(),
                    );
                }
            }
        }
        let system = self
            .system
            .as_ref()
            .map(|s| s.render(&values))
            .transpose()?;
        Ok((system, self.prompt.render(&values)?))
    }
}

/// The last `max_chars` characters of a prefix (all when 0), marked when cut.
pub fn clip_prefix(prefix: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    if max_chars == 0 {
        return prefix.into();
    }
    let count = prefix.chars().count();
    if count <= max_chars {
        return prefix.into();
    }
    let start = prefix
        .char_indices()
        .nth(count - max_chars)
        .map(|(i, _)| i)
        .unwrap_or(0);
    format!("...{}", &prefix[start..]).into()
}

/// Counts of outcomes, beside the client's request counters.
#[derive(Debug, Default)]
pub struct Tally {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub samples: AtomicU64,
    pub parse_failures: AtomicU64,
    pub request_failures: AtomicU64,
    pub logprob_decisions: AtomicU64,
}

impl Tally {
    /// A plugin's counters: its client's requests and these tallies.
    pub fn counters(&self, client: &client::Client) -> sipt_api::Counters {
        let mut out = sipt_api::Counters::new();
        client.stats().fill(&mut out);
        self.fill(&mut out);
        out
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn fill(&self, out: &mut BTreeMap<String, f64>) {
        for (name, c) in [
            ("calls", &self.calls),
            ("failures", &self.failures),
            ("samples", &self.samples),
            ("parse_failures", &self.parse_failures),
            ("request_failures", &self.request_failures),
            ("logprob_decisions", &self.logprob_decisions),
        ] {
            out.insert(name.into(), c.load(Ordering::Relaxed) as f64);
        }
    }
}

/// Reads the judge's answers to one item: each sample is a value, or why it has none.
pub(crate) fn read_samples(
    format: parse::Format,
    answer_prefix: Option<&str>,
    answers: impl Iterator<Item = Result<client::Answer, String>>,
    tally: &Tally,
) -> Vec<Result<f64, String>> {
    answers
        .map(|answer| {
            Tally::add(&tally.samples, 1);
            let answer = answer.inspect_err(|_| Tally::add(&tally.request_failures, 1))?;
            let (text, tokens) = with_prefix(answer_prefix, &answer);
            match format.decide(&text, tokens.as_deref()) {
                Some(d) => {
                    if d.from_logprobs {
                        Tally::add(&tally.logprob_decisions, 1);
                    }
                    Ok(d.value)
                }
                None => {
                    Tally::add(&tally.parse_failures, 1);
                    let shown: String = answer.text.chars().take(120).collect();
                    Err(format!("unparseable answer: {shown:?}"))
                }
            }
        })
        .collect()
}

/// The answer as the parser sees it: a forced answer prefix in front of what was generated.
fn with_prefix(
    prefix: Option<&str>,
    answer: &client::Answer,
) -> (String, Option<Vec<parse::TokenLogprobs>>) {
    match prefix {
        None => (answer.text.clone(), answer.logprobs.clone()),
        Some(p) => {
            let tokens = answer.logprobs.as_ref().map(|t| {
                let mut all = vec![parse::TokenLogprobs {
                    token: p.to_string(),
                    top: Vec::new(),
                }];
                all.extend(t.iter().cloned());
                all
            });
            (format!("{p}{}", answer.text), tokens)
        }
    }
}

/// The mean of the samples that have a value, when at least `min` do.
pub(crate) fn mean_of(samples: &[Result<f64, String>], min: usize) -> Result<f64, Failure> {
    let values: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.as_ref().ok().copied())
        .collect();
    if values.len() >= min.max(1) {
        return Ok(values.iter().sum::<f64>() / values.len() as f64);
    }
    let first = samples
        .iter()
        .find_map(|s| s.as_ref().err())
        .cloned()
        .unwrap_or_else(|| "no samples".into());
    Err(Failure::new(format!(
        "{} of {} samples failed (need {min}): {first}",
        samples.len() - values.len(),
        samples.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_prefix_from_the_end_on_char_boundaries() {
        assert_eq!(clip_prefix("abc", 0), "abc");
        assert_eq!(clip_prefix("abc", 5), "abc");
        assert_eq!(clip_prefix("aébcd", 3), "...bcd");
        assert_eq!(clip_prefix("abcdé", 2), "...dé");
    }

    #[test]
    fn a_job_of_several_ranks_shares_the_limits() {
        let config: pointwise::Config = serde_json::from_value(serde_json::json!({
            "endpoints": ["http://127.0.0.1:9/v1"], "model": "m", "cache": false, "criterion": "safety",
            "concurrency": 5, "requests_per_minute": 60.0,
        }))
        .unwrap();
        let defaults = || SamplingDefaults {
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 8,
        };
        let limits = |ranks: u32| {
            let context = PluginContext {
                ranks,
                ..PluginContext::default()
            };
            let s = config
                .connection()
                .settings(defaults(), None, &context)
                .unwrap();
            (s.concurrency, s.requests_per_minute)
        };
        assert_eq!(limits(0), (5, 60.0));
        assert_eq!(limits(1), (5, 60.0));
        assert_eq!(limits(2), (3, 30.0));
        assert_eq!(limits(8), (1, 7.5));
    }

    #[test]
    fn mean_needs_enough_parsed_samples() {
        let s = vec![Ok(1.0), Err("bad".to_string()), Ok(0.0)];
        assert_eq!(mean_of(&s, 1), Ok(0.5));
        assert_eq!(mean_of(&s, 2), Ok(0.5));
        let e = mean_of(&s, 3).unwrap_err();
        assert!(
            e.reason.contains("1 of 3") && e.reason.contains("bad"),
            "{e}"
        );
        assert!(mean_of(&[], 1).is_err());
    }
}
