//! Sampling and scoring on a small random model: padding, prefix sharing, reproducibility, and
//! agreement between the sampler's log-probs and the scorer's.

#[path = "../../tests/common/needs.rs"]
mod needs;

use sipt_core::model::packed::{self, Layout};
use sipt_core::model::{Batch, KvCache, Llama, LlamaConfig, Packed, Policy};
use sipt_core::sample::{continuation_logprobs, generate, generate_packed, Sampling};
use tch::{Device, Kind, Tensor};

/// Tests run on parallel threads and libtorch's generator is global: a model's random
/// initialisation holds this lock from seeding to the last draw.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn policy() -> Policy {
    policy_with(|_| {})
}

/// The test model with `change` made to its configuration.
fn policy_with(change: impl FnOnce(&mut LlamaConfig)) -> Policy {
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let mut config = LlamaConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        family: Default::default(),
        rope_scaling: None,
        sliding_window: None,
    };
    change(&mut config);
    let p = Policy::from_scratch(config, Device::Cpu);
    // Sharpen the random model so that greedy choices are not near-ties.
    tch::no_grad(|| {
        for (_, mut v) in p.vs.variables() {
            let _ = v.g_mul_scalar_(4.0);
        }
    });
    p
}

/// Two rollouts per prefix sampled by `sampler`, each as (the sampler's summed log-prob, the
/// scorer's log-prob of the same tokens, the number of tokens scored).
fn sampled_and_scored(
    sampler: &Policy,
    scorer: &Policy,
    prefixes: &[Vec<u32>],
    s: &Sampling,
    seed: u64,
) -> Vec<(f32, f32, usize)> {
    let out = generate(&sampler.model, prefixes, 2, s, &[], seed);
    let rows = out.tokens.len();
    let pre: Vec<&[u32]> = (0..rows).map(|r| prefixes[r / 2].as_slice()).collect();
    let cont: Vec<&[u32]> = out.tokens.iter().map(|t| t.as_slice()).collect();
    let (logp, count) = tch::no_grad(|| continuation_logprobs(&scorer.model, &pre, &cont));
    (0..rows)
        .map(|r| {
            (
                out.logprobs[r].iter().sum(),
                logp.double_value(&[r as i64]) as f32,
                count.double_value(&[r as i64]) as usize,
            )
        })
        .collect()
}

fn greedy(n: usize) -> Sampling {
    Sampling {
        max_new_tokens: n,
        temperature: 0.0,
        ..Sampling::default()
    }
}

#[test]
fn left_padding_does_not_change_results() {
    let p = policy();
    let a = vec![5u32, 9, 13, 2, 7, 7, 30];
    let b = vec![40u32, 41];
    let together = generate(&p.model, &[a.clone(), b.clone()], 1, &greedy(12), &[], 0);
    let alone_a = generate(&p.model, &[a], 1, &greedy(12), &[], 0);
    let alone_b = generate(&p.model, &[b], 1, &greedy(12), &[], 0);
    assert_eq!(together.tokens[0], alone_a.tokens[0]);
    assert_eq!(together.tokens[1], alone_b.tokens[0]);
    for (x, y) in together.logprobs[1].iter().zip(&alone_b.logprobs[0]) {
        assert!((x - y).abs() < 1e-4);
    }
}

