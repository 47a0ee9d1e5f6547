//! The N-API face of the core: one class over `KeyPool`. Its hot-path calls come from
//! `fast_path`; the rest are ordinary `#[napi]` methods. Every call writes the key it chose or was
//! given into the result slots (`results`), which `lib/index.js` reads.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::{Buffer, Either, Env, Object, PromiseRaw};
use napi_derive::napi;
use tokio::sync::Mutex as AsyncMutex;

use crate::core::clock::SystemClock;
use crate::core::config::{self, js_number, KeySpec, LimitOverrides, PoolConfig};
use crate::core::error::PoolError;
use crate::core::key::{Admission, STATE_LABELS};
use crate::core::models::ModelId;
use crate::core::pool::{validate_tokens, Claim, KeyPool, Outcome};
use crate::core::quota::LimitType;
use crate::http::auth::resolve_allow_insecure;
use crate::http::proxy::{ProxyOptions, DEFAULT_MAX_PROXY_BODY};
use crate::http::proxy_auth::{ClientAccess, PROXY_TOKENS_ENV};
use crate::http::{
  self, AdminGuard, ApiRequest, ApiState, Listen, Reply, Routed, ServerHandle, ServerOptions,
};
use crate::log::{ConsoleLog, Log, SilentLog};
use crate::napi::fast_path::{self, JsPool};
use crate::napi::results::{Results, Slot, METHODS, REASONS, RESULTS_LEN, SLOT_NAMES};
use crate::persistence::{PersistOptions, Started, WriteBehind};
use crate::routing::{RouteOptions, Router, Timeouts, Upstream};
use crate::stats::metrics;
use crate::store::{KeyNaming, KeyStorage};

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

/// Per-key limits; each falls back to its environment variable, then to Flash-Lite's free tier.
#[napi(object)]
pub struct LimitsOptions {
  /// Requests per minute (`GEMINI_RPM_LIMIT`, default 30).
  pub rpm: Option<f64>,
  /// Requests per day (`GEMINI_RPD_LIMIT`, default 200).
  pub rpd: Option<f64>,
  /// Tokens per minute (`GEMINI_TPM_LIMIT`, default 1,000,000).
  pub tpm: Option<f64>,
}

impl From<LimitsOptions> for LimitOverrides {
  fn from(l: LimitsOptions) -> Self {
    Self {
      rpm: l.rpm,
      rpd: l.rpd,
      tpm: l.tpm,
    }
  }
}

/// A key and the project it belongs to.
#[napi(object)]
pub struct KeyOption {
  pub api_key: String,
  pub project: Option<String>,
}

/// Options of a key pool. Without `keys`, keys come from `GEMINI_API_KEY_1..N` and `GEMINI_API_KEYS`.
#[napi(object)]
pub struct PoolOptions {
  /// Each a key, or a key and its project.
  pub keys: Option<Vec<Either<String, KeyOption>>>,
  /// The model whose limits apply (`GEMINI_MODEL`, default `gemini-2.0-flash-lite`).
  pub model: Option<String>,
  /// Limits by model name, replacing or adding to the built-in table.
  pub model_limits: Option<HashMap<String, LimitsOptions>>,
  /// Overrides of the model's limits.
  pub limits: Option<LimitsOptions>,
  /// Span of the rolling RPM and TPM windows in ms (`GEMINI_WINDOW_MS`, default 60000).
  pub window_ms: Option<f64>,
  /// When RPD resets: `'America/Los_Angeles'` (default, Gemini's) or `'UTC'` (`GEMINI_DAILY_RESET`).
  pub daily_reset: Option<String>,
  /// How long a key handed out stays reserved without a `recordUsage` (default 60000 ms).
  pub reservation_ttl_ms: Option<f64>,
  /// Suppresses the log lines.
  pub quiet: Option<bool>,
  /// Recorded calls kept in memory for usage statistics (default 10000; 0 keeps none).
  pub usage_log_capacity: Option<u32>,
}

