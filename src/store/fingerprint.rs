//! What MongoDB stores instead of a key: by default its SHA-256 digest (a Gemini key holds about
//! 200 random bits, so its digest cannot be turned back into it), or, under a secret, its keyed
//! fingerprint (HMAC-SHA256), which also protects keys with few random bits and gives someone who
//! holds the database no way to test a guessed key against it.

use std::fmt::Write;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// What every fingerprint starts with: tells a fingerprint from a key stored in plaintext (Gemini
/// keys start with `AIza`), so old documents can be found and migrated.
pub const PREFIX: &str = "fp_";
/// Shortest secret accepted, in bytes: a short secret could be guessed and every key tested.
pub const MIN_SECRET_BYTES: usize = 16;
/// Bytes of the HMAC kept: 128 bits is far beyond any collision among a pool's keys.
const KEPT_BYTES: usize = 16;

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FingerprintError {
  #[error("the fingerprint secret must be at least {MIN_SECRET_BYTES} bytes (got {0})")]
  SecretTooShort(usize),
}

/// What every unkeyed digest name starts with.
pub const DIGEST_PREFIX: &str = "sha256_";

/// `prefix` and the first 128 bits of `bytes` in lowercase hex.
fn name(prefix: &str, bytes: &[u8]) -> String {
  let mut out = String::with_capacity(prefix.len() + 2 * KEPT_BYTES);
  out.push_str(prefix);
  for byte in &bytes[..KEPT_BYTES] {
    // Writing to a String cannot fail.
    let _ = write!(out, "{byte:02x}");
  }
  out
}

fn has_form(text: &str, prefix: &str) -> bool {
  text.strip_prefix(prefix).is_some_and(|hex| {
    hex.len() == 2 * KEPT_BYTES && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
  })
}

/// `sha256_` and the first 128 bits of SHA-256(key) in lowercase hex: 39 characters.
pub fn digest_name(key: &str) -> String {
  name(DIGEST_PREFIX, &Sha256::digest(key.as_bytes()))
}

/// Whether `text` has the form of a digest name.
pub fn is_digest_name(text: &str) -> bool {
  has_form(text, DIGEST_PREFIX)
}

/// HMAC-SHA256 of `message` under `secret`.
pub fn hmac_sha256(secret: &[u8], message: &[u8]) -> [u8; 32] {
  // HMAC takes keys of any length (longer ones are hashed first), so this cannot fail.
  let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
    .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
  mac.update(message);
  mac.finalize().into_bytes().into()
}

/// Computes the fingerprints of keys under one secret.
#[derive(Clone)]
pub struct Fingerprinter {
  secret: Vec<u8>,
}

impl std::fmt::Debug for Fingerprinter {
  /// Never prints the secret.
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.write_str("Fingerprinter { .. }")
  }
}

impl Fingerprinter {
  /// A fingerprinter under `secret`, which must be at least [`MIN_SECRET_BYTES`] long.
  pub fn new(secret: &[u8]) -> Result<Self, FingerprintError> {
    if secret.len() < MIN_SECRET_BYTES {
      return Err(FingerprintError::SecretTooShort(secret.len()));
    }
    Ok(Self {
      secret: secret.to_vec(),
    })
  }

  /// `fp_` and the first 128 bits of HMAC-SHA256(secret, key) in lowercase hex: 35 characters.
  pub fn fingerprint(&self, key: &str) -> String {
    name(PREFIX, &hmac_sha256(&self.secret, key.as_bytes()))
  }

  /// A 256-bit key for `purpose`, derived from the secret: one secret serves several uses, none of
  /// which can be computed from another's.
  pub fn derive(&self, purpose: &[u8]) -> [u8; 32] {
    hmac_sha256(&self.secret, purpose)
  }
}

/// Whether `text` has the form of a fingerprint (not whether it is one of a known key).
pub fn is_fingerprint(text: &str) -> bool {
  has_form(text, PREFIX)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
  }

  #[test]
  fn hmac_sha256_matches_rfc_4231() {
    // Test case 1.
    assert_eq!(
      hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
      "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
    // Test case 2: a key shorter than the block.
    assert_eq!(
      hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
      "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 6: a key longer than the block is hashed first.
    assert_eq!(
      hex(&hmac_sha256(
        &[0xaa; 131],
        b"Test Using Larger Than Block-Size Key - Hash Key First"
      )),
      "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
  }

  #[test]
  fn fingerprints_are_stable_keyed_and_recognisable() {
    let a = Fingerprinter::new(b"0123456789abcdef").unwrap();
    let b = Fingerprinter::new(b"0123456789abcdeF").unwrap();
    let key = "AIzaSyTESTQm7Lx2Vb9Rc4Nw8Dk1Fh6Jt3Pk001";
    let fp = a.fingerprint(key);
    assert_eq!(fp, a.fingerprint(key));
    assert_ne!(fp, b.fingerprint(key));
    assert_ne!(fp, a.fingerprint("AIzaSyTESTQm7Lx2Vb9Rc4Nw8Dk1Fh6Jt3Pk002"));
    assert_eq!(
      fp,
      format!(
        "fp_{}",
        &hex(&hmac_sha256(b"0123456789abcdef", key.as_bytes()))[..32]
      )
    );
    assert!(is_fingerprint(&fp));
    assert!(!is_fingerprint(key));
    assert!(!is_fingerprint("fp_XYZ"));
    assert!(!format!("{a:?}").contains("0123"));
  }

  #[test]
  fn digest_names_are_sha256_and_recognisable() {
    let key = "AIzaSyTESTQm7Lx2Vb9Rc4Nw8Dk1Fh6Jt3Pk001";
    // `printf %s "$key" | sha256sum`
    assert_eq!(digest_name(key), "sha256_014ec466abb6a05c30adf20b1ed08efd");
    assert!(is_digest_name(&digest_name(key)));
    assert!(!is_digest_name(key));
    assert!(!is_fingerprint(&digest_name(key)));
    let f = Fingerprinter::new(b"0123456789abcdef").unwrap();
    assert_ne!(f.derive(b"one"), f.derive(b"two"));
  }

  #[test]
  fn short_secrets_are_refused() {
    assert_eq!(
      Fingerprinter::new(b"short").unwrap_err(),
      FingerprintError::SecretTooShort(5)
    );
  }
}
