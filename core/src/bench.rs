//! Micro-benchmarks of the engine, printed as JSON for the comparison scripts in `bench/`
//! (which run the reference implementations side by side). Not tests: they never gate CI.

use crate::model::{autocast, LlamaConfig, Policy, TOKENIZER_JSON};
use crate::sample::{generate, Sampling};
use crate::tokenizer::Tokenizer;
use crate::train::optim::AdamW;
use anyhow::Result;
use sipt_api::StepPlan;
use sipt_experiment::config::{Dtype, Experiment};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Timed steps and repeats: a median needs one.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Shape of the from-scratch model trained in the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBench {
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    pub ffn: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Timed steps (after `warmup` untimed ones).
    #[arg(long, value_parser = at_least_one(), default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `f32`, or `bf16` (autocast; CUDA only).
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
    /// The loss through the full logits and libtorch's cross-entropy, as before the chunked
    /// output layer (for measuring the two side by side).
    #[arg(long)]
    pub unchunked_loss: bool,
    /// AdamW and clipping one tensor operation at a time instead of libtorch's fused kernels.
    #[arg(long)]
    pub plain_optimizer: bool,
    /// RMSNorm, SwiGLU and rotary embeddings as libtorch's own ops instead of sipt's fused
    /// kernels (for measuring the two side by side).
    #[arg(long)]
    pub plain_layers: bool,
    /// Alternate the fused and the plain layers step by step in this one process, and report
    /// both medians and their ratio (`steps` each); the main figures are then the fused ones.
    #[arg(long, conflicts_with = "plain_layers")]
    pub compare_layers: bool,
}

/// Next-token training steps on random tokens: forward, backward, clip, AdamW.
pub fn train(b: &TrainBench) -> Result<serde_json::Value> {
    let device = crate::model::select_device(&b.device)?;
    tch::manual_seed(0);
    let config = LlamaConfig {
        vocab_size: b.vocab,
        hidden_size: b.hidden,
        intermediate_size: b.ffn,
        num_hidden_layers: b.layers,
        num_attention_heads: b.heads,
        num_key_value_heads: Some(b.kv_heads),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: b.seq + 1,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        family: Default::default(),
        rope_scaling: None,
        sliding_window: None,
    };
    config.check_heads().map_err(|e| {
        anyhow::anyhow!(
            "--hidden {} --heads {} --kv-heads {}: expected the heads to divide the width into an even head size and the KV heads to divide the heads ({e})",
            b.hidden,
            b.heads,
            b.kv_heads
        )
    })?;
    let params = config.parameters();
    let mut policy = Policy::from_scratch(config, device);
    policy.model.fused_layers = !b.plain_layers;
    let mut opt = AdamW::new(policy.vs.variables().into_iter().collect(), 0.9, 0.95, 0.1);
    opt.fused = !b.plain_optimizer;
    let mut times = Vec::new();
    let mut plain_times = Vec::new();
    let rounds = if b.compare_layers { 2 } else { 1 };
    for i in 0..(b.warmup + b.steps) * rounds {
        let ids = Tensor::randint(
            b.vocab as i64,
            [b.batch as i64, b.seq as i64 + 1],
            (Kind::Int64, device),
        );
        sync(device);
        if b.compare_layers {
            policy.model.fused_layers = i % 2 == 0;
        }
        let t0 = Instant::now();
        let loss = autocast(device, b.dtype, || match b.unchunked_loss {
            true => policy.model.ntp_loss_unchunked(&ids),
            false => policy.model.ntp_loss(&ids),
        });
        loss.backward();
        opt.clip_grad_norm(1.0);
        opt.step(1e-4);
        opt.zero_grad();
        sync(device);
        if i >= b.warmup * rounds {
            // Compared, the odd steps are the plain layers'.
            match b.compare_layers && !policy.model.fused_layers {
                false => times.push(t0.elapsed().as_secs_f64()),
                true => plain_times.push(t0.elapsed().as_secs_f64()),
            }
        }
    }
    let step = median(times);
    let compared = b.compare_layers.then(|| {
        let plain = median(plain_times);
        serde_json::json!({"step_seconds_plain_layers": plain, "plain_over_fused": plain / step})
    });
    let tokens = (b.batch * b.seq) as f64;
    // Model FLOPs per token: 6 x parameters, plus attention (6 x layers x seq x hidden, causal half counted).
    let flops_per_token = 6.0 * params as f64 + 6.0 * (b.layers * b.seq * b.hidden) as f64;
    let mut out = serde_json::json!({
        "implementation": "sipt",
        "parameters": params,
        "step_seconds": step,
        "tokens_per_second": tokens / step,
        "model_flops_per_second": flops_per_token * tokens / step,
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "loss": if b.unchunked_loss { "unchunked" } else { "chunked" },
        "optimizer": if opt.fused { "fused" } else { "plain" },
        "layers": if b.plain_layers { "plain" } else { "fused" },
        "peak_rss_mb": peak_resident_mb(),
    });
    if let (Some(out), Some(serde_json::Value::Object(c))) = (out.as_object_mut(), compared) {
        out.extend(c);
    }
    Ok(out)
}

