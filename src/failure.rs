//! What a failed call's error says about the key: told to slow down (429), rejected outright
//! (the key is bad), or something else (a server error, a timeout) that may pass.

use crate::clock::Millis;
use crate::quota::LimitType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
  /// 429 / RESOURCE_EXHAUSTED: the key is fine but must wait. Gemini's error body may say how long
  /// (`google.rpc.RetryInfo`'s `retryDelay`) and which quota (`QuotaFailure`'s `quotaId`).
  RateLimited {
    retry_after_ms: Option<Millis>,
    limit: Option<LimitType>,
  },
  /// API_KEY_INVALID, PERMISSION_DENIED, 401, 403: the key itself is refused.
  KeyRejected,
  /// Anything else: 500, 503, timeouts, network errors.
  Transient,
}

/// Status codes appear in messages as whole words (`[429 Too Many Requests]`, `"code": 403`);
/// a code inside a longer number (`took 4031ms`) is not one.
fn has_code(message: &str, code: &str) -> bool {
  message
    .split(|c: char| !c.is_ascii_alphanumeric())
    .any(|word| word == code)
}

/// Reads an error message (or a serialized Gemini error body) and says what kind of failure it was.
pub fn classify(message: &str) -> Failure {
  if has_code(message, "429") || message.contains("RESOURCE_EXHAUSTED") {
    return Failure::RateLimited {
      retry_after_ms: retry_delay(message),
      limit: quota_kind(message),
    };
  }
  if message.contains("API_KEY_INVALID")
    || message.contains("PERMISSION_DENIED")
    || message.contains("API key not valid")
    || has_code(message, "401")
    || has_code(message, "403")
  {
    return Failure::KeyRejected;
  }
  Failure::Transient
}

/// `"retryDelay": "17s"` (also `"1.5s"`) in milliseconds.
fn retry_delay(message: &str) -> Option<Millis> {
  let after = &message[message.find("retryDelay")? + "retryDelay".len()..];
  let start = after.find(|c: char| c.is_ascii_digit())?;
  // The value must follow the field name closely (`": "`), not be some later number.
  if start > 4 {
    return None;
  }
  let number: String = after[start..]
    .chars()
    .take_while(|c| c.is_ascii_digit() || *c == '.')
    .collect();
  let unit_at = start + number.len();
  if !after[unit_at..].starts_with('s') {
    return None;
  }
  let seconds: f64 = number.parse().ok()?;
  (0.0..=86_400.0)
    .contains(&seconds)
    .then(|| (seconds * 1_000.0).ceil() as Millis)
}

/// Which window a `QuotaFailure` names: quota ids end in `PerMinute...` or `PerDay...`, and token
/// quotas mention tokens.
fn quota_kind(message: &str) -> Option<LimitType> {
  let id = &message[message.find("quotaId")?..];
  let id = &id[..id.find(',').or_else(|| id.find('}')).unwrap_or(id.len())];
  if id.contains("PerDay") {
    Some(LimitType::Rpd)
  } else if id.contains("Token") && id.contains("PerMinute") {
    Some(LimitType::Tpm)
  } else if id.contains("PerMinute") {
    Some(LimitType::Rpm)
  } else {
    None
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  /// The body Gemini sends with a 429, as the JS SDK serializes it.
  const GEMINI_429: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-flash-lite"},"quotaValue":"30"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;

  #[test]
  fn gemini_429_body_gives_delay_and_quota() {
    assert_eq!(
      classify(GEMINI_429),
      Failure::RateLimited {
        retry_after_ms: Some(17_000),
        limit: Some(LimitType::Rpm)
      }
    );
  }

  #[test]
  fn sdk_messages_and_day_and_token_quotas() {
    let sdk = "[GoogleGenerativeAI Error]: Error fetching from https://x: [429 Too Many Requests] Resource has been exhausted";
    assert_eq!(
      classify(sdk),
      Failure::RateLimited {
        retry_after_ms: None,
        limit: None
      }
    );
    let day = r#"RESOURCE_EXHAUSTED "quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier", "retryDelay": "1.5s""#;
    assert_eq!(
      classify(day),
      Failure::RateLimited {
        retry_after_ms: Some(1_500),
        limit: Some(LimitType::Rpd)
      }
    );
    let tokens = r#"429 {"quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier"}"#;
    assert!(matches!(
      classify(tokens),
      Failure::RateLimited {
        limit: Some(LimitType::Tpm),
        ..
      }
    ));
  }

  #[test]
  fn rejected_keys_and_transient_errors() {
    assert_eq!(
      classify("API key not valid. Please pass a valid API key. [API_KEY_INVALID]"),
      Failure::KeyRejected
    );
    assert_eq!(
      classify(r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#),
      Failure::KeyRejected
    );
    assert_eq!(classify("[401 Unauthorized]"), Failure::KeyRejected);
    assert_eq!(
      classify("[503 Service Unavailable] The model is overloaded"),
      Failure::Transient
    );
    assert_eq!(
      classify("request timed out after 4031ms"),
      Failure::Transient
    );
    assert_eq!(classify("boom"), Failure::Transient);
  }

  #[test]
  fn odd_retry_delays_are_ignored() {
    assert_eq!(retry_delay(r#""retryDelay": "abc""#), None);
    assert_eq!(retry_delay(r#""retryDelay": "17ms""#), None);
    assert_eq!(retry_delay(r#""retryDelay": "99999999s""#), None);
    assert_eq!(retry_delay(r#"retryDelay unknown, later 5s"#), None);
  }
}