fn js_error(e: PoolError) -> napi::Error {
  napi::Error::from_reason(e.to_string())
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
  js: Rc<JsPool>,
  log: Arc<dyn Log>,
  /// The MongoDB writer, once `attachStore` has started it.
  writer: Arc<parking_lot::Mutex<Option<Arc<WriteBehind>>>>,
  /// Set by the first `attachStore` that gets past its checks: the writer arrives only later, so
  /// a second call in between must be refused by something set at once.
  store_attached: AtomicBool,
  /// What the HTTP API serves from: the pool, where usage statistics come from, key naming.
  api: Arc<ApiState>,
}

/// The largest request body the HTTP API reads by default, in bytes: the Express adapter uses it too.
#[napi]
pub const DEFAULT_MAX_BODY_BYTES: u32 = http::server::DEFAULT_MAX_BODY_BYTES as u32;

/// Options of `NativeKeyPool.attachStore`.
#[napi(object)]
pub struct StoreOptions {
  /// The MongoDB connection string.
  pub uri: String,
  /// Default `rag_db`.
  pub db_name: Option<String>,
  /// How long to wait for the server before running in memory (default 2000 ms).
  pub connect_timeout_ms: Option<f64>,
  /// How often changes are written (default 1000 ms).
  pub flush_interval_ms: Option<f64>,
  /// How often to try the server again while running in memory (default 3000 ms).
  pub retry_interval_ms: Option<f64>,
  /// How often to read the keys other processes added, removed, disabled or enabled (default
  /// 2000 ms).
  pub key_sync_interval_ms: Option<f64>,
  /// How long closing may wait for the database before it keeps the rest in a spill file
  /// (default 3000 ms).
  pub close_timeout_ms: Option<f64>,
  /// Where spill files go (else `KEY_MANAGER_SPILL_DIR`, else the system's temporary directory).
  pub spill_dir: Option<String>,
  /// Recorded calls that trigger a write before the interval is up (default 500).
  pub batch_size: Option<u32>,
  /// Recorded calls kept while the server is away, at most (default 10000).
  pub queue_capacity: Option<u32>,
  /// Share each key's RPM and RPD with every process using the same database (default true).
  pub shared_quota: Option<bool>,
  /// The secret keys are fingerprinted under in documents (`KEY_MANAGER_FINGERPRINT_SECRET`).
  pub fingerprint_secret: Option<String>,
  /// Store keys in plaintext, as the old service did (`KEY_MANAGER_STORE_PLAINTEXT_KEYS`).
  pub store_plaintext_keys: Option<bool>,
}

/// How `attachStore` went.
#[napi(object)]
pub struct StoreStart {
  /// Connected and loaded; otherwise the pool runs in memory and keeps trying in the background.
  pub connected: bool,
  /// Why it could not connect.
  pub error: Option<String>,
}

/// What the MongoDB writer has done.
#[napi(object)]
pub struct PersistenceStats {
  /// Connected, and the last write (if any) succeeded.
  pub connected: bool,
  /// Database round trips so far.
  pub ops: f64,
  /// Recorded calls waiting to be written.
  pub queued: u32,
  /// Recorded calls of a write being retried.
  pub pending: u32,
  /// Recorded calls lost: dropped because more than `usageQueueCapacity` waited, or neither
  /// written nor spilled at close.
  pub dropped: f64,
  /// Recorded calls kept in a spill file at close, written at the next start.
  pub spilled: f64,
  /// Processes seen sharing the keys' quota, this one included; 0 when `sharedQuota` is off.
  pub peers: u32,
}

