use super::*;
use crate::core::calendar::days_from_civil;

const SPAN: Millis = 60_000;
/// A minute boundary.
const T0: Millis = 1_800_000_000_000;
const PACIFIC: DailyReset = DailyReset::PacificMidnight;
/// One slice of a minute: 3 s.
const SLICE: Millis = SPAN / SLICES_PER_SPAN;

fn got(granted: u64) -> Option<Answer> {
  Some(Answer {
    granted,
    given_back: 0,
    holders: 1,
  })
}

fn need(a: &mut Allowance, at: Millis) -> Option<LeaseNeed> {
  a.need(SharedWindow::Rpm, at, 30, SPAN, PACIFIC)
}

fn want(n: &LeaseNeed) -> (Millis, u64, u64) {
  let LeaseNeed::Grant {
    occurrence,
    want,
    spent,
    ..
  } = *n
  else {
    panic!("not a grant")
  };
  (occurrence.id, want, spent)
}

#[test]
fn rpm_occurrences_are_slices_and_rpd_ones_days_every_process_derives_alike() {
  let o = Occurrence::of(SharedWindow::Rpm, T0 + 5_999, SPAN, PACIFIC);
  assert_eq!((o.id, o.start, o.end), (T0 + 3_000, T0 + 3_000, T0 + 6_000));
  assert!(!o.contains(T0 + 6_000));
  assert_eq!((slice_ms(SPAN), span_slices(SPAN)), (3_000, 20));
  // Short spans get fewer, longer slices; a span not a multiple of its slice is rounded up.
  assert_eq!((slice_ms(2_000), span_slices(2_000)), (500, 4));
  assert_eq!((slice_ms(700), span_slices(700)), (500, 2));
  assert_eq!((slice_ms(300), span_slices(300)), (300, 1));
  // The day of the spring-forward (23 hours) and of the fall-back (25 hours), in Los Angeles.
  let march_9 = days_from_civil(2025, 3, 9) * 86_400_000 + 8 * 3_600_000;
  let d = Occurrence::of(SharedWindow::Rpd, march_9 + 3_600_000, SPAN, PACIFIC);
  assert_eq!((d.start, d.end - d.start), (march_9, 23 * 3_600_000));
  let nov_2 = days_from_civil(2025, 11, 2) * 86_400_000 + 7 * 3_600_000;
  let d = Occurrence::of(SharedWindow::Rpd, nov_2 + 24 * 3_600_000, SPAN, PACIFIC);
  assert_eq!(
    (d.start, d.end - d.start, d.id),
    (nov_2, 25 * 3_600_000, d.end)
  );
}

/// A fresh allowance's first lease at `at` (a full grant: no history), granted `granted`.
fn leased(a: &mut Allowance, at: Millis, granted: u64) {
  let first = need(a, at).expect("a first lease");
  assert_eq!(want(&first).1, 8, "a fresh process asks for a full grant");
  a.granted(&first, got(granted), at);
}

#[test]
fn nothing_is_served_without_a_lease_and_no_more_than_granted() {
  let mut a = Allowance::default();
  assert!(!a.can_serve(T0, 0));
  assert_eq!(a.available_at(T0), T0 + LEASE_WAIT_MS);
  let n = need(&mut a, T0).expect("a first lease");
  assert_eq!(want(&n), (T0, 8, 0));
  let LeaseNeed::Grant {
    span_slices,
    expires_at,
    ..
  } = n
  else {
    panic!("not a grant")
  };
  assert_eq!((span_slices, expires_at), (20, T0 + SLICE));
  assert_eq!(need(&mut a, T0), None, "one question at a time");
  a.granted(&n, got(8), T0);
  let mut low = Vec::new();
  for _ in 0..8 {
    assert!(a.can_serve(T0 + 1, 0));
    low.push(a.serve(T0 + 1));
  }
  assert!(!a.can_serve(T0 + 1, 0));
  // The task is woken once half the lease is gone.
  assert_eq!(low, [false, false, false, true, true, true, true, true]);
  let top_up = need(&mut a, T0 + 2).expect("a top-up");
  // A slice's grant is not reported as spent: it stays counted whatever is served.
  assert_eq!(want(&top_up), (T0, 8, 0));
}

