//! External plugin libraries, loaded with `libloading` and spoken to through the C ABI of
//! [`sipt_api::abi`]. Libraries are never unloaded: plugin objects and threads inside them may
//! outlive any point at which unloading would be safe.

use serde::de::DeserializeOwned;
use sipt_api::abi::{self, Call, ManifestEntry, Request, Response};
use sipt_api::{
    CandidateScores, ConfigProblem, Counters, Curriculum, Failure, Instance, PairwiseItem,
    PairwiseJudge, PluginContext, PluginKind, PointwiseItem, PointwiseJudge, Preference, Progress,
    RewardFn, RewriteItem, Rewriter, StepPlan, Verdict,
};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

type CallFn = unsafe extern "C" fn(*const c_char) -> *mut c_char;
type FreeFn = unsafe extern "C" fn(*mut c_char);
type VersionFn = extern "C" fn() -> u32;

/// A loaded plugin library.
pub struct Library {
    path: PathBuf,
    call: CallFn,
    free: FreeFn,
}

impl Library {
    /// Load a library and check its ABI version before anything else.
    pub fn open(path: &Path) -> Result<Arc<Library>, String> {
        let shown = path.display();
        if !path.exists() {
            return Err(format!("plugin library {shown} does not exist"));
        }
        // SAFETY: loading runs the library's initialisers; that is what loading a plugin means.
        // The library is leaked, so the function pointers below stay valid for the process.
        let lib: &'static libloading::Library = unsafe {
            Box::leak(Box::new(libloading::Library::new(path).map_err(|e| {
                format!("cannot load plugin library {shown}: {e}")
            })?))
        };
        let version: VersionFn = unsafe {
            *lib.get::<VersionFn>(abi::SYMBOL_VERSION).map_err(|_| {
                format!("{shown} is not a sipt plugin library (no sipt_plugin_abi_version symbol; did you forget sipt_api::export_plugins!()?)")
            })?
        };
        let found = version();
        if found != abi::ABI_VERSION {
            return Err(format!(
                "plugin library {shown} speaks plugin ABI version {found}, but this sipt speaks version {}; rebuild the plugin against sipt-api {}",
                abi::ABI_VERSION,
                env!("CARGO_PKG_VERSION")
            ));
        }
        let call: CallFn = unsafe {
            *lib.get::<CallFn>(abi::SYMBOL_CALL)
                .map_err(|e| format!("{shown}: missing sipt_plugin_call: {e}"))?
        };
        let free: FreeFn = unsafe {
            *lib.get::<FreeFn>(abi::SYMBOL_FREE)
                .map_err(|e| format!("{shown}: missing sipt_plugin_free: {e}"))?
        };
        Ok(Arc::new(Library {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            call,
            free,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn request<T: DeserializeOwned>(&self, request: &Request) -> Result<T, String> {
        let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
        let text = CString::new(text).map_err(|e| e.to_string())?;
        // SAFETY: the library returns a NUL-terminated string it allocated, which we copy and
        // hand back to its own free function exactly once.
        let response = unsafe {
            let out = (self.call)(text.as_ptr());
            if out.is_null() {
                return Err(format!("{}: plugin returned nothing", self.path.display()));
            }
            let copied = CStr::from_ptr(out).to_string_lossy().into_owned();
            (self.free)(out);
            copied
        };
        let response: Response = serde_json::from_str(&response)
            .map_err(|e| format!("{}: malformed plugin response: {e}", self.path.display()))?;
        let value = response?;
        serde_json::from_value(value)
            .map_err(|e| format!("{}: unexpected plugin response: {e}", self.path.display()))
    }

    pub fn manifest(&self) -> Result<Vec<ManifestEntry>, String> {
        self.request(&Request::Manifest)
    }

    pub fn check(
        &self,
        kind: PluginKind,
        name: &str,
        config: &serde_json::Value,
    ) -> Result<(), ConfigProblem> {
        let request = Request::Check {
            kind,
            name: name.to_string(),
            config: config.clone(),
        };
        match self.request::<abi::CheckResult>(&request) {
            Ok(result) => result,
            Err(message) => Err(ConfigProblem {
                path: Vec::new(),
                message,
            }),
        }
    }

    pub fn build(
        self: &Arc<Self>,
        kind: PluginKind,
        name: &str,
        config: serde_json::Value,
        context: &PluginContext,
    ) -> Result<Instance, String> {
        let handle: u64 = self.request(&Request::Build {
            kind,
            name: name.to_string(),
            config,
            context: context.clone(),
        })?;
        let remote = Remote {
            library: self.clone(),
            handle,
            name: name.to_string(),
        };
        Ok(match kind {
            PluginKind::PointwiseJudge => {
                let criteria = remote.call(Call::Criteria)?;
                Instance::PointwiseJudge(Box::new(RemotePointwise { remote, criteria }))
            }
            PluginKind::PairwiseJudge => {
                let criterion = remote.call(Call::Criterion)?;
                Instance::PairwiseJudge(Box::new(RemotePairwise { remote, criterion }))
            }
            PluginKind::Rewriter => Instance::Rewriter(Box::new(remote)),
            PluginKind::Reward => Instance::Reward(Box::new(remote)),
            PluginKind::Curriculum => Instance::Curriculum(Box::new(remote)),
            PluginKind::Objective => return Err("objectives cannot come from libraries".into()),
        })
    }
}

/// A plugin object living inside a library, addressed by handle.
struct Remote {
    library: Arc<Library>,
    handle: u64,
    name: String,
}

impl Remote {
    fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T, String> {
        self.library
            .request(&Request::Call {
                handle: self.handle,
                call,
            })
            .map_err(|e| format!("plugin '{}': {e}", self.name))
    }

    /// A batch call whose every item fails when the call as a whole fails.
    fn batch<T: DeserializeOwned>(&self, call: Call, n: usize) -> Vec<Result<T, Failure>> {
        match self.call::<Vec<Result<T, Failure>>>(call) {
            Ok(out) if out.len() == n => out,
            Ok(out) => failed(
                n,
                &format!(
                    "plugin '{}' answered {} items for a batch of {n}",
                    self.name,
                    out.len()
                ),
            ),
            Err(e) => failed(n, &e),
        }
    }

    fn counters(&self) -> Counters {
        self.call(Call::Counters).unwrap_or_default()
    }
}

fn failed<T>(n: usize, reason: &str) -> Vec<Result<T, Failure>> {
    (0..n).map(|_| Err(Failure::new(reason))).collect()
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.library.request::<serde_json::Value>(&Request::Drop {
            handle: self.handle,
        });
    }
}

struct RemotePointwise {
    remote: Remote,
    criteria: Vec<String>,
}

impl PointwiseJudge for RemotePointwise {
    fn criteria(&self) -> Vec<String> {
        self.criteria.clone()
    }
    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
        self.remote.batch(Call::Judge(items.to_vec()), items.len())
    }
    fn counters(&self) -> Counters {
        self.remote.counters()
    }
}

struct RemotePairwise {
    remote: Remote,
    criterion: String,
}

impl PairwiseJudge for RemotePairwise {
    fn criterion(&self) -> String {
        self.criterion.clone()
    }
    fn compare(&self, items: &[PairwiseItem]) -> Vec<Result<Preference, Failure>> {
        self.remote
            .batch(Call::Compare(items.to_vec()), items.len())
    }
    fn counters(&self) -> Counters {
        self.remote.counters()
    }
}

impl Rewriter for Remote {
    fn rewrite(&self, items: &[RewriteItem]) -> Vec<Result<String, Failure>> {
        self.batch(Call::Rewrite(items.to_vec()), items.len())
    }
    fn counters(&self) -> Counters {
        Remote::counters(self)
    }
}

impl RewardFn for Remote {
    fn rewards(&self, pools: &[Vec<CandidateScores>]) -> Vec<Vec<Result<f64, Failure>>> {
        match self.call::<Vec<Vec<Result<f64, Failure>>>>(Call::Rewards(pools.to_vec())) {
            Ok(out) if out.len() == pools.len() => out,
            Ok(_) => pools
                .iter()
                .map(|p| failed(p.len(), "reward plugin answered the wrong number of pools"))
                .collect(),
            Err(e) => pools.iter().map(|p| failed(p.len(), &e)).collect(),
        }
    }
}

impl Curriculum for Remote {
    fn plan(&self, progress: &Progress, base: &StepPlan) -> StepPlan {
        // A curriculum that cannot answer leaves the experiment's base plan in force.
        self.call(Call::Plan {
            progress: progress.clone(),
            base: base.clone(),
        })
        .unwrap_or_else(|e| {
            tracing::warn!("{e}; using the base plan for this step");
            base.clone()
        })
    }
}
