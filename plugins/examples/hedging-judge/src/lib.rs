//! An example external plugin: a pointwise judge that scores how plainly a continuation states
//! things. Hedges ("perhaps", "might", "I think") lower the score. Build it with
//! `cargo build --release` and load `target/release/libhedging_judge.so` with `--plugin` or an
//! experiment file's `plugins = [...]`.

use serde::Deserialize;
use sipt_api::{FromConfig, PluginContext, PointwiseItem, PointwiseJudge, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Words and phrases counted as hedges (lower case).
    #[serde(default = "default_hedges")]
    hedges: Vec<String>,
    /// Hedges per word at which the score reaches 0.
    #[serde(default = "default_saturation")]
    saturation: f64,
}

fn default_hedges() -> Vec<String> {
    ["perhaps", "maybe", "possibly", "might", "i think", "probably", "somewhat", "arguably"]
        .map(String::from)
        .to_vec()
}

fn default_saturation() -> f64 {
    0.1
}

pub struct HedgingJudge {
    config: Config,
}

impl FromConfig for HedgingJudge {
    type Config = Config;

    fn from_config(config: Config, _context: &PluginContext) -> Result<Self, String> {
        if config.saturation <= 0.0 {
            return Err(format!("saturation must be positive, got {}", config.saturation));
        }
        Ok(HedgingJudge { config })
    }
}

impl HedgingJudge {
    fn score(&self, text: &str) -> f64 {
        let lower = format!(" {} ", text.to_lowercase());
        let words = lower.split_whitespace().count().max(1) as f64;
        let hedges: usize = self
            .config
            .hedges
            .iter()
            .map(|h| lower.matches(&format!(" {h} ")).count())
            .sum();
        (1.0 - hedges as f64 / words / self.config.saturation).max(0.0)
    }
}

impl PointwiseJudge for HedgingJudge {
    fn criteria(&self) -> Vec<String> {
        vec!["directness".into()]
    }

    fn judge(&self, items: &[PointwiseItem]) -> Vec<Verdict> {
        items
            .iter()
            .map(|item| {
                if item.candidate.trim().is_empty() {
                    // Nothing to judge is a failure, not a perfect score.
                    return Err(sipt_api::Failure::new("empty candidate"));
                }
                Ok([("directness".to_string(), self.score(&item.candidate))].into())
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    PointwiseJudge,
    "hedging",
    HedgingJudge,
    "example plugin: 1.0 for plain statements, lower the more a continuation hedges"
);

sipt_api::export_plugins!();
