//! The policy model: a Llama-family decoder with its variables, loaded from and saved to
//! Hugging Face-layout folders (config.json, model.safetensors, tokenizer.json).

pub mod fused;
pub mod llama;
pub mod packed;

pub use llama::{Batch, Family, KvCache, Llama, LlamaConfig, RopeScaling};
pub use packed::Packed;

use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use sipt_experiment::config::Dtype;
use sipt_experiment::rundir::write_atomic;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub const CONFIG_JSON: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// Pick the device from an experiment's `device` setting.
pub fn select_device(spec: &str) -> Result<Device> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        s if s.starts_with("cuda") => {
            let index: usize = s
                .strip_prefix("cuda:")
                .map(|i| i.parse())
                .transpose()
                .map_err(|_| anyhow!("bad device '{s}'"))?
                .unwrap_or(0);
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                bail!("device '{s}' asked for, but this machine has {count} CUDA device(s)");
            }
            Ok(Device::Cuda(index))
        }
        other => bail!("unknown device '{other}'"),
    }
}

/// A model and the variables it trains.
pub struct Policy {
    pub vs: nn::VarStore,
    pub model: Llama,
}

impl Policy {
    /// A freshly initialised model (seed the global generator first for reproducibility).
    pub fn from_scratch(config: LlamaConfig, device: Device) -> Policy {
        let vs = nn::VarStore::new(device);
        let model = Llama::new(&vs, config);
        Policy { vs, model }
    }

    /// A model whose weights are set right after (zeros until then; no random numbers drawn).
    fn zeroed(config: LlamaConfig, device: Device) -> Policy {
        let vs = nn::VarStore::new(device);
        let model = Llama::zeroed(&vs, config);
        Policy { vs, model }
    }

    /// Load a Hugging Face-layout folder: config.json and model.safetensors (or shards listed
    /// in model.safetensors.index.json).
    pub fn load(dir: &Path, device: Device) -> Result<Policy> {
        let config = read_config(dir)?;
        let policy = Policy::zeroed(config, device);
        policy.load_weights(dir)?;
        Ok(policy)
    }

