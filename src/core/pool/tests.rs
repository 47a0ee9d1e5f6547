use super::*;
use crate::core::clock::{FakeClock, MINUTE_MS};
use crate::core::health::FIRST_BACKOFF_MS;
use crate::core::pool::testing::{test_keys, TestPool, T0};
use crate::core::quota::Quota;
use crate::core::selection::{RotationReason, SelectionMethod, CACHE_TTL_MS};
use crate::log::CapturedLog;

const RESERVE: Claim = Claim::Reserve {
  estimated_tokens: 0,
};

fn pool_with(keys: &[&str], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  from_config(PoolConfig::of(
    keys.iter().map(|k| k.to_string()).collect(),
    quota,
  ))
}

fn from_config(config: PoolConfig) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  let TestPool { pool, clock, log } = TestPool::of_config(config);
  (pool, clock, log)
}

/// A pool whose key `i` is in project `projects[i]` (its own when `None`).
fn in_projects(projects: &[Option<&str>], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  let mut config = PoolConfig::of(test_keys(projects.len()), quota);
  for (spec, project) in config.keys.iter_mut().zip(projects) {
    spec.project = project.map(str::to_owned);
  }
  from_config(config)
}

const TWO_A_MINUTE: Quota = Quota {
  rpm: 2,
  rpd: 100,
  tpm: 1_000_000,
};

/// Google's 429 for a spent day, with the short delay it sends along.
const PER_DAY_429: &str = r#"429 {"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"100"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"18s"}]}}"#;
const NO_QUOTA_429: &str = r#"429 {"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"0"}]}]}}"#;
const OVERLOADED: &str = r#"503 {"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

fn handed(p: &KeyPool, model: ModelId) -> Result<usize, PoolError> {
  p.best(RESERVE, model).map(|picked| picked.pick.index)
}

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
fn the_keys_of_a_project_share_its_budget_and_picks_spread_over_projects() {
  let (p, _, _) = in_projects(
    &[Some("1001"), Some("1001"), Some("1002"), Some("1002")],
    TWO_A_MINUTE,
  );
  let picks: Vec<usize> = (0..4).map(|_| handed(&p, 0).unwrap()).collect();
  let project = |i: usize| if i < 2 { "1001" } else { "1002" };
  assert_ne!(
    project(picks[0]),
    project(picks[1]),
    "one project after the other"
  );
  // Two a minute per project, not per key: four in all, whatever the number of keys.
  assert_eq!(handed(&p, 0), Err(PoolError::NoActiveKeys));
  let f = p.figures(1).unwrap();
  assert_eq!(f.rpm.current, 2, "a key shows its project's count");
}

#[test]
fn each_model_has_budgets_of_its_own_with_its_own_limits() {
  let (p, _, log) = pool_with(&["AIzaSyTESTKEY0000abcdefghijkl"], TWO_A_MINUTE);
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  assert_eq!(p.model_id("models/gemini-2.0-flash").unwrap(), flash);
  handed(&p, 0).unwrap();
  handed(&p, 0).unwrap();
  assert_eq!(handed(&p, 0), Err(PoolError::NoActiveKeys));
  // The table's 15 a minute for gemini-2.0-flash, counted apart.
  for _ in 0..15 {
    handed(&p, flash).unwrap();
  }
  assert_eq!(handed(&p, flash), Err(PoolError::NoActiveKeys));
  // A report naming the model settles its hand-out, not the default model's.
  p.record_usage(0, 70, Outcome::Success, 1.0, Some(flash))
    .unwrap();
  let (_, views) = p.budgets_of(0).unwrap();
  assert_eq!(
    (views[1].model.as_str(), views[1].figures.tpm.current),
    ("gemini-2.0-flash", 70)
  );
  assert_eq!(views[0].figures.tpm.current, 0);
  let unknown = p.model_id("gemini-9-ultra").unwrap();
  assert_eq!(p.next_available_at(0, unknown).unwrap(), Some(T0));
  assert!(logged(&log)
    .iter()
    .any(|l| l.contains("gemini-9-ultra is not in the table")));
  assert!(matches!(
    p.best(RESERVE, 99),
    Err(PoolError::InvalidModel(_))
  ));
}

