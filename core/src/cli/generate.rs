//! `sipt generate` (continue a prompt with a model folder) and `sipt import gguf`.

use super::Exit;
use crate::model::{eos_tokens, select_device, Policy, TOKENIZER_JSON};
use crate::sample::{generate as sample, Sampling};
use crate::tokenizer::Tokenizer;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum ImportCommand {
    /// Convert a Llama-family GGUF file (e.g. SmolLM2 from llama.cpp) into OUT_DIR:
    /// config.json, model.safetensors (f32), tokenizer.json.
    Gguf { file: PathBuf, out_dir: PathBuf },
}

#[derive(clap::Args, Debug)]
pub(super) struct GenerateArgs {
    /// A model folder (config.json, model.safetensors, tokenizer.json), e.g. a checkpoint.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at the end-of-sequence token instead of always generating max_new_tokens.
    #[arg(long)]
    stop_at_eos: bool,
    /// Also print each generated token with its log-probability, as JSON lines.
    #[arg(long)]
    logprobs: bool,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub(super) fn import(command: ImportCommand) -> Result<(), Exit> {
    let ImportCommand::Gguf { file, out_dir } = command;
    let summary =
        sipt_gguf::convert_llama(&file, &out_dir).map_err(|e| Exit::invalid(e.to_string()))?;
    for w in &summary.warnings {
        tracing::warn!("{w}");
    }
    println!(
        "imported {} ({:.1}M parameters) into {} in {:.1}s",
        file.display(),
        summary.n_params as f64 / 1e6,
        out_dir.display(),
        summary.seconds
    );
    Ok(())
}

pub(super) fn generate(args: GenerateArgs) -> Result<(), Exit> {
    let device = select_device(&args.device)?;
    let policy = Policy::load(&args.model, device)?;
    let tokenizer = Tokenizer::load(&args.model.join(TOKENIZER_JSON))?;
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        return Err(Exit::invalid("the prompt has no tokens"));
    }
    let positions = policy.model.config.max_position_embeddings;
    if prompt.len() + args.max_new_tokens > positions {
        return Err(Exit::invalid(format!(
            "the prompt ({} tokens) and --max-new-tokens {} need {} positions, but the model in {} has {positions} (max_position_embeddings in its config.json)",
            prompt.len(),
            args.max_new_tokens,
            prompt.len() + args.max_new_tokens,
            args.model.display()
        )));
    }
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        stop_at_eos: args.stop_at_eos,
    };
    let eos = eos_tokens(&policy.model.config, &tokenizer);
    let out = sample(&policy.model, &[prompt], 1, &sampling, &eos, args.seed);
    if args.logprobs {
        for (t, l) in out.tokens[0].iter().zip(&out.logprobs[0]) {
            println!(
                "{}",
                serde_json::json!({"id": t, "token": tokenizer.decode(&[*t]), "logprob": l})
            );
        }
    } else {
        println!("{}", tokenizer.decode(&out.tokens[0]));
    }
    Ok(())
}
