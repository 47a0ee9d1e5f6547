//! Persistence and shared quota: where the pool's state goes between runs and how processes that
//! share keys share their limits. The pool never calls this on its hot path; a write-behind layer
//! hands it batches. Two implementations behind one enum: [`MongoStore`] (SPEC section 3's
//! collections) and [`MemoryStore`] (the same contract in-process, for tests and runs without a
//! database). Plain records in, plain records out: no pool types, no napi types.

mod admissions;
mod documents;
mod error;
pub mod fingerprint;
mod lease;
mod memory;
mod mongo;
mod mongo_lease;
mod mongo_ledger;
mod naming;
mod records;
mod sealing;
#[cfg(test)]
pub(crate) mod test_server;
mod usage_query;

use crate::core::clock::Millis;
use crate::core::snapshot::{AdmissionRecord, BudgetRecord, KeyRecord, UsageRecord};

pub use admissions::StoredAdmission;
pub use error::StoreError;
pub use memory::MemoryStore;
pub use mongo::{MongoStore, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DB_NAME};
pub use naming::{KeyNaming, KeyStorage, KeyStorageError};
pub use records::{unique_name, Grant, LeaseSlot, SliceSlot};
pub use usage_query::{StoredUsage, UsageReader, UsageSource, MAX_CALLS};

/// Where state is kept. Every call that has something to do is one round trip per batch (see
/// [`Store::ops`]); leases are described in [`MongoStore::lease`].
pub enum Store {
  /// No database: state lives as long as the process.
  Memory(Box<MemoryStore>),
  /// SPEC section 3's collections in MongoDB.
  Mongo(Box<MongoStore>),
}

