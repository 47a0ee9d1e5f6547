//! What a failed Gemini call's error says: told to slow down (429, and by which quota, for how
//! long), the key refused, the model overloaded, or something that may pass.
//!
//! The input is rarely one whole JSON document: it is an SDK's error text with the body or its
//! `details` inside, a body escaped once or twice inside another JSON string, the router's
//! `"<status> <body>"`, or plain words. So no JSON parser is used: a lexical scan finds
//! `"name": value` however it is quoted, and status codes are read as whole words.

use crate::core::clock::{Millis, DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS};

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
const MAX_DELAY_NS: u128 = DAY_MS as u128 * NS_PER_MS;
const NS_PER_S: u128 = SECOND_MS as u128 * NS_PER_MS;
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
      "h" => HOUR_MS as u128 * NS_PER_MS,
      "m" => MINUTE_MS as u128 * NS_PER_MS,
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
mod tests;