#[test]
fn a_short_grant_waits_for_the_slice_to_end_and_asks_again_only_later() {
  let mut a = Allowance::default();
  leased(&mut a, T0, 3);
  for _ in 0..3 {
    a.serve(T0 + 10);
  }
  assert_eq!(a.available_at(T0 + 10), T0 + SLICE);
  // The next slice's lease is asked for; the short one is not asked again at once.
  let next = need(&mut a, T0 + 10).expect("the next slice");
  assert_eq!(want(&next).0, T0 + SLICE);
  a.granted(&next, got(0), T0 + 10);
  assert_eq!(need(&mut a, T0 + 20), None);
  assert!(!a.can_serve(T0 + 20, 0));
}

#[test]
fn the_next_slice_is_leased_as_soon_as_the_current_one_starts() {
  let mut a = Allowance::default();
  leased(&mut a, T0, 8);
  for _ in 0..3 {
    a.serve(T0 + 1);
  }
  let next = need(&mut a, T0 + 1).expect("the next slice's lease");
  // As large as this slice's use so far.
  assert_eq!(want(&next), (T0 + SLICE, 3, 0));
  a.granted(&next, got(3), T0 + 1);
  // Not served before its slice starts; at once when it does.
  for _ in 0..5 {
    a.serve(T0 + SLICE - 1);
  }
  assert!(!a.can_serve(T0 + SLICE - 1, 0));
  assert!(a.can_serve(T0 + SLICE, 0));
  assert!(!a.serve(T0 + SLICE));
  assert_eq!(a.unused(T0 + SLICE - 1).count(), 2);
}

#[test]
fn after_a_slice_first_leases_ask_for_what_it_served_and_leftovers_go_back() {
  let mut idle = Allowance::default();
  leased(&mut idle, T0, 8);
  let next = need(&mut idle, T0 + 1).unwrap();
  idle.granted(&next, got(1), T0 + 1);
  // Both slices ended unused: the slice in progress is leased first (selections wait for it),
  // of one, whatever the limit; then what the two were granted goes back, the newest first;
  // then the next slice is leased.
  let at = T0 + 2 * SLICE + 1;
  let current = need(&mut idle, at).expect("the slice in progress");
  assert_eq!(want(&current), (T0 + 2 * SLICE, 1, 0));
  assert_eq!(need(&mut idle, at), None, "one question at a time");
  idle.granted(&current, got(1), at);
  for (id, left) in [(T0 + SLICE, 1), (T0, 8)] {
    let back = need(&mut idle, at).expect("a release");
    let LeaseNeed::Release {
      slice,
      unused,
      span_slices,
    } = back
    else {
      panic!("not a release: {back:?}")
    };
    assert_eq!((slice.id, unused, span_slices), (id, left, 20));
    idle.granted(&back, got(0), at);
  }
  let later = need(&mut idle, at).unwrap();
  assert_eq!(want(&later), (T0 + 3 * SLICE, 1, 0));
  let mut busy = Allowance::default();
  leased(&mut busy, T0, 8);
  for _ in 0..8 {
    busy.serve(T0 + 1);
  }
  let next = need(&mut busy, T0 + SLICE + 1).unwrap();
  assert_eq!(
    want(&next),
    (T0 + SLICE, 8, 0),
    "at most a quarter of the limit"
  );
}

#[test]
fn daily_leases_expire_and_are_renewed_with_what_was_spent() {
  let mut a = Allowance::default();
  let day = |a: &mut Allowance, at| a.need(SharedWindow::Rpd, at, 1_500, SPAN, PACIFIC);
  let n = day(&mut a, T0).unwrap();
  let LeaseNeed::Grant {
    want,
    expires_at,
    span_slices,
    ..
  } = n
  else {
    panic!("not a grant")
  };
  assert_eq!(
    (want, expires_at, span_slices),
    (47, T0 + DAILY_LEASE_TTL_MS, 0)
  );
  a.granted(&n, got(47), T0);
  a.serve(T0 + 1);
  assert_eq!(day(&mut a, T0 + 2), None);
  let renew = day(&mut a, T0 + DAILY_LEASE_TTL_MS / 2).expect("a renewal");
  let LeaseNeed::Grant {
    want,
    spent,
    give_back,
    ..
  } = renew
  else {
    panic!("not a grant")
  };
  // What was served since the last report is reported and asked for again; the rest goes back.
  assert_eq!((want, spent, give_back), (1, 1, 46));
  assert!(
    !a.can_serve(T0 + DAILY_LEASE_TTL_MS / 2, 0),
    "what goes back is not served meanwhile"
  );
  // Not renewed (the store was away): the old lease serves until it expires, no longer.
  a.granted(&renew, None, T0 + DAILY_LEASE_TTL_MS / 2);
  assert!(a.can_serve(T0 + DAILY_LEASE_TTL_MS - 1, 0));
  assert!(!a.can_serve(T0 + DAILY_LEASE_TTL_MS, 0));
}

