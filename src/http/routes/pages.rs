//! The two documents the API serves as they are kept: the live dashboard (`GET /dashboard`, one
//! page with its CSS and JS inline) and the OpenAPI description (`GET /openapi.json`).

use super::params::Params;
use crate::http::reply::{owned, Reply, HTML};
use crate::http::state::ApiState;
use crate::routing::JSON_CONTENT_TYPE;

/// The live dashboard.
const DASHBOARD_HTML: &str = include_str!("../dashboard.html");
/// The OpenAPI description of this API, every route of the table and [`super::METRICS_PATH`].
pub(super) const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");
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

/// The page reads `GET /status` from the browser; it holds no data itself.
pub(super) fn dashboard(_: &ApiState, _: &Params<'_>) -> Reply {
  Reply {
    headers: owned(DASHBOARD_HEADERS),
    ..Reply::text(200, DASHBOARD_HTML.to_owned(), HTML)
  }
}

pub(super) fn openapi(_: &ApiState, _: &Params<'_>) -> Reply {
  Reply::text(200, OPENAPI_JSON.to_owned(), JSON_CONTENT_TYPE)
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::http::routes::testing::*;

  #[test]
  fn the_dashboard_is_one_html_page_that_loads_nothing_from_outside() {
    let s = state();
    let r = open_route(&s, "GET", "/api/keys/dashboard", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, HTML);
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
      open_route(&s, "POST", "/api/keys/dashboard", b"").status,
      405
    );
  }
}
