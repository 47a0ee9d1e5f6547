//! Hostile input for the route table: random methods, paths, query strings, headers and bodies
//! (random bytes, huge numbers, unicode, broken percent-encodings, keys as path segments) never
//! make it panic, and always get a well-formed reply (JSON but for the dashboard and the metrics)
//! with a sane status and no full key.

use proptest::prelude::*;
use serde_json::Value;

use super::auth::AdminGuard;
use super::reply::Reply;
use super::routes::testing::{ready, state_of};
use super::routes::{route, route_mounted, ApiRequest};
use crate::core::pool::testing::TestPool;
use crate::core::quota::Quota;

const KEYS: [&str; 3] = [
  "AIzaSyHOST0000000000000000000000000000001",
  "AIzaSyHOST0000000000000000000000000000002",
  "AIzaSyOTHR0000000000000000000000000000003",
];
const TOKEN: &str = "hostile-admin-token";
const STATUSES: [u16; 8] = [200, 201, 400, 401, 404, 405, 409, 500];
/// A key the bodies may add.
const NEW_KEY: &str = "AIzaSyNEWK0000000000000000000000000000004";

fn quota() -> Quota {
  Quota {
    rpm: 3,
    rpd: 5,
    tpm: 100,
  }
}

fn percent_encode_all(text: &str) -> String {
  text.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// A path segment: route names (any case), keys in every form, or junk.
fn segment() -> impl Strategy<Value = String> {
  prop_oneof![
    prop::sample::select(vec![
      "status",
      "best",
      "rotate",
      "refresh-cache",
      "rate-limit",
      "reactivate",
      "reset-limits",
      "usage-stats",
      "dashboard",
      "add",
      "remove",
      "disable",
      "enable",
      "openapi.json",
      "metrics",
      "STATUS",
      "Rate-Limit",
      "api",
      "keys",
      "",
      ".",
      "..",
      "%",
      "%2",
      "%ZZ",
      "%FF",
      "%C3%28",
      "%00",
      "%2F",
      "AIzaSyHO...0001",
      "AIzaSyHO...0002",
      "AIzaSyHO%2E%2E%2E0001",
    ])
    .prop_map(str::to_owned),
    prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
    prop::sample::select(KEYS.to_vec()).prop_map(percent_encode_all),
    "\\PC{0,24}",
    "[%0-9A-Fa-f.]{0,12}",
    "[a-zA-Z0-9._~-]{0,300}",
  ]
}

fn path() -> impl Strategy<Value = String> {
  (
    prop::sample::select(vec!["/api/keys", "/api/keys/", "/api/KEYS", "", "/", "//"]),
    prop::collection::vec(segment(), 0..5),
    any::<bool>(),
  )
    .prop_map(|(prefix, segments, trailing)| {
      let mut out = prefix.to_owned();
      for s in segments {
        out.push('/');
        out.push_str(&s);
      }
      if trailing {
        out.push('/');
      }
      out
    })
}

fn query_value() -> impl Strategy<Value = String> {
  prop_oneof![
    prop::sample::select(vec![
      "2026-11-27",
      "2026-02-30",
      "+275760-09-13T00:00:00.000Z",
      "-271821-04-20",
      "99999999999999999999999999",
      "-9223372036854775808",
      "9223372036854775807",
      "1e308",
      "NaN",
      "-0",
      "2026-11-27T24:00",
      "2026-11-27T20:30:42.123456789+14:00",
      "%ZZ",
      "%",
      "+",
    ])
    .prop_map(str::to_owned),
    any::<i64>().prop_map(|n| n.to_string()),
    any::<f64>().prop_map(|n| n.to_string()),
    "\\PC{0,16}",
    prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
  ]
}

fn query() -> impl Strategy<Value = String> {
  prop::collection::vec(
    (
      prop::sample::select(vec!["startDate", "endDate", "start%44ate", "x", "", "key"]),
      query_value(),
    ),
    0..4,
  )
  .prop_map(|pairs| {
    let pairs: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if pairs.is_empty() {
      String::new()
    } else {
      format!("?{}", pairs.join("&"))
    }
  })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
  prop_oneof![
    Just(Vec::new()),
    prop::collection::vec(any::<u8>(), 0..256),
    prop::sample::select(vec![
      "{}",
      "[]",
      "null",
      "1e999999",
      "-1e999999",
      "123456789012345678901234567890",
      "{\"apiKey\":\"AIzaSyHOST0000000000000000000000000000001\"}",
      "{\"apiKey\":\"AIzaSyNEWK0000000000000000000000000000004\"}",
      "{\"apiKey\":\"AIzaSyNEWK0000000000000000000000000000004\",\"x\":1}",
      "{\"apiKey\":\"a key, with spaces\"}",
      "{\"apiKey\":\"\"}",
      "{\"apiKey\":42}",
      "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
      "\"\\ud800\"",
      "{\"a\":",
    ])
    .prop_map(|s| s.as_bytes().to_vec()),
    "\\PC{0,64}".prop_map(String::into_bytes),
  ]
}

fn method() -> impl Strategy<Value = String> {
  prop_oneof![
    prop::sample::select(vec![
      "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get", "",
    ])
    .prop_map(str::to_owned),
    "\\PC{0,12}",
  ]
}

fn authorization() -> impl Strategy<Value = Option<String>> {
  prop_oneof![
    Just(None),
    Just(Some(format!("Bearer {TOKEN}"))),
    "\\PC{0,40}".prop_map(Some),
    "\\PC{0,40}".prop_map(|t| Some(format!("Bearer {t}"))),
  ]
}

/// What every reply must satisfy.
fn check(reply: &Reply) -> Result<(), TestCaseError> {
  prop_assert!(STATUSES.contains(&reply.status), "status {}", reply.status);
  for key in KEYS.iter().chain([&NEW_KEY]) {
    prop_assert!(!reply.body.contains(key), "full key in {}", reply.body);
  }
  // The dashboard and the metrics are the answers that are not JSON.
  if reply.content_type.starts_with("text/") {
    prop_assert_eq!(reply.status, 200);
    return Ok(());
  }
  prop_assert!(reply.content_type.starts_with("application/json"));
  let value: Value = serde_json::from_str(&reply.body)
    .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {}", reply.body)))?;
  // The OpenAPI description is the one JSON answer that is a document, not a result.
  if value.get("openapi").is_some() {
    prop_assert_eq!(reply.status, 200);
    return Ok(());
  }
  let succeeded = (200..300).contains(&reply.status);
  prop_assert_eq!(&value["success"], &Value::Bool(succeeded));
  if !succeeded {
    prop_assert!(value["error"].is_string() && value["message"].is_string());
  }
  prop_assert_eq!(reply.allow.is_some(), reply.status == 405);
  if reply.status == 401 {
    prop_assert!(reply.headers.iter().any(|(n, _)| *n == "www-authenticate"));
  }
  Ok(())
}

proptest! {
  #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

  #[test]
  fn the_router_survives_anything(
    method in method(),
    path in path(),
    query in query(),
    body in body(),
    authorization in authorization(),
    guarded in any::<bool>(),
  ) {
    let s = state_of(TestPool::new(&KEYS, quota()));
    let guard = if guarded {
      AdminGuard::with_token(TOKEN).expect("a valid token")
    } else {
      AdminGuard::open()
    };
    let target = format!("{path}{query}");
    let req = ApiRequest {
      method: &method,
      target: &target,
      authorization: authorization.as_deref(),
      body: &body,
    };
    check(&ready(route(&s, &guard, &req)))?;
    check(&ready(route_mounted(&s, &guard, &req)))?;
    // The same request again, on a pool the first ones may have changed.
    check(&ready(route(&s, &guard, &req)))?;
  }
}
