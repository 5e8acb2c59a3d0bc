//! Every objective and curriculum run end to end on the tiny model, each with an assertion that
//! fails if its path is broken. The judge is `reference-similarity`, whose answer is known: the
//! original suffix scores exactly 1 and a rollout less, so whatever follows the judge must pick
//! the original.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const STEPS: u64 = 4;
const BATCH: usize = 3;
const SEQ_LEN: usize = 32;

/// A 4-step SIP run of the tiny model with `tables` (objective, curriculum, ...) appended.
fn experiment(dir: &Path, name: &str, tables: &str) -> PathBuf {
    write(
        dir,
        &format!("{name}.toml"),
        &format!(
            r#"[experiment]
name = "{name}"
seed = 7
device = "cpu"
threads = 1

{TINY_MODEL}
[data]
train = ["@assets/corpora/shakespeare"]
seq_len = {SEQ_LEN}
suffix_tokens = 8
prefix_min_tokens = 16
prefix_max_tokens = 32

[sip]
rollouts = 2
sample_every = 0

[judges.similar]
type = "reference-similarity"

[train]
steps = {STEPS}
batch_size = {BATCH}
lr = 3e-3
warmup_steps = 1
checkpoint_every = 2
keep_checkpoints = 4
eval_every = 0
log_every = 100

{tables}
"#
        ),
    )
}

/// Run an experiment to its end; its run directory.
fn train(dir: &Path, name: &str, tables: &str) -> PathBuf {
    let file = experiment(dir, name, tables);
    let out = dir.join(format!("run-{name}"));
    let done = run(sipt().arg("run").arg(&file).arg("--out").arg(&out));
    assert_eq!(done.code, 0, "{name}: {}", done.stderr);
    assert_eq!(
        logged_steps(&out),
        (1..=STEPS).collect::<Vec<_>>(),
        "{name}"
    );
    out
}

