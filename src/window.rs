//! One counter against one limit over time, in the two shapes Gemini uses: a rolling window (RPM
//! and TPM: whatever was used in the last minute) and a daily window (RPD: reset at a fixed time of
//! day). Every read takes `now`, so a window never needs a reset call to read right.

use crate::calendar::DailyReset;
use crate::clock::Millis;

pub const MINUTE_MS: Millis = 60_000;

/// Slices a rolling window is cut into; an amount is counted from its slice's start for the span
/// plus one slice, so it is counted for at least the full span and never less than upstream does.
const SLICES: usize = 60;
const RING: usize = SLICES + 1;

/// Amounts used in the last `span`, kept in `SLICES` slices.
#[derive(Debug, Clone, PartialEq)]
pub struct RollingWindow {
  slice_ms: Millis,
  ring: [u64; RING],
  /// Slice number (time / slice_ms) of the newest slice the ring holds.
  newest: i64,
  total: u64,
}

impl RollingWindow {
  pub fn new(span_ms: Millis, now: Millis) -> Self {
    let slice_ms = ((span_ms + SLICES as Millis - 1) / SLICES as Millis).max(1);
    Self {
      slice_ms,
      ring: [0; RING],
      newest: now.div_euclid(slice_ms),
      total: 0,
    }
  }

  fn slice(&self, t: Millis) -> i64 {
    t.div_euclid(self.slice_ms)
  }

  /// The part of `total` in slices that are no longer counted at slice `cur`.
  fn expired_part(&self, cur: i64) -> u64 {
    if cur <= self.newest {
      return 0;
    }
    if cur - self.newest >= RING as i64 {
      return self.total;
    }
    (self.newest + 1..=cur)
      .map(|s| self.ring[s.rem_euclid(RING as i64) as usize])
      .sum()
  }

  fn advance(&mut self, now: Millis) {
    let cur = self.slice(now);
    if cur <= self.newest {
      return;
    }
    if cur - self.newest >= RING as i64 {
      self.ring = [0; RING];
      self.total = 0;
    } else {
      for s in self.newest + 1..=cur {
        let at = s.rem_euclid(RING as i64) as usize;
        self.total -= self.ring[at];
        self.ring[at] = 0;
      }
    }
    self.newest = cur;
  }

  pub fn current(&self, now: Millis) -> u64 {
    self.total - self.expired_part(self.slice(now))
  }

  pub fn add(&mut self, now: Millis, amount: u64) {
    self.advance(now);
    let at = self.slice(now).max(self.newest).rem_euclid(RING as i64) as usize;
    self.ring[at] = self.ring[at].saturating_add(amount);
    self.total = self.total.saturating_add(amount);
  }

  /// Takes back up to `amount` counted at time `at`, if that is still in the window.
  pub fn remove(&mut self, now: Millis, at: Millis, amount: u64) {
    self.advance(now);
    let s = self.slice(at);
    if s > self.newest || self.newest - s >= RING as i64 {
      return;
    }
    let at = s.rem_euclid(RING as i64) as usize;
    let taken = amount.min(self.ring[at]);
    self.ring[at] -= taken;
    self.total -= taken;
  }

  /// When the oldest amount still counted leaves the window: the time capacity next frees (`now`
  /// when nothing is counted).
  pub fn frees_at(&self, now: Millis) -> Millis {
    let cur = self.slice(now);
    let oldest = cur - SLICES as i64;
    (oldest..=cur.min(self.newest))
      .find(|&s| self.newest - s < RING as i64 && self.ring[s.rem_euclid(RING as i64) as usize] > 0)
      .map_or(now, |s| (s + RING as i64) * self.slice_ms)
  }

  pub fn clear(&mut self, now: Millis) {
    self.ring = [0; RING];
    self.total = 0;
    self.newest = self.slice(now);
  }
}

/// A count since the last daily reset.
#[derive(Debug, Clone, PartialEq)]
pub struct DailyWindow {
  current: u64,
  /// When the current count started (the last reset, or creation).
  since: Millis,
  reset_at: Millis,
  policy: DailyReset,
}

impl DailyWindow {
  pub fn new(policy: DailyReset, now: Millis) -> Self {
    Self {
      current: 0,
      since: now,
      reset_at: policy.next_reset(now),
      policy,
    }
  }

  fn expired(&self, now: Millis) -> bool {
    now >= self.reset_at
  }

  fn advance(&mut self, now: Millis) {
    if self.expired(now) {
      self.current = 0;
      // Everything counted so far was added before the old reset time, so that is where the new
      // count starts as far as `remove` is concerned.
      self.since = self.reset_at;
      self.reset_at = self.policy.next_reset(now);
    }
  }

