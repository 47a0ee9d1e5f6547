//! The MongoDB store: SPEC section 3's collections and indexes through the official driver. Every
//! write is one round trip per batch, and every round trip is counted in [`MongoStore::ops`], so
//! the layer above can show it stays off the hot path.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error as DriverError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};

use super::documents::{
  budget_document, budget_from_document, key_document, key_from_document, usage_document,
};
use super::error::StoreError;
use super::naming::{KeyNaming, KeyStorage};
use super::records::{BudgetRecord, KeyRecord, UsageRecord};
use super::usage_query::UsageReader;
use crate::core::clock::Millis;
use crate::mask::scrub;
use crate::store::fingerprint::digest_name;

/// `MONGODB_DB_NAME` when unset, as in the old service.
pub const DEFAULT_DB_NAME: &str = "rag_db";
/// How long start-up waits for the server before the manager falls back to memory.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const KEYS: &str = "api_keys";
pub(super) const USAGE: &str = "api_key_usage";
const LEASES: &str = "api_key_leases";
pub(super) const ADMISSIONS: &str = "api_key_admissions";
/// One document per (project, model) budget: its windows and rest (see [`BudgetRecord`]).
const BUDGETS: &str = "api_key_budgets";

/// Statements per `update` command and documents per `insert_many`: far below the server's
/// 100,000-write and 16 MiB limits, so the driver never splits a batch into more round trips than
/// are counted.
const KEY_BATCH: usize = 500;
const USAGE_BATCH: usize = 1_000;
/// Documents per reply when reading keys or live leases: a pool's worth in one round trip, where
/// the driver's default first batch is 101.
pub(super) const READ_BATCH: u32 = 10_000;

/// How long a lease document outlives its window before the server's TTL monitor may delete it:
/// room for clocks that disagree about when the window ended.
const LEASE_GRACE: Duration = Duration::from_secs(3_600);

/// MongoDB's duplicate key error.
pub(super) const DUPLICATE_KEY: i32 = 11_000;
/// An index on the same keys exists with other options or another name (IndexOptionsConflict,
/// IndexKeySpecsConflict): a database the old service or an operator set up. It still serves.
const INDEX_CONFLICTS: [i32; 2] = [85, 86];

/// The server's code for an error that one operation reported, if it has one.
pub(super) fn error_code(e: &DriverError) -> Option<i32> {
  match e.kind.as_ref() {
    ErrorKind::Command(c) => Some(c.code),
    ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
    _ => None,
  }
}

/// Reads the reply of a raw write command on the keys `names`: any write error or write concern
/// error fails the batch. A duplicate-key message quotes the key, so the keys are masked in it.
fn check_write_reply(reply: &Document, names: &[String]) -> Result<(), StoreError> {
  if let Ok(errors) = reply.get_array("writeErrors") {
    if let Some(first) = errors.first() {
      return Err(StoreError::Write {
        failed: errors.len(),
        first: scrub(&message_of(first), names),
      });
    }
  }
  if let Some(concern) = reply.get("writeConcernError") {
    return Err(StoreError::WriteConcern(message_of(concern)));
  }
  Ok(())
}

fn message_of(error: &Bson) -> String {
  match error {
    Bson::Document(d) => d.get_str("errmsg").unwrap_or("no message").to_owned(),
    other => other.to_string(),
  }
}

fn index(keys: Document, options: Option<IndexOptions>) -> IndexModel {
  IndexModel::builder().keys(keys).options(options).build()
}

/// A connection to one database holding `api_keys`, `api_key_usage` and `api_key_leases`.
pub struct MongoStore {
  client: Client,
  /// What the client was built with, for the usage reader's own client.
  options: ClientOptions,
  pub(super) db: Database,
  keys: Collection<Document>,
  budgets: Collection<Document>,
  usage: Collection<Document>,
  pub(super) leases: Collection<Document>,
  pub(super) admissions: Collection<Document>,
  ops: AtomicU64,
  /// How keys are named in documents.
  pub(super) naming: Arc<KeyNaming>,
}