/// The value of `key` at every step.
fn series(run_dir: &Path, key: &str) -> Vec<f64> {
    metric_rows(run_dir)
        .iter()
        .map(|row| {
            row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {row}"))
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn checkpoint(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoints/step-{step:08}"))
}

fn initial(run_dir: &Path) -> Vec<u8> {
    weights(&run_dir.join("checkpoints/initial"))
}

#[test]
fn online_dpo_follows_the_judge_and_its_reference_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    // Frozen: the judge's choice (the original) wins every pool; the reference never moves.
    let frozen = train(
        dir.path(),
        "frozen",
        "[train.objective]\ntype = \"online-dpo\"\n",
    );
    assert_eq!(
        series(&frozen, "chosen/original"),
        vec![1.0; STEPS as usize]
    );
    assert_eq!(
        series(&frozen, "dpo/pairs"),
        vec![BATCH as f64; STEPS as usize]
    );
    let end = checkpoint(&frozen, STEPS);
    assert_eq!(
        weights(&end.join("reference")),
        initial(&frozen),
        "frozen reference moved"
    );
    assert_ne!(weights(&end), initial(&frozen), "the policy did not train");

    // Sync every 2 steps: at each sync step the reference is the policy.
    let sync = train(
        dir.path(),
        "sync",
        "[train.objective]\ntype = \"online-dpo\"\nreference = \"sync\"\nsync_every = 2\n",
    );
    for step in [2, 4] {
        let at = checkpoint(&sync, step);
        assert_eq!(weights(&at.join("reference")), weights(&at), "step {step}");
    }
    assert_ne!(weights(&checkpoint(&sync, 2)), initial(&sync));

    // EMA: somewhere between the start and the policy, equal to neither.
    let ema = train(
        dir.path(),
        "ema",
        "[train.objective]\ntype = \"online-dpo\"\nreference = \"ema\"\nema_decay = 0.5\n",
    );
    let end = checkpoint(&ema, STEPS);
    let reference = weights(&end.join("reference"));
    assert_ne!(reference, initial(&ema));
    assert_ne!(reference, weights(&end));

    // Fixed roles: no judge decides, so the rollout is chosen although the judge prefers the
    // original.
    let fixed = train(
        dir.path(),
        "fixed",
        "[train.objective]\ntype = \"online-dpo\"\nchosen_source = \"rollout\"\nrejected_source = \"original\"\n",
    );
    assert_eq!(series(&fixed, "chosen/rollout"), vec![1.0; STEPS as usize]);
    assert_eq!(series(&fixed, "chosen/original"), vec![0.0; STEPS as usize]);
    assert_eq!(
        series(&fixed, "dpo/pairs"),
        vec![BATCH as f64; STEPS as usize]
    );

    // Next-token mixing: the loss is logged and its windows are trained on, every step.
    let mixed = train(
        dir.path(),
        "mixed",
        "[train.objective]\ntype = \"online-dpo\"\nntp_weight = 0.5\n",
    );
    assert!(series(&mixed, "loss/ntp")
        .iter()
        .all(|l| l.is_finite() && *l > 0.0));
    let extra = series(&mixed, "tokens")[0] - series(&frozen, "tokens")[0];
    assert_eq!(
        extra,
        (BATCH * SEQ_LEN) as f64,
        "next-token windows not counted"
    );
}

#[test]
fn rf_nll_on_the_judges_choice_is_sft_on_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let rf = train(dir.path(), "rf", "[train.objective]\ntype = \"rf-nll\"\n");
    assert_eq!(series(&rf, "chosen/original"), vec![1.0; STEPS as usize]);
    let sft = train(
        dir.path(),
        "sft",
        "[train.objective]\ntype = \"sft\"\nsource = \"original\"\n",
    );
    // The judge always picks the original, so both train on the same targets: same losses,
    // same weights.
    assert_eq!(series(&rf, "loss/rf_nll"), series(&sft, "loss/sft"));
    assert_eq!(
        weights(&checkpoint(&rf, STEPS)),
        weights(&checkpoint(&sft, STEPS))
    );
    assert_ne!(weights(&checkpoint(&rf, STEPS)), initial(&rf));
}

#[test]
fn curricula_plan_each_step_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let objective = "[train.objective]\ntype = \"online-dpo\"\n";
    let constant = train(dir.path(), "constant", objective);
    assert_eq!(
        series(&constant, "plan/rollouts"),
        vec![2.0; STEPS as usize]
    );
    assert_eq!(
        series(&constant, "plan/ntp_weight"),
        vec![0.0; STEPS as usize]
    );

    let ramp = train(
        dir.path(),
        "ramp",
        &format!("{objective}\n[curriculum]\ntype = \"ramp\"\nrollouts_from = 1\nrollouts_to = 3\nntp_from = 1.0\nntp_to = 0.0\n"),
    );
    assert_eq!(series(&ramp, "plan/rollouts"), vec![1.0, 2.0, 2.0, 3.0]);
    assert_eq!(series(&ramp, "plan/ntp_weight"), vec![1.0, 0.75, 0.5, 0.25]);
    assert_eq!(series(&ramp, "plan/sip_weight"), vec![0.0, 0.25, 0.5, 0.75]);
    // The plan is what was sampled: K rollouts per pool.
    let pairs = series(&ramp, "judge/similar/calls");
    let originals = BATCH as f64;
    assert_eq!(
        pairs[0],
        originals + BATCH as f64,
        "step 1 judges 1 rollout per prefix"
    );
    assert_eq!(
        pairs[3],
        originals + 3.0 * BATCH as f64,
        "step 4 judges 3 per prefix"
    );

    // Win rate: while rollouts never win (the judge prefers the original) the plan stays on
    // next-token loss; when they always win (fixed roles) it moves to SIP after one step.
    let curriculum = "[curriculum]\ntype = \"win-rate\"\ntarget_rate = 0.5\n";
    let losing = train(dir.path(), "losing", &format!("{objective}\n{curriculum}"));
    assert_eq!(
        series(&losing, "plan/ntp_weight"),
        vec![1.0; STEPS as usize]
    );
    let winning = train(
        dir.path(),
        "winning",
        &format!("[train.objective]\ntype = \"online-dpo\"\nchosen_source = \"rollout\"\nrejected_source = \"original\"\n\n{curriculum}"),
    );
    assert_eq!(
        series(&winning, "plan/ntp_weight"),
        vec![1.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn rows_name_every_step_metric_of_a_sip_run() {
    // A guard on the metric names the guide documents for SIP runs.
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        "names",
        "[train.objective]\ntype = \"online-dpo\"\n",
    );
    let row: Value = metric_rows(&out).remove(0);
    for key in [
        "lr",
        "grad_norm",
        "updated",
        "tokens",
        "plan/rollouts",
        "time/sample",
        "time/judge",
        "time/update",
        "time/step",
        "loss/total",
        "loss/dpo",
        "judge/similar/calls",
        "judge/similar/failures",
        "judge/calls_per_prefix",
        "reward/original/mean",
        "reward/rollout/mean",
        "chosen/original",
        "selected_pools",
    ] {
        assert!(row[key].is_number(), "{key} missing in {row}");
    }
    // The update's parts are timed, and fit in the update's time.
    let part = |key: &str| {
        row[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {row}"))
    };
    let parts = ["policy", "reference", "ntp", "backward", "optimizer"]
        .map(|p| part(&format!("time/update/{p}")));
    assert!(
        parts[0] > 0.0 && parts[1] > 0.0 && parts[3] > 0.0 && parts[4] > 0.0,
        "{row}"
    );
    assert!(parts.iter().sum::<f64>() <= part("time/update"), "{row}");
}

#[test]
fn health_monitors_catch_a_dominant_source_and_can_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // Fixed roles make the rollout the chosen candidate of every pool: dominance.
    let tables = "[train.objective]\ntype = \"online-dpo\"\nchosen_source = \"rollout\"\nrejected_source = \"original\"\n\n[health]\nwindow = 2\n";
    let file = experiment(dir.path(), "dominated", tables);
    let out_dir = dir.path().join("run-dominated");
    let done = run(sipt().arg("run").arg(&file).arg("--out").arg(&out_dir));
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(
        done.stderr.contains("health: source dominance: the rollout chosen in a share of selected pools is 1.000 over the last 2 steps, above 0.9 (health/chosen_share/rollout), since step 2"),
        "{}",
        done.stderr
    );
    assert_eq!(
        series(&out_dir, "health/chosen_share/rollout/alarm"),
        vec![0.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(series(&out_dir, "health/alarms")[1], 1.0);
    // The other monitors are measured every step.
    for key in [
        "health/distinct_ratio",
        "health/length_ratio",
        "health/kl",
        "health/judge_failure_rate",
        "health/reward_spread",
        "health/reward_gap",
    ] {
        assert_eq!(series(&out_dir, key).len(), STEPS as usize, "{key}");
    }

    // With action = "stop", the run stops at a checkpoint of the alarm's step; --resume goes on.
    let stopping = experiment(
        dir.path(),
        "stopping",
        &format!("{tables}action = \"stop\"\n"),
    );
    let out_dir = dir.path().join("run-stopping");
    let stopped = run(sipt().arg("run").arg(&stopping).arg("--out").arg(&out_dir));
    assert_eq!(stopped.code, 1, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("stopped at step 2 by [health]")
            && stopped
                .stderr
                .contains("health/chosen_share/rollout since step 2"),
        "{}",
        stopped.stderr
    );
    assert!(checkpoint(&out_dir, 2).join("model.safetensors").exists());
    assert_eq!(logged_steps(&out_dir), vec![1, 2]);
    let resumed = run(sipt()
        .arg("run")
        .arg(&stopping)
        .arg("--out")
        .arg(&out_dir)
        .arg("--resume"));
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(logged_steps(&out_dir), (1..=STEPS).collect::<Vec<_>>());
}

#[test]
fn a_judge_that_prefers_the_data_trips_no_rollout_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        "anchored",
        "[train.objective]\ntype = \"rf-nll\"\n\n[health]\nwindow = 2\n",
    );
    // The original wins everywhere (dominance of the data, which is what this judge asks);
    // rollouts are never chosen and the reward gap is negative.
    assert!(series(&out, "health/chosen_share/rollout/alarm")
        .iter()
        .all(|a| *a == 0.0));
    assert!(series(&out, "health/reward_gap").iter().all(|g| *g < 0.0));
}
