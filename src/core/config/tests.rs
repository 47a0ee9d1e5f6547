use super::*;
use std::collections::HashMap;

fn keys(keys: &[&str]) -> PoolOptions {
  PoolOptions {
    keys: Some(keys.iter().map(|k| KeySpec::new(k)).collect()),
    ..Default::default()
  }
}

fn names(c: &PoolConfig) -> Vec<&str> {
  c.keys.iter().map(|k| k.key.as_str()).collect()
}

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
  let c = PoolConfig::resolve(PoolOptions::default(), &env).unwrap();
  assert_eq!(
    names(&c),
    ["a-key-one", "a-key-two", "b-key-one", "b-key-two"]
  );
  assert_eq!(c.quota, Quota::FLASH_LITE_FREE);
  assert!(c.warnings.is_empty());
}

#[test]
fn empty_and_duplicate_entries_are_dropped_with_masked_warnings() {
  let env = env_of(&[(
    "GEMINI_API_KEYS",
    "AIzaSyDUPLICATE-0000001,,AIzaSyDUPLICATE-0000001, ",
  )]);
  let c = PoolConfig::resolve(PoolOptions::default(), &env).unwrap();
  assert_eq!(names(&c), ["AIzaSyDUPLICATE-0000001"]);
  assert_eq!(c.warnings.len(), 3);
  assert!(c
    .warnings
    .iter()
    .all(|w| !w.contains("AIzaSyDUPLICATE-0000001")));
  assert!(c.warnings[1].contains("AIzaSyDU...0001"));
}

#[test]
fn no_keys_is_the_old_services_error() {
  let err = PoolConfig::resolve(PoolOptions::default(), &env_of(&[])).unwrap_err();
  assert_eq!(
    err.to_string(),
    "No Gemini API keys provided in environment variables"
  );
  let err = PoolConfig::resolve(keys(&[" "]), &env_of(&[]));
  assert_eq!(err.unwrap_err(), PoolError::NoKeysConfigured);
}

#[test]
fn explicit_keys_replace_the_environment() {
  let env = env_of(&[("GEMINI_API_KEY_1", "from-env")]);
  let c = PoolConfig::resolve(keys(&["given"]), &env).unwrap();
  assert_eq!(names(&c), ["given"]);
}

#[test]
fn limits_come_from_options_then_env_then_defaults() {
  let env = env_of(&[
    ("GEMINI_API_KEY_1", "k"),
    ("GEMINI_RPM_LIMIT", "60"),
    ("GEMINI_TPM_LIMIT", "5000"),
  ]);
  let options = PoolOptions {
    limits: LimitOverrides {
      tpm: Some(7.0),
      ..Default::default()
    },
    ..Default::default()
  };
  let c = PoolConfig::resolve(options, &env).unwrap();
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
  let err = PoolConfig::resolve(PoolOptions::default(), &env).unwrap_err();
  assert!(err.to_string().contains("GEMINI_RPD_LIMIT"), "{err}");
  for bad in [0.0, -1.0, 1.5, f64::NAN, f64::INFINITY, 1e300] {
    let options = PoolOptions {
      limits: LimitOverrides {
        rpm: Some(bad),
        ..Default::default()
      },
      ..keys(&["k"])
    };
    let err = PoolConfig::resolve(options, &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("limits.rpm"), "{err}");
  }
  let err = PoolConfig::resolve(
    PoolOptions {
      limits: LimitOverrides {
        rpm: Some(f64::INFINITY),
        ..Default::default()
      },
      ..keys(&["k"])
    },
    &env_of(&[]),
  );
  assert!(err.unwrap_err().to_string().ends_with("(got Infinity)"));
}

#[test]
fn empty_variables_count_as_unset() {
  let env = env_of(&[
    ("GEMINI_API_KEY_1", "first"),
    ("GEMINI_API_KEY_2", ""),
    ("GEMINI_API_KEY_3", "after-the-gap"),
    ("GEMINI_RPM_LIMIT", " "),
  ]);
  let c = PoolConfig::resolve(PoolOptions::default(), &env).unwrap();
  assert_eq!(names(&c), ["first"]);
  assert_eq!(c.quota.rpm, 30);
}

