//! The one layer that speaks N-API: the `NativeKeyPool` class Node sees, one file per concern.
//! - `key_pool`: the class, built from the manager's options; its hot path and its calls about keys.
//! - `options`: the JS options, checked and resolved into configuration; the one read of the
//!   process environment.
//! - `values`: JS values read once, checked, and quoted in messages (masked when they could be keys).
//! - `errors`: the one mapping of errors into JS, with the status that says whose fault it was.
//! - `log`: the one writer of log lines, through one JS function.
//! - `metrics`: the metrics as objects.
//! - `usage_stats`: the usage statistics as objects.
//! - `store`: `attachStore`, its start-up lines, and the MongoDB writer's figures.
//! - `server`: `serve`, the HTTP API and the Gemini proxy, and the routing server.
//! - `routing`: the router of the app's Gemini requests, and the revalidation of refused keys.
//! - `route_table`: the HTTP API's route table for the Express adapter.
//! - `fast_path`: the hot path's functions, on the raw N-API.
//! - [`results`]: the result slots those calls write into.

// Left out of `cargo test` builds: a test binary that links napi's symbols fails to link on Linux
// (napi-rs #2871). The result slots are plain Rust and tested.
#[cfg(not(test))]
mod errors;
#[cfg(not(test))]
mod fast_path;
#[cfg(not(test))]
mod key_pool;
#[cfg(not(test))]
mod log;
#[cfg(not(test))]
mod metrics;
#[cfg(not(test))]
mod options;
pub mod results;
#[cfg(not(test))]
mod route_table;
#[cfg(not(test))]
mod routing;
#[cfg(not(test))]
mod server;
#[cfg(not(test))]
mod store;
#[cfg(not(test))]
mod usage_stats;
#[cfg(not(test))]
mod values;
