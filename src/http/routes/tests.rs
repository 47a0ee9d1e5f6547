use serde_json::{json, Value};

use super::*;
use crate::core::clock::Millis;
use crate::core::pool::testing::{TestPool, T0, T0_ISO};
use crate::core::pool::Outcome;
use crate::core::quota::{LimitType, Quota, DEFAULT_MODEL};

const KEYS: [&str; 3] = [
  "AIzaSyAAAA0000000000000000000000000000001",
  "AIzaSyBBBB0000000000000000000000000000002",
  "AIzaSyCCCC0000000000000000000000000000003",
];

fn pool() -> KeyPool {
  TestPool::new(&KEYS, Quota::default()).pool
}

fn req<'a>(method: &'a str, target: &'a str, body: &'a [u8]) -> ApiRequest<'a> {
  ApiRequest {
    method,
    target,
    authorization: None,
    body,
  }
}

/// The table with no admin token set.
fn open_route(pool: &KeyPool, method: &str, target: &str, body: &[u8]) -> Reply {
  route(pool, &AdminGuard::open(), &req(method, target, body))
}

fn open_mounted(pool: &KeyPool, method: &str, target: &str, body: &[u8]) -> Reply {
  route_mounted(pool, &AdminGuard::open(), &req(method, target, body))
}

/// Calls the table and checks what every reply must satisfy: JSON with `success`, and no full
/// key anywhere.
fn call(pool: &KeyPool, method: &str, path: &str, body: &str) -> (u16, Value) {
  let reply = open_route(pool, method, path, body.as_bytes());
  for key in pool.names().keys() {
    assert!(!reply.body.contains(key.as_str()), "{path}: {}", reply.body);
  }
  let value: Value = serde_json::from_str(&reply.body).unwrap();
  let succeeded = (200..300).contains(&reply.status);
  assert_eq!(value["success"], json!(succeeded), "{}", reply.body);
  if !succeeded {
    assert!(value["error"].is_string() && value["message"].is_string());
  }
  (reply.status, value)
}

fn get(pool: &KeyPool, path: &str) -> (u16, Value) {
  call(pool, "GET", path, "")
}

fn post(pool: &KeyPool, path: &str) -> (u16, Value) {
  call(pool, "POST", path, "")
}

fn field_names(v: &Value) -> Vec<&str> {
  let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
  names.sort_unstable();
  names
}

/// The first RPD reset after T0: midnight in Los Angeles.
fn midnight() -> Millis {
  crate::core::calendar::DailyReset::PacificMidnight.next_reset(T0)
}

fn window(current: u64, limit: u64, reset: Millis) -> Value {
  json!({ "current": current, "limit": limit, "resetTime": IsoDate(reset).to_string() })
}

#[test]
fn status_lists_every_key_masked_with_iso_dates() {
  let p = pool();
  let (status, v) = get(&p, "/api/keys/status");
  assert_eq!(status, 200);
  assert_eq!(field_names(&v), ["data", "message", "metadata", "success"]);
  assert_eq!(v["metadata"], json!({ "totalKeys": 3, "activeKeys": 3 }));
  let data = v["data"].as_array().unwrap();
  assert_eq!(data.len(), 3);
  assert_eq!(
    data[0],
    json!({
      "apiKey": "AIzaSyAA...0001",
      "isActive": true,
      "state": "active",
      "lastUsed": T0_ISO,
      "limits": {
        "rpm": window(0, 30, T0),
        "rpd": window(0, 200, midnight()),
        "tpm": window(0, 1_000_000, T0),
      },
      "errorCount": 0,
      "project": null,
      "models": {
        DEFAULT_MODEL: {
          "state": "active",
          "stateUntil": null,
          "availabilityScore": 1.0,
          "rpm": window(0, 30, T0),
          "rpd": window(0, 200, midnight()),
          "tpm": window(0, 1_000_000, T0),
        },
      },
    })
  );
}

