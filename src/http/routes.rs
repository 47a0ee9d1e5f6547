//! The HTTP API's one route table (SPEC section 4), as a pure function from a request to a reply.
//! The Rust server and the Express adapter both call it, so the two cannot drift apart.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::core::error::PoolError;
use crate::core::key::Admission;
use crate::core::models::{ModelId, DEFAULT_MODEL_ID};
use crate::core::pool::{Claim, KeyPool};
use crate::mask::mask_key;
use crate::stats::metrics::prometheus_text;
use crate::stats::usage_stats::DateRange;

use super::auth::{AdminGuard, Denied};
use super::json::{Failure, IsoDate, KeyStatusJson, LimitsJson, RateLimitInfoJson, Success};
use super::key_ref::{resolve_key_ref, KeyRefError};
use super::usage;

/// Where the API is served when the whole request path is given.
pub const PREFIX: &str = "/api/keys";

/// Where the Prometheus text format is served, from the server root.
pub const METRICS_PATH: &str = "/metrics";

/// The content type of every JSON reply.
pub const JSON: &str = "application/json; charset=utf-8";
/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const HTML_TYPE: &str = "text/html; charset=utf-8";

/// The live dashboard: one page with its CSS and JS inline.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The OpenAPI description of this API, served as it is kept in the repository.
const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");
/// What the dashboard may load: nothing but itself and this API, so no outside resource can be
/// pulled in even by a key's error text.
const DASHBOARD_HEADERS: &[(&str, &str)] = &[
  (
    "content-security-policy",
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'",
  ),
  ("x-content-type-options", "nosniff"),
  ("cache-control", "no-store"),
];
const CHALLENGE_MISSING: &[(&str, &str)] =
  &[("www-authenticate", r#"Bearer realm="gemini-key-manager""#)];
const CHALLENGE_WRONG: &[(&str, &str)] = &[(
  "www-authenticate",
  r#"Bearer realm="gemini-key-manager", error="invalid_token""#,
)];

/// One request as the table sees it.
#[derive(Debug, Clone, Copy)]
pub struct ApiRequest<'a> {
  pub method: &'a str,
  /// Path and query: from the server root for [`route`], from the mount point for
  /// [`route_mounted`].
  pub target: &'a str,
  /// The `Authorization` header, if any.
  pub authorization: Option<&'a str>,
  pub body: &'a [u8],
}

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
fn owned(headers: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
  headers.iter().map(|&(n, v)| (n, v.to_owned())).collect()
}

/// Written when a body cannot be serialized, which only a bug can cause.
const SERIALIZATION_FAILED: &str =
  r#"{"success":false,"error":"Internal error","message":"The response could not be encoded"}"#;

impl Reply {
  pub(crate) fn json(status: u16, value: &impl Serialize) -> Self {
    match serde_json::to_string(value) {
      Ok(body) => Self {
        status,
        body,
        content_type: JSON,
        allow: None,
        headers: Vec::new(),
      },
      Err(_) => Self {
        status: 500,
        body: SERIALIZATION_FAILED.to_owned(),
        content_type: JSON,
        allow: None,
        headers: Vec::new(),
      },
    }
  }

  fn ok<D: Serialize, M: Serialize>(
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
  fn pool_error(err: PoolError, message: &str) -> Self {
    let status = match err {
      PoolError::KeyNotFound => 404,
      PoolError::InvalidKey(_) | PoolError::InvalidProject(_) | PoolError::InvalidModel(_) => 400,
      PoolError::DuplicateKey | PoolError::KeyNotStorable(_) => 409,
      _ => 500,
    };
    Self::error(status, &err.to_string(), message)
  }

  /// No key to hand out. When keys are only busy, the server is not failing: a 429 with
  /// `Retry-After` and `nextAvailableAt`, when one frees; when none will come back by itself (every
  /// key refused, disabled or removed), a 503.
  fn no_key(pool: &KeyPool, err: PoolError, message: &str, model: ModelId) -> Self {
    if err != PoolError::NoActiveKeys {
      return Self::pool_error(err, message);
    }
    let Ok(Some(at)) = pool.next_available_at(0, model) else {
      return Self::error(503, &err.to_string(), message);
    };
    let wait_ms = (at - pool.now()).max(0);
    let reply = Self::json(
      429,
      &Failure {
        success: false,
        error: &err.to_string(),
        message,
        next_available_at: Some(IsoDate(at)),
      },
    );
    Self {
      // Whole seconds, rounded up: a client that waits that long finds the key free.
      headers: vec![("retry-after", ((wait_ms + 999) / 1_000).max(1).to_string())],
      ..reply
    }
  }

  /// A 401 with its `WWW-Authenticate` challenge.
  fn denied(denied: Denied) -> Self {
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
}

/// One segment of a route's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
  Lit(&'static str),
  /// `:apiKey`: a full key or its masked form.
  Key,
}

/// What a handler gets besides the pool: the percent-decoded `:apiKey` segment (empty when it is
/// missing), the raw query string and the body.
struct Params<'a> {
  key: String,
  query: &'a str,
  body: &'a [u8],
}

struct Route {
  method: &'static str,
  path: &'static [Seg],
  /// Changes state, so needs the admin token when one is set.
  admin: bool,
  handler: fn(&KeyPool, &Params<'_>) -> Reply,
}

/// The table. Every path has one method, so a 405's `Allow` is that route's method.
const ROUTES: &[Route] = &[
  Route {
    method: "GET",
    path: &[Seg::Lit("status")],
    admin: false,
    handler: status,
  },
  Route {
    method: "GET",
    path: &[Seg::Lit("best")],
    admin: false,
    handler: best,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("rotate")],
    admin: true,
    handler: rotate,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("refresh-cache")],
    admin: true,
    handler: refresh_cache,
  },
  Route {
    method: "GET",
    path: &[Seg::Lit("rate-limit"), Seg::Key],
    admin: false,
    handler: rate_limit,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("reactivate"), Seg::Key],
    admin: true,
    handler: reactivate,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("reset-limits")],
    admin: true,
    handler: reset_limits,
  },
  Route {
    method: "GET",
    path: &[Seg::Lit("usage-stats")],
    admin: false,
    handler: usage_stats,
  },
  Route {
    method: "GET",
    path: &[Seg::Lit("openapi.json")],
    admin: false,
    handler: openapi,
  },
  Route {
    method: "GET",
    path: &[Seg::Lit("dashboard")],
    admin: false,
    handler: dashboard,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("add")],
    admin: true,
    handler: add_key,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("remove"), Seg::Key],
    admin: true,
    handler: remove_key,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("disable"), Seg::Key],
    admin: true,
    handler: disable_key,
  },
  Route {
    method: "POST",
    path: &[Seg::Lit("enable"), Seg::Key],
    admin: true,
    handler: enable_key,
  },
];

