use super::*;
use crate::core::window::counted_until;

const T0: Millis = 1_800_000_000_000;

fn budget(quota: Quota) -> Budget {
  Budget::new(0, 0, quota, &WindowPolicy::default(), T0)
}

const SMALL: Quota = Quota {
  rpm: 2,
  rpd: 3,
  tpm: 1_000,
};

#[test]
fn room_is_the_least_of_the_three_windows_and_any_rest() {
  let mut b = budget(SMALL);
  assert!(b.has_room(T0, 1_000));
  assert!(!b.has_room(T0, 1_001));
  b.reserve(T0, 10);
  b.reserve(T0, 10);
  assert!(!b.has_room(T0, 0), "the minute is full");
  assert!(b.has_room(counted_until(60_000, T0), 0));
  b.reserve(T0 + 70_000, 0);
  assert!(!b.has_room(T0 + 140_000, 0), "the day is full");
  assert_eq!(b.score(T0 + 140_000), 0.5 + 0.2 * (1.0 - 0.0));
}

#[test]
fn a_per_day_429_rests_until_the_reset_whatever_retry_delay_says() {
  let mut b = budget(SMALL);
  let policy = WindowPolicy::default();
  let daily = policy.daily_reset;
  let rest = b.on_rate_limited(T0, Exhausted::PerDay, Some(18_000), &policy, 86_400_000);
  assert_eq!(
    rest,
    Some(Rest::Until {
      until: daily.next_reset(T0),
      limit: Some(LimitType::Rpd)
    })
  );
  assert_eq!(b.rpd.current(T0), 3, "the day counted full");
  assert!(!b.has_room(daily.next_reset(T0) - 1, 0));
  assert!(b.has_room(daily.next_reset(T0), 0));
}

#[test]
fn a_per_minute_429_rests_until_the_later_of_its_delay_and_the_window_never_zero() {
  let mut b = budget(SMALL);
  b.reserve(T0, 0);
  let daily = WindowPolicy::default();
  let rpm = Exhausted::PerMinute(LimitType::Rpm);
  let until = |r: Option<Rest>| match r {
    Some(Rest::Until { until, .. }) => until,
    other => panic!("{other:?}"),
  };
  // The window frees later than the delay: the window wins.
  assert_eq!(
    until(b.on_rate_limited(T0 + 1, rpm, Some(0), &daily, 86_400_000)),
    b.rpm.frees_at(T0 + 1)
  );
  let mut b = budget(SMALL);
  // Nothing counted here (another client spent it), "0s": still a rest.
  assert_eq!(
    until(b.on_rate_limited(T0, rpm, Some(0), &daily, 86_400_000)),
    T0 + MIN_MINUTE_REST_MS
  );
  let mut b = budget(SMALL);
  assert_eq!(
    until(b.on_rate_limited(T0, rpm, Some(17_500), &daily, 86_400_000)),
    T0 + 17_500
  );
  // Nothing counted and no delay said: the unseen window frees within a span.
  let mut b = budget(SMALL);
  assert_eq!(
    until(b.on_rate_limited(T0, rpm, None, &daily, 86_400_000)),
    T0 + 60_000
  );
}

#[test]
fn unexplained_429s_rest_longer_each_time_and_no_quota_stays_until_ended() {
  let mut b = budget(SMALL);
  let daily = WindowPolicy::default();
  let mut rests = Vec::new();
  let mut now = T0;
  for _ in 0..9 {
    if let Some(Rest::Until { until, .. }) =
      b.on_rate_limited(now, Exhausted::Unexplained, None, &daily, 86_400_000)
    {
      rests.push(until - now);
      now = until;
    }
  }
  assert_eq!(rests[..4], [1_000, 2_000, 4_000, 8_000]);
  assert_eq!(*rests.last().unwrap(), MAX_UNEXPLAINED_REST_MS);
  b.on_success();
  assert_eq!(
    b.on_rate_limited(now, Exhausted::Unexplained, None, &daily, 86_400_000),
    Some(Rest::Until {
      until: now + 1_000,
      limit: None
    })
  );
  // A delay said is believed, whatever the streak.
  assert_eq!(
    b.on_rate_limited(
      now,
      Exhausted::Unexplained,
      Some(17_000),
      &daily,
      86_400_000
    ),
    Some(Rest::Until {
      until: now + 17_000,
      limit: None
    })
  );
  assert_eq!(
    b.on_rate_limited(now, Exhausted::NoQuota, None, &daily, 86_400_000),
    Some(Rest::NoQuota)
  );
  assert!(!b.has_room(now + 10 * 86_400_000, 0));
  // Nothing shorter replaces it.
  assert_eq!(
    b.on_rate_limited(now, Exhausted::PerDay, None, &daily, 86_400_000),
    None
  );
  b.end_rest();
  assert!(b.has_room(now, 0));
}

#[test]
fn projects_get_a_budget_per_model_and_merge_into_one() {
  let policy = WindowPolicy::default();
  let mut t = Budgets::new(SMALL, policy);
  let own = t.project(ProjectName::OwnOf(0), T0);
  let named = t.project(ProjectName::Named("1001".into()), T0);
  assert_eq!(t.project(ProjectName::Named("1001".into()), T0), named);
  t.add_model(
    1,
    Quota {
      rpm: 9,
      rpd: 9,
      tpm: 9,
    },
    T0,
  );
  assert_eq!(t.get(t.of(own, 1)).quota.rpm, 9);
  assert_eq!(t.get(t.of(named, 0)).quota.rpm, 2);
  let later = t.project(ProjectName::Named("1002".into()), T0);
  assert_eq!(
    t.of_project(later).len(),
    2,
    "a new project gets every model"
  );
  t.get_mut(t.of(own, 0)).reserve(T0, 5);
  t.get_mut(t.of(named, 0)).reserve(T0, 7);
  let pairs = t.merge(own, named, T0 + 1);
  assert_eq!(
    pairs,
    vec![
      (t.of(own, 0), t.of(named, 0)),
      (t.of(own, 1), t.of(named, 1))
    ]
  );
  let merged = t.get(t.of(named, 0));
  assert_eq!(
    (merged.rpm.current(T0 + 1), merged.tpm.current(T0 + 1)),
    (2, 12)
  );
  assert_eq!(t.get(t.of(own, 0)).rpm.current(T0 + 1), 0);
}
