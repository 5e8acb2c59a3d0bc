//! Read GGUF model files and convert Llama-family models to Hugging Face layout.
//!
//! - [`GgufFile`]: parse a GGUF v2/v3 file (header, metadata of every value type, tensor
//!   infos, alignment) and read tensors, dequantized to f32 with [`GgufFile::tensor_f32`]
//!   (F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
//! - [`convert_llama`]: write `model.safetensors` (f32, Hugging Face `LlamaForCausalLM`
//!   names, Q/K rows un-permuted for rotate-half RoPE), `config.json`,
//!   `generation_config.json`, `tokenizer.json` (byte-level BPE built from the GGUF
//!   vocabulary with the `tokenizers` crate) and `tokenizer_config.json` (with the chat
//!   template, when the file has one).
//!
//! ```no_run
//! let summary = sipt_gguf::convert_llama(
//!     "SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(),
//!     "smollm2-hf".as_ref(),
//! )?;
//! println!("{} parameters in {:.1}s", summary.n_params, summary.seconds);
//! # Ok::<(), sipt_gguf::GgufError>(())
//! ```
#![forbid(unsafe_code)]

mod dequant;
mod error;
mod llama;
mod reader;
mod tokenizer;
mod types;

#[cfg(test)]
mod tests;

pub use dequant::{bf16_to_f32, dequantize, f16_to_f32, DequantError};
pub use error::{GgufError, Result};
pub use llama::{convert_llama, hf_tensor_name, unpermute_qk, ConvertSummary, LlamaHParams};
pub use reader::{GgufFile, TensorInfo, Value, ValueType, DEFAULT_ALIGNMENT};
pub use tokenizer::{
    build_tokenizer, byte_level_char, check_round_trip, token_type, TokenizerInfo,
};
pub use types::GgmlType;

/// Re-exported so callers can use the tokenizer [`build_tokenizer`] returns without
/// depending on a matching `tokenizers` version themselves.
pub use tokenizers;

/// The assets folder of `scripts/fetch-assets.sh`, found by the rule every part of sipt uses:
/// `$SIPT_ASSETS`, else `<cache root>/assets`, the cache root being `$SIPT_CACHE`, else
/// `$XDG_CACHE_HOME/sipt`, else `$HOME/.cache/sipt` (unset and empty variables alike skipped).
pub fn default_assets_dir() -> Option<std::path::PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("SIPT_ASSETS") {
        return Some(dir.into());
    }
    let root = match (var("SIPT_CACHE"), var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(cache), _, _) => std::path::PathBuf::from(cache),
        (None, Some(xdg), _) => std::path::PathBuf::from(xdg).join("sipt"),
        (None, None, Some(home)) => std::path::PathBuf::from(home).join(".cache/sipt"),
        (None, None, None) => return None,
    };
    Some(root.join("assets"))
}

/// Where `scripts/fetch-assets.sh` puts the SmolLM2-135M-Instruct GGUF file.
pub fn smollm2_gguf_path() -> Option<std::path::PathBuf> {
    default_assets_dir().map(|d| d.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
