//! The recent calls, kept in memory for usage statistics when there is no database to ask: a ring
//! of fixed-size entries allocated once, so recording a call on the hot path is a copy into a
//! slot, never an allocation. When full, the oldest call is overwritten.

use crate::core::clock::Millis;
use crate::stats::usage_stats::DateRange;

/// Calls kept by default: at Gemini's free-tier limits, hours of a typical pool's traffic, in about
/// 400 KB (40 bytes a call).
pub const DEFAULT_CALL_LOG_CAPACITY: usize = 10_000;

/// One recorded call, as statistics need it: no key text and no error message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
  /// The key's position in the pool.
  pub key: usize,
  pub timestamp: Millis,
  pub tokens: u64,
  pub success: bool,
  /// Milliseconds, as the caller reported it.
  pub response_time: f64,
}

/// The last `capacity` calls, oldest overwritten first.
#[derive(Debug)]
pub struct CallLog {
  slots: Vec<Call>,
  capacity: usize,
  /// Where the next call goes once the ring is full.
  next: usize,
  /// Calls overwritten so far.
  overwritten: u64,
}

impl CallLog {
  /// A log of `capacity` calls (0 keeps none), allocated now.
  pub fn new(capacity: usize) -> Self {
    Self {
      slots: Vec::with_capacity(capacity),
      capacity,
      next: 0,
      overwritten: 0,
    }
  }

  pub fn capacity(&self) -> usize {
    self.capacity
  }

  /// Records a call: O(1), and within the capacity allocated up front.
  pub fn push(&mut self, call: Call) {
    if self.slots.len() < self.capacity {
      self.slots.push(call);
      return;
    }
    if self.capacity > 0 {
      self.slots[self.next] = call;
      // Wrapped by a comparison: `%` would cost an integer division per recorded call.
      self.next += 1;
      if self.next == self.capacity {
        self.next = 0;
      }
    }
    self.overwritten += 1;
  }

  /// Calls overwritten (or, with capacity 0, not kept) so far.
  pub fn overwritten(&self) -> u64 {
    self.overwritten
  }

  /// The oldest call still held, if any.
  pub fn oldest(&self) -> Option<&Call> {
    if self.slots.len() < self.capacity {
      self.slots.first()
    } else {
      self.slots.get(self.next)
    }
  }

  /// The calls held whose timestamp is in `range`, in no particular order.
  pub fn within(&self, range: DateRange) -> Vec<Call> {
    self
      .slots
      .iter()
      .filter(|c| range.contains(c.timestamp))
      .copied()
      .collect()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn call(timestamp: Millis) -> Call {
    Call {
      key: 0,
      timestamp,
      tokens: 1,
      success: true,
      response_time: 1.0,
    }
  }

  #[test]
  fn a_full_log_overwrites_its_oldest_without_growing() {
    let mut log = CallLog::new(3);
    let allocated = log.slots.capacity();
    for t in 1..=5 {
      log.push(call(t));
    }
    assert_eq!(log.slots.capacity(), allocated);
    assert_eq!(log.overwritten(), 2);
    assert_eq!(log.oldest().map(|c| c.timestamp), Some(3));
    let mut held: Vec<Millis> = log
      .within(DateRange::ALL)
      .iter()
      .map(|c| c.timestamp)
      .collect();
    held.sort_unstable();
    assert_eq!(held, vec![3, 4, 5]);
    assert_eq!(
      log.within(DateRange::new(Some(4), Some(4)).unwrap()).len(),
      1
    );
    assert_eq!(log.within(DateRange::new(Some(6), None).unwrap()).len(), 0);
  }

  #[test]
  fn a_call_takes_the_40_bytes_the_docs_say() {
    assert_eq!(std::mem::size_of::<Call>(), 40);
  }

  #[test]
  fn a_log_of_capacity_zero_keeps_nothing() {
    let mut log = CallLog::new(0);
    log.push(call(1));
    assert_eq!(
      (log.within(DateRange::ALL).len(), log.overwritten()),
      (0, 1)
    );
    assert!(log.oldest().is_none());
  }
}
