//! Batched sampling with a KV cache, and log-prob scoring of given continuations.
//!
//! Rollouts for SIP share their prefix: each prefix is prefilled once, and its K rows read that
//! one cache (each row caches only its own new tokens), never recomputing or copying it.
//! Decoding is a plain Rust loop over libtorch calls, one batched forward per token.

pub use crate::model::llama::chunked_token_logprobs;
use crate::model::{fused, Batch, KvCache, Llama, Packed};
use sipt_experiment::rng::SplitMix;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tch::{Device, Kind, Tensor};

/// Sampling calls of at least this many new tokens decode with repacked weights.
const PACK_MIN_NEW_TOKENS: usize = 16;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling; 1.0 = off.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Stop a sequence at an end-of-sequence token (else exactly `max_new_tokens`).
    pub stop_at_eos: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            stop_at_eos: false,
        }
    }
}

/// Sampled continuations: row `i * per_prefix + j` is prefix `i`'s `j`-th sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<Vec<u32>>,
    /// The model's own log-probability of each sampled token (temperature 1, before top-p/k).
    pub logprobs: Vec<Vec<f32>>,
}

/// Left-pad prefixes: ids `(B, L)`, key-validity `(B, L)` and positions `(B, L)`.
fn left_pad(prefixes: &[Vec<u32>], device: Device) -> (Tensor, Tensor, Tensor, bool) {
    let len = prefixes.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let b = prefixes.len();
    let mut ids = vec![0i64; b * len];
    let mut valid = vec![false; b * len];
    let mut positions = vec![0i64; b * len];
    let mut padded = false;
    for (i, p) in prefixes.iter().enumerate() {
        let pad = len - p.len();
        padded |= pad > 0;
        for (j, &t) in p.iter().enumerate() {
            ids[i * len + pad + j] = t as i64;
            valid[i * len + pad + j] = true;
            positions[i * len + pad + j] = j as i64;
        }
    }
    let shape = [b as i64, len as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&valid).view(shape).to_device(device),
        Tensor::from_slice(&positions).view(shape).to_device(device),
        padded,
    )
}

/// Pick the next token of each row from logits `(N, V)`: restricted to top-k and nucleus top-p,
/// then sampled (or the argmax when greedy). Returns the tokens `(N,)` and the model's own
/// log-probability of each (temperature 1, before top-k/p) `(N,)`.
///
/// Uniform draws come from `rngs`, one stream per row, not from libtorch's global generator,
/// so that sampling is reproducible whatever else in the process draws random numbers, on any
/// device, and whichever other rows share the batch.
///
/// With `fused`, logits in f32 or bf16 on a CPU, and no top-k or top-p, one kernel
/// ([`fused::sample_pick`]) does it all in three passes over each row while it is in cache; it
/// draws the same numbers and, but for rounding, picks the same tokens as libtorch's ops here.
pub fn pick(logits: &Tensor, s: &Sampling, rngs: &mut [SplitMix], fused: bool) -> (Tensor, Tensor) {
    let vocab = logits.size().last().copied().unwrap_or(0);
    let unrestricted =
        s.temperature <= 0.0 || ((s.top_k == 0 || s.top_k as i64 >= vocab) && s.top_p >= 1.0);
    if fused
        && unrestricted
        && logits.dim() == 2
        && logits.device() == Device::Cpu
        && matches!(logits.kind(), Kind::Float | Kind::BFloat16)
    {
        let draws = (s.temperature > 0.0).then(|| uniform_draws(rngs));
        return fused::sample_pick(&logits.contiguous(), draws.as_deref(), s.temperature);
    }
    let logp = logits.log_softmax(-1, Kind::Float);
    let token = if s.temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        let vocab = logp.size()[1];
        let plain = s.temperature == 1.0 && (s.top_k == 0 || s.top_k as i64 >= vocab);
        let probs = if plain && s.top_p >= 1.0 {
            // Sampling from the model's own distribution: reuse its log-probs.
            logp.exp()
        } else {
            restrict(&logp, s).softmax(-1, Kind::Float)
        };
        // Inverse-CDF sampling: the first token whose cumulative probability reaches u.
        let cdf = probs.cumsum(-1, Kind::Float);
        let rows = cdf.size()[0];
        debug_assert_eq!(rows as usize, rngs.len());
        let draws = uniform_draws(rngs);
        let u = Tensor::from_slice(&draws)
            .view([rows, 1])
            .to_device(cdf.device())
            * cdf.narrow(1, vocab - 1, 1);
        u.searchsorted(&cdf, false, false, "left", None::<Tensor>)
            .squeeze_dim(1)
            .clamp_max(vocab - 1)
    };
    let chosen = logp.gather(1, &token.unsqueeze(1), false).squeeze_dim(1);
    (token, chosen)
}

