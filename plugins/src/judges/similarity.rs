//! `reference-similarity`: how close a candidate stays to the original suffix, as the F1 of
//! their word counts (ROUGE-1 F: shared words over the lengths of both). The original itself
//! scores 1, so this judge prefers the document's own text to anything else, exactly and
//! deterministically; useful to anchor training to the data, and as a known-answer judge for
//! checking what the objectives do with its scores.

use serde::Deserialize;
use sipt_api::{Failure, FromConfig, PluginContext, PointwiseItem, PointwiseJudge, Verdict};
use std::collections::HashMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_criterion")]
    pub criterion: String,
}

fn default_criterion() -> String {
    "similarity".into()
}

pub struct ReferenceSimilarity {
    criterion: String,
}

impl FromConfig for ReferenceSimilarity {
    type Config = Config;
    fn from_config(config: Config, _: &PluginContext) -> Result<Self, String> {
        Ok(ReferenceSimilarity {
            criterion: config.criterion,
        })
    }
}

/// Word counts, case-folded, punctuation around words ignored.
fn words(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for raw in text.split_whitespace() {
        let word: String = raw
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if !word.is_empty() {
            *counts.entry(word).or_insert(0) += 1;
        }
    }
    counts
}

/// F1 of the word counts of `candidate` against `reference`, in [0, 1].
pub fn similarity(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    let (nc, nr) = (c.values().sum::<usize>(), r.values().sum::<usize>());
    if nc == 0 || nr == 0 {
        return if nc == nr { 1.0 } else { 0.0 };
    }
    let shared: usize = c
        .iter()
        .map(|(w, n)| (*n).min(r.get(w).copied().unwrap_or(0)))
        .sum();
    2.0 * shared as f64 / (nc + nr) as f64
}

impl PointwiseJudge for ReferenceSimilarity {
    fn criteria(&self) -> Vec<String> {
        vec![self.criterion.clone()]
    }

    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
        items
            .iter()
            .map(|item| match &item.reference {
                Some(reference) => Ok([(
                    self.criterion.clone(),
                    similarity(&item.candidate, reference),
                )]
                .into()),
                None => Err(Failure::new(
                    "reference-similarity needs the reference suffix",
                )),
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    PointwiseJudge,
    "reference-similarity",
    ReferenceSimilarity,
    "word-overlap F1 with the original suffix (ROUGE-1 F): the original scores 1"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_scores_one_and_others_less() {
        let original = "The king is dead, long live the king.";
        assert_eq!(similarity(original, original), 1.0);
        let partial = similarity("the king sleeps", original);
        assert!(partial > 0.0 && partial < 1.0, "{partial}");
        assert_eq!(similarity("nothing shared here", original), 0.0);
        assert_eq!(similarity("", ""), 1.0);
        // Counts, not sets: repeating a shared word does not help past the reference's count.
        assert!(similarity("king king king king", original) < similarity("king king", original));
    }
}
