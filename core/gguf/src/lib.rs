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

/// The assets folder of `scripts/fetch-assets.sh`: `$SIPT_ASSETS`, else
/// `$HOME/.cache/sipt/assets`.
pub fn default_assets_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("SIPT_ASSETS").filter(|d| !d.is_empty()) {
        return Some(dir.into());
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| std::path::PathBuf::from(h).join(".cache/sipt/assets"))
}

/// Where `scripts/fetch-assets.sh` puts the SmolLM2-135M-Instruct GGUF file.
pub fn smollm2_gguf_path() -> Option<std::path::PathBuf> {
    default_assets_dir().map(|d| d.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
