//! Which key to hand out for a model: the availability score of its project's budget, and the
//! cache of available keys that makes a pick O(1) (the old service's algorithm: sorted by score,
//! rebuilt every 5 seconds, round-robin), its keys interleaved by project, so that load spreads
//! over projects (whose budgets Gemini counts), not over keys.

use crate::core::budget::{Budget, Budgets};
use crate::core::clock::Millis;
use crate::core::key::KeyState;
use crate::core::models::{ModelId, Overload};

pub const CACHE_TTL_MS: Millis = 5_000;
/// Below this score a key is worth rotating away from.
pub const ROTATION_THRESHOLD: f64 = 0.3;

/// The keys as one model sees them: each through its project's budget of that model.
#[derive(Clone, Copy)]
pub struct Candidates<'a> {
  pub keys: &'a [KeyState],
  pub budgets: &'a Budgets,
  pub model: ModelId,
  pub overload: &'a Overload,
}

impl Candidates<'_> {
  pub fn budget(&self, index: usize) -> &Budget {
    self
      .budgets
      .get(self.budgets.of(self.keys[index].project, self.model))
  }

  /// In service (the key, its model and its budget), with room for one more request of
  /// `estimated_tokens` in every window.
  pub fn is_available(&self, index: usize, now: Millis, estimated_tokens: u64) -> bool {
    self.overload.can_serve(now)
      && self.keys[index].in_service(now)
      && self.budget(index).has_room(now, estimated_tokens)
  }

  /// The key's availability score: its budget's.
  pub fn score(&self, index: usize, now: Millis) -> f64 {
    self.budget(index).score(now)
  }
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

/// The available keys for one model, best first and interleaved by project, as of `built_at`;
/// handed out round-robin from `cursor`.
#[derive(Debug, Default)]
pub struct SelectionCache {
  order: Vec<usize>,
  /// Reused by every rebuild, so a rebuild on the selection path does not allocate once warm:
  /// (score, key) sorted, then (rank within its project, position, key).
  scored: Vec<(f64, usize)>,
  ranked: Vec<(u32, u32, usize)>,
  per_project: Vec<u32>,
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

  /// Re-sorts the available keys by score, best first, then deals them out project by project
  /// (each project's best key, then each one's second, ...); returns how many there are.
  pub fn rebuild(&mut self, c: Candidates<'_>, now: Millis) -> usize {
    self.scored.clear();
    self.scored.extend(
      (0..c.keys.len())
        .filter(|&i| c.is_available(i, now, 0))
        .map(|i| (c.score(i, now), i)),
    );
    self
      .scored
      .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    self.per_project.clear();
    self.per_project.resize(c.budgets.project_count(), 0);
    self.ranked.clear();
    for (position, &(_, i)) in self.scored.iter().enumerate() {
      let project = c.keys[i].project;
      let rank = self.per_project[project];
      self.per_project[project] += 1;
      self.ranked.push((rank, position as u32, i));
    }
    self.ranked.sort_unstable();
    self.order.clear();
    self.order.extend(self.ranked.iter().map(|&(_, _, i)| i));
    self.built_at = Some(now);
    self.cursor = 0;
    self.order.len()
  }

  /// The next available key round-robin. Keys that ran out since the cache was built are skipped;
  /// when none of the cached keys is left the cache is rebuilt once, so a pick costs O(1) amortised.
  pub fn next(
    &mut self,
    c: Candidates<'_>,
    now: Millis,
    estimated_tokens: u64,
  ) -> Option<Selection> {
    let mut method = SelectionMethod::CachedRoundRobin;
    if !self.is_fresh(now) {
      self.rebuild(c, now);
      method = SelectionMethod::RoundRobin;
    }
    if let Some(s) = self.scan(c, now, method, estimated_tokens) {
      return Some(s);
    }
    if method == SelectionMethod::CachedRoundRobin {
      self.rebuild(c, now);
      return self.scan(c, now, SelectionMethod::RoundRobin, estimated_tokens);
    }
    None
  }

  fn scan(
    &mut self,
    c: Candidates<'_>,
    now: Millis,
    method: SelectionMethod,
    estimated_tokens: u64,
  ) -> Option<Selection> {
    let len = self.order.len();
    for _ in 0..len {
      // `cursor < len` here: only `rebuild` changes `order`, and it resets `cursor`. Wrapped by a
      // comparison, not `%`: an integer division is the dearest instruction of a pick.
      let index = self.order[self.cursor];
      self.cursor += 1;
      if self.cursor == len {
        self.cursor = 0;
      }
      if c.is_available(index, now, estimated_tokens) {
        return Some(Selection {
          index,
          score: c.score(index, now),
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
    c: Candidates<'_>,
    now: Millis,
    estimated_tokens: u64,
  ) -> Option<Rotation> {
    let method = if self.is_fresh(now) {
      SelectionMethod::CachedRoundRobin
    } else {
      self.rebuild(c, now);
      SelectionMethod::RoundRobin
    };
    let mut weakest: Option<(f64, usize)> = None;
    let mut strongest: Option<(f64, usize)> = None;
    for &i in &self.order {
      if !c.is_available(i, now, estimated_tokens) {
        continue;
      }
      let s = c.score(i, now);
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
      .next(c, now, estimated_tokens)
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
mod tests;
