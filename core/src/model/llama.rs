//! A Llama-architecture decoder on tch: RMSNorm, rotary embeddings (Hugging Face's rotate-half
//! layout, optionally with Llama 3's or linear frequency scaling), grouped-query attention and a
//! SwiGLU MLP, optionally with tied embeddings.
//!
//! The families sipt implements share this decoder; each differs from Llama by one switch of
//! [`Family`]: Mistral's sliding-window attention, Qwen2's q/k/v biases, Qwen3's per-head q/k
//! RMSNorms. `super::refuse_unimplemented` reads what a family's `config.json` means and refuses
//! every field that would need more.
//!
//! Parameters live in a `VarStore` under Hugging Face's own names (`model.layers.0.self_attn.
//! q_proj.weight`, ...), so checkpoints load and save as HF-layout safetensors unchanged. The KV
//! cache is an explicit value passed to `forward`, never hidden state.

use super::fused;
use super::packed::{self, Packed, PackedBlock};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// The model's shape, read from (and written as) Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// One id or several (HF allows both).
    #[serde(default)]
    pub eos_token_id: Option<EosIds>,
    /// The architecture's family (from `model_type` when the config is read; written back as
    /// its `model_type`): what the families add to the Llama decoder is switched on by it.
    #[serde(skip)]
    pub family: Family,
    /// Scaled rotary embeddings (Llama 3.x's `llama3`, or `linear`), read from `rope_scaling`
    /// or transformers 5's `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Mistral's sliding-window attention: a query attends to itself and the `window - 1`
    /// positions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

/// The decoder families sipt implements. They share one decoder; each adds at most a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// Llama 1/2/3.x and SmolLM (`model_type` llama or smollm).
    #[default]
    Llama,
    /// Mistral: sliding-window attention.
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: an RMSNorm over each head of q and k before the rotation.
    Qwen3,
}

impl Family {
    /// The family of a `model_type`.
    pub fn of(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "llama" | "smollm" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }

    /// `model_type` and the transformers class written into a saved `config.json`.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            Family::Llama => ("llama", "LlamaForCausalLM"),
            Family::Mistral => ("mistral", "MistralForCausalLM"),
            Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        }
    }
}

/// Rotary embeddings with rescaled frequencies, as transformers computes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept, the band between
    /// interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosIds {
    One(i64),
    Many(Vec<i64>),
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_position() -> usize {
    2048
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Heads the model can compute with: positive counts, the query heads a multiple of the
    /// KV heads, a width the heads divide (unless `head_dim` is given), and an even head size
    /// (rotary embeddings turn pairs of dimensions). The error names the fields and values.
    pub fn check_heads(&self) -> Result<(), String> {
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(format!(
                "num_attention_heads = {heads} and num_key_value_heads = {kv}: expected positive counts, the first a multiple of the second"
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % heads != 0 {
            return Err(format!(
                "hidden_size = {} is not divisible by num_attention_heads = {heads} (and no head_dim is given)",
                self.hidden_size
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "a head size of {} (head_dim, or hidden_size / num_attention_heads): rotary embeddings need an even head size",
                self.head_dim()
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn eos_ids(&self) -> Vec<i64> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(EosIds::One(id)) => vec![*id],
            Some(EosIds::Many(ids)) => ids.clone(),
        }
    }

    /// Biases on the q, k and v projections (Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.family == Family::Qwen2
    }

    /// Per-head RMSNorms of q and k (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family == Family::Qwen3
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let q = h * self.num_attention_heads * hd;
        let kv = 2 * h * self.kv_heads() * hd;
        let o = self.num_attention_heads * hd * h;
        let bias = if self.qkv_bias() {
            (self.num_attention_heads + 2 * self.kv_heads()) * hd
        } else {
            0
        };
        let qk_norm = if self.qk_norm() { 2 * hd } else { 0 };
        let layer = q + kv + o + 3 * h * i + 2 * h + bias + qk_norm;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// The whole `config.json` as transformers writes it for the family's causal LM: the
    /// scaling both as `rope_scaling` (older readers) and in `rope_parameters` (transformers 5).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            let (model_type, architecture) = self.family.names();
            let mut rope = serde_json::to_value(&self.rope_scaling)
                .ok()
                .filter(|r| !r.is_null())
                .unwrap_or_else(|| serde_json::json!({"rope_type": "default"}));
            rope["rope_theta"] = self.rope_theta.into();
            map.insert("rope_parameters".into(), rope);
            if matches!(self.family, Family::Qwen2 | Family::Qwen3) {
                map.insert("use_sliding_window".into(), false.into());
            }
            map.insert("architectures".into(), serde_json::json!([architecture]));
            map.insert("model_type".into(), model_type.into());
            map.insert("hidden_act".into(), "silu".into());
            map.insert("torch_dtype".into(), "float32".into());
            map.insert("head_dim".into(), self.head_dim().into());
            map.insert("num_key_value_heads".into(), self.kv_heads().into());
            map.insert("attention_bias".into(), false.into());
            map.insert("mlp_bias".into(), false.into());
        }
        v
    }
}

/// Normal(0, std) initial values, or zeros when `std` is 0 (weights about to be loaded, which
/// need no random numbers drawn for them).
fn normal(std: f64) -> nn::Init {
    if std == 0.0 {
        nn::Init::Const(0.0)
    } else {
        nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        }
    }
}

fn linear(p: nn::Path, input: usize, output: usize, std: f64) -> nn::Linear {
    linear_with(p, input, output, std, false)
}

/// A linear layer, with a bias (initialised to zero) when `bias`.
fn linear_with(p: nn::Path, input: usize, output: usize, std: f64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        input as i64,
        output as i64,
        nn::LinearConfig {
            ws_init: normal(std),
            bs_init: bias.then_some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: usize, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[size as i64], nn::Init::Const(1.0)),
            eps,
        }
    }

    fn forward(&self, xs: &Tensor, fused: bool) -> Tensor {
        rms_norm(xs, &self.weight, self.eps, fused)
    }
}

