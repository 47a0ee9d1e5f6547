//! Write-behind persistence: the pool answers from memory, and one task on the tokio runtime
//! writes what changed to MongoDB in batches, every flush interval and whenever a batch of
//! recorded calls is waiting. Key documents are coalesced (a key changed a thousand times in an
//! interval is written once); usage documents go in with `insert_many`, and their ids make a
//! resent batch harmless, so a failed write simply keeps its batch for the next try.
//!
//! When the server cannot be reached at start-up the pool runs in memory and the task keeps trying
//! in the background; once connected it loads what the database holds, merges it into the pool
//! (larger counters win, see [`KeyPool::import`]) and writes everything, queued calls included.
//!
//! Every write is bounded in time, so a hung database never holds up closing: what it did not
//! take by then goes to a spill file (see `spill`), written at the next start.

pub mod spill;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use crate::core::pool::KeyPool;
use crate::core::snapshot::{AdmissionRecord, BudgetRecord, KeyRecord, UsageIds, UsageRecord};
use crate::core::usage_queue::{DEFAULT_BATCH, DEFAULT_CAPACITY};
use crate::log::Log;
use crate::mask::scrub;
use crate::sharing::leasing::{LeaseKeeper, StoreSlot};
use crate::store::{
  unique_name, KeyNaming, KeyStorage, MongoStore, Store, StoreError, UsageSource,
  DEFAULT_CONNECT_TIMEOUT, DEFAULT_DB_NAME,
};
use spill::{Claim, Spill, SpilledKey};

/// The line operators grep for, at start-up and whenever writes work again.
pub const CONNECTED_LINE: &str = "✅ MongoDB connection established for API key management";

/// Where and how to persist.
#[derive(Debug, Clone)]
pub struct PersistOptions {
  pub uri: String,
  pub db_name: String,
  /// How long a connection attempt may take before the pool runs in memory (default 2 s).
  pub connect_timeout: Duration,
  /// How often changes are written (default 1 s): at most this much is lost in a crash.
  pub flush_interval: Duration,
  /// How often a pool running in memory tries to reach the server again (default 3 s).
  pub retry_interval: Duration,
  /// How often operators' decisions made in other processes (keys added, removed, disabled,
  /// enabled) are read from the store (default 2 s).
  pub key_sync_interval: Duration,
  /// Recorded calls that trigger a write before the interval is up (default 500).
  pub batch_size: usize,
  /// Recorded calls kept while the server is away, at most (default 10,000), in the pool's queue
  /// and again in the batch being retried; past that the oldest are dropped and counted.
  pub queue_capacity: usize,
  /// Share each key's RPM and RPD with every process using the same database (default on):
  /// see `share` and `leasing`.
  pub share_quota: bool,
  /// How keys are named in documents: plaintext unless set (the bindings set it from
  /// `KeyStorage::resolve`, which never picks plaintext unasked).
  pub key_storage: KeyStorage,
  /// How long closing may wait for the database; what it did not take by then is spilled.
  pub close_timeout: Duration,
  /// Where what the database did not take before closing is kept for the next start (see
  /// `spill`; default: the system's temporary directory).
  pub spill_dir: PathBuf,
  /// Where usage statistics come from: connected to the usage collection while the store is.
  pub usage: UsageSource,
}

impl PersistOptions {
  /// The defaults, for `uri`.
  pub fn new(uri: String) -> Self {
    Self {
      uri,
      db_name: DEFAULT_DB_NAME.to_owned(),
      connect_timeout: DEFAULT_CONNECT_TIMEOUT,
      flush_interval: Duration::from_secs(1),
      retry_interval: Duration::from_secs(3),
      key_sync_interval: Duration::from_secs(2),
      batch_size: DEFAULT_BATCH,
      queue_capacity: DEFAULT_CAPACITY,
      share_quota: true,
      key_storage: KeyStorage::Plaintext,
      close_timeout: Duration::from_secs(3),
      spill_dir: spill::default_dir(),
      usage: UsageSource::default(),
    }
  }
}

/// How start-up went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
  /// Connected; the stored state was merged into the pool.
  Connected,
  /// Not connected, for this reason: the pool runs in memory while the task keeps trying.
  Fallback(String),
}

