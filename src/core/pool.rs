//! The key pool: every key's state, every (project, model) budget and every model's health behind
//! one short lock, and the operations of the old service's API applied to them atomically. Nothing
//! here allocates on the selection and usage paths (a failure's message aside), blocks on I/O, or
//! prints while the lock is held. What changed is tracked for the write-behind layer
//! (`persistence`): a flag per changed key and budget and a queue of recorded calls, all O(1) to
//! add to.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::core::budget::{BudgetId, BudgetView, Budgets, Exhausted, ProjectId, ProjectName, Rest};
use crate::core::clock::{Clock, Millis, DAY_MS};
use crate::core::config::{js_number, project_name, KeySpec, PoolConfig};
use crate::core::error::PoolError;
use crate::core::failure::{classify, consumer_project, Failure, QuotaScope, RateLimit};
use crate::core::health::{HealthChange, HealthState};
use crate::core::key::{
  merge_windows, rate_limit_info, stored_windows, Admission, KeyFigures, KeyState, KeyStatus,
  RateLimitInfo,
};
use crate::core::models::{ModelId, Models, DEFAULT_MODEL_ID};
use crate::core::quota::{LimitType, WindowPolicy};
use crate::core::roster::{Namer, Names, Roster};
use crate::core::selection::{
  Candidates, Rotation, RotationReason, Selection, SelectionCache, SelectionMethod,
};
use crate::log::Log;
use crate::mask::{mask_key, scrub};
use crate::persistence::usage_queue::{UsageEntry, UsageLog};
use crate::sharing::share::{Answer, LeaseNeed, Occurrence, SharedWindow};
use crate::stats::counters::Counters;
use crate::stats::metrics::{BudgetMetrics, KeyMetrics, MetricsSnapshot};
use crate::stats::recent_calls::{Call, CallLog, DEFAULT_CALL_LOG_CAPACITY};
use crate::stats::usage_stats::DateRange;
use crate::store::{AdmissionRecord, BudgetRecord, KeyRecord, RestRecord, UsageIds, UsageRecord};

/// Longest rest a retry delay can impose: a day, the longest window there is.
const MAX_REST_MS: Millis = DAY_MS;
/// Longest error message kept, in characters (after masking, so no key is cut in half unmasked).
const MAX_ERROR_CHARS: usize = 4_096;

/// Largest token count one call may report: far above any model's context, and exact in a JS number.
pub const MAX_TOKENS_PER_CALL: u64 = u32::MAX as u64;

/// Who reports a call: its caller (`recordUsage`), or the router that sent it at `sent_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reporter {
  Caller,
  Router { sent_at: Millis },
}

/// The key a routed request goes out with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteKey {
  pub index: usize,
  pub model: ModelId,
  /// When it was chosen, just before the request goes out: the request counts from then.
  pub at: Millis,
}

/// What a call did, as reported to `record_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
  Success,
  Failure(&'a str),
}

/// What handing a key out does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
  /// The caller will make a request with it: count the request now, with this many tokens
  /// estimated on TPM, until `record_usage` settles it.
  Reserve { estimated_tokens: u64 },
  /// Only show which key it would be (`GET /best`): the round-robin moves on, no quota is spent.
  LookOnly,
}

impl Claim {
  fn estimated_tokens(self) -> u64 {
    match self {
      Claim::Reserve { estimated_tokens } => estimated_tokens,
      Claim::LookOnly => 0,
    }
  }
}

/// A selection together with the chosen key's figures, read under the same lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Picked<T> {
  pub pick: T,
  pub figures: KeyFigures,
}

/// Something to log once the lock is released.
enum Note {
  Warn(String),
  Info(String),
}

struct PoolState {
  keys: Vec<KeyState>,
  budgets: Budgets,
  models: Models,
  /// One selection cache per model, by model id.
  caches: Vec<SelectionCache>,
  last_rotation: Millis,
  /// The latest time any operation ran at.
  last_now: Millis,
  closed: bool,
  /// Per key: changed since last exported. `dirty_keys` lists the flagged positions, so marking is
  /// O(1) and exporting is O(changed keys) however large the pool.
  dirty: Vec<bool>,
  dirty_keys: Vec<usize>,
  /// Per budget, likewise.
  dirty_budget: Vec<bool>,
  dirty_budgets: Vec<BudgetId>,
  /// Keys an operator added, removed, disabled or enabled here since last exported: other
  /// processes learn of it from the store.
  admission_changed: Vec<usize>,
  /// Recorded calls waiting to be stored; `None` while nothing stores them.
  usage: Option<UsageLog>,
  /// Wakes the leasing task when a shared lease runs low; `None` while the quota is not shared.
  lease_wake: Option<Arc<Notify>>,
  /// The recent calls, for usage statistics without a database.
  calls: CallLog,
  counters: Counters,
}

impl PoolState {
  /// A model met just now (its id one past the last with budgets) gets a budget in every project
  /// and a selection cache.
  fn give_budgets_to_new_model(&mut self, id: ModelId, now: Millis) {
    if id == self.caches.len() {
      let quota = self.models.get(id).quota;
      self.budgets.add_model(id, quota, now);
      self.caches.push(SelectionCache::default());
    }
  }

  /// Notes that key `index` changed, for the next export.
  fn touch(&mut self, index: usize) {
    if !self.dirty[index] {
      self.dirty[index] = true;
      self.dirty_keys.push(index);
    }
  }

  fn touch_all(&mut self) {
    for index in 0..self.keys.len() {
      self.touch(index);
    }
    for b in 0..self.budgets.len() {
      self.touch_budget(b);
    }
  }

  /// How budget `b` is named in the store, as its leases are: for a key of a project of its own
  /// and the default model the key itself (as the leases of one key have always been named),
  /// else the project (or the key) and the model.
  fn subject_of(&self, names: &Names, b: BudgetId) -> Option<String> {
    let budget = self.budgets.get(b);
    let model = &self.models.get(budget.model).name;
    match self.budgets.name(budget.project) {
      ProjectName::OwnOf(i) if budget.model == DEFAULT_MODEL_ID => names.get(*i).map(str::to_owned),
      ProjectName::OwnOf(i) => names.get(*i).map(|k| format!("{k}/{model}")),
      ProjectName::Named(p) => Some(format!("project:{p}/{model}")),
    }
  }

  /// Budget `b` as stored.
  fn budget_record(&self, names: &Names, b: BudgetId, now: Millis) -> Option<BudgetRecord> {
    let budget = self.budgets.get(b);
    let [rpm, rpd, tpm] = stored_windows(budget, now);
    Some(BudgetRecord {
      subject: self.subject_of(names, b)?,
      project: match self.budgets.name(budget.project) {
        ProjectName::Named(p) => Some(p.clone()),
        ProjectName::OwnOf(_) => None,
      },
      model: self.models.get(budget.model).name.clone(),
      rpm,
      rpd,
      tpm,
      rest: match budget.rest(now) {
        Rest::Clear => RestRecord::Clear,
        Rest::Until { until, limit } => RestRecord::Until {
          until,
          window: limit,
        },
        Rest::NoQuota => RestRecord::NoQuota,
      },
    })
  }

  /// What a selection for `model` chooses among, and that model's cache to choose with.
  fn selection(&mut self, model: ModelId) -> (Candidates<'_>, &mut SelectionCache) {
    let candidates = Candidates {
      keys: &self.keys,
      budgets: &self.budgets,
      model,
      overload: &self.models.get(model).overload,
    };
    (candidates, &mut self.caches[model])
  }

  fn touch_budget(&mut self, budget: BudgetId) {
    if self.dirty_budget.len() < self.budgets.len() {
      self.dirty_budget.resize(self.budgets.len(), false);
    }
    if !self.dirty_budget[budget] {
      self.dirty_budget[budget] = true;
      self.dirty_budgets.push(budget);
    }
  }

  fn invalidate_caches(&mut self) {
    for cache in &mut self.caches {
      cache.invalidate();
    }
  }

  /// Notes an operator's change to key `index`, for the store.
  fn admission_changed(&mut self, index: usize) {
    if !self.admission_changed.contains(&index) {
      self.admission_changed.push(index);
    }
    self.touch(index);
    self.invalidate_caches();
  }

  /// The project a key joins: the one named, or its own.
  fn project_for(&mut self, index: usize, project: Option<&str>, now: Millis) -> ProjectId {
    let name = match project {
      Some(p) => ProjectName::Named(p.to_owned()),
      None => ProjectName::OwnOf(index),
    };
    self.budgets.project(name, now)
  }

