//! The Llama implementation against Hugging Face transformers on the same real weights
//! (SmolLM2-135M-Instruct, imported from its GGUF): logits must agree within 1e-3.

mod common;
use common::python;
use sipt_core::model::{Batch, Policy};
use std::path::PathBuf;
use tch::{Device, Tensor};

fn assets() -> PathBuf {
    sipt_experiment::paths::assets_dir()
}

#[test]
fn logits_match_transformers() {
    let gguf = assets().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch-assets.sh",
        gguf.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("smollm2");
    sipt_gguf::convert_llama(&gguf, &model_dir).unwrap();

    let prompts = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived",
        "def fibonacci(n):\n    if n < 2:\n        return n",
    ];
    let out = dir.path().join("hf.safetensors");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/hf_logits.py");
    let status = std::process::Command::new(python())
        .arg(&script)
        .arg(&model_dir)
        .arg(&out)
        .args(prompts)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/setup.sh --test",
                python().display()
            )
        });
    assert!(
        status.success(),
        "the transformers reference failed (is transformers installed? scripts/setup.sh --test)"
    );
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();

    let policy = Policy::load(&model_dir, Device::Cpu).unwrap();
    let tokenizer =
        sipt_core::tokenizer::Tokenizer::load(&model_dir.join("tokenizer.json")).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let ids: Vec<i64> = tokenizer
            .encode(prompt)
            .unwrap()
            .iter()
            .map(|&t| t as i64)
            .collect();
        let hf_ids: Vec<i64> = Vec::try_from(&reference[&format!("ids.{i}")]).unwrap();
        assert_eq!(ids, hf_ids, "tokenization differs for {prompt:?}");
        let input = Tensor::from_slice(&ids).unsqueeze(0);
        let ours = tch::no_grad(|| {
            policy.model.forward(
                &Batch {
                    ids: &input,
                    positions: None,
                    mask: None,
                },
                None,
            )
        })
        .squeeze_dim(0);
        let theirs = &reference[&format!("logits.{i}")];
        let diff = (&ours - theirs).abs().max().double_value(&[]);
        assert!(diff < 1e-3, "prompt {i}: max |logit difference| = {diff}");
    }
}
