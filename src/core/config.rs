//! Where keys and limits come from: explicit options first, then the environment, then defaults.

use std::collections::HashSet;

use crate::core::calendar::DailyReset;
use crate::core::clock::Millis;
use crate::core::error::PoolError;
use crate::core::models::{normalize, ModelLimits};
use crate::core::quota::{model_quota, Quota, WindowPolicy, DEFAULT_MODEL, MODEL_QUOTAS};
use crate::mask::{mask_key, quoted};

/// A key, and the project it belongs to when that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
  pub key: String,
  pub project: Option<String>,
}

impl KeySpec {
  pub fn new(key: &str) -> Self {
    Self {
      key: key.to_owned(),
      project: None,
    }
  }
}

/// Longest project name accepted, in bytes.
pub const MAX_PROJECT_BYTES: usize = 128;

/// A project as named in options, the environment or Gemini's errors: `projects/123` and `123`
/// are one project. Visible ASCII without `,` or `:` (they separate entries in `GEMINI_API_KEYS`).
pub fn project_name(text: &str) -> Result<String, PoolError> {
  let name = text.trim();
  let name = name.strip_prefix("projects/").unwrap_or(name);
  let valid = !name.is_empty()
    && name.len() <= MAX_PROJECT_BYTES
    && name
      .bytes()
      .all(|b| b.is_ascii_graphic() && b != b',' && b != b':');
  if valid {
    Ok(name.to_owned())
  } else {
    Err(PoolError::InvalidProject(format!(
      "a project is 1 to {MAX_PROJECT_BYTES} visible ASCII characters without ',' or ':' (got {} characters)",
      text.chars().count()
    )))
  }
}

/// Optional per-limit overrides, as given in an options object.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitOverrides {
  pub rpm: Option<f64>,
  pub rpd: Option<f64>,
  pub tpm: Option<f64>,
}

/// Everything a pool can be given explicitly; what is missing comes from the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolOptions {
  pub keys: Option<Vec<KeySpec>>,
  /// Model whose limits apply (`GEMINI_MODEL`, default gemini-2.0-flash-lite).
  pub model: Option<String>,
  /// Limits per model, replacing or adding to the built-in table.
  pub model_limits: Vec<(String, LimitOverrides)>,
  /// Overrides of the chosen model's limits (`GEMINI_RPM_LIMIT`, ...).
  pub limits: LimitOverrides,
  /// Span of the rolling RPM/TPM windows in ms (`GEMINI_WINDOW_MS`, default 60000).
  pub window_ms: Option<f64>,
  /// `'America/Los_Angeles'` (default) or `'UTC'` (`GEMINI_DAILY_RESET`).
  pub daily_reset: Option<String>,
  /// How long a handed-out key stays reserved without a `recordUsage` (default 60000 ms).
  pub reservation_ttl_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
  pub keys: Vec<KeySpec>,
  /// The default model's limits.
  pub quota: Quota,
  /// Every model's limits.
  pub models: ModelLimits,
  pub policy: WindowPolicy,
  /// Things worth telling the operator that did not stop start-up (dropped keys).
  pub warnings: Vec<String>,
}

impl PoolConfig {
  /// `keys` (their projects unknown) at `quota`, as the default model's limits, and windows as by
  /// default: a pool made in code, without options or the environment.
  pub fn of(keys: Vec<String>, quota: Quota) -> Self {
    Self {
      keys: keys
        .into_iter()
        .map(|key| KeySpec { key, project: None })
        .collect(),
      quota,
      models: ModelLimits {
        default_model: DEFAULT_MODEL.to_owned(),
        default_quota: quota,
        overrides: Vec::new(),
      },
      policy: WindowPolicy::default(),
      warnings: Vec::new(),
    }
  }

