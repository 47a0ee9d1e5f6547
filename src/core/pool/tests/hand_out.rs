//! Handing keys out: reservations, the round-robin, rotation and when a key frees.

use super::*;

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
fn peek_shows_the_rotation_without_spending_quota() {
  let (p, _, _) = pool(2);
  let a = p.best(Claim::LookOnly, 0).unwrap();
  let b = p.rotate(Claim::LookOnly, 0).unwrap().pick.selection;
  assert_ne!(a.pick.index, b.index);
  assert_eq!(p.figures(0).unwrap().rpm.current, 0);
  assert_eq!(p.figures(1).unwrap().rpm.current, 0);
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
