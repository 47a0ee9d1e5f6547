//! The HTTP API's one route table (SPEC section 4): which method and path reach which handler, with
//! admin auth, the body and the `:apiKey` segment checked here once for every route. The hyper
//! server, the N-API router and so the Express adapter all dispatch through it, so they cannot
//! drift apart. Handlers live by concern in the files below this one; most answer at once from the
//! pool, and those that wait on I/O (usage statistics read from MongoDB) return a future.

mod keys;
mod metrics;
mod operators;
mod pages;
mod params;
mod status;
mod usage;

use std::future::Future;
use std::pin::Pin;

use serde::de::IgnoredAny;

use super::auth::AdminGuard;
use super::key_ref::resolve_key_ref;
use super::reply::Reply;
use super::state::ApiState;
use crate::mask::mask_key;
use params::{percent_decode, Params};
pub use usage::{parse_range, KeyUsageStats, UsageStats, UsageStatsError, UsageStatsMeta};
use Handler::{Io, Now};
use Seg::{Key, Lit};

/// Where the API is served when the whole request path is given.
pub const PREFIX: &str = "/api/keys";

/// Where the Prometheus text format is served, from the server root.
pub const METRICS_PATH: &str = "/metrics";

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

/// A reply still on its way: a handler waiting on I/O.
pub type PendingReply<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// What the table answers: a reply at once, or one that waits on I/O. Only the routes that need I/O
/// are ever pending, so the others cost no allocation and no task.
pub enum Routed<'a> {
  /// Answered.
  Ready(Reply),
  /// To be awaited, on a runtime that may wait.
  Pending(PendingReply<'a>),
}

impl Routed<'_> {
  /// The reply, once it is there.
  pub async fn reply(self) -> Reply {
    match self {
      Routed::Ready(reply) => reply,
      Routed::Pending(pending) => pending.await,
    }
  }
}

/// One segment of a route's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
  Lit(&'static str),
  /// `:apiKey`: a full key or a form derived from it (see [`super::key_ref`]).
  Key,
}

/// Where a route's path starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoutePath {
  /// Under the mount point ([`PREFIX`] on the server). Segments match as Express's do: literal ones
  /// in any case, with one trailing slash or without.
  Mounted(&'static [Seg]),
  /// From the server root, exactly: the Express adapter, mounted elsewhere, never serves these.
  Root(&'static str),
}

/// How a handler answers.
#[derive(Clone, Copy)]
enum Handler {
  /// From the pool, at once.
  Now(fn(&ApiState, &Params<'_>) -> Reply),
  /// Possibly after I/O; at once when it needs none.
  Io(for<'s> fn(&'s ApiState, &Params<'_>) -> Routed<'s>),
}

struct Route {
  method: &'static str,
  path: RoutePath,
  /// Changes state, so needs the admin token when one is set.
  admin: bool,
  handler: Handler,
}

impl Route {
  /// A route under the mount point, open to all.
  const fn open(method: &'static str, path: &'static [Seg], handler: Handler) -> Self {
    Self {
      method,
      path: RoutePath::Mounted(path),
      admin: false,
      handler,
    }
  }

  /// A route under the mount point that wants the admin token.
  const fn admin(method: &'static str, path: &'static [Seg], handler: Handler) -> Self {
    Self {
      admin: true,
      ..Self::open(method, path, handler)
    }
  }

  /// A route from the server root, open to all.
  const fn root(method: &'static str, path: &'static str, handler: Handler) -> Self {
    Self {
      method,
      path: RoutePath::Root(path),
      admin: false,
      handler,
    }
  }

  /// The segments of a route under the mount point.
  fn mounted(&self) -> Option<&'static [Seg]> {
    match self.path {
      RoutePath::Mounted(segments) => Some(segments),
      RoutePath::Root(_) => None,
    }
  }
}

/// The table. Every path has one method, so a 405's `Allow` is that route's method.
const ROUTES: &[Route] = &[
  Route::open("GET", &[Lit("status")], Now(status::status)),
  Route::open("GET", &[Lit("best")], Now(keys::best)),
  Route::admin("POST", &[Lit("rotate")], Now(keys::rotate)),
  Route::admin("POST", &[Lit("refresh-cache")], Now(keys::refresh_cache)),
  Route::open("GET", &[Lit("rate-limit"), Key], Now(status::rate_limit)),
  Route::admin(
    "POST",
    &[Lit("reactivate"), Key],
    Now(operators::reactivate),
  ),
  Route::admin("POST", &[Lit("reset-limits")], Now(operators::reset_limits)),
  Route::open("GET", &[Lit("usage-stats")], Io(usage::usage_stats)),
  Route::open("GET", &[Lit("openapi.json")], Now(pages::openapi)),
  Route::open("GET", &[Lit("dashboard")], Now(pages::dashboard)),
  Route::admin("POST", &[Lit("add")], Now(operators::add_key)),
  Route::admin("POST", &[Lit("remove"), Key], Now(operators::remove_key)),
  Route::admin("POST", &[Lit("disable"), Key], Now(operators::disable_key)),
  Route::admin("POST", &[Lit("enable"), Key], Now(operators::enable_key)),
  Route::root("GET", METRICS_PATH, Now(metrics::metrics)),
];

/// Serves a request whose path starts at the server root (`/api/keys/best?x=1`, `/metrics`).
/// Other paths outside [`PREFIX`] are 404s.
pub fn route<'s>(state: &'s ApiState, guard: &AdminGuard, req: &ApiRequest<'_>) -> Routed<'s> {
  if let Some(target) = strip_prefix(req.target) {
    return route_mounted(state, guard, &ApiRequest { target, ..*req });
  }
  let (path, query) = split_query(req.target);
  match ROUTES
    .iter()
    .find(|r| matches!(r.path, RoutePath::Root(root) if root == path))
  {
    Some(route) => serve(state, guard, route, &[], query, req),
    None => Routed::Ready(not_found(state, req.target)),
  }
}

/// Serves a request whose path is relative to where the API is mounted (`/best?x=1` for
/// `/api/keys/best?x=1`), as an Express router sees it.
pub fn route_mounted<'s>(
  state: &'s ApiState,
  guard: &AdminGuard,
  req: &ApiRequest<'_>,
) -> Routed<'s> {
  let (path, query) = split_query(req.target);
  let segments = split_path(path);
  let found = ROUTES
    .iter()
    .find(|r| r.mounted().is_some_and(|p| shape_matches(p, &segments)));
  match found {
    Some(route) => serve(state, guard, route, &segments, query, req),
    None => Routed::Ready(not_found(state, &format!("{PREFIX}{path}"))),
  }
}

