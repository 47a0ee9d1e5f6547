//! Gemini's REST paths on the server (`/v1beta/...`, `/v1/...`), answered by the router: the
//! app's own SDK calls, which the JS face sends here with the server's route token and the pool
//! key the SDK was built with. Only Gemini's model methods are served; any other path is a 404
//! and goes nowhere, so the server is no open proxy.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};

use super::auth::constant_time_eq;
use crate::routing::{google_error, AnswerBody, RoutedRequest, Router};

/// The header the JS face sends the route token in.
pub const ROUTE_TOKEN_HEADER: &str = "x-gkm-route-token";
/// The largest request body sent on (inline images are large).
pub const DEFAULT_MAX_PROXY_BODY: usize = 20 * 1024 * 1024;

/// The model methods served, by HTTP method.
const MODEL_METHODS: [(&str, &str); 5] = [
  ("POST", "generateContent"),
  ("POST", "streamGenerateContent"),
  ("POST", "countTokens"),
  ("POST", "embedContent"),
  ("POST", "batchEmbedContents"),
];

/// How the server answers Gemini's paths.
#[derive(Clone)]
pub struct ProxyOptions {
  pub router: Arc<Router>,
  /// What the JS face's requests carry in [`ROUTE_TOKEN_HEADER`].
  pub route_token: String,
  pub max_body: usize,
}

impl std::fmt::Debug for ProxyOptions {
  /// Never prints the token.
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.debug_struct("ProxyOptions")
      .field("max_body", &self.max_body)
      .finish_non_exhaustive()
  }
}

/// Whether `path` is one of Gemini's (the router's, not the route table's).
pub fn is_gemini_path(path: &str) -> bool {
  path.starts_with("/v1beta/") || path.starts_with("/v1/") || path == "/v1beta" || path == "/v1"
}

/// Whether `method` on `path` is a Gemini call this server sends on: a model method, or reading
/// the model list or one model.
fn served(method: &Method, path: &str) -> bool {
  let Some(rest) = path
    .strip_prefix("/v1beta/models")
    .or_else(|| path.strip_prefix("/v1/models"))
  else {
    return false;
  };
  if rest.is_empty() || rest == "/" {
    return method == Method::GET;
  }
  let Some(model) = rest.strip_prefix('/') else {
    return false;
  };
  match model.split_once(':') {
    None => method == Method::GET && !model.is_empty() && !model.contains('/'),
    Some((name, call)) => {
      !name.is_empty()
        && !name.contains('/')
        && MODEL_METHODS
          .iter()
          .any(|(m, c)| *m == method.as_str() && *c == call)
    }
  }
}

/// The query without `key=`: the key goes in a header, never in the URL.
fn without_key(query: &str) -> (String, Option<String>) {
  let mut key = None;
  let kept: Vec<&str> = query
    .split('&')
    .filter(|pair| match pair.strip_prefix("key=") {
      Some(k) => {
        key = Some(k.to_owned());
        false
      }
      None => !pair.is_empty(),
    })
    .collect();
  (kept.join("&"), key)
}

/// Answers one request on a Gemini path.
pub async fn handle(options: &ProxyOptions, parts: Parts, body: Incoming) -> Response<AnswerBody> {
  let path = parts.uri.path();
  let token = parts
    .headers
    .get(ROUTE_TOKEN_HEADER)
    .map(|v| v.as_bytes())
    .unwrap_or_default();
  if !constant_time_eq(token, options.route_token.as_bytes()) {
    return google_error(
      StatusCode::UNAUTHORIZED,
      "This server sends Gemini requests on only for the app it runs in",
      None,
    );
  }
  if !served(&parts.method, path) {
    return google_error(StatusCode::NOT_FOUND, "No Gemini method at this path", None);
  }
  let body = match Limited::new(body, options.max_body).collect().await {
    Ok(collected) => collected.to_bytes(),
    Err(e)
      if e
        .downcast_ref::<http_body_util::LengthLimitError>()
        .is_some() =>
    {
      return google_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
          "The request body must be at most {} bytes",
          options.max_body
        ),
        None,
      )
    }
    Err(_) => {
      return google_error(
        StatusCode::BAD_REQUEST,
        "The request body could not be read",
        None,
      )
    }
  };
  let (query, key_in_url) = without_key(parts.uri.query().unwrap_or(""));
  let presented = parts
    .headers
    .get(crate::routing::upstream::KEY_HEADER)
    .and_then(|v| v.to_str().ok())
    .map(str::to_owned)
    .or(key_in_url);
  let pool = options.router.pool();
  let asked = presented.and_then(|k| pool.names().position(&k));
  let model = match crate::routing::model_of(path).map(|m| pool.model_id(m)) {
    None => crate::models::DEFAULT_MODEL_ID,
    Some(Ok(id)) => id,
    Some(Err(e)) => return google_error(StatusCode::BAD_REQUEST, &e.to_string(), None),
  };
  let path_and_query = match query.is_empty() {
    true => path.to_owned(),
    false => format!("{path}?{query}"),
  };
  let request = RoutedRequest {
    method: parts.method.clone(),
    path_and_query,
    headers: crate::routing::router::forwardable(&parts.headers, &[ROUTE_TOKEN_HEADER]),
    body,
    asked,
    model,
  };
  options.router.forward(request).await
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn only_gemini_model_methods_and_model_reads_are_served() {
    let post = Method::POST;
    let get = Method::GET;
    assert!(served(
      &post,
      "/v1beta/models/gemini-2.0-flash:generateContent"
    ));
    assert!(served(&post, "/v1/models/m:streamGenerateContent"));
    assert!(served(&post, "/v1beta/models/m:batchEmbedContents"));
    assert!(served(&get, "/v1beta/models"));
    assert!(served(&get, "/v1beta/models/gemini-2.0-flash"));
    for (m, p) in [
      (&get, "/v1beta/models/m:generateContent"),
      (&post, "/v1beta/models/m:deleteEverything"),
      (&post, "/v1beta/models/a/b:generateContent"),
      (&get, "/v1beta/files"),
      (&post, "/v1beta/tunedModels/x:generateContent"),
      (&get, "/v2/models"),
      (&post, "/v1beta/models/:generateContent"),
    ] {
      assert!(!served(m, p), "{m} {p}");
    }
    assert!(is_gemini_path("/v1beta/models") && !is_gemini_path("/api/keys/status"));
  }

  #[test]
  fn a_key_in_the_query_is_taken_out() {
    assert_eq!(
      without_key("alt=sse&key=AIza1"),
      ("alt=sse".to_owned(), Some("AIza1".to_owned()))
    );
    assert_eq!(without_key("key=K"), (String::new(), Some("K".to_owned())));
    assert_eq!(without_key(""), (String::new(), None));
    assert_eq!(without_key("monkey=1"), ("monkey=1".to_owned(), None));
  }
}