    /// Every variable's gradient (a copy), sorted by name, each zeroed for the next pass: for
    /// comparing the gradients of two ways of computing one loss.
    pub fn take_grads(&self) -> Vec<(String, Tensor)> {
        let mut grads: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, v)| {
                let g = v.grad().copy();
                let _ = v.grad().zero_();
                (name, g)
            })
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads
    }

    /// A copy of this model with its weights in `kind` (e.g. bf16 weights to sample with).
    pub fn copy_as(&self, kind: Kind) -> Result<Policy> {
        let mut copy = Policy::zeroed(self.model.config.clone(), self.vs.device());
        copy.model.fused_layers = self.model.fused_layers;
        copy.model.panel_products = self.model.panel_products;
        copy.vs.set_kind(kind);
        copy.copy_from(self)?;
        Ok(copy)
    }

    /// Copy weights from a folder into this model's variables, one tensor at a time (read
    /// from the file into a buffer of its own, copied, dropped): never a second copy of the
    /// whole model in memory.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut variables = self.vs.variables();
        let mut names = Vec::new();
        for file in weight_files(dir)? {
            let handle = std::fs::File::open(&file)
                .with_context(|| format!("cannot open weights {}", file.display()))?;
            // The header through a map (only its pages are touched); the data by reads, so that
            // the file's pages never count as this process's memory.
            // SAFETY: the map is read while this function runs; checkpoints are written under a
            // temporary name and renamed, so no writer changes a file being loaded.
            let map = unsafe { memmap2::Mmap::map(&handle) }
                .with_context(|| format!("cannot map weights {}", file.display()))?;
            let (header, metadata) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow!("cannot read weights {}: {e}", file.display()))?;
            let data_start = 8 + header as u64;
            let mut entries: Vec<(String, &safetensors::tensor::TensorInfo)> =
                metadata.tensors().into_iter().collect();
            entries.sort_by_key(|(_, info)| info.data_offsets.0);
            let mut buffer = Vec::new();
            for (name, view) in entries {
                names.push(name.clone());
                let Some(var) = variables.get_mut(&name) else {
                    continue;
                };
                let shape: Vec<i64> = view.shape.iter().map(|&d| d as i64).collect();
                if shape != var.size() {
                    bail!(
                        "{}: {name} has shape {shape:?}, the model expects {:?}",
                        dir.display(),
                        var.size()
                    );
                }
                let kind = match view.dtype {
                    safetensors::Dtype::F32 => Kind::Float,
                    safetensors::Dtype::BF16 => Kind::BFloat16,
                    safetensors::Dtype::F16 => Kind::Half,
                    safetensors::Dtype::F64 => Kind::Double,
                    other => bail!(
                        "{}: {name} holds {other:?} values; expected f32, bf16, f16 or f64 weights",
                        file.display()
                    ),
                };
                let (start, end) = view.data_offsets;
                buffer.resize(end - start, 0);
                handle
                    .read_exact_at(&mut buffer, data_start + start as u64)
                    .with_context(|| format!("cannot read {name} from {}", file.display()))?;
                let src = Tensor::f_from_data_size(&buffer, &shape, kind)
                    .map_err(|e| anyhow!("{}: {name}: {e}", file.display()))?;
                tch::no_grad(|| var.copy_(&src.to_kind(var.kind())));
            }
        }
        let mut missing: Vec<&String> = variables
            .keys()
            .filter(|name| !names.contains(*name))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            bail!(
                "{}: the weights lack {} tensor(s) the model needs, e.g. {}",
                dir.display(),
                missing.len(),
                missing[0]
            );
        }
        // Every tensor of the checkpoint is used, or named: one the model has no place for
        // (a bias, a norm of another family) means it would compute something else.
        let mut unused: Vec<&String> = names
            .iter()
            .filter(|name| !variables.contains_key(*name))
            .collect();
        unused.sort();
        let (harmless, unused): (Vec<&String>, Vec<&String>) = unused.into_iter().partition(|n| {
            n.ends_with("rotary_emb.inv_freq")
                || (n.as_str() == "lm_head.weight" && self.model.config.tie_word_embeddings)
        });
        if !harmless.is_empty() {
            tracing::warn!(
                "{}: ignoring {} tensor(s) the model computes itself or ties (e.g. {})",
                dir.display(),
                harmless.len(),
                harmless[0]
            );
        }
        if !unused.is_empty() {
            bail!(
                "{}: {} tensor(s) of the checkpoint have no place in this model, e.g. {} (a family or option sipt does not implement)",
                dir.display(),
                unused.len(),
                unused[0]
            );
        }
        Ok(())
    }

    /// Write config.json and model.safetensors into `dir` (each file atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = serde_json::to_string_pretty(&self.model.config.to_hf_json())?;
        write_atomic(&dir.join(CONFIG_JSON), config.as_bytes())?;
        let tmp = dir.join(format!(".{WEIGHTS}.tmp"));
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu).contiguous()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, dir.join(WEIGHTS))
            .with_context(|| format!("cannot write {}", dir.join(WEIGHTS).display()))?;
        Ok(())
    }

    /// Copy another policy's weights into this one.
    /// Copy `other`'s current weights into this model (converting their type).
    pub fn copy_from(&mut self, other: &Policy) -> Result<()> {
        self.vs
            .copy(&other.vs)
            .map_err(|e| anyhow!("cannot copy weights: {e}"))
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

/// What rollouts are sampled with: the policy itself, or a copy of it in another type
/// (`sample_dtype = "bf16"`), brought up to date with the policy before each use.
pub struct Sampler {
    copy: Option<Policy>,
}

impl Sampler {
    /// `dtype`: `f32` (the policy itself) or `bf16`.
    pub fn new(policy: &Policy, dtype: Dtype) -> Result<Sampler> {
        let copy = match dtype {
            Dtype::Bf16 => Some(policy.copy_as(Kind::BFloat16)?),
            Dtype::F32 => None,
        };
        Ok(Sampler { copy })
    }

    /// The model to sample from now, with `policy`'s current weights.
    pub fn model<'a>(&'a mut self, policy: &'a Policy) -> Result<&'a Llama> {
        match self.copy.as_mut() {
            Some(copy) => {
                copy.copy_from(policy)?;
                Ok(&copy.model)
            }
            None => Ok(&policy.model),
        }
    }
}

pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join(CONFIG_JSON);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a model folder?)",
            path.display(),
            dir.display()
        )
    })?;
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let family = refuse_unimplemented(&path, &mut value)?;
    let mut config: LlamaConfig = serde_json::from_value(value)
        .with_context(|| format!("{}: not a Llama-family config", path.display()))?;
    config.family = family;
    config
        .check_heads()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if config.vocab_size == 0 || config.hidden_size == 0 || config.num_hidden_layers == 0 {
        bail!(
            "{}: vocab_size, hidden_size and num_hidden_layers must be positive",
            path.display()
        );
    }
    Ok(config)
}

