//! The one layer that speaks N-API: the `NativeKeyPool` class Node sees, one file per concern.
//! - `key_pool`: the class, built from JS options; its hot path and its calls about keys.
//! - `options`: JS options into configuration, and the one read of the process environment.
//! - `errors`: how errors cross into JS.
//! - `metrics`: the metrics as objects.
//! - `store`: `attachStore` and the MongoDB writer's figures.
//! - `server`: `serve`, the HTTP API and the Gemini proxy.
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
