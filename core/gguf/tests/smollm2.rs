//! Converts the real SmolLM2-135M-Instruct GGUF (fetched by `scripts/fetch-assets.sh smollm2`
//! into `$SIPT_ASSETS`, default `~/.cache/sipt/assets`). Skipped, with a note, when the file
//! is absent.

use std::time::Instant;

use safetensors::SafeTensors;
use sipt_gguf::tokenizers::Tokenizer;
use sipt_gguf::{convert_llama, smollm2_gguf_path, GgmlType, GgufFile};

/// `want` is an f64 literal holding an exact f32 value.
fn assert_close(got: f32, want: f64, what: &str) {
    let got = f64::from(got);
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn converts_real_smollm2() {
    let Some(path) = smollm2_gguf_path().filter(|p| p.is_file()) else {
        eprintln!(
            "note: skipping converts_real_smollm2: SmolLM2 GGUF not found (looked at {:?}); \
             run scripts/fetch-assets.sh smollm2",
            smollm2_gguf_path()
        );
        return;
    };

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        f.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    assert_eq!(
        f.tensor("blk.0.attn_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );
    // Reference values from an independent reader (the `gguf` Python package).
    let embd = f.tensor_f32("token_embd.weight").unwrap();
    assert_close(embd[0], -0.10654449462890625, "embd[0,0]");
    assert_close(embd[504 * 576 + 3], 0.08220291137695312, "embd[504,3]");
    let sum: f64 = embd.iter().map(|&x| f64::from(x)).sum();
    assert!(
        (sum - -15353.04449415207).abs() < 1e-3,
        "embedding sum {sum}"
    );
    drop(embd);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let t0 = Instant::now();
    let s = convert_llama(&path, &out).unwrap();
    eprintln!(
        "converted {} in {:.2}s: {} tensors, {} parameters, warnings: {:?}",
        path.display(),
        t0.elapsed().as_secs_f64(),
        s.n_tensors,
        s.n_params,
        s.warnings
    );

    let hp = &s.hparams;
    assert_eq!(hp.n_layers, 30);
    assert_eq!(hp.hidden_size, 576);
    assert_eq!(hp.n_heads, 9);
    assert_eq!(hp.n_kv_heads, 3);
    assert_eq!(hp.head_dim, 64);
    assert_eq!(hp.intermediate_size, 1536);
    assert_eq!(hp.vocab_size, 49152);
    assert_eq!(hp.context_length, 8192);
    assert!(hp.tie_word_embeddings);
    assert_eq!(hp.rope_theta, 100000.0);
    assert_eq!(hp.rms_norm_eps, 1e-5);
    assert_eq!(
        (hp.bos_token_id, hp.eos_token_id, hp.pad_token_id),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(s.n_tensors, 272);
    assert_eq!(s.n_params, 134_515_008);
    assert!((134.4e6..134.6e6).contains(&(s.n_params as f64)));

    let tk = &s.tokenizer;
    assert_eq!(tk.pre.as_deref(), Some("smollm"));
    assert_eq!((tk.n_tokens, tk.n_merges), (49152, 48900));
    assert_eq!(tk.special_tokens.len(), 17);
    assert_eq!(tk.special_tokens[2], (2, "<|im_end|>".to_string()));
    assert!(tk
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));

    // Weights: un-permuted Q/K rows checked against the independent reader.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let row = |name: &str, r: usize, cols: usize| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        t.data()[r * cols * 4..(r * cols + 3) * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let q1 = row("model.layers.0.self_attn.q_proj.weight", 1, 576);
    for (g, w) in q1
        .iter()
        .zip([-0.1591796875f64, 0.39794921875, -0.0198974609375])
    {
        assert_close(*g, w, "q_proj[1]");
    }
    let q32 = row("model.layers.0.self_attn.q_proj.weight", 32, 576);
    for (g, w) in q32
        .iter()
        .zip([-0.1173095703125f64, -0.1173095703125, -0.19281005859375])
    {
        assert_close(*g, w, "q_proj[32]");
    }
    let k1 = row("model.layers.0.self_attn.k_proj.weight", 1, 576);
    for (g, w) in k1
        .iter()
        .zip([0.203369140625f64, 0.09136962890625, 0.203369140625])
    {
        assert_close(*g, w, "k_proj[1]");
    }
    let norm = row("model.norm.weight", 0, 1);
    assert_close(norm[0], 1.7578125, "norm[0]");
    assert!(st.tensor("lm_head.weight").is_err(), "tied: no lm_head");
    assert_eq!(
        st.tensor("model.layers.29.mlp.down_proj.weight")
            .unwrap()
            .shape(),
        &[576, 1536]
    );
    drop(st);
    drop(bytes);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 30);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["eos_token_id"], 2);

    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "The capital of France is";
    let enc = tok.encode(text, true).unwrap();
    assert_eq!(enc.get_ids(), [504, 3575, 282, 4649, 314]);
    assert_eq!(
        enc.get_tokens(),
        ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    let chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    let enc = tok.encode(chat, true).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert!(enc.get_tokens().contains(&"2".to_string()));
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), chat);
}
