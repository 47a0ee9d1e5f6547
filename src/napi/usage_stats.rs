//! Usage statistics as JS reads them: `usageStats()` builds the object `getUsageStats()` returns
//! from the answer `GET /usage-stats` renders as JSON ([`crate::http::UsageStats`]), its types
//! generated from these shapes; instants cross as JS `Date`s.

use std::collections::BTreeMap;

use napi::bindgen_prelude::{Either, Env, Null, PromiseRaw, ToNapiValue, TypeName};
use napi::{sys, ValueType};
use napi_derive::napi;

use crate::core::clock::Millis;
use crate::http::json::{BudgetJson, IsoDate, LimitWindowJson};
use crate::http::{self, parse_range, UsageStatsError};
use crate::napi::errors::BindingError;
use crate::napi::key_pool::NativeKeyPool;
use crate::stats::usage_stats;

/// An instant that crosses into JS as a `Date` (its generated type is `Date`, by this name).
pub struct Date(Millis);

impl TypeName for Date {
  fn type_name() -> &'static str {
    "Date"
  }

  fn value_type() -> ValueType {
    ValueType::Object
  }
}

impl ToNapiValue for Date {
  unsafe fn to_napi_value(env: sys::napi_env, date: Self) -> napi::Result<sys::napi_value> {
    let mut value = std::ptr::null_mut();
    // SAFETY: `env` is the calling environment, as napi-rs passes it.
    let status = unsafe { sys::napi_create_date(env, date.0 as f64, &mut value) };
    match status {
      sys::Status::napi_ok => Ok(value),
      status => Err(
        BindingError::NapiCall {
          what: "napi_create_date",
          status,
        }
        .into(),
      ),
    }
  }
}

impl From<IsoDate> for Date {
  fn from(d: IsoDate) -> Self {
    Self(d.0)
  }
}

/// Usage statistics over a range: per key, and the range, source and totals.
#[napi(object, object_from_js = false)]
pub struct UsageStats {
  pub data: Vec<KeyUsageStats>,
  pub metadata: UsageStatsMetadata,
}

/// One key: the SPEC's usage-stats fields (current windows as `'current/limit'`), then its
/// figures over the range.
#[napi(object, object_from_js = false, use_nullable = true)]
pub struct KeyUsageStats {
  /// Masked.
  pub api_key: String,
  pub is_active: bool,
  pub last_used: Date,
  pub rpm_usage: String,
  pub rpd_usage: String,
  pub tpm_usage: String,
  pub error_count: u32,
  pub last_error: Option<String>,
  /// The key's project; null when not known (a project of its own).
  pub project: Option<String>,
  /// Its project's budget of every model met, by model name.
  pub models: BTreeMap<String, UsageBudget>,
  /// Removed from the pool: listed only for the calls it made in the range.
  pub removed: bool,
  pub requests: f64,
  pub successes: f64,
  pub failures: f64,
  /// failures / requests; 0 without requests.
  pub error_rate: f64,
  pub tokens: f64,
  /// Median response time in ms (nearest rank); null without requests.
  pub p50_response_time: Option<f64>,
  /// 95th-percentile response time in ms (nearest rank); null without requests.
  pub p95_response_time: Option<f64>,
}

/// One model's budget of a key's project.
#[napi(object, object_from_js = false, use_nullable = true)]
pub struct UsageBudget {
  /// `active`, `resting`, `no-quota` or `overloaded`.
  pub state: String,
  /// Until when it rests, or its model backs off; null when neither.
  pub state_until: Option<Date>,
  pub availability_score: f64,
  pub rpm: UsageWindow,
  pub rpd: UsageWindow,
  pub tpm: UsageWindow,
}

/// One window's use.
#[napi(object, object_from_js = false)]
pub struct UsageWindow {
  pub current: f64,
  pub limit: f64,
  /// When the window's count next drops to zero.
  pub reset_time: Date,
}

/// The range, where the calls were read, and the totals. `callLogCapacity` is left out with the
/// MongoDB source, as the route's JSON leaves it out, so this shape is not nullable.
#[napi(object, object_from_js = false)]
pub struct UsageStatsMetadata {
  #[napi(ts_type = "Date | null")]
  pub start_date: Either<Date, Null>,
  #[napi(ts_type = "Date | null")]
  pub end_date: Either<Date, Null>,
  pub total_keys: u32,
  /// `mongodb` (the usage collection) or `memory` (the in-memory log: no MongoDB, or it failed).
  pub source: String,
  /// Calls of the range may be missing: the in-memory log overwrote some, or over 1,000,000 were
  /// stored.
  pub truncated: bool,
  /// How many calls the in-memory log keeps (with the memory source).
  pub call_log_capacity: Option<u32>,
  pub totals: UsageFigures,
}

