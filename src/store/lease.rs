//! Shared quota leases: how processes that use the same keys, on one host or many, split each key's
//! window budget between them without a database round trip per selection. A process leases part
//! of a window, serves selections from it in memory, and gives back what it did not use.
//!
//! Two kinds of window, as Gemini counts them: a fixed one (requests per day, from one reset to the
//! next) and a rolling one (requests per minute: any minute, wherever it starts).
//!
//! **Rolling windows** are cut into slices of a fraction of the span; a lease is for one slice
//! and serves only during it. Any stretch of one span overlaps at most `span_slices + 1` slices in
//! a row, so the budget rule is: no `span_slices + 1` slices in a row are granted more than
//! `limit` in total (see [`Ledger`]). One document per key and rolling window holds the grants of
//! its recent slices, `{ _id, apiKey, window, slices: { <slice>: n }, holders: { <holder>: <last
//! slice> }, version, windowEnd }`, and every change is a compare-and-swap on `version`, so the
//! rule holds whatever the number of processes.
//!
//! **Fixed windows**: one document per (key, window, window id) in `api_key_leases`:
//! `{ _id, apiKey, window, windowId, windowEnd, used, holders: { <holder>: n }, expires: { <holder>: ms } }`.
//! `used` is everything handed out in that window and not given back; `holders.<h>` is the part
//! holder `h` holds and has not reported spent, `expires.<h>` when its latest lease runs out.
//!
//! Guarantee: the total granted per (key, window, window id) never exceeds `limit`, whatever the
//! number of processes or hosts. Every grant of `n` is one update of one document guarded by
//! `used <= limit - n`, which the server applies atomically, so `used <= limit` holds after every
//! write; every other write only lowers `used`, and never by more than a holder holds.
//!
//! Limits of the guarantee:
//! - Every process must pass the same `limit` and derive the same window id for the same window.
//! - A network partition never raises the total: a process cut off from the database cannot lease
//!   more, and may serve only what it holds, until its lease's `expires_at`. What it holds stays
//!   counted as used for everyone else until it is released, or reclaimed after expiry.
//! - Reclaiming trusts clocks: a holder must stop serving from a lease at its `expires_at` by its
//!   own clock, and a reclaimer should pass a `now` lowered by the clock skew it allows. Budget a
//!   dead holder spent but never reported with `consume` is handed out again when its lease is
//!   reclaimed: at most what it spent since its last report.

use std::collections::BTreeMap;

use super::error::StoreError;
use super::records::LeaseSlot;

/// How many times a grant or give-back re-reads the document after losing a race, before it
/// settles for nothing; losing a race means others were served, so giving up is safe.
pub const ATTEMPTS: usize = 8;

/// The lease document's `_id`. The key goes last, so the id is unambiguous whatever the key holds.
pub fn lease_id(slot: &LeaseSlot<'_>) -> String {
  format!("{}:{}:{}", slot.window, slot.window_id, slot.api_key)
}

/// Whether a holder name can be a field name: non-empty, no `.` or NUL, not starting with `$`.
pub fn valid_holder(holder: &str) -> bool {
  !holder.is_empty() && !holder.starts_with('$') && !holder.contains(['.', '\0'])
}

/// Refuses slots and holder names that would not make a sound document: the holder becomes a
/// field name, so it may not hold `.` or start with `$`.
pub fn check(slot: &LeaseSlot<'_>, holder: &str) -> Result<(), StoreError> {
  if !matches!(slot.window, "rpm" | "rpd" | "tpm") {
    return Err(StoreError::InvalidLease(format!(
      "window must be \"rpm\", \"rpd\" or \"tpm\" (got {:?})",
      slot.window
    )));
  }
  if slot.api_key.is_empty() {
    return Err(StoreError::InvalidLease("empty API key".into()));
  }
  if !valid_holder(holder) {
    return Err(StoreError::InvalidLease(format!(
      "holder must be non-empty, without '.' or NUL, and not start with '$' (got {holder:?})"
    )));
  }
  Ok(())
}

/// The document `_id` of a key's rolling-window ledger.
pub fn ledger_id(window: &str, api_key: &str) -> String {
  format!("{window}:{api_key}")
}

/// The grants of a rolling window's recent slices, and who took part: what a ledger document
/// holds. Pure, so the rule is the same for the database and the memory store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
  /// Slice index to what was granted in it and not given back.
  pub slices: BTreeMap<i64, u64>,
  /// Holder to the last slice it was granted in.
  pub holders: BTreeMap<String, i64>,
}