  /// A key new to the pool at the next position, counted from `now`.
  fn push_key(&mut self, key: &str, project: Option<&str>, now: Millis) -> usize {
    let index = self.keys.len();
    let project_id = self.project_for(index, project, now);
    let mut state = KeyState::new(key.to_owned(), project_id, now);
    state.project_configured = project.is_some();
    self.keys.push(state);
    self.dirty.push(false);
    self.touch(index);
    self.invalidate_caches();
    index
  }

  fn budget_of(&self, index: usize, model: ModelId) -> BudgetId {
    self.budgets.of(self.keys[index].project, model)
  }

  /// A key's figures as its status shows them: with its project's budget of the default model.
  fn figures(&self, index: usize, now: Millis) -> KeyFigures {
    let budget = self.budgets.get(self.budget_of(index, DEFAULT_MODEL_ID));
    self.keys[index].figures(budget, now)
  }

  /// Releases key `index`'s expired reservations; true when any expired.
  fn expire_key(&mut self, index: usize, now: Millis, ttl: Millis) -> bool {
    let released = self.keys[index].expire_reservations(&mut self.budgets, now, ttl);
    for &b in &released {
      let model = self.budgets.get(b).model;
      // An expired reservation may have been the model's probe.
      self.models.get_mut(model).overload.probe_lost(now);
      self.touch_budget(b);
    }
    if !released.is_empty() {
      self.touch(index);
    }
    !released.is_empty()
  }

  /// Applies `claim` to the key just chosen for `model`; returns its figures.
  fn claim(
    &mut self,
    index: usize,
    model: ModelId,
    claim: Claim,
    now: Millis,
    ttl: Millis,
  ) -> KeyFigures {
    if let Claim::Reserve { estimated_tokens } = claim {
      self.counters.handed_out += 1;
      self.expire_key(index, now, ttl);
      let budget = self.budget_of(index, model);
      if self.keys[index].reserve(&mut self.budgets, budget, now, estimated_tokens) {
        if let Some(wake) = &self.lease_wake {
          wake.notify_one();
        }
      }
      self.models.get_mut(model).overload.on_hand_out(now);
      self.touch(index);
      self.touch_budget(budget);
    }
    self.figures(index, now)
  }

  fn count_selection(&mut self, method: SelectionMethod) {
    match method {
      SelectionMethod::CachedRoundRobin => self.counters.cache_hits += 1,
      SelectionMethod::RoundRobin => self.counters.cache_misses += 1,
    }
  }

  /// Releases every key's expired reservations when `model`'s cache is about to be rebuilt, so
  /// that keys no one touches get their room back at least every cache lifetime.
  fn expire_before_rebuild(&mut self, model: ModelId, now: Millis, ttl: Millis) {
    if self.caches[model].is_stale(now) {
      for index in 0..self.keys.len() {
        self.expire_key(index, now, ttl);
      }
    }
  }

  /// A model the caller gave by id: one the pool has met.
  fn check_model(&self, model: ModelId) -> Result<(), PoolError> {
    if model < self.models.len() {
      Ok(())
    } else {
      Err(PoolError::InvalidModel(format!("no model has id {model}")))
    }
  }

  /// Gemini named key `index`'s project: a key whose project was not known joins it, its own
  /// counts (and reservations) moving with it; a key configured in another project stays (the
  /// configuration decides) and the mismatch is said once.
  fn learn_project(&mut self, index: usize, named: &str, now: Millis) -> Option<Note> {
    let name = project_name(named).ok()?;
    let current = self.keys[index].project;
    if *self.budgets.name(current) == ProjectName::Named(name.clone()) {
      return None;
    }
    if self.keys[index].project_configured {
      if self.keys[index].project_noted {
        return None;
      }
      self.keys[index].project_noted = true;
      return Some(Note::Warn(format!(
        "⚠️ Gemini says API key {{key}} is in project {name}, not in the project it was configured in: its quota is still counted with the configured project's"
      )));
    }
    let target = self.budgets.project(ProjectName::Named(name.clone()), now);
    if *self.budgets.name(current) == ProjectName::OwnOf(index) {
      for (from, into) in self.budgets.merge(current, target, now) {
        self.touch_budget(from);
        self.touch_budget(into);
      }
    }
    let budgets = &self.budgets;
    for r in &mut self.keys[index].pending {
      r.budget = budgets.of(target, budgets.get(r.budget).model);
    }
    self.keys[index].project = target;
    self.touch(index);
    self.invalidate_caches();
    Some(Note::Info(format!(
      "🔎 API key {{key}} is in project {name} (named in Gemini's error): its quota is counted with that project's from now on"
    )))
  }
}

pub struct KeyPool {
  state: Mutex<PoolState>,
  /// The keys by position, read without the pool's lock; keys are added to it under the lock.
  roster: Roster,
  policy: WindowPolicy,
  clock: Arc<dyn Clock>,
  log: Arc<dyn Log>,
  /// Issues the ids of recorded calls, for the pool's life: a batch resent after a failed write,
  /// even through a new connection, must carry the ids it had.
  usage_ids: UsageIds,
  /// Why keys cannot be added now, if they cannot (see [`Self::refuse_additions`]).
  additions_refused: Mutex<Option<String>>,
}

/// The in-memory log's calls in a range, for usage statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentCalls {
  pub calls: Vec<Call>,
  /// Calls of the range may be missing: the log has overwritten calls no older than its start.
  pub truncated: bool,
  /// How many calls the log keeps.
  pub capacity: usize,
}

/// Longest key accepted from an operator, in bytes: Gemini's are 39.
pub const MAX_KEY_BYTES: usize = 512;

/// Checks a key an operator gives: 1 to [`MAX_KEY_BYTES`] visible ASCII characters, without `,`
/// or `:` (they separate keys and projects in the environment's key lists).
pub fn check_key_text(key: &str) -> Result<(), PoolError> {
  let reason = if key.is_empty() {
    "it is empty"
  } else if key.len() > MAX_KEY_BYTES {
    "it is longer than 512 characters"
  } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
    "it may only hold visible ASCII characters, without spaces"
  } else if key.contains([',', ':']) {
    "it may not hold ',' or ':'"
  } else {
    return Ok(());
  };
  Err(PoolError::InvalidKey(reason))
}

/// A recorded call's latency as the caller reported it, in ms; anything but a non-negative finite
/// number (a missing one included) is stored as 0 rather than failing the call it describes.
/// When Gemini counted a call a caller reports, at the earliest that is safe to assume. Gemini
/// counts a request when it arrives: after the call started (`responseTime` before now) and, on a
/// pooled connection with a prompt-sized body, well within half a second of that; so a call that
/// took longer is counted from half a second after its start, a shorter one from its end.
/// Counted later than Gemini is safe, earlier is not (the count would leave the window before
/// Gemini's does). The router's own requests are counted from when their body was sent. A
/// hand-out's count never moves before the hand-out (see [`KeyState::settle`]).
fn caller_sent_at(now: Millis, response_time_ms: f64) -> Millis {
  const ARRIVAL_ALLOWANCE_MS: f64 = 500.0;
  let before_now = (response_time_ms.min(now as f64) - ARRIVAL_ALLOWANCE_MS).max(0.0);
  now - before_now as Millis
}

fn response_time(ms: f64) -> f64 {
  if ms.is_finite() && ms >= 0.0 {
    ms
  } else {
    0.0
  }
}

/// Whether `value`, in `0..2^53`, is whole: a cast there and back, where `fract` is a libm call
/// (`trunc`) on baseline x86-64.
pub fn is_integer(value: f64) -> bool {
  value as u64 as f64 == value
}

/// Checks a token count given as a JS number: a non-negative integer no larger than
/// [`MAX_TOKENS_PER_CALL`].
pub fn validate_tokens(tokens: f64) -> Result<u64, PoolError> {
  if tokens >= 0.0 && tokens <= MAX_TOKENS_PER_CALL as f64 && is_integer(tokens) {
    Ok(tokens as u64)
  } else {
    Err(PoolError::InvalidTokens {
      got: js_number(tokens),
      max: MAX_TOKENS_PER_CALL,
    })
  }
}