/// The norm before block `i`'s attention, or the final norm after the last block.
fn block_norm<'a>(blocks: &'a [Block], i: usize, last: &'a RmsNorm) -> &'a RmsNorm {
    blocks.get(i).map_or(last, |b| &b.input_norm)
}

/// RMSNorm over the last dimension: normalised in f32 whatever the activation type (as HF
/// does), back in the input's type, then scaled by `weight`. With `fused`, f32 on a CPU goes
/// through [`fused::rms_norm`].
fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64, fused: bool) -> Tensor {
    if fused && fused::applies(&[xs, weight]) {
        return fused::rms_norm(xs, weight, eps);
    }
    if fused && fused::infers(&[xs, weight]) {
        // bf16 without gradients (f32 took the kernel above).
        return fused::add_rms_norm(&mut xs.shallow_clone(), None, weight, eps);
    }
    let kind = xs.kind();
    let x = xs.to_kind(Kind::Float);
    let rms = (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + eps).rsqrt();
    (x * rms).to_kind(kind) * weight
}

/// Cosine and sine tables for rotary embeddings, `(max_position, head_dim)` each.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: Device) -> Self {
        let inv_freq = inv_freq(cfg).to_device(device);
        let t = Tensor::arange(cfg.max_position_embeddings as i64, (Kind::Float, device));
        let freqs = t.outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    /// The rotations for positions `(B, T)`: as cosines and sines in `kind` for the weights'
    /// own layout, or as unit complex numbers for the paired layout of packed weights.
    fn at(&self, positions: &Tensor, kind: Kind, paired: bool) -> Rotary {
        let (b, t) = positions.size2().unwrap_or((1, 1));
        let flat = positions.reshape([-1]);
        let cos = self.cos.index_select(0, &flat).reshape([b, 1, t, -1]);
        let sin = self.sin.index_select(0, &flat).reshape([b, 1, t, -1]);
        if paired {
            // Both halves of the tables hold the same frequencies.
            let half = cos.size()[3] / 2;
            let turn = Tensor::complex(&cos.narrow(-1, 0, half), &sin.narrow(-1, 0, half));
            Rotary::Pairs(turn.transpose(1, 2))
        } else {
            Rotary::Halves(cos.to_kind(kind), sin.to_kind(kind))
        }
    }
}

/// The rotation frequencies of each pair of a head's dimensions, `(head_dim / 2,)` f32, computed
/// with the same f32 operations as transformers (so that the tables agree to the last bit).
fn inv_freq(cfg: &LlamaConfig) -> Tensor {
    let hd = cfg.head_dim() as i64;
    let exponents =
        Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / hd;
    let base = Tensor::from(cfg.rope_theta as f32);
    let inv_freq = 1.0 / base.pow(&exponents);
    match &cfg.rope_scaling {
        None => inv_freq,
        Some(RopeScaling::Linear { factor }) => inv_freq / *factor,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv_freq.full_like(2.0 * std::f64::consts::PI) / &inv_freq;
            let long = wavelen.gt(low_freq_wavelen);
            // Long wavelengths slowed down by the factor, short ones kept.
            let scaled = inv_freq.where_self(&long.logical_not(), &(&inv_freq / *factor));
            // Between the two: interpolated.
            let smooth = (wavelen.full_like(old) / &wavelen - *low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
            let medium = wavelen
                .lt(high_freq_wavelen)
                .logical_not()
                .logical_and(&long.logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// Rotary embeddings for one forward pass.
enum Rotary {
    /// `(cos, sin)`, each `(B, 1, T, head_dim)`, for heads laid out as Hugging Face does: the
    /// first half of a head's dimensions rotates against the second half.
    Halves(Tensor, Tensor),
    /// `(B, T, 1, head_dim / 2)` unit complex numbers for heads whose dimensions were reordered
    /// into (first-half, second-half) pairs (see [`pair_halves`]): the rotation is then one
    /// complex product.
    Pairs(Tensor),
}

/// Row order that interleaves each head's two halves: `j, half + j` for `j < half`, per head.
/// Applied to the rows of both the query and the key projections it leaves every attention
/// score unchanged (the same permutation on both sides of each dot product), and it turns
/// rotate-half rotary embeddings into products of complex pairs.
pub(super) fn pair_halves(heads: i64, head_dim: i64) -> Vec<i64> {
    let half = head_dim / 2;
    (0..heads)
        .flat_map(|h| (0..half).flat_map(move |j| [h * head_dim + j, h * head_dim + half + j]))
        .collect()
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&(-x2), &x1], -1)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

/// Keys and values of every layer, preallocated to a capacity; `len` positions are filled.
/// A cache made by [`KvCache::share_rows`] also holds a shared prefix: its rows then hold only
/// the positions after the prefix, and attention reads each prefix's keys and values once for
/// all the rows that continue it.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: i64,
    capacity: i64,
    shared: Option<SharedPrefix>,
}

/// Prefill keys and values `(P, kv_heads, prefix_len, head_dim)` per layer, shared by `per`
/// consecutive rows each; `mask (P, 1, 1, prefix_len)` is true at real (not padding) positions.
/// Where the fused decode attention applies, `keys_t` holds each layer's keys transposed for it
/// ([`fused::transposed_keys`]), made once for every decode step.
struct SharedPrefix {
    layers: Vec<(Tensor, Tensor)>,
    keys_t: Vec<Option<Tensor>>,
    per: i64,
    mask: Option<Tensor>,
}

/// One layer's view of a shared prefix during a decode step.
#[derive(Clone, Copy)]
struct SharedLayer<'a> {
    kv: &'a (Tensor, Tensor),
    keys_t: Option<&'a Tensor>,
    per: i64,
    mask: Option<&'a Tensor>,
}

/// One layer's view of a cache during a forward pass.
struct LayerCache<'a> {
    kv: &'a mut (Tensor, Tensor),
    start: i64,
    shared: Option<SharedLayer<'a>>,
}