  pub fn current(&self, now: Millis) -> u64 {
    if self.expired(now) {
      0
    } else {
      self.current
    }
  }

  pub fn add(&mut self, now: Millis, amount: u64) {
    self.advance(now);
    self.current = self.current.saturating_add(amount);
  }

  /// Takes back up to `amount` counted at time `at`, if that was since the last reset.
  pub fn remove(&mut self, now: Millis, at: Millis, amount: u64) {
    self.advance(now);
    if at >= self.since {
      self.current = self.current.saturating_sub(amount);
    }
  }

  /// The next reset.
  pub fn frees_at(&self, now: Millis) -> Millis {
    if self.expired(now) {
      self.policy.next_reset(now)
    } else {
      self.reset_at
    }
  }

  pub fn clear(&mut self, now: Millis) {
    self.advance(now);
    self.current = 0;
    self.since = now;
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  const T0: Millis = 1_800_000_000_000; // a whole second

  #[test]
  fn rolling_window_counts_each_amount_for_at_least_the_span() {
    let mut w = RollingWindow::new(MINUTE_MS, T0);
    w.add(T0 + 500, 1);
    assert_eq!(w.current(T0 + 500), 1);
    // Still counted 60 s after it was added...
    assert_eq!(w.current(T0 + 500 + MINUTE_MS), 1);
    // ...and gone once its slice is more than a span old.
    assert_eq!(w.current(T0 + MINUTE_MS + 1_000), 0);
  }

  #[test]
  fn rolling_window_has_no_double_burst_at_a_minute_edge() {
    let mut w = RollingWindow::new(MINUTE_MS, T0);
    // 30 requests at the end of one minute...
    w.add(T0 + 59_000, 30);
    // ...leave no room at the start of the next, as a fixed window would.
    assert_eq!(w.current(T0 + 61_000), 30);
    assert_eq!(w.current(T0 + 59_000 + MINUTE_MS + 999), 30);
    assert_eq!(w.current(T0 + 59_000 + MINUTE_MS + 1_000), 0);
  }

  #[test]
  fn rolling_window_reports_when_capacity_frees() {
    let mut w = RollingWindow::new(MINUTE_MS, T0);
    assert_eq!(w.frees_at(T0), T0);
    w.add(T0 + 2_300, 2);
    w.add(T0 + 10_000, 1);
    assert_eq!(w.frees_at(T0 + 20_000), T0 + 2_000 + 61_000);
    assert_eq!(w.frees_at(T0 + 63_000), T0 + 10_000 + 61_000);
    assert_eq!(w.current(T0 + 63_000), 1);
  }

  #[test]
  fn rolling_window_remove_takes_back_only_what_is_still_counted() {
    let mut w = RollingWindow::new(MINUTE_MS, T0);
    w.add(T0, 500);
    w.add(T0 + 30_000, 100);
    w.remove(T0 + 31_000, T0, 400);
    assert_eq!(w.current(T0 + 31_000), 200);
    w.remove(T0 + 31_000, T0, 400);
    assert_eq!(w.current(T0 + 31_000), 100);
    // Too old to matter: nothing happens.
    w.remove(T0 + 200_000, T0 + 30_000, 100);
    assert_eq!(w.current(T0 + 200_000), 0);
  }

  #[test]
  fn rolling_window_reads_right_after_long_idle_and_clears() {
    let mut w = RollingWindow::new(MINUTE_MS, T0);
    w.add(T0, 4);
    assert_eq!(w.current(T0 + 10 * MINUTE_MS), 0);
    w.add(T0 + 10 * MINUTE_MS, 1);
    assert_eq!(w.current(T0 + 10 * MINUTE_MS), 1);
    w.clear(T0 + 10 * MINUTE_MS);
    assert_eq!(w.current(T0 + 10 * MINUTE_MS), 0);
  }

  #[test]
  fn daily_window_resets_at_the_policy_boundary() {
    let start = DailyReset::UtcMidnight.next_reset(T0) - 1_000;
    let mut w = DailyWindow::new(DailyReset::UtcMidnight, start);
    w.add(start, 5);
    assert_eq!(w.current(start + 999), 5);
    assert_eq!(w.frees_at(start), start + 1_000);
    assert_eq!(w.current(start + 1_000), 0);
    // A reservation from before the reset is not taken out of the new day's count.
    w.add(start + 2_000, 1);
    w.remove(start + 2_000, start, 1);
    assert_eq!(w.current(start + 2_000), 1);
    w.remove(start + 3_000, start + 2_000, 1);
    assert_eq!(w.current(start + 3_000), 0);
  }
}
