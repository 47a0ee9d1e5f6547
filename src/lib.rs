//! gemini-key-manager: a pool of Gemini API keys, selected, metered and healed in Rust, for Node.
//!
//! The layers, from the inside out:
//! - [`core`]: clock, calendar, quotas, windows, models, budgets, keys, health, failures,
//!   selection, configuration and the [`core::pool::KeyPool`] that holds them, with its state as
//!   stored and its queue of recorded calls. Plain Rust, no I/O.
//! - [`stats`]: counters, metrics, recent calls and usage statistics, kept beside the pool.
//! - [`sharing`]: one quota across processes, the share a process holds and the task leasing it.
//! - [`persistence`]: the write-behind task that takes the pool's changes and recorded calls to
//!   the store, and the spill files for what the store did not take.
//! - [`store`]: MongoDB (or memory): documents, key naming, leases, usage queries.
//! - [`routing`]: Gemini requests sent on the pool's keys, waiting for one when all are resting.
//! - [`http`]: the operators' API, the dashboard and the Gemini proxy.
//! - `napi`: the one layer that speaks N-API, the `KeyManager` class Node sees.
//!
//! Beside them, the edge rules every layer shares: [`log`] (the one writer of log lines) and
//! [`mask`] (how a key is shown).

pub mod core;
pub mod http;
pub mod log;
pub mod mask;
#[cfg(feature = "node")]
pub mod napi;
pub mod persistence;
pub mod routing;
pub mod sharing;
pub mod stats;
pub mod store;
