//! The leasing task: keeps every key's shared leases (see `share`) topped up from the store, on the
//! tokio runtime, so the hot path never waits for the database. It wakes every tick, and at once
//! when a lease runs low; each round asks the store only for what the pool says it needs. While
//! the store cannot be reached, keys serve a local share of their limits (the limit over the
//! processes last seen sharing it). On close it gives back what it holds and did not use.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

use crate::core::clock::Millis;
use crate::core::pool::KeyPool;
use crate::log::Log;
use crate::sharing::share::{
  span_slices, Answer, LeaseNeed, Occurrence, SharedWindow, DAILY_LEASE_TTL_MS,
};
use crate::store::{LeaseSlot, SliceSlot, Store, StoreError};

/// How often the task looks at the leases when nothing wakes it: it renews and prefetches by time.
const TICK: Duration = Duration::from_millis(100);
/// How long one request to the store may take before the store counts as away and keys serve
/// their local share: a selection must never wait on a slow or hung database.
pub const LEASE_TIMEOUT: Duration = Duration::from_millis(200);
/// How much clock skew between hosts a reclaim allows: a holder's lease is taken back only this
/// long after it expired by our clock.
const CLOCK_SKEW_MS: Millis = 5_000;

/// Logged when leases are granted again after the store could not be reached.
pub const RECONNECTED_LINE: &str = "✅ Shared quota: leasing from MongoDB again";

/// The store connection the persistence writer holds, shared with the leasing task: `None` while
/// there is none.
pub type StoreSlot = Mutex<Option<Arc<Store>>>;

struct Inner {
  pool: Arc<KeyPool>,
  log: Arc<dyn Log>,
  /// Whether the last round that asked the store got its answers: the change is logged, once.
  reached: AtomicBool,
  store: Arc<StoreSlot>,
  /// This process's name in lease documents: unique across processes and hosts.
  holder: String,
  wake: Arc<Notify>,
  closing: AtomicBool,
  /// Processes seen sharing the keys in the last round that reached the store.
  peers: AtomicUsize,
}

/// The running task. Call [`LeaseKeeper::close`] to give back what is held.
pub struct LeaseKeeper {
  inner: Arc<Inner>,
  task: Mutex<Option<JoinHandle<()>>>,
}

impl LeaseKeeper {
  /// Makes `pool` share its quota through `store` (if it does not already: see
  /// [`KeyPool::share_quota`]), takes the first leases, so the pool can serve when this returns,
  /// and starts the task. Must run inside a tokio runtime.
  pub async fn start(pool: Arc<KeyPool>, store: Arc<StoreSlot>, log: Arc<dyn Log>) -> Self {
    let wake = pool.share_quota();
    let inner = Arc::new(Inner {
      pool,
      log,
      reached: AtomicBool::new(true),
      store,
      holder: mongodb::bson::oid::ObjectId::new().to_hex(),
      wake,
      closing: AtomicBool::new(false),
      peers: AtomicUsize::new(1),
    });
    round(&inner).await;
    let task = tokio::spawn(run(inner.clone()));
    Self {
      inner,
      task: Mutex::new(Some(task)),
    }
  }

  /// Processes seen sharing the keys (this one included).
  pub fn peers(&self) -> usize {
    self.inner.peers.load(Ordering::Relaxed)
  }

  /// Stops the task and gives back what the pool holds and did not serve, reporting what it
  /// served; stops at the first failed write (the leases then expire by themselves). Close the
  /// pool first, so nothing is served after. Idempotent.
  pub async fn close(&self) {
    self.inner.closing.store(true, Ordering::Release);
    self.inner.wake.notify_one();
    let task = self.task.lock().take();
    let Some(task) = task else {
      return;
    };
    // A task that panicked holds nothing more than the pool says.
    let _ = task.await;
    let Some(store) = self.inner.store.lock().clone() else {
      return;
    };
    let span = self.inner.pool.policy().span_ms;
    for (budget, window, occurrence, unused, spent) in self.inner.pool.unused_leases() {
      let Some(subject) = self.inner.pool.lease_subject(budget) else {
        continue;
      };
      let api_key = subject.as_str();
      let holder = &self.inner.holder;
      let given_back = async {
        if window == SharedWindow::Rpm {
          let slot = slice_slot(api_key, window, &occurrence, span_slices(span));
          store.release_slice(&slot, holder, unused).await?;
          return Ok(());
        }
        let slot = LeaseSlot {
          api_key,
          window: window.as_str(),
          window_id: occurrence.id,
          window_end: occurrence.end,
        };
        if spent > 0 {
          store.consume(&slot, holder, spent).await?;
        }
        if unused > 0 {
          store.release(&slot, holder, unused).await?;
        }
        Ok::<_, StoreError>(())
      };
      // A store that hangs keeps nothing from closing: what is not given back expires.
      if !matches!(timeout(LEASE_TIMEOUT, given_back).await, Ok(Ok(()))) {
        return;
      }
    }
  }
}

