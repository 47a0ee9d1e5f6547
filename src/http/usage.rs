//! `GET /usage-stats`: per-key and total usage over a date range, computed from the usage
//! collection while MongoDB is connected, from the in-memory call log otherwise, next to the SPEC's
//! fields of each key's current windows.

use serde::Serialize;

use super::json::{parse_date, IsoDate, UsageJson};
use super::routes::Reply;
use crate::core::key::{Admission, KeyStatus};
use crate::core::pool::KeyPool;
use crate::stats::usage_stats::{compute, from_buckets, DateRange, UsageFigures, UsageReport};

/// The `startDate` and `endDate` of a request, as given (`None` when absent), into a range; the
/// 400 reply that says what is wrong otherwise.
pub fn parse_range(start: Option<&str>, end: Option<&str>) -> Result<DateRange, Reply> {
  let parse = |name: &str, text: Option<&str>| match text {
    None => Ok(None),
    Some(text) => parse_date(text).map(Some).ok_or_else(|| {
      Reply::error(
        400,
        &format!("Invalid {name}"),
        &format!(
          "{name} must be an ISO-8601 date or date-time (e.g. 2026-11-27 or \
           2026-11-27T20:30:42.123Z) or milliseconds since the epoch"
        ),
      )
    }),
  };
  let start = parse("startDate", start)?;
  let end = parse("endDate", end)?;
  DateRange::new(start, end).map_err(|e| Reply::error(400, "Invalid date range", &e.to_string()))
}

/// The figures as JSON; response times in ms, `null` without calls.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FiguresJson {
  requests: u64,
  successes: u64,
  failures: u64,
  error_rate: f64,
  tokens: u64,
  p50_response_time: Option<f64>,
  p95_response_time: Option<f64>,
}

impl From<&UsageFigures> for FiguresJson {
  fn from(f: &UsageFigures) -> Self {
    Self {
      requests: f.requests,
      successes: f.successes,
      failures: f.failures,
      error_rate: f.error_rate,
      tokens: f.tokens,
      p50_response_time: f.p50_response_time,
      p95_response_time: f.p95_response_time,
    }
  }
}

#[derive(Serialize)]
struct KeyJson {
  #[serde(flatten)]
  status: UsageJson,
  /// Removed from the pool: listed only for the calls it made in the range.
  removed: bool,
  #[serde(flatten)]
  figures: FiguresJson,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
  start_date: Option<IsoDate>,
  end_date: Option<IsoDate>,
  total_keys: usize,
  /// `"mongodb"` or `"memory"`.
  source: &'static str,
  /// Calls of the range may be missing: the in-memory log overwrote some, or more were stored
  /// than [`crate::store::MAX_CALLS`].
  truncated: bool,
  /// How many calls the in-memory log keeps (with the memory source).
  #[serde(skip_serializing_if = "Option::is_none")]
  call_log_capacity: Option<usize>,
  totals: FiguresJson,
}

#[derive(Serialize)]
struct Body {
  success: bool,
  data: Vec<KeyJson>,
  metadata: Meta,
  message: &'static str,
}

/// Where the calls came from.
enum Source {
  Mongo { truncated: bool },
  Memory { truncated: bool, capacity: usize },
}

/// The answer for `range`, with what `report` computes over every position of the pool.
fn reply(
  pool: &KeyPool,
  range: DateRange,
  report: impl FnOnce(usize) -> UsageReport,
  source: Source,
) -> Reply {
  // Every position, removed keys too: their calls stay part of the history.
  let statuses = match pool.every_status() {
    Ok(s) => s,
    Err(err) => return Reply::error(500, &err.to_string(), "Failed to get usage statistics"),
  };
  let report = report(statuses.len());
  let removed = |s: &KeyStatus| s.figures.admission == Admission::Removed;
  let (source, truncated, call_log_capacity) = match source {
    Source::Mongo { truncated } => ("mongodb", truncated, None),
    Source::Memory {
      truncated,
      capacity,
    } => ("memory", truncated, Some(capacity)),
  };
  let body = Body {
    success: true,
    data: statuses
      .iter()
      .zip(&report.keys)
      .filter(|(status, figures)| !removed(status) || figures.requests > 0)
      .map(|(status, figures)| KeyJson {
        status: UsageJson::new(status),
        removed: removed(status),
        figures: figures.into(),
      })
      .collect(),
    metadata: Meta {
      start_date: range.start.map(IsoDate),
      end_date: range.end.map(IsoDate),
      total_keys: statuses.iter().filter(|s| !removed(s)).count(),
      source,
      truncated,
      call_log_capacity,
      totals: (&report.totals).into(),
    },
    message: "Usage statistics retrieved successfully",
  };
  Reply::json(200, &body)
}

/// Statistics from the in-memory call log.
pub fn from_memory(pool: &KeyPool, range: DateRange) -> Reply {
  match pool.recent_calls(range) {
    Ok(recent) => reply(
      pool,
      range,
      |keys| compute(keys, &recent.calls, range),
      Source::Memory {
        truncated: recent.truncated,
        capacity: recent.capacity,
      },
    ),
    Err(err) => Reply::error(500, &err.to_string(), "Failed to get usage statistics"),
  }
}

/// Statistics from the usage collection while MongoDB is connected; from the in-memory call log
/// without it, or when the query fails (`metadata.source` says which).
pub async fn usage_stats(pool: &KeyPool, range: DateRange) -> Reply {
  if let Some(reader) = pool.usage_reader() {
    if let Ok(stored) = reader.usage(range, &pool.names()).await {
      let source = Source::Mongo {
        truncated: stored.truncated,
      };
      return reply(
        pool,
        range,
        |keys| from_buckets(keys, &stored.buckets),
        source,
      );
    }
  }
  from_memory(pool, range)
}

#[cfg(test)]
mod tests {
  use std::sync::Arc;

  use serde_json::Value;

  use super::*;
  use crate::core::clock::FakeClock;
  use crate::core::config::PoolConfig;
  use crate::core::pool::Outcome;
  use crate::core::quota::Quota;
  use crate::log::SilentLog;

  #[tokio::test]
  async fn without_a_database_statistics_come_from_the_call_log() {
    let config = PoolConfig::of(
      vec!["AIzaSyAAAA0000000000000000000000000000001".to_owned()],
      Quota::default(),
    );
    let clock = FakeClock::at(1_700_000_000_000);
    let pool = KeyPool::new(config, Arc::new(clock), Arc::new(SilentLog)).unwrap();
    pool
      .record_usage(0, 5, Outcome::Success, 8.0, None)
      .unwrap();
    let reply = usage_stats(&pool, DateRange::ALL).await;
    assert_eq!(reply.status, 200);
    let v: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(v["metadata"]["source"], "memory");
    assert_eq!(v["data"][0]["requests"], 1);
    assert_eq!(v["metadata"]["totals"]["p95ResponseTime"], 8.0);
  }

  #[test]
  fn bad_dates_are_400s_that_say_what_is_wrong() {
    for (start, end, error) in [
      (Some("someday"), None, "Invalid startDate"),
      (None, Some("2026-13-01"), "Invalid endDate"),
      (Some("2026-02-01"), Some("2026-01-01"), "Invalid date range"),
    ] {
      let reply = parse_range(start, end).unwrap_err();
      let v: Value = serde_json::from_str(&reply.body).unwrap();
      assert_eq!((reply.status, v["error"].as_str()), (400, Some(error)));
    }
    assert_eq!(
      parse_range(Some("1700000000000"), None),
      Ok(DateRange::new(Some(1_700_000_000_000), None).unwrap())
    );
  }
}
