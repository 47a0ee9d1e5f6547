//! The one layer that speaks N-API: the `KeyManager` class and its options, the fast path and the
//! result slots it writes into.

// Left out of `cargo test` builds: a test binary that links napi's symbols fails to link on Linux
// (napi-rs #2871). The result slots are plain Rust and tested.
#[cfg(not(test))]
mod bindings;
#[cfg(not(test))]
mod fast_path;
pub mod results;
