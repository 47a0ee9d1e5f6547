//! JS options into configuration: the manager's (`new NativeKeyPool(options)`), `serve`'s,
//! `attachStore`'s and `keyRoutes`'s, each option checked as it is read (see `values`) before the
//! configuration resolves it against the environment. This is also the one place the layer reads
//! the process environment: everything below takes it injected.

use std::time::Duration;

use napi::bindgen_prelude::Unknown;
use napi_derive::napi;

use crate::core::config::{self, js_number, KeySpec, LimitOverrides, StoreSettings};
use crate::core::error::PoolError;
use crate::core::pool::is_integer;
use crate::napi::errors::{bad_input, BindingError};
use crate::napi::values::{elements, field, own_names, Fields, Given, Quote};

/// The process environment, as the configuration reads it.
pub(super) fn process_env(name: &str) -> Option<String> {
  std::env::var(name).ok()
}

fn invalid_configuration(message: String) -> BindingError {
  PoolError::InvalidConfig(message).into()
}

fn invalid_serve_options(message: String) -> BindingError {
  bad_input(format!("invalid serve options: {message}"))
}

const MILLIS: &str = "must be a positive integer of milliseconds";
const POSITIVE: &str = "must be a positive integer";

/// The manager's options (`ApiKeyManagerOptions` in index.d.ts), checked. The store's
/// settings are resolved against the environment here; the rest is where it is used.
pub(super) struct ManagerOptions {
  pub pool: config::PoolOptions,
  pub quiet: bool,
  /// Recorded calls kept in memory for usage statistics.
  pub usage_log_capacity: Option<u32>,
  /// Where to persist: the options and the environment's settings, with the writer's options.
  pub store: Option<StoreOptions>,
  pub route_requests: Option<bool>,
  /// How long a routed request may wait for a key with room.
  pub route_max_wait: Option<Duration>,
  pub revalidate_interval_ms: Option<f64>,
}

