//! How keys are named in stored documents: by a keyed fingerprint (the default), or in plaintext as
//! the old service stored them. The pool always works with the keys themselves; the store turns
//! them into stored names on the way out and back on the way in.

use std::collections::HashMap;

use thiserror::Error;

use crate::fingerprint::{is_fingerprint, FingerprintError, Fingerprinter, MIN_SECRET_BYTES};

/// The secret keys are fingerprinted under.
pub const SECRET_ENV: &str = "KEY_MANAGER_FINGERPRINT_SECRET";
/// Set to `true` (or `1`) to store keys in plaintext, as the old service did.
pub const PLAINTEXT_ENV: &str = "KEY_MANAGER_STORE_PLAINTEXT_KEYS";

/// Why keys cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyStorageError {
  #[error(
    "keys are stored in MongoDB as keyed fingerprints, and no secret is set: set {SECRET_ENV} (at \
     least {MIN_SECRET_BYTES} bytes), or storePlaintextKeys: true ({PLAINTEXT_ENV}=true) to store \
     keys in plaintext as the old service did"
  )]
  NoSecret,
  #[error("{SECRET_ENV}: {0}")]
  BadSecret(#[from] FingerprintError),
}

/// What the `apiKey` field of stored documents holds.
#[derive(Debug, Clone)]
pub enum KeyStorage {
  /// The key itself, as the old service stored it: only when asked for, for compatibility.
  Plaintext,
  /// The key's fingerprint (see [`crate::fingerprint`]); documents holding a key in plaintext are
  /// migrated when loaded.
  Fingerprint(Fingerprinter),
}

impl KeyStorage {
  /// Plaintext when asked for (the option, else `KEY_MANAGER_STORE_PLAINTEXT_KEYS`); otherwise
  /// fingerprints under the secret (the option, else `KEY_MANAGER_FINGERPRINT_SECRET`). Without
  /// either there is no safe choice: an error, and the caller keeps keys out of the database.
  pub fn resolve(
    secret: Option<String>,
    plaintext: Option<bool>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, KeyStorageError> {
    let plaintext = plaintext.unwrap_or_else(|| {
      env(PLAINTEXT_ENV)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    });
    if plaintext {
      return Ok(KeyStorage::Plaintext);
    }
    let secret = secret
      .or_else(|| env(SECRET_ENV))
      .filter(|s| !s.is_empty())
      .ok_or(KeyStorageError::NoSecret)?;
    Ok(KeyStorage::Fingerprint(Fingerprinter::new(
      secret.as_bytes(),
    )?))
  }
}

/// The configured keys' stored names, both ways.
#[derive(Debug, Clone)]
pub struct KeyNaming {
  storage: KeyStorage,
  /// The keys by position.
  keys: Vec<String>,
  /// What documents store for each key, to its position.
  position: HashMap<String, usize>,
}

impl KeyNaming {
  /// Names for the pool's `keys` (in pool order: positions are the pool's).
  pub fn new(storage: KeyStorage, keys: &[String]) -> Self {
    let position = keys
      .iter()
      .enumerate()
      .map(|(i, k)| (stored_name(&storage, k), i))
      .collect();
    Self {
      storage,
      keys: keys.to_vec(),
      position,
    }
  }

  /// Plaintext names and no configured keys: documents are written and read as they are.
  pub fn plaintext() -> Self {
    Self::new(KeyStorage::Plaintext, &[])
  }

  pub fn storage(&self) -> &KeyStorage {
    &self.storage
  }

  /// What a document stores for `key`.
  pub fn stored(&self, key: &str) -> String {
    stored_name(&self.storage, key)
  }

  /// The configured keys, by position.
  pub fn keys(&self) -> &[String] {
    &self.keys
  }

  /// The position of the configured key a document's `apiKey` names.
  pub fn position(&self, stored: &str) -> Option<usize> {
    self.position.get(stored).copied()
  }

  /// Whether a document naming its key `stored` holds the key in plaintext and must be rewritten.
  pub fn needs_migration(&self, stored: &str) -> bool {
    matches!(self.storage, KeyStorage::Fingerprint(_)) && !is_fingerprint(stored)
  }
}

fn stored_name(storage: &KeyStorage, key: &str) -> String {
  match storage {
    KeyStorage::Plaintext => key.to_owned(),
    KeyStorage::Fingerprint(f) => f.fingerprint(key),
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn storage_is_plaintext_only_when_asked_and_never_without_a_secret() {
    let none = |_: &str| None;
    assert_eq!(
      KeyStorage::resolve(None, None, &none).unwrap_err(),
      KeyStorageError::NoSecret
    );
    assert!(matches!(
      KeyStorage::resolve(None, Some(true), &none),
      Ok(KeyStorage::Plaintext)
    ));
    let env = |name: &str| match name {
      PLAINTEXT_ENV => Some("TRUE".to_owned()),
      SECRET_ENV => Some("an env secret of 16+ bytes".to_owned()),
      _ => None,
    };
    assert!(matches!(
      KeyStorage::resolve(None, None, &env),
      Ok(KeyStorage::Plaintext)
    ));
    assert!(matches!(
      KeyStorage::resolve(None, Some(false), &env),
      Ok(KeyStorage::Fingerprint(_))
    ));
    assert!(matches!(
      KeyStorage::resolve(Some("short".into()), Some(false), &env),
      Err(KeyStorageError::BadSecret(_))
    ));
    let message = KeyStorageError::NoSecret.to_string();
    assert!(message.contains(SECRET_ENV) && message.contains("storePlaintextKeys"));
  }

  #[test]
  fn fingerprint_names_map_back_to_positions_and_plaintext_ones_need_migration() {
    let keys = vec![
      "AIzaSyKEY-ONE-0000000000".to_owned(),
      "AIzaSyKEY-TWO-0000000000".to_owned(),
    ];
    let f = Fingerprinter::new(b"a secret of 16 bytes").unwrap();
    let naming = KeyNaming::new(KeyStorage::Fingerprint(f.clone()), &keys);
    let stored = naming.stored(&keys[1]);
    assert_eq!(stored, f.fingerprint(&keys[1]));
    assert_eq!(naming.position(&stored), Some(1));
    assert_eq!(naming.position(&keys[1]), None);
    assert!(naming.needs_migration(&keys[1]));
    assert!(!naming.needs_migration(&stored));

    let plain = KeyNaming::new(KeyStorage::Plaintext, &keys);
    assert_eq!(plain.stored(&keys[0]), keys[0]);
    assert_eq!(plain.position(&keys[0]), Some(0));
    assert!(!plain.needs_migration(&keys[0]));
  }
}