/// Usage over the range, of one key or of all of them.
#[napi(object, object_from_js = false, use_nullable = true)]
pub struct UsageFigures {
  pub requests: f64,
  pub successes: f64,
  pub failures: f64,
  /// failures / requests; 0 without requests.
  pub error_rate: f64,
  pub tokens: f64,
  /// Median response time in ms (nearest rank); null without requests.
  pub p50_response_time: Option<f64>,
  /// 95th-percentile response time in ms (nearest rank); null without requests.
  pub p95_response_time: Option<f64>,
}

impl From<&usage_stats::UsageFigures> for UsageFigures {
  fn from(f: &usage_stats::UsageFigures) -> Self {
    Self {
      requests: f.requests as f64,
      successes: f.successes as f64,
      failures: f.failures as f64,
      error_rate: f.error_rate,
      tokens: f.tokens as f64,
      p50_response_time: f.p50_response_time,
      p95_response_time: f.p95_response_time,
    }
  }
}

impl From<&LimitWindowJson> for UsageWindow {
  fn from(w: &LimitWindowJson) -> Self {
    Self {
      current: w.current as f64,
      limit: w.limit as f64,
      reset_time: w.reset_time.into(),
    }
  }
}

impl From<&BudgetJson> for UsageBudget {
  fn from(b: &BudgetJson) -> Self {
    Self {
      state: b.state.to_owned(),
      state_until: b.state_until.map(Date::from),
      availability_score: b.availability_score,
      rpm: (&b.rpm).into(),
      rpd: (&b.rpd).into(),
      tpm: (&b.tpm).into(),
    }
  }
}

impl From<http::KeyUsageStats> for KeyUsageStats {
  fn from(k: http::KeyUsageStats) -> Self {
    let (s, f) = (k.status, k.figures);
    Self {
      api_key: s.api_key,
      is_active: s.is_active,
      last_used: s.last_used.into(),
      rpm_usage: s.rpm_usage,
      rpd_usage: s.rpd_usage,
      tpm_usage: s.tpm_usage,
      error_count: s.error_count,
      last_error: s.last_error,
      project: s.project,
      models: s
        .models
        .iter()
        .map(|(model, budget)| (model.clone(), budget.into()))
        .collect(),
      removed: k.removed,
      requests: f.requests as f64,
      successes: f.successes as f64,
      failures: f.failures as f64,
      error_rate: f.error_rate,
      tokens: f.tokens as f64,
      p50_response_time: f.p50_response_time,
      p95_response_time: f.p95_response_time,
    }
  }
}

/// An instant or JS `null`.
fn date_or_null(date: Option<IsoDate>) -> Either<Date, Null> {
  match date {
    Some(d) => Either::A(d.into()),
    None => Either::B(Null),
  }
}

impl From<http::UsageStats> for UsageStats {
  fn from(stats: http::UsageStats) -> Self {
    let m = stats.metadata;
    Self {
      data: stats.data.into_iter().map(KeyUsageStats::from).collect(),
      metadata: UsageStatsMetadata {
        start_date: date_or_null(m.start_date),
        end_date: date_or_null(m.end_date),
        total_keys: u32::try_from(m.total_keys).unwrap_or(u32::MAX),
        source: m.source.to_owned(),
        truncated: m.truncated,
        call_log_capacity: m
          .call_log_capacity
          .map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        totals: (&m.totals).into(),
      },
    }
  }
}

#[napi]
impl NativeKeyPool {
  /// `getUsageStats`: the statistics `GET /usage-stats` answers for `startDate` and `endDate` as
  /// its query gives them (ISO-8601 or epoch ms, both optional); a bad range is an `InvalidArg`
  /// error saying what is wrong, as the route's 400 does.
  #[napi(ts_return_type = "Promise<UsageStats>")]
  pub fn usage_stats<'env>(
    &self,
    env: &'env Env,
    start_date: Option<String>,
    end_date: Option<String>,
  ) -> napi::Result<PromiseRaw<'env, UsageStats>> {
    let range = parse_range(start_date.as_deref(), end_date.as_deref())?;
    let state = self.api.clone();
    env.spawn_future(async move {
      let stats = http::UsageStats::over(&state, range)
        .await
        .map_err(UsageStatsError::from)?;
      Ok(UsageStats::from(stats))
    })
  }
}