  /// Resolves the configuration. Options given explicitly win over the environment; `env` looks
  /// up a variable (the process environment in production, a map in tests), and a variable set to
  /// an empty string counts as unset.
  pub fn resolve(
    options: PoolOptions,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, PoolError> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let raw = match options.keys {
      Some(keys) => keys,
      None => keys_from_env(&env),
    };
    let mut warnings = Vec::new();
    let keys = clean_keys(raw, &mut warnings)?;
    if keys.is_empty() {
      return Err(PoolError::NoKeysConfigured);
    }
    let model = normalize(
      &options
        .model
        .or_else(|| env("GEMINI_MODEL"))
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
    )
    .to_owned();
    let completed =
      |name: &str, table: &LimitOverrides, fallback: Quota| -> Result<Quota, PoolError> {
        Ok(Quota {
          rpm: limit(
            &format!("modelLimits.{name}.rpm"),
            table.rpm,
            None,
            fallback.rpm,
          )?,
          rpd: limit(
            &format!("modelLimits.{name}.rpd"),
            table.rpd,
            None,
            fallback.rpd,
          )?,
          tpm: limit(
            &format!("modelLimits.{name}.tpm"),
            table.tpm,
            None,
            fallback.tpm,
          )?,
        })
      };
    let base = match options
      .model_limits
      .iter()
      .find(|(name, _)| normalize(name) == model)
    {
      Some((_, table)) => completed(&model, table, model_quota(&model).unwrap_or_default())?,
      None => model_quota(&model).ok_or_else(|| {
        let known: Vec<&str> = MODEL_QUOTAS.iter().map(|(name, _)| *name).collect();
        PoolError::InvalidConfig(format!(
          "unknown model {}: give its limits in modelLimits, or use one of {}",
          quoted(&model),
          known.join(", ")
        ))
      })?,
    };
    let overrides = options.limits;
    let quota = Quota {
      rpm: limit(
        "limits.rpm",
        overrides.rpm,
        env_number("GEMINI_RPM_LIMIT", &env)?,
        base.rpm,
      )?,
      rpd: limit(
        "limits.rpd",
        overrides.rpd,
        env_number("GEMINI_RPD_LIMIT", &env)?,
        base.rpd,
      )?,
      tpm: limit(
        "limits.tpm",
        overrides.tpm,
        env_number("GEMINI_TPM_LIMIT", &env)?,
        base.tpm,
      )?,
    };
    let defaults = WindowPolicy::default();
    let span_ms = duration(
      "windowMs",
      options.window_ms,
      env_number("GEMINI_WINDOW_MS", &env)?,
      defaults.span_ms,
    )?;
    let reservation_ttl_ms = duration(
      "reservationTtlMs",
      options.reservation_ttl_ms,
      None,
      defaults.reservation_ttl_ms,
    )?;
    let daily_reset = match options.daily_reset.or_else(|| env("GEMINI_DAILY_RESET")) {
      None => defaults.daily_reset,
      Some(text) => DailyReset::parse(&text).ok_or_else(|| {
        PoolError::InvalidConfig(format!(
          "dailyReset must be 'America/Los_Angeles' or 'UTC' (got {})",
          quoted(&text)
        ))
      })?,
    };
    let mut overrides = Vec::with_capacity(options.model_limits.len());
    for (name, table) in &options.model_limits {
      let name = normalize(name);
      if name != model {
        overrides.push((
          name.to_owned(),
          completed(name, table, model_quota(name).unwrap_or(quota))?,
        ));
      }
    }
    Ok(Self {
      keys,
      quota,
      models: ModelLimits {
        default_model: model,
        default_quota: quota,
        overrides,
      },
      policy: WindowPolicy {
        span_ms,
        daily_reset,
        reservation_ttl_ms,
      },
      warnings,
    })
  }
}