/// Serves a request whose path starts at the server root (`/api/keys/best?x=1`), and
/// [`METRICS_PATH`]. Other paths outside [`PREFIX`] are 404s.
pub fn route(pool: &KeyPool, guard: &AdminGuard, req: &ApiRequest<'_>) -> Reply {
  if split_query(req.target).0 == METRICS_PATH {
    return metrics(pool, req.method);
  }
  match strip_prefix(req.target) {
    Some(target) => route_mounted(pool, guard, &ApiRequest { target, ..*req }),
    None => not_found(pool, req.target),
  }
}

/// Serves a request whose path is relative to where the API is mounted (`/best?x=1` for
/// `/api/keys/best?x=1`), as an Express router sees it. Admin auth is checked here, so the server
/// and the Express adapter cannot differ on it.
pub fn route_mounted(pool: &KeyPool, guard: &AdminGuard, req: &ApiRequest<'_>) -> Reply {
  let ApiRequest {
    method,
    target,
    authorization,
    body,
  } = *req;
  let (path, query) = split_query(target);
  let segments = split_path(path);
  let Some(route) = ROUTES.iter().find(|r| shape_matches(r.path, &segments)) else {
    return not_found(pool, &format!("{PREFIX}{path}"));
  };
  if !accepts(route.method, method) {
    return method_not_allowed(route.method);
  }
  // Before the body and the key are looked at, so nobody unauthorized learns which keys exist.
  if route.admin {
    if let Err(denied) = guard.check(authorization) {
      return Reply::denied(denied);
    }
  }
  // No endpoint takes a body; one that is there must at least be well-formed JSON.
  if route.method == "POST"
    && !body.trim_ascii().is_empty()
    && serde_json::from_slice::<IgnoredAny>(body).is_err()
  {
    return Reply::error(
      400,
      "Invalid request body",
      "The request body must be empty or JSON",
    );
  }
  let key = match route.path.iter().position(|s| *s == Seg::Key) {
    Some(at) => {
      let raw = segments.get(at).copied().unwrap_or("");
      match percent_decode(raw, false) {
        Some(key) => key,
        None => {
          return Reply::error(
            400,
            "Invalid API key",
            "The API key in the path is not valid percent-encoded UTF-8",
          )
        }
      }
    }
    None => String::new(),
  };
  (route.handler)(pool, &Params { key, query, body })
}