/// This process's peak resident memory (Linux's VmHWM), in MB.
pub fn peak_resident_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutBench {
    /// A model folder (e.g. SmolLM2 imported with `sipt import gguf`).
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    pub prefix_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub prefixes: usize,
    #[arg(long, default_value_t = 16)]
    pub rollouts: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, value_parser = at_least_one(), default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights in `f32` or `bf16`.
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
    /// RMSNorm, SwiGLU and rotary embeddings as libtorch's own ops instead of sipt's fused
    /// kernels (for measuring the two side by side).
    #[arg(long)]
    pub plain_layers: bool,
    /// Decode with f32 weights packed in oneDNN's format for its kernels instead of in panels
    /// for sipt's AVX-512 products (for measuring the two side by side).
    #[arg(long)]
    pub onednn_products: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScoreBench {
    /// A model folder (e.g. SmolLM2 imported with `sipt import gguf`).
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long, default_value_t = 16)]
    pub rows: usize,
    #[arg(long, default_value_t = 256)]
    pub prefix_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub continuation_tokens: usize,
    #[arg(long, value_parser = at_least_one(), default_value_t = 3)]
    pub repeats: usize,
    /// The output layer over all scored positions at once (the path before chunking).
    #[arg(long)]
    pub unchunked: bool,
}

/// Log-prob scoring without gradients (the reference model's pass of a SIP step): summed
/// log-probs of `rows` continuations given their prefixes, in f32 on the CPU. Reports the
/// median time and the peak resident memory, before scoring (model loaded) and after.
pub fn score(b: &ScoreBench) -> Result<serde_json::Value> {
    let policy = Policy::load(&b.model, Device::Cpu)?;
    let loaded = peak_resident_mb();
    let prefixes = random_prompts(&policy, b.rows, b.prefix_tokens, 5);
    let continuations = random_prompts(&policy, b.rows, b.continuation_tokens, 6);
    let pre: Vec<&[u32]> = prefixes.iter().map(Vec::as_slice).collect();
    let cont: Vec<&[u32]> = continuations.iter().map(Vec::as_slice).collect();
    let mut times = Vec::new();
    let mut total = 0.0;
    for _ in 0..b.repeats {
        let t0 = Instant::now();
        let (lp, _) = tch::no_grad(|| {
            crate::sample::continuation_logprobs_with(
                &policy.model,
                &pre,
                &cont,
                crate::sample::Scoring {
                    chunked: !b.unchunked,
                    ..Default::default()
                },
            )
        });
        total = lp.sum(Kind::Float).double_value(&[]);
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(serde_json::json!({
        "implementation": "sipt",
        "chunked": !b.unchunked,
        "rows": b.rows,
        "tokens": b.prefix_tokens + b.continuation_tokens,
        "seconds": median(times),
        "peak_rss_mb": peak_resident_mb(),
        "peak_rss_after_load_mb": loaded,
        "logprob_sum": total,
        "threads": tch::get_num_threads(),
    }))
}

/// `count` prompts of `len` random token ids (away from the vocabulary's ends), from `seed`.
fn random_prompts(policy: &Policy, count: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let vocab = policy.model.config.vocab_size as u64;
    let mut rng = sipt_experiment::rng::SplitMix::new(seed);
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| 100 + rng.below(vocab - 200) as u32)
                .collect()
        })
        .collect()
}

