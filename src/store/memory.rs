//! The store without a database: the same contract as [`super::MongoStore`], held in this process.
//! It stands in for MongoDB in tests of the layers above, and it counts the round trips a database
//! would have taken, so those tests can check how often they write. It keeps every usage record it
//! is given: meant for tests and short runs, not for recording usage without end.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::admissions::StoredAdmission;
use super::error::StoreError;
use super::lease::{self, lease_id, ledger_id, Ledger};
use super::naming::KeyNaming;
use super::records::{Grant, LeaseSlot, SliceSlot};
use crate::core::clock::Millis;
use crate::core::snapshot::{AdmissionRecord, BudgetRecord, KeyRecord, UsageId, UsageRecord};

#[derive(Debug, Default)]
struct Holding {
  amount: u64,
  expires: Millis,
}

#[derive(Debug)]
struct LeaseState {
  window_end: Millis,
  used: u64,
  holders: HashMap<String, Holding>,
}

#[derive(Debug, Default)]
struct State {
  /// One per key, in the order first saved.
  keys: Vec<KeyRecord>,
  /// By subject.
  budgets: HashMap<String, BudgetRecord>,
  usage: Vec<UsageRecord>,
  usage_ids: HashSet<UsageId>,
  leases: HashMap<String, LeaseState>,
  admissions: HashMap<String, StoredAdmission>,
  ledgers: HashMap<String, Ledger>,
}

/// Keys, usage and leases in this process, behind one lock.
#[derive(Debug)]
pub struct MemoryStore {
  state: Mutex<State>,
  ops: AtomicU64,
  /// Keys are held as they are: nothing leaves the process.
  naming: KeyNaming,
}

impl Default for MemoryStore {
  fn default() -> Self {
    Self {
      state: Mutex::default(),
      ops: AtomicU64::new(0),
      naming: KeyNaming::plaintext(),
    }
  }
}

impl MemoryStore {
  /// An empty store.
  pub fn new() -> Self {
    Self::default()
  }

  /// Plaintext: see [`KeyNaming::plaintext`].
  pub fn naming(&self) -> &KeyNaming {
    &self.naming
  }

  /// Round trips a database would have made so far: one per call that had something to do.
  pub fn ops(&self) -> u64 {
    self.ops.load(Ordering::Relaxed)
  }

  fn count_op(&self) {
    self.ops.fetch_add(1, Ordering::Relaxed);
  }

  /// See [`super::MongoStore::load`].
  pub fn load(&self, now: Millis) -> Vec<KeyRecord> {
    self.count_op();
    let state = self.state.lock();
    state.keys.iter().map(|k| k.clone().at(now)).collect()
  }

  /// See [`super::MongoStore::save_keys`].
  pub fn save_keys(&self, keys: &[KeyRecord]) {
    if keys.is_empty() {
      return;
    }
    self.count_op();
    let mut state = self.state.lock();
    for k in keys {
      match state.keys.iter_mut().find(|s| s.api_key == k.api_key) {
        Some(stored) => *stored = k.clone(),
        None => state.keys.push(k.clone()),
      }
    }
  }

  /// See [`super::MongoStore::save_budgets`].
  pub fn save_budgets(&self, budgets: &[BudgetRecord]) {
    if budgets.is_empty() {
      return;
    }
    self.count_op();
    let mut state = self.state.lock();
    for b in budgets {
      state.budgets.insert(b.subject.clone(), b.clone());
    }
  }

  /// See [`super::MongoStore::load_budgets`].
  pub fn load_budgets(&self) -> Vec<BudgetRecord> {
    self.count_op();
    self.state.lock().budgets.values().cloned().collect()
  }

  /// Stores the records not stored before; returns how many that was. See
  /// [`super::MongoStore::append_usage`].
  pub fn append_usage(&self, usage: &[UsageRecord]) -> usize {
    if usage.is_empty() {
      return 0;
    }
    self.count_op();
    let mut state = self.state.lock();
    let mut stored = 0;
    for u in usage {
      if state.usage_ids.insert(u.id.clone()) {
        state.usage.push(u.clone());
        stored += 1;
      }
    }
    stored
  }

