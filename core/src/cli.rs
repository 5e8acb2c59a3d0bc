//! The `sipt` command line.

use crate::config::{self, Problems, SetOverride};
use crate::registry::Registry;
use crate::rundir;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
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
    Run(RunArgs),
    /// Run the trials of an experiment's [sweep] (grid, zip, random), one directory each.
    Sweep(SweepArgs),
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
    Validate(FileArgs),
    /// Inspect experiment configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the plugin registry.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Import a model from another format into a Hugging Face-layout folder.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Continue a prompt with a model folder (or a checkpoint of a run).
    Generate(GenerateArgs),
    /// Evaluate a model: greedy continuations of held-out and unsafe prefixes, judged by the
    /// experiment's judges; win rate against a baseline; perplexity.
    Eval(EvalArgs),
    /// Engine micro-benchmarks, printed as JSON (see bench/ for the side-by-side comparisons).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run one judge of an experiment file on given text and print its verdicts as JSON lines.
    ///
    /// A pointwise judge scores each --candidate; a pairwise judge compares the first two.
    Judge(JudgeArgs),
}

#[derive(Args, Debug)]
struct EvalArgs {
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

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Next-token training steps of a from-scratch model on random tokens.
    Train(crate::bench::TrainBench),
    /// Rollouts: K samples of N tokens from each of P prefixes.
    Rollouts(crate::bench::RolloutBench),
    /// One online-DPO SIP step: sample, trivial reward, policy and reference log-probs, update.
    SipStep(crate::bench::SipStepBench),
    /// Tournament designs: judge calls per pool and rank agreement with all-pairs.
    Tournaments(crate::bench::TournamentBench),
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// Convert a Llama-family GGUF file (e.g. SmolLM2 from llama.cpp) into OUT_DIR:
    /// config.json, model.safetensors (f32), tokenizer.json.
    Gguf { file: PathBuf, out_dir: PathBuf },
}

