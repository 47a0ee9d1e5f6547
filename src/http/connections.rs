//! The open connections of one server, bounded: a flood of idle or slow connections must not lock
//! out the clients that send requests. At the cap a new connection takes the place of the oldest
//! one that has not sent a whole request head yet (a slow client cannot tell being cut off from
//! its own slowness); when every open connection has been served, the new one is refused at once.
//! The cap stays under the process's descriptor limit, and a process out of descriptors anyway
//! (others hold them) cuts the oldest such connection too, so accepting never waits for a head
//! timeout. Memory the connections held is handed back to the system once a flood is over.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{AbortHandle, Id};

/// Connections open at once by default: far more than operators and proxied clients need, far
/// fewer than the descriptors a process usually has.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// Past this many connections open at once, memory is handed back once they are gone again.
const FLOOD: usize = 256;
/// Of the process's descriptors, the part connections leave to everything else (Node itself, the
/// database's connections, the app's files and sockets): a quarter, and at least this many.
const MIN_RESERVED_DESCRIPTORS: u64 = 64;
/// How often a failing `accept` is logged at most: a flood makes it fail many times a second.
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// The connection cap for a process that may open `limit` descriptors (`None`: not known):
/// `max`, or less, so that the cap, not the descriptor limit, decides which connection goes.
pub fn cap_for_descriptors(max: usize, limit: Option<u64>) -> usize {
  let Some(limit) = limit else {
    return max;
  };
  let room = limit.saturating_sub((limit / 4).max(MIN_RESERVED_DESCRIPTORS));
  max.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
}

/// How many descriptors this process may open (its soft limit), where that can be read.
pub fn descriptor_limit() -> Option<u64> {
  #[cfg(target_os = "linux")]
  {
    let mut limit = libc::rlimit {
      rlim_cur: 0,
      rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
  }
  #[cfg(not(target_os = "linux"))]
  {
    None
  }
}

/// Whether `accept` failed for want of descriptors, in the process (EMFILE) or the system
/// (ENFILE): numbered alike on Linux, macOS and the BSDs; WSAEMFILE on Windows.
pub fn out_of_descriptors(err: &io::Error) -> bool {
  match err.raw_os_error() {
    #[cfg(unix)]
    Some(23 | 24) => true,
    #[cfg(windows)]
    Some(10024) => true,
    _ => false,
  }
}

/// When to log a failing `accept`: the first time, then at most once per
/// [`ACCEPT_ERROR_LOG_EVERY`], saying how many went unlogged since.
#[derive(Debug, Default)]
pub struct AcceptErrors {
  logged_at: Option<Instant>,
  unlogged: u64,
}

impl AcceptErrors {
  /// Notes a failure at `now`. `Some(n)`: log it, with `n` failures unlogged since the last line.
  pub fn note(&mut self, now: Instant) -> Option<u64> {
    match self.logged_at {
      Some(at) if now.duration_since(at) < ACCEPT_ERROR_LOG_EVERY => {
        self.unlogged += 1;
        None
      }
      _ => {
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
      }
    }
  }
}

/// Whether a connection has sent a whole request head: then it is a client, not a flood.
pub type Served = Arc<AtomicBool>;

struct Open {
  served: Served,
  abort: AbortHandle,
}

/// What to do with a connection just accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
  /// Serve it.
  Serve,
  /// Close it at once: every open connection is a client's.
  Refuse,
}

/// The open connections, oldest first.
pub struct Registry {
  max: usize,
  /// By age: a counter, so the oldest is the first entry.
  open: BTreeMap<u64, Open>,
  by_task: HashMap<Id, u64>,
  next: u64,
  /// The most open at once since memory was last handed back.
  peak: usize,
}

impl Registry {
  pub fn new(max: usize) -> Self {
    Self {
      max: max.max(1),
      open: BTreeMap::new(),
      by_task: HashMap::new(),
      next: 0,
      peak: 0,
    }
  }

  pub fn len(&self) -> usize {
    self.open.len()
  }

  pub fn is_empty(&self) -> bool {
    self.open.is_empty()
  }

  /// The cap.
  pub fn max(&self) -> usize {
    self.max
  }

  /// Makes room for one more connection if it can: at the cap, the oldest connection that has not
  /// been served is cut off.
  pub fn admit(&mut self) -> Admit {
    if self.open.len() < self.max || self.cut_oldest_unserved() {
      Admit::Serve
    } else {
      Admit::Refuse
    }
  }

  /// Cuts off the oldest connection that has not sent a whole request head, if there is one: its
  /// descriptor is freed once its task is dropped. Returns whether there was one.
  pub fn cut_oldest_unserved(&mut self) -> bool {
    let idle = self
      .open
      .iter()
      .find(|(_, c)| !c.served.load(Ordering::Relaxed))
      .map(|(&age, _)| age);
    match idle.and_then(|age| self.open.remove(&age)) {
      Some(cut) => {
        cut.abort.abort();
        true
      }
      None => false,
    }
  }

  /// Notes a connection being served by the task `abort` controls.
  pub fn add(&mut self, abort: AbortHandle, served: Served) {
    let age = self.next;
    self.next += 1;
    self.by_task.insert(abort.id(), age);
    self.open.insert(age, Open { served, abort });
    self.peak = self.peak.max(self.open.len());
  }

