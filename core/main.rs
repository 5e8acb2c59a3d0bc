//! The `sipt` binary: the engine's command line with the built-in plugins linked in.

use std::process::ExitCode;

fn main() -> ExitCode {
    sipt_plugins::link();
    sipt_core::cli::main()
}
