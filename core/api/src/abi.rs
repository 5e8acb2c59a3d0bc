//! The C ABI between the `sipt` binary and external plugin libraries.
//!
//! A library exports three symbols (written by [`export_plugins!`](crate::export_plugins)):
//!
//! - `sipt_plugin_abi_version() -> u32`: checked before anything else;
//! - `sipt_plugin_call(request: *const c_char) -> *mut c_char`: one JSON [`Request`] in, one
//!   JSON [`Response`] out;
//! - `sipt_plugin_free(response: *mut c_char)`: gives the response back to the library's
//!   allocator.
//!
//! Requests carry the same batches as the traits, serialized, so a plugin behaves the same
//! built in or loaded. Panics inside the library are caught here and returned as errors.

use crate::{
    CandidateScores, ConfigProblem, Instance, PairwiseItem, PluginContext, PluginKind,
    PointwiseItem, Progress, RewriteItem, StepPlan,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// Bumped whenever the request or response shapes change.
pub const ABI_VERSION: u32 = 1;

pub const SYMBOL_VERSION: &[u8] = b"sipt_plugin_abi_version";
pub const SYMBOL_CALL: &[u8] = b"sipt_plugin_call";
pub const SYMBOL_FREE: &[u8] = b"sipt_plugin_free";

/// What a library says about one of its plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub kind: PluginKind,
    pub name: String,
    pub summary: String,
    pub fields: Vec<String>,
    pub defined_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Manifest,
    Check {
        kind: PluginKind,
        name: String,
        config: serde_json::Value,
    },
    Build {
        kind: PluginKind,
        name: String,
        config: serde_json::Value,
        context: PluginContext,
    },
    Call {
        handle: u64,
        call: Call,
    },
    Drop {
        handle: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", content = "input", rename_all = "snake_case")]
pub enum Call {
    Criteria,
    Judge(Vec<PointwiseItem>),
    Criterion,
    Compare(Vec<PairwiseItem>),
    Rewrite(Vec<RewriteItem>),
    Rewards(Vec<Vec<CandidateScores>>),
    Plan { progress: Progress, base: StepPlan },
    Counters,
}

/// `Ok` carries the call's result as JSON; `Err` a message for the user.
pub type Response = Result<serde_json::Value, String>;

/// Problems checking a configuration come back as this, inside `Ok`.
pub type CheckResult = Result<(), ConfigProblem>;

fn handles() -> &'static Mutex<HashMap<u64, Arc<Instance>>> {
    static HANDLES: OnceLock<Mutex<HashMap<u64, Arc<Instance>>>> = OnceLock::new();
    HANDLES.get_or_init(Default::default)
}

fn find(kind: PluginKind, name: &str) -> Result<&'static crate::Registration, String> {
    crate::registrations()
        .find(|r| r.kind == kind && r.name == name)
        .ok_or_else(|| format!("this library has no {kind} plugin named '{name}'"))
}

