//! Usage statistics from the usage collection, computed in the database: one aggregation over the
//! `timestamp` index that sums each key's calls per latency bucket (see
//! `usage_stats::latency_bucket`), so what comes back is a few hundred small documents however
//! many calls the range holds. It runs on a connection of its own and one at a time per process,
//! so a heavy query cannot take the connections the writer and the leasing task need.
//!
//! [`UsageSource`] says whether there is such a reader now: the writer connects it, the HTTP API
//! asks it.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::documents::count;
use super::error::StoreError;
use crate::core::roster::Names;
use crate::stats::usage_stats::{Bucket, DateRange, BUCKETS_PER_E};

/// Calls summed per answer at most: bounds the time a wide range can take.
pub const MAX_CALLS: i64 = 1_000_000;
/// How long the database may spend on one answer.
const MAX_TIME: Duration = Duration::from_secs(10);

/// What the database summed for a range.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUsage {
  pub buckets: Vec<Bucket>,
  /// More calls matched than [`MAX_CALLS`]: the figures cover the first of them.
  pub truncated: bool,
}

/// Reads `api_key_usage`: cheap to clone, and usable while the writer works.
#[derive(Debug, Clone)]
pub struct UsageReader {
  usage: Collection<Document>,
  /// Keeps the reader's own client alive (and closable) as long as a clone is.
  client: Client,
  /// One query at a time: a burst of dashboards must not pile up in the database.
  gate: Arc<Semaphore>,
}

impl UsageReader {
  /// A reader with a client of its own, one connection at most.
  pub(super) fn new(options: &ClientOptions, db_name: &str) -> Result<Self, StoreError> {
    let mut options = options.clone();
    options.max_pool_size = Some(1);
    options.min_pool_size = Some(0);
    let client = Client::with_options(options)?;
    Ok(Self {
      usage: client.database(db_name).collection(super::mongo::USAGE),
      client,
      gate: Arc::new(Semaphore::new(1)),
    })
  }

  /// The pool's keys' (`names`) calls within `range` (both ends included), summed per key and
  /// latency bucket. Documents of other keys are left out.
  pub async fn usage(&self, range: DateRange, names: &Names) -> Result<StoredUsage, StoreError> {
    let _turn = self.gate.acquire().await.map_err(|_| StoreError::Closed)?;
    let mut bounds = Document::new();
    if let Some(start) = range.start {
      bounds.insert("$gte", DateTime::from_millis(start));
    }
    if let Some(end) = range.end {
      bounds.insert("$lte", DateTime::from_millis(end));
    }
    let filter = match bounds.is_empty() {
      true => doc! {},
      false => doc! { "timestamp": bounds },
    };
    let bucket = doc! {
      "$toString": { "$floor": { "$multiply": [
        { "$ln": { "$add": [{ "$ifNull": ["$responseTime", 0] }, 1] } },
        BUCKETS_PER_E,
      ] } }
    };
    let pipeline = vec![
      doc! { "$match": filter },
      doc! { "$limit": MAX_CALLS + 1 },
      // One group key of one string: some servers group by a computed field only, not by a
      // document of them.
      doc! { "$project": {
        "success": 1,
        "tokensUsed": 1,
        "kb": { "$concat": ["$apiKey", " ", bucket] },
      } },
      doc! { "$group": {
        "_id": "$kb",
        "calls": { "$sum": 1 },
        "successes": { "$sum": { "$cond": [{ "$eq": ["$success", true] }, 1, 0] } },
        "tokens": { "$sum": "$tokensUsed" },
      } },
    ];
    let mut cursor = self.usage.aggregate(pipeline).max_time(MAX_TIME).await?;
    let mut buckets = Vec::new();
    let mut matched = 0;
    while cursor.advance().await? {
      let d = cursor.deserialize_current()?;
      let calls = count(d.get("calls")).unwrap_or(0);
      matched += calls;
      let Some((key, latency)) = d.get_str("_id").ok().and_then(|kb| split(kb, names)) else {
        continue;
      };
      buckets.push(Bucket {
        key,
        latency,
        calls,
        successes: count(d.get("successes")).unwrap_or(0),
        tokens: count(d.get("tokens")).unwrap_or(0),
      });
    }
    Ok(StoredUsage {
      buckets,
      truncated: matched > MAX_CALLS as u64,
    })
  }

  /// Closes the reader's connection.
  pub async fn close(&self) {
    self.client.clone().shutdown().await;
  }
}

/// Where usage statistics come from: the usage collection while the store is connected, the pool's
/// recent calls otherwise. Clones share one source, so the writer that connects the store and the
/// HTTP API that reads it need not know each other.
#[derive(Debug, Clone, Default)]
pub struct UsageSource {
  reader: Arc<Mutex<Option<UsageReader>>>,
}

impl UsageSource {
  /// Statistics come from the store, through `reader`, from now on.
  pub fn connect(&self, reader: UsageReader) {
    *self.reader.lock() = Some(reader);
  }

  /// Statistics come from memory from now on. Returns the reader that was connected, to close.
  pub fn disconnect(&self) -> Option<UsageReader> {
    self.reader.lock().take()
  }

  /// The reader, while the store is connected.
  pub fn reader(&self) -> Option<UsageReader> {
    self.reader.lock().clone()
  }
}

/// A group key `"<stored name> <bucket>"` into the key's position and the bucket. The bucket is
/// after the last space: a stored name may hold spaces, a number never does.
fn split(kb: &str, names: &Names) -> Option<(usize, i64)> {
  let (name, bucket) = kb.rsplit_once(' ')?;
  let bucket: f64 = bucket.parse().ok()?;
  Some((names.resolve(name)?, bucket as i64))
}

#[cfg(test)]
mod tests {
  use mongodb::options::ServerAddress;

  use super::*;
  use crate::core::roster::Roster;

  #[test]
  fn group_keys_name_a_key_of_the_pool_and_a_bucket() {
    let roster = Roster::new(vec!["a key".into(), "b".into()]);
    let names = roster.names();
    assert_eq!(split("a key 230.0", &names), Some((0, 230)));
    assert_eq!(split("b 7", &names), Some((1, 7)));
    assert_eq!(split("c 7", &names), None);
    assert_eq!(split("b seven", &names), None);
    assert_eq!(split("b", &names), None);
  }

  #[tokio::test]
  async fn clones_of_a_source_see_the_store_from_connect_to_disconnect() {
    // Nothing listens there: a client connects only when it is first used.
    let address = ServerAddress::Tcp {
      host: "127.0.0.1".into(),
      port: Some(9),
    };
    let options = ClientOptions::builder().hosts(vec![address]).build();
    let source = UsageSource::default();
    let elsewhere = source.clone();
    assert!(elsewhere.reader().is_none());
    source.connect(UsageReader::new(&options, "test").unwrap());
    assert!(elsewhere.reader().is_some());
    assert!(elsewhere.disconnect().is_some());
    assert!(source.reader().is_none());
  }
}