#[test]
fn shared_prefix_rollouts_are_reproducible_and_differ() {
    let p = policy();
    let s = Sampling {
        max_new_tokens: 10,
        temperature: 1.0,
        ..Sampling::default()
    };
    let prefixes = vec![vec![1u32, 2, 3, 4], vec![8u32, 9]];
    let one = generate(&p.model, &prefixes, 4, &s, &[], 42);
    let two = generate(&p.model, &prefixes, 4, &s, &[], 42);
    assert_eq!(one, two);
    assert_eq!(one.tokens.len(), 8);
    assert!(one.tokens.iter().all(|t| t.len() == 10));
    let distinct: std::collections::HashSet<_> = one.tokens[..4].iter().collect();
    assert!(
        distinct.len() > 1,
        "four samples at temperature 1 were identical"
    );
    let other = generate(&p.model, &prefixes, 4, &s, &[], 43);
    assert_ne!(one.tokens, other.tokens);
    // Greedy rollouts of a shared prefix are all the same continuation.
    let g = generate(&p.model, &prefixes, 3, &greedy(6), &[], 0);
    assert_eq!(g.tokens[0], g.tokens[1]);
    assert_eq!(g.tokens[1], g.tokens[2]);
}

/// The fused decode attention (`model::fused::decode_attention`, f32 on a CPU) against
/// libtorch's ops in rollouts, of shared prefixes (3 per prefix) and of one row per prefix
/// (each row's cache with its padding mask): the same tokens at a fixed seed and the same
/// log-probs within rounding. Padded prefixes of two lengths, plain weights (9 new tokens) and
/// packed ones (24), head size 8 (the kernel's scalar loops) and 16 (its 16-wide blocks, with
/// a sliding window shorter than the rollout).
#[test]
fn fused_and_plain_decode_attention_give_the_same_rollouts() {
    let wide = |c: &mut LlamaConfig| {
        c.hidden_size = 64;
        c.sliding_window = Some(7);
    };
    for (name, mut p) in [
        ("head size 8", policy()),
        ("head size 16", policy_with(wide)),
    ] {
        let prefixes = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![2u32, 7]];
        for (n, k) in [(9usize, 3), (24, 3), (9, 1), (24, 1)] {
            let what = format!("{name}, {n} tokens, {k} per prefix");
            assert_fused_samples_like_plain(&mut p, &prefixes, n, k, &what, |_| 1e-4);
        }
    }
}

/// Rollouts of `n` tokens, `k` per prefix, at seed 5 and temperature 1, with the fused layers
/// and with libtorch's ops: the same tokens, and log-probs `a`, `b` with `|a − b| < tol(a)`.
fn assert_fused_samples_like_plain(
    p: &mut Policy,
    prefixes: &[Vec<u32>],
    n: usize,
    k: usize,
    what: &str,
    tol: impl Fn(f32) -> f32,
) {
    let s = Sampling {
        max_new_tokens: n,
        temperature: 1.0,
        ..Sampling::default()
    };
    p.model.fused_layers = false;
    let plain = generate(&p.model, prefixes, k, &s, &[], 5);
    p.model.fused_layers = true;
    let fused = generate(&p.model, prefixes, k, &s, &[], 5);
    assert_eq!(plain.tokens, fused.tokens, "{what}");
    for (a, b) in plain
        .logprobs
        .iter()
        .flatten()
        .zip(fused.logprobs.iter().flatten())
    {
        assert!((a - b).abs() < tol(*a), "{what}: {a} vs {b}");
    }
}

/// The bf16 inference kernels (residual add with RMSNorm, SwiGLU, and with packed weights the
/// rotation into the cache) against libtorch's ops in rollouts of a bf16 copy, plain weights
/// (9 new tokens) and packed ones where the CPU packs bf16 (24): the same tokens at a fixed
/// seed and the same log-probs within bf16 rounding.
#[test]
fn fused_and_plain_layers_give_the_same_bf16_rollouts() {
    let mut half = policy().copy_as(tch::Kind::BFloat16).unwrap();
    let prefixes = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![2u32, 7]];
    for (n, k) in [(9usize, 3), (24, 3), (9, 1)] {
        let what = format!("{n} tokens, {k} per prefix");
        assert_fused_samples_like_plain(&mut half, &prefixes, n, k, &what, |a| {
            0.05 + 0.02 * a.abs()
        });
    }
}

