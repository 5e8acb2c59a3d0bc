//! Prompt templates with named placeholders: `{prefix}`, `{candidate}`, ... Literal braces are
//! written `{{` and `}}`. A template is checked when the plugin is built, so a misspelt
//! placeholder is a configuration error rather than a prompt the judge silently misreads.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Slot(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parse `source`, accepting only placeholders from `allowed`.
    pub fn parse(source: &str, allowed: &[&str]) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &source[at + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!(
                            "unclosed '{{' at character {at} (write '{{{{' for a literal brace)"
                        )
                    })?;
                    let name = rest[..end].trim();
                    if !allowed.contains(&name) {
                        return Err(format!(
                            "unknown placeholder {{{name}}}; this template accepts {}",
                            allowed
                                .iter()
                                .map(|a| format!("{{{a}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Slot(name.to_string()));
                    // Skip the placeholder's characters.
                    while let Some(&(i, _)) = chars.peek() {
                        if i > at + end + 1 {
                            break;
                        }
                        chars.next();
                    }
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' at character {at} (write '}}}}' for a literal brace)"
                    ))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            pieces,
        })
    }

    /// The template as written (part of the cache key).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template uses `{name}`.
    pub fn uses(&self, name: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Slot(s) if s == name))
    }

    /// Fail unless every name in `required` is used.
    pub fn require(&self, what: &str, required: &[&str]) -> Result<(), String> {
        for name in required {
            if !self.uses(name) {
                return Err(format!("{what} must use the placeholder {{{name}}}"));
            }
        }
        Ok(())
    }

    /// Fill the placeholders. A placeholder without a value is an error naming it.
    pub fn render(&self, values: &BTreeMap<&str, &str>) -> Result<String, String> {
        let mut out = String::with_capacity(self.source.len() + 256);
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(name) => match values.get(name.as_str()) {
                    Some(v) => out.push_str(v),
                    None => return Err(format!("no value for {{{name}}}")),
                },
            }
        }
        Ok(out)
    }
}

/// A template given inline (`key`) or in a file (`key_file`), else the default.
pub fn choose(
    key: &str,
    inline: &Option<String>,
    file: &Option<String>,
    default: String,
    context: &sipt_api::PluginContext,
) -> Result<String, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("set {key} or {key}_file, not both")),
        (Some(text), None) => Ok(text.clone()),
        (None, Some(path)) => {
            let full = context.resolve(path);
            std::fs::read_to_string(&full)
                .map_err(|e| format!("{key}_file: cannot read {} ({e})", full.display()))
        }
        (None, None) => Ok(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_named_slots_and_escaped_braces() {
        let t = Template::parse(
            "A {prefix} | {{json}} {candidate}}}",
            &["prefix", "candidate"],
        )
        .unwrap();
        let values = BTreeMap::from([("prefix", "p{x}"), ("candidate", "c")]);
        assert_eq!(t.render(&values).unwrap(), "A p{x} | {json} c}");
        assert!(t.uses("prefix") && !t.uses("reference"));
    }

    #[test]
    fn rejects_unknown_unclosed_and_missing() {
        let err = Template::parse("{prefx}", &["prefix"]).unwrap_err();
        assert!(err.contains("{prefx}") && err.contains("{prefix}"), "{err}");
        assert!(Template::parse("a { b", &["b"])
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("a } b", &["b"])
            .unwrap_err()
            .contains("unmatched"));
        let t = Template::parse("{prefix}", &["prefix", "candidate"]).unwrap();
        assert!(t.require("prompt", &["candidate"]).is_err());
        assert!(t.render(&BTreeMap::new()).unwrap_err().contains("{prefix}"));
    }

    #[test]
    fn values_are_not_reinterpreted() {
        let t = Template::parse("{a}{b}", &["a", "b"]).unwrap();
        let values = BTreeMap::from([("a", "{b}"), ("b", "}}")]);
        assert_eq!(t.render(&values).unwrap(), "{b}}}");
    }
}
