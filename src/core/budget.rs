//! What Gemini counts: limits apply per project and per model, not per key. A budget is one
//! (project, model) pair's requests per minute, requests per day and tokens per minute, what rests
//! it, and what this process holds of it when the quota is shared. The keys of one project draw on
//! its budgets together; a key whose project is unknown is a project of its own.

use crate::core::clock::{Millis, MINUTE_MS, SECOND_MS};
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::core::quota::{LimitType, Quota, WindowPolicy};
use crate::core::window::{DailyWindow, RollingWindow};
use crate::sharing::share::SharedBudget;

/// A budget's position in the pool's table.
pub type BudgetId = usize;
/// A project's position in the pool's table.
pub type ProjectId = usize;

/// The rest of a per-minute 429 that says "0s" when nothing counted here is left to wait for: the
/// upstream said no, so not straight back.
pub const MIN_MINUTE_REST_MS: Millis = SECOND_MS;
/// A 429 that says nothing about which quota: a rest this long, doubled at each one in a row, capped.
pub const FIRST_UNEXPLAINED_REST_MS: Millis = SECOND_MS;
pub const MAX_UNEXPLAINED_REST_MS: Millis = MINUTE_MS;

/// What a 429 said ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
  /// The day's requests: nothing more until the daily reset, whatever `retryDelay` says.
  PerDay,
  /// The minute's requests or tokens.
  PerMinute(LimitType),
  /// The tier has no quota at all for the model (`quotaValue` "0").
  NoQuota,
  /// A 429 without details.
  Unexplained,
}

/// Why a budget is not used, when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
  Clear,
  /// Until `until`, for the window named (when the upstream said which).
  Until {
    until: Millis,
    limit: Option<LimitType>,
  },
  /// The tier has no quota for this model: until an operator reactivates a key of the project.
  NoQuota,
}

/// One (project, model) budget.
#[derive(Debug, Clone)]
pub struct Budget {
  pub project: ProjectId,
  pub model: ModelId,
  pub quota: Quota,
  pub rpm: RollingWindow,
  pub rpd: DailyWindow,
  pub tpm: RollingWindow,
  rest: Rest,
  /// 429s without details in a row, each resting longer.
  unexplained: u32,
  /// What this process may use of the budget shared with other processes; `None` when it does
  /// not share (boxed: most pools do not).
  pub shared: Option<Box<SharedBudget>>,
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

/// A budget's windows and rest, as callers see them: `Copy`, for the hot path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetFigures {
  pub rpm: LimitFigures,
  pub rpd: LimitFigures,
  pub tpm: LimitFigures,
  pub rest: Rest,
}

/// One budget as listings show it: its project and model by name, its figures, its model's
/// back-off.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
  /// The project's name; `None` for the project of a key whose project is not known.
  pub project: Option<String>,
  pub model: String,
  pub figures: BudgetFigures,
  pub availability_score: f64,
  /// The model is backing off after an overload, until then.
  pub overloaded_until: Option<Millis>,
}

impl BudgetView {
  /// `active`, `resting`, `no-quota` or `overloaded`.
  pub fn state_label(&self) -> &'static str {
    match self.figures.rest {
      Rest::NoQuota => "no-quota",
      Rest::Until { .. } => "resting",
      Rest::Clear if self.overloaded_until.is_some() => "overloaded",
      Rest::Clear => "active",
    }
  }

  /// Until when it rests, or its model backs off.
  pub fn state_until(&self) -> Option<Millis> {
    match self.figures.rest {
      Rest::Until { until, .. } => Some(until),
      _ => self.overloaded_until,
    }
  }
}

impl Budget {
  pub fn new(
    project: ProjectId,
    model: ModelId,
    quota: Quota,
    policy: &WindowPolicy,
    now: Millis,
  ) -> Self {
    Self {
      project,
      model,
      quota,
      rpm: RollingWindow::new(policy.span_ms, now),
      rpd: DailyWindow::new(policy.daily_reset, now),
      tpm: RollingWindow::new(policy.span_ms, now),
      rest: Rest::Clear,
      unexplained: 0,
      shared: None,
    }
  }

