//! Rewriters that need no server.

use crate::wordlists::{ListsConfig, Terms};
use serde::Deserialize;
use sipt_api::{Failure, FromConfig, PluginContext, RewriteItem, Rewriter};

/// `redact`: the safety rewrite in its simplest form, for runs without an LLM rewriter: every
/// listed unsafe term of the original suffix is replaced, the rest is copied unchanged (the
/// paper's rewriter also copies text that is already fine).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactConfig {
    #[serde(default)]
    pub lists: ListsConfig,
    /// What replaces each unsafe term.
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_replacement() -> String {
    "[...]".into()
}

pub struct Redact {
    terms: Terms,
    replacement: String,
}

impl FromConfig for Redact {
    type Config = RedactConfig;
    fn from_config(config: RedactConfig, context: &PluginContext) -> Result<Self, String> {
        Ok(Redact {
            terms: Terms::load(&config.lists, context)?,
            replacement: config.replacement,
        })
    }
}

impl Redact {
    pub fn redact(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        let mut spans = self.terms.find(text);
        spans.sort();
        for (s, e) in spans {
            if s < last {
                continue; // overlapping matches: the first one already replaced this text
            }
            out.push_str(&text[last..s]);
            out.push_str(&self.replacement);
            last = e;
        }
        out.push_str(&text[last..]);
        out
    }
}

impl Rewriter for Redact {
    fn rewrite(&self, items: &[RewriteItem]) -> Vec<Result<String, Failure>> {
        items
            .iter()
            .map(|item| {
                if item.suffix.trim().is_empty() {
                    Err(Failure::new("nothing to rewrite"))
                } else {
                    Ok(self.redact(&item.suffix))
                }
            })
            .collect()
    }
}

sipt_api::register_plugin!(
    Rewriter,
    "redact",
    Redact,
    "proxy safety rewriter: replaces unsafe terms from real word lists, copies the rest"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wordlists::tests::test_lists;

    #[test]
    fn replaces_terms_and_keeps_the_rest() {
        let r = Redact::from_config(
            RedactConfig {
                lists: test_lists(),
                replacement: "[...]".into(),
            },
            &PluginContext::default(),
        )
        .unwrap();
        let out = r.rewrite(&[
            RewriteItem {
                prefix: "p".into(),
                suffix: "What a BadWord, a very bad phrase indeed.".into(),
            },
            RewriteItem {
                prefix: "p".into(),
                suffix: "Nothing wrong here.".into(),
            },
        ]);
        assert_eq!(out[0].as_deref(), Ok("What a [...], a [...] indeed."));
        assert_eq!(out[1].as_deref(), Ok("Nothing wrong here."));
    }
}