/// Every `config.json` field that would change the computation is implemented or refused,
/// naming the file, the field and its value — a model must never load and compute something
/// else without a word. Returns the family of `model_type`; the rotary scaling of
/// `rope_scaling` or of transformers 5's `rope_parameters` (with its `rope_theta`) is
/// rewritten into the one `rope_scaling` form sipt reads, and a sliding window is kept only
/// where it applies (Mistral).
fn refuse_unimplemented(path: &Path, value: &mut serde_json::Value) -> Result<Family> {
    let refuse = |field: &str, v: &serde_json::Value, why: &str| {
        anyhow!("{}: {field} = {v}: {why}", path.display())
    };
    let original = value.clone();
    let get = |k: &str| original.get(k).filter(|v| !v.is_null()).cloned();
    let family = match get("model_type") {
        None => Family::Llama,
        Some(t) => t.as_str().and_then(Family::of).ok_or_else(|| {
            refuse(
                "model_type",
                &t,
                "not a model family sipt implements (llama, smollm, mistral, qwen2, qwen3)",
            )
        })?,
    };
    let mut set = |k: &str, v: serde_json::Value| {
        if let Some(map) = value.as_object_mut() {
            map.insert(k.into(), v);
        }
    };

    // Rotary embeddings: plain, linear or llama3 scaling.
    let (field, scaling) = match (get("rope_scaling"), get("rope_parameters")) {
        (Some(r), _) => ("rope_scaling", Some(r)),
        (None, Some(p)) => {
            if get("rope_theta").is_none() {
                if let Some(theta) = p.get("rope_theta").cloned() {
                    set("rope_theta", theta);
                }
            }
            ("rope_parameters", Some(p))
        }
        (None, None) => ("rope_scaling", None),
    };
    set("rope_scaling", serde_json::Value::Null);
    if let Some(r) = scaling {
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let number = |k: &str| -> Result<f64> {
            r.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
                refuse(
                    field,
                    &r,
                    &format!("rope_type \"{kind}\" needs a number {k}"),
                )
            })
        };
        if let Some(f) = r
            .get("partial_rotary_factor")
            .filter(|f| f.as_f64() != Some(1.0))
        {
            return Err(refuse(
                field,
                &r,
                &format!(
                    "partial_rotary_factor = {f}: only rotations over whole heads are implemented"
                ),
            ));
        }
        let normalised = match kind {
            "default" => serde_json::Value::Null,
            "linear" => serde_json::json!({"rope_type": "linear", "factor": number("factor")?}),
            "llama3" => {
                let original_max = match r.get("original_max_position_embeddings") {
                    Some(v) => v.as_u64().ok_or_else(|| {
                        refuse(
                            field,
                            &r,
                            "original_max_position_embeddings must be a positive integer",
                        )
                    })?,
                    None => get("max_position_embeddings")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(2048),
                };
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err(refuse(
                        field,
                        &r,
                        "high_freq_factor must exceed low_freq_factor",
                    ));
                }
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": number("factor")?,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original_max,
                })
            }
            other => {
                return Err(refuse(
                    field,
                    &r,
                    &format!(
                        "rope_type \"{other}\" is not implemented (default, linear and llama3 are)"
                    ),
                ))
            }
        };
        set("rope_scaling", normalised);
    }
    if let Some(f) = get("partial_rotary_factor").filter(|f| f.as_f64() != Some(1.0)) {
        return Err(refuse(
            "partial_rotary_factor",
            &f,
            "only rotations over whole heads are implemented",
        ));
    }

    for field in ["attention_bias", "mlp_bias"] {
        if let Some(v) = get(field).filter(|v| v.as_bool() == Some(true)) {
            return Err(refuse(
                field,
                &v,
                "biases in these projections are not part of the families sipt implements (Qwen2's q/k/v biases are)",
            ));
        }
    }
    for field in ["attention_dropout", "hidden_dropout", "dropout"] {
        if let Some(v) = get(field).filter(|v| v.as_f64().is_some_and(|x| x != 0.0)) {
            return Err(refuse(field, &v, "dropout is not implemented (expected 0)"));
        }
    }
    if let Some(v) = get("hidden_act").filter(|v| v.as_str() != Some("silu")) {
        return Err(refuse(
            "hidden_act",
            &v,
            "only SwiGLU with silu is implemented",
        ));
    }

    // Sliding windows: Mistral's (every layer) is implemented; Qwen's per-layer windows are not.
    let window_on = original.get("use_sliding_window").and_then(|u| u.as_bool()) != Some(false);
    let window = get("sliding_window").filter(|_| window_on);
    if let Some(v) = get("layer_types").filter(|t| {
        t.as_array().is_some_and(|a| {
            a.iter().any(|x| {
                !(x.as_str() == Some("full_attention")
                    || (x.as_str() == Some("sliding_attention") && family == Family::Mistral))
            })
        })
    }) {
        return Err(refuse(
            "layer_types",
            &v,
            "only full attention in every layer (or Mistral's window in every layer) is implemented",
        ));
    }
    match (family, window) {
        (Family::Mistral, Some(w)) => {
            if w.as_u64().filter(|&n| n > 0).is_none() {
                return Err(refuse("sliding_window", &w, "expected a positive number of positions or null"));
            }
        }
        (_, Some(w)) => {
            return Err(refuse(
                "sliding_window",
                &w,
                "sliding windows are implemented for Mistral only; sequences longer than the window would attend past it",
            ))
        }
        (_, None) => set("sliding_window", serde_json::Value::Null),
    }
    Ok(family)
}

