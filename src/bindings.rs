//! The N-API face of the core: one class over `KeyPool`. Its hot-path calls come from
//! `fast_path`; the rest are ordinary `#[napi]` methods. Every call writes the key it chose or was
//! given into the result slots (`results`), which `lib/index.js` reads.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use napi::bindgen_prelude::{Buffer, Env, Object, PromiseRaw};
use napi_derive::napi;
use tokio::sync::Mutex as AsyncMutex;

use crate::clock::SystemClock;
use crate::config::{LimitOverrides, PoolConfig};
use crate::error::PoolError;
use crate::fast_path::{self, JsPool};
use crate::http::{self, ServerHandle, ServerOptions};
use crate::log::{ConsoleLog, Log, SilentLog};
use crate::pool::{validate_tokens, KeyPool, Outcome};
use crate::quota::LimitType;
use crate::results::{Results, Slot, METHODS, REASONS, RESULTS_LEN, SLOT_NAMES};

/// How to read the result slots: their names in order, and the strings that the `method` and
/// `rotationReason` slots' codes stand for.
#[napi(object)]
pub struct ResultsLayout {
  pub slots: Vec<String>,
  pub length: u32,
  pub methods: Vec<String>,
  pub reasons: Vec<String>,
}

/// The layout of the `results` array of `NativeKeyPool.hotPath()`.
#[napi]
pub fn results_layout() -> ResultsLayout {
  ResultsLayout {
    slots: SLOT_NAMES.iter().map(|s| s.to_string()).collect(),
    length: RESULTS_LEN as u32,
    methods: METHODS.iter().map(|m| m.as_str().to_owned()).collect(),
    reasons: REASONS.iter().map(|r| r.as_str().to_owned()).collect(),
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

/// Options of a key pool. Without `keys`, keys come from `GEMINI_API_KEY_1..N` and `GEMINI_API_KEYS`.
#[napi(object)]
pub struct PoolOptions {
  pub keys: Option<Vec<String>>,
  pub limits: Option<LimitsOptions>,
  /// Suppresses the log lines.
  pub quiet: Option<bool>,
}

fn js_error(e: PoolError) -> napi::Error {
  napi::Error::from_reason(e.to_string())
}

/// A key position given by JS.
fn at(index: u32) -> usize {
  index as usize
}

/// A pool of Gemini API keys. Methods that concern one key write its figures into the result slots.
#[napi]
pub struct NativeKeyPool {
  js: Arc<JsPool>,
}

#[napi]
impl NativeKeyPool {
  /// Builds the pool from `options` and the environment.
  #[napi(constructor)]
  pub fn new(options: Option<PoolOptions>) -> napi::Result<Self> {
    let PoolOptions {
      keys,
      limits,
      quiet,
    } = options.unwrap_or(PoolOptions {
      keys: None,
      limits: None,
      quiet: None,
    });
    let overrides = limits
      .map(|l| LimitOverrides {
        rpm: l.rpm,
        rpd: l.rpd,
        tpm: l.tpm,
      })
      .unwrap_or_default();
    let config =
      PoolConfig::resolve(keys, overrides, &|name| std::env::var(name).ok()).map_err(js_error)?;
    let log: Arc<dyn Log> = if quiet.unwrap_or(false) {
      Arc::new(SilentLog)
    } else {
      Arc::new(ConsoleLog)
    };
    let pool = KeyPool::new(config, Arc::new(SystemClock), log).map_err(js_error)?;
    Ok(Self {
      js: Arc::new(JsPool {
        pool: Arc::new(pool),
        results: Results::default(),
      }),
    })
  }

  fn pool(&self) -> &KeyPool {
    &self.js.pool
  }

  fn results(&self) -> &Results {
    &self.js.results
  }

  /// `{ results: Float64Array, best(): number, recordSuccess(index, tokens): void, figures(index): void }`:
  /// the hot path, as plain functions over this pool.
  #[napi(
    ts_return_type = "{ results: Float64Array; best(): number; recordSuccess(index: number, tokens: number): void; figures(index: number): void }"
  )]
  pub fn hot_path<'env>(&self, env: &'env Env) -> napi::Result<Object<'env>> {
    // SAFETY: `env` is this call's environment, on the JS thread.
    let raw = unsafe { fast_path::install(env.raw(), self.js.clone())? };
    Ok(Object::from_raw(env.raw(), raw))
  }

  /// The keys, in the order whose positions every other method takes and returns.
  #[napi]
  pub fn keys(&self) -> Vec<String> {
    self.pool().keys().to_vec()
  }

  /// `getNextKeyForRotation`: returns the chosen key's position; the reason and the weak key's
  /// score are in the result slots.
  #[napi]
  pub fn rotate(&self) -> napi::Result<u32> {
    let picked = self.pool().rotate().map_err(js_error)?;
    self.results().write_rotation(&picked.pick);
    self.results().write_figures(&picked.figures);
    Ok(picked.pick.selection.index as u32)
  }

  /// Records a failed call on the key at `index`.
  #[napi]
  pub fn record_failure(&self, index: u32, tokens: f64, error: String) -> napi::Result<()> {
    let tokens = validate_tokens(tokens).map_err(js_error)?;
    let figures = self
      .pool()
      .record_usage(at(index), tokens, Outcome::Failure(&error))
      .map_err(js_error)?;
    self.results().write_figures(&figures);
    Ok(())
  }

  /// `handleRateLimit`: `limitType` is `'RPM'`, `'RPD'` or `'TPM'`.
  #[napi]
  pub fn handle_rate_limit(&self, index: u32, limit_type: String) -> napi::Result<()> {
    let limit_type = LimitType::parse(&limit_type).ok_or(PoolError::InvalidLimitType {
      got: format!("{limit_type:?}"),
    });
    let figures = limit_type
      .and_then(|t| self.pool().handle_rate_limit(at(index), t))
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

  /// Serves one request of the HTTP API (`url` relative to where the routes are mounted, e.g.
  /// `/best?x=1`): the Express adapter's way into the same route table as the server's.
  #[napi]
  pub fn route(&self, method: String, url: String, body: Option<Buffer>) -> RouteReply {
    let body = body.as_deref().unwrap_or_default();
    let reply = http::route_mounted(self.pool(), &method, &url, body);
    RouteReply {
      status: reply.status as u32,
      body: reply.body,
      allow: reply.allow.map(str::to_owned),
    }
  }

  /// Starts the HTTP API on `host:port` (port 0 picks a free one), on the addon's tokio runtime.
  #[napi(ts_return_type = "Promise<NativeServer>")]
  pub fn serve<'env>(
    &self,
    env: &'env Env,
    host: String,
    port: u32,
    options: Option<ServeOptions>,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let ip: IpAddr = host.parse().map_err(|_| {
      napi::Error::from_reason(format!("host must be an IP address (got {host:?})"))
    })?;
    let port = u16::try_from(port)
      .map_err(|_| napi::Error::from_reason(format!("port must be 0 to 65535 (got {port})")))?;
    let defaults = ServerOptions::default();
    let options = options.map_or(defaults, |o| ServerOptions {
      max_body_bytes: o
        .max_body_bytes
        .map_or(defaults.max_body_bytes, |n| n as usize),
      access_log: o.access_log.unwrap_or(defaults.access_log),
    });
    let pool = self.js.pool.clone();
    env.spawn_future(async move {
      let handle = http::start(pool, SocketAddr::new(ip, port), options)
        .await
        .map_err(|e| napi::Error::from_reason(e.to_string()))?;
      Ok(NativeServer {
        address: handle.local_addr(),
        handle: Arc::new(AsyncMutex::new(Some(handle))),
      })
    })
  }

  /// Refuses every later call. Idempotent.
  #[napi]
  pub fn close(&self) {
    self.pool().close();
  }
}

/// A reply of the HTTP API's route table.
#[napi(object)]
pub struct RouteReply {
  pub status: u32,
  /// JSON.
  pub body: String,
  /// The `Allow` header of a 405.
  pub allow: Option<String>,
}

/// Options of `NativeKeyPool.serve`.
#[napi(object)]
pub struct ServeOptions {
  /// Largest request body accepted (default 64 KiB); a larger one gets a 400.
  pub max_body_bytes: Option<u32>,
  /// One line per request on stdout, keys masked (default off).
  pub access_log: Option<bool>,
}

/// The running HTTP API.
#[napi]
pub struct NativeServer {
  address: SocketAddr,
  handle: Arc<AsyncMutex<Option<ServerHandle>>>,
}

#[napi]
impl NativeServer {
  /// The port it listens on (the real one when started on port 0).
  #[napi(getter)]
  pub fn port(&self) -> u32 {
    self.address.port() as u32
  }

  #[napi(getter)]
  pub fn host(&self) -> String {
    self.address.ip().to_string()
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
