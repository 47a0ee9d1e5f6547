//! One API key's state: its limits, windows, health and outstanding reservations, and the read-only
//! views of it that callers get (figures for the hot path, a full status for listings).

use std::collections::VecDeque;

use crate::clock::Millis;
use crate::health::{Health, HealthState};
use crate::quota::{LimitType, Quota, WindowPolicy};
use crate::share::SharedBudget;
use crate::store::{KeyRecord, WindowRecord};
use crate::window::{DailyWindow, RollingWindow};

/// A request counted when its key was handed out, waiting for its `recordUsage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
  pub at: Millis,
  pub tokens: u64,
}

/// Whether an operator keeps the key in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
  #[default]
  Enabled,
  /// Out of service until enabled again.
  Disabled,
  /// Gone from the pool: listed nowhere and never handed out, but its position and its history
  /// stay (a call already under way may still report on it), and adding it again brings it back.
  Removed,
}

impl Admission {
  pub fn as_str(self) -> &'static str {
    match self {
      Admission::Enabled => "enabled",
      Admission::Disabled => "disabled",
      Admission::Removed => "removed",
    }
  }

  pub fn parse(text: &str) -> Option<Self> {
    match text {
      "enabled" => Some(Admission::Enabled),
      "disabled" => Some(Admission::Disabled),
      "removed" => Some(Admission::Removed),
      _ => None,
    }
  }
}

/// The states a key's status reports: its health's, or what an operator made it.
pub const STATE_LABELS: [&str; 7] = [
  HealthState::LABELS[0],
  HealthState::LABELS[1],
  HealthState::LABELS[2],
  HealthState::LABELS[3],
  HealthState::LABELS[4],
  "disabled",
  "removed",
];

/// Requests the router sent for callers that carried this key, as far as the callers' own
/// bookkeeping is concerned: reservations of hand-outs the router used, and answers the callers
/// will report again (each stays owed one reservation lifetime).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
  /// Of `pending`, the reservations routed requests in flight hold (their own, or the caller's
  /// hand-out they went with): the rest are open hand-outs a routed request may still use.
  pub in_flight: u32,
  /// When each answer not yet reported by its caller came.
  reports: VecDeque<Millis>,
  /// Of those, the 429s: the caller's `handleRateLimit` for them rests nothing.
  rate_limits: VecDeque<Millis>,
}

impl Routed {
  pub fn answered(&mut self, now: Millis, rate_limited: bool) {
    bounded_push(&mut self.reports, now);
    if rate_limited {
      bounded_push(&mut self.rate_limits, now);
    }
  }

  /// Takes one answer's report, when the caller owes one.
  pub fn take_report(&mut self, now: Millis, ttl: Millis) -> bool {
    take_live(&mut self.reports, now, ttl)
  }

  pub fn take_rate_limit(&mut self, now: Millis, ttl: Millis) -> bool {
    take_live(&mut self.rate_limits, now, ttl)
  }
}

fn bounded_push(queue: &mut VecDeque<Millis>, at: Millis) {
  if queue.len() == MAX_PENDING {
    queue.pop_front();
  }
  queue.push_back(at);
}

/// Pops the oldest stamp younger than `ttl`, dropping the older ones.
fn take_live(queue: &mut VecDeque<Millis>, now: Millis, ttl: Millis) -> bool {
  while let Some(&at) = queue.front() {
    queue.pop_front();
    if now - at < ttl {
      return true;
    }
  }
  false
}

/// Reservations kept per key at most; past that the oldest is taken as settled. Only callers that
/// never report usage get there.
const MAX_PENDING: usize = 4_096;