/// A duration option in ms: positive and finite, or the default.
fn millis_option(name: &str, value: Option<f64>, default: Duration) -> napi::Result<Duration> {
  match value {
    None => Ok(default),
    Some(ms) if ms.is_finite() && ms > 0.0 => Ok(Duration::from_millis(ms.ceil() as u64)),
    Some(ms) => Err(napi::Error::from_reason(format!(
      "{name} must be a positive number of milliseconds (got {})",
      js_number(ms)
    ))),
  }
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
    let config =
      PoolConfig::resolve(options, &|name| std::env::var(name).ok()).map_err(js_error)?;
    let log: Arc<dyn Log> = if quiet {
      Arc::new(SilentLog)
    } else {
      Arc::new(ConsoleLog)
    };
    let pool = KeyPool::new(config, Arc::new(SystemClock), log.clone()).map_err(js_error)?;
    if let Some(capacity) = call_log_capacity {
      pool.keep_calls(capacity as usize);
    }
    let pool = Arc::new(pool);
    Ok(Self {
      js: Rc::new(JsPool {
        pool: pool.clone(),
        results: Results::default(),
      }),
      log,
      writer: Arc::default(),
      store_attached: AtomicBool::new(false),
      api: Arc::new(ApiState::new(pool)),
    })
  }

  fn pool(&self) -> &KeyPool {
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
    self
      .pool()
      .model_id(&name)
      .map(|id| id as u32)
      .map_err(js_error)
  }

  /// Every key's project and its budget of every model met, by position.
  #[napi]
  pub fn budgets(&self) -> napi::Result<Vec<KeyBudgets>> {
    (0..self.pool().len())
      .map(|i| {
        let (project, views) = self.pool().budgets_of(i).map_err(js_error)?;
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
    let index = self
      .pool()
      .add_key(&api_key, project.as_deref())
      .map_err(js_error)?;
    self
      .results()
      .write_figures(&self.pool().figures(index).map_err(js_error)?);
    Ok(index as u32)
  }

  /// An operator's decision about the key at `index`: back in service, out of service, or out of
  /// the pool. Returns whether it changed anything.
  #[napi]
  pub fn admit(&self, index: u32, admission: KeyAdmission) -> napi::Result<bool> {
    let changed = self
      .pool()
      .admit(at(index), admission.into())
      .map_err(js_error)?;
    self
      .results()
      .write_figures(&self.pool().figures(at(index)).map_err(js_error)?);
    Ok(changed)
  }

  /// `getNextKeyForRotation`: returns the chosen key's position; the reason and the weak key's
  /// score are in the result slots.
  #[napi]
  pub fn rotate(&self, estimated_tokens: f64, model_id: Option<u32>) -> napi::Result<u32> {
    let claim = Claim::Reserve {
      estimated_tokens: validate_tokens(estimated_tokens).map_err(js_error)?,
    };
    let model = model(model_id).unwrap_or(crate::core::models::DEFAULT_MODEL_ID);
    let picked = self.pool().rotate(claim, model).map_err(js_error)?;
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
    let figures = self
      .pool()
      .record_usage(
        at(index),
        tokens,
        Outcome::Failure(&error),
        response_time.unwrap_or(0.0),
        model(model_id),
      )
      .map_err(js_error)?;
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
      Some(ms) if !(ms.is_finite() && ms >= 0.0) => {
        return Err(napi::Error::from_reason(format!(
          "retryAfterMs must be a non-negative number of milliseconds (got {})",
          js_number(ms)
        )))
      }
      ms => ms.map(|ms| ms.ceil() as i64),
    };
    let limit_type = LimitType::parse(&limit_type).ok_or(PoolError::InvalidLimitType {
      got: format!("{limit_type:?}"),
    });
    let figures = limit_type
      .and_then(|t| {
        self
          .pool()
          .handle_rate_limit(at(index), t, retry_after_ms, model(model_id))
      })
      .map_err(js_error)?;
    self.results().write_figures(&figures);
    Ok(())
  }

  #[napi]
  pub fn reactivate(&self, index: u32) -> napi::Result<()> {
    let figures = self.pool().reactivate(at(index)).map_err(js_error)?;
    self.results().write_figures(&figures);
    Ok(())
  }

  #[napi]
  pub fn reset_all_limits(&self) -> napi::Result<()> {
    self.pool().reset_all_limits().map_err(js_error)
  }

  /// Rebuilds the selection cache; returns how many keys are available.
  #[napi]
  pub fn refresh_cache(&self) -> napi::Result<u32> {
    self
      .pool()
      .refresh_cache()
      .map(|n| n as u32)
      .map_err(js_error)
  }

  /// `getRateLimitInfo`: RPM, RPD and TPM, with `resetTime` in epoch milliseconds.
  #[napi]
  pub fn rate_limit_info(
    &self,
    index: u32,
    model_id: Option<u32>,
  ) -> napi::Result<Vec<RateLimitEntry>> {
    let info = self
      .pool()
      .rate_limit_info(at(index), model(model_id))
      .map_err(js_error)?;
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
    let tokens = validate_tokens(estimated_tokens).map_err(js_error)?;
    let model = model(model_id).unwrap_or(crate::core::models::DEFAULT_MODEL_ID);
    let at = self
      .pool()
      .next_available_at(tokens, model)
      .map_err(js_error)?;
    Ok(at.map(|t| t as f64))
  }

  /// The key's last error message, if it has one.
  #[napi]
  pub fn last_error(&self, index: u32) -> napi::Result<Option<String>> {
    self.pool().last_error(at(index)).map_err(js_error)
  }

  /// Writes `currentIndex` and `lastRotation` into the result slots.
  #[napi]
  pub fn summary(&self) -> napi::Result<()> {
    let (current_index, last_rotation) = self.pool().rotation_state().map_err(js_error)?;
    self.results().set(Slot::CurrentIndex, current_index as f64);
    self.results().set(Slot::LastRotation, last_rotation as f64);
    Ok(())
  }

  /// The HTTP API's route table for the Express adapter, guarded by `adminToken` (else
  /// `KEY_MANAGER_ADMIN_TOKEN`) as the server is.
  #[napi]
  pub fn router(&self, admin_token: Option<String>) -> napi::Result<NativeRouter> {
    let guard = AdminGuard::resolve(admin_token.as_deref(), &env_var)
      .map_err(|e| napi::Error::from_reason(e.to_string()))?;
    Ok(NativeRouter {
      state: self.api.clone(),
      guard,
    })
  }

  /// The metrics as a JSON object (see `getMetrics` in lib/index.d.ts).
  #[napi]
  pub fn metrics_json(&self) -> napi::Result<String> {
    let snapshot = self.pool().metrics().map_err(js_error)?;
    Ok(metrics::to_json(&snapshot))
  }

  /// The metrics in the Prometheus text exposition format.
  #[napi]
  pub fn metrics_text(&self) -> napi::Result<String> {
    let snapshot = self.pool().metrics().map_err(js_error)?;
    Ok(metrics::prometheus_text(&snapshot))
  }

  /// Starts the HTTP API on `host:port` (port 0 picks a free one), on the addon's tokio runtime.
  /// `host` is an IP address, or `localhost`: 127.0.0.1 and ::1 both.
  #[napi(ts_return_type = "Promise<NativeServer>")]
  pub fn serve<'env>(
    &self,
    env: &'env Env,
    host: String,
    port: u32,
    options: Option<ServeOptions>,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let port = u16::try_from(port)
      .map_err(|_| napi::Error::from_reason(format!("port must be 0 to 65535 (got {port})")))?;
    let listen = if host.eq_ignore_ascii_case("localhost") {
      Listen::Localhost { port }
    } else {
      let ip: IpAddr = host.parse().map_err(|_| {
        // A key pasted into the wrong field must not come back whole.
        let shown = crate::mask::scrub(&host, self.pool().names().keys());
        napi::Error::from_reason(format!(
          "host must be an IP address or localhost (got {shown:?})"
        ))
      })?;
      Listen::Addr(SocketAddr::new(ip, port))
    };
    let o = options.unwrap_or_default();
    let config_error = |e: http::AuthConfigError| napi::Error::from_reason(e.to_string());
    let defaults = ServerOptions::default();
    let options = ServerOptions {
      max_body_bytes: o
        .max_body_bytes
        .map_or(defaults.max_body_bytes, |n| n as usize),
      access_log: o.access_log.unwrap_or(defaults.access_log),
      admin: AdminGuard::resolve(o.admin_token.as_deref(), &env_var).map_err(config_error)?,
      allow_insecure: resolve_allow_insecure(o.allow_insecure, &env_var).map_err(config_error)?,
      max_connections: o
        .max_connections
        .map_or(defaults.max_connections, |n| n.max(1) as usize),
      head_timeout: millis_option("headTimeoutMs", o.head_timeout_ms, defaults.head_timeout)?,
      proxy: self.proxy_options(&o, listen)?,
      proxy_only: o.proxy_only.unwrap_or(false),
    };
    let state = self.api.clone();
    let proxy = options.proxy.is_some();
    env.spawn_future(async move {
      let handle = http::start(state, listen, options)
        .await
        .map_err(|e| napi::Error::from_reason(e.to_string()))?;
      Ok(NativeServer {
        proxy,
        host: match listen {
          Listen::Localhost { .. } => "localhost".to_owned(),
          Listen::Addr(addr) => addr.ip().to_string(),
        },
        port: handle.port(),
        handle: Arc::new(AsyncMutex::new(Some(handle))),
      })
    })
  }

  /// How the server answers Gemini's paths: for the JS face's requests (`routeToken`), for
  /// clients with a proxy token, or (only on loopback, when asked) for anyone; `None` for none.
  fn proxy_options(&self, o: &ServeOptions, listen: Listen) -> napi::Result<Option<ProxyOptions>> {
    let clients = match &o.route_token {
      Some(_) => ClientAccess::Off,
      None => ClientAccess::resolve(o.proxy_tokens.as_deref(), o.proxy_open, &env_var)
        .map_err(|e| napi::Error::from_reason(e.to_string()))?,
    };
    if o.route_token.is_none() && !clients.is_on() {
      return Ok(None);
    }
    if let (ClientAccess::Open, Listen::Addr(addr)) = (&clients, listen) {
      if !addr.ip().to_canonical().is_loopback() {
        return Err(napi::Error::from_reason(format!(
          "the Gemini proxy opens without tokens only on loopback: set {PROXY_TOKENS_ENV} (or \
           proxyTokens) to serve it on {addr}"
        )));
      }
    }
    let d = Timeouts::default();
    let timeouts = Timeouts {
      connect: millis_option(
        "upstreamConnectTimeoutMs",
        o.upstream_connect_timeout_ms,
        d.connect,
      )?,
      first_byte: millis_option(
        "upstreamFirstByteTimeoutMs",
        o.upstream_first_byte_timeout_ms,
        d.first_byte,
      )?,
      between_chunks: millis_option(
        "upstreamChunkTimeoutMs",
        o.upstream_chunk_timeout_ms,
        d.between_chunks,
      )?,
    };
    Ok(Some(ProxyOptions {
      router: Arc::new(self.router_from(o.route_max_wait_ms, timeouts)?),
      route_token: o.route_token.clone(),
      clients,
      max_body: o
        .proxy_max_body_bytes
        .map_or(DEFAULT_MAX_PROXY_BODY, |n| n as usize),
    }))
  }

  /// A router of this pool's keys to `GEMINI_BASE_URL` (Google's endpoint by default).
  fn router_from(&self, max_wait_ms: Option<f64>, timeouts: Timeouts) -> napi::Result<Router> {
    let defaults = RouteOptions::default();
    let upstream = Upstream::from_env(&env_var, timeouts)
      .map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let options = RouteOptions {
      max_wait: match max_wait_ms {
        Some(ms) if ms.is_finite() && ms >= 0.0 => Duration::from_millis(ms as u64),
        Some(ms) => {
          return Err(napi::Error::from_reason(format!(
            "routeMaxWaitMs must be a non-negative number of milliseconds (got {})",
            js_number(ms)
          )))
        }
        None => defaults.max_wait,
      },
      ..defaults
    };
    Ok(Router::new(self.js.pool.clone(), upstream, options))
  }

  /// Persists the pool in MongoDB from now on, written behind (see `persistence`): connects within
  /// the timeout, loads and merges what is stored, and starts the writer on the addon's tokio
  /// runtime. When the server cannot be reached the pool runs in memory and the writer keeps
  /// trying in the background. Resolves with how it went; a second call is refused.
  #[napi(ts_return_type = "Promise<StoreStart>")]
  pub fn attach_store<'env>(
    &self,
    env: &'env Env,
    options: StoreOptions,
  ) -> napi::Result<PromiseRaw<'env, StoreStart>> {
    let key_storage = KeyStorage::resolve(
      options.fingerprint_secret,
      options.store_plaintext_keys,
      &|name| std::env::var(name).ok(),
    )
    .map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let defaults = PersistOptions::new(options.uri);
    let persist = PersistOptions {
      key_storage,
      db_name: options.db_name.unwrap_or(defaults.db_name.clone()),
      connect_timeout: millis_option(
        "mongoConnectTimeoutMs",
        options.connect_timeout_ms,
        defaults.connect_timeout,
      )?,
      flush_interval: millis_option(
        "flushIntervalMs",
        options.flush_interval_ms,
        defaults.flush_interval,
      )?,
      retry_interval: millis_option(
        "retryIntervalMs",
        options.retry_interval_ms,
        defaults.retry_interval,
      )?,
      key_sync_interval: millis_option(
        "keySyncIntervalMs",
        options.key_sync_interval_ms,
        defaults.key_sync_interval,
      )?,
      close_timeout: millis_option(
        "closeTimeoutMs",
        options.close_timeout_ms,
        defaults.close_timeout,
      )?,
      spill_dir: options
        .spill_dir
        .or_else(|| env_var(SPILL_DIR_ENV).filter(|d| !d.trim().is_empty()))
        .map_or(defaults.spill_dir.clone(), PathBuf::from),
      batch_size: options
        .batch_size
        .map_or(defaults.batch_size, |n| n as usize),
      queue_capacity: options
        .queue_capacity
        .map_or(defaults.queue_capacity, |n| n as usize),
      share_quota: options.shared_quota.unwrap_or(defaults.share_quota),
      usage: self.api.usage().clone(),
      ..defaults
    };
    if self.store_attached.swap(true, Ordering::AcqRel) {
      return Err(napi::Error::from_reason("a store is already attached"));
    }
    self
      .api
      .name_keys(KeyNaming::new(persist.key_storage.clone()));
    let (pool, log, slot) = (self.js.pool.clone(), self.log.clone(), self.writer.clone());
    if persist.share_quota {
      // Now, not once the connection is up: nothing may be handed out beyond the shared quota
      // while this process connects.
      pool.share_quota();
    }
    env.spawn_future(async move {
      let (writer, started) = WriteBehind::start(pool, persist, log).await;
      *slot.lock() = Some(Arc::new(writer));
      Ok(match started {
        Started::Connected => StoreStart {
          connected: true,
          error: None,
        },
        Started::Fallback(why) => StoreStart {
          connected: false,
          error: Some(why),
        },
      })
    })
  }

  /// Writes what is left and stops the writer; resolves when done (at once without a store).
  /// Call `close()` first, so that nothing changes after the last write.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn close_store<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
    let writer = self.writer.lock().clone();
    env.spawn_future(async move {
      if let Some(writer) = writer {
        writer.close().await;
      }
      Ok(())
    })
  }

  /// What the MongoDB writer has done, or `null` without a store.
  #[napi]
  pub fn persistence_stats(&self) -> Option<PersistenceStats> {
    self.writer.lock().as_ref().map(|w| {
      let s = w.stats();
      PersistenceStats {
        connected: s.connected,
        ops: s.ops as f64,
        queued: s.queued as u32,
        pending: s.pending as u32,
        dropped: s.dropped as f64,
        spilled: s.spilled as f64,
        peers: u32::try_from(s.peers).unwrap_or(u32::MAX),
      }
    })
  }

  /// Re-tests the keys Gemini refused every `intervalMs` (`GET /v1beta/models/{model}` at
  /// `GEMINI_BASE_URL`) and brings back those it accepts, until the pool closes.
  #[napi]
  pub fn revalidate(&self, interval_ms: f64) -> napi::Result<()> {
    let interval = millis_option("revalidateIntervalMs", Some(interval_ms), Duration::ZERO)?;
    let upstream = Upstream::from_env(&env_var, Timeouts::default())
      .map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let pool = self.js.pool.clone();
    napi::bindgen_prelude::spawn(crate::routing::revalidate::run(pool, upstream, interval));
    Ok(())
  }

  /// Refuses every later call. Idempotent.
  #[napi]
  pub fn close(&self) {
    self.pool().close();
  }
}

