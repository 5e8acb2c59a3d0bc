//! Running an experiment: prepare the tokenizer, the data and the policy, then train with the
//! experiment's objective, logging metrics and writing checkpoints into the run directory.

use crate::config::{Experiment, Resolved};
use crate::data::{self, Corpus, Segment, Windows};
use crate::metrics::Row;
use crate::model::{self, LlamaConfig, Policy, TOKENIZER_JSON};
use crate::paths;
use crate::progress::Progress;
use crate::registry::Registry;
use crate::rundir::{RunDir, CHECKPOINTS_DIR, METRICS_FILE};
use crate::tokenizer::{self, Tokenizer};
use crate::train::checkpoint::{self, TrainState};
use crate::train::optim::cosine_lr;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// `~/x` → home, `@assets/x` → the assets folder; other paths unchanged.
pub fn expand_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("@assets/") {
        return paths::assets_dir().join(rest).display().to_string();
    }
    if let Some(rest) = path.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest).display().to_string();
        }
    }
    path.to_string()
}

/// What every training loop starts from.
pub struct Prepared {
    pub device: Device,
    pub tokenizer: Tokenizer,
    pub corpus: Corpus,
    pub policy: Policy,
    /// The checkpoint to resume from, with its state.
    pub resume: Option<(PathBuf, TrainState)>,
}

pub fn train_files(e: &Experiment) -> Result<Vec<PathBuf>> {
    if e.data.train.is_empty() {
        bail!("data.train is empty: list the training files, folders or globs (e.g. \"@assets/corpora/shakespeare\")");
    }
    let patterns: Vec<String> = e.data.train.iter().map(|p| expand_path(p)).collect();
    data::list_files(&patterns).context("data.train")
}

