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
mod tests {
  use std::sync::Arc;

  use serde_json::{json, Value};

  use super::*;
  use crate::core::clock::{FakeClock, Millis};
  use crate::core::config::PoolConfig;
  use crate::core::pool::Outcome;
  use crate::core::quota::{LimitType, Quota, DEFAULT_MODEL};
  use crate::log::SilentLog;

  const T0: Millis = 1_700_000_000_000;
  const T0_ISO: &str = "2023-11-14T22:13:20.000Z";
  const KEYS: [&str; 3] = [
    "AIzaSyAAAA0000000000000000000000000000001",
    "AIzaSyBBBB0000000000000000000000000000002",
    "AIzaSyCCCC0000000000000000000000000000003",
  ];

  fn pool_of(keys: &[&str], quota: Quota) -> (KeyPool, FakeClock) {
    let clock = FakeClock::at(T0);
    let config = PoolConfig::of(keys.iter().map(|k| k.to_string()).collect(), quota);
    let pool = KeyPool::new(config, Arc::new(clock.clone()), Arc::new(SilentLog)).unwrap();
    (pool, clock)
  }

  fn pool() -> KeyPool {
    pool_of(&KEYS, Quota::default()).0
  }

  fn req<'a>(method: &'a str, target: &'a str, body: &'a [u8]) -> ApiRequest<'a> {
    ApiRequest {
      method,
      target,
      authorization: None,
      body,
    }
  }

  /// The table with no admin token set.
  fn open_route(pool: &KeyPool, method: &str, target: &str, body: &[u8]) -> Reply {
    route(pool, &AdminGuard::open(), &req(method, target, body))
  }

  fn open_mounted(pool: &KeyPool, method: &str, target: &str, body: &[u8]) -> Reply {
    route_mounted(pool, &AdminGuard::open(), &req(method, target, body))
  }

  /// Calls the table and checks what every reply must satisfy: JSON with `success`, and no full
  /// key anywhere.
  fn call(pool: &KeyPool, method: &str, path: &str, body: &str) -> (u16, Value) {
    let reply = open_route(pool, method, path, body.as_bytes());
    for key in pool.names().keys() {
      assert!(!reply.body.contains(key.as_str()), "{path}: {}", reply.body);
    }
    let value: Value = serde_json::from_str(&reply.body).unwrap();
    let succeeded = (200..300).contains(&reply.status);
    assert_eq!(value["success"], json!(succeeded), "{}", reply.body);
    if !succeeded {
      assert!(value["error"].is_string() && value["message"].is_string());
    }
    (reply.status, value)
  }

  fn get(pool: &KeyPool, path: &str) -> (u16, Value) {
    call(pool, "GET", path, "")
  }

  fn post(pool: &KeyPool, path: &str) -> (u16, Value) {
    call(pool, "POST", path, "")
  }

  fn field_names(v: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    names.sort_unstable();
    names
  }

  /// The first RPD reset after T0: midnight in Los Angeles.
  fn midnight() -> Millis {
    crate::core::calendar::DailyReset::PacificMidnight.next_reset(T0)
  }

  fn window(current: u64, limit: u64, reset: Millis) -> Value {
    json!({ "current": current, "limit": limit, "resetTime": IsoDate(reset).to_string() })
  }

  #[test]
  fn status_lists_every_key_masked_with_iso_dates() {
    let p = pool();
    let (status, v) = get(&p, "/api/keys/status");
    assert_eq!(status, 200);
    assert_eq!(field_names(&v), ["data", "message", "metadata", "success"]);
    assert_eq!(v["metadata"], json!({ "totalKeys": 3, "activeKeys": 3 }));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(
      data[0],
      json!({
        "apiKey": "AIzaSyAA...0001",
        "isActive": true,
        "state": "active",
        "lastUsed": T0_ISO,
        "limits": {
          "rpm": window(0, 30, T0),
          "rpd": window(0, 200, midnight()),
          "tpm": window(0, 1_000_000, T0),
        },
        "errorCount": 0,
        "project": null,
        "models": {
          DEFAULT_MODEL: {
            "state": "active",
            "stateUntil": null,
            "availabilityScore": 1.0,
            "rpm": window(0, 30, T0),
            "rpd": window(0, 200, midnight()),
            "tpm": window(0, 1_000_000, T0),
          },
        },
      })
    );
  }

  #[test]
  fn status_and_usage_show_each_project_and_model_met() {
    let p = pool();
    let index = p
      .add_key("AIzaSyAA00000000000000000000000proj", Some("alpha"))
      .unwrap();
    let flash = p.model_id("gemini-2.0-flash").unwrap();
    let picked = p
      .best(
        Claim::Reserve {
          estimated_tokens: 0,
        },
        flash,
      )
      .unwrap();
    p.record_usage(picked.pick.index, 40, Outcome::Success, 1.0, Some(flash))
      .unwrap();
    let (_, v) = get(&p, "/api/keys/status");
    let shown = &v["data"][picked.pick.index];
    assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["current"], 1);
    assert_eq!(shown["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
    assert_eq!(shown["models"]["gemini-2.0-flash"]["rpm"]["limit"], 15);
    // The default model's figures stay in `limits`, untouched by the other model's call.
    assert_eq!(shown["limits"]["rpm"]["current"], 0);
    assert_eq!(v["data"][index]["project"], "alpha");
    let (_, usage) = get(&p, "/api/keys/usage-stats");
    let row = &usage["data"][picked.pick.index];
    assert_eq!(row["models"]["gemini-2.0-flash"]["tpm"]["current"], 40);
    assert_eq!(usage["data"][index]["project"], "alpha");
  }

  #[test]
  fn status_shows_a_resting_key_and_until_when() {
    let p = pool();
    p.handle_rate_limit(2, LimitType::Rpm, Some(17_000), None)
      .unwrap();
    let (_, v) = get(&p, "/api/keys/status");
    assert_eq!(v["data"][2]["state"], "resting");
    assert_eq!(v["data"][2]["stateUntil"], IsoDate(T0 + 17_000).to_string());
    assert_eq!(v["data"][2]["isActive"], true);
  }

  #[test]
  fn status_shows_the_last_error_with_keys_scrubbed_out() {
    let p = pool();
    let error = format!("fetch https://g/?key={} failed", KEYS[1]);
    p.record_usage(1, 0, Outcome::Failure(&error), 0.0, None)
      .unwrap();
    let (_, v) = get(&p, "/api/keys/status");
    let key = &v["data"][1];
    assert_eq!(key["errorCount"], 1);
    assert_eq!(
      key["lastError"],
      "fetch https://g/?key=AIzaSyBB...0002 failed"
    );
    assert_eq!(key["lastErrorTime"], T0_ISO);
  }

  #[test]
  fn best_hands_out_masked_keys_round_robin() {
    let p = pool();
    let (status, v) = get(&p, "/api/keys/best");
    assert_eq!(status, 200);
    assert_eq!(
      v["message"],
      "Best available API key retrieved successfully"
    );
    let data = &v["data"];
    assert_eq!(
      field_names(data),
      [
        "apiKey",
        "availabilityScore",
        "lastUsed",
        "limits",
        "rotationMethod",
        "totalAvailable"
      ]
    );
    assert_eq!(data["apiKey"], "AIzaSyAA...0001");
    assert_eq!(data["availabilityScore"], 1.0);
    assert_eq!(data["totalAvailable"], 3);
    assert_eq!(data["rotationMethod"], "round-robin");
    assert_eq!(data["lastUsed"], T0_ISO);
    // Nothing counted: capacity is free now.
    assert_eq!(data["limits"]["rpm"], window(0, 30, T0));
    assert_eq!(
      v["metadata"],
      json!({ "availabilityScore": 1.0, "totalAvailable": 3, "rotationMethod": "round-robin" })
    );
    let (_, v) = get(&p, "/api/keys/best");
    assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
    assert_eq!(v["data"]["rotationMethod"], "cached-round-robin");
  }

  #[test]
  fn rotate_always_gives_a_string_reason() {
    let p = pool();
    let (status, v) = post(&p, "/api/keys/rotate");
    assert_eq!(status, 200);
    assert_eq!(v["message"], "API key rotated proactively");
    assert_eq!(
      field_names(&v["data"]),
      [
        "apiKey",
        "availabilityScore",
        "lastUsed",
        "limits",
        "previousKeyScore",
        "rotationReason"
      ]
    );
    assert_eq!(v["data"]["rotationReason"], "not-needed");
    assert_eq!(v["data"]["previousKeyScore"], Value::Null);
    assert_eq!(v["metadata"]["rotationReason"], "not-needed");

    let quota = Quota {
      rpm: 10,
      rpd: 10,
      tpm: 1000,
    };
    let (p, _) = pool_of(&KEYS[..2], quota);
    for _ in 0..9 {
      p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
    }
    let (_, v) = post(&p, "/api/keys/rotate");
    assert_eq!(v["data"]["rotationReason"], "proactive-rotation");
    assert_eq!(v["data"]["apiKey"], "AIzaSyBB...0002");
    assert!(v["data"]["previousKeyScore"].as_f64().unwrap() < 0.3);
    assert_eq!(
      v["metadata"]["previousKeyScore"],
      v["data"]["previousKeyScore"]
    );

    let (p, _) = pool_of(&KEYS[..1], quota);
    for _ in 0..9 {
      p.record_usage(0, 0, Outcome::Success, 0.0, None).unwrap();
    }
    let (_, v) = post(&p, "/api/keys/rotate");
    assert_eq!(v["data"]["rotationReason"], "no-key-above-threshold");
  }

  #[test]
  fn refresh_cache_reports_the_available_keys() {
    let p = pool();
    p.handle_rate_limit(2, LimitType::Rpd, None, None).unwrap();
    let (status, v) = post(&p, "/api/keys/refresh-cache");
    assert_eq!(status, 200);
    assert_eq!(
      v,
      json!({
        "success": true,
        "metadata": { "cacheRefreshed": true, "availableKeys": 2 },
        "message": "API key cache refreshed successfully",
      })
    );
  }

  #[test]
  fn rate_limit_takes_a_full_masked_or_encoded_key() {
    let p = pool();
    p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
    for path in [
      format!("/api/keys/rate-limit/{}", KEYS[1]),
      "/api/keys/rate-limit/AIzaSyBB...0002".to_owned(),
      "/api/keys/rate-limit/AIzaSyBB%2E%2E%2E0002/".to_owned(),
    ] {
      let (status, v) = get(&p, &path);
      assert_eq!(status, 200, "{path}");
      assert_eq!(v["message"], "Rate limit info retrieved successfully");
      assert_eq!(
        v["data"],
        json!([
          // Resting a whole minute: the upstream said RPM is used up, though we counted nothing.
          { "type": "RPM", "current": 0, "limit": 30, "resetTime": IsoDate(T0 + 60_000).to_string(), "isLimited": true },
          { "type": "RPD", "current": 0, "limit": 200, "resetTime": IsoDate(midnight()).to_string(), "isLimited": false },
          { "type": "TPM", "current": 0, "limit": 1_000_000, "resetTime": IsoDate(T0).to_string(), "isLimited": false },
        ])
      );
    }
  }

  #[test]
  fn reactivate_brings_a_key_back() {
    let p = pool();
    p.record_usage(
      0,
      0,
      Outcome::Failure("[400 Bad Request] API key not valid. API_KEY_INVALID"),
      0.0,
      None,
    )
    .unwrap();
    assert!(!p.figures(0).unwrap().active);
    let (status, v) = post(&p, "/api/keys/reactivate/AIzaSyAA...0001");
    assert_eq!(status, 200);
    assert_eq!(
      v,
      json!({ "success": true, "message": "API key reactivated successfully" })
    );
    assert!(p.figures(0).unwrap().active);
  }

  #[test]
  fn reset_limits_clears_every_window() {
    let p = pool();
    p.handle_rate_limit(0, LimitType::Tpm, None, None).unwrap();
    let (status, v) = post(&p, "/api/keys/reset-limits");
    assert_eq!(status, 200);
    assert_eq!(
      v,
      json!({ "success": true, "message": "All API key limits reset successfully" })
    );
    assert_eq!(p.figures(0).unwrap().tpm.current, 0);
  }

  #[test]
  fn usage_stats_lists_usage_as_fractions() {
    let p = pool();
    p.record_usage(0, 1234, Outcome::Success, 0.0, None)
      .unwrap();
    p.record_usage(2, 0, Outcome::Failure("quota"), 0.0, None)
      .unwrap();
    let (status, v) = get(&p, "/api/keys/usage-stats");
    assert_eq!(status, 200);
    assert_eq!(v["message"], "Usage statistics retrieved successfully");
    assert_eq!(v["metadata"]["startDate"], Value::Null);
    assert_eq!(v["metadata"]["endDate"], Value::Null);
    assert_eq!(v["metadata"]["totalKeys"], 3);
    assert_eq!(v["metadata"]["source"], "memory");
    assert_eq!(
      v["data"][0],
      json!({
        "apiKey": "AIzaSyAA...0001",
        "isActive": true,
        "lastUsed": T0_ISO,
        "rpmUsage": "1/30",
        "rpdUsage": "1/200",
        "tpmUsage": "1234/1000000",
        "errorCount": 0,
        "lastError": null,
        "project": null,
        "models": {
          DEFAULT_MODEL: {
            "state": "active",
            "stateUntil": null,
            "availabilityScore": v["data"][0]["models"][DEFAULT_MODEL]["availabilityScore"],
            // When the slice holding T0 has left the rolling window (its slices and margin).
            "rpm": window(1, 30, T0 + 60_079),
            "rpd": window(1, 200, midnight()),
            "tpm": window(1234, 1_000_000, T0 + 60_079),
          },
        },
        "removed": false,
        "requests": 1,
        "successes": 1,
        "failures": 0,
        "errorRate": 0.0,
        "tokens": 1234,
        "p50ResponseTime": 0.0,
        "p95ResponseTime": 0.0,
      })
    );
    assert_eq!(v["data"][2]["lastError"], "quota");
  }

  #[test]
  fn metrics_are_served_in_the_prometheus_text_format() {
    let p = pool();
    p.best(
      Claim::Reserve {
        estimated_tokens: 0,
      },
      0,
    )
    .unwrap();
    let reply = open_route(&p, "GET", "/metrics", b"");
    assert_eq!((reply.status, reply.content_type), (200, PROMETHEUS_TEXT));
    assert!(reply
      .body
      .contains("gemini_key_manager_keys_handed_out_total 1\n"));
    assert!(reply.body.contains("key=\"AIzaSyAA...0001\""));
    for key in KEYS {
      assert!(!reply.body.contains(key));
    }
    let reply = open_route(&p, "POST", "/metrics?x=1", b"");
    assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
    assert_eq!(open_route(&p, "HEAD", "/metrics", b"").status, 200);
    assert_eq!(
      open_route(&p, "GET", "/api/keys/best", b"").content_type,
      JSON
    );
  }

  #[test]
  fn usage_stats_computes_figures_over_the_range_from_the_call_log() {
    let (p, clock) = pool_of(&KEYS, Quota::default());
    p.record_usage(0, 100, Outcome::Success, 10.0, None)
      .unwrap();
    clock.advance(1_000);
    p.record_usage(0, 50, Outcome::Success, 30.0, None).unwrap();
    p.record_usage(1, 0, Outcome::Failure("503"), 20.0, None)
      .unwrap();
    let (_, v) = get(&p, "/api/keys/usage-stats");
    let a = &v["data"][0];
    assert_eq!(
      (
        &a["requests"],
        &a["tokens"],
        &a["p50ResponseTime"],
        &a["p95ResponseTime"]
      ),
      (&json!(2), &json!(150), &json!(10.0), &json!(30.0))
    );
    assert_eq!(v["data"][1]["errorRate"], 1.0);
    assert_eq!(v["data"][2]["p50ResponseTime"], Value::Null);
    assert_eq!(
      v["metadata"]["totals"],
      json!({
        "requests": 3, "successes": 2, "failures": 1, "errorRate": 1.0 / 3.0, "tokens": 150,
        "p50ResponseTime": 20.0, "p95ResponseTime": 30.0,
      })
    );
    assert_eq!(v["metadata"]["callLogCapacity"], 10_000);
    assert_eq!(v["metadata"]["truncated"], false);
    // From T0 + 1 s on: the first call is left out.
    let later = "/api/keys/usage-stats?startDate=1700000001000";
    let (_, v) = get(&p, later);
    assert_eq!(v["data"][0]["requests"], 1);
    assert_eq!(v["metadata"]["totals"]["requests"], 2);
    assert_eq!(
      usage_stats_request("GET", later),
      Some(DateRange::new(Some(T0 + 1_000), None).unwrap())
    );
    assert_eq!(
      usage_stats_request_mounted("GET", "/usage-stats/"),
      Some(DateRange::ALL)
    );
    for (method, path) in [
      ("GET", "/api/keys/usage-stats?startDate=bad"),
      ("POST", "/api/keys/usage-stats"),
      ("GET", "/api/keys/status"),
    ] {
      assert_eq!(usage_stats_request(method, path), None, "{method} {path}");
    }
  }

  #[test]
  fn usage_stats_reads_and_echoes_the_date_range() {
    let p = pool();
    let (status, v) = get(
      &p,
      "/api/keys/usage-stats?startDate=2026-11-27&endDate=2026-11-27T20%3A30%3A42.123%2B02%3A00",
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["metadata"]["startDate"], "2026-11-27T00:00:00.000Z");
    assert_eq!(v["metadata"]["endDate"], "2026-11-27T18:30:42.123Z");
    let (_, v) = get(&p, "/api/keys/usage-stats?endDate=1700000000000&x=1");
    assert_eq!(v["metadata"]["startDate"], Value::Null);
    assert_eq!(v["metadata"]["endDate"], T0_ISO);

    for (query, error) in [
      ("startDate=yesterday", "Invalid startDate"),
      ("endDate=", "Invalid endDate"),
      ("startDate=2026-02-30", "Invalid startDate"),
      ("startDate=%ZZ", "Invalid startDate"),
      ("startDate=1&startDate=2", "Invalid startDate"),
      (
        "startDate=2026-11-28&endDate=2026-11-27",
        "Invalid date range",
      ),
    ] {
      let (status, v) = get(&p, &format!("/api/keys/usage-stats?{query}"));
      assert_eq!(status, 400, "{query}");
      assert_eq!(v["error"], error, "{query}");
    }
  }

  #[test]
  fn a_model_param_names_a_known_model_and_never_adds_an_unknown_one() {
    let p = pool();
    let (status, v) = get(&p, "/api/keys/best?model=gemini-2.0-flash");
    assert_eq!(status, 200, "{v}");
    let path = format!(
      "/api/keys/rate-limit/{}?model=models%2Fgemini-2.0-flash",
      KEYS[0]
    );
    let (status, v) = get(&p, &path);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["limit"], 15);
    for path in [
      "/api/keys/best?model=gemini-9-ultra",
      "/api/keys/rotate?model=gemini-9-ultra",
      "/api/keys/best?model=a%20b",
      "/api/keys/best?model=gemini-2.0-flash&model=gemini-2.0-flash",
    ] {
      let (status, v) = call(
        &p,
        if path.contains("rotate") {
          "POST"
        } else {
          "GET"
        },
        path,
        "",
      );
      assert_eq!(status, 400, "{path}: {v}");
      assert!(!v["error"].as_str().unwrap().contains("ultra"), "{v}");
    }
    // Only the default model and the one in the table were met.
    let (_, v) = get(&p, "/api/keys/status");
    let models: Vec<&String> = v["data"][0]["models"].as_object().unwrap().keys().collect();
    assert_eq!(models, ["gemini-2.0-flash", DEFAULT_MODEL], "by name");
  }

  #[test]
  fn unknown_paths_are_404_and_wrong_methods_405() {
    let p = pool();
    for path in [
      "/api/keys",
      "/api/keys/",
      "/api/keys/nope",
      "/api/keysx/status",
      "/status",
      "/",
    ] {
      let (status, v) = get(&p, path);
      assert_eq!(status, 404, "{path}");
      assert_eq!(v["error"], "Not found");
    }
    let reply = open_route(&p, "GET", "/api/keys/rotate", b"");
    assert_eq!((reply.status, reply.allow), (405, Some("POST")));
    let reply = open_route(&p, "POST", "/api/keys/best", b"");
    assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
    // HEAD is GET (the transport drops the body); not the other methods.
    assert_eq!(open_route(&p, "HEAD", "/api/keys/status", b"").status, 200);
    assert_eq!(open_route(&p, "HEAD", "/api/keys/rotate", b"").status, 405);
    let reply = open_route(&p, "DELETE", "/api/keys/reactivate/x", b"");
    assert_eq!((reply.status, reply.allow), (405, Some("POST")));
    assert_eq!(open_route(&p, "GET", "/api/keys/best", b"").allow, None);
  }

  #[test]
  fn admin_routes_want_the_token_when_one_is_set() {
    let p = pool();
    let guard = AdminGuard::with_token("admin-s3cret").unwrap();
    let admin = [
      "/api/keys/rotate",
      "/api/keys/refresh-cache",
      "/api/keys/reactivate/AIzaSyAA...0001",
      "/api/keys/reset-limits",
    ];
    for path in admin {
      for (authorization, challenge) in [
        (None, CHALLENGE_MISSING),
        (Some("Bearer wrong"), CHALLENGE_WRONG),
        (Some("Basic YWRtaW4="), CHALLENGE_MISSING),
        (Some("Bearer admin-s3cret-"), CHALLENGE_WRONG),
      ] {
        let r = route(
          &p,
          &guard,
          &ApiRequest {
            authorization,
            ..req("POST", path, b"")
          },
        );
        assert_eq!(r.status, 401, "{path} {authorization:?}");
        assert_eq!(r.headers, owned(challenge));
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"], "Unauthorized");
      }
      let r = route(
        &p,
        &guard,
        &ApiRequest {
          authorization: Some("Bearer admin-s3cret"),
          ..req("POST", path, b"")
        },
      );
      assert_eq!(r.status, 200, "{path}: {}", r.body);
      // Mounted (Express) paths are guarded the same way.
      let sub = path.strip_prefix(PREFIX).unwrap();
      assert_eq!(
        route_mounted(&p, &guard, &req("POST", sub, b"")).status,
        401
      );
    }
    // Unauthorized requests learn nothing about keys or bodies.
    let r = route(
      &p,
      &guard,
      &req("POST", "/api/keys/reactivate/AIzaSyZZ...9999", b"{oops"),
    );
    assert_eq!(r.status, 401);
    // Reading needs no token.
    for path in [
      "/api/keys/status",
      "/api/keys/best",
      "/api/keys/rate-limit/AIzaSyAA...0001",
      "/api/keys/usage-stats",
      "/api/keys/dashboard",
    ] {
      assert_eq!(
        route(&p, &guard, &req("GET", path, b"")).status,
        200,
        "{path}"
      );
    }
  }

  #[test]
  fn the_dashboard_is_one_html_page_that_loads_nothing_from_outside() {
    let p = pool();
    let r = open_route(&p, "GET", "/api/keys/dashboard", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, HTML_TYPE);
    assert!(r.body.starts_with("<!doctype html>"));
    let csp = &r
      .headers
      .iter()
      .find(|(name, _)| *name == "content-security-policy")
      .unwrap()
      .1;
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    for outside in ["http://", "https://", "//cdn", "src=\"", "@import"] {
      assert!(!r.body.contains(outside), "{outside}");
    }
    assert_eq!(
      open_route(&p, "POST", "/api/keys/dashboard", b"").status,
      405
    );
  }

  /// SPEC section 4's messages, which operators' scripts match on, endpoint by endpoint.
  #[test]
  fn every_endpoint_says_what_the_old_controller_said() {
    let p = pool();
    let key = "/AIzaSyAA...0001";
    for (method, path, message) in [
      ("GET", "/status", "API key status retrieved successfully"),
      (
        "GET",
        "/best",
        "Best available API key retrieved successfully",
      ),
      ("POST", "/rotate", "API key rotated proactively"),
      (
        "POST",
        "/refresh-cache",
        "API key cache refreshed successfully",
      ),
      (
        "GET",
        "/rate-limit",
        "Rate limit info retrieved successfully",
      ),
      ("POST", "/reactivate", "API key reactivated successfully"),
      (
        "POST",
        "/reset-limits",
        "All API key limits reset successfully",
      ),
      (
        "GET",
        "/usage-stats",
        "Usage statistics retrieved successfully",
      ),
    ] {
      let with_key = if path.ends_with("limit") || path.ends_with("reactivate") {
        format!("/api/keys{path}{key}")
      } else {
        format!("/api/keys{path}")
      };
      let (status, v) = call(&p, method, &with_key, "");
      assert_eq!(
        (status, v["message"].as_str()),
        (200, Some(message)),
        "{path}"
      );
    }
    // No key in the path: the SPEC's 400.
    for (method, path) in [("GET", "/rate-limit/"), ("POST", "/reactivate/")] {
      let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
      assert_eq!(status, 400);
      assert_eq!(v["error"], "API key is required");
      assert_eq!(v["message"], "Please provide an API key");
    }
    // Unknown keys, then a pool that fails every call: each endpoint's failure message.
    for (method, path, message) in [
      ("GET", "/rate-limit/nope", "Failed to get rate limit info"),
      ("POST", "/reactivate/nope", "Failed to reactivate API key"),
    ] {
      let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
      assert_eq!(
        (status, v["message"].as_str()),
        (404, Some(message)),
        "{path}"
      );
    }
    p.close();
    for (method, path, message) in [
      ("GET", "/status", "Failed to get API key status"),
      ("GET", "/best", "Failed to get best available API key"),
      ("POST", "/rotate", "Failed to rotate API key proactively"),
      ("POST", "/refresh-cache", "Failed to refresh cache"),
      ("POST", "/reset-limits", "Failed to reset API key limits"),
      ("GET", "/usage-stats", "Failed to get usage statistics"),
    ] {
      let (status, v) = call(&p, method, &format!("/api/keys{path}"), "");
      assert_eq!(
        (status, v["message"].as_str()),
        (500, Some(message)),
        "{path}"
      );
      assert_eq!(v["error"], "API key manager is closed");
    }
  }

  const NEW_KEY: &str = "AIzaSyNEWK0000000000000000000000000000004";

  fn add(pool: &KeyPool, body: &str) -> (u16, Value) {
    let (status, v) = call(pool, "POST", "/api/keys/add", body);
    assert!(!v.to_string().contains(NEW_KEY), "{v}");
    (status, v)
  }

  #[test]
  fn keys_are_added_removed_disabled_and_enabled_without_a_restart() {
    let p = pool();
    let (status, v) = add(&p, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
    assert_eq!(status, 201);
    assert_eq!(v["message"], "API key added successfully");
    assert_eq!(v["data"]["apiKey"], "AIzaSyNE...0004");
    assert_eq!(v["data"]["isActive"], true);
    let (_, v) = get(&p, "/api/keys/status");
    assert_eq!(v["metadata"]["totalKeys"], 4);
    // It is handed out like the others.
    let handed: Vec<usize> = (0..8)
      .map(|_| {
        p.best(
          Claim::Reserve {
            estimated_tokens: 0,
          },
          0,
        )
        .unwrap()
        .pick
        .index
      })
      .collect();
    assert!(handed.contains(&3), "{handed:?}");

    // Disabled: listed, inactive, never handed out; enabled: back.
    let (status, v) = post(&p, "/api/keys/disable/AIzaSyNE...0004");
    assert_eq!(
      (status, v["message"].as_str()),
      (200, Some("API key disabled successfully"))
    );
    let (_, v) = get(&p, "/api/keys/status");
    assert_eq!(v["data"][3]["state"], "disabled");
    assert_eq!(v["data"][3]["isActive"], false);
    assert_eq!(v["metadata"]["activeKeys"], 3);
    p.refresh_cache().unwrap();
    for _ in 0..8 {
      assert_ne!(
        p.best(
          Claim::Reserve {
            estimated_tokens: 0
          },
          0
        )
        .unwrap()
        .pick
        .index,
        3
      );
    }
    let (status, v) = post(&p, &format!("/api/keys/enable/{NEW_KEY}"));
    assert_eq!(
      (status, v["message"].as_str()),
      (200, Some("API key enabled successfully"))
    );
    assert_eq!(get(&p, "/api/keys/status").1["data"][3]["state"], "active");

    // Removed: gone from every listing and lookup; its position stays, and adding it again
    // brings it back there.
    let (status, v) = post(&p, "/api/keys/remove/AIzaSyAA...0001");
    assert_eq!(
      (status, v["message"].as_str()),
      (200, Some("API key removed successfully"))
    );
    let (_, v) = get(&p, "/api/keys/status");
    assert_eq!(v["metadata"]["totalKeys"], 3);
    assert!(!v.to_string().contains("AIzaSyAA...0001"));
    let (status, v) = get(&p, "/api/keys/rate-limit/AIzaSyAA...0001");
    assert_eq!(
      (status, v["error"].as_str()),
      (404, Some("API key not found"))
    );
    let (status, _) = post(&p, "/api/keys/remove/AIzaSyAA...0001");
    assert_eq!(status, 404);
    let (status, _) = add(&p, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[0]));
    assert_eq!(status, 201);
    assert_eq!(p.names().position(KEYS[0]), Some(0));
    assert_eq!(get(&p, "/api/keys/status").1["metadata"]["totalKeys"], 4);
  }

  #[test]
  fn adding_refuses_duplicates_malformed_keys_and_bodies_with_clear_errors() {
    let p = pool();
    let (status, v) = add(&p, &format!(r#"{{"apiKey":"{}"}}"#, KEYS[1]));
    assert_eq!(
      (status, v["error"].as_str()),
      (409, Some("API key already exists"))
    );
    assert_eq!(v["message"], "Failed to add API key");
    for bad in [
      r#""""#,
      r#""two words""#,
      r#""a,b""#,
      r#""project:key""#,
      r#""tab\tkey""#,
    ] {
      let (status, v) = add(&p, &format!(r#"{{"apiKey":{bad}}}"#));
      assert_eq!(status, 400, "{bad}");
      assert!(
        v["error"]
          .as_str()
          .unwrap()
          .starts_with("Invalid API key: "),
        "{v}"
      );
    }
    let long = "k".repeat(513);
    assert_eq!(add(&p, &format!(r#"{{"apiKey":"{long}"}}"#)).0, 400);
    for body in ["", "{}", "[]", r#"{"apiKey":5}"#, r#"{"key":"x"}"#] {
      let (status, v) = add(&p, body);
      assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("Invalid API key")),
        "{body}"
      );
    }
    assert_eq!(add(&p, "not json").1["error"], "Invalid request body");
    // A pool that cannot keep an added key says why, and changes nothing.
    p.refuse_additions(Some("no secret to seal it under".into()));
    let (status, v) = add(&p, &format!(r#"{{"apiKey":"{NEW_KEY}"}}"#));
    assert_eq!(status, 409);
    assert_eq!(
      v["error"],
      "API key cannot be stored: no secret to seal it under"
    );
    assert_eq!(p.names().len(), 3);
  }

  #[test]
  fn key_management_wants_the_admin_token() {
    let p = pool();
    let guard = AdminGuard::with_token("the-admin-token").unwrap();
    for (path, body) in [
      ("/api/keys/add", format!(r#"{{"apiKey":"{NEW_KEY}"}}"#)),
      ("/api/keys/disable/AIzaSyAA...0001", String::new()),
      ("/api/keys/enable/AIzaSyAA...0001", String::new()),
      ("/api/keys/remove/AIzaSyAA...0001", String::new()),
    ] {
      let refused = route(&p, &guard, &req("POST", path, body.as_bytes()));
      assert_eq!(refused.status, 401, "{path}");
      let allowed = route(
        &p,
        &guard,
        &ApiRequest {
          authorization: Some("Bearer the-admin-token"),
          ..req("POST", path, body.as_bytes())
        },
      );
      assert!(allowed.status < 300, "{path}: {}", allowed.body);
    }
  }

  #[test]
  fn key_routes_refuse_missing_unknown_and_ambiguous_keys() {
    let p = pool();
    for path in [
      "/api/keys/rate-limit",
      "/api/keys/rate-limit/",
      "/api/keys/rate-limit/%20",
    ] {
      let (status, v) = get(&p, path);
      assert_eq!(status, 400, "{path}");
      assert_eq!(v["error"], "API key is required");
    }
    let (status, v) = post(&p, "/api/keys/reactivate/AIzaSyZZ...9999");
    assert_eq!(status, 404);
    assert_eq!(v["error"], "API key not found");
    let (status, _) = get(&p, "/api/keys/rate-limit/a%E2%28b");
    assert_eq!(status, 400);
    let (status, _) = get(&p, "/api/keys/rate-limit/a%2");
    assert_eq!(status, 400);

    // Two keys with one mask: the mask names neither.
    let twins = [
      "AIzaSyTWIN-first-key-0000000000000000000",
      "AIzaSyTWIN-other-key-0000000000000000000",
    ];
    let (p, _) = pool_of(&twins, Quota::default());
    let (status, v) = get(&p, "/api/keys/rate-limit/AIzaSyTW...0000");
    assert_eq!(status, 409);
    assert_eq!(v["error"], "Ambiguous API key");
    assert_eq!(
      v["message"],
      "Failed to get rate limit info: 2 keys have the masked form AIzaSyTW...0000; name the key in \
       full"
    );
    let (status, _) = get(&p, &format!("/api/keys/rate-limit/{}", twins[1]));
    assert_eq!(status, 200);
  }

  #[test]
  fn full_keys_in_unknown_paths_are_masked_in_the_message() {
    let p = pool();
    let (status, v) = get(&p, &format!("/api/keys/{}/x?key={}", KEYS[0], KEYS[1]));
    assert_eq!(status, 404);
    assert_eq!(v["message"], "No endpoint at /api/keys/AIzaSyAA...0001/x");
    let (_, v) = get(&p, &format!("/v1/models?key={}", KEYS[1]));
    assert_eq!(v["message"], "No endpoint at /v1/models");
  }

  #[test]
  fn redact_path_masks_key_segments_and_drops_the_query() {
    let p = pool();
    let cases = [
      (
        format!("/api/keys/rate-limit/{}", KEYS[2]),
        "/api/keys/rate-limit/AIzaSyCC...0003",
      ),
      (
        "/api/keys/rate-limit/AIzaSyCC...0003".to_owned(),
        "/api/keys/rate-limit/AIzaSyCC...0003",
      ),
      (
        "/api/keys/reactivate/not-a-key-but-long?x=1".to_owned(),
        "/api/keys/reactivate/not-a-ke...long",
      ),
      ("/api/keys/best?startDate=1".to_owned(), "/api/keys/best"),
      (format!("/other/k{}/", KEYS[0]), "/other/kAIzaSyA...0001/"),
      ("/".to_owned(), "/"),
    ];
    for (path, want) in cases {
      assert_eq!(redact_path(&p, &path), want, "{path}");
    }
  }

  #[test]
  fn post_bodies_must_be_empty_or_json() {
    let p = pool();
    assert_eq!(call(&p, "POST", "/api/keys/rotate", " {} ").0, 200);
    assert_eq!(call(&p, "POST", "/api/keys/rotate", "\n").0, 200);
    let (status, v) = call(&p, "POST", "/api/keys/rotate", "{oops");
    assert_eq!(status, 400);
    assert_eq!(v["error"], "Invalid request body");
    // GET bodies are not looked at.
    assert_eq!(call(&p, "GET", "/api/keys/best", "{oops").0, 200);
  }

  #[test]
  fn busy_keys_are_a_429_with_retry_after_and_no_usable_key_a_503() {
    let (p, clock) = pool_of(&KEYS[..2], Quota::default());
    p.handle_rate_limit(0, LimitType::Rpm, Some(12_300), None)
      .unwrap();
    p.handle_rate_limit(1, LimitType::Rpm, Some(17_000), None)
      .unwrap();
    clock.advance(300);
    for (method, path, message) in [
      (
        "GET",
        "/api/keys/best",
        "Failed to get best available API key",
      ),
      (
        "POST",
        "/api/keys/rotate",
        "Failed to rotate API key proactively",
      ),
    ] {
      let reply = open_route(&p, method, path, b"");
      assert_eq!(reply.status, 429, "{path}");
      // 12 s from now, the first key's rest ends.
      assert_eq!(reply.headers, vec![("retry-after", "12".to_owned())]);
      let v: Value = serde_json::from_str(&reply.body).unwrap();
      assert_eq!(v["error"], "No active API keys available");
      assert_eq!(v["message"], message);
      assert_eq!(v["nextAvailableAt"], IsoDate(T0 + 12_300).to_string());
    }
    p.record_usage(0, 0, Outcome::Failure("API_KEY_INVALID"), 0.0, None)
      .unwrap();
    p.admit(1, Admission::Disabled).unwrap();
    let (status, v) = get(&p, "/api/keys/best");
    assert_eq!(status, 503);
    assert_eq!(v["nextAvailableAt"], Value::Null);
  }

  #[test]
  fn pool_failures_are_500_with_the_pool_message() {
    let p = pool();
    p.close();
    let (status, v) = get(&p, "/api/keys/status");
    assert_eq!(status, 500);
    assert_eq!(v["error"], "API key manager is closed");
  }

  #[test]
  fn mounted_paths_reach_the_same_table() {
    let p = pool();
    let reply = open_mounted(&p, "GET", "/best?x=1", b"");
    assert_eq!(reply.status, 200);
    assert_eq!(open_mounted(&p, "GET", "/STATUS/", b"").status, 200);
    assert_eq!(open_mounted(&p, "GET", "/api/keys/status", b"").status, 404);
    assert_eq!(open_mounted(&p, "GET", "", b"").status, 404);
  }
}
