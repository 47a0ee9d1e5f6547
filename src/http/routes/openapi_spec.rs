//! `docs/openapi.json` cannot fall behind the route table: every route is described with its
//! method, admin routes (and only they) with the bearer scheme and a 401, and the file is what
//! `GET /api/keys/openapi.json` serves.

use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::core::clock::FakeClock;
use crate::core::config::PoolConfig;
use crate::core::quota::Quota;
use crate::log::SilentLog;

fn spec() -> Value {
  serde_json::from_str(OPENAPI_JSON).expect("docs/openapi.json is JSON")
}

/// The spec's path for a route: `:apiKey` as `{apiKey}`.
fn spec_path(route: &Route) -> String {
  let mut path = PREFIX.to_owned();
  for seg in route.path {
    path.push('/');
    match seg {
      Seg::Lit(lit) => path.push_str(lit),
      Seg::Key => path.push_str("{apiKey}"),
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
    assert_eq!(key_param, route.path.contains(&Seg::Key), "{path}: apiKey");
  }
  assert!(
    spec["paths"][METRICS_PATH]["get"].is_object(),
    "{METRICS_PATH} is not in docs/openapi.json"
  );
  assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_spec_is_served_as_it_is_kept() {
  let config = PoolConfig::of(
    vec!["AIzaSyOPEN0000000000000000000000000000001".to_owned()],
    Quota::default(),
  );
  let pool = KeyPool::new(config, Arc::new(FakeClock::at(0)), Arc::new(SilentLog)).unwrap();
  // Open to all, like the other reading routes, even with an admin token set.
  let reply = route(
    &pool,
    &AdminGuard::with_token("t0ken").unwrap(),
    &ApiRequest {
      method: "GET",
      target: "/api/keys/openapi.json",
      authorization: None,
      body: b"",
    },
  );
  assert_eq!((reply.status, reply.content_type), (200, JSON));
  assert_eq!(reply.body, OPENAPI_JSON);
}
