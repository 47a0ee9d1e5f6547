//! The router's requests: the key a request goes out with (the caller's own hand-out when it has
//! one no routed request used yet), what it did when it is answered, and what happens to its
//! reservation when it never leaves or its caller goes away.

use crate::core::clock::Millis;
use crate::core::error::PoolError;
use crate::core::key::{Admission, KeyFigures};
use crate::core::models::ModelId;

use super::hand_out::Claim;
use super::report::{Outcome, Reporter};
use super::KeyPool;

/// The key a routed request goes out with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteKey {
  pub index: usize,
  pub model: ModelId,
  /// When it was chosen, just before the request goes out: the request counts from then.
  pub at: Millis,
}

impl KeyPool {
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
}