impl Store {
  /// Every stored key as it stands at `now` (windows whose reset time has passed restarted),
  /// named as stored; documents naming one of `keys` the old way are migrated first.
  pub async fn load(&self, now: Millis, keys: &[String]) -> Result<Vec<KeyRecord>, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.load(now)),
      Store::Mongo(s) => s.load(now, keys).await,
    }
  }

  /// See [`MongoStore::save_admissions`].
  pub async fn save_admissions(&self, records: &[AdmissionRecord]) -> Result<(), StoreError> {
    match self {
      Store::Memory(s) => {
        s.save_admissions(records);
        Ok(())
      }
      Store::Mongo(s) => s.save_admissions(records).await,
    }
  }

  /// See [`MongoStore::load_admissions`].
  pub async fn load_admissions(&self) -> Result<Vec<StoredAdmission>, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.load_admissions()),
      Store::Mongo(s) => s.load_admissions().await,
    }
  }

  /// How documents name keys.
  pub fn naming(&self) -> &KeyNaming {
    match self {
      Store::Memory(s) => s.naming(),
      Store::Mongo(s) => s.naming(),
    }
  }

  /// Writes the keys' whole state, replacing what was stored for them.
  pub async fn save_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
    match self {
      Store::Memory(s) => {
        s.save_keys(keys);
        Ok(())
      }
      Store::Mongo(s) => s.save_keys(keys).await,
    }
  }

  /// See [`MongoStore::save_budgets`].
  pub async fn save_budgets(&self, budgets: &[BudgetRecord]) -> Result<(), StoreError> {
    match self {
      Store::Memory(s) => {
        s.save_budgets(budgets);
        Ok(())
      }
      Store::Mongo(s) => s.save_budgets(budgets).await,
    }
  }

  /// See [`MongoStore::save_stored_budgets`].
  pub async fn save_stored_budgets(&self, budgets: &[BudgetRecord]) -> Result<(), StoreError> {
    match self {
      // The memory store names budgets as given.
      Store::Memory(s) => {
        s.save_budgets(budgets);
        Ok(())
      }
      Store::Mongo(s) => s.save_stored_budgets(budgets).await,
    }
  }

  /// See [`MongoStore::load_budgets`].
  pub async fn load_budgets(&self) -> Result<Vec<BudgetRecord>, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.load_budgets()),
      Store::Mongo(s) => s.load_budgets().await,
    }
  }

  /// See [`MongoStore::save_stored_keys`].
  pub async fn save_stored_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
    match self {
      // The memory store names keys as given.
      Store::Memory(s) => {
        s.save_keys(keys);
        Ok(())
      }
      Store::Mongo(s) => s.save_stored_keys(keys).await,
    }
  }

  /// Stores usage records; records already stored (a resent batch) are skipped. Returns how many
  /// were newly stored.
  pub async fn append_usage(&self, usage: &[UsageRecord]) -> Result<usize, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.append_usage(usage)),
      Store::Mongo(s) => s.append_usage(usage).await,
    }
  }

  /// See [`MongoStore::append_stored_usage`].
  pub async fn append_stored_usage(&self, usage: &[UsageRecord]) -> Result<usize, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.append_usage(usage)),
      Store::Mongo(s) => s.append_stored_usage(usage).await,
    }
  }

  /// See [`MongoStore::save_stored_admissions`].
  pub async fn save_stored_admissions(&self, stored: &[StoredAdmission]) -> Result<(), StoreError> {
    match self {
      Store::Memory(s) => {
        s.save_stored_admissions(stored);
        Ok(())
      }
      Store::Mongo(s) => s.save_stored_admissions(stored).await,
    }
  }

  /// See [`MongoStore::lease`].
  pub async fn lease(
    &self,
    slot: &LeaseSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
    expires_at: Millis,
  ) -> Result<Grant, StoreError> {
    match self {
      Store::Memory(s) => s.lease(slot, want, limit, holder, expires_at),
      Store::Mongo(s) => s.lease(slot, want, limit, holder, expires_at).await,
    }
  }

  /// See [`MongoStore::lease_slice`].
  pub async fn lease_slice(
    &self,
    slot: &SliceSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
  ) -> Result<Grant, StoreError> {
    match self {
      Store::Memory(s) => s.lease_slice(slot, want, limit, holder),
      Store::Mongo(s) => s.lease_slice(slot, want, limit, holder).await,
    }
  }

  /// See [`MongoStore::release_slice`].
  pub async fn release_slice(
    &self,
    slot: &SliceSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    match self {
      Store::Memory(s) => s.release_slice(slot, holder, unused),
      Store::Mongo(s) => s.release_slice(slot, holder, unused).await,
    }
  }

  /// See [`MongoStore::release`].
  pub async fn release(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    match self {
      Store::Memory(s) => s.release(slot, holder, unused),
      Store::Mongo(s) => s.release(slot, holder, unused).await,
    }
  }

  /// See [`MongoStore::consume`].
  pub async fn consume(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    spent: u64,
  ) -> Result<u64, StoreError> {
    match self {
      Store::Memory(s) => s.consume(slot, holder, spent),
      Store::Mongo(s) => s.consume(slot, holder, spent).await,
    }
  }

  /// See [`MongoStore::reclaim_expired`].
  pub async fn reclaim_expired(&self, now: Millis) -> Result<u64, StoreError> {
    match self {
      Store::Memory(s) => Ok(s.reclaim_expired(now)),
      Store::Mongo(s) => s.reclaim_expired(now).await,
    }
  }

  /// Database round trips made so far (for the memory store, those a database would have made).
  pub fn ops(&self) -> u64 {
    match self {
      Store::Memory(s) => s.ops(),
      Store::Mongo(s) => s.ops(),
    }
  }

  /// Closes the database connection, if any; calls after this fail.
  pub async fn close(&self) {
    if let Store::Mongo(s) = self {
      s.close().await;
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::clock::DAY_MS;
  use crate::core::snapshot::{UsageIds, WindowRecord};

  #[tokio::test]
  async fn the_memory_store_serves_the_whole_contract_through_the_enum() {
    let store = Store::Memory(Box::default());
    let window = WindowRecord {
      current: 1,
      limit: 30,
      reset_time: 10_000,
    };
    let key = KeyRecord {
      api_key: "k".into(),
      is_active: true,
      last_used: 0,
      rpm: window,
      rpd: window,
      tpm: window,
      error_count: 0,
      last_error: None,
      last_error_time: None,
    };
    store.save_keys(std::slice::from_ref(&key)).await.unwrap();
    assert_eq!(store.load(0, &[]).await.unwrap(), vec![key]);
    let usage = UsageRecord {
      id: UsageIds::new(unique_name()).next_id(),
      api_key: "k".into(),
      timestamp: 0,
      tokens_used: 1,
      success: true,
      error: None,
      response_time: 1.0,
    };
    assert_eq!(
      store.append_usage(&[usage.clone(), usage]).await.unwrap(),
      1
    );
    let slot = LeaseSlot {
      api_key: "k",
      window: "rpd",
      window_id: 0,
      window_end: DAY_MS,
    };
    let grant = store.lease(&slot, 50, 30, "h", 100).await.unwrap();
    assert_eq!((grant.granted, grant.holders), (30, 1));
    assert_eq!(store.consume(&slot, "h", 10).await.unwrap(), 10);
    assert_eq!(store.release(&slot, "h", 5).await.unwrap(), 5);
    assert_eq!(store.reclaim_expired(200).await.unwrap(), 15);
    assert_eq!(store.ops(), 7);
    store.close().await;
  }
}
