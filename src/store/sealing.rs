//! Keys added at run time are stored sealed: other processes and later runs must get the key
//! itself back, and no document may hold it readable. AES-256-GCM (from `ring`, which the MongoDB
//! driver's TLS already builds) under a key derived from the secret, with the key's stored name as
//! associated data, so a sealed key copied into another key's document does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::fingerprint::Fingerprinter;

/// What the sealing key is derived for: changing it would make every sealed key unreadable.
const PURPOSE: &[u8] = b"gemini-key-manager: sealed API keys, v1";

/// Seals and opens keys under one secret.
pub struct Sealer {
  key: LessSafeKey,
  random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.write_str("Sealer { .. }")
  }
}

impl Sealer {
  pub fn new(secret: &Fingerprinter) -> Self {
    let material = secret.derive(PURPOSE);
    // A 32-byte key is exactly what AES-256-GCM takes.
    let key = UnboundKey::new(&AES_256_GCM, &material)
      .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
    Self {
      key: LessSafeKey::new(key),
      random: SystemRandom::new(),
    }
  }

  /// The sealed form of `api_key`, stored under `name`: hex of a random nonce, the ciphertext and
  /// its tag. `None` only when the system has no randomness to give.
  pub fn seal(&self, api_key: &str, name: &str) -> Option<String> {
    let mut nonce = [0u8; NONCE_LEN];
    self.random.fill(&mut nonce).ok()?;
    let mut sealed = api_key.as_bytes().to_vec();
    self
      .key
      .seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(name.as_bytes()),
        &mut sealed,
      )
      .ok()?;
    let mut out = hex(&nonce);
    out.push_str(&hex(&sealed));
    Some(out)
  }

  /// The key `sealed` holds, if it was sealed under this secret for `name` and not altered.
  pub fn open(&self, sealed: &str, name: &str) -> Option<String> {
    let bytes = unhex(sealed)?;
    if bytes.len() < NONCE_LEN {
      return None;
    }
    let (nonce, rest) = bytes.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut rest = rest.to_vec();
    let plain = self
      .key
      .open_in_place(nonce, Aad::from(name.as_bytes()), &mut rest)
      .ok()?;
    String::from_utf8(plain.to_vec()).ok()
  }
}

fn hex(bytes: &[u8]) -> String {
  bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
  if !text.len().is_multiple_of(2) {
    return None;
  }
  (0..text.len())
    .step_by(2)
    .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
    .collect()
}

#[cfg(test)]
mod tests {
  use super::*;

  fn sealer(secret: &[u8]) -> Sealer {
    Sealer::new(&Fingerprinter::new(secret).unwrap())
  }

  #[test]
  fn a_sealed_key_opens_only_under_its_secret_and_name() {
    let key = "AIzaSyTESTSEAL0000000000000000000000001";
    let s = sealer(b"a secret of 16+ bytes");
    let sealed = s.seal(key, "fp_one").unwrap();
    assert!(!sealed.contains(key) && !sealed.contains("AIzaSy"));
    assert_eq!(s.open(&sealed, "fp_one").as_deref(), Some(key));
    // Another name, another secret, or one flipped bit: nothing.
    assert_eq!(s.open(&sealed, "fp_two"), None);
    assert_eq!(sealer(b"another secret, 16+").open(&sealed, "fp_one"), None);
    let mut flipped = sealed.clone().into_bytes();
    flipped[30] = if flipped[30] == b'0' { b'1' } else { b'0' };
    assert_eq!(s.open(&String::from_utf8(flipped).unwrap(), "fp_one"), None);
    // Nonces are fresh: sealing twice gives two texts.
    assert_ne!(s.seal(key, "fp_one").unwrap(), sealed);
  }

  #[test]
  fn malformed_sealed_text_opens_to_nothing() {
    let s = sealer(b"a secret of 16+ bytes");
    for bad in ["", "zz", "abc", "00", &"0".repeat(24)] {
      assert_eq!(s.open(bad, "n"), None, "{bad}");
    }
  }
}
