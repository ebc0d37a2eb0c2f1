//! The training engine: a pure library (no HTTP, no SQL, no tokio). A run takes a spec, data
//! and base weights, and gives metrics, checkpoints and an exported model. Progress leaves
//! through a callback; cancellation arrives through a flag checked every step.

pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod spec;
