//! What operators see of the pool's work: running [`counters`], the [`metrics`] built from them and
//! the keys, the [`recent_calls`] kept in memory, and the [`usage_stats`] computed from calls.
//! Plain Rust, updated under the pool's lock without allocation.

pub mod counters;
pub mod metrics;
pub mod recent_calls;
pub mod usage_stats;
