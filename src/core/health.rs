//! A key's own health: whether it may be handed out, and how failures that follow the key change
//! that. A 429 is its project's quota (see `budget`) and an overload is its model's (see
//! `models`): neither is the key's fault, and neither touches this.
//!
//! - Failures in a row (timeouts, network errors, unexplained server errors) open a circuit: the
//!   key rests for a back-off that doubles with each opening, then serves one trial request, and
//!   closes again on its success.
//! - Only the upstream refusing the key itself deactivates it, until `reactivate`.

use crate::core::clock::Millis;

/// Failures in a row (other than 429s) that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 3;
pub const FIRST_BACKOFF_MS: Millis = 5_000;
pub const MAX_BACKOFF_MS: Millis = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
  Active,
  /// Its budget is rate-limited upstream: available again at `until` (shown from the budget).
  Resting {
    until: Millis,
  },
  /// Failing: one trial request is allowed from `until` on.
  CircuitOpen {
    until: Millis,
  },
  /// Serving its one trial request; `trial_out` once it has been handed out.
  HalfOpen {
    trial_out: bool,
  },
  /// Refused by the upstream; only `reactivate` brings it back.
  Deactivated,
  /// The key is fine, but its project's tier has no quota for the model shown (a 429 with
  /// `quotaValue` "0"): until reactivated. Never a key's own health; shown from its budget.
  NoQuota,
}

impl HealthState {
  pub const LABELS: [&'static str; 6] = [
    "active",
    "resting",
    "circuit-open",
    "half-open",
    "deactivated",
    "no-quota",
  ];

  /// Position of this state's label in [`Self::LABELS`].
  pub fn code(self) -> usize {
    match self {
      Self::Active => 0,
      Self::Resting { .. } => 1,
      Self::CircuitOpen { .. } => 2,
      Self::HalfOpen { .. } => 3,
      Self::Deactivated => 4,
      Self::NoQuota => 5,
    }
  }

  /// Until when the key is kept out, for the resting and open states.
  pub fn until(self) -> Option<Millis> {
    match self {
      Self::Resting { until } | Self::CircuitOpen { until } => Some(until),
      _ => None,
    }
  }
}

/// What a recorded failure did to the key, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
  Unchanged,
  Rested { until: Millis },
  CircuitOpened { until: Millis, failures: u32 },
  Deactivated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
  state: HealthState,
  /// Non-429 failures in a row.
  failure_streak: u32,
  /// Openings since the circuit last closed: each doubles the back-off.
  openings: u32,
}

impl Default for Health {
  fn default() -> Self {
    Self {
      state: HealthState::Active,
      failure_streak: 0,
      openings: 0,
    }
  }
}

impl Health {
  /// The state as of `now`: rests and open circuits end by themselves.
  pub fn state(&self, now: Millis) -> HealthState {
    match self.state {
      HealthState::CircuitOpen { until } if now >= until => {
        HealthState::HalfOpen { trial_out: false }
      }
      state => state,
    }
  }

  pub fn is_deactivated(&self) -> bool {
    self.state == HealthState::Deactivated
  }

  pub fn can_serve(&self, now: Millis) -> bool {
    matches!(
      self.state(now),
      HealthState::Active | HealthState::HalfOpen { trial_out: false }
    )
  }

  /// A request goes out on this key; a half-open key has then used its one trial.
  pub fn on_hand_out(&mut self, now: Millis) {
    self.state = match self.state(now) {
      HealthState::HalfOpen { .. } => HealthState::HalfOpen { trial_out: true },
      state => state,
    };
  }

  pub fn on_success(&mut self, now: Millis) {
    self.failure_streak = 0;
    match self.state(now) {
      HealthState::HalfOpen { .. } => {
        self.state = HealthState::Active;
        self.openings = 0;
      }
      state => self.state = state,
    }
  }

