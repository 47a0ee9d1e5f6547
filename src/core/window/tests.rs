use super::*;
use crate::core::clock::MINUTE_MS;

const T0: Millis = 1_800_000_000_000; // a whole second

fn leaves(w: &RollingWindow, t: Millis) -> Millis {
  counted_until(w.span_ms, t)
}

#[test]
fn rolling_window_counts_each_amount_for_the_span_plus_at_most_a_slice_and_the_margin() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  assert!(
    w.slice_ms <= MINUTE_MS / 500,
    "a minute's slices are about a tenth of a second"
  );
  w.add(T0 + 250, 1);
  assert_eq!(w.current(T0 + 250), 1);
  // Still counted a full span (and the margin) after it was added...
  assert_eq!(w.current(T0 + 250 + MINUTE_MS + MARGIN_MS - 1), 1);
  // ...until the end of its slice, a span, and the margin: at most a slice later.
  let gone = leaves(&w, T0 + 250);
  assert!(gone <= T0 + 250 + MINUTE_MS + MARGIN_MS + w.slice_ms);
  assert_eq!(w.current(gone - 1), 1);
  assert_eq!(w.current(gone), 0);
  assert_eq!(w.frees_at(T0 + 30_000), gone);
}

#[test]
fn rolling_window_has_no_double_burst_at_a_minute_edge() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  // 30 requests at the end of one minute...
  w.add(T0 + 59_000, 30);
  // ...leave no room at the start of the next, as a fixed window would.
  assert_eq!(w.current(T0 + 61_000), 30);
  assert_eq!(w.current(leaves(&w, T0 + 59_000) - 1), 30);
  assert_eq!(w.current(leaves(&w, T0 + 59_000)), 0);
}

#[test]
fn rolling_window_reports_when_capacity_frees() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  assert_eq!(w.frees_at(T0), T0);
  w.add(T0 + 2_300, 2);
  w.add(T0 + 10_000, 1);
  assert_eq!(w.frees_at(T0 + 20_000), leaves(&w, T0 + 2_300));
  assert_eq!(w.current(leaves(&w, T0 + 2_300)), 1);
  assert_eq!(w.frees_at(T0 + 63_000), leaves(&w, T0 + 10_000));
}

#[test]
fn rolling_window_says_when_its_newest_amount_leaves() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  assert_eq!(w.clears_at(T0), T0);
  w.add(T0 + 2_300, 2);
  w.add(T0 + 10_000, 1);
  assert_eq!(w.clears_at(T0 + 20_000), leaves(&w, T0 + 10_000));
  assert_eq!(w.current(leaves(&w, T0 + 10_000)), 0);
}

#[test]
fn an_amount_added_in_the_past_counts_from_then() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  w.add(T0 + 5_000, 1);
  // Sent at 1 s, reported at 5 s: counted from 1 s, and the oldest amount now.
  w.add_at(T0 + 5_000, T0 + 1_000, 1);
  assert_eq!(w.current(T0 + 5_000), 2);
  assert_eq!(w.frees_at(T0 + 5_000), leaves(&w, T0 + 1_000));
  assert_eq!(w.current(leaves(&w, T0 + 1_000)), 1);
  // Too long ago to be counted still: nothing.
  w.add_at(T0 + 200_000, T0 + 1_000, 7);
  assert_eq!(w.current(T0 + 200_000), 0);
  // Never in the future.
  w.add_at(T0 + 200_000, T0 + 300_000, 1);
  assert_eq!(w.frees_at(T0 + 200_000), leaves(&w, T0 + 200_000));
}

#[test]
fn rolling_window_remove_takes_back_only_what_is_still_counted() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  w.add(T0, 500);
  w.add(T0 + 30_000, 100);
  w.remove(T0 + 31_000, T0, 400);
  assert_eq!(w.current(T0 + 31_000), 200);
  w.remove(T0 + 31_000, T0, 400);
  assert_eq!(w.current(T0 + 31_000), 100);
  // Too old to matter: nothing happens.
  w.remove(T0 + 200_000, T0 + 30_000, 100);
  assert_eq!(w.current(T0 + 200_000), 0);
}

#[test]
fn windows_absorb_another_count_of_the_same_quota() {
  let mut a = RollingWindow::new(MINUTE_MS, T0);
  let mut b = RollingWindow::new(MINUTE_MS, T0);
  a.add(T0 + 10_000, 2);
  b.add(T0 + 1_000, 3);
  b.add(T0 + 30_000, 1);
  a.absorb(&b, T0 + 40_000);
  assert_eq!(a.current(T0 + 40_000), 6);
  // Each amount leaves when it would have left its own window.
  assert_eq!(a.frees_at(T0 + 40_000), leaves(&a, T0 + 1_000));
  assert_eq!(a.current(leaves(&a, T0 + 1_000)), 3);
  let policy = DailyReset::UtcMidnight;
  let mut d = DailyWindow::new(policy, T0);
  let mut e = DailyWindow::new(policy, T0);
  d.add(T0, 4);
  e.add(T0, 5);
  d.absorb(&e, T0);
  assert_eq!(d.current(T0), 9);
  d.fill(T0, 20);
  assert_eq!(d.current(T0), 20);
}

#[test]
fn a_span_that_is_not_a_multiple_of_the_slices_is_not_stretched() {
  // 1,000 ms (and the margin) in slices of 2 ms: 505 of them cover it, not 600.
  let mut w = RollingWindow::new(1_000, T0);
  w.add(T0, 1);
  let frees = w.frees_at(T0);
  assert!(
    frees - T0 >= 1_000 + MARGIN_MS && frees - T0 <= 1_000 + 2 + MARGIN_MS,
    "{}",
    frees - T0
  );
  assert_eq!(w.current(frees - 1), 1);
  assert_eq!(w.current(frees), 0);
}

#[test]
fn tiny_windows_keep_their_margin() {
  let mut w = RollingWindow::new(600, T0);
  w.add(T0, 3);
  assert_eq!(w.current(T0 + 600), 3);
  assert_eq!(w.current(T0 + 700), 0);
}

#[test]
fn rolling_window_reads_right_after_long_idle_and_clears() {
  let mut w = RollingWindow::new(MINUTE_MS, T0);
  w.add(T0, 4);
  assert_eq!(w.current(T0 + 10 * MINUTE_MS), 0);
  w.add(T0 + 10 * MINUTE_MS, 1);
  assert_eq!(w.current(T0 + 10 * MINUTE_MS), 1);
  w.clear(T0 + 10 * MINUTE_MS);
  assert_eq!(w.current(T0 + 10 * MINUTE_MS), 0);
}

#[test]
fn daily_window_resets_at_the_policy_boundary() {
  let start = DailyReset::UtcMidnight.next_reset(T0) - 1_000;
  let mut w = DailyWindow::new(DailyReset::UtcMidnight, start);
  w.add(start, 5);
  assert_eq!(w.current(start + 999), 5);
  assert_eq!(w.frees_at(start), start + 1_000);
  assert_eq!(w.current(start + 1_000), 0);
  // A reservation from before the reset is not taken out of the new day's count.
  w.add(start + 2_000, 1);
  w.remove(start + 2_000, start, 1);
  assert_eq!(w.current(start + 2_000), 1);
  w.remove(start + 3_000, start + 2_000, 1);
  assert_eq!(w.current(start + 3_000), 0);
}