impl Drop for NativeKeyPool {
  /// A pool collected without `closeStore()` still gets its last write, and its writer ends
  /// instead of retrying for the life of the process.
  fn drop(&mut self) {
    if let Some(writer) = self.writer.lock().take() {
      writer.stop();
    }
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

/// Where spill files go when the option does not say.
const SPILL_DIR_ENV: &str = "KEY_MANAGER_SPILL_DIR";

fn env_var(name: &str) -> Option<String> {
  std::env::var(name).ok()
}

/// The HTTP API's route table over one pool, with its admin guard: what the Express adapter calls.
#[napi]
pub struct NativeRouter {
  state: Arc<ApiState>,
  guard: AdminGuard,
}

#[napi]
impl NativeRouter {
  /// [`Self::route`] for a request without a body, answered on the addon's tokio runtime, so that
  /// usage statistics can query MongoDB.
  #[napi(ts_return_type = "Promise<RouteReply>")]
  pub fn route_async<'env>(
    &self,
    env: &'env Env,
    method: String,
    url: String,
    authorization: Option<String>,
  ) -> napi::Result<PromiseRaw<'env, RouteReply>> {
    let (state, guard) = (self.state.clone(), self.guard.clone());
    env.spawn_future(async move {
      let req = ApiRequest {
        method: &method,
        target: &url,
        authorization: authorization.as_deref(),
        body: &[],
      };
      let reply = http::route_mounted(&state, &guard, &req).reply().await;
      Ok(route_reply(reply))
    })
  }

