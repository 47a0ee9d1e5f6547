//! Routing of the app's Gemini requests as JS starts it: the router over the pool's keys, the
//! revalidation of refused keys, which requests are routed and where, and the line that says
//! routing is on.

use std::sync::Arc;
use std::time::Duration;

use napi_derive::napi;

use crate::core::pool::KeyPool;
use crate::http::proxy::ROUTE_TOKEN_HEADER;
use crate::napi::errors::BindingError;
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::options::process_env;
use crate::routing::upstream::{DEFAULT_BASE_URL, KEY_HEADER};
use crate::routing::{RouteOptions, Router, Timeouts, Upstream, ROUTE_REQUESTS_ENV};

#[napi]
impl NativeKeyPool {
  /// A router of this pool's keys to `GEMINI_BASE_URL` (Google's endpoint by default), whose
  /// requests wait for a key with room as long as the `routeMaxWaitMs` option says.
  pub(super) fn router_from(&self, timeouts: Timeouts) -> Result<Router, BindingError> {
    let defaults = RouteOptions::default();
    let upstream = Upstream::from_env(&process_env, timeouts)?;
    let options = RouteOptions {
      max_wait: self.route_max_wait.unwrap_or(defaults.max_wait),
      ..defaults
    };
    Ok(Router::new(self.js.pool.clone(), upstream, options))
  }

  /// Says in the log, for the process's first pool that routes, that routing is on and how to
  /// switch it off; false when this pool is quiet, so that a later one may say it.
  #[napi]
  pub fn announce_routing(&self) -> bool {
    if self.quiet {
      return false;
    }
    self.log.info(&format!(
      "🔀 Gemini SDK requests with pool keys are routed through the key pool (routeRequests: \
       false or {ROUTE_REQUESTS_ENV}=false switches this off)"
    ));
    true
  }
}

/// Re-tests the keys Gemini refused every `interval_ms` (`GET /v1beta/models/{model}` at
/// `GEMINI_BASE_URL`) and brings back those it accepts, until the pool closes.
pub(super) fn revalidate(pool: &Arc<KeyPool>, interval_ms: f64) -> Result<(), BindingError> {
  let upstream = Upstream::from_env(&process_env, Timeouts::default())?;
  let interval = Duration::from_millis(interval_ms.ceil() as u64);
  napi::bindgen_prelude::spawn(crate::routing::revalidate::run(
    pool.clone(),
    upstream,
    interval,
  ));
  Ok(())
}

/// What lib/routing.js needs to know to pick out the app's Gemini requests and route them.
#[napi(object, object_from_js = false)]
pub struct GeminiRequests {
  /// Google's endpoint, whose requests are routed.
  pub google_origin: String,
  /// Where routed requests go: `GEMINI_BASE_URL` when set (its requests are routed too), else
  /// Google's endpoint.
  pub base_url: String,
  /// The header Gemini reads the key from.
  pub key_header: String,
  /// The header the routing server wants its token in.
  pub route_token_header: String,
}

/// See [`GeminiRequests`].
#[napi]
pub fn gemini_requests() -> GeminiRequests {
  GeminiRequests {
    google_origin: DEFAULT_BASE_URL.to_owned(),
    base_url: crate::routing::base_url(&process_env),
    key_header: KEY_HEADER.to_owned(),
    route_token_header: ROUTE_TOKEN_HEADER.to_owned(),
  }
}
