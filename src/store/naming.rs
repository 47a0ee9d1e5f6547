//! How keys are named in stored documents: by their SHA-256 digest (the default), by a keyed
//! fingerprint when a secret is set, or in plaintext as the old service stored them when asked.
//! The pool always works with the keys themselves; the store turns them into stored names on the
//! way out, and the pool maps stored names back to its keys (see `roster`).

use thiserror::Error;

use super::admissions::StoredAdmission;
use super::error::StoreError;
use super::sealing::Sealer;
use crate::core::config::env_flag;
use crate::core::snapshot::{AdmissionRecord, UsageRecord};
use crate::mask::mask_key;
use crate::store::fingerprint::{
  digest_name, is_digest_name, is_fingerprint, FingerprintError, Fingerprinter,
};

/// The secret keys are fingerprinted, and keys added at run time sealed, under.
pub const SECRET_ENV: &str = "KEY_MANAGER_FINGERPRINT_SECRET";
/// Set to `true` (or `1`) to store keys in plaintext, as the old service did.
pub const PLAINTEXT_ENV: &str = "KEY_MANAGER_STORE_PLAINTEXT_KEYS";

/// Why keys cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyStorageError {
  #[error("{SECRET_ENV}: {0}")]
  BadSecret(#[from] FingerprintError),
}

/// What the `apiKey` field of stored documents holds.
#[derive(Debug, Clone)]
pub enum KeyStorage {
  /// The key itself, as the old service stored it: only when asked for, for compatibility.
  Plaintext,
  /// The key's SHA-256 digest (see [`digest_name`]): the default, needing no secret.
  Digest,
  /// The key's fingerprint under a secret (see [`crate::store::fingerprint`]).
  Fingerprint(Fingerprinter),
}

impl KeyStorage {
  /// Plaintext when asked for (the option, else `KEY_MANAGER_STORE_PLAINTEXT_KEYS`); otherwise
  /// fingerprints under the secret (the option, else `KEY_MANAGER_FINGERPRINT_SECRET`) when there
  /// is one, digests when there is none.
  pub fn resolve(
    secret: Option<String>,
    plaintext: Option<bool>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, KeyStorageError> {
    // A value that is no boolean leaves the default: keys stay unreadable in the store.
    let plaintext =
      plaintext.unwrap_or_else(|| env_flag(PLAINTEXT_ENV, env).ok().flatten().unwrap_or(false));
    if plaintext {
      return Ok(KeyStorage::Plaintext);
    }
    match secret.or_else(|| env(SECRET_ENV)).filter(|s| !s.is_empty()) {
      Some(secret) => Ok(KeyStorage::Fingerprint(Fingerprinter::new(
        secret.as_bytes(),
      )?)),
      None => Ok(KeyStorage::Digest),
    }
  }
}

/// How stored documents name keys, and how keys added at run time are sealed.
#[derive(Debug)]
pub struct KeyNaming {
  storage: KeyStorage,
  /// Present only under a secret: without one a key cannot be kept unreadable. Boxed: it is large
  /// and most namings have none.
  sealer: Option<Box<Sealer>>,
}

impl KeyNaming {
  pub fn new(storage: KeyStorage) -> Self {
    let sealer = match &storage {
      KeyStorage::Fingerprint(f) => Some(Box::new(Sealer::new(f))),
      KeyStorage::Plaintext | KeyStorage::Digest => None,
    };
    Self { storage, sealer }
  }

  /// Plaintext names: documents are written and read as they are.
  pub fn plaintext() -> Self {
    Self::new(KeyStorage::Plaintext)
  }

  /// What a document stores for `key`.
  pub fn stored(&self, key: &str) -> String {
    match &self.storage {
      KeyStorage::Plaintext => key.to_owned(),
      KeyStorage::Digest => digest_name(key),
      KeyStorage::Fingerprint(f) => f.fingerprint(key),
    }
  }

  /// The key a document named `stored` holds under another naming, when that document must be
  /// rewritten under this one: a key stored in plaintext (any name of neither hashed form), or
  /// the digest of one of `keys` once a secret is set. A fingerprint cannot be turned into its
  /// key, and a digest only into a key one knows: such documents stay as they are.
  pub fn migration_source(&self, stored: &str, keys: &[String]) -> Option<String> {
    let plaintext = !is_fingerprint(stored) && !is_digest_name(stored);
    match &self.storage {
      KeyStorage::Plaintext => None,
      _ if plaintext => Some(stored.to_owned()),
      KeyStorage::Digest => None,
      KeyStorage::Fingerprint(_) => keys
        .iter()
        .find(|k| is_digest_name(stored) && digest_name(k) == stored)
        .cloned(),
    }
  }

  pub fn storage(&self) -> &KeyStorage {
    &self.storage
  }

  /// `api_key` sealed for the document named `stored`, or `None` when there is no secret to seal
  /// it under.
  pub fn seal(&self, api_key: &str, stored: &str) -> Option<String> {
    self.sealer.as_ref()?.seal(api_key, stored)
  }

