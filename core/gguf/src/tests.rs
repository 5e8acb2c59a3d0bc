//! Tests on synthetic GGUF files written by a small writer below.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use tokenizers::Tokenizer;

use crate::{
    byte_level_char, convert_llama, hf_tensor_name, unpermute_qk, GgmlType, GgufError, GgufFile,
    Value, ValueType,
};

// ---------------------------------------------------------------- writer

fn value_type_id(t: ValueType) -> u32 {
    match t {
        ValueType::U8 => 0,
        ValueType::I8 => 1,
        ValueType::U16 => 2,
        ValueType::I16 => 3,
        ValueType::U32 => 4,
        ValueType::I32 => 5,
        ValueType::F32 => 6,
        ValueType::Bool => 7,
        ValueType::String => 8,
        ValueType::Array => 9,
        ValueType::U64 => 10,
        ValueType::I64 => 11,
        ValueType::F64 => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&value_type_id(*t).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

/// A tensor for the writer: GGUF dims (fastest first), type, raw bytes.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

struct Writer {
    version: u32,
    alignment: u64,
    kv: Vec<(String, Value)>,
    tensors: Vec<RawTensor>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(&mut self, k: &str, v: Value) -> &mut Self {
        if k == "general.alignment" {
            if let Value::U32(a) = v {
                self.alignment = u64::from(a);
            }
        }
        self.kv.push((k.to_string(), v));
        self
    }

    fn tensor(&mut self, name: &str, torch_shape: &[usize], ty: GgmlType, data: Vec<u8>) {
        self.tensors.push(RawTensor {
            name: name.to_string(),
            dims: torch_shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        });
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend_from_slice(&value_type_id(v.value_type()).to_le_bytes());
            put_value(&mut out, v);
        }
        let align = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let base = out.len() as u64;
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((base + off) as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

// ---------------------------------------------------------------- test data

/// Deterministic pseudo-random numbers.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

/// f32 -> f16 bits for values that f16 represents exactly (normal numbers and zero).
fn f16_bits(x: f32) -> u16 {
    if x == 0.0 {
        return 0;
    }
    let b = x.to_bits();
    let sign = ((b >> 31) as u16) << 15;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let man = b & 0x7f_ffff;
    assert!(
        (1..31).contains(&exp) && man & 0x1fff == 0,
        "{x} is not exact in f16"
    );
    sign | ((exp as u16) << 10) | (man >> 13) as u16
}

/// Scales used for blocks: exact in f16.
const SCALES: [f32; 6] = [0.5, 0.25, -0.125, 1.0, 0.0625, 2.0];

/// Make a tensor of `n` elements of type `ty`: returns (raw bytes, expected f32 values),
/// where the expected values come from the block codes, not from the bytes.
fn make_tensor(ty: GgmlType, n: usize, rng: &mut Lcg) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut want = Vec::with_capacity(n);
    let scale = |rng: &mut Lcg| SCALES[rng.below(SCALES.len() as u32) as usize];
    match ty {
        GgmlType::F32 => {
            for _ in 0..n {
                let v = rng.below(2001) as f32 / 1000.0 - 1.0;
                bytes.extend_from_slice(&v.to_le_bytes());
                want.push(v);
            }
        }
        GgmlType::F64 => {
            for _ in 0..n {
                let v = f64::from(rng.below(2001)) / 1024.0 - 1.0;
                bytes.extend_from_slice(&v.to_le_bytes());
                want.push(v as f32);
            }
        }
        GgmlType::F16 => {
            for _ in 0..n {
                let v = (rng.below(2049) as f32 - 1024.0) / 1024.0;
                bytes.extend_from_slice(&f16_bits(v).to_le_bytes());
                want.push(v);
            }
        }
        GgmlType::BF16 => {
            for _ in 0..n {
                let v = (rng.below(257) as f32 - 128.0) / 64.0;
                let bits = (v.to_bits() >> 16) as u16;
                assert_eq!(f32::from_bits(u32::from(bits) << 16), v);
                bytes.extend_from_slice(&bits.to_le_bytes());
                want.push(v);
            }
        }
        GgmlType::Q8_0 => {
            for _ in 0..n / 32 {
                let d = scale(rng);
                bytes.extend_from_slice(&f16_bits(d).to_le_bytes());
                for _ in 0..32 {
                    let q = rng.below(256) as i32 - 128;
                    bytes.push(q as i8 as u8);
                    want.push(d * q as f32);
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let five = ty == GgmlType::Q5_0 || ty == GgmlType::Q5_1;
            let has_min = ty == GgmlType::Q4_1 || ty == GgmlType::Q5_1;
            for _ in 0..n / 32 {
                let d = scale(rng);
                let m = -scale(rng);
                let codes: Vec<u32> = (0..32)
                    .map(|_| rng.below(if five { 32 } else { 16 }))
                    .collect();
                bytes.extend_from_slice(&f16_bits(d).to_le_bytes());
                if has_min {
                    bytes.extend_from_slice(&f16_bits(m).to_le_bytes());
                }
                if five {
                    // Bit i of qh is the fifth bit of element i.
                    let qh = (0..32).fold(0u32, |acc, i| acc | ((codes[i] >> 4) << i));
                    bytes.extend_from_slice(&qh.to_le_bytes());
                }
                // Byte j: element j in the low nibble, element j + 16 in the high nibble.
                for j in 0..16 {
                    bytes.push(((codes[j] & 15) | ((codes[j + 16] & 15) << 4)) as u8);
                }
                for &q in &codes {
                    want.push(match ty {
                        GgmlType::Q4_0 => d * (q as f32 - 8.0),
                        GgmlType::Q5_0 => d * (q as f32 - 16.0),
                        _ => d * q as f32 + m,
                    });
                }
            }
        }
        other => panic!("test cannot make {other}"),
    }
    assert_eq!(want.len(), n);
    (bytes, want)
}

/// The vocabulary of the synthetic model: 3 control tokens, a user-defined token, the 256
/// byte-level symbols, then merge results.
fn synthetic_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut types = vec![3, 3, 3, 4];
    for b in 0..=255u8 {
        tokens.push(byte_level_char(b).to_string());
        types.push(1);
    }
    let merges = [
        ("T", "h"),
        ("Th", "e"),
        ("Ġ", "c"),
        ("a", "p"),
        ("Ġc", "ap"),
        ("i", "t"),
        ("Ġcap", "it"),
        ("a", "l"),
        ("Ġcapit", "al"),
        ("Ġ", "i"),
        ("Ġi", "s"),
        ("o", "f"),
        ("Ġ", "of"),
    ];
    let mut merge_strs = Vec::new();
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merge_strs.push(format!("{a} {b}"));
    }
    (tokens, types, merge_strs)
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 96;
const LAYERS: usize = 2;
const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";

struct Synthetic {
    writer: Writer,
    /// GGUF tensor name -> expected dequantized values (GGUF storage order).
    expected: HashMap<String, Vec<f32>>,
    vocab: usize,
}

/// A tiny Llama with every supported tensor type.
fn synthetic_llama(tied: bool) -> Synthetic {
    let (tokens, types, merges) = synthetic_vocab();
    let vocab = tokens.len();
    let mut w = Writer::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("general.name", Value::String("tiny".into()))
        .kv("general.alignment", Value::U32(64))
        .kv("llama.block_count", Value::U32(LAYERS as u32))
        .kv("llama.context_length", Value::U64(256))
        .kv("llama.embedding_length", Value::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", Value::I32(FFN as i32))
        .kv("llama.attention.head_count", Value::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", Value::U16(KV_HEADS as u16))
        .kv("llama.rope.freq_base", Value::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .kv("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::String("smollm".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(
                ValueType::String,
                tokens.iter().map(|t| Value::String(t.clone())).collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(
                ValueType::I32,
                types.iter().map(|&t| Value::I32(t)).collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(
                ValueType::String,
                merges.iter().map(|m| Value::String(m.clone())).collect(),
            ),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.padding_token_id", Value::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(0))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        )
        // Values of the remaining types, to exercise the parser.
        .kv("test.u8", Value::U8(200))
        .kv("test.i8", Value::I8(-5))
        .kv("test.i16", Value::I16(-300))
        .kv("test.i64", Value::I64(-7_000_000_000))
        .kv("test.f64", Value::F64(2.5))
        .kv(
            "test.nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::U8, vec![Value::U8(1), Value::U8(2)]),
                    Value::Array(ValueType::U8, vec![]),
                ],
            ),
        );

    let mut rng = Lcg(42);
    let mut expected = HashMap::new();
    let mut add = |w: &mut Writer, name: &str, shape: &[usize], ty: GgmlType| {
        let n = shape.iter().product();
        let (bytes, want) = make_tensor(ty, n, &mut rng);
        w.tensor(name, shape, ty, bytes);
        expected.insert(name.to_string(), want);
    };
    add(
        &mut w,
        "token_embd.weight",
        &[vocab, HIDDEN],
        GgmlType::Q8_0,
    );
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let layer_types = [
        [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ],
        [
            GgmlType::F16,
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::F32,
            GgmlType::Q8_0,
            GgmlType::F64,
            GgmlType::Q4_1,
        ],
    ];
    for (l, ts) in layer_types.iter().enumerate() {
        add(
            &mut w,
            &format!("blk.{l}.attn_norm.weight"),
            &[HIDDEN],
            GgmlType::F32,
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_q.weight"),
            &[q, HIDDEN],
            ts[0],
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_k.weight"),
            &[kv, HIDDEN],
            ts[1],
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_v.weight"),
            &[kv, HIDDEN],
            ts[2],
        );
        add(
            &mut w,
            &format!("blk.{l}.attn_output.weight"),
            &[HIDDEN, q],
            ts[3],
        );
        add(
            &mut w,
            &format!("blk.{l}.ffn_gate.weight"),
            &[FFN, HIDDEN],
            ts[4],
        );
        add(
            &mut w,
            &format!("blk.{l}.ffn_up.weight"),
            &[FFN, HIDDEN],
            ts[5],
        );
        add(
            &mut w,
            &format!("blk.{l}.ffn_down.weight"),
            &[HIDDEN, FFN],
            ts[6],
        );
        add(
            &mut w,
            &format!("blk.{l}.ffn_norm.weight"),
            &[HIDDEN],
            GgmlType::F32,
        );
    }
    add(&mut w, "output_norm.weight", &[HIDDEN], GgmlType::F32);
    if !tied {
        add(&mut w, "output.weight", &[vocab, HIDDEN], GgmlType::F16);
    }
    Synthetic {
        writer: w,
        expected,
        vocab,
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn parses_header_metadata_and_tensor_infos() {
    let dir = tempfile::tempdir().unwrap();
    let s = synthetic_llama(true);
    let path = s.writer.write(dir.path(), "tiny.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), Some(2));
    assert_eq!(
        f.get_u64("llama.feed_forward_length").unwrap(),
        Some(FFN as u64)
    );
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), Some(2));
    assert_eq!(
        f.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap(),
        Some(1e-5)
    );
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), Some(100000.0));
    assert_eq!(f.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(f.get("test.i8").and_then(Value::as_i64), Some(-5));
    assert_eq!(f.get("test.i16").and_then(Value::as_i64), Some(-300));
    assert_eq!(
        f.get("test.i64").and_then(Value::as_i64),
        Some(-7_000_000_000)
    );
    assert_eq!(f.get("test.i64").and_then(Value::as_u64), None);
    assert_eq!(f.get_f64("test.f64").unwrap(), Some(2.5));
    assert_eq!(
        f.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(false)
    );
    let nested = f.get("test.nested").unwrap().as_array().unwrap();
    assert_eq!(nested.len(), 2);
    assert_eq!(nested[0].as_array().unwrap(), &[Value::U8(1), Value::U8(2)]);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        s.vocab
    );
    assert_eq!(
        f.get_i64_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()[3],
        4
    );
    assert_eq!(
        f.get_str("tokenizer.chat_template").unwrap(),
        Some(CHAT_TEMPLATE)
    );
    assert_eq!(f.get_str("no.such.key").unwrap(), None);

    // Wrong-type access is an error that names the file and the key.
    let err = f.get_str("llama.block_count").unwrap_err().to_string();
    assert!(
        err.contains("tiny.gguf") && err.contains("llama.block_count") && err.contains("u32 2"),
        "{err}"
    );
    let err = f.req_u64("llama.missing").unwrap_err().to_string();
    assert!(
        err.contains("llama.missing") && err.contains("missing"),
        "{err}"
    );

    assert_eq!(f.tensors().len(), 1 + LAYERS * 9 + 1);
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dims, vec![HIDDEN as u64, (HEADS * HEAD_DIM) as u64]);
    assert_eq!(q.shape(), vec![HEADS * HEAD_DIM, HIDDEN]);
    assert_eq!(q.ggml_type, GgmlType::Q4_1);
    assert_eq!(q.size, Some((HEADS * HEAD_DIM * HIDDEN / 32 * 20) as u64));
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    assert!(matches!(
        f.tensor_f32("nope"),
        Err(GgufError::MissingTensor { .. })
    ));
}

#[test]
fn dequantizes_every_supported_type() {
    let dir = tempfile::tempdir().unwrap();
    let s = synthetic_llama(false);
    let path = s.writer.write(dir.path(), "tiny.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut seen = std::collections::HashSet::new();
    for t in f.tensors() {
        let got = f.tensor_f32(&t.name).unwrap();
        assert_eq!(
            &got, &s.expected[&t.name],
            "tensor {} ({})",
            t.name, t.ggml_type
        );
        seen.insert(t.ggml_type);
    }
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F64,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        assert!(
            seen.contains(&ty),
            "no tensor of type {ty} in the test file"
        );
    }
    // Spot checks of the block layouts, independent of make_tensor's bookkeeping.
    let raw = f.tensor_bytes("blk.0.attn_q.weight").unwrap(); // Q4_1
    let vals = f.tensor_f32("blk.0.attn_q.weight").unwrap();
    let d = crate::f16_to_f32(u16::from_le_bytes([raw[0], raw[1]]));
    let m = crate::f16_to_f32(u16::from_le_bytes([raw[2], raw[3]]));
    assert_eq!(vals[0], d * f32::from(raw[4] & 15) + m);
    assert_eq!(vals[16], d * f32::from(raw[4] >> 4) + m);
    assert_eq!(vals[15], d * f32::from(raw[19] & 15) + m);
    assert_eq!(vals[31], d * f32::from(raw[19] >> 4) + m);
    let raw = f.tensor_bytes("token_embd.weight").unwrap(); // Q8_0
    let vals = f.tensor_f32("token_embd.weight").unwrap();
    let d = crate::f16_to_f32(u16::from_le_bytes([raw[34], raw[35]]));
    assert_eq!(vals[32 + 5], d * f32::from(raw[36 + 5] as i8));
}

#[test]
fn hf_names() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.12.attn_k.weight",
            "model.layers.12.self_attn.k_proj.weight",
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.29.ffn_gate.weight",
            "model.layers.29.mlp.gate_proj.weight",
        ),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        (
            "blk.29.ffn_down.weight",
            "model.layers.29.mlp.down_proj.weight",
        ),
        (
            "blk.1.attn_norm.weight",
            "model.layers.1.input_layernorm.weight",
        ),
        (
            "blk.1.ffn_norm.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ),
        ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
    ];
    for (g, hf) in cases {
        assert_eq!(hf_tensor_name(g).as_deref(), Some(hf), "{g}");
    }
    for bad in [
        "blk.x.attn_q.weight",
        "blk..attn_q.weight",
        "blk.01.attn_q.weight",
        "blk.0.attn_qq.weight",
        "blk.0.attn_norm.bias",
        "rope_freqs.weight",
        "foo",
    ] {
        assert_eq!(hf_tensor_name(bad), None, "{bad}");
    }
}

/// HF row `h*hd + t*hd/2 + j` holds GGUF row `h*hd + 2*j + t`.
fn expected_unpermuted(gguf_rows: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let (h, within) = (r / hd, r % hd);
        let (t, j) = (within / (hd / 2), within % (hd / 2));
        let src = h * hd + 2 * j + t;
        out.extend_from_slice(&gguf_rows[src * cols..(src + 1) * cols]);
    }
    out
}

#[test]
fn unpermute_matches_the_definition() {
    // 2 heads of head_dim 4, 3 columns: value = 10 * row + col.
    let rows = 8;
    let data: Vec<f32> = (0..rows * 3)
        .map(|i| (10 * (i / 3) + i % 3) as f32)
        .collect();
    let out = unpermute_qk(&data, rows, 3, 2).unwrap();
    let row_order: Vec<usize> = out.chunks(3).map(|r| (r[0] / 10.0) as usize).collect();
    // Per head (rows 0..4): GGUF rows 0,1,2,3 are (j,t) = (0,0),(0,1),(1,0),(1,1); HF wants
    // t-major: (0,0),(1,0),(0,1),(1,1) = rows 0,2,1,3.
    assert_eq!(row_order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    assert_eq!(out, expected_unpermuted(&data, rows, 3, 2));
    assert!(unpermute_qk(&data, rows, 3, 3).is_none());
    assert!(unpermute_qk(&data[1..], rows, 3, 2).is_none());
}

#[test]
fn converts_a_tiny_llama() {
    for tied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let s = synthetic_llama(tied);
        let path = s.writer.write(dir.path(), "tiny.gguf");
        let out = dir.path().join("hf");
        let summary = convert_llama(&path, &out).unwrap();
        let hp = &summary.hparams;
        assert_eq!(
            (hp.n_layers, hp.hidden_size, hp.intermediate_size),
            (LAYERS, HIDDEN, FFN)
        );
        assert_eq!(
            (hp.n_heads, hp.n_kv_heads, hp.head_dim),
            (HEADS, KV_HEADS, HEAD_DIM)
        );
        assert_eq!(hp.vocab_size, s.vocab);
        assert_eq!(hp.tie_word_embeddings, tied);
        assert_eq!(hp.rms_norm_eps, 1e-5);
        assert_eq!(hp.rope_theta, 100000.0);
        assert_eq!(summary.n_tensors, if tied { 20 } else { 21 });
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);

        // No temp files left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );

        // Weights.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let get = |name: &str| -> (Vec<usize>, Vec<f32>) {
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (t.shape().to_vec(), v)
        };
        let mut n_params = 0;
        for (g, want) in &s.expected {
            let hf = hf_tensor_name(g).unwrap();
            let (shape, got) = get(&hf);
            n_params += got.len() as u64;
            let want = if g.contains("attn_q") {
                expected_unpermuted(want, shape[0], shape[1], HEADS)
            } else if g.contains("attn_k") {
                expected_unpermuted(want, shape[0], shape[1], KV_HEADS)
            } else {
                want.clone()
            };
            assert_eq!(got, want, "{hf}");
        }
        assert_eq!(summary.n_params, n_params);
        assert_eq!(
            get("model.layers.1.self_attn.k_proj.weight").0,
            vec![KV_HEADS * HEAD_DIM, HIDDEN]
        );
        assert_eq!(
            get("model.layers.0.mlp.down_proj.weight").0,
            vec![HIDDEN, FFN]
        );
        assert_eq!(st.tensor("lm_head.weight").is_ok(), !tied);
        assert_eq!(st.names().len(), summary.n_tensors);

        // config.json and friends.
        let read = |n: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(out.join(n)).unwrap()).unwrap()
        };
        let c = read("config.json");
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["vocab_size"], s.vocab);
        assert_eq!(c["hidden_size"], HIDDEN);
        assert_eq!(c["intermediate_size"], FFN);
        assert_eq!(c["num_hidden_layers"], LAYERS);
        assert_eq!(c["num_attention_heads"], HEADS);
        assert_eq!(c["num_key_value_heads"], KV_HEADS);
        assert_eq!(c["head_dim"], HEAD_DIM);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["max_position_embeddings"], 256);
        assert_eq!(c["tie_word_embeddings"], tied);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["torch_dtype"], "float32");
        assert_eq!(c["hidden_act"], "silu");
        let g = read("generation_config.json");
        assert_eq!(
            (g["bos_token_id"].as_u64(), g["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );
        let tc = read("tokenizer_config.json");
        assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(tc["bos_token"], "<|im_start|>");

        // Tokenizer: loadable, digits split, specials whole, round trip.
        let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let text = "The capital is 2024";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(
            enc.get_tokens(),
            ["The", "Ġcapital", "Ġis", "Ġ", "2", "0", "2", "4"],
            "{:?}",
            enc.get_tokens()
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        let enc = tok
            .encode("<|im_start|>user\nof it<|im_end|><tool>", true)
            .unwrap();
        assert_eq!(enc.get_ids()[0], 1);
        assert_eq!(enc.get_tokens()[0], "<|im_start|>");
        assert!(enc.get_ids().contains(&2) && enc.get_ids().contains(&3));
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "<|im_start|>user\nof it<|im_end|><tool>"
        );
        assert_eq!(
            tok.decode(enc.get_ids(), true).unwrap(),
            "user\nof it<tool>"
        );
        let specials: Vec<u32> = summary
            .tokenizer
            .special_tokens
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(specials, vec![0, 1, 2]);
        assert_eq!(
            summary.tokenizer.user_defined_tokens,
            vec![(3, "<tool>".to_string())]
        );
        assert_eq!(
            summary.tokenizer.token_type_counts,
            vec![(1, s.vocab - 4), (3, 3), (4, 1)]
        );
    }
}

#[test]
fn add_bos_token_uses_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synthetic_llama(true);
    for (k, v) in &mut s.writer.kv {
        if k == "tokenizer.ggml.add_bos_token" {
            *v = Value::Bool(true);
        }
    }
    let path = s.writer.write(dir.path(), "tiny.gguf");
    let out = dir.path().join("hf");
    convert_llama(&path, &out).unwrap();
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("The cap", true).unwrap();
    assert_eq!(enc.get_tokens(), ["<|im_start|>", "The", "Ġcap"]);
    assert_eq!(
        tok.encode("The cap", false).unwrap().get_tokens(),
        ["The", "Ġcap"]
    );
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("bad.gguf"), "error does not name the file: {e}");
    e
}

