use super::*;
use crate::core::clock::{Clock, SystemClock, MINUTE_MS};
use crate::store::mongo::DEFAULT_CONNECT_TIMEOUT;
use crate::store::test_server::TestServer;
use std::sync::Arc;

/// The start of the current minute. Lease documents carry their window's end, and the server's
/// TTL monitor deletes those whose window ended over an hour ago: tests run in real time.
fn minute() -> Millis {
  SystemClock.now_ms() / MINUTE_MS * MINUTE_MS
}

fn slot(t: Millis) -> LeaseSlot<'static> {
  LeaseSlot {
    api_key: "AIzaSyLEASE",
    window: "rpm",
    window_id: t,
    window_end: t + MINUTE_MS,
  }
}

async fn connect(server: &TestServer) -> MongoStore {
  MongoStore::connect(&server.uri(), "gkm_lease", DEFAULT_CONNECT_TIMEOUT)
    .await
    .expect("connect to the test server")
}

/// What one lease request of `store` was granted.
async fn granted(
  store: &MongoStore,
  slot: &LeaseSlot<'_>,
  want: u64,
  limit: u64,
  holder: &str,
  expires_at: Millis,
) -> u64 {
  store
    .lease(slot, want, limit, holder, expires_at)
    .await
    .expect("lease")
    .granted
}

async fn lease_doc(store: &MongoStore, slot: &LeaseSlot<'_>) -> Document {
  store
    .leases
    .find_one(doc! { "_id": lease_id(slot) })
    .await
    .unwrap()
    .expect("lease document")
}

/// Eight holders lease `want` at a time against a limit of 30 until refused, each through one of
/// `stores`; returns the total granted. Bounded, so a broken guard fails instead of hanging.
async fn race(stores: &[Arc<MongoStore>], slot: LeaseSlot<'static>, want: u64) -> u64 {
  let tasks: Vec<_> = (0..8)
    .map(|i| {
      let store = stores[i % stores.len()].clone();
      tokio::spawn(async move {
        let holder = format!("proc-{i}");
        let mut granted = 0;
        for _ in 0..64 {
          match store.lease(&slot, want, 30, &holder, slot.window_end).await {
            Ok(g) if g.granted == 0 => break,
            Ok(g) => granted += g.granted,
            Err(e) => panic!("lease failed: {e}"),
          }
        }
        granted
      })
    })
    .collect();
  let mut total = 0;
  for task in tasks {
    total += task.await.expect("leasing task");
  }
  total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_holders_are_granted_exactly_the_limit_in_total() {
  let server = TestServer::start();
  let slot = slot(minute());
  // One connection per holder, as separate processes would have.
  let mut stores = Vec::new();
  for _ in 0..8 {
    stores.push(Arc::new(connect(&server).await));
  }
  assert_eq!(race(&stores, slot, 1).await, 30);
  let d = lease_doc(&stores[0], &slot).await;
  assert_eq!(count(d.get("used")), Some(30));
  let held: u64 = d
    .get_document("holders")
    .unwrap()
    .iter()
    .map(|(_, n)| count(Some(n)).unwrap_or(0))
    .sum();
  assert_eq!(held, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_partial_grants_never_pass_the_limit() {
  let server = TestServer::start();
  let slot = slot(minute());
  let store = Arc::new(connect(&server).await);
  // 7 does not divide 30: the last grants are partial, decided under contention.
  assert_eq!(race(std::slice::from_ref(&store), slot, 7).await, 30);
  assert_eq!(count(lease_doc(&store, &slot).await.get("used")), Some(30));
}

#[tokio::test]
async fn released_budget_is_leased_again_and_no_holder_goes_below_zero() {
  let server = TestServer::start();
  let t = minute();
  let slot = slot(t);
  let store = connect(&server).await;
  let before = store.ops();
  assert_eq!(granted(&store, &slot, 20, 30, "a", t + 5_000).await, 20);
  // First lease of a window: failed grant, read, the creating upsert.
  assert_eq!(store.ops() - before, 3);
  let before = store.ops();
  assert_eq!(granted(&store, &slot, 20, 30, "b", t + 5_000).await, 10);
  assert_eq!(granted(&store, &slot, 5, 30, "b", t + 5_000).await, 0);
  assert_eq!(store.release(&slot, "a", 15).await.unwrap(), 15);
  assert_eq!(store.ops() - before, 6);
  assert_eq!(granted(&store, &slot, 20, 30, "b", t + 5_000).await, 15);
  // "a" holds 5: asking to give back more gives back those 5 and no more.
  assert_eq!(store.release(&slot, "a", 100).await.unwrap(), 5);
  assert_eq!(store.release(&slot, "a", 1).await.unwrap(), 0);
  assert_eq!(store.release(&slot, "nobody", 1).await.unwrap(), 0);
  let d = lease_doc(&store, &slot).await;
  assert_eq!(count(d.get("used")), Some(25));
  let holders = d.get_document("holders").unwrap();
  assert_eq!(count(holders.get("a")), Some(0));
  assert_eq!(count(holders.get("b")), Some(25));
  let other = LeaseSlot {
    window: "rpd",
    ..slot
  };
  assert_eq!(granted(&store, &other, 500, 200, "a", t).await, 200);
  assert!(matches!(
    store.lease(&slot, 1, 30, "bad.holder", t).await,
    Err(StoreError::InvalidLease(_))
  ));
}

#[tokio::test]
async fn an_expired_holders_unspent_lease_is_reclaimed() {
  let server = TestServer::start();
  let t = minute();
  let slot = slot(t);
  let store = connect(&server).await;
  assert_eq!(granted(&store, &slot, 10, 30, "dead", t + 1_000).await, 10);
  assert_eq!(store.consume(&slot, "dead", 4).await.unwrap(), 4);
  assert_eq!(
    granted(&store, &slot, 30, 30, "alive", t + 50_000).await,
    20
  );
  assert_eq!(store.reclaim_expired(t + 500).await.unwrap(), 0);
  // The dead holder's 6 unspent come back; the 4 it spent stay counted.
  assert_eq!(store.reclaim_expired(t + 2_000).await.unwrap(), 6);
  assert_eq!(store.reclaim_expired(t + 2_000).await.unwrap(), 0);
  assert_eq!(granted(&store, &slot, 30, 30, "alive", t + 50_000).await, 6);
  let d = lease_doc(&store, &slot).await;
  assert_eq!(count(d.get("used")), Some(30));
  assert!(!d.get_document("holders").unwrap().contains_key("dead"));
  // A window that is over is not scanned.
  assert_eq!(store.reclaim_expired(slot.window_end + 1).await.unwrap(), 0);
}