/// The weight files of a model folder: model.safetensors, or the shards its index lists.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join(WEIGHTS);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{} holds neither {WEIGHTS} nor a sharded index",
            dir.display()
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let mut shards: Vec<String> = value["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if shards.is_empty() {
        bail!("{}: no weight_map with shard files", index.display());
    }
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// Run `f` under bf16 autocast when the experiment asks for bf16 on a CUDA device (on a CPU,
/// `model.dtype` applies to rollouts through `sip.sample_dtype` instead).
pub fn autocast<T>(device: Device, dtype: Dtype, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() && dtype == Dtype::Bf16 {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// The tokens that end a sequence: the model's own (`config.json`) and the tokenizer's.
pub fn eos_tokens(config: &LlamaConfig, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut eos: Vec<u32> = config.eos_ids().into_iter().map(|x| x as u32).collect();
    eos.extend(tokenizer.eos);
    eos
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-layer Llama of width 32 over 96 tokens.
    fn tiny_config(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 96,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            bos_token_id: None,
            eos_token_id: None,
            family: Default::default(),
            rope_scaling: None,
            sliding_window: None,
        }
    }

    fn config_error(extra: serde_json::Value) -> String {
        let dir = tempfile::tempdir().unwrap();
        let mut config = serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(dir.path().join(CONFIG_JSON), config.to_string()).unwrap();
        match read_config(dir.path()) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn fields_that_change_the_math_are_refused_by_name() {
        assert_eq!(
            config_error(serde_json::json!({"rope_scaling": null, "attention_bias": false})),
            ""
        );
        for (extra, want) in [
            (
                serde_json::json!({"rope_scaling": {"type": "llama3", "factor": 8.0}}),
                "needs a number low_freq_factor",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "rope_type \"yarn\" is not implemented",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
                "rope_parameters = ",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "linear"}}),
                "needs a number factor",
            ),
            (
                serde_json::json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor = 0.5",
            ),
            (
                serde_json::json!({"attention_bias": true}),
                "attention_bias = true",
            ),
            (
                serde_json::json!({"attention_dropout": 0.1}),
                "attention_dropout = 0.1",
            ),
            (
                serde_json::json!({"hidden_act": "gelu"}),
                "hidden_act = \"gelu\"",
            ),
            (
                serde_json::json!({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": true}),
                "sliding_window = 4096",
            ),
            (
                serde_json::json!({"model_type": "mistral", "sliding_window": 0}),
                "sliding_window = 0",
            ),
            (
                serde_json::json!({"layer_types": ["sliding_attention"]}),
                "layer_types = ",
            ),
            (
                serde_json::json!({"model_type": "gpt2"}),
                "not a model family sipt implements",
            ),
            (
                serde_json::json!({"num_attention_heads": 0}),
                "num_attention_heads = 0",
            ),
            (
                serde_json::json!({"hidden_size": 30}),
                "hidden_size = 30 is not divisible",
            ),
            (
                serde_json::json!({"hidden_size": 28}),
                "a head size of 7 (head_dim, or hidden_size / num_attention_heads): rotary embeddings need an even head size",
            ),
        ] {
            let err = config_error(extra.clone());
            assert!(err.contains(want), "{extra}: {err}");
            assert!(err.contains("config.json"), "{err}");
        }
        // Mistral's window, Qwen files that turn theirs off and Qwen3 load.
        for ok in [
            serde_json::json!({"model_type": "mistral", "sliding_window": 4096}),
            serde_json::json!({"model_type": "mistral", "sliding_window": null}),
            serde_json::json!({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false}),
            serde_json::json!({"model_type": "qwen3", "head_dim": 16, "layer_types": ["full_attention"]}),
            serde_json::json!({"rope_scaling": {"rope_type": "default"}}),
        ] {
            assert_eq!(config_error(ok.clone()), "", "{ok}");
        }
    }

    fn config_of(extra: serde_json::Value) -> LlamaConfig {
        let dir = tempfile::tempdir().unwrap();
        let mut config = serde_json::json!({
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 4096,
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(dir.path().join(CONFIG_JSON), config.to_string()).unwrap();
        read_config(dir.path()).unwrap()
    }

    #[test]
    fn families_and_rope_scalings_are_read_in_both_layouts() {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // Older files: rope_scaling with "type" or "rope_type", rope_theta at the top level.
        let old = config_of(
            serde_json::json!({"model_type": "llama", "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        );
        assert_eq!(old.rope_scaling, Some(llama3.clone()));
        assert_eq!(old.rope_theta, 500000.0);
        // Transformers 5: everything in rope_parameters.
        let new = config_of(
            serde_json::json!({"rope_parameters": {"rope_type": "llama3",
            "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}),
        );
        assert_eq!(new.rope_scaling, Some(llama3));
        assert_eq!(new.rope_theta, 500000.0);
        let linear =
            config_of(serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}));
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        // A written config reads back the same, family and scaling included.
        for (model_type, family) in [
            ("mistral", Family::Mistral),
            ("qwen2", Family::Qwen2),
            ("qwen3", Family::Qwen3),
            ("smollm", Family::Llama),
        ] {
            let c = config_of(serde_json::json!({"model_type": model_type,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0}}));
            assert_eq!(c.family, family);
            let back = config_of(c.to_hf_json());
            assert_eq!(back.family, family);
            assert_eq!(back.to_hf_json(), c.to_hf_json(), "{model_type}");
        }
        let mistral = config_of(serde_json::json!({"model_type": "mistral", "sliding_window": 16}));
        assert_eq!(mistral.sliding_window, Some(16));
        assert_eq!(config_of(mistral.to_hf_json()).sliding_window, Some(16));
    }

    #[test]
    fn transformers_5_rope_parameters_give_the_theta() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        });
        std::fs::write(dir.path().join(CONFIG_JSON), config.to_string()).unwrap();
        assert_eq!(read_config(dir.path()).unwrap().rope_theta, 500000.0);
    }

    /// Gradients of every variable after `loss` (then cleared).
    fn grads_of(policy: &Policy, loss: Tensor) -> Vec<(String, Tensor)> {
        loss.backward();
        policy.take_grads()
    }

    #[test]
    fn the_chunked_loss_matches_the_plain_one_in_value_and_gradients() {
        for tied in [true, false] {
            tch::manual_seed(3);
            let config = tiny_config(tied);
            let policy = Policy::from_scratch(config, Device::Cpu);
            let tokens = Tensor::randint(96, [3, 17], (Kind::Int64, Device::Cpu));
            let plain_loss = policy.model.ntp_loss_unchunked(&tokens);
            let plain = grads_of(&policy, &plain_loss * 2.5);
            // 48 rows in chunks of 7 (the last one short), scaled after the fact.
            let inputs = tokens.narrow(1, 0, 16);
            // Each chunk's softmax through libtorch's ops and through the fused kernel.
            for fused in [false, true] {
                let hidden = policy.model.hidden(
                    &Batch {
                        ids: &inputs,
                        positions: None,
                        mask: None,
                    },
                    None,
                );
                let loss = llama::chunked_cross_entropy(
                    &hidden.reshape([-1, 32]),
                    policy.model.output_weight(),
                    &tokens.narrow(1, 1, 16).reshape([-1]),
                    7,
                    fused,
                );
                let diff = (&loss - &plain_loss).abs().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "tied {tied}, fused {fused}: loss differs by {diff}"
                );
                let chunked = grads_of(&policy, &loss * 2.5);
                for ((name, a), (_, b)) in plain.iter().zip(&chunked) {
                    let scale = a.abs().max().double_value(&[]).max(1e-8);
                    let d = (a - b).abs().max().double_value(&[]);
                    assert!(
                        d <= 1e-4 * scale,
                        "tied {tied}, fused {fused}: {name}: {d} of {scale}"
                    );
                }
            }
            // The model's own loss is the chunked one; without gradients, the same value.
            let own = policy.model.ntp_loss(&tokens);
            let quiet = tch::no_grad(|| policy.model.ntp_loss(&tokens));
            assert!((&own - &quiet).abs().double_value(&[]) < 1e-6);
            assert!(!quiet.requires_grad());
        }
    }

    fn logits_of(model: &Llama, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        model.forward(
            &Batch {
                ids,
                positions: None,
                mask: None,
            },
            cache,
        )
    }

    #[test]
    fn the_fused_layers_match_the_plain_ones_in_logits_and_gradients() {
        // Llama with tied embeddings, Qwen2's q/k/v biases, Qwen3's per-head norms, Mistral's
        // window (shorter than the sequence).
        for (family, window) in [
            (Family::Llama, None),
            (Family::Qwen2, None),
            (Family::Qwen3, None),
            (Family::Mistral, Some(5)),
        ] {
            tch::manual_seed(5);
            let mut config = tiny_config(family == Family::Llama);
            config.family = family;
            config.sliding_window = window;
            let mut policy = Policy::from_scratch(config, Device::Cpu);
            if family == Family::Qwen2 {
                // Biases start at zero: make them count.
                tch::no_grad(|| {
                    for (name, mut v) in policy.vs.variables() {
                        if name.ends_with(".bias") {
                            v.copy_(&(Tensor::randn_like(&v) * 0.5));
                        }
                    }
                });
            }
            let tokens = Tensor::randint(96, [3, 17], (Kind::Int64, Device::Cpu));
            let mut runs = Vec::new();
            for fused in [false, true] {
                policy.model.fused_layers = fused;
                let loss = policy.model.ntp_loss(&tokens);
                let value = loss.double_value(&[]);
                let grads = grads_of(&policy, loss);
                // Logits of the whole sequence, then of its last token after a cached prefix.
                let ids = tokens.narrow(1, 0, 16);
                let m = &policy.model;
                let logits = tch::no_grad(|| logits_of(m, &ids, None));
                let mut cache = KvCache::new(&m.config, 3, 16, Kind::Float, Device::Cpu);
                let step = tch::no_grad(|| {
                    let _ = logits_of(m, &ids.narrow(1, 0, 15), Some(&mut cache));
                    logits_of(m, &ids.narrow(1, 15, 1), Some(&mut cache))
                });
                runs.push((value, grads, logits, step));
            }
            let ((v0, g0, l0, s0), (v1, g1, l1, s1)) = (&runs[0], &runs[1]);
            assert!((v0 - v1).abs() < 1e-5, "{family:?}: loss {v0} vs {v1}");
            let close = |what: &str, a: &Tensor, b: &Tensor| {
                let scale = a.abs().max().double_value(&[]).max(1e-8);
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d <= 1e-4 * scale, "{family:?}: {what}: {d} of {scale}");
            };
            close("logits", l0, l1);
            // Not bit-identical: the fused kernels round differently, so they did run.
            assert!(
                (l0 - l1).abs().max().double_value(&[]) > 0.0,
                "{family:?}: the fused layers were not used"
            );
            close("cached step", s0, s1);
            close(
                "cached step against the whole sequence",
                &l1.narrow(1, 15, 1),
                s1,
            );
            for ((name, a), (_, b)) in g0.iter().zip(g1) {
                close(name, a, b);
            }
        }
    }

    #[test]
    fn the_fused_layers_match_the_plain_ones_in_bf16_without_gradients() {
        // The inference kernels (the residual add with the norm after it, SwiGLU) in bf16:
        // whole-sequence logits, and a cached step after a prefix, against libtorch's ops.
        for family in [Family::Llama, Family::Qwen3] {
            tch::manual_seed(8);
            let mut config = tiny_config(family == Family::Llama);
            config.family = family;
            let mut half = Policy::from_scratch(config, Device::Cpu)
                .copy_as(Kind::BFloat16)
                .unwrap();
            let ids = Tensor::randint(96, [3, 16], (Kind::Int64, Device::Cpu));
            let mut runs = Vec::new();
            for fused in [false, true] {
                half.model.fused_layers = fused;
                let m = &half.model;
                // The condition under which `hidden_with` takes the kernels holds here.
                assert!(tch::no_grad(|| super::fused::infers(&[&m.embed])));
                let mut cache = KvCache::new(&m.config, 3, 16, Kind::BFloat16, Device::Cpu);
                runs.push(tch::no_grad(|| {
                    let whole = logits_of(m, &ids, None);
                    let _ = logits_of(m, &ids.narrow(1, 0, 15), Some(&mut cache));
                    (whole, logits_of(m, &ids.narrow(1, 15, 1), Some(&mut cache)))
                }));
            }
            let ((l0, s0), (l1, s1)) = (&runs[0], &runs[1]);
            assert_eq!(l1.kind(), Kind::BFloat16);
            let close = |what: &str, a: &Tensor, b: &Tensor| {
                let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
                let scale = a.abs().max().double_value(&[]).max(1e-8);
                let d = (&a - &b).abs().max().double_value(&[]);
                // Two layers of bf16 activations, where a rounding may fall either way.
                assert!(d <= 0.03 * scale, "{family:?}: {what}: {d} of {scale}");
            };
            close("logits", l0, l1);
            close("cached step", s0, s1);
            close(
                "cached step against the whole sequence",
                &l1.narrow(1, 15, 1),
                s1,
            );
        }
    }

    #[test]
    fn a_tensor_with_no_place_in_the_model_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = LlamaConfig {
            vocab_size: 64,
            num_hidden_layers: 1,
            ..tiny_config(true)
        };
        let policy = Policy::from_scratch(config, Device::Cpu);
        policy.save(dir.path()).unwrap();
        policy.load_weights(dir.path()).unwrap();
        // A Qwen2-style bias the model has no place for.
        let mut named: Vec<(String, Tensor)> = policy.vs.variables().into_iter().collect();
        named.push((
            "model.layers.0.self_attn.q_proj.bias".into(),
            Tensor::zeros([32], (Kind::Float, Device::Cpu)),
        ));
        Tensor::write_safetensors(&named, dir.path().join(WEIGHTS)).unwrap();
        let err = format!("{:#}", policy.load_weights(dir.path()).unwrap_err());
        assert!(
            err.contains("model.layers.0.self_attn.q_proj.bias"),
            "{err}"
        );
        assert!(err.contains("no place in this model"), "{err}");
    }
}
