//! Rollouts: K continuations per prefix sampled from the policy (or its bf16 copy), one
//! prefill per prefix with its KV cache shared by its K rows, in calls of
//! `sip.rollout_prefixes` prefixes.

use super::STREAM_ROLLOUTS;
use crate::model::{autocast, Llama};
use crate::sample::{generate_in_calls, Generated, Sampling};
use sipt_api::StepPlan;
use sipt_experiment::config::Experiment;
use sipt_experiment::rng::SplitMix;
use tch::Device;

/// What sampling takes from the experiment, fixed for the run.
pub struct Rollouts<'a> {
    pub e: &'a Experiment,
    pub device: Device,
    /// The tokens that end a sequence (sampling continues past them: suffixes have N tokens).
    pub eos: Vec<u32>,
}

impl Rollouts<'_> {
    /// `plan.rollouts` continuations of `suffix_tokens` tokens for each prefix, drawn from the
    /// step's own random stream (so a step samples the same rollouts however it is run).
    /// `first`: the batch index of `prefixes[0]` (a rank samples its share of the batch as the
    /// whole batch would be sampled).
    pub fn sample(
        &self,
        model: &Llama,
        prefixes: &[Vec<u32>],
        first: usize,
        plan: &StepPlan,
        step: u64,
    ) -> Generated {
        let k = plan.rollouts as usize;
        if k == 0 {
            return Generated {
                tokens: Vec::new(),
                logprobs: Vec::new(),
            };
        }
        let e = self.e;
        let sampling = Sampling {
            max_new_tokens: e.data.suffix_tokens,
            temperature: plan.temperature,
            top_p: plan.top_p,
            top_k: e.sip.top_k,
            stop_at_eos: false,
        };
        let seed = SplitMix::derive(e.experiment.seed, STREAM_ROLLOUTS, step).next_u64();
        autocast(self.device, e.model.dtype, || {
            generate_in_calls(
                model,
                prefixes,
                first,
                k,
                &sampling,
                &self.eos,
                seed,
                e.sip.rollout_prefixes,
            )
        })
    }
}
