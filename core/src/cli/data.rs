//! `sipt data`: the corpus ahead of runs — `prepare` tokenizes an experiment's training and
//! validation files into the token shards every run and sweep trial then maps.

use super::{Exit, FileArgs};
use crate::data::{prepare_data, train_files};
use crate::tokenizer::Tokenizer;
use clap::Subcommand;
use sipt_experiment::config::SetOverride;
use sipt_experiment::paths::expand_path;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum DataCommand {
    /// Tokenize an experiment's [data] train and validation files with its tokenizer into
    /// token shards (cached; `sipt run` builds missing ones itself), with a progress bar, and
    /// report documents, tokens and throughput.
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub(super) struct PrepareArgs {
    /// The experiment file (TOML).
    file: PathBuf,
    /// Override a key, e.g. --set data.text_field=content (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<SetOverride>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(super) fn data(command: DataCommand, libraries: &[PathBuf]) -> Result<(), Exit> {
    let DataCommand::Prepare(args) = command;
    let file = FileArgs {
        file: args.file.clone(),
        sets: args.sets.clone(),
    };
    let (resolved, _registry) = file.load(libraries)?;
    let e = &resolved.experiment;
    let d = &e.data;
    let mut files = train_files(e)?;
    let tokenizer = Tokenizer::load(&crate::data::tokenizer_source(e, &files)?)?;
    if !d.validation.is_empty() {
        let patterns: Vec<String> = d.validation.iter().map(|p| expand_path(p)).collect();
        files.extend(
            crate::data::list_files(&patterns)
                .map_err(|err| Exit::invalid(format!("data.validation: {err:#}")))?,
        );
    }
    let (_shards, report) = prepare_data(&files, &d.format, &d.text_field, &tokenizer)?;
    let built_mb = report.source_bytes_built as f64 / 1e6;
    let built_text_mb = report.text_bytes_built as f64 / 1e6;
    let rate = if report.built > 0 && report.seconds > 0.0 {
        built_text_mb / report.seconds
    } else {
        0.0
    };
    let peak = crate::bench::peak_resident_mb();
    if args.json {
        let figures = serde_json::json!({
            "files": report.files,
            "built": report.built,
            "documents": report.documents,
            "tokens": report.tokens,
            "skipped": report.skipped,
            "text_mb": report.text_bytes as f64 / 1e6,
            "source_mb_built": built_mb,
            "text_mb_built": built_text_mb,
            "seconds": report.seconds,
            "mb_per_second": rate,
            "peak_rss_mb": peak,
            "shards": crate::data::shard_dir(),
        });
        println!("{figures}");
    } else {
        println!(
            "{} file(s): {} tokenized now, {} cached",
            report.files,
            report.built,
            report.files - report.built
        );
        println!(
            "{} documents, {} tokens ({:.1} MB of text){}",
            report.documents,
            report.tokens,
            report.text_bytes as f64 / 1e6,
            if report.skipped > 0 {
                format!(", {} skipped", report.skipped)
            } else {
                String::new()
            }
        );
        if report.built > 0 {
            println!(
                "tokenized {built_text_mb:.1} MB of text ({built_mb:.1} MB of files) in {:.1}s: {rate:.1} MB of text/s",
                report.seconds
            );
        }
        if let Some(peak) = peak {
            println!("peak resident memory: {peak:.0} MB");
        }
        println!("shards: {}", crate::data::shard_dir().display());
    }
    Ok(())
}