  /// A failure that follows the key: neither a 429, nor an overload, nor a rejection.
  pub fn on_transient_failure(&mut self, now: Millis) -> HealthChange {
    self.failure_streak = self.failure_streak.saturating_add(1);
    let state = self.state(now);
    let trial_failed = matches!(state, HealthState::HalfOpen { .. });
    if state == HealthState::Deactivated
      || (!trial_failed && self.failure_streak < FAILURES_TO_OPEN)
    {
      self.state = state;
      return HealthChange::Unchanged;
    }
    if let HealthState::CircuitOpen { .. } = state {
      return HealthChange::Unchanged;
    }
    let backoff = FIRST_BACKOFF_MS
      .saturating_mul(1 << self.openings.min(16))
      .min(MAX_BACKOFF_MS);
    self.openings = self.openings.saturating_add(1);
    let until = now + backoff;
    self.state = HealthState::CircuitOpen { until };
    HealthChange::CircuitOpened {
      until,
      failures: self.failure_streak,
    }
  }

  pub fn on_key_rejected(&mut self) -> HealthChange {
    if self.state == HealthState::Deactivated {
      return HealthChange::Unchanged;
    }
    self.state = HealthState::Deactivated;
    HealthChange::Deactivated
  }

  /// The trial request of a half-open key was never reported (its reservation expired): another
  /// may go out, or the key would be kept out for good.
  pub fn trial_lost(&mut self, now: Millis) {
    if let HealthState::HalfOpen { trial_out: true } = self.state(now) {
      self.state = HealthState::HalfOpen { trial_out: false };
    }
  }

  /// Back in service, with a clean record.
  pub fn reactivate(&mut self) {
    *self = Self::default();
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn failures_in_a_row_open_the_circuit_then_one_trial_closes_it() {
    let mut h = Health::default();
    assert_eq!(h.on_transient_failure(0), HealthChange::Unchanged);
    assert_eq!(h.on_transient_failure(0), HealthChange::Unchanged);
    assert_eq!(
      h.on_transient_failure(0),
      HealthChange::CircuitOpened {
        until: FIRST_BACKOFF_MS,
        failures: 3
      }
    );
    assert!(!h.can_serve(FIRST_BACKOFF_MS - 1));
    assert!(h.can_serve(FIRST_BACKOFF_MS));
    h.on_hand_out(FIRST_BACKOFF_MS);
    // One trial at a time.
    assert!(!h.can_serve(FIRST_BACKOFF_MS));
    h.on_success(FIRST_BACKOFF_MS + 10);
    assert_eq!(h.state(FIRST_BACKOFF_MS + 10), HealthState::Active);
  }

  #[test]
  fn a_failed_trial_reopens_with_a_doubled_backoff_up_to_the_cap() {
    let mut h = Health::default();
    for _ in 0..3 {
      h.on_transient_failure(0);
    }
    let mut now = FIRST_BACKOFF_MS;
    let mut expected = FIRST_BACKOFF_MS * 2;
    for _ in 0..10 {
      h.on_hand_out(now);
      match h.on_transient_failure(now) {
        HealthChange::CircuitOpened { until, .. } => assert_eq!(until - now, expected),
        other => panic!("{other:?}"),
      }
      now += expected;
      expected = (expected * 2).min(MAX_BACKOFF_MS);
    }
  }

  #[test]
  fn a_lost_trial_lets_another_go_out() {
    let mut h = Health::default();
    for _ in 0..3 {
      h.on_transient_failure(0);
    }
    h.on_hand_out(FIRST_BACKOFF_MS);
    assert!(!h.can_serve(FIRST_BACKOFF_MS));
    h.trial_lost(FIRST_BACKOFF_MS + 60_000);
    assert!(h.can_serve(FIRST_BACKOFF_MS + 60_000));
  }

  #[test]
  fn success_resets_the_streak() {
    let mut h = Health::default();
    h.on_transient_failure(0);
    h.on_transient_failure(0);
    h.on_success(0);
    assert_eq!(h.on_transient_failure(0), HealthChange::Unchanged);
    assert_eq!(h.on_transient_failure(0), HealthChange::Unchanged);
  }

  #[test]
  fn only_a_rejection_deactivates_and_reactivate_undoes_it() {
    let mut h = Health::default();
    assert_eq!(h.on_key_rejected(), HealthChange::Deactivated);
    assert!(h.is_deactivated());
    assert!(!h.can_serve(i64::MAX));
    assert_eq!(h.on_transient_failure(0), HealthChange::Unchanged);
    h.reactivate();
    assert_eq!(h.state(0), HealthState::Active);
  }
}