/// One uniform draw in [0, 1) per row, from the row's stream.
fn uniform_draws(rngs: &mut [SplitMix]) -> Vec<f32> {
    rngs.iter_mut().map(|r| r.next_f64() as f32).collect()
}

/// Log-probs `(N, V)` divided by the temperature, with tokens outside top-k and nucleus top-p
/// set to minus infinity.
fn restrict(logp: &Tensor, s: &Sampling) -> Tensor {
    let mut logits = logp / s.temperature;
    let vocab = logits.size()[1];
    if s.top_k > 0 && (s.top_k as i64) < vocab {
        let (top, _) = logits.topk(s.top_k as i64, -1, true, true);
        let kth = top.narrow(1, s.top_k as i64 - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the mass before it already reaches top_p (the first always stays).
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.gt(s.top_p);
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
}

/// Sample `per_prefix` continuations of each prefix. Reproducible for a given `seed`: row `j`
/// of prefix `i` draws from its own stream, keyed by the seed and `i * per_prefix + j`.
pub fn generate(
    model: &Llama,
    prefixes: &[Vec<u32>],
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: u64,
) -> Generated {
    generate_at(model, prefixes, 0, per_prefix, s, eos, seed)
}

/// [`generate`] for prefixes `first, first + 1, ...` of a larger batch: each row draws from the
/// stream it would have in the whole batch, so any split of a batch (into calls, or among the
/// ranks of a job) samples the same continuations.
pub fn generate_at(
    model: &Llama,
    prefixes: &[Vec<u32>],
    first: usize,
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: u64,
) -> Generated {
    let rows = RowStreams {
        seed,
        first_row: first * per_prefix,
    };
    tch::no_grad(|| generate_inner(model, prefixes, per_prefix, s, eos, rows))
}

/// Where each row's random stream comes from.
#[derive(Clone, Copy)]
struct RowStreams {
    seed: u64,
    /// The global index of the call's first row.
    first_row: usize,
}

impl RowStreams {
    fn streams(self, rows: usize) -> Vec<SplitMix> {
        (0..rows)
            .map(|r| SplitMix::derive(self.seed, 0x5A3F1E, (self.first_row + r) as u64))
            .collect()
    }
}

/// [`generate`] decoding with the given packed weights (from [`Llama::pack`]), or without any.
/// Should a packed kernel fail, the call decodes again without them, with one warning, and
/// later calls no longer pack.
#[allow(clippy::too_many_arguments)]
pub fn generate_packed(
    model: &Llama,
    prefixes: &[Vec<u32>],
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: u64,
    packed: Option<&Packed>,
) -> Generated {
    if prefixes.is_empty() || per_prefix == 0 || s.max_new_tokens == 0 {
        return generate(model, prefixes, per_prefix, s, eos, seed);
    }
    let rows = RowStreams { seed, first_row: 0 };
    tch::no_grad(|| decode_or_fall_back(model, prefixes, per_prefix, s, eos, rows, packed))
}

/// [`generate_at`] in calls of at most `per_call` prefixes (0 = all in one call), each call
/// holding the KV cache of its own rows only. Rows draw from their own streams, so the calls
/// sample what one call would.
#[allow(clippy::too_many_arguments)]
pub fn generate_in_calls(
    model: &Llama,
    prefixes: &[Vec<u32>],
    first: usize,
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: u64,
    per_call: usize,
) -> Generated {
    let per_call = if per_call == 0 {
        prefixes.len().max(1)
    } else {
        per_call
    };
    let mut all = Generated {
        tokens: Vec::with_capacity(prefixes.len() * per_prefix),
        logprobs: Vec::with_capacity(prefixes.len() * per_prefix),
    };
    for (c, part) in prefixes.chunks(per_call).enumerate() {
        let g = generate_at(model, part, first + c * per_call, per_prefix, s, eos, seed);
        all.tokens.extend(g.tokens);
        all.logprobs.extend(g.logprobs);
    }
    all
}

/// Set once a packed kernel has failed during decoding: later calls do not pack again.
static PACKING_FAILED: AtomicBool = AtomicBool::new(false);

fn generate_inner(
    model: &Llama,
    prefixes: &[Vec<u32>],
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: RowStreams,
) -> Generated {
    let rows = prefixes.len() * per_prefix;
    if rows == 0 || s.max_new_tokens == 0 {
        return Generated {
            tokens: vec![Vec::new(); rows],
            logprobs: vec![Vec::new(); rows],
        };
    }
    // Repacking the weights takes about as long as two decode steps and saves a quarter or more
    // of every step on a CPU (see `model::packed`), so it pays for all but the shortest calls.
    let packed = if s.max_new_tokens >= PACK_MIN_NEW_TOKENS && !PACKING_FAILED.load(Relaxed) {
        model.pack(rows as i64)
    } else {
        None
    };
    decode_or_fall_back(model, prefixes, per_prefix, s, eos, seed, packed.as_ref())
}

/// [`decode`] with `packed` weights, and again without them if a packed kernel fails (the
/// products are the same, so the result is too; only the speed differs).
#[allow(clippy::too_many_arguments)]
fn decode_or_fall_back(
    model: &Llama,
    prefixes: &[Vec<u32>],
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: RowStreams,
    packed: Option<&Packed>,
) -> Generated {
    match decode(model, prefixes, per_prefix, s, eos, seed, packed) {
        Ok(g) => g,
        Err(e) => {
            if !PACKING_FAILED.swap(true, Relaxed) {
                tracing::warn!("{e}; decoding without packed weights from now on");
            }
            match decode(model, prefixes, per_prefix, s, eos, seed, None) {
                Ok(g) => g,
                Err(e) => unreachable!("unpacked decoding failed: {e}"),
            }
        }
    }
}

/// One sampling call: prefill, then one batched forward per new token.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Llama,
    prefixes: &[Vec<u32>],
    per_prefix: usize,
    s: &Sampling,
    eos: &[u32],
    seed: RowStreams,
    packed: Option<&Packed>,
) -> Result<Generated, String> {
    let rows = prefixes.len() * per_prefix;
    let mut rngs = seed.streams(rows);
    let device = model.device();
    let kind = model.kind();
    let (ids, valid, positions, padded) = left_pad(prefixes, device);
    let (b, len) = ids.size2().unwrap_or((1, 1));
    let total = len + s.max_new_tokens as i64;
    let k = per_prefix as i64;

    // Prefill every prefix once.
    let mut cache = KvCache::new(
        &model.config,
        b,
        total,
        KvCache::kind_for(kind, device),
        device,
    );
    let prefill_mask = padded.then(|| {
        let causal = Tensor::ones([len, len], (Kind::Bool, device)).tril(0);
        let keys = valid.view([b, 1, 1, len]);
        // A padding query may see itself, so that no attention row is empty (which gives NaN).
        let diagonal = Tensor::eye(len, (Kind::Bool, device));
        (causal.logical_and(&keys))
            .logical_or(&diagonal)
            .view([b, 1, len, len])
    });
    let hidden = model.hidden_with(
        &Batch {
            ids: &ids,
            positions: Some(&positions),
            mask: prefill_mask.as_ref(),
        },
        Some(&mut cache),
        packed,
    )?;
    let last = hidden.narrow(1, len - 1, 1).squeeze_dim(1);
    let mut logits = model
        .logits_with(&last, packed)?
        .repeat_interleave_self_int(k, 0, None);
    // K rollouts of a prefix share its prefilled keys and values (read once per prefix at
    // every step); each row caches only its own new tokens.
    let shared = k > 1;
    let mut cache = if shared {
        cache.share_rows(k, s.max_new_tokens as i64, padded.then_some(&valid))
    } else {
        cache
    };

    // Keys valid for every row: the prefix's own tokens, then all generated ones (a shared
    // cache carries the prefix's mask itself).
    let key_mask = (padded && !shared).then(|| {
        Tensor::cat(
            &[
                valid.repeat_interleave_self_int(k, 0, None),
                Tensor::ones([b * k, s.max_new_tokens as i64], (Kind::Bool, device)),
            ],
            1,
        )
    });
    let prefix_lengths = valid
        .sum_dim_intlist(1, false, Kind::Int64)
        .repeat_interleave_self_int(k, 0, None)
        .view([b * k, 1]);

    let eos_t = (!eos.is_empty() && s.stop_at_eos).then(|| {
        Tensor::from_slice(&eos.iter().map(|&e| e as i64).collect::<Vec<_>>()).to_device(device)
    });
    let mut finished = Tensor::zeros([b * k], (Kind::Bool, device));
    let mut tokens = Vec::with_capacity(s.max_new_tokens);
    let mut logps = Vec::with_capacity(s.max_new_tokens);
    for step in 0..s.max_new_tokens {
        let (token, logp) = pick(&logits, s, &mut rngs, model.fused_layers);
        tokens.push(token.shallow_clone());
        logps.push(logp);
        if let Some(eos_t) = &eos_t {
            finished = finished.logical_or(
                &token
                    .unsqueeze(1)
                    .eq_tensor(&eos_t.unsqueeze(0))
                    .any_dim(1, false),
            );
            if bool::try_from(finished.all()).unwrap_or(false) {
                break;
            }
        }
        if step + 1 == s.max_new_tokens {
            break;
        }
        let filled = len + step as i64 + 1;
        let mask = key_mask
            .as_ref()
            .map(|m| m.narrow(1, 0, filled).view([b * k, 1, 1, filled]));
        // The token sampled at this step sits right after the prefix and the earlier ones.
        let positions = &prefix_lengths + step as i64;
        let hidden = model.hidden_with(
            &Batch {
                ids: &token.view([b * k, 1]),
                positions: Some(&positions),
                mask: mask.as_ref(),
            },
            Some(&mut cache),
            packed,
        )?;
        logits = model.logits_with(&hidden.squeeze_dim(1), packed)?;
    }

    let tokens = Tensor::stack(&tokens, 1).to_device(Device::Cpu);
    let logps = Tensor::stack(&logps, 1).to_device(Device::Cpu);
    let n = tokens.size()[1] as usize;
    let flat_tokens: Vec<i64> = Vec::try_from(tokens.reshape([-1])).unwrap_or_default();
    let flat_logps: Vec<f32> = Vec::try_from(logps.reshape([-1])).unwrap_or_default();
    let mut out = Generated {
        tokens: Vec::with_capacity(rows),
        logprobs: Vec::with_capacity(rows),
    };
    for r in 0..rows {
        let mut t: Vec<u32> = flat_tokens[r * n..(r + 1) * n]
            .iter()
            .map(|&x| x as u32)
            .collect();
        let mut l = flat_logps[r * n..(r + 1) * n].to_vec();
        if s.stop_at_eos {
            if let Some(pos) = t.iter().position(|x| eos.contains(x)) {
                t.truncate(pos + 1);
                l.truncate(pos + 1);
            }
        }
        out.tokens.push(t);
        out.logprobs.push(l);
    }
    Ok(out)
}

/// Summed log-probability of each continuation given its prefix, and its token count.
/// Runs with gradients when the caller has them enabled (training), so the result can be
/// backpropagated. Returns `(logp (M), tokens (M))` on the model's device.
pub fn continuation_logprobs(
    model: &Llama,
    prefixes: &[&[u32]],
    continuations: &[&[u32]],
) -> (Tensor, Tensor) {
    continuation_logprobs_with(model, prefixes, continuations, Scoring::default())
}

/// How [`continuation_logprobs_with`] runs; the default does both, the plain path neither.
#[derive(Debug, Clone, Copy)]
pub struct Scoring {
    /// Without gradients, the output layer runs in chunks of rows (the full logits never
    /// exist); off, it runs over all picked positions at once.
    pub chunked: bool,
    /// Continuations of the same prefix share one forward pass of it ([`shared_layout`]);
    /// off, each continuation is a row with its own copy of the prefix.
    pub share_prefixes: bool,
    /// With gradients (and `chunked`), the log-probs of more continuation tokens than this
    /// times the vocabulary (logits of 256 MB in f32 by default) are taken in chunks with their
    /// gradient deferred ([`Deferred`]): below it, the plain path's one extra pass less over
    /// the output layer is worth more than the memory.
    pub defer_min_logits: usize,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            chunked: true,
            share_prefixes: true,
            defer_min_logits: 64 << 20,
        }
    }
}

