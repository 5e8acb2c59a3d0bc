//! A Llama-architecture decoder on tch: RMSNorm, rotary embeddings (Hugging Face's rotate-half
//! layout), grouped-query attention and a SwiGLU MLP, optionally with tied embeddings.
//!
//! Parameters live in a `VarStore` under Hugging Face's own names (`model.layers.0.self_attn.
//! q_proj.weight`, ...), so checkpoints load and save as HF-layout safetensors unchanged. The KV
//! cache is an explicit value passed to `forward`, never hidden state.

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
    /// Biases on the q, k and v projections (Qwen2's architecture; set from `model_type` when
    /// the config is read, written back as `model_type = "qwen2"`).
    #[serde(default, skip_serializing)]
    pub qkv_bias: bool,
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

    /// Parameter count (embeddings counted once when tied).
    pub fn parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let q = h * self.num_attention_heads * hd;
        let kv = 2 * h * self.kv_heads() * hd;
        let o = self.num_attention_heads * hd * h;
        let layer = q + kv + o + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// The whole `config.json` as Hugging Face writes it for LlamaForCausalLM.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            let (model_type, architecture) = if self.qkv_bias {
                ("qwen2", "Qwen2ForCausalLM")
            } else {
                ("llama", "LlamaForCausalLM")
            };
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

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: usize, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[size as i64], nn::Init::Const(1.0)),
            eps,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        // Normalise in f32 whatever the activation type (as HF does), then scale.
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let rms = (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
        (x * rms).to_kind(kind) * &self.weight
    }
}

/// Cosine and sine tables for rotary embeddings, `(max_position, head_dim)` each.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: Device) -> Self {
        let hd = cfg.head_dim() as i64;
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
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
struct SharedPrefix {
    layers: Vec<(Tensor, Tensor)>,
    per: i64,
    mask: Option<Tensor>,
}

/// One layer's view of a cache during a forward pass.
struct LayerCache<'a> {
    kv: &'a mut (Tensor, Tensor),
    start: i64,
    /// The shared prefix's keys and values, rows per prefix, and padding mask.
    shared: Option<(&'a (Tensor, Tensor), i64, Option<&'a Tensor>)>,
}