#[derive(Debug, Clone)]
pub struct KeyState {
  pub key: String,
  pub quota: Quota,
  pub last_used: Millis,
  pub rpm: RollingWindow,
  pub rpd: DailyWindow,
  pub tpm: RollingWindow,
  pub health: Health,
  /// The window a rest was for, when the upstream said which.
  pub rested_for: Option<LimitType>,
  /// Failures in a row, of any kind (the old service's `errorCount`).
  pub error_count: u32,
  pub last_error: Option<String>,
  pub last_error_time: Option<Millis>,
  /// Bumped whenever `last_error` changes, so a reader can tell a new error from the old one
  /// without copying the message out on every call.
  pub error_seq: u32,
  pub pending: VecDeque<Reservation>,
  /// What this process may hand out of the key's quota shared with other processes; `None` when
  /// it does not share (boxed: most pools do not, and a key's hot fields stay close together).
  pub shared: Option<Box<SharedBudget>>,
  pub admission: Admission,
  /// When an operator last added, removed, disabled or enabled it (0: never): of two changes to
  /// one key made in different processes, the later wins.
  pub admitted_at: Millis,
  /// Added at run time rather than configured: other processes can only learn it from the store.
  pub added: bool,
  pub routed: Routed,
}

/// One window as callers see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitFigures {
  pub current: u64,
  pub limit: u64,
  /// When capacity next frees: the oldest counted request leaves a rolling window, or the daily
  /// count resets.
  pub reset_time: Millis,
}

/// Everything about a key but its name and error message: `Copy`, so the hot path can hand it out
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyFigures {
  /// In service: neither refused by the upstream nor taken out by an operator.
  pub active: bool,
  pub state: HealthState,
  pub admission: Admission,
  pub last_used: Millis,
  pub rpm: LimitFigures,
  pub rpd: LimitFigures,
  pub tpm: LimitFigures,
  pub error_count: u32,
  pub last_error_time: Option<Millis>,
  pub error_seq: u32,
}

impl KeyFigures {
  /// Position of the key's state in [`STATE_LABELS`].
  pub fn state_code(&self) -> usize {
    match self.admission {
      Admission::Enabled => self.state.code(),
      Admission::Disabled => 5,
      Admission::Removed => 6,
    }
  }

  pub fn state_label(&self) -> &'static str {
    STATE_LABELS[self.state_code()]
  }

  /// Until when a resting or open key is kept out; a disabled or removed one is out until an
  /// operator says otherwise, not until a time.
  pub fn state_until(&self) -> Option<Millis> {
    self
      .state
      .until()
      .filter(|_| self.admission == Admission::Enabled)
  }
}

/// A key's full status (the SPEC's `ApiKeyStatus`), key unmasked: mask it before it leaves the process.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
  pub api_key: String,
  pub figures: KeyFigures,
  pub last_error: Option<String>,
}

/// The SPEC's `RateLimitInfo`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitInfo {
  pub limit_type: LimitType,
  pub current: u64,
  pub limit: u64,
  pub reset_time: Millis,
  pub is_limited: bool,
}

impl KeyState {
  pub fn new(key: String, quota: Quota, policy: &WindowPolicy, now: Millis) -> Self {
    Self {
      key,
      quota,
      last_used: now,
      rpm: RollingWindow::new(policy.span_ms, now),
      rpd: DailyWindow::new(policy.daily_reset, now),
      tpm: RollingWindow::new(policy.span_ms, now),
      health: Health::default(),
      rested_for: None,
      error_count: 0,
      last_error: None,
      last_error_time: None,
      error_seq: 0,
      pending: VecDeque::new(),
      shared: None,
      admission: Admission::Enabled,
      admitted_at: 0,
      added: false,
      routed: Routed::default(),
    }
  }

  /// An operator's change, unless a later one is already in force.
  pub fn admit(&mut self, admission: Admission, at: Millis) -> bool {
    if at < self.admitted_at {
      return false;
    }
    self.admitted_at = at;
    let changed = self.admission != admission;
    self.admission = admission;
    if admission != Admission::Enabled {
      // Its reservations will never be settled by a caller that may still hold it; they expire.
      self.health.trial_lost(at);
    }
    changed
  }

