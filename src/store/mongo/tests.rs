use super::*;
use crate::core::clock::{DAY_MS, MINUTE_MS};
use crate::core::snapshot::{UsageIds, WindowRecord};
use crate::store::test_server::TestServer;
use crate::store::unique_name;
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
  let ids = UsageIds::new(unique_name());
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
  let ids = UsageIds::new(unique_name());
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
