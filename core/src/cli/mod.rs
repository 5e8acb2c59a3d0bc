//! The `sipt` command line: one file per command, this one holding the command tree, the
//! dispatch and the one place where failures are printed.

mod bench;
mod data;
mod eval;
mod files;
mod generate;
mod judge;
mod plugins;
mod report;
mod run;
mod sweep;

use clap::{Parser, Subcommand};
use sipt_experiment::config::{LoadError, Problems, SetOverride};
use std::path::PathBuf;
use std::process::ExitCode;

/// sipt: Self-Improving Pretraining experiments.
///
/// A policy is pretrained on streamed documents while judges score candidate continuations
/// (the original suffix, a rewrite, the policy's own rollouts) and the policy learns from those
/// judgments. Experiments are TOML files; plugins (judges, rewriters, rewards, curricula,
/// objectives) are chosen by name in them.
#[derive(Parser, Debug)]
#[command(name = "sipt", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Load an external plugin library (repeatable), in addition to the file's `plugins`.
    #[arg(long = "plugin", global = true, value_name = "PATH")]
    plugins: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate an experiment file, create its run directory and run it.
    Run(run::RunArgs),
    /// Run the trials of an experiment's [sweep] (grid, zip, random), one directory each.
    Sweep(sweep::SweepArgs),
    /// Rebuild the results of a sweep or a run: results.md, results.csv and PNG plots in plots/.
    Report {
        /// A sweep directory or a run directory.
        dir: PathBuf,
    },
    /// Where a sweep's trials (or a run) stand: status, steps, loss, reward, ETA.
    Status {
        /// A sweep directory or a run directory.
        dir: PathBuf,
    },
    /// Check an experiment file; print every problem; exit 1 if there is any.
    ///
    /// Experiment files are code: the plugin libraries they name are loaded (and so run) to
    /// check their tables; --no-plugins checks the rest without them.
    Validate(files::ValidateArgs),
    /// Inspect experiment configuration.
    #[command(subcommand)]
    Config(files::ConfigCommand),
    /// Inspect the plugin registry.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Import a model from another format into a Hugging Face-layout folder.
    #[command(subcommand)]
    Import(generate::ImportCommand),
    /// Continue a prompt with a model folder (or a checkpoint of a run).
    Generate(generate::GenerateArgs),
    /// Evaluate a model: greedy continuations of held-out and unsafe prefixes, judged by the
    /// experiment's judges; win rate against a baseline; perplexity.
    Eval(eval::EvalArgs),
    /// The corpus ahead of runs: `sipt data prepare FILE` tokenizes an experiment's data into
    /// cached token shards.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Engine micro-benchmarks, printed as JSON (see bench/ for the side-by-side comparisons).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run one judge of an experiment file on given text and print its verdicts as JSON lines.
    ///
    /// A pointwise judge scores each --candidate; a pairwise judge compares the first two.
    Judge(judge::JudgeArgs),
}

/// An experiment file and its `--set` overrides, as most commands take them.
#[derive(clap::Args, Debug, Clone)]
struct FileArgs {
    /// The experiment file (TOML).
    file: PathBuf,
    /// Override a key, e.g. --set train.lr=3e-4 --set sip.tournament=pivot (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<SetOverride>,
}

impl FileArgs {
    /// Resolve and validate the file (everything, plugins and sweep trials included).
    fn load(
        &self,
        libraries: &[PathBuf],
    ) -> Result<
        (
            sipt_experiment::config::Resolved,
            sipt_experiment::registry::Registry,
        ),
        Exit,
    > {
        Ok(sipt_experiment::config::load(
            &self.file, &self.sets, libraries,
        )?)
    }
}

/// How a command failed: its exit status and what to tell the person at the terminal.
pub struct Exit {
    code: u8,
    message: Message,
}

enum Message {
    /// One failure, printed as `error: <text>`.
    Text(String),
    /// Problems with an experiment file, each already on its own `error:` line.
    Problems(Problems),
}

impl Exit {
    /// Bad input (exit 1).
    fn invalid(text: impl Into<String>) -> Exit {
        Exit {
            code: 1,
            message: Message::Text(text.into()),
        }
    }

