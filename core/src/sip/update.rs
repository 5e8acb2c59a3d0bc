//! The update: log-probabilities of the selection under the policy (with grad) and the DPO
//! reference (without), an optional next-token loss on plain documents, the objective's loss
//! weighted by the plan, one optimizer step, then the reference follows the policy as the
//! objective asks (frozen, synced every N steps, or an EMA).

use super::micro::Micro;
use super::select::Selection;
use crate::data::{window_batch, Windows};
use crate::dist::Dist;
use crate::model::Policy;
use crate::objective::{LossInputs, Needs, Objective, ReferenceUpdate};
use crate::sample::Scoring;
use crate::train::ntp::GRADIENT_BUCKET_BYTES;
use crate::train::optim::AdamW;
use anyhow::Result;
use sipt_api::StepPlan;
use sipt_experiment::config::Dtype;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Tensor};

/// What the update phase owns and changes besides the policy: the optimizer and the reference.
pub struct Learner {
    pub needs: Needs,
    pub optimizer: AdamW,
    /// The DPO reference model, when the objective has one.
    pub reference: Option<Policy>,
    pub device: Device,
    /// Sequences per forward/backward pass (`train.micro_batch`; 0 = all at once).
    pub micro_batch: usize,
    pub dtype: Dtype,
    pub grad_clip: f64,
    /// The job's ranks: each computes its share of the sequences, gradients are summed.
    pub dist: Rc<Dist>,
    /// How log-probs are computed (continuations of one prefix share its forward pass).
    pub scoring: Scoring,
}

/// What one update did.
pub struct Updated {
    /// The loss optimized, after the plan's weights.
    pub loss: f64,
    pub grad_norm: f64,
    /// False when nothing was selected (no gradient, no optimizer step).
    pub updated: bool,
    /// The next-token loss, when one was computed, and the tokens it was computed on.
    pub ntp_loss: Option<f64>,
    pub ntp_tokens: u64,
    /// The objective's own terms (`loss/dpo`, rewards margins, ...).
    pub metrics: Vec<(String, f64)>,
    /// Per-token estimate of KL(policy || reference) on the chosen continuations: their summed
    /// log-prob difference over their tokens (when there is a reference and a pair).
    pub kl: Option<f64>,
    /// Seconds spent summing gradients over the ranks.
    pub seconds_all_reduce: f64,
    /// Where the rest of the update's time went.
    pub phases: UpdatePhases,
}

