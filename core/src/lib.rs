//! The sipt engine: experiment configuration, the plugin registry, the policy model, sampling,
//! data, and training.

pub mod bench;
pub mod cli;
pub mod data;
pub mod dist;
pub mod engine;
pub mod eval;
pub mod model;
pub mod objective;
pub mod sample;
pub mod sip;
pub mod tokenizer;
pub mod train;
