//! One API key's state: its project, health, errors and outstanding reservations (its quota is its
//! project's: see `budget`), and the read-only views of it that callers get (figures for the hot
//! path, a full status for listings).

use std::collections::VecDeque;

pub use crate::core::budget::LimitFigures;
use crate::core::budget::{Budget, BudgetId, BudgetView, Budgets, ProjectId, Rest};
use crate::core::clock::Millis;
use crate::core::health::{Health, HealthState};
use crate::core::models::ModelId;
use crate::core::quota::LimitType;
use crate::core::snapshot::{KeyRecord, WindowRecord};

/// A request counted on a budget when its key was handed out, waiting for its `recordUsage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
  pub at: Millis,
  pub tokens: u64,
  pub budget: BudgetId,
}

/// What settling a reported call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
  /// The budget the call counted on.
  pub budget: BudgetId,
  /// When its hand-out was, if the call had one.
  pub handed_at: Option<Millis>,
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
pub const STATE_LABELS: [&str; 8] = [
  HealthState::LABELS[0],
  HealthState::LABELS[1],
  HealthState::LABELS[2],
  HealthState::LABELS[3],
  HealthState::LABELS[4],
  HealthState::LABELS[5],
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
  /// The project whose budgets it draws on.
  pub project: ProjectId,
  /// Its project was named in the configuration (Gemini's errors then never move it).
  pub project_configured: bool,
  /// Gemini named another project than the configured one, and the log said so.
  pub project_noted: bool,
  pub last_used: Millis,
  pub health: Health,
  /// Failures in a row, of any kind (the old service's `errorCount`).
  pub error_count: u32,
  pub last_error: Option<String>,
  pub last_error_time: Option<Millis>,
  /// Bumped whenever `last_error` changes, so a reader can tell a new error from the old one
  /// without copying the message out on every call.
  pub error_seq: u32,
  pub pending: VecDeque<Reservation>,
  pub admission: Admission,
  /// When an operator last added, removed, disabled or enabled it (0: never): of two changes to
  /// one key made in different processes, the later wins.
  pub admitted_at: Millis,
  /// Added at run time rather than configured: other processes can only learn it from the store.
  pub added: bool,
  pub routed: Routed,
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
      Admission::Disabled => 6,
      Admission::Removed => 7,
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
  /// Its windows those of the default model.
  pub figures: KeyFigures,
  pub last_error: Option<String>,
  /// Its project's name; `None` when not known (a project of its own).
  pub project: Option<String>,
  /// Its project's budget of every model met.
  pub budgets: Vec<BudgetView>,
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
  pub fn new(key: String, project: ProjectId, now: Millis) -> Self {
    Self {
      key,
      project,
      project_configured: false,
      project_noted: false,
      last_used: now,
      health: Health::default(),
      error_count: 0,
      last_error: None,
      last_error_time: None,
      error_seq: 0,
      pending: VecDeque::new(),
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

  /// In service as far as the operator and the upstream are concerned (its budgets aside).
  pub fn in_service(&self, now: Millis) -> bool {
    self.admission == Admission::Enabled && self.health.can_serve(now)
  }

  pub fn is_active(&self) -> bool {
    !self.health.is_deactivated() && self.admission == Admission::Enabled
  }

  /// Counts a request handed out now on `budget`. Returns true when a shared lease ran low and
  /// should be topped up.
  pub fn reserve(
    &mut self,
    budgets: &mut Budgets,
    budget: BudgetId,
    now: Millis,
    estimated_tokens: u64,
  ) -> bool {
    if self.pending.len() == MAX_PENDING {
      // Taken as settled: the request stays counted.
      self.pending.pop_front();
    }
    self.pending.push_back(Reservation {
      at: now,
      tokens: estimated_tokens,
      budget,
    });
    self.health.on_hand_out(now);
    self.last_used = now;
    budgets.get_mut(budget).reserve(now, estimated_tokens)
  }

  /// Counts a finished request on `model` (`None`: whatever model its hand-out was for): it
  /// settles the oldest open hand-out of that model (its token estimate replaced by the real
  /// count, the request staying counted whatever its outcome, since it went out) and counts it
  /// from `sent_at` (when the router sent it, or when a caller's report makes it likely Gemini
  /// counted it), never before its hand-out nor after `now`. A call without a
  /// hand-out counts as the old service counted it: only when it succeeded, on the project's
  /// budget of `model` (`fallback`, the default model, when none is named).
  #[allow(clippy::too_many_arguments)]
  pub fn settle(
    &mut self,
    budgets: &mut Budgets,
    model: Option<ModelId>,
    fallback: ModelId,
    now: Millis,
    sent_at: Millis,
    tokens: u64,
    succeeded: bool,
  ) -> Settled {
    let found = match model {
      None => (!self.pending.is_empty()).then_some(0),
      Some(m) => self
        .pending
        .iter()
        .position(|r| budgets.get(r.budget).model == m),
    };
    if let Some(r) = found.and_then(|i| self.pending.remove(i)) {
      budgets
        .get_mut(r.budget)
        .restamp(now, r.at, r.tokens, sent_at.clamp(r.at, now), tokens);
      return Settled {
        budget: r.budget,
        handed_at: Some(r.at),
      };
    }
    let budget = budgets.of(self.project, model.unwrap_or(fallback));
    if succeeded {
      budgets.get_mut(budget).count(now, sent_at, tokens);
    }
    Settled {
      budget,
      handed_at: None,
    }
  }

  /// The oldest reservation, made at a hand-out, taken by a request going out now on `target`'s
  /// budget: it counts there from now (however long ago the hand-out was, and whatever model it
  /// was for). Returns the budget it came from.
  pub fn adopt_reservation(
    &mut self,
    budgets: &mut Budgets,
    target: BudgetId,
    now: Millis,
  ) -> Option<BudgetId> {
    let r = self.pending.pop_front()?;
    budgets.get_mut(r.budget).release(now, r.at, r.tokens);
    budgets.get_mut(target).reserve(now, r.tokens);
    self.pending.push_back(Reservation {
      at: now,
      tokens: r.tokens,
      budget: target,
    });
    Some(r.budget)
  }

  /// Releases reservations older than `ttl`: requests never reported are taken as never made.
  /// Returns the budgets given room back (empty when none expired).
  pub fn expire_reservations(
    &mut self,
    budgets: &mut Budgets,
    now: Millis,
    ttl: Millis,
  ) -> Vec<BudgetId> {
    let mut released = Vec::new();
    while let Some(r) = self.pending.front().copied() {
      if now - r.at < ttl {
        break;
      }
      self.pending.pop_front();
      budgets.get_mut(r.budget).release(now, r.at, r.tokens);
      released.push(r.budget);
    }
    if !released.is_empty() {
      self.health.trial_lost(now);
    }
    released
  }

  /// Reservations forgotten with the windows (resetAllLimits).
  pub fn forget_reservations(&mut self, now: Millis) {
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

  /// The key's state as callers see it: its own health, or resting while its budget (of the
  /// default model, which its status shows) rests.
  fn state(&self, budget: &Budget, now: Millis) -> HealthState {
    match (self.health.state(now), budget.rest(now)) {
      (HealthState::Active, Rest::Until { until, .. }) => HealthState::Resting { until },
      (HealthState::Active, Rest::NoQuota) => HealthState::NoQuota,
      (state, _) => state,
    }
  }

  /// The key's figures, its windows those of `budget` (its project's for the default model).
  pub fn figures(&self, budget: &Budget, now: Millis) -> KeyFigures {
    let b = budget.figures(now);
    KeyFigures {
      active: self.is_active(),
      state: self.state(budget, now),
      admission: self.admission,
      last_used: self.last_used,
      rpm: b.rpm,
      rpd: b.rpd,
      tpm: b.tpm,
      error_count: self.error_count,
      last_error_time: self.last_error_time,
      error_seq: self.error_seq,
    }
  }

  /// The key's state as stored (SPEC section 3's `ApiKeyStatus`), its windows those of `budget`.
  /// A rolling window's `resetTime` is when all of its count has left it, so a reader that drops
  /// the count after that time (the old service did) never drops a request still counted.
  pub fn to_record(&self, budget: &Budget, now: Millis) -> KeyRecord {
    let [rpm, rpd, tpm] = stored_windows(budget, now);
    KeyRecord {
      api_key: self.key.clone(),
      is_active: self.is_active(),
      last_used: self.last_used,
      rpm,
      rpd,
      tpm,
      error_count: self.error_count,
      last_error: self.last_error.clone(),
      last_error_time: self.last_error_time,
    }
  }

  /// Merges a stored record into this key and `budget` (its project's for the default model,
  /// whose windows the record holds; see [`merge_windows`]). `lastUsed`, health and error fields
  /// are taken from the record unless `local_wins` (this key changed here since it was last
  /// stored, so its own are newer; `lastUsed` is then the later).
  pub fn merge_record(
    &mut self,
    record: &KeyRecord,
    budget: &mut Budget,
    now: Millis,
    local_wins: bool,
  ) {
    merge_windows(budget, [record.rpm, record.rpd, record.tpm], now);
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
}

/// `budget`'s windows (RPM, RPD, TPM) as stored. A rolling window's `resetTime` is when all of its
/// count has left it (see [`KeyState::to_record`]); the day's is the daily reset.
pub fn stored_windows(budget: &Budget, now: Millis) -> [WindowRecord; 3] {
  [
    WindowRecord {
      current: budget.rpm.current(now),
      limit: budget.quota.rpm,
      reset_time: budget.rpm.clears_at(now),
    },
    WindowRecord {
      current: budget.rpd.current(now),
      limit: budget.quota.rpd,
      reset_time: budget.rpd.frees_at(now),
    },
    WindowRecord {
      current: budget.tpm.current(now),
      limit: budget.quota.tpm,
      reset_time: budget.tpm.clears_at(now),
    },
  ]
}

/// Stored windows (RPM, RPD, TPM) merged into `budget`. Counters of windows still open in the
/// record (reset time ahead of `now`) become the larger of the two, never less than either side
/// counted; the difference is counted at `now`, so a rolling window keeps it a whole span, at worst
/// longer than the upstream does. The record's limits are not taken: configuration decides them.
pub fn merge_windows(budget: &mut Budget, [rpm, rpd, tpm]: [WindowRecord; 3], now: Millis) {
  let missing = |w: WindowRecord, local: u64| {
    if w.reset_time > now {
      w.current.saturating_sub(local)
    } else {
      0
    }
  };
  let (m, d, t) = (
    missing(rpm, budget.rpm.current(now)),
    missing(rpd, budget.rpd.current(now)),
    missing(tpm, budget.tpm.current(now)),
  );
  budget.rpm.add(now, m);
  budget.rpd.add(now, d);
  budget.tpm.add(now, t);
}

/// A window is limited when it is full, or when the upstream rate-limited it and the budget is
/// still resting (SPEC's `RateLimitInfo`, for one budget).
pub fn rate_limit_info(budget: &Budget, now: Millis) -> [RateLimitInfo; 3] {
  let rest = budget.rest(now);
  LimitType::ALL.map(|t| {
    let current = budget.current(t, now);
    let limit = budget.limit(t);
    let rested_until = match rest {
      Rest::Until { until, limit } if limit.is_none_or(|l| l == t) => Some(until),
      _ => None,
    };
    RateLimitInfo {
      limit_type: t,
      current,
      limit,
      reset_time: rested_until.unwrap_or_else(|| budget.frees_at(t, now)),
      is_limited: current >= limit || rested_until.is_some() || rest == Rest::NoQuota,
    }
  })
}

#[cfg(test)]
mod tests;
