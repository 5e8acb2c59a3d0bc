//! The self-improving training step, phase by phase as method.md describes it:
//!
//! 1. cut a batch of documents into prefixes and their original suffixes;
//! 2. rewrite the suffixes (rewriter plugin) and judge the originals and rewrites — this part
//!    does not depend on the policy, so with `sip.overlap` it runs for step t+1 on a second
//!    thread while step t samples and trains, with identical results;
//! 3. sample K rollouts per prefix (one prefill per prefix, the cache shared by its rollouts);
//! 4. judge the rollouts (pointwise judges; pairwise judges through a tournament);
//! 5. one reward per candidate (reward plugin);
//! 6. the objective selects what to learn from (pairs, NLL targets) and gives the loss;
//! 7. optimizer step; the DPO reference follows the policy as configured.

mod micro;
pub mod tournament;

use crate::config::Experiment;
use crate::data::{Cut, Cutter, Windows};
use crate::engine::{autocast, Prepared};
use crate::metrics::Row;
use crate::objective::{Judged, LossInputs, Objective, ReferenceUpdate, Target};
use crate::progress::Progress as Bar;
use crate::registry::Registry;
use crate::rng::SplitMix;
use crate::rundir::{RunDir, CHECKPOINTS_DIR, METRICS_FILE};
use crate::sample::{generate_in_calls, Sampling};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint;
use crate::train::optim::cosine_lr;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use sipt_api::{
    CandidateScores, Curriculum, Instance, PairwiseItem, PairwiseJudge, PluginKind, PointwiseItem,
    PointwiseJudge, Progress, RewardFn, RewriteItem, Rewriter, Source, StepPlan,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;
use tch::Tensor;
use tournament::Design;

/// Independent random streams of a run.
const STREAM_CUTS: u64 = 1;
const STREAM_ROLLOUTS: u64 = 2;
const STREAM_TOURNAMENT: u64 = 3;

/// Criterion → score (`None`: that judgment failed).
pub type ScoreMap = BTreeMap<String, Option<f64>>;

/// The plugins of a SIP experiment, built from its tables.
pub struct Plugins {
    pub pointwise: Vec<(String, Box<dyn PointwiseJudge>)>,
    pub pairwise: Vec<(String, Box<dyn PairwiseJudge>)>,
    pub rewriter: Option<Box<dyn Rewriter>>,
    pub reward: Box<dyn RewardFn>,
    pub curriculum: Box<dyn Curriculum>,
}

fn build(
    registry: &Registry,
    kind: PluginKind,
    table: &crate::config::PluginTable,
    ctx: &sipt_api::PluginContext,
) -> Result<Instance> {
    let entry = registry
        .find(kind, &table.name)
        .ok_or_else(|| anyhow!("unknown {kind} '{}'", table.name))?;
    registry
        .build(entry, table.options_value(), ctx)
        .map_err(|e| anyhow!(e))
}

impl Plugins {
    pub fn build(
        e: &Experiment,
        registry: &Registry,
        ctx: &sipt_api::PluginContext,
    ) -> Result<Plugins> {
        let mut pointwise = Vec::new();
        let mut pairwise = Vec::new();
        for (name, table) in &e.judges {
            let kind = if registry
                .find(PluginKind::PointwiseJudge, &table.name)
                .is_some()
            {
                PluginKind::PointwiseJudge
            } else {
                PluginKind::PairwiseJudge
            };
            match build(registry, kind, table, ctx).with_context(|| format!("judges.{name}"))? {
                Instance::PointwiseJudge(j) => pointwise.push((name.clone(), j)),
                Instance::PairwiseJudge(j) => pairwise.push((name.clone(), j)),
                _ => unreachable_kind(name)?,
            }
        }
        let rewriter = match &e.rewriter {
            Some(t) => match build(registry, PluginKind::Rewriter, t, ctx).context("rewriter")? {
                Instance::Rewriter(r) => Some(r),
                _ => return Err(anyhow!("rewriter: not a rewriter")),
            },
            None => None,
        };
        let default_reward = crate::config::PluginTable::named("weighted-sum");
        let reward = match build(
            registry,
            PluginKind::Reward,
            e.reward.as_ref().unwrap_or(&default_reward),
            ctx,
        )
        .context("reward")?
        {
            Instance::Reward(r) => r,
            _ => return Err(anyhow!("reward: not a reward function")),
        };
        let default_curriculum = crate::config::PluginTable::named("constant");
        let curriculum = match build(
            registry,
            PluginKind::Curriculum,
            e.curriculum.as_ref().unwrap_or(&default_curriculum),
            ctx,
        )
        .context("curriculum")?
        {
            Instance::Curriculum(c) => c,
            _ => return Err(anyhow!("curriculum: not a curriculum")),
        };
        Ok(Plugins {
            pointwise,
            pairwise,
            rewriter,
            reward,
            curriculum,
        })
    }
}

fn unreachable_kind(name: &str) -> Result<()> {
    Err(anyhow!("judges.{name}: not a judge"))
}

/// Run every pointwise judge over `items`; per item, the scores of all criteria, and per judge
/// (calls, failures).
pub fn judge_pointwise(
    judges: &[(String, Box<dyn PointwiseJudge>)],
    items: &[PointwiseItem],
) -> (Vec<ScoreMap>, BTreeMap<String, (usize, usize)>) {
    let mut scores = vec![ScoreMap::new(); items.len()];
    let mut stats = BTreeMap::new();
    if items.is_empty() {
        return (scores, stats);
    }
    for (name, judge) in judges {
        let criteria = judge.criteria();
        let verdicts = judge.judge(items);
        let mut failures = 0;
        for (i, scores) in scores.iter_mut().enumerate() {
            match verdicts.get(i) {
                Some(Ok(s)) => {
                    for c in &criteria {
                        scores.insert(c.clone(), s.get(c).copied());
                    }
                }
                _ => {
                    failures += 1;
                    for c in &criteria {
                        scores.insert(c.clone(), None);
                    }
                }
            }
        }
        stats.insert(name.clone(), (items.len(), failures));
    }
    (scores, stats)
}

/// The policy-independent half of a step.
struct Fixed {
    cuts: Vec<Cut>,
    prefixes: Vec<String>,
    suffixes: Vec<String>,
    /// Per prefix: the rewrite's text and tokens, or `None` (no rewriter, or it failed).
    rewrites: Vec<Option<(String, Vec<u32>)>>,
    rewrite_failures: usize,
    /// Pointwise scores of (original, rewrite) per prefix.
    scores: Vec<(ScoreMap, Option<ScoreMap>)>,
    judge_stats: BTreeMap<String, (usize, usize)>,
    seconds_rewrite: f64,
    seconds_judge: f64,
}

struct FixedInputs<'a> {
    tokens: &'a [u32],
    cutter: &'a Cutter,
    tokenizer: &'a Tokenizer,
    plugins: &'a Plugins,
    batch: usize,
    suffix_tokens: usize,
    seed: u64,
    /// Whether pools hold rewrites and originals at all (the experiment's base plan).
    rewrite: bool,
    original: bool,
}

