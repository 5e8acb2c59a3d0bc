//! Next-token pretraining: the paper's "standard pretraining" baseline. A step is windows →
//! loss (accumulated over `train.grad_accum` batches) → clip → AdamW → step end.

use super::{start, Prepared, StepEnd};
use crate::data::{window_batch, Windows};
use crate::model::autocast;
use crate::train::optim::cosine_lr;
use anyhow::Result;
use sipt_experiment::config::Experiment;
use sipt_experiment::metrics::Row;
use sipt_experiment::plugins::Plugins;
use sipt_experiment::rundir::RunDir;
use std::time::Instant;

/// Gradients travel between ranks in flat buckets of about this many bytes.
pub const GRADIENT_BUCKET_BYTES: usize = 25 << 20;

/// Train `prepared.policy` on next-token prediction; evaluated by the same judges as SIP runs
/// (`plugins`), so that baselines and SIP runs compare.
pub fn train(e: &Experiment, run: &RunDir, prepared: Prepared, plugins: &Plugins) -> Result<()> {
    let (device, corpus, policy) = (prepared.device, &prepared.corpus, &prepared.policy);
    let (tokenizer, resume) = (&prepared.tokenizer, &prepared.resume);
    let t = &e.train;
    let len = e.data.seq_len + 1;
    let mut windows = Windows::new(&corpus.train, len, e.experiment.seed, e.data.shuffle)?;
    let (mut optimizer, mut state) = start(e, policy, &mut windows, resume)?;
    let continue_after = prepared.resuming.then_some(state.step);
    let dist = &prepared.dist;
    let mut end = StepEnd::open(
        e,
        run,
        plugins,
        corpus,
        tokenizer,
        policy,
        continue_after,
        dist,
    )?;
    // Every rank draws the whole global batch's windows (so the data position is one for the
    // job, whatever its size) and trains on its share.
    let mine = dist.share(t.batch_size);
    let tokens_per_step = (t.batch_size * t.grad_accum * e.data.seq_len) as u64;
    tracing::info!(
        "next-token training: {} steps of {} sequences x {} tokens ({} windows per epoch)",
        t.steps,
        t.batch_size * t.grad_accum,
        e.data.seq_len,
        windows.count()
    );

    while state.step < t.steps {
        let started = Instant::now();
        let lr = cosine_lr(state.step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        let mut loss_sum = 0.0;
        for _ in 0..t.grad_accum {
            let starts: Vec<usize> = (0..t.batch_size).map(|_| windows.next_start()).collect();
            let ids = window_batch(&corpus.tokens, &starts[mine.clone()], len, device);
            // The mean over this rank's windows, weighted by its share of the global batch:
            // summed over the ranks, the global mean.
            let share = mine.len() as f64 / t.batch_size as f64;
            let loss = autocast(device, e.model.dtype, || policy.model.ntp_loss(&ids)) * share
                / t.grad_accum as f64;
            loss.backward();
            loss_sum += loss.double_value(&[]);
        }
        let reduced = Instant::now();
        dist.reduce_gradients(&policy.vs, GRADIENT_BUCKET_BYTES)?;
        let mut loss = [loss_sum];
        dist.sum_f64(&mut loss)?;
        let loss_sum = loss[0];
        let seconds_reduce = reduced.elapsed().as_secs_f64();
        let grad_norm = optimizer.clip_grad_norm(t.grad_clip);
        optimizer.step(lr);
        optimizer.zero_grad();
        state.step += 1;
        state.tokens += tokens_per_step;
        state.data = windows.position;
        let seconds = started.elapsed().as_secs_f64();

        let mut row = Row::new(state.step);
        row.set("loss/ntp", loss_sum)
            .set("lr", lr)
            .set("grad_norm", grad_norm)
            .set("tokens", state.tokens as f64)
            .set("time/step", seconds)
            .set("time/all_reduce", seconds_reduce)
            .set("perf/tokens_per_second", tokens_per_step as f64 / seconds);
        let summary = |_: &Row| {
            format!(
                "loss {loss_sum:.4}, {:.0} tok/s",
                tokens_per_step as f64 / seconds
            )
        };
        end.finish_step(&state, row, summary, policy, &optimizer, None)?;
    }
    end.close(run, &state, &[])
}