#[test]
fn scorer_agrees_with_sampler_logprobs() {
    let p = policy();
    // 9 new tokens decode with the plain weights, 24 with packed ones (`model::packed`).
    for n in [9usize, 24] {
        let s = Sampling {
            max_new_tokens: n,
            temperature: 1.0,
            ..Sampling::default()
        };
        let prefixes = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![2u32, 7]];
        for (r, (sampled, scored, count)) in sampled_and_scored(&p, &p, &prefixes, &s, 7)
            .into_iter()
            .enumerate()
        {
            assert!(
                (sampled - scored).abs() < 1e-3,
                "{n} tokens, row {r}: sampler {sampled}, scorer {scored}"
            );
            assert_eq!(count, n);
        }
    }
}

/// Logits of a padded prefill and two decode steps through a KV cache, with the model's own
/// weights or with the packed ones.
fn prefill_and_decode(model: &Llama, packed: Option<&Packed>) -> Vec<Tensor> {
    tch::no_grad(|| {
        let ids = Tensor::from_slice(&[0i64, 0, 5, 9, 13, 2, 40, 41, 42, 43, 44, 45]).view([2, 6]);
        let valid = ids.ne(0);
        let positions = (valid.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let causal = Tensor::ones([6, 6], (Kind::Bool, Device::Cpu)).tril(0);
        let mask = causal
            .logical_and(&valid.view([2, 1, 1, 6]))
            .logical_or(&Tensor::eye(6, (Kind::Bool, Device::Cpu)));
        let kind = KvCache::kind_for(model.kind(), Device::Cpu);
        let mut cache = KvCache::new(&model.config, 2, 8, kind, Device::Cpu);
        let batch = Batch {
            ids: &ids,
            positions: Some(&positions),
            mask: Some(&mask),
        };
        let hidden = model.hidden_with(&batch, Some(&mut cache), packed).unwrap();
        let mut out = vec![model.logits_with(&hidden, packed).unwrap()];
        let mut keys = valid;
        for step in 0..2i64 {
            let next = Tensor::from_slice(&[7i64 + step, 60 + step]).view([2, 1]);
            keys = Tensor::cat(&[keys, Tensor::ones([2, 1], (Kind::Bool, Device::Cpu))], 1);
            let len = keys.size()[1];
            let positions = Tensor::from_slice(&[4 + step, 6 + step]).view([2, 1]);
            let mask = keys.view([2, 1, 1, len]);
            let batch = Batch {
                ids: &next,
                positions: Some(&positions),
                mask: Some(&mask),
            };
            let hidden = model.hidden_with(&batch, Some(&mut cache), packed).unwrap();
            out.push(model.logits_with(&hidden, packed).unwrap());
        }
        out
    })
}

/// f32 logits through `packed` weights within 1e-4 of the plain ones, with the same greedy
/// tokens, over a padded prefill and two cached steps.
fn assert_decodes_like_plain(model: &Llama, packed: &Packed, what: &str) {
    let plain = prefill_and_decode(model, None);
    let fast = prefill_and_decode(model, Some(packed));
    for (i, (a, b)) in plain.iter().zip(&fast).enumerate() {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{what}, pass {i}: max |diff| {diff}");
        assert_eq!(a.argmax(-1, false), b.argmax(-1, false), "{what}, pass {i}");
    }
}

/// The CPU's feature flags as Linux lists them (empty elsewhere).
fn cpu_flags() -> std::collections::HashSet<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn packed_weights_decode_like_the_model() {
    let p = policy();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let model = p.copy_as(kind).unwrap();
        // Sampling works whether or not this CPU can pack weights of this type.
        let out = generate(&model.model, &[vec![1u32, 2, 3]], 2, &greedy(20), &[], 0);
        assert!(out.tokens.iter().all(|t| t.len() == 20));
        // f32 is compared in both layouts: sipt's panels (where the CPU has AVX-512) and
        // oneDNN's.
        if kind == Kind::Float && packed::panels_supported() {
            let panels = model.model.pack_as(2, Layout::Panels);
            assert_decodes_like_plain(&model.model, &panels.expect("f32 panels pack"), "panels");
        }
        // f32 packing needs only oneDNN; 16-bit types also need CPU support: bf16 AVX512-BF16
        // or AMX, f16 AVX512-FP16 (Intel only). bf16 must pack where the CPU has those
        // instructions; otherwise the packed path is not compared (said so), and sampling
        // above ran on the fallback.
        let Some(packed) = model.model.pack_as(2, Layout::Onednn) else {
            match kind {
                Kind::Float => panic!("f32 weights could not be packed"),
                Kind::BFloat16 => {
                    let flags = ["avx512_bf16", "amx_bf16"];
                    let has = cpu_flags();
                    assert!(
                        !flags.iter().any(|f| has.contains(*f)),
                        "bf16 weights do not pack, although this CPU has {flags:?}"
                    );
                    eprintln!("not compared: bf16 weights do not pack on this CPU (no {flags:?})");
                }
                _ => eprintln!(
                    "not compared: {kind:?} weights do not pack on this CPU (AVX512-FP16)"
                ),
            }
            continue;
        };
        let plain = prefill_and_decode(&model.model, None);
        let fast = prefill_and_decode(&model.model, Some(&packed));
        for (i, (a, b)) in plain.iter().zip(&fast).enumerate() {
            assert_eq!(a.size(), b.size());
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            let diff = (&a - &b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]);
            // f32: rounding only. bf16: the packed path rotates q and k in f32, the plain one
            // in bf16, so they differ by bf16 rounding of the activations.
            let tolerance = if kind == Kind::Float {
                1e-4
            } else {
                0.05 * scale
            };
            assert!(
                diff < tolerance,
                "{kind:?}, pass {i}: max |diff| {diff} (max |logit| {scale})"
            );
            assert_eq!(
                a.argmax(-1, false),
                b.argmax(-1, false),
                "{kind:?}, pass {i}: greedy tokens differ"
            );
        }
    }
}

