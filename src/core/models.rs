//! The models a pool serves. Each has its limits (Google's free-tier table, overridden by
//! `modelLimits`; a model the table does not know gets the default model's, said once) and its
//! health: a 503 "overloaded" or a 500 is the model's trouble, not a key's, so the model backs off
//! (jittered, doubling, capped), then lets one probe through, and serves again once a request sent
//! after the trouble began succeeds.

use crate::core::clock::{Millis, MINUTE_MS, SECOND_MS};
use crate::core::error::PoolError;
use crate::core::quota::{model_quota, Quota};

/// A model's position in the pool's table.
pub type ModelId = usize;

/// The default model is always the first one.
pub const DEFAULT_MODEL_ID: ModelId = 0;

/// Models a pool keeps at most: every model multiplies the budgets, and callers name models freely.
pub const MAX_MODELS: usize = 64;
/// Longest model name accepted, in bytes (Google's are about 30).
pub const MAX_MODEL_BYTES: usize = 128;

/// The first back-off after an overload, doubled at each failed probe, and its cap.
pub const FIRST_OVERLOAD_BACKOFF_MS: Millis = SECOND_MS;
pub const MAX_OVERLOAD_BACKOFF_MS: Millis = MINUTE_MS;

/// Where a model's limits come from, resolved from the options once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLimits {
  pub default_model: String,
  /// The default model's limits, `limits` applied.
  pub default_quota: Quota,
  /// `modelLimits`, each completed from the table (or the default model's limits).
  pub overrides: Vec<(String, Quota)>,
}

impl ModelLimits {
  /// One model's limits, and whether it is one neither the table nor `modelLimits` knows.
  fn quota_of(&self, model: &str) -> (Quota, bool) {
    if model == self.default_model {
      return (self.default_quota, false);
    }
    if let Some((_, q)) = self.overrides.iter().find(|(name, _)| name == model) {
      return (*q, false);
    }
    match model_quota(model) {
      Some(q) => (q, false),
      None => (self.default_quota, true),
    }
  }
}

/// `models/gemini-2.0-flash` and `gemini-2.0-flash` are one model: the SDKs and the REST paths
/// spell it both ways.
pub fn normalize(name: &str) -> &str {
  let name = name.trim();
  name.strip_prefix("models/").unwrap_or(name)
}

fn check_name(name: &str) -> Result<(), PoolError> {
  let ok = !name.is_empty()
    && name.len() <= MAX_MODEL_BYTES
    && name
      .bytes()
      .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'@'));
  if ok {
    Ok(())
  } else {
    Err(PoolError::InvalidModel(format!(
      "a model name is 1 to {MAX_MODEL_BYTES} letters, digits, '-', '.', '_' or '@' (got {} bytes)",
      name.len()
    )))
  }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OverloadState {
  Clear,
  /// Backing off since `since`: nothing goes out before `until`.
  BackingOff {
    since: Millis,
    until: Millis,
  },
  /// The back-off is over: one probe may go out (`probe_out` once it has).
  Probing {
    since: Millis,
    probe_out: bool,
  },
}

/// How a model is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overload {
  state: OverloadState,
  /// Back-offs since the model last served well: each doubles the next.
  backoffs: u32,
}

impl Default for Overload {
  fn default() -> Self {
    Self {
      state: OverloadState::Clear,
      backoffs: 0,
    }
  }
}

