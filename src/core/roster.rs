//! The keys a pool knows, by position. Positions are handed to JS and to every other layer, so
//! they never change and are never reused: a key added at run time gets the next position, and a
//! removed key keeps its own (the pool marks it removed), so a position read before a change still
//! names the same key after it.
//!
//! Copy-on-write: a reader takes a snapshot ([`Names`], one atomic increment) and reads it without
//! a lock; adding a key copies the table, which only operators' calls do.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// What stored documents call a key (see the store's key naming): set by the persistence layer,
/// so that URLs and stored documents can name a key by it.
pub type Namer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// One snapshot of the roster.
#[derive(Default)]
pub struct Names {
  keys: Vec<String>,
  position: HashMap<String, usize>,
  /// Each key's stored name, by position, once a namer is set; empty before.
  stored: Vec<String>,
  stored_position: HashMap<String, usize>,
}

impl Names {
  pub fn len(&self) -> usize {
    self.keys.len()
  }

  pub fn is_empty(&self) -> bool {
    self.keys.is_empty()
  }

  /// Every key ever known, in position order.
  pub fn keys(&self) -> &[String] {
    &self.keys
  }

  pub fn get(&self, index: usize) -> Option<&str> {
    self.keys.get(index).map(String::as_str)
  }

  pub fn position(&self, key: &str) -> Option<usize> {
    self.position.get(key).copied()
  }

  /// The stored name of the key at `index`, once the pool's keys are stored under names.
  pub fn stored(&self, index: usize) -> Option<&str> {
    self.stored.get(index).map(String::as_str)
  }

  /// The position of the key stored documents call `stored`.
  pub fn position_of_stored(&self, stored: &str) -> Option<usize> {
    self.stored_position.get(stored).copied()
  }

  /// The position of the key `name` means: the key itself, or its stored name.
  pub fn resolve(&self, name: &str) -> Option<usize> {
    self
      .position(name)
      .or_else(|| self.position_of_stored(name))
  }

  fn push(&mut self, key: String, namer: Option<&Namer>) -> usize {
    let index = self.keys.len();
    if let Some(namer) = namer {
      let stored = namer(&key);
      self.stored_position.insert(stored.clone(), index);
      self.stored.push(stored);
    }
    self.position.insert(key.clone(), index);
    self.keys.push(key);
    index
  }
}

#[derive(Default)]
pub struct Roster {
  names: RwLock<Arc<Names>>,
  namer: RwLock<Option<Namer>>,
}

impl Roster {
  pub fn new(keys: Vec<String>) -> Self {
    let mut names = Names::default();
    for key in keys {
      names.push(key, None);
    }
    Self {
      names: RwLock::new(Arc::new(names)),
      namer: RwLock::new(None),
    }
  }

  /// The current snapshot.
  pub fn names(&self) -> Arc<Names> {
    self.names.read().clone()
  }

  /// Adds `key` at the next position, unless it is known: returns its position, and whether it
  /// is new.
  pub fn add(&self, key: &str) -> (usize, bool) {
    let namer = self.namer.read().clone();
    let mut names = self.names.write();
    if let Some(index) = names.position(key) {
      return (index, false);
    }
    let mut next = Names {
      keys: names.keys.clone(),
      position: names.position.clone(),
      stored: names.stored.clone(),
      stored_position: names.stored_position.clone(),
    };
    let index = next.push(key.to_owned(), namer.as_ref());
    *names = Arc::new(next);
    (index, true)
  }

  /// Names every key, present and future, by `namer`.
  pub fn set_namer(&self, namer: Namer) {
    let mut names = self.names.write();
    let mut next = Names::default();
    for key in &names.keys {
      next.push(key.clone(), Some(&namer));
    }
    *names = Arc::new(next);
    *self.namer.write() = Some(namer);
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn positions_never_move_and_snapshots_stay_as_they_were() {
    let roster = Roster::new(vec!["a-key".into(), "b-key".into()]);
    let before = roster.names();
    assert_eq!(roster.add("c-key"), (2, true));
    assert_eq!(roster.add("a-key"), (0, false));
    let after = roster.names();
    assert_eq!(before.len(), 2);
    assert_eq!(after.keys(), ["a-key", "b-key", "c-key"]);
    assert_eq!(after.position("c-key"), Some(2));
    assert_eq!(after.get(1), Some("b-key"));
    assert_eq!(after.get(3), None);
  }

  #[test]
  fn stored_names_follow_the_namer_for_keys_added_before_and_after() {
    let roster = Roster::new(vec!["a-key".into()]);
    assert_eq!(roster.names().stored(0), None);
    roster.set_namer(Arc::new(|k: &str| format!("n_{k}")));
    roster.add("b-key");
    let names = roster.names();
    assert_eq!(names.stored(0), Some("n_a-key"));
    assert_eq!(names.stored(1), Some("n_b-key"));
    assert_eq!(names.position_of_stored("n_b-key"), Some(1));
    assert_eq!(names.resolve("n_a-key"), Some(0));
    assert_eq!(names.resolve("b-key"), Some(1));
    assert_eq!(names.resolve("n_c-key"), None);
  }
}
