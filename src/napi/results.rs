//! The result slots that the N-API layer hands to JS: a fixed array of numbers the pool's answers
//! are written into, so the hot path returns a key's figures without building a JS object, string or
//! `Date` in Rust. Plain Rust: the N-API layer exposes the memory as a `Float64Array`.

use std::cell::UnsafeCell;

use crate::core::key::KeyFigures;
use crate::core::selection::{Rotation, RotationReason, Selection, SelectionMethod};

/// Declares the slots once: the `Slot` enum Rust writes by, and the names JS reads by.
macro_rules! slots {
  ($($slot:ident => $name:literal,)*) => {
    #[derive(Debug, Clone, Copy)]
    pub enum Slot { $($slot,)* }
    pub const SLOT_NAMES: &[&str] = &[$($name,)*];
  };
}

slots! {
  Score => "score",
  TotalAvailable => "totalAvailable",
  Method => "method",
  RotationReason => "rotationReason",
  PreviousKeyScore => "previousKeyScore",
  IsActive => "isActive",
  LastUsed => "lastUsed",
  RpmCurrent => "rpmCurrent",
  RpmLimit => "rpmLimit",
  RpmResetTime => "rpmResetTime",
  RpdCurrent => "rpdCurrent",
  RpdLimit => "rpdLimit",
  RpdResetTime => "rpdResetTime",
  TpmCurrent => "tpmCurrent",
  TpmLimit => "tpmLimit",
  TpmResetTime => "tpmResetTime",
  ErrorCount => "errorCount",
  LastErrorTime => "lastErrorTime",
  ErrorSeq => "errorSeq",
  CurrentIndex => "currentIndex",
  LastRotation => "lastRotation",
  State => "state",
  StateUntil => "stateUntil",
  // Written by JS, read by the hot path's functions: their arguments, so that a call passes none
  // through N-API (each argument costs a conversion and a type check there).
  Arg0 => "arg0",
  Arg1 => "arg1",
  Arg2 => "arg2",
  Arg3 => "arg3",
}

/// The codes of the `Method` slot: a method's position here.
pub const METHODS: [SelectionMethod; 2] = [
  SelectionMethod::CachedRoundRobin,
  SelectionMethod::RoundRobin,
];
/// The codes of the `RotationReason` slot.
pub const REASONS: [RotationReason; 3] = [
  RotationReason::Proactive,
  RotationReason::NotNeeded,
  RotationReason::NoKeyAboveThreshold,
];
/// At least 64 bytes: V8 keeps typed arrays that small on its heap, where they may move.
pub const RESULTS_LEN: usize = 32;

fn code_of<T: PartialEq>(table: &[T], value: &T) -> f64 {
  table.iter().position(|v| v == value).unwrap_or(0) as f64
}

/// The slots' memory. Written by the pool's callers on the JS thread only, during a synchronous call,
/// and read by JS between calls; so it is deliberately not `Sync`.
pub struct Results(UnsafeCell<[f64; RESULTS_LEN]>);

impl Default for Results {
  fn default() -> Self {
    Self(UnsafeCell::new([f64::NAN; RESULTS_LEN]))
  }
}

impl Results {
  /// The first slot's address, for a `Float64Array` view of [`RESULTS_LEN`] numbers.
  pub fn as_ptr(&self) -> *mut f64 {
    self.0.get().cast()
  }

  pub fn set(&self, slot: Slot, value: f64) {
    // SAFETY: `Results` is not `Sync`, so this runs on the one thread that owns it, and no reference
    // into the array outlives a call.
    unsafe { (*self.0.get())[slot as usize] = value }
  }

  pub fn get(&self, slot: Slot) -> f64 {
    // SAFETY: as in `set`.
    unsafe { (*self.0.get())[slot as usize] }
  }

  pub fn write_figures(&self, f: &KeyFigures) {
    self.set(Slot::IsActive, if f.active { 1.0 } else { 0.0 });
    self.set(Slot::State, f.state_code() as f64);
    self.set(
      Slot::StateUntil,
      f.state_until().map_or(f64::NAN, |t| t as f64),
    );
    self.set(Slot::LastUsed, f.last_used as f64);
    for (l, [current, limit, reset]) in [
      (
        &f.rpm,
        [Slot::RpmCurrent, Slot::RpmLimit, Slot::RpmResetTime],
      ),
      (
        &f.rpd,
        [Slot::RpdCurrent, Slot::RpdLimit, Slot::RpdResetTime],
      ),
      (
        &f.tpm,
        [Slot::TpmCurrent, Slot::TpmLimit, Slot::TpmResetTime],
      ),
    ] {
      self.set(current, l.current as f64);
      self.set(limit, l.limit as f64);
      self.set(reset, l.reset_time as f64);
    }
    self.set(Slot::ErrorCount, f.error_count as f64);
    self.set(
      Slot::LastErrorTime,
      f.last_error_time.map_or(f64::NAN, |t| t as f64),
    );
    self.set(Slot::ErrorSeq, f.error_seq as f64);
  }

  pub fn write_selection(&self, s: &Selection) {
    self.set(Slot::Score, s.score);
    self.set(Slot::TotalAvailable, s.total_available as f64);
    self.set(Slot::Method, code_of(&METHODS, &s.method));
  }

  pub fn write_rotation(&self, r: &Rotation) {
    self.write_selection(&r.selection);
    self.set(Slot::RotationReason, code_of(&REASONS, &r.reason));
    self.set(
      Slot::PreviousKeyScore,
      r.previous_key_score.unwrap_or(f64::NAN),
    );
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::budget::{Budgets, ProjectName};
  use crate::core::key::KeyState;
  use crate::core::quota::{Quota, WindowPolicy};

  #[test]
  fn every_slot_has_a_name_and_fits() {
    assert_eq!(SLOT_NAMES.len(), Slot::Arg3 as usize + 1);
    assert!(SLOT_NAMES.len() <= RESULTS_LEN);
  }

  #[test]
  fn figures_and_rotations_land_in_their_named_slots() {
    let r = Results::default();
    let mut budgets = Budgets::new(Quota::default(), WindowPolicy::default());
    let project = budgets.project(ProjectName::OwnOf(0), 1_000);
    let mut key = KeyState::new("k".into(), project, 1_000);
    for _ in 0..3 {
      key.reserve(&mut budgets, 0, 1_000, 0);
    }
    r.write_figures(&key.figures(budgets.get(0), 1_000));
    let at = |name: &str| unsafe {
      *r.as_ptr()
        .add(SLOT_NAMES.iter().position(|n| *n == name).unwrap())
    };
    assert_eq!(at("rpmCurrent"), 3.0);
    assert_eq!(at("rpmLimit"), 30.0);
    assert_eq!(
      at("rpmResetTime"),
      crate::core::window::counted_until(crate::core::clock::MINUTE_MS, 1_000) as f64
    );
    assert_eq!(at("state"), 0.0);
    assert!(at("stateUntil").is_nan());
    assert_eq!(at("isActive"), 1.0);
    assert!(at("lastErrorTime").is_nan());
    let selection = Selection {
      index: 0,
      score: 0.9,
      total_available: 4,
      method: SelectionMethod::RoundRobin,
    };
    r.write_rotation(&Rotation {
      selection,
      reason: RotationReason::NoKeyAboveThreshold,
      previous_key_score: None,
    });
    assert_eq!(at("method"), 1.0);
    assert_eq!(at("rotationReason"), 2.0);
    assert_eq!(r.get(Slot::TotalAvailable), 4.0);
  }
}