/// `d` give or take a quarter, drawn from `seed`, so that processes and models backing off
/// together do not come back together.
fn jittered(d: Millis, seed: Millis) -> Millis {
  // splitmix64: a well-mixed draw from any seed, without a random source in the core.
  let mut z = (seed as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
  z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
  z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
  z ^= z >> 31;
  let quarter = d / 4;
  d - quarter + (z % (2 * quarter as u64 + 1)) as Millis
}

impl Overload {
  fn current(&self, now: Millis) -> OverloadState {
    match self.state {
      OverloadState::BackingOff { since, until } if now >= until => OverloadState::Probing {
        since,
        probe_out: false,
      },
      state => state,
    }
  }

  pub fn can_serve(&self, now: Millis) -> bool {
    matches!(
      self.current(now),
      OverloadState::Clear
        | OverloadState::Probing {
          probe_out: false,
          ..
        }
    )
  }

  /// When a request could next go out (now when it can), `None` while the probe is out.
  pub fn available_at(&self, now: Millis) -> Option<Millis> {
    match self.current(now) {
      OverloadState::Clear
      | OverloadState::Probing {
        probe_out: false, ..
      } => Some(now),
      OverloadState::BackingOff { until, .. } => Some(until),
      OverloadState::Probing {
        probe_out: true, ..
      } => None,
    }
  }

  /// Until when it backs off, if it does.
  pub fn backing_off_until(&self, now: Millis) -> Option<Millis> {
    match self.current(now) {
      OverloadState::BackingOff { until, .. } => Some(until),
      _ => None,
    }
  }

  /// A request goes out: while probing, it is the probe.
  pub fn on_hand_out(&mut self, now: Millis) {
    if let OverloadState::Probing { since, .. } = self.current(now) {
      self.state = OverloadState::Probing {
        since,
        probe_out: true,
      };
    }
  }

  /// The model answered a request handed out at `handed_at` (a success, or a refusal that is not
  /// an overload: a 429, a rejected key). A request sent before the trouble began says nothing
  /// about the model now.
  pub fn on_answered(&mut self, now: Millis, handed_at: Millis) {
    match self.current(now) {
      OverloadState::Clear => self.backoffs = 0,
      OverloadState::BackingOff { since, .. } | OverloadState::Probing { since, .. }
        if handed_at >= since =>
      {
        *self = Self::default();
      }
      state => self.state = state,
    }
  }

  /// The model was overloaded for a request handed out at `handed_at`. Requests already out when
  /// the trouble began fail with it and change nothing; the first failure, or a failed probe,
  /// backs off (longer each time). Returns the end of a new back-off.
  pub fn on_overload(&mut self, now: Millis, handed_at: Millis) -> Option<Millis> {
    let since = match self.current(now) {
      OverloadState::Clear => None,
      OverloadState::BackingOff { since, .. } => Some(since),
      OverloadState::Probing { since, .. } => Some(since),
    };
    let fresh_trouble = match (self.current(now), since) {
      (OverloadState::Clear, _) => true,
      // The probe (or anything handed out since the back-off ended) failed.
      (OverloadState::Probing { .. }, Some(since)) => handed_at >= since,
      _ => false,
    };
    if !fresh_trouble {
      return None;
    }
    let backoff = FIRST_OVERLOAD_BACKOFF_MS
      .saturating_mul(1 << self.backoffs.min(16))
      .min(MAX_OVERLOAD_BACKOFF_MS);
    self.backoffs = self.backoffs.saturating_add(1);
    let until = now + jittered(backoff, now ^ self.backoffs as Millis);
    self.state = OverloadState::BackingOff { since: now, until };
    Some(until)
  }

  /// The probe was never reported (its reservation expired): another may go out.
  pub fn probe_lost(&mut self, now: Millis) {
    if let OverloadState::Probing {
      since,
      probe_out: true,
    } = self.current(now)
    {
      self.state = OverloadState::Probing {
        since,
        probe_out: false,
      };
    }
  }
}

/// One model of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
  pub name: String,
  pub quota: Quota,
  pub overload: Overload,
}

/// The models a pool has met, the default one first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Models {
  limits: ModelLimits,
  models: Vec<Model>,
}

impl Models {
  pub fn new(limits: ModelLimits) -> Self {
    let first = Model {
      name: limits.default_model.clone(),
      quota: limits.default_quota,
      overload: Overload::default(),
    };
    Self {
      limits,
      models: vec![first],
    }
  }

  pub fn len(&self) -> usize {
    self.models.len()
  }

  pub fn is_empty(&self) -> bool {
    self.models.is_empty()
  }

  /// The model already met under `name`, if any.
  pub fn find(&self, name: &str) -> Option<ModelId> {
    let name = normalize(name);
    self.models.iter().position(|m| m.name == name)
  }

  /// The model named `name` if it was met or its limits are known (the table, `modelLimits`), met
  /// now if it was not yet; a name neither met nor known is refused, and not echoed (it may be
  /// anything). For callers not trusted to add models: each one met stays for the process's life.
  pub fn known_id(&mut self, name: &str) -> Result<ModelId, PoolError> {
    if let Some(id) = self.find(name) {
      return Ok(id);
    }
    let (_, unknown) = self.limits.quota_of(normalize(name));
    if unknown {
      return Err(PoolError::InvalidModel(
        "the model has not been used here and is not in the table of limits (modelLimits)".into(),
      ));
    }
    self.id(name).map(|(id, _)| id)
  }

  /// The model named `name`, met now if it was not yet: returns its id, and a warning to log when
  /// its limits had to be guessed.
  pub fn id(&mut self, name: &str) -> Result<(ModelId, Option<String>), PoolError> {
    if let Some(id) = self.find(name) {
      return Ok((id, None));
    }
    let name = normalize(name);
    check_name(name)?;
    if self.models.len() >= MAX_MODELS {
      return Err(PoolError::InvalidModel(format!(
        "a pool serves {MAX_MODELS} models at most"
      )));
    }
    let (quota, unknown) = self.limits.quota_of(name);
    let warning = unknown.then(|| {
      format!(
        "⚠️ Model {name} is not in the table of free-tier limits: it gets {}'s ({} RPM, {} RPD, {} TPM); set modelLimits for it",
        self.limits.default_model, quota.rpm, quota.rpd, quota.tpm
      )
    });
    self.models.push(Model {
      name: name.to_owned(),
      quota,
      overload: Overload::default(),
    });
    Ok((self.models.len() - 1, warning))
  }

