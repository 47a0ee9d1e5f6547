//! The HTTP API's route table for the Express adapter: `NativeKeyPool.router()` and the
//! `NativeRouter` it returns.

use std::collections::HashMap;
use std::sync::Arc;

use napi::bindgen_prelude::{Env, PromiseRaw, Uint8Array};
use napi_derive::napi;

use crate::http::{self, AdminGuard, ApiRequest, ApiState, Reply, Routed};
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::options::process_env;

#[napi]
impl NativeKeyPool {
  /// The HTTP API's route table for the Express adapter, guarded by `adminToken` (else
  /// `KEY_MANAGER_ADMIN_TOKEN`) as the server is.
  #[napi]
  pub fn router(&self, admin_token: Option<String>) -> napi::Result<NativeRouter> {
    let guard = AdminGuard::resolve(admin_token.as_deref(), &process_env)?;
    Ok(NativeRouter {
      state: self.api.clone(),
      guard,
    })
  }
}

/// The HTTP API's route table over one pool, with its admin guard: what the Express adapter calls.
#[napi]
pub struct NativeRouter {
  state: Arc<ApiState>,
  guard: AdminGuard,
}

#[napi]
impl NativeRouter {
  /// [`Self::route`] for a request without a body, answered on the addon's tokio runtime, so that
  /// usage statistics can query MongoDB.
  #[napi(ts_return_type = "Promise<RouteReply>")]
  pub fn route_async<'env>(
    &self,
    env: &'env Env,
    method: String,
    url: String,
    authorization: Option<String>,
  ) -> napi::Result<PromiseRaw<'env, RouteReply>> {
    let (state, guard) = (self.state.clone(), self.guard.clone());
    env.spawn_future(async move {
      let req = ApiRequest {
        method: &method,
        target: &url,
        authorization: authorization.as_deref(),
        body: &[],
      };
      let reply = http::route_mounted(&state, &guard, &req).reply().await;
      Ok(route_reply(reply))
    })
  }

  /// Serves one request (`url` relative to where the routes are mounted, e.g. `/best?x=1`) with
  /// its `Authorization` header, if any. The body is a `Uint8Array` (a `Buffer` is one), so that
  /// the generated types need no `@types/node`.
  #[napi]
  pub fn route(
    &self,
    method: String,
    url: String,
    authorization: Option<String>,
    body: Option<Uint8Array>,
  ) -> RouteReply {
    let req = ApiRequest {
      method: &method,
      target: &url,
      authorization: authorization.as_deref(),
      body: body.as_deref().unwrap_or_default(),
    };
    match http::route_mounted(&self.state, &self.guard, &req) {
      Routed::Ready(reply) => route_reply(reply),
      // Waits on I/O (usage statistics read from MongoDB): `routeAsync` answers it.
      Routed::Pending(_) => RouteReply {
        status: 0,
        body: String::new(),
        headers: HashMap::new(),
        deferred: true,
      },
    }
  }
}

/// A reply of the HTTP API's route table.
#[napi(object)]
pub struct RouteReply {
  pub status: u32,
  /// JSON, or the dashboard's HTML.
  pub body: String,
  /// Lower-case names: `content-type` always, `allow` on a 405, `www-authenticate` on a 401, ...
  pub headers: HashMap<String, String>,
  /// Not answered: ask `routeAsync` (usage statistics from MongoDB).
  pub deferred: bool,
}

/// A JSON error reply as the route table answers one (`{ success: false, error, message }`), for
/// what the Express adapter answers itself: a manager that cannot serve, a body it cannot read.
#[napi]
pub fn error_reply(status: u32, error: String, message: String) -> RouteReply {
  let status = u16::try_from(status).unwrap_or(500);
  route_reply(Reply::error(status, &error, &message))
}

fn route_reply(reply: Reply) -> RouteReply {
  let mut headers = HashMap::new();
  headers.insert("content-type".to_owned(), reply.content_type.to_owned());
  if let Some(allow) = reply.allow {
    headers.insert("allow".to_owned(), allow.to_owned());
  }
  for (name, value) in reply.headers {
    headers.insert(name.to_owned(), value);
  }
  RouteReply {
    status: reply.status as u32,
    body: reply.body,
    headers,
    deferred: false,
  }
}
