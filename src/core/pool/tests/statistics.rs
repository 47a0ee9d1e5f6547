//! Counters, metrics and the recent calls.

use super::*;
use crate::stats::usage_stats::DateRange;

#[test]
fn metrics_count_hand_outs_cache_hits_rotations_and_429s() {
  let (p, _, _) = pool(2);
  p.best(RESERVE, 0).unwrap();
  p.best(RESERVE, 0).unwrap();
  // Looking is a selection, not a hand-out.
  p.best(Claim::LookOnly, 0).unwrap();
  p.record_usage(0, 10, Outcome::Success, 5.0, None).unwrap();
  p.record_usage(1, 0, Outcome::Failure("429 RESOURCE_EXHAUSTED"), 1.0, None)
    .unwrap();
  p.handle_rate_limit(0, LimitType::Tpm, None, None).unwrap();
  let m = p.metrics().unwrap();
  let c = m.counters;
  assert_eq!(c.handed_out, 2);
  assert_eq!((c.cache_hits, c.cache_misses), (2, 1));
  assert_eq!(c.rate_limits, [1, 0, 1]);
  assert_eq!(c.error_rotations, 2);
  assert_eq!((c.successes, c.failures, c.tokens), (1, 1, 10));
  assert_eq!(m.keys[0].api_key, "AIzaSyTE...ijkl");
  assert_eq!(m.keys[0].windows[2].current, 10);
  assert_eq!(m.keys_by_state(), [0, 2, 0, 0, 0, 0, 0]);
}

#[test]
fn recent_calls_are_kept_in_a_bounded_log() {
  let (p, clock, _) = pool(2);
  p.keep_calls(3);
  for i in 0..4 {
    clock.advance(10);
    p.record_usage(i % 2, 5, Outcome::Success, i as f64, None)
      .unwrap();
  }
  let all = p.recent_calls(DateRange::ALL).unwrap();
  assert_eq!((all.calls.len(), all.truncated, all.capacity), (3, true, 3));
  let late = p
    .recent_calls(DateRange::new(Some(T0 + 30), None).unwrap())
    .unwrap();
  assert!(!late.truncated);
  let mut held: Vec<_> = late.calls.iter().map(|c| (c.timestamp, c.key)).collect();
  held.sort_unstable();
  assert_eq!(held, vec![(T0 + 30, 0), (T0 + 40, 1)]);
}
