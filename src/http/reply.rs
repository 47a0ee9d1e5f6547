//! The replies of the HTTP API: a status, a body and its content type, and the few headers a
//! reply needs; the SPEC's `{ success, data?, metadata?, message }` and `{ success: false, error,
//! message }` bodies, and the statuses pool failures and refused tokens map to.

use serde::Serialize;

use super::auth::Denied;
use super::json::{Failure, Success};
use crate::core::error::PoolError;
use crate::routing::JSON_CONTENT_TYPE;

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of the dashboard.
pub const HTML: &str = "text/html; charset=utf-8";

pub(crate) const CHALLENGE_MISSING: &[(&str, &str)] =
  &[("www-authenticate", r#"Bearer realm="gemini-key-manager""#)];
pub(crate) const CHALLENGE_WRONG: &[(&str, &str)] = &[(
  "www-authenticate",
  r#"Bearer realm="gemini-key-manager", error="invalid_token""#,
)];

/// Written when a body cannot be serialized, which only a bug can cause.
const SERIALIZATION_FAILED: &str =
  r#"{"success":false,"error":"Internal error","message":"The response could not be encoded"}"#;

/// A response: a status, a body and its type, the `Allow` header's value on a 405, and any other
/// headers it needs (lower-case names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
  pub status: u16,
  pub body: String,
  pub content_type: &'static str,
  pub allow: Option<&'static str>,
  pub headers: Vec<(&'static str, String)>,
}

/// Headers of a reply from a fixed list.
pub(crate) fn owned(headers: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
  headers.iter().map(|&(n, v)| (n, v.to_owned())).collect()
}

impl Reply {
  /// `body` as it is, of `content_type`.
  pub(crate) fn text(status: u16, body: String, content_type: &'static str) -> Self {
    Self {
      status,
      body,
      content_type,
      allow: None,
      headers: Vec::new(),
    }
  }

  pub(crate) fn json(status: u16, value: &impl Serialize) -> Self {
    match serde_json::to_string(value) {
      Ok(body) => Self::text(status, body, JSON_CONTENT_TYPE),
      Err(_) => Self::text(500, SERIALIZATION_FAILED.to_owned(), JSON_CONTENT_TYPE),
    }
  }

  /// `{ success: true, data?, metadata?, message }`.
  pub(crate) fn ok<D: Serialize, M: Serialize>(
    data: Option<D>,
    metadata: Option<M>,
    message: &'static str,
  ) -> Self {
    Self::json(
      200,
      &Success {
        success: true,
        data,
        metadata,
        message,
      },
    )
  }

  /// `{ success: false, error, message }`. Neither string may hold a full key.
  pub fn error(status: u16, error: &str, message: &str) -> Self {
    Self::json(
      status,
      &Failure {
        success: false,
        error,
        message,
        next_available_at: None,
      },
    )
  }

  /// A pool failure: what the caller got wrong is a 4xx (404 for an unknown key, 400 for a
  /// malformed one, 409 for a key that is there already or cannot be stored), the rest a 500, as
  /// the SPEC says.
  pub(crate) fn pool_error(err: PoolError, message: &str) -> Self {
    let status = match err {
      PoolError::KeyNotFound => 404,
      PoolError::InvalidKey(_) | PoolError::InvalidProject(_) | PoolError::InvalidModel(_) => 400,
      PoolError::DuplicateKey | PoolError::KeyNotStorable(_) => 409,
      _ => 500,
    };
    Self::error(status, &err.to_string(), message)
  }

  /// A 401 with its `WWW-Authenticate` challenge.
  pub(crate) fn denied(denied: Denied) -> Self {
    let (message, headers) = match denied {
      Denied::Missing => (
        "This endpoint needs an Authorization: Bearer <admin token> header",
        CHALLENGE_MISSING,
      ),
      Denied::Wrong => ("The admin token is not valid", CHALLENGE_WRONG),
    };
    Self {
      headers: owned(headers),
      ..Self::error(401, "Unauthorized", message)
    }
  }

  /// A 405 naming the methods the path takes: HEAD wherever GET is.
  pub(crate) fn method_not_allowed(route_method: &'static str) -> Self {
    let allow = match route_method {
      "GET" => "GET, HEAD",
      other => other,
    };
    Self {
      allow: Some(allow),
      ..Self::error(
        405,
        "Method not allowed",
        &format!("This endpoint only accepts {allow}"),
      )
    }
  }
}
