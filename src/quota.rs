//! Per-key limits as a value type.

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
  fn limit_type_round_trips_and_rejects_other_spellings() {
    for t in LimitType::ALL {
      assert_eq!(LimitType::parse(t.as_str()), Some(t));
    }
    assert_eq!(LimitType::parse("rpm"), None);
    assert_eq!(LimitType::parse(""), None);
  }
}
