//! Everything about a sipt experiment that needs no tensors: the experiment file (schema,
//! layering, validation), the plugin registry, sweeps and their executors, run directories,
//! metrics and tracking, progress, the seeded random streams and the tournaments that turn
//! pairwise judgments into scores. It builds and tests without libtorch; the engine
//! (sipt-core) builds on it.

pub mod config;
pub mod metrics;
pub mod paths;
pub mod plugins;
pub mod progress;
pub mod registry;
pub mod rng;
pub mod rundir;
pub mod suggest;
pub mod sweep;
pub mod tensorboard;
pub mod tournament;
pub mod tracking;