/// Whether a route of `route_method` serves `method`: HEAD is GET without the body (the transport
/// leaves it out).
fn accepts(route_method: &str, method: &str) -> bool {
  method == route_method || (method == "HEAD" && route_method == "GET")
}

/// A 405 naming the methods the path takes.
fn method_not_allowed(route_method: &'static str) -> Reply {
  let allow = match route_method {
    "GET" => "GET, HEAD",
    other => other,
  };
  Reply {
    allow: Some(allow),
    ..Reply::error(
      405,
      "Method not allowed",
      &format!("This endpoint only accepts {allow}"),
    )
  }
}

/// `GET /metrics`: the pool's metrics in the Prometheus text format.
fn metrics(pool: &KeyPool, method: &str) -> Reply {
  if !accepts("GET", method) {
    return method_not_allowed("GET");
  }
  match pool.metrics() {
    Ok(snapshot) => Reply {
      status: 200,
      body: prometheus_text(&snapshot),
      content_type: PROMETHEUS_TEXT,
      allow: None,
      headers: Vec::new(),
    },
    Err(err) => Reply::pool_error(err, "Failed to get metrics"),
  }
}

/// `GET /openapi.json`: the description of every route of this table, [`METRICS_PATH`] included.
fn openapi(_: &KeyPool, _: &Params<'_>) -> Reply {
  Reply {
    status: 200,
    body: OPENAPI_JSON.to_owned(),
    content_type: JSON,
    allow: None,
    headers: Vec::new(),
  }
}

/// The range of a request (path from the server root) for usage statistics, when it is one and
/// its range is valid. Those may need a database query, which this synchronous table cannot make:
/// the server answers them with [`usage::usage_stats`] instead (the table's own handler reads the
/// in-memory call log).
pub fn usage_stats_request(method: &str, path_and_query: &str) -> Option<DateRange> {
  strip_prefix(path_and_query).and_then(|rest| usage_stats_request_mounted(method, rest))
}

/// [`usage_stats_request`] for a path relative to where the API is mounted.
pub fn usage_stats_request_mounted(method: &str, sub_path_and_query: &str) -> Option<DateRange> {
  // Checked on every request the server gets: no allocation until it is this one.
  let (path, query) = split_query(sub_path_and_query);
  let path = path.strip_prefix('/').unwrap_or(path);
  let path = path.strip_suffix('/').unwrap_or(path);
  (accepts("GET", method) && path.eq_ignore_ascii_case("usage-stats"))
    .then(|| date_range(query).ok())
    .flatten()
}

