//! Built-in sipt plugins: judges, rewriters, rewards and curricula. The LLM judges and rewriter
//! (`llm`) talk to OpenAI-compatible servers; the others (cheap proxies) need none.
//!
//! Each plugin registers itself next to its definition with `sipt_api::register_plugin!`, so
//! adding one touches one file.

pub mod curricula;
pub mod judges;
pub mod llm;
pub mod rewards;
pub mod rewriters;
pub mod wordlists;

/// Called by the `sipt` binary so the linker keeps this crate, and with it the registrations.
pub fn link() {}