/// What the writer has done, for tests, benchmarks and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistStats {
  /// Processes seen sharing the keys' quota, this one included; 0 when the quota is not shared.
  pub peers: usize,
  /// Connected, and the last write (if any) succeeded.
  pub connected: bool,
  /// Database round trips made, failed ones included.
  pub ops: u64,
  /// Recorded calls waiting in the pool's queue.
  pub queued: usize,
  /// Recorded calls taken from the queue whose write has not succeeded yet.
  pub pending: usize,
  /// Recorded calls lost: dropped because the queue was full, or not written at close and not
  /// spilled either.
  pub dropped: u64,
  /// Recorded calls kept in a spill file at close, for the next start to write.
  pub spilled: u64,
}

/// How long a write may take in normal operation before it counts as failed and is tried again.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
  pool: Arc<KeyPool>,
  naming: Arc<KeyNaming>,
  /// The connection, for the leasing task too.
  store: Arc<StoreSlot>,
  log: Arc<dyn Log>,
  wake: Arc<Notify>,
  closing: AtomicBool,
  /// Wakes a write in progress when closing starts.
  close_requested: Notify,
  connected: AtomicBool,
  ops: AtomicU64,
  /// Recorded calls taken from the pool's queue and not written yet (a batch being written stays
  /// here until it is), and operators' decisions and key documents likewise: what closing spills
  /// if it must.
  pending: Mutex<Vec<UsageRecord>>,
  pending_admissions: Mutex<Vec<AdmissionRecord>>,
  pending_keys: Mutex<Vec<KeyRecord>>,
  /// Changed budgets of a write not known to have succeeded, as [`Self::pending_keys`].
  pending_budgets: Mutex<Vec<BudgetRecord>>,
  spill: Spill,
  /// This process's name for its spill file.
  writer: String,
  /// Calls spilled, and calls lost at close.
  spilled: AtomicU64,
  lost: AtomicU64,
  /// Keys sealed under another secret were found and logged.
  unreadable_logged: AtomicBool,
}

/// The running writer. Dropping it leaves the task running until the runtime ends; call
/// [`WriteBehind::close`] (or [`WriteBehind::stop`]) to flush and end it.
pub struct WriteBehind {
  shared: Arc<Shared>,
  task: Mutex<Option<JoinHandle<()>>>,
  keeper: Option<LeaseKeeper>,
  close_timeout: Duration,
}

/// Connects, follows the operators' decisions stored there, loads the stored keys and merges them
/// into the pool, then marks every key for the next write, so the database ends up with one
/// document per key in the merged state.
async fn connect(shared: &Shared, options: &PersistOptions) -> Result<Store, StoreError> {
  let mongo = MongoStore::connect(&options.uri, &options.db_name, options.connect_timeout)
    .await?
    .with_naming(shared.naming.clone());
  let reader = mongo.usage_reader()?;
  let store = Store::Mongo(Box::new(mongo));
  let pool = &shared.pool;
  let loaded = async {
    follow_admissions(shared, &store).await?;
    let keys = store.load(pool.now(), pool.names().keys()).await?;
    Ok::<_, StoreError>((keys, store.load_budgets().await?))
  };
  match loaded.await {
    Ok((records, budgets)) => {
      pool.import(&records);
      pool.import_budgets(&budgets, |subject| store.naming().stored(subject));
      // Before the keys are marked changed: a spilled key document merged now is the pool's own
      // state, not a local change that outweighs the stored one.
      let spilled = claim_spilled(shared);
      let others = spilled
        .as_ref()
        .map(|claim| Others {
          keys: import_spilled_keys(shared, &claim.spilled.keys, &records),
          budgets: import_spilled_budgets(shared, &store, &claim.spilled.budgets, &budgets),
        })
        .unwrap_or_default();
      pool.mark_all_dirty();
      options.usage.connect(reader);
      if let Some(claim) = spilled {
        write_spilled(shared, &store, claim, &others).await;
      }
      Ok(store)
    }
    Err(e) => {
      reader.close().await;
      store.close().await;
      Err(e)
    }
  }
}