async fn run(inner: Arc<Inner>) {
  let mut next_reclaim = 0;
  // Each allowance asks one thing a round, the most urgent first: after a round the store
  // answered, what comes next (the next slice's lease, once the first is in) is asked at once,
  // not a tick later, which may be past the slice's end.
  let mut again = true;
  while !inner.closing.load(Ordering::Acquire) {
    if !again {
      tokio::select! {
        _ = sleep(TICK) => {}
        _ = inner.wake.notified() => {}
      }
    }
    if inner.closing.load(Ordering::Acquire) {
      break;
    }
    again = round(&inner).await;
    let now = inner.pool.now();
    if now >= next_reclaim {
      next_reclaim = now + DAILY_LEASE_TTL_MS / 2;
      let store = inner.store.lock().clone();
      if let Some(store) = store {
        // Failures are the next round's business; a reclaim missed now is done next time.
        let _ = store.reclaim_expired(now - CLOCK_SKEW_MS).await;
      }
    }
  }
}

/// Asks the store for what the pool needs and hands the answers back. After a failure the rest of
/// the round is not asked: the store is away, and keys serve what they hold, then a local share.
/// Returns whether the store answered something.
async fn round(inner: &Inner) -> bool {
  let needs = inner.pool.lease_needs();
  if needs.is_empty() {
    return false;
  }
  let store = inner.store.lock().clone();
  let mut reachable = store.is_some();
  let mut peers = 0;
  let mut answers = Vec::with_capacity(needs.len());
  let now = inner.pool.now();
  for (budget, window, need) in needs {
    let mut answer = None;
    if let (Some(store), true) = (&store, reachable) {
      // A store that does not answer in time is as away as one that fails: selections must not
      // wait for it.
      let asked = timeout(LEASE_TIMEOUT, ask(store, inner, budget, window, &need)).await;
      match asked.unwrap_or(Err(StoreError::Unreachable(LEASE_TIMEOUT))) {
        Ok((granted, holders, given_back)) => {
          // Holders of a day not started yet are only those that leased early; a slice's are
          // those of the last span, started or not (and slices are mostly leased before they
          // start).
          if let LeaseNeed::Grant {
            occurrence,
            span_slices,
            ..
          } = need
          {
            if occurrence.contains(now) || span_slices > 0 {
              peers = peers.max(holders);
            }
          }
          answer = Some(Answer {
            granted,
            given_back,
            holders,
          });
        }
        Err(_) => reachable = false,
      }
    }
    answers.push((budget, window, need, answer));
  }
  inner.pool.leases_granted(&answers);
  if peers > 0 {
    inner.peers.store(peers, Ordering::Relaxed);
  }
  let peers = inner.peers.load(Ordering::Relaxed);
  if inner.reached.swap(reachable, Ordering::Relaxed) != reachable {
    if reachable {
      inner.log.info(RECONNECTED_LINE);
    } else {
      inner.log.warn(&format!(
        "⚠️ Shared quota: MongoDB cannot be reached; keys serve what they hold, then 1/{peers} of \
         each limit"
      ));
    }
  }
  if !reachable {
    inner.pool.grant_locally(peers);
  }
  reachable
}

/// One need: reports what was spent, asks for more, then gives back what the new grant replaces
/// (after, so a failed grant leaves the old lease in place). Returns what was granted, how many
/// processes hold part of the window (0 when not read), and what was given back.
async fn ask(
  store: &Store,
  inner: &Inner,
  budget: usize,
  window: SharedWindow,
  need: &LeaseNeed,
) -> Result<(u64, usize, u64), StoreError> {
  let Some(subject) = inner.pool.lease_subject(budget) else {
    return Ok((0, 0, 0));
  };
  let api_key = subject.as_str();
  let (occurrence, want, limit, expires_at, spent, give_back, span_slices) = match *need {
    LeaseNeed::Grant {
      occurrence,
      want,
      limit,
      expires_at,
      spent,
      give_back,
      span_slices,
    } => (
      occurrence,
      want,
      limit,
      expires_at,
      spent,
      give_back,
      span_slices,
    ),
    LeaseNeed::Release {
      slice,
      unused,
      span_slices,
    } => {
      let slot = slice_slot(api_key, window, &slice, span_slices);
      let back = store.release_slice(&slot, &inner.holder, unused).await?;
      // A give-back does not read who holds the window.
      return Ok((0, 0, back));
    }
  };
  if span_slices > 0 {
    let grant = store
      .lease_slice(
        &slice_slot(api_key, window, &occurrence, span_slices),
        want,
        limit,
        &inner.holder,
      )
      .await?;
    return Ok((grant.granted, grant.holders, 0));
  }
  let slot = LeaseSlot {
    api_key,
    window: window.as_str(),
    window_id: occurrence.id,
    window_end: occurrence.end,
  };
  if spent > 0 {
    store.consume(&slot, &inner.holder, spent).await?;
  }
  let grant = store
    .lease(&slot, want, limit, &inner.holder, expires_at)
    .await?;
  // Not given back when this fails: still held, and the new grant's expiry covers it.
  let given_back = match give_back {
    0 => 0,
    n => store.release(&slot, &inner.holder, n).await.unwrap_or(0),
  };
  Ok((grant.granted, grant.holders, given_back))
}

