//! Judges that need no server. They are cheap proxies for the paper's LLM judges, measurable and
//! fast, so that experiments run anywhere; they are not substitutes for a strong judge.

pub mod factuality;
pub mod quality;
pub mod safety;
pub mod similarity;
