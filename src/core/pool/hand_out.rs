//! Handing keys out: `getBestAvailableKey` and `getNextKeyForRotation` for a model, from its
//! score-sorted selection cache, each reserving its request on the key's project budget under the
//! one lock; and when a key could next be handed out, for callers that would rather wait.

use crate::core::budget::Rest;
use crate::core::clock::{Millis, SECOND_MS};
use crate::core::error::PoolError;
use crate::core::health::HealthState;
use crate::core::key::{Admission, KeyFigures};
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::core::quota::LimitType;
use crate::core::selection::{
  Candidates, Rotation, RotationReason, Selection, SelectionCache, SelectionMethod,
};

use super::{KeyPool, PoolState};

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
  /// The tokens a hand-out counts on TPM until its call is reported.
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

impl PoolState {
  /// What a selection for `model` chooses among, and that model's cache to choose with.
  pub(super) fn selection(&mut self, model: ModelId) -> (Candidates<'_>, &mut SelectionCache) {
    let candidates = Candidates {
      keys: &self.keys,
      budgets: &self.budgets,
      model,
      overload: &self.models.get(model).overload,
    };
    (candidates, &mut self.caches[model])
  }

  /// Releases key `index`'s expired reservations; true when any expired.
  pub(super) fn expire_key(&mut self, index: usize, now: Millis, ttl: Millis) -> bool {
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
  pub(super) fn claim(
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
          wake();
        }
      }
      self.models.get_mut(model).overload.on_hand_out(now);
      self.touch(index);
      self.touch_budget(budget);
    }
    self.figures(index, now)
  }

  /// Counts a selection as a cache hit or miss, for metrics.
  pub(super) fn count_selection(&mut self, method: SelectionMethod) {
    match method {
      SelectionMethod::CachedRoundRobin => self.counters.cache_hits += 1,
      SelectionMethod::RoundRobin => self.counters.cache_misses += 1,
    }
  }

  /// Releases every key's expired reservations when `model`'s cache is about to be rebuilt, so
  /// that keys no one touches get their room back at least every cache lifetime.
  pub(super) fn expire_before_rebuild(&mut self, model: ModelId, now: Millis, ttl: Millis) {
    if self.caches[model].is_stale(now) {
      for index in 0..self.keys.len() {
        self.expire_key(index, now, ttl);
      }
    }
  }
}

impl KeyPool {
  /// `getBestAvailableKey` for `model`: the next available key round-robin from the model's
  /// score-sorted cache. A reserving claim counts the request on the key's project budget at once,
  /// so concurrent callers never share a budget's last unit of capacity.
  pub fn best(&self, claim: Claim, model: ModelId) -> Result<Picked<Selection>, PoolError> {
    self.hand_out(
      claim,
      model,
      |state, now| {
        let (candidates, cache) = state.selection(model);
        cache.next(candidates, now, claim.estimated_tokens())
      },
      |selection| *selection,
    )
  }

  /// `getNextKeyForRotation` for `model`: moves off a key under the rotation threshold, or
  /// behaves as [`Self::best`].
  pub fn rotate(&self, claim: Claim, model: ModelId) -> Result<Picked<Rotation>, PoolError> {
    self.hand_out(
      claim,
      model,
      |state, now| {
        let (candidates, cache) = state.selection(model);
        let pick = cache.rotation(candidates, now, claim.estimated_tokens())?;
        state.last_rotation = now;
        if pick.reason == RotationReason::Proactive {
          state.counters.proactive_rotations += 1;
        }
        Some(pick)
      },
      |rotation| rotation.selection,
    )
  }

  /// What [`Self::best`] and [`Self::rotate`] share, under the one lock: the model checked,
  /// expired reservations released before a rebuild, `choose` picking from the model's cache, the
  /// pick counted for metrics and `claim` applied to the key it chose (`selection` says which).
  fn hand_out<T>(
    &self,
    claim: Claim,
    model: ModelId,
    choose: impl FnOnce(&mut PoolState, Millis) -> Option<T>,
    selection: impl Fn(&T) -> Selection,
  ) -> Result<Picked<T>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    self
      .with_state(|state, now| {
        state.check_model(model)?;
        state.expire_before_rebuild(model, now, ttl);
        let Some(pick) = choose(state, now) else {
          return Ok(None);
        };
        let chosen = selection(&pick);
        state.count_selection(chosen.method);
        Ok(Some(Picked {
          figures: state.claim(chosen.index, model, claim, now, ttl),
          pick,
        }))
      })??
      .ok_or(PoolError::NoActiveKeys)
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
        .unwrap_or(now + SECOND_MS);
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
}
