//! The one way a key leaves the process: first 8 characters, `...`, last 4.

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

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn masks_as_first_eight_and_last_four() {
    assert_eq!(mask_key("AIzaSyA1234567890abcdefWXYZ"), "AIzaSyA1...WXYZ");
  }

  #[test]
  fn short_keys_are_never_shown_whole() {
    assert_eq!(mask_key("abcdefgh"), "ab...");
    assert_eq!(mask_key(""), "...");
    assert_eq!(mask_key("éééééééééééééééééé"), "éééééééé...éééé");
  }
}
