//! The calls recorded since the last write: a bounded queue that `record_usage` pushes one entry
//! into (an O(1) push, no allocation once the queue has grown) and the write-behind task drains.
//! Entries name their key by position; the key's text is copied in only when drained, off the hot
//! path.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::core::clock::Millis;
use crate::store::{UsageId, UsageRecord};

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

/// Recorded calls not yet written, oldest first.
#[derive(Debug)]
pub struct UsageLog {
  entries: VecDeque<UsageEntry>,
  capacity: usize,
  batch: usize,
  dropped: u64,
  wake: Arc<Notify>,
}

impl UsageLog {
  /// A queue of at most `capacity` entries (at least 1) that wakes `wake` each time it holds
  /// `batch` of them.
  pub fn new(capacity: usize, batch: usize, wake: Arc<Notify>) -> Self {
    let capacity = capacity.max(1);
    Self {
      // Room up front (up to the default's), so that pushing on the hot path does not allocate.
      entries: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
      capacity,
      batch: batch.clamp(1, capacity),
      dropped: 0,
      wake,
    }
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
      self.wake.notify_one();
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
  use super::*;
  use crate::store::UsageIds;

  fn entry(ids: &UsageIds, index: usize) -> UsageEntry {
    UsageEntry {
      id: ids.next_id(),
      index,
      timestamp: 7,
      tokens: 3,
      success: true,
      error: None,
      response_time: 1.5,
    }
  }

  #[tokio::test]
  async fn a_full_queue_drops_its_oldest_and_counts_them() {
    let ids = UsageIds::new();
    let mut log = UsageLog::new(3, 10, Arc::new(Notify::new()));
    for i in 0..5 {
      log.push(entry(&ids, i));
    }
    assert_eq!((log.len(), log.dropped()), (3, 2));
    let taken = log.take(2);
    assert_eq!(
      taken.iter().map(|e| e.index).collect::<Vec<_>>(),
      vec![2, 3]
    );
    assert_eq!(log.take(10).len(), 1);
    assert!(log.is_empty());
  }

  #[tokio::test]
  async fn a_full_batch_wakes_the_writer() {
    let ids = UsageIds::new();
    let wake = Arc::new(Notify::new());
    let mut log = UsageLog::new(100, 2, wake.clone());
    log.push(entry(&ids, 0));
    let woken = tokio::time::timeout(std::time::Duration::from_millis(20), wake.notified());
    assert!(woken.await.is_err());
    log.push(entry(&ids, 1));
    // The permit was stored: the writer sees it even though it was not waiting yet.
    tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified())
      .await
      .unwrap();
  }

  #[test]
  fn a_drained_entry_names_its_key() {
    let ids = UsageIds::new();
    let names = vec!["a".to_owned(), "b".to_owned()];
    let e = entry(&ids, 1);
    let record = e.clone().into_record(&names);
    assert_eq!(record.api_key, "b");
    assert_eq!(
      (record.id, record.tokens_used, record.response_time),
      (e.id, 3, 1.5)
    );
  }
}
