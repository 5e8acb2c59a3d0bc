//! From an experiment's `[data]` and `[model]` to tokens: the training files, the tokenizer
//! (the run's copy, the model's, a configured file, or a BPE trained on the data and cached),
//! and the token shards of every file (built once per tokenizer and text settings, cached on
//! disk, mapped for training).

use super::shards::{self, Progress, Shard};
use super::{list_files, read_documents_up_to, Corpus, Format, Segment, Tokens};
use crate::model::TOKENIZER_JSON;
use crate::tokenizer::{self, Tokenizer};
use anyhow::{bail, Context, Result};
use sipt_experiment::config::Experiment;
use sipt_experiment::paths::{self, expand_path, fingerprint};
use sipt_experiment::rundir::RunDir;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A tokenizer trained on the corpus reads at most this much of its text.
const BPE_SAMPLE_BYTES: usize = 256 << 20;

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
    let source = tokenizer_source(e, files)?;
    std::fs::copy(&source, &in_run)
        .with_context(|| format!("cannot copy tokenizer {} into the run", source.display()))?;
    Tokenizer::load(&in_run)
}

/// Where an experiment's tokenizer comes from (training and caching a BPE when it has none).
pub fn tokenizer_source(e: &Experiment, files: &[PathBuf]) -> Result<PathBuf> {
    if !e.model.path.is_empty() {
        return Ok(Path::new(&expand_path(&e.model.path)).join(TOKENIZER_JSON));
    }
    if !e.model.tokenizer.is_empty() {
        return Ok(PathBuf::from(expand_path(&e.model.tokenizer)));
    }
    let key = fingerprint(
        files,
        &format!("bpe-{}-{}", e.model.vocab_size, e.data.text_field),
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
        let docs =
            read_documents_up_to(files, &e.data.format, &e.data.text_field, BPE_SAMPLE_BYTES)?;
        tokenizer::train_bpe(docs.into_iter(), e.model.vocab_size, &cached)?;
    }
    Ok(cached)
}

/// What preparing a corpus found and did.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub files: usize,
    /// Shards tokenized now (the others were cached).
    pub built: usize,
    pub documents: u64,
    pub tokens: u64,
    pub skipped: u64,
    /// Bytes of document text.
    pub text_bytes: u64,
    /// Bytes of the source files tokenized now (compressed as stored).
    pub source_bytes_built: u64,
    /// Bytes of document text tokenized now.
    pub text_bytes_built: u64,
    pub seconds: f64,
}

/// The folder of token shards: `SIPT_SHARDS`, else `tokens/v1` in the cache.
pub fn shard_dir() -> PathBuf {
    match std::env::var_os("SIPT_SHARDS").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => paths::cache_root().join("tokens").join("v1"),
    }
}

/// The cache key of a tokenizer and text settings: shards built under another never mix.
fn shard_key(tokenizer: &Tokenizer, format: &str, field: &str) -> String {
    let bytes = std::fs::read(tokenizer.path()).unwrap_or_default();
    let tok = fingerprint(&[], &String::from_utf8_lossy(&bytes));
    format!("{tok:x}-{format}-{field}")
}