impl ManagerOptions {
  /// Reads `options` (undefined or null: none).
  pub(super) fn read(
    options: Option<Unknown>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, BindingError> {
    let o = Fields::of(options, invalid_configuration)?;
    let keys = keys(&o)?;
    let model = unset_or_string(&o, "model", "must be a string")?;
    let model_limits = model_limits(&o)?;
    let limits = limits(&o, "limits", o.get("limits")?)?.unwrap_or_default();
    let window_ms = o.number("windowMs", MILLIS)?;
    let daily_reset = unset_or_string(&o, "dailyReset", "must be 'America/Los_Angeles' or 'UTC'")?;
    let reservation_ttl_ms = o.number("reservationTtlMs", MILLIS)?;
    let quiet = {
      let given = o.get("quiet")?;
      match given.boolean()? {
        Some(quiet) => quiet,
        None if given.is_unset() => false,
        None => o.fail(format!("quiet must be a boolean (got {})", given.shown()?))?,
      }
    };
    let uri = o.string("mongodbUri")?;
    let db_name = o.string("mongodbDbName")?;
    let connect_timeout_ms = o.number("mongoConnectTimeoutMs", MILLIS)?;
    let flush_interval_ms = o.number("flushIntervalMs", MILLIS)?;
    let retry_interval_ms = o.number("mongoRetryIntervalMs", MILLIS)?;
    let batch_size = o.whole("usageBatchSize", 1.0, POSITIVE)?;
    let queue_capacity = o.whole("usageQueueCapacity", 1.0, POSITIVE)?;
    let shared_quota = o.boolean("sharedQuota", Quote::Value)?;
    let fingerprint_secret = o.string("fingerprintSecret")?;
    let store_plaintext_keys = o.boolean("storePlaintextKeys", Quote::Type)?;
    let usage_log_capacity = o.whole("usageLogCapacity", 0.0, "must be a non-negative integer")?;
    let key_sync_interval_ms = o.number("keySyncIntervalMs", MILLIS)?;
    let close_timeout_ms = o.number("closeTimeoutMs", MILLIS)?;
    let spill_dir = o.string("spillDir")?;
    let route_requests = o.boolean("routeRequests", Quote::Value)?;
    let route_max_wait = o
      .checked_number(
        "routeMaxWaitMs",
        |ms| ms.is_finite() && ms >= 0.0,
        "must be a non-negative number of milliseconds",
      )?
      .map(|ms| Duration::from_millis(ms as u64));
    let revalidate_interval_ms = o.checked_number(
      "revalidateIntervalMs",
      |ms| ms.is_finite() && ms > 0.0,
      "must be a positive number of milliseconds",
    )?;
    let store = StoreSettings::resolve(uri, db_name, shared_quota, env).map(|s| StoreOptions {
      uri: s.uri,
      db_name: s.db_name,
      connect_timeout_ms,
      flush_interval_ms,
      retry_interval_ms,
      key_sync_interval_ms,
      close_timeout_ms,
      spill_dir,
      batch_size,
      queue_capacity,
      shared_quota: s.shared_quota,
      fingerprint_secret,
      store_plaintext_keys,
    });
    Ok(Self {
      pool: config::PoolOptions {
        keys,
        model,
        model_limits,
        limits,
        window_ms,
        daily_reset,
        reservation_ttl_ms,
      },
      quiet,
      usage_log_capacity,
      store,
      route_requests,
      route_max_wait,
      revalidate_interval_ms,
    })
  }
}

/// A string, or undefined or null for none.
fn unset_or_string(o: &Fields, name: &str, must_be: &str) -> Result<Option<String>, BindingError> {
  let given = o.get(name)?;
  match given.string()? {
    Some(s) => Ok(Some(s)),
    None if given.is_unset() => Ok(None),
    None => o.fail(format!("{name} {must_be} (got {})", given.shown()?)),
  }
}

/// `keys`: each a string, or `{ apiKey, project }` with strings (a null project is none) and no
/// other field.
fn keys(o: &Fields) -> Result<Option<Vec<KeySpec>>, BindingError> {
  const MUST_BE: &str = "keys must be an array of strings or { apiKey, project } objects";
  let given = o.get("keys")?;
  if given.is_undefined() {
    return Ok(None);
  }
  let Some(list) = given.array()? else {
    return o.fail(MUST_BE.to_owned());
  };
  let mut keys = Vec::new();
  for entry in elements(&list)? {
    match key_spec(&entry)? {
      Some(spec) => keys.push(spec),
      None => return o.fail(MUST_BE.to_owned()),
    }
  }
  Ok(Some(keys))
}

fn key_spec(entry: &Given) -> napi::Result<Option<KeySpec>> {
  if let Some(key) = entry.string()? {
    return Ok(Some(KeySpec::new(&key)));
  }
  let Some(object) = entry.object()? else {
    return Ok(None);
  };
  let Some(key) = field(&object, "apiKey")?.string()? else {
    return Ok(None);
  };
  let project = field(&object, "project")?;
  let project = match project.string()? {
    Some(name) => Some(name),
    None if project.is_unset() => None,
    None => return Ok(None),
  };
  let known_fields = own_names(&object)?
    .iter()
    .all(|name| name == "apiKey" || name == "project");
  Ok(known_fields.then_some(KeySpec { key, project }))
}

/// `limits` or one entry of `modelLimits`: an object of optional numbers (the configuration checks
/// their values); undefined is none.
fn limits(o: &Fields, name: &str, given: Given) -> Result<Option<LimitOverrides>, BindingError> {
  if given.is_undefined() {
    return Ok(None);
  }
  let Some(object) = given.object()? else {
    return o.fail(format!("{name} must be an object"));
  };
  let field = |field: &str| -> Result<Option<f64>, BindingError> {
    let value = self::field(&object, field)?;
    match value.number()? {
      Some(n) => Ok(Some(n)),
      None if value.is_undefined() => Ok(None),
      None => o.fail(format!(
        "{name}.{field} {POSITIVE} (got {})",
        value.shown()?
      )),
    }
  };
  Ok(Some(LimitOverrides {
    rpm: field("rpm")?,
    rpd: field("rpd")?,
    tpm: field("tpm")?,
  }))
}

/// `modelLimits`: limits by model name; undefined or null is none.
fn model_limits(o: &Fields) -> Result<Vec<(String, LimitOverrides)>, BindingError> {
  let given = o.get("modelLimits")?;
  if given.is_unset() {
    return Ok(Vec::new());
  }
  let Some(table) = given.object()? else {
    return o.fail("modelLimits must be an object".to_owned());
  };
  let mut out = Vec::new();
  for model in own_names(&table)? {
    let name = format!("modelLimits.{model}");
    let entry = field(&table, &model)?;
    let overrides = limits(o, &name, entry)?.unwrap_or_default();
    out.push((model, overrides));
  }
  Ok(out)
}

/// Options of `NativeKeyPool.attachStore`: what the manager's options and the environment give
/// (see `NativeKeyPool.storeOptions`), or any others.
#[napi(object)]
#[derive(Clone)]
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

/// `serve`'s options (`ServeOptions` in index.d.ts), checked.
pub(super) struct ServeOptions {
  /// An IP address, or `localhost` (the default).
  pub host: String,
  /// Default 3001; 0 picks a free one.
  pub port: u16,
  pub access_log: bool,
  pub max_body_bytes: Option<u32>,
  /// Else `KEY_MANAGER_ADMIN_TOKEN`.
  pub admin_token: Option<String>,
  /// Else `KEY_MANAGER_ALLOW_INSECURE`.
  pub allow_insecure: Option<bool>,
  pub max_connections: Option<u32>,
  pub head_timeout: Option<Duration>,
  /// Else `KEY_MANAGER_PROXY_TOKENS`.
  pub proxy_tokens: Option<Vec<String>>,
  /// Else `KEY_MANAGER_PROXY_OPEN`.
  pub proxy_open: Option<bool>,
  pub proxy_max_body_bytes: Option<u32>,
  pub upstream_connect_timeout: Option<Duration>,
  pub upstream_first_byte_timeout: Option<Duration>,
  pub upstream_chunk_timeout: Option<Duration>,
}

/// The port `serve` listens on when none is given.
const DEFAULT_PORT: u16 = 3001;

impl ServeOptions {
  /// Reads `options` (undefined: none).
  pub(super) fn read(options: Option<Unknown>) -> Result<Self, BindingError> {
    if let Some(options) = options {
      if Given::of(options)?.is_null() {
        Err(invalid_serve_options(
          "options must be an object (got null)".to_owned(),
        ))?;
      }
    }
    let o = Fields::of(options, invalid_serve_options)?;
    let host = {
      let given = o.get("host")?;
      match given.string()? {
        Some(host) => host,
        None if given.is_undefined() => "localhost".to_owned(),
        None => o.fail(format!(
          "host must be an IP address or 'localhost' (got {})",
          given.type_of()
        ))?,
      }
    };
    let port = {
      let given = o.get("port")?;
      match given.number()? {
        None if given.is_undefined() => DEFAULT_PORT,
        Some(n) if is_integer(n) && (0.0..=65535.0).contains(&n) => n as u16,
        _ => o.fail("port must be an integer from 0 to 65535".to_owned())?,
      }
    };
    let access_log = o.boolean("accessLog", Quote::Type)?.unwrap_or(false);
    let bytes = |name: &str| -> Result<Option<u32>, BindingError> {
      let given = o.get(name)?;
      match given.whole(0.0)? {
        Some(n) => Ok(Some(n)),
        None if given.is_undefined() => Ok(None),
        None => o.fail(format!("{name} must be a whole number of bytes")),
      }
    };
    let max_body_bytes = bytes("maxBodyBytes")?;
    let proxy_max_body_bytes = bytes("proxyMaxBodyBytes")?;
    let admin_token = o.string("adminToken")?;
    let allow_insecure = o.boolean("allowInsecure", Quote::Type)?;
    let proxy_open = o.boolean("proxyOpen", Quote::Type)?;
    let max_connections = {
      let given = o.get("maxConnections")?;
      match given.whole(1.0)? {
        Some(n) => Some(n),
        None if given.is_undefined() => None,
        None => o.fail("maxConnections must be a positive integer".to_owned())?,
      }
    };
    let millis = |name: &str| -> Result<Option<Duration>, BindingError> {
      let given = o.get(name)?;
      match given.number()?.filter(|&ms| ms.is_finite() && ms > 0.0) {
        Some(ms) => Ok(Some(Duration::from_millis(ms.ceil() as u64))),
        None if given.is_undefined() => Ok(None),
        None => o.fail(format!("{name} must be a positive number of milliseconds")),
      }
    };
    let head_timeout = millis("headTimeoutMs")?;
    let upstream_connect_timeout = millis("upstreamConnectTimeoutMs")?;
    let upstream_first_byte_timeout = millis("upstreamFirstByteTimeoutMs")?;
    let upstream_chunk_timeout = millis("upstreamChunkTimeoutMs")?;
    let proxy_tokens = {
      const MUST_BE: &str = "proxyTokens must be an array of strings";
      let given = o.get("proxyTokens")?;
      match given.array()? {
        None if given.is_undefined() => None,
        None => o.fail(MUST_BE.to_owned())?,
        Some(list) => {
          let mut tokens = Vec::new();
          for token in elements(&list)? {
            match token.string()? {
              Some(token) => tokens.push(token),
              None => o.fail(MUST_BE.to_owned())?,
            }
          }
          Some(tokens)
        }
      }
    };
    Ok(Self {
      host,
      port,
      access_log,
      max_body_bytes,
      admin_token,
      allow_insecure,
      max_connections,
      head_timeout,
      proxy_tokens,
      proxy_open,
      proxy_max_body_bytes,
      upstream_connect_timeout,
      upstream_first_byte_timeout,
      upstream_chunk_timeout,
    })
  }
}

/// The admin token of `keyRoutes(manager, options)`: undefined when not given (then the route
/// table reads `KEY_MANAGER_ADMIN_TOKEN`), a string when given.
#[napi]
pub fn key_routes_admin_token(options: Option<Unknown>) -> napi::Result<Option<String>> {
  let Some(options) = options else {
    return Ok(None);
  };
  let Some(object) = Given::of(options)?.object()? else {
    return Ok(None);
  };
  let token = field(&object, "adminToken")?;
  match token.string()? {
    Some(token) => Ok(Some(token)),
    None if token.is_undefined() => Ok(None),
    None => Err(bad_input(format!(
      "keyRoutes: adminToken must be a string (got {})",
      token.type_of()
    )))?,
  }
}

/// A duration option in ms: positive and finite, or the default.
pub(super) fn millis_option(
  name: &str,
  value: Option<f64>,
  default: Duration,
) -> Result<Duration, BindingError> {
  match value {
    None => Ok(default),
    Some(ms) if ms.is_finite() && ms > 0.0 => Ok(Duration::from_millis(ms.ceil() as u64)),
    Some(ms) => Err(bad_input(format!(
      "{name} must be a positive number of milliseconds (got {})",
      js_number(ms)
    ))),
  }
}
