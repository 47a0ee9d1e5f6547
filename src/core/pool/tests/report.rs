//! Reports of calls: settling, resting, circuits, refusals and masked errors.

use super::*;
use crate::core::pool::report::{MAX_ERROR_CHARS, MAX_REST_MS};

/// A caller's report says how long the call took: a long call's request is counted from half a
/// second after its start (when Gemini had it, at the latest that is likely), never before its
/// hand-out, and the minute frees that much sooner than counting from the report would; a short
/// call's from the report.
#[test]
fn a_callers_report_counts_a_long_calls_request_from_its_likely_arrival() {
  let frees_after = |handed_to_report: Millis, response_time_ms: f64| {
    let (p, clock, _) = pool_with(&["AIzaSyTESTKEY0000abcdefghijkl"], TWO_A_MINUTE);
    handed(&p, 0).unwrap();
    handed(&p, 0).unwrap();
    clock.advance(handed_to_report);
    p.record_usage(0, 1, Outcome::Success, response_time_ms, None)
      .unwrap();
    p.record_usage(0, 1, Outcome::Success, response_time_ms, None)
      .unwrap();
    p.next_available_at(0, 0).unwrap().unwrap() - T0
  };
  let window = 60_000;
  let at_report = frees_after(4_000, 0.0);
  assert!(at_report >= 4_000 + window, "{at_report}");
  // Counts land in 100 ms slices: equal to within one.
  let near = |a: Millis, b: Millis| assert!((a - b).abs() <= 100, "{a} against {b}");
  near(frees_after(4_000, 4_000.0), at_report - 3_500);
  near(frees_after(400, 400.0), frees_after(400, 0.0));
  near(frees_after(4_000, 1e12), frees_after(4_000, 4_000.0) - 500);
  assert!(frees_after(4_000, 1e12) >= window);
}

#[test]
fn hand_out_then_record_counts_once() {
  let (p, _, _) = pool(1);
  let picked = p.best(RESERVE, 0).unwrap();
  let f = p
    .record_usage(picked.pick.index, 120, Outcome::Success, 0.0, None)
    .unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (1, 1, 120));
  // Usage for a key that was not handed out counts as before.
  let f = p.record_usage(0, 30, Outcome::Success, 0.0, None).unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (2, 2, 150));
}

#[test]
fn a_clock_that_steps_back_never_leaves_a_reservation_unsettled() {
  let (p, clock, _) = pool(1);
  clock.advance(5_000);
  p.best(RESERVE, 0).unwrap();
  clock.advance(-3_000);
  let f = p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  assert_eq!(f.rpm.current, 1, "settled, not counted twice");
  assert_eq!(f.last_used, T0 + 5_000);
}

#[test]
fn a_huge_retry_delay_rests_at_most_a_day() {
  let (p, _, _) = pool(1);
  p.handle_rate_limit(0, LimitType::Rpm, Some(Millis::MAX), None)
    .unwrap();
  assert_eq!(
    p.figures(0).unwrap().state,
    HealthState::Resting {
      until: T0 + MAX_REST_MS
    }
  );
}

#[test]
fn long_errors_are_masked_before_they_are_cut() {
  let (p, _, _) = pool(2);
  // The key straddles the cut: masked first, nothing of its middle survives.
  let error = format!(
    "{}{}",
    "x".repeat(MAX_ERROR_CHARS - 10),
    p.names().keys()[1]
  );
  p.record_usage(0, 0, Outcome::Failure(&error), 0.0, None)
    .unwrap();
  let stored = p.last_error(0).unwrap().unwrap();
  assert_eq!(stored.chars().count(), MAX_ERROR_CHARS);
  assert!(!stored.contains("TESTKEY0001"));
}

#[test]
fn a_429_rests_the_key_for_the_retry_delay_without_counting_toward_deactivation() {
  let (p, clock, log) = pool(2);
  let body = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;
  for _ in 0..10 {
    p.best(RESERVE, 0).unwrap();
    p.record_usage(0, 0, Outcome::Failure(body), 0.0, None)
      .unwrap();
  }
  let f = p.figures(0).unwrap();
  assert!(f.active);
  assert_eq!(f.state, HealthState::Resting { until: T0 + 17_000 });
  for _ in 0..3 {
    assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 1);
  }
  clock.advance(17_000);
  assert_eq!(p.figures(0).unwrap().state, HealthState::Active);
  assert!(logged(&log)[0].starts_with("⚠️ Rate limit hit for RPM on API key AIzaSyTE...ijkl"));
}

