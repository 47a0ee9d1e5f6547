//! The pool's state for persistence: the keys and budgets changed since the last export, as stored
//! records (their change flags O(1) to set, cleared on export and set again when a write fails);
//! stored records merged back in at start-up or after an outage; and the queue of recorded calls
//! the write-behind task drains.

use crate::core::budget::{BudgetId, ProjectName, Rest};
use crate::core::clock::Millis;
use crate::core::key::{merge_windows, stored_windows};
use crate::core::models::DEFAULT_MODEL_ID;
use crate::core::roster::Names;
use crate::core::snapshot::{BudgetRecord, KeyRecord, RestRecord, UsageIds, UsageRecord};
use crate::core::usage_queue::UsageQueue;
use crate::core::wake::Wake;
use crate::mask::scrub;

use super::{KeyPool, PoolState};

impl PoolState {
  /// How budget `b` is named in the store, as its leases are: for a key of a project of its own
  /// and the default model the key itself (as the leases of one key have always been named),
  /// else the project (or the key) and the model.
  pub(super) fn subject_of(&self, names: &Names, b: BudgetId) -> Option<String> {
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
}

impl KeyPool {
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
  /// yet is met now (those beyond the table's room are left out). Returns the records of budgets
  /// this pool does not hold (another process's keys, say).
  pub fn import_budgets<'r>(
    &self,
    records: &'r [BudgetRecord],
    stored_name: impl Fn(&str) -> String,
  ) -> Vec<&'r BudgetRecord> {
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
    let mut merged = std::collections::HashSet::new();
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
      merged.insert(r.subject.as_str());
    }
    if !merged.is_empty() {
      state.invalidate_caches();
    }
    records
      .iter()
      .filter(|r| !merged.contains(r.subject.as_str()))
      .collect()
  }

  /// Starts queueing recorded calls for storage, with ids from `ids` (see [`UsageQueue::new`]);
  /// calls recorded before are not queued. A second call keeps the first queue, and its ids.
  pub fn enable_usage_queue(&self, capacity: usize, batch: usize, ids: UsageIds, wake: Wake) {
    let mut state = self.state.lock();
    if state.usage.is_none() {
      state.usage = Some(UsageQueue::new(capacity, batch, ids, wake));
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
}
