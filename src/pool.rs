//! The key pool: every key's state behind one short lock, and the operations of the old service's
//! API applied to it atomically. Nothing here allocates on the selection and usage paths, blocks on
//! I/O, or prints while the lock is held.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::clock::{Clock, Millis};
use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::health::{self, HealthChange};
use crate::key::{KeyFigures, KeyState, KeyStatus, RateLimitInfo};
use crate::log::Log;
use crate::mask::{mask_key, scrub};
use crate::quota::{LimitType, Quota};
use crate::selection::{Rotation, Selection, SelectionCache};

/// Largest token count one call may report: far above any model's context, and exact in a JS number.
pub const MAX_TOKENS_PER_CALL: u64 = u32::MAX as u64;

/// What a call did, as reported to `record_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
  Success,
  Failure(&'a str),
}

/// A selection together with the chosen key's figures, read under the same lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Picked<T> {
  pub pick: T,
  pub figures: KeyFigures,
}

struct PoolState {
  keys: Vec<KeyState>,
  cache: SelectionCache,
  last_rotation: Millis,
  closed: bool,
}

pub struct KeyPool {
  state: Mutex<PoolState>,
  /// The keys in configuration order, and key text to position: fixed at construction, so they
  /// are read without the lock.
  names: Vec<String>,
  index: HashMap<String, usize>,
  quota: Quota,
  clock: Arc<dyn Clock>,
  log: Arc<dyn Log>,
}

/// Checks a token count given as a JS number: a non-negative integer no larger than
/// [`MAX_TOKENS_PER_CALL`].
pub fn validate_tokens(tokens: f64) -> Result<u64, PoolError> {
  if tokens.is_finite()
    && tokens >= 0.0
    && tokens.fract() == 0.0
    && tokens <= MAX_TOKENS_PER_CALL as f64
  {
    Ok(tokens as u64)
  } else {
    Err(PoolError::InvalidTokens {
      got: tokens.to_string(),
      max: MAX_TOKENS_PER_CALL,
    })
  }
}

impl KeyPool {
  pub fn new(
    config: PoolConfig,
    clock: Arc<dyn Clock>,
    log: Arc<dyn Log>,
  ) -> Result<Self, PoolError> {
    if config.keys.is_empty() {
      return Err(PoolError::NoKeysConfigured);
    }
    for warning in &config.warnings {
      log.warn(warning);
    }
    let now = clock.now_ms();
    let index = config
      .keys
      .iter()
      .enumerate()
      .map(|(i, k)| (k.clone(), i))
      .collect();
    let keys = config
      .keys
      .iter()
      .map(|k| KeyState::new(k.clone(), config.quota, now))
      .collect();
    Ok(Self {
      state: Mutex::new(PoolState {
        keys,
        cache: SelectionCache::default(),
        last_rotation: now,
        closed: false,
      }),
      names: config.keys,
      index,
      quota: config.quota,
      clock,
      log,
    })
  }

  pub fn len(&self) -> usize {
    self.index.len()
  }

  pub fn is_empty(&self) -> bool {
    self.index.is_empty()
  }

  pub fn quota(&self) -> Quota {
    self.quota
  }

  pub fn now(&self) -> Millis {
    self.clock.now_ms()
  }

  /// The keys in configuration order (position = the index every other call takes).
  pub fn keys(&self) -> &[String] {
    &self.names
  }

  pub fn key_name(&self, index: usize) -> Option<&str> {
    self.names.get(index).map(String::as_str)
  }

  pub fn index_of(&self, key: &str) -> Result<usize, PoolError> {
    self.index.get(key).copied().ok_or(PoolError::KeyNotFound)
  }

  /// Runs `f` on the state under the lock, after refusing calls on a closed pool and checking `index`.
  fn with_key<T>(
    &self,
    index: usize,
    f: impl FnOnce(&mut PoolState, Millis) -> T,
  ) -> Result<T, PoolError> {
    let now = self.clock.now_ms();
    let mut state = self.state.lock();
    if state.closed {
      return Err(PoolError::Closed);
    }
    if index >= state.keys.len() {
      return Err(PoolError::KeyNotFound);
    }
    Ok(f(&mut state, now))
  }

