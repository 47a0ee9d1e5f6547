//! gemini-key-manager: a pool of Gemini API keys, selected, metered and healed in Rust, for Node.
//!
//! The core (`clock`, `calendar`, `quota`, `window`, `key`, `failure`, `health`, `selection`,
//! `pool`, `config`) is plain Rust with no napi types; `http` is the HTTP API; `store` keeps state in
//! MongoDB and shares quota across processes; `persistence` writes the pool's changes (changed keys,
//! and the calls `usage_log` queues) to it behind the hot path, with keys named by their
//! `fingerprint`; `counters` and `metrics`, `call_log` and `usage_stats` are what operators see;
//! `bindings` (with `fast_path` for the hot path) is the one layer that speaks N-API.

pub mod budget;
pub mod calendar;
pub mod call_log;
pub mod clock;
pub mod config;
pub mod counters;
pub mod error;
pub mod failure;
pub mod fingerprint;
pub mod health;
pub mod http;
pub mod key;
pub mod leasing;
pub mod log;
pub mod mask;
pub mod metrics;
pub mod models;
pub mod persistence;
pub mod pool;
pub mod quota;
pub mod results;
pub mod roster;
pub mod routing;
pub mod selection;
pub mod share;
pub mod spill;
pub mod store;
pub mod usage_log;
pub mod usage_stats;
pub mod window;

// The N-API layer, left out of `cargo test` builds: a test binary that links napi's symbols fails
// to link on Linux (napi-rs #2871).
#[cfg(not(test))]
mod bindings;
#[cfg(not(test))]
mod fast_path;
