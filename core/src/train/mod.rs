//! Training building blocks shared by every loop: the optimizer and schedule, checkpoints.

pub mod checkpoint;
pub mod optim;
