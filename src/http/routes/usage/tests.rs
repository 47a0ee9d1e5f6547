use serde_json::{json, Value};

use super::*;
use crate::core::pool::testing::{TestPool, T0, T0_ISO};
use crate::core::pool::Outcome;
use crate::core::quota::{Quota, DEFAULT_MODEL};
use crate::http::routes::testing::*;
use crate::http::routes::{route, route_mounted};
use crate::http::AdminGuard;
use crate::store::test_server::TestServer;
use crate::store::{MongoStore, DEFAULT_CONNECT_TIMEOUT};

#[test]
fn usage_stats_lists_usage_as_fractions() {
  let s = state();
  let p = s.pool();
  p.record_usage(0, 1234, Outcome::Success, 0.0, None)
    .unwrap();
  p.record_usage(2, 0, Outcome::Failure("quota"), 0.0, None)
    .unwrap();
  let (status, v) = get(&s, "/api/keys/usage-stats");
  assert_eq!(status, 200);
  assert_eq!(v["message"], "Usage statistics retrieved successfully");
  assert_eq!(v["metadata"]["startDate"], Value::Null);
  assert_eq!(v["metadata"]["endDate"], Value::Null);
  assert_eq!(v["metadata"]["totalKeys"], 3);
  assert_eq!(v["metadata"]["source"], "memory");
  assert_eq!(
    v["data"][0],
    json!({
      "apiKey": "AIzaSyAA...0001",
      "isActive": true,
      "lastUsed": T0_ISO,
      "rpmUsage": "1/30",
      "rpdUsage": "1/200",
      "tpmUsage": "1234/1000000",
      "errorCount": 0,
      "lastError": null,
      "project": null,
      "models": {
        DEFAULT_MODEL: {
          "state": "active",
          "stateUntil": null,
          "availabilityScore": v["data"][0]["models"][DEFAULT_MODEL]["availabilityScore"],
          // When the slice holding T0 has left the rolling window (its slices and margin).
          "rpm": window(1, 30, T0 + 60_079),
          "rpd": window(1, 200, midnight()),
          "tpm": window(1234, 1_000_000, T0 + 60_079),
        },
      },
      "removed": false,
      "requests": 1,
      "successes": 1,
      "failures": 0,
      "errorRate": 0.0,
      "tokens": 1234,
      "p50ResponseTime": 0.0,
      "p95ResponseTime": 0.0,
    })
  );
  assert_eq!(v["data"][2]["lastError"], "quota");
}

#[test]
fn usage_stats_computes_figures_over_the_range_from_the_call_log() {
  let test = TestPool::new(&KEYS, Quota::default());
  let clock = test.clock.clone();
  let s = state_of(test);
  let p = s.pool();
  p.record_usage(0, 100, Outcome::Success, 10.0, None)
    .unwrap();
  clock.advance(1_000);
  p.record_usage(0, 50, Outcome::Success, 30.0, None).unwrap();
  p.record_usage(1, 0, Outcome::Failure("503"), 20.0, None)
    .unwrap();
  let (_, v) = get(&s, "/api/keys/usage-stats");
  let a = &v["data"][0];
  assert_eq!(
    (
      &a["requests"],
      &a["tokens"],
      &a["p50ResponseTime"],
      &a["p95ResponseTime"]
    ),
    (&json!(2), &json!(150), &json!(10.0), &json!(30.0))
  );
  assert_eq!(v["data"][1]["errorRate"], 1.0);
  assert_eq!(v["data"][2]["p50ResponseTime"], Value::Null);
  assert_eq!(
    v["metadata"]["totals"],
    json!({
      "requests": 3, "successes": 2, "failures": 1, "errorRate": 1.0 / 3.0, "tokens": 150,
      "p50ResponseTime": 20.0, "p95ResponseTime": 30.0,
    })
  );
  assert_eq!(v["metadata"]["callLogCapacity"], 10_000);
  assert_eq!(v["metadata"]["truncated"], false);
  // From T0 + 1 s on: the first call is left out.
  let later = "/api/keys/usage-stats?startDate=1700000001000";
  let (_, v) = get(&s, later);
  assert_eq!(v["data"][0]["requests"], 1);
  assert_eq!(v["metadata"]["totals"]["requests"], 2);
  assert_eq!(open_mounted(&s, "GET", "/usage-stats/", b"").status, 200);
}

