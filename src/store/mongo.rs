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
use super::usage_query::UsageReader;
use crate::core::clock::Millis;
use crate::core::snapshot::{BudgetRecord, KeyRecord, UsageRecord};
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
    self
      .upsert_budgets(budgets, |b| self.naming.stored(&b.subject))
      .await
  }

  /// [`Self::save_budgets`] for records whose subject is already the stored name (spilled by an
  /// earlier run).
  pub async fn save_stored_budgets(&self, budgets: &[BudgetRecord]) -> Result<(), StoreError> {
    self.upsert_budgets(budgets, |b| b.subject.clone()).await
  }

  async fn upsert_budgets(
    &self,
    budgets: &[BudgetRecord],
    name: impl Fn(&BudgetRecord) -> String,
  ) -> Result<(), StoreError> {
    for chunk in budgets.chunks(KEY_BATCH) {
      let updates: Vec<Document> = chunk
        .iter()
        .map(|b| {
          let stored = name(b);
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
mod tests;