impl MongoStore {
  /// Connects, checks within `connect_timeout` that the server answers, and creates the indexes.
  /// Must run inside a tokio runtime. The timeout also becomes the driver's connect and
  /// server-selection timeout unless the URI sets them, so a server that goes away later fails
  /// each call within about as long instead of the driver's 30 s.
  pub async fn connect(
    uri: &str,
    db_name: &str,
    connect_timeout: Duration,
  ) -> Result<Self, StoreError> {
    let unreachable = |_| StoreError::Unreachable(connect_timeout);
    let deadline = tokio::time::Instant::now() + connect_timeout;
    // Parsing resolves `mongodb+srv` names through DNS, so it is bounded too.
    let mut options = tokio::time::timeout_at(deadline, ClientOptions::parse(uri))
      .await
      .map_err(unreachable)??;
    options.connect_timeout.get_or_insert(connect_timeout);
    options
      .server_selection_timeout
      .get_or_insert(connect_timeout);
    options
      .app_name
      .get_or_insert_with(|| "gemini-key-manager".to_owned());
    let client = Client::with_options(options.clone())?;
    let db = client.database(db_name);
    let store = Self {
      options,
      keys: db.collection(KEYS),
      budgets: db.collection(BUDGETS),
      usage: db.collection(USAGE),
      leases: db.collection(LEASES),
      admissions: db.collection(ADMISSIONS),
      db,
      client,
      ops: AtomicU64::new(0),
      naming: Arc::new(KeyNaming::plaintext()),
    };
    store.count_op();
    tokio::time::timeout_at(deadline, store.db.run_command(doc! { "ping": 1 }))
      .await
      .map_err(unreachable)??;
    store.create_indexes().await?;
    Ok(store)
  }

  /// SPEC section 3's indexes, and a TTL index that drops lease documents after their window. One
  /// command per index, so an index the old service made differently fails only itself.
  async fn create_indexes(&self) -> Result<(), StoreError> {
    let unique = IndexOptions::builder().unique(true).build();
    let ttl = IndexOptions::builder().expire_after(LEASE_GRACE).build();
    let wanted = [
      (
        &self.keys,
        index(doc! { "apiKey": 1 }, Some(unique.clone())),
      ),
      (&self.keys, index(doc! { "isActive": 1 }, None)),
      (&self.keys, index(doc! { "lastUsed": 1 }, None)),
      (&self.usage, index(doc! { "apiKey": 1 }, None)),
      (&self.usage, index(doc! { "timestamp": 1 }, None)),
      (&self.usage, index(doc! { "success": 1 }, None)),
      (&self.leases, index(doc! { "windowEnd": 1 }, Some(ttl))),
      (
        &self.admissions,
        index(doc! { "apiKey": 1 }, Some(unique.clone())),
      ),
    ];
    for (collection, model) in wanted {
      self.count_op();
      match collection.create_index(model).await {
        Ok(_) => {}
        Err(e) if error_code(&e).is_some_and(|c| INDEX_CONFLICTS.contains(&c)) => {}
        Err(e) => return Err(e.into()),
      }
    }
    Ok(())
  }

  /// Names keys in documents by `naming` (plaintext, as the old service did, until this is
  /// called).
  pub fn with_naming(mut self, naming: Arc<KeyNaming>) -> Self {
    self.naming = naming;
    self
  }

  /// How keys are named in documents.
  pub fn naming(&self) -> &KeyNaming {
    &self.naming
  }

  /// A reader of the usage collection for statistics, on a connection of its own.
  pub fn usage_reader(&self) -> Result<UsageReader, StoreError> {
    UsageReader::new(&self.options, self.db.name())
  }

  /// Database round trips made so far, failed ones included.
  pub fn ops(&self) -> u64 {
    self.ops.load(Ordering::Relaxed)
  }

  pub(super) fn count_op(&self) {
    self.ops.fetch_add(1, Ordering::Relaxed);
  }

