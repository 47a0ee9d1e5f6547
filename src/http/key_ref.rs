//! How a URL names a key: its full text, or a form derived from it that does not reveal it.

use thiserror::Error;

use super::state::ApiState;
use crate::core::key::Admission;
use crate::mask::mask_key;
use crate::store::fingerprint::{is_digest_name, is_fingerprint};
use crate::store::KeyNaming;

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
/// name once a store is attached that stores keys under names (a digest or fingerprint).
pub fn resolve_key_ref(state: &ApiState, text: &str) -> Result<usize, KeyRefError> {
  let pool = state.pool();
  let names = pool.names();
  let live = |index: usize| {
    pool
      .figures(index)
      .is_ok_and(|f| f.admission != Admission::Removed)
  };
  let named = names.position(text).or_else(|| {
    state
      .naming()
      .and_then(|naming| stored_under(naming, names.keys(), text))
  });
  if let Some(index) = named.filter(|&i| live(i)) {
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

/// The position of the key among `keys` that `naming` stores as `text`. Only a digest or a
/// fingerprint names a key other than itself, so no other text costs a hash per key.
fn stored_under(naming: &KeyNaming, keys: &[String], text: &str) -> Option<usize> {
  if !is_digest_name(text) && !is_fingerprint(text) {
    return None;
  }
  keys.iter().position(|key| naming.stored(key) == text)
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::pool::testing::TestPool;
  use crate::core::quota::Quota;
  use crate::store::fingerprint::{digest_name, Fingerprinter};
  use crate::store::KeyStorage;

  const KEYS: [&str; 2] = [
    "AIzaSyREF-one-0000000000000000000000001",
    "AIzaSyFER-two-0000000000000000000000002",
  ];

  fn state_of(keys: &[&str]) -> ApiState {
    ApiState::new(TestPool::new(keys, Quota::default()).shared())
  }

  #[test]
  fn stored_names_name_a_key_once_a_store_names_keys_so() {
    let state = state_of(&KEYS);
    let f = Fingerprinter::new(b"a secret of sixteen+ bytes").unwrap();
    let print = f.fingerprint(KEYS[1]);
    assert_eq!(resolve_key_ref(&state, &print), Err(KeyRefError::NotFound));
    state.name_keys(KeyNaming::new(KeyStorage::Fingerprint(f.clone())));
    assert_eq!(resolve_key_ref(&state, &print), Ok(1));
    assert_eq!(
      resolve_key_ref(&state, &f.fingerprint("AIzaSyOTHER")),
      Err(KeyRefError::NotFound)
    );
    // Names of another naming are not this store's.
    assert_eq!(
      resolve_key_ref(&state, &digest_name(KEYS[0])),
      Err(KeyRefError::NotFound)
    );
  }

  #[test]
  fn full_and_masked_forms_name_a_key() {
    let state = state_of(&KEYS);
    assert_eq!(resolve_key_ref(&state, KEYS[1]), Ok(1));
    assert_eq!(resolve_key_ref(&state, "AIzaSyRE...0001"), Ok(0));
    assert_eq!(resolve_key_ref(&state, "AIzaSyFE...0002"), Ok(1));
    assert_eq!(
      resolve_key_ref(&state, "AIzaSyRE...0002"),
      Err(KeyRefError::NotFound)
    );
    assert_eq!(resolve_key_ref(&state, ""), Err(KeyRefError::NotFound));
  }

  #[test]
  fn a_mask_two_keys_share_is_ambiguous_but_their_full_keys_are_not() {
    let twins = [
      "AIzaSyTWIN-first-key-0000000000000000000",
      "AIzaSyTWIN-other-key-0000000000000000000",
      "AIzaSyTWIN-third-key-0000000000000000000",
    ];
    let state = state_of(&twins);
    assert_eq!(
      resolve_key_ref(&state, "AIzaSyTW...0000"),
      Err(KeyRefError::Ambiguous { matches: 3 })
    );
    assert_eq!(resolve_key_ref(&state, twins[2]), Ok(2));
  }

  #[test]
  fn a_removed_key_is_named_by_none_of_its_forms() {
    let state = state_of(&KEYS);
    state.name_keys(KeyNaming::new(KeyStorage::Digest));
    state.pool().admit(0, Admission::Removed).unwrap();
    for form in [
      KEYS[0].to_owned(),
      "AIzaSyRE...0001".to_owned(),
      digest_name(KEYS[0]),
    ] {
      assert_eq!(resolve_key_ref(&state, &form), Err(KeyRefError::NotFound));
    }
    assert_eq!(resolve_key_ref(&state, &digest_name(KEYS[1])), Ok(1));
  }
}
