//! Usage statistics: recorded calls and a date range in, per-key and total figures out (requests,
//! successes, failures, error rate, tokens, median and 95th-percentile response time). Pure: the
//! calls come from the in-memory call log one by one, or from the usage collection already summed
//! by the database, in buckets of nearly equal response time (see [`BUCKETS_PER_E`]).

use serde::Serialize;
use thiserror::Error;

use crate::core::clock::Millis;
use crate::stats::recent_calls::Call;

/// A range of instants, both ends included; an open end is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
  pub start: Option<Millis>,
  pub end: Option<Millis>,
}

/// Why a range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RangeError {
  #[error("startDate must not be after endDate")]
  EndBeforeStart,
}

impl DateRange {
  /// All time.
  pub const ALL: Self = Self {
    start: None,
    end: None,
  };

  /// `start..=end`; an end before the start is refused.
  pub fn new(start: Option<Millis>, end: Option<Millis>) -> Result<Self, RangeError> {
    match (start, end) {
      (Some(s), Some(e)) if e < s => Err(RangeError::EndBeforeStart),
      _ => Ok(Self { start, end }),
    }
  }

  pub fn contains(&self, t: Millis) -> bool {
    self.start.is_none_or(|s| t >= s) && self.end.is_none_or(|e| t <= e)
  }
}

/// The figures of one key, or of all of them; as JSON, response times in ms, `null` without calls.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageFigures {
  pub requests: u64,
  pub successes: u64,
  pub failures: u64,
  /// Failures over requests, 0 when there were none.
  pub error_rate: f64,
  pub tokens: u64,
  /// Median response time in ms, `None` without requests.
  pub p50_response_time: Option<f64>,
  /// 95th-percentile response time in ms, `None` without requests.
  pub p95_response_time: Option<f64>,
}

/// Statistics over a range: one entry per key of the pool, in pool order, and the totals.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageReport {
  pub keys: Vec<UsageFigures>,
  pub totals: UsageFigures,
}

/// Latency buckets per factor of e: a bucket spans 1% of its response time, so a percentile read
/// from buckets is within half a percent of the exact one.
pub const BUCKETS_PER_E: f64 = 100.0;

/// The bucket a response time (ms) falls in: `floor(ln(ms + 1) * 100)`, as the database computes
/// it in the usage aggregation (which tests hold to this).
#[cfg(test)]
pub fn latency_bucket(ms: f64) -> i64 {
  ((ms.max(0.0) + 1.0).ln() * BUCKETS_PER_E).floor() as i64
}

/// The response time a bucket stands for: the middle of its span.
pub fn bucket_latency(bucket: i64) -> f64 {
  (((bucket as f64 + 0.5) / BUCKETS_PER_E).exp() - 1.0).max(0.0)
}

/// Calls of one key summed by the database: `calls` calls in one latency bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
  /// The key's position in the pool.
  pub key: usize,
  pub latency: i64,
  pub calls: u64,
  pub successes: u64,
  pub tokens: u64,
}

/// The nearest-rank percentile `p` (0 < p <= 100) of values given with how many times each
/// occurs, sorted ascending by value: the smallest value with at least p% of them at or below it.
pub fn weighted_percentile(sorted: &[(f64, u64)], p: f64) -> Option<f64> {
  let total: u64 = sorted.iter().map(|&(_, n)| n).sum();
  if total == 0 {
    return None;
  }
  let rank = ((p / 100.0 * total as f64).ceil() as u64).clamp(1, total);
  let mut seen = 0;
  sorted.iter().find_map(|&(value, n)| {
    seen += n;
    (seen >= rank).then_some(value)
  })
}

/// Counts and response times gathered for one key before the percentiles are taken.
#[derive(Default)]
struct Tally {
  figures: UsageFigures,
  /// Response times, each with how many calls took it.
  times: Vec<(f64, u64)>,
}

impl Tally {
  fn add(&mut self, calls: u64, successes: u64, tokens: u64, response_time: f64) {
    let f = &mut self.figures;
    f.requests += calls;
    f.successes += successes;
    f.failures += calls - successes.min(calls);
    f.tokens = f.tokens.saturating_add(tokens);
    self.times.push((response_time, calls));
  }

  fn finish(mut self) -> UsageFigures {
    self.times.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let f = &mut self.figures;
    if f.requests > 0 {
      f.error_rate = f.failures as f64 / f.requests as f64;
    }
    f.p50_response_time = weighted_percentile(&self.times, 50.0);
    f.p95_response_time = weighted_percentile(&self.times, 95.0);
    self.figures
  }
}

/// Statistics for a pool of `key_count` keys from what the database summed. Buckets of no key in
/// the pool are left out.
pub fn from_buckets(key_count: usize, buckets: &[Bucket]) -> UsageReport {
  let mut keys: Vec<Tally> = (0..key_count).map(|_| Tally::default()).collect();
  let mut totals = Tally::default();
  for b in buckets {
    if let Some(tally) = keys.get_mut(b.key) {
      let latency = bucket_latency(b.latency);
      tally.add(b.calls, b.successes, b.tokens, latency);
      totals.add(b.calls, b.successes, b.tokens, latency);
    }
  }
  UsageReport {
    keys: keys.into_iter().map(Tally::finish).collect(),
    totals: totals.finish(),
  }
}