impl KvCache {
    /// Layer `i`'s view of the cache for a step whose positions begin at `start`.
    fn layer(&mut self, i: usize, start: i64) -> LayerCache<'_> {
        LayerCache {
            kv: &mut self.layers[i],
            start,
            shared: self.shared.as_ref().map(|s| SharedLayer {
                kv: &s.layers[i],
                keys_t: s.keys_t[i].as_ref(),
                per: s.per,
                mask: s.mask.as_ref(),
            }),
        }
    }

    pub fn new(cfg: &LlamaConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [
            batch,
            cfg.kv_heads() as i64,
            capacity,
            cfg.head_dim() as i64,
        ];
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                (
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                )
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
            shared: None,
        }
    }

    /// Share this (prefilled) cache's rows as prefixes of `times` rows each, which get room for
    /// `capacity` more positions of their own. `valid (P, prefix_len)`, when the prefixes are
    /// padded, marks their real positions. Nothing of the prefix is copied, and each decode step
    /// reads it once per prefix instead of once per row.
    pub fn share_rows(&self, times: i64, capacity: i64, valid: Option<&Tensor>) -> KvCache {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|(k, v)| (k.narrow(2, 0, self.len), v.narrow(2, 0, self.len)))
            .collect();
        let shared = SharedPrefix {
            keys_t: layers
                .iter()
                .map(|(k, _)| fused::transposed_keys(k))
                .collect(),
            layers,
            per: times,
            mask: valid.map(|m| {
                let (p, l) = m.size2().unwrap_or((1, 1));
                m.view([p, 1, 1, l])
            }),
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, _)| {
                let (b, h, _, d) = k.size4().unwrap_or((1, 1, 1, 1));
                let shape = [b * times, h, capacity, d];
                (
                    Tensor::zeros(shape, (k.kind(), k.device())),
                    Tensor::zeros(shape, (k.kind(), k.device())),
                )
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
            shared: Some(shared),
        }
    }

    /// The element type a cache should have for a model of `kind` on `device`. On a CPU,
    /// libtorch's fused attention over a strided bf16/f16 cache is an order of magnitude slower
    /// than over f32 for one-token decoding, so 16-bit models keep an f32 cache there.
    pub fn kind_for(kind: Kind, device: Device) -> Kind {
        if device == Device::Cpu {
            Kind::Float
        } else {
            kind
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }
}

pub(super) struct Attention {
    pub(super) q: nn::Linear,
    pub(super) k: nn::Linear,
    pub(super) v: nn::Linear,
    pub(super) o: nn::Linear,
    /// Qwen3's RMSNorms over each head of q and of k (before the rotation).
    pub(super) qk_norm: Option<(RmsNorm, RmsNorm)>,
    pub(super) heads: i64,
    pub(super) kv_heads: i64,
    pub(super) head_dim: i64,
    /// Mistral's sliding window: keys more than `window - 1` positions back are not seen.
    window: Option<i64>,
}

impl Attention {
    fn new(p: nn::Path, cfg: &LlamaConfig, std: f64, out_std: f64) -> Self {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let bias = cfg.qkv_bias();
        Attention {
            q: linear_with(&p / "q_proj", h, cfg.num_attention_heads * hd, std, bias),
            k: linear_with(&p / "k_proj", h, cfg.kv_heads() * hd, std, bias),
            v: linear_with(&p / "v_proj", h, cfg.kv_heads() * hd, std, bias),
            o: linear(&p / "o_proj", cfg.num_attention_heads * hd, h, out_std),
            qk_norm: cfg.qk_norm().then(|| {
                (
                    RmsNorm::new(&p / "q_norm", hd, cfg.rms_norm_eps),
                    RmsNorm::new(&p / "k_norm", hd, cfg.rms_norm_eps),
                )
            }),
            heads: cfg.num_attention_heads as i64,
            kv_heads: cfg.kv_heads() as i64,
            head_dim: hd as i64,
            window: cfg.sliding_window.map(|w| w as i64),
        }
    }

    /// Where a sliding window hides keys from queries at cache indices `first..first + queries`
    /// over keys `0..keys`: `(queries, keys)`, true where a key may be seen (causal, and less
    /// than the window back, as transformers masks it). `None` when no query reaches past the
    /// window.
    fn window_band(&self, first: i64, queries: i64, keys: i64, device: Device) -> Option<Tensor> {
        let w = self.window?;
        if first + queries <= w {
            return None;
        }
        let q = Tensor::arange_start(first, first + queries, (Kind::Int64, device)).unsqueeze(1);
        let k = Tensor::arange(keys, (Kind::Int64, device)).unsqueeze(0);
        Some(k.le_tensor(&q).logical_and(&k.gt_tensor(&(q - w))))
    }

