//! The sipt engine: experiment configuration, the plugin registry, the policy model, sampling,
//! data, and training.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod engine;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod paths;
pub mod progress;
pub mod registry;
pub mod rng;
pub mod rundir;
pub mod sample;
pub mod sip;
pub mod suggest;
pub mod sweep;
pub mod tokenizer;
pub mod tracking;
pub mod train;
