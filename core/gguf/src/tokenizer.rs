//! Build a Hugging Face `tokenizers` tokenizer from GGUF tokenizer metadata.
//!
//! Only `tokenizer.ggml.model = "gpt2"` (GPT-2 style byte-level BPE) is supported.
//! The pre-tokenizer follows `tokenizer.ggml.pre`:
//! - `smollm`, `starcoder`, `refact`: digits split one by one, then byte-level (no prefix space);
//! - `gpt-2`, `gpt2`, `default` or absent: byte-level with the GPT-2 regex;
//! - `llama-bpe`, `llama3`: the Llama 3 split regex, then byte-level without its own regex;
//! - anything else: byte-level with the GPT-2 regex, and a warning.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;

/// GGUF token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What the tokenizer metadata said, next to the built tokenizer.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerInfo {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre`, if present.
    pub pre: Option<String>,
    pub n_tokens: usize,
    pub n_merges: usize,
    /// Tokens registered as special added tokens (id, text): control and unknown tokens,
    /// plus the bos/eos/pad/unk tokens.
    pub special_tokens: Vec<(u32, String)>,
    /// User-defined tokens registered as non-special added tokens.
    pub user_defined_tokens: Vec<(u32, String)>,
    /// How many tokens there are of each token type id, sorted by type.
    pub token_type_counts: Vec<(i64, usize)>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
    /// Things that are not errors but that a user should know.
    pub warnings: Vec<String>,
}

fn token_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    match gguf.get_u64(key)? {
        None => Ok(None),
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
        Some(id) => Err(GgufError::metadata(
            gguf.path(),
            key,
            format!("token id {id} is out of range (vocabulary has {n_tokens} tokens)"),
        )),
    }
}