#[test]
fn a_spent_day_rests_the_project_for_that_model_until_the_reset_whatever_retry_delay_says() {
  let (p, clock, log) = in_projects(&[Some("1001"), Some("1001"), Some("1002")], TWO_A_MINUTE);
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  p.record_usage(0, 0, Outcome::Failure(PER_DAY_429), 1.0, Some(flash))
    .unwrap();
  let reset = WindowPolicy::default().daily_reset.next_reset(T0);
  // Both keys of 1001 are out for flash; 1002 and the default model are not.
  for _ in 0..3 {
    assert_eq!(handed(&p, flash).unwrap(), 2);
  }
  assert_eq!(
    p.rate_limit_info(1, Some(flash)).unwrap()[1].reset_time,
    reset
  );
  assert_eq!(
    p.rate_limit_info(1, Some(flash)).unwrap()[1].current,
    100,
    "the day counted full"
  );
  assert!(
    p.rate_limit_info(0, None)
      .unwrap()
      .iter()
      .all(|i| !i.is_limited),
    "the default model is another budget"
  );
  clock.advance(18_000);
  assert_eq!(
    p.rate_limit_info(0, Some(flash)).unwrap()[1].reset_time,
    reset,
    "not 18 s"
  );
  assert!(logged(&log)[0]
    .starts_with("⚠️ Rate limit hit for RPD on API key AIzaSyTE...ijkl (resting for"));
  assert!(logged(&log)[0].contains("project 1001; model gemini-2.0-flash"));
  clock.set(reset);
  assert!(p.best(RESERVE, flash).is_ok());
}

#[test]
fn a_tier_without_quota_for_a_model_is_not_used_for_it_until_reactivated() {
  let (p, _, log) = in_projects(&[Some("1001"), Some("1002")], TWO_A_MINUTE);
  let pro = p.model_id("gemini-2.5-pro").unwrap();
  p.record_usage(0, 0, Outcome::Failure(NO_QUOTA_429), 1.0, Some(pro))
    .unwrap();
  p.record_usage(0, 0, Outcome::Failure(NO_QUOTA_429), 1.0, Some(pro))
    .unwrap();
  let said: Vec<String> = logged(&log)
    .into_iter()
    .filter(|l| l.contains("No quota"))
    .collect();
  assert_eq!(said.len(), 1, "said once: {said:?}");
  assert!(said[0].contains("gemini-2.5-pro"), "{}", said[0]);
  for _ in 0..3 {
    assert_eq!(handed(&p, pro).unwrap(), 1);
  }
  assert_eq!(p.budgets_of(0).unwrap().1[pro].figures.rest, Rest::NoQuota);
  // The default model is another budget.
  assert!(p
    .rate_limit_info(0, None)
    .unwrap()
    .iter()
    .all(|i| !i.is_limited));
  p.reactivate(0).unwrap();
  assert_eq!(p.budgets_of(0).unwrap().1[pro].figures.rest, Rest::Clear);
}

#[test]
fn an_overload_backs_the_model_off_not_the_keys_and_one_probe_brings_it_back() {
  let (p, clock, log) = pool(3);
  let flash = p.model_id("gemini-2.0-flash").unwrap();
  // Three calls out when the overload begins: all fail with it; one back-off.
  let out: Vec<usize> = (0..3).map(|_| handed(&p, flash).unwrap()).collect();
  for &i in &out {
    p.record_usage(i, 0, Outcome::Failure(OVERLOADED), 1.0, Some(flash))
      .unwrap();
  }
  assert_eq!(
    logged(&log)
      .iter()
      .filter(|l| l.contains("overloaded"))
      .count(),
    1
  );
  assert_eq!(handed(&p, flash), Err(PoolError::NoActiveKeys));
  let back = p.next_available_at(0, flash).unwrap().unwrap();
  assert!((T0 + 750..=T0 + 1_250).contains(&back), "{}", back - T0);
  // The keys are fine: other models are served, no circuit opened, nothing deactivated.
  assert!(handed(&p, 0).is_ok());
  assert!((0..3).all(|i| p.figures(i).unwrap().state == HealthState::Active));
  clock.set(back);
  let probe = handed(&p, flash).unwrap();
  assert_eq!(
    handed(&p, flash),
    Err(PoolError::NoActiveKeys),
    "one probe at a time"
  );
  p.record_usage(probe, 10, Outcome::Success, 1.0, Some(flash))
    .unwrap();
  assert!(handed(&p, flash).is_ok() && handed(&p, flash).is_ok());
}

