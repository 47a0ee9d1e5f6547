//! `GET /usage-stats`: per-key and total usage over a date range, computed from the usage
//! collection while MongoDB is connected (the one route that may wait on I/O), from the in-memory
//! call log otherwise, next to the SPEC's fields of each key's current windows. The answer is one
//! typed value, [`UsageStats`]: this route renders it as JSON, the N-API layer as JS objects.

use serde::Serialize;
use thiserror::Error;

use super::params::{percent_decode, Params};
use super::Routed;
use crate::core::error::PoolError;
use crate::core::key::{Admission, KeyStatus};
use crate::core::pool::KeyPool;
use crate::http::json::{parse_date, IsoDate, UsageJson};
use crate::http::reply::Reply;
use crate::http::state::ApiState;
use crate::stats::usage_stats::{compute, from_buckets, DateRange, UsageFigures, UsageReport};
use crate::store::UsageReader;

/// Why usage statistics could not be given.
#[derive(Debug, Error)]
pub enum UsageStatsError {
  /// A `startDate`, `endDate` or range that cannot be read: the caller's fault (a 400).
  #[error("{error}: {message}")]
  BadRange { error: String, message: String },
  /// The pool could not list its keys (a 500).
  #[error("{0}: Failed to get usage statistics")]
  Pool(#[from] PoolError),
}

impl UsageStatsError {
  /// The error reply the route answers.
  fn reply(&self) -> Reply {
    match self {
      Self::BadRange { error, message } => Reply::error(400, error, message),
      Self::Pool(err) => Reply::error(500, &err.to_string(), "Failed to get usage statistics"),
    }
  }

  fn bad_range(error: String, message: String) -> Self {
    Self::BadRange { error, message }
  }
}

/// Statistics from the usage collection while MongoDB is connected; from the in-memory call log
/// without it, or when the query fails (`metadata.source` says which).
pub(super) fn usage_stats<'s>(state: &'s ApiState, req: &Params<'_>) -> Routed<'s> {
  let range = match date_range(req.query) {
    Ok(range) => range,
    Err(err) => return Routed::Ready(err.reply()),
  };
  // [`UsageStats::over`]'s choice, made here so that the memory source answers at once (the
  // Express adapter's synchronous `route` serves it without waiting).
  match state.usage().reader() {
    Some(reader) => Routed::Pending(Box::pin(async move {
      render(from_store(state.pool(), reader, range).await)
    })),
    None => Routed::Ready(render(from_memory(state.pool(), range))),
  }
}

/// The route's JSON answer.
fn render(stats: Result<UsageStats, PoolError>) -> Reply {
  #[derive(Serialize)]
  struct Body<'a> {
    success: bool,
    #[serde(flatten)]
    stats: &'a UsageStats,
    message: &'static str,
  }
  match stats {
    Ok(stats) => Reply::json(
      200,
      &Body {
        success: true,
        stats: &stats,
        message: "Usage statistics retrieved successfully",
      },
    ),
    Err(err) => UsageStatsError::from(err).reply(),
  }
}

/// Reads the optional `startDate` and `endDate` of a query string. A value that is not valid
/// percent-encoding counts as an invalid date.
fn date_range(query: &str) -> Result<DateRange, UsageStatsError> {
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
      return Err(UsageStatsError::bad_range(
        format!("Invalid {name}"),
        format!("{name} was given more than once"),
      ));
    }
  }
  parse_range(start.as_deref(), end.as_deref())
}

/// The `startDate` and `endDate` of a request, as given (`None` when absent), into a range; what
/// is wrong otherwise.
pub fn parse_range(start: Option<&str>, end: Option<&str>) -> Result<DateRange, UsageStatsError> {
  let parse = |name: &str, text: Option<&str>| match text {
    None => Ok(None),
    Some(text) => parse_date(text).map(Some).ok_or_else(|| {
      UsageStatsError::bad_range(
        format!("Invalid {name}"),
        format!(
          "{name} must be an ISO-8601 date or date-time (e.g. 2026-11-27 or \
           2026-11-27T20:30:42.123Z) or milliseconds since the epoch"
        ),
      )
    }),
  };
  let start = parse("startDate", start)?;
  let end = parse("endDate", end)?;
  DateRange::new(start, end)
    .map_err(|e| UsageStatsError::bad_range("Invalid date range".to_owned(), e.to_string()))
}

