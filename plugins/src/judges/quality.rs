//! `quality-proxy` (pointwise) and `quality-proxy-pairwise`: cheap, measurable stand-ins for
//! the paper's LLM quality judge. They reward continuations that do not repeat themselves, are
//! made of words rather than debris, and stay on the prefix's subject. They know nothing of
//! meaning; use an LLM judge for real quality.

use serde::Deserialize;
use sipt_api::{
    Failure, FromConfig, PairwiseItem, PairwiseJudge, PluginContext, PointwiseItem, PointwiseJudge,
    Preference, Verdict,
};
use std::collections::HashSet;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    /// Weight of the share of distinct word bigrams (repetition).
    #[serde(default = "w_repetition")]
    pub repetition: f64,
    /// Weight of the share of characters that are letters, spaces or ordinary punctuation.
    #[serde(default = "w_clean")]
    pub clean: f64,
    /// Weight of the overlap of the candidate's words with the prefix's (staying on subject).
    #[serde(default = "w_coherence")]
    pub coherence: f64,
    /// Share of candidate words found in the prefix at which coherence counts as full.
    #[serde(default = "full_overlap")]
    pub full_overlap: f64,
    #[serde(default = "default_criterion")]
    pub criterion: String,
}

fn w_repetition() -> f64 {
    0.4
}
fn w_clean() -> f64 {
    0.3
}
fn w_coherence() -> f64 {
    0.3
}
fn full_overlap() -> f64 {
    0.3
}
fn default_criterion() -> String {
    "quality".into()
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            repetition: w_repetition(),
            clean: w_clean(),
            coherence: w_coherence(),
            full_overlap: full_overlap(),
            criterion: default_criterion(),
        }
    }
}

fn lower_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// The weighted quality proxy of `candidate` after `prefix`, in [0, 1].
pub struct QualityScore(QualityConfig);

impl QualityScore {
    pub fn new(config: QualityConfig) -> Result<Self, String> {
        let weights = [config.repetition, config.clean, config.coherence];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            return Err("weights must be non-negative and not all zero".into());
        }
        if config.full_overlap.is_nan() || config.full_overlap <= 0.0 || config.full_overlap > 1.0 {
            return Err(format!(
                "full_overlap must be in (0, 1], got {}",
                config.full_overlap
            ));
        }
        Ok(QualityScore(config))
    }

    pub fn score(&self, prefix: &str, candidate: &str) -> Option<f64> {
        let words = lower_words(candidate);
        if words.is_empty() {
            return None;
        }
        let bigrams: Vec<(&str, &str)> = words
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        let repetition = if bigrams.is_empty() {
            1.0
        } else {
            bigrams.iter().collect::<HashSet<_>>().len() as f64 / bigrams.len() as f64
        };
        let chars = candidate.chars().count().max(1) as f64;
        let clean = candidate
            .chars()
            .filter(|c| c.is_alphabetic() || c.is_whitespace() || ".,;:!?'\"-()".contains(*c))
            .count() as f64
            / chars;
        let prefix_words: HashSet<String> = lower_words(prefix).into_iter().collect();
        let shared = words.iter().filter(|w| prefix_words.contains(*w)).count() as f64;
        let coherence = (shared / words.len() as f64 / self.0.full_overlap).min(1.0);
        let c = &self.0;
        let total = c.repetition + c.clean + c.coherence;
        Some((c.repetition * repetition + c.clean * clean + c.coherence * coherence) / total)
    }
}

pub struct QualityProxy {
    scorer: QualityScore,
    criterion: String,
}

impl FromConfig for QualityProxy {
    type Config = QualityConfig;
    fn from_config(config: QualityConfig, _: &PluginContext) -> Result<Self, String> {
        Ok(QualityProxy {
            criterion: config.criterion.clone(),
            scorer: QualityScore::new(config)?,
        })
    }
}

