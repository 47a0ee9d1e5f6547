//! The pool's metrics as JS reads them: `metrics()` builds the object `getMetrics()` returns (its
//! types generated from these shapes), `metricsText()` the Prometheus text `GET /metrics` serves.

use napi_derive::napi;

use crate::core::key::{LimitFigures, STATE_LABELS};
use crate::napi::key_pool::NativeKeyPool;
use crate::stats::metrics::{self, MetricsSnapshot};

/// Counters since the pool started, and every key and budget now.
#[napi(object, object_from_js = false)]
pub struct Metrics {
  /// Keys handed out for a request (getBestAvailableKey, getNextKeyForRotation, execute's picks).
  pub handed_out: f64,
  pub selections: SelectionCounts,
  pub rotations: RotationCounts,
  /// 429s reported (recordUsage or handleRateLimit), by window.
  pub rate_limits: RateLimitCounts,
  /// Calls recorded, and the tokens they reported.
  pub calls: CallCounts,
  pub keys_by_state: KeysByState,
  pub keys: Vec<KeyUse>,
  /// Every (project, model) budget in use: what Gemini counts.
  pub budgets: Vec<BudgetUse>,
}

#[napi(object, object_from_js = false)]
pub struct SelectionCounts {
  /// Selections served from the fresh 5-second cache.
  pub cache_hits: f64,
  /// Selections that rebuilt the cache first.
  pub cache_misses: f64,
  /// cacheHits / (cacheHits + cacheMisses); 0 before the first selection.
  pub cache_hit_rate: f64,
}

#[napi(object, object_from_js = false)]
pub struct RotationCounts {
  /// getNextKeyForRotation moved off a key scoring under 0.3.
  pub proactive: f64,
  /// A reported failure took a key out of rotation (a 429 rest, an open circuit, a deactivation).
  pub on_error: f64,
}

#[napi(object, object_from_js = false)]
pub struct RateLimitCounts {
  pub total: f64,
  pub rpm: f64,
  pub rpd: f64,
  pub tpm: f64,
}

#[napi(object, object_from_js = false)]
pub struct CallCounts {
  pub successes: f64,
  pub failures: f64,
  pub tokens: f64,
}

/// How many listed keys are in each state (removed keys are not listed).
#[napi(object, object_from_js = false)]
pub struct KeysByState {
  pub active: f64,
  pub resting: f64,
  #[napi(js_name = "circuit-open")]
  pub circuit_open: f64,
  #[napi(js_name = "half-open")]
  pub half_open: f64,
  pub deactivated: f64,
  #[napi(js_name = "no-quota")]
  pub no_quota: f64,
  pub disabled: f64,
}

impl KeysByState {
  /// From the counts in [`metrics::LISTED_STATES`] order, which these fields follow.
  fn of(counts: [u64; metrics::LISTED_STATES.len()]) -> Self {
    let [active, resting, circuit_open, half_open, deactivated, no_quota, disabled] =
      counts.map(|n| n as f64);
    Self {
      active,
      resting,
      circuit_open,
      half_open,
      deactivated,
      no_quota,
      disabled,
    }
  }
}

/// Current use of one window.
#[napi(object, object_from_js = false)]
pub struct WindowUse {
  pub current: f64,
  pub limit: f64,
}

impl From<&LimitFigures> for WindowUse {
  fn from(w: &LimitFigures) -> Self {
    Self {
      current: w.current as f64,
      limit: w.limit as f64,
    }
  }
}

/// One key now.
#[napi(object, object_from_js = false)]
pub struct KeyUse {
  /// Masked.
  pub api_key: String,
  pub state: String,
  pub availability_score: f64,
  pub rpm: WindowUse,
  pub rpd: WindowUse,
  pub tpm: WindowUse,
}

/// One (project, model) budget now.
#[napi(object, object_from_js = false)]
pub struct BudgetUse {
  /// The project's name, or `key:` and the masked key for a key whose project is not known.
  pub project: String,
  pub model: String,
  pub state: String,
  pub availability_score: f64,
  pub rpm: WindowUse,
  pub rpd: WindowUse,
  pub tpm: WindowUse,
}

impl From<MetricsSnapshot> for Metrics {
  fn from(m: MetricsSnapshot) -> Self {
    let c = &m.counters;
    Self {
      handed_out: c.handed_out as f64,
      selections: SelectionCounts {
        cache_hits: c.cache_hits as f64,
        cache_misses: c.cache_misses as f64,
        cache_hit_rate: m.cache_hit_rate(),
      },
      rotations: RotationCounts {
        proactive: c.proactive_rotations as f64,
        on_error: c.error_rotations as f64,
      },
      rate_limits: RateLimitCounts {
        total: c.rate_limits.iter().sum::<u64>() as f64,
        rpm: c.rate_limits[0] as f64,
        rpd: c.rate_limits[1] as f64,
        tpm: c.rate_limits[2] as f64,
      },
      calls: CallCounts {
        successes: c.successes as f64,
        failures: c.failures as f64,
        tokens: c.tokens as f64,
      },
      keys_by_state: KeysByState::of(m.keys_by_state()),
      keys: m
        .keys
        .iter()
        .map(|k| KeyUse {
          api_key: k.api_key.clone(),
          state: STATE_LABELS
            .get(k.state)
            .copied()
            .unwrap_or("active")
            .to_owned(),
          availability_score: k.availability_score,
          rpm: (&k.windows[0]).into(),
          rpd: (&k.windows[1]).into(),
          tpm: (&k.windows[2]).into(),
        })
        .collect(),
      budgets: m
        .budgets
        .iter()
        .map(|b| BudgetUse {
          project: b.project.clone(),
          model: b.model.clone(),
          state: b.state.to_owned(),
          availability_score: b.availability_score,
          rpm: (&b.windows[0]).into(),
          rpd: (&b.windows[1]).into(),
          tpm: (&b.windows[2]).into(),
        })
        .collect(),
    }
  }
}

#[napi]
impl NativeKeyPool {
  /// The metrics (see `getMetrics` in index.d.ts).
  #[napi]
  pub fn metrics(&self) -> napi::Result<Metrics> {
    Ok(self.pool().metrics()?.into())
  }

  /// The metrics in the Prometheus text exposition format.
  #[napi]
  pub fn metrics_text(&self) -> napi::Result<String> {
    Ok(metrics::prometheus_text(&self.pool().metrics()?))
  }
}