  /// See [`super::MongoStore::save_admissions`]: keys are kept by name, as in plaintext mode.
  pub fn save_admissions(&self, records: &[AdmissionRecord]) {
    let stored: Vec<StoredAdmission> = records
      .iter()
      .map(|r| StoredAdmission {
        stored: r.api_key.clone(),
        admission: r.admission,
        changed_at: r.changed_at,
        added: r.added,
        sealed: None,
        masked: crate::mask::mask_key(&r.api_key),
        project: r.project.clone(),
      })
      .collect();
    self.save_stored_admissions(&stored);
  }

  /// See [`super::MongoStore::save_stored_admissions`].
  pub fn save_stored_admissions(&self, stored: &[StoredAdmission]) {
    if stored.is_empty() {
      return;
    }
    self.count_op();
    let mut state = self.state.lock();
    for a in stored {
      let newer = state
        .admissions
        .get(&a.stored)
        .is_some_and(|held| held.changed_at >= a.changed_at);
      if !newer {
        state.admissions.insert(a.stored.clone(), a.clone());
      }
    }
  }

  /// See [`super::MongoStore::load_admissions`].
  pub fn load_admissions(&self) -> Vec<StoredAdmission> {
    self.count_op();
    self.state.lock().admissions.values().cloned().collect()
  }

  /// Every usage record stored, in the order stored.
  pub fn usage(&self) -> Vec<UsageRecord> {
    self.state.lock().usage.clone()
  }

  /// See [`super::MongoStore::lease`]: the same grants, from a map instead of a document.
  pub fn lease(
    &self,
    slot: &LeaseSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
    expires_at: Millis,
  ) -> Result<Grant, StoreError> {
    lease::check(slot, holder)?;
    if want == 0 || limit == 0 {
      return Ok(Grant {
        granted: 0,
        holders: 1,
      });
    }
    self.count_op();
    let mut state = self.state.lock();
    let doc = state
      .leases
      .entry(lease_id(slot))
      .or_insert_with(|| LeaseState {
        window_end: slot.window_end,
        used: 0,
        holders: HashMap::new(),
      });
    let granted = want.min(limit.saturating_sub(doc.used));
    if granted > 0 {
      doc.used += granted;
      let h = doc.holders.entry(holder.to_owned()).or_default();
      h.amount += granted;
      h.expires = h.expires.max(expires_at);
    }
    let holders = doc.holders.len() + usize::from(!doc.holders.contains_key(holder));
    Ok(Grant { granted, holders })
  }

  /// See [`super::MongoStore::lease_slice`]: the same rule, on a ledger in a map.
  pub fn lease_slice(
    &self,
    slot: &SliceSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
  ) -> Result<Grant, StoreError> {
    super::mongo_ledger::check(slot, holder)?;
    self.count_op();
    let mut state = self.state.lock();
    let ledger = state
      .ledgers
      .entry(ledger_id(slot.window, slot.api_key))
      .or_default();
    let holders = ledger.holders_at(slot.slice, slot.span_slices, holder);
    let granted = want.min(ledger.room(slot.slice, slot.span_slices, limit));
    if granted > 0 {
      ledger.grant(slot.slice, slot.span_slices, granted, holder);
    }
    Ok(Grant { granted, holders })
  }

  /// See [`super::MongoStore::release_slice`].
  pub fn release_slice(
    &self,
    slot: &SliceSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    super::mongo_ledger::check(slot, holder)?;
    self.count_op();
    let mut state = self.state.lock();
    Ok(
      state
        .ledgers
        .get_mut(&ledger_id(slot.window, slot.api_key))
        .map_or(0, |l| l.release(slot.slice, unused)),
    )
  }

  /// See [`super::MongoStore::release`].
  pub fn release(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    self.give_back(slot, holder, unused, true)
  }

  /// See [`super::MongoStore::consume`].
  pub fn consume(&self, slot: &LeaseSlot<'_>, holder: &str, spent: u64) -> Result<u64, StoreError> {
    self.give_back(slot, holder, spent, false)
  }

  fn give_back(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    amount: u64,
    to_pool: bool,
  ) -> Result<u64, StoreError> {
    lease::check(slot, holder)?;
    if amount == 0 {
      return Ok(0);
    }
    self.count_op();
    let mut state = self.state.lock();
    let Some(doc) = state.leases.get_mut(&lease_id(slot)) else {
      return Ok(0);
    };
    let Some(h) = doc.holders.get_mut(holder) else {
      return Ok(0);
    };
    let n = amount.min(h.amount);
    h.amount -= n;
    if to_pool {
      doc.used -= n;
    }
    Ok(n)
  }