  /// Every key document, as it stands at `now`: windows whose reset time has passed restarted,
  /// each named as stored (a digest or fingerprint; the pool maps those to its keys). Documents
  /// without a string `apiKey` cannot belong to any key and are skipped. One round trip for up
  /// to 10,000 keys. Documents that name their key under another naming first (the old service's
  /// plaintext, or a digest of one of `keys` once a secret is set) are migrated: see
  /// [`Self::migrate`].
  pub async fn load(&self, now: Millis, keys: &[String]) -> Result<Vec<KeyRecord>, StoreError> {
    self.count_op();
    let mut cursor = self.keys.find(doc! {}).batch_size(READ_BATCH).await?;
    let mut records = Vec::new();
    let mut outdated = Vec::new();
    while cursor.advance().await? {
      let d = cursor.deserialize_current()?;
      let Some(record) = key_from_document(&d, now) else {
        continue;
      };
      match self.naming.migration_source(&record.api_key, keys) {
        Some(key) => outdated.push((d.get("_id").cloned().unwrap_or(Bson::Null), key, record)),
        None => records.push(record),
      }
    }
    if !matches!(self.naming.storage(), KeyStorage::Plaintext) {
      self.migrate(outdated, keys, &mut records).await?;
    }
    Ok(records)
  }

  /// Rewrites documents that name their key under another naming (`outdated`: each document's
  /// `_id`, its key, and its record) under this one. Key documents are written again under the
  /// new name (unless one is there already, which wins), then the old ones deleted; usage
  /// documents of `keys` and of those key documents get the new name in `apiKey`. Keys quoted in
  /// their error messages are masked. Resumable: a migration cut short finishes at the next load.
  async fn migrate(
    &self,
    outdated: Vec<(Bson, String, KeyRecord)>,
    keys: &[String],
    records: &mut Vec<KeyRecord>,
  ) -> Result<(), StoreError> {
    // Old stored name to key, for every name a document may still use.
    let mut sources: HashMap<String, String> = HashMap::new();
    for key in keys {
      for old in [key.clone(), digest_name(key)] {
        if self.naming.migration_source(&old, keys).is_some() {
          sources.insert(old, key.clone());
        }
      }
    }
    for (_, key, record) in &outdated {
      sources.insert(record.api_key.clone(), key.clone());
    }
    let mut names: Vec<String> = keys.to_vec();
    names.extend(outdated.iter().map(|(_, key, _)| key.clone()));
    let present: HashSet<String> = records.iter().map(|r| r.api_key.clone()).collect();
    let mut ids = Vec::with_capacity(outdated.len());
    let mut moved = Vec::new();
    for (id, key, record) in outdated {
      ids.push(id);
      if !present.contains(&self.naming.stored(&key)) {
        moved.push(KeyRecord {
          api_key: key,
          last_error: record.last_error.as_deref().map(|e| scrub(e, &names)),
          ..record
        });
      }
    }
    if !ids.is_empty() {
      self.save_keys(&moved).await?;
      self.count_op();
      self
        .keys
        .delete_many(doc! { "_id": { "$in": ids } })
        .await?;
      records.extend(moved.into_iter().map(|r| KeyRecord {
        api_key: self.naming.stored(&r.api_key),
        ..r
      }));
    }
    if sources.is_empty() {
      return Ok(());
    }
    self.count_op();
    let old_names: Vec<&String> = sources.keys().collect();
    let mut cursor = self
      .usage
      .find(doc! { "apiKey": { "$in": old_names } })
      .projection(doc! { "apiKey": 1, "error": 1 })
      .batch_size(READ_BATCH)
      .await?;
    let mut updates = Vec::new();
    while cursor.advance().await? {
      let d = cursor.deserialize_current()?;
      let (Some(id), Some(key)) = (
        d.get("_id"),
        d.get_str("apiKey").ok().and_then(|k| sources.get(k)),
      ) else {
        continue;
      };
      let mut set = doc! { "apiKey": self.naming.stored(key) };
      if let Ok(error) = d.get_str("error") {
        set.insert("error", scrub(error, &names));
      }
      updates.push(doc! { "q": { "_id": id.clone() }, "u": { "$set": set } });
    }
    for chunk in updates.chunks(KEY_BATCH) {
      self.count_op();
      let reply = self
        .db
        .run_command(doc! { "update": USAGE, "updates": chunk.to_vec(), "ordered": false })
        .await?;
      check_write_reply(&reply, &names)?;
    }
    Ok(())
  }

