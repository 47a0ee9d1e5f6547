//! The open connections of one server, bounded: a flood of idle or slow connections must not lock
//! out the clients that send requests. At the cap a new connection takes the place of the oldest
//! one that has not sent a whole request head yet (a slow client cannot tell being cut off from
//! its own slowness); when every open connection has been served, the new one is refused at once.
//! Memory the connections held is handed back to the system once a flood is over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::{AbortHandle, Id};

/// Connections open at once by default: far more than operators and proxied clients need, far
/// fewer than the descriptors a process usually has.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// Past this many connections open at once, memory is handed back once they are gone again.
const FLOOD: usize = 256;

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

  /// Makes room for one more connection if it can: at the cap, the oldest connection that has not
  /// been served is cut off.
  pub fn admit(&mut self) -> Admit {
    if self.open.len() < self.max {
      return Admit::Serve;
    }
    let idle = self
      .open
      .iter()
      .find(|(_, c)| !c.served.load(Ordering::Relaxed))
      .map(|(&age, _)| age);
    match idle.and_then(|age| self.open.remove(&age)) {
      Some(cut) => {
        cut.abort.abort();
        Admit::Serve
      }
      None => Admit::Refuse,
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
}
