//! How a URL names a key: its full text, or a form derived from it that does not reveal it.

use thiserror::Error;

use crate::core::key::Admission;
use crate::core::pool::KeyPool;
use crate::mask::mask_key;

/// Why a key reference names no single key. Messages never quote the reference: it may be a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum KeyRefError {
  #[error("API key not found")]
  NotFound,
  /// A derived form that several keys share (two keys with the same first 8 and last 4).
  #[error("Ambiguous API key")]
  Ambiguous { matches: usize },
}

/// The position of the key `text` names, among the keys in the pool (removed ones are not): its
/// full text, or a form derived from it that exactly one key has: its masked form, or its stored
/// name when keys are stored under names (a digest or fingerprint).
pub fn resolve_key_ref(pool: &KeyPool, text: &str) -> Result<usize, KeyRefError> {
  let names = pool.names();
  let live = |index: usize| {
    pool
      .figures(index)
      .is_ok_and(|f| f.admission != Admission::Removed)
  };
  if let Some(index) = names.resolve(text).filter(|&i| live(i)) {
    return Ok(index);
  }
  let mut hits = names
    .keys()
    .iter()
    .enumerate()
    .filter(|&(index, key)| mask_key(key) == text && live(index))
    .map(|(index, _)| index);
  match (hits.next(), hits.count()) {
    (Some(index), 0) => Ok(index),
    (Some(_), more) => Err(KeyRefError::Ambiguous { matches: more + 1 }),
    (None, _) => Err(KeyRefError::NotFound),
  }
}

#[cfg(test)]
mod tests {
  use std::sync::Arc;

  use super::*;
  use crate::core::clock::FakeClock;
  use crate::core::config::PoolConfig;
  use crate::core::quota::Quota;
  use crate::log::SilentLog;

  fn pool_of(keys: &[&str]) -> KeyPool {
    let config = PoolConfig::of(
      keys.iter().map(|k| k.to_string()).collect(),
      Quota::default(),
    );
    KeyPool::new(config, Arc::new(FakeClock::at(0)), Arc::new(SilentLog)).unwrap()
  }

  #[test]
  fn fingerprints_name_a_key_once_keys_have_them() {
    let keys = [
      "AIzaSyREF-one-0000000000000000000000001",
      "AIzaSyFER-two-0000000000000000000000002",
    ];
    let p = pool_of(&keys);
    let f = crate::store::fingerprint::Fingerprinter::new(b"a secret of sixteen+ bytes").unwrap();
    let print = f.fingerprint(keys[1]);
    assert_eq!(resolve_key_ref(&p, &print), Err(KeyRefError::NotFound));
    let namer = f.clone();
    p.set_namer(Arc::new(move |k: &str| namer.fingerprint(k)));
    assert_eq!(resolve_key_ref(&p, &print), Ok(1));
    assert_eq!(
      resolve_key_ref(&p, &f.fingerprint("AIzaSyOTHER")),
      Err(KeyRefError::NotFound)
    );
  }

  #[test]
  fn full_and_masked_forms_name_a_key() {
    let keys = [
      "AIzaSyREF-one-0000000000000000000000001",
      "AIzaSyFER-two-0000000000000000000000002",
    ];
    let p = pool_of(&keys);
    assert_eq!(resolve_key_ref(&p, keys[1]), Ok(1));
    assert_eq!(resolve_key_ref(&p, "AIzaSyRE...0001"), Ok(0));
    assert_eq!(resolve_key_ref(&p, "AIzaSyFE...0002"), Ok(1));
    assert_eq!(
      resolve_key_ref(&p, "AIzaSyRE...0002"),
      Err(KeyRefError::NotFound)
    );
    assert_eq!(resolve_key_ref(&p, ""), Err(KeyRefError::NotFound));
  }

  #[test]
  fn a_mask_two_keys_share_is_ambiguous_but_their_full_keys_are_not() {
    let twins = [
      "AIzaSyTWIN-first-key-0000000000000000000",
      "AIzaSyTWIN-other-key-0000000000000000000",
      "AIzaSyTWIN-third-key-0000000000000000000",
    ];
    let p = pool_of(&twins);
    assert_eq!(
      resolve_key_ref(&p, "AIzaSyTW...0000"),
      Err(KeyRefError::Ambiguous { matches: 3 })
    );
    assert_eq!(resolve_key_ref(&p, twins[2]), Ok(2));
  }
}
