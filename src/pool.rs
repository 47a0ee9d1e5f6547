//! The key pool: every key's state behind one short lock, and the operations of the old service's
//! API applied to it atomically. Nothing here allocates on the selection and usage paths (a failure's
//! message aside), blocks on I/O, or prints while the lock is held. What changed is tracked for the
//! write-behind layer (`persistence`): a flag per changed key and a queue of recorded calls, both
//! O(1) to add to.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::call_log::{Call, CallLog, DEFAULT_CALL_LOG_CAPACITY};
use crate::clock::{Clock, Millis};
use crate::config::{js_number, PoolConfig};
use crate::counters::Counters;
use crate::error::PoolError;
use crate::failure::{classify, Failure};
use crate::health::{HealthChange, HealthState};
use crate::key::{Admission, KeyFigures, KeyState, KeyStatus, RateLimitInfo};
use crate::log::Log;
use crate::mask::{mask_key, scrub};
use crate::metrics::{KeyMetrics, MetricsSnapshot};
use crate::quota::{LimitType, Quota, WindowPolicy};
use crate::roster::{Namer, Names, Roster};
use crate::selection::{
  availability_score, Rotation, RotationReason, Selection, SelectionCache, SelectionMethod,
};
use crate::share::{Answer, LeaseNeed, Occurrence, SharedWindow};
use crate::store::{AdmissionRecord, KeyRecord, UsageIds, UsageReader, UsageRecord};
use crate::usage_log::{UsageEntry, UsageLog};
use crate::usage_stats::DateRange;

/// Longest rest a retry delay can impose: a day, the longest window there is.
const MAX_REST_MS: Millis = 86_400_000;
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

struct PoolState {
  keys: Vec<KeyState>,
  cache: SelectionCache,
  last_rotation: Millis,
  /// The latest time any operation ran at.
  last_now: Millis,
  closed: bool,
  /// Per key: changed since last exported. `dirty_keys` lists the flagged positions, so marking is
  /// O(1) and exporting is O(changed keys) however large the pool.
  dirty: Vec<bool>,
  dirty_keys: Vec<usize>,
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
  }

  /// Notes an operator's change to key `index`, for the store.
  fn admission_changed(&mut self, index: usize) {
    if !self.admission_changed.contains(&index) {
      self.admission_changed.push(index);
    }
    self.touch(index);
    self.cache.invalidate();
  }

  /// A key new to the pool at the next position, counted from `now`.
  fn push_key(&mut self, key: KeyState) -> usize {
    let index = self.keys.len();
    let mut key = key;
    if self.lease_wake.is_some() {
      key.shared = Some(Box::default());
    }
    self.keys.push(key);
    self.dirty.push(false);
    self.touch(index);
    self.cache.invalidate();
    index
  }

  /// Applies `claim` to the key just chosen; returns its figures.
  fn claim(&mut self, index: usize, claim: Claim, now: Millis, ttl: Millis) -> KeyFigures {
    if let Claim::Reserve { estimated_tokens } = claim {
      self.counters.handed_out += 1;
      let key = &mut self.keys[index];
      key.expire_reservations(now, ttl);
      if key.reserve(now, estimated_tokens) {
        if let Some(wake) = &self.lease_wake {
          wake.notify_one();
        }
      }
      self.touch(index);
    }
    self.keys[index].figures(now)
  }

  /// Releases every key's expired reservations when the cache is about to be rebuilt, so that
  /// keys no one touches get their room back at least every cache lifetime.
  fn count_selection(&mut self, method: SelectionMethod) {
    match method {
      SelectionMethod::CachedRoundRobin => self.counters.cache_hits += 1,
      SelectionMethod::RoundRobin => self.counters.cache_misses += 1,
    }
  }

  /// Counts what a call reported: a 429 on `limited`'s window, and a key taken out of rotation.
  fn count_outcome(&mut self, limited: Option<LimitType>, change: HealthChange) {
    if let Some(limit) = limited {
      self.counters.rate_limits[limit as usize] += 1;
    }
    if change != HealthChange::Unchanged {
      self.counters.error_rotations += 1;
    }
  }

  fn expire_before_rebuild(&mut self, now: Millis, ttl: Millis) {
    if self.cache.is_stale(now) {
      for index in 0..self.keys.len() {
        if self.keys[index].expire_reservations(now, ttl) {
          self.touch(index);
        }
      }
    }
  }
}