    /// q, k and v `(B, heads, T, hd)` from one product with the three matrices side by side,
    /// q and k rotated together by the fused kernel (`cos`, `sin` `(B, 1, T, hd)`): one
    /// product and one rotation where the plain path has three and two, each with its
    /// gradient. The splits are views, and their gradients are one concatenation each.
    fn fused_qkv(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = xs.size3().unwrap_or((1, 1, 1));
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        let weight = Tensor::cat(&[&self.q.ws, &self.k.ws, &self.v.ws], 0);
        let bias = match (&self.q.bs, &self.k.bs, &self.v.bs) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)),
            _ => None,
        };
        let qkv = xs.linear(&weight, bias.as_ref());
        let parts = qkv.split_with_sizes([(heads + kv_heads) * hd, kv_heads * hd], -1);
        let qk = fused::rope(
            &parts[0].reshape([b * t, heads + kv_heads, hd]),
            &cos.view([b * t, hd]),
            &sin.view([b * t, hd]),
        );
        let qk = qk.split_with_sizes([heads, kv_heads], 1);
        let heads_first = |x: &Tensor, n: i64| x.view([b, t, n, hd]).transpose(1, 2);
        (
            heads_first(&qk[0], heads),
            heads_first(&qk[1], kv_heads),
            heads_first(&parts[1], kv_heads),
        )
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rotary,
        mask: Option<&Tensor>,
        mut cache: Option<LayerCache>,
        packed: Option<&PackedBlock>,
        fused: bool,
    ) -> Result<Tensor, String> {
        let (b, t, _) = xs.size3().unwrap_or((1, 1, 1));
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        // Whether this step's keys and values are in the cache already.
        let mut cached_kv = false;
        let (q, k, v) = match (packed, rope) {
            (Some(p), Rotary::Pairs(turn)) => {
                // One product for q, k and v; q and k (paired rows) rotate together in f32.
                let mut qkv = packed::linear(xs, &p.qkv)?;
                if let Some(bias) = &p.qkv_bias {
                    qkv += bias;
                }
                // A cached step without per-head norms rotates and caches in one kernel.
                if let Some(c) = cache
                    .as_mut()
                    .filter(|c| fused && p.qk_norm.is_none() && fused::caches_pairs(&qkv, &c.kv.0))
                {
                    let (ck, cv) = (&mut c.kv.0, &mut c.kv.1);
                    let q =
                        fused::qkv_pairs_into_cache(&qkv, turn, ck, cv, c.start, heads, kv_heads);
                    cached_kv = true;
                    let (k, v) = (ck.narrow(2, c.start, t), cv.narrow(2, c.start, t));
                    (q.transpose(1, 2), k, v)
                } else {
                    let v = qkv.narrow(-1, (heads + kv_heads) * hd, kv_heads * hd);
                    let mut qk = qkv
                        .narrow(-1, 0, (heads + kv_heads) * hd)
                        .to_kind(Kind::Float)
                        .view([b, t, heads + kv_heads, hd]);
                    if let (Some((q_norm, k_norm)), Some((own, _))) = (&p.qk_norm, &self.qk_norm) {
                        // The norms' weights come in the paired order of the rows.
                        qk = Tensor::cat(
                            &[
                                rms_norm(&qk.narrow(2, 0, heads), q_norm, own.eps, fused),
                                rms_norm(&qk.narrow(2, heads, kv_heads), k_norm, own.eps, fused),
                            ],
                            2,
                        );
                    }
                    let qk = qk
                        .view([b, t, heads + kv_heads, hd / 2, 2])
                        .view_as_complex()
                        * turn;
                    let qk = qk.view_as_real().view([b, t, heads + kv_heads, hd]);
                    // Attention runs in the cache's type (see `KvCache::kind_for`).
                    let kind = cache.as_ref().map_or(xs.kind(), |c| c.kv.0.kind());
                    (
                        qk.narrow(2, 0, heads).transpose(1, 2).to_kind(kind),
                        qk.narrow(2, heads, kv_heads).transpose(1, 2).to_kind(kind),
                        v.view([b, t, kv_heads, hd]).transpose(1, 2),
                    )
                }
            }
            (_, Rotary::Halves(cos, sin))
                if fused
                    && self.qk_norm.is_none()
                    && cos.size() == [b, 1, t, hd]
                    && fused::applies(&[xs, &self.q.ws, cos, sin]) =>
            {
                self.fused_qkv(xs, cos, sin)
            }
            (_, Rotary::Halves(cos, sin)) => {
                let mut q = self.q.forward(xs).view([b, t, heads, hd]);
                let mut k = self.k.forward(xs).view([b, t, kv_heads, hd]);
                if let Some((q_norm, k_norm)) = &self.qk_norm {
                    q = q_norm.forward(&q, fused);
                    k = k_norm.forward(&k, fused);
                }
                let (q, k) = (q.transpose(1, 2), k.transpose(1, 2));
                let v = self
                    .v
                    .forward(xs)
                    .view([b, t, kv_heads, hd])
                    .transpose(1, 2);
                (apply_rope(&q, cos, sin), apply_rope(&k, cos, sin), v)
            }
            (None, Rotary::Pairs(_)) => unreachable!("paired rotations come with packed weights"),
        };
        // The output projection of the heads' results `(B, heads, T, hd)`.
        let o = |y: Tensor| {
            let y = y
                .transpose(1, 2)
                .reshape([b, t, self.heads * self.head_dim])
                .to_kind(xs.kind());
            match packed {
                Some(p) => packed::linear(&y, &p.o),
                None => Ok(self.o.forward(&y)),
            }
        };
        if let Some(LayerCache {
            kv: (ck, cv),
            start,
            shared: Some(shared),
        }) = cache
        {
            if !cached_kv {
                ck.narrow(2, start, t).copy_(&k);
                cv.narrow(2, start, t).copy_(&v);
            }
            let own = (ck.narrow(2, 0, start + t), cv.narrow(2, 0, start + t));
            // The prefix fills cache indices 0..Lp, the row's own positions follow.
            let lp = shared.kv.0.size()[2];
            let band = self.window_band(lp + start, t, lp + start + t, xs.device());
            let q = q.to_kind(ck.kind());
            let keys = DecodeKeys {
                prefix: shared.kv,
                prefix_t: shared.keys_t,
                own: &own,
                per: shared.per,
                prefix_mask: shared.mask,
                band: band.as_ref(),
            };
            let y = if fused
                && t == 1
                && shared.mask.map_or(true, |m| m.kind() == Kind::Bool)
                && fused::applies(&[&q, &shared.kv.0, &shared.kv.1, &own.0, &own.1])
            {
                fused::decode_attention(&q, &keys)
            } else {
                shared_prefix_attention(&q, &keys)
            };
            return o(y);
        }
        let first = cache.as_ref().map_or(0, |c| c.start);
        let cached = cache.is_some();
        let (q, k, v) = match cache {
            Some(LayerCache {
                kv: (ck, cv),
                start,
                ..
            }) => {
                if !cached_kv {
                    ck.narrow(2, start, t).copy_(&k);
                    cv.narrow(2, start, t).copy_(&v);
                }
                // The cache may hold a wider type than the weights (f32 for a bf16 model on a
                // CPU, see `KvCache::kind_for`); attention then runs in the cache's type.
                (
                    q.to_kind(ck.kind()),
                    ck.narrow(2, 0, start + t),
                    cv.narrow(2, 0, start + t),
                )
            }
            None => (q, k, v),
        };
        let keys = k.size()[2];
        // The kernel takes no mask or a decode step's: one bool row of keys per row.
        let row_mask = mask.map_or(true, |m| {
            m.kind() == Kind::Bool && m.size() == [b, 1, 1, keys]
        });
        if fused && cached && t == 1 && row_mask && fused::applies(&[&q, &k, &v]) {
            // A decode step without a shared prefix: each row's cache is a "prefix" of its own
            // (one row per prefix, no positions after it).
            let band = self.window_band(first, 1, keys, xs.device());
            let rows = (k.shallow_clone(), v.shallow_clone());
            let after = (k.narrow(2, 0, 0), v.narrow(2, 0, 0));
            let keys = DecodeKeys {
                prefix: &rows,
                prefix_t: None,
                own: &after,
                per: 1,
                prefix_mask: mask,
                band: band.as_ref(),
            };
            return o(fused::decode_attention(&q, &keys));
        }
        let gqa = self.kv_heads != self.heads;
        let banded;
        let mask = match self.window_band(first, t, keys, xs.device()) {
            Some(band) => {
                let band = band.view([1, 1, t, -1]);
                banded = match mask {
                    Some(m) => m.logical_and(&band),
                    None => band,
                };
                Some(&banded)
            }
            None => mask,
        };
        let y = match mask {
            // Training and scoring: plain causal attention, the fastest kernels.
            None => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                t > 1,
                None,
                gqa,
            ),
            Some(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa)
            }
        };
        o(y)
    }
}

