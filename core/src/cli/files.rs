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

#[derive(clap::Args, Debug)]
pub(super) struct ValidateArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Load no plugin library (neither the file's `plugins` nor --plugin): check everything
    /// else without running code from outside sipt. Tables naming plugins that are not built
    /// in are then left unchecked.
    #[arg(long)]
    no_plugins: bool,
}

pub(super) fn validate(args: &ValidateArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let file = &args.file;
    let (resolved, _) = if args.no_plugins {
        config::load_without_libraries(&file.file, &file.sets)?
    } else {
        file.load(libraries)?
    };
    let n = resolved.files.len();
    println!(
        "{}: valid ({n} file{} in the extends chain){}",
        file.file.display(),
        if n == 1 { "" } else { "s" },
        if args.no_plugins {
            "; no plugin library was loaded, so tables naming plugins that are not built in were not checked"
        } else {
            ""
        }
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
