//! The connection to OpenAI-compatible LLM servers (llama.cpp, vLLM, hosted APIs), shared by
//! the LLM judges and the rewriter.
//!
//! The plugin traits are synchronous batch calls; inside, a batch runs concurrently on a small
//! tokio runtime the client owns, with reqwest over rustls (no OpenSSL). Async tasks make the
//! deadline exact: when a batch's overall deadline passes, its unfinished requests are dropped,
//! which closes their connections and frees their concurrency slots at once, so a stalled
//! server never holds up the training step or the next batch.
//!
//! Per request: a concurrency slot (semaphore), a requests-per-minute slot, the least busy
//! healthy endpoint, a timeout no later than the batch deadline, and retries with capped,
//! jittered exponential backoff only on connection errors, 429 (honouring `Retry-After`) and
//! 5xx. Answers are cached by content ([`super::cache`]) before any request is made.

use super::cache::{self, Cache, Entry};
use super::parse::TokenLogprobs;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Which OpenAI-style endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST {endpoint}/chat/completions` with messages (the server applies the chat template).
    #[default]
    Chat,
    /// `POST {endpoint}/completions` with one prompt string.
    Completion,
}

/// An API key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything about the connection, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub model: String,
    pub api: Api,
    pub api_key: Option<Secret>,
    pub concurrency: usize,
    pub requests_per_minute: f64,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub deadline: Duration,
    pub max_retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
    /// Seed of the run; request seeds are derived from it and the request's content.
    pub seed: u64,
    pub send_seed: bool,
    /// Ask for this many top log-probs per token (None: no log-probs).
    pub top_logprobs: Option<u32>,
    pub extra_body: BTreeMap<String, Value>,
    pub cache: Option<Cache>,
    pub cache_per_seed: bool,
}

/// One request to make: the rendered prompt and which sample it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub system: Option<String>,
    pub user: String,
    /// Text the answer is made to start with: a trailing assistant message (chat; servers that
    /// support prefill continue it) or text after the prompt (completion).
    pub answer_prefix: Option<String>,
    /// Sample index: each is cached and seeded separately.
    pub sample: u32,
}

/// What the server generated.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub logprobs: Option<Vec<TokenLogprobs>>,
    pub cached: bool,
}

/// Cumulative counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_write_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub deadline_misses: AtomicU64,
    pub connection_errors: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub http_errors: AtomicU64,
    pub bad_responses: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub micros: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn fill(&self, out: &mut BTreeMap<String, f64>) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        for (name, c) in [
            ("requests", &self.requests),
            ("retries", &self.retries),
            ("cache_hits", &self.cache_hits),
            ("cache_misses", &self.cache_misses),
            ("cache_write_errors", &self.cache_write_errors),
            ("timeouts", &self.timeouts),
            ("deadline_misses", &self.deadline_misses),
            ("connection_errors", &self.connection_errors),
            ("rate_limited", &self.rate_limited),
            ("server_errors", &self.server_errors),
            ("http_errors", &self.http_errors),
            ("bad_responses", &self.bad_responses),
            ("prompt_tokens", &self.prompt_tokens),
            ("completion_tokens", &self.completion_tokens),
        ] {
            out.insert(name.to_string(), get(c));
        }
        out.insert("seconds".into(), get(&self.micros) / 1e6);
    }
}

struct Endpoint {
    url: String,
    in_flight: AtomicUsize,
    /// After a retryable failure the endpoint is avoided until then (when others are healthy).
    cool_until: Mutex<Option<Instant>>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    settings: Settings,
    /// Part of every cache key: templates and anything else the plugin's answers depend on.
    key_extra: Value,
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    round_robin: AtomicUsize,
    slots: Semaphore,
    next_slot: Mutex<Option<Instant>>,
    jitter: AtomicU64,
    stats: Arc<Stats>,
}

/// A client with its own runtime. Cheap to share by reference across threads.
pub struct Client {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // Never block (or panic) when dropped from inside some other async context.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A failed attempt: whether to try again, and after how long the server asked us to wait.
struct AttemptError {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn endpoint_url(base: &str, api: Api) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/chat/completions") || base.ends_with("/completions") {
        return base.to_string();
    }
    match api {
        Api::Chat => format!("{base}/chat/completions"),
        Api::Completion => format!("{base}/completions"),
    }
}

/// The error and its causes, on one line (reqwest's own message is terse).
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(160).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}

impl Client {
    pub fn new(settings: Settings, key_extra: Value) -> Result<Client, String> {
        if settings.endpoints.is_empty() {
            return Err("endpoints: give at least one server URL".into());
        }
        for url in &settings.endpoints {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| format!("endpoints: '{url}': {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("endpoints: '{url}' is not an http(s) URL"));
            }
        }
        if settings.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if !(settings.requests_per_minute >= 0.0 && settings.requests_per_minute.is_finite()) {
            return Err("requests_per_minute must be 0 (no limit) or a positive number".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("sipt/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", describe(&e)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sipt-llm")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the LLM client runtime: {e}"))?;
        let endpoints = settings
            .endpoints
            .iter()
            .map(|u| Endpoint {
                url: endpoint_url(u, settings.api),
                in_flight: AtomicUsize::new(0),
                cool_until: Mutex::new(None),
            })
            .collect();
        let jitter = AtomicU64::new(splitmix(settings.seed ^ 0x6a69_7474_6572));
        Ok(Client {
            inner: Arc::new(Inner {
                slots: Semaphore::new(settings.concurrency),
                settings,
                key_extra,
                http,
                endpoints,
                round_robin: AtomicUsize::new(0),
                next_slot: Mutex::new(None),
                jitter,
                stats: Arc::new(Stats::default()),
            }),
            runtime: Some(runtime),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Run a future to completion on the client's runtime, also when called from a thread that
    /// is itself inside some tokio runtime (then from a helper thread).
    fn block_on<F: Future + Send>(&self, future: F) -> F::Output
    where
        F::Output: Send,
    {
        let rt = self.runtime.as_ref().expect("runtime present until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| rt.block_on(future))
                    .join()
                    .expect("LLM client thread panicked")
            })
        } else {
            rt.block_on(future)
        }
    }

    /// Answer every job, concurrently, within the batch deadline. Identical jobs are asked once.
    pub fn run(&self, jobs: &[Job]) -> Vec<Result<Answer, String>> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let mut unique: Vec<(String, Value)> = Vec::new();
        let mut index_of: HashMap<String, usize> = HashMap::new();
        let slot: Vec<usize> = jobs
            .iter()
            .map(|job| {
                let (key, body) = inner.request_for(job);
                *index_of.entry(key.clone()).or_insert_with(|| {
                    unique.push((key, body));
                    unique.len() - 1
                })
            })
            .collect();
        let deadline_len = inner.settings.deadline;
        let results: Vec<Result<Answer, String>> = self.block_on(async {
            let deadline = Instant::now() + deadline_len;
            let handles: Vec<_> = unique
                .into_iter()
                .map(|(key, body)| {
                    let inner = Arc::clone(inner);
                    tokio::spawn(async move {
                        match tokio::time::timeout_at(deadline, inner.fetch(&key, &body, deadline))
                            .await
                        {
                            Ok(result) => result,
                            Err(_) => {
                                add(&inner.stats.deadline_misses, 1);
                                Err(format!(
                                    "no answer before the batch deadline ({:.1}s)",
                                    deadline_len.as_secs_f64()
                                ))
                            }
                        }
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(handles.len());
            for handle in handles {
                // Every task ends by the deadline; the margin only guards against a task stuck
                // outside the runtime's control.
                let abort = handle.abort_handle();
                match tokio::time::timeout_at(deadline + Duration::from_secs(2), handle).await {
                    Ok(Ok(result)) => out.push(result),
                    Ok(Err(e)) => out.push(Err(format!("request task failed: {e}"))),
                    Err(_) => {
                        abort.abort();
                        add(&inner.stats.deadline_misses, 1);
                        out.push(Err("no answer before the batch deadline".into()));
                    }
                }
            }
            out
        });
        add(&inner.stats.micros, started.elapsed().as_micros() as u64);
        slot.into_iter().map(|i| results[i].clone()).collect()
    }
}

impl Inner {
    /// The cache key and the request body (without its seed) of a job.
    fn request_for(&self, job: &Job) -> (String, Value) {
        let s = &self.settings;
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!(s.model));
        match s.api {
            Api::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &job.system {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": job.user}));
                if let Some(prefix) = &job.answer_prefix {
                    messages.push(json!({"role": "assistant", "content": prefix}));
                }
                body.insert("messages".into(), Value::Array(messages));
                if let Some(k) = s.top_logprobs {
                    body.insert("logprobs".into(), json!(true));
                    body.insert("top_logprobs".into(), json!(k));
                }
            }
            Api::Completion => {
                let mut prompt = String::new();
                if let Some(system) = &job.system {
                    prompt.push_str(system);
                    prompt.push_str("\n\n");
                }
                prompt.push_str(&job.user);
                if let Some(prefix) = &job.answer_prefix {
                    prompt.push_str("\n\n");
                    prompt.push_str(prefix);
                }
                body.insert("prompt".into(), json!(prompt));
                if let Some(k) = s.top_logprobs {
                    body.insert("logprobs".into(), json!(k));
                }
            }
        }
        body.insert("temperature".into(), json!(s.temperature));
        body.insert("top_p".into(), json!(s.top_p));
        body.insert("max_tokens".into(), json!(s.max_tokens));
        body.insert("stream".into(), json!(false));
        for (k, v) in &s.extra_body {
            body.insert(k.clone(), v.clone());
        }
        let body = Value::Object(body);
        let material = json!({
            "api": match s.api { Api::Chat => "chat", Api::Completion => "completion" },
            "body": body,
            "sample": job.sample,
            "plugin": self.key_extra,
            "seed": if s.cache_per_seed { Some(s.seed) } else { None },
        });
        (cache::key(&material), body)
    }

    async fn fetch(&self, key: &str, body: &Value, deadline: Instant) -> Result<Answer, String> {
        if let Some(cache) = &self.settings.cache {
            if let Some(entry) = cache.get(key) {
                add(&self.stats.cache_hits, 1);
                return Ok(Answer {
                    text: entry.text,
                    logprobs: entry.logprobs,
                    cached: true,
                });
            }
            add(&self.stats.cache_misses, 1);
        }
        let mut body = body.clone();
        if self.settings.send_seed {
            // Derived from the run seed and the content, so each sample index gets its own seed
            // and a rerun asks for exactly the same draws.
            let from_key = u64::from_str_radix(&key[..16], 16).unwrap_or(0);
            let seed = splitmix(self.settings.seed ^ from_key) & 0x7FFF_FFFF;
            body["seed"] = json!(seed);
        }
        let answer = self.request(&body, deadline).await?;
        if let Some(cache) = &self.settings.cache {
            let entry = Entry {
                text: answer.text.clone(),
                logprobs: answer.logprobs.clone(),
            };
            if cache.put(key, &entry).is_err() {
                add(&self.stats.cache_write_errors, 1);
            }
        }
        Ok(answer)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let s = &self.settings;
        let full = s
            .backoff_initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(s.backoff_max);
        // Equal jitter: half fixed, half random, so retries from many requests spread out.
        let r = splitmix(self.jitter.fetch_add(0x9E37_79B9, Ordering::Relaxed));
        let fraction = (r >> 11) as f64 / (1u64 << 53) as f64;
        full.mul_f64(0.5 + 0.5 * fraction)
    }

    /// The least busy endpoint that is not cooling down (any, if all are); `avoid` is skipped
    /// when another choice exists.
    fn pick(&self, avoid: Option<usize>) -> usize {
        let now = Instant::now();
        let n = self.endpoints.len();
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let healthy = |i: usize| {
            self.endpoints[i]
                .cool_until
                .lock()
                .map(|c| match *c {
                    Some(t) => t <= now,
                    None => true,
                })
                .unwrap_or(true)
        };
        let order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        let mut candidates: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| healthy(i) && Some(i) != avoid)
            .collect();
        if candidates.is_empty() {
            candidates = order
                .iter()
                .copied()
                .filter(|&i| Some(i) != avoid)
                .collect();
        }
        if candidates.is_empty() {
            candidates = order;
        }
        candidates
            .into_iter()
            .min_by_key(|&i| self.endpoints[i].in_flight.load(Ordering::Relaxed))
            .expect("at least one endpoint")
    }

    /// Wait for a requests-per-minute slot (requests are spaced evenly).
    async fn rate_slot(&self) {
        let rpm = self.settings.requests_per_minute;
        if rpm <= 0.0 {
            return;
        }
        let interval = Duration::from_secs_f64(60.0 / rpm);
        let at = {
            let mut next = self.next_slot.lock().expect("rate limiter lock");
            let now = Instant::now();
            let at = next.map_or(now, |n| n.max(now));
            *next = Some(at + interval);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    async fn request(&self, body: &Value, deadline: Instant) -> Result<Answer, String> {
        let s = &self.settings;
        let mut attempt = 0u32;
        let mut last: Option<usize> = None;
        loop {
            let permit = self
                .slots
                .acquire()
                .await
                .map_err(|_| "the client is shutting down".to_string())?;
            self.rate_slot().await;
            let e = self.pick(last);
            add(&self.stats.requests, 1);
            if attempt > 0 {
                add(&self.stats.retries, 1);
            }
            let outcome = {
                let endpoint = &self.endpoints[e];
                endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
                let _guard = InFlight(&endpoint.in_flight);
                self.attempt(&endpoint.url, body).await
            };
            drop(permit);
            let error = match outcome {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            if !error.retryable {
                return Err(error.message);
            }
            if attempt >= s.max_retries {
                return Err(format!(
                    "{} (gave up after {} attempts)",
                    error.message,
                    attempt + 1
                ));
            }
            let delay = match error.retry_after {
                Some(after) => after.min(s.backoff_max),
                None => self.backoff(attempt),
            };
            if Instant::now() + delay >= deadline {
                return Err(format!(
                    "{}; no time left before the deadline to retry",
                    error.message
                ));
            }
            if let Ok(mut cool) = self.endpoints[e].cool_until.lock() {
                *cool = Some(Instant::now() + delay);
            }
            last = Some(e);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, url: &str, body: &Value) -> Result<Answer, AttemptError> {
        let s = &self.settings;
        // The batch deadline is enforced around the whole task (the request is dropped then);
        // this is the per-request limit.
        let timeout = s.request_timeout;
        let mut request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(timeout)
            .body(body.to_string());
        if let Some(key) = &s.api_key {
            request = request.bearer_auth(&key.0);
        }
        let transport = |e: reqwest::Error, stats: &Stats| {
            if e.is_timeout() {
                add(&stats.timeouts, 1);
                AttemptError {
                    message: format!("request timed out after {:.1}s", timeout.as_secs_f64()),
                    retryable: false,
                    retry_after: None,
                }
            } else if e.is_connect() || e.is_request() || e.is_body() {
                add(&stats.connection_errors, 1);
                AttemptError {
                    message: format!("connection error: {}", describe(&e)),
                    retryable: true,
                    retry_after: None,
                }
            } else {
                AttemptError {
                    message: format!("request failed: {}", describe(&e)),
                    retryable: false,
                    retry_after: None,
                }
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport(e, &self.stats))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|secs| secs.is_finite() && *secs >= 0.0)
            .map(Duration::from_secs_f64);
        let text = response
            .text()
            .await
            .map_err(|e| transport(e, &self.stats))?;
        if status.as_u16() == 429 {
            add(&self.stats.rate_limited, 1);
            return Err(AttemptError {
                message: format!("rate limited (HTTP 429): {}", snippet(&text)),
                retryable: true,
                retry_after,
            });
        }
        if status.is_server_error() {
            add(&self.stats.server_errors, 1);
            return Err(AttemptError {
                message: format!(
                    "server error (HTTP {}): {}",
                    status.as_u16(),
                    snippet(&text)
                ),
                retryable: true,
                retry_after,
            });
        }
        if !status.is_success() {
            add(&self.stats.http_errors, 1);
            return Err(AttemptError {
                message: format!("HTTP {}: {}", status.as_u16(), snippet(&text)),
                retryable: false,
                retry_after: None,
            });
        }
        self.read_answer(&text).map_err(|message| {
            add(&self.stats.bad_responses, 1);
            AttemptError {
                message,
                retryable: false,
                retry_after: None,
            }
        })
    }

    /// The generated text (and log-probs) of an OpenAI-style response.
    fn read_answer(&self, text: &str) -> Result<Answer, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("malformed response ({e}): {}", snippet(text)))?;
        let choice = value
            .get("choices")
            .and_then(|c| c.get(0))
            .ok_or_else(|| format!("response has no choices: {}", snippet(text)))?;
        let generated = match self.settings.api {
            Api::Chat => choice.pointer("/message/content").and_then(Value::as_str),
            Api::Completion => choice.get("text").and_then(Value::as_str),
        }
        .ok_or_else(|| format!("response has no generated text: {}", snippet(text)))?;
        if let Some(usage) = value.get("usage") {
            let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
            add(&self.stats.prompt_tokens, n("prompt_tokens"));
            add(&self.stats.completion_tokens, n("completion_tokens"));
        }
        let logprobs = if self.settings.top_logprobs.is_some() {
            choice.get("logprobs").and_then(read_logprobs)
        } else {
            None
        };
        Ok(Answer {
            text: generated.to_string(),
            logprobs,
            cached: false,
        })
    }
}

/// Token log-probs in either OpenAI layout: `{content: [{token, logprob, top_logprobs}]}` (chat,
/// and llama.cpp's completions) or the legacy `{tokens, token_logprobs, top_logprobs}`.
fn read_logprobs(value: &Value) -> Option<Vec<TokenLogprobs>> {
    let with_chosen = |token: String, logprob: Option<f64>, mut top: Vec<(String, f64)>| {
        if let Some(lp) = logprob {
            if !top.iter().any(|(t, _)| *t == token) {
                top.push((token.clone(), lp));
            }
        }
        TokenLogprobs { token, top }
    };
    if let Some(content) = value.get("content").and_then(Value::as_array) {
        return content
            .iter()
            .map(|t| {
                let token = t.get("token")?.as_str()?.to_string();
                let top = t
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .map(|alts| {
                        alts.iter()
                            .filter_map(|a| {
                                Some((
                                    a.get("token")?.as_str()?.to_string(),
                                    a.get("logprob")?.as_f64()?,
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(with_chosen(
                    token,
                    t.get("logprob").and_then(Value::as_f64),
                    top,
                ))
            })
            .collect();
    }
    let tokens = value.get("tokens")?.as_array()?;
    let chosen = value.get("token_logprobs").and_then(Value::as_array);
    let tops = value.get("top_logprobs").and_then(Value::as_array);
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = t.as_str()?.to_string();
            let top = tops
                .and_then(|a| a.get(i))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            let lp = chosen.and_then(|c| c.get(i)).and_then(Value::as_f64);
            Some(with_chosen(token, lp, top))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            endpoint_url("http://h:1/v1/", Api::Chat),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            endpoint_url("http://h:1/v1", Api::Completion),
            "http://h:1/v1/completions"
        );
        assert_eq!(
            endpoint_url("http://h/x/completions", Api::Chat),
            "http://h/x/completions"
        );
    }

    #[test]
    fn both_logprob_layouts() {
        let chat = json!({"content": [
            {"token": " YES", "logprob": -0.1, "top_logprobs": [{"token": " NO", "logprob": -2.0}]}
        ]});
        let t = read_logprobs(&chat).unwrap();
        assert_eq!(t[0].token, " YES");
        assert_eq!(
            t[0].top.len(),
            2,
            "the chosen token is added to its alternatives"
        );
        let legacy = json!({"tokens": ["A", " 1"], "token_logprobs": [-0.5, -0.2],
                            "top_logprobs": [{"A": -0.5}, {" 1": -0.2, " 2": -1.7}]});
        let t = read_logprobs(&legacy).unwrap();
        assert_eq!(t[1].top.len(), 2);
        assert_eq!(t[1].token, " 1");
    }
}