/// What the attention of a decode step reads besides its queries: a shared prefix (`prefix`:
/// keys and values `(P, KV, Lp, D)`, rows `p*per .. (p+1)*per` continue prefix `p`;
/// `prefix_mask (P, 1, 1, Lp)` bool, true at real positions) followed by each row's own
/// positions (`own`: `(R, KV, S, D)`, all valid); `band (1, Lp + S)` the keys a sliding window
/// still sees.
#[derive(Clone, Copy)]
pub(super) struct DecodeKeys<'a> {
    pub(super) prefix: &'a (Tensor, Tensor),
    /// The prefix's keys as [`fused::transposed_keys`] lays them out, for the fused kernel.
    pub(super) prefix_t: Option<&'a Tensor>,
    pub(super) own: &'a (Tensor, Tensor),
    pub(super) per: i64,
    pub(super) prefix_mask: Option<&'a Tensor>,
    pub(super) band: Option<&'a Tensor>,
}

/// Attention of one new position per row, `q (R, H, 1, D)`, over `keys`: one softmax over the
/// prefix and the row's own positions. Returns `(R, H, 1, D)`.
pub(super) fn shared_prefix_attention(q: &Tensor, keys: &DecodeKeys) -> Tensor {
    let DecodeKeys {
        prefix,
        own,
        per,
        prefix_mask,
        band,
        prefix_t: _,
    } = *keys;
    let (r, h, _, d) = q.size4().unwrap_or((1, 1, 1, 1));
    let (p, kv, lp, _) = prefix.0.size4().unwrap_or((1, 1, 1, 1));
    let g = h / kv;
    let scale = 1.0 / (d as f64).sqrt();
    // Query head kv*g + i uses key/value head kv (grouped-query attention).
    let q_rows = q.reshape([r, kv, g, d]);
    // All rows of a prefix against its keys at once: (P, KV, per*G, Lp).
    let q_prefix = q_rows
        .view([p, per, kv, g, d])
        .permute([0, 2, 1, 3, 4])
        .reshape([p, kv, per * g, d]);
    let mut s_prefix = q_prefix.matmul(&prefix.0.transpose(-1, -2)) * scale;
    if let Some(m) = prefix_mask {
        s_prefix = s_prefix.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
    }
    let s_prefix = s_prefix
        .view([p, kv, per, g, lp])
        .permute([0, 2, 1, 3, 4])
        .reshape([r, kv, g, lp]);
    let s_own = q_rows.matmul(&own.0.transpose(-1, -2)) * scale;
    let mut scores = Tensor::cat(&[&s_prefix, &s_own], -1);
    if let Some(band) = band {
        // (1, Lp + S): the keys a sliding window still sees.
        scores = scores.masked_fill(&band.logical_not().view([1, 1, 1, -1]), f64::NEG_INFINITY);
    }
    let probs = scores.softmax(-1, q.kind());
    let p_prefix = probs
        .narrow(-1, 0, lp)
        .view([p, per, kv, g, lp])
        .permute([0, 2, 1, 3, 4])
        .reshape([p, kv, per * g, lp]);
    let o_prefix = p_prefix
        .matmul(&prefix.1)
        .view([p, kv, per, g, d])
        .permute([0, 2, 1, 3, 4])
        .reshape([r, kv, g, d]);
    let s = own.0.size()[2];
    let o_own = probs.narrow(-1, lp, s).matmul(&own.1);
    (o_prefix + o_own).reshape([r, h, 1, d])
}