  /// Serves one request (`url` relative to where the routes are mounted, e.g. `/best?x=1`) with
  /// its `Authorization` header, if any.
  #[napi]
  pub fn route(
    &self,
    method: String,
    url: String,
    authorization: Option<String>,
    body: Option<Buffer>,
  ) -> RouteReply {
    let req = ApiRequest {
      method: &method,
      target: &url,
      authorization: authorization.as_deref(),
      body: body.as_deref().unwrap_or_default(),
    };
    match http::route_mounted(&self.state, &self.guard, &req) {
      Routed::Ready(reply) => route_reply(reply),
      // Waits on I/O (usage statistics read from MongoDB): `routeAsync` answers it.
      Routed::Pending(_) => RouteReply {
        status: 0,
        body: String::new(),
        headers: HashMap::new(),
        deferred: true,
      },
    }
  }
}

/// A reply of the HTTP API's route table.
#[napi(object)]
pub struct RouteReply {
  pub status: u32,
  /// JSON, or the dashboard's HTML.
  pub body: String,
  /// Lower-case names: `content-type` always, `allow` on a 405, `www-authenticate` on a 401, ...
  pub headers: HashMap<String, String>,
  /// Not answered: ask `routeAsync` (usage statistics from MongoDB).
  pub deferred: bool,
}

