//! Sampling and scoring on a small random model: padding, prefix sharing, reproducibility, and
//! agreement between the sampler's log-probs and the scorer's.

use sipt_core::model::{LlamaConfig, Policy};
use sipt_core::sample::{continuation_logprobs, generate, Sampling};
use tch::Device;

fn policy() -> Policy {
    tch::manual_seed(11);
    let config = LlamaConfig {
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
    };
    let p = Policy::from_scratch(config, Device::Cpu);
    // Sharpen the random model so that greedy choices are not near-ties.
    tch::no_grad(|| {
        for (_, mut v) in p.vs.variables() {
            let _ = v.g_mul_scalar_(4.0);
        }
    });
    p
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

#[test]
fn scorer_agrees_with_sampler_logprobs() {
    let p = policy();
    let s = Sampling {
        max_new_tokens: 9,
        temperature: 1.0,
        ..Sampling::default()
    };
    let prefixes = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![2u32, 7]];
    let out = generate(&p.model, &prefixes, 2, &s, &[], 7);
    let pre: Vec<&[u32]> = (0..4).map(|r| prefixes[r / 2].as_slice()).collect();
    let cont: Vec<&[u32]> = out.tokens.iter().map(|t| t.as_slice()).collect();
    let (logp, count) = tch::no_grad(|| continuation_logprobs(&p.model, &pre, &cont));
    for r in 0..4 {
        let expected: f32 = out.logprobs[r].iter().sum();
        let got = logp.double_value(&[r as i64]) as f32;
        assert!(
            (expected - got).abs() < 1e-3,
            "row {r}: sampler {expected}, scorer {got}"
        );
        assert_eq!(count.double_value(&[r as i64]), 9.0);
    }
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
    let out = generate(&half.model, &prefixes, 2, &s, &[], 5);
    let pre: Vec<&[u32]> = (0..6).map(|r| prefixes[r / 2].as_slice()).collect();
    let cont: Vec<&[u32]> = out.tokens.iter().map(|t| t.as_slice()).collect();
    let (logp, _) = tch::no_grad(|| continuation_logprobs(&p.model, &pre, &cont));
    for r in 0..6 {
        let sampled: f32 = out.logprobs[r].iter().sum();
        let scored = logp.double_value(&[r as i64]) as f32;
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