/// What a 429 said ran out, in the budget's terms.
fn exhausted(rate_limit: &RateLimit) -> Exhausted {
  if rate_limit.zero_quota {
    return Exhausted::NoQuota;
  }
  match rate_limit.scope {
    QuotaScope::PerDay => Exhausted::PerDay,
    QuotaScope::PerMinuteRequests => Exhausted::PerMinute(LimitType::Rpm),
    QuotaScope::PerMinuteTokens => Exhausted::PerMinute(LimitType::Tpm),
    QuotaScope::Unknown => Exhausted::Unexplained,
  }
}

/// The window a rest is for, as counted in metrics (RPM when the 429 did not say).
fn limit_of(exhausted: Exhausted) -> LimitType {
  match exhausted {
    Exhausted::PerDay => LimitType::Rpd,
    Exhausted::PerMinute(limit) => limit,
    Exhausted::NoQuota | Exhausted::Unexplained => LimitType::Rpm,
  }
}

fn seconds(ms: Millis) -> String {
  format!("{:.1}s", ms as f64 / 1_000.0)
}

/// What a rest did, for the log.
struct Rested {
  index: usize,
  limit: LimitType,
  rest: Rest,
  budget: BudgetId,
}

impl KeyPool {
  pub fn new(
    config: PoolConfig,
    clock: Arc<dyn Clock>,
    log: Arc<dyn Log>,
  ) -> Result<Self, PoolError> {
    if config.keys.is_empty() {
      return Err(PoolError::NoKeysConfigured);
    }
    for warning in &config.warnings {
      log.warn(warning);
    }
    let now = clock.now_ms();
    let n = config.keys.len();
    let mut state = PoolState {
      keys: Vec::with_capacity(n),
      budgets: Budgets::new(config.quota, config.policy),
      models: Models::new(config.models),
      caches: vec![SelectionCache::default()],
      last_rotation: now,
      last_now: now,
      closed: false,
      dirty: Vec::with_capacity(n),
      dirty_keys: Vec::with_capacity(n),
      dirty_budget: Vec::new(),
      dirty_budgets: Vec::new(),
      admission_changed: Vec::new(),
      usage: None,
      lease_wake: None,
      calls: CallLog::new(DEFAULT_CALL_LOG_CAPACITY),
      counters: Counters::default(),
    };
    for KeySpec { key, project } in &config.keys {
      state.push_key(key, project.as_deref(), now);
    }
    // Freshly built: nothing to write yet.
    state.dirty.iter_mut().for_each(|d| *d = false);
    state.dirty_keys.clear();
    Ok(Self {
      state: Mutex::new(state),
      roster: Roster::new(config.keys.into_iter().map(|k| k.key).collect()),
      policy: config.policy,
      clock,
      log,
      usage_ids: UsageIds::new(),
      additions_refused: Mutex::new(None),
    })
  }

  /// Positions in use: every key ever known, removed ones included.
  pub fn len(&self) -> usize {
    self.roster.names().len()
  }

  pub fn is_empty(&self) -> bool {
    self.len() == 0
  }

  pub fn now(&self) -> Millis {
    self.clock.now_ms()
  }

  /// How the pool's windows are measured.
  pub fn policy(&self) -> &WindowPolicy {
    &self.policy
  }

  /// Every key the pool knows, by position (the index every other call takes), removed ones
  /// included: a snapshot, read without the pool's lock.
  pub fn names(&self) -> Arc<Names> {
    self.roster.names()
  }

  /// Where the pool's lines go: its companions (the revalidation of refused keys) log there too.
  pub fn log(&self) -> &dyn Log {
    self.log.as_ref()
  }

  /// The key at `index`, masked.
  pub fn masked(&self, index: usize) -> String {
    self.names().get(index).map(mask_key).unwrap_or_default()
  }

  fn log_notes(&self, index: usize, notes: impl IntoIterator<Item = Note>) {
    for note in notes {
      match note {
        Note::Warn(text) => self.log.warn(&text.replace("{key}", &self.masked(index))),
        Note::Info(text) => self.log.info(&text.replace("{key}", &self.masked(index))),
      }
    }
  }

  /// The model named `name` (see [`Models::id`]): met now, with a budget in every project, if it
  /// was not yet. Its id is what the calls about a model take.
  pub fn model_id(&self, name: &str) -> Result<ModelId, PoolError> {
    let (id, warning) = self.with_state(|state, now| {
      let (id, warning) = state.models.id(name)?;
      state.give_budgets_to_new_model(id, now);
      Ok::<_, PoolError>((id, warning))
    })??;
    if let Some(w) = warning {
      self.log.warn(&w);
    }
    Ok(id)
  }

  /// Like [`Self::model_id`], for callers not trusted to add models: only a model met already or
  /// one whose limits are known (see [`Models::known_id`]).
  pub fn known_model_id(&self, name: &str) -> Result<ModelId, PoolError> {
    self.with_state(|state, now| {
      let id = state.models.known_id(name)?;
      state.give_budgets_to_new_model(id, now);
      Ok(id)
    })?
  }

  /// The name of model `id`.
  pub fn model_name(&self, id: ModelId) -> String {
    self.state.lock().models.get(id).name.clone()
  }

  /// The position of `key`, if it is in the pool (not removed).
  pub fn index_of(&self, key: &str) -> Result<usize, PoolError> {
    let index = self.names().position(key).ok_or(PoolError::KeyNotFound)?;
    self.with_live_key(index, |_, _| index)
  }

  /// Adds `key` to the pool (in `project`, when named), or brings it back if it was removed: it is
  /// handed out from now on. With a store, other processes sharing it learn of it too.
  pub fn add_key(&self, key: &str, project: Option<&str>) -> Result<usize, PoolError> {
    check_key_text(key)?;
    let project = project.map(project_name).transpose()?;
    if let Some(reason) = self.additions_refused.lock().clone() {
      return Err(PoolError::KeyNotStorable(reason));
    }
    let index = self.with_state(|state, now| {
      let known = self.roster.names().position(key);
      match known {
        Some(i) if state.keys[i].admission != Admission::Removed => Err(PoolError::DuplicateKey),
        Some(i) => {
          state.keys[i].admit(Admission::Enabled, now);
          state.admission_changed(i);
          Ok(i)
        }
        None => {
          let (i, _) = self.roster.add(key);
          let index = state.push_key(key, project.as_deref(), now);
          debug_assert_eq!(i, index);
          state.keys[index].added = true;
          state.keys[index].admitted_at = now;
          state.admission_changed(index);
          Ok(index)
        }
      }
    })??;
    self
      .log
      .info(&format!("✅ API key {} added", self.masked(index)));
    Ok(index)
  }

