//! One API key's state: its three windows and its health, and the read-only views of it that
//! callers get (figures for the hot path, a full status for listings).

use crate::clock::Millis;
use crate::quota::{LimitType, Quota};
use crate::window::{Window, DAY_MS, MINUTE_MS};

#[derive(Debug, Clone)]
pub struct KeyState {
  pub key: String,
  pub active: bool,
  pub last_used: Millis,
  pub rpm: Window,
  pub rpd: Window,
  pub tpm: Window,
  pub error_count: u32,
  pub last_error: Option<String>,
  pub last_error_time: Option<Millis>,
  /// Bumped whenever `last_error` changes, so a reader can tell a new error from the old one
  /// without copying the message out on every call.
  pub error_seq: u32,
}

/// One window as callers see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitFigures {
  pub current: u64,
  pub limit: u64,
  pub reset_time: Millis,
}

/// Everything about a key but its name and error message: `Copy`, so the hot path can hand it out
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyFigures {
  pub active: bool,
  pub last_used: Millis,
  pub rpm: LimitFigures,
  pub rpd: LimitFigures,
  pub tpm: LimitFigures,
  pub error_count: u32,
  pub last_error_time: Option<Millis>,
  pub error_seq: u32,
}

/// A key's full status (the SPEC's `ApiKeyStatus`), key unmasked: mask it before it leaves the process.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
  pub api_key: String,
  pub figures: KeyFigures,
  pub last_error: Option<String>,
}

/// The SPEC's `RateLimitInfo`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitInfo {
  pub limit_type: LimitType,
  pub current: u64,
  pub limit: u64,
  pub reset_time: Millis,
  pub is_limited: bool,
}

impl KeyState {
  pub fn new(key: String, quota: Quota, now: Millis) -> Self {
    Self {
      key,
      active: true,
      last_used: now,
      rpm: Window::new(quota.rpm, MINUTE_MS, now),
      rpd: Window::new(quota.rpd, DAY_MS, now),
      tpm: Window::new(quota.tpm, MINUTE_MS, now),
      error_count: 0,
      last_error: None,
      last_error_time: None,
      error_seq: 0,
    }
  }

  pub fn window(&self, limit_type: LimitType) -> &Window {
    match limit_type {
      LimitType::Rpm => &self.rpm,
      LimitType::Rpd => &self.rpd,
      LimitType::Tpm => &self.tpm,
    }
  }

  pub fn window_mut(&mut self, limit_type: LimitType) -> &mut Window {
    match limit_type {
      LimitType::Rpm => &mut self.rpm,
      LimitType::Rpd => &mut self.rpd,
      LimitType::Tpm => &mut self.tpm,
    }
  }

  pub fn restart_windows(&mut self, now: Millis) {
    for t in LimitType::ALL {
      self.window_mut(t).restart(now);
    }
  }

  fn limit_figures(&self, limit_type: LimitType, now: Millis) -> LimitFigures {
    let w = self.window(limit_type);
    LimitFigures {
      current: w.current(now),
      limit: w.limit(),
      reset_time: w.reset_time(now),
    }
  }

  pub fn figures(&self, now: Millis) -> KeyFigures {
    KeyFigures {
      active: self.active,
      last_used: self.last_used,
      rpm: self.limit_figures(LimitType::Rpm, now),
      rpd: self.limit_figures(LimitType::Rpd, now),
      tpm: self.limit_figures(LimitType::Tpm, now),
      error_count: self.error_count,
      last_error_time: self.last_error_time,
      error_seq: self.error_seq,
    }
  }

  pub fn status(&self, now: Millis) -> KeyStatus {
    KeyStatus {
      api_key: self.key.clone(),
      figures: self.figures(now),
      last_error: self.last_error.clone(),
    }
  }

  pub fn rate_limit_info(&self, now: Millis) -> [RateLimitInfo; 3] {
    LimitType::ALL.map(|t| {
      let w = self.window(t);
      RateLimitInfo {
        limit_type: t,
        current: w.current(now),
        limit: w.limit(),
        reset_time: w.reset_time(now),
        is_limited: w.is_full(now),
      }
    })
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn a_new_key_is_active_with_empty_windows() {
    let k = KeyState::new("k".into(), Quota::default(), 1_000);
    let f = k.figures(1_000);
    assert!(f.active);
    assert_eq!(
      f.rpm,
      LimitFigures {
        current: 0,
        limit: 30,
        reset_time: 61_000
      }
    );
    assert_eq!(f.rpd.reset_time, 1_000 + DAY_MS);
    assert_eq!(f.tpm.limit, 1_000_000);
    assert_eq!(f.error_count, 0);
    assert_eq!(f.last_error_time, None);
  }

  #[test]
  fn rate_limit_info_flags_full_windows() {
    let mut k = KeyState::new("k".into(), Quota::default(), 0);
    k.rpm.fill(0);
    let info = k.rate_limit_info(1);
    assert_eq!(info[0].limit_type, LimitType::Rpm);
    assert!(info[0].is_limited);
    assert!(!info[1].is_limited && !info[2].is_limited);
    assert!(!k.rate_limit_info(MINUTE_MS)[0].is_limited);
  }
}