#[test]
fn status_and_usage_show_each_project_and_model_met() {
  let p = pool();
  let index = p
    .add_key("AIzaSyAA00000000000000000000000proj", Some("alpha"))
    .unwrap();
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  let picked = p
    .best(
      Claim::Reserve {
        estimated_tokens: 0,
      },
      flash,
    )
    .unwrap();
  p.record_usage(picked.pick.index, 40, Outcome::Success, 1.0, Some(flash))
    .unwrap();
  let (_, v) = get(&p, "/api/keys/status");
  let shown = &v["data"][picked.pick.index];
  assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["current"], 1);
  assert_eq!(shown["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
  assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["limit"], 15);
  // The default model's figures stay in `limits`, untouched by the other model's call.
  assert_eq!(shown["limits"]["rpm"]["current"], 0);
  assert_eq!(v["data"][index]["project"], "alpha");
  let (_, usage) = get(&p, "/api/keys/usage-stats");
  let row = &usage["data"][picked.pick.index];
  assert_eq!(row["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
  assert_eq!(usage["data"][index]["project"], "alpha");
}

#[test]
fn status_shows_a_resting_key_and_until_when() {
  let p = pool();
  p.handle_rate_limit(2, LimitType::Rpm, Some(17_000), None)
    .unwrap();
  let (_, v) = get(&p, "/api/keys/status");
  assert_eq!(v["data"][2]["state"], "resting");
  assert_eq!(v["data"][2]["stateUntil"], IsoDate(T0 + 17_000).to_string());
  assert_eq!(v["data"][2]["isActive"], true);
}

#[test]
fn status_shows_the_last_error_with_keys_scrubbed_out() {
  let p = pool();
  let error = format!("fetch https://g/?key={} failed", KEYS[1]);
  p.record_usage(1, 0, Outcome::Failure(&error), 0.0, None)
    .unwrap();
  let (_, v) = get(&p, "/api/keys/status");
  let key = &v["data"][1];
  assert_eq!(key["errorCount"], 1);
  assert_eq!(
    key["lastError"],
    "fetch https://g/?key=AIzaSyBB...0002 failed"
  );
  assert_eq!(key["lastErrorTime"], T0_ISO);
}

#[test]
fn best_hands_out_masked_keys_round_robin() {
  let p = pool();
  let (status, v) = get(&p, "/api/keys/best");
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
  let (_, v) = get(&p, "/api/keys/best");
  assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
  assert_eq!(v["data"]["rotationMethod"], "cached-round-robin");
}

#[test]
fn rotate_always_gives_a_string_reason() {
  let p = pool();
  let (status, v) = post(&p, "/api/keys/rotate");
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
  let p = TestPool::new(&KEYS[..2], quota).pool;
  for _ in 0..9 {
    p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
  }
  let (_, v) = post(&p, "/api/keys/rotate");
  assert_eq!(v["data"]["rotationReason"], "proactive-rotation");
  assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
  assert!(v["data"]["previousKeyScore"].as_f64().unwrap() < 0.3);
  assert_eq!(
    v["metadata"]["previousKeyScore"],
    v["data"]["previousKeyScore"]
  );

  let p = TestPool::new(&KEYS[..1], quota).pool;
  for _ in 0..9 {
    p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
  }
  let (_, v) = post(&p, "/api/keys/rotate");
  assert_eq!(v["data"]["rotationReason"], "no-key-above-threshold");
}

#[test]
fn refresh_cache_reports_the_available_keys() {
  let p = pool();
  p.handle_rate_limit(2, LimitType::Rpd, None, None).unwrap();
  let (status, v) = post(&p, "/api/keys/refresh-cache");
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
fn rate_limit_takes_a_full_masked_or_encoded_key() {
  let p = pool();
  p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
  for path in [
    format!("/api/keys/rate-limit/{}", KEYS[1]),
    "/api/keys/rate-limit/AIzaSyBB...0002".to_owned(),
    "/api/keys/rate-limit/AIzaSyBB%2E%2E%2E0002/".to_owned(),
  ] {
    let (status, v) = get(&p, &path);
    assert_eq!(status, 200, "{path}");
    assert_eq!(v["message"], "Rate limit info retrieved successfully");
    assert_eq!(
      v["data"],
      json!([
        // Resting a whole minute: the upstream said RPM is used up, though we counted nothing.
        { "type": "RPM", "current": 0, "limit": 30, "resetTime": IsoDate(T0 + 60_000).to_string(), "isLimited": true },
        { "type": "RPD", "current": 0, "limit": 200, "resetTime": IsoDate(midnight()).to_string(), "isLimited": false },
        { "type": "TPM", "current": 0, "limit": 1_000_000, "resetTime": IsoDate(T0).to_string(), "isLimited": false },
      ])
    );
  }
}

#[test]
fn reactivate_brings_a_key_back() {
  let p = pool();
  p.record_usage(
    0,
    0,
    Outcome::Failure("[400 Bad Request] API key not valid. API_KEY_INVALID"),
    0.0,
    None,
  )
  .unwrap();
  assert!(!p.figures(0).unwrap().active);
  let (status, v) = post(&p, "/api/keys/reactivate/AIzaSyAA...0001");
  assert_eq!(status, 200);
  assert_eq!(
    v,
    json!({ "success": true, "message": "API key reactivated successfully" })
  );
  assert!(p.figures(0).unwrap().active);
}

#[test]
fn reset_limits_clears_every_window() {
  let p = pool();
  p.handle_rate_limit(0, LimitType::Tpm, None, None).unwrap();
  let (status, v) = post(&p, "/api/keys/reset-limits");
  assert_eq!(status, 200);
  assert_eq!(
    v,
    json!({ "success": true, "message": "All API key limits reset successfully" })
  );
  assert_eq!(p.figures(0).unwrap().tpm.current, 0);
}

#[test]
fn usage_stats_lists_usage_as_fractions() {
  let p = pool();
  p.record_usage(0, 1234, Outcome::Success, 0.0, None)
    .unwrap();
  p.record_usage(2, 0, Outcome::Failure("quota"), 0.0, None)
    .unwrap();
  let (status, v) = get(&p, "/api/keys/usage-stats");
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
fn metrics_are_served_in_the_prometheus_text_format() {
  let p = pool();
  p.best(
    Claim::Reserve {
      estimated_tokens: 0,
    },
    0,
  )
  .unwrap();
  let reply = open_route(&p, "GET", "/metrics", b"");
  assert_eq!((reply.status, reply.content_type), (200, PROMETHEUS_TEXT));
  assert!(reply
    .body
    .contains("gemini_key_manager_keys_handed_out_total 1\n"));
  assert!(reply.body.contains("key=\"AIzaSyAA...0001\""));
  for key in KEYS {
    assert!(!reply.body.contains(key));
  }
  let reply = open_route(&p, "POST", "/metrics?x=1", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
  assert_eq!(open_route(&p, "HEAD", "/metrics", b"").status, 200);
  assert_eq!(
    open_route(&p, "GET", "/api/keys/best", b"").content_type,
    JSON
  );
}

#[test]
fn usage_stats_computes_figures_over_the_range_from_the_call_log() {
  let TestPool { pool: p, clock, .. } = TestPool::new(&KEYS, Quota::default());
  p.record_usage(0, 100, Outcome::Success, 10.0, None)
    .unwrap();
  clock.advance(1_000);
  p.record_usage(0, 50, Outcome::Success, 30.0, None).unwrap();
  p.record_usage(1, 0, Outcome::Failure("503"), 20.0, None)
    .unwrap();
  let (_, v) = get(&p, "/api/keys/usage-stats");
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
  let (_, v) = get(&p, later);
  assert_eq!(v["data"][0]["requests"], 1);
  assert_eq!(v["metadata"]["totals"]["requests"], 2);
  assert_eq!(
    usage_stats_request("GET", later),
    Some(DateRange::new(Some(T0 + 1_000), None).unwrap())
  );
  assert_eq!(
    usage_stats_request_mounted("GET", "/usage-stats/"),
    Some(DateRange::ALL)
  );
  for (method, path) in [
    ("GET", "/api/keys/usage-stats?startDate=bad"),
    ("POST", "/api/keys/usage-stats"),
    ("GET", "/api/keys/status"),
  ] {
    assert_eq!(usage_stats_request(method, path), None, "{method} {path}");
  }
}

#[test]
fn usage_stats_reads_and_echoes_the_date_range() {
  let p = pool();
  let (status, v) = get(
    &p,
    "/api/keys/usage-stats?startDate=2026-11-27&endDate=2026-11-27T20%3A30%3A42.123%2B02%3A00",
  );
  assert_eq!(status, 200, "{v}");
  assert_eq!(v["metadata"]["startDate"], "2026-11-27T00:00:00.000Z");
  assert_eq!(v["metadata"]["endDate"], "2026-11-27T18:30:42.123Z");
  let (_, v) = get(&p, "/api/keys/usage-stats?endDate=1700000000000&x=1");
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
    let (status, v) = get(&p, &format!("/api/keys/usage-stats?{query}"));
    assert_eq!(status, 400, "{query}");
    assert_eq!(v["error"], error, "{query}");
  }
}

#[test]
fn a_model_param_names_a_known_model_and_never_adds_an_unknown_one() {
  let p = pool();
  let (status, v) = get(&p, "/api/keys/best?model=gemini-2.0-flash");
  assert_eq!(status, 200, "{v}");
  let path = format!(
    "/api/keys/rate-limit/{}?model=models%2Fgemini-2.0-flash",
    KEYS[0]
  );
  let (status, v) = get(&p, &path);
  assert_eq!(status, 200, "{v}");
  assert_eq!(v["data"][0]["limit"], 15);
  for path in [
    "/api/keys/best?model=gemini-9-ultra",
    "/api/keys/rotate?model=gemini-9-ultra",
    "/api/keys/best?model=a%20b",
    "/api/keys/best?model=gemini-2.0-flash&model=gemini-2.0-flash",
  ] {
    let (status, v) = call(
      &p,
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
  let (_, v) = get(&p, "/api/keys/status");
  let models: Vec<&String> = v["data"][0]["models"].as_object().unwrap().keys().collect();
  assert_eq!(models, ["gemini-2.0-flash", DEFAULT_MODEL], "by name");
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
  let p = pool();
  for path in [
    "/api/keys",
    "/api/keys/",
    "/api/keys/nope",
    "/api/keysx/status",
    "/status",
    "/",
  ] {
    let (status, v) = get(&p, path);
    assert_eq!(status, 404, "{path}");
    assert_eq!(v["error"], "Not found");
  }
  let reply = open_route(&p, "GET", "/api/keys/rotate", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("POST")));
  let reply = open_route(&p, "POST", "/api/keys/best", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
  // HEAD is GET (the transport drops the body); not the other methods.
  assert_eq!(open_route(&p, "HEAD", "/api/keys/status", b"").status, 200);
  assert_eq!(open_route(&p, "HEAD", "/api/keys/rotate", b"").status, 405);
  let reply = open_route(&p, "DELETE", "/api/keys/reactivate/x", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("POST")));
  assert_eq!(open_route(&p, "GET", "/api/keys/best", b"").allow, None);
}

#[test]
fn admin_routes_want_the_token_when_one_is_set() {
  let p = pool();
  let guard = AdminGuard::with_token("admin-s3cret").unwrap();
  let admin = [
    "/api/keys/rotate",
    "/api/keys/refresh-cache",
    "/api/keys/reactivate/AIzaSyAA...0001",
    "/api/keys/reset-limits",
  ];
  for path in admin {
    for (authorization, challenge) in [
      (None, CHALLENGE_MISSING),
      (Some("Bearer wrong"), CHALLENGE_WRONG),
      (Some("Basic YWRtaW4="), CHALLENGE_MISSING),
      (Some("Bearer admin-s3cret-"), CHALLENGE_WRONG),
    ] {
      let r = route(
        &p,
        &guard,
        &ApiRequest {
          authorization,
          ..req("POST", path, b"")
        },
      );
      assert_eq!(r.status, 401, "{path} {authorization:?}");
      assert_eq!(r.headers, owned(challenge));
      let v: Value = serde_json::from_str(&r.body).unwrap();
      assert_eq!(v["success"], false);
      assert_eq!(v["error"], "Unauthorized");
    }
    let r = route(
      &p,
      &guard,
      &ApiRequest {
        authorization: Some("Bearer admin-s3cret"),
        ..req("POST", path, b"")
      },
    );
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    // Mounted (Express) paths are guarded the same way.
    let sub = path.strip_prefix(PREFIX).unwrap();
    assert_eq!(
      route_mounted(&p, &guard, &req("POST", sub, b"")).status,
      401
    );
  }
  // Unauthorized requests learn nothing about keys or bodies.
  let r = route(
    &p,
    &guard,
    &req("POST", "/api/keys/reactivate/AIzaSyZZ...9999", b"{oops"),
  );
  assert_eq!(r.status, 401);
  // Reading needs no token.
  for path in [
    "/api/keys/status",
    "/api/keys/best",
    "/api/keys/rate-limit/AIzaSyAA...0001",
    "/api/keys/usage-stats",
    "/api/keys/dashboard",
  ] {
    assert_eq!(
      route(&p, &guard, &req("GET", path, b"")).status,
      200,
      "{path}"
    );
  }
}

#[test]
fn the_dashboard_is_one_html_page_that_loads_nothing_from_outside() {
  let p = pool();
  let r = open_route(&p, "GET", "/api/keys/dashboard", b"");
  assert_eq!(r.status, 200);
  assert_eq!(r.content_type, HTML_TYPE);
  assert!(r.body.starts_with("<!doctype html>"));
  let csp = &r
    .headers
    .iter()
    .find(|(name, _)| *name == "content-security-policy")
    .unwrap()
    .1;
  assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
  for outside in ["http://", "https://", "//cdn", "src=\"", "@import"] {
    assert!(!r.body.contains(outside), "{outside}");
  }
  assert_eq!(
    open_route(&p, "POST", "/api/keys/dashboard", b"").status,
    405
  );
}

/// SPEC section 4's messages, which operators' scripts match on, endpoint by endpoint.
#[test]
fn every_endpoint_says_what_the_old_controller_said() {
  let p = pool();
  let key = "/AIzaSyAA...0001";
  for (method, path, message) in [
    ("GET", "/status", "API key status retrieved successfully"),
    (
      "GET",
      "/best",
      "Best available API key retrieved successfully",
    ),
    ("POST", "/rotate", "API key rotated proactively"),
    (
      "POST",
      "/refresh-cache",
      "API key cache refreshed successfully",
    ),
    (
      "GET",
      "/rate-limit",
      "Rate limit info retrieved successfully",
    ),
    ("POST", "/reactivate", "API key reactivated successfully"),
    (
      "POST",
      "/reset-limits",
      "All API key limits reset successfully",
    ),
    (
      "GET",
      "/usage-stats",
      "Usage statistics retrieved successfully",
    ),
  ] {
    let with_key = if path.ends_with("limit") || path.ends_with("reactivate") {
      format!("/api/keys{path}{key}")
    } else {
      format!("/api/keys{path}")
    };
    let (status, v) = call(&p, method, &with_key, "");
    assert_eq!(
      (status, v["message"].as_str()),
      (200, Some(message)),
      "{path}"
    );
  }
  // No key in the path: the SPEC's 400.
  for (method, path) in [("GET", "/rate-limit/"), ("POST", "/reactivate/")] {
    let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
    assert_eq!(status, 400);
    assert_eq!(v["error"], "API key is required");
    assert_eq!(v["message"], "Please provide an API key");
  }
  // Unknown keys, then a pool that fails every call: each endpoint's failure message.
  for (method, path, message) in [
    ("GET", "/rate-limit/nope", "Failed to get rate limit info"),
    ("POST", "/reactivate/nope", "Failed to reactivate API key"),
  ] {
    let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
    assert_eq!(
      (status, v["message"].as_str()),
      (404, Some(message)),
      "{path}"
    );
  }
  p.close();
  for (method, path, message) in [
    ("GET", "/status", "Failed to get API key status"),
    ("GET", "/best", "Failed to get best available API key"),
    ("POST", "/rotate", "Failed to rotate API key proactively"),
    ("POST", "/refresh-cache", "Failed to refresh cache"),
    ("POST", "/reset-limits", "Failed to reset API key limits"),
    ("GET", "/usage-stats", "Failed to get usage statistics"),
  ] {
    let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
    assert_eq!(
      (status, v["message"].as_str()),
      (500, Some(message)),
      "{path}"
    );
    assert_eq!(v["error"], "API key manager is closed");
  }
}

const NEW_KEY: &str = "AIzaSyNEWK0000000000000000000000000000004";

fn add(pool: &KeyPool, body: &str) -> (u16, Value) {
  let (status, v) = call(pool, "POST", "/api/keys/add", body);
  assert!(!v.to_string().contains(NEW_KEY), "{v}");
  (status, v)
}

#[test]
fn keys_are_added_removed_disabled_and_enabled_without_a_restart() {
  let p = pool();
  let (status, v) = add(&p, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
  assert_eq!(status, 201);
  assert_eq!(v["message"], "API key added successfully");
  assert_eq!(v["data"]["apiKey"], "AIzaSyNE...0004");
  assert_eq!(v["data"]["isActive"], true);
  let (_, v) = get(&p, "/api/keys/status");
  assert_eq!(v["metadata"]["totalKeys"], 4);
  // It is handed out like the others.
  let handed: Vec<usize> = (0..8)
    .map(|_| {
      p.best(
        Claim::Reserve {
          estimated_tokens: 0,
        },
        0,
      )
      .unwrap()
      .pick
      .index
    })
    .collect();
  assert!(handed.contains(&3), "{handed:?}");

  // Disabled: listed, inactive, never handed out; enabled: back.
  let (status, v) = post(&p, "/api/keys/disable/AIzaSyNE...0004");
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key disabled successfully"))
  );
  let (_, v) = get(&p, "/api/keys/status");
  assert_eq!(v["data"][3]["state"], "disabled");
  assert_eq!(v["data"][3]["isActive"], false);
  assert_eq!(v["metadata"]["activeKeys"], 3);
  p.refresh_cache().unwrap();
  for _ in 0..8 {
    assert_ne!(
      p.best(
        Claim::Reserve {
          estimated_tokens: 0
        },
        0
      )
      .unwrap()
      .pick
      .index,
      3
    );
  }
  let (status, v) = post(&p, &format!("/api/keys/enable/{NEW_KEY}"));
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key enabled successfully"))
  );
  assert_eq!(get(&p, "/api/keys/status").1["data"][3]["state"], "active");

  // Removed: gone from every listing and lookup; its position stays, and adding it again
  // brings it back there.
  let (status, v) = post(&p, "/api/keys/remove/AIzaSyAA...0001");
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key removed successfully"))
  );
  let (_, v) = get(&p, "/api/keys/status");
  assert_eq!(v["metadata"]["totalKeys"], 3);
  assert!(!v.to_string().contains("AIzaSyAA...0001"));
  let (status, v) = get(&p, "/api/keys/rate-limit/AIzaSyAA...0001");
  assert_eq!(
    (status, v["error"].as_str()),
    (404, Some("API key not found"))
  );
  let (status, _) = post(&p, "/api/keys/remove/AIzaSyAA...0001");
  assert_eq!(status, 404);
  let (status, _) = add(&p, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[0]));
  assert_eq!(status, 201);
  assert_eq!(p.names().position(KEYS[0]), Some(0));
  assert_eq!(get(&p, "/api/keys/status").1["metadata"]["totalKeys"], 4);
}

#[test]
fn adding_refuses_duplicates_malformed_keys_and_bodies_with_clear_errors() {
  let p = pool();
  let (status, v) = add(&p, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[1]));
  assert_eq!(
    (status, v["error"].as_str()),
    (409, Some("API key already exists"))
  );
  assert_eq!(v["message"], "Failed to add API key");
  for bad in [
    r#""""#,
    r#""two words""#,
    r#""a,b""#,
    r#""project:key""#,
    r#""tab\tkey""#,
  ] {
    let (status, v) = add(&p, &format!(r#"{{"apiKey":{bad}}}"#));
    assert_eq!(status, 400, "{bad}");
    assert!(
      v["error"]
        .as_str()
        .unwrap()
        .starts_with("Invalid API key: "),
      "{v}"
    );
  }
  let long = "k".repeat(513);
  assert_eq!(add(&p, &format!(r#"{{"apiKey":"{long}"}}"#)).0, 400);
  for body in ["", "{}", "[]", r#"{"apiKey":5}"#, r#"{"key":"x"}"#] {
    let (status, v) = add(&p, body);
    assert_eq!(
      (status, v["error"].as_str()),
      (400, Some("Invalid API key")),
      "{body}"
    );
  }
  assert_eq!(add(&p, "not json").1["error"], "Invalid request body");
  // A pool that cannot keep an added key says why, and changes nothing.
  p.refuse_additions(Some("no secret to seal it under".into()));
  let (status, v) = add(&p, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
  assert_eq!(status, 409);
  assert_eq!(
    v["error"],
    "API key cannot be stored: no secret to seal it under"
  );
  assert_eq!(p.names().len(), 3);
}

#[test]
fn key_management_wants_the_admin_token() {
  let p = pool();
  let guard = AdminGuard::with_token("the-admin-token").unwrap();
  for (path, body) in [
    ("/api/keys/add", format!(r#"{{"apiKey":"{NEW_KEY}"}}"#)),
    ("/api/keys/disable/AIzaSyAA...0001", String::new()),
    ("/api/keys/enable/AIzaSyAA...0001", String::new()),
    ("/api/keys/remove/AIzaSyAA...0001", String::new()),
  ] {
    let refused = route(&p, &guard, &req("POST", path, body.as_bytes()));
    assert_eq!(refused.status, 401, "{path}");
    let allowed = route(
      &p,
      &guard,
      &ApiRequest {
        authorization: Some("Bearer the-admin-token"),
        ..req("POST", path, body.as_bytes())
      },
    );
    assert!(allowed.status < 300, "{path}: {}", allowed.body);
  }
}

#[test]
fn key_routes_refuse_missing_unknown_and_ambiguous_keys() {
  let p = pool();
  for path in [
    "/api/keys/rate-limit",
    "/api/keys/rate-limit/",
    "/api/keys/rate-limit/%20",
  ] {
    let (status, v) = get(&p, path);
    assert_eq!(status, 400, "{path}");
    assert_eq!(v["error"], "API key is required");
  }
  let (status, v) = post(&p, "/api/keys/reactivate/AIzaSyZZ...9999");
  assert_eq!(status, 404);
  assert_eq!(v["error"], "API key not found");
  let (status, _) = get(&p, "/api/keys/rate-limit/a%E2%28b");
  assert_eq!(status, 400);
  let (status, _) = get(&p, "/api/keys/rate-limit/a%2");
  assert_eq!(status, 400);

  // Two keys with one mask: the mask names neither.
  let twins = [
    "AIzaSyTWIN-first-key-0000000000000000000",
    "AIzaSyTWIN-other-key-0000000000000000000",
  ];
  let p = TestPool::new(&twins, Quota::default()).pool;
  let (status, v) = get(&p, "/api/keys/rate-limit/AIzaSyTW...0000");
  assert_eq!(status, 409);
  assert_eq!(v["error"], "Ambiguous API key");
  assert_eq!(
    v["message"],
    "Failed to get rate limit info: 2 keys have the masked form AIzaSyTW...0000; name the key in \
     full"
  );
  let (status, _) = get(&p, &format!("/api/keys/rate-limit/{}", twins[1]));
  assert_eq!(status, 200);
}

#[test]
fn full_keys_in_unknown_paths_are_masked_in_the_message() {
  let p = pool();
  let (status, v) = get(&p, &format!("/api/keys/{}/x?key={}", KEYS[0], KEYS[1]));
  assert_eq!(status, 404);
  assert_eq!(v["message"], "No endpoint at /api/keys/AIzaSyAA...0001/x");
  let (_, v) = get(&p, &format!("/v1/models?key={}", KEYS[1]));
  assert_eq!(v["message"], "No endpoint at /v1/models");
}

#[test]
fn redact_path_masks_key_segments_and_drops_the_query() {
  let p = pool();
  let cases = [
    (
      format!("/api/keys/rate-limit/{}", KEYS[2]),
      "/api/keys/rate-limit/AIzaSyCC...0003",
    ),
    (
      "/api/keys/rate-limit/AIzaSyCC...0003".to_owned(),
      "/api/keys/rate-limit/AIzaSyCC...0003",
    ),
    (
      "/api/keys/reactivate/not-a-key-but-long?x=1".to_owned(),
      "/api/keys/reactivate/not-a-ke...long",
    ),
    ("/api/keys/best?startDate=1".to_owned(), "/api/keys/best"),
    (format!("/other/k{}/", KEYS[0]), "/other/kAIzaSyA...0001/"),
    ("/".to_owned(), "/"),
  ];
  for (path, want) in cases {
    assert_eq!(redact_path(&p, &path), want, "{path}");
  }
}

#[test]
fn post_bodies_must_be_empty_or_json() {
  let p = pool();
  assert_eq!(call(&p, "POST", "/api/keys/rotate", " {} ").0, 200);
  assert_eq!(call(&p, "POST", "/api/keys/rotate", "\n").0, 200);
  let (status, v) = call(&p, "POST", "/api/keys/rotate", "{oops");
  assert_eq!(status, 400);
  assert_eq!(v["error"], "Invalid request body");
  // GET bodies are not looked at.
  assert_eq!(call(&p, "GET", "/api/keys/best", "{oops").0, 200);
}

#[test]
fn busy_keys_are_a_429_with_retry_after_and_no_usable_key_a_503() {
  let TestPool { pool: p, clock, .. } = TestPool::new(&KEYS[..2], Quota::default());
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
    let reply = open_route(&p, method, path, b"");
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
  let (status, v) = get(&p, "/api/keys/best");
  assert_eq!(status, 503);
  assert_eq!(v["nextAvailableAt"], Value::Null);
}

#[test]
fn pool_failures_are_500_with_the_pool_message() {
  let p = pool();
  p.close();
  let (status, v) = get(&p, "/api/keys/status");
  assert_eq!(status, 500);
  assert_eq!(v["error"], "API key manager is closed");
}

#[test]
fn mounted_paths_reach_the_same_table() {
  let p = pool();
  let reply = open_mounted(&p, "GET", "/best?x=1", b"");
  assert_eq!(reply.status, 200);
  assert_eq!(open_mounted(&p, "GET", "/STATUS/", b"").status, 200);
  assert_eq!(open_mounted(&p, "GET", "/api/keys/status", b"").status, 404);
  assert_eq!(open_mounted(&p, "GET", "", b"").status, 404);
}
