//! The HTTP API and the Gemini proxy as JS starts them: `serve` and the `NativeServer` it resolves
//! to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use napi::bindgen_prelude::{Env, PromiseRaw};
use napi_derive::napi;
use tokio::sync::Mutex as AsyncMutex;

use crate::http::auth::resolve_allow_insecure;
use crate::http::proxy::{ProxyOptions, DEFAULT_MAX_PROXY_BODY};
use crate::http::proxy_auth::{ClientAccess, PROXY_TOKENS_ENV};
use crate::http::{self, AdminGuard, Listen, ServerHandle, ServerOptions};
use crate::napi::errors::bad_input;
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::options::{millis_option, process_env, ServeOptions};
use crate::routing::Timeouts;

/// The largest request body the HTTP API reads by default, in bytes: the Express adapter uses it too.
#[napi]
pub const DEFAULT_MAX_BODY_BYTES: u32 = http::server::DEFAULT_MAX_BODY_BYTES as u32;

#[napi]
impl NativeKeyPool {
  /// Starts the HTTP API on `host:port` (port 0 picks a free one), on the addon's tokio runtime.
  /// `host` is an IP address, or `localhost`: 127.0.0.1 and ::1 both.
  #[napi(ts_return_type = "Promise<NativeServer>")]
  pub fn serve<'env>(
    &self,
    env: &'env Env,
    host: String,
    port: u32,
    options: Option<ServeOptions>,
  ) -> napi::Result<PromiseRaw<'env, NativeServer>> {
    let port = u16::try_from(port)
      .map_err(|_| bad_input(format!("port must be 0 to 65535 (got {port})")))?;
    let listen = if host.eq_ignore_ascii_case("localhost") {
      Listen::Localhost { port }
    } else {
      let ip: IpAddr = host.parse().map_err(|_| {
        // A key pasted into the wrong field must not come back whole.
        let shown = crate::mask::scrub(&host, self.pool().names().keys());
        bad_input(format!(
          "host must be an IP address or localhost (got {shown:?})"
        ))
      })?;
      Listen::Addr(SocketAddr::new(ip, port))
    };
    let o = options.unwrap_or_default();
    let defaults = ServerOptions::default();
    let options = ServerOptions {
      max_body_bytes: o
        .max_body_bytes
        .map_or(defaults.max_body_bytes, |n| n as usize),
      access_log: o.access_log.unwrap_or(defaults.access_log),
      admin: AdminGuard::resolve(o.admin_token.as_deref(), &process_env)?,
      allow_insecure: resolve_allow_insecure(o.allow_insecure, &process_env)?,
      max_connections: o
        .max_connections
        .map_or(defaults.max_connections, |n| n.max(1) as usize),
      head_timeout: millis_option("headTimeoutMs", o.head_timeout_ms, defaults.head_timeout)?,
      proxy: self.proxy_options(&o, listen)?,
      proxy_only: o.proxy_only.unwrap_or(false),
    };
    let pool = self.js.pool.clone();
    let proxy = options.proxy.is_some();
    env.spawn_future(async move {
      let handle = http::start(pool, listen, options).await?;
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

  /// How the server answers Gemini's paths: for the JS face's requests (`routeToken`), for
  /// clients with a proxy token, or (only on loopback, when asked) for anyone; `None` for none.
  fn proxy_options(&self, o: &ServeOptions, listen: Listen) -> napi::Result<Option<ProxyOptions>> {
    let clients = match &o.route_token {
      Some(_) => ClientAccess::Off,
      None => ClientAccess::resolve(o.proxy_tokens.as_deref(), o.proxy_open, &process_env)?,
    };
    if o.route_token.is_none() && !clients.is_on() {
      return Ok(None);
    }
    if let (ClientAccess::Open, Listen::Addr(addr)) = (&clients, listen) {
      if !addr.ip().to_canonical().is_loopback() {
        Err(bad_input(format!(
          "the Gemini proxy opens without tokens only on loopback: set {PROXY_TOKENS_ENV} (or \
           proxyTokens) to serve it on {addr}"
        )))?;
      }
    }
    let d = Timeouts::default();
    let timeouts = Timeouts {
      connect: millis_option(
        "upstreamConnectTimeoutMs",
        o.upstream_connect_timeout_ms,
        d.connect,
      )?,
      first_byte: millis_option(
        "upstreamFirstByteTimeoutMs",
        o.upstream_first_byte_timeout_ms,
        d.first_byte,
      )?,
      between_chunks: millis_option(
        "upstreamChunkTimeoutMs",
        o.upstream_chunk_timeout_ms,
        d.between_chunks,
      )?,
    };
    Ok(Some(ProxyOptions {
      router: Arc::new(self.router_from(o.route_max_wait_ms, timeouts)?),
      route_token: o.route_token.clone(),
      clients,
      max_body: o
        .proxy_max_body_bytes
        .map_or(DEFAULT_MAX_PROXY_BODY, |n| n as usize),
    }))
  }
}

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