/// The request path fit for logs and error messages: the query is dropped (it is free text), and
/// any segment that is, or holds, a key is masked.
pub fn redact_path(pool: &KeyPool, path_and_query: &str) -> String {
  let (path, _) = split_query(path_and_query);
  let (head, sub) = match strip_prefix(path) {
    Some(sub) => (PREFIX, sub),
    None => ("", path),
  };
  let segments = split_path(sub);
  let pattern = ROUTES
    .iter()
    .find(|r| shape_matches(r.path, &segments))
    .map(|r| r.path);
  let names = pool.names();
  let mut out = String::from(head);
  for (i, raw) in segments.iter().enumerate() {
    out.push('/');
    let decoded = percent_decode(raw, false).unwrap_or_else(|| raw.to_string());
    if pattern.and_then(|p| p.get(i)) == Some(&Seg::Key) {
      let known = resolve_key_ref(pool, &decoded)
        .ok()
        .and_then(|index| names.get(index));
      out.push_str(&mask_key(known.unwrap_or(&decoded)));
    } else if pattern.is_none() && names.keys().iter().any(|k| decoded.contains(k.as_str())) {
      out.push_str(&mask_key(&decoded));
    } else {
      out.push_str(raw);
    }
  }
  if (path.ends_with('/') && !out.ends_with('/')) || out.is_empty() {
    out.push('/');
  }
  out
}