/// The store's slot for a slice of a rolling window.
fn slice_slot<'a>(
  api_key: &'a str,
  window: SharedWindow,
  slice: &Occurrence,
  span_slices: i64,
) -> SliceSlot<'a> {
  SliceSlot {
    api_key,
    window: window.as_str(),
    slice: slice.start / (slice.end - slice.start).max(1),
    span_slices,
    slice_end: slice.end,
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::clock::FakeClock;
  use crate::core::config::PoolConfig;
  use crate::core::pool::{Claim, Outcome};
  use crate::core::quota::Quota;
  use crate::core::quota::WindowPolicy;
  use crate::log::CapturedLog;

  /// A minute boundary.
  const T0: Millis = 1_800_000_000_000;
  const RESERVE: Claim = Claim::Reserve {
    estimated_tokens: 0,
  };

  fn process(clock: &FakeClock, store: &Arc<StoreSlot>) -> Arc<Inner> {
    process_logging(clock, store, &Arc::new(CapturedLog::default()))
  }

  fn process_logging(
    clock: &FakeClock,
    store: &Arc<StoreSlot>,
    log: &Arc<CapturedLog>,
  ) -> Arc<Inner> {
    let quota = Quota {
      rpm: 30,
      rpd: 10_000,
      tpm: 1_000_000,
    };
    process_with(clock, store, log, quota, WindowPolicy::default())
  }

  fn process_with(
    clock: &FakeClock,
    store: &Arc<StoreSlot>,
    log: &Arc<CapturedLog>,
    quota: Quota,
    policy: WindowPolicy,
  ) -> Arc<Inner> {
    let config = PoolConfig {
      policy,
      ..PoolConfig::of(vec!["key-a".into(), "key-b".into(), "key-c".into()], quota)
    };
    let pool = Arc::new(
      KeyPool::new(
        config,
        Arc::new(clock.clone()),
        Arc::new(CapturedLog::default()),
      )
      .unwrap(),
    );
    let wake = pool.share_quota();
    Arc::new(Inner {
      pool,
      log: log.clone(),
      reached: AtomicBool::new(true),
      store: store.clone(),
      holder: mongodb::bson::oid::ObjectId::new().to_hex(),
      wake,
      closing: AtomicBool::new(false),
      peers: AtomicUsize::new(1),
    })
  }

  /// Four processes hand out keys greedily, a leasing round between turns, for three minutes
  /// (ten ms a turn): no rolling minute of any key holds more than its 30 in total, and most of
  /// it is used.
  #[tokio::test]
  async fn four_processes_never_hand_out_more_than_the_limit_in_total() {
    let clock = FakeClock::at(T0);
    let store = Arc::new(StoreSlot::new(Some(Arc::new(
      Store::Memory(Box::default()),
    ))));
    let processes: Vec<_> = (0..4).map(|_| process(&clock, &store)).collect();
    let mut per_minute = [0u64; 3];
    let mut per_process = [0u64; 4];
    let mut handed = vec![Vec::new(); 3];
    for _ in 0..18_000 {
      for (p, inner) in processes.iter().enumerate() {
        round(inner).await;
        while let Ok(picked) = inner.pool.best(RESERVE, 0) {
          let now = crate::core::clock::Clock::now_ms(&clock);
          handed[picked.pick.index].push(now);
          let minute = ((now - T0) / 60_000) as usize;
          per_minute[minute] += 1;
          per_process[p] += 1;
          inner
            .pool
            .record_usage(picked.pick.index, 1, Outcome::Success, 1.0, None)
            .unwrap();
        }
      }
      clock.advance(10);
    }
    assert_eq!(processes[0].peers.load(Ordering::Relaxed), 4);
    for served in per_minute {
      assert!((80..=90).contains(&served), "{per_minute:?}");
    }
    assert!(per_process.iter().all(|&n| n > 0), "{per_process:?}");
    // Not only fixed minutes: no rolling minute, wherever it starts, holds more than a key's 30.
    for times in &handed {
      for (i, &start) in times.iter().enumerate() {
        let within = times[i..]
          .iter()
          .take_while(|&&t| t < start + 60_000)
          .count();
        assert!(
          within <= 30,
          "{within} hand-outs in the minute from {start}"
        );
      }
    }
  }

  /// One busy process and three that serve nothing: after the first minute the idle ones hold one
  /// of each window's budget per key, and the busy one gets the rest.
  #[tokio::test]
  async fn idle_processes_leave_the_budget_to_a_busy_one() {
    let clock = FakeClock::at(T0);
    let store = Arc::new(StoreSlot::new(Some(Arc::new(
      Store::Memory(Box::default()),
    ))));
    let processes: Vec<_> = (0..4).map(|_| process(&clock, &store)).collect();
    let mut per_minute = [0u64; 3];
    for _ in 0..18_000 {
      for inner in &processes {
        round(inner).await;
      }
      while let Ok(picked) = processes[0].pool.best(RESERVE, 0) {
        per_minute[((crate::core::clock::Clock::now_ms(&clock) - T0) / 60_000) as usize] += 1;
        processes[0]
          .pool
          .record_usage(picked.pick.index, 1, Outcome::Success, 1.0, None)
          .unwrap();
      }
      clock.advance(10);
    }
    // The first minute, everyone starts with a full grant; from the second on, the idle ones
    // lease one a key.
    assert!(per_minute[0] >= 24, "{per_minute:?}");
    for served in &per_minute[1..] {
      assert!((81..=90).contains(served), "{per_minute:?}");
    }
  }

  #[tokio::test]
  async fn without_a_store_each_process_serves_its_share_of_the_peers_last_seen() {
    let clock = FakeClock::at(T0);
    let slot = Arc::new(StoreSlot::new(None));
    let log = Arc::new(CapturedLog::default());
    let inner = process_logging(&clock, &slot, &log);
    inner.peers.store(3, Ordering::Relaxed);
    round(&inner).await;
    let mut served = 0;
    while inner.pool.best(RESERVE, 0).is_ok() {
      served += 1;
    }
    assert_eq!(served, 3 * 10);
    // Said once, and once more when the store answers again.
    clock.advance(60_000);
    round(&inner).await;
    *slot.lock() = Some(Arc::new(Store::Memory(Box::default())));
    // Local shares last their window: the store is asked again for the next one.
    clock.advance(60_000);
    round(&inner).await;
    let lines = log.0.lock().clone();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("1/3 of each limit"), "{lines:?}");
    assert_eq!(lines[1], RECONNECTED_LINE);
  }

  /// One process, three keys at RPM 100,000 over 2 s spans (500 ms slices), a leasing round every
  /// 10 ms (the round trip of a store that answers at once, as wake-ups come): quiet for 2 s (a
  /// selection every 100 ms), then a burst (50 every 10 ms), the store away for 3 s of it, then
  /// back. The limit always has room: no selection fails.
  #[tokio::test]
  async fn no_selection_fails_while_the_limit_has_room_at_a_burst_or_with_the_store_away() {
    let clock = FakeClock::at(T0 + 123);
    let memory = Arc::new(Store::Memory(Box::default()));
    let slot = Arc::new(StoreSlot::new(Some(memory.clone())));
    let quota = Quota {
      rpm: 100_000,
      rpd: 10_000_000,
      tpm: 1_000_000_000,
    };
    let policy = WindowPolicy {
      span_ms: 2_000,
      ..WindowPolicy::default()
    };
    let log = Arc::new(CapturedLog::default());
    let inner = process_with(&clock, &slot, &log, quota, policy);
    round(&inner).await;
    let mut failed = Vec::new();
    let mut served = 0;
    for t in (0..10_000).step_by(10) {
      match t {
        5_000 => *slot.lock() = None,
        8_000 => *slot.lock() = Some(memory.clone()),
        _ => {}
      }
      round(&inner).await;
      let selections = match t {
        0..2_000 => usize::from(t % 100 == 0),
        _ => 50,
      };
      for _ in 0..selections {
        match inner.pool.best(RESERVE, 0) {
          Ok(picked) => {
            served += 1;
            inner
              .pool
              .record_usage(picked.pick.index, 1, Outcome::Success, 1.0, None)
              .unwrap();
          }
          Err(_) => failed.push(t),
        }
      }
      clock.advance(10);
    }
    assert_eq!(
      failed,
      Vec::<i64>::new(),
      "failed selections, ms from the start"
    );
    assert_eq!(served, 20 + 800 * 50);
    // It said it served a local share, and that it leases again.
    let lines = log.0.lock().clone();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1], RECONNECTED_LINE);
  }
}