/// Statistics for a pool of `key_count` keys over the calls in `range`. Calls outside the range or
/// naming no key of the pool are left out.
pub fn compute(key_count: usize, calls: &[Call], range: DateRange) -> UsageReport {
  let mut keys: Vec<Tally> = (0..key_count).map(|_| Tally::default()).collect();
  let mut totals = Tally::default();
  for call in calls.iter().filter(|c| range.contains(c.timestamp)) {
    if let Some(tally) = keys.get_mut(call.key) {
      let successes = u64::from(call.success);
      tally.add(1, successes, call.tokens, call.response_time);
      totals.add(1, successes, call.tokens, call.response_time);
    }
  }
  UsageReport {
    keys: keys.into_iter().map(Tally::finish).collect(),
    totals: totals.finish(),
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  /// The nearest-rank percentile `p` of `sorted` values, each counted once.
  fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let weighted: Vec<(f64, u64)> = sorted.iter().map(|&v| (v, 1)).collect();
    weighted_percentile(&weighted, p)
  }

  fn call(key: usize, timestamp: Millis, success: bool, response_time: f64) -> Call {
    Call {
      key,
      timestamp,
      tokens: 10,
      success,
      response_time,
    }
  }

  #[test]
  fn percentiles_are_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&v, 50.0), Some(50.0));
    assert_eq!(percentile(&v, 95.0), Some(95.0));
    assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
    assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.0));
    assert_eq!(percentile(&[1.0, 2.0], 95.0), Some(2.0));
    assert_eq!(percentile(&[], 50.0), None);
  }

  #[test]
  fn figures_per_key_and_in_total_over_the_range_only() {
    let mut calls = vec![
      call(0, 100, true, 30.0),
      call(0, 200, false, 10.0),
      call(0, 300, true, 20.0),
      call(1, 150, true, 5.0),
      // Outside the range, or of no key in the pool.
      call(1, 50, false, 1.0),
      call(0, 301, false, 1.0),
      call(7, 200, true, 1.0),
    ];
    calls.reverse();
    let range = DateRange::new(Some(100), Some(300)).unwrap();
    let r = compute(3, &calls, range);
    assert_eq!(
      r.keys[0],
      UsageFigures {
        requests: 3,
        successes: 2,
        failures: 1,
        error_rate: 1.0 / 3.0,
        tokens: 30,
        p50_response_time: Some(20.0),
        p95_response_time: Some(30.0),
      }
    );
    assert_eq!((r.keys[1].requests, r.keys[1].error_rate), (1, 0.0));
    assert_eq!(r.keys[2], UsageFigures::default());
    assert_eq!(
      (r.totals.requests, r.totals.failures, r.totals.tokens),
      (4, 1, 40)
    );
    assert_eq!(r.totals.error_rate, 0.25);
    assert_eq!(r.totals.p50_response_time, Some(10.0));
    assert_eq!(r.totals.p95_response_time, Some(30.0));
    assert_eq!(compute(3, &calls, DateRange::ALL).totals.requests, 6);
  }

  #[test]
  fn buckets_give_percentiles_within_half_a_percent() {
    for ms in [0.0, 0.4, 1.0, 7.5, 120.0, 999.0, 30_000.0] {
      let back = bucket_latency(latency_bucket(ms));
      assert!(
        (back - ms).abs() <= 0.0051 * (ms + 1.0),
        "{ms} came back as {back}"
      );
    }
    // 20 calls at 100 ms and 1 at 5 s on key 0, 3 at 10 ms on key 1, and a key not in the pool.
    let b = |key, ms, calls, successes| Bucket {
      key,
      latency: latency_bucket(ms),
      calls,
      successes,
      tokens: calls * 10,
    };
    let r = from_buckets(
      2,
      &[
        b(0, 100.0, 20, 19),
        b(0, 5_000.0, 1, 0),
        b(1, 10.0, 3, 3),
        b(9, 1.0, 5, 5),
      ],
    );
    let k = r.keys[0];
    assert_eq!(
      (k.requests, k.successes, k.failures, k.tokens),
      (21, 19, 2, 210)
    );
    assert!((k.p50_response_time.unwrap() - 100.0).abs() < 0.6);
    assert!((k.p95_response_time.unwrap() - 100.0).abs() < 0.6);
    assert_eq!(r.totals.requests, 24);
    assert!((r.keys[1].p95_response_time.unwrap() - 10.0).abs() < 0.06);
  }

  #[test]
  fn ranges_include_both_ends_and_refuse_an_end_before_the_start() {
    let r = DateRange::new(Some(5), Some(5)).unwrap();
    assert!(r.contains(5) && !r.contains(4) && !r.contains(6));
    assert!(DateRange::new(None, Some(1)).unwrap().contains(Millis::MIN));
    assert_eq!(
      DateRange::new(Some(2), Some(1)),
      Err(RangeError::EndBeforeStart)
    );
  }
}
