//! Budgets per project and per model: keys of a project share one, each model has its own, and
//! what Gemini's errors say of them (a spent day, no quota, an overload, a project's name).

use super::*;
use crate::core::budget::Rest;

/// Google's 429 for a spent day, with the short delay it sends along.
const PER_DAY_429: &str = r#"429 {"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"100"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"18s"}]}}"#;

const NO_QUOTA_429: &str = r#"429 {"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"0"}]}]}}"#;

const OVERLOADED: &str = r#"503 {"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

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
