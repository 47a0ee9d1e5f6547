//! Reports of calls: `recordUsage` (from callers, and from the router for the requests it sent)
//! and `handleRateLimit`. A report settles the call's reservation, counts it, and reads a failure
//! for what it says: a 429 rests the key's project budget, an overload backs the model off, a
//! refusal deactivates the key, anything else counts toward opening its circuit. What changed is
//! logged once the lock is released.

use crate::core::budget::{BudgetId, Exhausted, ProjectName, Rest};
use crate::core::clock::{Millis, DAY_MS, SECOND_MS};
use crate::core::config::{js_number, project_name};
use crate::core::error::PoolError;
use crate::core::failure::{classify, consumer_project, Failure, QuotaScope, RateLimit};
use crate::core::health::HealthChange;
use crate::core::key::KeyFigures;
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::core::quota::LimitType;
use crate::core::usage_queue::UsageEntry;
use crate::mask::scrub;
use crate::stats::recent_calls::Call;

use super::{KeyPool, PoolState};

/// Longest rest a retry delay can impose: a day, the longest window there is.
pub(super) const MAX_REST_MS: Millis = DAY_MS;

/// Longest error message kept, in characters (after masking, so no key is cut in half unmasked).
pub(super) const MAX_ERROR_CHARS: usize = 4_096;

/// Largest token count one call may report: far above any model's context, and exact in a JS number.
pub const MAX_TOKENS_PER_CALL: u64 = u32::MAX as u64;

/// Who reports a call: its caller (`recordUsage`), or the router that sent it at `sent_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reporter {
  Caller,
  Router { sent_at: Millis },
}

/// What a call did, as reported to `record_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
  Success,
  Failure(&'a str),
}

/// Something to log once the lock is released.
enum Note {
  Warn(String),
  Info(String),
}

/// What a rest did, for the log.
struct Rested {
  index: usize,
  limit: LimitType,
  rest: Rest,
  budget: BudgetId,
}

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

/// A recorded call's latency as the caller reported it, in ms; anything but a non-negative finite
/// number (a missing one included) is stored as 0 rather than failing the call it describes.
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

/// A duration as the log shows it: seconds, to a tenth.
fn seconds(ms: Millis) -> String {
  format!("{:.1}s", ms as f64 / SECOND_MS as f64)
}

impl PoolState {
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

impl KeyPool {
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

  /// [`Self::record_usage`] for either reporter: a caller's report, or the router's own.
  pub(super) fn record(
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
          id: usage.next_id(),
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

  /// Says what a failure did to the key's health, if anything.
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

  /// Logs what was noted under the lock, the key masked.
  fn log_notes(&self, index: usize, notes: impl IntoIterator<Item = Note>) {
    for note in notes {
      match note {
        Note::Warn(text) => self.log.warn(&text.replace("{key}", &self.masked(index))),
        Note::Info(text) => self.log.info(&text.replace("{key}", &self.masked(index))),
      }
    }
  }
}
