//! JS options into configuration: what the constructor, `attachStore` and `serve` take, and the
//! one place this layer reads the process environment (everything below takes it injected).

use std::collections::HashMap;
use std::time::Duration;

use napi::bindgen_prelude::Either;
use napi_derive::napi;

use crate::core::config::{js_number, LimitOverrides};
use crate::napi::errors::bad_input;

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

/// A duration option in ms: positive and finite, or the default.
pub(super) fn millis_option(
  name: &str,
  value: Option<f64>,
  default: Duration,
) -> napi::Result<Duration> {
  match value {
    None => Ok(default),
    Some(ms) if ms.is_finite() && ms > 0.0 => Ok(Duration::from_millis(ms.ceil() as u64)),
    Some(ms) => Err(bad_input(format!(
      "{name} must be a positive number of milliseconds (got {})",
      js_number(ms)
    )))?,
  }
}

/// The process environment, as the configuration reads it.
pub(super) fn process_env(name: &str) -> Option<String> {
  std::env::var(name).ok()
}