/// `GEMINI_API_KEY_1`, `_2`, ... up to the first gap (a missing or empty variable, as the old
/// service read them), each with its project in `GEMINI_API_KEY_<n>_PROJECT` when set, then the
/// entries of `GEMINI_API_KEYS`: `key`, or `project:key` (Gemini keys hold no colon).
fn keys_from_env(env: &dyn Fn(&str) -> Option<String>) -> Vec<KeySpec> {
  let numbered = (1..).map_while(|i| {
    env(&format!("GEMINI_API_KEY_{i}")).map(|key| KeySpec {
      key,
      project: env(&format!("GEMINI_API_KEY_{i}_PROJECT")),
    })
  });
  let listed = env("GEMINI_API_KEYS")
    .map(|list| {
      list
        .split(',')
        .map(|entry| match entry.split_once(':') {
          Some((project, key)) => KeySpec {
            key: key.to_owned(),
            project: Some(project.to_owned()),
          },
          None => KeySpec::new(entry),
        })
        .collect::<Vec<_>>()
    })
    .unwrap_or_default();
  numbered.chain(listed).collect()
}

/// Trims every key and drops empty entries and duplicates, with a warning for each; a project
/// that is named must be a valid one (see [`project_name`]).
fn clean_keys(raw: Vec<KeySpec>, warnings: &mut Vec<String>) -> Result<Vec<KeySpec>, PoolError> {
  let mut seen = HashSet::new();
  let mut keys = Vec::with_capacity(raw.len());
  for (position, spec) in raw.into_iter().enumerate() {
    let key = spec.key.trim().to_owned();
    if key.is_empty() {
      warnings.push(format!("⚠️ Ignoring empty API key entry #{}", position + 1));
      continue;
    }
    if !seen.insert(key.clone()) {
      warnings.push(format!("⚠️ Ignoring duplicate API key {}", mask_key(&key)));
      continue;
    }
    let project = match spec.project.as_deref().map(str::trim) {
      None | Some("") => None,
      Some(p) => Some(project_name(p).map_err(|e| {
        PoolError::InvalidConfig(format!("the project of API key {}: {e}", mask_key(&key)))
      })?),
    };
    keys.push(KeySpec { key, project });
  }
  Ok(keys)
}

/// Largest limit accepted: far above any Gemini tier, small enough to stay exact as a JS number.
const MAX_LIMIT: f64 = 1e15;

/// A number from the environment, `None` when unset.
fn env_number(
  var: &str,
  env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(f64, String)>, PoolError> {
  match env(var) {
    None => Ok(None),
    Some(text) => text
      .trim()
      .parse::<f64>()
      .map(|v| Some((v, var.to_owned())))
      .map_err(|_| {
        PoolError::InvalidConfig(format!(
          "{var} must be a positive integer (got {})",
          quoted(&text)
        ))
      }),
  }
}

/// An explicit value, else the environment's, else `default`; it must be a whole number from 1 to
/// [`MAX_LIMIT`].
fn limit(
  name: &str,
  explicit: Option<f64>,
  from_env: Option<(f64, String)>,
  default: u64,
) -> Result<u64, PoolError> {
  let (value, source) = match (explicit, from_env) {
    (Some(v), _) => (v, name.to_owned()),
    (None, Some((v, var))) => (v, var),
    (None, None) => return Ok(default),
  };
  if value.is_finite() && value >= 1.0 && value.fract() == 0.0 && value <= MAX_LIMIT {
    Ok(value as u64)
  } else {
    Err(PoolError::InvalidConfig(format!(
      "{source} must be a positive integer (got {})",
      js_number(value)
    )))
  }
}

fn duration(
  name: &str,
  explicit: Option<f64>,
  from_env: Option<(f64, String)>,
  default: Millis,
) -> Result<Millis, PoolError> {
  limit(name, explicit, from_env, default as u64).map(|ms| ms as Millis)
}

/// Where the manager keeps its state, as the options and the environment say (SPEC section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
  /// The MongoDB connection string.
  pub uri: String,
  /// None: the store's default (`rag_db`).
  pub db_name: Option<String>,
  /// Share the keys' quota with every process using the database; none: the store's default (on).
  pub shared_quota: Option<bool>,
}