#[test]
fn model_limits_come_from_the_table_or_the_options() {
  let env = env_of(&[("GEMINI_MODEL", "gemini-2.5-pro")]);
  let c = PoolConfig::resolve(keys(&["k"]), &env).unwrap();
  assert_eq!(
    c.quota,
    Quota {
      rpm: 5,
      rpd: 100,
      tpm: 250_000
    }
  );
  let options = PoolOptions {
    model: Some("my-tuned-model".into()),
    model_limits: vec![(
      "my-tuned-model".into(),
      LimitOverrides {
        rpm: Some(100.0),
        rpd: Some(5_000.0),
        tpm: Some(2e6),
      },
    )],
    limits: LimitOverrides {
      rpd: Some(10.0),
      ..Default::default()
    },
    ..keys(&["k"])
  };
  let c = PoolConfig::resolve(options, &env_of(&[])).unwrap();
  assert_eq!(
    c.quota,
    Quota {
      rpm: 100,
      rpd: 10,
      tpm: 2_000_000
    }
  );
  let unknown = PoolOptions {
    model: Some("gpt-4".into()),
    ..keys(&["k"])
  };
  let err = PoolConfig::resolve(unknown, &env_of(&[])).unwrap_err();
  assert!(err.to_string().contains("gemini-2.5-flash"), "{err}");
}

#[test]
fn keys_name_their_projects_in_options_and_the_environment() {
  let env = env_of(&[
    ("GEMINI_API_KEY_1", "key-one"),
    ("GEMINI_API_KEY_1_PROJECT", "projects/1001"),
    ("GEMINI_API_KEY_2", "key-two"),
    ("GEMINI_API_KEYS", "1002:key-three,key-four"),
  ]);
  let c = PoolConfig::resolve(PoolOptions::default(), &env).unwrap();
  let projects: Vec<_> = c
    .keys
    .iter()
    .map(|k| (k.key.as_str(), k.project.as_deref()))
    .collect();
  assert_eq!(
    projects,
    [
      ("key-one", Some("1001")),
      ("key-two", None),
      ("key-three", Some("1002")),
      ("key-four", None)
    ]
  );
  let options = PoolOptions {
    keys: Some(vec![
      KeySpec {
        key: "a".into(),
        project: Some(" alpha ".into()),
      },
      KeySpec::new("b"),
    ]),
    ..Default::default()
  };
  let c = PoolConfig::resolve(options, &env_of(&[])).unwrap();
  assert_eq!(c.keys[0].project.as_deref(), Some("alpha"));
  let bad = PoolOptions {
    keys: Some(vec![KeySpec {
      key: "AIzaSyBADPROJECT00000000000000000000001".into(),
      project: Some("a,b".into()),
    }]),
    ..Default::default()
  };
  let err = PoolConfig::resolve(bad, &env_of(&[]))
    .unwrap_err()
    .to_string();
  assert!(
    err.contains("AIzaSyBA...0001") && err.contains("without ','"),
    "{err}"
  );
}

#[test]
fn every_models_limits_are_resolved_from_model_limits_the_table_or_the_default_model() {
  let options = PoolOptions {
    model_limits: vec![
      (
        "models/gemini-2.5-pro".into(),
        LimitOverrides {
          rpm: Some(2.0),
          ..Default::default()
        },
      ),
      (
        "my-model".into(),
        LimitOverrides {
          rpd: Some(7.0),
          ..Default::default()
        },
      ),
    ],
    limits: LimitOverrides {
      rpm: Some(40.0),
      ..Default::default()
    },
    ..keys(&["k"])
  };
  let c = PoolConfig::resolve(options, &env_of(&[])).unwrap();
  assert_eq!(c.models.default_model, "gemini-2.0-flash-lite");
  assert_eq!(c.models.default_quota.rpm, 40);
  assert_eq!(
    c.models.overrides,
    vec![
      (
        "gemini-2.5-pro".to_owned(),
        Quota {
          rpm: 2,
          rpd: 100,
          tpm: 250_000
        }
      ),
      (
        "my-model".to_owned(),
        Quota {
          rpm: 40,
          rpd: 7,
          tpm: 1_000_000
        }
      ),
    ]
  );
}

