//! One counter against one limit over a span of time.
//!
//! A window resets once its `reset_at` has passed, as the old service's did (one minute for RPM and
//! TPM, one day for RPD). Every read takes `now`, so a window that has expired reads as empty
//! without anyone having to reset it first.

use crate::clock::Millis;

pub const MINUTE_MS: Millis = 60_000;
pub const DAY_MS: Millis = 86_400_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
  current: u64,
  limit: u64,
  span_ms: Millis,
  reset_at: Millis,
}

impl Window {
  pub fn new(limit: u64, span_ms: Millis, now: Millis) -> Self {
    Self {
      current: 0,
      limit,
      span_ms,
      reset_at: now + span_ms,
    }
  }

  pub fn limit(&self) -> u64 {
    self.limit
  }

  fn expired(&self, now: Millis) -> bool {
    now >= self.reset_at
  }

  /// Brings the window up to `now`: a window whose reset time has passed starts again from zero.
  fn roll(&mut self, now: Millis) {
    if self.expired(now) {
      self.current = 0;
      self.reset_at = now + self.span_ms;
    }
  }

  pub fn current(&self, now: Millis) -> u64 {
    if self.expired(now) {
      0
    } else {
      self.current
    }
  }

  /// When the count next drops to zero.
  pub fn reset_time(&self, now: Millis) -> Millis {
    if self.expired(now) {
      now + self.span_ms
    } else {
      self.reset_at
    }
  }

  pub fn is_full(&self, now: Millis) -> bool {
    self.current(now) >= self.limit
  }

  /// `max(0, limit - current) / limit`, the remaining share that the availability score weighs.
  pub fn remaining_fraction(&self, now: Millis) -> f64 {
    if self.limit == 0 {
      return 0.0;
    }
    self.limit.saturating_sub(self.current(now)) as f64 / self.limit as f64
  }

  pub fn add(&mut self, now: Millis, amount: u64) {
    self.roll(now);
    self.current = self.current.saturating_add(amount);
  }

  /// Marks the window as used up until it resets: what a 429 for this window tells us.
  pub fn fill(&mut self, now: Millis) {
    self.roll(now);
    self.current = self.current.max(self.limit);
  }

  /// A fresh window starting now.
  pub fn restart(&mut self, now: Millis) {
    self.current = 0;
    self.reset_at = now + self.span_ms;
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn counts_until_the_reset_time_then_reads_empty() {
    let mut w = Window::new(3, MINUTE_MS, 0);
    w.add(10, 1);
    w.add(20, 2);
    assert_eq!(w.current(59_999), 3);
    assert!(w.is_full(59_999));
    assert_eq!(w.reset_time(59_999), MINUTE_MS);
    assert_eq!(w.current(MINUTE_MS), 0);
    assert!(!w.is_full(MINUTE_MS));
  }

  #[test]
  fn adding_after_expiry_starts_a_new_window_at_that_moment() {
    let mut w = Window::new(10, MINUTE_MS, 0);
    w.add(0, 5);
    w.add(90_000, 1);
    assert_eq!(w.current(90_000), 1);
    assert_eq!(w.reset_time(90_000), 150_000);
  }

  #[test]
  fn remaining_fraction_never_goes_negative() {
    let mut w = Window::new(4, DAY_MS, 0);
    w.add(0, 1);
    assert_eq!(w.remaining_fraction(0), 0.75);
    w.add(0, 10);
    assert_eq!(w.remaining_fraction(0), 0.0);
    assert_eq!(Window::new(0, DAY_MS, 0).remaining_fraction(0), 0.0);
  }

  #[test]
  fn fill_uses_the_window_up_and_restart_clears_it() {
    let mut w = Window::new(30, MINUTE_MS, 0);
    w.add(0, 2);
    w.fill(1_000);
    assert_eq!(w.current(1_000), 30);
    w.restart(2_000);
    assert_eq!(w.current(2_000), 0);
    assert_eq!(w.reset_time(2_000), 62_000);
  }
}
