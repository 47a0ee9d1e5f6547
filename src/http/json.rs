//! The JSON bodies of the HTTP API, and the ISO-8601 dates in them, written exactly as JS's
//! `Date.prototype.toISOString()` writes them so that `new Date(body.lastUsed)` on the client is
//! the instant the pool holds.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::core::budget::BudgetView;
use crate::core::calendar::{civil_from_days, days_from_civil};
use crate::core::clock::{Millis, DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS};
use crate::core::key::{KeyFigures, KeyStatus, LimitFigures, RateLimitInfo};
use crate::mask::mask_key;

/// The range of a JS `Date`: ±100,000,000 days around the epoch.
pub const MAX_DATE_MS: Millis = 8_640_000_000_000_000;

fn is_leap(year: i64) -> bool {
  year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
  match month {
    2 if is_leap(year) => 29,
    2 => 28,
    4 | 6 | 9 | 11 => 30,
    _ => 31,
  }
}

/// A timestamp that serializes as `toISOString()` prints it: `2026-11-27T20:30:42.123Z`, with a
/// signed six-digit year outside 0000..=9999.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsoDate(pub Millis);

impl fmt::Display for IsoDate {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let days = self.0.div_euclid(DAY_MS);
    let ms_of_day = self.0.rem_euclid(DAY_MS);
    let (year, month, day) = civil_from_days(days);
    if (0..=9999).contains(&year) {
      write!(f, "{year:04}")?;
    } else {
      let sign = if year < 0 { '-' } else { '+' };
      write!(f, "{sign}{:06}", year.unsigned_abs())?;
    }
    write!(
      f,
      "-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
      ms_of_day / HOUR_MS,
      ms_of_day / MINUTE_MS % 60,
      ms_of_day / SECOND_MS % 60,
      ms_of_day % SECOND_MS
    )
  }
}

impl Serialize for IsoDate {
  fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(self)
  }
}

/// Reads the part of a string this parser has not consumed yet.
struct Cursor<'a> {
  bytes: &'a [u8],
  at: usize,
}

impl Cursor<'_> {
  fn eat(&mut self, byte: u8) -> bool {
    let hit = self.bytes.get(self.at) == Some(&byte);
    if hit {
      self.at += 1;
    }
    hit
  }

  fn peek(&self) -> Option<u8> {
    self.bytes.get(self.at).copied()
  }

  /// Exactly `n` ASCII digits as a number.
  fn digits(&mut self, n: usize) -> Option<u32> {
    let end = self.at.checked_add(n)?;
    let run = self.bytes.get(self.at..end)?;
    let mut value = 0u32;
    for &b in run {
      if !b.is_ascii_digit() {
        return None;
      }
      value = value * 10 + u32::from(b - b'0');
    }
    self.at = end;
    Some(value)
  }

  /// One or more digits of a decimal fraction, as milliseconds (extra digits are truncated, as V8
  /// does).
  fn fraction_ms(&mut self) -> Option<i64> {
    let start = self.at;
    let mut ms = 0i64;
    while let Some(b) = self.peek().filter(u8::is_ascii_digit) {
      if self.at - start < 3 {
        ms = ms * 10 + i64::from(b - b'0');
      }
      self.at += 1;
    }
    match self.at - start {
      0 => None,
      1 => Some(ms * 100),
      2 => Some(ms * 10),
      _ => Some(ms),
    }
  }

  fn done(&self) -> bool {
    self.at == self.bytes.len()
  }
}

