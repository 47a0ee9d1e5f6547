//! What a failed Gemini call's error says: told to slow down (429, and by which quota, for how
//! long), the key refused, the model overloaded, or something that may pass.
//!
//! The input is rarely one whole JSON document: it is an SDK's error text with the body or its
//! `details` inside, a body escaped once or twice inside another JSON string, the router's
//! `"<status> <body>"`, or plain words. So no JSON parser is used: a lexical scan finds
//! `"name": value` however it is quoted, and status codes are read as whole words.

use crate::core::clock::Millis;

/// What a failed call says about the key that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
  /// 429 / RESOURCE_EXHAUSTED.
  RateLimited(RateLimit),
  /// API_KEY_INVALID, PERMISSION_DENIED, 401, 403: the key itself is refused (a 403 SERVICE_DISABLED
  /// too).
  KeyRejected,
  /// 503 UNAVAILABLE / "overloaded", 500 INTERNAL: the model's trouble, not the key's.
  Overloaded,
  /// Anything else: timeouts, network errors, other 5xx, unknown text.
  Transient,
}

/// What a 429 says about the quota it hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
  /// The widest quota the 429 names.
  pub scope: QuotaScope,
  /// QuotaFailure's quotaValue is "0": the tier has no quota for this model at all. Google leaves a
  /// zero quotaValue out of the body (proto3 JSON omits zeros), so the message's
  /// "Quota exceeded for metric: ..., limit: 0" says it too.
  pub zero_quota: bool,
  /// The limit the quota names (quotaValue), when it says; else the message's "limit: N" when every
  /// line of it gives the same N.
  pub quota_value: Option<u64>,
  /// RetryInfo's retryDelay (fractions allowed: "0.5s", "18.036s", "0s"), else the message's
  /// "Please retry in 17.5s" / "retry in 3s" / "Please retry in 250ms" text, in ms (rounded up);
  /// None when neither says. When both say, the later: Google truncates retryDelay to whole seconds
  /// ("36s" beside "Please retry in 36.43s"), and retrying at the truncated time meets another 429.
  pub retry_after_ms: Option<Millis>,
}

/// Which of Gemini's quotas a 429 is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
  /// A per-day quota (quotaId contains "PerDay", e.g. GenerateRequestsPerDayPerProjectPerModel-FreeTier).
  PerDay,
  /// A per-minute request quota (GenerateRequestsPerMinutePerProjectPerModel-FreeTier).
  PerMinuteRequests,
  /// A per-minute token quota (GenerateContentInputTokensPerModelPerMinute-FreeTier; any quotaId
  /// naming tokens per minute).
  PerMinuteTokens,
  /// A 429 without a QuotaFailure that says which (no details, or an id we cannot read).
  Unknown,
}

impl QuotaScope {
  fn of_quota_id(id: &str) -> Self {
    if id.contains("PerDay") {
      Self::PerDay
    } else if id.contains("PerMinute") && id.contains("Token") {
      Self::PerMinuteTokens
    } else if id.contains("PerMinute") {
      Self::PerMinuteRequests
    } else {
      Self::Unknown
    }
  }

  /// How long the quota keeps the key out: of several violations, the widest decides.
  fn width(self) -> u8 {
    match self {
      Self::Unknown => 0,
      Self::PerMinuteRequests => 1,
      Self::PerMinuteTokens => 2,
      Self::PerDay => 3,
    }
  }
}

/// The longest delay a 429 may ask for and be believed.
const MAX_DELAY_NS: u128 = 86_400 * NS_PER_S;
const NS_PER_S: u128 = 1_000_000_000;
const NS_PER_MS: u128 = 1_000_000;

/// Reads an error text or body.
pub fn classify(message: &str) -> Failure {
  if has_word(message, "429")
    || has_word(message, "RESOURCE_EXHAUSTED")
    || message.contains("Too Many Requests")
  {
    return Failure::RateLimited(rate_limit(message));
  }
  if has_word(message, "401")
    || has_word(message, "403")
    || has_word(message, "API_KEY_INVALID")
    || has_word(message, "PERMISSION_DENIED")
    || has_word(message, "UNAUTHENTICATED")
    || message.contains("API key not valid")
    || message.contains("API key expired")
  {
    return Failure::KeyRejected;
  }
  if has_word(message, "503")
    || has_word(message, "500")
    || has_word(message, "UNAVAILABLE")
    || has_word(message, "INTERNAL")
    || find_ignore_case(message, "overloaded").is_some()
  {
    return Failure::Overloaded;
  }
  Failure::Transient
}