#[test]
fn a_key_learns_its_project_from_geminis_error_and_its_counts_move_with_it() {
  let (p, _, log) = in_projects(&[None, Some("777"), None], TWO_A_MINUTE);
  // Key 0 used its own minute once; Gemini then names its project.
  handed(&p, 0).unwrap();
  p.record_usage(0, 0, Outcome::Success, 1.0, None).unwrap();
  let named = r#"403 {"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED","metadata":{"consumer":"projects/777"}}]}}"#;
  p.record_usage(0, 0, Outcome::Failure(named), 1.0, None)
    .unwrap();
  assert!(logged(&log)
    .iter()
    .any(|l| l.starts_with("🔎 API key AIzaSyTE...ijkl is in project 777")));
  assert_eq!(p.budgets_of(0).unwrap().0.as_deref(), Some("777"));
  // Project 777's minute now holds key 0's request: one left for key 1 (key 0 is refused).
  assert_eq!(p.figures(1).unwrap().rpm.current, 1);
  // A configured key is not moved; the mismatch is said once.
  let other = named.replace("777", "888");
  p.record_usage(1, 0, Outcome::Failure(&other), 1.0, None)
    .unwrap();
  p.record_usage(1, 0, Outcome::Failure(&other), 1.0, None)
    .unwrap();
  assert_eq!(p.budgets_of(1).unwrap().0.as_deref(), Some("777"));
  assert_eq!(
    logged(&log)
      .iter()
      .filter(|l| l.contains("in project 888, not in the project"))
      .count(),
    1
  );
}

fn pool(n: usize) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  small(n, Quota::default())
}

fn small(n: usize, quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
  from_config(PoolConfig::of(test_keys(n), quota))
}

fn logged(log: &CapturedLog) -> Vec<String> {
  log.0.lock().clone()
}

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

