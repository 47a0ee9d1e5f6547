//! Operators' changes to keys: adding one, taking one out of the pool or out of service and back
//! (its admission), reactivating one, resetting every limit; and how the admissions travel
//! between processes sharing a store (exported here, followed from there).

use crate::core::budget::{BudgetId, ProjectName, Rest};
use crate::core::config::project_name;
use crate::core::error::PoolError;
use crate::core::key::{Admission, KeyFigures};
use crate::core::snapshot::AdmissionRecord;

use super::{KeyPool, PoolState};

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

impl PoolState {
  /// Notes an operator's change to key `index`, for the store.
  fn admission_changed(&mut self, index: usize) {
    if !self.admission_changed.contains(&index) {
      self.admission_changed.push(index);
    }
    self.touch(index);
    self.invalidate_caches();
  }
}

impl KeyPool {
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

  /// Refuses keys added from now on, saying why (`None` accepts them again): a store that cannot
  /// keep a key without exposing it sets this.
  pub fn refuse_additions(&self, reason: Option<String>) {
    *self.additions_refused.lock() = reason;
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

  /// Says an admission changed, `by` naming who changed it when not this process's operator.
  fn log_admission(&self, index: usize, admission: Admission, by: &str) {
    let key = self.masked(index);
    match admission {
      Admission::Enabled => self.log.info(&format!("✅ API key {key} enabled{by}")),
      Admission::Disabled => self.log.warn(&format!("⚠️ API key {key} disabled{by}")),
      Admission::Removed => self.log.warn(&format!("⚠️ API key {key} removed{by}")),
    }
  }

  /// The operators' changes made here since the last call, for the store; the pool forgets them
  /// (the caller keeps those whose write fails for its next try).
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
  #[cfg(test)]
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
}