#[test]
fn without_the_store_a_day_serves_a_local_share_and_a_good_lease_is_kept() {
  let mut a = Allowance::default();
  assert!(a.grant_locally(SharedWindow::Rpd, T0, 200 / 4, SPAN, PACIFIC));
  for _ in 0..50 {
    assert!(a.can_serve(T0, 0));
    a.serve(T0);
  }
  assert!(!a.can_serve(T0, 0));
  assert!(!a.grant_locally(SharedWindow::Rpd, T0, 50, SPAN, PACIFIC));
  // A local share is not given back to the store.
  assert_eq!(a.unused(T0).count(), 0);
  let mut b = Allowance::default();
  let n = b.need(SharedWindow::Rpd, T0, 200, SPAN, PACIFIC).unwrap();
  b.granted(&n, got(7), T0);
  assert!(!b.grant_locally(SharedWindow::Rpd, T0, 50, SPAN, PACIFIC));
}

#[test]
fn without_the_store_a_rolling_window_serves_a_local_limit_until_the_store_answers() {
  let mut a = Allowance::default();
  let n = need(&mut a, T0).unwrap();
  a.granted(&n, got(2), T0);
  // The local limit is there at once, under the lease, which serves first.
  assert!(a.grant_locally(SharedWindow::Rpm, T0, 7, SPAN, PACIFIC));
  assert!(!a.grant_locally(SharedWindow::Rpm, T0, 7, SPAN, PACIFIC));
  a.serve(T0);
  a.serve(T0);
  assert!(a.can_serve(T0, 6));
  assert!(!a.can_serve(T0, 7));
  // The process's own count over the last span decides, across slices.
  assert!(a.can_serve(T0 + 5 * SLICE, 6));
  assert!(!a.can_serve(T0 + 5 * SLICE, 7));
  let mut budget = SharedBudget {
    rpm: a.clone(),
    rpd: Allowance::default(),
  };
  let day = budget
    .rpd
    .need(SharedWindow::Rpd, T0, 200, SPAN, PACIFIC)
    .unwrap();
  budget.rpd.granted(&day, got(10), T0);
  assert_eq!(budget.available_at(T0, 7, T0 + 40_000), T0 + 40_000);
  assert_eq!(budget.available_at(T0, 3, T0 + 40_000), T0);
  // The store answers again: a lease of the slice in progress is not enough (the next one may
  // not come in time); once the next one is leased too, leases decide.
  let at = T0 + 5 * SLICE;
  let n = need(&mut a, at).unwrap();
  a.granted(&n, got(0), at);
  assert!(a.can_serve(at, 0), "still the local limit");
  let n = need(&mut a, at).unwrap();
  assert_eq!(want(&n).0, at + SLICE);
  a.granted(&n, got(0), at);
  assert!(!a.can_serve(at, 0));
}

/// A span of 2 s: slices of 500 ms, four to a span, so a run is five slices.
const SHORT_SPAN: Millis = 2_000;
const HALF_SECOND: Millis = 500;

fn answer(granted: u64, holders: usize) -> Option<Answer> {
  Some(Answer {
    granted,
    given_back: 0,
    holders,
  })
}