#[test]
fn padded_packed_weights_give_the_plain_products() {
    use sipt_core::model::packed::{linear, linear_strided, repack_as};
    let repack = |w: &Tensor, rows| repack_as(w, rows, Layout::Onednn);
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let w = Tensor::randn([1024, 40], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([16, 40], (Kind::Float, Device::Cpu));
    drop(_init);
    let want = x.matmul(&w.tr());
    // 1024 f32 outputs make rows of 4 KiB, which `repack` pads with zero rows; 1000 do not.
    let padded = repack(&w, 16).unwrap();
    assert!(padded.is_padded());
    assert_eq!(padded.out_features(), 1024);
    assert!(!repack(&w.narrow(0, 0, 1000), 16).unwrap().is_padded());
    let (y, view) = tch::no_grad(|| {
        (
            linear(&x, &padded).unwrap(),
            linear_strided(&x, &padded).unwrap(),
        )
    });
    assert!(y.is_contiguous());
    for (what, y) in [("linear", &y), ("linear_strided", &view)] {
        assert_eq!(y.size(), [16, 1024], "{what}");
        let diff = (y - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{what}: max |diff| {diff}");
    }

    // A model whose fused gate/up product is 2 × 512 wide (padded) decodes like its plain
    // weights: the same logits and the same sampled tokens at a fixed seed.
    let p = policy_with(|c| c.intermediate_size = 512);
    let packed = p
        .model
        .pack_as(2, Layout::Onednn)
        .expect("f32 weights pack on every CPU");
    assert_decodes_like_plain(&p.model, &packed, "padded");
    let s = Sampling {
        max_new_tokens: 24,
        temperature: 1.0,
        ..Sampling::default()
    };
    let prefixes = [vec![1u32, 2, 3], vec![4u32, 5]];
    let sampled = generate_packed(&p.model, &prefixes, 2, &s, &[], 3, Some(&packed));
    let unpacked = generate_packed(&p.model, &prefixes, 2, &s, &[], 3, None);
    assert_eq!(sampled.tokens, unpacked.tokens);
}

#[test]
fn panel_products_match_the_plain_products() {
    use sipt_core::model::packed::{linear, repack_as};
    if !packed::panels_supported() {
        eprintln!("not compared: this CPU has no AVX-512 for the panel products");
        return;
    }
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    let cases: Vec<(Tensor, Vec<Tensor>)> =
        [(1, 1), (15, 7), (16, 40), (17, 40), (100, 33), (1024, 64)]
            .into_iter()
            .map(|(out, inputs)| {
                let w = Tensor::randn([out, inputs], (Kind::Float, Device::Cpu));
                // Rows in one chunk, in two uneven ones, in several; and a (B, T, in) batch.
                let xs = [1i64, 5, 12, 13, 16, 30, 64]
                    .into_iter()
                    .map(|rows| Tensor::randn([rows, inputs], (Kind::Float, Device::Cpu)))
                    .chain([Tensor::randn([3, 7, inputs], (Kind::Float, Device::Cpu))])
                    .collect();
                (w, xs)
            })
            .collect();
    drop(_init);
    for (w, xs) in &cases {
        let packed = repack_as(w, 4, Layout::Panels).unwrap();
        assert_eq!(packed.layout(), Layout::Panels);
        assert!(!packed.is_padded());
        for x in xs {
            let want = x.matmul(&w.tr());
            let got = tch::no_grad(|| linear(x, &packed).unwrap());
            assert_eq!(got.size(), want.size(), "{:?} x {:?}", x.size(), w.size());
            assert!(got.is_contiguous());
            let diff = (&got - &want).abs().max().double_value(&[]);
            let scale = want.abs().max().double_value(&[]).max(1.0);
            assert!(
                diff < 1e-5 * scale,
                "{:?} x {:?}: max |diff| {diff}",
                x.size(),
                w.size()
            );
        }
        // A strided input (a transposed view) gives the same product.
        let x = xs[4].tr().contiguous().tr();
        let diff = (tch::no_grad(|| linear(&x, &packed).unwrap()) - x.matmul(&w.tr()))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "strided input: max |diff| {diff}");
    }
    // Inputs the panels have no product for are errors, not crashes.
    let packed = repack_as(&cases[2].0, 4, Layout::Panels).unwrap();
    for bad in [
        Tensor::ones([2, 39], (Kind::Float, Device::Cpu)),
        Tensor::ones([2, 40], (Kind::Double, Device::Cpu)),
    ] {
        let err = linear(&bad, &packed).unwrap_err();
        assert!(err.contains("packed linear layer failed"), "{err}");
    }
    assert!(repack_as(&cases[2].0.to_kind(Kind::BFloat16), 4, Layout::Panels).is_err());

    // A model decodes with panels as with its plain weights: the same logits and the same
    // sampled tokens at a fixed seed, with and without shared prefixes.
    let p = policy();
    let panels = p.model.pack_as(2, Layout::Panels).expect("f32 panels pack");
    let s = Sampling {
        max_new_tokens: 24,
        temperature: 1.0,
        ..Sampling::default()
    };
    let prefixes = [vec![1u32, 2, 3], vec![4u32, 5]];
    for per_prefix in [1, 3] {
        let sampled = generate_packed(&p.model, &prefixes, per_prefix, &s, &[], 3, Some(&panels));
        let unpacked = generate_packed(&p.model, &prefixes, per_prefix, &s, &[], 3, None);
        assert_eq!(sampled.tokens, unpacked.tokens, "{per_prefix} per prefix");
        for (a, b) in sampled
            .logprobs
            .iter()
            .flatten()
            .zip(unpacked.logprobs.iter().flatten())
        {
            assert!((a - b).abs() < 1e-4, "log-probs {a} and {b}");
        }
    }
}

#[test]
fn a_failing_packed_kernel_is_an_error_and_sampling_falls_back() {
    let p = policy();
    // Weights packed for another model: their products refuse this model's activations.
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let other = Policy::from_scratch(
        LlamaConfig {
            hidden_size: 48,
            intermediate_size: 96,
            ..p.model.config.clone()
        },
        Device::Cpu,
    );
    drop(_init);
    let packed = other.model.pack(2).expect("f32 weights pack on every CPU");
    let w = sipt_core::model::packed::repack(&Tensor::ones([4, 8], (Kind::Float, Device::Cpu)), 2);
    let x = Tensor::ones([2, 5], (Kind::Float, Device::Cpu));
    let err = sipt_core::model::packed::linear(&x, &w.unwrap()).unwrap_err();
    assert!(err.contains("packed linear layer failed"), "{err}");
    let fallback = generate_packed(
        &p.model,
        &[vec![1, 2, 3]],
        2,
        &greedy(20),
        &[],
        0,
        Some(&packed),
    );
    let plain = generate_packed(&p.model, &[vec![1, 2, 3]], 2, &greedy(20), &[], 0, None);
    assert_eq!(fallback, plain);
}

#[test]
fn top_k_one_is_greedy_and_eos_stops() {
    let p = policy();
    let prefix = vec![vec![10u32, 11, 12]];
    let g = generate(&p.model, &prefix, 1, &greedy(8), &[], 0);
    let k1 = generate(
        &p.model,
        &prefix,
        1,
        &Sampling {
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: 1,
            ..Sampling::default()
        },
        &[],
        99,
    );
    assert_eq!(g.tokens, k1.tokens);
    let tiny_p = Sampling {
        max_new_tokens: 8,
        temperature: 1.0,
        top_p: 1e-6,
        ..Sampling::default()
    };
    assert_eq!(
        generate(&p.model, &prefix, 1, &tiny_p, &[], 5).tokens,
        g.tokens
    );
    // Stop at the third greedy token, taken as end-of-sequence.
    let eos = g.tokens[0][2];
    let first = g.tokens[0].iter().position(|&t| t == eos).unwrap();
    let stopped = generate(
        &p.model,
        &prefix,
        1,
        &Sampling {
            stop_at_eos: true,
            ..greedy(8)
        },
        &[eos],
        0,
    );
    assert_eq!(stopped.tokens[0], g.tokens[0][..=first].to_vec());
}

#[test]
fn a_bf16_copy_samples_like_the_policy_and_follows_it() {
    let p = policy();
    let mut half = p.copy_as(tch::Kind::BFloat16).unwrap();
    for (name, v) in half.vs.variables() {
        assert_eq!(v.kind(), tch::Kind::BFloat16, "{name}");
    }
    // Greedy first tokens agree with the f32 policy (the sharpened model has clear maxima),
    // with padding and a KV cache on the way.
    let prefixes = vec![
        vec![3u32, 1, 4, 1, 5, 9, 2, 6],
        vec![2u32, 7],
        vec![50u32, 60, 70],
    ];
    let full = generate(&p.model, &prefixes, 1, &greedy(4), &[], 0);
    let fast = generate(&half.model, &prefixes, 1, &greedy(4), &[], 0);
    for r in 0..prefixes.len() {
        assert_eq!(full.tokens[r][0], fast.tokens[r][0], "row {r}");
    }
    // The bf16 sampler's log-probs match the f32 scorer's on the same tokens, to bf16 precision.
    let s = Sampling {
        max_new_tokens: 6,
        temperature: 1.0,
        ..Sampling::default()
    };
    for (r, (sampled, scored, _)) in sampled_and_scored(&half, &p, &prefixes, &s, 5)
        .into_iter()
        .enumerate()
    {
        assert!(
            (sampled - scored).abs() < 0.25 + 0.05 * scored.abs(),
            "row {r}: bf16 sampler {sampled}, f32 scorer {scored}"
        );
    }
    // After the policy changes, copy_from brings the copy up to date.
    tch::no_grad(|| {
        for (_, mut v) in p.vs.variables() {
            let _ = v.g_mul_scalar_(0.0);
        }
    });
    half.copy_from(&p).unwrap();
    for (name, v) in half.vs.variables() {
        assert_eq!(
            v.abs().sum(tch::Kind::Float).double_value(&[]),
            0.0,
            "{name}"
        );
    }
}

/// Scoring without gradients runs the output layer in chunks of rows; with gradients it takes
/// the plain path. Both give the same log-probs, and so do chunks of any size.
#[test]
fn chunked_scoring_matches_the_plain_log_probs() {
    let p = policy();
    let pre: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![5, 6], vec![7, 8, 9]];
    let cont: Vec<Vec<u32>> = vec![vec![10, 11, 12], vec![13, 14, 15, 16, 17], vec![18]];
    let pre_r: Vec<&[u32]> = pre.iter().map(Vec::as_slice).collect();
    let cont_r: Vec<&[u32]> = cont.iter().map(Vec::as_slice).collect();
    let (plain, n_plain) = continuation_logprobs(&p.model, &pre_r, &cont_r);
    assert!(plain.requires_grad(), "the plain path keeps its graph");
    let (chunked, n_chunked) = tch::no_grad(|| continuation_logprobs(&p.model, &pre_r, &cont_r));
    let diff = (&plain.detach() - &chunked).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "summed log-probs differ by {diff}");
    assert_eq!(
        Vec::<f32>::try_from(&n_plain).unwrap(),
        Vec::<f32>::try_from(&n_chunked).unwrap()
    );
    // Chunks of 3 rows over 11 against the full logits' log-softmax.
    let hidden = Tensor::randn([11, 32], (Kind::Float, Device::Cpu));
    let targets = Tensor::randint(97, [11], (Kind::Int64, Device::Cpu));
    let w = p.model.output_weight();
    let full = hidden
        .matmul(&w.tr())
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .squeeze_dim(1);
    // Each chunk through libtorch's ops and through the fused kernel (97 logits a row: not a
    // whole number of the kernel's 16-wide steps).
    for fused in [false, true] {
        let parts = tch::no_grad(|| {
            sipt_core::sample::chunked_token_logprobs(&hidden, w, &targets, 3, fused)
        });
        let diff = (&full.detach() - &parts).abs().max().double_value(&[]);
        assert!(
            diff < 1e-5,
            "fused {fused}: chunked token log-probs differ by {diff}"
        );
    }
}