#[test]
fn window_policy_is_configurable() {
  let env = env_of(&[("GEMINI_DAILY_RESET", "UTC"), ("GEMINI_WINDOW_MS", "30000")]);
  let c = PoolConfig::resolve(keys(&["k"]), &env).unwrap();
  assert_eq!(c.policy.span_ms, 30_000);
  assert_eq!(c.policy.daily_reset, DailyReset::UtcMidnight);
  assert_eq!(
    PoolConfig::resolve(keys(&["k"]), &env_of(&[]))
      .unwrap()
      .policy,
    WindowPolicy::default()
  );
  let bad = PoolOptions {
    daily_reset: Some("Mars".into()),
    ..keys(&["k"])
  };
  assert!(PoolConfig::resolve(bad, &env_of(&[])).is_err());
}

#[test]
fn the_store_comes_from_the_options_then_the_environment() {
  let env = env_of(&[
    ("MONGODB_URI", "mongodb://env"),
    ("MONGODB_DB_NAME", "env_db"),
    ("KEY_MANAGER_SHARED_QUOTA", "No"),
  ]);
  let from_env = StoreSettings::resolve(None, None, None, &env).unwrap();
  assert_eq!(
    from_env,
    StoreSettings {
      uri: "mongodb://env".into(),
      db_name: Some("env_db".into()),
      shared_quota: Some(false),
    }
  );
  let given = StoreSettings::resolve(
    Some("mongodb://given".into()),
    Some("given_db".into()),
    Some(true),
    &env,
  )
  .unwrap();
  assert_eq!(given.uri, "mongodb://given");
  assert_eq!(given.db_name.as_deref(), Some("given_db"));
  assert_eq!(given.shared_quota, Some(true));
  // An empty database name is none: the environment's then.
  let unnamed = StoreSettings::resolve(None, Some(String::new()), None, &env).unwrap();
  assert_eq!(unnamed.db_name.as_deref(), Some("env_db"));
}

#[test]
fn without_a_connection_string_the_manager_runs_in_memory() {
  let unset = env_of(&[]);
  assert_eq!(StoreSettings::resolve(None, None, None, &unset), None);
  let blank = env_of(&[("MONGODB_URI", "  ")]);
  assert_eq!(StoreSettings::resolve(None, None, None, &blank), None);
  // An empty option is none, even with the variable set.
  let env = env_of(&[("MONGODB_URI", "mongodb://env")]);
  assert_eq!(
    StoreSettings::resolve(Some(String::new()), None, None, &env),
    None
  );
}

#[test]
fn a_shared_quota_variable_that_is_no_boolean_leaves_the_default() {
  let env = env_of(&[
    ("MONGODB_URI", "mongodb://env"),
    ("KEY_MANAGER_SHARED_QUOTA", "sometimes"),
  ]);
  let s = StoreSettings::resolve(None, None, None, &env).unwrap();
  assert_eq!(s.shared_quota, None);
}

#[test]
fn flags_read_the_same_words_in_any_case() {
  for (value, want) in [
    ("1", Ok(Some(true))),
    ("TRUE", Ok(Some(true))),
    (" yes ", Ok(Some(true))),
    ("0", Ok(Some(false))),
    ("False", Ok(Some(false))),
    ("no", Ok(Some(false))),
    ("", Ok(None)),
    ("maybe", Err("maybe".to_owned())),
  ] {
    let env = env_of(&[("FLAG", value)]);
    assert_eq!(env_flag("FLAG", &env), want, "{value:?}");
  }
  assert_eq!(env_flag("FLAG", &env_of(&[])), Ok(None));
}

#[test]
fn the_revalidation_interval_comes_from_the_option_then_the_environment() {
  let env = env_of(&[("KEY_MANAGER_REVALIDATE_INTERVAL_MS", " 2500 ")]);
  assert_eq!(revalidate_interval_ms(None, &env), Ok(Some(2500.0)));
  assert_eq!(revalidate_interval_ms(Some(10.0), &env), Ok(Some(10.0)));
  assert_eq!(revalidate_interval_ms(None, &env_of(&[])), Ok(None));
  let bad = env_of(&[("KEY_MANAGER_REVALIDATE_INTERVAL_MS", "soon")]);
  let e = revalidate_interval_ms(None, &bad).unwrap_err().to_string();
  assert!(
    e.contains("KEY_MANAGER_REVALIDATE_INTERVAL_MS") && e.contains("\"soon\""),
    "{e}"
  );
  let e = revalidate_interval_ms(Some(0.0), &env)
    .unwrap_err()
    .to_string();
  assert_eq!(
    e,
    "invalid configuration: revalidateIntervalMs must be a positive number of milliseconds (got 0)"
  );
}
