//! The `NativeKeyPool` class: a pool built from JS options, its hot path, and the calls about one
//! key or all of them. Every call that concerns one key writes its figures into the result slots
//! (`results`), which `lib/index.js` reads.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use napi::bindgen_prelude::{Either, Env, Object};
use napi_derive::napi;

use crate::core::clock::SystemClock;
use crate::core::config::{self, js_number, KeySpec, PoolConfig};
use crate::core::error::PoolError;
use crate::core::key::{Admission, STATE_LABELS};
use crate::core::models::ModelId;
use crate::core::pool::{validate_tokens, Claim, KeyPool, Outcome};
use crate::core::quota::LimitType;
use crate::log::{ConsoleLog, Log, SilentLog};
use crate::napi::errors::bad_input;
use crate::napi::fast_path::{self, JsPool};
use crate::napi::options::{KeyOption, PoolOptions};
use crate::napi::results::{Results, Slot, METHODS, REASONS, RESULTS_LEN, SLOT_NAMES};
use crate::persistence::WriteBehind;

/// How to read the result slots: their names in order, and the strings that the `method` and
/// `rotationReason` slots' codes stand for.
#[napi(object)]
pub struct ResultsLayout {
  pub slots: Vec<String>,
  pub length: u32,
  pub methods: Vec<String>,
  pub reasons: Vec<String>,
  pub states: Vec<String>,
}

/// The layout of the `results` array of `NativeKeyPool.hotPath()`.
#[napi]
pub fn results_layout() -> ResultsLayout {
  ResultsLayout {
    slots: SLOT_NAMES.iter().map(|s| s.to_string()).collect(),
    length: RESULTS_LEN as u32,
    methods: METHODS.iter().map(|m| m.as_str().to_owned()).collect(),
    reasons: REASONS.iter().map(|r| r.as_str().to_owned()).collect(),
    states: STATE_LABELS.iter().map(|s| s.to_string()).collect(),
  }
}

/// A key position given by JS.
fn at(index: u32) -> usize {
  index as usize
}

/// A model id given by JS (see `modelId`); none: the default model, or for a report whatever
/// model its hand-out was for.
fn model(id: Option<u32>) -> Option<ModelId> {
  id.map(|m| m as ModelId)
}

/// One (project, model) budget of a key, as listings show it.
#[napi(object)]
pub struct BudgetEntry {
  pub model: String,
  /// `active`, `resting`, `no-quota` or `overloaded`.
  pub state: String,
  /// When a rest (or the model's back-off) ends, in epoch ms.
  pub state_until: Option<f64>,
  pub availability_score: f64,
  pub rpm: WindowEntry,
  pub rpd: WindowEntry,
  pub tpm: WindowEntry,
}

/// One window's use.
#[napi(object)]
pub struct WindowEntry {
  pub current: f64,
  pub limit: f64,
  /// Epoch ms.
  pub reset_time: f64,
}

/// A key's project and its budgets of every model met.
#[napi(object)]
pub struct KeyBudgets {
  /// Its project's name; null for a key whose project is not known (a project of its own).
  pub project: Option<String>,
  pub models: Vec<BudgetEntry>,
}

fn window_entry(w: &crate::core::budget::LimitFigures) -> WindowEntry {
  WindowEntry {
    current: w.current as f64,
    limit: w.limit as f64,
    reset_time: w.reset_time as f64,
  }
}

/// A pool of Gemini API keys. Methods that concern one key write its figures into the result slots.
#[napi]
pub struct NativeKeyPool {
  pub(super) js: Rc<JsPool>,
  pub(super) log: Arc<dyn Log>,
  /// The MongoDB writer, once `attachStore` has started it.
  pub(super) writer: Arc<parking_lot::Mutex<Option<Arc<WriteBehind>>>>,
  /// Set by the first `attachStore` that gets past its checks: the writer arrives only later, so
  /// a second call in between must be refused by something set at once.
  pub(super) store_attached: AtomicBool,
}

#[napi]
impl NativeKeyPool {
  /// Builds the pool from `options` and the environment.
  #[napi(constructor)]
  pub fn new(options: Option<PoolOptions>) -> napi::Result<Self> {
    let call_log_capacity = options.as_ref().and_then(|o| o.usage_log_capacity);
    let (options, quiet) = match options {
      None => (config::PoolOptions::default(), false),
      Some(o) => (
        config::PoolOptions {
          keys: o.keys.map(|keys| {
            keys
              .into_iter()
              .map(|k| match k {
                Either::A(key) => KeySpec::new(&key),
                Either::B(KeyOption { api_key, project }) => KeySpec {
                  key: api_key,
                  project,
                },
              })
              .collect()
          }),
          model: o.model,
          model_limits: o
            .model_limits
            .unwrap_or_default()
            .into_iter()
            .map(|(model, limits)| (model, limits.into()))
            .collect(),
          limits: o.limits.map(Into::into).unwrap_or_default(),
          window_ms: o.window_ms,
          daily_reset: o.daily_reset,
          reservation_ttl_ms: o.reservation_ttl_ms,
        },
        o.quiet.unwrap_or(false),
      ),
    };
    let config = PoolConfig::resolve(options, &|name| std::env::var(name).ok())?;
    let log: Arc<dyn Log> = if quiet {
      Arc::new(SilentLog)
    } else {
      Arc::new(ConsoleLog)
    };
    let pool = KeyPool::new(config, Arc::new(SystemClock), log.clone())?;
    if let Some(capacity) = call_log_capacity {
      pool.keep_calls(capacity as usize);
    }
    Ok(Self {
      js: Rc::new(JsPool {
        pool: Arc::new(pool),
        results: Results::default(),
      }),
      log,
      writer: Arc::default(),
      store_attached: AtomicBool::new(false),
    })
  }

