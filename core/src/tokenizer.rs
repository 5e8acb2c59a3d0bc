//! Tokenizers: Hugging Face `tokenizer.json` files through the `tokenizers` crate, and a
//! byte-level BPE trained on the corpus for small from-scratch models (a small vocabulary keeps
//! the embedding and the output layer small).

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// End-of-document token of tokenizers sipt trains.
pub const EOS_TOKEN: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Separates documents; also where generation may stop.
    pub eos: Option<u32>,
    path: PathBuf,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let eos = [EOS_TOKEN, "</s>", "<|im_end|>", "<eos>"]
            .iter()
            .find_map(|t| inner.token_to_id(t));
        Ok(Tokenizer {
            inner,
            eos,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// Several texts at once, taken by value (parallel inside the tokenizers crate; no
    /// character offsets are tracked).
    pub fn encode_batch_owned(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch_fast(texts, false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Several texts at once (parallel inside the tokenizers crate).
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }
}

/// Train a byte-level BPE of `vocab_size` tokens on `texts` and write it to `out`.
pub fn train_bpe<I>(texts: I, vocab_size: usize, out: &Path) -> Result<()>
where
    I: Iterator<Item = String> + Send,
{
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("cannot set up a tokenizer: {e}"))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .build();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow!("cannot train the tokenizer: {e}"))?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialize the tokenizer for {}: {e}", out.display()))?;
    // Runs sharing a cold cache may train the same tokenizer at once: each writes its own
    // temporary file, and the (identical) results replace each other whole.
    sipt_experiment::rundir::write_atomic(out, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_round_trips_and_knows_eos() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tok.json");
        let texts: Vec<String> = (0..200)
            .map(|i| format!("The quick brown fox number {i} jumps over the lazy dog.\n"))
            .collect();
        train_bpe(texts.into_iter(), 300, &out).unwrap();
        let tok = Tokenizer::load(&out).unwrap();
        assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 256);
        let text = "The lazy fox, 42 times: ünïcödé!";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids), text);
        assert_eq!(tok.eos, tok.inner.token_to_id(EOS_TOKEN));
        assert!(tok.eos.is_some());
    }

    #[test]
    fn runs_training_the_same_tokenizer_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shared.json");
        let texts: Vec<String> = (0..50)
            .map(|i| format!("a shared corpus, line {i}\n"))
            .collect();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| train_bpe(texts.clone().into_iter(), 280, &out)))
                .collect();
            for w in workers {
                w.join().unwrap().unwrap();
            }
        });
        assert!(Tokenizer::load(&out).unwrap().vocab_size() > 256);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary files were left behind: {left:?}");
    }
}
