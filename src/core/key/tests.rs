use super::*;
use crate::core::budget::{Exhausted, ProjectName};
use crate::core::quota::{Quota, WindowPolicy};
use crate::core::{clock::MINUTE_MS, window::counted_until};

const T0: Millis = 1_800_000_000_000;

/// One key in a project of its own, with budgets for the default model (0) and one other (1).
fn key() -> (KeyState, Budgets) {
  key_with(Quota::default())
}

fn key_with(quota: Quota) -> (KeyState, Budgets) {
  let mut budgets = Budgets::new(quota, WindowPolicy::default());
  let project = budgets.project(ProjectName::OwnOf(0), T0);
  budgets.add_model(
    1,
    Quota {
      rpm: 5,
      rpd: 50,
      tpm: 5_000,
    },
    T0,
  );
  (KeyState::new("k".into(), project, T0), budgets)
}

fn counted(b: &Budgets, id: BudgetId, now: Millis) -> (u64, u64, u64) {
  let b = b.get(id);
  (b.rpm.current(now), b.rpd.current(now), b.tpm.current(now))
}

#[test]
fn a_new_key_is_active_with_its_budgets_windows() {
  let (k, b) = key();
  let f = k.figures(b.get(0), T0);
  assert!(f.active);
  assert_eq!(f.state, HealthState::Active);
  assert_eq!(
    f.rpm,
    LimitFigures {
      current: 0,
      limit: 30,
      reset_time: T0
    }
  );
  assert!(f.rpd.reset_time > T0 && f.rpd.reset_time <= T0 + 86_400_000);
  assert_eq!(f.tpm.limit, 1_000_000);
}

#[test]
fn a_reservation_is_settled_once_with_the_real_token_count() {
  let (mut k, mut b) = key();
  k.reserve(&mut b, 0, T0, 500);
  assert_eq!(counted(&b, 0, T0), (1, 1, 500));
  let settled = k.settle(&mut b, None, 0, T0 + 100, T0 + 100, 320, true);
  assert_eq!(
    settled,
    Settled {
      budget: 0,
      handed_at: Some(T0)
    }
  );
  assert_eq!(counted(&b, 0, T0 + 100), (1, 1, 320));
  // Usage for a request we did not hand out counts anew, when it succeeded.
  assert_eq!(
    k.settle(&mut b, None, 0, T0 + 200, T0 + 200, 10, true)
      .handed_at,
    None
  );
  assert_eq!(counted(&b, 0, T0 + 200), (2, 2, 330));
  k.settle(&mut b, None, 0, T0 + 300, T0 + 300, 10, false);
  assert_eq!(counted(&b, 0, T0 + 300), (2, 2, 330));
  // A reserved request that failed stays counted: it went out.
  k.reserve(&mut b, 0, T0 + 400, 0);
  k.settle(&mut b, None, 0, T0 + 500, T0 + 500, 0, false);
  assert_eq!(b.get(0).rpm.current(T0 + 500), 3);
}

#[test]
fn a_report_naming_a_model_settles_that_models_hand_out() {
  let (mut k, mut b) = key();
  let other = b.of(k.project, 1);
  k.reserve(&mut b, 0, T0, 100);
  k.reserve(&mut b, other, T0 + 1, 200);
  let settled = k.settle(&mut b, Some(1), 0, T0 + 10, T0 + 10, 7, true);
  assert_eq!(settled.budget, other);
  assert_eq!(counted(&b, other, T0 + 10), (1, 1, 7));
  assert_eq!(
    counted(&b, 0, T0 + 10),
    (1, 1, 100),
    "the default model's hand-out is still open"
  );
  // Without a model: the oldest hand-out, whatever its model.
  assert_eq!(
    k.settle(&mut b, None, 0, T0 + 20, T0 + 20, 9, true).budget,
    0
  );
  assert!(k.pending.is_empty());
  // A report naming a model without a hand-out counts on the project's budget of it.
  assert_eq!(
    k.settle(&mut b, Some(1), 0, T0 + 30, T0 + 30, 3, true)
      .budget,
    other
  );
  assert_eq!(counted(&b, other, T0 + 30), (2, 2, 10));
}

#[test]
fn a_routed_request_takes_a_hand_out_onto_the_budget_it_goes_to() {
  let (mut k, mut b) = key();
  let other = b.of(k.project, 1);
  k.reserve(&mut b, 0, T0, 40);
  assert_eq!(k.adopt_reservation(&mut b, other, T0 + 5_000), Some(0));
  assert_eq!(counted(&b, 0, T0 + 5_000), (0, 0, 0));
  assert_eq!(counted(&b, other, T0 + 5_000), (1, 1, 40));
  assert_eq!(
    b.get(other).rpm.frees_at(T0 + 5_000),
    counted_until(MINUTE_MS, T0 + 5_000)
  );
  assert_eq!(k.pending[0].budget, other);
}

