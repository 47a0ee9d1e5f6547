//! `GET /metrics`, from the server root: the pool's metrics in the Prometheus text format.

use super::params::Params;
use crate::http::reply::{Reply, PROMETHEUS_TEXT};
use crate::http::state::ApiState;
use crate::stats::metrics::prometheus_text;

pub(super) fn metrics(state: &ApiState, _: &Params<'_>) -> Reply {
  match state.pool().metrics() {
    Ok(snapshot) => Reply::text(200, prometheus_text(&snapshot), PROMETHEUS_TEXT),
    Err(err) => Reply::pool_error(err, "Failed to get metrics"),
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::pool::Claim;
  use crate::http::routes::testing::*;
  use crate::routing::JSON_CONTENT_TYPE;

  #[test]
  fn metrics_are_served_in_the_prometheus_text_format() {
    let s = state();
    let p = s.pool();
    p.best(
      Claim::Reserve {
        estimated_tokens: 0,
      },
      0,
    )
    .unwrap();
    let reply = open_route(&s, "GET", "/metrics", b"");
    assert_eq!((reply.status, reply.content_type), (200, PROMETHEUS_TEXT));
    assert!(reply
      .body
      .contains("gemini_key_manager_keys_handed_out_total 1\n"));
    assert!(reply.body.contains("key=\"AIzaSyAA...0001\""));
    for key in KEYS {
      assert!(!reply.body.contains(key));
    }
    let reply = open_route(&s, "POST", "/metrics?x=1", b"");
    assert_eq!((reply.status, reply.allow), (405, Some("GET, HEAD")));
    assert_eq!(open_route(&s, "HEAD", "/metrics", b"").status, 200);
    // From the server root, exactly as scrapers ask for it.
    for other in ["/metrics/", "/METRICS", "/api/keys/metrics"] {
      assert_eq!(open_route(&s, "GET", other, b"").status, 404, "{other}");
    }
    assert_eq!(
      open_route(&s, "GET", "/api/keys/best", b"").content_type,
      JSON_CONTENT_TYPE
    );
  }
}