/// Seconds of an update's parts (`time/update/*`): the policy's log-probs (forward passes with
/// their graphs, or without them when micro-batched), the reference's, the next-token batch's
/// forward, the loss's backward pass (with the micro-batches' replays), and the optimizer (clip,
/// AdamW, zeroing). With CUDA, kernels are asynchronous: a part's figure ends when its last
/// launch returns, so the wait shows up in the next part that reads a value.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdatePhases {
    pub policy: f64,
    pub reference: f64,
    pub ntp: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl Learner {
    /// Whether this step needs a next-token batch (the objective's or the plan's weight).
    pub fn wants_ntp(&self, plan: &StepPlan) -> bool {
        self.needs.ntp_weight > 0.0 || plan.ntp_weight > 0.0
    }

    /// Compute the loss of `selection` (and of the `ntp` batch), step the optimizer at `lr`.
    pub fn update(
        &mut self,
        policy: &Policy,
        objective: &dyn Objective,
        selection: &Selection,
        ntp: Option<Tensor>,
        plan: &StepPlan,
        lr: f64,
    ) -> Result<Updated> {
        // `train.micro_batch`: forward passes in micro-batches, and each rank's share (see
        // `micro`).
        let dist = Rc::clone(&self.dist);
        let mut micro = Micro::new(
            self.micro_batch,
            self.device,
            self.dtype,
            &dist,
            self.scoring,
        );
        // Each window of `len` tokens trains `len - 1` next-token predictions.
        let ntp_tokens = ntp.as_ref().map_or(0, |b| {
            let (rows, len) = (b.size()[0], b.size()[1]);
            (rows * (len - 1)) as u64
        });
        let mut phases = UpdatePhases::default();
        let mut inputs = self.logprobs(&mut micro, policy, selection, &mut phases)?;
        let chosen_tokens: usize = selection.pairs.iter().map(|p| p.chosen.len()).sum();
        let kl = match (&inputs.policy_chosen, &inputs.reference_chosen) {
            (Some(pc), Some(rc)) if chosen_tokens > 0 => {
                let gap = (pc.detach() - rc).sum(tch::Kind::Float).double_value(&[]);
                Some(gap / chosen_tokens as f64)
            }
            _ => None,
        };
        let clock = Instant::now();
        inputs.ntp = ntp
            .map(|batch| micro.ntp(&policy.model, batch))
            .transpose()?;
        phases.ntp = clock.elapsed().as_secs_f64();
        let terms = objective.loss(&inputs);
        let mut loss = terms.loss * plan.sip_weight;
        if plan.ntp_weight > 0.0 {
            if let Some(ntp) = &inputs.ntp {
                loss = &loss + ntp * plan.ntp_weight;
            }
        }
        let weighted = loss.double_value(&[]);
        let mut grad_norm = 0.0;
        let mut seconds_all_reduce = 0.0;
        let updated = loss.requires_grad();
        if updated {
            let clock = Instant::now();
            loss.backward();
            micro.backward(&policy.model);
            phases.backward = clock.elapsed().as_secs_f64();
            let reducing = Instant::now();
            dist.reduce_gradients(&policy.vs, GRADIENT_BUCKET_BYTES)?;
            seconds_all_reduce = reducing.elapsed().as_secs_f64();
            let clock = Instant::now();
            grad_norm = self.optimizer.clip_grad_norm(self.grad_clip);
            self.optimizer.step(lr);
            self.optimizer.zero_grad();
            phases.optimizer = clock.elapsed().as_secs_f64();
        }
        Ok(Updated {
            loss: weighted,
            grad_norm,
            updated,
            ntp_loss: inputs.ntp.as_ref().map(|t| t.double_value(&[])),
            ntp_tokens,
            metrics: terms.metrics,
            kl,
            seconds_all_reduce,
            phases,
        })
    }

    /// Summed continuation log-probs of the pairs (policy and reference; both members of
    /// every pair in one pass) and of the NLL targets.
    fn logprobs(
        &self,
        micro: &mut Micro,
        policy: &Policy,
        selection: &Selection,
        phases: &mut UpdatePhases,
    ) -> Result<LossInputs> {
        let mut inputs = LossInputs {
            policy_chosen: None,
            policy_rejected: None,
            reference_chosen: None,
            reference_rejected: None,
            nll_logp: None,
            nll_tokens: None,
            ntp: None,
        };
        let pairs = &selection.pairs;
        if !pairs.is_empty() {
            // Chosen, then rejected, of each pair: one prefix's rows stay together (they share
            // its forward pass, also within a micro-batch).
            let pre: Vec<&[u32]> = pairs.iter().flat_map(|p| [p.prefix, p.prefix]).collect();
            let cont: Vec<&[u32]> = pairs.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
            let n = pairs.len() as i64;
            let members = |logp: Tensor| {
                let pairs = logp.view([n, 2]);
                (pairs.select(1, 0), pairs.select(1, 1))
            };
            let clock = Instant::now();
            let (logp, _) = micro.logprobs(&policy.model, &pre, &cont, true)?;
            phases.policy += clock.elapsed().as_secs_f64();
            let (chosen, rejected) = members(logp);
            inputs.policy_chosen = Some(chosen);
            inputs.policy_rejected = Some(rejected);
            if let Some(r) = &self.reference {
                let clock = Instant::now();
                let (ref_logp, _) = tch::no_grad(|| micro.logprobs(&r.model, &pre, &cont, false))?;
                phases.reference += clock.elapsed().as_secs_f64();
                let (chosen, rejected) = members(ref_logp);
                inputs.reference_chosen = Some(chosen);
                inputs.reference_rejected = Some(rejected);
            }
        }
        if !selection.nll.is_empty() {
            let pre: Vec<&[u32]> = selection.nll.iter().map(|t| t.prefix).collect();
            let cont: Vec<&[u32]> = selection.nll.iter().map(|t| t.continuation).collect();
            let clock = Instant::now();
            let (logp, count) = micro.logprobs(&policy.model, &pre, &cont, true)?;
            phases.policy += clock.elapsed().as_secs_f64();
            inputs.nll_logp = Some(logp);
            inputs.nll_tokens = Some(count);
        }
        Ok(inputs)
    }

    /// After step `step`'s update: the reference follows the policy as configured.
    pub fn follow(&mut self, policy: &Policy, step: u64) -> Result<()> {
        let (Some(r), Some(update)) = (self.reference.as_mut(), self.needs.reference) else {
            return Ok(());
        };
        match update {
            ReferenceUpdate::Frozen => {}
            ReferenceUpdate::Sync { every } => {
                if (step + 1) % every == 0 {
                    r.copy_from(policy)?;
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
        Ok(())
    }
}

/// `rows` next-token windows of `len` tokens from the stream, as a `(rows, len)` batch.
pub fn ntp_batch(
    windows: &mut Windows,
    tokens: &crate::data::Tokens,
    rows: usize,
    len: usize,
    device: Device,
) -> Tensor {
    let starts: Vec<usize> = (0..rows).map(|_| windows.next_start()).collect();
    window_batch(tokens, &starts, len, device)
}

/// A frozen copy of the policy: the DPO reference at the start of training.
pub fn reference_of(policy: &Policy) -> Result<Policy> {
    let mut r = policy.copy_as(policy.model.kind())?;
    r.vs.freeze();
    Ok(r)
}