/// The project Gemini's error names, from a google.rpc.ErrorInfo whose metadata has
/// `"consumer": "projects/123456"` (return "123456"). Gemini names projects by number; other Google
/// services may name them by id (`projects/my-project-1`), which is returned the same way. The
/// message's own `for consumer 'project_number:…'` or `'api_key:…'` is not read: only ErrorInfo's
/// field is Google's documented form. None when the text names none.
pub fn consumer_project(message: &str) -> Option<String> {
  fields(message, "consumer").find_map(|field| {
    let project = field.value.strip_prefix("projects/")?;
    let plausible = (1..=100).contains(&project.len())
      && project
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b':');
    plausible.then(|| project.to_owned())
  })
}

fn rate_limit(text: &str) -> RateLimit {
  let violations = violations(text);
  let scope = violations
    .iter()
    .map(|v| v.scope)
    .max_by_key(|s| s.width())
    .unwrap_or(QuotaScope::Unknown);
  let stated = stated_limits(text);
  let stated_value = stated
    .first()
    .filter(|first| stated.iter().all(|n| n == *first))
    .copied();
  RateLimit {
    scope,
    zero_quota: violations.iter().any(|v| v.value == Some(0)) || stated.contains(&0),
    quota_value: violations
      .iter()
      .filter(|v| v.scope == scope)
      .find_map(|v| v.value)
      .or(stated_value),
    retry_after_ms: retry_delay(text).max(retry_in(text)),
  }
}

/// One quota a 429 says was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Violation {
  scope: QuotaScope,
  value: Option<u64>,
}

/// The violations of a QuotaFailure (`quotaId` with its `quotaValue`), and of the older
/// ErrorInfo form Gemini also sent (`quota_limit` with its `quota_limit_value`).
///
/// A value belongs to the id in the same `{...}`: the object around each id is found by counting
/// braces, within the stretch between the ids before and after it, so that a violation without a
/// value never takes its neighbour's, and the whole scan stays linear in the text.
fn violations(text: &str) -> Vec<Violation> {
  let mut ids: Vec<Field> = fields(text, "quotaId")
    .chain(fields(text, "quota_limit"))
    .collect();
  ids.sort_by_key(|f| f.at);
  let mut values: Vec<Field> = fields(text, "quotaValue")
    .chain(fields(text, "quota_limit_value"))
    .collect();
  values.sort_by_key(|f| f.at);
  let bytes = text.as_bytes();
  let mut floor = 0;
  let mut values = values.into_iter().peekable();
  ids
    .iter()
    .enumerate()
    .map(|(i, id)| {
      let ceiling = ids.get(i + 1).map_or(text.len(), |next| next.at);
      let start = object_start(bytes, floor.min(id.at), id.at);
      let end = object_end(bytes, id.end, ceiling.max(id.end));
      floor = end;
      while values.next_if(|v| v.at < start).is_some() {}
      let value = values
        .next_if(|v| v.at < end)
        .and_then(|v| v.value.parse().ok());
      Violation {
        scope: QuotaScope::of_quota_id(id.value),
        value,
      }
    })
    .collect()
}

/// Where the `{...}` holding `at` opens, looking back no further than `floor`.
fn object_start(bytes: &[u8], floor: usize, at: usize) -> usize {
  let mut depth = 0usize;
  bytes[floor..at]
    .iter()
    .rposition(|&b| match b {
      b'{' if depth == 0 => true,
      b'{' => {
        depth -= 1;
        false
      }
      b'}' => {
        depth += 1;
        false
      }
      _ => false,
    })
    .map_or(floor, |i| floor + i)
}

/// Where the `{...}` holding `from` closes, looking no further than `ceiling`.
fn object_end(bytes: &[u8], from: usize, ceiling: usize) -> usize {
  let mut depth = 0usize;
  bytes[from..ceiling]
    .iter()
    .position(|&b| match b {
      b'}' if depth == 0 => true,
      b'}' => {
        depth -= 1;
        false
      }
      b'{' => {
        depth += 1;
        false
      }
      _ => false,
    })
    .map_or(ceiling, |i| from + i)
}

/// The N of each "Quota exceeded for metric: ..., limit: N" line of a 429's message.
fn stated_limits(text: &str) -> Vec<u64> {
  text
    .split("Quota exceeded for metric")
    .skip(1)
    .filter_map(|line| {
      // The line ends at its newline, raw or escaped.
      let line = &line[..line.find(['\n', '\\']).unwrap_or(line.len())];
      let after = &line[line.find("limit: ")? + "limit: ".len()..];
      let digits = after.bytes().take_while(u8::is_ascii_digit).count();
      after[..digits].parse().ok()
    })
    .collect()
}

/// RetryInfo's `"retryDelay": "17s"` (a protobuf Duration: seconds, with up to nine decimals), in
/// milliseconds; the longest if the text holds several.
fn retry_delay(text: &str) -> Option<Millis> {
  fields(text, "retryDelay")
    .filter_map(|f| {
      let (whole, fraction, rest) = decimal(f.value)?;
      (rest == "s")
        .then(|| nanos(whole, fraction, NS_PER_S))
        .and_then(millis)
    })
    .max()
}

