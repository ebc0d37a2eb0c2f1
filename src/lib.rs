//! kiln: a self-hosted fine-tuning server with an OpenAI-compatible API.
//!
//! The map is in DESIGN.md: `api/` (HTTP) talks to `store/` (all SQL) and `artifacts/`
//! (blobs); `data/` is a pure library that parses and validates datasets.

pub mod api;
pub mod artifacts;
pub mod cli;
pub mod data;
pub mod datasets;
pub mod device;
pub mod embedded_pg;
pub mod models;
pub mod nn;
pub mod queue;
pub mod serve;
pub mod server;
pub mod store;
pub mod train;
pub mod webhooks;
pub mod worker;
