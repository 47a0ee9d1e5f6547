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
use crate::store::{unique_name, LeaseSlot, SliceSlot, Store, StoreError};

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

impl Inner {
  /// The task's state for `pool`, which shares its quota from now on and wakes the task when a
  /// lease runs low.
  fn sharing(pool: Arc<KeyPool>, store: Arc<StoreSlot>, log: Arc<dyn Log>) -> Arc<Self> {
    pool.share_quota();
    let wake = Arc::new(Notify::new());
    let task_wake = wake.clone();
    pool.set_lease_wake(Arc::new(move || task_wake.notify_one()));
    Arc::new(Self {
      pool,
      log,
      reached: AtomicBool::new(true),
      store,
      holder: unique_name(),
      wake,
      closing: AtomicBool::new(false),
      peers: AtomicUsize::new(1),
    })
  }
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
    let inner = Inner::sharing(pool, store, log);
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
        let slot = lease_slot(api_key, window, &occurrence);
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
  let slot = lease_slot(api_key, window, &occurrence);
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

/// The store's slot for one occurrence of a fixed window.
fn lease_slot<'a>(
  api_key: &'a str,
  window: SharedWindow,
  occurrence: &Occurrence,
) -> LeaseSlot<'a> {
  LeaseSlot {
    api_key,
    window: window.as_str(),
    window_id: occurrence.id,
    window_end: occurrence.end,
  }
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
mod tests;
