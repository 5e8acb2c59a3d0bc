//! The model families sipt implements against Hugging Face transformers, offline: tiny random
//! models built with transformers' own config classes and saved with `save_pretrained`
//! (scripts/reference/hf_tiny.py) load in sipt with the same logits (f32, max |diff| within
//! 1e-4 of the logit scale) and the same greedy tokens (20 of them, so decoding runs with the
//! packed weights on a CPU); and the checkpoint sipt then writes loads back in transformers
//! with the same logits.

mod common;
use common::python;
use sipt_core::model::{Batch, Policy};
use sipt_core::sample::{generate, Sampling};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn check(family: &str) {
    let dir = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/hf_tiny.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(family)
        .arg(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/setup.sh --test",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "the transformers reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let policy = Policy::load(&dir.path().join("model"), Device::Cpu)
        .unwrap_or_else(|e| panic!("{family}: {e:#}"));
    let ids = reference["ids"].unsqueeze(0);
    let logits = tch::no_grad(|| {
        policy.model.forward(
            &Batch {
                ids: &ids,
                positions: None,
                mask: None,
            },
            None,
        )
    })
    .squeeze_dim(0)
    .to_kind(Kind::Float);
    let want = &reference["logits"];
    let diff = (&logits - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "{family}: max |diff| {diff} (logit scale {scale})"
    );

    // The packed decoding path (paired q/k rows, fused products) gives the same logits.
    let packed = policy
        .model
        .pack(12)
        .expect("f32 weights pack on every CPU");
    let packed_logits = tch::no_grad(|| {
        let batch = Batch {
            ids: &ids,
            positions: None,
            mask: None,
        };
        let hidden = policy
            .model
            .hidden_with(&batch, None, Some(&packed))
            .unwrap();
        policy.model.logits_with(&hidden, Some(&packed)).unwrap()
    })
    .squeeze_dim(0);
    let diff = (&packed_logits - want).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "{family}: packed max |diff| {diff} (logit scale {scale})"
    );

    let prompt: Vec<u32> = Vec::<i64>::try_from(&reference["ids"])
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let greedy = Sampling {
        max_new_tokens: 20,
        temperature: 0.0,
        ..Sampling::default()
    };
    let ours = generate(
        &policy.model,
        std::slice::from_ref(&prompt),
        1,
        &greedy,
        &[],
        0,
    )
    .tokens[0]
        .clone();
    let theirs: Vec<u32> = Vec::<i64>::try_from(&reference["greedy"])
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert_eq!(ours, theirs, "{family}: greedy tokens differ");
    // Beside a shorter (left-padded) prompt, two rows per prompt sharing its prefilled cache.
    let shared = generate(
        &policy.model,
        &[prompt.clone(), prompt[5..].to_vec()],
        2,
        &greedy,
        &[],
        0,
    );
    for row in 0..2 {
        assert_eq!(
            shared.tokens[row], theirs,
            "{family}: greedy tokens differ with a shared prefix (row {row})"
        );
    }

    // A checkpoint sipt writes loads back in transformers with the same logits.
    let saved = dir.path().join("saved");
    policy.save(&saved).unwrap();
    let back = dir.path().join("back.safetensors");
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg("reload")
        .arg(&saved)
        .arg(dir.path().join("reference.safetensors"))
        .arg(&back)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{family}: transformers cannot load sipt's checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&back)
        .unwrap()
        .into_iter()
        .collect();
    let diff = (&back["logits"] - want).abs().max().double_value(&[]);
    assert!(diff <= 1e-4 * scale, "{family}: reloaded max |diff| {diff}");
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn qwen2_with_its_qkv_biases_matches_transformers() {
    check("qwen2");
}

#[test]
fn llama3_rope_scaling_and_explicit_head_dim_match_transformers() {
    check("llama3");
}

#[test]
fn linear_rope_scaling_with_a_tied_head_matches_transformers() {
    check("llama-linear");
}

/// The prompt (12 tokens) and the 20 greedy tokens after it run past the window of 8.
#[test]
fn mistral_with_a_sliding_window_shorter_than_the_prompt_matches_transformers() {
    check("mistral");
}

#[test]
fn qwen3_with_its_qk_norms_matches_transformers() {
    check("qwen3");
}

#[test]
fn bf16_weights_in_shards_with_an_index_match_transformers() {
    check("llama-bf16-sharded");
}

#[test]
fn f16_weights_match_transformers() {
    check("llama-f16");
}