pub(super) struct Mlp {
    pub(super) gate: nn::Linear,
    pub(super) up: nn::Linear,
    pub(super) down: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &LlamaConfig, std: f64, out_std: f64) -> Self {
        Mlp {
            gate: linear(
                &p / "gate_proj",
                cfg.hidden_size,
                cfg.intermediate_size,
                std,
            ),
            up: linear(&p / "up_proj", cfg.hidden_size, cfg.intermediate_size, std),
            down: linear(
                &p / "down_proj",
                cfg.intermediate_size,
                cfg.hidden_size,
                out_std,
            ),
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        packed: Option<&PackedBlock>,
        fused: bool,
    ) -> Result<Tensor, String> {
        let swiglu = |gate: &Tensor, up: &Tensor| {
            if fused && (fused::applies(&[gate, up]) || fused::infers(&[gate, up])) {
                fused::swiglu(gate, up)
            } else {
                gate.silu() * up
            }
        };
        match packed {
            Some(p) => {
                // A view when the packed weight is padded: the halves read it strided.
                let gate_up = packed::linear_strided(xs, &p.gate_up)?;
                let i = p.gate_up.out_features() / 2;
                let h = swiglu(&gate_up.narrow(-1, 0, i), &gate_up.narrow(-1, i, i));
                packed::linear(&h, &p.down)
            }
            None => Ok(self
                .down
                .forward(&swiglu(&self.gate.forward(xs), &self.up.forward(xs)))),
        }
    }
}

pub(super) struct Block {
    input_norm: RmsNorm,
    pub(super) attn: Attention,
    post_norm: RmsNorm,
    pub(super) mlp: Mlp,
}

/// A Llama causal language model.
pub struct Llama {
    pub config: LlamaConfig,
    pub(super) embed: Tensor,
    pub(super) blocks: Vec<Block>,
    norm: RmsNorm,
    pub(super) lm_head: Option<Tensor>,
    rope: Rope,
    /// Whether RMSNorm, SwiGLU and rotary embeddings run through the fused kernels of
    /// [`fused`] where they apply (f32 on a CPU, and bf16 on a CPU without gradients; on by
    /// default). Off, every layer is libtorch's
    /// own ops: the plain path that tests and benchmarks compare against.
    pub fused_layers: bool,
    /// Whether [`Llama::pack`] lays f32 weights out in panels for sipt's own AVX-512 products
    /// where the CPU has them (on by default), instead of in oneDNN's format for its kernels
    /// (see [`super::packed`]).
    pub panel_products: bool,
}

/// How attention sees a batch: plain causal (no padding) or with an explicit mask.
pub struct Batch<'a> {
    pub ids: &'a Tensor,
    /// Positions `(B, T)`; `None` = `0..T` for every row.
    pub positions: Option<&'a Tensor>,
    /// Boolean `(B, 1, T, T_total)`, true where attention is allowed; `None` = causal.
    pub mask: Option<&'a Tensor>,
}

impl Llama {
    /// Create the model's variables under `vs.root()`, initialised for training from scratch
    /// (normal 0.02; residual output projections scaled down by the depth, as in GPT-2).
    pub fn new(vs: &nn::VarStore, config: LlamaConfig) -> Self {
        Self::with_init(vs, config, 0.02)
    }

    /// Create the model's variables with zero weight matrices (norms at 1), for weights that
    /// are loaded or copied right after: no random numbers are drawn.
    pub fn zeroed(vs: &nn::VarStore, config: LlamaConfig) -> Self {
        Self::with_init(vs, config, 0.0)
    }