/// The tokenizer described by the GGUF metadata, plus the facts read on the way and the
/// token strings (indexed by id).
pub fn build_tokenizer(gguf: &GgufFile) -> Result<(Tokenizer, TokenizerInfo, Vec<String>)> {
    let path = gguf.path();
    let model = gguf.req_str("tokenizer.ggml.model")?.to_string();
    if model != "gpt2" {
        return Err(GgufError::tokenizer(
            path,
            format!(
                "tokenizer.ggml.model is '{model}'; only 'gpt2' (byte-level BPE) can be converted"
            ),
        ));
    }
    let pre = gguf.get_str("tokenizer.ggml.pre")?.map(str::to_string);
    let tokens: Vec<String> = gguf
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| GgufError::metadata(path, "tokenizer.ggml.tokens", "missing"))?
        .into_iter()
        .map(str::to_string)
        .collect();
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(GgufError::metadata(
            path,
            "tokenizer.ggml.tokens",
            format!("{} tokens", tokens.len()),
        ));
    }
    let merges: Vec<(String, String)> = gguf
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| GgufError::metadata(path, "tokenizer.ggml.merges", "missing"))?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    GgufError::metadata(
                        path,
                        "tokenizer.ggml.merges",
                        format!("merge {i} ({m:?}) is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match gguf.get_i64_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == tokens.len() => t,
        Some(t) => {
            return Err(GgufError::metadata(
                path,
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", t.len(), tokens.len()),
            ))
        }
        None => vec![token_type::NORMAL; tokens.len()],
    };

    let n = tokens.len();
    let bos = token_id(gguf, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(gguf, "tokenizer.ggml.eos_token_id", n)?;
    let pad = token_id(gguf, "tokenizer.ggml.padding_token_id", n)?;
    let unk = token_id(gguf, "tokenizer.ggml.unknown_token_id", n)?;
    let add_bos = gguf
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = gguf
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let chat_template = gguf.get_str("tokenizer.chat_template")?.map(str::to_string);
    let mut warnings = Vec::new();

    // Vocabulary: on a duplicated string the first id wins (as in llama.cpp's token map).
    let mut vocab = Vocab::default();
    let mut duplicates = 0usize;
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.contains_key(tok) {
            duplicates += 1;
        } else {
            vocab.insert(tok.clone(), id as u32);
        }
    }
    if duplicates > 0 {
        warnings.push(format!(
            "{duplicates} token strings appear more than once; their later ids are unreachable"
        ));
    }
    let missing_bytes: Vec<String> = (0u8..=255)
        .filter(|&b| !vocab.contains_key(&byte_level_char(b).to_string()))
        .map(|b| format!("{b:#04x}"))
        .collect();
    if !missing_bytes.is_empty() {
        warnings.push(format!(
            "the vocabulary has no byte-level token for {} bytes ({}); text containing them \
             is dropped when encoding",
            missing_bytes.len(),
            missing_bytes.join(" ")
        ));
    }

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges.clone())
        .build()
        .map_err(|e| GgufError::tokenizer(path, format!("building the BPE model: {e}")))?;

    let pre_tokenizer = match pre.as_deref() {
        Some("smollm" | "starcoder" | "refact") => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]))
        }
        Some("llama-bpe" | "llama3") => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| GgufError::tokenizer(path, format!("split regex: {e}")))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]))
        }
        None | Some("gpt-2" | "gpt2" | "default") => {
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))
        }
        Some(other) => {
            warnings.push(format!(
                "tokenizer.ggml.pre '{other}' is not known here; using GPT-2 byte-level pre-tokenization"
            ));
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))
        }
    };

    let post_processor = if add_bos || add_eos {
        let named_token = |id: Option<u32>, what: &str| -> Result<(String, u32)> {
            let id = id.ok_or_else(|| {
                GgufError::tokenizer(
                    path,
                    format!("add_{what}_token is set but there is no {what} token id"),
                )
            })?;
            let t = tokens[id as usize].clone();
            if t.is_empty() || t.contains(char::is_whitespace) || t.contains(':') {
                return Err(GgufError::tokenizer(
                    path,
                    format!("{what} token {t:?} cannot be written in a post-processing template"),
                ));
            }
            Ok((t, id))
        };
        let b = if add_bos {
            Some(named_token(bos, "bos")?)
        } else {
            None
        };
        let e = if add_eos {
            Some(named_token(eos, "eos")?)
        } else {
            None
        };
        let mut single: Vec<String> = Vec::new();
        let mut pair: Vec<String> = Vec::new();
        if let Some((t, _)) = &b {
            single.push(format!("{t}:0"));
            pair.push(format!("{t}:0"));
        }
        single.push("$A:0".into());
        pair.push("$A:0".into());
        if let Some((t, _)) = &e {
            single.push(format!("{t}:0"));
            pair.push(format!("{t}:0"));
        }
        if let Some((t, _)) = &b {
            pair.push(format!("{t}:1"));
        }
        pair.push("$B:1".into());
        if let Some((t, _)) = &e {
            pair.push(format!("{t}:1"));
        }
        let mut specials: Vec<(String, u32)> = b.into_iter().chain(e).collect();
        specials.dedup();
        let template = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .and_then(|b| b.try_pair(pair.join(" ")))
            .map_err(|e| GgufError::tokenizer(path, format!("template: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| GgufError::tokenizer(path, format!("template: {e}")))?;
        PostProcessorWrapper::Template(template)
    } else {
        PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, true))
    };

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::new(false, true, true)))
        .with_post_processor(Some(post_processor));

    // Added tokens: control/unknown tokens and the named bos/eos/pad/unk are special;
    // user-defined tokens are matched whole but not special.
    let named: HashSet<u32> = [bos, eos, pad, unk].into_iter().flatten().collect();
    let mut special_tokens = Vec::new();
    let mut user_defined_tokens = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        let id = id as u32;
        if tok.is_empty() || vocab_id(&tokenizer, tok) != Some(id) {
            continue;
        }
        if ty == token_type::CONTROL || ty == token_type::UNKNOWN || named.contains(&id) {
            special_tokens.push((id, tok.clone()));
        } else if ty == token_type::USER_DEFINED {
            user_defined_tokens.push((id, tok.clone()));
        }
    }
    let specials: Vec<AddedToken> = special_tokens
        .iter()
        .map(|(_, t)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let users: Vec<AddedToken> = user_defined_tokens
        .iter()
        .map(|(_, t)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tokenizer.add_tokens(&users);

    let mut counts: Vec<(i64, usize)> = Vec::new();
    for &t in &types {
        match counts.iter_mut().find(|(k, _)| *k == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t, 1)),
        }
    }
    counts.sort_unstable();

    let info = TokenizerInfo {
        model,
        pre,
        n_tokens: tokens.len(),
        n_merges: merges.len(),
        special_tokens,
        user_defined_tokens,
        token_type_counts: counts,
        bos_token_id: bos,
        eos_token_id: eos,
        pad_token_id: pad,
        unk_token_id: unk,
        add_bos_token: add_bos,
        add_eos_token: add_eos,
        chat_template,
        warnings,
    };
    Ok((tokenizer, info, tokens))
}

fn vocab_id(tokenizer: &Tokenizer, tok: &str) -> Option<u32> {
    tokenizer.token_to_id(tok)
}

/// GPT-2's byte-to-unicode mapping: printable Latin-1 bytes stand for themselves, the others
/// are shifted to U+0100 onwards in byte order.
pub fn byte_level_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xa1..=0xac).contains(&x) || x >= 0xae;
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).unwrap_or('\u{fffd}')
    }
}

/// Encode `text` with `tokenizer` (no added special tokens) and check that decoding gives
/// it back exactly. Returns the token ids.
pub fn check_round_trip(tokenizer: &Tokenizer, text: &str, path: &Path) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| GgufError::tokenizer(path, format!("encoding {text:?}: {e}")))?;
    let ids = enc.get_ids().to_vec();
    let back = tokenizer
        .decode(&ids, false)
        .map_err(|e| GgufError::tokenizer(path, format!("decoding {ids:?}: {e}")))?;
    if back != text {
        return Err(GgufError::tokenizer(
            path,
            format!("round trip failed: {text:?} -> {ids:?} -> {back:?}"),
        ));
    }
    Ok(ids)
}
