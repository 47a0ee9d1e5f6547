//! The pool's statistics: the counters and every key's and budget's figures at one instant
//! (`metrics`), and the recent calls kept in memory for usage statistics without a database.

use crate::core::budget::{BudgetView, ProjectName};
use crate::core::error::PoolError;
use crate::core::key::Admission;
use crate::core::models::DEFAULT_MODEL_ID;
use crate::mask::mask_key;
use crate::stats::metrics::{BudgetMetrics, KeyMetrics, MetricsSnapshot};
use crate::stats::recent_calls::{Call, CallLog};
use crate::stats::usage_stats::DateRange;

use super::KeyPool;

/// The in-memory log's calls in a range, for usage statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentCalls {
  pub calls: Vec<Call>,
  /// Calls of the range may be missing: the log has overwritten calls no older than its start.
  pub truncated: bool,
  /// How many calls the log keeps.
  pub capacity: usize,
}

impl KeyPool {
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
}