/// Follows the operators' decisions other processes stored (see [`KeyPool::follow_admissions`]).
/// A key added elsewhere is recovered from its sealed copy; one sealed under another secret, or
/// stored without one, cannot be, and is left out (logged once per connection).
async fn follow_admissions(shared: &Shared, store: &Store) -> Result<(), StoreError> {
  let stored = store.load_admissions().await?;
  let names = shared.pool.names();
  let mut unreadable = 0;
  let records: Vec<AdmissionRecord> = stored
    .into_iter()
    .filter_map(|a| {
      let known = names
        .position_of_stored(&a.stored)
        .and_then(|i| names.get(i));
      let key = known
        .map(str::to_owned)
        .or_else(|| store.naming().recover(&a.stored, a.sealed.as_deref()));
      if key.is_none() {
        unreadable += 1;
      }
      Some(AdmissionRecord {
        api_key: key?,
        admission: a.admission,
        changed_at: a.changed_at,
        added: a.added,
        project: a.project,
      })
    })
    .collect();
  shared.pool.follow_admissions(&records);
  if unreadable > 0 && !shared.unreadable_logged.swap(true, Ordering::Relaxed) {
    shared.log.warn(&format!(
      "⚠️ {unreadable} keys added in other processes cannot be used here: they are stored sealed \
       under a secret this process does not have (KEY_MANAGER_FINGERPRINT_SECRET)"
    ));
  }
  Ok(())
}

/// Takes over the spill files of this database (an earlier run, or this one, could not write what
/// they hold before closing), if there are any.
fn claim_spilled(shared: &Shared) -> Option<Claim> {
  match shared.spill.claim(&shared.writer) {
    Ok(claim) if !claim.is_empty() => Some(claim),
    Ok(_) => None,
    Err(e) => {
      shared.log.warn(&format!(
        "⚠️ The spill files in {} cannot be read: {e}",
        shared.spill.file().display()
      ));
      None
    }
  }
}

/// Merges spilled key documents into the pool, each with what the database holds for its key
/// (`stored`, as loaded: see [`spill::merge_key`]), and the pool's merge then keeps the larger
/// counts again. Returns the merged documents of keys this process is not configured with, to be
/// written as they are.
fn import_spilled_keys(
  shared: &Shared,
  spilled: &[SpilledKey],
  stored: &[KeyRecord],
) -> Vec<KeyRecord> {
  let now = shared.pool.now();
  let names = shared.pool.names();
  let (known, others): (Vec<KeyRecord>, Vec<KeyRecord>) = spilled
    .iter()
    .map(|k| {
      let theirs = stored.iter().find(|s| s.api_key == k.record.api_key);
      spill::merge_key(k, theirs, now)
    })
    .partition(|r| names.position_of_stored(&r.api_key).is_some());
  shared.pool.import(&known);
  others
}

/// Spilled documents of keys and budgets this process does not have, merged with the stored ones:
/// written as they are.
#[derive(Debug, Default)]
struct Others {
  keys: Vec<KeyRecord>,
  budgets: Vec<BudgetRecord>,
}

/// Merges spilled budgets into the pool (see [`KeyPool::import_budgets`]), those spilled twice (by
/// two processes) merged first; returns the others, each merged with what the database holds for
/// it (`stored`, as loaded), see [`spill::merge_budget`].
fn import_spilled_budgets(
  shared: &Shared,
  store: &Store,
  spilled: &[BudgetRecord],
  stored: &[BudgetRecord],
) -> Vec<BudgetRecord> {
  let now = shared.pool.now();
  let mut merged: Vec<BudgetRecord> = Vec::new();
  for b in spilled {
    match merged.iter_mut().find(|m| m.subject == b.subject) {
      Some(m) => *m = spill::merge_budget(b, Some(&*m), now),
      None => merged.push(b.clone().at(now)),
    }
  }
  shared
    .pool
    .import_budgets(&merged, |subject| store.naming().stored(subject))
    .into_iter()
    .map(|b| spill::merge_budget(b, stored.iter().find(|s| s.subject == b.subject), now))
    .collect()
}

/// Writes what claimed spill files hold: operators' decisions, recorded calls, the key documents
/// and the budgets (the pool's, which the spilled ones were merged into, and `others`, spilled for
/// keys and budgets this process does not have), then deletes the files. Written again, they
/// change nothing; on a failure the files stay claimed for the next connection.
async fn write_spilled(shared: &Shared, store: &Store, claim: Claim, others: &Others) {
  let spilled = &claim.spilled;
  let keys = (!spilled.keys.is_empty()).then(|| take_keys(shared));
  let budgets = (!spilled.budgets.is_empty()).then(|| take_budgets(shared));
  let written = async {
    store.save_stored_admissions(&spilled.admissions).await?;
    store.append_stored_usage(&spilled.calls).await?;
    if let Some(keys) = &keys {
      store.save_keys(keys).await?;
      shared.pending_keys.lock().clear();
      store.save_stored_keys(&others.keys).await?;
    }
    if let Some(budgets) = &budgets {
      store.save_budgets(budgets).await?;
      shared.pending_budgets.lock().clear();
      store.save_stored_budgets(&others.budgets).await?;
    }
    Ok::<_, StoreError>(())
  };
  // Not written in time: left for the next connection, the files staying claimed by this writer
  // (the pool's keys stay pending for the next flush).
  if !matches!(timeout(WRITE_TIMEOUT, written).await, Ok(Ok(()))) {
    return;
  }
  let what = spill::describe(
    spilled.calls.len(),
    spilled.keys.len(),
    spilled.budgets.len(),
    spilled.admissions.len(),
  );
  if claim.done().is_ok() {
    shared.log.info(&format!(
      "✅ Wrote {what} an earlier run kept in a spill file"
    ));
  }
}

