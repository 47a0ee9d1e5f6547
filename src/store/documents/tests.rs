use super::*;
use crate::core::clock::{DAY_MS, MINUTE_MS};
use crate::core::snapshot::UsageIds;
use crate::store::unique_name;
use mongodb::bson::oid::ObjectId;

const NOW: Millis = 1_700_000_000_000;

fn record() -> KeyRecord {
  let w = |current, limit| WindowRecord {
    current,
    limit,
    reset_time: NOW + 30_000,
  };
  KeyRecord {
    api_key: "AIzaSyEXAMPLE".into(),
    is_active: false,
    last_used: NOW - 5,
    rpm: w(3, 30),
    rpd: w(150, 200),
    tpm: w(5_000_000_000, 1_000_000),
    error_count: 5,
    last_error: Some("503".into()),
    last_error_time: Some(NOW - 1),
  }
}

#[test]
fn key_documents_round_trip_in_the_spec_shape() {
  let d = key_document(&record(), "AIzaSyEXAMPLE");
  assert_eq!(d.get_str("apiKey").unwrap(), "AIzaSyEXAMPLE");
  let rpm = d
    .get_document("limits")
    .unwrap()
    .get_document("rpm")
    .unwrap();
  assert_eq!(rpm.get_i32("current").unwrap(), 3);
  assert_eq!(
    rpm.get_datetime("resetTime").unwrap().timestamp_millis(),
    NOW + 30_000
  );
  let tpm = d
    .get_document("limits")
    .unwrap()
    .get_document("tpm")
    .unwrap();
  assert_eq!(tpm.get_i64("current").unwrap(), 5_000_000_000);
  assert_eq!(key_from_document(&d, NOW), Some(record()));
}

#[test]
fn cleared_errors_leave_no_fields() {
  let mut k = record();
  k.last_error = None;
  k.last_error_time = None;
  let d = key_document(&k, &k.api_key);
  assert!(!d.contains_key("lastError") && !d.contains_key("lastErrorTime"));
  assert_eq!(key_from_document(&d, NOW), Some(k));
}

#[test]
fn old_service_documents_load_with_any_numeric_type_and_expired_windows_restart() {
  let d = doc! {
    "_id": ObjectId::new(),
    "apiKey": "old-key",
    "isActive": true,
    "lastUsed": DateTime::from_millis(NOW - 90_000),
    "limits": {
      "rpm": { "current": 30_i32, "limit": 30_i32, "resetTime": DateTime::from_millis(NOW - 30_000) },
      "rpd": { "current": 120.0_f64, "limit": 200_i64, "resetTime": DateTime::from_millis(NOW + 3_600_000) },
      "tpm": { "current": 4_000_i64, "limit": 1_000_000.0_f64, "resetTime": DateTime::from_millis(NOW) },
    },
    "errorCount": 2.0_f64,
    "createdAt": DateTime::from_millis(0),
  };
  let k = key_from_document(&d, NOW).unwrap();
  assert_eq!(
    k.rpm,
    WindowRecord {
      current: 0,
      limit: 30,
      reset_time: NOW + MINUTE_MS
    }
  );
  assert_eq!(
    k.rpd,
    WindowRecord {
      current: 120,
      limit: 200,
      reset_time: NOW + 3_600_000
    }
  );
  assert_eq!((k.tpm.current, k.tpm.limit), (0, 1_000_000));
  assert_eq!(
    (k.error_count, k.last_error, k.last_error_time),
    (2, None, None)
  );
}

#[test]
fn missing_parts_take_defaults_and_a_document_without_a_key_is_skipped() {
  let k = key_from_document(
    &doc! { "apiKey": "bare", "lastUsed": "2024-01-01T00:00:00Z" },
    NOW,
  )
  .unwrap();
  assert!(k.is_active);
  assert_eq!(k.last_used, 1_704_067_200_000);
  assert_eq!((k.rpd.current, k.rpd.limit), (0, 200));
  assert_eq!(k.rpd.reset_time, NOW + DAY_MS);
  assert_eq!(key_from_document(&doc! { "apiKey": 7 }, NOW), None);
  let negative =
    doc! { "apiKey": "n", "errorCount": -3, "limits": { "rpm": { "current": (f64::NAN) } } };
  let k = key_from_document(&negative, NOW).unwrap();
  assert_eq!((k.error_count, k.rpm.current), (0, 0));
}

#[test]
fn usage_documents_carry_their_stable_id_and_js_numbers() {
  let ids = UsageIds::new(unique_name());
  let u = UsageRecord {
    id: ids.next_id(),
    api_key: "k".into(),
    timestamp: NOW,
    tokens_used: 42,
    success: false,
    error: Some("429".into()),
    response_time: 12.5,
  };
  let d = usage_document(&u, "k");
  assert_eq!(d.get_str("_id").unwrap(), u.id.to_string());
  assert_eq!(d.get_i32("tokensUsed").unwrap(), 42);
  assert_eq!(d.get_f64("responseTime").unwrap(), 12.5);
  assert_eq!(d.get_str("error").unwrap(), "429");
  let whole = usage_document(
    &UsageRecord {
      response_time: 80.0,
      error: None,
      ..u
    },
    "fp_0",
  );
  assert_eq!(whole.get_str("apiKey").unwrap(), "fp_0");
  assert_eq!(whole.get_i32("responseTime").unwrap(), 80);
  assert!(!whole.contains_key("error"));
}