/// Parses the ECMAScript date-time string format (the ISO-8601 subset `new Date(string)` is
/// specified to accept): `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, or `±YYYYYY` in place of `YYYY`, then
/// optionally `THH:mm`, `:ss`, `.sss` and `Z` or `±HH:mm`. Unlike JS, a date-time without an offset
/// is read as UTC (a server has no business guessing the caller's zone), and impossible dates such
/// as Feb 30 are refused rather than rolled over.
pub fn parse_iso(text: &str) -> Option<Millis> {
  let mut c = Cursor {
    bytes: text.as_bytes(),
    at: 0,
  };
  let year = match c.peek()? {
    sign @ (b'+' | b'-') => {
      c.at += 1;
      let magnitude = i64::from(c.digits(6)?);
      if sign == b'-' {
        // "-000000" is refused by the spec: year zero has one spelling.
        if magnitude == 0 {
          return None;
        }
        -magnitude
      } else {
        magnitude
      }
    }
    _ => i64::from(c.digits(4)?),
  };
  let (mut month, mut day) = (1, 1);
  if c.eat(b'-') {
    month = c.digits(2)?;
    if c.eat(b'-') {
      day = c.digits(2)?;
    }
  }
  if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
    return None;
  }
  let mut ms_of_day = 0i64;
  let mut offset_ms = 0i64;
  if c.eat(b'T') {
    let hour = i64::from(c.digits(2)?);
    if !c.eat(b':') {
      return None;
    }
    let minute = i64::from(c.digits(2)?);
    let (mut second, mut ms) = (0i64, 0i64);
    if c.eat(b':') {
      second = i64::from(c.digits(2)?);
      if c.eat(b'.') {
        ms = c.fraction_ms()?;
      }
    }
    // 24:00 is the end of the day, and only 24:00 exactly.
    let end_of_day = hour == 24 && minute == 0 && second == 0 && ms == 0;
    if !(hour < 24 || end_of_day) || minute > 59 || second > 59 {
      return None;
    }
    ms_of_day = hour * HOUR_MS + minute * MINUTE_MS + second * SECOND_MS + ms;
    if !c.eat(b'Z') {
      if let Some(sign @ (b'+' | b'-')) = c.peek() {
        c.at += 1;
        let hours = i64::from(c.digits(2)?);
        if !c.eat(b':') {
          return None;
        }
        let minutes = i64::from(c.digits(2)?);
        if hours > 23 || minutes > 59 {
          return None;
        }
        let magnitude = (hours * 60 + minutes) * MINUTE_MS;
        offset_ms = if sign == b'-' { -magnitude } else { magnitude };
      }
    }
  }
  if !c.done() {
    return None;
  }
  let ms = days_from_civil(year, month, day) * DAY_MS + ms_of_day - offset_ms;
  (-MAX_DATE_MS..=MAX_DATE_MS).contains(&ms).then_some(ms)
}

/// A date given by a caller: an ISO-8601 date or date-time as [`parse_iso`] reads it, or a whole
/// number of milliseconds since the epoch. Four digits alone are a year, as in JS's `new
/// Date('2026')`; any other run of digits is milliseconds.
pub fn parse_date(text: &str) -> Option<Millis> {
  let digits = text.strip_prefix('-').unwrap_or(text);
  let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
  if all_digits && text.len() != 4 {
    let ms = text.parse::<Millis>().ok()?;
    return (-MAX_DATE_MS..=MAX_DATE_MS).contains(&ms).then_some(ms);
  }
  parse_iso(text)
}

/// `{ success: true, data?, metadata?, message }`.
#[derive(Debug, Serialize)]
pub struct Success<D, M> {
  pub success: bool,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub data: Option<D>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub metadata: Option<M>,
  pub message: &'static str,
}

/// `{ success: false, error, message }`: `error` is the short cause, `message` what failed.
/// `nextAvailableAt` when the failure lasts only until then (every key busy).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure<'a> {
  pub success: bool,
  pub error: &'a str,
  pub message: &'a str,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub next_available_at: Option<IsoDate>,
}

/// The SPEC's `LimitWindow`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitWindowJson {
  pub current: u64,
  pub limit: u64,
  pub reset_time: IsoDate,
}

impl From<LimitFigures> for LimitWindowJson {
  fn from(f: LimitFigures) -> Self {
    Self {
      current: f.current,
      limit: f.limit,
      reset_time: IsoDate(f.reset_time),
    }
  }
}

/// The SPEC's `ApiKeyLimit`.
#[derive(Debug, Serialize)]
pub struct LimitsJson {
  pub rpm: LimitWindowJson,
  pub rpd: LimitWindowJson,
  pub tpm: LimitWindowJson,
}

