//! Civil-calendar arithmetic for the daily window: Gemini resets requests-per-day at midnight
//! America/Los_Angeles. US Pacific time is UTC-8, or UTC-7 from the second Sunday of March at
//! 02:00 local to the first Sunday of November at 02:00 local (the rule since 2007); computing it
//! here keeps a time-zone database out of the addon.

use crate::core::clock::{Millis, DAY_MS, HOUR_MS};

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
  let y = if month <= 2 { year - 1 } else { year };
  let era = y.div_euclid(400);
  let yoe = y - era * 400;
  let m = month as i64;
  let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
  let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
  let z = days + 719_468;
  let era = z.div_euclid(146_097);
  let doe = z - era * 146_097;
  let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
  let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  let mp = (5 * doy + 2) / 153;
  let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
  let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
  let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
  (year, month, day)
}

/// Day count of the `nth` Sunday (1-based) of a month.
fn nth_sunday(year: i64, month: u32, nth: i64) -> i64 {
  let first = days_from_civil(year, month, 1);
  // 1970-01-01 was a Thursday: weekday 4 when Sunday is 0.
  let weekday = (first + 4).rem_euclid(7);
  first + (7 - weekday) % 7 + 7 * (nth - 1)
}

/// Whether US Pacific daylight time is in force at `t`.
fn pacific_dst(t: Millis) -> bool {
  let (year, _, _) = civil_from_days(t.div_euclid(DAY_MS));
  // 02:00 PST is 10:00 UTC; 02:00 PDT is 09:00 UTC.
  let starts = nth_sunday(year, 3, 2) * DAY_MS + 10 * HOUR_MS;
  let ends = nth_sunday(year, 11, 1) * DAY_MS + 9 * HOUR_MS;
  t >= starts && t < ends
}

fn pacific_offset(t: Millis) -> Millis {
  if pacific_dst(t) {
    -7 * HOUR_MS
  } else {
    -8 * HOUR_MS
  }
}

/// When the daily counter resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DailyReset {
  /// Midnight America/Los_Angeles: Gemini's documented reset.
  #[default]
  PacificMidnight,
  /// Midnight UTC.
  UtcMidnight,
}

impl DailyReset {
  pub fn parse(text: &str) -> Option<Self> {
    match text.to_ascii_lowercase().as_str() {
      "america/los_angeles" | "pacific" => Some(Self::PacificMidnight),
      "utc" => Some(Self::UtcMidnight),
      _ => None,
    }
  }

  /// The first reset strictly after `t`.
  pub fn next_reset(self, t: Millis) -> Millis {
    match self {
      Self::UtcMidnight => (t.div_euclid(DAY_MS) + 1) * DAY_MS,
      Self::PacificMidnight => {
        let local_midnight = ((t + pacific_offset(t)).div_euclid(DAY_MS) + 1) * DAY_MS;
        // Transitions happen at 02:00 local, never at midnight, so the offset an hour past the
        // standard-time guess is the offset at that midnight.
        let guess = local_midnight + 8 * HOUR_MS;
        local_midnight - pacific_offset(guess)
      }
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::clock::MINUTE_MS;

  fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> Millis {
    days_from_civil(y, mo, d) * DAY_MS + h * HOUR_MS + mi * MINUTE_MS
  }

  #[test]
  fn civil_dates_round_trip() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    for days in [-800_000, -1, 0, 59, 11_016, 20_000, 2_932_896] {
      let (y, m, d) = civil_from_days(days);
      assert_eq!(days_from_civil(y, m, d), days);
    }
    assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
  }

  #[test]
  fn dst_sundays_of_2026() {
    assert_eq!(civil_from_days(nth_sunday(2026, 3, 2)), (2026, 3, 8));
    assert_eq!(civil_from_days(nth_sunday(2026, 11, 1)), (2026, 11, 1));
    assert_eq!(civil_from_days(nth_sunday(2025, 3, 2)), (2025, 3, 9));
    assert_eq!(civil_from_days(nth_sunday(2025, 11, 1)), (2025, 11, 2));
  }

  #[test]
  fn pacific_midnight_is_08_utc_in_winter_and_07_utc_in_summer() {
    let r = DailyReset::PacificMidnight;
    // 2026-01-15 12:00 UTC is 04:00 PST on the 15th: next midnight is the 16th, 08:00 UTC.
    assert_eq!(
      r.next_reset(utc(2026, 1, 15, 12, 0)),
      utc(2026, 1, 16, 8, 0)
    );
    // 2026-07-01 03:00 UTC is 20:00 PDT on June 30th: next midnight is July 1st, 07:00 UTC.
    assert_eq!(r.next_reset(utc(2026, 7, 1, 3, 0)), utc(2026, 7, 1, 7, 0));
    // Exactly at a reset, the next one is a day later.
    assert_eq!(r.next_reset(utc(2026, 7, 1, 7, 0)), utc(2026, 7, 2, 7, 0));
  }

  #[test]
  fn pacific_midnight_across_the_dst_switches() {
    let r = DailyReset::PacificMidnight;
    // Saturday 2026-03-07 22:00 PST: the next midnight (Sunday the 8th) is still PST.
    assert_eq!(r.next_reset(utc(2026, 3, 8, 6, 0)), utc(2026, 3, 8, 8, 0));
    // Sunday 2026-03-08 12:00 PDT: the next midnight is PDT.
    assert_eq!(r.next_reset(utc(2026, 3, 8, 19, 0)), utc(2026, 3, 9, 7, 0));
    // Saturday 2026-10-31 22:00 PDT: midnight of Sunday Nov 1st is still PDT.
    assert_eq!(r.next_reset(utc(2026, 11, 1, 5, 0)), utc(2026, 11, 1, 7, 0));
    // Sunday 2026-11-01 12:00 PST: the next midnight is PST.
    assert_eq!(
      r.next_reset(utc(2026, 11, 1, 20, 0)),
      utc(2026, 11, 2, 8, 0)
    );
  }

  #[test]
  fn utc_midnight_and_parsing() {
    assert_eq!(
      DailyReset::UtcMidnight.next_reset(utc(2026, 5, 5, 23, 59)),
      utc(2026, 5, 6, 0, 0)
    );
    assert_eq!(DailyReset::parse("UTC"), Some(DailyReset::UtcMidnight));
    assert_eq!(
      DailyReset::parse("America/Los_Angeles"),
      Some(DailyReset::PacificMidnight)
    );
    assert_eq!(DailyReset::parse("Mars/Olympus"), None);
  }
}
