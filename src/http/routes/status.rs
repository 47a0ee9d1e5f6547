//! What the keys stand at: `GET /status` (every key, masked) and `GET /rate-limit/:apiKey` (one
//! key's windows).

use serde::Serialize;

use super::params::Params;
use crate::http::json::{KeyStatusJson, RateLimitInfoJson};
use crate::http::reply::Reply;
use crate::http::state::ApiState;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusMeta {
  total_keys: usize,
  active_keys: usize,
}

pub(super) fn status(state: &ApiState, _: &Params<'_>) -> Reply {
  let statuses = match state.pool().statuses() {
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

pub(super) fn rate_limit(state: &ApiState, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to get rate limit info";
  let pool = state.pool();
  let model = match req.model(pool, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  req.on_key(state, FAILURE, |index| {
    let info = pool.rate_limit_info(index, Some(model))?;
    let data: Vec<RateLimitInfoJson> = info.iter().map(RateLimitInfoJson::from).collect();
    Ok(Reply::ok(
      Some(data),
      None::<()>,
      "Rate limit info retrieved successfully",
    ))
  })
}

#[cfg(test)]
mod tests;