  fn with_state<T>(&self, f: impl FnOnce(&mut PoolState, Millis) -> T) -> Result<T, PoolError> {
    let now = self.clock.now_ms();
    let mut state = self.state.lock();
    if state.closed {
      return Err(PoolError::Closed);
    }
    Ok(f(&mut state, now))
  }

  /// `getBestAvailableKey`: the next available key round-robin from the score-sorted cache.
  pub fn best(&self) -> Result<Picked<Selection>, PoolError> {
    self
      .with_state(|state, now| {
        let pick = state.cache.next(&state.keys, now)?;
        let key = &mut state.keys[pick.index];
        key.last_used = now;
        Some(Picked {
          pick,
          figures: key.figures(now),
        })
      })?
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `getNextKeyForRotation`: moves off a key under the rotation threshold, or behaves as [`Self::best`].
  pub fn rotate(&self) -> Result<Picked<Rotation>, PoolError> {
    self
      .with_state(|state, now| {
        let pick = state.cache.rotation(&state.keys, now)?;
        state.last_rotation = now;
        let key = &mut state.keys[pick.selection.index];
        key.last_used = now;
        Some(Picked {
          pick,
          figures: key.figures(now),
        })
      })?
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `recordUsage`: a success counts the request and its tokens and clears the error streak; a
  /// failure extends the streak, and the fifth in a row deactivates the key. Error messages are
  /// stored with every key in them masked (scrubbed before the lock is taken).
  pub fn record_usage(
    &self,
    index: usize,
    tokens: u64,
    outcome: Outcome<'_>,
  ) -> Result<KeyFigures, PoolError> {
    let scrubbed = match outcome {
      Outcome::Failure(error) => Some(scrub(error, &self.names)),
      Outcome::Success => None,
    };
    let (figures, change) = self.with_key(index, |state, now| {
      let key = &mut state.keys[index];
      let change = match outcome {
        Outcome::Success => {
          key.rpm.add(now, 1);
          key.rpd.add(now, 1);
          key.tpm.add(now, tokens);
          health::record_success(key);
          HealthChange::Unchanged
        }
        Outcome::Failure(_) => {
          health::record_failure(key, scrubbed.as_deref().unwrap_or_default(), now)
        }
      };
      let figures = key.figures(now);
      if change != HealthChange::Unchanged {
        state.cache.invalidate();
      }
      (figures, change)
    })?;
    if let HealthChange::Deactivated { consecutive_errors } = change {
      self.log.warn(&format!(
        "⚠️ API key deactivated due to {consecutive_errors} consecutive errors"
      ));
    }
    Ok(figures)
  }

  /// `handleRateLimit`: the upstream said this window is used up. It is marked full, the error is
  /// counted as the old service did, and the cache is dropped.
  pub fn handle_rate_limit(
    &self,
    index: usize,
    limit_type: LimitType,
  ) -> Result<KeyFigures, PoolError> {
    let (figures, change, masked) = self.with_key(index, |state, now| {
      let key = &mut state.keys[index];
      key.window_mut(limit_type).fill(now);
      let change = health::record_failure(
        key,
        &format!("Rate limit exceeded ({})", limit_type.as_str()),
        now,
      );
      state.cache.invalidate();
      (
        state.keys[index].figures(now),
        change,
        mask_key(&state.keys[index].key),
      )
    })?;
    self.log.warn(&format!(
      "⚠️ Rate limit hit for {} on API key {masked}",
      limit_type.as_str()
    ));
    if let HealthChange::Deactivated { consecutive_errors } = change {
      self.log.warn(&format!(
        "⚠️ API key deactivated due to {consecutive_errors} consecutive errors"
      ));
    }
    Ok(figures)
  }

  pub fn reactivate(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_key(index, |state, now| {
      health::reactivate(&mut state.keys[index]);
      state.cache.invalidate();
      state.keys[index].figures(now)
    })
  }

  pub fn reset_all_limits(&self) -> Result<(), PoolError> {
    self.with_state(|state, now| {
      for key in &mut state.keys {
        key.restart_windows(now);
      }
      state.cache.invalidate();
    })
  }

  /// Rebuilds the selection cache now; returns how many keys are available.
  pub fn refresh_cache(&self) -> Result<usize, PoolError> {
    let available = self.with_state(|state, now| state.cache.rebuild(&state.keys, now))?;
    self.log.info("✅ Cache refreshed successfully");
    Ok(available)
  }

  pub fn figures(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_key(index, |state, now| state.keys[index].figures(now))
  }

  pub fn last_error(&self, index: usize) -> Result<Option<String>, PoolError> {
    self.with_key(index, |state, _| state.keys[index].last_error.clone())
  }

  pub fn status(&self, index: usize) -> Result<KeyStatus, PoolError> {
    self.with_key(index, |state, now| state.keys[index].status(now))
  }

  pub fn statuses(&self) -> Result<Vec<KeyStatus>, PoolError> {
    self.with_state(|state, now| state.keys.iter().map(|k| k.status(now)).collect())
  }

  pub fn rate_limit_info(&self, index: usize) -> Result<[RateLimitInfo; 3], PoolError> {
    self.with_key(index, |state, now| state.keys[index].rate_limit_info(now))
  }

  /// The round-robin position and when a key was last handed out by rotation: the rest of the
  /// SPEC's `ApiKeyManager`.
  pub fn rotation_state(&self) -> Result<(usize, Millis), PoolError> {
    self.with_state(|state, _| (state.cache.cursor(), state.last_rotation))
  }

  /// Refuses every later call. Idempotent.
  pub fn close(&self) {
    self.state.lock().closed = true;
  }

  pub fn is_closed(&self) -> bool {
    self.state.lock().closed
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::clock::FakeClock;
  use crate::log::CapturedLog;
  use crate::selection::{RotationReason, SelectionMethod, CACHE_TTL_MS};
  use crate::window::{DAY_MS, MINUTE_MS};

  const T0: Millis = 1_700_000_000_000;

  fn pool_with(keys: &[&str], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
    let clock = FakeClock::at(T0);
    let log = Arc::new(CapturedLog::default());
    let config = PoolConfig {
      keys: keys.iter().map(|k| k.to_string()).collect(),
      quota,
      warnings: vec![],
    };
    let pool = KeyPool::new(config, Arc::new(clock.clone()), log.clone()).unwrap();
    (pool, clock, log)
  }

  fn pool(n: usize) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
    let names: Vec<String> = (0..n)
      .map(|i| format!("AIzaSyTESTKEY{i:04}abcdefghijkl"))
      .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    pool_with(&refs, Quota::default())
  }

  #[test]
  fn best_marks_last_used_and_reports_method_and_score() {
    let (p, clock, _) = pool(2);
    clock.advance(10);
    let a = p.best().unwrap();
    assert_eq!(a.pick.method, SelectionMethod::RoundRobin);
    assert_eq!(a.pick.total_available, 2);
    assert_eq!(a.figures.last_used, T0 + 10);
    assert_eq!(a.pick.score, 1.0);
    let b = p.best().unwrap();
    assert_eq!(b.pick.method, SelectionMethod::CachedRoundRobin);
    assert_ne!(a.pick.index, b.pick.index);
  }

  #[test]
  fn success_counts_requests_and_tokens_until_the_minute_window_resets() {
    let (p, clock, _) = pool(1);
    for _ in 0..3 {
      p.record_usage(0, 100, Outcome::Success).unwrap();
    }
    let f = p.figures(0).unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (3, 3, 300));
    clock.advance(MINUTE_MS);
    let f = p.figures(0).unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (0, 3, 0));
    clock.advance(DAY_MS);
    assert_eq!(p.figures(0).unwrap().rpd.current, 0);
  }