    /// A command line that cannot work (exit 2, like clap's own usage errors).
    fn usage(text: impl Into<String>) -> Exit {
        Exit {
            code: 2,
            message: Message::Text(text.into()),
        }
    }

    /// The one place failures are printed (a rank of a job says which it is). The message
    /// goes out in one write: `eprintln!` writes its pieces one by one to the unbuffered
    /// stderr, and the ranks of a job share one, so a line could be cut by another rank's.
    fn report(&self) {
        use std::io::Write;
        let rank = rank_label().map(|r| format!("{r}: ")).unwrap_or_default();
        let text = match &self.message {
            Message::Text(text) => format!("{rank}error: {text}\n"),
            Message::Problems(problems) => format!("{problems}\n"),
        };
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

impl From<Problems> for Exit {
    fn from(p: Problems) -> Self {
        Exit {
            code: 1,
            message: Message::Problems(p),
        }
    }
}

impl From<LoadError> for Exit {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Invalid(p) => p.into(),
            LoadError::Registry(e) => Exit::invalid(e.0),
        }
    }
}

impl From<anyhow::Error> for Exit {
    fn from(e: anyhow::Error) -> Self {
        let peer = e.downcast_ref::<crate::dist::PeerFailure>().is_some();
        match e.downcast::<Problems>() {
            Ok(p) => p.into(),
            // Another rank's failure: a status of its own, so that launchers name the cause.
            Err(e) if peer => Exit {
                code: crate::dist::PEER_FAILURE_EXIT,
                message: Message::Text(format!("{e:#}")),
            },
            Err(e) => Exit::invalid(format!("{e:#}")),
        }
    }
}

/// `rank R` when this process is one rank of a job of several.
fn rank_label() -> Option<String> {
    let world = crate::dist::World::from_env().ok()?;
    (!world.is_single()).then(|| format!("rank {}", world.rank))
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // Rank 0 of a job speaks for it (the ranks compute the same metrics, monitors and warnings);
    // the others report only errors, unless RUST_LOG or -v asks for more.
    let quiet = rank_label().is_some_and(|r| r != "rank 0");
    let default = match (verbose, quiet) {
        (0, true) => "error",
        (0, false) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .try_init();
}

/// Parse the command line and run; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap: 0 for --help/--version, 2 for usage errors.
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    init_logging(cli.verbose);
    keep_freed_memory();
    // A panic (e.g. libtorch refusing an operation) is reported as one error line, not as a
    // backtrace; RUST_BACKTRACE=1 still shows where it came from.
    let show_backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    if !show_backtrace {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli)))
        .unwrap_or_else(|payload| {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            // libtorch errors carry C++ frames after the first line; the first line says it.
            let first = text.lines().next().unwrap_or_default();
            Err(Exit {
                code: 70,
                message: Message::Text(format!("internal error: {first}")),
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => {
            exit.report();
            ExitCode::from(exit.code)
        }
    }
}

/// Keep freed memory in the process instead of handing it back to the system at once.
///
/// A decode step allocates and frees buffers of a few megabytes (logits, activations) hundreds
/// of times a second. With glibc's defaults, blocks that size are mapped fresh and returned on
/// free, so every step pays page faults and zeroing again (about 5% of a CPU decode). Serving
/// blocks up to 32 MiB from the heap and trimming it only past 1 GiB of free space at its top
/// removes that; the cost is a resident size that stays at its peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any worker thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn dispatch(cli: Cli) -> Result<(), Exit> {
    let libraries = &cli.plugins;
    match cli.command {
        Command::Run(args) => run::run(args, libraries),
        Command::Sweep(args) => sweep::sweep(args, libraries),
        Command::Report { dir } => report::report(&dir),
        Command::Status { dir } => report::status(&dir),
        Command::Validate(args) => files::validate(&args, libraries),
        Command::Config(command) => files::config(command, libraries),
        Command::Plugins(command) => plugins::plugins(command, libraries),
        Command::Import(command) => generate::import(command),
        Command::Generate(args) => generate::generate(args),
        Command::Eval(args) => eval::eval(args, libraries),
        Command::Bench(command) => bench::bench(command),
        Command::Data(command) => data::data(command, libraries),
        Command::Judge(args) => judge::judge(args, libraries),
    }
}
