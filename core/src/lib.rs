//! The sipt engine: experiment configuration, the plugin registry, and training.

pub mod cli;
pub mod config;
pub mod engine;
pub mod objective;
pub mod paths;
pub mod registry;
pub mod rundir;
pub mod suggest;