fn fixed_half(inp: &FixedInputs, step: u64) -> Fixed {
    let mut rng = SplitMix::derive(inp.seed, STREAM_CUTS, step);
    let cuts: Vec<Cut> = (0..inp.batch)
        .map(|_| inp.cutter.cut(inp.tokens, &mut rng))
        .collect();
    let prefixes: Vec<String> = cuts
        .iter()
        .map(|c| inp.tokenizer.decode(&c.prefix))
        .collect();
    let suffixes: Vec<String> = cuts
        .iter()
        .map(|c| inp.tokenizer.decode(&c.suffix))
        .collect();

    let started = Instant::now();
    let mut rewrite_failures = 0;
    let rewriter = inp.plugins.rewriter.as_ref().filter(|_| inp.rewrite);
    let rewrites: Vec<Option<(String, Vec<u32>)>> = match rewriter {
        None => vec![None; cuts.len()],
        Some(r) => {
            let items: Vec<RewriteItem> = prefixes
                .iter()
                .zip(&suffixes)
                .map(|(p, s)| RewriteItem {
                    prefix: p.clone(),
                    suffix: s.clone(),
                })
                .collect();
            r.rewrite(&items)
                .into_iter()
                .map(|out| match out {
                    Ok(text) => {
                        let mut ids = inp.tokenizer.encode(&text).unwrap_or_default();
                        // Same length budget as the original suffix (the paper keeps N tokens).
                        ids.truncate(inp.suffix_tokens);
                        if ids.is_empty() {
                            rewrite_failures += 1;
                            None
                        } else {
                            Some((inp.tokenizer.decode(&ids), ids))
                        }
                    }
                    Err(_) => {
                        rewrite_failures += 1;
                        None
                    }
                })
                .collect()
        }
    };
    let seconds_rewrite = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut items = Vec::new();
    for (i, (p, s)) in prefixes.iter().zip(&suffixes).enumerate() {
        if inp.original {
            items.push(PointwiseItem {
                prefix: p.clone(),
                candidate: s.clone(),
                reference: Some(s.clone()),
            });
        }
        if let Some((text, _)) = &rewrites[i] {
            items.push(PointwiseItem {
                prefix: p.clone(),
                candidate: text.clone(),
                reference: Some(s.clone()),
            });
        }
    }
    let (mut judged, judge_stats) = judge_pointwise(&inp.plugins.pointwise, &items);
    let mut judged = judged.drain(..);
    let scores = rewrites
        .iter()
        .map(|r| {
            let original = if inp.original {
                judged.next().unwrap_or_default()
            } else {
                ScoreMap::new()
            };
            let rewrite = r.as_ref().map(|_| judged.next().unwrap_or_default());
            (original, rewrite)
        })
        .collect();
    Fixed {
        cuts,
        prefixes,
        suffixes,
        rewrites,
        rewrite_failures,
        scores,
        judge_stats,
        seconds_rewrite,
        seconds_judge: started.elapsed().as_secs_f64(),
    }
}