  pub fn get(&self, id: ModelId) -> &Model {
    &self.models[id.min(self.models.len() - 1)]
  }

  pub fn get_mut(&mut self, id: ModelId) -> &mut Model {
    let last = self.models.len() - 1;
    &mut self.models[id.min(last)]
  }

  pub fn iter(&self) -> impl Iterator<Item = &Model> {
    self.models.iter()
  }

  pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Model> {
    self.models.iter_mut()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn models() -> Models {
    Models::new(ModelLimits {
      default_model: "gemini-2.0-flash-lite".into(),
      default_quota: Quota {
        rpm: 40,
        rpd: 200,
        tpm: 1_000_000,
      },
      overrides: vec![(
        "gemini-2.5-pro".into(),
        Quota {
          rpm: 2,
          rpd: 50,
          tpm: 250_000,
        },
      )],
    })
  }

  #[test]
  fn limits_come_from_the_overrides_then_the_table_then_the_default_model_with_a_warning() {
    let mut m = models();
    assert_eq!(
      m.id("gemini-2.0-flash-lite").unwrap(),
      (DEFAULT_MODEL_ID, None)
    );
    let (pro, warning) = m.id("models/gemini-2.5-pro").unwrap();
    assert_eq!((m.get(pro).quota.rpm, warning), (2, None));
    let (flash, _) = m.id("gemini-2.0-flash").unwrap();
    assert_eq!(m.get(flash).quota.rpm, 15);
    let (odd, warning) = m.id("gemini-9-ultra").unwrap();
    assert_eq!(m.get(odd).quota.rpm, 40);
    assert!(warning
      .unwrap()
      .contains("gemini-9-ultra is not in the table"));
    // Met once: no second warning, the same id.
    assert_eq!(m.id("gemini-9-ultra").unwrap(), (odd, None));
    assert_eq!(m.find("models/gemini-2.0-flash"), Some(flash));
  }

  #[test]
  fn model_names_are_checked_and_bounded_in_number() {
    let mut m = models();
    for bad in ["", "a b", "x/y", &"m".repeat(MAX_MODEL_BYTES + 1)] {
      assert!(
        matches!(m.id(bad), Err(PoolError::InvalidModel(_))),
        "{bad:?}"
      );
    }
    for i in m.len()..MAX_MODELS {
      m.id(&format!("model-{i}")).unwrap();
    }
    assert!(matches!(
      m.id("one-too-many"),
      Err(PoolError::InvalidModel(_))
    ));
  }

  #[test]
  fn an_overload_backs_off_once_for_the_calls_already_out_then_probes() {
    let mut o = Overload::default();
    // Twenty calls went out at 0..20; the overload starts and all of them fail.
    let until = o.on_overload(100, 5).unwrap();
    assert!((750..=1_250).contains(&(until - 100)), "{until}");
    for handed in 6..20 {
      assert_eq!(
        o.on_overload(110, handed),
        None,
        "already out: no longer back-off"
      );
    }
    assert!(!o.can_serve(until - 1));
    assert_eq!(o.available_at(until - 1), Some(until));
    // A success of a call sent before the trouble does not end it.
    o.on_answered(200, 50);
    assert!(!o.can_serve(until - 1));
    // The back-off ends: one probe, and only one.
    assert!(o.can_serve(until));
    o.on_hand_out(until);
    assert!(!o.can_serve(until));
    assert_eq!(o.available_at(until), None);
    // The probe fails: a back-off twice as long.
    let again = o.on_overload(until + 5, until).unwrap();
    assert!(
      (1_500..=2_500).contains(&(again - until - 5)),
      "{}",
      again - until - 5
    );
    // A probe that succeeds ends the trouble.
    o.on_hand_out(again);
    o.on_answered(again + 10, again);
    assert!(o.can_serve(again + 10));
    assert_eq!(o, Overload::default());
  }

  #[test]
  fn back_offs_grow_to_a_cap_and_a_lost_probe_is_replaced() {
    let mut o = Overload::default();
    let mut now = 0;
    for _ in 0..12 {
      let until = o.on_overload(now, now).unwrap();
      assert!(until - now <= MAX_OVERLOAD_BACKOFF_MS + MAX_OVERLOAD_BACKOFF_MS / 4);
      now = until;
      o.on_hand_out(now);
    }
    assert!(now > 4 * MAX_OVERLOAD_BACKOFF_MS);
    o.probe_lost(now);
    assert!(o.can_serve(now));
  }
}
