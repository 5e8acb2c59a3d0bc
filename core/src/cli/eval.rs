//! `sipt eval`: greedy continuations of held-out and unsafe prefixes judged by an experiment's
//! judges, the win rate against a baseline, and perplexity — the periodic evaluation of a run,
//! on demand.

use super::{Exit, FileArgs};
use crate::data::{prepare_corpus, train_files};
use crate::eval::{prompt_budget, unsafe_prompts, validation_prompts, Evaluator};
use crate::model::{select_device, Policy, CONFIG_JSON, TOKENIZER_JSON};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint;
use sipt_experiment::config::{Resolved, SetOverride};
use sipt_experiment::paths::plugin_context;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::registry::Registry;
use sipt_experiment::rundir::{CHECKPOINTS_DIR, CONFIG_FILE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub(super) struct EvalArgs {
    /// A run directory (its latest checkpoint) or a model folder (e.g. a checkpoint).
    model: PathBuf,
    /// The baseline for the win rate: a run directory or a model folder.
    #[arg(long)]
    against: Option<PathBuf>,
    /// Experiment file with the [eval], [judges] and [data] to use (default: the run's own
    /// config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<SetOverride>,
    /// Print the metrics as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(super) fn eval(args: EvalArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let Some(config) = args.config.clone().or_else(|| run_config(&args.model)) else {
        return Err(Exit::invalid(format!(
            "no experiment file for {}: pass --config FILE",
            args.model.display()
        )));
    };
    let file = FileArgs {
        file: config,
        sets: args.sets.clone(),
    };
    let (resolved, registry) = file.load(libraries)?;
    let model_dir = model_folder(&args.model)?;
    let baseline_dir = args.against.as_deref().map(model_folder).transpose()?;
    let metrics = evaluate(&resolved, &registry, &model_dir, baseline_dir.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string(&metrics).unwrap_or_default());
    } else {
        println!("model: {}", model_dir.display());
        if let Some(b) = &args.against {
            println!("baseline: {}", b.display());
        }
        for (k, v) in &metrics {
            println!("{:40} {v:.4}", k.trim_start_matches("eval/"));
        }
    }
    Ok(())
}

/// The evaluation metrics of the model in `model_dir` (against `baseline`).
fn evaluate(
    resolved: &Resolved,
    registry: &Registry,
    model_dir: &Path,
    baseline: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let e = &resolved.experiment;
    let device = select_device(&e.experiment.device)?;
    let policy = Policy::load(model_dir, device)?;
    let baseline = baseline.map(|b| Policy::load(b, device)).transpose()?;
    let tokenizer = Tokenizer::load(&model_dir.join(TOKENIZER_JSON))?;
    let corpus = prepare_corpus(e, &train_files(e)?, &tokenizer)?;
    let plugins = Plugins::build(e, registry, &plugin_context(resolved))?;
    let mut sets = vec![validation_prompts(
        &corpus,
        &tokenizer,
        e.eval.prefixes,
        (e.data.prefix_min_tokens, e.data.prefix_max_tokens),
        e.data.suffix_tokens,
    )?];
    let budget = prompt_budget(&policy, e.eval.max_new_tokens)?;
    sets.extend(unsafe_prompts(
        &e.eval.unsafe_prefixes,
        &tokenizer,
        e.eval.prefixes,
        budget,
    )?);
    let win_judge = (!e.eval.judge.is_empty()).then_some(e.eval.judge.as_str());
    if baseline.is_some() && win_judge.is_none() {
        tracing::warn!("--against given but [eval] judge is not set: no win rate");
    }
    let evaluator = Evaluator::new(
        &plugins,
        win_judge,
        sets,
        e.eval.max_new_tokens,
        &corpus,
        e.data.seq_len,
        e.train.eval_batches * e.train.batch_size,
    );
    evaluator.run(
        &policy,
        baseline.as_ref(),
        &tokenizer,
        &crate::dist::Dist::single(),
    )
}

/// A run directory's newest checkpoint, or the folder itself when it is a model folder.
fn model_folder(path: &Path) -> Result<PathBuf, Exit> {
    if path.join(CONFIG_JSON).exists() {
        return Ok(path.to_path_buf());
    }
    match checkpoint::latest(&path.join(CHECKPOINTS_DIR))? {
        Some(dir) => Ok(dir),
        None => Err(Exit::invalid(format!(
            "{} is neither a model folder (config.json) nor a run with checkpoints",
            path.display()
        ))),
    }
}

/// The experiment file of a run, found from a run directory or one of its checkpoints.
fn run_config(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .take(3)
        .map(|d| d.join(CONFIG_FILE))
        .find(|c| c.exists())
}