fn route_reply(reply: Reply) -> RouteReply {
  let mut headers = HashMap::new();
  headers.insert("content-type".to_owned(), reply.content_type.to_owned());
  if let Some(allow) = reply.allow {
    headers.insert("allow".to_owned(), allow.to_owned());
  }
  for (name, value) in reply.headers {
    headers.insert(name.to_owned(), value);
  }
  RouteReply {
    status: reply.status as u32,
    body: reply.body,
    headers,
    deferred: false,
  }
}

/// The name MongoDB documents store for `apiKey`: its fingerprint under `secret` (else
/// `KEY_MANAGER_FINGERPRINT_SECRET`; at least 16 bytes), `fp_` and 32 hex digits, or without either
/// its SHA-256 digest, `sha256_` and 32 hex digits.
/// Where routed Gemini requests go: `GEMINI_BASE_URL` when set, else Google's endpoint.
#[napi]
pub fn gemini_base_url() -> String {
  crate::routing::base_url(&env_var)
}

/// Whether a manager routes the app's Gemini requests: `explicit` when given, else
/// `KEY_MANAGER_ROUTE_REQUESTS`, else yes. Throws on a value of the variable that is no boolean.
#[napi]
pub fn route_requests(explicit: Option<bool>) -> napi::Result<bool> {
  crate::routing::route_requests(explicit, &env_var)
    .map_err(|e| napi::Error::from_reason(e.to_string()))
}

