use super::*;
use crate::core::config::{KeySpec, PoolConfig};
use crate::core::error::PoolError;
use crate::core::key::Admission;
use crate::core::pool::testing::on_system_clock;
use crate::core::pool::{Claim, Outcome};
use crate::core::quota::{LimitType, Quota};
use crate::log::CapturedLog;
use crate::store::test_server::{free_port, TestServer};
use mongodb::bson::{doc, Document};

fn pool(keys: &[&str]) -> Arc<KeyPool> {
  on_system_clock(PoolConfig::of(
    keys.iter().map(|k| k.to_string()).collect(),
    Quota::default(),
  ))
  .0
}

fn options(uri: String) -> PersistOptions {
  PersistOptions {
    db_name: "gkm_write_behind".into(),
    flush_interval: Duration::from_millis(50),
    // Spill files of their own: a test on a port an earlier run used must not claim what that
    // run spilled for the same database.
    spill_dir: std::env::temp_dir()
      .join("gkm-test-spill")
      .join(unique_name()),
    ..PersistOptions::new(uri)
  }
}

/// [`options`] for tests that hang the server: a close waits half a second, no quota is shared,
/// and spill files go to `spill_dir`.
fn closing_soon(uri: String, spill_dir: &std::path::Path) -> PersistOptions {
  PersistOptions {
    share_quota: false,
    close_timeout: Duration::from_millis(500),
    spill_dir: spill_dir.to_owned(),
    ..options(uri)
  }
}

/// Every document of `collection` in the tests' database.
async fn documents(uri: &str, collection: &str) -> Vec<Document> {
  let client = mongodb::Client::with_uri_str(uri).await.unwrap();
  let mut cursor = client
    .database("gkm_write_behind")
    .collection::<Document>(collection)
    .find(doc! {})
    .await
    .unwrap();
  let mut docs = Vec::new();
  while cursor.advance().await.unwrap() {
    docs.push(cursor.deserialize_current().unwrap());
  }
  docs
}

