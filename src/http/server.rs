//! A small HTTP/1.1 server for the route table, on the caller's tokio runtime. A request waits only
//! on its own body, the pool's short lock and what its own route waits on (a usage query to
//! MongoDB). Its log lines, the access log's and its own warnings, go to the log it is given: under
//! Node the one writer, which queues them rather than have the request write them.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{
  HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::auth::{may_listen, AdminGuard, ADMIN_TOKEN_ENV, ALLOW_INSECURE_ENV};
use super::connections::{
  cap_for_descriptors, descriptor_limit, give_back_memory, out_of_descriptors, AcceptErrors, Admit,
  Registry, Served, DEFAULT_MAX_CONNECTIONS,
};
use super::json::IsoDate;
use super::proxy::{self, is_gemini_path, ProxyOptions};
use super::reply::Reply;
use super::routes::{redact_path, route, ApiRequest};
use super::state::ApiState;
use crate::core::clock::SECOND_MS;
use crate::log::{ConsoleLog, Log};
use crate::routing::AnswerBody;

/// The default for [`ServerOptions::max_body_bytes`]: far more than any request of this API needs.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// How long [`ServerHandle::shutdown`] lets in-flight requests finish before cutting them off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client that stops sending its body mid-way gets a 408 after this long.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a body past the limit is read and dropped. Closing a socket with unread data makes
/// the kernel send a reset, which can destroy the 400 before the client reads it.
const MAX_DRAIN_BYTES: usize = 1 << 20;
/// Pause after a failed `accept` (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The default for [`ServerOptions::head_timeout`]: a client sends its request head at once; only
/// a slow or idle one takes seconds.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// What a connection refused at the cap is told before it is closed.
const REFUSED: &[u8] =
  b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// How the server treats requests.
#[derive(Debug, Clone)]
pub struct ServerOptions {
  /// Largest request body accepted; a larger one gets a 400.
  pub max_body_bytes: usize,
  /// One line per request, at [`crate::log::Level::Info`] (stdout): time, method, path (keys
  /// masked), status, duration.
  pub access_log: bool,
  /// Where the access log and the server's warnings go. Not the pool's log: the access log is
  /// asked for on its own, and is written even for a quiet pool.
  pub log: Arc<dyn Log>,
  /// The token the endpoints that change state want, if any.
  pub admin: AdminGuard,
  /// Listen beyond loopback even without an admin token.
  pub allow_insecure: bool,
  /// Connections open at once, at most (see [`super::connections`]).
  pub max_connections: usize,
  /// How long a connection may take to send a whole request head before it is closed.
  pub head_timeout: Duration,
  /// Gemini's paths, when the server sends them on (see `proxy`).
  pub proxy: Option<ProxyOptions>,
  /// Nothing but Gemini's paths: the server the JS face starts for the app's own SDK calls.
  pub proxy_only: bool,
}

impl Default for ServerOptions {
  fn default() -> Self {
    Self {
      max_body_bytes: DEFAULT_MAX_BODY_BYTES,
      access_log: false,
      log: Arc::new(ConsoleLog),
      admin: AdminGuard::open(),
      allow_insecure: false,
      max_connections: DEFAULT_MAX_CONNECTIONS,
      head_timeout: DEFAULT_HEAD_TIMEOUT,
      proxy: None,
      proxy_only: false,
    }
  }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum HttpError {
  #[error(
    "refusing to listen on {addr} without an admin token: anyone who can reach it could rotate, \
     reactivate and reset keys. Set {ADMIN_TOKEN_ENV} (or the adminToken option), listen on \
     127.0.0.1, or allow it explicitly with allowInsecure: true ({ALLOW_INSECURE_ENV}=1, \
     --allow-insecure)"
  )]
  Insecure { addr: SocketAddr },
  #[error("cannot listen on {addr}: {source}")]
  Bind {
    addr: SocketAddr,
    #[source]
    source: io::Error,
  },
  #[error("cannot read the address the server listens on: {0}")]
  LocalAddr(#[source] io::Error),
}

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
  /// `localhost`: 127.0.0.1 and ::1 on one port, as a server listening on every address answers
  /// `http://localhost:PORT`, which many systems resolve to ::1 first. A host without one of the
  /// two loopbacks serves on the other.
  Localhost { port: u16 },
  /// Exactly this address.
  Addr(SocketAddr),
}

/// How many ports to try for both loopbacks, when the system picks the port: it picks for IPv4,
/// and ::1 may have that one in use.
const LOCALHOST_ATTEMPTS: usize = 8;

/// Binds what `listen` names.
async fn bind(listen: Listen) -> Result<Vec<TcpListener>, HttpError> {
  match listen {
    Listen::Addr(addr) => Ok(vec![bind_addr(addr).await?]),
    Listen::Localhost { port } => bind_localhost(port).await,
  }
}