#[derive(Args, Debug)]
struct GenerateArgs {
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

#[derive(Args, Debug)]
struct JudgeArgs {
    #[command(flatten)]
    file: FileArgs,
    /// The judge's name in the file's [judges] table.
    #[arg(long)]
    judge: String,
    #[arg(long)]
    prefix: String,
    /// A continuation to judge (repeatable).
    #[arg(long = "candidate", required = true)]
    candidates: Vec<String>,
    /// The original suffix, for judges that compare against a reference.
    #[arg(long)]
    reference: Option<String>,
}

#[derive(Args, Debug)]
struct FileArgs {
    /// The experiment file (TOML).
    file: PathBuf,
    /// Override a key, e.g. --set train.lr=3e-4 --set sip.tournament=pivot (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<SetOverride>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Write the run here instead of <experiment.output_dir>/<experiment.name>/<timestamp>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, requires = "out")]
    resume: bool,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Write the sweep here instead of <output_dir>/<name>/sweep-<timestamp>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Trials run at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// CUDA devices to hand out, one per running trial (e.g. 0,1).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    /// Where trials run: `local` child processes or a `slurm` job array (resources from
    /// [sweep.slurm]). Default: the file's `sweep.executor`, else local.
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Continue the sweep in --out: skip finished trials, rerun failed or interrupted ones
    /// (from their last checkpoint). Under Slurm, attach to the sweep's job if it still runs.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Stop launching trials after the first failure (Slurm: cancel the job array).
    #[arg(long)]
    fail_fast: bool,
    /// Slurm: submit the job array and return; `sipt status DIR` follows it.
    #[arg(long)]
    detach: bool,
    /// Seconds between status lines of the running trials when not on a terminal.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    status_every: f64,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the fully resolved configuration as TOML.
    Show {
        #[command(flatten)]
        file: FileArgs,
        /// Instead, list every key with the layer (file:line, environment, --set, default) that set it.
        #[arg(long)]
        origins: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PluginsCommand {
    /// List every registered plugin: kind, name, origin and summary.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A failed command: the message to print and the exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// A command line that cannot work (exit 2, like clap's own usage errors).
    pub fn usage(message: String) -> Self {
        Failure { code: 2, message }
    }
}

impl From<Problems> for Failure {
    fn from(p: Problems) -> Self {
        Failure::invalid(p.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::invalid(format!("error: {e:#}"))
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
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
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(f)) => {
            eprintln!("{}", f.message);
            ExitCode::from(f.code)
        }
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            // libtorch errors carry C++ frames after the first line; the first line says it.
            let first = text.lines().next().unwrap_or_default();
            eprintln!("error: internal error: {first}");
            ExitCode::from(70)
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

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Validate(args) => {
            let (resolved, _) = load(&args, &cli.plugins)?;
            println!(
                "{}: valid ({} file{} in the extends chain)",
                args.file.display(),
                resolved.files.len(),
                if resolved.files.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Show { file, origins }) => {
            let (resolved, _) = load(&file, &cli.plugins)?;
            if origins {
                for (key, value, origin) in config::origins(&resolved) {
                    println!("{key} = {value}  # {origin}");
                }
            } else {
                print!("{}", resolved.to_toml());
            }
            Ok(())
        }
        Command::Plugins(PluginsCommand::List { json }) => {
            let registry = registry_with(&cli.plugins)?;
            list_plugins(&registry, json);
            Ok(())
        }
        Command::Judge(args) => judge(args, &cli.plugins),
        Command::Eval(args) => eval(args, &cli.plugins),
        Command::Import(ImportCommand::Gguf { file, out_dir }) => {
            let summary = sipt_gguf::convert_llama(&file, &out_dir)
                .map_err(|e| Failure::invalid(format!("error: {e}")))?;
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
        Command::Generate(args) => generate(args).map_err(Failure::from),
        Command::Bench(b) => {
            let result = match b {
                BenchCommand::Train(t) => crate::bench::train(&t)?,
                BenchCommand::Rollouts(r) => crate::bench::rollouts(&r)?,
                BenchCommand::SipStep(s) => crate::bench::sip_step(&s)?,
                BenchCommand::Tournaments(t) => {
                    for line in crate::bench::tournaments(&t)? {
                        println!("{line}");
                    }
                    return Ok(());
                }
            };
            println!("{result}");
            Ok(())
        }
        Command::Sweep(args) => {
            let (resolved, _) = load(&args.file, &cli.plugins)?;
            let fail_fast = args.fail_fast
                || resolved
                    .experiment
                    .sweep
                    .as_ref()
                    .is_some_and(|s| s.fail_fast);
            let kind = match args.executor.as_deref().unwrap_or_else(|| {
                resolved
                    .experiment
                    .sweep
                    .as_ref()
                    .map(|s| s.executor.as_str())
                    .unwrap_or("local")
            }) {
                "slurm" => crate::sweep::Kind::Slurm,
                _ => crate::sweep::Kind::Local,
            };
            if args.detach && kind != crate::sweep::Kind::Slurm {
                return Err(Failure::usage(
                    "error: --detach needs the Slurm executor (--executor slurm)".into(),
                ));
            }
            let executor = crate::sweep::Executor {
                kind,
                jobs: args.jobs,
                devices: args.devices.clone(),
                fail_fast,
                resume: args.resume,
                detach: args.detach,
                status_every: args.status_every,
            };
            run_sweep(
                &resolved,
                &args.file.sets,
                args.out,
                &executor,
                &cli.plugins,
            )
        }
        Command::Status { dir } => {
            print!("{}", crate::sweep::monitor::describe(&dir)?);
            Ok(())
        }
        Command::Report { dir } => {
            let md = crate::sweep::report(&dir)?;
            print!("{md}");
            println!(
                "\nwritten: {} and {}",
                dir.join("results.md").display(),
                dir.join("results.csv").display()
            );
            Ok(())
        }
        Command::Run(args) => {
            let (resolved, registry) = load(&args.file, &cli.plugins)?;
            if resolved.experiment.sweep.is_some() {
                let executor = crate::sweep::Executor {
                    kind: match resolved
                        .experiment
                        .sweep
                        .as_ref()
                        .map(|s| s.executor.as_str())
                    {
                        Some("slurm") => crate::sweep::Kind::Slurm,
                        _ => crate::sweep::Kind::Local,
                    },
                    detach: false,
                    status_every: 30.0,
                    jobs: 1,
                    devices: Vec::new(),
                    fail_fast: resolved
                        .experiment
                        .sweep
                        .as_ref()
                        .is_some_and(|s| s.fail_fast),
                    resume: args.resume,
                };
                return run_sweep(
                    &resolved,
                    &args.file.sets,
                    args.out,
                    &executor,
                    &cli.plugins,
                );
            }
            let dir = match &args.out {
                Some(dir) => dir.clone(),
                None => rundir::new_run_path(&resolved.experiment)?,
            };
            let run = rundir::RunDir::create(&dir, &resolved, args.resume)?;
            tracing::info!("run directory: {}", run.path().display());
            crate::engine::run(&resolved, &registry, &run, args.resume)?;
            Ok(())
        }
    }
}

fn registry_with(cli_plugins: &[PathBuf]) -> Result<Registry, Failure> {
    let mut registry = Registry::builtin().map_err(|e| Failure::invalid(format!("error: {e}")))?;
    for path in cli_plugins {
        registry
            .load_library(path)
            .map_err(|e| Failure::invalid(format!("error: --plugin {}: {e}", path.display())))?;
    }
    Ok(registry)
}

/// Resolve, load the file's plugin libraries, and validate everything; all problems at once.
fn load(args: &FileArgs, cli_plugins: &[PathBuf]) -> Result<(config::Resolved, Registry), Failure> {
    let (resolved, mut problems) = config::resolve_lenient(&args.file, &args.sets)?;
    let mut registry = registry_with(cli_plugins)?;
    for (i, lib) in resolved.experiment.plugins.iter().enumerate() {
        if let Err(e) = registry.load_library(Path::new(lib)) {
            problems.push(resolved.problem(&["plugins".into(), i.to_string()], e.0));
        }
    }
    problems.extend(config::validate_plugins(&resolved, &registry));
    if let (true, Some(sweep)) = (problems.is_empty(), &resolved.experiment.sweep) {
        // Every trial must be a valid experiment too.
        match crate::sweep::trials(sweep) {
            Err(e) => problems.push(resolved.problem(&["sweep".into()], format!("{e:#}"))),
            Ok(trials) => {
                for t in trials {
                    let found = match crate::sweep::trial_config(&resolved.file, &args.sets, &t) {
                        Err(p) => p.0,
                        Ok(trial) => config::validate_plugins(&trial, &registry),
                    };
                    for mut problem in found {
                        problem.message = format!("in trial {}: {}", t.name, problem.message);
                        problems.push(problem);
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((resolved, registry))
    } else {
        Err(Problems::sorted(problems).into())
    }
}

fn list_plugins(registry: &Registry, json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = registry
            .entries()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "kind": e.kind,
                    "name": e.name,
                    "origin": match &e.origin {
                        crate::registry::Origin::BuiltIn => "built-in".to_string(),
                        crate::registry::Origin::Library(_) => "library".to_string(),
                    },
                    "path": match &e.origin {
                        crate::registry::Origin::BuiltIn => serde_json::Value::Null,
                        crate::registry::Origin::Library(p) => p.display().to_string().into(),
                    },
                    "summary": e.summary,
                    "options": e.fields,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return;
    }
    let kind_w = registry
        .entries()
        .iter()
        .map(|e| e.kind.as_str().len())
        .max()
        .unwrap_or(4);
    let name_w = registry
        .entries()
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(4);
    let origin_w = registry
        .entries()
        .iter()
        .map(|e| e.origin.to_string().len())
        .max()
        .unwrap_or(6);
    println!(
        "{:kind_w$}  {:name_w$}  {:origin_w$}  SUMMARY",
        "KIND", "NAME", "ORIGIN"
    );
    for e in registry.entries() {
        println!(
            "{:kind_w$}  {:name_w$}  {:origin_w$}  {}",
            e.kind.as_str(),
            e.name,
            e.origin.to_string(),
            e.summary
        );
    }
}

fn judge(args: JudgeArgs, cli_plugins: &[PathBuf]) -> Result<(), Failure> {
    use sipt_api::{Instance, PairwiseItem, PluginKind, PointwiseItem};
    let (resolved, registry) = load(&args.file, cli_plugins)?;
    let names: Vec<&str> = resolved
        .experiment
        .judges
        .keys()
        .map(String::as_str)
        .collect();
    let table = resolved.experiment.judges.get(&args.judge).ok_or_else(|| {
        Failure::invalid(format!(
            "error: {} has no judge named '{}' in [judges]{}",
            args.file.file.display(),
            args.judge,
            crate::suggest::hint(&args.judge, names.iter().copied())
        ))
    })?;
    let entry = [PluginKind::PointwiseJudge, PluginKind::PairwiseJudge]
        .iter()
        .find_map(|k| registry.find(*k, &table.name))
        .ok_or_else(|| Failure::invalid(format!("error: unknown judge type '{}'", table.name)))?;
    let context = crate::paths::plugin_context(&resolved);
    let instance = registry
        .build(entry, table.options_value(), &context)
        .map_err(|e| Failure::invalid(format!("error: {e}")))?;
    let show = |v: serde_json::Value| println!("{v}");
    match instance {
        Instance::PointwiseJudge(j) => {
            let items: Vec<PointwiseItem> = args
                .candidates
                .iter()
                .map(|c| PointwiseItem {
                    prefix: args.prefix.clone(),
                    candidate: c.clone(),
                    reference: args.reference.clone(),
                })
                .collect();
            for (c, verdict) in args.candidates.iter().zip(j.judge(&items)) {
                show(match verdict {
                    Ok(scores) => serde_json::json!({"candidate": c, "scores": scores}),
                    Err(f) => serde_json::json!({"candidate": c, "failed": f.reason}),
                });
            }
        }
        Instance::PairwiseJudge(j) => {
            let [first, second, ..] = args.candidates.as_slice() else {
                return Err(Failure {
                    code: 2,
                    message: "error: a pairwise judge needs two --candidate values".into(),
                });
            };
            let item = PairwiseItem {
                prefix: args.prefix.clone(),
                first: first.clone(),
                second: second.clone(),
                reference: args.reference.clone(),
            };
            for outcome in j.compare(&[item]) {
                show(match outcome {
                    Ok(p) => {
                        serde_json::json!({"criterion": j.criterion(), "first_wins": p.first_wins})
                    }
                    Err(f) => serde_json::json!({"criterion": j.criterion(), "failed": f.reason}),
                });
            }
        }
        other => {
            return Err(Failure::invalid(format!(
                "error: '{}' is a {} plugin, not a judge",
                table.name,
                other.kind()
            )))
        }
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use crate::model::{select_device, Policy, TOKENIZER_JSON};
    use crate::sample::{generate, Sampling};
    let device = select_device(&args.device)?;
    let policy = Policy::load(&args.model, device)?;
    let tokenizer = crate::tokenizer::Tokenizer::load(&args.model.join(TOKENIZER_JSON))?;
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt has no tokens");
    }
    let mut eos: Vec<u32> = policy
        .model
        .config
        .eos_ids()
        .into_iter()
        .map(|e| e as u32)
        .collect();
    eos.extend(tokenizer.eos);
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        stop_at_eos: args.stop_at_eos,
    };
    let out = generate(&policy.model, &[prompt], 1, &sampling, &eos, args.seed);
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

/// A run directory's newest checkpoint, or the folder itself when it is a model folder.
fn model_folder(path: &Path) -> Result<PathBuf, Failure> {
    if path.join(crate::model::CONFIG_JSON).exists() {
        return Ok(path.to_path_buf());
    }
    let checkpoints = path.join(crate::rundir::CHECKPOINTS_DIR);
    match crate::train::checkpoint::latest(&checkpoints) {
        Ok(Some(dir)) => Ok(dir),
        Ok(None) => Err(Failure::invalid(format!(
            "error: {} is neither a model folder (config.json) nor a run with checkpoints",
            path.display()
        ))),
        Err(e) => Err(Failure::invalid(format!("error: {e:#}"))),
    }
}

/// The experiment file of a run, found from a run directory or one of its checkpoints.
fn run_config(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .take(3)
        .map(|d| d.join(crate::rundir::CONFIG_FILE))
        .find(|c| c.exists())
}

fn eval(args: EvalArgs, cli_plugins: &[PathBuf]) -> Result<(), Failure> {
    use crate::model::{select_device, Policy, TOKENIZER_JSON};
    let config = match args.config.clone().or_else(|| run_config(&args.model)) {
        Some(c) => c,
        None => {
            return Err(Failure::invalid(format!(
                "error: no experiment file for {}: pass --config FILE",
                args.model.display()
            )))
        }
    };
    let (resolved, registry) = load(
        &FileArgs {
            file: config,
            sets: args.sets.clone(),
        },
        cli_plugins,
    )?;
    let e = &resolved.experiment;
    let model_dir = model_folder(&args.model)?;
    let run = || -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let device = select_device(&e.experiment.device)?;
        let policy = Policy::load(&model_dir, device)?;
        let baseline = match &args.against {
            Some(b) => Some(Policy::load(
                &model_folder(b).map_err(|f| anyhow::anyhow!(f.message))?,
                device,
            )?),
            None => None,
        };
        let tokenizer = crate::tokenizer::Tokenizer::load(&model_dir.join(TOKENIZER_JSON))?;
        let files = crate::engine::train_files(e)?;
        let corpus = crate::engine::prepare_corpus(e, &files, &tokenizer)?;
        let plugins =
            crate::sip::Plugins::build(e, &registry, &crate::paths::plugin_context(&resolved))?;
        let mut sets = vec![crate::eval::validation_prompts(
            &corpus,
            &tokenizer,
            e.eval.prefixes,
            (e.data.prefix_min_tokens, e.data.prefix_max_tokens),
            e.data.suffix_tokens,
        )?];
        sets.extend(crate::eval::unsafe_prompts(
            &e.eval.unsafe_prefixes,
            &tokenizer,
            e.eval.prefixes,
        )?);
        let win_judge = (!e.eval.judge.is_empty()).then_some(e.eval.judge.as_str());
        if args.against.is_some() && win_judge.is_none() {
            tracing::warn!("--against given but [eval] judge is not set: no win rate");
        }
        let evaluator = crate::eval::Evaluator::new(
            &plugins,
            win_judge,
            sets,
            e.eval.max_new_tokens,
            &corpus,
            e.data.seq_len,
            e.train.eval_batches * e.train.batch_size,
        );
        Ok(evaluator.run(&policy, baseline.as_ref(), &tokenizer))
    };
    let metrics = run()?;
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

fn run_sweep(
    resolved: &config::Resolved,
    sets: &[SetOverride],
    out: Option<PathBuf>,
    executor: &crate::sweep::Executor,
    plugins: &[PathBuf],
) -> Result<(), Failure> {
    let dir = match out {
        Some(d) => d,
        None => {
            let e = &resolved.experiment.experiment;
            let stamp = chrono::Utc::now().format("sweep-%Y%m%d-%H%M%S").to_string();
            Path::new(&e.output_dir).join(&e.name).join(stamp)
        }
    };
    let failed = crate::sweep::run(resolved, sets, &dir, executor, plugins).map_err(|e| {
        match e.downcast::<Problems>() {
            Ok(p) => Failure::from(p),
            Err(e) => Failure::from(e),
        }
    })?;
    println!("results: {}", dir.join("results.md").display());
    if failed > 0 {
        return Err(Failure::invalid(format!(
            "error: {failed} trial(s) did not finish; see their log.txt; --resume reruns them"
        )));
    }
    Ok(())
}