/// The changed keys to write, those of a write not known to have succeeded included, as they are
/// now. They stay pending until written (clear [`Shared::pending_keys`] then): a write cut short
/// (a timeout, a close that cannot wait) must not leave them taken for written.
fn take_keys(shared: &Shared) -> Vec<KeyRecord> {
  let mut pending = shared.pending_keys.lock();
  shared.pool.mark_dirty(&pending);
  *pending = shared.pool.export_dirty();
  pending.clone()
}

/// The changed budgets to write, as [`take_keys`] (clear [`Shared::pending_budgets`] once written).
fn take_budgets(shared: &Shared) -> Vec<BudgetRecord> {
  let mut pending = shared.pending_budgets.lock();
  shared.pool.mark_budgets_dirty(&pending);
  *pending = shared.pool.export_dirty_budgets();
  pending.clone()
}

/// Writes the operators' decisions, the changed keys, then the recorded calls (those of an earlier
/// failed try first). On a failure (or when cut short) the keys, calls and decisions stay pending,
/// and the next try writes the keys' state as it is then.
async fn flush(shared: &Shared, store: &Store, capacity: usize) -> Result<(), StoreError> {
  let pool = &shared.pool;
  let admissions = {
    let mut pending = shared.pending_admissions.lock();
    pending.extend(pool.export_admissions());
    pending.clone()
  };
  if !admissions.is_empty() {
    store.save_admissions(&admissions).await?;
    shared.pending_admissions.lock().drain(..admissions.len());
  }
  let keys = take_keys(shared);
  if !keys.is_empty() {
    store.save_keys(&keys).await?;
    shared.pending_keys.lock().clear();
  }
  let budgets = take_budgets(shared);
  if !budgets.is_empty() {
    store.save_budgets(&budgets).await?;
    shared.pending_budgets.lock().clear();
  }
  loop {
    // The batch stays pending until written: a close that cannot wait spills it.
    let batch = {
      let mut pending = shared.pending.lock();
      let room = capacity.saturating_sub(pending.len());
      pending.extend(pool.take_usage(room));
      pending.clone()
    };
    if batch.is_empty() {
      return Ok(());
    }
    store.append_usage(&batch).await?;
    shared.pending.lock().drain(..batch.len());
  }
}

/// Keeps in this process's spill file what was recorded or changed and not written: closing could
/// not wait for the database. Logs what; counts the calls that could not be kept either as lost.
fn spill_rest(shared: &Shared) {
  let naming = &shared.naming;
  let pool = &shared.pool;
  let mut calls = std::mem::take(&mut *shared.pending.lock());
  calls.extend(pool.take_usage(usize::MAX));
  let mut admissions = std::mem::take(&mut *shared.pending_admissions.lock());
  admissions.extend(pool.export_admissions());
  pool.mark_dirty(&std::mem::take(&mut *shared.pending_keys.lock()));
  let keys = pool.export_dirty();
  let budgets: Vec<BudgetRecord> = take_budgets(shared)
    .into_iter()
    .map(|b| BudgetRecord {
      subject: naming.stored(&b.subject),
      ..b
    })
    .collect();
  if calls.is_empty() && admissions.is_empty() && keys.is_empty() && budgets.is_empty() {
    return;
  }
  let calls: Vec<UsageRecord> = calls.iter().map(|u| naming.stored_usage(u)).collect();
  let spilled_at = pool.now();
  let keys: Vec<SpilledKey> = keys
    .into_iter()
    .map(|k| SpilledKey {
      record: KeyRecord {
        api_key: naming.stored(&k.api_key),
        ..k
      },
      spilled_at,
    })
    .collect();
  // A key added at run time that cannot be sealed could not be stored at all.
  let admissions: Vec<_> = admissions
    .iter()
    .filter_map(|a| naming.stored_admission(a).ok())
    .collect();
  let what = spill::describe(calls.len(), keys.len(), budgets.len(), admissions.len());
  match shared.spill.write(&calls, &keys, &budgets, &admissions) {
    Ok(_) => {
      shared
        .spilled
        .fetch_add(calls.len() as u64, Ordering::Relaxed);
      shared.log.warn(&format!(
        "⚠️ MongoDB did not take {what} before closing: kept in {}, written at the next start",
        shared.spill.file().display()
      ));
    }
    Err(e) => {
      shared.lost.fetch_add(calls.len() as u64, Ordering::Relaxed);
      shared.log.warn(&format!(
        "❌ Lost {what}: MongoDB did not take them before closing, and {} cannot be written: {e}",
        shared.spill.file().display()
      ));
    }
  }
}