  /// In service as far as the operator and the upstream are concerned.
  pub fn in_service(&self, now: Millis) -> bool {
    self.admission == Admission::Enabled && self.health.can_serve(now)
  }

  pub fn limit(&self, limit_type: LimitType) -> u64 {
    match limit_type {
      LimitType::Rpm => self.quota.rpm,
      LimitType::Rpd => self.quota.rpd,
      LimitType::Tpm => self.quota.tpm,
    }
  }

  pub fn current(&self, limit_type: LimitType, now: Millis) -> u64 {
    match limit_type {
      LimitType::Rpm => self.rpm.current(now),
      LimitType::Rpd => self.rpd.current(now),
      LimitType::Tpm => self.tpm.current(now),
    }
  }

  pub fn frees_at(&self, limit_type: LimitType, now: Millis) -> Millis {
    match limit_type {
      LimitType::Rpm => self.rpm.frees_at(now),
      LimitType::Rpd => self.rpd.frees_at(now),
      LimitType::Tpm => self.tpm.frees_at(now),
    }
  }

  /// Room for one more request of `estimated_tokens` in every window.
  pub fn has_room(&self, now: Millis, estimated_tokens: u64) -> bool {
    self.rpm.current(now) < self.quota.rpm
      && self.rpd.current(now) < self.quota.rpd
      && self.tpm.current(now).saturating_add(estimated_tokens) <= self.quota.tpm
      && self.tpm.current(now) < self.quota.tpm
      && self
        .shared
        .as_ref()
        .is_none_or(|s| s.can_serve(now, self.rpm.current(now)))
  }

  /// Counts a request when its key is handed out, so concurrent callers see it at once. Returns
  /// true when a shared lease ran low and should be topped up.
  pub fn reserve(&mut self, now: Millis, estimated_tokens: u64) -> bool {
    self.rpm.add(now, 1);
    self.rpd.add(now, 1);
    self.tpm.add(now, estimated_tokens);
    if self.pending.len() == MAX_PENDING {
      self.pending.pop_front();
    }
    self.pending.push_back(Reservation {
      at: now,
      tokens: estimated_tokens,
    });
    self.health.on_hand_out(now);
    self.last_used = now;
    self.shared.as_mut().is_some_and(|s| s.serve(now))
  }

  /// Counts a finished request: it settles the oldest reservation (its token estimate replaced by
  /// the real count, the request staying counted whatever its outcome, since it went out) and
  /// counts it from `sent_at`: when the router sent it; for a caller's report, which does not say
  /// when, `now` (the upstream counted it somewhere between hand-out and now). A call on a key we
  /// did not hand out counts as the old service counted it: only when it succeeded.
  pub fn settle(&mut self, now: Millis, sent_at: Millis, tokens: u64, succeeded: bool) {
    match self.pending.pop_front() {
      Some(r) => {
        self.rpm.remove(now, r.at, 1);
        self.rpm.add_at(now, sent_at, 1);
        self.tpm.remove(now, r.at, r.tokens);
        self.tpm.add_at(now, sent_at, tokens);
      }
      None if succeeded => {
        self.rpm.add_at(now, sent_at, 1);
        self.rpd.add(now, 1);
        self.tpm.add_at(now, sent_at, tokens);
      }
      None => {}
    }
  }

  /// The oldest reservation, made at a hand-out, moved to `now`: the request it was for goes out
  /// now, and must stay counted until a span after that, however long ago the hand-out was.
  pub fn restamp_reservation(&mut self, now: Millis) {
    if let Some(r) = self.pending.pop_front() {
      self.rpm.remove(now, r.at, 1);
      self.rpm.add(now, 1);
      self.tpm.remove(now, r.at, r.tokens);
      self.tpm.add(now, r.tokens);
      self.pending.push_back(Reservation { at: now, ..r });
    }
  }

