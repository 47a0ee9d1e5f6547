//! The HTTP API and the Gemini proxy as JS starts them: `serve`, the routing server of the app's
//! own Gemini requests, and the `NativeServer` they resolve to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use napi::bindgen_prelude::{Env, PromiseRaw, Unknown};
use napi_derive::napi;
use tokio::sync::Mutex as AsyncMutex;

use crate::http::auth::resolve_allow_insecure;
use crate::http::proxy::{ProxyOptions, DEFAULT_MAX_PROXY_BODY};
use crate::http::proxy_auth::{ClientAccess, PROXY_TOKENS_ENV};
use crate::http::{self, AdminGuard, Listen, ServerHandle, ServerOptions};
use crate::log::Log;
use crate::napi::errors::{bad_input, BindingError};
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::log::JsLog;
use crate::napi::options::{process_env, ServeOptions};
use crate::routing::Timeouts;

/// The largest request body the HTTP API reads by default, in bytes: the Express adapter uses it too.
#[napi]
pub const DEFAULT_MAX_BODY_BYTES: u32 = http::server::DEFAULT_MAX_BODY_BYTES as u32;

#[napi]
impl NativeKeyPool {
  /// Starts the HTTP API (see `ServeOptions` in index.d.ts) on the addon's tokio runtime, with
  /// the Gemini proxy when proxy tokens or `proxyOpen` say.
  #[napi(
    ts_args_type = "options?: object | undefined | null",
    ts_return_type = "Promise<NativeServer>"
  )]
  pub fn serve<'env>(
    &self,
    env: &'env Env,
    options: Option<Unknown>,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let o = ServeOptions::read(options)?;
    let listen = self.listen(&o.host, o.port)?;
    let clients = ClientAccess::resolve(o.proxy_tokens.as_deref(), o.proxy_open, &process_env)?;
    if let (ClientAccess::Open, Listen::Addr(addr)) = (&clients, listen) {
      if !addr.ip().to_canonical().is_loopback() {
        Err(bad_input(format!(
          "the Gemini proxy opens without tokens only on loopback: set {PROXY_TOKENS_ENV} (or \
           proxyTokens) to serve it on {addr}"
        )))?;
      }
    }
    let proxy = match clients.is_on() {
      false => None,
      true => {
        let d = Timeouts::default();
        let timeouts = Timeouts {
          connect: o.upstream_connect_timeout.unwrap_or(d.connect),
          first_byte: o.upstream_first_byte_timeout.unwrap_or(d.first_byte),
          between_chunks: o.upstream_chunk_timeout.unwrap_or(d.between_chunks),
        };
        Some(ProxyOptions {
          router: Arc::new(self.router_from(timeouts)?),
          route_token: None,
          clients,
          max_body: o
            .proxy_max_body_bytes
            .map_or(DEFAULT_MAX_PROXY_BODY, |n| n as usize),
        })
      }
    };
    let defaults = ServerOptions::default();
    let options = ServerOptions {
      max_body_bytes: o
        .max_body_bytes
        .map_or(defaults.max_body_bytes, |n| n as usize),
      access_log: o.access_log,
      log: Arc::new(JsLog),
      admin: AdminGuard::resolve(o.admin_token.as_deref(), &process_env)?,
      allow_insecure: resolve_allow_insecure(o.allow_insecure, &process_env)?,
      max_connections: o
        .max_connections
        .map_or(defaults.max_connections, |n| n as usize),
      head_timeout: o.head_timeout.unwrap_or(defaults.head_timeout),
      proxy,
      proxy_only: false,
    };
    self.start(env, listen, options, None)
  }

  /// The loopback server the app's own Gemini requests are routed through (see lib/routing.js):
  /// Gemini's paths only, for requests that carry `routeToken` in `x-gkm-route-token`, on
  /// 127.0.0.1 and a free port. A failure to start is said in the log, and the requests then go
  /// out unrouted.
  #[napi(ts_return_type = "Promise<NativeServer>")]
  pub fn route_server<'env>(
    &self,
    env: &'env Env,
    route_token: String,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let options = ServerOptions {
      proxy: Some(ProxyOptions {
        router: Arc::new(self.router_from(Timeouts::default())?),
        route_token: Some(route_token),
        clients: ClientAccess::Off,
        max_body: DEFAULT_MAX_PROXY_BODY,
      }),
      proxy_only: true,
      log: Arc::new(JsLog),
      ..ServerOptions::default()
    };
    let listen = Listen::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let failure_log = Some((self.log.clone(), UNROUTED));
    self.start(env, listen, options, failure_log)
  }

  /// `host` is an IP address, or `localhost`: 127.0.0.1 and ::1 both.
  fn listen(&self, host: &str, port: u16) -> Result<Listen, BindingError> {
    if host.eq_ignore_ascii_case("localhost") {
      return Ok(Listen::Localhost { port });
    }
    let ip: IpAddr = host.parse().map_err(|_| {
      // A key pasted into the wrong field must not come back whole.
      let shown = crate::mask::scrub(host, self.pool().names().keys());
      bad_input(format!(
        "host must be an IP address or localhost (got {shown:?})"
      ))
    })?;
    Ok(Listen::Addr(SocketAddr::new(ip, port)))
  }

  /// Starts a server; a failure is said in `failure_log` with its prefix, when given.
  fn start<'env>(
    &self,
    env: &'env Env,
    listen: Listen,
    options: ServerOptions,
    failure_log: Option<(Arc<dyn Log>, &'static str)>,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let state = self.api.clone();
    let proxy = options.proxy.is_some();
    env.spawn_future(async move {
      let handle = match http::start(state, listen, options).await {
        Ok(handle) => handle,
        Err(e) => {
          if let Some((log, prefix)) = failure_log {
            log.warn(&format!("{prefix}{e}"));
          }
          Err(e)?
        }
      };
      Ok(NativeServer {
        proxy,
        host: match listen {
          Listen::Localhost { .. } => "localhost".to_owned(),
          Listen::Addr(addr) => addr.ip().to_string(),
        },
        port: handle.port(),
        handle: Arc::new(AsyncMutex::new(Some(handle))),
      })
    })
  }
}

/// What the log says when the routing server cannot start, before why.
const UNROUTED: &str = "⚠️ Gemini requests go out unrouted: the routing server could not start: ";

/// The running HTTP API.
#[napi]
pub struct NativeServer {
  proxy: bool,
  host: String,
  port: u16,
  handle: Arc<AsyncMutex<Option<ServerHandle>>>,
}

#[napi]
impl NativeServer {
  /// Whether it serves the Gemini proxy routes.
  #[napi(getter)]
  pub fn proxy(&self) -> bool {
    self.proxy
  }

  /// The port it listens on (the real one when started on port 0).
  #[napi(getter)]
  pub fn port(&self) -> u32 {
    u32::from(self.port)
  }

  /// The IP address it listens on, or `localhost` for 127.0.0.1 and ::1 both.
  #[napi(getter)]
  pub fn host(&self) -> String {
    self.host.clone()
  }

  /// Stops accepting, lets in-flight requests finish (5 s at most), then resolves. Idempotent.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn close<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, ()>> {
    let handle = self.handle.clone();
    env.spawn_future(async move {
      if let Some(handle) = handle.lock().await.take() {
        handle.shutdown().await;
      }
      Ok(())
    })
  }
}
