//! Routing of the app's Gemini requests as JS starts it: the router over the pool's keys, the
//! revalidation of refused keys, and where and whether requests are routed.

use std::time::Duration;

use napi_derive::napi;

use crate::core::config::js_number;
use crate::napi::errors::bad_input;
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::options::{millis_option, process_env};
use crate::routing::{RouteOptions, Router, Timeouts, Upstream};

#[napi]
impl NativeKeyPool {
  /// A router of this pool's keys to `GEMINI_BASE_URL` (Google's endpoint by default).
  pub(super) fn router_from(
    &self,
    max_wait_ms: Option<f64>,
    timeouts: Timeouts,
  ) -> napi::Result<Router> {
    let defaults = RouteOptions::default();
    let upstream = Upstream::from_env(&process_env, timeouts)?;
    let options = RouteOptions {
      max_wait: match max_wait_ms {
        Some(ms) if ms.is_finite() && ms >= 0.0 => Duration::from_millis(ms as u64),
        Some(ms) => Err(bad_input(format!(
          "routeMaxWaitMs must be a non-negative number of milliseconds (got {})",
          js_number(ms)
        )))?,
        None => defaults.max_wait,
      },
      ..defaults
    };
    Ok(Router::new(self.js.pool.clone(), upstream, options))
  }

  /// Re-tests the keys Gemini refused every `intervalMs` (`GET /v1beta/models/{model}` at
  /// `GEMINI_BASE_URL`) and brings back those it accepts, until the pool closes.
  #[napi]
  pub fn revalidate(&self, interval_ms: f64) -> napi::Result<()> {
    let interval = millis_option("revalidateIntervalMs", Some(interval_ms), Duration::ZERO)?;
    let upstream = Upstream::from_env(&process_env, Timeouts::default())?;
    let pool = self.js.pool.clone();
    napi::bindgen_prelude::spawn(crate::routing::revalidate::run(pool, upstream, interval));
    Ok(())
  }
}

/// Where routed Gemini requests go: `GEMINI_BASE_URL` when set, else Google's endpoint.
#[napi]
pub fn gemini_base_url() -> String {
  crate::routing::base_url(&process_env)
}

/// Whether a manager routes the app's Gemini requests: `explicit` when given, else
/// `KEY_MANAGER_ROUTE_REQUESTS`, else yes. Throws on a value of the variable that is no boolean.
#[napi]
pub fn route_requests(explicit: Option<bool>) -> napi::Result<bool> {
  Ok(crate::routing::route_requests(explicit, &process_env)?)
}