  #[test]
  fn a_key_at_its_rpm_limit_is_not_handed_out_until_its_window_resets() {
    let (p, clock, _) = pool_with(
      &["only-key-0123456789"],
      Quota {
        rpm: 2,
        rpd: 100,
        tpm: 1000,
      },
    );
    p.record_usage(0, 1, Outcome::Success).unwrap();
    p.record_usage(0, 1, Outcome::Success).unwrap();
    assert_eq!(p.best().unwrap_err(), PoolError::NoActiveKeys);
    clock.advance(MINUTE_MS + CACHE_TTL_MS);
    assert_eq!(p.best().unwrap().pick.index, 0);
  }

  #[test]
  fn five_failures_deactivate_drop_the_cache_and_log() {
    let (p, _, log) = pool(2);
    p.best().unwrap();
    for i in 0..5 {
      let f = p
        .record_usage(0, 0, Outcome::Failure("503 unavailable"))
        .unwrap();
      assert_eq!(f.error_count, i + 1);
    }
    assert!(!p.figures(0).unwrap().active);
    assert_eq!(p.last_error(0).unwrap().as_deref(), Some("503 unavailable"));
    for _ in 0..4 {
      assert_eq!(p.best().unwrap().pick.index, 1);
    }
    assert!(log
      .0
      .lock()
      .contains(&"⚠️ API key deactivated due to 5 consecutive errors".to_string()));
    p.reactivate(0).unwrap();
    let f = p.figures(0).unwrap();
    assert!(f.active);
    assert_eq!(f.error_count, 0);
  }

