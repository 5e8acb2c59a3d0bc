//! From an experiment's `[data]` and `[model]` to tokens: the training files, the tokenizer
//! (the run's copy, the model's, a configured file, or a BPE trained on the data and cached),
//! and the tokenized corpus (cached on disk by the files' fingerprint and the tokenizer).

use super::{list_files, read_documents, tokenize, Corpus, Segment};
use crate::model::TOKENIZER_JSON;
use crate::tokenizer::{self, Tokenizer};
use anyhow::{bail, Context, Result};
use sipt_experiment::config::Experiment;
use sipt_experiment::paths::{self, expand_path, fingerprint};
use sipt_experiment::rundir::RunDir;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The training files of `[data] train`, expanded.
pub fn train_files(e: &Experiment) -> Result<Vec<PathBuf>> {
    if e.data.train.is_empty() {
        bail!("data.train is empty: list the training files, folders or globs (e.g. \"@assets/corpora/shakespeare\")");
    }
    let patterns: Vec<String> = e.data.train.iter().map(|p| expand_path(p)).collect();
    list_files(&patterns).context("data.train")
}

/// The tokenizer: the run's own copy when resuming, the pretrained model's, the configured
/// file, or a byte-level BPE trained on the training data (cached across runs).
pub fn prepare_tokenizer(
    e: &Experiment,
    run: &RunDir,
    resume: bool,
    files: &[PathBuf],
) -> Result<Tokenizer> {
    let in_run = run.file(TOKENIZER_JSON);
    if resume && in_run.exists() {
        return Tokenizer::load(&in_run);
    }
    let source: PathBuf = if !e.model.path.is_empty() {
        Path::new(&expand_path(&e.model.path)).join(TOKENIZER_JSON)
    } else if !e.model.tokenizer.is_empty() {
        PathBuf::from(expand_path(&e.model.tokenizer))
    } else {
        let key = fingerprint(
            files,
            &format!("bpe-{}-{}", e.model.vocab_size, e.data.jsonl_field),
        );
        let cached = paths::cache_root()
            .join("tokenizers")
            .join(format!("bpe-{}-{key:016x}.json", e.model.vocab_size));
        if !cached.exists() {
            tracing::info!(
                "training a byte-level BPE of {} tokens on {} file(s)",
                e.model.vocab_size,
                files.len()
            );
            let docs = read_documents(files, &e.data.format, &e.data.jsonl_field)?;
            tokenizer::train_bpe(docs.into_iter(), e.model.vocab_size, &cached)?;
        }
        cached
    };
    std::fs::copy(&source, &in_run)
        .with_context(|| format!("cannot copy tokenizer {} into the run", source.display()))?;
    Tokenizer::load(&in_run)
}

/// Tokenize (or read the cached tokens of) the training data and split it.
pub fn prepare_corpus(e: &Experiment, files: &[PathBuf], tokenizer: &Tokenizer) -> Result<Corpus> {
    let tok_bytes = std::fs::read(tokenizer.path()).unwrap_or_default();
    let tok_key = fingerprint(&[], &String::from_utf8_lossy(&tok_bytes));
    let key = fingerprint(
        files,
        &format!("{tok_key:x}-{}-{}", e.data.format, e.data.jsonl_field),
    );
    let cache = paths::cache_root()
        .join("tokens")
        .join(format!("{key:016x}.bin"));
    let (tokens, docs) = match read_token_cache(&cache) {
        Some(found) => found,
        None => {
            let started = Instant::now();
            let texts = read_documents(files, &e.data.format, &e.data.jsonl_field)?;
            let (tokens, docs) = tokenize(&texts, tokenizer)?;
            tracing::info!(
                "tokenized {} documents into {} tokens in {:.1}s",
                docs.len(),
                tokens.len(),
                started.elapsed().as_secs_f64()
            );
            if let Err(err) = write_token_cache(&cache, &tokens, &docs) {
                tracing::warn!("cannot cache tokens: {err:#}");
            }
            (tokens, docs)
        }
    };
    let mut corpus = Corpus::split(tokens, &docs, e.data.validation_fraction, e.experiment.seed);
    if !e.data.validation.is_empty() {
        // A separate validation source replaces the carved-out split.
        let patterns: Vec<String> = e.data.validation.iter().map(|p| expand_path(p)).collect();
        let vfiles = list_files(&patterns).context("data.validation")?;
        let texts = read_documents(&vfiles, &e.data.format, &e.data.jsonl_field)?;
        let (vtokens, vdocs) = tokenize(&texts, tokenizer)?;
        let offset = corpus.tokens.len();
        corpus.train.extend(std::mem::take(&mut corpus.validation));
        corpus.train.sort_by_key(|s| s.start);
        corpus.tokens.extend(vtokens);
        corpus.validation = vdocs
            .into_iter()
            .map(|s| Segment {
                start: s.start + offset,
                end: s.end + offset,
            })
            .collect();
    }
    Ok(corpus)
}

const TOKEN_CACHE_MAGIC: &[u8; 8] = b"SIPTTOK1";

fn read_token_cache(path: &Path) -> Option<(Vec<u32>, Vec<Segment>)> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 24 || &bytes[..8] != TOKEN_CACHE_MAGIC {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    let (n_docs, n_tokens) = (u64_at(8) as usize, u64_at(16) as usize);
    let docs_end = 24 + n_docs * 16;
    if bytes.len() != docs_end + n_tokens * 4 {
        return None;
    }
    let docs = (0..n_docs)
        .map(|i| Segment {
            start: u64_at(24 + i * 16) as usize,
            end: u64_at(32 + i * 16) as usize,
        })
        .collect();
    let tokens = bytes[docs_end..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((tokens, docs))
}

fn write_token_cache(path: &Path, tokens: &[u32], docs: &[Segment]) -> Result<()> {
    let mut bytes = Vec::with_capacity(24 + docs.len() * 16 + tokens.len() * 4);
    bytes.extend_from_slice(TOKEN_CACHE_MAGIC);
    bytes.extend_from_slice(&(docs.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for d in docs {
        bytes.extend_from_slice(&(d.start as u64).to_le_bytes());
        bytes.extend_from_slice(&(d.end as u64).to_le_bytes());
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    sipt_experiment::rundir::write_atomic(path, &bytes)
}
