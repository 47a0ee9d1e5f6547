//! What the pool counts as it works, for metrics: plain integers incremented under the pool's lock,
//! so counting costs the hot path a few additions and no allocation.

/// Running totals since the pool was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
  /// Keys handed out for a request (each reserves the request on its key).
  pub handed_out: u64,
  /// Selections served from the fresh 5-second cache.
  pub cache_hits: u64,
  /// Selections that had to rebuild the cache first.
  pub cache_misses: u64,
  /// `getNextKeyForRotation` calls that moved off a weak key.
  pub proactive_rotations: u64,
  /// Keys taken out of rotation by what a call reported: a 429 rest, an open circuit, a
  /// deactivation.
  pub error_rotations: u64,
  /// 429s reported (by `recordUsage` or `handleRateLimit`), per window in [`crate::core::quota::LimitType::ALL`]
  /// order.
  pub rate_limits: [u64; 3],
  /// Calls recorded as succeeded and as failed.
  pub successes: u64,
  pub failures: u64,
  /// Tokens reported by recorded calls.
  pub tokens: u64,
}
