//! `sipt validate` and `sipt config show`: an experiment file checked, or shown resolved.

use super::{Exit, FileArgs};
use clap::Subcommand;
use sipt_experiment::config;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub(super) enum ConfigCommand {
    /// Print the fully resolved configuration as TOML.
    Show {
        #[command(flatten)]
        file: FileArgs,
        /// Instead, list every key with the layer (file:line, environment, --set, default) that set it.
        #[arg(long)]
        origins: bool,
    },
}

pub(super) fn validate(args: &FileArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let (resolved, _) = args.load(libraries)?;
    println!(
        "{}: valid ({} file{} in the extends chain)",
        args.file.display(),
        resolved.files.len(),
        if resolved.files.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

pub(super) fn config(command: ConfigCommand, libraries: &[PathBuf]) -> Result<(), Exit> {
    let ConfigCommand::Show { file, origins } = command;
    let (resolved, _) = file.load(libraries)?;
    if origins {
        for (key, value, origin) in config::origins(&resolved) {
            println!("{key} = {value}  # {origin}");
        }
    } else {
        print!("{}", resolved.to_toml());
    }
    Ok(())
}
