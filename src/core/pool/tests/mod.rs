//! The pool's tests, by the file they test, on the shared fixture (`testing`); here the helpers
//! they share and the tests of the pool's lock.

mod hand_out;
mod leases;
mod operators;
mod projects_and_models;
mod report;
mod routed;
mod snapshots;
mod statistics;
mod status;

use super::*;
use crate::core::clock::{FakeClock, MINUTE_MS};
use crate::core::health::{HealthState, FIRST_BACKOFF_MS};
use crate::core::pool::testing::{test_keys, TestPool, T0};
use crate::core::quota::{LimitType, Quota};
use crate::core::selection::{RotationReason, SelectionMethod, CACHE_TTL_MS};
use crate::log::CapturedLog;

const RESERVE: Claim = Claim::Reserve {
  estimated_tokens: 0,
};

fn pool_with(keys: &[&str], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  from_config(PoolConfig::of(
    keys.iter().map(|k| k.to_string()).collect(),
    quota,
  ))
}

fn from_config(config: PoolConfig) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  let TestPool { pool, clock, log } = TestPool::of_config(config);
  (pool, clock, log)
}

/// A pool whose key `i` is in project `projects[i]` (its own when `None`).
fn in_projects(projects: &[Option<&str>], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  let mut config = PoolConfig::of(test_keys(projects.len()), quota);
  for (spec, project) in config.keys.iter_mut().zip(projects) {
    spec.project = project.map(str::to_owned);
  }
  from_config(config)
}

const TWO_A_MINUTE: Quota = Quota {
  rpm: 2,
  rpd: 100,
  tpm: 1_000_000,
};

fn handed(p: &KeyPool, model: ModelId) -> Result<usize, PoolError> {
  p.best(RESERVE, model).map(|picked| picked.pick.index)
}

fn pool(n: usize) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  small(n, Quota::default())
}

fn small(n: usize, quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  from_config(PoolConfig::of(test_keys(n), quota))
}

fn logged(log: &CapturedLog) -> Vec<String> {
  log.0.lock().clone()
}

#[test]
fn unknown_keys_and_closed_pools_are_errors() {
  let (p, _, _) = pool(1);
  assert_eq!(p.index_of("nope"), Err(PoolError::KeyNotFound));
  assert_eq!(p.figures(7).unwrap_err(), PoolError::KeyNotFound);
  p.close();
  p.close();
  assert_eq!(p.best(RESERVE, 0).unwrap_err(), PoolError::Closed);
  assert_eq!(
    p.record_usage(0, 1, Outcome::Success, 0.0, None)
      .unwrap_err(),
    PoolError::Closed
  );
}