/// Usage statistics over a range: `GET /usage-stats`'s `data` and `metadata`.
#[derive(Serialize)]
pub struct UsageStats {
  pub data: Vec<KeyUsageStats>,
  pub metadata: UsageStatsMeta,
}

impl UsageStats {
  /// The statistics over `range`, read from where the route reads them.
  pub async fn over(state: &ApiState, range: DateRange) -> Result<Self, PoolError> {
    match state.usage().reader() {
      Some(reader) => from_store(state.pool(), reader, range).await,
      None => from_memory(state.pool(), range),
    }
  }
}

/// One key: the SPEC's fields, and its figures over the range.
#[derive(Serialize)]
pub struct KeyUsageStats {
  #[serde(flatten)]
  pub status: UsageJson,
  /// Removed from the pool: listed only for the calls it made in the range.
  pub removed: bool,
  #[serde(flatten)]
  pub figures: UsageFigures,
}

/// The range, where the calls came from, and the totals.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatsMeta {
  pub start_date: Option<IsoDate>,
  pub end_date: Option<IsoDate>,
  pub total_keys: usize,
  /// `"mongodb"` or `"memory"`.
  pub source: &'static str,
  /// Calls of the range may be missing: the in-memory log overwrote some, or more were stored
  /// than [`crate::store::MAX_CALLS`].
  pub truncated: bool,
  /// How many calls the in-memory log keeps (with the memory source).
  #[serde(skip_serializing_if = "Option::is_none")]
  pub call_log_capacity: Option<usize>,
  pub totals: UsageFigures,
}

/// Where the calls came from.
enum Source {
  Mongo { truncated: bool },
  Memory { truncated: bool, capacity: usize },
}

/// The statistics for `range`, with what `report` computes over every position of the pool.
fn assemble(
  pool: &KeyPool,
  range: DateRange,
  report: impl FnOnce(usize) -> UsageReport,
  source: Source,
) -> Result<UsageStats, PoolError> {
  // Every position, removed keys too: their calls stay part of the history.
  let statuses = pool.every_status()?;
  let report = report(statuses.len());
  let removed = |s: &KeyStatus| s.figures.admission == Admission::Removed;
  let (source, truncated, call_log_capacity) = match source {
    Source::Mongo { truncated } => ("mongodb", truncated, None),
    Source::Memory {
      truncated,
      capacity,
    } => ("memory", truncated, Some(capacity)),
  };
  Ok(UsageStats {
    data: statuses
      .iter()
      .zip(&report.keys)
      .filter(|(status, figures)| !removed(status) || figures.requests > 0)
      .map(|(status, figures)| KeyUsageStats {
        status: UsageJson::new(status),
        removed: removed(status),
        figures: *figures,
      })
      .collect(),
    metadata: UsageStatsMeta {
      start_date: range.start.map(IsoDate),
      end_date: range.end.map(IsoDate),
      total_keys: statuses.iter().filter(|s| !removed(s)).count(),
      source,
      truncated,
      call_log_capacity,
      totals: report.totals,
    },
  })
}

/// Statistics from the in-memory call log.
fn from_memory(pool: &KeyPool, range: DateRange) -> Result<UsageStats, PoolError> {
  let recent = pool.recent_calls(range)?;
  assemble(
    pool,
    range,
    |keys| compute(keys, &recent.calls, range),
    Source::Memory {
      truncated: recent.truncated,
      capacity: recent.capacity,
    },
  )
}

/// Statistics from the usage collection, else from memory.
async fn from_store(
  pool: &KeyPool,
  reader: UsageReader,
  range: DateRange,
) -> Result<UsageStats, PoolError> {
  match reader.usage(range, &pool.names()).await {
    Ok(stored) => assemble(
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
