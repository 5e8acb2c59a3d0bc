//! Convert a Llama-family GGUF model to Hugging Face `LlamaForCausalLM` layout.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Map, Value as Json};
use tokenizers::Tokenizer;

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;
use crate::tokenizer::{build_tokenizer, check_round_trip, TokenizerInfo};

/// Text encoded and decoded after the tokenizer is written, as a load check.
const PROBE_TEXT: &str = "The capital of France is Paris. 1234 apples, café ☕!\n\tend";

/// Llama hyper-parameters read from GGUF metadata and tensor shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHParams {
    /// `general.architecture` (`llama` or `mistral`).
    pub architecture: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `(type, factor)` from `{arch}.rope.scaling.*` when linear scaling is set.
    pub rope_scaling: Option<(String, f64)>,
    /// No `output.weight`: the LM head is the token embedding.
    pub tie_word_embeddings: bool,
    /// Q/K/V/O projections carry biases.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaHParams {
    /// Read and cross-check the hyper-parameters of a Llama-family GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<LlamaHParams> {
        let path = gguf.path();
        let arch = gguf.architecture()?.to_string();
        if arch != "llama" && arch != "mistral" {
            return Err(GgufError::convert(
                path,
                format!("general.architecture is '{arch}'; only 'llama' (and 'mistral') models can be converted"),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let v = gguf.req_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| GgufError::metadata(path, &key(k), format!("bad value {v}")))
        };
        let n_layers = usize_of("block_count")?;
        let hidden_size = usize_of("embedding_length")?;
        let intermediate_size = usize_of("feed_forward_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = match gguf.get_u64(&key("attention.head_count_kv"))? {
            None => n_heads,
            Some(v) => v as usize,
        };
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(GgufError::convert(
                path,
                format!("{n_heads} attention heads cannot be shared by {n_kv_heads} KV heads"),
            ));
        }
        let head_dim = match gguf.get_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if hidden_size % n_heads == 0 => hidden_size / n_heads,
            None => {
                return Err(GgufError::convert(
                    path,
                    format!("hidden size {hidden_size} is not a multiple of {n_heads} heads"),
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(GgufError::convert(
                path,
                format!("head dimension {head_dim} must be even"),
            ));
        }
        if let Some(rope_dim) = gguf.get_u64(&key("rope.dimension_count"))? {
            if rope_dim as usize != head_dim {
                return Err(GgufError::convert(
                    path,
                    format!("partial rotary embeddings (rope dimension {rope_dim} of head dimension {head_dim}) are not Llama"),
                ));
            }
        }
        let rms_norm_eps = gguf.req_f64(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = gguf.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let context_length = usize_of("context_length")?;
        let rope_scaling = match gguf.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let factor = gguf.req_f64(&key("rope.scaling.factor"))?;
                Some(("linear".to_string(), factor))
            }
            Some(other) => {
                return Err(GgufError::convert(
                    path,
                    format!("rope scaling '{other}' is not supported"),
                ))
            }
        };

        let embd = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
            })?;
        let shape = embd.shape();
        if shape.len() != 2 || shape[1] != hidden_size {
            return Err(GgufError::convert(
                path,
                format!("token_embd.weight has shape {shape:?}, expected [vocab, {hidden_size}]"),
            ));
        }
        let vocab_size = shape[0];
        let tie_word_embeddings = gguf.tensor("output.weight").is_none();
        let attention_bias = gguf.tensor("blk.0.attn_q.bias").is_some();

        let n_tokens = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map_or(usize::MAX, <[_]>::len);
        let tok_id = |k: &str| -> Result<Option<u32>> {
            Ok(gguf
                .get_u64(k)?
                .filter(|&id| (id as usize) < n_tokens.min(vocab_size))
                .map(|id| id as u32))
        };
        Ok(LlamaHParams {
            architecture: arch,
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings,
            attention_bias,
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: tok_id("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// The Hugging Face `config.json` for `LlamaForCausalLM` in float32.
    pub fn hf_config(&self) -> Json {
        let mut c = Map::new();
        c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        c.insert("model_type".into(), json!("llama"));
        c.insert("vocab_size".into(), json!(self.vocab_size));
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("intermediate_size".into(), json!(self.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(self.n_layers));
        c.insert("num_attention_heads".into(), json!(self.n_heads));
        c.insert("num_key_value_heads".into(), json!(self.n_kv_heads));
        c.insert("head_dim".into(), json!(self.head_dim));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("max_position_embeddings".into(), json!(self.context_length));
        c.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        c.insert("rope_theta".into(), json!(self.rope_theta));
        c.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                Some((ty, factor)) => json!({"rope_type": ty, "type": ty, "factor": factor}),
                None => Json::Null,
            },
        );
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        c.insert("attention_bias".into(), json!(self.attention_bias));
        c.insert("attention_dropout".into(), json!(0.0));
        c.insert("mlp_bias".into(), json!(false));
        c.insert("initializer_range".into(), json!(0.02));
        c.insert("pretraining_tp".into(), json!(1));
        c.insert("use_cache".into(), json!(true));
        c.insert("bos_token_id".into(), json!(self.bos_token_id));
        c.insert("eos_token_id".into(), json!(self.eos_token_id));
        if let Some(pad) = self.pad_token_id {
            c.insert("pad_token_id".into(), json!(pad));
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Json::Object(c)
    }

    /// `generation_config.json`.
    pub fn hf_generation_config(&self) -> Json {
        let mut c = Map::new();
        c.insert("bos_token_id".into(), json!(self.bos_token_id));
        c.insert("eos_token_id".into(), json!(self.eos_token_id));
        if let Some(pad) = self.pad_token_id {
            c.insert("pad_token_id".into(), json!(pad));
        }
        Json::Object(c)
    }

    /// Every tensor the converted model must have: (HF name, torch shape).
    fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.n_heads * hd, self.n_kv_heads * hd);
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for l in 0..self.n_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            if self.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
        }
        out
    }
}