/// K rollouts of N tokens from P prefixes of L tokens (random ids), temperature 1.
pub fn rollouts(b: &RolloutBench) -> Result<serde_json::Value> {
    let device = crate::model::select_device(&b.device)?;
    let mut policy = Policy::load(&b.model, device)?;
    policy.model.fused_layers = !b.plain_layers;
    policy.model.panel_products = !b.onednn_products;
    if b.dtype == Dtype::Bf16 {
        policy.vs.set_kind(Kind::BFloat16);
    }
    let prefixes = random_prompts(&policy, b.prefixes, b.prefix_tokens, 1);
    let sampling = Sampling {
        max_new_tokens: b.new_tokens,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        stop_at_eos: false,
    };
    let mut times = Vec::new();
    for i in 0..b.repeats + 1 {
        sync(device);
        let t0 = Instant::now();
        let out = generate(
            &policy.model,
            &prefixes,
            b.rollouts,
            &sampling,
            &[],
            i as u64,
        );
        sync(device);
        assert_eq!(out.tokens.len(), b.prefixes * b.rollouts);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let seconds = median(times);
    let generated = (b.prefixes * b.rollouts * b.new_tokens) as f64;
    Ok(serde_json::json!({
        "implementation": "sipt",
        "seconds": seconds,
        "generated_tokens_per_second": generated / seconds,
        "layers": if b.plain_layers { "plain" } else { "fused" },
        "products": products(&policy, policy.model.kind()),
        "parameters": policy.model.config.parameters(),
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
    }))
}

/// Whose kernels multiply by the weights when `policy` decodes in `kind`: `panels` or `onednn`
/// (packed weights on a CPU), `libtorch` elsewhere.
fn products(policy: &Policy, kind: Kind) -> &'static str {
    use crate::model::packed::{layout_for, Layout};
    if policy.device() != Device::Cpu {
        return "libtorch";
    }
    match layout_for(kind, policy.model.panel_products) {
        Layout::Panels => "panels",
        Layout::Onednn => "onednn",
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SipStepBench {
    /// A model folder (e.g. SmolLM2 imported with `sipt import gguf`).
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    #[arg(long, default_value_t = 2)]
    pub completions: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    #[arg(long, value_parser = at_least_one(), default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Sample with the policy itself (`f32`) or with a bf16 copy refreshed every step (`bf16`,
    /// as `sip.sample_dtype`); the copy is included in the step time.
    #[arg(long, default_value = "f32")]
    pub sample_dtype: Dtype,
    /// AdamW and clipping one tensor operation at a time instead of libtorch's fused kernels.
    #[arg(long)]
    pub plain_optimizer: bool,
    /// Score each completion in a row of its own, with its own copy of the prompt, instead of
    /// one forward pass of the prompt shared by its completions.
    #[arg(long)]
    pub unshared_prefixes: bool,
    /// The policy's log-probs through the full logits with their graph, however many there
    /// are, instead of in chunks with the gradient deferred above `Scoring`'s threshold.
    #[arg(long)]
    pub no_defer: bool,
    /// RMSNorm, SwiGLU and rotary embeddings as libtorch's own ops instead of sipt's fused
    /// kernels (for measuring the two side by side).
    #[arg(long)]
    pub plain_layers: bool,
    /// Decode with f32 weights packed in oneDNN's format for its kernels instead of in panels
    /// for sipt's AVX-512 products (for measuring the two side by side).
    #[arg(long)]
    pub onednn_products: bool,
}

/// One online-DPO step through the SIP loop's own phases: rollouts (shared prefill), pools, a
/// stand-in for judging and reward (distinct tokens per rollout), selection, then the update
/// (policy and reference log-probs, DPO loss, backward, clip, AdamW).
pub fn sip_step(b: &SipStepBench) -> Result<serde_json::Value> {
    use crate::sip::{batch::Batch, pool, rollouts::Rollouts, select::Selection, update};
    let device = crate::model::select_device(&b.device)?;
    let mut policy = Policy::load(&b.model, device)?;
    policy.model.fused_layers = !b.plain_layers;
    policy.model.panel_products = !b.onednn_products;
    let tokenizer = Tokenizer::load(&b.model.join(TOKENIZER_JSON))?;
    let objective = crate::objective::build("online-dpo", serde_json::json!({"beta": 0.1}))
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut learner = update::Learner {
        needs: objective.needs(),
        optimizer: AdamW::new(policy.vs.variables().into_iter().collect(), 0.9, 0.999, 0.0),
        reference: Some(update::reference_of(&policy)?),
        device,
        micro_batch: 0,
        dtype: Dtype::F32,
        grad_clip: 1.0,
        dist: std::rc::Rc::new(crate::dist::Dist::single()),
        scoring: crate::sample::Scoring {
            share_prefixes: !b.unshared_prefixes,
            ..Default::default()
        },
    };
    if b.no_defer {
        learner.scoring.defer_min_logits = usize::MAX;
    }
    learner.optimizer.fused = !b.plain_optimizer;
    let mut e = Experiment::default();
    e.data.suffix_tokens = b.new_tokens;
    let rollouts = Rollouts {
        e: &e,
        device,
        eos: Vec::new(),
    };
    let plan = StepPlan {
        original: false,
        rewrite: false,
        rollouts: b.completions as u32,
        temperature: 1.0,
        top_p: 1.0,
        sip_weight: 1.0,
        ntp_weight: 0.0,
    };
    let mut sampler = crate::model::Sampler::new(&policy, b.sample_dtype)?;
    let batch = Batch::of_prefixes(random_prompts(&policy, b.prompts, b.prompt_tokens, 3));
    let prefixes = batch.prefix_tokens();
    let mut times = Vec::new();
    // Per phase: sampling (with the bf16 copy's refresh), pools + reward + selection, and the
    // update's parts (update::UpdatePhases).
    let names = [
        "sample",
        "select",
        "policy",
        "reference",
        "backward",
        "optimizer",
    ];
    let mut phase_times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for i in 0..b.warmup + b.steps {
        sync(device);
        let t0 = Instant::now();
        let generated = rollouts.sample(sampler.model(&policy)?, &prefixes, 0, &plan, i as u64);
        sync(device);
        let sampled = t0.elapsed().as_secs_f64();
        let mut pools = pool::build(&batch, &plan, &generated, &tokenizer);
        for pool in &mut pools {
            for (c, cand) in pool.iter_mut().enumerate() {
                let distinct: std::collections::HashSet<_> = cand.tokens.iter().collect();
                cand.reward = Some(distinct.len() as f64 + c as f64 * 1e-3);
            }
        }
        let selection = Selection::new(objective.as_ref(), &batch, &pools);
        let selected = t0.elapsed().as_secs_f64() - sampled;
        let updated = learner.update(&policy, objective.as_ref(), &selection, None, &plan, 1e-6)?;
        sync(device);
        if i >= b.warmup {
            times.push(t0.elapsed().as_secs_f64());
            let p = updated.phases;
            let parts = [
                sampled,
                selected,
                p.policy,
                p.reference,
                p.backward,
                p.optimizer,
            ];
            for (all, part) in phase_times.iter_mut().zip(parts) {
                all.push(part);
            }
        }
    }
    let phases: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(phase_times)
        .map(|(name, t)| (name.to_string(), serde_json::json!(median(t))))
        .collect();
    Ok(serde_json::json!({
        "implementation": "sipt",
        "step_seconds": median(times.clone()),
        "step_seconds_all": times,
        "phase_seconds": phases,
        "optimizer": if learner.optimizer.fused { "fused" } else { "plain" },
        "shared_prefixes": !b.unshared_prefixes,
        "layers": if b.plain_layers { "plain" } else { "fused" },
        "products": products(
            &policy,
            match b.sample_dtype {
                Dtype::Bf16 => Kind::BFloat16,
                Dtype::F32 => Kind::Float,
            },
        ),
        "deferred": learner.scoring.defers_tokens(
            policy.model.config.vocab_size,
            b.prompts * b.completions * b.new_tokens,
        ),
        "peak_rss_mb": peak_resident_mb(),
        "prompts": b.prompts,
        "completions": b.completions,
        "new_tokens": b.new_tokens,
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
    }))
}

#[derive(Debug, Clone, clap::Args)]
pub struct TournamentBench {
    /// Candidates per pool.
    #[arg(long, default_value_t = 16)]
    pub pool: usize,
    #[arg(long, default_value_t = 200)]
    pub pools: usize,
    /// Judge noise: P(first wins) = sigmoid((q_first - q_second) / noise), qualities in [0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The adaptive design's prior: each candidate's quality plus Gaussian noise of this
    /// standard deviation (a pointwise judge of the same criterion).
    #[arg(long, default_value_t = 0.1)]
    pub prior_noise: f64,
}

/// Calls and rank agreement (Kendall's tau with all-pairs, and with the hidden truth) of every
/// tournament design, with a simulated noisy judge whose verdicts are fixed per pair.
pub fn tournaments(b: &TournamentBench) -> Result<Vec<serde_json::Value>> {
    use sipt_experiment::tournament::{kendall_tau, run, Design, Match};
    let mut rng = sipt_experiment::rng::SplitMix::new(b.seed);
    let quality: Vec<Vec<f64>> = (0..b.pools)
        .map(|_| (0..b.pool).map(|_| rng.next_f64()).collect())
        .collect();
    // One fixed draw per unordered pair, so every design faces the same judge.
    let verdict = |p: usize, a: usize, c: usize| -> f64 {
        let (lo, hi) = (a.min(c), a.max(c));
        let mut r =
            sipt_experiment::rng::SplitMix::derive(b.seed, (p * 1_000_003 + lo) as u64, hi as u64);
        let prob = 1.0 / (1.0 + (-(quality[p][lo] - quality[p][hi]) / b.noise).exp());
        let lo_wins = if r.next_f64() < prob { 1.0 } else { 0.0 };
        if a == lo {
            lo_wins
        } else {
            1.0 - lo_wins
        }
    };
    let sizes = vec![b.pool; b.pools];
    let pivots = vec![Some(0); b.pools];
    // A pointwise judge of the same criterion, noisier or not: quality + N(0, prior_noise).
    let mut prior_rng = sipt_experiment::rng::SplitMix::derive(b.seed, 0x9_12_10, 0);
    let priors: Vec<Vec<Option<f64>>> = quality
        .iter()
        .map(|pool| {
            pool.iter()
                .map(|&q| {
                    let (u1, u2) = (prior_rng.next_f64().max(1e-12), prior_rng.next_f64());
                    let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    Some(q + b.prior_noise * normal)
                })
                .collect()
        })
        .collect();
    let mut results = Vec::new();
    let mut all_pairs_scores = Vec::new();
    for design in [
        Design::AllPairs,
        Design::Pivot,
        Design::Swiss,
        Design::Sort,
        Design::Adaptive,
    ] {
        let mut referee = |ms: &[Match]| {
            ms.iter()
                .map(|&(p, a, c)| Some(verdict(p, a, c)))
                .collect::<Vec<_>>()
        };
        let out = run(
            design,
            &sizes,
            &pivots,
            &priors,
            &mut referee,
            &sipt_experiment::rng::SplitMix::new(b.seed ^ 7),
            0,
        );
        if design == Design::AllPairs {
            all_pairs_scores = out.scores.clone();
        }
        let tau = |reference: &dyn Fn(usize) -> Vec<Option<f64>>| {
            let taus: Vec<f64> = (0..b.pools)
                .filter_map(|p| kendall_tau(&out.scores[p], &reference(p)))
                .collect();
            taus.iter().sum::<f64>() / taus.len().max(1) as f64
        };
        results.push(serde_json::json!({
            "tournament": format!("{design:?}"),
            "calls_per_pool": out.calls as f64 / b.pools as f64,
            "tau_vs_all_pairs": tau(&|p| all_pairs_scores[p].clone()),
            "tau_vs_truth": tau(&|p| quality[p].iter().map(|&q| Some(q)).collect()),
            "pool": b.pool,
            "noise": b.noise,
            "prior_noise": (design == Design::Adaptive).then_some(b.prior_noise),
        }));
    }
    // The prior alone, for what the adaptive design's comparisons add to it.
    let tau_prior: Vec<f64> = (0..b.pools)
        .filter_map(|p| kendall_tau(&priors[p], &all_pairs_scores[p]))
        .collect();
    results.push(serde_json::json!({
        "tournament": "prior alone (no calls)",
        "calls_per_pool": 0.0,
        "tau_vs_all_pairs": tau_prior.iter().sum::<f64>() / tau_prior.len().max(1) as f64,
        "pool": b.pool,
        "noise": b.noise,
        "prior_noise": b.prior_noise,
    }));
    Ok(results)
}

#[derive(Debug, Clone, clap::Args)]
pub struct CollectivesBench {
    /// Ranks on this machine, started by this command (1: a group of one, which still goes
    /// through c10d). Under torchrun or srun the environment's world is used instead.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// `cpu` (Gloo) or `cuda` (NCCL, rank r on cuda:r).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Size of the all-reduced f32 tensor, in MiB.
    #[arg(long, default_value_t = 16.0)]
    pub mib: f64,
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    /// Deadline of each collective, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
}

/// All-reduce time and bus bandwidth of a c10d group (Gloo on CPUs, NCCL on GPUs), measured on
/// rank 0, and a check that the sum is right. `None` on the other ranks.
pub fn collectives(b: &CollectivesBench) -> Result<Option<serde_json::Value>> {
    use crate::dist::{Backend, Group, World};
    let mut world = World::from_env()?;
    if world.is_single() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        world.master_port = port;
    }
    let device = match b.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            let count = tch::Cuda::device_count() as usize;
            if world.local_rank >= count {
                anyhow::bail!(
                    "local rank {} has no GPU: this machine has {count} CUDA device(s)",
                    world.local_rank
                );
            }
            Device::Cuda(world.local_rank)
        }
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    let backend = Backend::for_device(device);
    let started = Instant::now();
    let group = Group::join(&world, backend, Duration::from_secs_f64(b.timeout_s))?;
    let join_s = started.elapsed().as_secs_f64();
    let n = ((b.mib * (1 << 20) as f64) / 4.0).max(1.0) as i64;
    let mut t = Tensor::ones([n], (Kind::Float, device)) * (world.rank as f64 + 1.0);
    // One untimed round joins the connections; then each iteration sums (rank + 1) anew.
    group.all_reduce_sum(&mut t)?;
    let mut times = Vec::with_capacity(b.iterations);
    for _ in 0..b.iterations {
        let _ = t.fill_(world.rank as f64 + 1.0);
        sync(device);
        let t0 = Instant::now();
        group.all_reduce_sum(&mut t)?;
        sync(device);
        times.push(t0.elapsed().as_secs_f64());
    }
    let size = world.size as f64;
    let expected = size * (size + 1.0) / 2.0;
    let got = t.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    if (got - expected).abs() > 1e-3 * expected {
        anyhow::bail!("all-reduce gave {got}, expected {expected}");
    }
    if world.rank != 0 {
        return Ok(None);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let bytes = n as f64 * 4.0;
    Ok(Some(serde_json::json!({
        "bench": "collectives",
        "backend": format!("{backend:?}").to_lowercase(),
        "ranks": world.size,
        "device": format!("{device:?}"),
        "mib": b.mib,
        "join_seconds": join_s,
        "all_reduce_seconds": median,
        // The bus bandwidth of a ring all-reduce: 2 (n - 1) / n of the data crosses each link.
        "bus_gb_per_second": bytes * 2.0 * (size - 1.0) / size / median / 1e9,
        "sum_checked": true,
    })))
}
