//! The router's requests: the hand-out they use, when they count, and their answers.

use super::*;

/// A routed request on whatever key `route_key` gives, answered after `latency` ms.
fn routed(
  p: &KeyPool,
  clock: &FakeClock,
  asked: Option<usize>,
  latency: Millis,
  tokens: u64,
) -> usize {
  let key = p.route_key(asked, 0).unwrap().unwrap();
  clock.advance(latency);
  p.finish_routed(key, tokens, Outcome::Success, latency as f64)
    .unwrap();
  key.index
}

#[test]
fn a_routed_request_uses_the_callers_hand_out_once_and_counts_from_when_it_went_out() {
  let (p, clock, _) = pool(2);
  let handed = p.best(RESERVE, 0).unwrap().pick.index;
  clock.advance(3_000);
  let first = p.route_key(Some(handed), 0).unwrap().unwrap();
  assert_eq!(
    first.index, handed,
    "the hand-out's key, its reservation used"
  );
  // Another request with the same key and no hand-out left gets the best key, reserved anew.
  let second = p.route_key(Some(handed), 0).unwrap().unwrap();
  assert_ne!(second.index, handed);
  clock.advance(2_000);
  p.finish_routed(first, 40, Outcome::Success, 2_000.0)
    .unwrap();
  p.finish_routed(second, 60, Outcome::Success, 2_000.0)
    .unwrap();
  let a = p.figures(handed).unwrap();
  assert_eq!((a.rpm.current, a.rpd.current, a.tpm.current), (1, 1, 40));
  // Counted from when it was sent (3 s), not from the hand-out nor the answer.
  assert_eq!(
    a.rpm.reset_time,
    crate::core::window::counted_until(MINUTE_MS, T0 + 3_000)
  );
  let b = p.figures(second.index).unwrap();
  assert_eq!((b.rpm.current, b.tpm.current), (1, 60));
}

#[test]
fn the_callers_own_reports_of_a_routed_call_are_not_counted_again() {
  let (p, clock, log) = pool(2);
  let index = routed(&p, &clock, Some(0), 100, 25);
  p.routed_answer(0, false);
  // The app reports the call on the key its client was built with, with its own estimate.
  p.record_usage(0, 999, Outcome::Success, 100.0, None)
    .unwrap();
  let counted: u64 = (0..2).map(|i| p.figures(i).unwrap().rpm.current).sum();
  assert_eq!(counted, 1);
  assert_eq!(p.figures(index).unwrap().tpm.current, 25);
  assert_eq!(p.metrics().unwrap().counters.successes, 1);
  // A 429 the router answered itself: the app's failure report and handleRateLimit rest nothing.
  p.routed_answer(1, true);
  p.record_usage(
    1,
    0,
    Outcome::Failure("[429 Too Many Requests] no room"),
    3.0,
    None,
  )
  .unwrap();
  p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
  let f = p.figures(1).unwrap();
  assert_eq!((f.state, f.error_count), (HealthState::Active, 0));
  assert!(logged(&log).iter().all(|l| !l.contains("Rate limit hit")));
  // Reports owed expire with the reservation lifetime; later ones count as before.
  clock.advance(WindowPolicy::default().reservation_ttl_ms);
  p.record_usage(0, 5, Outcome::Success, 10.0, None).unwrap();
  assert_eq!(p.metrics().unwrap().counters.successes, 2);
}

#[test]
fn route_key_says_when_a_key_frees_or_that_none_will() {
  let (p, clock, _) = small(
    1,
    Quota {
      rpm: 1,
      rpd: 100,
      tpm: 1_000_000,
    },
  );
  routed(&p, &clock, None, 50, 1);
  assert_eq!(
    p.route_key(None, 0).unwrap(),
    Err(Some(crate::core::window::counted_until(MINUTE_MS, T0)))
  );
  p.admit(0, Admission::Disabled).unwrap();
  assert_eq!(p.route_key(Some(0), 0).unwrap(), Err(None));
}

#[test]
fn a_429_from_gemini_on_a_routed_request_rests_its_key() {
  let (p, _, _) = pool(2);
  let key = p.route_key(None, 0).unwrap().unwrap();
  p.finish_routed(
    key,
    0,
    Outcome::Failure("429 {\"error\":{\"code\":429}}"),
    5.0,
  )
  .unwrap();
  assert!(matches!(
    p.figures(key.index).unwrap().state,
    HealthState::Resting { .. }
  ));
  assert_ne!(p.route_key(None, 0).unwrap().unwrap().index, key.index);
}
