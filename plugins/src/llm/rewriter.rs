//! `llm-rewriter`: an LLM rewrites the original suffix into a better one (factual errors
//! fixed, unsafe content made safe but still useful, good text copied, about the same length).
//! As in the paper, the last few words of the prefix are shown in front of the original and
//! the rewrite starts with them, so it joins the prefix smoothly; they are removed again from
//! the answer. An empty or runaway answer is a failed rewrite (the candidate is dropped).

use super::client::{Client, Job};
use super::{prompts, Messages, SamplingDefaults, Tally};
use sipt_api::{Counters, Failure, FromConfig, PluginContext, RewriteItem, Rewriter};
use std::collections::BTreeMap;

llm_config! {
    /// Options of `llm-rewriter`.
    pub struct Config {
        /// Words from the end of the prefix shown in front of the suffix ({tail}).
        #[serde(default = "default_tail_words")]
        pub tail_words: usize,
        /// A rewrite longer than this many times the original (in characters) fails (0: no
        /// limit).
        #[serde(default = "default_max_length_ratio")]
        pub max_length_ratio: f64,
    }
}

fn default_tail_words() -> usize {
    6
}
fn default_max_length_ratio() -> f64 {
    2.5
}

pub struct LlmRewriter {
    client: Client,
    messages: Messages,
    tail_words: usize,
    max_length_ratio: f64,
    max_prefix_chars: usize,
    tally: Tally,
}

impl FromConfig for LlmRewriter {
    type Config = Config;

    fn from_config(config: Config, context: &PluginContext) -> Result<Self, String> {
        if !(config.max_length_ratio.is_finite() && config.max_length_ratio >= 0.0) {
            return Err("max_length_ratio must be 0 (no limit) or positive".into());
        }
        let connection = config.connection();
        let messages = connection.templates(
            prompts::rewriter(),
            prompts::REWRITER_SYSTEM,
            &["prefix", "tail", "suffix"],
            &["suffix"],
            context,
        )?;
        let settings = connection.settings(
            SamplingDefaults {
                temperature: 0.0,
                top_p: 1.0,
                max_tokens: 384,
            },
            None,
            context,
        )?;
        let key_extra = messages.cache_key("llm-rewriter");
        Ok(LlmRewriter {
            client: Client::new(settings, key_extra)?,
            messages,
            tail_words: config.tail_words,
            max_length_ratio: config.max_length_ratio,
            max_prefix_chars: config.max_prefix_chars,
            tally: Tally::default(),
        })
    }
}

/// The last `words` words of `text`, with what follows them (trailing spaces included).
pub fn tail(text: &str, words: usize) -> &str {
    if words == 0 {
        return "";
    }
    let mut starts = Vec::new();
    let mut previous_space = true;
    for (i, c) in text.char_indices() {
        if !c.is_whitespace() && previous_space {
            starts.push(i);
        }
        previous_space = c.is_whitespace();
    }
    match starts.len().checked_sub(words) {
        Some(k) => &text[starts[k]..],
        None => text.trim_start(),
    }
}

/// The rewrite inside a model's answer: decoration and a repeated tail removed, and the
/// original's leading whitespace restored so it joins the prefix the same way.
pub fn clean_rewrite(answer: &str, tail: &str, original: &str) -> Result<String, String> {
    let mut text = answer.trim();
    // A fenced block.
    if let Some(rest) = text.strip_prefix("```") {
        text = rest.split_once('\n').map_or("", |(_, body)| body);
        text = text.trim_end().strip_suffix("```").unwrap_or(text).trim();
    }
    // A preamble line such as "Here is the rewritten text:".
    if let Some((first, rest)) = text.split_once('\n') {
        let lower = first.to_lowercase();
        if first.trim_end().ends_with(':')
            && (lower.contains("here is") || lower.contains("here's") || lower.contains("rewrit"))
            && !rest.trim().is_empty()
        {
            text = rest.trim();
        }
    }
    // Fences as in the prompt (small models echo the prompt): the last fenced block.
    if let Some(at) = text.rfind("<<<") {
        let block = &text[at + 3..];
        text = block
            .split_once(">>>")
            .map_or(block, |(inside, _)| inside)
            .trim();
    }
    text = text.strip_suffix(">>>").unwrap_or(text).trim();
    // Quotation marks around the whole answer.
    for (open, close) in [('"', '"'), ('\u{201c}', '\u{201d}')] {
        if text.len() >= 2 && text.starts_with(open) && text.ends_with(close) {
            text = text[open.len_utf8()..text.len() - close.len_utf8()].trim();
        }
    }
    let t = tail.trim();
    if !t.is_empty() {
        if let Some(rest) = text.strip_prefix(t) {
            text = rest;
        }
    }
    let body = text.trim();
    if body.is_empty() {
        return Err("the rewrite is empty".into());
    }
    let lead: String = original.chars().take_while(|c| c.is_whitespace()).collect();
    // When the tail ended without a space and the original joined without one, keep it so.
    let joined_word = text.starts_with(|c: char| !c.is_whitespace()) && lead.is_empty();
    let lead = if lead.is_empty() && !joined_word {
        " ".to_string()
    } else {
        lead
    };
    Ok(format!("{lead}{body}"))
}