  pub(super) fn pool(&self) -> &KeyPool {
    &self.js.pool
  }

  fn results(&self) -> &Results {
    &self.js.results
  }

  /// The hot path, as plain functions over this pool that take their arguments from the `arg0`..
  /// `arg3` slots of `results` (NaN: missing): `best()` (estimatedTokens, modelId) returns the
  /// chosen key's position, `recordSuccess()` (index, tokens, responseTime, modelId) and `figures()`
  /// (index) write the key's figures into `results` (a missing model id is the default model, or for
  /// a report the model of its hand-out).
  #[napi(
    ts_return_type = "{ results: Float64Array; best(): number; recordSuccess(): void; figures(): void }"
  )]
  pub fn hot_path<'env>(&self, env: &'env Env) -> napi::Result<Object<'env>> {
    // SAFETY: `env` is this call's environment, on the JS thread.
    let raw = unsafe { fast_path::install(env.raw(), self.js.clone())? };
    Ok(Object::from_raw(env.raw(), raw))
  }

  /// Every key the pool has known, by the position every other method takes and returns:
  /// removed keys keep theirs, and keys added later come after.
  #[napi]
  pub fn keys(&self) -> Vec<String> {
    self.pool().names().keys().to_vec()
  }

  /// How many positions are in use (see `keys`): a cheap check for keys added since.
  #[napi]
  pub fn key_count(&self) -> u32 {
    u32::try_from(self.pool().len()).unwrap_or(u32::MAX)
  }

  /// The id of the model named `name` (`gemini-2.0-flash` or `models/gemini-2.0-flash`), which
  /// the calls about a model take: met now, with limits from the table (or `modelLimits`, or the
  /// default model's, said once), if it was not yet.
  #[napi]
  pub fn model_id(&self, name: String) -> napi::Result<u32> {
    Ok(self.pool().model_id(&name)? as u32)
  }

  /// Every key's project and its budget of every model met, by position.
  #[napi]
  pub fn budgets(&self) -> napi::Result<Vec<KeyBudgets>> {
    (0..self.pool().len())
      .map(|i| {
        let (project, views) = self.pool().budgets_of(i)?;
        Ok(KeyBudgets {
          project,
          models: views
            .iter()
            .map(|v| BudgetEntry {
              model: v.model.clone(),
              state: v.state_label().to_owned(),
              state_until: v.state_until().map(|t| t as f64),
              availability_score: v.availability_score,
              rpm: window_entry(&v.figures.rpm),
              rpd: window_entry(&v.figures.rpd),
              tpm: window_entry(&v.figures.tpm),
            })
            .collect(),
        })
      })
      .collect()
  }

  /// Adds `apiKey` to the pool (in `project`, when named), or brings back a removed one, and
  /// writes its figures into the result slots; returns its position.
  #[napi]
  pub fn add_key(&self, api_key: String, project: Option<String>) -> napi::Result<u32> {
    let index = self.pool().add_key(&api_key, project.as_deref())?;
    self.results().write_figures(&self.pool().figures(index)?);
    Ok(index as u32)
  }

  /// An operator's decision about the key at `index`: back in service, out of service, or out of
  /// the pool. Returns whether it changed anything.
  #[napi]
  pub fn admit(&self, index: u32, admission: KeyAdmission) -> napi::Result<bool> {
    let changed = self.pool().admit(at(index), admission.into())?;
    self
      .results()
      .write_figures(&self.pool().figures(at(index))?);
    Ok(changed)
  }

  /// `getNextKeyForRotation`: returns the chosen key's position; the reason and the weak key's
  /// score are in the result slots.
  #[napi]
  pub fn rotate(&self, estimated_tokens: f64, model_id: Option<u32>) -> napi::Result<u32> {
    let claim = Claim::Reserve {
      estimated_tokens: validate_tokens(estimated_tokens)?,
    };
    let model = model(model_id).unwrap_or(crate::core::models::DEFAULT_MODEL_ID);
    let picked = self.pool().rotate(claim, model)?;
    self.results().write_rotation(&picked.pick);
    self.results().write_figures(&picked.figures);
    Ok(picked.pick.selection.index as u32)
  }

  /// Records a failed call on the key at `index`. A failed call often has no token count: a
  /// missing or invalid one counts as 0 rather than losing the failure. `responseTime` is in ms.
  #[napi]
  pub fn record_failure(
    &self,
    index: u32,
    tokens: f64,
    error: String,
    response_time: Option<f64>,
    model_id: Option<u32>,
  ) -> napi::Result<()> {
    let tokens = validate_tokens(tokens).unwrap_or(0);
    let figures = self.pool().record_usage(
      at(index),
      tokens,
      Outcome::Failure(&error),
      response_time.unwrap_or(0.0),
      model(model_id),
    )?;
    self.results().write_figures(&figures);
    Ok(())
  }

  /// `handleRateLimit`: `limitType` is `'RPM'`, `'RPD'` or `'TPM'`; `retryAfterMs` is the delay the
  /// API asked for, when known.
  #[napi]
  pub fn handle_rate_limit(
    &self,
    index: u32,
    limit_type: String,
    retry_after_ms: Option<f64>,
    model_id: Option<u32>,
  ) -> napi::Result<()> {
    let retry_after_ms = match retry_after_ms {
      Some(ms) if !(ms.is_finite() && ms >= 0.0) => Err(bad_input(format!(
        "retryAfterMs must be a non-negative number of milliseconds (got {})",
        js_number(ms)
      )))?,
      ms => ms.map(|ms| ms.ceil() as i64),
    };
    let limit_type = LimitType::parse(&limit_type).ok_or(PoolError::InvalidLimitType {
      got: format!("{limit_type:?}"),
    });
    let figures = limit_type.and_then(|t| {
      self
        .pool()
        .handle_rate_limit(at(index), t, retry_after_ms, model(model_id))
    })?;
    self.results().write_figures(&figures);
    Ok(())
  }

  #[napi]
  pub fn reactivate(&self, index: u32) -> napi::Result<()> {
    let figures = self.pool().reactivate(at(index))?;
    self.results().write_figures(&figures);
    Ok(())
  }

  #[napi]
  pub fn reset_all_limits(&self) -> napi::Result<()> {
    Ok(self.pool().reset_all_limits()?)
  }

  /// Rebuilds the selection cache; returns how many keys are available.
  #[napi]
  pub fn refresh_cache(&self) -> napi::Result<u32> {
    Ok(self.pool().refresh_cache()? as u32)
  }

  /// `getRateLimitInfo`: RPM, RPD and TPM, with `resetTime` in epoch milliseconds.
  #[napi]
  pub fn rate_limit_info(
    &self,
    index: u32,
    model_id: Option<u32>,
  ) -> napi::Result<Vec<RateLimitEntry>> {
    let info = self.pool().rate_limit_info(at(index), model(model_id))?;
    Ok(
      info
        .iter()
        .map(|i| RateLimitEntry {
          limit_type: i.limit_type.as_str().to_owned(),
          current: i.current as f64,
          limit: i.limit as f64,
          reset_time: i.reset_time as f64,
          is_limited: i.is_limited,
        })
        .collect(),
    )
  }

  /// When a key could next be handed out (epoch ms), or `null` when none will be by itself.
  #[napi]
  pub fn next_available_at(
    &self,
    estimated_tokens: f64,
    model_id: Option<u32>,
  ) -> napi::Result<Option<f64>> {
    let tokens = validate_tokens(estimated_tokens)?;
    let model = model(model_id).unwrap_or(crate::core::models::DEFAULT_MODEL_ID);
    let at = self.pool().next_available_at(tokens, model)?;
    Ok(at.map(|t| t as f64))
  }

  /// The key's last error message, if it has one.
  #[napi]
  pub fn last_error(&self, index: u32) -> napi::Result<Option<String>> {
    Ok(self.pool().last_error(at(index))?)
  }

  /// Writes `currentIndex` and `lastRotation` into the result slots.
  #[napi]
  pub fn summary(&self) -> napi::Result<()> {
    let (current_index, last_rotation) = self.pool().rotation_state()?;
    self.results().set(Slot::CurrentIndex, current_index as f64);
    self.results().set(Slot::LastRotation, last_rotation as f64);
    Ok(())
  }

  /// Refuses every later call. Idempotent.
  #[napi]
  pub fn close(&self) {
    self.pool().close();
  }
}

/// What an operator decides about a key.
#[napi(string_enum = "lowercase")]
pub enum KeyAdmission {
  Enabled,
  Disabled,
  Removed,
}

impl From<KeyAdmission> for Admission {
  fn from(a: KeyAdmission) -> Self {
    match a {
      KeyAdmission::Enabled => Admission::Enabled,
      KeyAdmission::Disabled => Admission::Disabled,
      KeyAdmission::Removed => Admission::Removed,
    }
  }
}

/// One window of `rateLimitInfo`.
#[napi(object)]
pub struct RateLimitEntry {
  /// `'RPM'`, `'RPD'` or `'TPM'`.
  #[napi(js_name = "type")]
  pub limit_type: String,
  pub current: f64,
  pub limit: f64,
  /// Epoch milliseconds.
  pub reset_time: f64,
  pub is_limited: bool,
}