  /// The rest in force at `now` (a rest that ended is clear).
  pub fn rest(&self, now: Millis) -> Rest {
    match self.rest {
      Rest::Until { until, .. } if now >= until => Rest::Clear,
      rest => rest,
    }
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

  /// Room for one more request of `estimated_tokens`, and nothing resting it.
  pub fn has_room(&self, now: Millis, estimated_tokens: u64) -> bool {
    let rpm = self.rpm.current(now);
    let tpm = self.tpm.current(now);
    self.rest(now) == Rest::Clear
      && rpm < self.quota.rpm
      && self.rpd.current(now) < self.quota.rpd
      && tpm.saturating_add(estimated_tokens) <= self.quota.tpm
      && tpm < self.quota.tpm
      && self.shared.as_ref().is_none_or(|s| s.can_serve(now, rpm))
  }

  /// Availability score (SPEC section 2): 0.5 x remaining RPM fraction + 0.3 x remaining RPD
  /// fraction + 0.2 x remaining TPM fraction.
  pub fn score(&self, now: Millis) -> f64 {
    let left =
      |current: u64, limit: u64| limit.saturating_sub(current) as f64 / limit.max(1) as f64;
    0.5 * left(self.rpm.current(now), self.quota.rpm)
      + 0.3 * left(self.rpd.current(now), self.quota.rpd)
      + 0.2 * left(self.tpm.current(now), self.quota.tpm)
  }

  /// Counts a request handed out now. Returns true when a shared lease ran low and should be
  /// topped up.
  pub fn reserve(&mut self, now: Millis, estimated_tokens: u64) -> bool {
    self.rpm.add(now, 1);
    self.rpd.add(now, 1);
    self.tpm.add(now, estimated_tokens);
    self.shared.as_mut().is_some_and(|s| s.serve(now))
  }

  /// Takes back a reservation made at `at` for `tokens` (it expired: the request was never made).
  pub fn release(&mut self, now: Millis, at: Millis, tokens: u64) {
    self.rpm.remove(now, at, 1);
    self.rpd.remove(now, at, 1);
    self.tpm.remove(now, at, tokens);
  }

  /// Moves a reservation made at `at` for `estimated` tokens to count from `sent_at` with `tokens`.
  pub fn restamp(&mut self, now: Millis, at: Millis, estimated: u64, sent_at: Millis, tokens: u64) {
    self.rpm.remove(now, at, 1);
    self.rpm.add_at(now, sent_at, 1);
    self.tpm.remove(now, at, estimated);
    self.tpm.add_at(now, sent_at, tokens);
  }

  /// Counts a request no hand-out reserved (a caller reporting a key it did not get here).
  pub fn count(&mut self, now: Millis, sent_at: Millis, tokens: u64) {
    self.rpm.add_at(now, sent_at, 1);
    self.rpd.add(now, 1);
    self.tpm.add_at(now, sent_at, tokens);
  }

  /// Gemini named this budget's limit for a window (a 429's `quotaValue`): a lower one than
  /// configured is the truth of the project's tier, and is taken. Returns the old limit when it
  /// changed. A higher one is not: a lower configured limit may be on purpose.
  pub fn learn_limit(&mut self, limit: LimitType, value: u64) -> Option<u64> {
    let slot = match limit {
      LimitType::Rpm => &mut self.quota.rpm,
      LimitType::Rpd => &mut self.quota.rpd,
      LimitType::Tpm => &mut self.quota.tpm,
    };
    if value == 0 || value >= *slot {
      return None;
    }
    Some(std::mem::replace(slot, value))
  }

  pub fn on_success(&mut self) {
    self.unexplained = 0;
  }

  /// The upstream answered 429 for this budget: it rests as the quota rules say. Returns the rest
  /// now in force when it changed (a longer rest already in force stands).
  pub fn on_rate_limited(
    &mut self,
    now: Millis,
    exhausted: Exhausted,
    retry_after_ms: Option<Millis>,
    policy: &WindowPolicy,
    max_rest_ms: Millis,
  ) -> Option<Rest> {
    let retry = retry_after_ms.map(|d| d.clamp(0, max_rest_ms));
    let rest = match exhausted {
      // A day's quota is spent until the reset: a short retryDelay is not to be believed.
      Exhausted::PerDay => Rest::Until {
        until: policy.daily_reset.next_reset(now),
        limit: Some(LimitType::Rpd),
      },
      Exhausted::PerMinute(limit) => {
        let frees = self.frees_at(limit, now);
        // Nothing counted here and no delay said: others spent the window, which frees within
        // a span at the latest.
        let unseen = retry.is_none() && frees <= now;
        let said = now.saturating_add(retry.unwrap_or(0)).max(frees);
        let until = match (unseen, said > now) {
          (true, _) => now + policy.span_ms,
          (false, true) => said,
          // "0s", and nothing counted to wait for: not straight back all the same.
          (false, false) => now + MIN_MINUTE_REST_MS,
        };
        Rest::Until {
          until,
          limit: Some(limit),
        }
      }
      Exhausted::NoQuota => Rest::NoQuota,
      // Which quota is not said: the delay when one is given, else a rest that grows.
      Exhausted::Unexplained => {
        let rest = match retry {
          Some(delay) => delay.max(MIN_MINUTE_REST_MS),
          None => {
            let grown = FIRST_UNEXPLAINED_REST_MS
              .saturating_mul(1 << self.unexplained.min(16))
              .min(MAX_UNEXPLAINED_REST_MS);
            self.unexplained = self.unexplained.saturating_add(1);
            grown
          }
        };
        Rest::Until {
          until: now + rest,
          limit: None,
        }
      }
    };
    let longer = match (self.rest(now), rest) {
      (Rest::NoQuota, _) => false,
      (Rest::Until { until: held, .. }, Rest::Until { until, .. }) => until > held,
      _ => true,
    };
    if longer {
      if exhausted == Exhausted::PerDay {
        self.rpd.fill(now, self.quota.rpd);
      }
      self.rest = rest;
      Some(rest)
    } else {
      None
    }
  }

  /// Ends any rest: an operator's reset or reactivation.
  pub fn end_rest(&mut self) {
    self.rest = Rest::Clear;
    self.unexplained = 0;
  }

  /// A rest read back from the store.
  pub fn restore_rest(&mut self, rest: Rest, now: Millis) {
    let keep = match (self.rest(now), rest) {
      (_, Rest::Clear) => false,
      (Rest::NoQuota, _) => false,
      (Rest::Until { until: held, .. }, Rest::Until { until, .. }) => until > held,
      _ => true,
    };
    if keep {
      self.rest = rest;
    }
  }

  pub fn clear_windows(&mut self, now: Millis) {
    self.rpm.clear(now);
    self.rpd.clear(now);
    self.tpm.clear(now);
  }

  /// Takes in another budget's counts for the same model: two counts of one quota becoming one
  /// (a key found to belong to this project).
  pub fn absorb(&mut self, other: &Budget, now: Millis) {
    self.rpm.absorb(&other.rpm, now);
    self.rpd.absorb(&other.rpd, now);
    self.tpm.absorb(&other.tpm, now);
    self.restore_rest(other.rest(now), now);
  }

  pub fn figures(&self, now: Millis) -> BudgetFigures {
    let rolling = |w: &RollingWindow, limit: u64| LimitFigures {
      current: w.current(now),
      limit,
      reset_time: w.frees_at(now),
    };
    BudgetFigures {
      rpm: rolling(&self.rpm, self.quota.rpm),
      rpd: LimitFigures {
        current: self.rpd.current(now),
        limit: self.quota.rpd,
        reset_time: self.rpd.frees_at(now),
      },
      tpm: rolling(&self.tpm, self.quota.tpm),
      rest: self.rest(now),
    }
  }
}

/// Who a project is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectName {
  /// Named in the configuration, or learned from Gemini's errors (`projects/123` gives "123").
  Named(String),
  /// The project of one key whose project is not known: the key at this position alone.
  OwnOf(usize),
}