/// The message's "Please retry in 17.18s" (also "250ms", or "1m30s" as Go writes durations over a
/// minute), in milliseconds; the longest if the text holds several.
fn retry_in(text: &str) -> Option<Millis> {
  const NEEDLE: &str = "retry in ";
  let mut delays = Vec::new();
  let mut from = 0;
  while let Some(at) = find_ignore_case(&text[from..], NEEDLE) {
    from += at + NEEDLE.len();
    delays.extend(go_duration(&text[from..]).and_then(millis));
  }
  delays.into_iter().max()
}

/// A duration as Go prints it (`36.429760048s`, `250ms`, `1m30s`) at the start of `s`, in ns.
fn go_duration(mut s: &str) -> Option<u128> {
  let mut total: Option<u128> = None;
  while let Some((whole, fraction, rest)) = decimal(s) {
    let unit_len = rest
      .char_indices()
      .find(|(_, c)| !c.is_alphabetic())
      .map_or(rest.len(), |(i, _)| i);
    let unit_ns = match &rest[..unit_len] {
      "h" => 3_600 * NS_PER_S,
      "m" => 60 * NS_PER_S,
      "s" => NS_PER_S,
      "ms" => NS_PER_MS,
      "us" | "µs" | "μs" => 1_000,
      "ns" => 1,
      _ => break,
    };
    let ns = nanos(whole, fraction, unit_ns);
    total = Some(ns.saturating_add(total.unwrap_or(0)));
    s = &rest[unit_len..];
  }
  total
}

/// A decimal number at the start of `s`: its whole part, its fraction's digits, and what follows.
/// None unless `s` starts with a digit, or when the whole part is too long to be a delay in any unit.
fn decimal(s: &str) -> Option<(u128, &str, &str)> {
  let whole_len = s.bytes().take_while(u8::is_ascii_digit).count();
  if whole_len == 0 || whole_len > 15 {
    return None;
  }
  let whole = s[..whole_len].parse().ok()?;
  let rest = &s[whole_len..];
  let fraction_len = rest
    .strip_prefix('.')
    .map_or(0, |r| r.bytes().take_while(u8::is_ascii_digit).count());
  if fraction_len == 0 {
    return Some((whole, "", rest));
  }
  Some((whole, &rest[1..=fraction_len], &rest[1 + fraction_len..]))
}

/// `whole.fraction` units of `unit_ns` nanoseconds, rounded up to a nanosecond. Digits past the
/// 18th of a fraction are below any unit's nanosecond and ignored.
fn nanos(whole: u128, fraction: &str, unit_ns: u128) -> u128 {
  let fraction = &fraction[..fraction.len().min(18)];
  let scale = 10u128.pow(fraction.len() as u32);
  let numerator = fraction.parse::<u128>().unwrap_or(0) * unit_ns;
  whole * unit_ns + numerator.div_ceil(scale)
}

/// Nanoseconds as whole milliseconds, rounded up; None past a day, more than any quota asks.
fn millis(ns: u128) -> Option<Millis> {
  (ns <= MAX_DELAY_NS).then(|| ns.div_ceil(NS_PER_MS) as Millis)
}

/// A `"name": value` field found in a text.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
  /// Where the name starts.
  at: usize,
  /// Just past the value.
  end: usize,
  value: &'a str,
}

/// Every `name` field in `text`, quoted as JSON writes it (`"name": "v"`, `"name": 5`), escaped
/// inside another JSON string to any depth (`\"name\": \"v\"`), or as Python prints a dict
/// (`'name': 'v'`). A name inside a longer one (`futureQuotaValue`) is not that field.
fn fields<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = Field<'a>> + 'a {
  let bytes = text.as_bytes();
  let is_quote = |c: u8| c == b'"' || c == b'\'';
  // An unquoted value: a number, or a word such as `true`.
  let is_bare = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
  text.match_indices(name).filter_map(move |(at, _)| {
    let quote = bytes[at.checked_sub(1)?];
    if !is_quote(quote) {
      return None;
    }
    let mut i = skip(bytes, at + name.len(), |c| c == b'\\');
    if bytes.get(i) != Some(&quote) {
      return None;
    }
    i = skip(bytes, i + 1, |c| c.is_ascii_whitespace());
    if bytes.get(i) != Some(&b':') {
      return None;
    }
    i = skip(bytes, i + 1, |c| c.is_ascii_whitespace());
    let opening = skip(bytes, i, |c| c == b'\\');
    match bytes.get(opening) {
      Some(&q) if is_quote(q) => {
        let start = opening + 1;
        let len = bytes[start..].iter().position(|&c| c == q)?;
        Some(Field {
          at,
          end: start + len + 1,
          value: text[start..start + len].trim_end_matches('\\'),
        })
      }
      _ => {
        let len = skip(bytes, i, is_bare) - i;
        (len > 0).then(|| Field {
          at,
          end: i + len,
          value: &text[i..i + len],
        })
      }
    }
  })
}