async fn bind_addr(addr: SocketAddr) -> Result<TcpListener, HttpError> {
  TcpListener::bind(addr)
    .await
    .map_err(|source| HttpError::Bind { addr, source })
}

/// Whether binding failed because this host has no such address (no IPv6, say), rather than
/// because it is taken or forbidden.
fn absent(e: &HttpError) -> bool {
  matches!(e, HttpError::Bind { source, .. }
    if source.kind() == io::ErrorKind::AddrNotAvailable || source.raw_os_error() == Some(97))
}

/// 127.0.0.1 and ::1 on one port; one of them alone where the host lacks the other.
async fn bind_localhost(port: u16) -> Result<Vec<TcpListener>, HttpError> {
  let v6 = |port| SocketAddr::from((Ipv6Addr::LOCALHOST, port));
  let mut attempts = 0;
  loop {
    attempts += 1;
    let v4 = match bind_addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
      Ok(l) => l,
      Err(e) if absent(&e) => return Ok(vec![bind_addr(v6(port)).await?]),
      Err(e) => return Err(e),
    };
    let picked = v4.local_addr().map_err(HttpError::LocalAddr)?.port();
    match bind_addr(v6(picked)).await {
      Ok(second) => return Ok(vec![v4, second]),
      Err(e) if absent(&e) => return Ok(vec![v4]),
      Err(HttpError::Bind { source, .. })
        if port == 0
          && source.kind() == io::ErrorKind::AddrInUse
          && attempts < LOCALHOST_ATTEMPTS => {}
      Err(e) => return Err(e),
    }
  }
}

/// The next connection on any of `listeners`.
async fn accept_any(listeners: &[TcpListener]) -> io::Result<(TcpStream, SocketAddr)> {
  std::future::poll_fn(|cx| {
    for listener in listeners {
      if let Poll::Ready(accepted) = listener.poll_accept(cx) {
        return Poll::Ready(accepted);
      }
    }
    Poll::Pending
  })
  .await
}

/// A running server. Dropping it stops the server as [`Self::shutdown`] does, without waiting.
#[derive(Debug)]
pub struct ServerHandle {
  /// Every address it listens on (two for [`Listen::Localhost`]), on one port.
  local_addrs: Vec<SocketAddr>,
  /// Dropped to stop the server: every receiver then wakes.
  stop: watch::Sender<()>,
  task: JoinHandle<()>,
}

impl ServerHandle {
  /// The addresses the server listens on (with the real port when started on port 0).
  pub fn local_addrs(&self) -> &[SocketAddr] {
    &self.local_addrs
  }

  /// The port it listens on.
  pub fn port(&self) -> u16 {
    self.local_addrs.first().map_or(0, SocketAddr::port)
  }

  /// Stops accepting connections, closes idle ones, and returns once in-flight requests have been
  /// answered, or after [`SHUTDOWN_GRACE`] with the stragglers cut off.
  pub async fn shutdown(self) {
    let Self { stop, task, .. } = self;
    drop(stop);
    // The accept loop only ends by returning; a join error would mean it panicked, and there is
    // nothing left to stop then.
    let _ = task.await;
  }
}

/// Starts serving [`route`] where `listen` says (port 0 picks a free port). Beyond loopback it
/// needs an admin token or `allow_insecure`.
pub async fn start(
  state: Arc<ApiState>,
  listen: Listen,
  options: ServerOptions,
) -> Result<ServerHandle, HttpError> {
  if let Listen::Addr(addr) = listen {
    if !may_listen(addr.ip(), &options.admin, options.allow_insecure) {
      return Err(HttpError::Insecure { addr });
    }
  }
  let listeners = bind(listen).await?;
  let local_addrs = listeners
    .iter()
    .map(TcpListener::local_addr)
    .collect::<Result<Vec<_>, _>>()
    .map_err(HttpError::LocalAddr)?;
  let mut http = http1::Builder::new();
  // The timer lets hyper enforce the limit on reading request heads.
  http
    .timer(TokioTimer::new())
    .header_read_timeout(options.head_timeout)
    .keep_alive(true);
  let shared = Arc::new(Shared {
    state,
    proxy: options.proxy,
    proxy_only: options.proxy_only,
    max_connections: options.max_connections,
    max_body_bytes: options.max_body_bytes,
    admin: options.admin,
    access_log: options.access_log,
    log: options.log,
    http,
  });
  let (stop, stopped) = watch::channel(());
  let task = tokio::spawn(accept_loop(listeners, shared, stopped));
  Ok(ServerHandle {
    local_addrs,
    stop,
    task,
  })
}

