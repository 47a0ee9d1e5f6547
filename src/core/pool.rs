//! The key pool: every key's state, every (project, model) budget and every model's health behind
//! one short lock, and the operations of the old service's API applied to them atomically. Nothing
//! here allocates on the selection and usage paths (a failure's message aside), blocks on I/O, or
//! prints while the lock is held. What changed is tracked for the write-behind layer
//! (`persistence`): a flag per changed key and budget and a queue of recorded calls, all O(1) to
//! add to.
//!
//! This file holds the pool's state, its construction and the lock every operation takes; the
//! operations are in files of their own, one `impl KeyPool` each:
//! - `hand_out`: handing keys out (`best`, `rotate`) and when one could next be;
//! - `report`: reports of calls (`record_usage`, `handle_rate_limit`) and what they teach;
//! - `routed`: the keys the router's requests go out with, and their answers;
//! - `operators`: operators' changes to keys, and how they travel between processes;
//! - `status`: figures and statuses of keys, as callers read them;
//! - `statistics`: counters, metrics and the recent calls;
//! - `snapshots`: the state exported to the store and imported from it, and the queue of calls;
//! - `leases`: the pool's side of a quota shared with other processes.

mod hand_out;
mod leases;
mod operators;
mod report;
mod routed;
mod snapshots;
mod statistics;
mod status;

pub use hand_out::{Claim, Picked};
pub use operators::{check_key_text, MAX_KEY_BYTES};
pub use report::{is_integer, validate_tokens, Outcome, MAX_TOKENS_PER_CALL};
pub use routed::RouteKey;
pub use statistics::RecentCalls;

use std::sync::Arc;

use parking_lot::Mutex;

use crate::core::budget::{BudgetId, Budgets, ProjectId, ProjectName};
use crate::core::clock::{Clock, Millis};
use crate::core::config::{KeySpec, PoolConfig};
use crate::core::error::PoolError;
use crate::core::key::{Admission, KeyFigures, KeyState};
use crate::core::models::{ModelId, Models, DEFAULT_MODEL_ID};
use crate::core::quota::WindowPolicy;
use crate::core::roster::{Namer, Names, Roster};
use crate::core::selection::SelectionCache;
use crate::core::usage_queue::UsageQueue;
use crate::core::wake::Wake;
use crate::log::Log;
use crate::mask::mask_key;
use crate::stats::counters::Counters;
use crate::stats::recent_calls::{CallLog, DEFAULT_CALL_LOG_CAPACITY};

/// Everything the pool's one lock guards.
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
  usage: Option<UsageQueue>,
  /// Wakes the leasing task when a shared lease runs low; `None` while no task is there.
  lease_wake: Option<Wake>,
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

  /// Notes that every key and budget changed, for the next export.
  fn touch_all(&mut self) {
    for index in 0..self.keys.len() {
      self.touch(index);
    }
    for b in 0..self.budgets.len() {
      self.touch_budget(b);
    }
  }

  /// Notes that budget `budget` changed, for the next export.
  fn touch_budget(&mut self, budget: BudgetId) {
    if self.dirty_budget.len() < self.budgets.len() {
      self.dirty_budget.resize(self.budgets.len(), false);
    }
    if !self.dirty_budget[budget] {
      self.dirty_budget[budget] = true;
      self.dirty_budgets.push(budget);
    }
  }

  /// Makes every model's next selection rebuild its cache: what it ranked has changed.
  fn invalidate_caches(&mut self) {
    for cache in &mut self.caches {
      cache.invalidate();
    }
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

  /// The budget key `index` draws on for `model`: its project's.
  fn budget_of(&self, index: usize, model: ModelId) -> BudgetId {
    self.budgets.of(self.keys[index].project, model)
  }

  /// A key's figures as its status shows them: with its project's budget of the default model.
  fn figures(&self, index: usize, now: Millis) -> KeyFigures {
    let budget = self.budgets.get(self.budget_of(index, DEFAULT_MODEL_ID));
    self.keys[index].figures(budget, now)
  }

  /// A model the caller gave by id: one the pool has met.
  fn check_model(&self, model: ModelId) -> Result<(), PoolError> {
    if model < self.models.len() {
      Ok(())
    } else {
      Err(PoolError::InvalidModel(format!("no model has id {model}")))
    }
  }
}

/// The pool of keys: its state behind one lock, the keys' names beside it, and what it is given
/// from outside (the window policy, a clock, a log).
pub struct KeyPool {
  state: Mutex<PoolState>,
  /// The keys by position, read without the pool's lock; keys are added to it under the lock.
  roster: Roster,
  policy: WindowPolicy,
  clock: Arc<dyn Clock>,
  log: Arc<dyn Log>,
  /// Why keys cannot be added now, if they cannot (see [`Self::refuse_additions`]).
  additions_refused: Mutex<Option<String>>,
}

impl KeyPool {
  /// A pool of `config`'s keys, counted from `clock`'s time, its lines (the configuration's
  /// warnings first) going to `log`. Fails when no key is configured.
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
      additions_refused: Mutex::new(None),
    })
  }

  /// Positions in use: every key ever known, removed ones included.
  pub fn len(&self) -> usize {
    self.roster.names().len()
  }

  /// Whether no position is in use (never, once built: a pool has a key).
  pub fn is_empty(&self) -> bool {
    self.len() == 0
  }

  /// The time by the pool's clock.
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
  #[cfg(test)]
  pub fn index_of(&self, key: &str) -> Result<usize, PoolError> {
    let index = self.names().position(key).ok_or(PoolError::KeyNotFound)?;
    self.with_live_key(index, |_, _| index)
  }

  /// Names stored documents and URLs may use for keys from now on (see [`Roster::set_namer`]).
  pub fn set_namer(&self, namer: Namer) {
    let _state = self.state.lock();
    self.roster.set_namer(namer);
  }

  /// Runs `f` on the state under the lock, with the time it runs at; refused once closed.
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

  /// Refuses every later call. Idempotent.
  pub fn close(&self) {
    self.state.lock().closed = true;
  }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
