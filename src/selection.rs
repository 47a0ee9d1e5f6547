//! Which key to hand out: the availability score, and the cache of available keys that makes a pick
//! O(1) (the old service's algorithm: sorted by score, rebuilt every 5 seconds, round-robin).

use crate::clock::Millis;
use crate::key::KeyState;
use crate::quota::LimitType;

pub const CACHE_TTL_MS: Millis = 5_000;
/// Below this score a key is worth rotating away from.
pub const ROTATION_THRESHOLD: f64 = 0.3;

fn remaining_fraction(key: &KeyState, limit_type: LimitType, now: Millis) -> f64 {
  let limit = key.limit(limit_type);
  if limit == 0 {
    return 0.0;
  }
  limit.saturating_sub(key.current(limit_type, now)) as f64 / limit as f64
}

/// 0.5 × remaining RPM share + 0.3 × remaining RPD share + 0.2 × remaining TPM share.
pub fn availability_score(key: &KeyState, now: Millis) -> f64 {
  0.5 * remaining_fraction(key, LimitType::Rpm, now)
    + 0.3 * remaining_fraction(key, LimitType::Rpd, now)
    + 0.2 * remaining_fraction(key, LimitType::Tpm, now)
}

/// In service (not resting, open, deactivated, disabled or removed), with room for one more request of
/// `estimated_tokens` in every window.
pub fn is_available(key: &KeyState, now: Millis, estimated_tokens: u64) -> bool {
  key.in_service(now) && key.has_room(now, estimated_tokens)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectionMethod {
  /// Served from a cache younger than [`CACHE_TTL_MS`].
  CachedRoundRobin,
  /// The cache had to be rebuilt first.
  RoundRobin,
}

impl SelectionMethod {
  pub fn as_str(self) -> &'static str {
    match self {
      SelectionMethod::CachedRoundRobin => "cached-round-robin",
      SelectionMethod::RoundRobin => "round-robin",
    }
  }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
  pub index: usize,
  pub score: f64,
  pub total_available: usize,
  pub method: SelectionMethod,
}

/// Why `getNextKeyForRotation` did or did not move to another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationReason {
  /// The weakest available key was under the threshold and a key above it was handed out instead.
  Proactive,
  /// Every available key is at or above the threshold.
  NotNeeded,
  /// Some key is under the threshold, but none is above it to rotate to.
  NoKeyAboveThreshold,
}

impl RotationReason {
  pub fn as_str(self) -> &'static str {
    match self {
      RotationReason::Proactive => "proactive-rotation",
      RotationReason::NotNeeded => "not-needed",
      RotationReason::NoKeyAboveThreshold => "no-key-above-threshold",
    }
  }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotation {
  pub selection: Selection,
  pub reason: RotationReason,
  /// The weakest key's score, when a proactive rotation moved away from it.
  pub previous_key_score: Option<f64>,
}

/// The available keys, best first, as of `built_at`; handed out round-robin from `cursor`.
#[derive(Debug, Default)]
pub struct SelectionCache {
  order: Vec<usize>,
  /// Reused by every rebuild, so a rebuild on the selection path does not allocate.
  scored: Vec<(f64, usize)>,
  built_at: Option<Millis>,
  cursor: usize,
}

impl SelectionCache {
  pub fn invalidate(&mut self) {
    self.built_at = None;
  }

  /// Position of the next round-robin pick: the old service's `currentIndex`.
  pub fn cursor(&self) -> usize {
    self.cursor
  }

  fn is_fresh(&self, now: Millis) -> bool {
    matches!(self.built_at, Some(t) if now - t < CACHE_TTL_MS && now >= t)
  }

  /// Past its 5 seconds (or dropped): the next pick rebuilds it.
  pub fn is_stale(&self, now: Millis) -> bool {
    !self.is_fresh(now)
  }

  /// Re-sorts the available keys by score, best first; returns how many there are.
  pub fn rebuild(&mut self, keys: &[KeyState], now: Millis) -> usize {
    self.scored.clear();
    self.scored.extend(
      keys
        .iter()
        .enumerate()
        .filter(|(_, k)| is_available(k, now, 0))
        .map(|(i, k)| (availability_score(k, now), i)),
    );
    self
      .scored
      .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    self.order.clear();
    self.order.extend(self.scored.iter().map(|&(_, i)| i));
    self.built_at = Some(now);
    self.cursor = 0;
    self.order.len()
  }

