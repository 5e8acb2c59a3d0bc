//! Finding the line of a key path in a TOML file, for error messages.

use toml_edit::{ImDocument, Item, TableLike};

/// 1-based line of `path` (e.g. `["judges", "safety", "type"]`) in `text`, if it is written there.
/// Points at the key when the key is found, at the nearest enclosing table otherwise.
pub fn line_of(text: &str, path: &[String]) -> Option<usize> {
    let doc = ImDocument::parse(text).ok()?;
    let mut best: Option<usize> = None;
    let mut table: &dyn TableLike = doc.as_table();
    let mut item: Option<&Item> = None;
    for (depth, segment) in path.iter().enumerate() {
        if let Some(current) = item {
            if let Some(t) = current.as_table_like() {
                table = t;
                if let Some(span) = current.span() {
                    best = Some(span.start);
                }
            } else if let Some(array) = current.as_array() {
                // A numeric segment inside an array: point at that element.
                let element = segment.parse::<usize>().ok().and_then(|i| array.get(i));
                return element
                    .and_then(|v| v.span())
                    .map(|s| s.start)
                    .or(best)
                    .map(|offset| line_at(text, offset));
            } else {
                break;
            }
        }
        match table.get_key_value(segment) {
            Some((key, value)) => {
                let span = key.span().or_else(|| value.span());
                if let Some(span) = span {
                    best = Some(span.start);
                }
                item = Some(value);
            }
            None => {
                // A dotted table header ([a.b]) holds its own span; fall back to it.
                let _ = depth;
                break;
            }
        }
    }
    best.map(|offset| line_at(text, offset))
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn finds_keys_in_tables_and_inline_tables() {
        let text = "a = 1\n\n[train]\nlr = 2\n\n[judges.safety]\ntype = \"x\"\nopts = { k = 3 }\nlist = [1, 2]\n";
        assert_eq!(line_of(text, &p("a")), Some(1));
        assert_eq!(line_of(text, &p("train.lr")), Some(4));
        assert_eq!(line_of(text, &p("judges.safety.type")), Some(7));
        assert_eq!(line_of(text, &p("judges.safety.opts.k")), Some(8));
        assert_eq!(line_of(text, &p("judges.safety.list.1")), Some(9));
        assert_eq!(line_of(text, &p("nothing")), None);
    }

    #[test]
    fn dotted_keys() {
        let text = "[train]\nobjective.type = \"dpo\"\n";
        assert_eq!(line_of(text, &p("train.objective.type")), Some(2));
    }
}