impl Scoring {
    /// Whether log-probs of `continuations` with gradients go through [`score_deferred`].
    pub fn defers(&self, vocab: usize, continuations: &[&[u32]]) -> bool {
        self.defers_tokens(vocab, continuations.iter().map(|c| c.len()).sum())
    }

    /// [`Scoring::defers`] for continuations of `tokens` tokens in all.
    pub fn defers_tokens(&self, vocab: usize, tokens: usize) -> bool {
        self.chunked && tokens.saturating_mul(vocab) > self.defer_min_logits
    }
}

/// Token rows to run through the model, and where each continuation's tokens are predicted.
struct Layout {
    /// `(rows, len)` token ids.
    ids: Vec<i64>,
    rows: usize,
    len: usize,
    /// `(rows, len)` positions and `(rows, 1, len, len)` attention, when not plain causal rows.
    positions: Option<Vec<i64>>,
    mask: Option<Vec<bool>>,
    /// `(M, n_max)`: the flat `row * len + offset` of the hidden state that predicts each
    /// continuation token, the token, and whether it is one (not padding).
    index: Vec<i64>,
    targets: Vec<i64>,
    valid: Vec<f32>,
    n_max: usize,
}

impl Layout {
    fn new(rows: usize, len: usize, m: usize, n_max: usize) -> Layout {
        Layout {
            ids: vec![0; rows * len],
            rows,
            len,
            positions: None,
            mask: None,
            index: vec![0; m * n_max],
            targets: vec![0; m * n_max],
            valid: vec![0.0; m * n_max],
            n_max,
        }
    }

