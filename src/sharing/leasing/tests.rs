use super::*;
use crate::core::clock::FakeClock;
use crate::core::config::PoolConfig;
use crate::core::pool::testing::TestPool;
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
  let pool = TestPool::on_clock(config, clock.clone()).shared();
  Inner::sharing(pool, store.clone(), log.clone())
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