impl From<&KeyFigures> for LimitsJson {
  fn from(f: &KeyFigures) -> Self {
    Self {
      rpm: f.rpm.into(),
      rpd: f.rpd.into(),
      tpm: f.tpm.into(),
    }
  }
}

/// One model's budget of a key's project: `models[model]` in a status or a usage row.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetJson {
  /// `active`, `resting`, `no-quota` or `overloaded`.
  pub state: &'static str,
  /// Until when it rests or its model backs off; `null` when neither.
  pub state_until: Option<IsoDate>,
  pub availability_score: f64,
  pub rpm: LimitWindowJson,
  pub rpd: LimitWindowJson,
  pub tpm: LimitWindowJson,
}

/// Every model met, by name.
pub fn models_json(budgets: &[BudgetView]) -> BTreeMap<String, BudgetJson> {
  budgets
    .iter()
    .map(|b| {
      let json = BudgetJson {
        state: b.state_label(),
        state_until: b.state_until().map(IsoDate),
        availability_score: b.availability_score,
        rpm: b.figures.rpm.into(),
        rpd: b.figures.rpd.into(),
        tpm: b.figures.tpm.into(),
      };
      (b.model.clone(), json)
    })
    .collect()
}

/// The SPEC's `ApiKeyStatus`, key masked, with its project and its budget of every model met
/// (`limits` stays the default model's).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatusJson {
  pub api_key: String,
  pub is_active: bool,
  /// `active`, `resting`, `circuit-open`, `half-open` or `deactivated`.
  pub state: &'static str,
  /// Until when a resting or open key is kept out.
  #[serde(skip_serializing_if = "Option::is_none")]
  pub state_until: Option<IsoDate>,
  pub last_used: IsoDate,
  pub limits: LimitsJson,
  pub error_count: u32,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub last_error: Option<String>,
  #[serde(skip_serializing_if = "Option::is_none")]
  pub last_error_time: Option<IsoDate>,
  /// `null` when not known (a project of its own).
  pub project: Option<String>,
  pub models: BTreeMap<String, BudgetJson>,
}

impl KeyStatusJson {
  pub fn new(status: &KeyStatus) -> Self {
    let f = &status.figures;
    Self {
      api_key: mask_key(&status.api_key),
      is_active: f.active,
      state: f.state_label(),
      state_until: f.state_until().map(IsoDate),
      last_used: IsoDate(f.last_used),
      limits: f.into(),
      error_count: f.error_count,
      last_error: status.last_error.clone(),
      last_error_time: f.last_error_time.map(IsoDate),
      project: status.project.clone(),
      models: models_json(&status.budgets),
    }
  }
}

/// The SPEC's `RateLimitInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitInfoJson {
  #[serde(rename = "type")]
  pub limit_type: &'static str,
  pub current: u64,
  pub limit: u64,
  pub reset_time: IsoDate,
  pub is_limited: bool,
}

impl From<&RateLimitInfo> for RateLimitInfoJson {
  fn from(i: &RateLimitInfo) -> Self {
    Self {
      limit_type: i.limit_type.as_str(),
      current: i.current,
      limit: i.limit,
      reset_time: IsoDate(i.reset_time),
      is_limited: i.is_limited,
    }
  }
}

/// One row of `GET /usage-stats`. `lastError` is always present (`null` when there is none), as
/// the SPEC lists it without `?`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageJson {
  pub api_key: String,
  pub is_active: bool,
  pub last_used: IsoDate,
  pub rpm_usage: String,
  pub rpd_usage: String,
  pub tpm_usage: String,
  pub error_count: u32,
  pub last_error: Option<String>,
  /// `null` when not known (a project of its own).
  pub project: Option<String>,
  /// The windows of its project's budget of every model met.
  pub models: BTreeMap<String, BudgetJson>,
}

