//! Test helpers for the LLM plugins: a loopback stand-in for an OpenAI-compatible server whose
//! behaviour each test scripts (answers, errors, stalls, dropped connections), and builders.

#![allow(dead_code)]

use serde_json::{json, Value};
use sipt_api::{FromConfig, PluginContext};
use sipt_plugins::llm::{pairwise, pointwise, rewriter};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// No stand-in outlives this, whatever a test does.
const MAX_LIFETIME: Duration = Duration::from_secs(120);

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Request {
    pub index: usize,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The whole prompt: chat messages joined, or the completion prompt.
    pub fn prompt(&self) -> String {
        let v = self.json();
        if let Some(p) = v["prompt"].as_str() {
            return p.to_string();
        }
        v["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|x| x["content"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

/// What the stand-in does with a request.
pub enum Action {
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Hold the connection without answering for this long, then close it.
    Stall(Duration),
    /// Close the connection without answering.
    Drop,
}

pub fn ok(body: String) -> Action {
    Action::Reply {
        status: 200,
        headers: vec![],
        body,
    }
}

pub fn status(code: u16, headers: &[(&str, &str)]) -> Action {
    Action::Reply {
        status: code,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: json!({"error": {"message": format!("status {code}")}}).to_string(),
    }
}

/// An OpenAI chat completion answering `text`.
pub fn chat_reply(text: &str) -> String {
    json!({
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
    })
    .to_string()
}

/// An OpenAI (legacy) text completion answering `text`, with `logprobs` if given.
pub fn completion_reply(text: &str, logprobs: Option<Value>) -> String {
    let mut choice = json!({"index": 0, "finish_reason": "stop", "text": text});
    if let Some(lp) = logprobs {
        choice["logprobs"] = lp;
    }
    json!({"object": "text_completion", "choices": [choice]}).to_string()
}

type Handler = dyn Fn(&Request) -> Action + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    connections: AtomicUsize,
    started: Instant,
    handler: Box<Handler>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.started.elapsed() > MAX_LIFETIME
    }
}

/// A scripted HTTP/1.1 server on 127.0.0.1.
pub struct StandIn {
    pub base: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StandIn {
    pub fn start(handler: impl Fn(&Request) -> Action + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            started: Instant::now(),
            handler: Box::new(handler),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            while !s.stopping() {
                match listener.accept() {
                    Ok((stream, _)) => {
                        s.connections.fetch_add(1, Ordering::Relaxed);
                        let s = Arc::clone(&s);
                        std::thread::spawn(move || serve(stream, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        StandIn {
            base,
            shared,
            accept: Some(accept),
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Path, headers and body of a request as read from the wire.
type RawRequest = (String, Vec<(String, String)>, String);

/// Read one request (headers and a Content-Length body); None when the peer closed or the
/// server stops.
fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>, s: &Shared) -> Option<RawRequest> {
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if s.stopping() || buffer.len() > 4 << 20 {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        if s.stopping() {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    let body = String::from_utf8_lossy(&buffer[header_end..header_end + length]).to_string();
    buffer.drain(..header_end + length);
    Some((path, headers, body))
}

fn serve(mut stream: TcpStream, s: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buffer = Vec::new();
    // Keep-alive: several requests per connection, a bounded number.
    for _ in 0..10_000 {
        let Some((path, headers, body)) = read_request(&mut stream, &mut buffer, s) else {
            return;
        };
        let request = {
            let mut all = s.requests.lock().unwrap();
            let r = Request {
                index: all.len(),
                path,
                headers,
                body,
                at: Instant::now(),
            };
            all.push(r.clone());
            r
        };
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let action = (s.handler)(&request);
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        match action {
            Action::Reply {
                status,
                headers,
                body,
            } => {
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                head.push_str(&body);
                // One write: no Nagle delay between head and body.
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
            }
            Action::Stall(d) => {
                let until = Instant::now() + d;
                while Instant::now() < until && !s.stopping() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return;
            }
            Action::Drop => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// A loopback URL nothing listens on (connections are refused).
pub fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

/// A fresh cache folder and the plugin context using it.
pub fn context() -> (tempfile::TempDir, PluginContext) {
    let dir = tempfile::tempdir().unwrap();
    let context = PluginContext {
        seed: 7,
        assets_dir: None,
        config_dir: Some(dir.path().display().to_string()),
        cache_dir: Some(dir.path().display().to_string()),
        ranks: 1,
    };
    (dir, context)
}

/// Fast-failing connection settings for `base` merged with `extra`.
pub fn config(endpoints: &[&str], extra: Value) -> Value {
    let mut c = json!({
        "endpoints": endpoints,
        "model": "stand-in",
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "request_timeout_s": 10.0,
        "deadline_s": 30.0,
        "max_retries": 2,
        "samples": 1,
    });
    for (k, v) in extra.as_object().expect("an object of options") {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

pub fn build<T: FromConfig>(config: &Value, context: &PluginContext) -> Result<T, String> {
    let c = sipt_api::check_config::<T::Config>(config).map_err(|p| format!("{p:?}"))?;
    T::from_config(c, context)
}

pub fn pointwise_judge(config: &Value, context: &PluginContext) -> pointwise::LlmPointwise {
    build(config, context).unwrap_or_else(|e| panic!("cannot build llm-pointwise: {e}"))
}

pub fn pairwise_judge(config: &Value, context: &PluginContext) -> pairwise::LlmPairwise {
    build(config, context).unwrap_or_else(|e| panic!("cannot build llm-pairwise: {e}"))
}

pub fn rewriter(config: &Value, context: &PluginContext) -> rewriter::LlmRewriter {
    build(config, context).unwrap_or_else(|e| panic!("cannot build llm-rewriter: {e}"))
}

pub fn counter(c: &sipt_api::Counters, name: &str) -> f64 {
    *c.get(name)
        .unwrap_or_else(|| panic!("no counter '{name}' in {c:?}"))
}