#[test]
fn while_the_limit_has_room_first_leases_ask_for_a_fair_part_of_a_slice_not_just_demand() {
  let ask = |a: &mut Allowance, at| a.need(SharedWindow::Rpm, at, 100_000, SHORT_SPAN, PACIFIC);
  let mut a = Allowance::default();
  let n = ask(&mut a, T0).unwrap();
  assert_eq!(want(&n).1, 25_000, "a fresh process asks for a full grant");
  // Two processes hold part of the window; this one serves one request a slice.
  a.granted(&n, answer(25_000, 2), T0);
  a.serve(T0 + 1);
  let next = ask(&mut a, T0 + 2).unwrap();
  // A burst could come at any slice: a fifth of the limit (one slice of a run of five) over
  // two processes, not the one request served so far.
  assert_eq!(want(&next), (T0 + HALF_SECOND, 10_000, 0));
  a.granted(&next, answer(10_000, 2), T0 + 2);
  // A burst of 5,000 in the next slice is served from what was leased before it started.
  let burst = T0 + HALF_SECOND;
  for _ in 0..5_000 {
    assert!(a.can_serve(burst, 0));
    a.serve(burst);
  }
  // The first slice's leftovers go back, then this one is topped up.
  let back = ask(&mut a, burst + 1).expect("the first slice's leftovers");
  assert!(
    matches!(back, LeaseNeed::Release { unused: 24_999, .. }),
    "{back:?}"
  );
  a.granted(&back, answer(0, 0), burst + 1);
  let top_up = ask(&mut a, burst + 1).expect("a top-up");
  assert_eq!(want(&top_up), (burst, 25_000, 0));
  // The store is short: the limit is nearly used up everywhere, so first leases ask for
  // demand alone for a span, and others get the rest.
  a.granted(&top_up, answer(100, 2), burst + 2);
  let next = ask(&mut a, burst + 2).unwrap();
  assert_eq!(want(&next), (burst + HALF_SECOND, 5_000, 0));
  // Once a span passed without a short grant, the floor is back.
  a.granted(&next, answer(5_000, 2), burst + 2);
  let n = ask(&mut a, T0 + 6 * HALF_SECOND).unwrap();
  assert_eq!(want(&n), (T0 + 6 * HALF_SECOND, 10_000, 0));
}

#[test]
fn a_hung_store_leaves_the_next_slice_to_the_local_limit_until_both_slices_are_leased_again() {
  let ask = |a: &mut Allowance, at| a.need(SharedWindow::Rpm, at, 100_000, SHORT_SPAN, PACIFIC);
  let mut a = Allowance::default();
  let n = ask(&mut a, T0).unwrap();
  a.granted(&n, answer(25_000, 2), T0);
  // The next slice's lease is the request the store does not answer.
  let next = ask(&mut a, T0 + 10).unwrap();
  assert_eq!(want(&next).0, T0 + HALF_SECOND);
  a.granted(&next, None, T0 + 210);
  // The round that timed out sets the local limit at once, though this slice's lease is good:
  // the next slice starts with it, not with nothing until another round times out.
  assert!(a.grant_locally(SharedWindow::Rpm, T0 + 210, 50_000, SHORT_SPAN, PACIFIC));
  assert!(a.can_serve(T0 + HALF_SECOND, 49_999));
  assert!(!a.can_serve(T0 + HALF_SECOND, 50_000));
  // Asked again, answered once the slice has started (the store resumed, slowly).
  let next = ask(&mut a, T0 + 400).unwrap();
  let at = T0 + HALF_SECOND + 20;
  a.granted(&next, answer(10_000, 2), at);
  // This slice is leased, not yet the next, which a slow store may answer too late.
  assert!(a.can_serve(T0 + 2 * HALF_SECOND, 0));
  // The first slice's leftovers go back: an answer about another slice changes nothing.
  let back = ask(&mut a, at).unwrap();
  assert!(
    matches!(back, LeaseNeed::Release { unused: 25_000, .. }),
    "{back:?}"
  );
  a.granted(&back, answer(0, 0), at + 1);
  assert!(a.can_serve(T0 + 2 * HALF_SECOND, 0));
  let next = ask(&mut a, at + 1).unwrap();
  assert_eq!(want(&next).0, T0 + 2 * HALF_SECOND);
  a.granted(&next, answer(10_000, 2), at + 2);
  // Both are: leases decide again.
  assert_eq!(a.local_limit(), None);
  assert!(!a.can_serve(T0 + 3 * HALF_SECOND, 0));
}