impl UsageJson {
  pub fn new(status: &KeyStatus) -> Self {
    let f = &status.figures;
    let usage = |w: LimitFigures| format!("{}/{}", w.current, w.limit);
    Self {
      api_key: mask_key(&status.api_key),
      is_active: f.active,
      last_used: IsoDate(f.last_used),
      rpm_usage: usage(f.rpm),
      rpd_usage: usage(f.rpd),
      tpm_usage: usage(f.tpm),
      error_count: f.error_count,
      last_error: status.last_error.clone(),
      project: status.project.clone(),
      models: models_json(&status.budgets),
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  /// Pairs checked against Node 20's `new Date(ms).toISOString()`.
  const KNOWN: [(Millis, &str); 10] = [
    (0, "1970-01-01T00:00:00.000Z"),
    (-1, "1969-12-31T23:59:59.999Z"),
    (1_700_000_000_000, "2023-11-14T22:13:20.000Z"),
    (951_782_400_000, "2000-02-29T00:00:00.000Z"),
    (1_764_275_442_123, "2025-11-27T20:30:42.123Z"),
    (8_640_000_000_000_000, "+275760-09-13T00:00:00.000Z"),
    (-8_640_000_000_000_000, "-271821-04-20T00:00:00.000Z"),
    (-62_167_219_200_000, "0000-01-01T00:00:00.000Z"),
    (-62_198_755_200_000, "-000001-01-01T00:00:00.000Z"),
    (253_402_300_800_000, "+010000-01-01T00:00:00.000Z"),
  ];

  #[test]
  fn formats_like_to_iso_string() {
    for (ms, iso) in KNOWN {
      assert_eq!(IsoDate(ms).to_string(), iso, "{ms}");
    }
  }

  #[test]
  fn parses_what_it_formats() {
    for (ms, iso) in KNOWN {
      assert_eq!(parse_iso(iso), Some(ms), "{iso}");
    }
    // A spread of instants, including every month end, round-trips.
    let mut ms: Millis = -MAX_DATE_MS;
    while ms < MAX_DATE_MS {
      assert_eq!(parse_iso(&IsoDate(ms).to_string()), Some(ms), "{ms}");
      ms += 1_234_567_891_234;
    }
  }

  #[test]
  fn parses_the_shorter_forms_as_node_does() {
    // Values from Node 20 (TZ=UTC for the offset-less date-time).
    for (text, ms) in [
      ("2026", 1_767_225_600_000),
      ("2026-11", 1_793_491_200_000),
      ("2024-02-29", 1_709_164_800_000),
      ("2026-11-27T20:30", 1_795_811_400_000),
      ("2026-11-27T20:30Z", 1_795_811_400_000),
      ("2026-11-27T20:30:42.1Z", 1_795_811_442_100),
      ("2026-11-27T20:30:42.1234Z", 1_795_811_442_123),
      ("2026-11-27T24:00:00Z", 1_795_824_000_000),
      ("2026-11-27T20:30:42+02:00", 1_795_804_242_000),
    ] {
      assert_eq!(parse_iso(text), Some(ms), "{text}");
    }
  }

  #[test]
  fn refuses_what_is_not_a_date() {
    for text in [
      "",
      "yesterday",
      "2026-1-01",
      "2026-13-01",
      "2026-02-29",
      "2026-04-31",
      "2026-11-27T",
      "2026-11-27T20",
      "2026-11-27T24:00:01Z",
      "2026-11-27T20:60Z",
      "2026-11-27T20:30:42.Z",
      "2026-11-27T20:30:42+0200",
      "2026-11-27Z",
      "2026-11-27T20:30Zjunk",
      "-000000-01-01T00:00:00Z",
      "+275760-09-13T00:00:00.001Z",
    ] {
      assert_eq!(parse_iso(text), None, "{text}");
    }
  }

  #[test]
  fn dates_may_be_epoch_millis_but_four_digits_are_a_year() {
    assert_eq!(parse_date("1700000000000"), Some(1_700_000_000_000));
    assert_eq!(parse_date("-1"), Some(-1));
    assert_eq!(parse_date("0"), Some(0));
    assert_eq!(parse_date("2026"), Some(1_767_225_600_000));
    assert_eq!(parse_date("2026-11-27"), Some(1_795_737_600_000));
    for bad in [
      "8640000000000001",
      "99999999999999999999",
      "-",
      "12e5",
      " 1",
    ] {
      assert_eq!(parse_date(bad), None, "{bad}");
    }
  }
}