#[napi]
pub fn key_fingerprint(api_key: String, secret: Option<String>) -> napi::Result<String> {
  let storage = KeyStorage::resolve(secret, Some(false), &env_var)
    .map_err(|e| napi::Error::from_reason(e.to_string()))?;
  Ok(KeyNaming::new(storage).stored(&api_key))
}

/// Options of `NativeKeyPool.serve`.
#[napi(object)]
#[derive(Default)]
pub struct ServeOptions {
  /// Largest request body accepted (default 64 KiB); a larger one gets a 400.
  pub max_body_bytes: Option<u32>,
  /// One line per request on stdout, keys masked (default off).
  pub access_log: Option<bool>,
  /// The bearer token rotate, refresh-cache, reactivate and reset-limits want (else
  /// `KEY_MANAGER_ADMIN_TOKEN`; neither: no auth).
  pub admin_token: Option<String>,
  /// Listen beyond loopback without an admin token (else `KEY_MANAGER_ALLOW_INSECURE`; default off).
  pub allow_insecure: Option<bool>,
  /// Connections open at once, at most (default 4096): past it a new connection replaces the
  /// oldest one that has not sent a request yet, or is refused.
  pub max_connections: Option<u32>,
  /// How long a connection may take to send a whole request head (default 10000 ms).
  pub head_timeout_ms: Option<f64>,
  /// Serve Gemini's paths for requests that carry this token in `x-gkm-route-token`: the JS
  /// face's route for the app's own SDK calls.
  pub route_token: Option<String>,
  /// How long a routed request may wait for a key with room (default 60000 ms).
  pub route_max_wait_ms: Option<f64>,
  /// Serve nothing but Gemini's paths.
  pub proxy_only: Option<bool>,
  /// Clients presenting one of these as their API key use the Gemini proxy routes (else
  /// `KEY_MANAGER_PROXY_TOKENS`, comma-separated).
  pub proxy_tokens: Option<Vec<String>>,
  /// Without tokens, serve the proxy routes to anyone, on loopback only (else
  /// `KEY_MANAGER_PROXY_OPEN`; default off).
  pub proxy_open: Option<bool>,
  /// Largest request body the proxy sends on (default 20 MiB); a larger one gets a 413.
  pub proxy_max_body_bytes: Option<u32>,
  /// How long a connection to Gemini may take (default 10000 ms): a 504 past it.
  pub upstream_connect_timeout_ms: Option<f64>,
  /// How long Gemini may take to start answering (default 300000 ms): a 504 past it.
  pub upstream_first_byte_timeout_ms: Option<f64>,
  /// How long Gemini may pause between chunks (default 120000 ms): a 504 before the first one,
  /// the stream cut after.
  pub upstream_chunk_timeout_ms: Option<f64>,
}

/// The running HTTP API.
#[napi]
pub struct NativeServer {
  proxy: bool,
  host: String,
  port: u16,
  handle: Arc<AsyncMutex<Option<ServerHandle>>>,
}

#[napi]
impl NativeServer {
  /// Whether it serves the Gemini proxy routes.
  #[napi(getter)]
  pub fn proxy(&self) -> bool {
    self.proxy
  }

  /// The port it listens on (the real one when started on port 0).
  #[napi(getter)]
  pub fn port(&self) -> u32 {
    u32::from(self.port)
  }

  /// The IP address it listens on, or `localhost` for 127.0.0.1 and ::1 both.
  #[napi(getter)]
  pub fn host(&self) -> String {
    self.host.clone()
  }

  /// Stops accepting, lets in-flight requests finish (5 s at most), then resolves. Idempotent.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn close<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
    let handle = self.handle.clone();
    env.spawn_future(async move {
      if let Some(handle) = handle.lock().await.take() {
        handle.shutdown().await;
      }
      Ok(())
    })
  }
}
