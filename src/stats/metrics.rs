//! The pool's metrics as operators read them: the Prometheus text exposition format (`GET
//! /metrics`), and the figures the N-API layer turns into `getMetrics()`'s object. The pool takes
//! a [`MetricsSnapshot`] under its lock; rendering happens after the lock is released.

use std::fmt::Write;

use crate::core::key::{LimitFigures, STATE_LABELS};
use crate::core::quota::LimitType;
use crate::stats::counters::Counters;

/// Every metric's name starts with this.
const NS: &str = "gemini_key_manager";

/// The states of keys in the pool: every state but `removed` (removed keys are not listed).
pub const LISTED_STATES: [&str; 7] = [
  STATE_LABELS[0],
  STATE_LABELS[1],
  STATE_LABELS[2],
  STATE_LABELS[3],
  STATE_LABELS[4],
  STATE_LABELS[5],
  STATE_LABELS[6],
];

/// One key's figures at the time of the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMetrics {
  /// Masked.
  pub api_key: String,
  /// Its position in the pool: two keys can share a mask.
  pub index: usize,
  /// Position in [`STATE_LABELS`].
  pub state: usize,
  pub availability_score: f64,
  /// RPM, RPD, TPM.
  pub windows: [LimitFigures; 3],
}

/// One (project, model) budget's figures at the time of the snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetMetrics {
  /// The project's name, or `key:` and the masked key for a key whose project is not known.
  pub project: String,
  pub model: String,
  /// `active`, `resting`, `no-quota` or `overloaded`.
  pub state: &'static str,
  pub availability_score: f64,
  /// RPM, RPD, TPM.
  pub windows: [LimitFigures; 3],
}

/// The counters, every key's figures and every budget in use, read at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
  pub counters: Counters,
  pub keys: Vec<KeyMetrics>,
  pub budgets: Vec<BudgetMetrics>,
}

impl MetricsSnapshot {
  /// Selections served from the cache over all selections; 0 before the first.
  pub fn cache_hit_rate(&self) -> f64 {
    let c = &self.counters;
    let all = c.cache_hits + c.cache_misses;
    if all == 0 {
      0.0
    } else {
      c.cache_hits as f64 / all as f64
    }
  }

  /// How many keys are in each state a listed key can be in, in [`LISTED_STATES`] order.
  pub fn keys_by_state(&self) -> [u64; LISTED_STATES.len()] {
    let mut counts = [0; LISTED_STATES.len()];
    for k in &self.keys {
      if let Some(n) = counts.get_mut(k.state) {
        *n += 1;
      }
    }
    counts
  }
}

/// A label value as the exposition format wants it: backslash, double quote and newline escaped.
pub fn escape_label(value: &str) -> String {
  let mut out = String::with_capacity(value.len());
  for c in value.chars() {
    match c {
      '\\' => out.push_str("\\\\"),
      '"' => out.push_str("\\\""),
      '\n' => out.push_str("\\n"),
      c => out.push(c),
    }
  }
  out
}