/// Every parameter has a gradient in `plain`, and `other`'s is within 1e-4 of its scale.
fn assert_same_grads(what: &str, plain: &[(String, Tensor)], other: &[(String, Tensor)]) {
    assert_eq!(plain.len(), other.len());
    for ((name, g), (other_name, h)) in plain.iter().zip(other) {
        assert_eq!(name, other_name);
        let scale = g.abs().max().double_value(&[]);
        let gap = (g - h).abs().max().double_value(&[]);
        assert!(scale > 0.0, "{what}: {name} has no gradient");
        assert!(
            gap <= 1e-4 * scale.max(1.0),
            "{what}: {name} gradients differ by {gap} of {scale}"
        );
    }
}

/// Continuations of the same prefix scored in shared rows (the prefix computed once) give the
/// log-probs and the parameter gradients of one row per continuation, with and without
/// gradients, for groups of several sizes, a prefix seen once and prefixes of other lengths.
#[test]
fn shared_prefix_scoring_matches_one_row_per_continuation() {
    use sipt_core::sample::{continuation_logprobs_with, Scoring};
    let p = policy();
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
        (1..12).collect(),
        vec![40, 41, 42],
        vec![60, 61, 62, 63, 64, 65],
    );
    let pre: Vec<&[u32]> = vec![&a, &b, &a, &c, &a, &b];
    let conts: Vec<Vec<u32>> = vec![
        vec![20, 21, 22, 23],
        vec![30],
        vec![24, 25],
        vec![70, 71, 72],
        vec![26, 27, 28, 29, 30, 31, 32],
        vec![33, 34],
    ];
    let cont: Vec<&[u32]> = conts.iter().map(Vec::as_slice).collect();
    // Weights per continuation, as a DPO loss's would be: each row's gradient counts.
    let weights = Tensor::from_slice(&[1.0f32, -0.5, 2.0, 0.75, -1.5, 0.25]);
    let run = |share: bool| {
        let how = Scoring {
            share_prefixes: share,
            ..Default::default()
        };
        let (logp, count) = continuation_logprobs_with(&p.model, &pre, &cont, how);
        (&logp * &weights).sum(Kind::Float).backward();
        let grads = p.take_grads();
        let (scored, _) = tch::no_grad(|| continuation_logprobs_with(&p.model, &pre, &cont, how));
        (logp.detach(), count, grads, scored)
    };
    let (plain, plain_count, plain_grads, plain_scored) = run(false);
    let (shared, shared_count, shared_grads, shared_scored) = run(true);
    let gap = (&plain - &shared).abs().max().double_value(&[]);
    assert!(
        gap < 1e-4,
        "log-probs differ by {gap}: {plain:?} vs {shared:?}"
    );
    let gap = (&plain_scored - &shared_scored)
        .abs()
        .max()
        .double_value(&[]);
    assert!(gap < 1e-4, "log-probs without gradients differ by {gap}");
    assert_eq!(
        Vec::<f32>::try_from(&plain_count).unwrap(),
        Vec::<f32>::try_from(&shared_count).unwrap()
    );
    assert_same_grads("shared", &plain_grads, &shared_grads);
}