#[test]
fn usage_stats_reads_and_echoes_the_date_range() {
  let s = state();
  let (status, v) = get(
    &s,
    "/api/keys/usage-stats?startDate=2026-11-27&endDate=2026-11-27T20%3A30%3A42.123%2B02%3A00",
  );
  assert_eq!(status, 200, "{v}");
  assert_eq!(v["metadata"]["startDate"], "2026-11-27T00:00:00.000Z");
  assert_eq!(v["metadata"]["endDate"], "2026-11-27T18:30:42.123Z");
  let (_, v) = get(&s, "/api/keys/usage-stats?endDate=1700000000000&x=1");
  assert_eq!(v["metadata"]["startDate"], Value::Null);
  assert_eq!(v["metadata"]["endDate"], T0_ISO);

  for (query, error) in [
    ("startDate=yesterday", "Invalid startDate"),
    ("endDate=", "Invalid endDate"),
    ("startDate=2026-02-30", "Invalid startDate"),
    ("startDate=%ZZ", "Invalid startDate"),
    ("startDate=1&startDate=2", "Invalid startDate"),
    (
      "startDate=2026-11-28&endDate=2026-11-27",
      "Invalid date range",
    ),
  ] {
    let (status, v) = get(&s, &format!("/api/keys/usage-stats?{query}"));
    assert_eq!(status, 400, "{query}");
    assert_eq!(v["error"], error, "{query}");
  }
}

#[test]
fn bad_dates_are_400s_that_say_what_is_wrong() {
  for (start, end, error) in [
    (Some("someday"), None, "Invalid startDate"),
    (None, Some("2026-13-01"), "Invalid endDate"),
    (Some("2026-02-01"), Some("2026-01-01"), "Invalid date range"),
  ] {
    let reply = parse_range(start, end).unwrap_err().reply();
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!((reply.status, v["error"].as_str()), (400, Some(error)));
  }
  assert_eq!(
    parse_range(Some("1700000000000"), None).ok(),
    Some(DateRange::new(Some(1_700_000_000_000), None).unwrap())
  );
}

#[tokio::test]
async fn with_the_store_connected_statistics_are_read_from_it_and_the_route_waits() {
  let server = TestServer::start();
  let store = MongoStore::connect(&server.uri(), "gkm_usage_test", DEFAULT_CONNECT_TIMEOUT)
    .await
    .expect("connect to the test server");
  let s = state();
  s.pool()
    .record_usage(0, 5, Outcome::Success, 8.0, None)
    .unwrap();
  s.usage().connect(store.usage_reader().unwrap());
  let guard = AdminGuard::open();
  for routed in [
    route(&s, &guard, &req("GET", "/api/keys/usage-stats", b"")),
    route_mounted(&s, &guard, &req("GET", "/usage-stats?x=1", b"")),
  ] {
    assert!(matches!(routed, Routed::Pending(_)));
    let reply = routed.reply().await;
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(
      (reply.status, &v["metadata"]["source"]),
      (200, &json!("mongodb"))
    );
    // The call recorded in memory was never written there.
    assert_eq!(v["metadata"]["totals"]["requests"], 0);
  }
  // A bad range is refused at once, store or not.
  let bad = route(
    &s,
    &guard,
    &req("GET", "/api/keys/usage-stats?startDate=x", b""),
  );
  assert_eq!(ready(bad).status, 400);
  // Disconnected: from memory again, at once.
  s.usage().disconnect().unwrap().close().await;
  let (_, v) = get(&s, "/api/keys/usage-stats");
  assert_eq!(v["metadata"]["source"], "memory");
  assert_eq!(v["metadata"]["totals"]["requests"], 1);
  assert_eq!(v["metadata"]["totals"]["p95ResponseTime"], 8.0);
  store.close().await;
}
