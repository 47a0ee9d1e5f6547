//! `npm run bench:pool`: the hot calls of `core::pool::KeyPool` in Rust alone, with no N-API, no
//! JS and no await: the part of `npm run bench`'s figures that the core itself costs, on the
//! system clock as the addon runs it, with limits high enough that no key runs out.
//!
//!   pair     best + record_usage of the key it handed out, at 10 and 1,000 keys
//!   record   record_usage alone, at 10 keys, naming the keys in turn
//!
//! As in `bench/core.js`, each round takes one sample of each in an order that rotates from round
//! to round, and the figures are the medians over the rounds.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use gemini_key_manager::core::clock::SystemClock;
use gemini_key_manager::core::config::PoolConfig;
use gemini_key_manager::core::models::DEFAULT_MODEL_ID;
use gemini_key_manager::core::pool::{Claim, KeyPool, Outcome};
use gemini_key_manager::core::quota::Quota;
use gemini_key_manager::log::SilentLog;

const SAMPLE: usize = 200_000;
const ROUNDS: usize = 31;
const HIGH: u64 = 1_000_000_000_000_000;
const HAND_OUT: Claim = Claim::Reserve {
  estimated_tokens: 0,
};

fn pool_of(n: usize) -> KeyPool {
  let keys = (0..n)
    .map(|i| format!("AIzaSyBENCH{i:06}abcdefghijklmnopq"))
    .collect();
  let quota = Quota {
    rpm: HIGH,
    rpd: HIGH,
    tpm: HIGH,
  };
  KeyPool::new(
    PoolConfig::of(keys, quota),
    Arc::new(SystemClock),
    Arc::new(SilentLog),
  )
  .expect("a pool of valid keys")
}

/// Nanoseconds a pair takes, over one sample.
fn pair(pool: &KeyPool) -> f64 {
  let start = Instant::now();
  for _ in 0..SAMPLE {
    let picked = pool.best(HAND_OUT, DEFAULT_MODEL_ID).expect("a key");
    let figures = pool.record_usage(picked.pick.index, 120, Outcome::Success, 35.0, None);
    black_box(figures.expect("recorded"));
  }
  start.elapsed().as_nanos() as f64 / SAMPLE as f64
}

/// Nanoseconds a report alone takes, over one sample.
fn record(pool: &KeyPool, keys: usize) -> f64 {
  let start = Instant::now();
  for i in 0..SAMPLE {
    let figures = pool.record_usage(i % keys, 120, Outcome::Success, 35.0, None);
    black_box(figures.expect("recorded"));
  }
  start.elapsed().as_nanos() as f64 / SAMPLE as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
  xs.sort_by(f64::total_cmp);
  let n = xs.len();
  if n % 2 == 1 {
    xs[n / 2]
  } else {
    (xs[n / 2 - 1] + xs[n / 2]) / 2.0
  }
}

fn main() {
  let small = pool_of(10);
  let large = pool_of(1_000);
  let mut samples = [Vec::new(), Vec::new(), Vec::new()];
  for round in 0..ROUNDS {
    for turn in 0..3 {
      let which = (round + turn) % 3;
      samples[which].push(match which {
        0 => pair(&small),
        1 => pair(&large),
        _ => record(&small, 10),
      });
    }
  }
  let [pair_10, pair_1000, record_10] = samples.map(median);
  println!("core alone, medians of {ROUNDS} rounds of {SAMPLE} calls (ns):");
  println!("  pair at 10 keys       {pair_10:7.0}");
  println!(
    "  pair at 1,000 keys    {pair_1000:7.0}   ({:.2}x the pair at 10)",
    pair_1000 / pair_10
  );
  println!("  recordUsage alone     {record_10:7.0}");
}