  /// Releases reservations older than `ttl`: requests never reported are taken as never made.
  /// Returns whether any was released.
  pub fn expire_reservations(&mut self, now: Millis, ttl: Millis) -> bool {
    let before = self.pending.len();
    while let Some(r) = self.pending.front().copied() {
      if now - r.at < ttl {
        break;
      }
      self.pending.pop_front();
      self.rpm.remove(now, r.at, 1);
      self.rpd.remove(now, r.at, 1);
      self.tpm.remove(now, r.at, r.tokens);
    }
    let expired = self.pending.len() != before;
    if expired {
      self.health.trial_lost(now);
    }
    expired
  }

  /// Fresh windows (resetAllLimits); outstanding reservations go with them.
  pub fn clear_windows(&mut self, now: Millis) {
    self.rpm.clear(now);
    self.rpd.clear(now);
    self.tpm.clear(now);
    self.pending.clear();
    self.health.trial_lost(now);
  }

  pub fn record_error(&mut self, error: String, now: Millis) {
    self.error_count = self.error_count.saturating_add(1);
    self.last_error = Some(error);
    self.last_error_time = Some(now);
    self.error_seq = self.error_seq.wrapping_add(1);
  }

  pub fn clear_error(&mut self) {
    self.error_count = 0;
    if self.last_error.take().is_some() {
      self.error_seq = self.error_seq.wrapping_add(1);
    }
  }

  fn limit_figures(&self, limit_type: LimitType, now: Millis) -> LimitFigures {
    LimitFigures {
      current: self.current(limit_type, now),
      limit: self.limit(limit_type),
      reset_time: self.frees_at(limit_type, now),
    }
  }

  pub fn figures(&self, now: Millis) -> KeyFigures {
    KeyFigures {
      active: !self.health.is_deactivated() && self.admission == Admission::Enabled,
      state: self.health.state(now),
      admission: self.admission,
      last_used: self.last_used,
      rpm: self.limit_figures(LimitType::Rpm, now),
      rpd: self.limit_figures(LimitType::Rpd, now),
      tpm: self.limit_figures(LimitType::Tpm, now),
      error_count: self.error_count,
      last_error_time: self.last_error_time,
      error_seq: self.error_seq,
    }
  }

  pub fn status(&self, now: Millis) -> KeyStatus {
    KeyStatus {
      api_key: self.key.clone(),
      figures: self.figures(now),
      last_error: self.last_error.clone(),
    }
  }

  /// The key's state as stored (SPEC section 3's `ApiKeyStatus`). A rolling window's `resetTime`
  /// is when all of its count has left it, so a reader that drops the count after that time (the
  /// old service did) never drops a request still counted.
  pub fn to_record(&self, now: Millis) -> KeyRecord {
    let rolling = |w: &RollingWindow, limit| WindowRecord {
      current: w.current(now),
      limit,
      reset_time: w.clears_at(now),
    };
    KeyRecord {
      api_key: self.key.clone(),
      is_active: !self.health.is_deactivated() && self.admission == Admission::Enabled,
      last_used: self.last_used,
      rpm: rolling(&self.rpm, self.quota.rpm),
      rpd: WindowRecord {
        current: self.rpd.current(now),
        limit: self.quota.rpd,
        reset_time: self.rpd.frees_at(now),
      },
      tpm: rolling(&self.tpm, self.quota.tpm),
      error_count: self.error_count,
      last_error: self.last_error.clone(),
      last_error_time: self.last_error_time,
    }
  }

