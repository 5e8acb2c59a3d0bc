//! `factuality-overlap`: a cheap stand-in for the paper's reference-based factuality judge. Like
//! it, the judge gets the original suffix as ground truth and answers with the paper's three
//! labels: no hallucination (1), possible (0.5), definite (0). A "claim" here is a number or a
//! capitalised name in the candidate; it is supported when the prefix or the reference has it.

use serde::Deserialize;
use sipt_api::{Failure, FromConfig, PluginContext, PointwiseItem, PointwiseJudge, Verdict};
use std::collections::HashSet;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Share of unsupported claims up to which the label is "possible" (0.5) rather than
    /// "definite" (0).
    #[serde(default = "default_possible")]
    pub possible_up_to: f64,
    #[serde(default = "default_criterion")]
    pub criterion: String,
}

fn default_possible() -> f64 {
    0.34
}
fn default_criterion() -> String {
    "factuality".into()
}

pub struct FactualityOverlap {
    possible_up_to: f64,
    criterion: String,
}

impl FromConfig for FactualityOverlap {
    type Config = Config;
    fn from_config(config: Config, _: &PluginContext) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&config.possible_up_to) {
            return Err(format!(
                "possible_up_to must be in [0, 1], got {}",
                config.possible_up_to
            ));
        }
        Ok(FactualityOverlap {
            possible_up_to: config.possible_up_to,
            criterion: config.criterion,
        })
    }
}

/// Numbers and capitalised words that do not start a sentence.
pub fn claims(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut sentence_start = true;
    for raw in text.split_whitespace() {
        let word: String = raw.trim_matches(|c: char| !c.is_alphanumeric()).to_string();
        if !word.is_empty() {
            let is_number = word.chars().any(|c| c.is_ascii_digit());
            let is_name = !sentence_start
                && word.chars().next().is_some_and(|c| c.is_uppercase())
                && word.len() > 1;
            if is_number || is_name {
                out.push(word.to_lowercase());
            }
        }
        sentence_start = raw.ends_with(['.', '!', '?', ':']) || (sentence_start && word.is_empty());
    }
    out
}

fn known(text: &str) -> HashSet<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

impl PointwiseJudge for FactualityOverlap {
    fn criteria(&self) -> Vec<String> {
        vec![self.criterion.clone()]
    }

    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
        items
            .iter()
            .map(|item| {
                let Some(reference) = &item.reference else {
                    return Err(Failure::new(
                        "factuality-overlap needs the reference suffix",
                    ));
                };
                if item.candidate.trim().is_empty() {
                    return Err(Failure::new("empty candidate"));
                }
                let mut support = known(reference);
                support.extend(known(&item.prefix));
                let claims = claims(&item.candidate);
                let unsupported = claims.iter().filter(|c| !support.contains(*c)).count();
                let label = if unsupported == 0 {
                    1.0
                } else if (unsupported as f64) / (claims.len() as f64) <= self.possible_up_to {
                    0.5
                } else {
                    0.0
                };
                Ok([(self.criterion.clone(), label)].into())
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    PointwiseJudge,
    "factuality-overlap",
    FactualityOverlap,
    "proxy factuality judge: numbers and names in a candidate must appear in the prefix or the reference suffix"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn label(candidate: &str) -> f64 {
        let j = FactualityOverlap::from_config(
            Config {
                possible_up_to: 0.34,
                criterion: "factuality".into(),
            },
            &PluginContext::default(),
        )
        .unwrap();
        j.judge(&[PointwiseItem {
            prefix: "Paris is the capital of France.".into(),
            candidate: candidate.into(),
            reference: Some(" It has 2 million people and sits on the Seine.".into()),
        }])
        .remove(0)
        .unwrap()["factuality"]
    }

    #[test]
    fn three_labels() {
        assert_eq!(label(" About 2 million live there, by the Seine."), 1.0);
        assert_eq!(
            label(" Some 2 million people, by the Seine, near Lyon."),
            0.5
        );
        assert_eq!(
            label(" It has 9 million people and sits on the Thames."),
            0.0
        );
    }
}