pub struct KeyPool {
  state: Mutex<PoolState>,
  /// The keys by position, read without the pool's lock; keys are added to it under the lock.
  roster: Roster,
  /// The limits a key added at run time gets.
  quota: Quota,
  policy: WindowPolicy,
  clock: Arc<dyn Clock>,
  log: Arc<dyn Log>,
  /// Issues the ids of recorded calls, for the pool's life: a batch resent after a failed write,
  /// even through a new connection, must carry the ids it had.
  usage_ids: UsageIds,
  /// Reads the stored usage while MongoDB is connected: usage statistics are computed from it.
  usage_reader: Mutex<Option<UsageReader>>,
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
fn response_time(ms: f64) -> f64 {
  if ms.is_finite() && ms >= 0.0 {
    ms
  } else {
    0.0
  }
}

/// Checks a token count given as a JS number: a non-negative integer no larger than
/// [`MAX_TOKENS_PER_CALL`].
pub fn validate_tokens(tokens: f64) -> Result<u64, PoolError> {
  if tokens.is_finite()
    && tokens >= 0.0
    && tokens.fract() == 0.0
    && tokens <= MAX_TOKENS_PER_CALL as f64
  {
    Ok(tokens as u64)
  } else {
    Err(PoolError::InvalidTokens {
      got: js_number(tokens),
      max: MAX_TOKENS_PER_CALL,
    })
  }
}

/// How long a rate-limited key rests: the delay the upstream asked for, else until the named
/// window (RPM when unnamed) frees by our count, else a whole span.
fn rest_until(
  key: &KeyState,
  now: Millis,
  limit: Option<LimitType>,
  retry_after_ms: Option<Millis>,
  span_ms: Millis,
) -> Millis {
  if let Some(delay) = retry_after_ms {
    return now.saturating_add(delay.clamp(0, MAX_REST_MS));
  }
  let limit = limit.unwrap_or(LimitType::Rpm);
  let frees = key.frees_at(limit, now);
  if frees > now {
    frees
  } else {
    now + span_ms
  }
}

fn seconds(ms: Millis) -> String {
  format!("{:.1}s", ms as f64 / 1_000.0)
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
    let keys: Vec<KeyState> = config
      .keys
      .iter()
      .map(|k| KeyState::new(k.clone(), config.quota, &config.policy, now))
      .collect();
    let n = keys.len();
    Ok(Self {
      state: Mutex::new(PoolState {
        keys,
        cache: SelectionCache::default(),
        last_rotation: now,
        last_now: now,
        closed: false,
        dirty: vec![false; n],
        dirty_keys: Vec::with_capacity(n),
        admission_changed: Vec::new(),
        usage: None,
        lease_wake: None,
        calls: CallLog::new(DEFAULT_CALL_LOG_CAPACITY),
        counters: Counters::default(),
      }),
      roster: Roster::new(config.keys),
      quota: config.quota,
      policy: config.policy,
      clock,
      log,
      usage_ids: UsageIds::new(),
      usage_reader: Mutex::new(None),
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

  /// The key at `index`, masked.
  pub fn masked(&self, index: usize) -> String {
    self.names().get(index).map(mask_key).unwrap_or_default()
  }

  /// The position of `key`, if it is in the pool (not removed).
  pub fn index_of(&self, key: &str) -> Result<usize, PoolError> {
    let index = self.names().position(key).ok_or(PoolError::KeyNotFound)?;
    self.with_live_key(index, |_, _| index)
  }

  /// Adds `key` to the pool, or brings it back if it was removed: it is handed out from now on.
  /// With a store, other processes sharing it learn of it too.
  pub fn add_key(&self, key: &str) -> Result<usize, PoolError> {
    check_key_text(key)?;
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
          let mut new = KeyState::new(key.to_owned(), self.quota, &self.policy, now);
          new.added = true;
          new.admitted_at = now;
          let index = state.push_key(new);
          debug_assert_eq!(i, index);
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

  /// The key a request the router sends goes out with. `asked` is the pool key the caller's
  /// request carried, if any: when that key has a hand-out no routed request used yet (the caller
  /// asked the pool just before), the request goes with it and uses its reservation. Otherwise the
  /// best key is handed out for it, reserved at once. `Err` says when a key could next go, when
  /// none can now (`None`: none will by itself).
  pub fn route_key(
    &self,
    asked: Option<usize>,
  ) -> Result<Result<RouteKey, Option<Millis>>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    let chosen = self.with_state(|state, now| {
      if let Some(key) = asked.and_then(|i| state.keys.get_mut(i)) {
        if key.pending.len() > key.routed.in_flight as usize && key.admission == Admission::Enabled
        {
          key.routed.in_flight += 1;
          key.restamp_reservation(now);
          return asked.map(|index| RouteKey { index, at: now });
        }
      }
      state.expire_before_rebuild(now, ttl);
      let pick = state.cache.next(&state.keys, now, 0)?;
      state.count_selection(pick.method);
      state.claim(
        pick.index,
        Claim::Reserve {
          estimated_tokens: 0,
        },
        now,
        ttl,
      );
      state.keys[pick.index].routed.in_flight += 1;
      Some(RouteKey {
        index: pick.index,
        at: now,
      })
    })?;
    match chosen {
      Some(key) => Ok(Ok(key)),
      None => Ok(Err(self.next_available_at(0)?)),
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
    self.record(key.index, tokens, outcome, response_time_ms, by)
  }

  /// A request chosen a key by [`Self::route_key`] that will never be counted (its caller went
  /// away before it was): its hold on the reservation ends, the reservation expires in its time.
  pub fn abandon_routed(&self, key: RouteKey) {
    let mut state = self.state.lock();
    if let Some(k) = state.keys.get_mut(key.index) {
      k.routed.in_flight = k.routed.in_flight.saturating_sub(1);
    }
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
    state
      .admission_changed
      .drain(..)
      .map(|i| {
        let key = &state.keys[i];
        AdmissionRecord {
          api_key: key.key.clone(),
          admission: key.admission,
          changed_at: key.admitted_at,
          added: key.added,
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
  /// unless a later one was made to the key here; a key added elsewhere joins the pool. Returns
  /// how many keys changed.
  pub fn follow_admissions(&self, records: &[AdmissionRecord]) -> usize {
    let mut changes = Vec::new();
    {
      let mut state = self.state.lock();
      let now = self.clock.now_ms().max(state.last_now);
      for r in records {
        if check_key_text(&r.api_key).is_err() {
          continue;
        }
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
            let mut key = KeyState::new(r.api_key.clone(), self.quota, &self.policy, now);
            key.added = true;
            key.admission = r.admission;
            key.admitted_at = r.changed_at;
            state.push_key(key)
          }
        };
        state.cache.invalidate();
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

  /// `getBestAvailableKey`: the next available key round-robin from the score-sorted cache. A
  /// reserving claim counts the request on the key at once, so concurrent callers never share a
  /// key's last unit of capacity.
  pub fn best(&self, claim: Claim) -> Result<Picked<Selection>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    self
      .with_state(|state, now| {
        state.expire_before_rebuild(now, ttl);
        let pick = state
          .cache
          .next(&state.keys, now, claim.estimated_tokens())?;
        state.count_selection(pick.method);
        Some(Picked {
          pick,
          figures: state.claim(pick.index, claim, now, ttl),
        })
      })?
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `getNextKeyForRotation`: moves off a key under the rotation threshold, or behaves as
  /// [`Self::best`].
  pub fn rotate(&self, claim: Claim) -> Result<Picked<Rotation>, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    self
      .with_state(|state, now| {
        state.expire_before_rebuild(now, ttl);
        let pick = state
          .cache
          .rotation(&state.keys, now, claim.estimated_tokens())?;
        state.last_rotation = now;
        state.count_selection(pick.selection.method);
        if pick.reason == RotationReason::Proactive {
          state.counters.proactive_rotations += 1;
        }
        Some(Picked {
          pick,
          figures: state.claim(pick.selection.index, claim, now, ttl),
        })
      })?
      .ok_or(PoolError::NoActiveKeys)
  }

  /// `recordUsage`: settles the request's reservation with its real token count. A success clears
  /// the error streak; a failure is read for what it says about the key (see [`classify`]): a 429
  /// rests it, a refusal deactivates it, anything else counts toward opening its circuit. Error
  /// messages are stored with every key in them masked (scrubbed before the lock is taken). When
  /// usage is being stored, the call is queued for it with `response_time_ms`.
  pub fn record_usage(
    &self,
    index: usize,
    tokens: u64,
    outcome: Outcome<'_>,
    response_time_ms: f64,
  ) -> Result<KeyFigures, PoolError> {
    self.record(index, tokens, outcome, response_time_ms, Reporter::Caller)
  }

  fn record(
    &self,
    index: usize,
    tokens: u64,
    outcome: Outcome<'_>,
    response_time_ms: f64,
    by: Reporter,
  ) -> Result<KeyFigures, PoolError> {
    let failure = match outcome {
      Outcome::Failure(error) => {
        let message: String = scrub(error, self.names().keys())
          .chars()
          .take(MAX_ERROR_CHARS)
          .collect();
        Some((message, classify(error)))
      }
      Outcome::Success => None,
    };
    let ttl = self.policy.reservation_ttl_ms;
    let span = self.policy.span_ms;
    let (figures, change, limited) = self.with_key(index, |state, now| {
      let key = &mut state.keys[index];
      match by {
        // The router counted this call already: the caller's own report of it is not another.
        Reporter::Caller if key.routed.take_report(now, ttl) => {
          return (key.figures(now), HealthChange::Unchanged, None);
        }
        Reporter::Caller => {}
        Reporter::Router { .. } => {
          key.routed.in_flight = key.routed.in_flight.saturating_sub(1);
        }
      }
      let sent_at = match by {
        Reporter::Caller => now,
        Reporter::Router { sent_at, .. } => sent_at,
      };
      state.touch(index);
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
          error: failure.as_ref().map(|(message, _)| message.clone()),
          response_time: response_time(response_time_ms),
        });
      }
      let key = &mut state.keys[index];
      key.expire_reservations(now, ttl);
      key.settle(now, sent_at, tokens, failure.is_none());
      let mut limited = None;
      let change = match failure {
        None => {
          key.health.on_success(now);
          key.clear_error();
          HealthChange::Unchanged
        }
        Some((message, kind)) => {
          key.record_error(message, now);
          match kind {
            Failure::RateLimited {
              retry_after_ms,
              limit,
            } => {
              limited = Some(limit.unwrap_or(LimitType::Rpm));
              key.rested_for = limit;
              let until = rest_until(key, now, limit, retry_after_ms, span);
              key.health.on_rate_limited(now, until)
            }
            Failure::KeyRejected => key.health.on_key_rejected(),
            Failure::Transient => key.health.on_transient_failure(now),
          }
        }
      };
      if change != HealthChange::Unchanged {
        state.cache.invalidate();
      }
      state.count_outcome(limited, change);
      (state.keys[index].figures(now), change, limited)
    })?;
    if let Some(limit) = limited {
      self.log_rate_limit(index, limit, change);
    } else {
      self.log_change(index, change, &figures);
    }
    Ok(figures)
  }

  /// `handleRateLimit`: the upstream answered 429 for this window. The key rests until the window
  /// frees (or for `retry_after_ms`, when the upstream said); it is not counted against the key.
  pub fn handle_rate_limit(
    &self,
    index: usize,
    limit_type: LimitType,
    retry_after_ms: Option<Millis>,
  ) -> Result<KeyFigures, PoolError> {
    let span = self.policy.span_ms;
    let ttl = self.policy.reservation_ttl_ms;
    let (figures, change) = self.with_key(index, |state, now| {
      let key = &mut state.keys[index];
      // A 429 the router answered, or already read from Gemini: no rest of the key for it.
      if key.routed.take_rate_limit(now, ttl) {
        return (key.figures(now), None);
      }
      state.touch(index);
      let key = &mut state.keys[index];
      key.record_error(
        format!("Rate limit exceeded ({})", limit_type.as_str()),
        now,
      );
      key.rested_for = Some(limit_type);
      let until = rest_until(key, now, Some(limit_type), retry_after_ms, span);
      let change = key.health.on_rate_limited(now, until);
      state.cache.invalidate();
      state.count_outcome(Some(limit_type), change);
      (state.keys[index].figures(now), Some(change))
    })?;
    if let Some(change) = change {
      self.log_rate_limit(index, limit_type, change);
    }
    Ok(figures)
  }

  fn log_rate_limit(&self, index: usize, limit: LimitType, change: HealthChange) {
    let rest = match change {
      HealthChange::Rested { until } => format!(" (resting for {})", seconds(until - self.now())),
      _ => String::new(),
    };
    self.log.warn(&format!(
      "⚠️ Rate limit hit for {} on API key {}{rest}",
      limit.as_str(),
      self.masked(index)
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

  /// Back in service with a clean record.
  pub fn reactivate(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_live_key(index, |state, now| {
      state.touch(index);
      let key = &mut state.keys[index];
      key.health.reactivate();
      key.error_count = 0;
      state.cache.invalidate();
      state.keys[index].figures(now)
    })
  }

  /// Fresh windows for every key, and the end of every rate-limit rest (open circuits and
  /// deactivations stand: they are about failures, not quota).
  pub fn reset_all_limits(&self) -> Result<(), PoolError> {
    self.with_state(|state, now| {
      for key in &mut state.keys {
        key.clear_windows(now);
        key.health.end_rest(now);
      }
      state.touch_all();
      state.cache.invalidate();
    })
  }

  /// Rebuilds the selection cache now; returns how many keys are available.
  pub fn refresh_cache(&self) -> Result<usize, PoolError> {
    let ttl = self.policy.reservation_ttl_ms;
    let available = self.with_state(|state, now| {
      state.cache.invalidate();
      state.expire_before_rebuild(now, ttl);
      state.cache.rebuild(&state.keys, now)
    })?;
    self.log.info("✅ Cache refreshed successfully");
    Ok(available)
  }

  /// When a key could next be handed out for a request of `estimated_tokens`: "not yet, until T"
  /// for callers that would rather wait than fail. `None` when no key will be by itself (every key
  /// is deactivated, or a half-open key's trial is still out). Costs O(keys): for the failure path.
  pub fn next_available_at(&self, estimated_tokens: u64) -> Result<Option<Millis>, PoolError> {
    self.with_state(|state, now| {
      state
        .keys
        .iter()
        .filter_map(|key| {
          // A request larger than the key's whole TPM never fits, however long one waits; a key
          // out of service comes back only when an operator says so.
          if estimated_tokens > key.quota.tpm || key.admission != Admission::Enabled {
            return None;
          }
          let mut at = match key.health.state(now) {
            HealthState::Deactivated | HealthState::HalfOpen { trial_out: true } => return None,
            state => state.until().unwrap_or(now),
          };
          for limit in LimitType::ALL {
            let wanted = if limit == LimitType::Tpm {
              estimated_tokens.max(1)
            } else {
              1
            };
            if key.current(limit, now).saturating_add(wanted) > key.limit(limit) {
              at = at.max(key.frees_at(limit, now));
            }
          }
          if let Some(shared) = &key.shared {
            let recent = key.rpm.current(now);
            at = at.max(shared.available_at(now, recent, key.rpm.frees_at(now)));
          }
          Some(at)
        })
        .min()
    })
  }

  pub fn figures(&self, index: usize) -> Result<KeyFigures, PoolError> {
    self.with_key(index, |state, now| state.keys[index].figures(now))
  }

  pub fn last_error(&self, index: usize) -> Result<Option<String>, PoolError> {
    self.with_key(index, |state, _| state.keys[index].last_error.clone())
  }

  /// Every key ever in the pool, removed ones too, by position.
  pub fn every_status(&self) -> Result<Vec<KeyStatus>, PoolError> {
    self.with_state(|state, now| state.keys.iter().map(|k| k.status(now)).collect())
  }

  /// Every key in the pool (not removed), in position order.
  pub fn statuses(&self) -> Result<Vec<KeyStatus>, PoolError> {
    self.with_state(|state, now| {
      state
        .keys
        .iter()
        .filter(|k| k.admission != Admission::Removed)
        .map(|k| k.status(now))
        .collect()
    })
  }

  pub fn rate_limit_info(&self, index: usize) -> Result<[RateLimitInfo; 3], PoolError> {
    self.with_live_key(index, |state, now| state.keys[index].rate_limit_info(now))
  }

  /// The round-robin position and when a key was last handed out by rotation: the rest of the
  /// SPEC's `ApiKeyManager`.
  pub fn rotation_state(&self) -> Result<(usize, Millis), PoolError> {
    self.with_state(|state, _| (state.cache.cursor(), state.last_rotation))
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

  /// The keys changed since the last export, as stored records; their change flags are cleared.
  /// Works on a closed pool, so that closing can flush.
  pub fn export_dirty(&self) -> Vec<KeyRecord> {
    let now = self.clock.now_ms();
    let mut state = self.state.lock();
    let state = &mut *state;
    let records = state
      .dirty_keys
      .iter()
      .map(|&i| state.keys[i].to_record(now))
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

  /// Flags every key as changed, so the next export writes the whole pool.
  pub fn mark_all_dirty(&self) {
    self.state.lock().touch_all();
  }

  /// Merges stored records into the pool (see [`KeyState::merge_record`]): counters of open
  /// windows become the larger of the two sides; health and errors come from the record unless
  /// the key changed here since its last export. A record names its key by the key or by its
  /// stored name; records of keys not in the pool are ignored. Returns how many were merged.
  pub fn import(&self, records: &[KeyRecord]) -> usize {
    let now = self.clock.now_ms();
    let names = self.names();
    let mut state = self.state.lock();
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
        state.keys[i].merge_record(&record, now, local_wins);
        merged += 1;
      }
    }
    if merged > 0 {
      state.cache.invalidate();
    }
    merged
  }

  /// From now on, hands out a key only within what this process leased of its shared quota (see
  /// `share`): until the first leases arrive no key is available. Returns what the pool notifies
  /// when a lease runs low; a second call returns the same and changes nothing else.
  pub fn share_quota(&self) -> Arc<Notify> {
    let mut state = self.state.lock();
    if let Some(wake) = &state.lease_wake {
      return wake.clone();
    }
    let wake = Arc::new(Notify::new());
    state.lease_wake = Some(wake.clone());
    for key in &mut state.keys {
      key.shared = Some(Box::default());
    }
    state.cache.invalidate();
    wake
  }

  /// What the leasing task should ask the store for now, per key and window. Deactivated keys need
  /// nothing. Every need returned must be answered with [`Self::leases_granted`].
  pub fn lease_needs(&self) -> Vec<(usize, SharedWindow, LeaseNeed)> {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut needs = Vec::new();
    for (index, key) in state.keys.iter_mut().enumerate() {
      // Keys out of service hold nothing of the budget others could use.
      if key.health.is_deactivated() || key.admission != Admission::Enabled {
        continue;
      }
      let limits = [key.quota.rpm, key.quota.rpd];
      let Some(shared) = key.shared.as_deref_mut() else {
        continue;
      };
      for (window, limit) in SharedWindow::ALL.into_iter().zip(limits) {
        if let Some(need) = shared
          .allowance_mut(window)
          .need(window, now, limit, span, daily)
        {
          needs.push((index, window, need));
        }
      }
    }
    needs
  }

  /// Applies the store's answers to [`Self::lease_needs`]: how much each got, or `None` when the
  /// store could not be asked. A key that could not serve before and can now is made visible to
  /// selection at once.
  pub fn leases_granted(&self, answers: &[(usize, SharedWindow, LeaseNeed, Option<Answer>)]) {
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut newly_available = false;
    for (index, window, need, answer) in answers {
      let Some(key) = state.keys.get_mut(*index) else {
        continue;
      };
      let recent = key.rpm.current(now);
      let Some(shared) = key.shared.as_deref_mut() else {
        continue;
      };
      let could = shared.can_serve(now, recent);
      shared.allowance_mut(*window).granted(need, *answer, now);
      newly_available |= !could && shared.can_serve(now, recent);
    }
    if newly_available {
      state.cache.invalidate();
    }
  }

  /// While the store cannot be reached: every key serves `1 / peers` of each shared limit in the
  /// windows it holds no good lease for (see [`crate::share::Allowance::grant_locally`]).
  pub fn grant_locally(&self, peers: usize) {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let peers = peers.max(1) as u64;
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut granted = false;
    for key in &mut state.keys {
      let limits = [key.quota.rpm, key.quota.rpd];
      let Some(shared) = key.shared.as_deref_mut() else {
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
      state.cache.invalidate();
    }
  }

  /// Per key and window, what is held and not served in windows still open, and what was served
  /// and not yet reported: what to give back and report when the process leaves.
  pub fn unused_leases(&self) -> Vec<(usize, SharedWindow, Occurrence, u64, u64)> {
    let state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut unused = Vec::new();
    for (index, key) in state.keys.iter().enumerate() {
      let Some(shared) = key.shared.as_deref() else {
        continue;
      };
      for (window, allowance) in [
        (SharedWindow::Rpm, &shared.rpm),
        (SharedWindow::Rpd, &shared.rpd),
      ] {
        unused.extend(
          allowance
            .unused(now)
            .map(|(occurrence, left, spent)| (index, window, occurrence, left, spent)),
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

  /// The counters and every key's figures, at one instant; keys masked.
  pub fn metrics(&self) -> Result<MetricsSnapshot, PoolError> {
    let (counters, figures) = self.with_state(|state, now| {
      let figures: Vec<_> = state
        .keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.admission != Admission::Removed)
        .map(|(i, k)| (i, k.figures(now), availability_score(k, now)))
        .collect();
      (state.counters, figures)
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
    Ok(MetricsSnapshot { counters, keys })
  }

  /// Where usage statistics read the stored usage from: set while MongoDB is connected.
  pub fn set_usage_reader(&self, reader: Option<UsageReader>) {
    *self.usage_reader.lock() = reader;
  }

  pub fn usage_reader(&self) -> Option<UsageReader> {
    self.usage_reader.lock().clone()
  }

  /// Refuses every later call. Idempotent.
  pub fn close(&self) {
    self.state.lock().closed = true;
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::clock::FakeClock;
  use crate::health::FIRST_BACKOFF_MS;
  use crate::log::CapturedLog;
  use crate::quota::Quota;
  use crate::selection::{RotationReason, SelectionMethod, CACHE_TTL_MS};
  use crate::window::MINUTE_MS;

  const T0: Millis = 1_800_000_000_000;
  const RESERVE: Claim = Claim::Reserve {
    estimated_tokens: 0,
  };

  fn pool_with(keys: &[&str], quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
    let clock = FakeClock::at(T0);
    let log = Arc::new(CapturedLog::default());
    let config = PoolConfig {
      keys: keys.iter().map(|k| k.to_string()).collect(),
      quota,
      policy: WindowPolicy::default(),
      warnings: vec![],
    };
    let pool = KeyPool::new(config, Arc::new(clock.clone()), log.clone()).unwrap();
    (pool, clock, log)
  }

  fn names(n: usize) -> Vec<String> {
    (0..n)
      .map(|i| format!("AIzaSyTESTKEY{i:04}abcdefghijkl"))
      .collect()
  }

  fn pool(n: usize) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
    let names = names(n);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    pool_with(&refs, Quota::default())
  }

  fn small(n: usize, quota: Quota) -> (KeyPool, FakeClock, Arc<CapturedLog>) {
    let names = names(n);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    pool_with(&refs, quota)
  }

  fn logged(log: &CapturedLog) -> Vec<String> {
    log.0.lock().clone()
  }

  /// A routed request on whatever key `route_key` gives, answered after `latency` ms.
  fn routed(
    p: &KeyPool,
    clock: &FakeClock,
    asked: Option<usize>,
    latency: Millis,
    tokens: u64,
  ) -> usize {
    let key = p.route_key(asked).unwrap().unwrap();
    clock.advance(latency);
    p.finish_routed(key, tokens, Outcome::Success, latency as f64)
      .unwrap();
    key.index
  }

  #[test]
  fn a_routed_request_uses_the_callers_hand_out_once_and_counts_from_when_it_went_out() {
    let (p, clock, _) = pool(2);
    let handed = p.best(RESERVE).unwrap().pick.index;
    clock.advance(3_000);
    let first = p.route_key(Some(handed)).unwrap().unwrap();
    assert_eq!(
      first.index, handed,
      "the hand-out's key, its reservation used"
    );
    // Another request with the same key and no hand-out left gets the best key, reserved anew.
    let second = p.route_key(Some(handed)).unwrap().unwrap();
    assert_ne!(second.index, handed);
    clock.advance(2_000);
    p.finish_routed(first, 40, Outcome::Success, 2_000.0)
      .unwrap();
    p.finish_routed(second, 60, Outcome::Success, 2_000.0)
      .unwrap();
    let a = p.figures(handed).unwrap();
    assert_eq!((a.rpm.current, a.rpd.current, a.tpm.current), (1, 1, 40));
    // Counted from when it was sent (3 s), not from the hand-out nor the answer.
    assert_eq!(
      a.rpm.reset_time,
      crate::window::counted_until(MINUTE_MS, T0 + 3_000)
    );
    let b = p.figures(second.index).unwrap();
    assert_eq!((b.rpm.current, b.tpm.current), (1, 60));
  }

  #[test]
  fn the_callers_own_reports_of_a_routed_call_are_not_counted_again() {
    let (p, clock, log) = pool(2);
    let index = routed(&p, &clock, Some(0), 100, 25);
    p.routed_answer(0, false);
    // The app reports the call on the key its client was built with, with its own estimate.
    p.record_usage(0, 999, Outcome::Success, 100.0).unwrap();
    let counted: u64 = (0..2).map(|i| p.figures(i).unwrap().rpm.current).sum();
    assert_eq!(counted, 1);
    assert_eq!(p.figures(index).unwrap().tpm.current, 25);
    assert_eq!(p.metrics().unwrap().counters.successes, 1);
    // A 429 the router answered itself: the app's failure report and handleRateLimit rest nothing.
    p.routed_answer(1, true);
    p.record_usage(
      1,
      0,
      Outcome::Failure("[429 Too Many Requests] no room"),
      3.0,
    )
    .unwrap();
    p.handle_rate_limit(1, LimitType::Rpm, None).unwrap();
    let f = p.figures(1).unwrap();
    assert_eq!((f.state, f.error_count), (HealthState::Active, 0));
    assert!(logged(&log).iter().all(|l| !l.contains("Rate limit hit")));
    // Reports owed expire with the reservation lifetime; later ones count as before.
    clock.advance(WindowPolicy::default().reservation_ttl_ms);
    p.record_usage(0, 5, Outcome::Success, 10.0).unwrap();
    assert_eq!(p.metrics().unwrap().counters.successes, 2);
  }

  #[test]
  fn route_key_says_when_a_key_frees_or_that_none_will() {
    let (p, clock, _) = small(
      1,
      Quota {
        rpm: 1,
        rpd: 100,
        tpm: 1_000_000,
      },
    );
    routed(&p, &clock, None, 50, 1);
    assert_eq!(
      p.route_key(None).unwrap(),
      Err(Some(crate::window::counted_until(MINUTE_MS, T0)))
    );
    p.admit(0, Admission::Disabled).unwrap();
    assert_eq!(p.route_key(Some(0)).unwrap(), Err(None));
  }

  #[test]
  fn a_429_from_gemini_on_a_routed_request_rests_its_key() {
    let (p, _, _) = pool(2);
    let key = p.route_key(None).unwrap().unwrap();
    p.finish_routed(
      key,
      0,
      Outcome::Failure("429 {\"error\":{\"code\":429}}"),
      5.0,
    )
    .unwrap();
    assert!(matches!(
      p.figures(key.index).unwrap().state,
      HealthState::Resting { .. }
    ));
    assert_ne!(p.route_key(None).unwrap().unwrap().index, key.index);
  }

  #[test]
  fn best_reserves_marks_last_used_and_reports_method_and_score() {
    let (p, clock, _) = pool(2);
    clock.advance(10);
    let a = p.best(RESERVE).unwrap();
    assert_eq!(a.pick.method, SelectionMethod::RoundRobin);
    assert_eq!(a.pick.total_available, 2);
    assert_eq!(a.figures.last_used, T0 + 10);
    assert_eq!(a.pick.score, 1.0);
    assert_eq!(a.figures.rpm.current, 1);
    let b = p.best(RESERVE).unwrap();
    assert_eq!(b.pick.method, SelectionMethod::CachedRoundRobin);
    assert_ne!(a.pick.index, b.pick.index);
  }

  #[test]
  fn hand_out_then_record_counts_once() {
    let (p, _, _) = pool(1);
    let picked = p.best(RESERVE).unwrap();
    let f = p
      .record_usage(picked.pick.index, 120, Outcome::Success, 0.0)
      .unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (1, 1, 120));
    // Usage for a key that was not handed out counts as before.
    let f = p.record_usage(0, 30, Outcome::Success, 0.0).unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (2, 2, 150));
  }

  #[test]
  fn never_more_than_k_times_l_handed_out_per_window() {
    let (p, clock, _) = small(
      3,
      Quota {
        rpm: 5,
        rpd: 1_000,
        tpm: 1_000_000,
      },
    );
    let mut handed = 0;
    for _ in 0..100 {
      if p.best(RESERVE).is_ok() {
        handed += 1;
      }
      clock.advance(100); // ten seconds in all: still inside one minute
    }
    assert_eq!(handed, 15);
    assert_eq!(p.best(RESERVE).unwrap_err(), PoolError::NoActiveKeys);
    // The rolling minute frees them (plus one slice, plus the cache's life).
    clock.advance(MINUTE_MS + CACHE_TTL_MS);
    assert!(p.best(RESERVE).is_ok());
  }

  #[test]
  fn a_clock_that_steps_back_never_leaves_a_reservation_unsettled() {
    let (p, clock, _) = pool(1);
    clock.advance(5_000);
    p.best(RESERVE).unwrap();
    clock.advance(-3_000);
    let f = p.record_usage(0, 10, Outcome::Success, 0.0).unwrap();
    assert_eq!(f.rpm.current, 1, "settled, not counted twice");
    assert_eq!(f.last_used, T0 + 5_000);
  }

  #[test]
  fn a_huge_retry_delay_rests_at_most_a_day() {
    let (p, _, _) = pool(1);
    p.handle_rate_limit(0, LimitType::Rpm, Some(Millis::MAX))
      .unwrap();
    assert_eq!(
      p.figures(0).unwrap().state,
      HealthState::Resting {
        until: T0 + MAX_REST_MS
      }
    );
  }

  #[test]
  fn long_errors_are_masked_before_they_are_cut() {
    let (p, _, _) = pool(2);
    // The key straddles the cut: masked first, nothing of its middle survives.
    let error = format!(
      "{}{}",
      "x".repeat(MAX_ERROR_CHARS - 10),
      p.names().keys()[1]
    );
    p.record_usage(0, 0, Outcome::Failure(&error), 0.0).unwrap();
    let stored = p.last_error(0).unwrap().unwrap();
    assert_eq!(stored.chars().count(), MAX_ERROR_CHARS);
    assert!(!stored.contains("TESTKEY0001"));
  }

  #[test]
  fn imported_error_messages_are_masked() {
    let (p, _, _) = pool(2);
    let mut record = p.export_dirty().pop().unwrap_or_else(|| {
      p.mark_all_dirty();
      p.export_dirty().remove(0)
    });
    record.api_key = p.names().keys()[0].clone();
    record.last_error = Some(format!("old service saw {}", p.names().keys()[1]));
    assert_eq!(p.import(&[record]), 1);
    assert_eq!(
      p.last_error(0).unwrap().as_deref(),
      Some("old service saw AIzaSyTE...ijkl")
    );
  }

  #[test]
  fn next_available_at_says_when_capacity_frees() {
    let (p, clock, _) = small(
      2,
      Quota {
        rpm: 1,
        rpd: 100,
        tpm: 1_000_000,
      },
    );
    assert_eq!(p.next_available_at(0).unwrap(), Some(T0));
    p.best(RESERVE).unwrap();
    clock.advance(1_000);
    p.best(RESERVE).unwrap();
    assert_eq!(p.best(RESERVE).unwrap_err(), PoolError::NoActiveKeys);
    // The first key's request, counted in the slice at T0, frees first.
    assert_eq!(
      p.next_available_at(0).unwrap(),
      Some(crate::window::counted_until(MINUTE_MS, T0))
    );
    p.handle_rate_limit(0, LimitType::Rpm, Some(120_000))
      .unwrap();
    assert_eq!(
      p.next_available_at(0).unwrap(),
      Some(crate::window::counted_until(MINUTE_MS, T0 + 1_000))
    );
    assert_eq!(p.next_available_at(1_000_001).unwrap(), None);
    p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID"), 0.0)
      .unwrap();
    assert_eq!(p.next_available_at(0).unwrap(), Some(T0 + 1_000 + 120_000));
  }

  #[test]
  fn unsettled_reservations_expire_on_their_own() {
    let (p, clock, _) = small(
      1,
      Quota {
        rpm: 1_000,
        rpd: 2,
        tpm: 1_000_000,
      },
    );
    p.best(RESERVE).unwrap();
    p.best(RESERVE).unwrap();
    assert_eq!(p.best(RESERVE).unwrap_err(), PoolError::NoActiveKeys);
    clock.advance(MINUTE_MS);
    // The daily count got both back.
    assert_eq!(p.best(RESERVE).unwrap().figures.rpd.current, 1);
  }

  #[test]
  fn estimated_tokens_reserve_tpm_and_are_corrected_by_the_real_count() {
    let (p, _, _) = small(
      1,
      Quota {
        rpm: 100,
        rpd: 100,
        tpm: 1_000,
      },
    );
    let a = p
      .best(Claim::Reserve {
        estimated_tokens: 600,
      })
      .unwrap();
    assert_eq!(a.figures.tpm.current, 600);
    // No room for another 600 until the first is settled with its real count.
    assert_eq!(
      p.best(Claim::Reserve {
        estimated_tokens: 600
      })
      .unwrap_err(),
      PoolError::NoActiveKeys
    );
    let f = p.record_usage(0, 150, Outcome::Success, 0.0).unwrap();
    assert_eq!(f.tpm.current, 150);
    p.refresh_cache().unwrap();
    assert_eq!(
      p.best(Claim::Reserve {
        estimated_tokens: 600
      })
      .unwrap()
      .figures
      .tpm
      .current,
      750
    );
  }

  #[test]
  fn a_429_rests_the_key_for_the_retry_delay_without_counting_toward_deactivation() {
    let (p, clock, log) = pool(2);
    let body = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;
    for _ in 0..10 {
      p.best(RESERVE).unwrap();
      p.record_usage(0, 0, Outcome::Failure(body), 0.0).unwrap();
    }
    let f = p.figures(0).unwrap();
    assert!(f.active);
    assert_eq!(f.state, HealthState::Resting { until: T0 + 17_000 });
    for _ in 0..3 {
      assert_eq!(p.best(RESERVE).unwrap().pick.index, 1);
    }
    clock.advance(17_000);
    assert_eq!(p.figures(0).unwrap().state, HealthState::Active);
    assert!(logged(&log)[0].starts_with("⚠️ Rate limit hit for RPM on API key AIzaSyTE...ijkl"));
  }

  #[test]
  fn handle_rate_limit_rests_until_the_window_frees_and_logs_masked() {
    let (p, clock, log) = pool(2);
    p.best(RESERVE).unwrap();
    clock.advance(5_000);
    p.handle_rate_limit(0, LimitType::Rpm, None).unwrap();
    let info = p.rate_limit_info(0).unwrap();
    assert!(info[0].is_limited);
    // The request counted at T0 leaves the rolling minute at the end of its slice, a minute and
    // a margin later.
    assert_eq!(
      info[0].reset_time,
      crate::window::counted_until(MINUTE_MS, T0)
    );
    assert_eq!(p.figures(0).unwrap().error_count, 1);
    assert_eq!(p.best(RESERVE).unwrap().pick.index, 1);
    let lines = logged(&log);
    assert_eq!(
      lines[0],
      "⚠️ Rate limit hit for RPM on API key AIzaSyTE...ijkl (resting for 55.1s)"
    );
    p.handle_rate_limit(1, LimitType::Rpd, Some(2_000)).unwrap();
    assert_eq!(
      p.figures(1).unwrap().state,
      HealthState::Resting { until: T0 + 7_000 }
    );
  }

  #[test]
  fn repeated_server_errors_open_the_circuit_and_a_trial_success_closes_it() {
    let (p, clock, log) = pool(2);
    for _ in 0..3 {
      p.record_usage(0, 0, Outcome::Failure("[503 Service Unavailable]"), 0.0)
        .unwrap();
    }
    let f = p.figures(0).unwrap();
    assert!(f.active);
    assert_eq!(
      f.state,
      HealthState::CircuitOpen {
        until: T0 + FIRST_BACKOFF_MS
      }
    );
    assert!(logged(&log)[0].contains("resting for 5.0s after 3 consecutive errors"));
    for _ in 0..3 {
      assert_eq!(p.best(RESERVE).unwrap().pick.index, 1);
    }
    clock.advance(FIRST_BACKOFF_MS);
    p.refresh_cache().unwrap();
    let trial = (0..2)
      .map(|_| p.best(RESERVE).unwrap().pick.index)
      .collect::<Vec<_>>();
    assert!(trial.contains(&0));
    assert_eq!(
      p.figures(0).unwrap().state,
      HealthState::HalfOpen { trial_out: true }
    );
    p.record_usage(0, 10, Outcome::Success, 0.0).unwrap();
    assert_eq!(p.figures(0).unwrap().state, HealthState::Active);
  }

  #[test]
  fn only_a_refused_key_is_deactivated_until_reactivated() {
    let (p, _, log) = pool(2);
    p.record_usage(
      0,
      0,
      Outcome::Failure("API key not valid. [API_KEY_INVALID]"),
      0.0,
    )
    .unwrap();
    assert!(!p.figures(0).unwrap().active);
    for _ in 0..4 {
      assert_eq!(p.best(RESERVE).unwrap().pick.index, 1);
    }
    assert!(logged(&log)
      .iter()
      .any(|l| l.starts_with("⚠️ API key deactivated due to 1 consecutive errors")));
    p.reactivate(0).unwrap();
    let f = p.figures(0).unwrap();
    assert!(f.active);
    assert_eq!(f.error_count, 0);
  }

  #[test]
  fn recorded_errors_never_hold_a_full_key() {
    let (p, _, _) = pool(2);
    let quoted = format!("403 on ?key={}", p.names().keys()[1]);
    p.record_usage(0, 0, Outcome::Failure(&quoted), 0.0)
      .unwrap();
    assert_eq!(
      p.last_error(0).unwrap().as_deref(),
      Some("403 on ?key=AIzaSyTE...ijkl")
    );
  }

  #[test]
  fn peek_shows_the_rotation_without_spending_quota() {
    let (p, _, _) = pool(2);
    let a = p.best(Claim::LookOnly).unwrap();
    let b = p.rotate(Claim::LookOnly).unwrap().pick.selection;
    assert_ne!(a.pick.index, b.index);
    assert_eq!(p.figures(0).unwrap().rpm.current, 0);
    assert_eq!(p.figures(1).unwrap().rpm.current, 0);
  }

  #[test]
  fn reset_all_limits_gives_fresh_windows_and_ends_rests() {
    let (p, clock, _) = pool(1);
    p.best(RESERVE).unwrap();
    p.record_usage(0, 99, Outcome::Success, 0.0).unwrap();
    p.handle_rate_limit(0, LimitType::Rpd, None).unwrap();
    clock.advance(5);
    p.reset_all_limits().unwrap();
    let f = p.figures(0).unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (0, 0, 0));
    assert_eq!(f.state, HealthState::Active);
  }

  #[test]
  fn rotate_reports_proactive_rotation() {
    let (p, _, _) = pool_with(
      &["weak-key-0123456789", "strong-key-0123456789"],
      Quota {
        rpm: 10,
        rpd: 10,
        tpm: 1000,
      },
    );
    for _ in 0..9 {
      p.record_usage(0, 0, Outcome::Success, 0.0).unwrap();
    }
    let r = p.rotate(RESERVE).unwrap();
    assert_eq!(p.metrics().unwrap().counters.proactive_rotations, 1);
    assert_eq!(r.pick.reason, RotationReason::Proactive);
    assert_eq!(r.pick.selection.index, 1);
    assert!(r.pick.previous_key_score.unwrap() < 0.3);
    assert_eq!(r.figures.rpm.current, 1);
  }

  #[test]
  fn unknown_keys_and_closed_pools_are_errors() {
    let (p, _, _) = pool(1);
    assert_eq!(p.index_of("nope"), Err(PoolError::KeyNotFound));
    assert_eq!(p.figures(7).unwrap_err(), PoolError::KeyNotFound);
    p.close();
    p.close();
    assert_eq!(p.best(RESERVE).unwrap_err(), PoolError::Closed);
    assert_eq!(
      p.record_usage(0, 1, Outcome::Success, 0.0).unwrap_err(),
      PoolError::Closed
    );
  }

  fn exported(p: &KeyPool) -> Vec<String> {
    p.export_dirty().into_iter().map(|r| r.api_key).collect()
  }

  #[test]
  fn every_mutation_marks_its_key_for_export_and_export_clears_the_marks() {
    let (p, clock, _) = pool(3);
    let k = p.names().keys().to_vec();
    assert!(exported(&p).is_empty());
    // Looking is not changing.
    p.best(Claim::LookOnly).unwrap();
    p.figures(1).unwrap();
    assert!(exported(&p).is_empty());
    let picked = p.best(RESERVE).unwrap().pick.index;
    assert_eq!(exported(&p), vec![k[picked].clone()]);
    assert!(exported(&p).is_empty());
    p.record_usage(2, 5, Outcome::Success, 1.0).unwrap();
    p.record_usage(2, 5, Outcome::Failure("503"), 1.0).unwrap();
    p.handle_rate_limit(1, LimitType::Rpm, None).unwrap();
    assert_eq!(exported(&p), vec![k[2].clone(), k[1].clone()]);
    p.reactivate(0).unwrap();
    assert_eq!(exported(&p), vec![k[0].clone()]);
    p.reset_all_limits().unwrap();
    assert_eq!(exported(&p).len(), 3);
    // A reservation that expires changes the key's counts.
    p.best(RESERVE).unwrap();
    exported(&p);
    clock.advance(MINUTE_MS + CACHE_TTL_MS);
    p.best(Claim::LookOnly).unwrap();
    assert_eq!(exported(&p).len(), 1);
    // A failed write marks its keys again.
    p.record_usage(0, 1, Outcome::Success, 0.0).unwrap();
    let records = p.export_dirty();
    p.mark_dirty(&records);
    assert_eq!(exported(&p), vec![k[0].clone()]);
    p.mark_all_dirty();
    assert_eq!(exported(&p).len(), 3);
  }

  #[test]
  fn exported_state_imports_into_a_restarted_pool() {
    let (p, clock, _) = pool(2);
    p.record_usage(0, 400, Outcome::Success, 12.0).unwrap();
    p.record_usage(
      1,
      0,
      Outcome::Failure("API key not valid. [API_KEY_INVALID]"),
      3.0,
    )
    .unwrap();
    p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID again"), 3.0)
      .unwrap();
    let records = p.export_dirty();
    clock.advance(1_000);
    let (q, qclock, _) = pool(2);
    qclock.set(clock.now_ms());
    assert_eq!(q.import(&records), 2);
    let (a, b) = (q.figures(0).unwrap(), q.figures(1).unwrap());
    assert_eq!((a.rpm.current, a.rpd.current, a.tpm.current), (1, 1, 400));
    assert!(a.active && !b.active);
    assert_eq!(b.error_count, 2);
    assert_eq!(
      q.last_error(1).unwrap().as_deref(),
      Some("API_KEY_INVALID again")
    );
    assert_eq!(a.last_used, T0);
    // Importing does not itself mark keys: the caller decides what to write.
    assert!(exported(&q).is_empty());
    // Records of unknown keys are ignored; windows whose reset time passed are not counted.
    let mut stale = records.clone();
    stale[0].api_key = "someone-else".into();
    stale[1].rpd.reset_time = qclock.now_ms();
    stale[1].rpd.current = 150;
    assert_eq!(q.import(&stale), 1);
    assert_eq!(q.figures(1).unwrap().rpd.current, 0);
  }

  #[test]
  fn importing_after_an_outage_keeps_the_larger_counts_and_local_errors() {
    let (p, _, _) = pool(1);
    for _ in 0..3 {
      p.record_usage(0, 10, Outcome::Success, 0.0).unwrap();
    }
    let stored = p.export_dirty();
    // Meanwhile, offline: two more calls, and an error.
    p.record_usage(0, 10, Outcome::Success, 0.0).unwrap();
    p.record_usage(0, 10, Outcome::Success, 0.0).unwrap();
    p.record_usage(0, 0, Outcome::Failure("503"), 0.0).unwrap();
    p.import(&stored);
    let f = p.figures(0).unwrap();
    assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (5, 5, 50));
    assert_eq!(f.error_count, 1);
    let mut bigger = stored.clone();
    bigger[0].rpm.current = 9;
    p.import(&bigger);
    assert_eq!(p.figures(0).unwrap().rpm.current, 9);
  }

  #[test]
  fn recorded_calls_are_queued_with_stable_ids_only_once_enabled() {
    let (p, clock, _) = pool(2);
    p.record_usage(0, 1, Outcome::Success, 5.0).unwrap();
    assert!(p.take_usage(10).is_empty());
    let wake = Arc::new(tokio::sync::Notify::new());
    p.enable_usage_log(3, 2, wake);
    clock.advance(5);
    p.record_usage(0, 10, Outcome::Success, 120.5).unwrap();
    let quoted = format!("403 for {}", p.names().keys()[1]);
    p.record_usage(1, 0, Outcome::Failure(&quoted), f64::NAN)
      .unwrap();
    p.record_usage(1, 2, Outcome::Success, -1.0).unwrap();
    p.record_usage(0, 3, Outcome::Success, 1.0).unwrap();
    assert_eq!(p.usage_backlog(), (3, 1));
    let usage = p.take_usage(2);
    assert_eq!(usage.len(), 2);
    let (failed, ok) = (&usage[0], &usage[1]);
    assert_eq!(failed.api_key, p.names().keys()[1]);
    assert_eq!(failed.timestamp, T0 + 5);
    assert!(!failed.success);
    assert_eq!(failed.error.as_deref(), Some("403 for AIzaSyTE...ijkl"));
    assert_eq!(failed.response_time, 0.0);
    assert_eq!(
      (ok.success, ok.tokens_used, ok.response_time),
      (true, 2, 0.0)
    );
    assert_eq!(ok.id.seq, failed.id.seq + 1);
    assert_eq!(ok.id.source, failed.id.source);
    p.close();
    // A closed pool still hands over what it holds, so closing can flush.
    assert_eq!(p.take_usage(10).len(), 1);
    assert_eq!(p.usage_backlog(), (0, 1));
  }

  #[test]
  fn metrics_count_hand_outs_cache_hits_rotations_and_429s() {
    let (p, _, _) = pool(2);
    p.best(RESERVE).unwrap();
    p.best(RESERVE).unwrap();
    // Looking is a selection, not a hand-out.
    p.best(Claim::LookOnly).unwrap();
    p.record_usage(0, 10, Outcome::Success, 5.0).unwrap();
    p.record_usage(1, 0, Outcome::Failure("429 RESOURCE_EXHAUSTED"), 1.0)
      .unwrap();
    p.handle_rate_limit(0, LimitType::Tpm, None).unwrap();
    let m = p.metrics().unwrap();
    let c = m.counters;
    assert_eq!(c.handed_out, 2);
    assert_eq!((c.cache_hits, c.cache_misses), (2, 1));
    assert_eq!(c.rate_limits, [1, 0, 1]);
    assert_eq!(c.error_rotations, 2);
    assert_eq!((c.successes, c.failures, c.tokens), (1, 1, 10));
    assert_eq!(m.keys[0].api_key, "AIzaSyTE...ijkl");
    assert_eq!(m.keys[0].windows[2].current, 10);
    assert_eq!(m.keys_by_state(), [0, 2, 0, 0, 0, 0]);
  }

  #[test]
  fn recent_calls_are_kept_in_a_bounded_log() {
    let (p, clock, _) = pool(2);
    p.keep_calls(3);
    for i in 0..4 {
      clock.advance(10);
      p.record_usage(i % 2, 5, Outcome::Success, i as f64)
        .unwrap();
    }
    let all = p.recent_calls(DateRange::ALL).unwrap();
    assert_eq!((all.calls.len(), all.truncated, all.capacity), (3, true, 3));
    let late = p
      .recent_calls(DateRange::new(Some(T0 + 30), None).unwrap())
      .unwrap();
    assert!(!late.truncated);
    let mut held: Vec<_> = late.calls.iter().map(|c| (c.timestamp, c.key)).collect();
    held.sort_unstable();
    assert_eq!(held, vec![(T0 + 30, 0), (T0 + 40, 1)]);
  }

  #[test]
  fn token_counts_must_be_whole_non_negative_and_bounded() {
    assert_eq!(validate_tokens(0.0), Ok(0));
    assert_eq!(validate_tokens(1234.0), Ok(1234));
    for bad in [-1.0, 0.5, f64::NAN, f64::INFINITY, 1e12] {
      assert!(
        matches!(validate_tokens(bad), Err(PoolError::InvalidTokens { .. })),
        "{bad}"
      );
    }
  }

  #[test]
  fn operators_decisions_are_exported_once_and_again_after_a_failed_write() {
    let (p, clock, log) = pool(2);
    let new = "AIzaSyTESTKEYNEWWabcdefghijkl";
    assert_eq!(p.add_key(new).unwrap(), 2);
    clock.advance(5);
    p.admit(0, Admission::Disabled).unwrap();
    let exported = p.export_admissions();
    assert_eq!(
      exported,
      vec![
        AdmissionRecord {
          api_key: new.into(),
          admission: Admission::Enabled,
          changed_at: T0,
          added: true,
        },
        AdmissionRecord {
          api_key: p.names().keys()[0].clone(),
          admission: Admission::Disabled,
          changed_at: T0 + 5,
          added: false,
        },
      ]
    );
    assert!(p.export_admissions().is_empty());
    p.mark_admissions(&exported[1..]);
    assert_eq!(p.export_admissions(), exported[1..].to_vec());
    let lines = logged(&log);
    assert!(
      lines.contains(&"✅ API key AIzaSyTE...ijkl added".to_owned()),
      "{lines:?}"
    );
    assert!(lines
      .iter()
      .any(|l| l.starts_with("⚠️ API key") && l.ends_with("disabled")));
    // Disabling what is disabled changes nothing and says nothing.
    assert!(!p.admit(0, Admission::Disabled).unwrap());
  }

  #[test]
  fn decisions_from_other_processes_apply_unless_a_later_one_was_made_here() {
    let (p, clock, log) = pool(2);
    clock.advance(1_000);
    p.admit(1, Admission::Disabled).unwrap();
    let names = p.names();
    let record = |key: &str, admission, changed_at, added| AdmissionRecord {
      api_key: key.into(),
      admission,
      changed_at,
      added,
    };
    let joined = "AIzaSyTESTKEYJOINabcdefghijkl";
    let changed = p.follow_admissions(&[
      // Older than this process's own decision: ignored.
      record(&names.keys()[1], Admission::Enabled, T0 + 500, false),
      record(&names.keys()[0], Admission::Removed, T0 + 700, false),
      record(joined, Admission::Enabled, T0 + 800, true),
      record("not a key", Admission::Enabled, T0, true),
    ]);
    assert_eq!(changed, 2);
    assert_eq!(p.figures(1).unwrap().admission, Admission::Disabled);
    assert_eq!(p.figures(0).unwrap().admission, Admission::Removed);
    assert_eq!(p.names().position(joined), Some(2));
    // What came from the store is not exported back.
    assert!(p
      .export_admissions()
      .iter()
      .all(|r| r.api_key == names.keys()[1]));
    // Only the joined key serves: key 0 is removed, key 1 disabled.
    for _ in 0..4 {
      assert_eq!(p.best(RESERVE).unwrap().pick.index, 2);
    }
    assert_eq!(p.statuses().unwrap().len(), 2);
    assert_eq!(p.index_of(&names.keys()[0]), Err(PoolError::KeyNotFound));
    assert!(logged(&log)
      .iter()
      .any(|l| l.ends_with("removed by another process")));
    // The same records again change nothing.
    assert_eq!(
      p.follow_admissions(&[record(joined, Admission::Enabled, T0 + 800, true)]),
      0
    );
  }

  #[test]
  fn a_removed_key_keeps_its_history_and_takes_a_late_report() {
    let (p, _, _) = pool(2);
    let picked = p.best(RESERVE).unwrap().pick.index;
    p.admit(picked, Admission::Removed).unwrap();
    // The call handed out before the removal still reports.
    let f = p.record_usage(picked, 10, Outcome::Success, 1.0).unwrap();
    assert_eq!((f.rpm.current, f.admission), (1, Admission::Removed));
    assert!(!f.active);
    assert_eq!(p.every_status().unwrap().len(), 2);
    assert_eq!(p.metrics().unwrap().keys.len(), 1);
    assert_eq!(
      p.rate_limit_info(picked).unwrap_err(),
      PoolError::KeyNotFound
    );
    assert_eq!(
      p.admit(picked, Admission::Enabled).unwrap_err(),
      PoolError::KeyNotFound
    );
    assert_eq!(
      p.add_key(&p.names().keys()[1 - picked].clone()),
      Err(PoolError::DuplicateKey)
    );
  }

  #[test]
  fn keys_out_of_service_need_no_leases_and_added_ones_share_too() {
    let (p, _, _) = pool(2);
    p.share_quota();
    p.admit(0, Admission::Disabled).unwrap();
    let added = p.add_key("AIzaSyTESTKEYLEASabcdefghijkl").unwrap();
    let needs: Vec<usize> = p.lease_needs().iter().map(|(i, _, _)| *i).collect();
    assert!(!needs.contains(&0), "{needs:?}");
    assert!(needs.contains(&1) && needs.contains(&added), "{needs:?}");
  }

  #[test]
  fn rotation_state_follows_the_round_robin_and_rotations() {
    let (p, clock, _) = pool(3);
    p.best(RESERVE).unwrap();
    assert_eq!(p.rotation_state().unwrap(), (1, T0));
    clock.advance(7);
    p.rotate(RESERVE).unwrap();
    assert_eq!(p.rotation_state().unwrap().1, T0 + 7);
    assert_eq!(p.statuses().unwrap().len(), 3);
  }
}
