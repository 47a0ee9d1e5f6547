//! Reading the usage collection back for statistics: the calls of a date range, by the `timestamp`
//! index, with only the fields statistics need.

use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;

use super::documents::{count, millis};
use super::error::StoreError;
use crate::call_log::Call;
use crate::roster::Names;
use crate::usage_stats::DateRange;

/// Documents read per reply.
const READ_BATCH: u32 = 10_000;

/// The calls of a range, as far as they were read.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCalls {
  pub calls: Vec<Call>,
  /// More documents matched than the limit allowed to read.
  pub truncated: bool,
}

/// Reads `api_key_usage`: cheap to clone, and usable while the writer works.
#[derive(Debug, Clone)]
pub struct UsageReader {
  pub(super) usage: Collection<Document>,
}

impl UsageReader {
  /// The stored calls of the pool's keys (`names`) within `range` (both ends included), at most
  /// `max` of them. Documents of other keys, or without a date, are skipped.
  pub async fn calls(
    &self,
    range: DateRange,
    max: usize,
    names: &Names,
  ) -> Result<StoredCalls, StoreError> {
    let mut bounds = Document::new();
    if let Some(start) = range.start {
      bounds.insert("$gte", DateTime::from_millis(start));
    }
    if let Some(end) = range.end {
      bounds.insert("$lte", DateTime::from_millis(end));
    }
    let filter = if bounds.is_empty() {
      doc! {}
    } else {
      doc! { "timestamp": bounds }
    };
    let projection =
      doc! { "apiKey": 1, "timestamp": 1, "tokensUsed": 1, "success": 1, "responseTime": 1 };
    let mut cursor = self
      .usage
      .find(filter)
      .projection(projection)
      .batch_size(READ_BATCH)
      .await?;
    let mut calls = Vec::new();
    let mut truncated = false;
    while cursor.advance().await? {
      if calls.len() == max {
        truncated = true;
        break;
      }
      let d = cursor.deserialize_current()?;
      let key = d.get_str("apiKey").ok().and_then(|k| names.resolve(k));
      let (Some(key), Some(timestamp)) = (key, millis(d.get("timestamp"))) else {
        continue;
      };
      let response_time = match d.get("responseTime") {
        Some(mongodb::bson::Bson::Double(x)) if x.is_finite() && *x >= 0.0 => *x,
        other => count(other).unwrap_or(0) as f64,
      };
      calls.push(Call {
        key,
        timestamp,
        tokens: count(d.get("tokensUsed")).unwrap_or(0),
        success: d.get_bool("success").unwrap_or(false),
        response_time,
      });
    }
    Ok(StoredCalls { calls, truncated })
  }
}