/// Checks what every route checks, in this order, then calls the route's handler. Admin auth is
/// checked here, so the server and the Express adapter cannot differ on it.
fn serve<'s>(
  state: &'s ApiState,
  guard: &AdminGuard,
  route: &Route,
  segments: &[&str],
  query: &str,
  req: &ApiRequest<'_>,
) -> Routed<'s> {
  match checked_params(guard, route, segments, query, req) {
    Ok(params) => match route.handler {
      Now(handler) => Routed::Ready(handler(state, &params)),
      Io(handler) => handler(state, &params),
    },
    Err(reply) => Routed::Ready(reply),
  }
}

/// The handler's parameters, or the reply that refuses the request.
fn checked_params<'r>(
  guard: &AdminGuard,
  route: &Route,
  segments: &[&str],
  query: &'r str,
  req: &ApiRequest<'r>,
) -> Result<Params<'r>, Reply> {
  if !accepts(route.method, req.method) {
    return Err(Reply::method_not_allowed(route.method));
  }
  // Before the body and the key are looked at, so nobody unauthorized learns which keys exist.
  if route.admin {
    guard.check(req.authorization).map_err(Reply::denied)?;
  }
  // No endpoint takes a body; one that is there must at least be well-formed JSON.
  if route.method == "POST"
    && !req.body.trim_ascii().is_empty()
    && serde_json::from_slice::<IgnoredAny>(req.body).is_err()
  {
    return Err(Reply::error(
      400,
      "Invalid request body",
      "The request body must be empty or JSON",
    ));
  }
  let key = match route
    .mounted()
    .and_then(|p| p.iter().position(|s| *s == Key))
  {
    Some(at) => {
      percent_decode(segments.get(at).copied().unwrap_or(""), false).ok_or_else(|| {
        Reply::error(
          400,
          "Invalid API key",
          "The API key in the path is not valid percent-encoded UTF-8",
        )
      })?
    }
    None => String::new(),
  };
  Ok(Params {
    key,
    query,
    body: req.body,
  })
}

/// Whether a route of `route_method` serves `method`: HEAD is GET without the body (the transport
/// leaves it out).
fn accepts(route_method: &str, method: &str) -> bool {
  method == route_method || (method == "HEAD" && route_method == "GET")
}

/// The request path fit for logs and error messages: the query is dropped (it is free text), and
/// any segment that is, or holds, a key is masked.
pub fn redact_path(state: &ApiState, path_and_query: &str) -> String {
  let (path, _) = split_query(path_and_query);
  let (head, sub) = match strip_prefix(path) {
    Some(sub) => (PREFIX, sub),
    None => ("", path),
  };
  let segments = split_path(sub);
  let pattern = ROUTES
    .iter()
    .filter_map(Route::mounted)
    .find(|p| shape_matches(p, &segments));
  let names = state.pool().names();
  let mut out = String::from(head);
  for (i, raw) in segments.iter().enumerate() {
    out.push('/');
    let decoded = percent_decode(raw, false).unwrap_or_else(|| raw.to_string());
    if pattern.and_then(|p| p.get(i)) == Some(&Key) {
      let known = resolve_key_ref(state, &decoded)
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
  let key_missing = segments.len() + 1 == pattern.len() && pattern.last() == Some(&Key);
  if segments.len() != pattern.len() && !key_missing {
    return false;
  }
  pattern.iter().zip(segments).all(|(p, s)| match p {
    Lit(lit) => lit.eq_ignore_ascii_case(s),
    Key => true,
  })
}

fn not_found(state: &ApiState, path: &str) -> Reply {
  Reply::error(
    404,
    "Not found",
    &format!("No endpoint at {}", redact_path(state, path)),
  )
}

/// Checks `docs/openapi.json` against this table.
#[cfg(test)]
mod openapi_spec;

#[cfg(test)]
pub(super) mod testing;

#[cfg(test)]
mod tests;
