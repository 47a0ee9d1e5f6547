//! Where keys and limits come from: explicit options first, then the environment, then defaults.

use std::collections::HashSet;

use crate::error::PoolError;
use crate::mask::mask_key;
use crate::quota::Quota;

/// Optional per-limit overrides, as given in an options object.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitOverrides {
  pub rpm: Option<f64>,
  pub rpd: Option<f64>,
  pub tpm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
  pub keys: Vec<String>,
  pub quota: Quota,
  /// Things worth telling the operator that did not stop start-up (dropped keys).
  pub warnings: Vec<String>,
}

impl PoolConfig {
  /// Resolves the configuration. `keys` given explicitly replace the environment's; `env` looks up
  /// a variable (the process environment in production, a map in tests).
  pub fn resolve(
    keys: Option<Vec<String>>,
    limits: LimitOverrides,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, PoolError> {
    let raw = keys.unwrap_or_else(|| keys_from_env(env));
    let mut warnings = Vec::new();
    let keys = clean_keys(raw, &mut warnings);
    if keys.is_empty() {
      return Err(PoolError::NoKeysConfigured);
    }
    let defaults = Quota::default();
    let quota = Quota {
      rpm: limit("rpm", limits.rpm, "GEMINI_RPM_LIMIT", defaults.rpm, env)?,
      rpd: limit("rpd", limits.rpd, "GEMINI_RPD_LIMIT", defaults.rpd, env)?,
      tpm: limit("tpm", limits.tpm, "GEMINI_TPM_LIMIT", defaults.tpm, env)?,
    };
    Ok(Self {
      keys,
      quota,
      warnings,
    })
  }
}

/// `GEMINI_API_KEY_1`, `_2`, ... up to the first gap, then the entries of `GEMINI_API_KEYS`.
fn keys_from_env(env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
  let numbered = (1..).map_while(|i| env(&format!("GEMINI_API_KEY_{i}")));
  let listed = env("GEMINI_API_KEYS")
    .map(|list| list.split(',').map(str::to_owned).collect::<Vec<_>>())
    .unwrap_or_default();
  numbered.chain(listed).collect()
}

/// Trims every key and drops empty entries and duplicates, with a warning for each.
fn clean_keys(raw: Vec<String>, warnings: &mut Vec<String>) -> Vec<String> {
  let mut seen = HashSet::new();
  let mut keys = Vec::with_capacity(raw.len());
  for (position, key) in raw.into_iter().enumerate() {
    let key = key.trim().to_owned();
    if key.is_empty() {
      warnings.push(format!("⚠️ Ignoring empty API key entry #{}", position + 1));
    } else if !seen.insert(key.clone()) {
      warnings.push(format!("⚠️ Ignoring duplicate API key {}", mask_key(&key)));
    } else {
      keys.push(key);
    }
  }
  keys
}

/// Largest limit accepted: far above any Gemini tier, small enough to stay exact as a JS number.
const MAX_LIMIT: f64 = 1e15;

fn limit(
  name: &str,
  explicit: Option<f64>,
  var: &str,
  default: u64,
  env: &dyn Fn(&str) -> Option<String>,
) -> Result<u64, PoolError> {
  let (value, source) = match (explicit, env(var)) {
    (Some(v), _) => (v, format!("limits.{name}")),
    (None, Some(text)) => {
      let parsed = text.trim().parse::<f64>().map_err(|_| {
        PoolError::InvalidConfig(format!("{var} must be a positive integer (got {text:?})"))
      })?;
      (parsed, var.to_owned())
    }
    (None, None) => return Ok(default),
  };
  if value.is_finite() && value >= 1.0 && value.fract() == 0.0 && value <= MAX_LIMIT {
    Ok(value as u64)
  } else {
    Err(PoolError::InvalidConfig(format!(
      "{source} must be a positive integer (got {value})"
    )))
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use std::collections::HashMap;

  fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
      .iter()
      .map(|(k, v)| (k.to_string(), v.to_string()))
      .collect();
    move |name| map.get(name).cloned()
  }

  #[test]
  fn numbered_keys_stop_at_the_first_gap_and_the_list_is_added() {
    let env = env_of(&[
      ("GEMINI_API_KEY_1", "a-key-one"),
      ("GEMINI_API_KEY_2", "a-key-two"),
      ("GEMINI_API_KEY_4", "never-read"),
      ("GEMINI_API_KEYS", " b-key-one ,b-key-two"),
    ]);
    let c = PoolConfig::resolve(None, LimitOverrides::default(), &env).unwrap();
    assert_eq!(c.keys, ["a-key-one", "a-key-two", "b-key-one", "b-key-two"]);
    assert_eq!(c.quota, Quota::FLASH_LITE_FREE);
    assert!(c.warnings.is_empty());
  }

  #[test]
  fn empty_and_duplicate_entries_are_dropped_with_masked_warnings() {
    let env = env_of(&[(
      "GEMINI_API_KEYS",
      "AIzaSyDUPLICATE-0000001,,AIzaSyDUPLICATE-0000001, ",
    )]);
    let c = PoolConfig::resolve(None, LimitOverrides::default(), &env).unwrap();
    assert_eq!(c.keys, ["AIzaSyDUPLICATE-0000001"]);
    assert_eq!(c.warnings.len(), 3);
    assert!(c
      .warnings
      .iter()
      .all(|w| !w.contains("AIzaSyDUPLICATE-0000001")));
    assert!(c.warnings[1].contains("AIzaSyDU...0001"));
  }

  #[test]
  fn no_keys_is_the_old_services_error() {
    let err = PoolConfig::resolve(None, LimitOverrides::default(), &env_of(&[])).unwrap_err();
    assert_eq!(
      err.to_string(),
      "No Gemini API keys provided in environment variables"
    );
    let err = PoolConfig::resolve(
      Some(vec![" ".into()]),
      LimitOverrides::default(),
      &env_of(&[]),
    );
    assert_eq!(err.unwrap_err(), PoolError::NoKeysConfigured);
  }

  #[test]
  fn explicit_keys_replace_the_environment() {
    let env = env_of(&[("GEMINI_API_KEY_1", "from-env")]);
    let c =
      PoolConfig::resolve(Some(vec!["given".into()]), LimitOverrides::default(), &env).unwrap();
    assert_eq!(c.keys, ["given"]);
  }

  #[test]
  fn limits_come_from_options_then_env_then_defaults() {
    let env = env_of(&[
      ("GEMINI_API_KEY_1", "k"),
      ("GEMINI_RPM_LIMIT", "60"),
      ("GEMINI_TPM_LIMIT", "5000"),
    ]);
    let overrides = LimitOverrides {
      tpm: Some(7.0),
      ..Default::default()
    };
    let c = PoolConfig::resolve(None, overrides, &env).unwrap();
    assert_eq!(
      c.quota,
      Quota {
        rpm: 60,
        rpd: 200,
        tpm: 7
      }
    );
  }

  #[test]
  fn bad_limits_are_refused_with_their_source() {
    let env = env_of(&[("GEMINI_API_KEY_1", "k"), ("GEMINI_RPD_LIMIT", "lots")]);
    let err = PoolConfig::resolve(None, LimitOverrides::default(), &env).unwrap_err();
    assert!(err.to_string().contains("GEMINI_RPD_LIMIT"), "{err}");
    for bad in [0.0, -1.0, 1.5, f64::NAN, f64::INFINITY, 1e300] {
      let overrides = LimitOverrides {
        rpm: Some(bad),
        ..Default::default()
      };
      let err = PoolConfig::resolve(Some(vec!["k".into()]), overrides, &env_of(&[])).unwrap_err();
      assert!(err.to_string().contains("limits.rpm"), "{err}");
    }
  }
}