/// A number as the exposition format writes it.
fn number(x: f64) -> String {
  if x.is_nan() {
    "NaN".to_owned()
  } else if x.is_infinite() {
    if x > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
  } else {
    format!("{x}")
  }
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
  // Writing to a String cannot fail.
  let _ = writeln!(out, "# HELP {NS}_{name} {help}");
  let _ = writeln!(out, "# TYPE {NS}_{name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
  let _ = write!(out, "{NS}_{name}");
  if !labels.is_empty() {
    out.push('{');
    for (i, (label, v)) in labels.iter().enumerate() {
      if i > 0 {
        out.push(',');
      }
      let _ = write!(out, "{label}=\"{}\"", escape_label(v));
    }
    out.push('}');
  }
  let _ = writeln!(out, " {}", number(value));
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4). Per-key series carry the
/// masked key and, since two keys can share a mask, the key's position.
pub fn prometheus_text(m: &MetricsSnapshot) -> String {
  let c = &m.counters;
  let mut out = String::new();
  family(
    &mut out,
    "keys_handed_out_total",
    "counter",
    "Keys handed out for a request.",
  );
  sample(&mut out, "keys_handed_out_total", &[], c.handed_out as f64);
  family(
    &mut out,
    "selections_total",
    "counter",
    "Key selections, by whether the 5-second selection cache served them.",
  );
  sample(
    &mut out,
    "selections_total",
    &[("cache", "hit")],
    c.cache_hits as f64,
  );
  sample(
    &mut out,
    "selections_total",
    &[("cache", "miss")],
    c.cache_misses as f64,
  );
  family(
    &mut out,
    "selection_cache_hit_ratio",
    "gauge",
    "Share of selections served from the cache since start.",
  );
  sample(
    &mut out,
    "selection_cache_hit_ratio",
    &[],
    m.cache_hit_rate(),
  );
  family(
    &mut out,
    "rotations_total",
    "counter",
    "Rotations away from a key: proactive (its score fell under 0.3) or on error (a 429, an open circuit or a deactivation took it out).",
  );
  sample(
    &mut out,
    "rotations_total",
    &[("reason", "proactive")],
    c.proactive_rotations as f64,
  );
  sample(
    &mut out,
    "rotations_total",
    &[("reason", "error")],
    c.error_rotations as f64,
  );
  family(
    &mut out,
    "rate_limits_total",
    "counter",
    "429 responses reported, by the window that ran out.",
  );
  for limit in LimitType::ALL {
    let window = limit.as_str().to_ascii_lowercase();
    sample(
      &mut out,
      "rate_limits_total",
      &[("window", &window)],
      c.rate_limits[limit as usize] as f64,
    );
  }
  family(
    &mut out,
    "calls_total",
    "counter",
    "Calls recorded, by outcome.",
  );
  sample(
    &mut out,
    "calls_total",
    &[("outcome", "success")],
    c.successes as f64,
  );
  sample(
    &mut out,
    "calls_total",
    &[("outcome", "failure")],
    c.failures as f64,
  );
  family(
    &mut out,
    "tokens_total",
    "counter",
    "Tokens reported by recorded calls.",
  );
  sample(&mut out, "tokens_total", &[], c.tokens as f64);
  family(&mut out, "keys", "gauge", "Keys in each state.");
  for (state, n) in LISTED_STATES.iter().zip(m.keys_by_state()) {
    sample(&mut out, "keys", &[("state", state)], n as f64);
  }
  family(
    &mut out,
    "key_availability_score",
    "gauge",
    "0.5 x remaining RPM share + 0.3 x remaining RPD share + 0.2 x remaining TPM share.",
  );
  let positions: Vec<String> = m.keys.iter().map(|k| k.index.to_string()).collect();
  for (k, index) in m.keys.iter().zip(&positions) {
    let labels = [("key", k.api_key.as_str()), ("index", index.as_str())];
    sample(
      &mut out,
      "key_availability_score",
      &labels,
      k.availability_score,
    );
  }
  for (name, help) in [
    (
      "key_window_current",
      "Requests (RPM, RPD) or tokens (TPM) counted in the key's window now.",
    ),
    ("key_window_limit", "The key's limit for the window."),
  ] {
    family(&mut out, name, "gauge", help);
    for (k, index) in m.keys.iter().zip(&positions) {
      for (limit, w) in LimitType::ALL.iter().zip(&k.windows) {
        let window = limit.as_str().to_ascii_lowercase();
        let labels = [
          ("key", k.api_key.as_str()),
          ("index", index.as_str()),
          ("window", &window),
        ];
        let value = if name == "key_window_current" {
          w.current
        } else {
          w.limit
        };
        sample(&mut out, name, &labels, value as f64);
      }
    }
  }
  family(
    &mut out,
    "budget_state",
    "gauge",
    "1 for the state each (project, model) budget is in: active, resting (a 429), no-quota, overloaded (its model backing off).",
  );
  for b in &m.budgets {
    let labels = [
      ("project", b.project.as_str()),
      ("model", b.model.as_str()),
      ("state", b.state),
    ];
    sample(&mut out, "budget_state", &labels, 1.0);
  }
  for (name, help) in [
    (
      "budget_window_current",
      "Requests (RPM, RPD) or tokens (TPM) counted in the (project, model) budget's window now: what Gemini counts.",
    ),
    ("budget_window_limit", "The limit of the (project, model) budget's window."),
  ] {
    family(&mut out, name, "gauge", help);
    for b in &m.budgets {
      for (limit, w) in LimitType::ALL.iter().zip(&b.windows) {
        let window = limit.as_str().to_ascii_lowercase();
        let labels = [("project", b.project.as_str()), ("model", b.model.as_str()), ("window", &window)];
        let value = if name == "budget_window_current" { w.current } else { w.limit };
        sample(&mut out, name, &labels, value as f64);
      }
    }
  }
  out
}

#[cfg(test)]
mod tests {
  use super::*;

  fn snapshot() -> MetricsSnapshot {
    let w = |current, limit| LimitFigures {
      current,
      limit,
      reset_time: 0,
    };
    MetricsSnapshot {
      counters: Counters {
        handed_out: 7,
        cache_hits: 3,
        cache_misses: 1,
        proactive_rotations: 2,
        error_rotations: 1,
        rate_limits: [4, 0, 1],
        successes: 5,
        failures: 2,
        tokens: 1234,
      },
      keys: vec![
        KeyMetrics {
          api_key: "AIzaSyAA...0001".into(),
          index: 0,
          state: 0,
          availability_score: 0.75,
          windows: [w(3, 30), w(10, 200), w(1234, 1_000_000)],
        },
        KeyMetrics {
          api_key: "we\"ird\\key\n".into(),
          index: 1,
          state: 1,
          availability_score: 1.0,
          windows: [w(0, 30), w(0, 200), w(0, 1_000_000)],
        },
      ],
      budgets: vec![BudgetMetrics {
        project: "1001".into(),
        model: "gemini-2.0-flash".into(),
        state: "resting",
        availability_score: 0.5,
        windows: [w(15, 15), w(20, 200), w(900, 1_000_000)],
      }],
    }
  }

  #[test]
  fn the_text_format_has_help_type_and_escaped_labels() {
    let text = prometheus_text(&snapshot());
    for line in [
      "# HELP gemini_key_manager_keys_handed_out_total Keys handed out for a request.",
      "# TYPE gemini_key_manager_keys_handed_out_total counter",
      "gemini_key_manager_keys_handed_out_total 7",
      "gemini_key_manager_selections_total{cache=\"hit\"} 3",
      "gemini_key_manager_selection_cache_hit_ratio 0.75",
      "gemini_key_manager_rotations_total{reason=\"proactive\"} 2",
      "gemini_key_manager_rate_limits_total{window=\"rpm\"} 4",
      "gemini_key_manager_keys{state=\"resting\"} 1",
      "gemini_key_manager_keys{state=\"deactivated\"} 0",
      "gemini_key_manager_key_availability_score{key=\"AIzaSyAA...0001\",index=\"0\"} 0.75",
      "gemini_key_manager_key_window_current{key=\"AIzaSyAA...0001\",index=\"0\",window=\"tpm\"} 1234",
      "gemini_key_manager_key_window_limit{key=\"we\\\"ird\\\\key\\n\",index=\"1\",window=\"rpd\"} 200",
    ] {
      assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // Every sample belongs to a family declared just before, and every counter ends in _total.
    let mut declared = String::new();
    for line in text.lines() {
      if let Some(rest) = line.strip_prefix("# TYPE ") {
        let (name, kind) = rest.split_once(' ').unwrap();
        assert!(kind != "counter" || name.ends_with("_total"), "{name}");
        declared = name.to_owned();
      } else if !line.starts_with('#') {
        let name = line.split(['{', ' ']).next().unwrap();
        assert_eq!(name, declared, "{line}");
      }
    }
  }

  #[test]
  fn the_snapshot_derives_the_hit_rate_and_the_keys_in_each_state() {
    let m = snapshot();
    assert_eq!(m.cache_hit_rate(), 0.75);
    assert_eq!(m.keys_by_state(), [1, 1, 0, 0, 0, 0, 0]);
    let none = MetricsSnapshot {
      counters: Counters::default(),
      keys: Vec::new(),
      budgets: Vec::new(),
    };
    assert_eq!(none.cache_hit_rate(), 0.0);
  }

  #[test]
  fn numbers_are_written_as_the_format_wants() {
    assert_eq!(number(f64::NAN), "NaN");
    assert_eq!(number(f64::INFINITY), "+Inf");
    assert_eq!(number(2.0), "2");
    assert_eq!(number(0.5), "0.5");
  }
}
