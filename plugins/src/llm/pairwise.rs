//! `llm-pairwise`: an LLM compares two continuations of a prefix for quality and ends with
//! `Conclusion: Option 1` or `Option 2`. LLM judges favour one position, so the order shown
//! can be fixed, random (per sample, from the content, so it is reproducible and cached), or
//! both (every sample asked in both orders; the agreement between the orders is a counter).

use super::client::{Client, Job};
use super::parse::Format;
use super::{prompts, Messages, SamplingDefaults, Tally};
use serde::Deserialize;
use serde_json::json;
use sipt_api::{
    Counters, Failure, FromConfig, PairwiseItem, PairwiseJudge, PluginContext, Preference,
};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

/// In which order the two candidates are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// As given: `first` is Option 1.
    Fixed,
    /// Each sample shows them in an order drawn from a hash of the content and sample index.
    Random,
    /// Each sample is asked in both orders (twice the requests); agreement is counted.
    Both,
}

llm_config! {
    /// Options of `llm-pairwise`.
    pub struct Config {
        /// Name of the criterion the comparison decides.
        #[serde(default = "default_criterion")]
        pub criterion: String,
        /// Show the reference suffix in the default prompt. A custom prompt shows it when it
        /// uses {reference}.
        #[serde(default)]
        pub with_reference: bool,
        /// "fixed", "random" or "both".
        #[serde(default = "default_order")]
        pub order: Order,
        /// Answers sampled per comparison (per order with "both"), averaged.
        #[serde(default = "crate::llm::defaults::samples")]
        pub samples: u32,
        /// Fewest parsed answers for a comparison; fewer make it a failure.
        #[serde(default = "crate::llm::defaults::min_samples")]
        pub min_samples: u32,
        /// Ask for token log-probs and read the choice from P("1") vs P("2") where given.
        #[serde(default)]
        pub logprobs: bool,
        /// Alternatives per token when `logprobs` is on.
        #[serde(default = "crate::llm::defaults::top_logprobs")]
        pub top_logprobs: u32,
        /// Text the answer is forced to start with, e.g. "Conclusion: Option".
        #[serde(default)]
        pub answer_prefix: Option<String>,
    }
}

fn default_criterion() -> String {
    "quality".into()
}
fn default_order() -> Order {
    Order::Random
}

pub struct LlmPairwise {
    client: Client,
    messages: Messages,
    criterion: String,
    order: Order,
    samples: u32,
    min_samples: u32,
    answer_prefix: Option<String>,
    max_prefix_chars: usize,
    tally: Tally,
    swapped: AtomicU64,
    agreement_checked: AtomicU64,
    agreement_agreed: AtomicU64,
}

impl FromConfig for LlmPairwise {
    type Config = Config;

    fn from_config(config: Config, context: &PluginContext) -> Result<Self, String> {
        super::pointwise::check_samples(config.samples, config.min_samples)?;
        if config.criterion.trim().is_empty() {
            return Err("criterion must not be empty".into());
        }
        let connection = config.connection();
        let messages = connection.templates(
            prompts::quality(config.with_reference),
            prompts::JUDGE_SYSTEM,
            &["prefix", "first", "second", "reference"],
            &["first", "second"],
            context,
        )?;
        let settings = connection.settings(
            SamplingDefaults {
                temperature: 1.0,
                top_p: 0.6,
                max_tokens: 512,
            },
            config.logprobs.then_some(config.top_logprobs),
            context,
        )?;
        let key_extra = messages.cache_key("llm-pairwise");
        Ok(LlmPairwise {
            client: Client::new(settings, key_extra)?,
            messages,
            criterion: config.criterion,
            order: config.order,
            samples: config.samples,
            min_samples: config.min_samples,
            answer_prefix: config.answer_prefix,
            max_prefix_chars: config.max_prefix_chars,
            tally: Tally::default(),
            swapped: AtomicU64::new(0),
            agreement_checked: AtomicU64::new(0),
            agreement_agreed: AtomicU64::new(0),
        })
    }
}

/// A content hash of an item, for the random order.
fn content_hash(item: &PairwiseItem) -> u64 {
    let key = super::cache::key(&json!([item.prefix, item.first, item.second]));
    u64::from_str_radix(&key[..16], 16).unwrap_or(0)
}

impl LlmPairwise {
    /// The orders asked for each sample: `false` as given, `true` swapped.
    fn orders(&self, item: &PairwiseItem, sample: u32) -> Vec<bool> {
        match self.order {
            Order::Fixed => vec![false],
            Order::Both => vec![false, true],
            Order::Random => {
                vec![super::client::splitmix(content_hash(item) ^ u64::from(sample)) & 1 == 1]
            }
        }
    }