async fn run(shared: Arc<Shared>, options: PersistOptions, mut store: Option<Arc<Store>>) {
  let mut failing = false;
  let mut next_connect = Instant::now() + options.retry_interval;
  let mut next_sync = Instant::now() + options.key_sync_interval;
  let close_by = loop {
    if !shared.closing.load(Ordering::Acquire) {
      let wait = match store {
        Some(_) => options.flush_interval,
        None => next_connect.saturating_duration_since(Instant::now()),
      };
      tokio::select! {
        _ = sleep(wait) => {}
        _ = shared.wake.notified() => {}
      }
    }
    let closing = shared.closing.load(Ordering::Acquire);
    // A hung database must not hold the writer, least of all when closing.
    let deadline = Instant::now()
      + match closing {
        true => options.close_timeout,
        false => WRITE_TIMEOUT,
      };
    // Closing tries once more, so that what was recorded while the server was away is not lost
    // when it is back by then.
    if store.is_none() && (closing || Instant::now() >= next_connect) {
      match tokio::time::timeout_at(deadline, connect(&shared, &options)).await {
        Ok(Ok(s)) => {
          shared.log.info(CONNECTED_LINE);
          let s = Arc::new(s);
          *shared.store.lock() = Some(s.clone());
          store = Some(s);
        }
        _ => next_connect = Instant::now() + options.retry_interval,
      }
    }
    if let Some(s) = &store {
      let sync = !closing && Instant::now() >= next_sync;
      let round = async {
        flush(&shared, s, options.queue_capacity).await?;
        if sync {
          follow_admissions(&shared, s).await?;
        }
        Ok(())
      };
      // A close during a write cuts it short: the close's own try, bounded by its timeout,
      // follows at once, and what neither wrote is spilled.
      let result = tokio::select! {
        timed = tokio::time::timeout_at(deadline, round) => {
          timed.unwrap_or(Err(StoreError::Unreachable(WRITE_TIMEOUT)))
        }
        _ = shared.close_requested.notified(), if !closing => {
          Err(StoreError::Unreachable(WRITE_TIMEOUT))
        }
      };
      if sync {
        next_sync = Instant::now() + options.key_sync_interval;
      }
      match result {
        Ok(()) => {
          if failing {
            shared.log.info(CONNECTED_LINE);
          }
          failing = false;
        }
        Err(e) => {
          if !failing {
            // Driver errors can quote documents, and so keys.
            shared.log.warn(&format!(
              "⚠️ MongoDB write failed; keeping the changes for the next try: {}",
              scrub(&e.to_string(), shared.pool.names().keys())
            ));
          }
          failing = true;
        }
      }
      shared.ops.store(s.ops(), Ordering::Relaxed);
      shared.connected.store(!failing, Ordering::Relaxed);
    }
    if closing {
      break deadline;
    }
  };
  spill_rest(&shared);
  shared.store.lock().take();
  if let Some(reader) = options.usage.disconnect() {
    let _ = tokio::time::timeout_at(close_by + Duration::from_millis(100), reader.close()).await;
  }
  if let Some(s) = store {
    // A hung server holds the driver's shutdown as well: it gets what is left of the close's
    // time, and a little more.
    let _ = tokio::time::timeout_at(close_by + Duration::from_millis(100), s.close()).await;
  }
  shared.connected.store(false, Ordering::Relaxed);
}