/// The tokenizer: the run's own copy when resuming, the pretrained model's, the configured
/// file, or a byte-level BPE trained on the training data (cached across runs).
fn prepare_tokenizer(
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
        let key = data::fingerprint(
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
            let docs = data::read_documents(files, &e.data.format, &e.data.jsonl_field)?;
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
    let tok_key = data::fingerprint(&[], &String::from_utf8_lossy(&tok_bytes));
    let key = data::fingerprint(
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
            let texts = data::read_documents(files, &e.data.format, &e.data.jsonl_field)?;
            let (tokens, docs) = data::tokenize(&texts, tokenizer)?;
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
        let vfiles = data::list_files(&patterns).context("data.validation")?;
        let texts = data::read_documents(&vfiles, &e.data.format, &e.data.jsonl_field)?;
        let (vtokens, vdocs) = data::tokenize(&texts, tokenizer)?;
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
    crate::rundir::write_atomic(path, &bytes)
}

/// The from-scratch architecture of an experiment, sized to the tokenizer.
pub fn scratch_config(e: &Experiment, vocab: usize, eos: Option<u32>) -> LlamaConfig {
    let m = &e.model;
    LlamaConfig {
        // A multiple of 64 keeps the output layer's matrix shapes friendly to the kernels.
        vocab_size: vocab.div_ceil(64) * 64,
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_hidden_layers: m.layers,
        num_attention_heads: m.heads,
        num_key_value_heads: Some(m.kv_heads),
        head_dim: None,
        rms_norm_eps: m.norm_eps,
        rope_theta: m.rope_theta,
        max_position_embeddings: m.max_position,
        tie_word_embeddings: m.tie_embeddings,
        bos_token_id: None,
        eos_token_id: eos.map(|id| model::llama::EosIds::One(id as i64)),
    }
}

/// Set up the device, tokenizer, data and policy (from the latest checkpoint when resuming).
pub fn prepare(resolved: &Resolved, run: &RunDir, resume: bool) -> Result<Prepared> {
    let e = &resolved.experiment;
    if e.experiment.threads > 0 {
        tch::set_num_threads(e.experiment.threads as i32);
    }
    let device = model::select_device(&e.experiment.device)?;
    tracing::info!(
        "device: {device:?}, {} CPU thread(s)",
        tch::get_num_threads()
    );
    let files = train_files(e)?;
    let tokenizer = prepare_tokenizer(e, run, resume, &files)?;
    let corpus = prepare_corpus(e, &files, &tokenizer)?;
    tracing::info!(
        "data: {} train tokens, {} validation tokens, vocabulary {}",
        corpus.train_tokens(),
        corpus.validation_tokens(),
        tokenizer.vocab_size()
    );
    let checkpoints = run.path().join(CHECKPOINTS_DIR);
    let resume_from = if resume {
        match checkpoint::latest(&checkpoints)? {
            Some(dir) => {
                let state = checkpoint::read_state(&dir)?;
                Some((dir, state))
            }
            None => {
                tracing::warn!(
                    "no checkpoint in {}; starting from the beginning",
                    checkpoints.display()
                );
                None
            }
        }
    } else {
        None
    };
    tch::manual_seed(e.experiment.seed as i64);
    let policy = match (&resume_from, e.model.path.is_empty()) {
        (Some((dir, _)), _) => Policy::load(dir, device)?,
        (None, false) => Policy::load(Path::new(&expand_path(&e.model.path)), device)?,
        (None, true) => Policy::from_scratch(
            scratch_config(e, tokenizer.vocab_size(), tokenizer.eos),
            device,
        ),
    };
    if policy.model.config.vocab_size < tokenizer.vocab_size() {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            policy.model.config.vocab_size,
            tokenizer.vocab_size()
        );
    }
    tracing::info!(
        "policy: {} layers, hidden {}, {:.1}M parameters",
        policy.model.config.num_hidden_layers,
        policy.model.config.hidden_size,
        policy.model.config.parameters() as f64 / 1e6
    );
    Ok(Prepared {
        device,
        tokenizer,
        corpus,
        policy,
        resume: resume_from,
    })
}

/// Run the experiment into `run`.
pub fn run(resolved: &Resolved, registry: &Registry, run: &RunDir, resume: bool) -> Result<()> {
    let e = &resolved.experiment;
    let objective = registry
        .build_objective(&e.train.objective.name, e.train.objective.options_value())
        .map_err(|err| anyhow::anyhow!("train.objective: {err}"))?;
    let needs = objective.needs();
    let prepared = prepare(resolved, run, resume)?;
    let context = paths::plugin_context(resolved);
    if needs.candidates {
        return crate::sip::train(e, registry, run, prepared, objective, &context);
    }
    // Next-token runs are evaluated by the same judges, so baselines and SIP runs compare.
    let plugins = crate::sip::Plugins::build(e, registry, &context)?;
    train_ntp(e, run, prepared, &plugins)
}

/// A batch of windows as a `(B, len)` tensor.
fn window_batch(tokens: &[u32], starts: &[usize], len: usize, device: Device) -> Tensor {
    let mut ids = Vec::with_capacity(starts.len() * len);
    for &s in starts {
        ids.extend(tokens[s..s + len].iter().map(|&t| t as i64));
    }
    Tensor::from_slice(&ids)
        .view([starts.len() as i64, len as i64])
        .to_device(device)
}

pub fn autocast<T>(device: Device, dtype: &str, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() && dtype == "bf16" {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// Mean validation loss over fixed windows.
pub fn validation_loss(
    policy: &Policy,
    tokens: &[u32],
    windows: &[usize],
    len: usize,
    batch: usize,
    dtype: &str,
) -> Option<f64> {
    if windows.is_empty() {
        return None;
    }
    let device = policy.device();
    let mut total = 0.0;
    let mut count = 0;
    tch::no_grad(|| {
        for chunk in windows.chunks(batch.max(1)) {
            let ids = window_batch(tokens, chunk, len, device);
            let loss = autocast(device, dtype, || policy.model.ntp_loss(&ids));
            total += loss.double_value(&[]) * chunk.len() as f64;
            count += chunk.len();
        }
    });
    Some(total / count as f64)
}

/// Next-token pretraining: the paper's "standard pretraining" baseline.
fn train_ntp(
    e: &Experiment,
    run: &RunDir,
    prepared: Prepared,
    plugins: &crate::sip::Plugins,
) -> Result<()> {
    let Prepared {
        device,
        tokenizer,
        corpus,
        policy,
        resume,
    } = prepared;
    let t = &e.train;
    let len = e.data.seq_len + 1;
    let mut windows = Windows::new(&corpus.train, len, e.experiment.seed, e.data.shuffle)?;
    let (mut optimizer, mut state) = crate::train::start(e, &policy, &mut windows, &resume)?;
    let mut sink = crate::tracking::Tracker::open(e, run, resume.as_ref().map(|(_, s)| s.step))?;
    let checkpoints = run.path().join(CHECKPOINTS_DIR);
    let tokens_per_step = (t.batch_size * t.grad_accum * e.data.seq_len) as u64;
    let progress = Progress::new(t.steps, state.step, t.log_every).with_status_file(run.path());
    let periodic = crate::eval::Periodic::new(
        e,
        plugins,
        &corpus,
        &tokenizer,
        &policy,
        run,
        resume.is_some(),
    )?;
    tracing::info!(
        "next-token training: {} steps of {} sequences x {} tokens ({} windows per epoch)",
        t.steps,
        t.batch_size * t.grad_accum,
        e.data.seq_len,
        windows.count()
    );

    while state.step < t.steps {
        let started = Instant::now();
        let lr = cosine_lr(state.step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        let mut loss_sum = 0.0;
        for _ in 0..t.grad_accum {
            let starts: Vec<usize> = (0..t.batch_size).map(|_| windows.next_start()).collect();
            let ids = window_batch(&corpus.tokens, &starts, len, device);
            let loss = autocast(device, &e.model.dtype, || policy.model.ntp_loss(&ids))
                / t.grad_accum as f64;
            loss.backward();
            loss_sum += loss.double_value(&[]);
        }
        let grad_norm = optimizer.clip_grad_norm(t.grad_clip);
        optimizer.step(lr);
        optimizer.zero_grad();
        state.step += 1;
        state.tokens += tokens_per_step;
        state.data = windows.position;
        let seconds = started.elapsed().as_secs_f64();

        let mut row = Row::new(state.step);
        row.set("loss/ntp", loss_sum)
            .set("lr", lr)
            .set("grad_norm", grad_norm)
            .set("tokens", state.tokens as f64)
            .set("time/step", seconds)
            .set("perf/tokens_per_second", tokens_per_step as f64 / seconds);
        let last = state.step == t.steps;
        periodic.maybe_run(state.step, last, &policy, &tokenizer, &mut row, &progress);
        sink.log(&row)?;
        let summary = format!(
            "loss {loss_sum:.4}, {:.0} tok/s",
            tokens_per_step as f64 / seconds
        );
        progress.step(state.step, &summary);
        if (t.checkpoint_every > 0 && state.step % t.checkpoint_every == 0) || last {
            let dir = checkpoint::save(
                &checkpoints,
                &policy,
                Some(&optimizer),
                None,
                tokenizer.path(),
                &state,
                t.keep_checkpoints,
            )?;
            progress.note(&format!("checkpoint {}", dir.display()));
        }
    }
    progress.finish();
    sink.finish(true)?;
    println!(
        "finished {} steps; metrics in {}, final model in {}",
        state.step,
        run.file(METRICS_FILE).display(),
        checkpoint::step_dir(&checkpoints, state.step).display()
    );
    Ok(())
}
