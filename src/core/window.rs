//! One counter against one limit over time, in the two shapes Gemini uses: a rolling window (RPM
//! and TPM: whatever was used in the last minute) and a daily window (RPD: reset at a fixed time of
//! day). Every read takes `now`, so a window never needs a reset call to read right.

use std::cell::Cell;

use crate::core::calendar::DailyReset;
use crate::core::clock::Millis;

/// Slices a rolling window is cut into: an amount is counted until the end of its slice plus the
/// span, so for at least the full span and at most a slice (1/600 of the span: a tenth of a second
/// of a minute) longer. A request that waited for room goes out at most that late: at saturation,
/// and at the edge of a window, the keys serve over 99% of what the upstream allows.
const SLICES: i64 = 600;
/// The live slices (those still counted, and the newest) fit in this many.
const RING: usize = SLICES as usize + 2;
/// Extra time every amount stays counted: the clock read here is coarse (a few ms), and the
/// upstream stamps a request a little after we do.
const MARGIN_MS: Millis = 10;

/// The slices cover the span and the margin, so that whatever is still counted fits the ring.
fn slice_ms(span_ms: Millis) -> Millis {
  ((span_ms + MARGIN_MS + SLICES - 1) / SLICES).max(1)
}

/// Until when a window of `span_ms` counts an amount added at `at`: the end of its slice, the span
/// and the margin: what tests expect a window's reset time to be.
#[cfg(test)]
pub fn counted_until(span_ms: Millis, at: Millis) -> Millis {
  let slice = slice_ms(span_ms);
  (at.div_euclid(slice) + 1) * slice + span_ms + MARGIN_MS
}

/// Amounts used in the last `span`, kept in `SLICES` slices.
#[derive(Debug, Clone, PartialEq)]
pub struct RollingWindow {
  slice_ms: Millis,
  span_ms: Millis,
  margin_ms: Millis,
  /// Per slice, what it holds. 32 bits, boxed: the ring is the bulk of a key's memory, and a pool
  /// of 1,000 keys stays in cache better at half the size. A slice that would pass 2^32 keeps
  /// the excess in `total` alone, which then never leaves it: an overcount, the safe side (and
  /// only at limits beyond any Gemini tier's).
  ring: Box<[u32; RING]>,
  /// The oldest slice the ring may still hold; older ones were dropped.
  oldest: i64,
  /// The oldest slice holding anything, when known: `frees_at` is read on every hand-out, and this
  /// spares it a scan (and a read of an old, cold part of the ring).
  oldest_used: Cell<Option<i64>>,
  total: u64,
  /// The last `now` seen, with its slice and first live slice: every call of one pool operation
  /// reads the same `now` several times, and the clock ticks every few ms, so this saves most of
  /// the integer divisions of the hot path.
  memo: Cell<(Millis, i64, i64)>,
}

impl RollingWindow {
  pub fn new(span_ms: Millis, now: Millis) -> Self {
    let slice_ms = slice_ms(span_ms);
    let mut w = Self {
      slice_ms,
      span_ms,
      margin_ms: MARGIN_MS,
      ring: Box::new([0; RING]),
      oldest: 0,
      oldest_used: Cell::new(None),
      total: 0,
      memo: Cell::new((Millis::MIN, 0, 0)),
    };
    w.oldest = w.first_live(now);
    w
  }

  fn slice(&self, t: Millis) -> i64 {
    t.div_euclid(self.slice_ms)
  }

  fn at(s: i64) -> usize {
    s.rem_euclid(RING as i64) as usize
  }

  /// `now`'s slice and the oldest slice still counted at `now`.
  fn ticks(&self, now: Millis) -> (i64, i64) {
    let (seen, slice, first_live) = self.memo.get();
    if seen == now {
      return (slice, first_live);
    }
    let ticks = (
      self.slice(now),
      self.slice(now - self.span_ms - self.margin_ms),
    );
    self.memo.set((now, ticks.0, ticks.1));
    ticks
  }

  /// When slice `s` stops being counted: a span (and the margin) after the slice ends.
  fn leaves_at(&self, s: i64) -> Millis {
    (s + 1) * self.slice_ms + self.span_ms + self.margin_ms
  }

  fn first_live(&self, now: Millis) -> i64 {
    self.ticks(now).1
  }

  fn current_slice(&self, now: Millis) -> i64 {
    self.ticks(now).0
  }

