//! Per-key limits as a value type, the published limits of Gemini models, and how windows are kept.

use crate::core::calendar::DailyReset;
use crate::core::clock::{Millis, MINUTE_MS};

/// The three limits Gemini enforces per key: requests per minute, requests per day, tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
  pub rpm: u64,
  pub rpd: u64,
  pub tpm: u64,
}

impl Quota {
  /// Gemini 2.0 Flash-Lite, free tier: the old service's limits.
  pub const FLASH_LITE_FREE: Quota = Quota {
    rpm: 30,
    rpd: 200,
    tpm: 1_000_000,
  };
}

impl Default for Quota {
  fn default() -> Self {
    Self::FLASH_LITE_FREE
  }
}

/// The model whose limits apply when none is named.
pub const DEFAULT_MODEL: &str = "gemini-2.0-flash-lite";

/// Free-tier limits per key as Google publishes them for the Gemini API. Tiers and models change:
/// override with `limits` or `modelLimits` where yours differ.
pub const MODEL_QUOTAS: &[(&str, Quota)] = &[
  ("gemini-2.0-flash-lite", Quota::FLASH_LITE_FREE),
  (
    "gemini-2.0-flash",
    Quota {
      rpm: 15,
      rpd: 200,
      tpm: 1_000_000,
    },
  ),
  (
    "gemini-2.5-flash-lite",
    Quota {
      rpm: 15,
      rpd: 1_000,
      tpm: 250_000,
    },
  ),
  (
    "gemini-2.5-flash",
    Quota {
      rpm: 10,
      rpd: 250,
      tpm: 250_000,
    },
  ),
  (
    "gemini-2.5-pro",
    Quota {
      rpm: 5,
      rpd: 100,
      tpm: 250_000,
    },
  ),
];

pub fn model_quota(model: &str) -> Option<Quota> {
  MODEL_QUOTAS
    .iter()
    .find(|(name, _)| *name == model)
    .map(|(_, q)| *q)
}

/// How windows are measured, the same for every key of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPolicy {
  /// Span of the rolling RPM and TPM windows.
  pub span_ms: Millis,
  /// When the RPD count resets.
  pub daily_reset: DailyReset,
  /// How long a key handed out stays reserved without a `recordUsage`; after that the request is
  /// taken as never made and its reservation released.
  pub reservation_ttl_ms: Millis,
}

impl Default for WindowPolicy {
  fn default() -> Self {
    Self {
      span_ms: MINUTE_MS,
      daily_reset: DailyReset::PacificMidnight,
      reservation_ttl_ms: MINUTE_MS,
    }
  }
}

/// Which of a key's windows a rate-limit report or a `RateLimitInfo` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitType {
  Rpm,
  Rpd,
  Tpm,
}

impl LimitType {
  pub const ALL: [LimitType; 3] = [LimitType::Rpm, LimitType::Rpd, LimitType::Tpm];

  pub fn as_str(self) -> &'static str {
    match self {
      LimitType::Rpm => "RPM",
      LimitType::Rpd => "RPD",
      LimitType::Tpm => "TPM",
    }
  }

  /// Parses the SPEC's spelling (`'RPM' | 'RPD' | 'TPM'`); anything else is `None`.
  pub fn parse(s: &str) -> Option<Self> {
    match s {
      "RPM" => Some(LimitType::Rpm),
      "RPD" => Some(LimitType::Rpd),
      "TPM" => Some(LimitType::Tpm),
      _ => None,
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn default_quota_is_flash_lite_free_tier() {
    assert_eq!(
      Quota::default(),
      Quota {
        rpm: 30,
        rpd: 200,
        tpm: 1_000_000
      }
    );
  }

  #[test]
  fn model_table_defaults_to_flash_lite() {
    assert_eq!(model_quota(DEFAULT_MODEL), Some(Quota::default()));
    assert_eq!(model_quota("gemini-2.5-pro").map(|q| q.rpm), Some(5));
    assert_eq!(model_quota("gpt-4"), None);
  }

  #[test]
  fn limit_type_round_trips_and_rejects_other_spellings() {
    for t in LimitType::ALL {
      assert_eq!(LimitType::parse(t.as_str()), Some(t));
    }
    assert_eq!(LimitType::parse("rpm"), None);
    assert_eq!(LimitType::parse(""), None);
  }
}