  /// Writes each key's whole document, inserting those not stored yet: one `update` command per
  /// 500 keys, each statement an upsert by `apiKey`. Whole-document replacements rather than
  /// `$set`, so cleared optional fields disappear, and dates stay dates on nx-27017, which turns a
  /// date given to `$set` on an existing document into a string. Fields this crate does not know
  /// (left by the old service) are dropped; `_id` is kept. Resending a batch is harmless.
  pub async fn save_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
    self
      .replace_keys(keys, |k| self.naming.stored(&k.api_key))
      .await
  }

  /// Writes the budgets' state, replacing what was stored for them; each is named by its subject
  /// in the store's naming.
  pub async fn save_budgets(&self, budgets: &[BudgetRecord]) -> Result<(), StoreError> {
    for chunk in budgets.chunks(KEY_BATCH) {
      let updates: Vec<Document> = chunk
        .iter()
        .map(|b| {
          let stored = self.naming.stored(&b.subject);
          doc! {
            "q": { "_id": &stored },
            "u": budget_document(b, &stored),
            "upsert": true,
          }
        })
        .collect();
      self.count_op();
      let reply = self
        .db
        .run_command(doc! { "update": BUDGETS, "updates": updates, "ordered": false })
        .await?;
      check_write_reply(&reply, &[])?;
    }
    Ok(())
  }

  /// Every stored budget, its subject as stored.
  pub async fn load_budgets(&self) -> Result<Vec<BudgetRecord>, StoreError> {
    self.count_op();
    let mut cursor = self.budgets.find(doc! {}).batch_size(READ_BATCH).await?;
    let mut records = Vec::new();
    while cursor.advance().await? {
      if let Some(record) = budget_from_document(&cursor.deserialize_current()?) {
        records.push(record);
      }
    }
    Ok(records)
  }

  /// [`Self::save_keys`] for records whose `api_key` is already the stored name (spilled by an
  /// earlier run).
  pub async fn save_stored_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
    self.replace_keys(keys, |k| k.api_key.clone()).await
  }

  async fn replace_keys(
    &self,
    keys: &[KeyRecord],
    name: impl Fn(&KeyRecord) -> String,
  ) -> Result<(), StoreError> {
    for chunk in keys.chunks(KEY_BATCH) {
      let updates: Vec<Document> = chunk
        .iter()
        .map(|k| {
          let stored = name(k);
          doc! {
            "q": { "apiKey": &stored },
            "u": key_document(k, &stored),
            "upsert": true,
          }
        })
        .collect();
      self.count_op();
      let reply = self
        .db
        .run_command(doc! { "update": KEYS, "updates": updates, "ordered": false })
        .await?;
      let names: Vec<String> = chunk.iter().map(|k| k.api_key.clone()).collect();
      check_write_reply(&reply, &names)?;
    }
    Ok(())
  }

  /// Inserts usage documents, one unordered `insert_many` per 1,000. Each document's `_id` is its
  /// record's [`super::UsageId`], so the records of a batch resent after a failure that are already
  /// stored are refused as duplicates and skipped, and the rest are stored. Returns how many were
  /// newly stored.
  pub async fn append_usage(&self, usage: &[UsageRecord]) -> Result<usize, StoreError> {
    self
      .insert_usage(usage, |u| self.naming.stored(&u.api_key))
      .await
  }

  /// [`Self::append_usage`] for records whose `api_key` is already the stored name (spilled by an
  /// earlier run).
  pub async fn append_stored_usage(&self, usage: &[UsageRecord]) -> Result<usize, StoreError> {
    self.insert_usage(usage, |u| u.api_key.clone()).await
  }

  async fn insert_usage(
    &self,
    usage: &[UsageRecord],
    name: impl Fn(&UsageRecord) -> String,
  ) -> Result<usize, StoreError> {
    let mut stored = 0;
    for chunk in usage.chunks(USAGE_BATCH) {
      let docs: Vec<Document> = chunk.iter().map(|u| usage_document(u, &name(u))).collect();
      self.count_op();
      stored += match self.usage.insert_many(docs).ordered(false).await {
        Ok(result) => result.inserted_ids.len(),
        Err(e) => chunk.len() - duplicates_only(&e).ok_or(e)?,
      };
    }
    Ok(stored)
  }

  /// Closes the connections. Calls made after this fail.
  pub async fn close(&self) {
    self.client.clone().shutdown().await;
  }
}