/// A candidate continuation of one prefix.
#[derive(Debug, Clone)]
struct Candidate {
    source: Source,
    tokens: Vec<u32>,
    text: String,
    scores: ScoreMap,
    reward: Option<f64>,
}

/// Moving averages the curriculum sees, kept in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Averages {
    chosen_rate: BTreeMap<Source, f64>,
    mean_reward: BTreeMap<Source, f64>,
}

fn ema(map: &mut BTreeMap<Source, f64>, source: Source, value: f64) {
    let e = map.entry(source).or_insert(value);
    *e = 0.9 * *e + 0.1 * value;
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Train with a candidate-based objective (online DPO, RF-NLL, SFT, ...).
pub fn train(
    e: &Experiment,
    registry: &Registry,
    run: &RunDir,
    prepared: Prepared,
    objective: Box<dyn Objective>,
    context: &sipt_api::PluginContext,
) -> Result<()> {
    let Prepared {
        device,
        tokenizer,
        corpus,
        policy,
        resume,
    } = prepared;
    let plugins = Plugins::build(e, registry, context)?;
    let design = Design::parse(&e.sip.tournament)
        .ok_or_else(|| anyhow!("sip.tournament: unknown design"))?;
    let t = &e.train;
    let cutter = Cutter::new(
        &corpus.train,
        e.data.prefix_min_tokens,
        e.data.prefix_max_tokens,
        e.data.suffix_tokens,
    )?;
    let needs = objective.needs();
    let mut windows = Windows::new(
        &corpus.train,
        e.data.seq_len + 1,
        e.experiment.seed,
        e.data.shuffle,
    )?;
    let (mut optimizer, mut state) = crate::train::start(e, &policy, &mut windows, &resume)?;
    let mut reference = match needs.reference {
        Some(_) => {
            let mut r = policy.copy_as(policy.model.kind())?;
            r.vs.freeze();
            Some(r)
        }
        None => None,
    };
    let periodic = crate::eval::Periodic::new(
        e,
        &plugins,
        &corpus,
        &tokenizer,
        &policy,
        run,
        resume.is_some(),
    )?;

    let mut averages = Averages::default();
    if let Some((dir, saved)) = &resume {
        if let Some(r) = reference.as_mut() {
            let ref_dir = dir.join(checkpoint::REFERENCE_DIR);
            if ref_dir.exists() {
                r.load_weights(&ref_dir)?;
            }
        }
        averages = serde_json::from_value(saved.extra.clone()).unwrap_or_default();
    }
    let mut sink = crate::tracking::Tracker::open(e, run, resume.as_ref().map(|(_, s)| s.step))?;
    crate::metrics::drop_rows_after(
        &run.file(SAMPLES_FILE),
        resume.as_ref().map(|(_, s)| s.step).unwrap_or(0),
    )?;
    let mut samples = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.file(SAMPLES_FILE))
        .with_context(|| format!("cannot open {}", run.file(SAMPLES_FILE).display()))?;
    let checkpoints = run.path().join(CHECKPOINTS_DIR);
    let base = StepPlan {
        original: e.sip.original,
        rewrite: e.sip.rewrite,
        rollouts: e.sip.rollouts,
        temperature: e.sip.temperature,
        top_p: e.sip.top_p,
        sip_weight: 1.0,
        ntp_weight: 0.0,
    };
    if base.rewrite && plugins.rewriter.is_none() {
        return Err(anyhow!("sip.rewrite is on but no [rewriter] is configured"));
    }
    let fixed_inputs = FixedInputs {
        tokens: &corpus.tokens,
        cutter: &cutter,
        tokenizer: &tokenizer,
        plugins: &plugins,
        batch: t.batch_size,
        suffix_tokens: e.data.suffix_tokens,
        seed: e.experiment.seed,
        rewrite: base.rewrite,
        original: base.original,
    };
    let mut eos: Vec<u32> = policy
        .model
        .config
        .eos_ids()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    eos.extend(tokenizer.eos);
    let bar = Bar::new(t.steps, state.step, t.log_every).with_status_file(run.path());
    tracing::info!(
        "SIP training: {} steps of {} prefixes, objective {}, {} pointwise and {} pairwise judge(s), tournament {}",
        t.steps,
        t.batch_size,
        e.train.objective.name,
        plugins.pointwise.len(),
        plugins.pairwise.len(),
        e.sip.tournament
    );

    // Rollouts from a bf16 copy of the policy when asked (refreshed before every step's
    // sampling); log-probs for the update always come from the policy itself.
    let mut sampler = crate::model::Sampler::new(&policy, &e.sip.sample_dtype)?;

    std::thread::scope(|scope| -> Result<()> {
        let mut next: Option<std::thread::ScopedJoinHandle<Fixed>> = None;
        while state.step < t.steps {
            let step_started = Instant::now();
            let step = state.step;
            let fixed = match next.take() {
                Some(handle) => handle
                    .join()
                    .map_err(|_| anyhow!("the rewrite/judge thread panicked"))?,
                None => fixed_half(&fixed_inputs, step),
            };
            if e.sip.overlap && step + 1 < t.steps {
                let inputs = &fixed_inputs;
                next = Some(scope.spawn(move || fixed_half(inputs, step + 1)));
            }
            let progress = Progress {
                step,
                total_steps: t.steps,
                tokens: state.tokens,
                chosen_rate: averages.chosen_rate.clone(),
                mean_reward: averages.mean_reward.clone(),
            };
            let plan = plugins.curriculum.plan(&progress, &base);

            // 3. Rollouts.
            let sampled_at = Instant::now();
            let prefixes: Vec<Vec<u32>> = fixed.cuts.iter().map(|c| c.prefix.clone()).collect();
            let sampling = Sampling {
                max_new_tokens: e.data.suffix_tokens,
                temperature: plan.temperature,
                top_p: plan.top_p,
                top_k: e.sip.top_k,
                stop_at_eos: false,
            };
            let k = plan.rollouts as usize;
            let rollouts = if k > 0 {
                let model = sampler.model(&policy)?;
                let seed = SplitMix::derive(e.experiment.seed, STREAM_ROLLOUTS, step).next_u64();
                autocast(device, &e.model.dtype, || {
                    generate_in_calls(
                        model,
                        &prefixes,
                        k,
                        &sampling,
                        &eos,
                        seed,
                        e.sip.rollout_prefixes,
                    )
                })
            } else {
                crate::sample::Generated {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                }
            };
            let seconds_sample = sampled_at.elapsed().as_secs_f64();

            // Pools: original, rewrite, rollouts (as the plan asks).
            let mut pools: Vec<Vec<Candidate>> = Vec::with_capacity(fixed.cuts.len());
            for (i, cut) in fixed.cuts.iter().enumerate() {
                let mut pool = Vec::new();
                if plan.original {
                    pool.push(Candidate {
                        source: Source::Original,
                        tokens: cut.suffix.clone(),
                        text: fixed.suffixes[i].clone(),
                        scores: fixed.scores[i].0.clone(),
                        reward: None,
                    });
                }
                if plan.rewrite {
                    if let (Some((text, ids)), Some(scores)) =
                        (&fixed.rewrites[i], &fixed.scores[i].1)
                    {
                        pool.push(Candidate {
                            source: Source::Rewrite,
                            tokens: ids.clone(),
                            text: text.clone(),
                            scores: scores.clone(),
                            reward: None,
                        });
                    }
                }
                for r in 0..k {
                    let tokens = rollouts.tokens[i * k + r].clone();
                    pool.push(Candidate {
                        source: Source::Rollout,
                        text: tokenizer.decode(&tokens),
                        tokens,
                        scores: ScoreMap::new(),
                        reward: None,
                    });
                }
                pools.push(pool);
            }

            // 4. Judge the rollouts (pointwise), then every pool with the pairwise judges.
            let judged_at = Instant::now();
            let mut rollout_items = Vec::new();
            let mut rollout_slots = Vec::new();
            for (p, pool) in pools.iter().enumerate() {
                for (c, cand) in pool
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.source == Source::Rollout)
                {
                    rollout_items.push(PointwiseItem {
                        prefix: fixed.prefixes[p].clone(),
                        candidate: cand.text.clone(),
                        reference: Some(fixed.suffixes[p].clone()),
                    });
                    rollout_slots.push((p, c));
                }
            }
            let (rollout_scores, mut judge_stats) =
                judge_pointwise(&plugins.pointwise, &rollout_items);
            for ((p, c), s) in rollout_slots.into_iter().zip(rollout_scores) {
                pools[p][c].scores = s;
            }
            for (name, (calls, failures)) in &fixed.judge_stats {
                let entry = judge_stats.entry(name.clone()).or_insert((0, 0));
                entry.0 += calls;
                entry.1 += failures;
            }
            let sizes: Vec<usize> = pools.iter().map(Vec::len).collect();
            let pivots: Vec<Option<usize>> = pools
                .iter()
                .map(|pool| pool.iter().position(|c| c.source == Source::Original))
                .collect();
            let mut pairwise_calls = 0;
            for (name, judge) in &plugins.pairwise {
                let criterion = judge.criterion();
                let mut referee = |matches: &[tournament::Match]| -> Vec<Option<f64>> {
                    let items: Vec<PairwiseItem> = matches
                        .iter()
                        .map(|&(p, a, b)| PairwiseItem {
                            prefix: fixed.prefixes[p].clone(),
                            first: pools[p][a].text.clone(),
                            second: pools[p][b].text.clone(),
                            reference: Some(fixed.suffixes[p].clone()),
                        })
                        .collect();
                    judge
                        .compare(&items)
                        .into_iter()
                        .map(|r| r.ok().map(|p| p.first_wins))
                        .collect()
                };
                let mut rng = SplitMix::derive(e.experiment.seed, STREAM_TOURNAMENT, step);
                let outcome = tournament::run(design, &sizes, &pivots, &mut referee, &mut rng);
                pairwise_calls += outcome.calls;
                judge_stats.insert(name.clone(), (outcome.calls, outcome.failures));
                for (p, scores) in outcome.scores.into_iter().enumerate() {
                    for (c, s) in scores.into_iter().enumerate() {
                        pools[p][c].scores.insert(criterion.clone(), s);
                    }
                }
            }
            let seconds_judge = judged_at.elapsed().as_secs_f64() + fixed.seconds_judge;

            // 5. Rewards.
            let reward_input: Vec<Vec<CandidateScores>> = pools
                .iter()
                .map(|pool| {
                    pool.iter()
                        .map(|c| CandidateScores {
                            source: c.source,
                            scores: c.scores.clone(),
                        })
                        .collect()
                })
                .collect();
            let rewards = plugins.reward.rewards(&reward_input);
            for (pool, rs) in pools.iter_mut().zip(rewards) {
                for (c, r) in pool.iter_mut().zip(rs) {
                    c.reward = r.ok().filter(|x| x.is_finite());
                }
            }

            // 6. Selection and loss.
            let update_at = Instant::now();
            let targets: Vec<Vec<Target>> = pools
                .iter()
                .map(|pool| {
                    let judged: Vec<Judged> = pool
                        .iter()
                        .map(|c| Judged {
                            source: c.source,
                            reward: c.reward,
                        })
                        .collect();
                    objective.select(&judged)
                })
                .collect();
            let mut pair_pre: Vec<&[u32]> = Vec::new();
            let mut pair_chosen: Vec<&[u32]> = Vec::new();
            let mut pair_rejected: Vec<&[u32]> = Vec::new();
            let mut nll_pre: Vec<&[u32]> = Vec::new();
            let mut nll_cont: Vec<&[u32]> = Vec::new();
            let mut chosen_count: BTreeMap<Source, f64> = BTreeMap::new();
            let mut selected_pools = 0usize;
            for (p, ts) in targets.iter().enumerate() {
                if !ts.is_empty() {
                    selected_pools += 1;
                }
                for target in ts {
                    match *target {
                        Target::Pair { chosen, rejected } => {
                            pair_pre.push(&fixed.cuts[p].prefix);
                            pair_chosen.push(&pools[p][chosen].tokens);
                            pair_rejected.push(&pools[p][rejected].tokens);
                            *chosen_count.entry(pools[p][chosen].source).or_default() += 1.0;
                        }
                        Target::Nll { index } => {
                            nll_pre.push(&fixed.cuts[p].prefix);
                            nll_cont.push(&pools[p][index].tokens);
                            *chosen_count.entry(pools[p][index].source).or_default() += 1.0;
                        }
                    }
                }
            }
            let lr = cosine_lr(step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
            let mut inputs = LossInputs {
                policy_chosen: None,
                policy_rejected: None,
                reference_chosen: None,
                reference_rejected: None,
                nll_logp: None,
                nll_tokens: None,
                ntp: None,
            };
            // `train.micro_batch`: forward passes in micro-batches (see `micro`).
            let mut micro = micro::Micro::new(t.micro_batch, device, &e.model.dtype);
            if !pair_pre.is_empty() {
                let both_pre: Vec<&[u32]> =
                    pair_pre.iter().chain(pair_pre.iter()).copied().collect();
                let both: Vec<&[u32]> = pair_chosen
                    .iter()
                    .chain(pair_rejected.iter())
                    .copied()
                    .collect();
                let n = pair_pre.len() as i64;
                let (logp, _) = micro.logprobs(&policy.model, &both_pre, &both, true);
                inputs.policy_chosen = Some(logp.narrow(0, 0, n));
                inputs.policy_rejected = Some(logp.narrow(0, n, n));
                if let Some(r) = &reference {
                    let (ref_logp, _) =
                        tch::no_grad(|| micro.logprobs(&r.model, &both_pre, &both, false));
                    inputs.reference_chosen = Some(ref_logp.narrow(0, 0, n));
                    inputs.reference_rejected = Some(ref_logp.narrow(0, n, n));
                }
            }
            if !nll_pre.is_empty() {
                let (logp, count) = micro.logprobs(&policy.model, &nll_pre, &nll_cont, true);
                inputs.nll_logp = Some(logp);
                inputs.nll_tokens = Some(count);
            }
            let ntp_weight = plan.ntp_weight;
            let mut ntp_tokens = 0u64;
            if needs.ntp_weight > 0.0 || ntp_weight > 0.0 {
                let len = e.data.seq_len + 1;
                let starts: Vec<usize> = (0..t.batch_size).map(|_| windows.next_start()).collect();
                let mut ids = Vec::with_capacity(starts.len() * len);
                for &s in &starts {
                    ids.extend(corpus.tokens[s..s + len].iter().map(|&x| x as i64));
                }
                let batch = Tensor::from_slice(&ids)
                    .view([starts.len() as i64, len as i64])
                    .to_device(device);
                inputs.ntp = Some(micro.ntp(&policy.model, batch));
                ntp_tokens = (t.batch_size * e.data.seq_len) as u64;
            }
            let terms = objective.loss(&inputs);
            let mut loss = terms.loss * plan.sip_weight;
            if ntp_weight > 0.0 {
                if let Some(ntp) = &inputs.ntp {
                    loss = &loss + ntp * ntp_weight;
                }
            }
            let weighted_loss = loss.double_value(&[]);
            let mut grad_norm = 0.0;
            let updated = loss.requires_grad();
            if updated {
                loss.backward();
                micro.backward(&policy.model);
                grad_norm = optimizer.clip_grad_norm(t.grad_clip);
                optimizer.step(lr);
                optimizer.zero_grad();
            }
            let inputs_ntp = inputs.ntp.as_ref().map(|t| t.double_value(&[]));
            drop(inputs);
            if let (Some(r), Some(update)) = (reference.as_mut(), needs.reference) {
                match update {
                    ReferenceUpdate::Frozen => {}
                    ReferenceUpdate::Sync { every } => {
                        if (step + 1) % every == 0 {
                            r.copy_from(&policy)?;
                        }
                    }
                    ReferenceUpdate::Ema { decay } => tch::no_grad(|| {
                        let own = policy.vs.variables();
                        for (name, mut v) in r.vs.variables() {
                            if let Some(p) = own.get(&name) {
                                let _ = v.g_mul_scalar_(decay);
                                let _ = v.g_add_(&(p * (1.0 - decay)));
                            }
                        }
                    }),
                }
            }
            let seconds_update = update_at.elapsed().as_secs_f64();

            // 7. Metrics.
            state.step += 1;
            let trained_tokens: u64 = pair_chosen
                .iter()
                .chain(&pair_rejected)
                .chain(&nll_cont)
                .map(|c| c.len() as u64)
                .sum::<u64>()
                + ntp_tokens;
            state.tokens += trained_tokens;
            state.data = windows.position;
            let mut row = Row::new(state.step);
            row.set("lr", lr)
                .set("grad_norm", grad_norm)
                .set("updated", if updated { 1.0 } else { 0.0 })
                .set("plan/rollouts", plan.rollouts as f64)
                .set("plan/sip_weight", plan.sip_weight)
                .set("plan/ntp_weight", plan.ntp_weight)
                .set("tokens", state.tokens as f64)
                .set("time/sample", seconds_sample)
                .set("time/rewrite", fixed.seconds_rewrite)
                .set("time/judge", seconds_judge)
                .set("time/update", seconds_update)
                .set("time/step", step_started.elapsed().as_secs_f64())
                .set(
                    "perf/generated_tokens_per_second",
                    (rollouts.tokens.len() * e.data.suffix_tokens) as f64
                        / seconds_sample.max(1e-9),
                )
                .set(
                    "perf/trained_tokens_per_second",
                    trained_tokens as f64 / seconds_update.max(1e-9),
                )
                .set("rewrite/failures", fixed.rewrite_failures as f64);
            for (name, value) in &terms.metrics {
                row.set(name.clone(), *value);
            }
            // The objective's terms, then the loss actually optimized (curriculum weights applied).
            row.set("loss/total", weighted_loss);
            if let Some(ntp) = &inputs_ntp {
                row.set("loss/ntp", *ntp);
            }
            let mut all_calls = 0usize;
            for (name, (calls, failures)) in &judge_stats {
                row.set(format!("judge/{name}/calls"), *calls as f64)
                    .set(format!("judge/{name}/failures"), *failures as f64);
                all_calls += calls;
            }
            row.set(
                "judge/calls_per_prefix",
                all_calls as f64 / pools.len().max(1) as f64,
            )
            .set(
                "judge/pairwise_calls_per_prefix",
                pairwise_calls as f64 / pools.len().max(1) as f64,
            );
            // The plugins' own counters, cumulative since the run started (rates such as cache
            // hits or order agreement are read from them; they are not per-step deltas because the
            // prefetch thread works on the next step concurrently).
            for (name, counters) in plugins
                .pointwise
                .iter()
                .map(|(n, j)| (n.as_str(), j.counters()))
                .chain(
                    plugins
                        .pairwise
                        .iter()
                        .map(|(n, j)| (n.as_str(), j.counters())),
                )
            {
                for (k, v) in counters {
                    row.set(format!("judge/{name}/total/{k}"), v);
                }
            }
            if let Some(r) = &plugins.rewriter {
                for (k, v) in r.counters() {
                    row.set(format!("rewriter/total/{k}"), v);
                }
            }
            for source in Source::ALL {
                let rewards: Vec<f64> = pools
                    .iter()
                    .flatten()
                    .filter(|c| c.source == source)
                    .filter_map(|c| c.reward)
                    .collect();
                if !rewards.is_empty() {
                    let (mean, std) = mean_std(&rewards);
                    row.set(format!("reward/{source}/mean"), mean)
                        .set(format!("reward/{source}/std"), std);
                    ema(&mut averages.mean_reward, source, mean);
                }
                if selected_pools > 0 && pools.iter().any(|p| p.iter().any(|c| c.source == source))
                {
                    let rate =
                        chosen_count.get(&source).copied().unwrap_or(0.0) / selected_pools as f64;
                    row.set(format!("chosen/{source}"), rate);
                    ema(&mut averages.chosen_rate, source, rate);
                }
            }
            row.set("selected_pools", selected_pools as f64);
            let last = state.step == t.steps;
            periodic.maybe_run(state.step, last, &policy, &tokenizer, &mut row, &bar);
            sink.log(&row)?;
            if e.sip.sample_every > 0 && (state.step % e.sip.sample_every == 0 || state.step == 1) {
                write_samples(&mut samples, state.step, &fixed, &pools, &targets)?;
            }
            let rollout_reward = row
                .get("reward/rollout/mean")
                .map(|r| format!(", rollout reward {r:.3}"))
                .unwrap_or_default();
            let summary = format!(
                "loss {:.4}{rollout_reward}, {:.1}s/step",
                row.get("loss/total").unwrap_or(f64::NAN),
                step_started.elapsed().as_secs_f64()
            );
            bar.step(state.step, &summary);
            state.extra = serde_json::to_value(&averages).unwrap_or_default();
            if (t.checkpoint_every > 0 && state.step % t.checkpoint_every == 0) || last {
                let dir = checkpoint::save(
                    &checkpoints,
                    &policy,
                    Some(&optimizer),
                    reference.as_ref(),
                    tokenizer.path(),
                    &state,
                    t.keep_checkpoints,
                )?;
                bar.note(&format!("checkpoint {}", dir.display()));
            }
        }
        if let Some(handle) = next.take() {
            let _ = handle.join();
        }
        Ok(())
    })?;
    bar.finish();
    sink.finish(true)?;
    println!(
        "finished {} steps; metrics in {}, samples in {}, final model in {}",
        state.step,
        run.file(METRICS_FILE).display(),
        run.file(SAMPLES_FILE).display(),
        checkpoint::step_dir(&checkpoints, state.step).display()
    );
    Ok(())
}