  /// Merges a stored record into this key. Counters of windows still open in the record (reset
  /// time ahead of `now`) become the larger of the two, never less than either side counted; the
  /// difference is counted at `now`, so a rolling window keeps it a whole span, at worst longer
  /// than the upstream does. The record's limits are not taken: configuration decides them.
  /// `lastUsed`, health and error fields are taken from the record unless `local_wins` (this key
  /// changed here since it was last stored, so its own are newer; `lastUsed` is then the later).
  pub fn merge_record(&mut self, record: &KeyRecord, now: Millis, local_wins: bool) {
    let missing = |w: WindowRecord, local: u64| {
      if w.reset_time > now {
        w.current.saturating_sub(local)
      } else {
        0
      }
    };
    let rpm = missing(record.rpm, self.rpm.current(now));
    let rpd = missing(record.rpd, self.rpd.current(now));
    let tpm = missing(record.tpm, self.tpm.current(now));
    self.rpm.add(now, rpm);
    self.rpd.add(now, rpd);
    self.tpm.add(now, tpm);
    if local_wins {
      self.last_used = self.last_used.max(record.last_used);
      return;
    }
    self.last_used = record.last_used;
    // A key an operator took out is stored as inactive too; only an enabled one's `isActive:
    // false` says the upstream refused it.
    let refused = !record.is_active && self.admission == Admission::Enabled;
    match (refused, self.health.is_deactivated()) {
      (true, false) => {
        self.health.on_key_rejected();
      }
      (false, true) => self.health.reactivate(),
      _ => {}
    }
    self.error_count = record.error_count;
    if self.last_error != record.last_error {
      self.last_error = record.last_error.clone();
      self.error_seq = self.error_seq.wrapping_add(1);
    }
    self.last_error_time = record.last_error_time;
  }

