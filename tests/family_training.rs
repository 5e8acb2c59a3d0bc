//! SIP training on each model family sipt implements: a tiny random model of the family, built
//! with transformers' own config classes (scripts/reference/hf_tiny.py, with a byte-level BPE
//! trained on the corpus), trains a few SIP steps through the binary, and the checkpoint it
//! writes loads back in transformers with the logits sipt computes for it.

mod common;
use common::*;
use sipt_core::model::{Batch, Policy};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn reference(args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(venv_bin("python"))
        .arg(root().join("scripts/reference/hf_tiny.py"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("cannot run the venv's python; run scripts/setup.sh --test");
    assert!(
        out.status.success(),
        "the transformers reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn train(family: &str) {
    let dir = tempfile::tempdir().unwrap();
    let corpus = assets().join("corpora/shakespeare");
    reference(&[family.as_ref(), dir.path().as_os_str(), corpus.as_os_str()]);
    let model = dir.path().join("model");
    let file = write(
        dir.path(),
        "family.toml",
        &format!(
            r#"[experiment]
name = "family-{family}"
seed = 3
device = "cpu"
threads = 1

[model]
path = "{}"

[data]
train = ["@assets/corpora/shakespeare"]
seq_len = 32
suffix_tokens = 8
# Prefix and suffix run past Mistral's window of 8.
prefix_min_tokens = 16
prefix_max_tokens = 24

[sip]
rewrite = true
rollouts = 2
tournament = "all-pairs"

[judges.safety]
type = "safety-words"

[judges.quality]
type = "quality-proxy-pairwise"

[rewriter]
type = "redact"

[train]
steps = 3
batch_size = 2
lr = 1e-3
warmup_steps = 1
checkpoint_every = 3
log_every = 1

[train.objective]
type = "online-dpo"
beta = 0.1
ntp_weight = 1.0
"#,
            model.display()
        ),
    );
    let run_dir = dir.path().join("run");
    let out = run(sipt().arg("run").arg(&file).arg("--out").arg(&run_dir));
    assert_eq!(out.code, 0, "{family}: {}", out.stderr);
    let rows = metric_rows(&run_dir);
    assert_eq!(rows.len(), 3, "{family}: {rows:?}");
    for row in &rows {
        let loss = row["loss/total"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite(), "{family}: {row}");
    }

    // The trained checkpoint: its family is kept, and transformers computes its logits.
    let checkpoint = run_dir.join("checkpoints/step-00000003");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("config.json")).unwrap())
            .unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], written["model_type"], "{family}");
    let policy = Policy::load(&checkpoint, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 17, 9, 200, 31, 64, 7, 300, 12, 45, 99, 3]);
    let ours = tch::no_grad(|| {
        policy.model.forward(
            &Batch {
                ids: &ids.unsqueeze(0),
                positions: None,
                mask: None,
            },
            None,
        )
    })
    .squeeze_dim(0)
    .to_kind(Kind::Float);
    let prompt = dir.path().join("prompt.safetensors");
    Tensor::write_safetensors(&[("ids", &ids)], &prompt).unwrap();
    let back = dir.path().join("back.safetensors");
    reference(&[
        "reload".as_ref(),
        checkpoint.as_os_str(),
        prompt.as_os_str(),
        back.as_os_str(),
    ]);
    let theirs = logits_of(&back);
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    let scale = theirs.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "{family}: the trained checkpoint's logits differ in transformers by {diff} (scale {scale})"
    );
    // Training moved the weights.
    let start = Policy::load(&model, Device::Cpu).unwrap();
    let moved = tch::no_grad(|| {
        start.model.forward(
            &Batch {
                ids: &ids.unsqueeze(0),
                positions: None,
                mask: None,
            },
            None,
        )
    })
    .squeeze_dim(0);
    assert!((&moved - &ours).abs().max().double_value(&[]) > 1e-4 * scale);
}

fn logits_of(file: &Path) -> Tensor {
    Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "logits")
        .map(|(_, t)| t)
        .unwrap()
}

#[test]
fn llama3_trains_with_sip_and_reloads_in_transformers() {
    train("llama3");
}

#[test]
fn mistral_trains_with_sip_and_reloads_in_transformers() {
    train("mistral");
}

#[test]
fn qwen2_trains_with_sip_and_reloads_in_transformers() {
    train("qwen2");
}

#[test]
fn qwen3_trains_with_sip_and_reloads_in_transformers() {
    train("qwen3");
}