    fn with_init(vs: &nn::VarStore, config: LlamaConfig, std: f64) -> Self {
        let root = vs.root();
        let out_std = std / (2.0 * config.num_hidden_layers as f64).sqrt();
        let model = &root / "model";
        let embed = (&model / "embed_tokens").var(
            "weight",
            &[config.vocab_size as i64, config.hidden_size as i64],
            normal(std),
        );
        let layers = &model / "layers";
        let blocks = (0..config.num_hidden_layers)
            .map(|i| {
                let p = &layers / i;
                Block {
                    input_norm: RmsNorm::new(
                        &p / "input_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                    attn: Attention::new(&p / "self_attn", &config, std, out_std),
                    post_norm: RmsNorm::new(
                        &p / "post_attention_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                    mlp: Mlp::new(&p / "mlp", &config, std, out_std),
                }
            })
            .collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            (&root / "lm_head").var(
                "weight",
                &[config.vocab_size as i64, config.hidden_size as i64],
                normal(std),
            )
        });
        let rope = Rope::new(&config, vs.device());
        Llama {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            fused_layers: true,
            panel_products: true,
        }
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// The type of the weights (and so of the activations and the KV cache).
    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    /// Final hidden states `(B, T, hidden)`. With a cache, the batch continues after the
    /// cache's filled positions and fills them further.
    pub fn hidden(&self, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor {
        match self.hidden_with(batch, cache, None) {
            Ok(h) => h,
            // Only the packed kernels report errors; libtorch's own ops panic through tch.
            Err(e) => unreachable!("unpacked forward failed: {e}"),
        }
    }

    /// [`Llama::hidden`], with the weight matrices of [`Llama::pack`] when given (inference
    /// only: no gradient reaches the variables through them). Fails only where a packed kernel
    /// refuses its input.
    pub fn hidden_with(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache>,
        packed: Option<&Packed>,
    ) -> Result<Tensor, String> {
        let (b, t) = batch.ids.size2().unwrap_or((1, 1));
        let start = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let default_positions;
        let positions = match batch.positions {
            Some(p) => p,
            None => {
                default_positions =
                    Tensor::arange_start(start, start + t, (Kind::Int64, self.device()))
                        .unsqueeze(0)
                        .expand([b, t], false);
                &default_positions
            }
        };
        let rope = self.rope.at(positions, self.embed.kind(), packed.is_some());
        let mut x = Tensor::embedding(&self.embed, batch.ids, -1, false, false);
        let fused = self.fused_layers;
        // Without gradients (decoding, scoring under no_grad), each residual add runs in place
        // in one kernel with the norm after it, and `normed` carries the next block's input
        // norm. `x` is the embedding's fresh output, then only ever added into. With gradients
        // the adds must not be in place: autograd keeps `x` for the backward pass.
        let in_place = fused && fused::infers(&[&x, &self.norm.weight]);
        let mut normed = None;
        if in_place {
            x = x.contiguous();
            normed = Some(block_norm(&self.blocks, 0, &self.norm).forward(&x, fused));
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layer(i, start));
            let block_packed = packed.map(|p| &p.blocks[i]);
            let input = match normed.take() {
                Some(n) => n,
                None => block.input_norm.forward(&x, fused),
            };
            let h =
                block
                    .attn
                    .forward(&input, &rope, batch.mask, layer_cache, block_packed, fused)?;
            if in_place {
                let post = &block.post_norm;
                let h = block.mlp.forward(
                    &fused::add_rms_norm(&mut x, Some(&h), &post.weight, post.eps),
                    block_packed,
                    fused,
                )?;
                let next = block_norm(&self.blocks, i + 1, &self.norm);
                normed = Some(fused::add_rms_norm(
                    &mut x,
                    Some(&h),
                    &next.weight,
                    next.eps,
                ));
            } else {
                x = &x + h;
                x = &x
                    + block.mlp.forward(
                        &block.post_norm.forward(&x, fused),
                        block_packed,
                        fused,
                    )?;
            }
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        Ok(normed.unwrap_or_else(|| self.norm.forward(&x, fused)))
    }

    /// Logits for hidden states of any shape `(..., hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).tr())
    }

    /// [`Llama::logits`], with the packed output matrix of [`Llama::pack`] when given.
    pub fn logits_with(&self, hidden: &Tensor, packed: Option<&Packed>) -> Result<Tensor, String> {
        match packed {
            Some(p) => packed::linear(hidden, &p.lm_head),
            None => Ok(self.logits(hidden)),
        }
    }

    /// Logits `(B, T, vocab)` for every position.
    pub fn forward(&self, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor {
        self.logits(&self.hidden(batch, cache))
    }

    /// The output layer's weight `(vocab, hidden)`: `lm_head`, or the embedding when tied.
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Mean next-token cross-entropy of `tokens (B, T+1)`: inputs `[..T]`, targets `[1..]`.
    /// The output layer and the loss run in chunks of rows ([`chunked_cross_entropy`]): the
    /// full `(B·T, vocab)` logits never exist, forward or backward.
    pub fn ntp_loss(&self, tokens: &Tensor) -> Tensor {
        let (inputs, targets) = next_token_pairs(tokens);
        let hidden = self.hidden(
            &Batch {
                ids: &inputs,
                positions: None,
                mask: None,
            },
            None,
        );
        let d = hidden.size().last().copied().unwrap_or(1);
        chunked_cross_entropy(
            &hidden.reshape([-1, d]),
            self.output_weight(),
            &targets.reshape([-1]),
            chunk_rows(self.config.vocab_size),
            self.fused_layers,
        )
    }

    /// [`Llama::ntp_loss`] through the full logits and libtorch's own cross-entropy: the plain
    /// path the chunked one is tested and benchmarked against.
    pub fn ntp_loss_unchunked(&self, tokens: &Tensor) -> Tensor {
        let (inputs, targets) = next_token_pairs(tokens);
        let logits = self.forward(
            &Batch {
                ids: &inputs,
                positions: None,
                mask: None,
            },
            None,
        );
        logits
            .to_kind(Kind::Float)
            .reshape([-1, self.config.vocab_size as i64])
            .cross_entropy_for_logits(&targets.reshape([-1]))
    }
}

/// Inputs `[..T]` and targets `[1..]` of next-token windows `(B, T+1)`.
fn next_token_pairs(tokens: &Tensor) -> (Tensor, Tensor) {
    let t = tokens.size()[1];
    (tokens.narrow(1, 0, t - 1), tokens.narrow(1, 1, t - 1))
}

/// Rows of logits computed at once by the chunked output layer: about 8M logits (32 MB in f32).
pub fn chunk_rows(vocab: usize) -> i64 {
    ((8usize << 20) / vocab.max(1)).max(16) as i64
}

/// One chunk of rows of the output layer: rows `start..start + len`, their f32 logits
/// `(len, V)` and their targets `(len,)`.
struct LogitChunk {
    start: i64,
    len: i64,
    logits: Tensor,
    targets: Tensor,
}

/// What a chunk's gradient for its logits is scaled by: `1 / n` for every row (a mean over
/// `n` rows), or a weight per row `(len,)` f32.
enum RowScale<'a> {
    Mean(i64),
    Rows(&'a Tensor),
}

impl LogitChunk {
    /// The NLL `(len,)` f32 of each row at its target. With `grad`, the logits are then
    /// overwritten by the gradient of the scaled NLLs for them: (softmax − one-hot) × the scale.
    /// `fused`: through [`fused::cross_entropy_rows`] where it applies (f32 on a CPU: three
    /// passes over each row, where libtorch's ops take six).
    fn nll(&mut self, fused: bool, grad: Option<RowScale>) -> Tensor {
        if fused && self.logits.is_contiguous() && fused::applies(&[&self.logits]) {
            let (weights, scale) = match &grad {
                Some(RowScale::Rows(w)) => (Some(*w), 1.0),
                Some(RowScale::Mean(n)) => (None, 1.0 / *n as f64),
                None => (None, 1.0),
            };
            return fused::cross_entropy_rows(
                &mut self.logits,
                &self.targets,
                weights,
                scale,
                grad.is_some(),
            );
        }
        let targets = self.targets.unsqueeze(1);
        let lse = self.logits.logsumexp([-1], true);
        let picked = self.logits.gather(1, &targets, false);
        if let Some(scale) = grad {
            // In place over the logits.
            let p = &mut self.logits;
            let _ = p.g_sub_(&lse).exp_();
            let _ = p.scatter_add_(
                1,
                &targets,
                &Tensor::full([self.len, 1], -1.0, (Kind::Float, p.device())),
            );
            match scale {
                RowScale::Rows(w) => {
                    let _ = p.g_mul_(&w.unsqueeze(1));
                }
                RowScale::Mean(n) => {
                    let _ = p.g_div_scalar_(n as f64);
                }
            }
        }
        (lse - picked).squeeze_dim(1)
    }
}

/// Call `f` with the logits `hidden (N, d) · weight (V, d)ᵀ`, `rows` rows at a time.
fn for_each_logit_chunk(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    rows: i64,
    mut f: impl FnMut(LogitChunk),
) {
    let n = hidden.size()[0];
    // f32 products on a CPU write every chunk into one buffer: a fresh 32 MB tensor per chunk
    // would be a fresh mapping from the system each time (glibc maps blocks that large and
    // unmaps them when freed), and its pages would fault in anew.
    let reuse = hidden.device() == Device::Cpu
        && hidden.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && n > rows;
    let buffer =
        reuse.then(|| Tensor::empty([rows, weight.size()[0]], (Kind::Float, hidden.device())));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let chunk = hidden.narrow(0, start, len);
        let logits = match &buffer {
            Some(buf) => chunk.mm_out(&buf.narrow(0, 0, len), &weight.tr()),
            None => chunk.matmul(&weight.tr()).to_kind(Kind::Float),
        };
        f(LogitChunk {
            start,
            len,
            logits,
            targets: targets.narrow(0, start, len),
        });
        start += len;
    }
}

/// `log softmax(hidden · weightᵀ)` at `targets`, `rows` rows of logits at a time (call it
/// without gradients): `(N,)` f32.
pub fn chunked_token_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    rows: i64,
    fused: bool,
) -> Tensor {
    let mut parts = Vec::new();
    for_each_logit_chunk(hidden, weight, targets, rows, |mut c| {
        parts.push(-c.nll(fused, None));
    });
    if parts.is_empty() {
        return Tensor::zeros([0], (Kind::Float, hidden.device()));
    }
    Tensor::cat(&parts, 0)
}