  /// See [`super::MongoStore::reclaim_expired`].
  pub fn reclaim_expired(&self, now: Millis) -> u64 {
    self.count_op();
    let mut state = self.state.lock();
    let mut reclaimed = 0;
    for doc in state.leases.values_mut().filter(|d| d.window_end > now) {
      let mut freed = 0;
      doc.holders.retain(|_, h| {
        let expired = h.expires < now;
        if expired {
          freed += h.amount;
        }
        !expired
      });
      doc.used -= freed;
      reclaimed += freed;
    }
    reclaimed
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::clock::MINUTE_MS;
  use crate::core::snapshot::{UsageIds, WindowRecord};
  use crate::store::unique_name;

  const NOW: Millis = 1_700_000_000_000;

  fn key(name: &str, rpm: u64) -> KeyRecord {
    let w = |current| WindowRecord {
      current,
      limit: 30,
      reset_time: NOW + 10_000,
    };
    KeyRecord {
      api_key: name.into(),
      is_active: true,
      last_used: NOW,
      rpm: w(rpm),
      rpd: w(rpm),
      tpm: w(0),
      error_count: 0,
      last_error: None,
      last_error_time: None,
    }
  }

  const SLOT: LeaseSlot<'static> = LeaseSlot {
    api_key: "k",
    window: "rpm",
    window_id: NOW,
    window_end: NOW + MINUTE_MS,
  };

  #[test]
  fn saves_replace_by_key_and_load_restarts_expired_windows() {
    let s = MemoryStore::new();
    s.save_keys(&[key("a", 1), key("b", 2)]);
    s.save_keys(&[key("a", 5)]);
    s.save_keys(&[]);
    assert_eq!(s.load(NOW), vec![key("a", 5), key("b", 2)]);
    let later = s.load(NOW + 10_000);
    assert_eq!(later[0].rpm.current, 0);
    assert_eq!(later[0].rpm.reset_time, NOW + 10_000 + MINUTE_MS);
    assert_eq!(s.ops(), 4);
  }

  #[test]
  fn a_resent_usage_batch_is_stored_once() {
    let s = MemoryStore::new();
    let ids = UsageIds::new(unique_name());
    let batch: Vec<UsageRecord> = (0..3)
      .map(|i| UsageRecord {
        id: ids.next_id(),
        api_key: "k".into(),
        timestamp: NOW + i,
        tokens_used: 10,
        success: true,
        error: None,
        response_time: 5.0,
      })
      .collect();
    assert_eq!(s.append_usage(&batch[..2]), 2);
    assert_eq!(s.append_usage(&batch), 1);
    assert_eq!(s.usage(), batch);
  }

  #[test]
  fn leases_never_exceed_the_limit_and_give_back_only_what_is_held() {
    let s = MemoryStore::new();
    assert_eq!(
      s.lease(&SLOT, 20, 30, "a", NOW + 5_000).unwrap(),
      Grant {
        granted: 20,
        holders: 1
      }
    );
    assert_eq!(
      s.lease(&SLOT, 20, 30, "b", NOW + 5_000).unwrap(),
      Grant {
        granted: 10,
        holders: 2
      }
    );
    assert_eq!(s.lease(&SLOT, 1, 30, "b", NOW + 5_000).unwrap().granted, 0);
    assert_eq!(s.release(&SLOT, "b", 50).unwrap(), 10);
    assert_eq!(s.consume(&SLOT, "a", 5).unwrap(), 5);
    assert_eq!(
      s.lease(&SLOT, 30, 30, "b", NOW + 20_000).unwrap().granted,
      10
    );
    // "a" dies holding 15 unspent; after its lease expires they go back to the pool.
    assert_eq!(s.reclaim_expired(NOW + 6_000), 15);
    assert_eq!(
      s.lease(&SLOT, 30, 30, "b", NOW + 20_000).unwrap().granted,
      15
    );
    assert!(s.lease(&SLOT, 1, 30, "a.b", NOW).is_err());
  }
}