  /// The next available key round-robin. Keys that ran out since the cache was built are skipped;
  /// when none of the cached keys is left the cache is rebuilt once, so a pick costs O(1) amortised.
  pub fn next(
    &mut self,
    keys: &[KeyState],
    now: Millis,
    estimated_tokens: u64,
  ) -> Option<Selection> {
    let mut method = SelectionMethod::CachedRoundRobin;
    if !self.is_fresh(now) {
      self.rebuild(keys, now);
      method = SelectionMethod::RoundRobin;
    }
    if let Some(s) = self.scan(keys, now, method, estimated_tokens) {
      return Some(s);
    }
    if method == SelectionMethod::CachedRoundRobin {
      self.rebuild(keys, now);
      return self.scan(keys, now, SelectionMethod::RoundRobin, estimated_tokens);
    }
    None
  }

  fn scan(
    &mut self,
    keys: &[KeyState],
    now: Millis,
    method: SelectionMethod,
    estimated_tokens: u64,
  ) -> Option<Selection> {
    let len = self.order.len();
    for _ in 0..len {
      let index = self.order[self.cursor % len];
      self.cursor = (self.cursor + 1) % len;
      let key = &keys[index];
      if is_available(key, now, estimated_tokens) {
        return Some(Selection {
          index,
          score: availability_score(key, now),
          total_available: len,
          method,
        });
      }
    }
    None
  }