#[test]
fn bad_files_give_clear_errors() {
    let good = synthetic_llama(true).writer.bytes();
    assert!(open_err(b"").contains("0 bytes"));
    assert!(open_err(b"GGML\x03\0\0\0").contains("bad magic"));
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open_err(&v1).contains("version 1"));
    let mut be = good.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(&be).contains("big-endian"));
    let mut v9 = good.clone();
    v9[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(open_err(&v9).contains("version 9"));
    assert!(open_err(&good[..good.len() - 1]).contains("truncated"));

    let mut w = Writer::new();
    w.kv("general.alignment", Value::U32(48));
    assert!(open_err(&w.bytes()).contains("general.alignment"));
    let mut w = Writer::new();
    w.kv("a", Value::U8(1)).kv("a", Value::U8(2));
    assert!(open_err(&w.bytes()).contains("appears twice"));
    let mut w = Writer::new();
    w.tensor("x", &[2, 33], GgmlType::Q8_0, vec![0; 34 * 3]);
    assert!(open_err(&w.bytes()).contains("block size"));
    // Unknown value type.
    let mut w = Writer::new();
    w.kv("k", Value::U8(1));
    let mut bytes = w.bytes();
    let at = 24 + 8 + 1;
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(open_err(&bytes).contains("unknown value type 77"));
    // A string length larger than the file.
    let mut w = Writer::new();
    w.kv("k", Value::String("abc".into()));
    let mut bytes = w.bytes();
    let at = 24 + 8 + 1 + 4;
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&bytes).contains("truncated"));
}

