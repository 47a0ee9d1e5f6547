use serde_json::{json, Value};

use super::*;
use crate::core::pool::{Claim, Outcome};
use crate::core::quota::LimitType;
use crate::http::routes::testing::*;
use crate::http::routes::ApiRequest;
use crate::http::AdminGuard;

const NEW_KEY: &str = "AIzaSyNEWK0000000000000000000000000000004";

fn add(state: &ApiState, body: &str) -> (u16, Value) {
  let (status, v) = call(state, "POST", "/api/keys/add", body);
  assert!(!v.to_string().contains(NEW_KEY), "{v}");
  (status, v)
}

#[test]
fn key_management_wants_the_admin_token() {
  let s = state();
  let guard = AdminGuard::with_token("the-admin-token").unwrap();
  for (path, body) in [
    ("/api/keys/add", format!(r#"{{"apiKey":"{NEW_KEY}"}}"#)),
    ("/api/keys/disable/AIzaSyAA...0001", String::new()),
    ("/api/keys/enable/AIzaSyAA...0001", String::new()),
    ("/api/keys/remove/AIzaSyAA...0001", String::new()),
  ] {
    let refused = routed(&s, &guard, &req("POST", path, body.as_bytes()));
    assert_eq!(refused.status, 401, "{path}");
    let allowed = routed(
      &s,
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
fn reactivate_brings_a_key_back() {
  let s = state();
  let p = s.pool();
  p.record_usage(
    0,
    0,
    Outcome::Failure("[400 Bad Request] API key not valid. API_KEY_INVALID"),
    0.0,
    None,
  )
  .unwrap();
  assert!(!p.figures(0).unwrap().active);
  let (status, v) = post(&s, "/api/keys/reactivate/AIzaSyAA...0001");
  assert_eq!(status, 200);
  assert_eq!(
    v,
    json!({ "success": true, "message": "API key reactivated successfully" })
  );
  assert!(p.figures(0).unwrap().active);
}

#[test]
fn reset_limits_clears_every_window() {
  let s = state();
  let p = s.pool();
  p.handle_rate_limit(0, LimitType::Tpm, None, None).unwrap();
  let (status, v) = post(&s, "/api/keys/reset-limits");
  assert_eq!(status, 200);
  assert_eq!(
    v,
    json!({ "success": true, "message": "All API key limits reset successfully" })
  );
  assert_eq!(p.figures(0).unwrap().tpm.current, 0);
}

#[test]
fn keys_are_added_removed_disabled_and_enabled_without_a_restart() {
  let s = state();
  let p = s.pool();
  let (status, v) = add(&s, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
  assert_eq!(status, 201);
  assert_eq!(v["message"], "API key added successfully");
  assert_eq!(v["data"]["apiKey"], "AIzaSyNE...0004");
  assert_eq!(v["data"]["isActive"], true);
  let (_, v) = get(&s, "/api/keys/status");
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
  let (status, v) = post(&s, "/api/keys/disable/AIzaSyNE...0004");
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key disabled successfully"))
  );
  let (_, v) = get(&s, "/api/keys/status");
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
  let (status, v) = post(&s, &format!("/api/keys/enable/{NEW_KEY}"));
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key enabled successfully"))
  );
  assert_eq!(get(&s, "/api/keys/status").1["data"][3]["state"], "active");

  // Removed: gone from every listing and lookup; its position stays, and adding it again
  // brings it back there.
  let (status, v) = post(&s, "/api/keys/remove/AIzaSyAA...0001");
  assert_eq!(
    (status, v["message"].as_str()),
    (200, Some("API key removed successfully"))
  );
  let (_, v) = get(&s, "/api/keys/status");
  assert_eq!(v["metadata"]["totalKeys"], 3);
  assert!(!v.to_string().contains("AIzaSyAA...0001"));
  let (status, v) = get(&s, "/api/keys/rate-limit/AIzaSyAA...0001");
  assert_eq!(
    (status, v["error"].as_str()),
    (404, Some("API key not found"))
  );
  let (status, _) = post(&s, "/api/keys/remove/AIzaSyAA...0001");
  assert_eq!(status, 404);
  let (status, _) = add(&s, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[0]));
  assert_eq!(status, 201);
  assert_eq!(p.names().position(KEYS[0]), Some(0));
  assert_eq!(get(&s, "/api/keys/status").1["metadata"]["totalKeys"], 4);
}

#[test]
fn adding_refuses_duplicates_malformed_keys_and_bodies_with_clear_errors() {
  let s = state();
  let p = s.pool();
  let (status, v) = add(&s, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[1]));
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
    let (status, v) = add(&s, &format!(r#"{{"apiKey":{bad}}}"#));
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
  assert_eq!(add(&s, &format!(r#"{{"apiKey":"{long}"}}"#)).0, 400);
  for body in ["", "{}", "[]", r#"{"apiKey":5}"#, r#"{"key":"x"}"#] {
    let (status, v) = add(&s, body);
    assert_eq!(
      (status, v["error"].as_str()),
      (400, Some("Invalid API key")),
      "{body}"
    );
  }
  assert_eq!(add(&s, "not json").1["error"], "Invalid request body");
  // A pool that cannot keep an added key says why, and changes nothing.
  p.refuse_additions(Some("no secret to seal it under".into()));
  let (status, v) = add(&s, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
  assert_eq!(status, 409);
  assert_eq!(
    v["error"],
    "API key cannot be stored: no secret to seal it under"
  );
  assert_eq!(p.names().len(), 3);
}
