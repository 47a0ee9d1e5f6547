//! How failures change a key: consecutive errors are counted, and the fifth in a row deactivates the
//! key until it is reactivated (the old service's rule, kept for its callers).

use crate::clock::Millis;
use crate::key::KeyState;

pub const MAX_CONSECUTIVE_ERRORS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
  Unchanged,
  Deactivated { consecutive_errors: u32 },
}

pub fn record_success(key: &mut KeyState) {
  key.error_count = 0;
  if key.last_error.take().is_some() {
    key.error_seq = key.error_seq.wrapping_add(1);
  }
}

pub fn record_failure(key: &mut KeyState, error: &str, now: Millis) -> HealthChange {
  key.error_count = key.error_count.saturating_add(1);
  key.last_error = Some(error.to_owned());
  key.last_error_time = Some(now);
  key.error_seq = key.error_seq.wrapping_add(1);
  if key.active && key.error_count >= MAX_CONSECUTIVE_ERRORS {
    key.active = false;
    return HealthChange::Deactivated {
      consecutive_errors: key.error_count,
    };
  }
  HealthChange::Unchanged
}

pub fn reactivate(key: &mut KeyState) {
  key.active = true;
  key.error_count = 0;
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::quota::Quota;

  fn key() -> KeyState {
    KeyState::new("k".into(), Quota::default(), 0)
  }

  #[test]
  fn fifth_consecutive_error_deactivates_once() {
    let mut k = key();
    for _ in 0..4 {
      assert_eq!(record_failure(&mut k, "boom", 7), HealthChange::Unchanged);
    }
    assert_eq!(
      record_failure(&mut k, "boom", 8),
      HealthChange::Deactivated {
        consecutive_errors: 5
      }
    );
    assert!(!k.active);
    assert_eq!(record_failure(&mut k, "boom", 9), HealthChange::Unchanged);
    assert_eq!(k.last_error_time, Some(9));
  }

  #[test]
  fn success_resets_the_streak_and_clears_the_error() {
    let mut k = key();
    for _ in 0..4 {
      record_failure(&mut k, "boom", 1);
    }
    let seq = k.error_seq;
    record_success(&mut k);
    assert_eq!(k.error_count, 0);
    assert_eq!(k.last_error, None);
    assert_ne!(k.error_seq, seq);
    assert_eq!(record_failure(&mut k, "again", 2), HealthChange::Unchanged);
  }

  #[test]
  fn reactivate_restores_a_deactivated_key() {
    let mut k = key();
    for _ in 0..5 {
      record_failure(&mut k, "boom", 1);
    }
    reactivate(&mut k);
    assert!(k.active);
    assert_eq!(k.error_count, 0);
  }
}
