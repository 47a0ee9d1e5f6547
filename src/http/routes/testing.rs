//! What the route table's tests share: a state over the shared test pool, and calls through the
//! table that check what every reply must satisfy.

use serde_json::{json, Value};

use super::{route, route_mounted, ApiRequest, Routed};
use crate::core::clock::Millis;
use crate::core::pool::testing::{TestPool, T0};
use crate::core::quota::Quota;
use crate::http::json::IsoDate;
use crate::http::reply::Reply;
use crate::http::state::ApiState;
use crate::http::AdminGuard;

/// Three keys of distinct masked forms.
pub const KEYS: [&str; 3] = [
  "AIzaSyAAAA0000000000000000000000000000001",
  "AIzaSyBBBB0000000000000000000000000000002",
  "AIzaSyCCCC0000000000000000000000000000003",
];

/// The state over [`KEYS`] with the default quota.
pub fn state() -> ApiState {
  state_of(TestPool::new(&KEYS, Quota::default()))
}

/// The state over a test pool, with no store attached.
pub fn state_of(test: TestPool) -> ApiState {
  ApiState::new(test.shared())
}

/// A request with no `Authorization` header.
pub fn req<'a>(method: &'a str, target: &'a str, body: &'a [u8]) -> ApiRequest<'a> {
  ApiRequest {
    method,
    target,
    authorization: None,
    body,
  }
}

/// The reply of a route that needs no I/O, as every route does without a store.
pub fn ready(routed: Routed<'_>) -> Reply {
  match routed {
    Routed::Ready(reply) => reply,
    Routed::Pending(_) => panic!("the route waits on I/O without a store"),
  }
}

/// The table, behind `guard`.
pub fn routed(state: &ApiState, guard: &AdminGuard, req: &ApiRequest<'_>) -> Reply {
  ready(route(state, guard, req))
}

/// [`routed`] for a path relative to the mount point.
pub fn routed_mounted(state: &ApiState, guard: &AdminGuard, req: &ApiRequest<'_>) -> Reply {
  ready(route_mounted(state, guard, req))
}

/// The table, with no admin token set.
pub fn open_route(state: &ApiState, method: &str, target: &str, body: &[u8]) -> Reply {
  routed(state, &AdminGuard::open(), &req(method, target, body))
}

/// [`open_route`] for a path relative to the mount point.
pub fn open_mounted(state: &ApiState, method: &str, target: &str, body: &[u8]) -> Reply {
  routed_mounted(state, &AdminGuard::open(), &req(method, target, body))
}

/// Calls the table and checks what every reply must satisfy: JSON with `success`, and no full
/// key anywhere.
pub fn call(state: &ApiState, method: &str, path: &str, body: &str) -> (u16, Value) {
  let reply = open_route(state, method, path, body.as_bytes());
  for key in state.pool().names().keys() {
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

/// [`call`] with `GET` and no body.
pub fn get(state: &ApiState, path: &str) -> (u16, Value) {
  call(state, "GET", path, "")
}

/// [`call`] with `POST` and no body.
pub fn post(state: &ApiState, path: &str) -> (u16, Value) {
  call(state, "POST", path, "")
}

/// The field names of a JSON object, sorted.
pub fn field_names(v: &Value) -> Vec<&str> {
  let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
  names.sort_unstable();
  names
}

/// The first RPD reset after T0: midnight in Los Angeles.
pub fn midnight() -> Millis {
  crate::core::calendar::DailyReset::PacificMidnight.next_reset(T0)
}

/// A window as replies show it.
pub fn window(current: u64, limit: u64, reset: Millis) -> Value {
  json!({ "current": current, "limit": limit, "resetTime": IsoDate(reset).to_string() })
}