#[derive(Debug, Clone)]
struct Project {
  name: ProjectName,
  /// Its budget of each model, by model id.
  budgets: Vec<BudgetId>,
}

/// Every budget, by project and model: O(1) to find, and nothing is ever removed (positions stay).
#[derive(Debug, Clone)]
pub struct Budgets {
  budgets: Vec<Budget>,
  projects: Vec<Project>,
  /// Each project's budget of the default model, by project: what the hot path looks up, here one
  /// read of a dense array rather than of each project's own list (a cache miss per key in a large
  /// pool). A project's budgets never change once made.
  defaults: Vec<BudgetId>,
  /// Each model's limits, by model id: a budget of a new project gets its model's.
  quotas: Vec<Quota>,
  policy: WindowPolicy,
  /// Budgets are shared with other processes (see [`Self::share`]).
  shared: bool,
}

impl Budgets {
  pub fn new(default_quota: Quota, policy: WindowPolicy) -> Self {
    Self {
      budgets: Vec::new(),
      projects: Vec::new(),
      defaults: Vec::new(),
      quotas: vec![default_quota],
      policy,
      shared: false,
    }
  }

  /// Whether budgets are used only within what this process leased (see [`Self::share`]).
  pub fn is_shared(&self) -> bool {
    self.shared
  }