fn to_json<T: Serialize>(value: T) -> Response {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// Answer one request inside the library.
pub fn serve(request: Request) -> Response {
    match request {
        Request::Manifest => to_json(
            crate::registrations()
                .map(|r| ManifestEntry {
                    kind: r.kind,
                    name: r.name.to_string(),
                    summary: r.summary.to_string(),
                    fields: (r.fields)().into_iter().map(String::from).collect(),
                    defined_at: r.defined_at.to_string(),
                })
                .collect::<Vec<_>>(),
        ),
        Request::Check { kind, name, config } => {
            let reg = find(kind, &name)?;
            to_json::<CheckResult>((reg.check)(&config))
        }
        Request::Build {
            kind,
            name,
            config,
            context,
        } => {
            let reg = find(kind, &name)?;
            let instance = (reg.build)(config, &context)?;
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let handle = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            handles()
                .lock()
                .map_err(|e| e.to_string())?
                .insert(handle, Arc::new(instance));
            to_json(handle)
        }
        Request::Drop { handle } => {
            handles().lock().map_err(|e| e.to_string())?.remove(&handle);
            to_json(())
        }
        Request::Call { handle, call } => {
            // Clone the instance out so concurrent calls do not wait on each other.
            let instance = handles()
                .lock()
                .map_err(|e| e.to_string())?
                .get(&handle)
                .cloned()
                .ok_or_else(|| format!("unknown plugin handle {handle}"))?;
            dispatch(&instance, call)
        }
    }
}

fn dispatch(instance: &Instance, call: Call) -> Response {
    match (instance, call) {
        (Instance::PointwiseJudge(j), Call::Criteria) => to_json(j.criteria()),
        (Instance::PointwiseJudge(j), Call::Judge(items)) => to_json(j.judge(&items)),
        (Instance::PointwiseJudge(j), Call::Counters) => to_json(j.counters()),
        (Instance::PairwiseJudge(j), Call::Criterion) => to_json(j.criterion()),
        (Instance::PairwiseJudge(j), Call::Compare(items)) => to_json(j.compare(&items)),
        (Instance::PairwiseJudge(j), Call::Counters) => to_json(j.counters()),
        (Instance::Rewriter(r), Call::Rewrite(items)) => to_json(r.rewrite(&items)),
        (Instance::Rewriter(r), Call::Counters) => to_json(r.counters()),
        (Instance::Reward(r), Call::Rewards(pools)) => to_json(r.rewards(&pools)),
        (Instance::Curriculum(c), Call::Plan { progress, base }) => {
            to_json(c.plan(&progress, &base))
        }
        (_, Call::Counters) => to_json(crate::Counters::new()),
        (instance, call) => Err(format!(
            "a {} plugin cannot answer {:?}",
            instance.kind(),
            call
        )),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// The body of the exported `sipt_plugin_call`.
///
/// # Safety
/// `request` must be a valid NUL-terminated string.
pub unsafe fn serve_c(request: *const c_char) -> *mut c_char {
    let text = if request.is_null() {
        Err("null request".to_string())
    } else {
        CStr::from_ptr(request)
            .to_str()
            .map(str::to_owned)
            .map_err(|e| e.to_string())
    };
    let response: Response = match text {
        Err(e) => Err(e),
        Ok(text) => std::panic::catch_unwind(move || {
            let request: Request =
                serde_json::from_str(&text).map_err(|e| format!("malformed request: {e}"))?;
            serve(request)
        })
        .unwrap_or_else(|payload| Err(format!("plugin panicked: {}", panic_message(&*payload)))),
    };
    let json = serde_json::to_string(&response)
        .unwrap_or_else(|e| format!("{{\"Err\":\"cannot encode response: {e}\"}}"));
    // JSON never contains a raw NUL, so this cannot fail; fall back to an error text if it did.
    CString::new(json)
        .unwrap_or_else(|_| CString::from(c"{\"Err\":\"response contained NUL\"}"))
        .into_raw()
}

/// The body of the exported `sipt_plugin_free`.
///
/// # Safety
/// `response` must come from [`serve_c`] in the same library and be freed once.
pub unsafe fn free_c(response: *mut c_char) {
    if !response.is_null() {
        drop(CString::from_raw(response));
    }
}

/// Export every plugin registered in this crate (with
/// [`register_plugin!`](crate::register_plugin)) from a `cdylib`, for `sipt` to load at run
/// time. Write it once, at the crate root.
#[macro_export]
macro_rules! export_plugins {
    () => {
        #[no_mangle]
        pub extern "C" fn sipt_plugin_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        /// # Safety
        /// Called by sipt with a NUL-terminated JSON request.
        #[no_mangle]
        pub unsafe extern "C" fn sipt_plugin_call(
            request: *const ::std::ffi::c_char,
        ) -> *mut ::std::ffi::c_char {
            $crate::abi::serve_c(request)
        }

        /// # Safety
        /// Called by sipt once per response.
        #[no_mangle]
        pub unsafe extern "C" fn sipt_plugin_free(response: *mut ::std::ffi::c_char) {
            $crate::abi::free_c(response)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FromConfig, PointwiseJudge, Verdict};

    struct Constant(f64);

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ConstantConfig {
        #[serde(default)]
        value: f64,
    }

    impl FromConfig for Constant {
        type Config = ConstantConfig;
        fn from_config(c: ConstantConfig, _: &PluginContext) -> Result<Self, String> {
            Ok(Constant(c.value))
        }
    }

    impl PointwiseJudge for Constant {
        fn criteria(&self) -> Vec<String> {
            vec!["constant".into()]
        }
        fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
            items
                .iter()
                .map(|i| {
                    if i.candidate == "boom" {
                        panic!("asked to explode");
                    }
                    Ok([("constant".to_string(), self.0)].into())
                })
                .collect()
        }
    }

    crate::register_plugin!(PointwiseJudge, "abi-test-constant", Constant, "test");

    fn roundtrip(request: serde_json::Value) -> Response {
        let text = CString::new(request.to_string()).unwrap();
        unsafe {
            let out = serve_c(text.as_ptr());
            let response = CStr::from_ptr(out).to_str().unwrap().to_owned();
            free_c(out);
            serde_json::from_str(&response).unwrap()
        }
    }

    #[test]
    fn build_call_and_catch_panics() {
        let handle = roundtrip(serde_json::json!({
            "op": "build", "kind": "pointwise-judge", "name": "abi-test-constant",
            "config": {"value": 0.5}, "context": PluginContext::default(),
        }))
        .unwrap();
        let item = |c: &str| PointwiseItem {
            prefix: "p".into(),
            candidate: c.into(),
            reference: None,
        };
        let ok = roundtrip(serde_json::json!({
            "op": "call", "handle": handle, "call": {"method": "judge", "input": [item("x")]}
        }))
        .unwrap();
        let verdicts: Vec<Verdict> = serde_json::from_value(ok).unwrap();
        assert_eq!(verdicts[0].as_ref().unwrap()["constant"], 0.5);

        let err = roundtrip(serde_json::json!({
            "op": "call", "handle": handle, "call": {"method": "judge", "input": [item("boom")]}
        }))
        .unwrap_err();
        assert!(err.contains("asked to explode"), "{err}");
    }

    #[test]
    fn check_reports_unknown_keys() {
        let ok = roundtrip(serde_json::json!({
            "op": "check", "kind": "pointwise-judge", "name": "abi-test-constant",
            "config": {"valeu": 1.0},
        }))
        .unwrap();
        let check: CheckResult = serde_json::from_value(ok).unwrap();
        let problem = check.unwrap_err();
        assert!(
            problem.message.contains("unknown field `valeu`"),
            "{problem:?}"
        );
    }
}
