//! `sipt judge`: one judge of an experiment file run on given text, verdicts as JSON lines.

use super::{Exit, FileArgs};
use sipt_api::{Instance, PairwiseItem, PointwiseItem};
use sipt_experiment::paths::plugin_context;
use sipt_experiment::suggest;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub(super) struct JudgeArgs {
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

pub(super) fn judge(args: JudgeArgs, libraries: &[PathBuf]) -> Result<(), Exit> {
    let (resolved, registry) = args.file.load(libraries)?;
    let judges = &resolved.experiment.judges;
    let table = judges.get(&args.judge).ok_or_else(|| {
        Exit::invalid(format!(
            "{} has no judge named '{}' in [judges]{}",
            args.file.file.display(),
            args.judge,
            suggest::hint(&args.judge, judges.keys().map(String::as_str))
        ))
    })?;
    let entry = registry
        .find_judge(&table.name)
        .ok_or_else(|| Exit::invalid(format!("unknown judge type '{}'", table.name)))?;
    let instance = registry
        .build(entry, table.options_value(), &plugin_context(&resolved))
        .map_err(Exit::invalid)?;
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
                return Err(Exit::usage("a pairwise judge needs two --candidate values"));
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
            return Err(Exit::invalid(format!(
                "'{}' is a {} plugin, not a judge",
                table.name,
                other.kind()
            )))
        }
    }
    Ok(())
}