/// How many documents an `insert_many` refused, when every refusal was a duplicate `_id`.
fn duplicates_only(e: &DriverError) -> Option<usize> {
  let ErrorKind::InsertMany(failure) = e.kind.as_ref() else {
    return None;
  };
  if failure.write_concern_error.is_some() {
    return None;
  }
  let errors = failure.write_errors.as_deref().unwrap_or_default();
  (!errors.is_empty() && errors.iter().all(|w| w.code == DUPLICATE_KEY)).then_some(errors.len())
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::store::records::{UsageIds, WindowRecord, DAY_MS, MINUTE_MS};
  use crate::store::test_server::TestServer;
  use mongodb::bson::oid::ObjectId;
  use mongodb::bson::DateTime;
  use std::time::Instant;

  const NOW: Millis = 1_700_000_000_000;

  async fn connect(server: &TestServer) -> MongoStore {
    MongoStore::connect(&server.uri(), "gkm_test", DEFAULT_CONNECT_TIMEOUT)
      .await
      .expect("connect to the test server")
  }

  fn key(name: &str, rpm: u64, last_error: Option<&str>) -> KeyRecord {
    let w = |current, limit, reset_time| WindowRecord {
      current,
      limit,
      reset_time,
    };
    KeyRecord {
      api_key: name.into(),
      is_active: last_error.is_none(),
      last_used: NOW - 1_000,
      rpm: w(rpm, 30, NOW + 45_000),
      rpd: w(rpm * 2, 200, NOW + 3_600_000),
      tpm: w(rpm * 1_000, 1_000_000, NOW + 45_000),
      error_count: if last_error.is_some() { 5 } else { 0 },
      last_error: last_error.map(str::to_owned),
      last_error_time: last_error.map(|_| NOW - 2_000),
    }
  }

  async fn index_keys(c: &Collection<Document>) -> Vec<(Document, bool)> {
    let mut cursor = c.list_indexes().await.expect("list indexes");
    let mut found = Vec::new();
    while cursor.advance().await.expect("next index") {
      let model = cursor.deserialize_current().expect("index model");
      let unique = model.options.and_then(|o| o.unique).unwrap_or(false);
      found.push((model.keys, unique));
    }
    found
  }

  async fn raw_documents(c: &Collection<Document>) -> Vec<Document> {
    let mut cursor = c.find(doc! {}).await.expect("find");
    let mut docs = Vec::new();
    while cursor.advance().await.expect("next") {
      docs.push(cursor.deserialize_current().expect("document"));
    }
    docs
  }

  #[tokio::test]
  async fn connect_creates_the_spec_indexes() {
    let server = TestServer::start();
    let store = connect(&server).await;
    let keys = index_keys(&store.keys).await;
    assert!(keys.contains(&(doc! { "apiKey": 1 }, true)), "{keys:?}");
    assert!(keys.contains(&(doc! { "isActive": 1 }, false)), "{keys:?}");
    assert!(keys.contains(&(doc! { "lastUsed": 1 }, false)), "{keys:?}");
    let usage = index_keys(&store.usage).await;
    for field in ["apiKey", "timestamp", "success"] {
      assert!(usage.contains(&(doc! { field: 1 }, false)), "{usage:?}");
    }
    let admissions = index_keys(&store.admissions).await;
    assert!(
      admissions.contains(&(doc! { "apiKey": 1 }, true)),
      "{admissions:?}"
    );
    // ping + 8 indexes; connecting again finds them in place.
    assert_eq!(store.ops(), 9);
    connect(&server).await;
    store.close().await;
  }

  #[tokio::test]
  async fn saved_keys_load_back_and_one_batch_is_one_round_trip() {
    let server = TestServer::start();
    let store = connect(&server).await;
    let before = store.ops();
    store
      .save_keys(&[key("a", 3, None), key("b", 0, Some("503 unavailable"))])
      .await
      .unwrap();
    assert_eq!(store.ops() - before, 1);
    // A later save replaces: b's error is cleared, and its fields with it.
    store
      .save_keys(&[key("b", 1, None), key("c", 7, None)])
      .await
      .unwrap();
    store.save_keys(&[]).await.unwrap();
    assert_eq!(store.ops() - before, 2);
    let mut loaded = store.load(NOW, &[]).await.unwrap();
    loaded.sort_by(|x, y| x.api_key.cmp(&y.api_key));
    assert_eq!(
      loaded,
      vec![key("a", 3, None), key("b", 1, None), key("c", 7, None)]
    );
    let raw = raw_documents(&store.keys).await;
    assert_eq!(raw.len(), 3);
    let b = raw.iter().find(|d| d.get_str("apiKey") == Ok("b")).unwrap();
    assert!(b.get_datetime("lastUsed").is_ok() && !b.contains_key("lastError"));
    // A restart later: the minute windows have passed, the day window has not.
    let reopened = connect(&server).await;
    let later = reopened.load(NOW + MINUTE_MS, &[]).await.unwrap();
    let a = later.iter().find(|k| k.api_key == "a").unwrap();
    assert_eq!((a.rpm.current, a.rpd.current), (0, 6));
  }

  #[tokio::test]
  async fn large_pools_save_in_batches_of_500_and_load_whole() {
    let server = TestServer::start();
    let store = connect(&server).await;
    let keys: Vec<KeyRecord> = (0..600)
      .map(|i| key(&format!("key-{i:04}"), i % 30, None))
      .collect();
    let before = store.ops();
    store.save_keys(&keys).await.unwrap();
    assert_eq!(store.ops() - before, 2);
    let mut loaded = store.load(NOW, &[]).await.unwrap();
    loaded.sort_by(|x, y| x.api_key.cmp(&y.api_key));
    assert_eq!(loaded, keys);
  }

  #[tokio::test]
  async fn a_database_written_by_the_old_service_loads() {
    let server = TestServer::start();
    let store = connect(&server).await;
    let date = DateTime::from_millis;
    store
      .keys
      .insert_many([
        doc! {
          "_id": ObjectId::new(),
          "apiKey": "old-expired",
          "isActive": true,
          "lastUsed": date(NOW - DAY_MS),
          "limits": {
            "rpm": { "current": 30_i32, "limit": 30_i32, "resetTime": date(NOW - DAY_MS) },
            "rpd": { "current": 199_i32, "limit": 200_i32, "resetTime": date(NOW - 1) },
            "tpm": { "current": 12_345.0_f64, "limit": 1_000_000_i32, "resetTime": date(NOW - DAY_MS) },
          },
          "errorCount": 0_i32,
          "__v": 0_i32,
        },
        doc! {
          "_id": ObjectId::new(),
          "apiKey": "old-live",
          "isActive": false,
          "lastUsed": date(NOW - 10),
          "limits": {
            "rpm": { "current": 4_i64, "limit": 30_i64, "resetTime": date(NOW + 20_000) },
            "rpd": { "current": 50_i32, "limit": 200_i32, "resetTime": date(NOW + 3_600_000) },
            "tpm": { "current": 800_i32, "limit": 1_000_000_i32, "resetTime": date(NOW + 20_000) },
          },
          "errorCount": 5_i32,
          "lastError": "Request failed",
          "lastErrorTime": date(NOW - 10),
        },
        doc! { "_id": ObjectId::new(), "note": "not a key" },
      ])
      .await
      .unwrap();
    let loaded = store.load(NOW, &[]).await.unwrap();
    assert_eq!(loaded.len(), 2);
    let expired = loaded.iter().find(|k| k.api_key == "old-expired").unwrap();
    let fresh = |limit, span| WindowRecord {
      current: 0,
      limit,
      reset_time: NOW + span,
    };
    assert_eq!(expired.rpm, fresh(30, MINUTE_MS));
    assert_eq!(expired.rpd, fresh(200, DAY_MS));
    assert_eq!(expired.tpm, fresh(1_000_000, MINUTE_MS));
    assert_eq!(
      (expired.last_error.as_deref(), expired.error_count),
      (None, 0)
    );
    let live = loaded.iter().find(|k| k.api_key == "old-live").unwrap();
    assert!(!live.is_active);
    assert_eq!(
      (live.rpm.current, live.rpd.current, live.tpm.current),
      (4, 50, 800)
    );
    assert_eq!(live.last_error.as_deref(), Some("Request failed"));
    assert_eq!(live.last_error_time, Some(NOW - 10));
    // Saving over an old document keeps its _id: still one document per key.
    store.save_keys(&loaded).await.unwrap();
    assert_eq!(raw_documents(&store.keys).await.len(), 3);
  }

  #[tokio::test]
  async fn a_resent_usage_batch_adds_no_duplicates() {
    let server = TestServer::start();
    let store = connect(&server).await;
    let ids = UsageIds::new();
    let batch: Vec<UsageRecord> = (0..50)
      .map(|i| UsageRecord {
        id: ids.next_id(),
        api_key: format!("key-{}", i % 3),
        timestamp: NOW + i,
        tokens_used: 100 + i as u64,
        success: i % 5 != 0,
        error: (i % 5 == 0).then(|| "429 Too Many Requests".to_owned()),
        response_time: 120.0,
      })
      .collect();
    let before = store.ops();
    // The first attempt "failed" after storing part of the batch; the retry sends all of it.
    assert_eq!(store.append_usage(&batch[..20]).await.unwrap(), 20);
    assert_eq!(store.append_usage(&batch).await.unwrap(), 30);
    assert_eq!(store.append_usage(&batch).await.unwrap(), 0);
    assert_eq!(store.append_usage(&[]).await.unwrap(), 0);
    assert_eq!(store.ops() - before, 3);
    let docs = raw_documents(&store.usage).await;
    assert_eq!(docs.len(), 50);
    let failed = docs
      .iter()
      .filter(|d| d.get_bool("success") == Ok(false))
      .count();
    assert_eq!(failed, 10);
    assert!(docs.iter().all(|d| d.get_datetime("timestamp").is_ok()));
  }

  #[tokio::test]
  async fn plaintext_documents_migrate_to_digests_then_digests_to_fingerprints() {
    use crate::stats::usage_stats::DateRange;
    use crate::store::fingerprint::Fingerprinter;
    use crate::store::{KeyNaming, KeyStorage};

    let server = TestServer::start();
    let keys = vec![
      "AIzaSyOLD-KEY-A-00000000000000".to_owned(),
      "AIzaSyOLD-KEY-B-00000000000000".to_owned(),
    ];
    let retired = "AIzaSyRETIRED-KEY-000000000000";
    // The old service's documents: keys in plaintext, and quoted in error messages.
    let old = connect(&server).await;
    let quoting = format!("failed for {}", keys[1]);
    old
      .save_keys(&[
        key(&keys[0], 3, Some(&quoting)),
        key(&keys[1], 1, None),
        key(retired, 0, None),
      ])
      .await
      .unwrap();
    let ids = UsageIds::new();
    let usage = |k: &str, timestamp: Millis, error: Option<String>| UsageRecord {
      id: ids.next_id(),
      api_key: k.into(),
      timestamp,
      tokens_used: 7,
      success: error.is_none(),
      error,
      response_time: 12.5,
    };
    old
      .append_usage(&[
        usage(&keys[0], NOW, Some(format!("quota for {}", keys[0]))),
        usage(&keys[1], NOW + 5_000, None),
        usage(retired, NOW + 6_000, None),
      ])
      .await
      .unwrap();

    // Now with no secret: keys become digests.
    let digest = connect(&server)
      .await
      .with_naming(Arc::new(KeyNaming::new(KeyStorage::Digest)));
    let loaded = digest.load(NOW, &keys).await.unwrap();
    let mut names: Vec<String> = loaded.iter().map(|r| r.api_key.clone()).collect();
    names.sort_unstable();
    let mut expected: Vec<String> = [keys[0].as_str(), keys[1].as_str(), retired]
      .iter()
      .map(|k| digest_name(k))
      .collect();
    expected.sort_unstable();
    assert_eq!(names, expected);
    let a = loaded
      .iter()
      .find(|r| r.api_key == digest_name(&keys[0]))
      .unwrap();
    assert_eq!(a.rpm.current, 3);
    assert_eq!(a.last_error.as_deref(), Some("failed for AIzaSyOL...0000"));
    let no_key_in = |docs: &[Document], form: fn(&str) -> bool| {
      for d in docs {
        let text = d.to_string();
        for k in keys.iter().map(String::as_str).chain([retired]) {
          assert!(!text.contains(k), "{text}");
        }
        assert!(form(d.get_str("apiKey").unwrap()), "{d}");
      }
    };
    let documents = [
      raw_documents(&digest.keys).await,
      raw_documents(&digest.usage).await,
    ];
    assert_eq!((documents[0].len(), documents[1].len()), (3, 3));
    documents
      .iter()
      .for_each(|d| no_key_in(d, crate::store::fingerprint::is_digest_name));

    // A secret set later: the digests of the configured keys move to fingerprints; the retired
    // key's digest cannot be traced to a key and stays as it is.
    let f = Fingerprinter::new(b"test secret, 16+ bytes").unwrap();
    let store = connect(&server)
      .await
      .with_naming(Arc::new(KeyNaming::new(KeyStorage::Fingerprint(f.clone()))));
    let loaded = store.load(NOW, &keys).await.unwrap();
    let mut names: Vec<String> = loaded.iter().map(|r| r.api_key.clone()).collect();
    names.sort_unstable();
    let mut expected = vec![
      f.fingerprint(&keys[0]),
      f.fingerprint(&keys[1]),
      digest_name(retired),
    ];
    expected.sort_unstable();
    assert_eq!(names, expected);
    let usage = raw_documents(&store.usage).await;
    let named = |name: String| {
      usage
        .iter()
        .filter(|d| d.get_str("apiKey") == Ok(&name))
        .count()
    };
    assert_eq!(named(f.fingerprint(&keys[0])), 1);
    assert_eq!(named(f.fingerprint(&keys[1])), 1);
    assert_eq!(named(digest_name(retired)), 1);
    // Nothing left to migrate.
    assert_eq!(store.load(NOW, &keys).await.unwrap(), loaded);
    // Usage is read back by position, by date (seconds apart: the test server compares dates to
    // the second).
    let roster = crate::core::roster::Roster::new(keys.clone());
    roster.set_namer(Arc::new(move |k: &str| f.fingerprint(k)));
    let names = roster.names();
    let reader = store.usage_reader().unwrap();
    // Summed in the database: the retired key's call is not the pool's.
    let all = reader.usage(DateRange::ALL, &names).await.unwrap();
    let calls: u64 = all.buckets.iter().map(|b| b.calls).sum();
    assert_eq!((calls, all.truncated), (2, false));
    let late = reader
      .usage(
        DateRange::new(Some(NOW + 1_000), Some(NOW + 5_000)).unwrap(),
        &names,
      )
      .await
      .unwrap();
    assert_eq!(late.buckets.len(), 1, "{late:?}");
    let b = late.buckets[0];
    assert_eq!((b.key, b.calls, b.successes, b.tokens), (1, 1, 1, 7));
    assert_eq!(b.latency, crate::stats::usage_stats::latency_bucket(12.5));
    reader.close().await;
  }

  #[tokio::test]
  async fn an_unreachable_server_fails_fast() {
    let port = crate::store::test_server::free_port();
    let started = Instant::now();
    let result = MongoStore::connect(
      &format!("mongodb://127.0.0.1:{port}"),
      DEFAULT_DB_NAME,
      DEFAULT_CONNECT_TIMEOUT,
    )
    .await;
    let elapsed = started.elapsed();
    assert!(result.is_err());
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
  }
}