    /// Continuation `r`'s tokens `c`, predicted from the hidden states at flat indices `at(j)`.
    fn predict(&mut self, r: usize, c: &[u32], at: impl Fn(usize) -> usize) {
        for (j, &t) in c.iter().enumerate() {
            self.index[r * self.n_max + j] = at(j) as i64;
            self.targets[r * self.n_max + j] = t as i64;
            self.valid[r * self.n_max + j] = 1.0;
        }
    }
}

/// One row per continuation, after its own copy of the prefix (right padding needs no mask:
/// causal attention never looks at later positions).
fn plain_layout(prefixes: &[&[u32]], continuations: &[&[u32]], n_max: usize) -> Layout {
    let m = prefixes.len();
    let len = prefixes
        .iter()
        .zip(continuations)
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut l = Layout::new(m, len, m, n_max);
    for (r, (p, c)) in prefixes.iter().zip(continuations).enumerate() {
        for (j, &t) in p.iter().chain(c.iter()).enumerate() {
            l.ids[r * len + j] = t as i64;
        }
        // The token at position p+j is predicted by the hidden state at p+j-1.
        l.predict(r, c, |j| r * len + (p.len() + j).saturating_sub(1));
    }
    l
}

/// Continuations that share a prefix packed into rows `prefix, c1, c2, ...`: the prefix is
/// computed once per row, each continuation attends to the prefix and to its own earlier
/// tokens (positions restart after the prefix for each), so every log-prob is the one its
/// own row would give. A group of many continuations is split over several rows where that
/// costs less (attention over a long packed row grows with its square). `None` when no
/// prefix is shared (or the model's sliding window is shorter than a packed row): the plain
/// layout is then as good.
fn shared_layout(
    config: &crate::model::LlamaConfig,
    prefixes: &[&[u32]],
    continuations: &[&[u32]],
    n_max: usize,
) -> Option<Layout> {
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut by_prefix: std::collections::HashMap<&[u32], usize> = Default::default();
    for (r, p) in prefixes.iter().enumerate() {
        match by_prefix.get(p) {
            Some(&g) if !p.is_empty() => groups[g].1.push(r),
            _ => {
                by_prefix.insert(p, groups.len());
                groups.push((p, vec![r]));
            }
        }
    }
    if groups.len() == prefixes.len() {
        return None;
    }
    // Cost of a row of `len` tokens: the products per token, plus attention over every pair
    // (an explicit mask: no causal half), in multiply-adds per layer.
    let (h, hd) = (config.hidden_size as f64, config.head_dim() as f64);
    let (heads, kv) = (config.num_attention_heads as f64, config.kv_heads() as f64);
    let per_token = h * (2.0 * heads + 2.0 * kv) * hd + 3.0 * h * config.intermediate_size as f64;
    let row_cost = |len: f64| len * per_token + len * len * 2.0 * heads * hd;
    let mut rows: Vec<(&[u32], Vec<usize>)> = Vec::new();
    for (p, members) in groups {
        let mean = members
            .iter()
            .map(|&r| continuations[r].len())
            .sum::<usize>() as f64
            / members.len() as f64;
        let k = members.len();
        let per_row = (1..=k)
            .min_by(|&a, &b| {
                let cost = |g: usize| {
                    let rows = k.div_ceil(g) as f64;
                    rows * row_cost(p.len() as f64 + g as f64 * mean)
                };
                cost(a).total_cmp(&cost(b))
            })
            .unwrap_or(1);
        for chunk in members.chunks(per_row) {
            rows.push((p, chunk.to_vec()));
        }
    }
    if rows.len() == prefixes.len() {
        // Every continuation got a row of its own: nothing is shared after all, and plain
        // rows keep libtorch's causal attention kernel instead of an explicit mask.
        return None;
    }
    let len = rows
        .iter()
        .map(|(p, members)| {
            p.len()
                + members
                    .iter()
                    .map(|&r| continuations[r].len())
                    .sum::<usize>()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    if config.sliding_window.is_some_and(|w| len > w) {
        return None;
    }
    let mut l = Layout::new(rows.len(), len, prefixes.len(), n_max);
    let mut positions = vec![0i64; rows.len() * len];
    let mut mask = vec![false; rows.len() * len * len];
    for (row, (p, members)) in rows.iter().enumerate() {
        let base = row * len;
        let allow = |mask: &mut Vec<bool>, q: usize, keys: std::ops::Range<usize>| {
            for k in keys {
                mask[(base + q) * len + k] = true;
            }
        };
        for (j, &t) in p.iter().enumerate() {
            l.ids[base + j] = t as i64;
            positions[base + j] = j as i64;
            allow(&mut mask, j, 0..j + 1);
        }
        let mut at = p.len();
        for &r in members {
            let c = continuations[r];
            for (j, &t) in c.iter().enumerate() {
                l.ids[base + at + j] = t as i64;
                positions[base + at + j] = (p.len() + j) as i64;
                allow(&mut mask, at + j, 0..p.len());
                allow(&mut mask, at + j, at..at + j + 1);
            }
            // The first token is predicted by the prefix's last state, the rest by their own.
            let start = at;
            l.predict(r, c, |j| match (j, p.len()) {
                // (An empty prefix: as in the plain layout, the token's own state.)
                (0, 0) => base + start,
                (0, lp) => base + lp - 1,
                _ => base + start + j - 1,
            });
            at += c.len();
        }
        // Padding attends to itself only (no row of the softmax is empty).
        for q in at..len {
            allow(&mut mask, q, q..q + 1);
        }
    }
    l.positions = Some(positions);
    l.mask = Some(mask);
    Some(l)
}

/// The hidden states that predict each continuation token, `(M·n_max, hidden)` (with the
/// forward pass's graph when gradients are on), the tokens `(M·n_max,)` and which are real
/// `(M, n_max)`.
struct Picked {
    hidden: Tensor,
    targets: Tensor,
    valid: Tensor,
    m: i64,
    n_max: i64,
}

fn picked_states(
    model: &Llama,
    prefixes: &[&[u32]],
    continuations: &[&[u32]],
    how: Scoring,
) -> Picked {
    let device = model.device();
    let m = prefixes.len();
    let n_max = continuations
        .iter()
        .map(|c| c.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let layout = how
        .share_prefixes
        .then(|| shared_layout(&model.config, prefixes, continuations, n_max))
        .flatten()
        .unwrap_or_else(|| plain_layout(prefixes, continuations, n_max));
    let (rows, len) = (layout.rows as i64, layout.len as i64);
    let ids = Tensor::from_slice(&layout.ids)
        .view([rows, len])
        .to_device(device);
    let positions = layout
        .positions
        .as_ref()
        .map(|p| Tensor::from_slice(p).view([rows, len]).to_device(device));
    let mask = layout.mask.as_ref().map(|m| {
        Tensor::from_slice(m)
            .view([rows, 1, len, len])
            .to_device(device)
    });
    let hidden = model.hidden(
        &Batch {
            ids: &ids,
            positions: positions.as_ref(),
            mask: mask.as_ref(),
        },
        None,
    );
    let h = hidden.size()[2];
    let index = Tensor::from_slice(&layout.index).to_device(device);
    let (m, n_max) = (m as i64, n_max as i64);
    Picked {
        hidden: hidden.reshape([rows * len, h]).index_select(0, &index),
        targets: Tensor::from_slice(&layout.targets).to_device(device),
        valid: Tensor::from_slice(&layout.valid)
            .view([m, n_max])
            .to_device(device),
        m,
        n_max,
    }
}

impl Picked {
    /// Token log-probs `(M, n_max)` in chunks of rows, without gradients.
    fn chunked(&self, model: &Llama) -> Tensor {
        tch::no_grad(|| {
            chunked_token_logprobs(
                &self.hidden.detach(),
                model.output_weight(),
                &self.targets,
                crate::model::llama::chunk_rows(model.config.vocab_size),
                model.fused_layers,
            )
            .view([self.m, self.n_max])
        })
    }

    /// Summed log-probs `(M,)` and token counts `(M,)` of `token_logp (M, n_max)`.
    fn sums(&self, token_logp: Tensor) -> (Tensor, Tensor) {
        (
            (token_logp * &self.valid).sum_dim_intlist(1, false, Kind::Float),
            self.valid.sum_dim_intlist(1, false, Kind::Float),
        )
    }
}

/// [`continuation_logprobs`], run as `how` says (the plain path for tests and benchmarks).
pub fn continuation_logprobs_with(
    model: &Llama,
    prefixes: &[&[u32]],
    continuations: &[&[u32]],
    how: Scoring,
) -> (Tensor, Tensor) {
    let p = picked_states(model, prefixes, continuations, how);
    let token_logp = if p.hidden.requires_grad() || !how.chunked {
        model
            .logits(&p.hidden)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .gather(1, &p.targets.unsqueeze(-1), false)
            .view([p.m, p.n_max])
    } else {
        // Without gradients (the reference model, scoring), the output layer runs in chunks of
        // rows: the full (M, N, vocab) logits never exist.
        p.chunked(model)
    };
    p.sums(token_logp)
}

/// Summed log-probs whose gradient is taken later, in two steps: [`score_deferred`] runs the
/// forward pass (keeping its graph up to the picked hidden states) and reads the log-probs in
/// chunks without gradients; once the loss's gradient with respect to each sum is known,
/// [`Deferred::backward`] carries it into the model through the output layer in chunks
/// ([`crate::model::llama::chunked_weighted_nll`]). The full logits never exist, forward or
/// backward; the output layer's product runs once more than with the plain path.
pub struct Deferred {
    picked: Picked,
    /// `(M,)` summed log-probs and token counts (no graph).
    pub logp: Tensor,
    pub count: Tensor,
}

/// See [`Deferred`]; call it with gradients on.
pub fn score_deferred(
    model: &Llama,
    prefixes: &[&[u32]],
    continuations: &[&[u32]],
    how: Scoring,
) -> Deferred {
    let picked = picked_states(model, prefixes, continuations, how);
    let (logp, count) = picked.sums(picked.chunked(model));
    Deferred {
        picked,
        logp,
        count,
    }
}

impl Deferred {
    /// Backpropagate `grad (M,)`, the loss's gradient with respect to each summed log-prob,
    /// into the model's parameters.
    pub fn backward(&self, model: &Llama, grad: &Tensor) {
        let p = &self.picked;
        if !p.hidden.requires_grad() {
            return;
        }
        // d loss / d logp(token) = grad of its sequence; a token's log-prob is minus its NLL.
        let weights = (-(grad.to_kind(Kind::Float).unsqueeze(1) * &p.valid)).reshape([-1]);
        crate::model::llama::chunked_weighted_nll(
            &p.hidden,
            model.output_weight(),
            &p.targets,
            &weights,
            crate::model::llama::chunk_rows(model.config.vocab_size),
            model.fused_layers,
        )
        .backward();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(window: Option<usize>) -> crate::model::LlamaConfig {
        let mut c: crate::model::LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        }))
        .unwrap();
        c.sliding_window = window;
        c
    }

    /// The fused sampling kernel against libtorch's ops in `pick`: the same draws give the same
    /// tokens and log-probs within rounding, greedy and at two temperatures, in f32 and bf16,
    /// for vocabularies that are not whole blocks of the kernel (and one of a single token), a
    /// row with most of its logits at minus infinity, and one sharp row (a near-certain token).
    #[test]
    fn the_fused_sampler_picks_what_libtorchs_ops_pick() {
        for vocab in [1i64, 37, 256, 1000, 5003] {
            let logits = Tensor::randn([48, vocab], (Kind::Float, Device::Cpu)) * 3.0;
            if vocab > 1 {
                let _ = logits
                    .get(0)
                    .narrow(0, 1, vocab - 1)
                    .fill_(f64::NEG_INFINITY);
                let _ = logits.get(1).narrow(0, 0, 1).fill_(40.0);
            }
            for kind in [Kind::Float, Kind::BFloat16] {
                let logits = logits.to_kind(kind);
                for temperature in [0.0, 1.0, 0.7] {
                    let s = Sampling {
                        temperature,
                        ..Sampling::default()
                    };
                    let streams = |seed| (0..48).map(|r| SplitMix::derive(seed, 1, r)).collect();
                    let (mut a, mut b): (Vec<SplitMix>, Vec<SplitMix>) = (streams(9), streams(9));
                    let (t0, l0) = pick(&logits, &s, &mut a, false);
                    let (t1, l1) = pick(&logits, &s, &mut b, true);
                    let what = format!("vocabulary {vocab}, {kind:?}, temperature {temperature}");
                    assert_eq!(t1.kind(), Kind::Int64, "{what}");
                    assert_eq!(
                        Vec::<i64>::try_from(&t0).unwrap(),
                        Vec::<i64>::try_from(&t1).unwrap(),
                        "{what}"
                    );
                    let gap = (&l0 - &l1).abs().max().double_value(&[]);
                    assert!(gap < 1e-5, "{what}: log-probs differ by {gap}");
                    assert!(l1.isfinite().all().int64_value(&[]) == 1, "{what}");
                    // Both drew one number per row when sampling, none when greedy.
                    assert_eq!(a[0].next_f64(), b[0].next_f64(), "{what}");
                }
            }
        }
        // Over many draws the kernel's tokens follow the distribution.
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, -1.0])
            .view([1, 4])
            .repeat([4000, 1]);
        let mut rngs: Vec<SplitMix> = (0..4000).map(|r| SplitMix::derive(3, 2, r)).collect();
        let (t, _) = pick(&logits, &Sampling::default(), &mut rngs, true);
        let p = logits.get(0).softmax(0, Kind::Float);
        for token in 0..4 {
            let share = t
                .eq(token)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            let want = p.double_value(&[token]);
            assert!(
                (share - want).abs() < 0.03,
                "token {token}: {share} vs {want}"
            );
        }
    }

    #[test]
    fn shared_rows_hold_a_prefix_once_and_predict_from_the_right_states() {
        let (a, b) = (vec![1u32, 2, 3], vec![4u32]);
        let pre: Vec<&[u32]> = vec![&a, &b, &a, &[], &a];
        let (c0, c1, c2, c3, c4) = (
            vec![5u32, 6],
            vec![7u32],
            vec![8u32, 9, 10],
            vec![11u32],
            vec![12u32],
        );
        let cont: Vec<&[u32]> = vec![&c0, &c1, &c2, &c3, &c4];
        let l = shared_layout(&tiny(None), &pre, &cont, 3).unwrap();
        // Rows: a + c0 c2 c4 (6 tokens of 3 continuations), b + c1, [] + c3.
        assert_eq!((l.rows, l.len), (3, 9));
        assert_eq!(&l.ids[..9], &[1, 2, 3, 5, 6, 8, 9, 10, 12]);
        let pos = l.positions.as_ref().unwrap();
        assert_eq!(&pos[..9], &[0, 1, 2, 3, 4, 3, 4, 5, 3]);
        // c2's tokens: 8 from the prefix's last state (2), 9 from 8's (5), 10 from 9's (6).
        assert_eq!(&l.index[2 * 3..3 * 3], &[2, 5, 6]);
        assert_eq!(&l.targets[2 * 3..3 * 3], &[8, 9, 10]);
        // c4 (one token) from the prefix; c3 (empty prefix) from its own state, as plain rows do.
        assert_eq!(l.index[4 * 3], 2);
        assert_eq!(l.index[3 * 3], 2 * 9);
        let mask = l.mask.as_ref().unwrap();
        let sees = |row: usize, q: usize| -> Vec<usize> {
            (0..9).filter(|&k| mask[(row * 9 + q) * 9 + k]).collect()
        };
        assert_eq!(sees(0, 2), vec![0, 1, 2]);
        assert_eq!(sees(0, 6), vec![0, 1, 2, 5, 6]);
        assert_eq!(sees(0, 8), vec![0, 1, 2, 8]);
        assert_eq!(sees(1, 5), vec![5], "padding sees itself only");
        // Nothing shared, or a window shorter than a packed row: the plain layout.
        assert!(shared_layout(&tiny(None), &[&a, &b], &[&c0, &c1], 2).is_none());
        assert!(shared_layout(&tiny(Some(8)), &pre, &cont, 3).is_none());
        assert!(shared_layout(&tiny(Some(9)), &pre, &cont, 3).is_some());
    }

    #[test]
    fn many_continuations_of_a_long_prefix_split_over_rows_when_that_is_cheaper() {
        let prefix: Vec<u32> = (0..16).collect();
        let conts: Vec<Vec<u32>> = (0..64).map(|i| vec![i as u32 % 50; 400]).collect();
        let pre: Vec<&[u32]> = vec![&prefix; 64];
        let cont: Vec<&[u32]> = conts.iter().map(Vec::as_slice).collect();
        // Continuations of 400 tokens after 16 shared ones: attention over a packed row of
        // several would cost more than the 16 tokens it saves, so each keeps a plain row.
        assert!(shared_layout(&tiny(None), &pre, &cont, 400).is_none());
        // After a long prefix, short continuations share rows, several to a row.
        let long: Vec<u32> = (0..200).map(|i| i % 50).collect();
        let short: Vec<Vec<u32>> = (0..64).map(|i| vec![i as u32 % 50; 8]).collect();
        let pre: Vec<&[u32]> = vec![&long; 64];
        let cont: Vec<&[u32]> = short.iter().map(Vec::as_slice).collect();
        let l = shared_layout(&tiny(None), &pre, &cont, 8).unwrap();
        assert!(l.rows > 1 && l.rows < 64, "{} rows", l.rows);
        assert_eq!(l.index.len(), 64 * 8);
    }
}