impl Ledger {
  /// How much more may be granted in `slice`: the least room any run of `span_slices + 1` slices
  /// that holds it has left under `limit`. A slice older than every run the ledger still keeps is
  /// given nothing: its neighbours may have been pruned.
  pub fn room(&self, slice: i64, span_slices: i64, limit: u64) -> u64 {
    let newest = self.slices.keys().next_back().copied().unwrap_or(slice);
    if slice < newest - span_slices {
      return 0;
    }
    let run = span_slices + 1;
    let most = (slice - span_slices..=slice)
      .map(|first| {
        self
          .slices
          .range(first..first + run)
          .map(|(_, n)| *n)
          .sum::<u64>()
      })
      .max()
      .unwrap_or(0);
    limit.saturating_sub(most)
  }

  /// Grants `n` in `slice` to `holder` (the caller checked [`Self::room`]), and forgets slices no
  /// run that a future grant can be in still holds.
  pub fn grant(&mut self, slice: i64, span_slices: i64, n: u64, holder: &str) {
    *self.slices.entry(slice).or_default() += n;
    let last = self.holders.entry(holder.to_owned()).or_insert(slice);
    *last = (*last).max(slice);
    let newest = self.slices.keys().next_back().copied().unwrap_or(slice);
    let keep = newest - 2 * (span_slices + 1);
    self.slices.retain(|&s, _| s >= keep);
    self.holders.retain(|_, &mut s| s >= keep);
  }

  /// Gives back up to `n` of what `slice` was granted; returns how much.
  pub fn release(&mut self, slice: i64, n: u64) -> u64 {
    let Some(granted) = self.slices.get_mut(&slice) else {
      return 0;
    };
    let back = n.min(*granted);
    *granted -= back;
    back
  }

  /// How many holders were granted something in the last span before `slice`, `holder`
  /// included.
  pub fn holders_at(&self, slice: i64, span_slices: i64, holder: &str) -> usize {
    let live = |s: i64| s >= slice - span_slices;
    let others = self
      .holders
      .iter()
      .filter(|(h, &s)| h.as_str() != holder && live(s))
      .count();
    others + 1
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn no_run_of_span_plus_one_slices_is_granted_more_than_the_limit() {
    // Slices of 5 s, a span of 4 of them: any 20 s stretch overlaps at most 5 in a row.
    let mut l = Ledger::default();
    assert_eq!(l.room(100, 4, 30), 30);
    l.grant(100, 4, 30, "a");
    // Every later slice whose run of 5 holds slice 100 has nothing left...
    for s in 101..=104 {
      assert_eq!(l.room(s, 4, 30), 0, "{s}");
    }
    // ...until 100 has left every run: the first run without it starts at 101.
    assert_eq!(l.room(105, 4, 30), 30);
    // A grant ahead constrains the slices before it too.
    l.grant(107, 4, 10, "b");
    assert_eq!(l.room(106, 4, 30), 20);
    assert_eq!(l.room(103, 4, 30), 0);
    // Slices before every kept run get nothing.
    assert_eq!(l.room(102, 4, 30), 0);
    assert_eq!(l.holders_at(107, 4, "a"), 2);
    assert_eq!(l.holders_at(107, 4, "c"), 2);
    assert_eq!(l.holders_at(104, 4, "c"), 3);
    assert_eq!(l.release(107, 50), 10);
    assert_eq!(l.room(108, 4, 30), 30);
  }

  #[test]
  fn old_slices_and_holders_are_forgotten() {
    let mut l = Ledger::default();
    l.grant(10, 2, 5, "old");
    l.grant(100, 2, 5, "new");
    assert_eq!(l.slices.keys().copied().collect::<Vec<_>>(), vec![100]);
    assert_eq!(
      l.holders.keys().cloned().collect::<Vec<_>>(),
      vec!["new".to_owned()]
    );
    assert_eq!(l.room(10, 2, 30), 0);
  }

  fn slot(window: &str) -> LeaseSlot<'_> {
    LeaseSlot {
      api_key: "k:1",
      window,
      window_id: 60_000,
      window_end: 120_000,
    }
  }

  #[test]
  fn ids_name_window_occurrence_and_key() {
    assert_eq!(lease_id(&slot("rpm")), "rpm:60000:k:1");
  }

  #[test]
  fn bad_windows_and_holders_are_refused() {
    assert!(check(&slot("rpm"), "host-1:4242").is_ok());
    for (window, holder) in [
      ("RPM", "h"),
      ("rpm", ""),
      ("rpm", "a.b"),
      ("rpm", "$h"),
      ("rpm", "h\0"),
    ] {
      assert!(matches!(
        check(&slot(window), holder),
        Err(StoreError::InvalidLease(_))
      ));
    }
  }
}