pub const SAMPLES_FILE: &str = "samples.jsonl";

fn write_samples(
    out: &mut std::fs::File,
    step: u64,
    fixed: &Fixed,
    pools: &[Vec<Candidate>],
    targets: &[Vec<Target>],
) -> Result<()> {
    for (p, pool) in pools.iter().enumerate().take(2) {
        let role = |c: usize| -> &'static str {
            for t in &targets[p] {
                match *t {
                    Target::Pair { chosen, .. } if chosen == c => return "chosen",
                    Target::Pair { rejected, .. } if rejected == c => return "rejected",
                    Target::Nll { index } if index == c => return "target",
                    _ => {}
                }
            }
            ""
        };
        let candidates: Vec<serde_json::Value> = pool
            .iter()
            .enumerate()
            .map(|(c, cand)| {
                serde_json::json!({
                    "source": cand.source,
                    "text": cand.text,
                    "scores": cand.scores,
                    "reward": cand.reward,
                    "role": role(c),
                })
            })
            .collect();
        let line = serde_json::json!({
            "step": step,
            "prefix": fixed.prefixes[p],
            "original": fixed.suffixes[p],
            "candidates": candidates,
        });
        writeln!(out, "{line}").context("cannot write samples")?;
    }
    out.flush().context("cannot write samples")
}