impl KvCache {
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
        let shared = SharedPrefix {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k.narrow(2, 0, self.len), v.narrow(2, 0, self.len)))
                .collect(),
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
    pub(super) heads: i64,
    pub(super) kv_heads: i64,
    pub(super) head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &LlamaConfig, std: f64, out_std: f64) -> Self {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        Attention {
            q: linear_with(
                &p / "q_proj",
                h,
                cfg.num_attention_heads * hd,
                std,
                cfg.qkv_bias,
            ),
            k: linear_with(&p / "k_proj", h, cfg.kv_heads() * hd, std, cfg.qkv_bias),
            v: linear_with(&p / "v_proj", h, cfg.kv_heads() * hd, std, cfg.qkv_bias),
            o: linear(&p / "o_proj", cfg.num_attention_heads * hd, h, out_std),
            heads: cfg.num_attention_heads as i64,
            kv_heads: cfg.kv_heads() as i64,
            head_dim: hd as i64,
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<LayerCache>,
        packed: Option<&PackedBlock>,
    ) -> Result<Tensor, String> {
        let (b, t, _) = xs.size3().unwrap_or((1, 1, 1));
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = match (packed, rope) {
            (Some(p), Rotary::Pairs(turn)) => {
                // One product for q, k and v; q and k (paired rows) rotate together in f32.
                let mut qkv = packed::linear(xs, &p.qkv)?;
                if let Some(bias) = &p.qkv_bias {
                    qkv += bias;
                }
                let v = qkv.narrow(-1, (heads + kv_heads) * hd, kv_heads * hd);
                let qk = qkv
                    .narrow(-1, 0, (heads + kv_heads) * hd)
                    .to_kind(Kind::Float)
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
            (_, Rotary::Halves(cos, sin)) => {
                let q = self.q.forward(xs).view([b, t, heads, hd]).transpose(1, 2);
                let k = self
                    .k
                    .forward(xs)
                    .view([b, t, kv_heads, hd])
                    .transpose(1, 2);
                let v = self
                    .v
                    .forward(xs)
                    .view([b, t, kv_heads, hd])
                    .transpose(1, 2);
                (apply_rope(&q, cos, sin), apply_rope(&k, cos, sin), v)
            }
            (None, Rotary::Pairs(_)) => unreachable!("paired rotations come with packed weights"),
        };
        let o = |y: &Tensor| match packed {
            Some(p) => packed::linear(y, &p.o),
            None => Ok(self.o.forward(y)),
        };
        if let Some(LayerCache {
            kv: (ck, cv),
            start,
            shared: Some((prefix, per, prefix_mask)),
        }) = cache
        {
            ck.narrow(2, start, t).copy_(&k);
            cv.narrow(2, start, t).copy_(&v);
            let own = (ck.narrow(2, 0, start + t), cv.narrow(2, 0, start + t));
            let y = shared_prefix_attention(&q.to_kind(ck.kind()), prefix, &own, per, prefix_mask)
                .transpose(1, 2)
                .reshape([b, t, self.heads * self.head_dim])
                .to_kind(xs.kind());
            return o(&y);
        }
        let (q, k, v) = match cache {
            Some(LayerCache {
                kv: (ck, cv),
                start,
                ..
            }) => {
                ck.narrow(2, start, t).copy_(&k);
                cv.narrow(2, start, t).copy_(&v);
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
        let gqa = self.kv_heads != self.heads;
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
        let y = y
            .transpose(1, 2)
            .reshape([b, t, self.heads * self.head_dim])
            .to_kind(xs.kind());
        o(&y)
    }
}

/// Attention of one new position per row, `q (R, H, 1, D)`, over a shared prefix
/// (`prefix`: keys and values `(P, KV, Lp, D)`, rows `p*per .. (p+1)*per` continue prefix `p`;
/// `prefix_mask (P, 1, 1, Lp)` true at real positions) followed by each row's own positions
/// (`own`: `(R, KV, S, D)`, all valid). One softmax over both parts. Returns `(R, H, 1, D)`.
fn shared_prefix_attention(
    q: &Tensor,
    prefix: &(Tensor, Tensor),
    own: &(Tensor, Tensor),
    per: i64,
    prefix_mask: Option<&Tensor>,
) -> Tensor {
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
    let probs = Tensor::cat(&[&s_prefix, &s_own], -1).softmax(-1, q.kind());
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

    fn forward(&self, xs: &Tensor, packed: Option<&PackedBlock>) -> Result<Tensor, String> {
        match packed {
            Some(p) => {
                let gate_up = packed::linear(xs, &p.gate_up)?;
                let i = gate_up.size().last().copied().unwrap_or(0) / 2;
                let h = gate_up.narrow(-1, 0, i).silu() * gate_up.narrow(-1, i, i);
                packed::linear(&h, &p.down)
            }
            None => Ok(self
                .down
                .forward(&(self.gate.forward(xs).silu() * self.up.forward(xs)))),
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
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| LayerCache {
                kv: &mut c.layers[i],
                start,
                shared: c
                    .shared
                    .as_ref()
                    .map(|s| (&s.layers[i], s.per, s.mask.as_ref())),
            });
            let block_packed = packed.map(|p| &p.blocks[i]);
            let h = block.attn.forward(
                &block.input_norm.forward(&x),
                &rope,
                batch.mask,
                layer_cache,
                block_packed,
            )?;
            // Residual adds must not be in place: autograd keeps `x` for the backward pass.
            x = &x + h;
            x = &x
                + block
                    .mlp
                    .forward(&block.post_norm.forward(&x), block_packed)?;
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        Ok(self.norm.forward(&x))
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

    /// Mean next-token cross-entropy of `tokens (B, T+1)`: inputs `[..T]`, targets `[1..]`.
    pub fn ntp_loss(&self, tokens: &Tensor) -> Tensor {
        let t = tokens.size()[1];
        let inputs = tokens.narrow(1, 0, t - 1);
        let targets = tokens.narrow(1, 1, t - 1);
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
