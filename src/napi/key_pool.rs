//! The `NativeKeyPool` class: a pool built from JS options, its hot path, and the calls about one
//! key or all of them. Every call that concerns one key writes its figures into the result slots
//! (`results`), which `lib/index.js` reads.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::{Env, Object, Unknown};
use napi_derive::napi;

use crate::core::clock::SystemClock;
use crate::core::config::{self, js_number, PoolConfig};
use crate::core::error::PoolError;
use crate::core::failure::{self, Failure};
use crate::core::key::{Admission, STATE_LABELS};
use crate::core::models::ModelId;
use crate::core::pool::{validate_tokens, Claim, KeyPool, Outcome};
use crate::core::quota::LimitType;
use crate::http::ApiState;
use crate::log::{Log, SilentLog};
use crate::mask::scrub;
use crate::napi::errors::bad_input;
use crate::napi::fast_path::{self, JsPool};
use crate::napi::log::JsLog;
use crate::napi::options::{process_env, ManagerOptions, StoreOptions};
use crate::napi::results::{Results, Slot, METHODS, REASONS, RESULTS_LEN, SLOT_NAMES};
use crate::napi::routing::revalidate;
use crate::napi::store::in_memory_line;
use crate::napi::values::Given;
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
  /// The `quiet` option: no log lines.
  pub(super) quiet: bool,
  /// Where the options and the environment say to persist; none: in memory.
  store: Option<StoreOptions>,
  /// Whether the app's own Gemini requests are routed through the pool.
  routes_requests: bool,
  /// How long a routed request may wait for a key with room; none: the router's default.
  pub(super) route_max_wait: Option<Duration>,
  /// The MongoDB writer, once `attachStore` has started it.
  pub(super) writer: Arc<parking_lot::Mutex<Option<Arc<WriteBehind>>>>,
  /// Set by the first `attachStore` that gets past its checks: the writer arrives only later, so
  /// a second call in between must be refused by something set at once.
  pub(super) store_attached: AtomicBool,
  /// What the HTTP API serves from: the pool, where usage statistics come from, key naming.
  pub(super) api: Arc<ApiState>,
}

#[napi]
impl NativeKeyPool {
  /// Builds the pool from the manager's options (see `ApiKeyManagerOptions` in index.d.ts) and
  /// the environment, and starts re-testing refused keys when asked to.
  #[napi(constructor, ts_args_type = "options?: object | undefined | null")]
  pub fn new(options: Option<Unknown>) -> napi::Result<Self> {
    let options = ManagerOptions::read(options, &process_env)?;
    let given_keys: Vec<String> = options
      .pool
      .keys
      .iter()
      .flatten()
      .map(|k| k.key.clone())
      .collect();
    // Values echoed in a message (a key passed as the model, say) must not show a key whole.
    let masked = |e: PoolError| match e {
      PoolError::InvalidConfig(message) => PoolError::InvalidConfig(scrub(&message, &given_keys)),
      e => e,
    };
    let config = PoolConfig::resolve(options.pool, &process_env).map_err(masked)?;
    let log: Arc<dyn Log> = match options.quiet {
      true => Arc::new(SilentLog),
      false => Arc::new(JsLog),
    };
    let routes_requests = crate::routing::route_requests(options.route_requests, &process_env)?;
    let revalidate_every =
      config::revalidate_interval_ms(options.revalidate_interval_ms, &process_env)?;
    let pool = Arc::new(KeyPool::new(config, Arc::new(SystemClock), log.clone())?);
    if let Some(capacity) = options.usage_log_capacity {
      pool.keep_calls(capacity as usize);
    }
    if let Some(ms) = revalidate_every {
      revalidate(&pool, ms)?;
    }
    Ok(Self {
      api: Arc::new(ApiState::new(pool.clone())),
      js: Rc::new(JsPool {
        pool,
        results: Results::default(),
      }),
      log,
      quiet: options.quiet,
      store: options.store,
      routes_requests,
      route_max_wait: options.route_max_wait,
      writer: Arc::default(),
      store_attached: AtomicBool::new(false),
    })
  }

  /// Whether the app's own Gemini requests that carry the pool's keys are routed through it: the
  /// `routeRequests` option, else `KEY_MANAGER_ROUTE_REQUESTS`, else yes.
  #[napi(getter)]
  pub fn routes_requests(&self) -> bool {
    self.routes_requests
  }

  /// Where to persist, for `attachStore`: the options, else `MONGODB_URI`, `MONGODB_DB_NAME` and
  /// `KEY_MANAGER_SHARED_QUOTA`; null without a connection string (the pool runs in memory).
  #[napi(getter)]
  pub fn store_options(&self) -> Option<StoreOptions> {
    self.store.clone()
  }

  /// Says in the log that the pool runs in memory, with how many keys (SPEC section 3): the
  /// start-up line of a pool without a store.
  #[napi]
  pub fn announce_in_memory(&self) {
    self.log.info(&in_memory_line(self.pool().len()));
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
  #[napi(ts_args_type = "name: string")]
  pub fn model_id(&self, name: Unknown) -> napi::Result<u32> {
    let given = Given::of(name)?;
    let Some(name) = given.string()? else {
      Err(bad_input(format!(
        "model must be a string (got {})",
        given.shown()?
      )))?
    };
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
  #[napi(ts_args_type = "apiKey: string, project?: string | undefined")]
  pub fn add_key(&self, api_key: Unknown, project: Unknown) -> napi::Result<u32> {
    let key = Given::of(api_key)?;
    let Some(api_key) = key.string()? else {
      Err(bad_input(format!(
        "Invalid API key: it must be a string (got {})",
        key.type_of()
      )))?
    };
    let project = Given::of(project)?;
    let project = match project.string()? {
      Some(name) => Some(name),
      None if project.is_undefined() => None,
      None => Err(bad_input(format!(
        "project must be a string (got {})",
        project.shown()?
      )))?,
    };
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
  #[napi(
    ts_args_type = "index: number, limitType: string, retryAfterMs?: number | undefined, modelId?: number | undefined | null"
  )]
  pub fn handle_rate_limit(
    &self,
    index: u32,
    limit_type: Unknown,
    retry_after_ms: Unknown,
    model_id: Option<u32>,
  ) -> napi::Result<()> {
    let delay = Given::of(retry_after_ms)?;
    let retry_after_ms = match delay.number()? {
      None if delay.is_undefined() => None,
      None => Err(bad_input(format!(
        "retryAfterMs must be a number of milliseconds (got {})",
        delay.shown()?
      )))?,
      Some(ms) if !(ms.is_finite() && ms >= 0.0) => Err(bad_input(format!(
        "retryAfterMs must be a non-negative number of milliseconds (got {})",
        js_number(ms)
      )))?,
      Some(ms) => Some(ms.ceil() as i64),
    };
    let limit_type = Given::of(limit_type)?;
    let Some(limit_type) = limit_type.string()?.as_deref().and_then(LimitType::parse) else {
      Err(PoolError::InvalidLimitType {
        got: limit_type.shown()?,
      })?
    };
    let figures =
      self
        .pool()
        .handle_rate_limit(at(index), limit_type, retry_after_ms, model(model_id))?;
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

/// Whether another key may succeed where a call failed with `error` (as `recordFailure` is given
/// it): a 429, or the model's trouble (503, 500, overloaded), not the key's or the request's.
#[napi]
pub fn is_retryable(error: String) -> bool {
  matches!(
    failure::classify(&error),
    Failure::RateLimited(_) | Failure::Overloaded
  )
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