#[test]
fn unsupported_types_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synthetic_llama(true);
    let t = s
        .writer
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_up.weight")
        .unwrap();
    t.ty = GgmlType::Q8_1;
    t.data = vec![0; FFN * HIDDEN / 32 * 36];
    let mut w = Writer::new();
    w.tensor("weird", &[4], GgmlType(200), vec![0; 16]);
    let path = s.writer.write(dir.path(), "tiny.gguf");
    let f = GgufFile::open(&path).unwrap();
    let e = f.tensor_f32("blk.1.ffn_up.weight").unwrap_err().to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("Q8_1") && e.contains("tiny.gguf"),
        "{e}"
    );
    let e = convert_llama(&path, &dir.path().join("out"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("Q8_1"),
        "{e}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written when conversion fails early"
    );

    let path = w.write(dir.path(), "weird.gguf");
    let f = GgufFile::open(&path).unwrap();
    let e = f.tensor_f32("weird").unwrap_err().to_string();
    assert!(e.contains("weird") && e.contains("type#200"), "{e}");
}

#[test]
fn conversion_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = synthetic_llama(true);
    s.writer.kv[0].1 = Value::String("gpt2".into());
    let p = s.writer.write(dir.path(), "arch.gguf");
    let e = convert_llama(&p, &dir.path().join("o1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("'gpt2'") && e.contains("arch.gguf"), "{e}");

    let mut s = synthetic_llama(true);
    s.writer
        .tensors
        .retain(|t| t.name != "blk.1.ffn_down.weight");
    let p = s.writer.write(dir.path(), "missing.gguf");
    let e = convert_llama(&p, &dir.path().join("o2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.1.mlp.down_proj.weight"), "{e}");

    let mut s = synthetic_llama(true);
    for (k, v) in &mut s.writer.kv {
        if k == "tokenizer.ggml.model" {
            *v = Value::String("llama".into());
        }
    }
    let p = s.writer.write(dir.path(), "spm.gguf");
    let e = convert_llama(&p, &dir.path().join("o3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("'llama'"),
        "{e}"
    );

    let mut s = synthetic_llama(true);
    s.writer.tensors.push(RawTensor {
        name: "blk.0.attn_gate.weight".into(),
        dims: vec![32],
        ty: GgmlType::F32,
        data: vec![0; 128],
    });
    let p = s.writer.write(dir.path(), "extra.gguf");
    let e = convert_llama(&p, &dir.path().join("o4"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.attn_gate.weight"), "{e}");
}

/// Truncations and byte corruptions never panic: opening fails cleanly, or the file opens
/// and every tensor either reads or fails cleanly.
#[test]
fn corrupted_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = synthetic_llama(true).writer.bytes();
    let header_len = GgufFile::open(synthetic_llama(true).writer.write(dir.path(), "g.gguf"))
        .unwrap()
        .data_offset() as usize;
    let p = dir.path().join("c.gguf");
    let probe = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        if let Ok(f) = GgufFile::open(&p) {
            for t in f.tensors().to_vec() {
                let _ = f.tensor_f32(&t.name);
            }
        }
    };
    for cut in (0..header_len)
        .step_by(7)
        .chain([header_len, good.len() - 1])
    {
        probe(&good[..cut]);
        assert!(
            GgufFile::open(&p).is_err() || cut >= header_len,
            "cut {cut}"
        );
    }
    let mut rng = Lcg(7);
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(header_len as u32) as usize;
            bytes[at] = rng.below(256) as u8;
        }
        probe(&bytes);
    }
}