  /// A window is limited when it is full, or when the upstream rate-limited it and the key is
  /// still resting.
  pub fn rate_limit_info(&self, now: Millis) -> [RateLimitInfo; 3] {
    let resting = matches!(self.health.state(now), HealthState::Resting { .. });
    LimitType::ALL.map(|t| {
      let current = self.current(t, now);
      let limit = self.limit(t);
      let rested = resting && self.rested_for.is_none_or(|r| r == t);
      RateLimitInfo {
        limit_type: t,
        current,
        limit,
        reset_time: match self.health.state(now) {
          HealthState::Resting { until } if rested => until,
          _ => self.frees_at(t, now),
        },
        is_limited: current >= limit || rested,
      }
    })
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::window::MINUTE_MS;

  const T0: Millis = 1_800_000_000_000;

  fn key() -> KeyState {
    KeyState::new("k".into(), Quota::default(), &WindowPolicy::default(), T0)
  }

  #[test]
  fn a_new_key_is_active_with_empty_windows() {
    let k = key();
    let f = k.figures(T0);
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
    let mut k = key();
    k.reserve(T0, 500);
    assert_eq!((k.rpm.current(T0), k.tpm.current(T0)), (1, 500));
    k.settle(T0 + 100, T0 + 100, 320, true);
    assert_eq!(
      (
        k.rpm.current(T0 + 100),
        k.rpd.current(T0 + 100),
        k.tpm.current(T0 + 100)
      ),
      (1, 1, 320)
    );
    // Usage for a request we did not hand out counts anew, when it succeeded.
    k.settle(T0 + 200, T0 + 200, 10, true);
    assert_eq!((k.rpm.current(T0 + 200), k.tpm.current(T0 + 200)), (2, 330));
    k.settle(T0 + 300, T0 + 300, 10, false);
    assert_eq!((k.rpm.current(T0 + 300), k.tpm.current(T0 + 300)), (2, 330));
    // A reserved request that failed stays counted: it went out.
    k.reserve(T0 + 400, 0);
    k.settle(T0 + 500, T0 + 500, 0, false);
    assert_eq!(k.rpm.current(T0 + 500), 3);
  }

  #[test]
  fn unsettled_reservations_expire_and_give_their_room_back() {
    let mut k = key();
    k.reserve(T0, 100);
    k.expire_reservations(T0 + 59_999, MINUTE_MS);
    assert_eq!(k.pending.len(), 1);
    k.expire_reservations(T0 + MINUTE_MS, MINUTE_MS);
    assert!(k.pending.is_empty());
    assert_eq!(k.rpd.current(T0 + MINUTE_MS), 0);
    // A late report then counts as a request of its own.
    k.settle(T0 + MINUTE_MS, T0 + MINUTE_MS, 50, true);
    assert_eq!(k.rpd.current(T0 + MINUTE_MS), 1);
  }

  fn counted(k: &KeyState, now: Millis) -> (u64, u64, u64) {
    (k.rpm.current(now), k.rpd.current(now), k.tpm.current(now))
  }

  #[test]
  fn a_record_round_trips_through_a_fresh_key() {
    let mut k = key();
    k.reserve(T0, 0);
    k.settle(T0 + 100, T0 + 100, 700, true);
    k.record_error("503".into(), T0 + 200);
    k.health.on_key_rejected();
    let record = k.to_record(T0 + 300);
    assert_eq!(
      (record.rpm.current, record.rpd.current, record.tpm.current),
      (1, 1, 700)
    );
    // Settled at 100 ms, sent then: counted from then.
    assert_eq!(
      record.rpm.reset_time,
      crate::window::counted_until(MINUTE_MS, T0 + 100)
    );
    assert!(!record.is_active);
    let mut restarted = key();
    restarted.merge_record(&record, T0 + 1_000, false);
    assert_eq!(counted(&restarted, T0 + 1_000), (1, 1, 700));
    // Counted again at the merge: conservatively a whole span from then.
    assert_eq!(restarted.rpm.current(T0 + 1_000 + MINUTE_MS), 1);
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
    assert_eq!(restarted.to_record(T0 + 1_000).rpd, record.rpd);
  }

  #[test]
  fn merging_keeps_the_larger_count_of_open_windows_and_ignores_closed_ones() {
    let mut k = key();
    k.settle(T0, T0, 50, true);
    k.settle(T0, T0, 50, true);
    let open = |current| WindowRecord {
      current,
      limit: 30,
      reset_time: T0 + 30_000,
    };
    let mut record = k.to_record(T0);
    record.rpm = open(1);
    record.rpd = open(5);
    record.tpm = WindowRecord {
      current: 900,
      limit: 1_000_000,
      reset_time: T0 - 1,
    };
    record.error_count = 4;
    k.record_error("local".into(), T0);
    k.merge_record(&record, T0, true);
    assert_eq!(counted(&k, T0), (2, 5, 100));
    // The local error is newer than the record's.
    assert_eq!((k.error_count, k.last_error.as_deref()), (1, Some("local")));
    k.merge_record(&record, T0, false);
    assert_eq!(counted(&k, T0), (2, 5, 100));
    assert_eq!((k.error_count, k.last_error.as_deref()), (4, None));
  }

  #[test]
  fn room_accounts_for_the_token_estimate() {
    let mut k = KeyState::new(
      "k".into(),
      Quota {
        rpm: 10,
        rpd: 10,
        tpm: 1_000,
      },
      &WindowPolicy::default(),
      T0,
    );
    k.reserve(T0, 900);
    assert!(k.has_room(T0, 100));
    assert!(!k.has_room(T0, 101));
    assert!(k.has_room(T0, 0));
  }

  #[test]
  fn rate_limit_info_flags_full_and_rested_windows() {
    let mut k = KeyState::new(
      "k".into(),
      Quota {
        rpm: 2,
        rpd: 10,
        tpm: 1_000,
      },
      &WindowPolicy::default(),
      T0,
    );
    k.reserve(T0, 0);
    k.reserve(T0, 0);
    let info = k.rate_limit_info(T0);
    assert!(info[0].is_limited && !info[1].is_limited && !info[2].is_limited);
    assert_eq!(
      info[0].reset_time,
      crate::window::counted_until(MINUTE_MS, T0)
    );
    k.health.on_rate_limited(T0, T0 + 5_000);
    k.rested_for = Some(LimitType::Tpm);
    let info = k.rate_limit_info(T0);
    assert!(info[2].is_limited);
    assert_eq!(info[2].reset_time, T0 + 5_000);
  }
}