impl WriteBehind {
  /// Starts persisting `pool`: queues its recorded calls from now on, tries to connect once
  /// (within the connect timeout), and spawns the writer. Must run inside a tokio runtime.
  pub async fn start(
    pool: Arc<KeyPool>,
    options: PersistOptions,
    log: Arc<dyn Log>,
  ) -> (Self, Started) {
    let wake = Arc::new(Notify::new());
    let writer_wake = wake.clone();
    pool.enable_usage_queue(
      options.queue_capacity,
      options.batch_size,
      UsageIds::new(unique_name()),
      Arc::new(move || writer_wake.notify_one()),
    );
    let naming = Arc::new(KeyNaming::new(options.key_storage.clone()));
    // Before connecting: URLs name keys by their stored names whether connected or not, and a key
    // added before the connection must be one the store can keep.
    let namer = naming.clone();
    pool.set_namer(Arc::new(move |key: &str| namer.stored(key)));
    pool.refuse_additions((!naming.keeps_added_keys()).then(|| StoreError::CannotSeal.to_string()));
    // This process's name for its spill file: unique across processes and hosts.
    let writer = unique_name();
    let shared = Arc::new(Shared {
      pool: pool.clone(),
      naming,
      store: Arc::new(StoreSlot::new(None)),
      log,
      wake,
      closing: AtomicBool::new(false),
      close_requested: Notify::new(),
      connected: AtomicBool::new(false),
      ops: AtomicU64::new(0),
      pending: Mutex::new(Vec::new()),
      pending_admissions: Mutex::new(Vec::new()),
      pending_keys: Mutex::new(Vec::new()),
      pending_budgets: Mutex::new(Vec::new()),
      spill: Spill::new(&options.spill_dir, &options.uri, &options.db_name, &writer),
      writer,
      spilled: AtomicU64::new(0),
      lost: AtomicU64::new(0),
      unreadable_logged: AtomicBool::new(false),
    });
    let (store, started) = match connect(&shared, &options).await {
      Ok(store) => {
        let store = Arc::new(store);
        *shared.store.lock() = Some(store.clone());
        shared.connected.store(true, Ordering::Relaxed);
        // The merged state goes out at once, not an interval later.
        shared.wake.notify_one();
        (Some(store), Started::Connected)
      }
      Err(e) => (None, Started::Fallback(e.to_string())),
    };
    let keeper = match options.share_quota {
      true => Some(LeaseKeeper::start(pool, shared.store.clone(), shared.log.clone()).await),
      false => None,
    };
    if let Some(store) = &store {
      shared.ops.store(store.ops(), Ordering::Relaxed);
    }
    let close_timeout = options.close_timeout;
    let task = tokio::spawn(run(shared.clone(), options, store));
    let writer = Self {
      shared,
      task: Mutex::new(Some(task)),
      keeper,
      close_timeout,
    };
    (writer, started)
  }

  /// Writes what is left (when connected) and stops the writer; resolves when done. Close the pool
  /// first, so that nothing changes after the last write. Idempotent.
  pub async fn close(&self) {
    if let Some(keeper) = &self.keeper {
      keeper.close().await;
    }
    self.stop();
    let task = self.task.lock().take();
    if let Some(mut task) = task {
      // The writer bounds its own last write; this only guards against it hanging anyway.
      let grace = self.close_timeout + WRITE_TIMEOUT;
      if timeout(grace, &mut task).await.is_err() {
        task.abort();
        spill_rest(&self.shared);
      }
    }
  }

  /// Asks the writer to write what is left and stop, without waiting for it: for an owner that
  /// goes away without closing.
  pub fn stop(&self) {
    self.shared.closing.store(true, Ordering::Release);
    self.shared.wake.notify_one();
    self.shared.close_requested.notify_one();
  }

  pub fn stats(&self) -> PersistStats {
    let (queued, dropped) = self.shared.pool.usage_backlog();
    PersistStats {
      peers: self.keeper.as_ref().map_or(0, LeaseKeeper::peers),
      connected: self.shared.connected.load(Ordering::Relaxed),
      // Live while connected (the leasing task's round trips land between flushes); the last
      // figure once the connection is gone.
      ops: match self.shared.store.lock().as_ref() {
        Some(store) => store.ops(),
        None => self.shared.ops.load(Ordering::Relaxed),
      },
      queued,
      pending: self.shared.pending.lock().len(),
      dropped: dropped + self.shared.lost.load(Ordering::Relaxed),
      spilled: self.shared.spilled.load(Ordering::Relaxed),
    }
  }
}

#[cfg(test)]
mod tests;
