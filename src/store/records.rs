//! The slots a shared quota is leased in, and what a lease got: the store's own values (the pool's
//! stored state is in `core::snapshot`). Also how the store names a process uniquely.

use mongodb::bson::oid::ObjectId;

use crate::core::clock::Millis;

/// A name no other process or host makes: an ObjectId in hex, whose random process part and
/// counter keep it unique without coordination. It names a process's lease holdings, its spill
/// file and the source of its recorded calls' ids.
pub fn unique_name() -> String {
  ObjectId::new().to_hex()
}

/// One window of one key: the unit a quota is shared in across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSlot<'a> {
  pub api_key: &'a str,
  /// `"rpm"`, `"rpd"` or `"tpm"`.
  pub window: &'a str,
  /// Which occurrence of the window, e.g. its start in ms. Every process must derive the same id
  /// for the same window, or each gets its own budget.
  pub window_id: i64,
  /// When the window is over; its lease document may be deleted some time after that.
  pub window_end: Millis,
}

/// A slice of a rolling window to lease in (see `lease`): every process derives the same slices
/// from the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceSlot<'a> {
  pub api_key: &'a str,
  /// `"rpm"` or `"tpm"`.
  pub window: &'a str,
  /// The slice's index: its start over its length.
  pub slice: i64,
  /// How many slices make one span of the window.
  pub span_slices: i64,
  /// When the slice ends; the ledger may be deleted some time after its newest slice ends.
  pub slice_end: Millis,
}

/// What a lease request got: `granted` of the budget, with `holders` holding part of the slot
/// (the asker included), which tells how many processes share the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
  pub granted: u64,
  pub holders: usize,
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn unique_names_differ() {
    assert_ne!(unique_name(), unique_name());
  }
}