impl PointwiseJudge for QualityProxy {
    fn criteria(&self) -> Vec<String> {
        vec![self.criterion.clone()]
    }
    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
        items
            .iter()
            .map(|i| match self.scorer.score(&i.prefix, &i.candidate) {
                Some(s) => Ok([(self.criterion.clone(), s)].into()),
                None => Err(Failure::new("no words to judge")),
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    PointwiseJudge,
    "quality-proxy",
    QualityProxy,
    "proxy quality judge from text properties: no repetition, no debris, on the prefix's subject"
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairwiseConfig {
    /// The pointwise proxy's options (weights, full_overlap, criterion).
    #[serde(default)]
    pub quality: QualityConfig,
    /// How decisively a score difference decides: P(first) = sigmoid(sharpness * difference).
    /// 0 = hard decisions (ties split 0.5).
    #[serde(default)]
    pub sharpness: f64,
}

pub struct QualityProxyPairwise {
    scorer: QualityScore,
    criterion: String,
    sharpness: f64,
}

impl FromConfig for QualityProxyPairwise {
    type Config = PairwiseConfig;
    fn from_config(config: PairwiseConfig, _: &PluginContext) -> Result<Self, String> {
        if config.sharpness.is_nan() || config.sharpness < 0.0 {
            return Err(format!("sharpness must be >= 0, got {}", config.sharpness));
        }
        Ok(QualityProxyPairwise {
            criterion: config.quality.criterion.clone(),
            scorer: QualityScore::new(config.quality)?,
            sharpness: config.sharpness,
        })
    }
}

impl PairwiseJudge for QualityProxyPairwise {
    fn criterion(&self) -> String {
        self.criterion.clone()
    }
    fn compare(&self, items: &[PairwiseItem]) -> Vec<Result<Preference, Failure>> {
        items
            .iter()
            .map(|i| {
                let a = self.scorer.score(&i.prefix, &i.first);
                let b = self.scorer.score(&i.prefix, &i.second);
                let (a, b) = match (a, b) {
                    (Some(a), Some(b)) => (a, b),
                    (Some(_), None) => return Ok(Preference { first_wins: 1.0 }),
                    (None, Some(_)) => return Ok(Preference { first_wins: 0.0 }),
                    (None, None) => return Err(Failure::new("neither candidate has words")),
                };
                let first_wins = if self.sharpness == 0.0 {
                    match a.partial_cmp(&b) {
                        Some(std::cmp::Ordering::Greater) => 1.0,
                        Some(std::cmp::Ordering::Less) => 0.0,
                        _ => 0.5,
                    }
                } else {
                    1.0 / (1.0 + (-(a - b) * self.sharpness).exp())
                };
                Ok(Preference { first_wins })
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    PairwiseJudge,
    "quality-proxy-pairwise",
    QualityProxyPairwise,
    "proxy pairwise quality judge: prefers the continuation with the better quality-proxy score"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_and_debris_score_lower() {
        let q = QualityScore::new(QualityConfig::default()).unwrap();
        let prefix = "The old sailor told stories of the sea and the ships he knew.";
        let good = q
            .score(
                prefix,
                " He spoke of storms at sea, and of ships lost to them.",
            )
            .unwrap();
        let repeated = q
            .score(prefix, " the the the the the the the the the the")
            .unwrap();
        let debris = q.score(prefix, " #@%$ 8812 ^^^ }{ ~~ 0x3f ##").unwrap();
        assert!(
            good > repeated && good > debris,
            "{good} {repeated} {debris}"
        );
        assert!(q.score(prefix, "  ...  ").is_none());
    }

    #[test]
    fn pairwise_follows_the_scores() {
        let j = QualityProxyPairwise::from_config(
            PairwiseConfig {
                quality: QualityConfig::default(),
                sharpness: 0.0,
            },
            &PluginContext::default(),
        )
        .unwrap();
        let item = |a: &str, b: &str| PairwiseItem {
            prefix: "The sea was calm.".into(),
            first: a.into(),
            second: b.into(),
            reference: None,
        };
        let out = j.compare(&[
            item(" The sea stayed calm all night.", " la la la la la la"),
            item(" x", " x"),
        ]);
        assert_eq!(out[0].as_ref().unwrap().first_wins, 1.0);
        assert_eq!(out[1].as_ref().unwrap().first_wins, 0.5);
    }
}