  /// From now on every budget, present and future, is used only within what this process leased
  /// of it.
  pub fn share(&mut self) {
    self.shared = true;
    for b in &mut self.budgets {
      b.shared.get_or_insert_with(Box::default);
    }
  }

  fn budget(&self, project: ProjectId, model: ModelId, now: Millis) -> Budget {
    let mut budget = Budget::new(project, model, self.quotas[model], &self.policy, now);
    if self.shared {
      budget.shared = Some(Box::default());
    }
    budget
  }

  /// The project named `name`, added (with a budget for every model) if it is new.
  pub fn project(&mut self, name: ProjectName, now: Millis) -> ProjectId {
    if let Some(p) = self.projects.iter().position(|p| p.name == name) {
      return p;
    }
    let id = self.projects.len();
    let budgets: Vec<BudgetId> = (0..self.quotas.len())
      .map(|model| {
        let budget = self.budget(id, model, now);
        self.budgets.push(budget);
        self.budgets.len() - 1
      })
      .collect();
    self.defaults.push(budgets[DEFAULT_MODEL_ID]);
    self.projects.push(Project { name, budgets });
    id
  }

  /// The project called `name`, if there is one.
  #[cfg(test)]
  pub fn find_project(&self, name: &ProjectName) -> Option<ProjectId> {
    self.projects.iter().position(|p| p.name == *name)
  }

  /// Adds a budget of a newly met model to every project.
  pub fn add_model(&mut self, model: ModelId, quota: Quota, now: Millis) {
    debug_assert_eq!(model, self.quotas.len());
    self.quotas.push(quota);
    for p in 0..self.projects.len() {
      let budget = self.budget(p, model, now);
      self.budgets.push(budget);
      self.projects[p].budgets.push(self.budgets.len() - 1);
    }
  }

  /// The budget of `project` for `model`.
  pub fn of(&self, project: ProjectId, model: ModelId) -> BudgetId {
    if model == DEFAULT_MODEL_ID {
      self.defaults[project]
    } else {
      self.projects[project].budgets[model]
    }
  }

  pub fn get(&self, id: BudgetId) -> &Budget {
    &self.budgets[id]
  }

  pub fn get_mut(&mut self, id: BudgetId) -> &mut Budget {
    &mut self.budgets[id]
  }

  pub fn name(&self, project: ProjectId) -> &ProjectName {
    &self.projects[project].name
  }

  pub fn project_count(&self) -> usize {
    self.projects.len()
  }

  /// The budgets of `project`, by model.
  pub fn of_project(&self, project: ProjectId) -> &[BudgetId] {
    &self.projects[project].budgets
  }

  pub fn len(&self) -> usize {
    self.budgets.len()
  }

  pub fn is_empty(&self) -> bool {
    self.budgets.is_empty()
  }

  pub fn iter(&self) -> impl Iterator<Item = (BudgetId, &Budget)> {
    self.budgets.iter().enumerate()
  }

  pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Budget> {
    self.budgets.iter_mut()
  }

  /// Moves `from`'s counts into `into`, model by model (see [`Budget::absorb`]), and clears
  /// `from`. Returns the budget ids remapped, `(from's, into's)` per model.
  pub fn merge(
    &mut self,
    from: ProjectId,
    into: ProjectId,
    now: Millis,
  ) -> Vec<(BudgetId, BudgetId)> {
    let pairs: Vec<(BudgetId, BudgetId)> = self.projects[from]
      .budgets
      .iter()
      .copied()
      .zip(self.projects[into].budgets.iter().copied())
      .collect();
    for &(a, b) in &pairs {
      let taken = self.budgets[a].clone();
      self.budgets[b].absorb(&taken, now);
      self.budgets[a].clear_windows(now);
      self.budgets[a].end_rest();
    }
    pairs
  }
}

#[cfg(test)]
mod tests;