/// What every connection of one server shares.
struct Shared {
  state: Arc<ApiState>,
  proxy: Option<ProxyOptions>,
  proxy_only: bool,
  max_connections: usize,
  max_body_bytes: usize,
  admin: AdminGuard,
  access_log: bool,
  log: Arc<dyn Log>,
  http: http1::Builder,
}

async fn accept_loop(
  listeners: Vec<TcpListener>,
  shared: Arc<Shared>,
  mut stopped: watch::Receiver<()>,
) {
  let mut connections = JoinSet::new();
  let limit = descriptor_limit();
  let mut registry = Registry::new(cap_for_descriptors(shared.max_connections, limit));
  if let (true, Some(limit)) = (registry.max() < shared.max_connections, limit) {
    shared.log.warn(&format!(
      "⚠️ HTTP server: at most {} connections open at once, not {}: the process may open {limit} \
       files (ulimit -n), and needs some for other things",
      registry.max(),
      shared.max_connections
    ));
  }
  let mut accept_errors = AcceptErrors::default();
  loop {
    tokio::select! {
      _ = stopped.changed() => break,
      accepted = accept_any(&listeners) => match accepted {
        Ok((stream, _)) => match registry.admit() {
          Admit::Serve => {
            let served = Served::default();
            let task = serve_connection(stream, shared.clone(), stopped.clone(), served.clone());
            registry.add(connections.spawn(task), served);
          }
          // Told so in one write that cannot block, then closed.
          Admit::Refuse => {
            let _ = stream.try_write(REFUSED);
          }
        },
        Err(err) => {
          // Out of descriptors all the same (others in the process hold them): a connection
          // without a request head makes room, and the accept is tried again at once, rather
          // than clients waiting for head timeouts to free descriptors.
          let made_room = out_of_descriptors(&err) && registry.cut_oldest_unserved();
          if let Some(unlogged) = accept_errors.note(Instant::now()) {
            let since = match unlogged {
              0 => String::new(),
              n => format!(" ({n} more since the last time this was logged)"),
            };
            let action = match made_room {
              true => "; cutting the oldest connections that sent no request head to make room",
              false => "",
            };
            shared.log.warn(&format!(
              "⚠️ HTTP server could not accept a connection: {err}{action}{since}"
            ));
          }
          if made_room {
            // Lets the cut connection's task be dropped, and its descriptor closed, first.
            tokio::task::yield_now().await;
          } else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
          }
        }
      },
      // Reaps finished connections so the set does not grow with every one ever served.
      Some(done) = connections.join_next_with_id(), if !connections.is_empty() => {
        let task = match done {
          Ok((task, ())) => task,
          Err(e) => e.id(),
        };
        if registry.finished(task) {
          give_back_memory();
        }
      }
    }
  }
  drop(listeners);
  let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
    while connections.join_next().await.is_some() {}
  })
  .await;
  if drained.is_err() {
    connections.shutdown().await;
  }
}