  /// The key a request the router sends on `model` goes out with. `asked` is the pool key the
  /// caller's request carried, if any: when that key has a hand-out no routed request used yet
  /// (the caller asked the pool just before), the request goes with it and uses its reservation.
  /// Otherwise the best key for the model is handed out for it, reserved at once. `Err` says when
  /// a key could next go, when none can now (`None`: none will by itself).
  pub fn route_key(
    &self,
    asked: Option<usize>,
    model: ModelId,
  ) -> Result<Result<RouteKey, Option<Millis>>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    let chosen = self.with_state(|state, now| {
      state.check_model(model)?;
      if let Some(index) = asked.filter(|&i| i < state.keys.len()) {
        let target = state.budget_of(index, model);
        let key = &state.keys[index];
        let open_hand_out = key.pending.len() > key.routed.in_flight as usize;
        // The hand-out may have been for another model (old callers name none): the request
        // counts on the model it goes to, if that budget has room for it.
        let fits = state.keys[index]
          .pending
          .front()
          .is_some_and(|r| r.budget == target || state.budgets.get(target).has_room(now, r.tokens));
        if open_hand_out && fits && key.admission == Admission::Enabled {
          let key = &mut state.keys[index];
          key.routed.in_flight += 1;
          if let Some(from) = key.adopt_reservation(&mut state.budgets, target, now) {
            state.touch_budget(from);
          }
          state.touch_budget(target);
          state.models.get_mut(model).overload.on_hand_out(now);
          return Ok(Some(RouteKey {
            index,
            model,
            at: now,
          }));
        }
      }
      state.expire_before_rebuild(model, now, ttl);
      let (candidates, cache) = state.selection(model);
      let Some(pick) = cache.next(candidates, now, 0) else {
        return Ok(None);
      };
      state.count_selection(pick.method);
      state.claim(
        pick.index,
        model,
        Claim::Reserve {
          estimated_tokens: 0,
        },
        now,
        ttl,
      );
      state.keys[pick.index].routed.in_flight += 1;
      Ok(Some(RouteKey {
        index: pick.index,
        model,
        at: now,
      }))
    })??;
    match chosen {
      Some(key) => Ok(Ok(key)),
      None => Ok(Err(self.next_available_at(0, model)?)),
    }
  }

  /// What a routed request did on the key it went out with (see [`Self::route_key`]): counted as
  /// `recordUsage` counts a call, from when it went out, and its reservation (the caller's, if it
  /// used it) settled.
  pub fn finish_routed(
    &self,
    key: RouteKey,
    tokens: u64,
    outcome: Outcome<'_>,
    response_time_ms: f64,
  ) -> Result<KeyFigures, PoolError> {
    let by = Reporter::Router { sent_at: key.at };
    self.record(
      key.index,
      tokens,
      outcome,
      response_time_ms,
      by,
      Some(key.model),
    )
  }

  /// A request chosen a key by [`Self::route_key`] that will never be counted (its caller went
  /// away before it was): its hold on the reservation ends, the reservation expires in its time.
  pub fn abandon_routed(&self, key: RouteKey) {
    let mut state = self.state.lock();
    if let Some(k) = state.keys.get_mut(key.index) {
      k.routed.in_flight = k.routed.in_flight.saturating_sub(1);
    }
  }

  /// A request chosen a key by [`Self::route_key`] that never left (no connection to Gemini was
  /// made): nothing is counted on the key, its reservation is let go at once, and the key's trial
  /// or the model's probe it may have been is free for another request.
  pub fn unsent_routed(&self, key: RouteKey) {
    let _ = self.with_state(|state, now| {
      if key.index >= state.keys.len() {
        return;
      }
      let target = state.budget_of(key.index, key.model);
      let k = &mut state.keys[key.index];
      k.routed.in_flight = k.routed.in_flight.saturating_sub(1);
      let found = k
        .pending
        .iter()
        .position(|r| r.budget == target && r.at == key.at);
      if let Some(r) = found.and_then(|i| k.pending.remove(i)) {
        state.budgets.get_mut(r.budget).release(now, r.at, r.tokens);
        k.health.trial_lost(now);
        state.models.get_mut(key.model).overload.probe_lost(now);
        state.touch_budget(target);
        state.touch(key.index);
      }
    });
  }

  /// A key in service (neither refused by Gemini nor taken out by an operator) whatever its
  /// budgets, for requests Gemini counts against no quota (model reads, token counts): the first
  /// from `from` on, round, whose circuit is closed, else any. `None` when no key is in service.
  pub fn key_in_service(&self, from: usize) -> Result<Option<usize>, PoolError> {
    self.with_state(|state, now| {
      let n = state.keys.len();
      let order = || (0..n).map(|i| (from + i) % n);
      let serving = |i: &usize| state.keys[*i].is_active();
      order()
        .filter(serving)
        .find(|&i| state.keys[i].health.can_serve(now))
        .or_else(|| order().find(serving))
    })
  }

  /// The router answered a request that carried the pool key `asked`: the caller's own report
  /// of it (`recordUsage`, and `handleRateLimit` after a 429) is not counted again, nor put on
  /// that key when another went out.
  pub fn routed_answer(&self, asked: usize, rate_limited: bool) {
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    if let Some(key) = state.keys.get_mut(asked) {
      key.routed.answered(now, rate_limited);
    }
  }

  /// Takes the key at `index` out of the pool (its history stays), or out of service
  /// ([`Admission::Disabled`]), or back into service ([`Admission::Enabled`]): an operator's
  /// decision, which other processes sharing a store follow. Returns whether anything changed.
  pub fn admit(&self, index: usize, admission: Admission) -> Result<bool, PoolError> {
    let changed = self.with_live_key(index, |state, now| {
      let changed = state.keys[index].admit(admission, now);
      state.admission_changed(index);
      changed
    })?;
    if changed {
      self.log_admission(index, admission, "");
    }
    Ok(changed)
  }

  fn log_admission(&self, index: usize, admission: Admission, by: &str) {
    let key = self.masked(index);
    match admission {
      Admission::Enabled => self.log.info(&format!("✅ API key {key} enabled{by}")),
      Admission::Disabled => self.log.warn(&format!("⚠️ API key {key} disabled{by}")),
      Admission::Removed => self.log.warn(&format!("⚠️ API key {key} removed{by}")),
    }
  }

  /// The operators' changes made here since the last call, for the store; the pool forgets them
  /// (hand them back with [`Self::mark_admissions`] when their write fails).
  pub fn export_admissions(&self) -> Vec<AdmissionRecord> {
    let mut state = self.state.lock();
    let state = &mut *state;
    let changed: Vec<usize> = state.admission_changed.drain(..).collect();
    changed
      .into_iter()
      .map(|i| {
        let key = &state.keys[i];
        AdmissionRecord {
          api_key: key.key.clone(),
          admission: key.admission,
          changed_at: key.admitted_at,
          added: key.added,
          project: match state.budgets.name(key.project) {
            ProjectName::Named(name) if key.project_configured => Some(name.clone()),
            _ => None,
          },
        }
      })
      .collect()
  }

  /// Notes `records` as not written yet: they go with the next export.
  pub fn mark_admissions(&self, records: &[AdmissionRecord]) {
    let names = self.names();
    let mut state = self.state.lock();
    for r in records {
      if let Some(i) = names.position(&r.api_key) {
        if !state.admission_changed.contains(&i) {
          state.admission_changed.push(i);
        }
      }
    }
  }

  /// Follows operators' changes made in other processes (read from the store): a change applies
  /// unless a later one was made to the key here; a key added elsewhere joins the pool (in the
  /// project it was added with). Returns how many keys changed.
  pub fn follow_admissions(&self, records: &[AdmissionRecord]) -> usize {
    let mut changes = Vec::new();
    {
      let mut state = self.state.lock();
      let now = self.clock.now_ms().max(state.last_now);
      for r in records {
        if check_key_text(&r.api_key).is_err() {
          continue;
        }
        let project = r.project.as_deref().and_then(|p| project_name(p).ok());
        let index = match self.roster.names().position(&r.api_key) {
          Some(i) => {
            if !state.keys[i].admit(r.admission, r.changed_at) {
              continue;
            }
            state.touch(i);
            i
          }
          None => {
            self.roster.add(&r.api_key);
            let index = state.push_key(&r.api_key, project.as_deref(), now);
            let key = &mut state.keys[index];
            key.added = true;
            key.admission = r.admission;
            key.admitted_at = r.changed_at;
            index
          }
        };
        state.invalidate_caches();
        changes.push((index, r.admission));
      }
    }
    for &(index, admission) in &changes {
      self.log_admission(index, admission, " by another process");
    }
    changes.len()
  }

  /// Refuses keys added from now on, saying why (`None` accepts them again): a store that cannot
  /// keep a key without exposing it sets this.
  pub fn refuse_additions(&self, reason: Option<String>) {
    *self.additions_refused.lock() = reason;
  }

  /// Names stored documents and URLs may use for keys from now on (see [`Roster::set_namer`]).
  pub fn set_namer(&self, namer: Namer) {
    let _state = self.state.lock();
    self.roster.set_namer(namer);
  }

  fn with_state<T>(&self, f: impl FnOnce(&mut PoolState, Millis) -> T) -> Result<T, PoolError> {
    let mut state = self.state.lock();
    // Read under the lock and never backwards: the wall clock can step back, and a reservation
    // stamped "in the future" would not be found when it is settled.
    let now = self.clock.now_ms().max(state.last_now);
    state.last_now = now;
    if state.closed {
      return Err(PoolError::Closed);
    }
    Ok(f(&mut state, now))
  }

  /// [`Self::with_state`] for calls about one key: checks `index` first.
  fn with_key<T>(
    &self,
    index: usize,
    f: impl FnOnce(&mut PoolState, Millis) -> T,
  ) -> Result<T, PoolError> {
    self.with_state(|state, now| {
      if index >= state.keys.len() {
        return Err(PoolError::KeyNotFound);
      }
      Ok(f(state, now))
    })?
  }

  /// [`Self::with_key`] for calls that concern only keys still in the pool.
  fn with_live_key<T>(
    &self,
    index: usize,
    f: impl FnOnce(&mut PoolState, Millis) -> T,
  ) -> Result<T, PoolError> {
    self.with_state(|state, now| match state.keys.get(index) {
      Some(key) if key.admission != Admission::Removed => Ok(f(state, now)),
      _ => Err(PoolError::KeyNotFound),
    })?
  }

  /// `getBestAvailableKey` for `model`: the next available key round-robin from the model's
  /// score-sorted cache. A reserving claim counts the request on the key's project budget at once,
  /// so concurrent callers never share a budget's last unit of capacity.
  pub fn best(&self, claim: Claim, model: ModelId) -> Result<Picked<Selection>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    self
      .with_state(|state, now| {
        state.check_model(model)?;
        state.expire_before_rebuild(model, now, ttl);
        let (candidates, cache) = state.selection(model);
        let Some(pick) = cache.next(candidates, now, claim.estimated_tokens()) else {
          return Ok(None);
        };
        state.count_selection(pick.method);
        Ok(Some(Picked {
          pick,
          figures: state.claim(pick.index, model, claim, now, ttl),
        }))
      })??
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `getNextKeyForRotation` for `model`: moves off a key under the rotation threshold, or
  /// behaves as [`Self::best`].
  pub fn rotate(&self, claim: Claim, model: ModelId) -> Result<Picked<Rotation>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    self
      .with_state(|state, now| {
        state.check_model(model)?;
        state.expire_before_rebuild(model, now, ttl);
        let (candidates, cache) = state.selection(model);
        let Some(pick) = cache.rotation(candidates, now, claim.estimated_tokens()) else {
          return Ok(None);
        };
        state.last_rotation = now;
        state.count_selection(pick.selection.method);
        if pick.reason == RotationReason::Proactive {
          state.counters.proactive_rotations += 1;
        }
        Ok(Some(Picked {
          pick,
          figures: state.claim(pick.selection.index, model, claim, now, ttl),
        }))
      })??
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `recordUsage`: settles the request's reservation (of `model`, or the oldest of any model)
  /// with its real token count. A success clears the error streak; a failure is read for what it
  /// says (see [`classify`]): a 429 rests the key's project budget as the quota rules say, an
  /// overload backs the model off, a refusal deactivates the key, anything else counts toward
  /// opening its circuit; an error that names the key's project teaches it. Error messages are
  /// stored with every key in them masked (scrubbed before the lock is taken). When usage is
  /// being stored, the call is queued for it with `response_time_ms`.
  pub fn record_usage(
    &self,
    index: usize,
    tokens: u64,
    outcome: Outcome<'_>,
    response_time_ms: f64,
    model: Option<ModelId>,
  ) -> Result<KeyFigures, PoolError> {
    self.record(
      index,
      tokens,
      outcome,
      response_time_ms,
      Reporter::Caller,
      model,
    )
  }

  fn record(
    &self,
    index: usize,
    tokens: u64,
    outcome: Outcome<'_>,
    response_time_ms: f64,
    by: Reporter,
    model: Option<ModelId>,
  ) -> Result<KeyFigures, PoolError> {
    let failure = match outcome {
      Outcome::Failure(error) => {
        let message: String = scrub(error, self.names().keys())
          .chars()
          .take(MAX_ERROR_CHARS)
          .collect();
        Some((message, classify(error), consumer_project(error)))
      }
      Outcome::Success => None,
    };
    let ttl = self.policy.reservation_ttl_ms;
    let policy = &self.policy;
    // Filled in by the closure, which returns only the figures: the hot path then moves one small
    // value out of the lock, not a tuple of them through every `Result` on the way.
    let mut change = HealthChange::Unchanged;
    let mut rested = None;
    let mut notes = Vec::new();
    let figures = self.with_key(index, |state, now| {
      if let Some(m) = model {
        state.check_model(m)?;
      }
      let key = &mut state.keys[index];
      match by {
        // The router counted this call already: the caller's own report of it is not another.
        Reporter::Caller if key.routed.take_report(now, ttl) => {
          return Ok(state.figures(index, now));
        }
        Reporter::Caller => {}
        Reporter::Router { .. } => {
          key.routed.in_flight = key.routed.in_flight.saturating_sub(1);
        }
      }
      let sent_at = match by {
        Reporter::Caller => caller_sent_at(now, response_time(response_time_ms)),
        Reporter::Router { sent_at } => sent_at,
      };
      state.touch(index);
      state.expire_key(index, now, ttl);
      let settled = state.keys[index].settle(
        &mut state.budgets,
        model,
        DEFAULT_MODEL_ID,
        now,
        sent_at,
        tokens,
        failure.is_none(),
      );
      let budget = settled.budget;
      let model = state.budgets.get(budget).model;
      let handed_at = settled.handed_at.unwrap_or(now);
      state.touch_budget(budget);
      state.calls.push(Call {
        key: index,
        timestamp: now,
        tokens,
        success: failure.is_none(),
        response_time: response_time(response_time_ms),
      });
      let counters = &mut state.counters;
      if failure.is_none() {
        counters.successes += 1;
      } else {
        counters.failures += 1;
      }
      counters.tokens = counters.tokens.saturating_add(tokens);
      if let Some(usage) = &mut state.usage {
        usage.push(UsageEntry {
          id: self.usage_ids.next_id(),
          index,
          timestamp: now,
          tokens,
          success: failure.is_none(),
          error: failure.as_ref().map(|(message, _, _)| message.clone()),
          response_time: response_time(response_time_ms),
        });
      }
      change = match failure {
        None => {
          let key = &mut state.keys[index];
          key.health.on_success(now);
          key.clear_error();
          state.budgets.get_mut(budget).on_success();
          state
            .models
            .get_mut(model)
            .overload
            .on_answered(now, handed_at);
          HealthChange::Unchanged
        }
        Some((message, kind, project)) => {
          state.keys[index].record_error(message, now);
          let overload = &mut state.models.get_mut(model).overload;
          match kind {
            Failure::Overloaded => {}
            // Nothing was heard from the model: a probe it was is lost, not failed.
            Failure::Transient => overload.probe_lost(now),
            Failure::RateLimited(_) | Failure::KeyRejected => overload.on_answered(now, handed_at),
          }
          let change = match kind {
            Failure::RateLimited(rate_limit) => {
              let what = exhausted(&rate_limit);
              // Learnt before the rest, which fills a spent day up to the limit.
              if let (Some(value), Exhausted::PerDay | Exhausted::PerMinute(_)) = (rate_limit.quota_value, what) {
                let window = limit_of(what);
                if let Some(old) = state.budgets.get_mut(budget).learn_limit(window, value) {
                  notes.push(Note::Warn(format!(
                    "⚠️ Gemini says the {} limit of API key {{key}}'s project for {} is {value} (configured: {old}): counting with {value}",
                    window.as_str(),
                    state.models.get(model).name
                  )));
                }
              }
              rested = state
                .budgets
                .get_mut(budget)
                .on_rate_limited(now, what, rate_limit.retry_after_ms, policy, MAX_REST_MS)
                .map(|rest| Rested {
                  index,
                  limit: limit_of(what),
                  rest,
                  budget,
                });
              state.counters.rate_limits[limit_of(what) as usize] += 1;
              HealthChange::Unchanged
            }
            Failure::KeyRejected => state.keys[index].health.on_key_rejected(),
            Failure::Overloaded => {
              if let Some(until) = state
                .models
                .get_mut(model)
                .overload
                .on_overload(now, handed_at)
              {
                notes.push(Note::Warn(format!(
                  "⚠️ Model {} is overloaded: no calls to it for {}, then one to try it",
                  state.models.get(model).name,
                  seconds(until - now)
                )));
              }
              HealthChange::Unchanged
            }
            Failure::Transient => state.keys[index].health.on_transient_failure(now),
          };
          if let Some(p) = project {
            notes.extend(state.learn_project(index, &p, now));
          }
          change
        }
      };
      if change != HealthChange::Unchanged || rested.is_some() {
        state.invalidate_caches();
        state.counters.error_rotations += 1;
      }
      Ok(state.figures(index, now))
    })??;
    if let Some(rested) = rested {
      self.log_rest(&rested);
    } else {
      self.log_change(index, change, &figures);
    }
    self.log_notes(index, notes);
    Ok(figures)
  }

  /// `handleRateLimit`: the upstream answered 429 for this window of `model` (the default one
  /// when `None`). The key's project budget rests: until the daily reset for RPD, else until the
  /// window frees or `retry_after_ms` has passed, whichever is later. It is not counted against
  /// the key.
  pub fn handle_rate_limit(
    &self,
    index: usize,
    limit_type: LimitType,
    retry_after_ms: Option<Millis>,
    model: Option<ModelId>,
  ) -> Result<KeyFigures, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    let policy = self.policy;
    let what = match limit_type {
      LimitType::Rpd => Exhausted::PerDay,
      limit => Exhausted::PerMinute(limit),
    };
    let (figures, rested) = self.with_key(index, |state, now| {
      let model = model.unwrap_or(DEFAULT_MODEL_ID);
      state.check_model(model)?;
      // A 429 the router answered, or already read from Gemini: no rest for it.
      if state.keys[index].routed.take_rate_limit(now, ttl) {
        return Ok((state.figures(index, now), None));
      }
      state.touch(index);
      state.keys[index].record_error(
        format!("Rate limit exceeded ({})", limit_type.as_str()),
        now,
      );
      let budget = state.budget_of(index, model);
      state.touch_budget(budget);
      let rest = state.budgets.get_mut(budget).on_rate_limited(
        now,
        what,
        retry_after_ms,
        &policy,
        MAX_REST_MS,
      );
      state.invalidate_caches();
      state.counters.rate_limits[limit_type as usize] += 1;
      if rest.is_some() {
        state.counters.error_rotations += 1;
      }
      let rested = Rested {
        index,
        limit: limit_type,
        rest: rest.unwrap_or_else(|| state.budgets.get(budget).rest(now)),
        budget,
      };
      Ok((state.figures(index, now), Some(rested)))
    })??;
    if let Some(rested) = rested {
      self.log_rest(&rested);
    }
    Ok(figures)
  }

  /// The old service's line (`⚠️ Rate limit hit for RPM on API key abc12345...`), with how long
  /// and, beyond the key's own project and the default model, for which budget.
  fn log_rest(&self, r: &Rested) {
    let (project, model, no_quota) = {
      let state = self.state.lock();
      let b = state.budgets.get(r.budget);
      let project = match state.budgets.name(b.project) {
        ProjectName::Named(name) => Some(name.clone()),
        ProjectName::OwnOf(_) => None,
      };
      let model = (b.model != DEFAULT_MODEL_ID).then(|| state.models.get(b.model).name.clone());
      (project, model, r.rest == Rest::NoQuota)
    };
    let key = self.masked(r.index);
    let mut whose = String::new();
    if let Some(p) = &project {
      whose.push_str(&format!("; project {p}"));
    }
    if let Some(m) = &model {
      whose.push_str(&format!("; model {m}"));
    }
    if no_quota {
      let model = model.unwrap_or_else(|| self.model_name(DEFAULT_MODEL_ID));
      self.log.warn(&format!(
        "⚠️ No quota for {model} on API key {key}'s tier (quotaValue 0{whose}): its project is not used for that model until a key of it is reactivated"
      ));
      return;
    }
    let rest = match r.rest {
      Rest::Until { until, .. } => format!(" (resting for {}{whose})", seconds(until - self.now())),
      _ => String::new(),
    };
    self.log.warn(&format!(
      "⚠️ Rate limit hit for {} on API key {key}{rest}",
      r.limit.as_str()
    ));
  }

  fn log_change(&self, index: usize, change: HealthChange, figures: &KeyFigures) {
    match change {
      HealthChange::CircuitOpened { until, failures } => self.log.warn(&format!(
        "⚠️ API key {} resting for {} after {failures} consecutive errors (circuit open)",
        self.masked(index),
        seconds(until - self.now())
      )),
      HealthChange::Deactivated => self.log.warn(&format!(
        "⚠️ API key deactivated due to {} consecutive errors: the API refused the key {}",
        figures.error_count,
        self.masked(index)
      )),
      HealthChange::Rested { .. } | HealthChange::Unchanged => {}
    }
  }

  /// Back in service with a clean record; its project's budgets without quota ("quotaValue 0")
  /// are tried again.
  pub fn reactivate(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_live_key(index, |state, now| {
      state.touch(index);
      let key = &mut state.keys[index];
      key.health.reactivate();
      key.error_count = 0;
      let project = key.project;
      let budgets: Vec<BudgetId> = state.budgets.of_project(project).to_vec();
      for b in budgets {
        if state.budgets.get(b).rest(now) == Rest::NoQuota {
          state.budgets.get_mut(b).end_rest();
          state.touch_budget(b);
        }
      }
      state.invalidate_caches();
      state.figures(index, now)
    })
  }

  /// Fresh windows for every budget, and the end of every rate-limit rest (open circuits and
  /// deactivations stand: they are about failures, not quota).
  pub fn reset_all_limits(&self) -> Result<(), PoolError> {
    self.with_state(|state, now| {
      for key in &mut state.keys {
        key.forget_reservations(now);
      }
      for budget in state.budgets.iter_mut() {
        budget.clear_windows(now);
        budget.end_rest();
      }
      state.touch_all();
      state.invalidate_caches();
    })
  }

  /// Rebuilds the default model's selection cache now (every other model's at its next pick);
  /// returns how many keys are available for the default model.
  pub fn refresh_cache(&self) -> Result<usize, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    let available = self.with_state(|state, now| {
      state.invalidate_caches();
      state.expire_before_rebuild(DEFAULT_MODEL_ID, now, ttl);
      let (candidates, cache) = state.selection(DEFAULT_MODEL_ID);
      cache.rebuild(candidates, now)
    })?;
    self.log.info("✅ Cache refreshed successfully");
    Ok(available)
  }

  /// When a key could next be handed out for a request of `estimated_tokens` to `model`: "not
  /// yet, until T" for callers that would rather wait than fail. `None` when no key will be by
  /// itself (every key is deactivated or out of service, no budget has quota for the model, or a
  /// half-open key's trial is still out). Costs O(keys): for the failure path.
  pub fn next_available_at(
    &self,
    estimated_tokens: u64,
    model: ModelId,
  ) -> Result<Option<Millis>, PoolError> {
    self.with_state(|state, now| {
      state.check_model(model)?;
      // While the model's probe is out, it answers when the probe does: look again in a moment.
      let model_at = state
        .models
        .get(model)
        .overload
        .available_at(now)
        .unwrap_or(now + 1_000);
      Ok(
        (0..state.keys.len())
          .filter_map(|index| {
            let key = &state.keys[index];
            let budget = state.budgets.get(state.budget_of(index, model));
            // A request larger than the budget's whole TPM never fits, however long one waits; a
            // key out of service comes back only when an operator says so.
            if estimated_tokens > budget.quota.tpm || key.admission != Admission::Enabled {
              return None;
            }
            let mut at = match key.health.state(now) {
              HealthState::Deactivated | HealthState::HalfOpen { trial_out: true } => return None,
              state => state.until().unwrap_or(now),
            };
            match budget.rest(now) {
              Rest::NoQuota => return None,
              Rest::Until { until, .. } => at = at.max(until),
              Rest::Clear => {}
            }
            for limit in LimitType::ALL {
              let wanted = if limit == LimitType::Tpm {
                estimated_tokens.max(1)
              } else {
                1
              };
              if budget.current(limit, now).saturating_add(wanted) > budget.limit(limit) {
                at = at.max(budget.frees_at(limit, now));
              }
            }
            if let Some(shared) = &budget.shared {
              let recent = budget.rpm.current(now);
              at = at.max(shared.available_at(now, recent, budget.rpm.frees_at(now)));
            }
            Some(at.max(model_at))
          })
          .min(),
      )
    })?
  }

  pub fn figures(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_key(index, |state, now| state.figures(index, now))
  }

  pub fn last_error(&self, index: usize) -> Result<Option<String>, PoolError> {
    self.with_key(index, |state, _| state.keys[index].last_error.clone())
  }

  fn status_of(state: &PoolState, index: usize, now: Millis) -> KeyStatus {
    let key = &state.keys[index];
    let budget = state.budgets.get(state.budget_of(index, DEFAULT_MODEL_ID));
    let (project, budgets) = Self::project_budgets(state, index, now);
    KeyStatus {
      api_key: key.key.clone(),
      figures: key.figures(budget, now),
      last_error: key.last_error.clone(),
      project,
      budgets,
    }
  }

  /// Key `index`'s full status, its budgets included.
  pub fn status(&self, index: usize) -> Result<KeyStatus, PoolError> {
    self.with_key(index, |state, now| Self::status_of(state, index, now))
  }

  /// Every key ever in the pool, removed ones too, by position.
  pub fn every_status(&self) -> Result<Vec<KeyStatus>, PoolError> {
    self.with_state(|state, now| {
      (0..state.keys.len())
        .map(|i| Self::status_of(state, i, now))
        .collect()
    })
  }

  /// Every key in the pool (not removed), in position order.
  pub fn statuses(&self) -> Result<Vec<KeyStatus>, PoolError> {
    self.with_state(|state, now| {
      (0..state.keys.len())
        .filter(|&i| state.keys[i].admission != Admission::Removed)
        .map(|i| Self::status_of(state, i, now))
        .collect()
    })
  }

  /// The windows of key `index`'s project for `model` (the default one when `None`).
  pub fn rate_limit_info(
    &self,
    index: usize,
    model: Option<ModelId>,
  ) -> Result<[RateLimitInfo; 3], PoolError> {
    self.with_live_key(index, |state, now| {
      let model = model.unwrap_or(DEFAULT_MODEL_ID);
      state.check_model(model)?;
      Ok(rate_limit_info(
        state.budgets.get(state.budget_of(index, model)),
        now,
      ))
    })?
  }

  /// Key `index`'s project (`None`: its own, not known) and its budget of every model met.
  pub fn budgets_of(&self, index: usize) -> Result<(Option<String>, Vec<BudgetView>), PoolError> {
    self.with_key(index, |state, now| Self::project_budgets(state, index, now))
  }

  fn project_budgets(
    state: &PoolState,
    index: usize,
    now: Millis,
  ) -> (Option<String>, Vec<BudgetView>) {
    let project = state.keys[index].project;
    let name = match state.budgets.name(project) {
      ProjectName::Named(name) => Some(name.clone()),
      ProjectName::OwnOf(_) => None,
    };
    let views = state
      .budgets
      .of_project(project)
      .iter()
      .map(|&b| Self::budget_view(state, b, now))
      .collect();
    (name, views)
  }

  fn budget_view(state: &PoolState, b: BudgetId, now: Millis) -> BudgetView {
    let budget = state.budgets.get(b);
    let model = state.models.get(budget.model);
    BudgetView {
      project: match state.budgets.name(budget.project) {
        ProjectName::Named(name) => Some(name.clone()),
        ProjectName::OwnOf(_) => None,
      },
      model: model.name.clone(),
      figures: budget.figures(now),
      availability_score: budget.score(now),
      overloaded_until: model.overload.backing_off_until(now),
    }
  }

  /// The round-robin position (of the default model) and when a key was last handed out by
  /// rotation: the rest of the SPEC's `ApiKeyManager`.
  pub fn rotation_state(&self) -> Result<(usize, Millis), PoolError> {
    self.with_state(|state, _| (state.caches[DEFAULT_MODEL_ID].cursor(), state.last_rotation))
  }

  /// Starts queueing recorded calls for storage (see [`UsageLog::new`]); calls recorded before
  /// are not queued. A second call keeps the first queue.
  pub fn enable_usage_log(&self, capacity: usize, batch: usize, wake: Arc<tokio::sync::Notify>) {
    let mut state = self.state.lock();
    if state.usage.is_none() {
      state.usage = Some(UsageLog::new(capacity, batch, wake));
    }
  }

  /// Takes up to `max` of the oldest queued calls, as stored records. Works on a closed pool, so
  /// that closing can flush.
  pub fn take_usage(&self, max: usize) -> Vec<UsageRecord> {
    let entries = match &mut self.state.lock().usage {
      Some(usage) => usage.take(max),
      None => return Vec::new(),
    };
    // The keys' text is copied in here, after the lock is released.
    entries
      .into_iter()
      .map(|e| e.into_record(self.names().keys()))
      .collect()
  }

  /// Queued calls, and calls dropped because the queue was full.
  pub fn usage_backlog(&self) -> (usize, u64) {
    match &self.state.lock().usage {
      Some(usage) => (usage.len(), usage.dropped()),
      None => (0, 0),
    }
  }

  /// The keys changed since the last export, as stored records (their windows those of their
  /// project's budget of the default model); their change flags are cleared. Works on a closed
  /// pool, so that closing can flush.
  pub fn export_dirty(&self) -> Vec<KeyRecord> {
    let now = self.clock.now_ms();
    let mut state = self.state.lock();
    let state = &mut *state;
    let records = state
      .dirty_keys
      .iter()
      .map(|&i| {
        let budget = state
          .budgets
          .get(state.budgets.of(state.keys[i].project, DEFAULT_MODEL_ID));
        state.keys[i].to_record(budget, now)
      })
      .collect();
    for i in state.dirty_keys.drain(..) {
      state.dirty[i] = false;
    }
    records
  }

  /// Flags the keys of `records` as changed again: their write failed, so the next export must
  /// include them (with whatever state they have by then).
  pub fn mark_dirty(&self, records: &[KeyRecord]) {
    let names = self.names();
    let mut state = self.state.lock();
    for r in records {
      if let Some(i) = names.position(&r.api_key) {
        state.touch(i);
      }
    }
  }

  /// Flags every key and budget as changed, so the next export writes the whole pool.
  pub fn mark_all_dirty(&self) {
    self.state.lock().touch_all();
  }

  /// Merges stored records into the pool (see [`KeyState::merge_record`]): counters of open
  /// windows become the larger of the two sides (the record's windows are its project's budget
  /// of the default model); health and errors come from the record unless the key changed here
  /// since its last export. A record names its key by the key or by its stored name; records of
  /// keys not in the pool are ignored. Returns how many were merged.
  pub fn import(&self, records: &[KeyRecord]) -> usize {
    let now = self.clock.now_ms();
    let names = self.names();
    let mut state = self.state.lock();
    let state = &mut *state;
    let mut merged = 0;
    for r in records {
      if let Some(i) = names.resolve(&r.api_key) {
        let local_wins = state.dirty[i];
        // A database written by the old service may hold unmasked keys in its error messages.
        let record = KeyRecord {
          api_key: names.keys()[i].clone(),
          last_error: r.last_error.as_deref().map(|e| scrub(e, names.keys())),
          ..r.clone()
        };
        let b = state.budgets.of(state.keys[i].project, DEFAULT_MODEL_ID);
        state.keys[i].merge_record(&record, state.budgets.get_mut(b), now, local_wins);
        merged += 1;
      }
    }
    if merged > 0 {
      state.invalidate_caches();
    }
    merged
  }

  /// The budgets changed since the last export, as stored records; their change flags are
  /// cleared. Works on a closed pool, so that closing can flush.
  pub fn export_dirty_budgets(&self) -> Vec<BudgetRecord> {
    let now = self.clock.now_ms();
    let names = self.names();
    let mut state = self.state.lock();
    let dirty = std::mem::take(&mut state.dirty_budgets);
    for &b in &dirty {
      state.dirty_budget[b] = false;
    }
    dirty
      .iter()
      .filter_map(|&b| state.budget_record(&names, b, now))
      .collect()
  }

  /// Flags the budgets of `records` as changed again: their write failed.
  pub fn mark_budgets_dirty(&self, records: &[BudgetRecord]) {
    if records.is_empty() {
      return;
    }
    let names = self.names();
    let mut state = self.state.lock();
    for b in 0..state.budgets.len() {
      let subject = state.subject_of(&names, b);
      if records.iter().any(|r| Some(&r.subject) == subject.as_ref()) {
        state.touch_budget(b);
      }
    }
  }

  /// Merges stored budgets into the pool: counters of open windows become the larger of the two
  /// sides (see [`merge_windows`]) and a stored rest is kept unless one held here ends later.
  /// `stored_name` names a subject as the store does. A model a record names that was not met
  /// yet is met now (those beyond the table's room are left out). Returns how many merged.
  pub fn import_budgets(
    &self,
    records: &[BudgetRecord],
    stored_name: impl Fn(&str) -> String,
  ) -> usize {
    for r in records {
      // A model beyond the table's room, or one named wrongly, stays unmet: its records are
      // left out below.
      let _ = self.model_id(&r.model);
    }
    let now = self.clock.now_ms();
    let names = self.names();
    let mut state = self.state.lock();
    let state = &mut *state;
    let by_name: std::collections::HashMap<&str, &BudgetRecord> =
      records.iter().map(|r| (r.subject.as_str(), r)).collect();
    let mut merged = 0;
    for b in 0..state.budgets.len() {
      let Some(subject) = state.subject_of(&names, b) else {
        continue;
      };
      let Some(r) = by_name.get(stored_name(&subject).as_str()) else {
        continue;
      };
      let budget = state.budgets.get_mut(b);
      merge_windows(budget, [r.rpm, r.rpd, r.tpm], now);
      let rest = match r.rest {
        RestRecord::Clear => Rest::Clear,
        RestRecord::Until { until, window } => Rest::Until {
          until,
          limit: window,
        },
        RestRecord::NoQuota => Rest::NoQuota,
      };
      budget.restore_rest(rest, now);
      merged += 1;
    }
    if merged > 0 {
      state.invalidate_caches();
    }
    merged
  }

  /// From now on, hands out a key only within what this process leased of its budgets' shared
  /// quota (see `share`): until the first leases arrive no key is available. Returns what the
  /// pool notifies when a lease runs low; a second call returns the same and changes nothing else.
  pub fn share_quota(&self) -> Arc<Notify> {
    let mut state = self.state.lock();
    if let Some(wake) = &state.lease_wake {
      return wake.clone();
    }
    let wake = Arc::new(Notify::new());
    state.lease_wake = Some(wake.clone());
    state.budgets.share();
    state.invalidate_caches();
    wake
  }

  /// What names budget `b` in the store's leases, the same in every process: for a key's own
  /// project and the default model the key itself (as the leases of one key have always been
  /// named), else the project (or the key) and the model. The store keeps it in its naming (a
  /// digest or a fingerprint), never as it is.
  pub fn lease_subject(&self, b: BudgetId) -> Option<String> {
    let names = self.names();
    let state = self.state.lock();
    (b < state.budgets.len())
      .then(|| state.subject_of(&names, b))
      .flatten()
  }

  /// Whether anything of budget `b` is used: a budget no key in service draws on holds nothing of
  /// a quota others could use.
  fn budget_in_use(state: &PoolState, b: BudgetId) -> bool {
    let project = state.budgets.get(b).project;
    state.keys.iter().any(|k| {
      k.project == project && k.admission == Admission::Enabled && !k.health.is_deactivated()
    })
  }

  /// What the leasing task should ask the store for now, per budget and window. Budgets no key in
  /// service draws on need nothing. Every need returned must be answered with
  /// [`Self::leases_granted`].
  pub fn lease_needs(&self) -> Vec<(BudgetId, SharedWindow, LeaseNeed)> {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let in_use: Vec<bool> = (0..state.budgets.len())
      .map(|b| Self::budget_in_use(&state, b))
      .collect();
    let mut needs = Vec::new();
    for (b, budget) in state.budgets.iter_mut().enumerate() {
      if !in_use[b] {
        continue;
      }
      let limits = [budget.quota.rpm, budget.quota.rpd];
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      for (window, limit) in SharedWindow::ALL.into_iter().zip(limits) {
        if let Some(need) = shared
          .allowance_mut(window)
          .need(window, now, limit, span, daily)
        {
          needs.push((b, window, need));
        }
      }
    }
    needs
  }

  /// Applies the store's answers to [`Self::lease_needs`]: how much each got, or `None` when the
  /// store could not be asked. A budget that could not serve before and can now is made visible to
  /// selection at once.
  pub fn leases_granted(&self, answers: &[(BudgetId, SharedWindow, LeaseNeed, Option<Answer>)]) {
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut newly_available = false;
    for (b, window, need, answer) in answers {
      if *b >= state.budgets.len() {
        continue;
      }
      let budget = state.budgets.get_mut(*b);
      let recent = budget.rpm.current(now);
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      let could = shared.can_serve(now, recent);
      shared.allowance_mut(*window).granted(need, *answer, now);
      newly_available |= !could && shared.can_serve(now, recent);
    }
    if newly_available {
      state.invalidate_caches();
    }
  }

  /// While the store cannot be reached: every budget serves `1 / peers` of each shared limit in
  /// the windows it holds no good lease for (see [`crate::sharing::share::Allowance::grant_locally`]).
  pub fn grant_locally(&self, peers: usize) {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let peers = peers.max(1) as u64;
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut granted = false;
    for budget in state.budgets.iter_mut() {
      let limits = [budget.quota.rpm, budget.quota.rpd];
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      for (window, limit) in SharedWindow::ALL.into_iter().zip(limits) {
        granted |=
          shared
            .allowance_mut(window)
            .grant_locally(window, now, limit / peers, span, daily);
      }
    }
    if granted {
      state.invalidate_caches();
    }
  }

  /// Per budget and window, what is held and not served in windows still open, and what was
  /// served and not yet reported: what to give back and report when the process leaves.
  pub fn unused_leases(&self) -> Vec<(BudgetId, SharedWindow, Occurrence, u64, u64)> {
    let state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut unused = Vec::new();
    for (b, budget) in state.budgets.iter() {
      let Some(shared) = budget.shared.as_deref() else {
        continue;
      };
      for (window, allowance) in [
        (SharedWindow::Rpm, &shared.rpm),
        (SharedWindow::Rpd, &shared.rpd),
      ] {
        unused.extend(
          allowance
            .unused(now)
            .map(|(occurrence, left, spent)| (b, window, occurrence, left, spent)),
        );
      }
    }
    unused
  }

  /// Keeps the last `capacity` recorded calls for usage statistics (default
  /// [`DEFAULT_CALL_LOG_CAPACITY`]; 0 keeps none), starting empty.
  pub fn keep_calls(&self, capacity: usize) {
    self.state.lock().calls = CallLog::new(capacity);
  }

  /// The recorded calls of `range` that the in-memory log still holds.
  pub fn recent_calls(&self, range: DateRange) -> Result<RecentCalls, PoolError> {
    self.with_state(|state, _| {
      let log = &state.calls;
      let truncated = log.overwritten() > 0
        && match (log.oldest(), range.start) {
          (Some(oldest), Some(start)) => oldest.timestamp >= start,
          _ => true,
        };
      RecentCalls {
        calls: log.within(range),
        truncated,
        capacity: log.capacity(),
      }
    })
  }

  /// The counters, every key's figures (with its project's budget of the default model) and every
  /// budget in use, at one instant; keys masked.
  pub fn metrics(&self) -> Result<MetricsSnapshot, PoolError> {
    let (counters, figures, budgets) = self.with_state(|state, now| {
      let figures: Vec<_> = (0..state.keys.len())
        .filter(|&i| state.keys[i].admission != Admission::Removed)
        .map(|i| {
          let budget = state.budgets.get(state.budget_of(i, DEFAULT_MODEL_ID));
          (i, state.keys[i].figures(budget, now), budget.score(now))
        })
        .collect();
      let budgets: Vec<(BudgetView, Option<usize>)> = state
        .budgets
        .iter()
        .filter(|(b, _)| Self::budget_in_use(state, *b))
        .map(|(b, budget)| {
          let own = match state.budgets.name(budget.project) {
            ProjectName::OwnOf(i) => Some(*i),
            ProjectName::Named(_) => None,
          };
          (Self::budget_view(state, b, now), own)
        })
        .collect();
      (state.counters, figures, budgets)
    })?;
    // Masked after the lock is released.
    let names = self.names();
    let keys = figures
      .into_iter()
      .map(|(i, f, score)| KeyMetrics {
        api_key: names.get(i).map(mask_key).unwrap_or_default(),
        index: i,
        state: f.state_code(),
        availability_score: score,
        windows: [f.rpm, f.rpd, f.tpm],
      })
      .collect();
    let budgets = budgets
      .into_iter()
      .map(|(view, own)| BudgetMetrics {
        // A key's own project is named by its masked key.
        project: view.project.clone().unwrap_or_else(|| {
          own
            .and_then(|i| names.get(i))
            .map(|k| format!("key:{}", mask_key(k)))
            .unwrap_or_default()
        }),
        model: view.model.clone(),
        state: view.state_label(),
        availability_score: view.availability_score,
        windows: [view.figures.rpm, view.figures.rpd, view.figures.tpm],
      })
      .collect();
    Ok(MetricsSnapshot {
      counters,
      keys,
      budgets,
    })
  }

  /// Refuses every later call. Idempotent.
  pub fn close(&self) {
    self.state.lock().closed = true;
  }
}

#[cfg(test)]
pub(crate) mod testing;
/// A budget's state as listings name it: `active`, `resting` (a 429), `no-quota`, or `overloaded`
/// (its model backing off).
#[cfg(test)]
mod tests;