#[test]
fn best_reserves_marks_last_used_and_reports_method_and_score() {
  let (p, clock, _) = pool(2);
  clock.advance(10);
  let a = p.best(RESERVE, 0).unwrap();
  assert_eq!(a.pick.method, SelectionMethod::RoundRobin);
  assert_eq!(a.pick.total_available, 2);
  assert_eq!(a.figures.last_used, T0 + 10);
  assert_eq!(a.pick.score, 1.0);
  assert_eq!(a.figures.rpm.current, 1);
  let b = p.best(RESERVE, 0).unwrap();
  assert_eq!(b.pick.method, SelectionMethod::CachedRoundRobin);
  assert_ne!(a.pick.index, b.pick.index);
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
fn never_more_than_k_times_l_handed_out_per_window() {
  let (p, clock, _) = small(
    3,
    Quota {
      rpm: 5,
      rpd: 1_000,
      tpm: 1_000_000,
    },
  );
  let mut handed = 0;
  for _ in 0..100 {
    if p.best(RESERVE, 0).is_ok() {
      handed += 1;
    }
    clock.advance(100); // ten seconds in all: still inside one minute
  }
  assert_eq!(handed, 15);
  assert_eq!(p.best(RESERVE, 0).unwrap_err(), PoolError::NoActiveKeys);
  // The rolling minute frees them (plus one slice, plus the cache's life).
  clock.advance(MINUTE_MS + CACHE_TTL_MS);
  assert!(p.best(RESERVE, 0).is_ok());
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
fn imported_error_messages_are_masked() {
  let (p, _, _) = pool(2);
  let mut record = p.export_dirty().pop().unwrap_or_else(|| {
    p.mark_all_dirty();
    p.export_dirty().remove(0)
  });
  record.api_key = p.names().keys()[0].clone();
  record.last_error = Some(format!("old service saw {}", p.names().keys()[1]));
  assert_eq!(p.import(&[record]), 1);
  assert_eq!(
    p.last_error(0).unwrap().as_deref(),
    Some("old service saw AIzaSyTE...ijkl")
  );
}

#[test]
fn next_available_at_says_when_capacity_frees() {
  let (p, clock, _) = small(
    2,
    Quota {
      rpm: 1,
      rpd: 100,
      tpm: 1_000_000,
    },
  );
  assert_eq!(p.next_available_at(0, 0).unwrap(), Some(T0));
  p.best(RESERVE, 0).unwrap();
  clock.advance(1_000);
  p.best(RESERVE, 0).unwrap();
  assert_eq!(p.best(RESERVE, 0).unwrap_err(), PoolError::NoActiveKeys);
  // The first key's request, counted in the slice at T0, frees first.
  assert_eq!(
    p.next_available_at(0, 0).unwrap(),
    Some(crate::core::window::counted_until(MINUTE_MS, T0))
  );
  p.handle_rate_limit(0, LimitType::Rpm, Some(120_000), None)
    .unwrap();
  assert_eq!(
    p.next_available_at(0, 0).unwrap(),
    Some(crate::core::window::counted_until(MINUTE_MS, T0 + 1_000))
  );
  assert_eq!(p.next_available_at(1_000_001, 0).unwrap(), None);
  p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID"), 0.0, None)
    .unwrap();
  assert_eq!(
    p.next_available_at(0, 0).unwrap(),
    Some(T0 + 1_000 + 120_000)
  );
}

#[test]
fn unsettled_reservations_expire_on_their_own() {
  let (p, clock, _) = small(
    1,
    Quota {
      rpm: 1_000,
      rpd: 2,
      tpm: 1_000_000,
    },
  );
  p.best(RESERVE, 0).unwrap();
  p.best(RESERVE, 0).unwrap();
  assert_eq!(p.best(RESERVE, 0).unwrap_err(), PoolError::NoActiveKeys);
  clock.advance(MINUTE_MS);
  // The daily count got both back.
  assert_eq!(p.best(RESERVE, 0).unwrap().figures.rpd.current, 1);
}

#[test]
fn estimated_tokens_reserve_tpm_and_are_corrected_by_the_real_count() {
  let (p, _, _) = small(
    1,
    Quota {
      rpm: 100,
      rpd: 100,
      tpm: 1_000,
    },
  );
  let a = p
    .best(
      Claim::Reserve {
        estimated_tokens: 600,
      },
      0,
    )
    .unwrap();
  assert_eq!(a.figures.tpm.current, 600);
  // No room for another 600 until the first is settled with its real count.
  assert_eq!(
    p.best(
      Claim::Reserve {
        estimated_tokens: 600
      },
      0
    )
    .unwrap_err(),
    PoolError::NoActiveKeys
  );
  let f = p.record_usage(0, 150, Outcome::Success, 0.0, None).unwrap();
  assert_eq!(f.tpm.current, 150);
  p.refresh_cache().unwrap();
  assert_eq!(
    p.best(
      Claim::Reserve {
        estimated_tokens: 600
      },
      0
    )
    .unwrap()
    .figures
    .tpm
    .current,
    750
  );
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
fn peek_shows_the_rotation_without_spending_quota() {
  let (p, _, _) = pool(2);
  let a = p.best(Claim::LookOnly, 0).unwrap();
  let b = p.rotate(Claim::LookOnly, 0).unwrap().pick.selection;
  assert_ne!(a.pick.index, b.index);
  assert_eq!(p.figures(0).unwrap().rpm.current, 0);
  assert_eq!(p.figures(1).unwrap().rpm.current, 0);
}

#[test]
fn reset_all_limits_gives_fresh_windows_and_ends_rests() {
  let (p, clock, _) = pool(1);
  p.best(RESERVE, 0).unwrap();
  p.record_usage(0, 99, Outcome::Success, 0.0, None).unwrap();
  p.handle_rate_limit(0, LimitType::Rpd, None, None).unwrap();
  clock.advance(5);
  p.reset_all_limits().unwrap();
  let f = p.figures(0).unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (0, 0, 0));
  assert_eq!(f.state, HealthState::Active);
}

#[test]
fn rotate_reports_proactive_rotation() {
  let (p, _, _) = pool_with(
    &["weak-key-0123456789", "strong-key-0123456789"],
    Quota {
      rpm: 10,
      rpd: 10,
      tpm: 1000,
    },
  );
  for _ in 0..9 {
    p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
  }
  let r = p.rotate(RESERVE, 0).unwrap();
  assert_eq!(p.metrics().unwrap().counters.proactive_rotations, 1);
  assert_eq!(r.pick.reason, RotationReason::Proactive);
  assert_eq!(r.pick.selection.index, 1);
  assert!(r.pick.previous_key_score.unwrap() < 0.3);
  assert_eq!(r.figures.rpm.current, 1);
}

#[test]
fn unknown_keys_and_closed_pools_are_errors() {
  let (p, _, _) = pool(1);
  assert_eq!(p.index_of("nope"), Err(PoolError::KeyNotFound));
  assert_eq!(p.figures(7).unwrap_err(), PoolError::KeyNotFound);
  p.close();
  p.close();
  assert_eq!(p.best(RESERVE, 0).unwrap_err(), PoolError::Closed);
  assert_eq!(
    p.record_usage(0, 1, Outcome::Success, 0.0, None)
      .unwrap_err(),
    PoolError::Closed
  );
}

fn exported(p: &KeyPool) -> Vec<String> {
  p.export_dirty().into_iter().map(|r| r.api_key).collect()
}

#[test]
fn every_mutation_marks_its_key_for_export_and_export_clears_the_marks() {
  let (p, clock, _) = pool(3);
  let k = p.names().keys().to_vec();
  assert!(exported(&p).is_empty());
  // Looking is not changing.
  p.best(Claim::LookOnly, 0).unwrap();
  p.figures(1).unwrap();
  assert!(exported(&p).is_empty());
  let picked = p.best(RESERVE, 0).unwrap().pick.index;
  assert_eq!(exported(&p), vec![k[picked].clone()]);
  assert!(exported(&p).is_empty());
  p.record_usage(2, 5, Outcome::Success, 1.0, None).unwrap();
  p.record_usage(2, 5, Outcome::Failure("socket hang up"), 1.0, None)
    .unwrap();
  p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
  assert_eq!(exported(&p), vec![k[2].clone(), k[1].clone()]);
  p.reactivate(0).unwrap();
  assert_eq!(exported(&p), vec![k[0].clone()]);
  p.reset_all_limits().unwrap();
  assert_eq!(exported(&p).len(), 3);
  // A reservation that expires changes the key's counts.
  p.best(RESERVE, 0).unwrap();
  exported(&p);
  clock.advance(MINUTE_MS + CACHE_TTL_MS);
  p.best(Claim::LookOnly, 0).unwrap();
  assert_eq!(exported(&p).len(), 1);
  // A failed write marks its keys again.
  p.record_usage(0, 1, Outcome::Success, 0.0, None).unwrap();
  let records = p.export_dirty();
  p.mark_dirty(&records);
  assert_eq!(exported(&p), vec![k[0].clone()]);
  p.mark_all_dirty();
  assert_eq!(exported(&p).len(), 3);
}

#[test]
fn exported_state_imports_into_a_restarted_pool() {
  let (p, clock, _) = pool(2);
  p.record_usage(0, 400, Outcome::Success, 12.0, None)
    .unwrap();
  p.record_usage(
    1,
    0,
    Outcome::Failure("API key not valid. [API_KEY_INVALID]"),
    3.0,
    None,
  )
  .unwrap();
  p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID again"), 3.0, None)
    .unwrap();
  let records = p.export_dirty();
  clock.advance(1_000);
  let (q, qclock, _) = pool(2);
  qclock.set(clock.now_ms());
  assert_eq!(q.import(&records), 2);
  let (a, b) = (q.figures(0).unwrap(), q.figures(1).unwrap());
  assert_eq!((a.rpm.current, a.rpd.current, a.tpm.current), (1, 1, 400));
  assert!(a.active && !b.active);
  assert_eq!(b.error_count, 2);
  assert_eq!(
    q.last_error(1).unwrap().as_deref(),
    Some("API_KEY_INVALID again")
  );
  assert_eq!(a.last_used, T0);
  // Importing does not itself mark keys: the caller decides what to write.
  assert!(exported(&q).is_empty());
  // Records of unknown keys are ignored; windows whose reset time passed are not counted.
  let mut stale = records.clone();
  stale[0].api_key = "someone-else".into();
  stale[1].rpd.reset_time = qclock.now_ms();
  stale[1].rpd.current = 150;
  assert_eq!(q.import(&stale), 1);
  assert_eq!(q.figures(1).unwrap().rpd.current, 0);
}

#[test]
fn importing_after_an_outage_keeps_the_larger_counts_and_local_errors() {
  let (p, _, _) = pool(1);
  for _ in 0..3 {
    p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  }
  let stored = p.export_dirty();
  // Meanwhile, offline: two more calls, and an error.
  p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  p.record_usage(0, 0, Outcome::Failure("503"), 0.0, None)
    .unwrap();
  p.import(&stored);
  let f = p.figures(0).unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (5, 5, 50));
  assert_eq!(f.error_count, 1);
  let mut bigger = stored.clone();
  bigger[0].rpm.current = 9;
  p.import(&bigger);
  assert_eq!(p.figures(0).unwrap().rpm.current, 9);
}

#[test]
fn recorded_calls_are_queued_with_stable_ids_only_once_enabled() {
  let (p, clock, _) = pool(2);
  p.record_usage(0, 1, Outcome::Success, 5.0, None).unwrap();
  assert!(p.take_usage(10).is_empty());
  p.enable_usage_queue(3, 2, UsageIds::new("test"), Arc::new(|| {}));
  clock.advance(5);
  p.record_usage(0, 10, Outcome::Success, 120.5, None)
    .unwrap();
  let quoted = format!("403 for {}", p.names().keys()[1]);
  p.record_usage(1, 0, Outcome::Failure(&quoted), f64::NAN, None)
    .unwrap();
  p.record_usage(1, 2, Outcome::Success, -1.0, None).unwrap();
  p.record_usage(0, 3, Outcome::Success, 1.0, None).unwrap();
  assert_eq!(p.usage_backlog(), (3, 1));
  let usage = p.take_usage(2);
  assert_eq!(usage.len(), 2);
  let (failed, ok) = (&usage[0], &usage[1]);
  assert_eq!(failed.api_key, p.names().keys()[1]);
  assert_eq!(failed.timestamp, T0 + 5);
  assert!(!failed.success);
  assert_eq!(failed.error.as_deref(), Some("403 for AIzaSyTE...ijkl"));
  assert_eq!(failed.response_time, 0.0);
  assert_eq!(
    (ok.success, ok.tokens_used, ok.response_time),
    (true, 2, 0.0)
  );
  assert_eq!(ok.id.seq, failed.id.seq + 1);
  assert_eq!(ok.id.source, failed.id.source);
  p.close();
  // A closed pool still hands over what it holds, so closing can flush.
  assert_eq!(p.take_usage(10).len(), 1);
  assert_eq!(p.usage_backlog(), (0, 1));
}

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

#[test]
fn operators_decisions_are_exported_once_and_again_after_a_failed_write() {
  let (p, clock, log) = pool(2);
  let new = "AIzaSyTESTKEYNEWWabcdefghijkl";
  assert_eq!(p.add_key(new, None).unwrap(), 2);
  clock.advance(5);
  p.admit(0, Admission::Disabled).unwrap();
  let exported = p.export_admissions();
  assert_eq!(
    exported,
    vec![
      AdmissionRecord {
        api_key: new.into(),
        admission: Admission::Enabled,
        changed_at: T0,
        added: true,
        project: None,
      },
      AdmissionRecord {
        api_key: p.names().keys()[0].clone(),
        admission: Admission::Disabled,
        changed_at: T0 + 5,
        added: false,
        project: None,
      },
    ]
  );
  assert!(p.export_admissions().is_empty());
  p.mark_admissions(&exported[1..]);
  assert_eq!(p.export_admissions(), exported[1..].to_vec());
  let lines = logged(&log);
  assert!(
    lines.contains(&"✅ API key AIzaSyTE...ijkl added".to_owned()),
    "{lines:?}"
  );
  assert!(lines
    .iter()
    .any(|l| l.starts_with("⚠️ API key") && l.ends_with("disabled")));
  // Disabling what is disabled changes nothing and says nothing.
  assert!(!p.admit(0, Admission::Disabled).unwrap());
}

#[test]
fn decisions_from_other_processes_apply_unless_a_later_one_was_made_here() {
  let (p, clock, log) = pool(2);
  clock.advance(1_000);
  p.admit(1, Admission::Disabled).unwrap();
  let names = p.names();
  let record = |key: &str, admission, changed_at, added| AdmissionRecord {
    api_key: key.into(),
    admission,
    changed_at,
    added,
    project: None,
  };
  let joined = "AIzaSyTESTKEYJOINabcdefghijkl";
  let changed = p.follow_admissions(&[
    // Older than this process's own decision: ignored.
    record(&names.keys()[1], Admission::Enabled, T0 + 500, false),
    record(&names.keys()[0], Admission::Removed, T0 + 700, false),
    record(joined, Admission::Enabled, T0 + 800, true),
    record("not a key", Admission::Enabled, T0, true),
  ]);
  assert_eq!(changed, 2);
  assert_eq!(p.figures(1).unwrap().admission, Admission::Disabled);
  assert_eq!(p.figures(0).unwrap().admission, Admission::Removed);
  assert_eq!(p.names().position(joined), Some(2));
  // What came from the store is not exported back.
  assert!(p
    .export_admissions()
    .iter()
    .all(|r| r.api_key == names.keys()[1]));
  // Only the joined key serves: key 0 is removed, key 1 disabled.
  for _ in 0..4 {
    assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 2);
  }
  assert_eq!(p.statuses().unwrap().len(), 2);
  assert_eq!(p.index_of(&names.keys()[0]), Err(PoolError::KeyNotFound));
  assert!(logged(&log)
    .iter()
    .any(|l| l.ends_with("removed by another process")));
  // The same records again change nothing.
  assert_eq!(
    p.follow_admissions(&[record(joined, Admission::Enabled, T0 + 800, true)]),
    0
  );
}

