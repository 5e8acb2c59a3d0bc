//! What every training loop shares: the state it starts from ([`prepare`]: device, tokenizer,
//! corpus, policy, the checkpoint to resume), the optimizer and schedule, checkpoints, and the
//! step end ([`StepEnd`]: evaluation, logging, progress, checkpoint). The loops themselves are
//! [`ntp`] here and `crate::sip`.

pub mod checkpoint;
pub mod ntp;
pub mod optim;
mod step_end;

pub use step_end::StepEnd;

use crate::data::{self, Corpus, Windows};
use crate::dist::Dist;
use crate::model::{self, LlamaConfig, Policy};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use checkpoint::TrainState;
use optim::AdamW;
use sipt_experiment::config::{Experiment, Resolved};
use sipt_experiment::paths::expand_path;
use sipt_experiment::rundir::{RunDir, CHECKPOINTS_DIR};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::Device;

/// The optimizer and training state a loop starts from: fresh, or restored from the checkpoint
/// being resumed (optimizer moments, step, tokens, data position).
pub fn start(
    e: &Experiment,
    policy: &Policy,
    windows: &mut Windows,
    resume: &Option<(PathBuf, TrainState)>,
) -> Result<(AdamW, TrainState)> {
    let t = &e.train;
    let mut optimizer = AdamW::new(
        policy.vs.variables().into_iter().collect(),
        t.beta1,
        t.beta2,
        t.weight_decay,
    );
    let mut state = TrainState {
        step: 0,
        tokens: 0,
        data: windows.position,
        seed: e.experiment.seed,
        extra: serde_json::Value::Null,
    };
    if let Some((dir, saved)) = resume {
        optimizer.load(&dir.join(checkpoint::OPTIMIZER))?;
        windows.seek(saved.data);
        state = saved.clone();
        tracing::info!("resuming from {} (step {})", dir.display(), state.step);
    }
    Ok((optimizer, state))
}

/// What every training loop starts from.
pub struct Prepared {
    pub device: Device,
    pub tokenizer: Tokenizer,
    pub corpus: Corpus,
    pub policy: Policy,
    /// The checkpoint to resume from, with its state.
    pub resume: Option<(PathBuf, TrainState)>,
    /// Whether the run continues an earlier process (`--resume`), with or without a checkpoint.
    pub resuming: bool,
    /// The job's ranks (one, when the run is alone).
    pub dist: Rc<Dist>,
}

/// Set up the device, tokenizer, data and policy (from the latest checkpoint when resuming).
/// In a job of several ranks, rank 0 prepares the tokenizer and the corpus cache and the others
/// then read them, and every rank starts from rank 0's weights.
pub fn prepare(
    resolved: &Resolved,
    run: &RunDir,
    resume: bool,
    dist: Rc<Dist>,
) -> Result<Prepared> {
    let e = &resolved.experiment;
    let alone = dist.size() == 1;
    if e.experiment.threads > 0 {
        tch::set_num_threads(e.experiment.threads as i32);
    } else if !alone {
        // The ranks of a machine share its cores.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / dist.world.local_size).max(1) as i32);
    }
    let device = if alone {
        model::select_device(&e.experiment.device)?
    } else {
        dist.device()
    };
    tracing::info!(
        "device: {device:?}, {} CPU thread(s)",
        tch::get_num_threads()
    );
    let files = data::train_files(e)?;
    if !dist.is_writer() {
        dist.barrier()?;
    }
    let tokenizer = if dist.is_writer() {
        data::prepare_tokenizer(e, run, resume, &files)?
    } else {
        Tokenizer::load(&run.file(model::TOKENIZER_JSON))?
    };
    let corpus = data::prepare_corpus(e, &files, &tokenizer)?;
    if dist.is_writer() && !alone {
        dist.barrier()?;
    }
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
    let variables: Vec<tch::Tensor> = policy.vs.trainable_variables();
    dist.broadcast_params(&variables)?;
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
        resuming: resume,
        dist,
    })
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
        family: Default::default(),
        rope_scaling: None,
        sliding_window: None,
    }
}

/// Every sequence the run will make fits the policy's positions: checked before any work,
/// naming the settings. From-scratch sizes are checked when the file is validated (by the same
/// `Experiment::sequence_lengths`); this catches a pretrained model with fewer positions.
pub fn check_lengths(e: &Experiment, policy: &Policy) -> Result<()> {
    let positions = policy.model.config.max_position_embeddings;
    for seq in e.sequence_lengths() {
        if seq.tokens > positions {
            bail!(
                "{} = {} tokens do not fit the model's {positions} positions (max_position_embeddings)",
                seq.what,
                seq.tokens
            );
        }
    }
    Ok(())
}