async fn serve_connection(
  stream: TcpStream,
  shared: Arc<Shared>,
  mut stopped: watch::Receiver<()>,
  served: Served,
) {
  // Responses are small and written whole; Nagle would hold them back for the client's ACK.
  let _ = stream.set_nodelay(true);
  let service_state = shared.clone();
  let service = service_fn(move |req| {
    // A whole request head arrived: a client, not a flood.
    served.store(true, Ordering::Relaxed);
    let shared = service_state.clone();
    async move { Ok::<_, Infallible>(handle(&shared, req).await) }
  });
  let conn = shared.http.serve_connection(TokioIo::new(stream), service);
  let mut conn = std::pin::pin!(conn);
  // Connection errors (a client hanging up, a malformed request hyper answered itself) concern
  // only that client.
  tokio::select! {
    _ = conn.as_mut() => {}
    _ = stopped.changed() => {
      conn.as_mut().graceful_shutdown();
      let _ = conn.await;
    }
  }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<AnswerBody> {
  let started = Instant::now();
  let (parts, body) = req.into_parts();
  if let Some(proxy) = shared
    .proxy
    .as_ref()
    .filter(|_| is_gemini_path(parts.uri.path()))
  {
    // Kept for the log line only when there is one: the request is handed on whole.
    let logged = shared
      .access_log
      .then(|| (parts.method.clone(), parts.uri.path().to_owned()));
    let answer = proxy::handle(proxy, parts, body).await;
    if let Some((method, target)) = logged {
      shared.log.info(&access_line(
        &shared.state,
        method.as_str(),
        &target,
        answer.status().as_u16(),
        started.elapsed(),
      ));
    }
    return answer;
  }
  if shared.proxy_only {
    let reply = Reply::error(404, "Not found", "This server answers Gemini's paths only");
    return response(reply, false);
  }
  let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
  // A header that is not visible ASCII cannot hold the token: it counts as missing.
  let authorization = parts
    .headers
    .get(AUTHORIZATION)
    .and_then(|v| v.to_str().ok());
  // HTTP/1.1 makes Host mandatory; a request without it is malformed, or not meant for us.
  let host_missing = parts.version == Version::HTTP_11 && !parts.headers.contains_key(HOST);
  let read = match host_missing {
    true => Err(BodyError::NoHost),
    false => read_body(body, shared.max_body_bytes).await,
  };
  let (reply, close) = match read {
    Ok(body) => {
      let req = ApiRequest {
        method: parts.method.as_str(),
        target,
        authorization,
        body: &body,
      };
      let routed = route(&shared.state, &shared.admin, &req);
      (routed.reply().await, false)
    }
    Err(err) => (err.reply(shared.max_body_bytes), err.leaves_unread_data()),
  };
  if shared.access_log {
    shared.log.info(&access_line(
      &shared.state,
      parts.method.as_str(),
      target,
      reply.status,
      started.elapsed(),
    ));
  }
  response(reply, close)
}

fn response(reply: Reply, close: bool) -> Response<AnswerBody> {
  let body = Full::new(Bytes::from(reply.body)).map_err(|never| match never {});
  let mut res = Response::new(body.boxed());
  *res.status_mut() =
    StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
  let headers = res.headers_mut();
  headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
  if let Some(allow) = reply.allow {
    headers.insert(ALLOW, HeaderValue::from_static(allow));
  }
  for (name, value) in reply.headers {
    // Values are written by the route table, never taken from a request: always valid.
    if let Ok(value) = HeaderValue::from_str(&value) {
      headers.insert(HeaderName::from_static(name), value);
    }
  }
  if close {
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
  }
  res
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyError {
  /// Over the limit; `drained` when all of it was read, so the connection can be kept.
  TooLarge {
    drained: bool,
  },
  Read,
  TimedOut,
  /// Not read at all: the request has no Host header.
  NoHost,
}

impl BodyError {
  fn reply(self, max_body_bytes: usize) -> Reply {
    match self {
      BodyError::TooLarge { .. } => Reply::error(
        400,
        "Request body too large",
        &format!("The request body must be at most {max_body_bytes} bytes"),
      ),
      BodyError::Read => Reply::error(
        400,
        "Invalid request body",
        "The request body could not be read",
      ),
      BodyError::TimedOut => Reply::error(
        408,
        "Request timeout",
        "The request body did not arrive in time",
      ),
      BodyError::NoHost => Reply::error(400, "Bad request", "HTTP/1.1 requests need a Host header"),
    }
  }

  /// Whether part of the request may still be on the wire, so the connection cannot be reused.
  fn leaves_unread_data(self) -> bool {
    !matches!(self, BodyError::TooLarge { drained: true })
  }
}

/// Reads the body up to `max` bytes. Past that, up to [`MAX_DRAIN_BYTES`] more are read and
/// dropped so the client still gets its 400.
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, BodyError> {
  let give_up = max.saturating_add(MAX_DRAIN_BYTES);
  if body.size_hint().lower() > give_up as u64 {
    return Err(BodyError::TooLarge { drained: false });
  }
  let read = async {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
      let frame = frame.map_err(|_| BodyError::Read)?;
      if let Ok(data) = frame.into_data() {
        seen = seen.saturating_add(data.len());
        if seen <= max {
          buf.extend_from_slice(&data);
        } else if seen > give_up {
          return Err(BodyError::TooLarge { drained: false });
        }
      }
    }
    if seen > max {
      Err(BodyError::TooLarge { drained: true })
    } else {
      Ok(buf)
    }
  };
  tokio::time::timeout(BODY_READ_TIMEOUT, read)
    .await
    .unwrap_or(Err(BodyError::TimedOut))
}

/// `2026-11-27T20:30:42.123Z GET /api/keys/rate-limit/AIzaSyA1...WXYZ 200 0.084ms`.
fn access_line(
  state: &ApiState,
  method: &str,
  target: &str,
  status: u16,
  took: Duration,
) -> String {
  format!(
    "{} {} {} {status} {:.3}ms",
    IsoDate(state.pool().now()),
    loggable_method(method),
    redact_path(state, target),
    took.as_secs_f64() * SECOND_MS as f64
  )
}

/// The method as logged. HTTP lets any token be a method, and a key is a valid token: only the
/// standard methods are printed as sent.
fn loggable_method(method: &str) -> &str {
  const STANDARD: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
  ];
  STANDARD
    .iter()
    .find(|m| **m == method)
    .copied()
    .unwrap_or("(other method)")
}

#[cfg(test)]
mod tests;
