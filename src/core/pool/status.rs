//! What callers read about keys: figures, full statuses with their project's budgets, rate-limit
//! windows, and the rotation state of the old service's `ApiKeyManager`.

use crate::core::budget::{BudgetId, BudgetView, ProjectName};
use crate::core::clock::Millis;
use crate::core::error::PoolError;
use crate::core::key::{rate_limit_info, Admission, KeyFigures, KeyStatus, RateLimitInfo};
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};

use super::{KeyPool, PoolState};

impl KeyPool {
  /// Key `index`'s figures (see [`KeyFigures`]).
  pub fn figures(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_key(index, |state, now| state.figures(index, now))
  }

  /// The last error recorded for key `index`, masked.
  pub fn last_error(&self, index: usize) -> Result<Option<String>, PoolError> {
    self.with_key(index, |state, _| state.keys[index].last_error.clone())
  }

  /// Key `index`'s status, read under the lock.
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

  /// Key `index`'s project name (`None`: its own) and its budget of every model met.
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

  /// Budget `b` as listings show it.
  pub(super) fn budget_view(state: &PoolState, b: BudgetId, now: Millis) -> BudgetView {
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
}
