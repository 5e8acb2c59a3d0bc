//! The policy model: a Llama-family decoder with its variables, loaded from and saved to
//! Hugging Face-layout folders (config.json, model.safetensors, tokenizer.json).

pub mod llama;
pub mod packed;

pub use llama::{Batch, KvCache, Llama, LlamaConfig};
pub use packed::Packed;

use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use sipt_experiment::config::Dtype;
use sipt_experiment::rundir::write_atomic;
use std::collections::HashMap;
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

    /// A copy of this model with its weights in `kind` (e.g. bf16 weights to sample with).
    pub fn copy_as(&self, kind: Kind) -> Result<Policy> {
        let mut copy = Policy::zeroed(self.model.config.clone(), self.vs.device());
        copy.vs.set_kind(kind);
        copy.copy_from(self)?;
        Ok(copy)
    }

    /// Copy weights from a folder into this model's variables.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        let tensors = read_weights(dir)?;
        let mut variables = self.vs.variables();
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, var) in variables.iter_mut() {
                match tensors.get(name) {
                    Some(src) => {
                        if src.size() != var.size() {
                            bail!(
                                "{}: {name} has shape {:?}, the model expects {:?}",
                                dir.display(),
                                src.size(),
                                var.size()
                            );
                        }
                        var.copy_(&src.to_kind(var.kind()));
                    }
                    None => missing.push(name.clone()),
                }
            }
            Ok(())
        })?;
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
        let mut unused: Vec<&String> = tensors
            .keys()
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
    refuse_unimplemented(&path, &mut value)?;
    let config: LlamaConfig = serde_json::from_value(value)
        .with_context(|| format!("{}: not a Llama config", path.display()))?;
    let heads = config.num_attention_heads;
    if heads == 0 || config.kv_heads() == 0 || heads % config.kv_heads() != 0 {
        bail!(
            "{}: num_attention_heads = {heads} and num_key_value_heads = {}: expected positive counts, the first a multiple of the second",
            path.display(),
            config.kv_heads()
        );
    }
    if config.head_dim.is_none() && config.hidden_size % heads != 0 {
        bail!(
            "{}: hidden_size = {} is not divisible by num_attention_heads = {heads} (and no head_dim is given)",
            path.display(),
            config.hidden_size
        );
    }
    if config.vocab_size == 0 || config.hidden_size == 0 || config.num_hidden_layers == 0 {
        bail!(
            "{}: vocab_size, hidden_size and num_hidden_layers must be positive",
            path.display()
        );
    }
    Ok(config)
}

/// Every `config.json` field that would change the computation in a way this engine does not
/// implement is refused, naming the file, the field and its value — a model must never load and
/// compute something else without a word. Transformers 5's `rope_parameters` is read for its
/// `rope_theta` (older files have it at the top level).
fn refuse_unimplemented(path: &Path, value: &mut serde_json::Value) -> Result<()> {
    let refuse = |field: &str, v: &serde_json::Value, why: &str| {
        anyhow!("{}: {field} = {v}: {why}", path.display())
    };
    let original = value.clone();
    let get = |k: &str| original.get(k).filter(|v| !v.is_null()).cloned();
    if let Some(t) = get("model_type") {
        match t.as_str() {
            Some("llama" | "mistral" | "smollm") => {}
            Some("qwen2") => {
                if let Some(map) = value.as_object_mut() {
                    map.insert("qkv_bias".into(), true.into());
                }
            }
            Some("qwen3") => {
                return Err(refuse(
                    "model_type",
                    &t,
                    "its per-head q/k norms are not implemented yet",
                ))
            }
            _ => {
                return Err(refuse(
                    "model_type",
                    &t,
                    "not a Llama-family model sipt implements (llama, mistral, qwen2, smollm)",
                ))
            }
        }
    }
    if let Some(r) = get("rope_scaling") {
        return Err(refuse(
            "rope_scaling",
            &r,
            "scaled rotary embeddings are not implemented yet (only plain RoPE)",
        ));
    }
    if let Some(p) = get("rope_parameters") {
        let kind = p
            .get("rope_type")
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        if kind != "default" {
            return Err(refuse(
                "rope_parameters",
                &p,
                "scaled rotary embeddings are not implemented yet (only rope_type \"default\")",
            ));
        }
        if get("rope_theta").is_none() {
            if let (Some(theta), Some(map)) = (p.get("rope_theta").cloned(), value.as_object_mut())
            {
                map.insert("rope_theta".into(), theta);
            }
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if let Some(v) = get(field).filter(|v| v.as_bool() == Some(true)) {
            return Err(refuse(
                field,
                &v,
                "biases in the projections are not implemented",
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
    if let Some(v) = get("layer_types").filter(|t| {
        t.as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() != Some("full_attention")))
    }) {
        return Err(refuse(
            "layer_types",
            &v,
            "only full attention is implemented",
        ));
    }
    let sliding = get("sliding_window")
        .filter(|_| original.get("use_sliding_window").and_then(|u| u.as_bool()) != Some(false));
    if let Some(v) = sliding {
        return Err(refuse("sliding_window", &v, "sliding-window attention is not implemented yet; sequences longer than the window would attend past it"));
    }
    Ok(())
}

fn read_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join(WEIGHTS);
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).with_context(|| {
            format!(
                "{} holds neither {WEIGHTS} nor a sharded index",
                dir.display()
            )
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        let mut shards: Vec<String> = value["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut out = HashMap::new();
    for f in files {
        let tensors = Tensor::read_safetensors(&f)
            .with_context(|| format!("cannot read weights {}", f.display()))?;
        out.extend(tensors);
    }
    // Tied checkpoints may or may not carry lm_head; untied models need it.
    Ok(out)
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
                "rope_scaling = {",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}),
                "rope_parameters = ",
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
                serde_json::json!({"model_type": "mistral", "sliding_window": 4096}),
                "sliding_window = 4096",
            ),
            (
                serde_json::json!({"model_type": "qwen3"}),
                "model_type = \"qwen3\"",
            ),
            (
                serde_json::json!({"layer_types": ["sliding_attention"]}),
                "layer_types = ",
            ),
            (
                serde_json::json!({"model_type": "gpt2"}),
                "not a Llama-family model",
            ),
            (
                serde_json::json!({"num_attention_heads": 0}),
                "num_attention_heads = 0",
            ),
            (
                serde_json::json!({"hidden_size": 30}),
                "hidden_size = 30 is not divisible",
            ),
        ] {
            let err = config_error(extra.clone());
            assert!(err.contains(want), "{extra}: {err}");
            assert!(err.contains("config.json"), "{err}");
        }
        // A Mistral file that turns its window off loads.
        assert_eq!(
            config_error(
                serde_json::json!({"model_type": "mistral", "sliding_window": 4096, "use_sliding_window": false})
            ),
            ""
        );
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

    #[test]
    fn a_tensor_with_no_place_in_the_model_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            qkv_bias: false,
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