/// Map the token shard of every file, tokenizing the missing ones (a progress bar on a
/// terminal, a log line per shard otherwise). Returns the shards in file order.
pub fn prepare_data(
    files: &[PathBuf],
    format: &str,
    field: &str,
    tokenizer: &Tokenizer,
) -> Result<(Vec<Shard>, Prepared)> {
    let started = Instant::now();
    let dir = shard_dir();
    let key = shard_key(tokenizer, format, field);
    let mut out = Vec::with_capacity(files.len());
    let mut report = Prepared {
        files: files.len(),
        ..Prepared::default()
    };
    let mut missing = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let path = shards::shard_path(&dir, file, &key);
        match Shard::open(&path)? {
            Some(s) => out.push(Some(s)),
            None => {
                out.push(None);
                missing.push((i, path));
            }
        }
    }
    if !missing.is_empty() {
        let total: u64 = missing
            .iter()
            .map(|(i, _)| std::fs::metadata(&files[*i]).map(|m| m.len()).unwrap_or(0))
            .sum();
        let progress = Progress::default();
        let bar = Bar::start(total, &progress);
        for (i, path) in &missing {
            let file = &files[*i];
            let one = Instant::now();
            let info = shards::build(
                file,
                Format::of(file, format),
                field,
                tokenizer,
                path,
                &progress,
            )
            .with_context(|| format!("cannot tokenize {}", file.display()))?;
            // On a log, a line for each shard that took a while (and the total at the end).
            if !bar.live() && one.elapsed() > Duration::from_secs(2) {
                tracing::info!(
                    "tokenized {}: {} documents, {} tokens in {:.1}s",
                    file.display(),
                    info.documents,
                    info.tokens,
                    one.elapsed().as_secs_f64()
                );
            }
            report.text_bytes_built += info.text_bytes;
            let shard = Shard::open(path)?.with_context(|| {
                format!("the shard just built is unreadable: {}", path.display())
            })?;
            out[*i] = Some(shard);
        }
        bar.finish();
        report.built = missing.len();
        report.source_bytes_built = total;
    }
    let shards: Vec<Shard> = out.into_iter().flatten().collect();
    for s in &shards {
        report.documents += s.info.documents;
        report.tokens += s.info.tokens;
        report.skipped += s.info.skipped;
        report.text_bytes += s.info.text_bytes;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok((shards, report))
}

/// A progress bar over the source bytes while shards are built (on a terminal only).
struct Bar {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bar {
    fn start(total: u64, progress: &Progress) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar {
                stop: None,
                thread: None,
            };
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "tokenizing {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p = progress.clone();
        let thread = std::thread::spawn(move || loop {
            bar.set_position(p.source_bytes.load(Relaxed).min(total));
            bar.set_message(format!(
                "{} docs, {} tokens",
                p.documents.load(Relaxed),
                p.tokens.load(Relaxed)
            ));
            match rx.recv_timeout(Duration::from_millis(200)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => {
                    bar.finish_and_clear();
                    return;
                }
            }
        });
        Bar {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn live(&self) -> bool {
        self.thread.is_some()
    }

    fn finish(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The corpus of an experiment: every training file's shard (built where missing) and the
/// split into train and validation.
pub fn prepare_corpus(e: &Experiment, files: &[PathBuf], tokenizer: &Tokenizer) -> Result<Corpus> {
    let d = &e.data;
    let (shards, report) = prepare_data(files, &d.format, &d.text_field, tokenizer)?;
    if report.built > 0 {
        tracing::info!(
            "tokenized {} of {} file(s) in {:.1}s: {} documents, {} tokens",
            report.built,
            report.files,
            report.seconds,
            report.documents,
            report.tokens
        );
    }
    let mut tokens = Tokens::default();
    let mut docs = Vec::new();
    for s in shards {
        let offset = tokens.len();
        docs.extend(s.documents(offset));
        tokens.push_shard(s);
    }
    if docs.is_empty() {
        bail!(
            "data.train holds no documents ({} file(s), {} skipped)",
            files.len(),
            report.skipped
        );
    }
    let mut corpus = Corpus::split(tokens, &docs, d.validation_fraction, e.experiment.seed);
    if !d.validation.is_empty() {
        // A separate validation source replaces the carved-out split.
        let patterns: Vec<String> = d.validation.iter().map(|p| expand_path(p)).collect();
        let vfiles = list_files(&patterns).context("data.validation")?;
        let (vshards, _) = prepare_data(&vfiles, &d.format, &d.text_field, tokenizer)?;
        corpus.train.extend(std::mem::take(&mut corpus.validation));
        corpus.train.sort_by_key(|s| s.start);
        let mut validation: Vec<Segment> = Vec::new();
        for s in vshards {
            let offset = corpus.tokens.len();
            validation.extend(s.documents(offset));
            corpus.tokens.push_shard(s);
        }
        corpus.validation = validation;
    }
    Ok(corpus)
}
