//! The one way a key leaves the process: first 8 characters, `...`, last 4; and the one way a
//! caller's string is quoted in an error, in case it is a key.

/// Masks an API key for logs, errors and responses. Keys too short to keep 8 + 4 characters hidden
/// show only a quarter of their length, so a short key is never printed whole.
pub fn mask_key(key: &str) -> String {
  let chars: Vec<char> = key.chars().collect();
  let n = chars.len();
  if n > 16 {
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[n - 4..].iter().collect();
    format!("{head}...{tail}")
  } else {
    let head: String = chars[..n / 4].iter().collect();
    format!("{head}...")
  }
}

/// A string a caller gave, quoted in an error message: whole (in JSON quotes) when too short to be
/// a key, else masked as one, so that a key given in the wrong place never comes back whole.
pub fn quoted(text: &str) -> String {
  if text.chars().count() > 16 {
    format!("\"{}\"", mask_key(text))
  } else {
    // Serializing a string cannot fail.
    serde_json::to_string(text).unwrap_or_default()
  }
}

/// Replaces every key found inside `text` with its mask: error messages that callers record can
/// quote a request URL with `?key=...` in it.
pub fn scrub(text: &str, keys: &[String]) -> String {
  let mut out = text.to_owned();
  for key in keys {
    if !key.is_empty() && out.contains(key.as_str()) {
      out = out.replace(key.as_str(), &mask_key(key));
    }
  }
  out
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn masks_as_first_eight_and_last_four() {
    assert_eq!(mask_key("AIzaSyA1234567890abcdefWXYZ"), "AIzaSyA1...WXYZ");
  }

  #[test]
  fn scrub_masks_every_key_quoted_in_a_message() {
    let keys = vec![
      "AIzaSyA1234567890abcdefWXYZ".to_string(),
      "AIzaSyB1234567890abcdefQRST".to_string(),
    ];
    let text =
      "403 for https://x/v1?key=AIzaSyA1234567890abcdefWXYZ and AIzaSyB1234567890abcdefQRST";
    assert_eq!(
      scrub(text, &keys),
      "403 for https://x/v1?key=AIzaSyA1...WXYZ and AIzaSyB1...QRST"
    );
    assert_eq!(scrub("no keys here", &keys), "no keys here");
  }

  #[test]
  fn a_quoted_string_is_whole_when_short_and_masked_when_it_could_be_a_key() {
    assert_eq!(quoted("RPM"), "\"RPM\"");
    assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
    assert_eq!(quoted("AIzaSyA1234567890abcdefWXYZ"), "\"AIzaSyA1...WXYZ\"");
  }

  #[test]
  fn short_keys_are_never_shown_whole() {
    assert_eq!(mask_key("abcdefgh"), "ab...");
    assert_eq!(mask_key(""), "...");
    assert_eq!(mask_key("éééééééééééééééééé"), "éééééééé...éééé");
  }
}
