//! The core: keys, their windows and health, how one is chosen, and the pool that holds them.
//! Plain Rust and pure functions of the time an injected [`clock::Clock`] gives: no napi, no
//! MongoDB, no hyper, no tokio, so every rule is unit-tested with a fake clock.

pub mod budget;
pub mod calendar;
pub mod clock;
pub mod config;
pub mod error;
pub mod failure;
pub mod health;
pub mod key;
pub mod models;
pub mod pool;
pub mod quota;
pub mod roster;
pub mod selection;
pub mod snapshot;
pub mod usage_queue;
pub mod wake;
pub mod window;
