//! Operators' changes to the keys, without a restart: `POST /add`, `/remove/:apiKey`,
//! `/disable/:apiKey`, `/enable/:apiKey`, `/reactivate/:apiKey` (a key back from resting or
//! refused) and `/reset-limits` (every window cleared). All of them want the admin token.

use serde::Deserialize;

use super::params::Params;
use crate::core::key::Admission;
use crate::http::json::KeyStatusJson;
use crate::http::reply::Reply;
use crate::http::state::ApiState;

/// The body of `POST /add`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddKey {
  api_key: String,
  /// The project it belongs to, when known.
  project: Option<String>,
}

pub(super) fn add_key(state: &ApiState, req: &Params<'_>) -> Reply {
  const FAILURE: &str = "Failed to add API key";
  let body: AddKey = match serde_json::from_slice(req.body) {
    Ok(body) => body,
    Err(_) => {
      return Reply::error(
        400,
        "Invalid API key",
        "The body must be a JSON object { \"apiKey\": \"...\", \"project\"?: \"...\" }",
      )
    }
  };
  let pool = state.pool();
  let added = pool
    .add_key(&body.api_key, body.project.as_deref())
    .and_then(|index| pool.status(index));
  match added {
    Ok(status) => Reply {
      status: 201,
      ..Reply::ok(
        Some(KeyStatusJson::new(&status)),
        None::<()>,
        "API key added successfully",
      )
    },
    // The message names no key: the one refused may be malformed in a way that shows it whole.
    Err(err) => Reply::pool_error(err, FAILURE),
  }
}

pub(super) fn remove_key(state: &ApiState, req: &Params<'_>) -> Reply {
  admit(state, req, Admission::Removed)
}

pub(super) fn disable_key(state: &ApiState, req: &Params<'_>) -> Reply {
  admit(state, req, Admission::Disabled)
}

pub(super) fn enable_key(state: &ApiState, req: &Params<'_>) -> Reply {
  admit(state, req, Admission::Enabled)
}

/// An operator's decision about the key the path names.
fn admit(state: &ApiState, req: &Params<'_>, admission: Admission) -> Reply {
  let (done, failure) = match admission {
    Admission::Removed => ("API key removed successfully", "Failed to remove API key"),
    Admission::Disabled => ("API key disabled successfully", "Failed to disable API key"),
    Admission::Enabled => ("API key enabled successfully", "Failed to enable API key"),
  };
  req.on_key(state, failure, |index| {
    state.pool().admit(index, admission)?;
    Ok(Reply::ok(None::<()>, None::<()>, done))
  })
}

pub(super) fn reactivate(state: &ApiState, req: &Params<'_>) -> Reply {
  req.on_key(state, "Failed to reactivate API key", |index| {
    state.pool().reactivate(index)?;
    Ok(Reply::ok(
      None::<()>,
      None::<()>,
      "API key reactivated successfully",
    ))
  })
}

pub(super) fn reset_limits(state: &ApiState, _: &Params<'_>) -> Reply {
  match state.pool().reset_all_limits() {
    Ok(()) => Reply::ok(
      None::<()>,
      None::<()>,
      "All API key limits reset successfully",
    ),
    Err(err) => Reply::pool_error(err, "Failed to reset API key limits"),
  }
}

#[cfg(test)]
mod tests;
