//! The one pool fixture every test module builds on: a pool of given keys and limits on a fake
//! clock, with its log captured.

use std::sync::Arc;

use super::KeyPool;
use crate::core::clock::{FakeClock, Millis, SystemClock};
use crate::core::config::PoolConfig;
use crate::core::quota::Quota;
use crate::log::CapturedLog;

/// The fake clock's start: 2023-11-14T22:13:20Z.
pub const T0: Millis = 1_700_000_000_000;
/// Its ISO form, as JSON replies show it.
pub const T0_ISO: &str = "2023-11-14T22:13:20.000Z";

/// A pool under test, its clock and its log.
pub struct TestPool {
  pub pool: KeyPool,
  pub clock: FakeClock,
  pub log: Arc<CapturedLog>,
}

impl TestPool {
  /// `keys` under `quota`, on a fake clock at [`T0`].
  pub fn new(keys: &[&str], quota: Quota) -> Self {
    Self::of_config(PoolConfig::of(
      keys.iter().map(|k| k.to_string()).collect(),
      quota,
    ))
  }

  /// A pool built from a whole configuration, on a fake clock at [`T0`].
  pub fn of_config(config: PoolConfig) -> Self {
    Self::on_clock(config, FakeClock::at(T0))
  }

  /// A pool built from `config` on `clock`, which other pools may share: processes on one host.
  pub fn on_clock(config: PoolConfig, clock: FakeClock) -> Self {
    let log = Arc::new(CapturedLog::default());
    let pool =
      KeyPool::new(config, Arc::new(clock.clone()), log.clone()).expect("a valid test pool");
    Self { pool, clock, log }
  }

  /// The pool alone, shared, as servers and tasks take it.
  pub fn shared(self) -> Arc<KeyPool> {
    Arc::new(self.pool)
  }
}

/// `n` distinct keys that start as Gemini's do.
pub fn test_keys(n: usize) -> Vec<String> {
  (0..n)
    .map(|i| format!("AIzaSyTESTKEY{i:04}abcdefghijkl"))
    .collect()
}

/// A pool built from `config` on the system clock, shared, and its captured log: for tests that
/// run the real tasks or wait in real time (their timers are the runtime's, which a fake clock
/// does not move).
pub fn on_system_clock(config: PoolConfig) -> (Arc<KeyPool>, Arc<CapturedLog>) {
  let log = Arc::new(CapturedLog::default());
  let pool = KeyPool::new(config, Arc::new(SystemClock), log.clone()).expect("a valid test pool");
  (Arc::new(pool), log)
}