async fn count(uri: &str, collection: &str) -> u64 {
  let client = mongodb::Client::with_uri_str(uri).await.unwrap();
  client
    .database("gkm_write_behind")
    .collection::<Document>(collection)
    .count_documents(doc! {})
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_are_written_behind_and_a_restart_gets_them_back() {
  let server = TestServer::start();
  let log = Arc::new(CapturedLog::default());
  let p = pool(&["key-a", "key-b"]);
  let (writer, started) = WriteBehind::start(p.clone(), options(server.uri()), log).await;
  assert_eq!(started, Started::Connected);
  for _ in 0..10 {
    let i = p
      .best(
        Claim::Reserve {
          estimated_tokens: 0,
        },
        0,
      )
      .unwrap()
      .pick
      .index;
    p.record_usage(i, 100, Outcome::Success, 20.0, None)
      .unwrap();
  }
  p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID"), 5.0, None)
    .unwrap();
  // Written within a few intervals, without closing.
  let deadline = Instant::now() + Duration::from_secs(5);
  while count(&server.uri(), "api_key_usage").await < 11 && Instant::now() < deadline {
    sleep(Duration::from_millis(50)).await;
  }
  assert_eq!(count(&server.uri(), "api_key_usage").await, 11);
  p.record_usage(0, 1, Outcome::Success, 1.0, None).unwrap();
  p.close();
  writer.close().await;
  writer.close().await;
  let stats = writer.stats();
  assert_eq!((stats.queued, stats.pending, stats.dropped), (0, 0, 0));
  assert!(!stats.connected);
  assert_eq!(count(&server.uri(), "api_key_usage").await, 12);
  assert_eq!(count(&server.uri(), "api_keys").await, 2);

  let q = pool(&["key-a", "key-b"]);
  let quiet = Arc::new(CapturedLog::default());
  let (again, started) = WriteBehind::start(q.clone(), options(server.uri()), quiet).await;
  assert_eq!(started, Started::Connected);
  let (a, b) = (q.figures(0).unwrap(), q.figures(1).unwrap());
  assert_eq!(a.rpd.current + b.rpd.current, 11);
  assert_eq!(a.tpm.current + b.tpm.current, 1_001);
  assert!(a.active && !b.active);
  assert_eq!(b.error_count, 1);
  q.close();
  again.close().await;
  assert_eq!(count(&server.uri(), "api_key_usage").await, 12);
}

/// Every (project, model) budget is stored, named as its leases are (never a key in clear):
/// a restart keeps each model's windows and a spent day's rest, instead of learning them again
/// from Gemini's 429s.
#[tokio::test(flavor = "multi_thread")]
async fn budgets_of_every_project_and_model_survive_a_restart() {
  let server = TestServer::start();
  let start = || {
    let config = PoolConfig {
      keys: vec![
        KeySpec {
          key: "key-a".into(),
          project: Some("alpha".into()),
        },
        KeySpec {
          key: "key-b".into(),
          project: None,
        },
      ],
      ..PoolConfig::of(Vec::new(), Quota::default())
    };
    on_system_clock(config).0
  };
  let digests = |uri| PersistOptions {
    key_storage: KeyStorage::Digest,
    ..options(uri)
  };
  let p = start();
  let (writer, started) = WriteBehind::start(
    p.clone(),
    digests(server.uri()),
    Arc::new(CapturedLog::default()),
  )
  .await;
  assert_eq!(started, Started::Connected);
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  p.record_usage(0, 50, Outcome::Success, 1.0, Some(flash))
    .unwrap();
  p.handle_rate_limit(1, LimitType::Rpd, Some(18_000), Some(flash))
    .unwrap();
  let rested_until = p.budgets_of(1).unwrap().1[1].state_until();
  assert!(
    rested_until.unwrap() > p.now() + 60_000,
    "rests until the daily reset"
  );
  p.close();
  writer.close().await;
  let docs = documents(&server.uri(), "api_key_budgets").await;
  // Both models of both projects.
  assert_eq!(docs.len(), 4, "{docs:?}");
  let text = format!("{docs:?}");
  assert!(!text.contains("key-a") && !text.contains("key-b"), "{text}");
  assert!(
    text.contains("\"alpha\""),
    "a project's name is no secret: {text}"
  );

  let q = start();
  let (again, _) = WriteBehind::start(
    q.clone(),
    digests(server.uri()),
    Arc::new(CapturedLog::default()),
  )
  .await;
  let flash_again = q.model_id("gemini-2.0-flash").unwrap();
  assert_eq!(flash_again, flash, "met again from the store");
  let (project, views) = q.budgets_of(0).unwrap();
  assert_eq!(project.as_deref(), Some("alpha"));
  assert_eq!(
    (
      views[1].model.as_str(),
      views[1].figures.tpm.current,
      views[1].figures.rpm.current
    ),
    ("gemini-2.0-flash", 50, 1)
  );
  let (_, views) = q.budgets_of(1).unwrap();
  assert_eq!(views[1].state_label(), "resting");
  assert_eq!(views[1].state_until(), rested_until);
  // The quota is shared: a budget serves once its first lease is granted, a round trip after the
  // start (longer on a loaded machine).
  assert!(eventually(|| q.best(Claim::LookOnly, flash).is_ok()).await);
  assert_eq!(q.best(Claim::LookOnly, flash).unwrap().pick.index, 0);
  q.close();
  again.close().await;
}

/// Waits until `done` holds, at most a few seconds.
async fn eventually(done: impl Fn() -> bool) -> bool {
  let deadline = Instant::now() + Duration::from_secs(5);
  while !done() && Instant::now() < deadline {
    sleep(Duration::from_millis(20)).await;
  }
  done()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_added_removed_and_disabled_in_one_process_are_followed_by_the_others() {
  let server = TestServer::start();
  let secret = crate::store::fingerprint::Fingerprinter::new(b"follow test secret").unwrap();
  let shared_options = || PersistOptions {
    key_sync_interval: Duration::from_millis(100),
    key_storage: KeyStorage::Fingerprint(secret.clone()),
    share_quota: false,
    ..options(server.uri())
  };
  let log = || Arc::new(CapturedLog::default());
  let (a, b) = (pool(&["key-a", "key-b"]), pool(&["key-a", "key-b"]));
  let (wa, _) = WriteBehind::start(a.clone(), shared_options(), log()).await;
  let (wb, _) = WriteBehind::start(b.clone(), shared_options(), log()).await;
  let added = "AIzaSyFOLLOW000000000000000000000000001";
  a.add_key(added, None).unwrap();
  b.admit(0, Admission::Disabled).unwrap();
  assert!(eventually(|| b.names().position(added).is_some()).await);
  assert!(
    eventually(|| a
      .figures(0)
      .is_ok_and(|f| f.admission == Admission::Disabled))
    .await
  );
  b.admit(b.names().position(added).unwrap(), Admission::Removed)
    .unwrap();
  assert!(eventually(|| a.index_of(added).is_err()).await);
  // A third process started later gets the same picture, the added key included.
  let c = pool(&["key-a", "key-b"]);
  let (wc, _) = WriteBehind::start(c.clone(), shared_options(), log()).await;
  let at = c.names().position(added).expect("the added key is known");
  assert_eq!(c.figures(at).unwrap().admission, Admission::Removed);
  assert_eq!(c.figures(0).unwrap().admission, Admission::Disabled);
  for (p, w) in [(a, wa), (b, wb), (c, wc)] {
    p.close();
    w.close().await;
  }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_secret_keys_cannot_be_added_and_mongodb_alone_stores_digests() {
  let server = TestServer::start();
  let p = pool(&["key-a"]);
  let (writer, started) = WriteBehind::start(
    p.clone(),
    PersistOptions {
      key_storage: KeyStorage::Digest,
      ..options(server.uri())
    },
    Arc::new(CapturedLog::default()),
  )
  .await;
  assert_eq!(started, Started::Connected);
  let refused = p.add_key("AIzaSyREFUSED0000000000000000000000001", None);
  assert!(
    matches!(refused, Err(PoolError::KeyNotStorable(_))),
    "{refused:?}"
  );
  p.record_usage(0, 1, Outcome::Success, 1.0, None).unwrap();
  p.close();
  writer.close().await;
  let keys = documents(&server.uri(), "api_keys").await;
  assert_eq!(keys.len(), 1);
  assert_eq!(
    keys[0].get_str("apiKey").unwrap(),
    crate::store::fingerprint::digest_name("key-a")
  );
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_on_a_hung_database_spills_and_the_next_start_writes_each_call_once() {
  let server = TestServer::start();
  let spill_dir = std::env::temp_dir().join(format!("gkm-spill-close-{}", std::process::id()));
  let hung_options = || closing_soon(server.uri(), &spill_dir);
  let p = pool(&["key-a", "key-b"]);
  let log = Arc::new(CapturedLog::default());
  let (writer, started) = WriteBehind::start(p.clone(), hung_options(), log.clone()).await;
  assert_eq!(started, Started::Connected);
  for i in 0..30 {
    p.record_usage(i % 2, 1, Outcome::Success, 1.0, None)
      .unwrap();
  }
  let deadline = Instant::now() + Duration::from_secs(5);
  while count(&server.uri(), "api_key_usage").await < 30 && Instant::now() < deadline {
    sleep(Duration::from_millis(50)).await;
  }
  server.hang();
  for i in 0..20 {
    p.record_usage(i % 2, 1, Outcome::Success, 1.0, None)
      .unwrap();
  }
  // Key documents the database does not take either: counters, and a key it refused.
  p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID"), 5.0, None)
    .unwrap();
  // Nor the budgets of another model: one's counts, the other's spent day.
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  p.record_usage(0, 7, Outcome::Success, 1.0, Some(flash))
    .unwrap();
  p.handle_rate_limit(1, LimitType::Rpd, Some(18_000), Some(flash))
    .unwrap();
  let rested_until = p.budgets_of(1).unwrap().1[1].state_until();
  p.close();
  let closing = Instant::now();
  writer.close().await;
  assert!(
    closing.elapsed() < Duration::from_secs(3),
    "{:?}",
    closing.elapsed()
  );
  let stats = writer.stats();
  assert_eq!((stats.spilled, stats.dropped), (22, 0), "{stats:?}");
  assert!(
    log.0.lock().iter().any(|l| l.contains(
      "did not take 22 recorded calls, the state of 2 keys and the counts of 4 quota budgets before closing"
    )),
    "{:?}",
    log.0.lock()
  );
  server.resume();
  // The next start writes them, each once; the spill file is gone.
  let q = pool(&["key-a", "key-b"]);
  let again = Arc::new(CapturedLog::default());
  let (next, started) = WriteBehind::start(q.clone(), hung_options(), again.clone()).await;
  assert_eq!(started, Started::Connected);
  assert_eq!(count(&server.uri(), "api_key_usage").await, 52);
  assert!(
    again.0.lock().iter().any(|l| l
      .contains("Wrote 22 recorded calls, the state of 2 keys and the counts of 4 quota budgets")),
    "{:?}",
    again.0.lock()
  );
  q.close();
  next.close().await;
  assert_eq!(count(&server.uri(), "api_key_usage").await, 52);
  // The database has the keys as they were at the close, spill and all.
  let r = pool(&["key-a", "key-b"]);
  let (last, _) =
    WriteBehind::start(r.clone(), hung_options(), Arc::new(CapturedLog::default())).await;
  let (a, b) = (r.figures(0).unwrap(), r.figures(1).unwrap());
  assert_eq!((a.rpd.current, b.rpd.current), (25, 25));
  assert!(a.active && !b.active);
  assert_eq!(b.error_count, 2, "the refusal and the 429");
  // And every budget as it was: the other model's counts, and its spent day resting still.
  let (_, views) = r.budgets_of(0).unwrap();
  assert_eq!(
    (
      views[1].model.as_str(),
      views[1].figures.rpm.current,
      views[1].figures.tpm.current
    ),
    ("gemini-2.0-flash", 1, 7)
  );
  let (_, views) = r.budgets_of(1).unwrap();
  assert_eq!(
    (views[1].state_label(), views[1].state_until()),
    ("resting", rested_until)
  );
  r.close();
  last.close().await;
  let left: Vec<_> = std::fs::read_dir(&spill_dir)
    .into_iter()
    .flatten()
    .flatten()
    .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
    .collect();
  assert!(left.is_empty(), "{left:?}");
  let _ = std::fs::remove_dir_all(&spill_dir);
}

/// A budget spilled for a key the next process does not have is written all the same, merged with
/// what the database holds, for a process that has the key.
#[tokio::test(flavor = "multi_thread")]
async fn a_spilled_budget_of_a_key_the_next_process_lacks_reaches_the_database() {
  let server = TestServer::start();
  let spill_dir = std::env::temp_dir()
    .join("gkm-test-spill")
    .join(unique_name());
  let hung_options = || closing_soon(server.uri(), &spill_dir);
  let p = pool(&["key-a", "key-b"]);
  let (writer, started) =
    WriteBehind::start(p.clone(), hung_options(), Arc::new(CapturedLog::default())).await;
  assert_eq!(started, Started::Connected);
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  // Stored before the hang: 2 calls of key-b on the other model.
  for _ in 0..2 {
    p.record_usage(1, 10, Outcome::Success, 1.0, Some(flash))
      .unwrap();
  }
  let stored_flash = || async {
    documents(&server.uri(), "api_key_budgets")
      .await
      .iter()
      .filter(|d| d.get_str("model") == Ok("gemini-2.0-flash"))
      .filter_map(|d| {
        d.get_document("limits")
          .ok()?
          .get_document("rpm")
          .ok()?
          .get("current")
          .cloned()
      })
      .map(|current| format!("{current}"))
      .collect::<Vec<_>>()
  };
  let deadline = Instant::now() + Duration::from_secs(5);
  while stored_flash().await != ["2"] && Instant::now() < deadline {
    sleep(Duration::from_millis(50)).await;
  }
  assert_eq!(stored_flash().await, ["2"]);
  server.hang();
  for _ in 0..3 {
    p.record_usage(1, 10, Outcome::Success, 1.0, Some(flash))
      .unwrap();
  }
  p.close();
  writer.close().await;
  server.resume();

  let q = pool(&["key-a"]);
  let (next, _) =
    WriteBehind::start(q.clone(), hung_options(), Arc::new(CapturedLog::default())).await;
  q.close();
  next.close().await;

  let r = pool(&["key-a", "key-b"]);
  let (last, _) =
    WriteBehind::start(r.clone(), hung_options(), Arc::new(CapturedLog::default())).await;
  let (_, views) = r.budgets_of(1).unwrap();
  assert_eq!(
    (
      views[1].model.as_str(),
      views[1].figures.rpm.current,
      views[1].figures.tpm.current
    ),
    ("gemini-2.0-flash", 5, 50)
  );
  r.close();
  last.close().await;
  let _ = std::fs::remove_dir_all(&spill_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trips_are_counted_as_they_happen_not_only_at_flushes() {
  let server = TestServer::start();
  let p = pool(&["key-a"]);
  let (writer, _) = WriteBehind::start(
    p.clone(),
    PersistOptions {
      flush_interval: Duration::from_secs(600),
      ..options(server.uri())
    },
    Arc::new(CapturedLog::default()),
  )
  .await;
  // The write of the merged state at start-up is done by then; no other flush comes.
  sleep(Duration::from_millis(300)).await;
  let before = writer.stats().ops;
  // Selections draw the leases down: the leasing task tops them up, long before any flush. A
  // slice's lease may be smaller than the burst: a selection refused for want of one waits for
  // the top-up.
  let deadline = Instant::now() + Duration::from_secs(5);
  for _ in 0..6 {
    let claim = Claim::Reserve {
      estimated_tokens: 0,
    };
    while p.best(claim, 0).is_err() && Instant::now() < deadline {
      sleep(Duration::from_millis(10)).await;
    }
  }
  while writer.stats().ops == before && Instant::now() < deadline {
    sleep(Duration::from_millis(20)).await;
  }
  assert!(writer.stats().ops > before);
  p.close();
  writer.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_in_memory_tries_the_server_once_more_and_writes_what_waited() {
  let port = free_port();
  let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
  let p = pool(&["key-a"]);
  let (writer, started) = WriteBehind::start(
    p.clone(),
    PersistOptions {
      connect_timeout: Duration::from_millis(500),
      // No retry before the close: only the close's own try can write.
      retry_interval: Duration::from_secs(600),
      ..options(uri)
    },
    Arc::new(CapturedLog::default()),
  )
  .await;
  assert!(matches!(started, Started::Fallback(_)), "{started:?}");
  p.record_usage(0, 3, Outcome::Success, 1.0, None).unwrap();
  let server = TestServer::start_on(port);
  p.close();
  writer.close().await;
  assert_eq!(count(&server.uri(), "api_key_usage").await, 1);
  assert_eq!(count(&server.uri(), "api_keys").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_falls_back_quickly_and_keeps_the_calls_queued() {
  let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", free_port());
  let p = pool(&["key-a"]);
  let started_at = Instant::now();
  let (writer, started) = WriteBehind::start(
    p.clone(),
    PersistOptions {
      connect_timeout: Duration::from_millis(500),
      ..options(uri)
    },
    Arc::new(CapturedLog::default()),
  )
  .await;
  assert!(started_at.elapsed() < Duration::from_secs(2));
  assert!(matches!(started, Started::Fallback(_)), "{started:?}");
  p.record_usage(0, 3, Outcome::Success, 1.0, None).unwrap();
  let stats = writer.stats();
  assert_eq!((stats.connected, stats.queued), (false, 1));
  p.close();
  writer.close().await;
}