/// The first position from `from` on whose byte is not `what`.
fn skip(bytes: &[u8], from: usize, what: impl Fn(u8) -> bool) -> usize {
  let rest = bytes.get(from..).unwrap_or_default();
  from + rest.iter().take_while(|&&c| what(c)).count()
}

/// Whether `word` stands on its own in `text`: a status code or name, not part of a longer word or
/// number (`took 4031ms`, `429s`, `retry in 503.2s`).
fn has_word(text: &str, word: &str) -> bool {
  let bytes = text.as_bytes();
  let byte = |i: Option<usize>| i.and_then(|i| bytes.get(i)).copied();
  let joins = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_alphanumeric());
  let digit = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_digit());
  text.match_indices(word).any(|(start, _)| {
    let end = start + word.len();
    let (before, after) = (byte(start.checked_sub(1)), byte(Some(end)));
    let decimal = (before == Some(b'.') && digit(byte(start.checked_sub(2))))
      || (after == Some(b'.') && digit(byte(Some(end + 1))));
    !(joins(before) || joins(after) || decimal)
  })
}

/// Where `needle` (ASCII) first occurs in `text`, ignoring ASCII case.
fn find_ignore_case(text: &str, needle: &str) -> Option<usize> {
  text
    .as_bytes()
    .windows(needle.len())
    .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
  use super::*;
  use proptest::prelude::*;

  /// The body Gemini sends with a 429, as the JS SDK serializes it.
  const GEMINI_429: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"gemini-2.0-flash-lite"},"quotaValue":"30"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#;

  /// A QuotaFailure violation as Gemini writes it; Google leaves `quotaValue` out when it is 0.
  fn violation(id: &str, value: Option<&str>) -> String {
    let value = value.map_or(String::new(), |v| format!(r#","quotaValue":"{v}""#));
    format!(
      r#"{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"{id}","quotaDimensions":{{"location":"global","model":"gemini-2.5-flash"}}{value}}}"#
    )
  }

  /// A Gemini 429 body: its message, its violations, and RetryInfo when a delay is given.
  fn body(message: &str, violations: &[String], retry_delay: Option<&str>) -> String {
    let retry = retry_delay.map_or(String::new(), |d| {
      format!(r#",{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{d}"}}"#)
    });
    format!(
      r#"{{"error":{{"code":429,"message":"{message}","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.Help","links":[{{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}}]}},{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{}]}}{retry}]}}}}"#,
      violations.join(",")
    )
  }

  const DAY: &str = "GenerateRequestsPerDayPerProjectPerModel-FreeTier";
  const MINUTE: &str = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier";
  const TOKENS: &str = "GenerateContentInputTokensPerModelPerMinute-FreeTier";

  fn limited(text: &str) -> RateLimit {
    match classify(text) {
      Failure::RateLimited(rate) => rate,
      other => panic!("{other:?} for {text}"),
    }
  }

  fn limit(
    scope: QuotaScope,
    zero_quota: bool,
    quota_value: Option<u64>,
    retry_after_ms: Option<Millis>,
  ) -> RateLimit {
    RateLimit {
      scope,
      zero_quota,
      quota_value,
      retry_after_ms,
    }
  }

  #[test]
  fn gemini_429_body_gives_delay_and_quota() {
    assert_eq!(
      classify(GEMINI_429),
      Failure::RateLimited(limit(
        QuotaScope::PerMinuteRequests,
        false,
        Some(30),
        Some(17_000)
      ))
    );
  }

  #[test]
  fn each_scope_from_its_quota_id() {
    let scope = |id: &str| limited(&body("quota", &[violation(id, Some("9"))], None)).scope;
    assert_eq!(scope(DAY), QuotaScope::PerDay);
    assert_eq!(scope(MINUTE), QuotaScope::PerMinuteRequests);
    assert_eq!(scope(TOKENS), QuotaScope::PerMinuteTokens);
    assert_eq!(
      scope("GenerateContentPaidTierInputTokensPerModelPerMinute"),
      QuotaScope::PerMinuteTokens
    );
    assert_eq!(
      scope("GenerateRequestsPerMinutePerProjectPerModel"),
      QuotaScope::PerMinuteRequests
    );
    assert_eq!(scope("SomethingPerHour"), QuotaScope::Unknown);
  }

  #[test]
  fn a_spent_day_is_per_day_whatever_its_short_retry_delay() {
    for (delay, ms) in [("0s", 0), ("18s", 18_000), ("34s", 34_000)] {
      let text = body("quota", &[violation(DAY, Some("20"))], Some(delay));
      assert_eq!(
        limited(&text),
        limit(QuotaScope::PerDay, false, Some(20), Some(ms))
      );
    }
  }

  #[test]
  fn several_violations_take_the_widest() {
    let all = [
      violation(MINUTE, Some("15")),
      violation(DAY, Some("200")),
      violation(TOKENS, Some("1000000")),
    ];
    let rate = limited(&body("quota", &all, Some("47s")));
    assert_eq!(
      rate,
      limit(QuotaScope::PerDay, false, Some(200), Some(47_000))
    );
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(limited(&body("quota", &reversed, Some("47s"))), rate);
    let minute = [
      violation(TOKENS, Some("250000")),
      violation(MINUTE, Some("10")),
    ];
    assert_eq!(
      limited(&body("quota", &minute, None)),
      limit(QuotaScope::PerMinuteTokens, false, Some(250_000), None)
    );
  }

  #[test]
  fn a_value_belongs_to_its_own_violation() {
    // The day's violation has no quotaValue: the minute's 15 after it is not the day's.
    let text = body(
      "quota",
      &[violation(DAY, None), violation(MINUTE, Some("15"))],
      None,
    );
    assert_eq!(limited(&text), limit(QuotaScope::PerDay, false, None, None));
    // The older ErrorInfo form, whose metadata map may put the value before the id.
    let error_info = r#"[GoogleGenerativeAI Error]: Error fetching from https://generativelanguage.googleapis.com/v1/models/gemini-pro:generateContent: [429 Too Many Requests] Quota exceeded for quota metric 'Generate Content API requests per minute' and limit 'GenerateContent request limit per minute for a region' of service 'generativelanguage.googleapis.com' for consumer 'project_number:1234567'. [{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com","consumer":"projects/1234567","quota_limit_value":"60","quota_metric":"generativelanguage.googleapis.com/generate_content_requests","quota_limit":"GenerateContentRequestsPerMinutePerProjectPerRegion"}}]"#;
    assert_eq!(
      limited(error_info),
      limit(QuotaScope::PerMinuteRequests, false, Some(60), None)
    );
  }

  #[test]
  fn zero_quota_from_quota_value_or_the_message() {
    let explicit = body(
      "quota",
      &[violation(DAY, Some("200")), violation(MINUTE, Some("0"))],
      Some("5s"),
    );
    assert_eq!(
      limited(&explicit),
      limit(QuotaScope::PerDay, true, Some(200), Some(5_000))
    );
    // What Gemini sends for a model the tier lacks: no quotaValue at all, "limit: 0" in the message.
    let line = |metric: &str| {
      format!("\\n* Quota exceeded for metric: generativelanguage.googleapis.com/{metric}, limit: 0, model: gemini-2.5-pro")
    };
    let message = format!(
      "You exceeded your current quota.{}{}{}\\nPlease retry in 10.689924287s.",
      line("generate_content_free_tier_requests"),
      line("generate_content_free_tier_requests"),
      line("generate_content_free_tier_input_token_count"),
    );
    let none = [
      violation(DAY, None),
      violation(MINUTE, None),
      violation(TOKENS, None),
    ];
    assert_eq!(
      limited(&body(&message, &none, Some("10s"))),
      limit(QuotaScope::PerDay, true, Some(0), Some(10_690))
    );
    // Lines that disagree name no one limit.
    let mixed = "[429 Too Many Requests] \n* Quota exceeded for metric: a, limit: 15, model: m\n* Quota exceeded for metric: b, limit: 1000000, model: m\n";
    assert_eq!(
      limited(mixed),
      limit(QuotaScope::Unknown, false, None, None)
    );
    let one = "[429 Too Many Requests] \n* Quota exceeded for metric: a, limit: 20, model: m\nPlease retry in 51.6s.";
    assert_eq!(
      limited(one),
      limit(QuotaScope::Unknown, false, Some(20), Some(51_600))
    );
  }

  #[test]
  fn retry_delays_keep_their_fractions() {
    for (delay, ms) in [
      ("0s", 0),
      ("0.5s", 500),
      ("18.036s", 18_036),
      ("1.0000001s", 1_001),
      ("0.000000001s", 1),
      ("86400s", 86_400_000),
    ] {
      let text = body("quota", &[violation(MINUTE, Some("10"))], Some(delay));
      assert_eq!(limited(&text).retry_after_ms, Some(ms), "{delay}");
    }
  }

  #[test]
  fn the_messages_retry_in_counts_and_the_later_of_the_two_wins() {
    let retry = |text: &str| limited(text).retry_after_ms;
    assert_eq!(retry("429 Please retry in 17.5s"), Some(17_500));
    assert_eq!(retry("RESOURCE_EXHAUSTED: retry in 3s"), Some(3_000));
    assert_eq!(
      retry("[429 Too Many Requests] Please retry in 250ms"),
      Some(250)
    );
    assert_eq!(retry("429 Please retry in 1m30.5s."), Some(90_500));
    assert_eq!(retry("429 Please Retry In 2s"), Some(2_000));
    // Google truncates retryDelay; the message has the rest.
    let truncated = body(
      "You exceeded your current quota.\\nPlease retry in 36.429760048s.",
      &[violation(DAY, Some("20"))],
      Some("36s"),
    );
    assert_eq!(retry(&truncated), Some(36_430));
    let longer_field = body(
      "Please retry in 3s.",
      &[violation(MINUTE, Some("10"))],
      Some("20s"),
    );
    assert_eq!(retry(&longer_field), Some(20_000));
  }

  #[test]
  fn a_429_without_details_is_of_unknown_scope() {
    let unknown = limit(QuotaScope::Unknown, false, None, None);
    for text in [
      r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#,
      r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.Help","links":[]}]}}"#,
      "[429 Too Many Requests] no room",
      "429 RESOURCE_EXHAUSTED",
      "Too Many Requests",
      r#"429 {"error":{"code":429}}"#,
    ] {
      assert_eq!(limited(text), unknown, "{text}");
    }
  }

  #[test]
  fn sdk_messages_and_day_and_token_quotas() {
    let sdk = "[GoogleGenerativeAI Error]: Error fetching from https://x: [429 Too Many Requests] Resource has been exhausted";
    assert_eq!(limited(sdk), limit(QuotaScope::Unknown, false, None, None));
    let day = r#"RESOURCE_EXHAUSTED "quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier", "retryDelay": "1.5s""#;
    assert_eq!(
      limited(day),
      limit(QuotaScope::PerDay, false, None, Some(1_500))
    );
    let tokens = r#"429 {"quotaId":"GenerateContentInputTokensPerModelPerMinute-FreeTier"}"#;
    assert_eq!(limited(tokens).scope, QuotaScope::PerMinuteTokens);
  }

  #[test]
  fn every_sdks_wrapping_reads_the_same() {
    let raw = body(
      "You exceeded your current quota.\\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash\\nPlease retry in 18.2s.",
      &[violation(DAY, Some("20"))],
      Some("18s"),
    );
    let expected = limit(QuotaScope::PerDay, false, Some(20), Some(18_200));
    let details = &raw[raw.find(r#""details":"#).unwrap() + 10..raw.len() - 2];
    // @google/generative-ai: status and message, then the details as JSON.
    let generative_ai = format!(
      "[GoogleGenerativeAI Error]: Error fetching from https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent: [429 Too Many Requests] You exceeded your current quota.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash\nPlease retry in 18.2s. {details}"
    );
    // LangChain's ChatGoogleGenerativeAI rethrows it, with its troubleshooting link.
    let langchain = format!(
      "GoogleGenerativeAIFetchError: {generative_ai}\n\nTroubleshooting URL: https://docs.langchain.com/oss/javascript/langchain/errors/MODEL_RATE_LIMIT/\n"
    );
    // @google/genai: ApiError's message is the body; older versions wrapped it as an escaped string.
    let genai = format!("ApiError: {raw}");
    let escaped = serde_json::to_string(&raw).unwrap();
    let genai_old = format!(
      r#"got status: 429 Too Many Requests. {{"error":{{"message":{escaped},"code":429,"status":"Too Many Requests"}}}}"#
    );
    let twice = serde_json::to_string(&genai_old).unwrap();
    // The router's report: the status, a space, the body.
    let router = format!("429 {raw}");
    // Python's SDK prints the body as a dict.
    let python = format!("429 RESOURCE_EXHAUSTED. {}", raw.replace('"', "'"));
    for text in [
      &raw,
      &generative_ai,
      &langchain,
      &genai,
      &genai_old,
      &twice,
      &router,
      &python,
    ] {
      assert_eq!(limited(text), expected, "{text}");
    }
  }

  #[test]
  fn overload_and_internal_errors_are_the_models() {
    for text in [
      "[503 Service Unavailable] The model is overloaded",
      r#"ApiError: {"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
      r#"got status: UNAVAILABLE. {"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
      r#"{"error":{"code":500,"message":"An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting","status":"INTERNAL"}}"#,
      "[GoogleGenerativeAI Error]: Error fetching from https://x: [500 Internal Server Error] An internal error has occurred.",
      "503",
      "The model is Overloaded",
    ] {
      assert_eq!(classify(text), Failure::Overloaded, "{text}");
    }
    // A 429 or a refused key in the same text says more.
    assert!(matches!(
      classify("429 RESOURCE_EXHAUSTED after the model was overloaded"),
      Failure::RateLimited(_)
    ));
    assert_eq!(
      classify("403 PERMISSION_DENIED (after a 503)"),
      Failure::KeyRejected
    );
  }

  #[test]
  fn rejected_keys() {
    for text in [
      "API key not valid. Please pass a valid API key. [API_KEY_INVALID]",
      r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#,
      "[401 Unauthorized]",
      r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#,
      r#"{"error":{"code":400,"message":"API key expired. Please renew the API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
      r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 123456 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com","metadata":{"consumer":"projects/123456","service":"generativelanguage.googleapis.com"}}]}}"#,
      "[400 Bad Request] API key not valid. API_KEY_INVALID",
    ] {
      assert_eq!(classify(text), Failure::KeyRejected, "{text}");
    }
  }

  #[test]
  fn other_failures_are_transient() {
    for text in [
      "request timed out after 4031ms",
      "boom",
      "",
      "quota",
      "TypeError: fetch failed\n    at node:internal/deps/undici/undici:13510:13",
      "Error: read ECONNRESET",
      r#"{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}"#,
      "[502 Bad Gateway]",
      r#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#,
    ] {
      assert_eq!(classify(text), Failure::Transient, "{text}");
    }
  }

  #[test]
  fn status_codes_are_whole_words() {
    for text in [
      "took 4031ms",
      "tokens 14290",
      "x429 y",
      "429s",
      "waited 429.5 s",
      "version 1.429",
      "status 5003",
      "1500 tokens",
    ] {
      assert_eq!(classify(text), Failure::Transient, "{text}");
    }
    for text in [
      r#"{"code": 429}"#,
      "429 {",
      "[429 Too Many Requests]",
      "HTTP 429.",
      "(429)",
    ] {
      assert!(matches!(classify(text), Failure::RateLimited(_)), "{text}");
    }
  }

  #[test]
  fn the_consumer_project_of_an_error_info() {
    let disabled = r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 123456 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com","consumer":"projects/123456"}}]}}"#;
    assert_eq!(consumer_project(disabled).as_deref(), Some("123456"));
    let escaped = serde_json::to_string(disabled).unwrap();
    assert_eq!(consumer_project(&escaped).as_deref(), Some("123456"));
    let suspended = r#"[GoogleGenerativeAI Error]: [403 Forbidden] Permission denied: Consumer 'api_key:AIzaXXXX' has been suspended. [{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED","domain":"googleapis.com","metadata":{"consumer": "projects/578829824020","service":"generativelanguage.googleapis.com"}}]"#;
    assert_eq!(consumer_project(suspended).as_deref(), Some("578829824020"));
    let by_id =
      r#"{'metadata': {'consumer': 'projects/my-project-466015', 'service': 'x.googleapis.com'}}"#;
    assert_eq!(
      consumer_project(by_id).as_deref(),
      Some("my-project-466015")
    );
    // A 429's ErrorInfo names it too.
    assert_eq!(
      consumer_project(r#"429 {"metadata":{"quota_limit_value":"60","consumer":"projects/42"}}"#)
        .as_deref(),
      Some("42")
    );
  }

  #[test]
  fn no_consumer_project_where_none_is_named() {
    for text in [
      "",
      GEMINI_429,
      "Quota exceeded for consumer 'project_number:681255809395'.",
      "Permission denied: Consumer 'api_key:AIzaXXXX' has been suspended.",
      r#""consumer": "projects/""#,
      r#""consumer": "projects/***********""#,
      r#""consumer": "api_key:AIzaXXXX""#,
      r#""consumer": "projects/123"#,
      r#""serviceconsumer": "projects/123""#,
      r#"consumer: projects/123"#,
    ] {
      assert_eq!(consumer_project(text), None, "{text}");
    }
  }

  #[test]
  fn odd_retry_delays_are_ignored() {
    for text in [
      r#""retryDelay": "abc""#,
      r#""retryDelay": "17ms""#,
      r#""retryDelay": "99999999s""#,
      r#""retryDelay": "86400.001s""#,
      r#""retryDelay": "-1s""#,
      r#""retryDelay": "1e3s""#,
      r#""retryDelay": "123456789012345678901234567890s""#,
      r#""retryDelay": 17"#,
      r#""retryDelay": "s""#,
      r#""retryDelay": "1.s""#,
      r#"retryDelay unknown, later 5s"#,
      r#""myretryDelay": "5s""#,
    ] {
      assert_eq!(retry_delay(text), None, "{text}");
    }
    for text in [
      "retry in 90000s",
      "retry in ",
      "retry in 3 seconds",
      "retry in s",
      "retry in 5parsecs",
    ] {
      assert_eq!(retry_in(text), None, "{text}");
    }
  }

  /// Every character boundary of a text.
  fn boundaries(text: &str) -> impl Iterator<Item = usize> + '_ {
    text.char_indices().map(|(i, _)| i).chain([text.len()])
  }

  #[test]
  fn truncated_texts_never_panic_and_read_what_they_hold() {
    let day = body(
      "You exceeded your current quota.\\n* Quota exceeded for metric: m, limit: 0, model: é\\nPlease retry in 10.5s.",
      &[violation(DAY, None), violation(TOKENS, None)],
      Some("10s"),
    );
    let escaped = serde_json::to_string(&day).unwrap();
    let rejected = r#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","metadata":{"consumer":"projects/123456"}}]}}"#;
    for text in [day.as_str(), escaped.as_str(), rejected] {
      for i in boundaries(text) {
        for cut in [&text[..i], &text[i..]] {
          classify(cut);
          consumer_project(cut);
        }
      }
    }
    // A text cut short still reads the day's quotaId once the whole field is in.
    for text in [&day, &escaped] {
      let after_id = text.find(DAY).unwrap() + DAY.len();
      let whole_field = after_id + text[after_id..].find('"').unwrap() + 1;
      for i in boundaries(text).filter(|&i| i >= whole_field) {
        assert_eq!(
          limited(&text[..i]).scope,
          QuotaScope::PerDay,
          "{}",
          &text[..i]
        );
      }
    }
  }

  #[test]
  fn huge_numbers_and_unicode_are_read_or_ignored_not_fatal() {
    let huge = body(
      "Quota exceeded for metric: m, limit: 99999999999999999999999, model: m",
      &[violation(DAY, Some("99999999999999999999999"))],
      Some("99999999999999999999.5s"),
    );
    assert_eq!(limited(&huge), limit(QuotaScope::PerDay, false, None, None));
    assert_eq!(retry_in("retry in 9999999999999999999999h"), None);
    assert_eq!(
      retry_in(&format!("retry in {}", "1h".repeat(100_000))),
      None
    );
    assert_eq!(retry_in("Please retry in 2µs"), Some(1));
    assert_eq!(retry_in("Please retry in 1.5μs!"), Some(1));
    assert_eq!(retry_in("retry in 3sé"), None);
    assert_eq!(retry_in("retry in 3s é"), Some(3_000));
    assert!(matches!(classify("🚫429🚫"), Failure::RateLimited(_)));
    assert_eq!(classify("é503é"), Failure::Overloaded);
    // Typographic quotes, as pages reprinting bodies have them, are not JSON's.
    assert_eq!(
      limited("429 “quotaId”: “GenerateRequestsPerDayPerProjectPerModel-FreeTier”").scope,
      QuotaScope::Unknown
    );
    for text in [
      r#"\\\\\"\"'''\"\\"#,
      r#""quotaId""#,
      r#"quotaId":"#,
      "'quotaId': ",
      r#"429 "quotaId": '"#,
      r#"429 "retryDelay":"é"#,
      r#"429 "quotaValue":"1" "quotaId":"x"}}}}{{{{"#,
      r#"429 }}}}"quotaId":"PerDay"{{{{"#,
      r#"429 "quotaId":"a 'quotaId':'PerDay' b""#,
      "retry in é",
      "Quota exceeded for metricQuota exceeded for metric, limit: é",
      r#""consumer": "projects/é""#,
      "\u{0}\u{ffff}\u{10ffff}",
    ] {
      classify(text);
      consumer_project(text);
    }
  }

  #[test]
  fn pathological_texts_are_read_in_linear_time() {
    let start = std::time::Instant::now();
    for unit in [
      r#"{"quotaId":"#,
      r#""quotaId":"PerDay","#,
      r#"{"quotaId":"PerMinute","quotaValue":"1"}"#,
      "{",
      "}",
      r#"'quotaId': ""#,
      r#""retryDelay": "1"#,
      "retry in 1",
      "Quota exceeded for metric",
      r#""consumer":"projects/"#,
      "429.",
      r"\\\\",
    ] {
      let text = format!("429 {}", unit.repeat(200_000 / unit.len()));
      classify(&text);
      consumer_project(&text);
    }
    // Quadratic work on these would take minutes.
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
  }

  fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
      prop::sample::select(vec![
        "\"",
        "'",
        "\\",
        ":",
        " ",
        ",",
        "{",
        "}",
        ".",
        "s",
        "ms",
        "m",
        "µ",
        "é",
        "0",
        "429",
        "503",
        "403",
        "quotaId",
        "quotaValue",
        "quota_limit",
        "retryDelay",
        "consumer",
        "projects/",
        "PerDay",
        "PerMinute",
        "Token",
        "retry in ",
        "limit: ",
        "Quota exceeded for metric",
        "RESOURCE_EXHAUSTED",
        "\n",
      ])
      .prop_map(str::to_owned),
      "[0-9]{1,25}",
      "\\PC{0,4}",
    ]
  }

  proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_read_without_panic(text in "\\PC*") {
      classify(&text);
      consumer_project(&text);
    }

    #[test]
    fn texts_made_of_error_fragments_are_read_within_bounds(
      parts in prop::collection::vec(fragment(), 0..48),
    ) {
      let text = parts.concat();
      if let Failure::RateLimited(rate) = classify(&text) {
        prop_assert!(rate.retry_after_ms.is_none_or(|ms| (0..=86_400_000).contains(&ms)));
        prop_assert!(!rate.zero_quota || text.contains('0'));
      }
      if let Some(project) = consumer_project(&text) {
        let named = format!("projects/{project}");
        prop_assert!(text.contains(&named));
      }
    }
  }
}