impl Rewriter for LlmRewriter {
    fn rewrite(&self, items: &[RewriteItem]) -> Vec<Result<String, Failure>> {
        Tally::add(&self.tally.calls, items.len() as u64);
        let rendered: Vec<Result<(Option<String>, String), String>> = items
            .iter()
            .map(|item| {
                if item.suffix.trim().is_empty() {
                    return Err("empty suffix".to_string());
                }
                let prefix = super::clip_prefix(&item.prefix, self.max_prefix_chars);
                let values = BTreeMap::from([
                    ("prefix", prefix.as_ref()),
                    ("tail", tail(&item.prefix, self.tail_words)),
                    ("suffix", item.suffix.as_str()),
                ]);
                self.messages.render(values, None)
            })
            .collect();
        let jobs: Vec<Job> = rendered
            .iter()
            .flatten()
            .map(|(system, user)| Job {
                system: system.clone(),
                user: user.clone(),
                answer_prefix: None,
                sample: 0,
            })
            .collect();
        let mut answers = self.client.run(&jobs).into_iter();
        let results: Vec<Result<String, Failure>> = rendered
            .into_iter()
            .zip(items)
            .map(|(r, item)| {
                r.map_err(Failure::new)?;
                Tally::add(&self.tally.samples, 1);
                let answer = answers
                    .next()
                    .expect("one answer per job")
                    .inspect_err(|_| Tally::add(&self.tally.request_failures, 1))
                    .map_err(Failure::new)?;
                let rewrite = clean_rewrite(
                    &answer.text,
                    tail(&item.prefix, self.tail_words),
                    &item.suffix,
                )
                .inspect_err(|_| Tally::add(&self.tally.parse_failures, 1))
                .map_err(Failure::new)?;
                let (new, old) = (rewrite.chars().count(), item.suffix.chars().count().max(20));
                if self.max_length_ratio > 0.0 && new as f64 > self.max_length_ratio * old as f64 {
                    Tally::add(&self.tally.parse_failures, 1);
                    return Err(Failure::new(format!(
                        "the rewrite has {new} characters, over {} times the original's",
                        self.max_length_ratio
                    )));
                }
                Ok(rewrite)
            })
            .collect();
        let failed = results.iter().filter(|r| r.is_err()).count();
        Tally::add(&self.tally.failures, failed as u64);
        results
    }

    fn counters(&self) -> Counters {
        self.tally.counters(&self.client)
    }
}

sipt_api::register_plugin!(
    Rewriter,
    "llm-rewriter",
    LlmRewriter,
    "LLM rewriter over an OpenAI-compatible server: rewrites the original suffix (factual, safe, same length), joined to the prefix's last words, cached"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_words_and_what_follows() {
        assert_eq!(tail("one two  three four ", 2), "three four ");
        assert_eq!(tail("one two", 5), "one two");
        assert_eq!(tail("  one", 5), "one");
        assert_eq!(tail("one two", 0), "");
    }

    #[test]
    fn cleans_answers() {
        let tail = "the cat ";
        assert_eq!(
            clean_rewrite("the cat sat down.", tail, " sat."),
            Ok(" sat down.".into())
        );
        assert_eq!(
            clean_rewrite("Here is the rewritten text:\n\"the cat sat.\"", tail, "sat"),
            Ok(" sat.".into())
        );
        assert_eq!(
            clean_rewrite("```\nthe cat ran.\n```", tail, " x"),
            Ok(" ran.".into())
        );
        assert_eq!(
            clean_rewrite(
                "<<<\nthe prefix\n>>>\nEdited:\n<<<\nthe cat ran",
                tail,
                " x"
            ),
            Ok(" ran".into())
        );
        assert_eq!(
            clean_rewrite("<<<\nthe cat ran.\n>>>\nDone.", tail, " x"),
            Ok(" ran.".into())
        );
        assert_eq!(
            clean_rewrite("It ran away.", tail, "\n\nx"),
            Ok("\n\nIt ran away.".into())
        );
        assert!(clean_rewrite("  the cat  ", tail, " x").is_err());
        assert!(clean_rewrite("", tail, " x").is_err());
        // A word continued from the tail stays joined.
        assert_eq!(
            clean_rewrite("the catnip", "the cat", "nip"),
            Ok("nip".into())
        );
    }
}