  /// The key a document named `stored` stands for, from the name itself (plaintext) or from its
  /// sealed copy, if it opens under this secret.
  pub fn recover(&self, stored: &str, sealed: Option<&str>) -> Option<String> {
    match &self.storage {
      KeyStorage::Plaintext => Some(stored.to_owned()),
      _ => self.sealer.as_ref()?.open(sealed?, stored),
    }
  }

  /// A decision as documents hold it: the key by its stored name, sealed when it was added at run
  /// time (and is not stored in plaintext anyway). A key added at run time that cannot be sealed
  /// (no secret) is an error: it would be lost to every other process.
  pub fn stored_admission(&self, r: &AdmissionRecord) -> Result<StoredAdmission, StoreError> {
    let stored = self.stored(&r.api_key);
    let sealed = match r.added && stored != r.api_key {
      true => Some(
        self
          .seal(&r.api_key, &stored)
          .ok_or(StoreError::CannotSeal)?,
      ),
      false => None,
    };
    Ok(StoredAdmission {
      stored,
      admission: r.admission,
      changed_at: r.changed_at,
      added: r.added,
      sealed,
      masked: mask_key(&r.api_key),
      project: r.project.clone(),
    })
  }

  /// A call as documents hold it: its key by its stored name.
  pub fn stored_usage(&self, u: &UsageRecord) -> UsageRecord {
    UsageRecord {
      api_key: self.stored(&u.api_key),
      ..u.clone()
    }
  }

  /// Whether a key added at run time can be stored so that other processes get it back: in
  /// plaintext when keys are stored so, else sealed, which needs a secret.
  pub fn keeps_added_keys(&self) -> bool {
    matches!(self.storage, KeyStorage::Plaintext) || self.sealer.is_some()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  const KEY: &str = "AIzaSyKEY-ONE-0000000000000000000000001";

  #[test]
  fn digests_by_default_fingerprints_under_a_secret_plaintext_when_asked() {
    let none = |_: &str| None;
    assert!(matches!(
      KeyStorage::resolve(None, None, &none),
      Ok(KeyStorage::Digest)
    ));
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
  }

  #[test]
  fn a_plaintext_switch_that_is_no_boolean_leaves_keys_unreadable() {
    for value in ["on", "2", " "] {
      let env = |name: &str| (name == PLAINTEXT_ENV).then(|| value.to_owned());
      assert!(
        matches!(
          KeyStorage::resolve(None, None, &env),
          Ok(KeyStorage::Digest)
        ),
        "{value:?}"
      );
    }
  }

  #[test]
  fn each_naming_says_which_documents_it_rewrites() {
    let keys = vec![KEY.to_owned()];
    let f = Fingerprinter::new(b"a secret of 16 bytes").unwrap();
    let keyed = KeyNaming::new(KeyStorage::Fingerprint(f.clone()));
    let digest = KeyNaming::new(KeyStorage::Digest);
    let plain = KeyNaming::plaintext();
    assert_eq!(keyed.stored(KEY), f.fingerprint(KEY));
    assert_eq!(digest.stored(KEY), digest_name(KEY));
    assert_eq!(plain.stored(KEY), KEY);
    // Plaintext documents move to either hashed naming.
    assert_eq!(keyed.migration_source(KEY, &[]).as_deref(), Some(KEY));
    assert_eq!(digest.migration_source(KEY, &[]).as_deref(), Some(KEY));
    // A secret set later takes over the digests of known keys; unknown digests stay.
    assert_eq!(
      keyed.migration_source(&digest_name(KEY), &keys).as_deref(),
      Some(KEY)
    );
    assert_eq!(keyed.migration_source(&digest_name("other"), &keys), None);
    // Fingerprints cannot be reversed, and nothing is rewritten in plaintext mode.
    assert_eq!(digest.migration_source(&f.fingerprint(KEY), &keys), None);
    assert_eq!(keyed.migration_source(&keyed.stored(KEY), &keys), None);
    assert_eq!(plain.migration_source(&digest_name(KEY), &keys), None);
  }

  #[test]
  fn added_keys_are_kept_sealed_under_a_secret_or_in_plaintext_mode() {
    let keyed = KeyNaming::new(KeyStorage::Fingerprint(
      Fingerprinter::new(b"a secret of 16 bytes").unwrap(),
    ));
    let sealed = keyed.seal(KEY, "fp_x").unwrap();
    assert_eq!(keyed.recover("fp_x", Some(&sealed)).as_deref(), Some(KEY));
    assert_eq!(keyed.recover("fp_y", Some(&sealed)), None);
    assert!(keyed.keeps_added_keys());
    let digest = KeyNaming::new(KeyStorage::Digest);
    assert!(!digest.keeps_added_keys());
    assert_eq!(digest.seal(KEY, "sha256_x"), None);
    assert_eq!(digest.recover("fp_x", Some(&sealed)), None);
    let plain = KeyNaming::plaintext();
    assert!(plain.keeps_added_keys());
    assert_eq!(plain.recover(KEY, None).as_deref(), Some(KEY));
  }
}