#[test]
fn a_removed_key_keeps_its_history_and_takes_a_late_report() {
  let (p, _, _) = pool(2);
  let picked = p.best(RESERVE, 0).unwrap().pick.index;
  p.admit(picked, Admission::Removed).unwrap();
  // The call handed out before the removal still reports.
  let f = p
    .record_usage(picked, 10, Outcome::Success, 1.0, None)
    .unwrap();
  assert_eq!((f.rpm.current, f.admission), (1, Admission::Removed));
  assert!(!f.active);
  assert_eq!(p.every_status().unwrap().len(), 2);
  assert_eq!(p.metrics().unwrap().keys.len(), 1);
  assert_eq!(
    p.rate_limit_info(picked, None).unwrap_err(),
    PoolError::KeyNotFound
  );
  assert_eq!(
    p.admit(picked, Admission::Enabled).unwrap_err(),
    PoolError::KeyNotFound
  );
  assert_eq!(
    p.add_key(&p.names().keys()[1 - picked].clone(), None),
    Err(PoolError::DuplicateKey)
  );
}

#[test]
fn keys_out_of_service_need_no_leases_and_added_ones_share_too() {
  let (p, _, _) = pool(2);
  p.share_quota();
  p.admit(0, Admission::Disabled).unwrap();
  let added = p.add_key("AIzaSyTESTKEYLEASabcdefghijkl", None).unwrap();
  let needs: Vec<usize> = p.lease_needs().iter().map(|(i, _, _)| *i).collect();
  assert!(!needs.contains(&0), "{needs:?}");
  assert!(needs.contains(&1) && needs.contains(&added), "{needs:?}");
}

#[test]
fn rotation_state_follows_the_round_robin_and_rotations() {
  let (p, clock, _) = pool(3);
  p.best(RESERVE, 0).unwrap();
  assert_eq!(p.rotation_state().unwrap(), (1, T0));
  clock.advance(7);
  p.rotate(RESERVE, 0).unwrap();
  assert_eq!(p.rotation_state().unwrap().1, T0 + 7);
  assert_eq!(p.statuses().unwrap().len(), 3);
}
