//! The pool's state as it is stored: plain values, one per stored document (a key, a budget, an
//! operator's decision, a recorded call), that mirror SPEC section 3's documents field for field.
//! The pool exports and imports them; the store reads and writes them. They know nothing of the
//! pool's internals, so the pool can change those without touching storage, nor of any database.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::core::clock::{Millis, DAY_MS, MINUTE_MS};
use crate::core::key::Admission;
use crate::core::quota::LimitType;

/// An operator's decision about one key, as stored for every process sharing the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionRecord {
  /// The key itself (the store names or seals it).
  pub api_key: String,
  pub admission: Admission,
  pub changed_at: Millis,
  /// Added at run time: other processes only know the key from the store.
  pub added: bool,
  /// The project it was added in, when one was named.
  pub project: Option<String>,
}

/// One window of a key as stored: `{ current, limit, resetTime }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRecord {
  pub current: u64,
  pub limit: u64,
  pub reset_time: Millis,
}

/// A budget's rest as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestRecord {
  Clear,
  /// Until then; `window` the one the upstream named, if it did.
  Until {
    until: Millis,
    window: Option<LimitType>,
  },
  /// The tier has no quota for the model.
  NoQuota,
}

/// One `api_key_budgets` document: what one (project, model) budget has counted, and its rest, so
/// that a restart does not send Gemini the 429 that taught it (a spent day above all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRecord {
  /// Names the budget as its leases do (a key, `<key>/<model>`, or `project:<name>/<model>`): the
  /// store keeps it in its naming, never as it is.
  pub subject: String,
  /// The project's name, when known (a project number is no secret).
  pub project: Option<String>,
  pub model: String,
  pub rpm: WindowRecord,
  pub rpd: WindowRecord,
  pub tpm: WindowRecord,
  pub rest: RestRecord,
}

/// One `api_keys` document: the SPEC's `ApiKeyStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
  pub api_key: String,
  pub is_active: bool,
  pub last_used: Millis,
  pub rpm: WindowRecord,
  pub rpd: WindowRecord,
  pub tpm: WindowRecord,
  pub error_count: u32,
  pub last_error: Option<String>,
  pub last_error_time: Option<Millis>,
}

impl WindowRecord {
  /// The window as it stands at `now`: unchanged while its reset time is ahead, otherwise empty
  /// and restarted for `span` from `now`, as the old service did at start-up.
  pub fn at(self, now: Millis, span: Millis) -> Self {
    if self.reset_time > now {
      return self;
    }
    Self {
      current: 0,
      limit: self.limit,
      reset_time: now + span,
    }
  }
}

impl BudgetRecord {
  /// The record with every window whose reset time has passed restarted at `now`.
  pub fn at(self, now: Millis) -> Self {
    Self {
      rpm: self.rpm.at(now, MINUTE_MS),
      rpd: self.rpd.at(now, DAY_MS),
      tpm: self.tpm.at(now, MINUTE_MS),
      ..self
    }
  }
}

impl KeyRecord {
  /// The record with every window whose reset time has passed restarted at `now`.
  pub fn at(self, now: Millis) -> Self {
    Self {
      rpm: self.rpm.at(now, MINUTE_MS),
      rpd: self.rpd.at(now, DAY_MS),
      tpm: self.tpm.at(now, MINUTE_MS),
      ..self
    }
  }
}

/// The identity of one usage document, fixed when the call is recorded so that sending the same
/// record twice (a retry after a failed or timed-out write) stores it once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageId {
  /// The [`UsageIds`] that issued it: unique per issuer, across processes and hosts.
  pub source: Arc<str>,
  pub seq: u64,
}

impl fmt::Display for UsageId {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{}:{}", self.source, self.seq)
  }
}

impl UsageId {
  /// The id its [`fmt::Display`] form names (`source:seq`), as spill files keep it.
  pub fn parse(text: &str) -> Option<Self> {
    let (source, seq) = text.rsplit_once(':')?;
    Some(Self {
      source: source.into(),
      seq: seq.parse().ok()?,
    })
  }
}

/// Issues [`UsageId`]s. One per key manager, kept across reconnects: a batch re-sent through a new
/// connection must carry the ids it had.
#[derive(Debug)]
pub struct UsageIds {
  source: Arc<str>,
  next: AtomicU64,
}

impl UsageIds {
  /// Ids from `source`, which must be unique across processes and hosts (persistence gives one
  /// the store makes: see `store::unique_name`), numbered from 0.
  pub fn new(source: impl Into<Arc<str>>) -> Self {
    Self {
      source: source.into(),
      next: AtomicU64::new(0),
    }
  }

  /// The next id: assign it when the call is recorded, not when it is written.
  pub fn next_id(&self) -> UsageId {
    UsageId {
      source: self.source.clone(),
      seq: self.next.fetch_add(1, Ordering::Relaxed),
    }
  }
}

/// One `api_key_usage` document: the SPEC's `ApiKeyUsage`, plus its stable `_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
  pub id: UsageId,
  pub api_key: String,
  pub timestamp: Millis,
  pub tokens_used: u64,
  pub success: bool,
  pub error: Option<String>,
  /// Milliseconds, as the caller reported it (a JS number, so possibly fractional).
  pub response_time: f64,
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn only_windows_whose_reset_time_passed_restart() {
    let w = |current, reset_time| WindowRecord {
      current,
      limit: 30,
      reset_time,
    };
    let record = KeyRecord {
      api_key: "k".into(),
      is_active: true,
      last_used: 0,
      rpm: w(5, 1_000),
      rpd: w(7, 5_000),
      tpm: w(900, 2_000),
      error_count: 0,
      last_error: None,
      last_error_time: None,
    };
    let now = 2_000;
    let fresh = record.at(now);
    assert_eq!(fresh.rpm, w(0, now + MINUTE_MS));
    assert_eq!(fresh.rpd, w(7, 5_000));
    assert_eq!(fresh.tpm, w(0, now + MINUTE_MS));
  }

  #[test]
  fn usage_ids_are_sequential_within_a_source_and_name_it() {
    let ids = UsageIds::new("a-source");
    let (first, second) = (ids.next_id(), ids.next_id());
    assert_eq!((first.seq, second.seq), (0, 1));
    assert_eq!(first.source, second.source);
    assert_eq!(second.to_string(), "a-source:1");
    assert_eq!(UsageId::parse("a-source:1"), Some(second));
  }
}