    fn render(
        &self,
        item: &PairwiseItem,
        swapped: bool,
    ) -> Result<(Option<String>, String), String> {
        let prefix = super::clip_prefix(&item.prefix, self.max_prefix_chars);
        let (a, b) = if swapped {
            (&item.second, &item.first)
        } else {
            (&item.first, &item.second)
        };
        let values = BTreeMap::from([
            ("prefix", prefix.as_ref()),
            ("first", a.as_str()),
            ("second", b.as_str()),
        ]);
        self.messages.render(values, item.reference.as_deref())
    }
}

impl PairwiseJudge for LlmPairwise {
    fn criterion(&self) -> String {
        self.criterion.clone()
    }

    fn compare(&self, items: &[PairwiseItem]) -> Vec<Result<Preference, Failure>> {
        Tally::add(&self.tally.calls, items.len() as u64);
        // Per item: the (swapped?) order of each job, or why the item cannot be asked.
        let mut plans: Vec<Result<Vec<bool>, String>> = Vec::with_capacity(items.len());
        let mut jobs = Vec::new();
        for item in items {
            let mut orders = Vec::new();
            let mut item_jobs = Vec::new();
            let mut problem = None;
            for sample in 0..self.samples {
                for swapped in self.orders(item, sample) {
                    match self.render(item, swapped) {
                        Ok((system, user)) => {
                            orders.push(swapped);
                            item_jobs.push(Job {
                                system,
                                user,
                                answer_prefix: self.answer_prefix.clone(),
                                sample,
                            });
                        }
                        Err(e) => problem = Some(e),
                    }
                }
            }
            match problem {
                Some(e) => plans.push(Err(e)),
                None => {
                    Tally::add(&self.swapped, orders.iter().filter(|s| **s).count() as u64);
                    jobs.extend(item_jobs);
                    plans.push(Ok(orders));
                }
            }
        }
        let mut answers = self.client.run(&jobs).into_iter();
        let results: Vec<Result<Preference, Failure>> = plans
            .into_iter()
            .map(|plan| {
                let orders = plan.map_err(Failure::new)?;
                let samples = super::read_samples(
                    Format::Conclusion,
                    self.answer_prefix.as_deref(),
                    answers.by_ref().take(orders.len()),
                    &self.tally,
                );
                // A swapped answer's "Option 1" is the second candidate.
                let samples: Vec<Result<f64, String>> = samples
                    .into_iter()
                    .zip(&orders)
                    .map(|(s, &swapped)| s.map(|v| if swapped { 1.0 - v } else { v }))
                    .collect();
                if self.order == Order::Both {
                    self.count_agreement(&samples, &orders);
                }
                super::mean_of(&samples, self.min_samples as usize)
                    .map(|first_wins| Preference { first_wins })
            })
            .collect();
        let failed = results.iter().filter(|r| r.is_err()).count();
        Tally::add(&self.tally.failures, failed as u64);
        results
    }

    fn counters(&self) -> Counters {
        let mut out = Counters::new();
        self.client.stats().fill(&mut out);
        self.tally.fill(&mut out);
        let get = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        out.insert("swapped".into(), get(&self.swapped));
        if self.order == Order::Both {
            let checked = get(&self.agreement_checked);
            out.insert("agreement_checked".into(), checked);
            out.insert("agreement_agreed".into(), get(&self.agreement_agreed));
            if checked > 0.0 {
                out.insert("agreement".into(), get(&self.agreement_agreed) / checked);
            }
        }
        out
    }
}

impl LlmPairwise {
    /// Whether the two orders picked the same winner (means on the same side of 1/2), for an
    /// item where both orders gave at least one parsed answer.
    fn count_agreement(&self, samples: &[Result<f64, String>], orders: &[bool]) {
        let mean = |want: bool| {
            let v: Vec<f64> = samples
                .iter()
                .zip(orders)
                .filter(|(_, &o)| o == want)
                .filter_map(|(s, _)| s.as_ref().ok().copied())
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        if let (Some(a), Some(b)) = (mean(false), mean(true)) {
            Tally::add(&self.agreement_checked, 1);
            let side = |x: f64| (x - 0.5).signum() as i32 * i32::from((x - 0.5).abs() > 1e-9);
            if side(a) == side(b) {
                Tally::add(&self.agreement_agreed, 1);
            }
        }
    }
}

sipt_api::register_plugin!(
    PairwiseJudge,
    "llm-pairwise",
    LlmPairwise,
    "LLM pairwise judge over an OpenAI-compatible server: which continuation is more coherent (Conclusion: Option 1/2), with fixed/random/both orders against position bias, averaged over samples, cached"
);
