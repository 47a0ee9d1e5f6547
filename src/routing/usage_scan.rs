//! The tokens a Gemini answer reports, read as it streams by: `usageMetadata.totalTokenCount` in a
//! `generateContent` body, or in the last chunk of a stream (server-sent events or a JSON array of
//! chunks alike), and the OpenAI-compatible `usage.total_tokens`. Only the tail of the body is
//! kept, so a long stream costs a fixed amount of memory.

/// How much of the end of a body is kept: the usage object comes last and is small.
const TAIL: usize = 16 * 1024;

/// Watches a body go by and remembers its end.
#[derive(Debug, Default)]
pub struct UsageScan {
  tail: Vec<u8>,
}

impl UsageScan {
  pub fn feed(&mut self, chunk: &[u8]) {
    if chunk.len() >= TAIL {
      self.tail.clear();
      self.tail.extend_from_slice(&chunk[chunk.len() - TAIL..]);
      return;
    }
    let overflow = (self.tail.len() + chunk.len()).saturating_sub(TAIL);
    self.tail.drain(..overflow);
    self.tail.extend_from_slice(chunk);
  }

  /// The total token count the body reported last, if it did.
  pub fn total_tokens(&self) -> Option<u64> {
    let text = String::from_utf8_lossy(&self.tail);
    last_count::<GeminiUsage>(&text, "\"usageMetadata\"")
      .or_else(|| last_count::<OpenAiUsage>(&text, "\"usage\""))
  }
}

/// The one field read of a usage object: the rest is skipped, not built into a map.
trait Total: serde::de::DeserializeOwned {
  fn total(self) -> Option<u64>;
}

#[derive(serde::Deserialize)]
struct GeminiUsage {
  #[serde(rename = "totalTokenCount")]
  total: Option<u64>,
}

#[derive(serde::Deserialize)]
struct OpenAiUsage {
  total_tokens: Option<u64>,
}

impl Total for GeminiUsage {
  fn total(self) -> Option<u64> {
    self.total
  }
}

impl Total for OpenAiUsage {
  fn total(self) -> Option<u64> {
    self.total_tokens
  }
}

/// The total the usage object `U` holds, the JSON object that follows the last `marker` in
/// `text`.
fn last_count<U: Total>(text: &str, marker: &str) -> Option<u64> {
  let at = text.rfind(marker)?;
  let after = &text[at + marker.len()..];
  let open = after.find('{')?;
  let object = balanced(&after[open..])?;
  serde_json::from_str::<U>(object).ok()?.total()
}

/// The JSON object `text` starts with, up to its closing brace (strings and escapes respected).
fn balanced(text: &str) -> Option<&str> {
  let mut depth = 0usize;
  let mut in_string = false;
  let mut escaped = false;
  for (i, c) in text.char_indices() {
    match c {
      _ if escaped => escaped = false,
      '\\' if in_string => escaped = true,
      '"' => in_string = !in_string,
      '{' if !in_string => depth += 1,
      '}' if !in_string => {
        depth = depth.checked_sub(1)?;
        if depth == 0 {
          return Some(&text[..=i]);
        }
      }
      _ => {}
    }
  }
  None
}

#[cfg(test)]
mod tests {
  use super::*;

  fn scan(parts: &[&str]) -> Option<u64> {
    let mut s = UsageScan::default();
    for p in parts {
      s.feed(p.as_bytes());
    }
    s.total_tokens()
  }

  #[test]
  fn a_whole_answer_a_stream_of_events_and_a_json_array_of_chunks() {
    let body = r#"{"candidates":[{"content":{"parts":[{"text":"a \"}\" here"}]}}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":7,"totalTokenCount":12},"modelVersion":"m"}"#;
    assert_eq!(scan(&[body]), Some(12));
    let sse = "data: {\"candidates\":[],\"usageMetadata\":{\"totalTokenCount\":3}}\r\n\r\ndata: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":2,\"totalTokenCount\":40}}\r\n\r\n";
    // Split anywhere, even inside the object.
    let (a, b) = sse.split_at(sse.len() - 30);
    assert_eq!(scan(&[a, b]), Some(40));
    let array =
      "[{\"usageMetadata\":{\"totalTokenCount\":1}},\n{\"usageMetadata\":{\"totalTokenCount\":9}}]";
    assert_eq!(scan(&[array]), Some(9));
    let openai =
      r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    assert_eq!(scan(&[openai]), Some(7));
  }

  #[test]
  fn no_usage_a_cut_object_and_a_long_stream() {
    assert_eq!(scan(&["{\"candidates\":[]}"]), None);
    assert_eq!(scan(&["{\"usageMetadata\":{\"totalTokenCount\":"]), None);
    assert_eq!(
      scan(&["{\"usageMetadata\":{\"totalTokenCount\":\"x\"}}"]),
      None
    );
    let filler = "x".repeat(3 * TAIL);
    let end = "{\"usageMetadata\":{\"totalTokenCount\":77}}";
    assert_eq!(
      scan(&["{\"usageMetadata\":{\"totalTokenCount\":1}}", &filler, end]),
      Some(77)
    );
  }
}
