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
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if let Some(t) = value.get("model_type").and_then(|v| v.as_str()) {
        if !matches!(t, "llama" | "mistral" | "qwen2" | "smollm") {
            bail!(
                "{}: model_type '{t}' is not a Llama-family model",
                path.display()
            );
        }
    }
    serde_json::from_value(value).with_context(|| format!("{}: not a Llama config", path.display()))
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
