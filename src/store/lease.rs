//! Shared quota leases: how processes that use the same keys, on one host or many, split each key's
//! window budget between them without a database round trip per selection. A process leases a
//! slice of a window, serves selections from it in memory, and gives back what it did not use.
//!
//! One document per (key, window, window id) in `api_key_leases`:
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

#[cfg(test)]
mod tests {
  use super::*;

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