/// The deferred path (log-probs read in chunks, the loss's gradient carried through the output
/// layer in chunks afterwards) gives the plain path's log-probs and parameter gradients, on a
/// model with a tied head and one with its own.
#[test]
fn deferred_scoring_gives_the_plain_gradients() {
    use sipt_core::sample::{continuation_logprobs_with, score_deferred, Scoring};
    for tied in [true, false] {
        let mut config = policy().model.config.clone();
        config.tie_word_embeddings = tied;
        let p = {
            let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(5);
            Policy::from_scratch(config, Device::Cpu)
        };
        let (a, b): (Vec<u32>, Vec<u32>) = ((1..9).collect(), vec![50, 51]);
        let pre: Vec<&[u32]> = vec![&a, &a, &b, &a];
        let conts: Vec<Vec<u32>> = vec![
            vec![20, 21, 22],
            vec![23, 24, 25, 26, 27],
            vec![30],
            vec![31, 32],
        ];
        let cont: Vec<&[u32]> = conts.iter().map(Vec::as_slice).collect();
        let g = Tensor::from_slice(&[0.5f32, -1.25, 2.0, -0.3]);
        let how = Scoring::default();
        let (plain, _) = continuation_logprobs_with(&p.model, &pre, &cont, how);
        (&plain * &g).sum(Kind::Float).backward();
        let plain_grads = p.take_grads();
        let deferred = score_deferred(&p.model, &pre, &cont, how);
        assert!(!deferred.logp.requires_grad());
        deferred.backward(&p.model, &g);
        let deferred_grads = p.take_grads();
        let gap = (plain.detach() - &deferred.logp)
            .abs()
            .max()
            .double_value(&[]);
        assert!(gap < 1e-4, "tied {tied}: log-probs differ by {gap}");
        assert_same_grads(&format!("tied {tied}"), &plain_grads, &deferred_grads);
    }
}