#[test]
fn unsettled_reservations_expire_and_give_their_room_back() {
  let (mut k, mut b) = key();
  k.reserve(&mut b, 0, T0, 100);
  assert!(k
    .expire_reservations(&mut b, T0 + 59_999, MINUTE_MS)
    .is_empty());
  assert_eq!(k.pending.len(), 1);
  assert_eq!(
    k.expire_reservations(&mut b, T0 + MINUTE_MS, MINUTE_MS),
    vec![0]
  );
  assert!(k.pending.is_empty());
  assert_eq!(b.get(0).rpd.current(T0 + MINUTE_MS), 0);
  // A late report then counts as a request of its own.
  k.settle(&mut b, None, 0, T0 + MINUTE_MS, T0 + MINUTE_MS, 50, true);
  assert_eq!(b.get(0).rpd.current(T0 + MINUTE_MS), 1);
}

#[test]
fn a_record_round_trips_through_a_fresh_key() {
  let (mut k, mut b) = key();
  k.reserve(&mut b, 0, T0, 0);
  k.settle(&mut b, None, 0, T0 + 100, T0 + 100, 700, true);
  k.record_error("503".into(), T0 + 200);
  k.health.on_key_rejected();
  let record = k.to_record(b.get(0), T0 + 300);
  assert_eq!(
    (record.rpm.current, record.rpd.current, record.tpm.current),
    (1, 1, 700)
  );
  // Settled at 100 ms, sent then: counted from then.
  assert_eq!(record.rpm.reset_time, counted_until(MINUTE_MS, T0 + 100));
  assert!(!record.is_active);
  let (mut restarted, mut b2) = key();
  restarted.merge_record(&record, b2.get_mut(0), T0 + 1_000, false);
  assert_eq!(counted(&b2, 0, T0 + 1_000), (1, 1, 700));
  // Counted again at the merge: conservatively a whole span from then.
  assert_eq!(b2.get(0).rpm.current(T0 + 1_000 + MINUTE_MS), 1);
  assert!(restarted.health.is_deactivated());
  assert_eq!(
    (
      restarted.error_count,
      restarted.last_error.as_deref(),
      restarted.last_error_time
    ),
    (1, Some("503"), Some(T0 + 200))
  );
  assert_eq!(restarted.last_used, T0);
  assert_eq!(restarted.to_record(b2.get(0), T0 + 1_000).rpd, record.rpd);
}

#[test]
fn merging_keeps_the_larger_count_of_open_windows_and_ignores_closed_ones() {
  let (mut k, mut b) = key();
  k.settle(&mut b, None, 0, T0, T0, 50, true);
  k.settle(&mut b, None, 0, T0, T0, 50, true);
  let open = |current| WindowRecord {
    current,
    limit: 30,
    reset_time: T0 + 30_000,
  };
  let mut record = k.to_record(b.get(0), T0);
  record.rpm = open(1);
  record.rpd = open(5);
  record.tpm = WindowRecord {
    current: 900,
    limit: 1_000_000,
    reset_time: T0 - 1,
  };
  record.error_count = 4;
  k.record_error("local".into(), T0);
  k.merge_record(&record, b.get_mut(0), T0, true);
  assert_eq!(counted(&b, 0, T0), (2, 5, 100));
  // The local error is newer than the record's.
  assert_eq!((k.error_count, k.last_error.as_deref()), (1, Some("local")));
  k.merge_record(&record, b.get_mut(0), T0, false);
  assert_eq!(counted(&b, 0, T0), (2, 5, 100));
  assert_eq!((k.error_count, k.last_error.as_deref()), (4, None));
}

#[test]
fn a_key_shows_its_budgets_rest_and_rate_limit_info_flags_full_and_rested_windows() {
  let (mut k, mut b) = key_with(Quota {
    rpm: 2,
    rpd: 10,
    tpm: 1_000,
  });
  k.reserve(&mut b, 0, T0, 0);
  k.reserve(&mut b, 0, T0, 0);
  let info = rate_limit_info(b.get(0), T0);
  assert!(info[0].is_limited && !info[1].is_limited && !info[2].is_limited);
  assert_eq!(info[0].reset_time, counted_until(MINUTE_MS, T0));
  b.get_mut(0).on_rate_limited(
    T0,
    Exhausted::PerMinute(LimitType::Tpm),
    Some(5_000),
    &WindowPolicy::default(),
    86_400_000,
  );
  let info = rate_limit_info(b.get(0), T0);
  assert!(info[2].is_limited);
  assert_eq!(info[2].reset_time, T0 + 5_000);
  assert_eq!(
    k.figures(b.get(0), T0).state,
    HealthState::Resting { until: T0 + 5_000 }
  );
  b.get_mut(0).on_rate_limited(
    T0,
    Exhausted::NoQuota,
    None,
    &WindowPolicy::default(),
    86_400_000,
  );
  assert_eq!(k.figures(b.get(0), T0).state, HealthState::NoQuota);
  assert!(rate_limit_info(b.get(0), T0).iter().all(|i| i.is_limited));
}