/// The connection string when no option gives one.
pub const MONGODB_URI_ENV: &str = "MONGODB_URI";
/// The database name when no option gives one.
pub const MONGODB_DB_NAME_ENV: &str = "MONGODB_DB_NAME";
/// Whether the quota is shared when no option says.
pub const SHARED_QUOTA_ENV: &str = "KEY_MANAGER_SHARED_QUOTA";
/// Where spill files go when no option says.
pub const SPILL_DIR_ENV: &str = "KEY_MANAGER_SPILL_DIR";
/// How often refused keys are re-tested when no option says.
pub const REVALIDATE_INTERVAL_ENV: &str = "KEY_MANAGER_REVALIDATE_INTERVAL_MS";

impl StoreSettings {
  /// The options first, then `MONGODB_URI`, `MONGODB_DB_NAME` and `KEY_MANAGER_SHARED_QUOTA`;
  /// none without a connection string (an empty `uri` option is none, whatever the environment
  /// says), and the manager runs in memory.
  pub fn resolve(
    uri: Option<String>,
    db_name: Option<String>,
    shared_quota: Option<bool>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Option<Self> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let uri = uri
      .or_else(|| env(MONGODB_URI_ENV))
      .filter(|u| !u.is_empty())?;
    Some(Self {
      uri,
      db_name: db_name
        .filter(|d| !d.is_empty())
        .or_else(|| env(MONGODB_DB_NAME_ENV)),
      // A value that is no boolean leaves the default: a typo must not turn persistence off.
      shared_quota: shared_quota.or_else(|| env_flag(SHARED_QUOTA_ENV, &env).ok().flatten()),
    })
  }
}

/// Where spill files go: the option, else `KEY_MANAGER_SPILL_DIR`; none: the system's temporary
/// directory.
pub fn spill_dir(explicit: Option<String>, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
  explicit.or_else(|| env(SPILL_DIR_ENV).filter(|d| !d.trim().is_empty()))
}

/// A boolean environment variable, read as every switch of the manager is: `1`, `true`, `yes` or
/// `0`, `false`, `no`, in any case; none when unset or blank, and the value itself when it is
/// anything else.
pub fn env_flag(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<bool>, String> {
  let Some(value) = env(name) else {
    return Ok(None);
  };
  match value.trim().to_ascii_lowercase().as_str() {
    "" => Ok(None),
    "1" | "true" | "yes" => Ok(Some(true)),
    "0" | "false" | "no" => Ok(Some(false)),
    _ => Err(value),
  }
}

/// How often to re-test the keys Gemini refused, in ms: `explicit` when given, else
/// `KEY_MANAGER_REVALIDATE_INTERVAL_MS`; none: never. Positive and finite either way.
pub fn revalidate_interval_ms(
  explicit: Option<f64>,
  env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<f64>, PoolError> {
  let (ms, name, given) = match explicit {
    Some(ms) => (ms, "revalidateIntervalMs", js_number(ms)),
    None => match env(REVALIDATE_INTERVAL_ENV).filter(|v| !v.trim().is_empty()) {
      None => return Ok(None),
      Some(text) => (
        text.trim().parse().unwrap_or(f64::NAN),
        REVALIDATE_INTERVAL_ENV,
        quoted(&text),
      ),
    },
  };
  if ms.is_finite() && ms > 0.0 {
    Ok(Some(ms))
  } else {
    Err(PoolError::InvalidConfig(format!(
      "{name} must be a positive number of milliseconds (got {given})"
    )))
  }
}

/// A number as JS prints it (`Infinity`, `NaN`), for messages about values that came from JS.
pub fn js_number(value: f64) -> String {
  if value.is_nan() {
    "NaN".into()
  } else if value.is_infinite() {
    if value > 0.0 { "Infinity" } else { "-Infinity" }.into()
  } else {
    value.to_string()
  }
}

#[cfg(test)]
mod tests;
