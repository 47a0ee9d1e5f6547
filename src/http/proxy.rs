//! Gemini's REST paths on the server (`/v1beta/...`, `/v1/...`) and Google's OpenAI-compatible
//! ones (`/v1beta/openai/...`), answered by the router: the app's own SDK calls, which the JS face
//! sends here with the server's route token and the pool key the SDK was built with, and any
//! client's that presents a proxy token (see `proxy_auth`). Only Gemini's model methods and reads
//! are served; any other path is a 404 and goes nowhere, so the server is no open proxy.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};

use super::auth::constant_time_eq;
use super::proxy_auth::ClientAccess;
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::routing::upstream::KEY_HEADER;
use crate::routing::{google_error, AnswerBody, RoutedRequest, Router};

/// The header the JS face sends the route token in.
pub const ROUTE_TOKEN_HEADER: &str = "x-gkm-route-token";
/// The largest request body sent on (inline images are large).
pub const DEFAULT_MAX_PROXY_BODY: usize = 20 * 1024 * 1024;
/// A client that stops sending its body mid-way gets a 408 after this long.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The model methods served (all POST), and whether Gemini counts them against the model's quota.
const MODEL_METHODS: [(&str, bool); 5] = [
  ("generateContent", true),
  ("streamGenerateContent", true),
  ("countTokens", false),
  ("embedContent", true),
  ("batchEmbedContents", true),
];

/// How the server answers Gemini's paths.
#[derive(Clone)]
pub struct ProxyOptions {
  pub router: Arc<Router>,
  /// What the JS face's requests carry in [`ROUTE_TOKEN_HEADER`], on its own loopback server.
  pub route_token: Option<String>,
  /// Which other clients may call.
  pub clients: ClientAccess,
  pub max_body: usize,
}

impl std::fmt::Debug for ProxyOptions {
  /// Never prints a token.
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.debug_struct("ProxyOptions")
      .field("clients", &self.clients)
      .field("max_body", &self.max_body)
      .finish_non_exhaustive()
  }
}

/// Whether `path` is one of Gemini's (the router's, not the route table's).
pub fn is_gemini_path(path: &str) -> bool {
  path.starts_with("/v1beta/") || path.starts_with("/v1/") || path == "/v1beta" || path == "/v1"
}

/// A call the proxy sends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call<'a> {
  /// The model to choose a key for: the path's, `None` for the body's (OpenAI) or the default.
  model: Option<&'a str>,
  /// The model is in the JSON body's `model` field (the OpenAI-compatible API).
  model_in_body: bool,
  counted: bool,
}

