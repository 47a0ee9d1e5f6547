use serde_json::{json, Value};

use crate::core::key::Admission;
use crate::core::pool::testing::{TestPool, T0, T0_ISO};
use crate::core::pool::Outcome;
use crate::core::quota::{LimitType, Quota, DEFAULT_MODEL};
use crate::http::json::IsoDate;
use crate::http::routes::testing::*;

#[test]
fn best_hands_out_masked_keys_round_robin() {
  let s = state();
  let (status, v) = get(&s, "/api/keys/best");
  assert_eq!(status, 200);
  assert_eq!(
    v["message"],
    "Best available API key retrieved successfully"
  );
  let data = &v["data"];
  assert_eq!(
    field_names(data),
    [
      "apiKey",
      "availabilityScore",
      "lastUsed",
      "limits",
      "rotationMethod",
      "totalAvailable"
    ]
  );
  assert_eq!(data["apiKey"], "AIzaSyAA...0001");
  assert_eq!(data["availabilityScore"], 1.0);
  assert_eq!(data["totalAvailable"], 3);
  assert_eq!(data["rotationMethod"], "round-robin");
  assert_eq!(data["lastUsed"], T0_ISO);
  // Nothing counted: capacity is free now.
  assert_eq!(data["limits"]["rpm"], window(0, 30, T0));
  assert_eq!(
    v["metadata"],
    json!({ "availabilityScore": 1.0, "totalAvailable": 3, "rotationMethod": "round-robin" })
  );
  let (_, v) = get(&s, "/api/keys/best");
  assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
  assert_eq!(v["data"]["rotationMethod"], "cached-round-robin");
}

#[test]
fn rotate_always_gives_a_string_reason() {
  let s = state();
  let (status, v) = post(&s, "/api/keys/rotate");
  assert_eq!(status, 200);
  assert_eq!(v["message"], "API key rotated proactively");
  assert_eq!(
    field_names(&v["data"]),
    [
      "apiKey",
      "availabilityScore",
      "lastUsed",
      "limits",
      "previousKeyScore",
      "rotationReason"
    ]
  );
  assert_eq!(v["data"]["rotationReason"], "not-needed");
  assert_eq!(v["data"]["previousKeyScore"], Value::Null);
  assert_eq!(v["metadata"]["rotationReason"], "not-needed");

  let quota = Quota {
    rpm: 10,
    rpd: 10,
    tpm: 1000,
  };
  let s = state_of(TestPool::new(&KEYS[..2], quota));
  let p = s.pool();
  for _ in 0..9 {
    p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
  }
  let (_, v) = post(&s, "/api/keys/rotate");
  assert_eq!(v["data"]["rotationReason"], "proactive-rotation");
  assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
  assert!(v["data"]["previousKeyScore"].as_f64().unwrap() < 0.3);
  assert_eq!(
    v["metadata"]["previousKeyScore"],
    v["data"]["previousKeyScore"]
  );

  let s = state_of(TestPool::new(&KEYS[..1], quota));
  let p = s.pool();
  for _ in 0..9 {
    p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
  }
  let (_, v) = post(&s, "/api/keys/rotate");
  assert_eq!(v["data"]["rotationReason"], "no-key-above-threshold");
}

#[test]
fn refresh_cache_reports_the_available_keys() {
  let s = state();
  let p = s.pool();
  p.handle_rate_limit(2, LimitType::Rpd, None, None).unwrap();
  let (status, v) = post(&s, "/api/keys/refresh-cache");
  assert_eq!(status, 200);
  assert_eq!(
    v,
    json!({
      "success": true,
      "metadata": { "cacheRefreshed": true, "availableKeys": 2 },
      "message": "API key cache refreshed successfully",
    })
  );
}

#[test]
fn a_model_param_names_a_known_model_and_never_adds_an_unknown_one() {
  let s = state();
  let (status, v) = get(&s, "/api/keys/best?model=gemini-2.0-flash");
  assert_eq!(status, 200, "{v}");
  let path = format!(
    "/api/keys/rate-limit/{}?model=models%2Fgemini-2.0-flash",
    KEYS[0]
  );
  let (status, v) = get(&s, &path);
  assert_eq!(status, 200, "{v}");
  assert_eq!(v["data"][0]["limit"], 15);
  for path in [
    "/api/keys/best?model=gemini-9-ultra",
    "/api/keys/rotate?model=gemini-9-ultra",
    "/api/keys/best?model=a%20b",
    "/api/keys/best?model=gemini-2.0-flash&model=gemini-2.0-flash",
  ] {
    let (status, v) = call(
      &s,
      if path.contains("rotate") {
        "POST"
      } else {
        "GET"
      },
      path,
      "",
    );
    assert_eq!(status, 400, "{path}: {v}");
    assert!(!v["error"].as_str().unwrap().contains("ultra"), "{v}");
  }
  // Only the default model and the one in the table were met.
  let (_, v) = get(&s, "/api/keys/status");
  let models: Vec<&String> = v["data"][0]["models"].as_object().unwrap().keys().collect();
  assert_eq!(models, ["gemini-2.0-flash", DEFAULT_MODEL], "by name");
}

#[test]
fn busy_keys_are_a_429_with_retry_after_and_no_usable_key_a_503() {
  let test = TestPool::new(&KEYS[..2], Quota::default());
  let clock = test.clock.clone();
  let s = state_of(test);
  let p = s.pool();
  p.handle_rate_limit(0, LimitType::Rpm, Some(12_300), None)
    .unwrap();
  p.handle_rate_limit(1, LimitType::Rpm, Some(17_000), None)
    .unwrap();
  clock.advance(300);
  for (method, path, message) in [
    (
      "GET",
      "/api/keys/best",
      "Failed to get best available API key",
    ),
    (
      "POST",
      "/api/keys/rotate",
      "Failed to rotate API key proactively",
    ),
  ] {
    let reply = open_route(&s, method, path, b"");
    assert_eq!(reply.status, 429, "{path}");
    // 12 s from now, the first key's rest ends.
    assert_eq!(reply.headers, vec![("retry-after", "12".to_owned())]);
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(v["error"], "No active API keys available");
    assert_eq!(v["message"], message);
    assert_eq!(v["nextAvailableAt"], IsoDate(T0 + 12_300).to_string());
  }
  p.record_usage(0, 0, Outcome::Failure("API_KEY_INVALID"), 0.0, None)
    .unwrap();
  p.admit(1, Admission::Disabled).unwrap();
  let (status, v) = get(&s, "/api/keys/best");
  assert_eq!(status, 503);
  assert_eq!(v["nextAvailableAt"], Value::Null);
}
