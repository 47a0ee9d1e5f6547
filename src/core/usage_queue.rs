//! The calls recorded since the last write: a bounded queue that `record_usage` pushes one entry
//! into (an O(1) push, no allocation once the queue has grown) and the write-behind task drains.
//! Entries name their key by position; the key's text is copied in only when drained, off the hot
//! path.

use std::collections::VecDeque;

use crate::core::clock::Millis;
use crate::core::snapshot::{UsageId, UsageIds, UsageRecord};
use crate::core::wake::Wake;

/// How many recorded calls wait for a write at most, by default: at Gemini's free-tier limits, far
/// more than a whole pool can make in one flush interval, and a few MB at most.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// How many queued calls wake the writer before its interval is up, by default.
pub const DEFAULT_BATCH: usize = 500;

/// One recorded call, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEntry {
  pub id: UsageId,
  pub index: usize,
  pub timestamp: Millis,
  pub tokens: u64,
  pub success: bool,
  pub error: Option<String>,
  pub response_time: f64,
}

impl UsageEntry {
  /// The stored form, for a pool whose keys are `names`.
  pub fn into_record(self, names: &[String]) -> UsageRecord {
    UsageRecord {
      id: self.id,
      api_key: names.get(self.index).cloned().unwrap_or_default(),
      timestamp: self.timestamp,
      tokens_used: self.tokens,
      success: self.success,
      error: self.error,
      response_time: self.response_time,
    }
  }
}

/// Recorded calls not yet written, oldest first, and the ids they are recorded with.
pub struct UsageQueue {
  entries: VecDeque<UsageEntry>,
  capacity: usize,
  batch: usize,
  dropped: u64,
  wake: Wake,
  /// Kept as long as the queue, the pool's life: a batch resent after a failed write, even
  /// through a new connection, must carry the ids it had.
  ids: UsageIds,
}

impl UsageQueue {
  /// A queue of at most `capacity` entries (at least 1) that calls `wake` each time it holds
  /// `batch` of them, its entries' ids issued by `ids`.
  pub fn new(capacity: usize, batch: usize, ids: UsageIds, wake: Wake) -> Self {
    let capacity = capacity.max(1);
    Self {
      // Room up front (up to the default's), so that pushing on the hot path does not allocate.
      entries: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
      capacity,
      batch: batch.clamp(1, capacity),
      dropped: 0,
      wake,
      ids,
    }
  }

  /// The id of the call recorded next: assigned when it is recorded, not when it is written.
  pub fn next_id(&self) -> UsageId {
    self.ids.next_id()
  }

  /// Queues a call. When full, the oldest entry makes room: a writer that cannot keep up (the
  /// database is down) must not grow the process without bound, and the newest calls say most
  /// about the keys' state.
  pub fn push(&mut self, entry: UsageEntry) {
    if self.entries.len() == self.capacity {
      self.entries.pop_front();
      self.dropped += 1;
    }
    self.entries.push_back(entry);
    if self.entries.len() == self.batch {
      (self.wake)();
    }
  }

  /// Takes up to `max` of the oldest entries.
  pub fn take(&mut self, max: usize) -> Vec<UsageEntry> {
    let n = max.min(self.entries.len());
    self.entries.drain(..n).collect()
  }

  pub fn len(&self) -> usize {
    self.entries.len()
  }

  pub fn is_empty(&self) -> bool {
    self.entries.is_empty()
  }

  /// Entries dropped because the queue was full.
  pub fn dropped(&self) -> u64 {
    self.dropped
  }
}

#[cfg(test)]
mod tests {
  use std::sync::atomic::{AtomicUsize, Ordering};
  use std::sync::Arc;

  use super::*;

  fn entry(queue: &UsageQueue, index: usize) -> UsageEntry {
    UsageEntry {
      id: queue.next_id(),
      index,
      timestamp: 7,
      tokens: 3,
      success: true,
      error: None,
      response_time: 1.5,
    }
  }

  /// A queue whose wake-ups are counted.
  fn counted(capacity: usize, batch: usize) -> (UsageQueue, Arc<AtomicUsize>) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = wakes.clone();
    let wake: Wake = Arc::new(move || {
      counter.fetch_add(1, Ordering::Relaxed);
    });
    let queue = UsageQueue::new(capacity, batch, UsageIds::new("test"), wake);
    (queue, wakes)
  }

  #[test]
  fn a_full_queue_drops_its_oldest_and_counts_them() {
    let (mut queue, _) = counted(3, 10);
    for i in 0..5 {
      queue.push(entry(&queue, i));
    }
    assert_eq!((queue.len(), queue.dropped()), (3, 2));
    let taken = queue.take(2);
    assert_eq!(
      taken.iter().map(|e| e.index).collect::<Vec<_>>(),
      vec![2, 3]
    );
    assert_eq!(queue.take(10).len(), 1);
    assert!(queue.is_empty());
  }

  #[test]
  fn a_full_batch_wakes_the_writer() {
    let (mut queue, wakes) = counted(100, 2);
    queue.push(entry(&queue, 0));
    assert_eq!(wakes.load(Ordering::Relaxed), 0);
    queue.push(entry(&queue, 1));
    assert_eq!(wakes.load(Ordering::Relaxed), 1);
  }

  #[test]
  fn a_drained_entry_names_its_key() {
    let (queue, _) = counted(10, 10);
    let names = vec!["a".to_owned(), "b".to_owned()];
    let e = entry(&queue, 1);
    let record = e.clone().into_record(&names);
    assert_eq!(record.api_key, "b");
    assert_eq!(
      (record.id, record.tokens_used, record.response_time),
      (e.id, 3, 1.5)
    );
  }
}