  /// The part of `total` in slices no longer counted at `now`.
  fn expired_part(&self, now: Millis) -> u64 {
    let first = self.first_live(now);
    if first - self.oldest >= RING as i64 {
      return self.total;
    }
    (self.oldest..first)
      .map(|s| u64::from(self.ring[Self::at(s)]))
      .sum()
  }

  fn advance(&mut self, now: Millis) {
    let first = self.first_live(now);
    if first <= self.oldest {
      return;
    }
    if first - self.oldest >= RING as i64 {
      *self.ring = [0; RING];
      self.total = 0;
    } else {
      for s in self.oldest..first {
        self.total -= u64::from(self.ring[Self::at(s)]);
        self.ring[Self::at(s)] = 0;
      }
    }
    self.oldest = first;
  }

  pub fn current(&self, now: Millis) -> u64 {
    self.total - self.expired_part(now)
  }

  pub fn add(&mut self, now: Millis, amount: u64) {
    self.add_at(now, now, amount);
  }

  /// Counts `amount` as used at `at` (not after `now`), for as long as that leaves it counted;
  /// nothing when `at` already left the window.
  pub fn add_at(&mut self, now: Millis, at: Millis, amount: u64) {
    self.advance(now);
    let s = self.slice(at.min(now));
    // Nothing to count (a request without tokens): no slice may look used.
    if s < self.oldest || amount == 0 {
      return;
    }
    if self.total == 0 || self.oldest_used.get().is_some_and(|o| s < o) {
      self.oldest_used.set(Some(s));
    }
    let slot = Self::at(s);
    self.ring[slot] = self.ring[slot].saturating_add(u32::try_from(amount).unwrap_or(u32::MAX));
    self.total = self.total.saturating_add(amount);
  }

  /// Takes back up to `amount` counted at time `at`, if that is still in the window.
  pub fn remove(&mut self, now: Millis, at: Millis, amount: u64) {
    self.advance(now);
    let s = self.slice(at);
    if s < self.oldest || s > self.current_slice(now) {
      return;
    }
    let taken = amount.min(u64::from(self.ring[Self::at(s)]));
    self.ring[Self::at(s)] -= taken as u32;
    self.total -= taken;
    // Only emptying the oldest used slice moves it; settling usually takes from a recent one.
    if self.ring[Self::at(s)] == 0 && self.oldest_used.get() == Some(s) {
      self.oldest_used.set(None);
    }
  }

  /// When the oldest amount still counted leaves the window: the time capacity next frees (`now`
  /// when nothing is counted).
  pub fn frees_at(&self, now: Millis) -> Millis {
    let first_live = self.first_live(now).max(self.oldest);
    let oldest_used = match self.oldest_used.get() {
      Some(s) if s >= first_live => Some(s),
      _ => {
        let found = (first_live..=self.current_slice(now)).find(|&s| self.ring[Self::at(s)] > 0);
        self.oldest_used.set(found);
        found
      }
    };
    oldest_used.map_or(now, |s| self.leaves_at(s))
  }

  /// When everything counted at `now` has left the window (`now` when nothing is): what a stored
  /// `resetTime` must say so that a reader that drops the whole count after it never drops a
  /// request still counted.
  pub fn clears_at(&self, now: Millis) -> Millis {
    (self.first_live(now).max(self.oldest)..=self.slice(now))
      .rev()
      .find(|&s| self.ring[Self::at(s)] > 0)
      .map_or(now, |s| self.leaves_at(s))
  }

  pub fn clear(&mut self, now: Millis) {
    *self.ring = [0; RING];
    self.total = 0;
    self.oldest = self.first_live(now);
    self.oldest_used.set(None);
  }

  /// Adds what `other` (a window of the same span) still counts at `now`, each amount in its own
  /// slice: two counts of one quota becoming one.
  pub fn absorb(&mut self, other: &RollingWindow, now: Millis) {
    let first = other.first_live(now).max(other.oldest);
    for s in first..=other.current_slice(now) {
      let amount = other.ring[Self::at(s)];
      if amount > 0 {
        self.add_at(now, s * other.slice_ms, u64::from(amount));
      }
    }
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

  /// Counts the whole day as spent: the upstream said so.
  pub fn fill(&mut self, now: Millis, limit: u64) {
    self.advance(now);
    self.current = self.current.max(limit);
  }

  /// Adds what `other` counts today.
  pub fn absorb(&mut self, other: &DailyWindow, now: Millis) {
    self.add(now, other.current(now));
  }
}

#[cfg(test)]
mod tests;