  /// `getNextKeyForRotation`: when the weakest available key scores under [`ROTATION_THRESHOLD`],
  /// the strongest one is handed out instead; otherwise this is [`Self::next`]. Scores are taken
  /// now rather than from the cache's order, so this costs O(available keys).
  pub fn rotation(
    &mut self,
    keys: &[KeyState],
    now: Millis,
    estimated_tokens: u64,
  ) -> Option<Rotation> {
    let method = if self.is_fresh(now) {
      SelectionMethod::CachedRoundRobin
    } else {
      self.rebuild(keys, now);
      SelectionMethod::RoundRobin
    };
    let mut weakest: Option<(f64, usize)> = None;
    let mut strongest: Option<(f64, usize)> = None;
    for &i in &self.order {
      let key = &keys[i];
      if !is_available(key, now, estimated_tokens) {
        continue;
      }
      let s = availability_score(key, now);
      if weakest.is_none_or(|(w, _)| s < w) {
        weakest = Some((s, i));
      }
      if strongest.is_none_or(|(b, _)| s > b) {
        strongest = Some((s, i));
      }
    }
    let (weakest_score, _) = weakest?;
    let reason = if weakest_score >= ROTATION_THRESHOLD {
      RotationReason::NotNeeded
    } else {
      match strongest {
        Some((score, index)) if score > ROTATION_THRESHOLD => {
          return Some(Rotation {
            selection: Selection {
              index,
              score,
              total_available: self.order.len(),
              method,
            },
            reason: RotationReason::Proactive,
            previous_key_score: Some(weakest_score),
          });
        }
        _ => RotationReason::NoKeyAboveThreshold,
      }
    };
    self
      .next(keys, now, estimated_tokens)
      .map(|selection| Rotation {
        // `next` sees the cache this call just rebuilt as fresh; the method is this call's.
        selection: Selection {
          method: if method == SelectionMethod::RoundRobin {
            method
          } else {
            selection.method
          },
          ..selection
        },
        reason,
        previous_key_score: None,
      })
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::quota::{Quota, WindowPolicy};

  fn keys(n: usize) -> Vec<KeyState> {
    (0..n)
      .map(|i| {
        KeyState::new(
          format!("key-{i}"),
          Quota::default(),
          &WindowPolicy::default(),
          0,
        )
      })
      .collect()
  }

  #[test]
  fn score_weighs_rpm_rpd_and_tpm_half_three_tenths_and_a_fifth() {
    let mut k = keys(1).remove(0);
    assert!((availability_score(&k, 0) - 1.0).abs() < 1e-12);
    k.rpm.add(0, 15); // rpm half used
    k.rpd.add(0, 100); // rpd half used
    k.tpm.add(0, 1_000_000); // tpm used up
    assert!((availability_score(&k, 0) - (0.25 + 0.15)).abs() < 1e-12);
  }

  #[test]
  fn a_key_is_available_only_when_active_and_under_every_limit() {
    let mut ks = keys(3);
    ks[0].health.on_key_rejected();
    ks[1].rpd.add(0, 200);
    ks[2].health.on_rate_limited(0, 1_000);
    assert!(!is_available(&ks[0], 0, 0));
    assert!(!is_available(&ks[1], 0, 0));
    assert!(!is_available(&ks[2], 0, 0));
    assert!(is_available(&ks[2], 1_000, 0));
    assert!(!is_available(&ks[2], 1_000, 1_000_001));
  }

  #[test]
  fn first_pick_rebuilds_then_serves_round_robin_from_cache_until_ttl() {
    let ks = keys(3);
    let mut c = SelectionCache::default();
    let picks: Vec<_> = (0..4).map(|i| c.next(&ks, i, 0).unwrap()).collect();
    assert_eq!(picks[0].method, SelectionMethod::RoundRobin);
    assert!(picks[1..]
      .iter()
      .all(|p| p.method == SelectionMethod::CachedRoundRobin));
    assert_eq!(
      picks.iter().map(|p| p.index).collect::<Vec<_>>(),
      [0, 1, 2, 0]
    );
    assert_eq!(picks[0].total_available, 3);
    assert_eq!(
      c.next(&ks, CACHE_TTL_MS, 0).unwrap().method,
      SelectionMethod::RoundRobin
    );
  }

  #[test]
  fn cache_orders_by_score_best_first() {
    let mut ks = keys(3);
    ks[0].rpm.add(0, 20);
    ks[1].rpm.add(0, 10);
    let mut c = SelectionCache::default();
    let order: Vec<_> = (0..3).map(|_| c.next(&ks, 0, 0).unwrap().index).collect();
    assert_eq!(order, [2, 1, 0]);
  }

  #[test]
  fn keys_that_ran_out_are_skipped_and_an_exhausted_cache_is_rebuilt() {
    let mut ks = keys(2);
    let mut c = SelectionCache::default();
    c.next(&ks, 0, 0);
    ks[1].rpm.add(0, 30);
    assert_eq!(c.next(&ks, 1, 0).unwrap().index, 0);
    assert_eq!(c.next(&ks, 2, 0).unwrap().index, 0);
    ks[0].rpm.add(0, 30);
    assert_eq!(c.next(&ks, 3, 0), None);
    // The rolling window frees after a minute (and a slice); a stale cache sees it.
    assert_eq!(
      c.next(&ks, 61_000 + CACHE_TTL_MS, 0).unwrap().method,
      SelectionMethod::RoundRobin
    );
  }

  #[test]
  fn rotation_moves_off_a_weak_key_to_the_strongest() {
    let mut ks = keys(3);
    ks[0].rpm.add(0, 29);
    ks[0].rpd.add(0, 190);
    ks[1].rpm.add(0, 5);
    let mut c = SelectionCache::default();
    let r = c.rotation(&ks, 0, 0).unwrap();
    assert_eq!(r.reason, RotationReason::Proactive);
    assert_eq!(r.selection.index, 2);
    let weak = availability_score(&ks[0], 0);
    assert!(weak < ROTATION_THRESHOLD);
    assert_eq!(r.previous_key_score, Some(weak));
  }

  #[test]
  fn rotation_says_why_it_did_not_rotate() {
    let ks = keys(2);
    let mut c = SelectionCache::default();
    let r = c.rotation(&ks, 0, 0).unwrap();
    assert_eq!(r.reason, RotationReason::NotNeeded);
    assert_eq!(r.selection.method, SelectionMethod::RoundRobin);
    assert_eq!(
      c.rotation(&ks, 1, 0).unwrap().selection.method,
      SelectionMethod::CachedRoundRobin
    );
    assert_eq!(r.previous_key_score, None);

    let mut weak = keys(1);
    weak[0].rpm.add(0, 29);
    weak[0].rpd.add(0, 199);
    let mut c = SelectionCache::default();
    assert_eq!(
      c.rotation(&weak, 0, 0).unwrap().reason,
      RotationReason::NoKeyAboveThreshold
    );
  }

  #[test]
  fn nothing_available_gives_none() {
    let mut ks = keys(1);
    ks[0].health.on_key_rejected();
    let mut c = SelectionCache::default();
    assert_eq!(c.next(&ks, 0, 0), None);
    assert_eq!(c.rotation(&ks, 0, 0), None);
  }
}
