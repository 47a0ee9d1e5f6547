//! Records to BSON documents and back, in SPEC section 3's shape. Writing produces what the old
//! Node service wrote (integers as Int32 where they fit, dates as BSON dates); reading accepts
//! whatever that service or a person may have left: any numeric type, extra fields, missing
//! optional fields.

use mongodb::bson::{doc, Bson, DateTime, Document};

use crate::core::clock::Millis;
use crate::core::quota::{LimitType, Quota};
use crate::core::snapshot::{BudgetRecord, KeyRecord, RestRecord, UsageRecord, WindowRecord};

/// An integer as the Node driver stores a JS number: Int32 when it fits, otherwise Int64.
fn int(n: u64) -> Bson {
  match i32::try_from(n) {
    Ok(small) => Bson::Int32(small),
    Err(_) => Bson::Int64(i64::try_from(n).unwrap_or(i64::MAX)),
  }
}

/// A JS number as the Node driver stores it: integral values as integers, others as doubles.
fn stored_number(x: f64) -> Bson {
  if x.fract() == 0.0 && x.abs() <= i32::MAX as f64 {
    Bson::Int32(x as i32)
  } else {
    Bson::Double(x)
  }
}

fn date(ms: Millis) -> Bson {
  Bson::DateTime(DateTime::from_millis(ms))
}

/// A non-negative count from any numeric BSON type; negatives and NaN read as 0.
pub fn count(value: Option<&Bson>) -> Option<u64> {
  match value? {
    Bson::Int32(n) => Some((*n).max(0) as u64),
    Bson::Int64(n) => Some((*n).max(0) as u64),
    // `as` saturates, and NaN becomes 0.
    Bson::Double(x) => Some(x.max(0.0) as u64),
    _ => None,
  }
}

/// A point in time from a BSON date, a number of milliseconds, or an RFC 3339 string.
pub fn millis(value: Option<&Bson>) -> Option<Millis> {
  match value? {
    Bson::DateTime(d) => Some(d.timestamp_millis()),
    Bson::Int32(n) => Some(i64::from(*n)),
    Bson::Int64(n) => Some(*n),
    Bson::Double(x) if x.is_finite() => Some(*x as Millis),
    Bson::String(s) => DateTime::parse_rfc3339_str(s)
      .ok()
      .map(|d| d.timestamp_millis()),
    _ => None,
  }
}

fn window_document(w: &WindowRecord) -> Document {
  doc! {
    "current": int(w.current),
    "limit": int(w.limit),
    "resetTime": date(w.reset_time),
  }
}

/// A stored window; a missing or unreadable part reads as an expired, empty window at the default
/// limit, which [`KeyRecord::at`] then restarts.
fn window_from(limits: Option<&Document>, name: &str, default_limit: u64) -> WindowRecord {
  let w = limits.and_then(|l| l.get_document(name).ok());
  let field = |f: &str| w.and_then(|w| w.get(f));
  WindowRecord {
    current: count(field("current")).unwrap_or(0),
    limit: count(field("limit")).unwrap_or(default_limit),
    reset_time: millis(field("resetTime")).unwrap_or(Millis::MIN),
  }
}

/// The whole `api_keys` document for a key, named `api_key` (its stored name), without `_id` (the
/// server keeps or assigns it).
pub fn key_document(k: &KeyRecord, api_key: &str) -> Document {
  let mut d = doc! {
    "apiKey": api_key,
    "isActive": k.is_active,
    "lastUsed": date(k.last_used),
    "limits": {
      "rpm": window_document(&k.rpm),
      "rpd": window_document(&k.rpd),
      "tpm": window_document(&k.tpm),
    },
    "errorCount": int(u64::from(k.error_count)),
  };
  if let Some(e) = &k.last_error {
    d.insert("lastError", e);
  }
  if let Some(t) = k.last_error_time {
    d.insert("lastErrorTime", date(t));
  }
  d
}

/// A key record from an `api_keys` document as it stands at `now` (expired windows restarted), or
/// `None` when the document names no key. Every other field has a default: active, no errors,
/// last used `now`.
pub fn key_from_document(d: &Document, now: Millis) -> Option<KeyRecord> {
  let api_key = d.get_str("apiKey").ok()?.to_owned();
  let limits = d.get_document("limits").ok();
  let defaults = Quota::default();
  let record = KeyRecord {
    api_key,
    is_active: d.get_bool("isActive").unwrap_or(true),
    last_used: millis(d.get("lastUsed")).unwrap_or(now),
    rpm: window_from(limits, "rpm", defaults.rpm),
    rpd: window_from(limits, "rpd", defaults.rpd),
    tpm: window_from(limits, "tpm", defaults.tpm),
    error_count: count(d.get("errorCount"))
      .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
      .unwrap_or(0),
    last_error: d.get_str("lastError").ok().map(str::to_owned),
    last_error_time: millis(d.get("lastErrorTime")),
  };
  Some(record.at(now))
}

/// The `api_key_budgets` document of a budget, its subject named `stored` (its `_id`).
pub fn budget_document(b: &BudgetRecord, stored: &str) -> Document {
  let rest = match b.rest {
    RestRecord::Clear => Bson::Null,
    RestRecord::Until { until, window } => Bson::Document(doc! {
      "until": date(until),
      "window": window.map(LimitType::as_str),
    }),
    RestRecord::NoQuota => Bson::String("no-quota".into()),
  };
  doc! {
    "_id": stored,
    "project": b.project.as_deref(),
    "model": &b.model,
    "limits": {
      "rpm": window_document(&b.rpm),
      "rpd": window_document(&b.rpd),
      "tpm": window_document(&b.tpm),
    },
    "rest": rest,
  }
}

/// A budget record from an `api_key_budgets` document, its subject the stored name; `None` when
/// it names no subject or model. Unreadable windows read as expired, an unreadable rest as none.
pub fn budget_from_document(d: &Document) -> Option<BudgetRecord> {
  let subject = d.get_str("_id").ok()?.to_owned();
  let model = d.get_str("model").ok()?.to_owned();
  let limits = d.get_document("limits").ok();
  let rest = match d.get("rest") {
    Some(Bson::String(s)) if s == "no-quota" => RestRecord::NoQuota,
    Some(Bson::Document(r)) => match millis(r.get("until")) {
      Some(until) => RestRecord::Until {
        until,
        window: r.get_str("window").ok().and_then(LimitType::parse),
      },
      None => RestRecord::Clear,
    },
    _ => RestRecord::Clear,
  };
  Some(BudgetRecord {
    subject,
    project: d.get_str("project").ok().map(str::to_owned),
    model,
    // Limits come from configuration; a stored one only fills an unreadable window.
    rpm: window_from(limits, "rpm", 0),
    rpd: window_from(limits, "rpd", 0),
    tpm: window_from(limits, "tpm", 0),
    rest,
  })
}

/// The `api_key_usage` document for a call, its key named `api_key` (its stored name), with its
/// stable `_id`.
pub fn usage_document(u: &UsageRecord, api_key: &str) -> Document {
  let mut d = doc! {
    "_id": u.id.to_string(),
    "apiKey": api_key,
    "timestamp": date(u.timestamp),
    "tokensUsed": int(u.tokens_used),
    "success": u.success,
    "responseTime": stored_number(u.response_time),
  };
  if let Some(e) = &u.error {
    d.insert("error", e);
  }
  d
}

#[cfg(test)]
mod tests;
