//! `GET /usage-stats`: per-key and total usage over a date range, computed from the usage
//! collection while MongoDB is connected (the one route that may wait on I/O), from the in-memory
//! call log otherwise, next to the SPEC's fields of each key's current windows.

use serde::Serialize;

use super::params::{percent_decode, Params};
use super::Routed;
use crate::core::key::{Admission, KeyStatus};
use crate::core::pool::KeyPool;
use crate::http::json::{parse_date, IsoDate, UsageJson};
use crate::http::reply::Reply;
use crate::http::state::ApiState;
use crate::stats::usage_stats::{compute, from_buckets, DateRange, UsageFigures, UsageReport};
use crate::store::UsageReader;

/// Statistics from the usage collection while MongoDB is connected; from the in-memory call log
/// without it, or when the query fails (`metadata.source` says which).
pub(super) fn usage_stats<'s>(state: &'s ApiState, req: &Params<'_>) -> Routed<'s> {
  let range = match date_range(req.query) {
    Ok(range) => range,
    Err(reply) => return Routed::Ready(reply),
  };
  match state.usage().reader() {
    Some(reader) => Routed::Pending(Box::pin(from_store(state.pool(), reader, range))),
    None => Routed::Ready(from_memory(state.pool(), range)),
  }
}

/// Reads the optional `startDate` and `endDate` of a query string. A value that is not valid
/// percent-encoding counts as an invalid date.
fn date_range(query: &str) -> Result<DateRange, Reply> {
  const INVALID: &str = "\u{0}";
  let mut start = None;
  let mut end = None;
  for pair in query.split('&').filter(|p| !p.is_empty()) {
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    let (name, slot) = match percent_decode(name, true).as_deref() {
      Some("startDate") => ("startDate", &mut start),
      Some("endDate") => ("endDate", &mut end),
      _ => continue,
    };
    let text = percent_decode(value, true).unwrap_or_else(|| INVALID.to_owned());
    if slot.replace(text).is_some() {
      return Err(Reply::error(
        400,
        &format!("Invalid {name}"),
        &format!("{name} was given more than once"),
      ));
    }
  }
  parse_range(start.as_deref(), end.as_deref())
}

/// The `startDate` and `endDate` of a request, as given (`None` when absent), into a range; the
/// 400 reply that says what is wrong otherwise.
fn parse_range(start: Option<&str>, end: Option<&str>) -> Result<DateRange, Reply> {
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
fn from_memory(pool: &KeyPool, range: DateRange) -> Reply {
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

/// Statistics from the usage collection, else from memory.
async fn from_store(pool: &KeyPool, reader: UsageReader, range: DateRange) -> Reply {
  match reader.usage(range, &pool.names()).await {
    Ok(stored) => reply(
      pool,
      range,
      |keys| from_buckets(keys, &stored.buckets),
      Source::Mongo {
        truncated: stored.truncated,
      },
    ),
    Err(_) => from_memory(pool, range),
  }
}

#[cfg(test)]
mod tests;