/// The path after [`PREFIX`], if the path is under it (`/api/keys`, `/api/keys/...`,
/// `/api/keys?...`).
fn strip_prefix(path_and_query: &str) -> Option<&str> {
  let rest = path_and_query.strip_prefix(PREFIX)?;
  (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then_some(rest)
}

fn split_query(path_and_query: &str) -> (&str, &str) {
  path_and_query
    .split_once('?')
    .unwrap_or((path_and_query, ""))
}

/// The segments of a path, ignoring the leading slash and one trailing slash, as Express's
/// non-strict routing does.
fn split_path(path: &str) -> Vec<&str> {
  let path = path.strip_prefix('/').unwrap_or(path);
  let path = path.strip_suffix('/').unwrap_or(path);
  if path.is_empty() {
    Vec::new()
  } else {
    path.split('/').collect()
  }
}

/// Whether `segments` fit `pattern`. A trailing `:apiKey` may be missing, so that
/// `/rate-limit/` reaches its handler and gets the SPEC's 400 rather than a 404. Literal segments
/// match case-insensitively, as Express's do by default.
fn shape_matches(pattern: &[Seg], segments: &[&str]) -> bool {
  let key_missing = segments.len() + 1 == pattern.len() && pattern.last() == Some(&Seg::Key);
  if segments.len() != pattern.len() && !key_missing {
    return false;
  }
  pattern.iter().zip(segments).all(|(p, s)| match p {
    Seg::Lit(lit) => lit.eq_ignore_ascii_case(s),
    Seg::Key => true,
  })
}

fn not_found(pool: &KeyPool, path: &str) -> Reply {
  Reply::error(
    404,
    "Not found",
    &format!("No endpoint at {}", redact_path(pool, path)),
  )
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in a query string). `None`
/// for a broken escape or a result that is not UTF-8.
fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
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

/// Runs `act` on the key the request's `:apiKey` names. A missing key is the SPEC's 400; an
/// unknown or ambiguous one, or a pool failure, is a reply with the route's `failure` message.
fn on_key(
  pool: &KeyPool,
  req: &Params<'_>,
  failure: &str,
  act: impl FnOnce(usize) -> Result<Reply, PoolError>,
) -> Reply {
  if req.key.trim().is_empty() {
    return Reply::error(400, "API key is required", "Please provide an API key");
  }
  let index = match resolve_key_ref(pool, &req.key) {
    Ok(index) => index,
    Err(err @ KeyRefError::NotFound) => return Reply::error(404, &err.to_string(), failure),
    // An ambiguous reference is a derived form several keys share, never a key: safe to quote.
    Err(err @ KeyRefError::Ambiguous { matches }) => {
      return Reply::error(
        409,
        &err.to_string(),
        &format!(
          "{failure}: {matches} keys have the masked form {}; name the key in full",
          req.key
        ),
      )
    }
  };
  act(index).unwrap_or_else(|err| Reply::pool_error(err, failure))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusMeta {
  total_keys: usize,
  active_keys: usize,
}

fn status(pool: &KeyPool, _: &Params<'_>) -> Reply {
  let statuses = match pool.statuses() {
    Ok(s) => s,
    Err(err) => return Reply::pool_error(err, "Failed to get API key status"),
  };
  let data: Vec<KeyStatusJson> = statuses.iter().map(KeyStatusJson::new).collect();
  let metadata = StatusMeta {
    total_keys: statuses.len(),
    active_keys: statuses.iter().filter(|s| s.figures.active).count(),
  };
  Reply::ok(
    Some(data),
    Some(metadata),
    "API key status retrieved successfully",
  )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BestData {
  api_key: String,
  availability_score: f64,
  total_available: usize,
  rotation_method: &'static str,
  last_used: IsoDate,
  limits: LimitsJson,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BestMeta {
  availability_score: f64,
  total_available: usize,
  rotation_method: &'static str,
}

fn best(pool: &KeyPool, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to get best available API key";
  let model = match model_param(pool, req.query, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  let picked = match pool.best(Claim::LookOnly, model) {
    Ok(p) => p,
    Err(err) => return Reply::no_key(pool, err, FAILURE, model),
  };
  let pick = picked.pick;
  let data = BestData {
    api_key: pool.masked(pick.index),
    availability_score: pick.score,
    total_available: pick.total_available,
    rotation_method: pick.method.as_str(),
    last_used: IsoDate(picked.figures.last_used),
    limits: (&picked.figures).into(),
  };
  let metadata = BestMeta {
    availability_score: pick.score,
    total_available: pick.total_available,
    rotation_method: pick.method.as_str(),
  };
  Reply::ok(
    Some(data),
    Some(metadata),
    "Best available API key retrieved successfully",
  )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RotateData {
  api_key: String,
  availability_score: f64,
  rotation_reason: &'static str,
  previous_key_score: Option<f64>,
  last_used: IsoDate,
  limits: LimitsJson,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RotateMeta {
  availability_score: f64,
  rotation_reason: &'static str,
  previous_key_score: Option<f64>,
  total_available: usize,
  rotation_method: &'static str,
}

fn rotate(pool: &KeyPool, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to rotate API key proactively";
  let model = match model_param(pool, req.query, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  let picked = match pool.rotate(Claim::LookOnly, model) {
    Ok(p) => p,
    Err(err) => return Reply::no_key(pool, err, FAILURE, model),
  };
  let rotation = picked.pick;
  let selection = rotation.selection;
  let data = RotateData {
    api_key: pool.masked(selection.index),
    availability_score: selection.score,
    rotation_reason: rotation.reason.as_str(),
    previous_key_score: rotation.previous_key_score,
    last_used: IsoDate(picked.figures.last_used),
    limits: (&picked.figures).into(),
  };
  let metadata = RotateMeta {
    availability_score: selection.score,
    rotation_reason: rotation.reason.as_str(),
    previous_key_score: rotation.previous_key_score,
    total_available: selection.total_available,
    rotation_method: selection.method.as_str(),
  };
  Reply::ok(Some(data), Some(metadata), "API key rotated proactively")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefreshMeta {
  cache_refreshed: bool,
  available_keys: usize,
}

fn refresh_cache(pool: &KeyPool, _: &Params<'_>) -> Reply {
  match pool.refresh_cache() {
    Ok(available_keys) => Reply::ok(
      None::<()>,
      Some(RefreshMeta {
        cache_refreshed: true,
        available_keys,
      }),
      "API key cache refreshed successfully",
    ),
    Err(err) => Reply::pool_error(err, "Failed to refresh cache"),
  }
}

fn rate_limit(pool: &KeyPool, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to get rate limit info";
  let model = match model_param(pool, req.query, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  on_key(pool, req, FAILURE, |index| {
    let info = pool.rate_limit_info(index, Some(model))?;
    let data: Vec<RateLimitInfoJson> = info.iter().map(RateLimitInfoJson::from).collect();
    Ok(Reply::ok(
      Some(data),
      None::<()>,
      "Rate limit info retrieved successfully",
    ))
  })
}

fn reactivate(pool: &KeyPool, req: &Params<'_>) -> Reply {
  on_key(pool, req, "Failed to reactivate API key", |index| {
    pool.reactivate(index)?;
    Ok(Reply::ok(
      None::<()>,
      None::<()>,
      "API key reactivated successfully",
    ))
  })
}

/// The body of `POST /add`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddKey {
  api_key: String,
  /// The project it belongs to, when known.
  project: Option<String>,
}

fn add_key(pool: &KeyPool, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to add API key";
  let body: AddKey = match serde_json::from_slice(req.body) {
    Ok(body) => body,
    Err(_) => {
      return Reply::error(
        400,
        "Invalid API key",
        "The body must be a JSON object { \"apiKey\": \"...\", \"project\"?: \"...\" }",
      )
    }
  };
  let added = pool
    .add_key(&body.api_key, body.project.as_deref())
    .and_then(|index| pool.status(index));
  match added {
    Ok(status) => Reply {
      status: 201,
      ..Reply::ok(
        Some(KeyStatusJson::new(&status)),
        None::<()>,
        "API key added successfully",
      )
    },
    // The message names no key: the one refused may be malformed in a way that shows it whole.
    Err(err) => Reply::pool_error(err, FAILURE),
  }
}

/// An operator's decision about the key the path names.
fn admit(pool: &KeyPool, req: &Params<'_>, admission: Admission) -> Reply {
  let (done, failure) = match admission {
    Admission::Removed => ("API key removed successfully", "Failed to remove API key"),
    Admission::Disabled => ("API key disabled successfully", "Failed to disable API key"),
    Admission::Enabled => ("API key enabled successfully", "Failed to enable API key"),
  };
  on_key(pool, req, failure, |index| {
    pool.admit(index, admission)?;
    Ok(Reply::ok(None::<()>, None::<()>, done))
  })
}

fn remove_key(pool: &KeyPool, req: &Params<'_>) -> Reply {
  admit(pool, req, Admission::Removed)
}

fn disable_key(pool: &KeyPool, req: &Params<'_>) -> Reply {
  admit(pool, req, Admission::Disabled)
}

fn enable_key(pool: &KeyPool, req: &Params<'_>) -> Reply {
  admit(pool, req, Admission::Enabled)
}

fn reset_limits(pool: &KeyPool, _: &Params<'_>) -> Reply {
  match pool.reset_all_limits() {
    Ok(()) => Reply::ok(
      None::<()>,
      None::<()>,
      "All API key limits reset successfully",
    ),
    Err(err) => Reply::pool_error(err, "Failed to reset API key limits"),
  }
}

/// The model a request's `?model=` names, else the default one. Only a model met already or in
/// the table of limits: an anonymous request must not fill the pool's table of models.
fn model_param(pool: &KeyPool, query: &str, message: &str) -> Result<ModelId, Reply> {
  let mut named = None;
  for pair in query.split('&').filter(|p| !p.is_empty()) {
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

/// Reads the optional `startDate` and `endDate` of a query string. A value that is not valid
/// percent-encoding counts as an invalid date.
fn date_range(query: &str) -> Result<DateRange, Reply> {
  const INVALID: &str = "\u{0}";
  let mut start = None;
  let mut end = None;
  for pair in query.split('&').filter(|p| !p.is_empty()) {
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    let (name, slot) = match percent_decode(name, true).as_deref() {
      Some("startDate") => ("startDate", &mut start),
      Some("endDate") => ("endDate", &mut end),
      _ => continue,
    };
    let text = percent_decode(value, true).unwrap_or_else(|| INVALID.to_owned());
    if slot.replace(text).is_some() {
      return Err(Reply::error(
        400,
        &format!("Invalid {name}"),
        &format!("{name} was given more than once"),
      ));
    }
  }
  usage::parse_range(start.as_deref(), end.as_deref())
}

/// Usage statistics from the in-memory call log (see [`usage_stats_request`] for the database).
fn usage_stats(pool: &KeyPool, req: &Params<'_>) -> Reply {
  match date_range(req.query) {
    Ok(range) => usage::from_memory(pool, range),
    Err(reply) => reply,
  }
}

/// The dashboard reads `GET /status` from the browser; the page itself holds no data.
fn dashboard(_: &KeyPool, _: &Params<'_>) -> Reply {
  Reply {
    status: 200,
    body: DASHBOARD_HTML.to_owned(),
    content_type: HTML_TYPE,
    allow: None,
    headers: owned(DASHBOARD_HEADERS),
  }
}

/// Checks `docs/openapi.json` against this table.
#[cfg(test)]
mod openapi_spec;

#[cfg(test)]
mod tests;
