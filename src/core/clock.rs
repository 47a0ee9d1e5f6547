//! Time source. The core never reads the system clock directly, so window resets, cache expiry and
//! back-offs are tested by moving a [`FakeClock`] instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the unit of JS `Date`, so no conversion at the boundary.
pub type Millis = i64;

/// A second, a minute, an hour and a day in [`Millis`]: the units every window and rest is built of.
pub const SECOND_MS: Millis = 1_000;
pub const MINUTE_MS: Millis = 60 * SECOND_MS;
pub const HOUR_MS: Millis = 60 * MINUTE_MS;
pub const DAY_MS: Millis = 24 * HOUR_MS;

pub trait Clock: Send + Sync {
  fn now_ms(&self) -> Millis;
}

/// The wall clock, read at millisecond precision.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
  /// On Linux, `CLOCK_REALTIME_COARSE`: a few nanoseconds instead of tens, at the kernel tick's
  /// resolution (1 to 4 ms), which is far finer than any window this crate keeps. Every selection
  /// reads the clock, so this is a measurable share of the hot path.
  #[cfg(target_os = "linux")]
  fn now_ms(&self) -> Millis {
    let mut ts = libc::timespec {
      tv_sec: 0,
      tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_REALTIME_COARSE exists on every Linux since 2.6.32.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
      ts.tv_sec as Millis * SECOND_MS + ts.tv_nsec as Millis / 1_000_000
    } else {
      precise_now_ms()
    }
  }

  #[cfg(not(target_os = "linux"))]
  fn now_ms(&self) -> Millis {
    precise_now_ms()
  }
}

fn precise_now_ms() -> Millis {
  SystemTime::now()
    .duration_since(UNIX_EPOCH)
    .map(|d| d.as_millis() as Millis)
    .unwrap_or(0)
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicI64>);

impl FakeClock {
  pub fn at(start: Millis) -> Self {
    Self(Arc::new(AtomicI64::new(start)))
  }

  pub fn advance(&self, ms: Millis) {
    self.0.fetch_add(ms, Ordering::SeqCst);
  }

  pub fn set(&self, ms: Millis) {
    self.0.store(ms, Ordering::SeqCst);
  }
}

impl Clock for FakeClock {
  fn now_ms(&self) -> Millis {
    self.0.load(Ordering::SeqCst)
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn fake_clock_moves_only_when_told_and_clones_share_time() {
    let clock = FakeClock::at(1_000);
    let other = clock.clone();
    assert_eq!(clock.now_ms(), 1_000);
    other.advance(500);
    assert_eq!(clock.now_ms(), 1_500);
    clock.set(42);
    assert_eq!(other.now_ms(), 42);
  }

  #[test]
  fn system_clock_agrees_with_the_precise_clock_within_a_tick() {
    let coarse = SystemClock.now_ms();
    let precise = precise_now_ms();
    assert!(coarse > 1_577_836_800_000);
    assert!((precise - coarse).abs() < 50, "{precise} vs {coarse}");
  }
}
