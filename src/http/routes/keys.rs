//! Handing out keys: `GET /best` (the key the pool would pick now), `POST /rotate` (a proactive
//! rotation) and `POST /refresh-cache` (the selection cache rebuilt), with the 429 or 503 when no
//! key can be had.

use serde::Serialize;

use super::params::Params;
use crate::core::clock::SECOND_MS;
use crate::core::error::PoolError;
use crate::core::models::ModelId;
use crate::core::pool::{Claim, KeyPool};
use crate::http::json::{Failure, IsoDate, LimitsJson};
use crate::http::reply::Reply;
use crate::http::state::ApiState;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BestData {
  api_key: String,
  availability_score: f64,
  total_available: usize,
  rotation_method: &'static str,
  last_used: IsoDate,
  limits: LimitsJson,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BestMeta {
  availability_score: f64,
  total_available: usize,
  rotation_method: &'static str,
}

pub(super) fn best(state: &ApiState, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to get best available API key";
  let pool = state.pool();
  let model = match req.model(pool, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  let picked = match pool.best(Claim::LookOnly, model) {
    Ok(p) => p,
    Err(err) => return no_key(pool, err, FAILURE, model),
  };
  let pick = picked.pick;
  let data = BestData {
    api_key: pool.masked(pick.index),
    availability_score: pick.score,
    total_available: pick.total_available,
    rotation_method: pick.method.as_str(),
    last_used: IsoDate(picked.figures.last_used),
    limits: (&picked.figures).into(),
  };
  let metadata = BestMeta {
    availability_score: pick.score,
    total_available: pick.total_available,
    rotation_method: pick.method.as_str(),
  };
  Reply::ok(
    Some(data),
    Some(metadata),
    "Best available API key retrieved successfully",
  )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RotateData {
  api_key: String,
  availability_score: f64,
  rotation_reason: &'static str,
  previous_key_score: Option<f64>,
  last_used: IsoDate,
  limits: LimitsJson,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RotateMeta {
  availability_score: f64,
  rotation_reason: &'static str,
  previous_key_score: Option<f64>,
  total_available: usize,
  rotation_method: &'static str,
}

pub(super) fn rotate(state: &ApiState, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to rotate API key proactively";
  let pool = state.pool();
  let model = match req.model(pool, FAILURE) {
    Ok(model) => model,
    Err(reply) => return reply,
  };
  let picked = match pool.rotate(Claim::LookOnly, model) {
    Ok(p) => p,
    Err(err) => return no_key(pool, err, FAILURE, model),
  };
  let rotation = picked.pick;
  let selection = rotation.selection;
  let data = RotateData {
    api_key: pool.masked(selection.index),
    availability_score: selection.score,
    rotation_reason: rotation.reason.as_str(),
    previous_key_score: rotation.previous_key_score,
    last_used: IsoDate(picked.figures.last_used),
    limits: (&picked.figures).into(),
  };
  let metadata = RotateMeta {
    availability_score: selection.score,
    rotation_reason: rotation.reason.as_str(),
    previous_key_score: rotation.previous_key_score,
    total_available: selection.total_available,
    rotation_method: selection.method.as_str(),
  };
  Reply::ok(Some(data), Some(metadata), "API key rotated proactively")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefreshMeta {
  cache_refreshed: bool,
  available_keys: usize,
}

pub(super) fn refresh_cache(state: &ApiState, _: &Params<'_>) -> Reply {
  match state.pool().refresh_cache() {
    Ok(available_keys) => Reply::ok(
      None::<()>,
      Some(RefreshMeta {
        cache_refreshed: true,
        available_keys,
      }),
      "API key cache refreshed successfully",
    ),
    Err(err) => Reply::pool_error(err, "Failed to refresh cache"),
  }
}

/// No key to hand out. When keys are only busy, the server is not failing: a 429 with
/// `Retry-After` and `nextAvailableAt`, when one frees; when none will come back by itself (every
/// key refused, disabled or removed), a 503.
fn no_key(pool: &KeyPool, err: PoolError, message: &str, model: ModelId) -> Reply {
  if err != PoolError::NoActiveKeys {
    return Reply::pool_error(err, message);
  }
  let Ok(Some(at)) = pool.next_available_at(0, model) else {
    return Reply::error(503, &err.to_string(), message);
  };
  let wait_ms = (at - pool.now()).max(0);
  let reply = Reply::json(
    429,
    &Failure {
      success: false,
      error: &err.to_string(),
      message,
      next_available_at: Some(IsoDate(at)),
    },
  );
  Reply {
    // Whole seconds, rounded up: a client that waits that long finds the key free.
    headers: vec![(
      "retry-after",
      ((wait_ms + SECOND_MS - 1) / SECOND_MS).max(1).to_string(),
    )],
    ..reply
  }
}

#[cfg(test)]
mod tests;