#[test]
fn handle_rate_limit_rests_until_the_window_frees_and_logs_masked() {
  let (p, clock, log) = pool(2);
  p.best(RESERVE, 0).unwrap();
  clock.advance(5_000);
  p.handle_rate_limit(0, LimitType::Rpm, None, None).unwrap();
  let info = p.rate_limit_info(0, None).unwrap();
  assert!(info[0].is_limited);
  // The request counted at T0 leaves the rolling minute at the end of its slice, a minute and
  // a margin later.
  assert_eq!(
    info[0].reset_time,
    crate::core::window::counted_until(MINUTE_MS, T0)
  );
  assert_eq!(p.figures(0).unwrap().error_count, 1);
  assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 1);
  let lines = logged(&log);
  assert_eq!(
    lines[0],
    "⚠️ Rate limit hit for RPM on API key AIzaSyTE...ijkl (resting for 55.1s)"
  );
  // A spent day rests until the daily reset, whatever delay is said.
  p.handle_rate_limit(1, LimitType::Rpd, Some(2_000), None)
    .unwrap();
  assert_eq!(
    p.figures(1).unwrap().state,
    HealthState::Resting {
      until: WindowPolicy::default().daily_reset.next_reset(T0 + 5_000)
    }
  );
  assert_eq!(
    p.figures(1).unwrap().rpd.current,
    200,
    "the day counted full"
  );
}

#[test]
fn repeated_failures_of_a_key_open_its_circuit_and_a_trial_success_closes_it() {
  let (p, clock, log) = pool(2);
  for _ in 0..3 {
    p.record_usage(
      0,
      0,
      Outcome::Failure("request timed out after 30000 ms"),
      0.0,
      None,
    )
    .unwrap();
  }
  let f = p.figures(0).unwrap();
  assert!(f.active);
  assert_eq!(
    f.state,
    HealthState::CircuitOpen {
      until: T0 + FIRST_BACKOFF_MS
    }
  );
  assert!(logged(&log)[0].contains("resting for 5.0s after 3 consecutive errors"));
  for _ in 0..3 {
    assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 1);
  }
  clock.advance(FIRST_BACKOFF_MS);
  p.refresh_cache().unwrap();
  let trial = (0..2)
    .map(|_| p.best(RESERVE, 0).unwrap().pick.index)
    .collect::<Vec<_>>();
  assert!(trial.contains(&0));
  assert_eq!(
    p.figures(0).unwrap().state,
    HealthState::HalfOpen { trial_out: true }
  );
  p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  assert_eq!(p.figures(0).unwrap().state, HealthState::Active);
}

#[test]
fn only_a_refused_key_is_deactivated_until_reactivated() {
  let (p, _, log) = pool(2);
  p.record_usage(
    0,
    0,
    Outcome::Failure("API key not valid. [API_KEY_INVALID]"),
    0.0,
    None,
  )
  .unwrap();
  assert!(!p.figures(0).unwrap().active);
  for _ in 0..4 {
    assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 1);
  }
  assert!(logged(&log)
    .iter()
    .any(|l| l.starts_with("⚠️ API key deactivated due to 1 consecutive errors")));
  p.reactivate(0).unwrap();
  let f = p.figures(0).unwrap();
  assert!(f.active);
  assert_eq!(f.error_count, 0);
}

#[test]
fn recorded_errors_never_hold_a_full_key() {
  let (p, _, _) = pool(2);
  let quoted = format!("403 on ?key={}", p.names().keys()[1]);
  p.record_usage(0, 0, Outcome::Failure(&quoted), 0.0, None)
    .unwrap();
  assert_eq!(
    p.last_error(0).unwrap().as_deref(),
    Some("403 on ?key=AIzaSyTE...ijkl")
  );
}

#[test]
fn token_counts_must_be_whole_non_negative_and_bounded() {
  assert_eq!(validate_tokens(0.0), Ok(0));
  assert_eq!(validate_tokens(1234.0), Ok(1234));
  for bad in [-1.0, 0.5, f64::NAN, f64::INFINITY, 1e12] {
    assert!(
      matches!(validate_tokens(bad), Err(PoolError::InvalidTokens { .. })),
      "{bad}"
    );
  }
}
