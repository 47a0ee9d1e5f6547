//! `docs/openapi.json` cannot fall behind the route table: every route is described with its
//! method, admin routes (and only they) with the bearer scheme and a 401, and the file is what
//! `GET /api/keys/openapi.json` serves.

use serde_json::Value;

use super::pages::OPENAPI_JSON;
use super::testing::{ready, req, state};
use super::*;
use crate::routing::JSON_CONTENT_TYPE;

fn spec() -> Value {
  serde_json::from_str(OPENAPI_JSON).expect("docs/openapi.json is JSON")
}

/// The spec's path for a route: from the server root, `:apiKey` as `{apiKey}`.
fn spec_path(route: &Route) -> String {
  let segments = match route.path {
    RoutePath::Root(path) => return path.to_owned(),
    RoutePath::Mounted(segments) => segments,
  };
  let mut path = PREFIX.to_owned();
  for seg in segments {
    path.push('/');
    match seg {
      Lit(lit) => path.push_str(lit),
      Key => path.push_str("{apiKey}"),
    }
  }
  path
}

#[test]
fn every_route_is_described_with_its_method_and_auth() {
  let spec = spec();
  for route in ROUTES {
    let path = spec_path(route);
    let method = route.method.to_ascii_lowercase();
    let op = &spec["paths"][&path][&method];
    assert!(
      op.is_object(),
      "{} {path} is not in docs/openapi.json",
      route.method
    );
    let secured = op["security"] == serde_json::json!([{ "adminToken": [] }]);
    assert_eq!(secured, route.admin, "{path}: security");
    assert_eq!(
      op["responses"]["401"].is_object(),
      route.admin,
      "{path}: 401"
    );
    let key_param = op["parameters"].as_array().is_some_and(|ps| {
      ps.iter()
        .any(|p| p["$ref"] == "#/components/parameters/apiKey")
    });
    let takes_key = route.mounted().is_some_and(|p| p.contains(&Key));
    assert_eq!(key_param, takes_key, "{path}: apiKey");
  }
  assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_spec_is_served_as_it_is_kept() {
  // Open to all, like the other reading routes, even with an admin token set.
  let guard = AdminGuard::with_token("t0ken").unwrap();
  let reply = ready(route(
    &state(),
    &guard,
    &req("GET", "/api/keys/openapi.json", b""),
  ));
  assert_eq!((reply.status, reply.content_type), (200, JSON_CONTENT_TYPE));
  assert_eq!(reply.body, OPENAPI_JSON);
}