  #[test]
  fn recorded_errors_never_hold_a_full_key() {
    let (p, _, _) = pool(2);
    let quoted = format!("403 on ?key={}", p.keys()[1]);
    p.record_usage(0, 0, Outcome::Failure(&quoted)).unwrap();
    assert_eq!(
      p.last_error(0).unwrap().as_deref(),
      Some("403 on ?key=AIzaSyTE...ijkl")
    );
  }

  #[test]
  fn rate_limit_fills_the_window_counts_an_error_and_logs_masked() {
    let (p, _, log) = pool(2);
    p.handle_rate_limit(0, LimitType::Rpm).unwrap();
    let info = p.rate_limit_info(0).unwrap();
    assert!(info[0].is_limited && info[0].current == 30);
    assert_eq!(p.figures(0).unwrap().error_count, 1);
    assert_eq!(p.best().unwrap().pick.index, 1);
    let lines = log.0.lock();
    assert_eq!(
      lines[0],
      "⚠️ Rate limit hit for RPM on API key AIzaSyTE...ijkl"
    );
    assert!(!lines[0].contains("AIzaSyTESTKEY0000"));
  }

  #[test]
  fn reset_all_limits_gives_fresh_windows() {
    let (p, clock, _) = pool(1);
    p.handle_rate_limit(0, LimitType::Rpd).unwrap();
    clock.advance(5);
    p.reset_all_limits().unwrap();
    let f = p.figures(0).unwrap();
    assert_eq!(f.rpd.current, 0);
    assert_eq!(f.rpm.reset_time, T0 + 5 + MINUTE_MS);
  }

  #[test]
  fn rotate_reports_proactive_rotation() {
    let (p, _, _) = pool_with(
      &["weak-key-0123456789", "strong-key-0123456789"],
      Quota {
        rpm: 10,
        rpd: 10,
        tpm: 1000,
      },
    );
    for _ in 0..9 {
      p.record_usage(0, 0, Outcome::Success).unwrap();
    }
    let r = p.rotate().unwrap();
    assert_eq!(r.pick.reason, RotationReason::Proactive);
    assert_eq!(r.pick.selection.index, 1);
    assert!(r.pick.previous_key_score.unwrap() < 0.3);
  }

  #[test]
  fn unknown_keys_and_closed_pools_are_errors() {
    let (p, _, _) = pool(1);
    assert_eq!(p.index_of("nope"), Err(PoolError::KeyNotFound));
    assert_eq!(p.figures(7).unwrap_err(), PoolError::KeyNotFound);
    p.close();
    p.close();
    assert_eq!(p.best().unwrap_err(), PoolError::Closed);
    assert_eq!(
      p.record_usage(0, 1, Outcome::Success).unwrap_err(),
      PoolError::Closed
    );
  }

  #[test]
  fn token_counts_must_be_whole_non_negative_and_bounded() {
    assert_eq!(validate_tokens(0.0), Ok(0));
    assert_eq!(validate_tokens(1234.0), Ok(1234));
    for bad in [-1.0, 0.5, f64::NAN, f64::INFINITY, 1e12] {
      assert!(
        matches!(validate_tokens(bad), Err(PoolError::InvalidTokens { .. })),
        "{bad}"
      );
    }
  }

  #[test]
  fn rotation_state_follows_the_round_robin_and_rotations() {
    let (p, clock, _) = pool(3);
    p.best().unwrap();
    assert_eq!(p.rotation_state().unwrap(), (1, T0));
    clock.advance(7);
    p.rotate().unwrap();
    assert_eq!(p.rotation_state().unwrap().1, T0 + 7);
    assert_eq!(p.statuses().unwrap().len(), 3);
  }
}
