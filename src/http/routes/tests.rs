use serde_json::Value;

use super::{redact_path, ApiRequest, PREFIX};
use crate::core::pool::testing::TestPool;
use crate::core::quota::Quota;
use crate::http::reply::{owned, CHALLENGE_MISSING, CHALLENGE_WRONG};
use crate::http::routes::testing::*;
use crate::http::AdminGuard;

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
  let s = state();
  for path in [
    "/api/keys",
    "/api/keys/",
    "/api/keys/nope",
    "/api/keysx/status",
    "/status",
    "/",
  ] {
    let (status, v) = get(&s, path);
    assert_eq!(status, 404, "{path}");
    assert_eq!(v["error"], "Not found");
  }
  let reply = open_route(&s, "GET", "/api/keys/rotate", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("POST")));
  let reply = open_route(&s, "POST", "/api/keys/best", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
  // HEAD is GET (the transport drops the body); not the other methods.
  assert_eq!(open_route(&s, "HEAD", "/api/keys/status", b"").status, 200);
  assert_eq!(open_route(&s, "HEAD", "/api/keys/rotate", b"").status, 405);
  let reply = open_route(&s, "DELETE", "/api/keys/reactivate/x", b"");
  assert_eq!((reply.status, reply.allow), (405, Some("POST")));
  assert_eq!(open_route(&s, "GET", "/api/keys/best", b"").allow, None);
}

#[test]
fn admin_routes_want_the_token_when_one_is_set() {
  let s = state();
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
      let r = routed(
        &s,
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
    let r = routed(
      &s,
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
      routed_mounted(&s, &guard, &req("POST", sub, b"")).status,
      401
    );
  }
  // Unauthorized requests learn nothing about keys or bodies.
  let r = routed(
    &s,
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
      routed(&s, &guard, &req("GET", path, b"")).status,
      200,
      "{path}"
    );
  }
}

/// SPEC section 4's messages, which operators' scripts match on, endpoint by endpoint.
#[test]
fn every_endpoint_says_what_the_old_controller_said() {
  let s = state();
  let p = s.pool();
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
    let (status, v) = call(&s, method, &with_key, "");
    assert_eq!(
      (status, v["message"].as_str()),
      (200, Some(message)),
      "{path}"
    );
  }
  // No key in the path: the SPEC's 400.
  for (method, path) in [("GET", "/rate-limit/"), ("POST", "/reactivate/")] {
    let (status, v) = call(&s, method, &format!("/api/keys{path}"), "");
    assert_eq!(status, 400);
    assert_eq!(v["error"], "API key is required");
    assert_eq!(v["message"], "Please provide an API key");
  }
  // Unknown keys, then a pool that fails every call: each endpoint's failure message.
  for (method, path, message) in [
    ("GET", "/rate-limit/nope", "Failed to get rate limit info"),
    ("POST", "/reactivate/nope", "Failed to reactivate API key"),
  ] {
    let (status, v) = call(&s, method, &format!("/api/keys{path}"), "");
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
    let (status, v) = call(&s, method, &format!("/api/keys{path}"), "");
    assert_eq!(
      (status, v["message"].as_str()),
      (500, Some(message)),
      "{path}"
    );
    assert_eq!(v["error"], "API key manager is closed");
  }
}

#[test]
fn key_routes_refuse_missing_unknown_and_ambiguous_keys() {
  let s = state();
  for path in [
    "/api/keys/rate-limit",
    "/api/keys/rate-limit/",
    "/api/keys/rate-limit/%20",
  ] {
    let (status, v) = get(&s, path);
    assert_eq!(status, 400, "{path}");
    assert_eq!(v["error"], "API key is required");
  }
  let (status, v) = post(&s, "/api/keys/reactivate/AIzaSyZZ...9999");
  assert_eq!(status, 404);
  assert_eq!(v["error"], "API key not found");
  let (status, _) = get(&s, "/api/keys/rate-limit/a%E2%28b");
  assert_eq!(status, 400);
  let (status, _) = get(&s, "/api/keys/rate-limit/a%2");
  assert_eq!(status, 400);

  // Two keys with one mask: the mask names neither.
  let twins = [
    "AIzaSyTWIN-first-key-0000000000000000000",
    "AIzaSyTWIN-other-key-0000000000000000000",
  ];
  let s = state_of(TestPool::new(&twins, Quota::default()));
  let (status, v) = get(&s, "/api/keys/rate-limit/AIzaSyTW...0000");
  assert_eq!(status, 409);
  assert_eq!(v["error"], "Ambiguous API key");
  assert_eq!(
    v["message"],
    "Failed to get rate limit info: 2 keys have the masked form AIzaSyTW...0000; name the key in \
     full"
  );
  let (status, _) = get(&s, &format!("/api/keys/rate-limit/{}", twins[1]));
  assert_eq!(status, 200);
}

#[test]
fn full_keys_in_unknown_paths_are_masked_in_the_message() {
  let s = state();
  let (status, v) = get(&s, &format!("/api/keys/{}/x?key={}", KEYS[0], KEYS[1]));
  assert_eq!(status, 404);
  assert_eq!(v["message"], "No endpoint at /api/keys/AIzaSyAA...0001/x");
  let (_, v) = get(&s, &format!("/v1/models?key={}", KEYS[1]));
  assert_eq!(v["message"], "No endpoint at /v1/models");
}

#[test]
fn redact_path_masks_key_segments_and_drops_the_query() {
  let s = state();
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
    assert_eq!(redact_path(&s, &path), want, "{path}");
  }
}

#[test]
fn post_bodies_must_be_empty_or_json() {
  let s = state();
  assert_eq!(call(&s, "POST", "/api/keys/rotate", " {} ").0, 200);
  assert_eq!(call(&s, "POST", "/api/keys/rotate", "\n").0, 200);
  let (status, v) = call(&s, "POST", "/api/keys/rotate", "{oops");
  assert_eq!(status, 400);
  assert_eq!(v["error"], "Invalid request body");
  // GET bodies are not looked at.
  assert_eq!(call(&s, "GET", "/api/keys/best", "{oops").0, 200);
}

#[test]
fn pool_failures_are_500_with_the_pool_message() {
  let s = state();
  let p = s.pool();
  p.close();
  let (status, v) = get(&s, "/api/keys/status");
  assert_eq!(status, 500);
  assert_eq!(v["error"], "API key manager is closed");
}

#[test]
fn mounted_paths_reach_the_same_table() {
  let s = state();
  let reply = open_mounted(&s, "GET", "/best?x=1", b"");
  assert_eq!(reply.status, 200);
  assert_eq!(open_mounted(&s, "GET", "/STATUS/", b"").status, 200);
  assert_eq!(open_mounted(&s, "GET", "/api/keys/status", b"").status, 404);
  assert_eq!(open_mounted(&s, "GET", "", b"").status, 404);
}