/// Whether `method` on `path` is a Gemini call this server sends on, and which.
fn served<'a>(method: &Method, path: &'a str) -> Option<Call<'a>> {
  if let Some(rest) = path.strip_prefix("/v1beta/openai/") {
    let (post, counted) = match rest {
      "chat/completions" | "embeddings" => (true, true),
      "models" => (false, false),
      _ => match rest.strip_prefix("models/") {
        Some(id) if !id.is_empty() && !id.contains('/') => (false, false),
        _ => return None,
      },
    };
    let method_fits = if post {
      method == Method::POST
    } else {
      method == Method::GET
    };
    return method_fits.then_some(Call {
      model: None,
      model_in_body: post,
      counted,
    });
  }
  let rest = path
    .strip_prefix("/v1beta/models")
    .or_else(|| path.strip_prefix("/v1/models"))?;
  // Model reads name no quota of their own: any key in service answers them.
  let read = Call {
    model: None,
    model_in_body: false,
    counted: false,
  };
  if rest.is_empty() || rest == "/" {
    return (method == Method::GET).then_some(read);
  }
  let model = rest.strip_prefix('/')?;
  match model.split_once(':') {
    None => (method == Method::GET && !model.is_empty() && !model.contains('/')).then_some(read),
    Some((name, call)) => {
      if name.is_empty() || name.contains('/') || method != Method::POST {
        return None;
      }
      let (_, counted) = MODEL_METHODS.iter().find(|(c, _)| *c == call)?;
      Some(Call {
        model: Some(name),
        model_in_body: false,
        counted: *counted,
      })
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

/// The credential a request carries where SDKs put a key: `x-goog-api-key`, `?key=`, or
/// `Authorization: Bearer` (the OpenAI SDKs).
fn presented<'a>(parts: &'a Parts, key_in_url: Option<&'a str>) -> Option<&'a str> {
  let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
  header(KEY_HEADER).or(key_in_url).or_else(|| {
    let (scheme, token) = header(AUTHORIZATION.as_str())?.trim().split_once(' ')?;
    scheme
      .eq_ignore_ascii_case("bearer")
      .then_some(token.trim())
  })
}

/// The `model` of an OpenAI-compatible request body (`models/` dropped), if it names one.
fn body_model(body: &[u8]) -> Option<String> {
  #[derive(serde::Deserialize)]
  struct Named {
    model: Option<String>,
  }
  let named: Named = serde_json::from_slice(body).ok()?;
  let model = named.model?;
  let name = model.strip_prefix("models/").unwrap_or(&model);
  (!name.is_empty()).then(|| name.to_owned())
}

/// Reads a request body of at most `max` bytes. Past it, the rest is read and dropped (up to as
/// much again) so the client gets to read the 413 rather than a reset of its upload.
async fn read_body(
  mut body: Incoming,
  declared: Option<usize>,
  max: usize,
) -> Result<hyper::body::Bytes, Response<AnswerBody>> {
  let too_large = || {
    google_error(
      StatusCode::PAYLOAD_TOO_LARGE,
      &format!("The request body must be at most {max} bytes"),
      None,
    )
  };
  let mut kept = Joined {
    first: None,
    rest: Vec::new(),
    capacity: declared.unwrap_or(0).min(max),
  };
  let mut seen = 0usize;
  while let Some(frame) = body.frame().await {
    let Ok(frame) = frame else {
      return Err(google_error(
        StatusCode::BAD_REQUEST,
        "The request body could not be read",
        None,
      ));
    };
    let Ok(data) = frame.into_data() else {
      continue;
    };
    seen = seen.saturating_add(data.len());
    if seen <= max {
      kept.push(data);
    } else if seen > max.saturating_mul(2) {
      let mut answer = too_large();
      answer
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
      return Err(answer);
    }
  }
  if seen > max {
    return Err(too_large());
  }
  Ok(kept.into_bytes())
}

/// The frames of a body joined, copied only once there is more than one (most bodies come in
/// one, sent on as it is).
struct Joined {
  first: Option<hyper::body::Bytes>,
  rest: Vec<u8>,
  /// What the body declared: room made for it at the first copy.
  capacity: usize,
}

impl Joined {
  fn push(&mut self, data: hyper::body::Bytes) {
    match self.first.take() {
      None if self.rest.is_empty() => self.first = Some(data),
      Some(first) => {
        self
          .rest
          .reserve(self.capacity.max(first.len() + data.len()));
        self.rest.extend_from_slice(&first);
        self.rest.extend_from_slice(&data);
      }
      None => self.rest.extend_from_slice(&data),
    }
  }

  fn into_bytes(self) -> hyper::body::Bytes {
    self.first.unwrap_or_else(|| self.rest.into())
  }
}

/// Answers one request on a Gemini path.
pub async fn handle(options: &ProxyOptions, parts: Parts, body: Incoming) -> Response<AnswerBody> {
  let path = parts.uri.path();
  let (query, key_in_url) = without_key(parts.uri.query().unwrap_or(""));
  let internal = options.route_token.as_deref().is_some_and(|expected| {
    let token = parts
      .headers
      .get(ROUTE_TOKEN_HEADER)
      .map(|v| v.as_bytes())
      .unwrap_or_default();
    constant_time_eq(token, expected.as_bytes())
  });
  let credential = presented(&parts, key_in_url.as_deref());
  if !internal && !options.clients.admits(credential) {
    let why = match options.clients.is_on() {
      true => "A valid proxy token is needed: send it as the API key (x-goog-api-key, ?key= or Authorization: Bearer)",
      false => "This server sends Gemini requests on only for the app it runs in",
    };
    return google_error(StatusCode::UNAUTHORIZED, why, None);
  }
  let Some(call) = served(&parts.method, path) else {
    return google_error(StatusCode::NOT_FOUND, "No Gemini method at this path", None);
  };
  let declared = parts
    .headers
    .get(CONTENT_LENGTH)
    .and_then(|v| v.to_str().ok())
    .and_then(|v| v.parse::<usize>().ok());
  let read = tokio::time::timeout(
    BODY_READ_TIMEOUT,
    read_body(body, declared, options.max_body),
  );
  let body = match read.await {
    Ok(Ok(body)) => body,
    Ok(Err(answer)) => return answer,
    Err(_) => {
      return google_error(
        StatusCode::REQUEST_TIMEOUT,
        &format!("The request body did not arrive within {BODY_READ_TIMEOUT:?}"),
        None,
      )
    }
  };
  let pool = options.router.pool();
  // Only the JS face's requests carry a pool key: their SDK's caller may hold its hand-out.
  let asked = credential
    .filter(|_| internal)
    .and_then(|k| pool.names().position(k));
  let named = match call.model_in_body {
    true => body_model(&body),
    false => call.model.map(str::to_owned),
  };
  let model: ModelId = match named.map(|m| pool.model_id(&m)) {
    None => DEFAULT_MODEL_ID,
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
    counted: call.counted,
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
    let model = |m: &Method, p| served(m, p).and_then(|c| c.model);
    assert_eq!(
      model(&post, "/v1beta/models/gemini-2.0-flash:generateContent"),
      Some("gemini-2.0-flash")
    );
    assert_eq!(
      model(&post, "/v1/models/m:streamGenerateContent"),
      Some("m")
    );
    assert!(served(&post, "/v1beta/models/m:batchEmbedContents").is_some_and(|c| c.counted));
    assert!(served(&post, "/v1beta/models/m:countTokens").is_some_and(|c| !c.counted));
    for read in [
      "/v1beta/models",
      "/v1/models/",
      "/v1beta/models/gemini-2.0-flash",
    ] {
      let call = served(&get, read).unwrap();
      assert!(!call.counted && call.model.is_none(), "{read}");
    }
    for (m, p) in [
      (&get, "/v1beta/models/m:generateContent"),
      (&post, "/v1beta/models/m:deleteEverything"),
      (&post, "/v1beta/models/a/b:generateContent"),
      (&get, "/v1beta/files"),
      (&post, "/v1beta/tunedModels/x:generateContent"),
      (&get, "/v2/models"),
      (&post, "/v1beta/models/:generateContent"),
      (&post, "/v1beta/models"),
    ] {
      assert!(served(m, p).is_none(), "{m} {p}");
    }
    assert!(is_gemini_path("/v1beta/models") && !is_gemini_path("/api/keys/status"));
  }

  #[test]
  fn the_openai_compatible_paths_take_their_model_from_the_body() {
    let post = Method::POST;
    let get = Method::GET;
    for p in [
      "/v1beta/openai/chat/completions",
      "/v1beta/openai/embeddings",
    ] {
      let call = served(&post, p).unwrap();
      assert!(call.model_in_body && call.counted, "{p}");
      assert!(served(&get, p).is_none(), "GET {p}");
    }
    for p in [
      "/v1beta/openai/models",
      "/v1beta/openai/models/gemini-2.0-flash",
    ] {
      assert!(served(&get, p).is_some_and(|c| !c.counted), "{p}");
    }
    for p in [
      "/v1beta/openai/completions",
      "/v1beta/openai/files",
      "/v1/openai/chat/completions",
      "/v1beta/openai/models/a/b",
      "/v1beta/openai/chat/completions/x",
    ] {
      assert!(
        served(&post, p).is_none() && served(&get, p).is_none(),
        "{p}"
      );
    }
    assert_eq!(
      body_model(br#"{"model":"models/gemini-2.0-flash","messages":[]}"#).as_deref(),
      Some("gemini-2.0-flash")
    );
    assert_eq!(
      body_model(br#"{"model":"gemini-pro"}"#).as_deref(),
      Some("gemini-pro")
    );
    assert_eq!(body_model(br#"{"messages":[]}"#), None);
    assert_eq!(body_model(b"not json"), None);
    assert_eq!(body_model(br#"{"model":"models/"}"#), None);
  }

  #[test]
  fn body_frames_are_joined_and_one_frame_is_kept_as_it_came() {
    use hyper::body::Bytes;
    let joined = |frames: &[&'static [u8]]| {
      let mut j = Joined {
        first: None,
        rest: Vec::new(),
        capacity: 0,
      };
      for f in frames {
        j.push(Bytes::from_static(f));
      }
      j.into_bytes()
    };
    let one: &'static [u8] = b"{\"contents\":[]}";
    assert_eq!(joined(&[one]).as_ptr(), one.as_ptr(), "not copied");
    assert_eq!(
      joined(&[b"ab", b"", b"cd", b"e"]),
      Bytes::from_static(b"abcde")
    );
    assert_eq!(joined(&[b"", b"x"]), Bytes::from_static(b"x"));
    assert!(joined(&[]).is_empty());
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
