//! What a handler reads from its request besides the state: the key the `:apiKey` segment names,
//! the model the query names, and the body; and the replies when they are missing or wrong.

use crate::core::error::PoolError;
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::core::pool::KeyPool;
use crate::http::key_ref::{resolve_key_ref, KeyRefError};
use crate::http::reply::Reply;
use crate::http::state::ApiState;

/// A request as its handler gets it: the percent-decoded `:apiKey` segment (empty when the route
/// has none or it is missing), the raw query string and the body.
pub(super) struct Params<'a> {
  pub key: String,
  pub query: &'a str,
  pub body: &'a [u8],
}

impl Params<'_> {
  /// Runs `act` on the key the request's `:apiKey` names. A missing key is the SPEC's 400; an
  /// unknown or ambiguous one, or a pool failure, is a reply with the route's `failure` message.
  pub fn on_key(
    &self,
    state: &ApiState,
    failure: &str,
    act: impl FnOnce(usize) -> Result<Reply, PoolError>,
  ) -> Reply {
    if self.key.trim().is_empty() {
      return Reply::error(400, "API key is required", "Please provide an API key");
    }
    let index = match resolve_key_ref(state, &self.key) {
      Ok(index) => index,
      Err(err @ KeyRefError::NotFound) => return Reply::error(404, &err.to_string(), failure),
      // An ambiguous reference is a derived form several keys share, never a key: safe to quote.
      Err(err @ KeyRefError::Ambiguous { matches }) => {
        return Reply::error(
          409,
          &err.to_string(),
          &format!(
            "{failure}: {matches} keys have the masked form {}; name the key in full",
            self.key
          ),
        )
      }
    };
    act(index).unwrap_or_else(|err| Reply::pool_error(err, failure))
  }

  /// The model the query's `model` names, else the default one. Only a model met already or in
  /// the table of limits: an anonymous request must not fill the pool's table of models.
  pub fn model(&self, pool: &KeyPool, message: &str) -> Result<ModelId, Reply> {
    let mut named = None;
    for pair in self.query.split('&').filter(|p| !p.is_empty()) {
      let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
      if percent_decode(name, true).as_deref() == Some("model") {
        if named.is_some() {
          return Err(Reply::error(
            400,
            "Invalid model",
            "model was given more than once",
          ));
        }
        named = Some(percent_decode(value, true).unwrap_or_default());
      }
    }
    match named {
      None => Ok(DEFAULT_MODEL_ID),
      Some(name) => pool
        .known_model_id(&name)
        .map_err(|e| Reply::error(400, &e.to_string(), message)),
    }
  }
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in a query string). `None`
/// for a broken escape or a result that is not UTF-8.
pub(super) fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
  let bytes = text.as_bytes();
  let mut out = Vec::with_capacity(bytes.len());
  let mut i = 0;
  while i < bytes.len() {
    match bytes[i] {
      b'%' => {
        let hex = bytes.get(i + 1..i + 3)?;
        let hex = std::str::from_utf8(hex).ok()?;
        out.push(u8::from_str_radix(hex, 16).ok()?);
        i += 3;
      }
      b'+' if plus_is_space => {
        out.push(b' ');
        i += 1;
      }
      b => {
        out.push(b);
        i += 1;
      }
    }
  }
  String::from_utf8(out).ok()
}
