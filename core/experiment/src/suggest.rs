//! "Did you mean ...?" for misspelt keys and plugin names.

/// The candidate closest to `input`, if it is close enough to be a plausible typo.
pub fn nearest<'a, I>(input: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let input_lower = input.to_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&input_lower, &c.to_lowercase()),
                c,
            )
        })
        .filter(|(distance, c)| *distance <= (c.len().max(input.len()) / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// `"; did you mean 'x'?"` or nothing.
pub fn hint<'a, I>(input: &str, candidates: I) -> String
where
    I: IntoIterator<Item = &'a str>,
{
    nearest(input, candidates)
        .map(|c| format!("; did you mean '{c}'?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let names = ["safety", "quality", "factuality"];
        assert_eq!(nearest("saftey", names), Some("safety"));
        assert_eq!(nearest("Quality", names), Some("quality"));
        assert_eq!(nearest("zebra", names), None);
        assert_eq!(hint("lrr", ["lr", "steps"]), "; did you mean 'lr'?");
    }
}