/// Mean cross-entropy of the logits `hidden (N, d) · weight (V, d)ᵀ` against `targets (N,)`,
/// `rows` rows of logits at a time, never all `N × V` of them. The gradient is computed in the
/// same pass, chunk by chunk (softmax minus one-hot, times the weight for the hidden states; its
/// transpose times the hidden states for the weight), and attached through a surrogate whose
/// value is zero and whose gradients are those: autograd then carries them into the rest of
/// the model, scaled by whatever multiplies the loss. Under `no_grad` (or with neither input
/// requiring a gradient) only the loss is computed. `fused`: each chunk's softmax through the
/// fused kernel where it applies (see `LogitChunk::nll`).
pub fn chunked_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    rows: i64,
    fused: bool,
) -> Tensor {
    chunked_nll(hidden, weight, targets, None, rows, fused)
}

/// `Σ weights · (−log softmax(hidden · weightᵀ) at targets)` over the rows, computed as
/// [`chunked_cross_entropy`] is (the full logits never exist, the gradient attached by a
/// zero-valued surrogate), with a weight `(N,)` f32 per row instead of `1 / N` each: the
/// gradient of a loss that depends on sums of token log-probs, once the loss's gradient with
/// respect to each sum is known.
pub fn chunked_weighted_nll(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    row_weights: &Tensor,
    rows: i64,
    fused: bool,
) -> Tensor {
    chunked_nll(hidden, weight, targets, Some(row_weights), rows, fused)
}

/// [`chunked_cross_entropy`] (`row_weights` `None`: the mean) and [`chunked_weighted_nll`].
fn chunked_nll(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    row_weights: Option<&Tensor>,
    rows: i64,
    fused: bool,
) -> Tensor {
    let n = hidden.size()[0];
    let wants_grad = hidden.requires_grad() || weight.requires_grad();
    let (sum, grads) = tch::no_grad(|| {
        let h = hidden.detach();
        let w = weight.detach();
        let mut sum = Tensor::zeros([], (Kind::Float, h.device()));
        let mut grad_h = wants_grad.then(|| Tensor::empty_like(&h));
        let mut grad_w: Option<Tensor> = None;
        for_each_logit_chunk(&h, &w, targets, rows, |mut c| {
            let rw = row_weights.map(|r| r.narrow(0, c.start, c.len));
            // d(loss)/d(logits) = (softmax − one-hot) × the row's weight (1 / N for the mean),
            // left in the logits.
            let scale = grad_h.is_some().then_some(match &rw {
                Some(rw) => RowScale::Rows(rw),
                None => RowScale::Mean(n),
            });
            let nll = c.nll(fused, scale);
            match &rw {
                Some(rw) => sum += (rw * nll).sum(Kind::Float),
                None => sum += nll.sum(Kind::Float),
            }
            if let Some(gh) = grad_h.as_mut() {
                let p = c.logits.to_kind(w.kind());
                gh.narrow(0, c.start, c.len).copy_(&p.matmul(&w));
                // Summed over the chunks in f32, whatever type the products come in.
                let part = p
                    .tr()
                    .matmul(&h.narrow(0, c.start, c.len))
                    .to_kind(Kind::Float);
                match grad_w.as_mut() {
                    Some(g) => {
                        let _ = g.g_add_(&part);
                    }
                    None => grad_w = Some(part),
                }
            }
        });
        (sum, grad_h.zip(grad_w))
    });
    let loss = match row_weights {
        Some(_) => sum,
        None => sum / n as f64,
    };
    match grads {
        Some((gh, gw)) => {
            // Zero in value; gradient gh for the hidden states and gw for the weight.
            let surrogate = (hidden * &gh).sum(Kind::Float)
                + (weight * gw.to_kind(weight.kind())).sum(Kind::Float);
            loss + &surrogate - surrogate.detach()
        }
        None => loss,
    }
}