  /// Forgets a connection whose task ended. Returns true when a flood just ended: the caller
  /// should hand memory back.
  pub fn finished(&mut self, task: Id) -> bool {
    if let Some(age) = self.by_task.remove(&task) {
      self.open.remove(&age);
    }
    let flood_over = self.peak >= FLOOD && self.open.len() <= self.peak / 8;
    if flood_over {
      self.peak = self.open.len();
    }
    flood_over
  }
}

/// Hands the memory freed by closed connections back to the system. The allocator keeps freed
/// pages for reuse otherwise, and after a flood that is most of the server's memory.
pub fn give_back_memory() {
  #[cfg(all(target_os = "linux", target_env = "gnu"))]
  // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
  unsafe {
    libc::malloc_trim(0);
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn served(yes: bool) -> Served {
    Arc::new(AtomicBool::new(yes))
  }

  #[tokio::test]
  async fn at_the_cap_the_oldest_unserved_connection_makes_room_and_clients_are_kept() {
    let mut r = Registry::new(3);
    let mut tasks = Vec::new();
    let flags = [served(true), served(false), served(false)];
    for flag in &flags {
      assert_eq!(r.admit(), Admit::Serve);
      let task = tokio::spawn(std::future::pending::<()>());
      r.add(task.abort_handle(), flag.clone());
      tasks.push(task);
    }
    // Full: the oldest unserved one (the second) goes, the served one stays.
    assert_eq!(r.admit(), Admit::Serve);
    assert_eq!(r.len(), 2);
    assert!(!tasks[0].is_finished());
    let cut = tasks.remove(1);
    assert!(cut.await.unwrap_err().is_cancelled());
    // Once every connection is a client's, a new one is refused.
    flags[2].store(true, Ordering::Relaxed);
    let task = tokio::spawn(std::future::pending::<()>());
    r.add(task.abort_handle(), served(true));
    assert_eq!(r.admit(), Admit::Refuse);
    assert_eq!(r.len(), 3);
    for t in tasks.iter().chain([&task]) {
      t.abort();
    }
  }

  #[tokio::test]
  async fn the_end_of_a_flood_is_noticed_once() {
    let mut r = Registry::new(10_000);
    let tasks: Vec<_> = (0..FLOOD)
      .map(|_| {
        let t = tokio::spawn(std::future::pending::<()>());
        r.add(t.abort_handle(), served(false));
        t
      })
      .collect();
    let ends: Vec<bool> = tasks.iter().map(|t| r.finished(t.id())).collect();
    assert_eq!(ends.iter().filter(|e| **e).count(), 1);
    assert!(r.is_empty());
    for t in tasks {
      t.abort();
    }
  }

  #[tokio::test]
  async fn out_of_descriptors_the_oldest_unserved_connection_goes_below_the_cap_too() {
    let mut r = Registry::new(100);
    let flags = [served(true), served(false)];
    let tasks: Vec<_> = flags
      .iter()
      .map(|flag| {
        let t = tokio::spawn(std::future::pending::<()>());
        r.add(t.abort_handle(), flag.clone());
        t
      })
      .collect();
    assert!(r.cut_oldest_unserved());
    assert_eq!(r.len(), 1);
    assert!(!r.cut_oldest_unserved(), "only a client is left");
    let mut tasks = tasks.into_iter();
    let client = tasks.next().unwrap();
    assert!(tasks.next().unwrap().await.unwrap_err().is_cancelled());
    client.abort();
  }

  #[test]
  fn the_cap_stays_under_the_descriptor_limit() {
    assert_eq!(cap_for_descriptors(4_096, None), 4_096);
    assert_eq!(cap_for_descriptors(4_096, Some(20_000)), 4_096);
    // A quarter of the limit is left to the rest of the process.
    assert_eq!(cap_for_descriptors(4_096, Some(1_024)), 768);
    assert_eq!(cap_for_descriptors(4_096, Some(4_096)), 3_072);
    // At least 64, and the cap is never 0.
    assert_eq!(cap_for_descriptors(4_096, Some(200)), 136);
    assert_eq!(cap_for_descriptors(4_096, Some(10)), 1);
    assert_eq!(cap_for_descriptors(100, Some(1_024)), 100);
    // This process's own limit can be read where it is used.
    if cfg!(target_os = "linux") {
      assert!(descriptor_limit().is_some_and(|n| n > 0));
    }
  }

  #[test]
  fn descriptor_errors_are_told_from_others() {
    assert!(out_of_descriptors(&io::Error::from_raw_os_error(24)));
    assert!(out_of_descriptors(&io::Error::from_raw_os_error(23)));
    assert!(!out_of_descriptors(&io::Error::from(
      io::ErrorKind::ConnectionAborted
    )));
  }

  #[test]
  fn a_failing_accept_is_logged_once_a_minute_with_the_count_since() {
    let mut errors = AcceptErrors::default();
    let t0 = Instant::now();
    assert_eq!(errors.note(t0), Some(0));
    // A flood: 97 more in the next ten seconds, none logged.
    for i in 1..=97 {
      assert_eq!(errors.note(t0 + Duration::from_millis(100 * i)), None);
    }
    assert_eq!(errors.note(t0 + ACCEPT_ERROR_LOG_EVERY), Some(97));
    assert_eq!(errors.note(t0 + ACCEPT_ERROR_LOG_EVERY * 3), Some(0));
  }
}
