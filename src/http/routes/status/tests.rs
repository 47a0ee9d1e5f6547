use serde_json::json;

use crate::core::pool::testing::{T0, T0_ISO};
use crate::core::pool::{Claim, Outcome};
use crate::core::quota::{LimitType, DEFAULT_MODEL};
use crate::http::json::IsoDate;
use crate::http::routes::testing::*;

#[test]
fn status_lists_every_key_masked_with_iso_dates() {
  let s = state();
  let (status, v) = get(&s, "/api/keys/status");
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
  let s = state();
  let p = s.pool();
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
  let (_, v) = get(&s, "/api/keys/status");
  let shown = &v["data"][picked.pick.index];
  assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["current"], 1);
  assert_eq!(shown["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
  assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["limit"], 15);
  // The default model's figures stay in `limits`, untouched by the other model's call.
  assert_eq!(shown["limits"]["rpm"]["current"], 0);
  assert_eq!(v["data"][index]["project"], "alpha");
  let (_, usage) = get(&s, "/api/keys/usage-stats");
  let row = &usage["data"][picked.pick.index];
  assert_eq!(row["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
  assert_eq!(usage["data"][index]["project"], "alpha");
}

#[test]
fn status_shows_a_resting_key_and_until_when() {
  let s = state();
  let p = s.pool();
  p.handle_rate_limit(2, LimitType::Rpm, Some(17_000), None)
    .unwrap();
  let (_, v) = get(&s, "/api/keys/status");
  assert_eq!(v["data"][2]["state"], "resting");
  assert_eq!(v["data"][2]["stateUntil"], IsoDate(T0 + 17_000).to_string());
  assert_eq!(v["data"][2]["isActive"], true);
}

#[test]
fn status_shows_the_last_error_with_keys_scrubbed_out() {
  let s = state();
  let p = s.pool();
  let error = format!("fetch https://g/?key={} failed", KEYS[1]);
  p.record_usage(1, 0, Outcome::Failure(&error), 0.0, None)
    .unwrap();
  let (_, v) = get(&s, "/api/keys/status");
  let key = &v["data"][1];
  assert_eq!(key["errorCount"], 1);
  assert_eq!(
    key["lastError"],
    "fetch https://g/?key=AIzaSyBB...0002 failed"
  );
  assert_eq!(key["lastErrorTime"], T0_ISO);
}

#[test]
fn rate_limit_takes_a_full_masked_or_encoded_key() {
  let s = state();
  let p = s.pool();
  p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
  for path in [
    format!("/api/keys/rate-limit/{}", KEYS[1]),
    "/api/keys/rate-limit/AIzaSyBB...0002".to_owned(),
    "/api/keys/rate-limit/AIzaSyBB%2E%2E%2E0002/".to_owned(),
  ] {
    let (status, v) = get(&s, &path);
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