/// The Hugging Face `LlamaForCausalLM` name of a llama.cpp tensor name, or `None` when the
/// name is not part of a Llama model.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || layer.len() > 1 && layer.starts_with('0')
    {
        return None;
    }
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" if kind == "weight" => "input_layernorm",
        "ffn_norm" if kind == "weight" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's Q/K row permutation for interleaved RoPE, so that Hugging Face's
/// rotate-half RoPE applies: view the `(rows, cols)` matrix as
/// `(heads, head_dim/2, 2, cols)`, swap axes 1 and 2, and flatten back.
///
/// `data.len()` must be `rows * cols`, and `rows` a multiple of `2 * heads`.
/// A 1-D bias is the case `cols == 1`.
pub fn unpermute_qk(data: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    if heads == 0 || rows % (2 * heads) != 0 || data.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let src = h * head_dim + j * 2 + t;
                let dst = h * head_dim + t * half + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// What [`convert_llama`] did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub gguf: PathBuf,
    pub out_dir: PathBuf,
    pub hparams: LlamaHParams,
    pub tokenizer: TokenizerInfo,
    /// Number of tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Total parameters written (tied embeddings counted once).
    pub n_params: u64,
    /// GGUF tensor types and how many tensors of each, e.g. `[("F32", 61), ("Q4_1", 210)]`.
    pub source_types: Vec<(String, usize)>,
    /// Files written, in order.
    pub files: Vec<PathBuf>,
    /// Token ids of a probe text that survived an encode/decode round trip through the
    /// written `tokenizer.json`.
    pub probe_ids: Vec<u32>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// Write `path` by writing a temporary file in the same folder and renaming it.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        fs::rename(&tmp, path)
            .map_err(|e| GgufError::io(path, format!("renaming {}", tmp.display()), e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    write_atomic(path, |tmp| {
        let mut text = serde_json::to_string_pretty(value)
            .map_err(|e| GgufError::io(path, "serializing JSON", std::io::Error::other(e)))?;
        text.push('\n');
        fs::write(tmp, text).map_err(|e| GgufError::io(tmp, "writing", e))
    })
}

/// A converted tensor: HF name, torch shape, little-endian f32 bytes.
struct Converted {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn to_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn convert_tensors(
    gguf: &GgufFile,
    hp: &LlamaHParams,
    warnings: &mut Vec<String>,
) -> Result<Vec<Converted>> {
    let path = gguf.path();
    let expected: HashMap<String, Vec<usize>> = hp.expected_tensors().into_iter().collect();

    // Plan: map every GGUF tensor, refusing unknown ones (except RoPE frequency factors).
    let mut plan = Vec::new();
    for t in gguf.tensors() {
        if t.name == "rope_freqs.weight" {
            warnings.push(
                "rope_freqs.weight (Llama 3 RoPE frequency factors) was dropped: \
                 config.json has no rope_scaling for it"
                    .into(),
            );
            continue;
        }
        let hf = hf_tensor_name(&t.name).ok_or_else(|| {
            GgufError::convert(
                path,
                format!("tensor '{}' has no Llama counterpart", t.name),
            )
        })?;
        let want = expected.get(&hf).ok_or_else(|| {
            GgufError::convert(
                path,
                format!("tensor '{}' ({hf}) is not expected for this config", t.name),
            )
        })?;
        if &t.shape() != want {
            return Err(GgufError::convert(
                path,
                format!(
                    "tensor '{}' has shape {:?}, expected {want:?} for {hf}",
                    t.name,
                    t.shape()
                ),
            ));
        }
        if !t.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedType {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                ggml_type: t.ggml_type.name(),
            });
        }
        plan.push((t.name.clone(), hf, want.clone()));
    }
    if plan.len() != expected.len() {
        let have: Vec<&String> = plan.iter().map(|(_, hf, _)| hf).collect();
        let mut missing: Vec<&String> = expected.keys().filter(|k| !have.contains(k)).collect();
        missing.sort();
        return Err(GgufError::convert(
            path,
            format!("missing tensors: {missing:?}"),
        ));
    }

    // Dequantize, split over the available cores; each worker takes every k-th tensor.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let convert_one = |(gname, hf, shape): &(String, String, Vec<usize>)| -> Result<Converted> {
        let mut data = gguf.tensor_f32(gname)?;
        let heads = if hf.contains(".q_proj.") {
            Some(hp.n_heads)
        } else if hf.contains(".k_proj.") {
            Some(hp.n_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = unpermute_qk(&data, shape[0], cols, heads).ok_or_else(|| {
                GgufError::convert(
                    path,
                    format!("cannot un-permute '{gname}' with {heads} heads"),
                )
            })?;
        }
        Ok(Converted {
            name: hf.clone(),
            shape: shape.clone(),
            bytes: to_le_bytes(&data),
        })
    };
    let mut results: Vec<Option<Result<Converted>>> = (0..plan.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let plan = &plan;
                let convert_one = &convert_one;
                scope.spawn(move || {
                    (w..plan.len())
                        .step_by(workers)
                        .map(|i| (i, convert_one(&plan[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(done) => {
                    for (i, r) in done {
                        results[i] = Some(r);
                    }
                }
                Err(_) => {
                    // Leave the slots empty: reported below.
                }
            }
        }
    });
    results
        .into_iter()
        .zip(&plan)
        .map(|(r, (gname, _, _))| {
            r.unwrap_or_else(|| {
                Err(GgufError::convert(
                    path,
                    format!("a worker failed while converting '{gname}'"),
                ))
            })
        })
        .collect()
}

fn tokenizer_config(info: &TokenizerInfo, tokens: &[String], hp: &LlamaHParams) -> Json {
    let text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| json!(s));
    let mut c = Map::new();
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (k, id) in [
        ("bos_token", info.bos_token_id),
        ("eos_token", info.eos_token_id),
        ("unk_token", info.unk_token_id),
        ("pad_token", info.pad_token_id),
    ] {
        c.insert(k.into(), text(id).unwrap_or(Json::Null));
    }
    c.insert("add_bos_token".into(), json!(info.add_bos_token));
    c.insert("add_eos_token".into(), json!(info.add_eos_token));
    c.insert("add_prefix_space".into(), json!(false));
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    c.insert("model_max_length".into(), json!(hp.context_length));
    let specials: Vec<&String> = info.special_tokens.iter().map(|(_, t)| t).collect();
    c.insert("additional_special_tokens".into(), json!(specials));
    if let Some(t) = &info.chat_template {
        c.insert("chat_template".into(), json!(t));
    }
    Json::Object(c)
}

/// Convert a Llama-family GGUF file into a Hugging Face model folder:
/// `model.safetensors` (f32), `config.json`, `generation_config.json`, `tokenizer.json`
/// and `tokenizer_config.json`. Each file is written atomically; `out_dir` is created.
/// The written `tokenizer.json` is loaded back and checked on a probe text.
pub fn convert_llama(gguf_path: &Path, out_dir: &Path) -> Result<ConvertSummary> {
    let started = Instant::now();
    let gguf = GgufFile::open(gguf_path)?;
    let hp = LlamaHParams::from_gguf(&gguf)?;
    // The tokenizer first: it is cheap and fails fast on unsupported vocabularies.
    let (tokenizer, info, tokens) = build_tokenizer(&gguf)?;
    let mut warnings = info.warnings.clone();
    if info.n_tokens != hp.vocab_size {
        warnings.push(format!(
            "the tokenizer has {} tokens but the embedding has {} rows",
            info.n_tokens, hp.vocab_size
        ));
    }

    let mut source_types: Vec<(String, usize)> = Vec::new();
    for t in gguf.tensors() {
        let name = t.ggml_type.name();
        match source_types.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => source_types.push((name, 1)),
        }
    }
    source_types.sort();

    let tensors = convert_tensors(&gguf, &hp, &mut warnings)?;
    let n_params: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();

    fs::create_dir_all(out_dir).map_err(|e| GgufError::io(out_dir, "cannot create folder", e))?;
    let mut files = Vec::new();

    let st_path = out_dir.join("model.safetensors");
    write_atomic(&st_path, |tmp| {
        let mut views = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), &t.bytes)
                .map_err(|e| GgufError::convert(gguf_path, format!("tensor {}: {e}", t.name)))?;
            views.push((t.name.clone(), view));
        }
        // safetensors writes through a private temp file (mode 0600); give the result the
        // permissions an ordinary new file gets here.
        let perms = fs::File::create(tmp)
            .and_then(|f| f.metadata())
            .map_err(|e| GgufError::io(tmp, "creating", e))?
            .permissions();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::tensor::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| GgufError::io(tmp, "writing safetensors", std::io::Error::other(e)))?;
        fs::set_permissions(tmp, perms).map_err(|e| GgufError::io(tmp, "setting permissions", e))
    })?;
    files.push(st_path);
    let n_tensors = tensors.len();
    drop(tensors);

    let config_path = out_dir.join("config.json");
    write_json(&config_path, &hp.hf_config())?;
    files.push(config_path);
    let gen_path = out_dir.join("generation_config.json");
    write_json(&gen_path, &hp.hf_generation_config())?;
    files.push(gen_path);

    let tok_path = out_dir.join("tokenizer.json");
    let mut probe_ids = Vec::new();
    write_atomic(&tok_path, |tmp| {
        tokenizer
            .save(tmp, false)
            .map_err(|e| GgufError::tokenizer(tmp, format!("saving: {e}")))?;
        let loaded = Tokenizer::from_file(tmp).map_err(|e| {
            GgufError::tokenizer(tmp, format!("loading back what was written: {e}"))
        })?;
        probe_ids = check_round_trip(&loaded, PROBE_TEXT, tmp)?;
        Ok(())
    })?;
    files.push(tok_path);
    let tc_path = out_dir.join("tokenizer_config.json");
    write_json(&tc_path, &tokenizer_config(&info, &tokens, &hp))?;
    files.push(tc_path);

    Ok(ConvertSummary {
        gguf: gguf_path.to_path_buf(),
        out_dir: out_dir.to_path_buf(),
        hparams: hp,
        tokenizer: info,
        n_tensors,
        n_params,
        source_types,
        files,
        probe_ids,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}
