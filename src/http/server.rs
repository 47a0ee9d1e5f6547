//! A small HTTP/1.1 server for the route table, on the caller's tokio runtime. A request waits only
//! on its own body and the pool's short lock: routing is synchronous, and access log lines are
//! handed to a writer thread rather than written by the request.

use std::convert::Infallible;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
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
use super::routes::{redact_path, route, usage_stats_request, ApiRequest, Reply};
use super::usage::usage_stats;
use crate::core::pool::KeyPool;
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
/// Access log lines waiting for stdout; past this, lines are dropped and counted.
const ACCESS_LOG_QUEUE: usize = 4096;
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
  /// One line per request on stdout: time, method, path (keys masked), status, duration.
  pub access_log: bool,
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
  #[error("cannot start the access log writer: {0}")]
  AccessLog(#[source] io::Error),
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
  pool: Arc<KeyPool>,
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
  let access_log = if options.access_log {
    Some(AccessLog::start()?)
  } else {
    None
  };
  let mut http = http1::Builder::new();
  // The timer lets hyper enforce the limit on reading request heads.
  http
    .timer(TokioTimer::new())
    .header_read_timeout(options.head_timeout)
    .keep_alive(true);
  let shared = Arc::new(Shared {
    pool,
    proxy: options.proxy,
    proxy_only: options.proxy_only,
    max_connections: options.max_connections,
    max_body_bytes: options.max_body_bytes,
    admin: options.admin,
    access_log,
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
  pool: Arc<KeyPool>,
  proxy: Option<ProxyOptions>,
  proxy_only: bool,
  max_connections: usize,
  max_body_bytes: usize,
  admin: AdminGuard,
  access_log: Option<AccessLog>,
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
    eprintln!(
      "⚠️ HTTP server: at most {} connections open at once, not {}: the process may open {limit} \
       files (ulimit -n), and needs some for other things",
      registry.max(),
      shared.max_connections
    );
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
            eprintln!("⚠️ HTTP server could not accept a connection: {err}{action}{since}");
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
      .as_ref()
      .map(|log| (log, parts.method.clone(), parts.uri.path().to_owned()));
    let answer = proxy::handle(proxy, parts, body).await;
    if let Some((log, method, target)) = logged {
      log.write(access_line(
        &shared.pool,
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
    Ok(body) => match usage_stats_request(parts.method.as_str(), target) {
      // May query MongoDB: answered here, where waiting holds up only this request.
      Some(range) => (usage_stats(&shared.pool, range).await, false),
      None => {
        let req = ApiRequest {
          method: parts.method.as_str(),
          target,
          authorization,
          body: &body,
        };
        (route(&shared.pool, &shared.admin, &req), false)
      }
    },
    Err(err) => (err.reply(shared.max_body_bytes), err.leaves_unread_data()),
  };
  if let Some(log) = &shared.access_log {
    log.write(access_line(
      &shared.pool,
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
fn access_line(pool: &KeyPool, method: &str, target: &str, status: u16, took: Duration) -> String {
  format!(
    "{} {} {} {status} {:.3}ms",
    IsoDate(pool.now()),
    loggable_method(method),
    redact_path(pool, target),
    took.as_secs_f64() * 1_000.0
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

/// Hands lines to a thread that writes them to stdout, so a slow stdout never holds up a request.
struct AccessLog {
  lines: SyncSender<String>,
  dropped: Arc<AtomicU64>,
}

impl AccessLog {
  /// Starts the writer thread; it ends once the server, and with it the sender, is gone.
  fn start() -> Result<Self, HttpError> {
    let (lines, queue) = mpsc::sync_channel::<String>(ACCESS_LOG_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let lost = dropped.clone();
    std::thread::Builder::new()
      .name("http-access-log".into())
      .spawn(move || {
        let stdout = io::stdout();
        for line in queue {
          let mut out = stdout.lock();
          // A closed stdout is no reason to stop serving, so write errors are ignored.
          let n = lost.swap(0, Ordering::Relaxed);
          if n > 0 {
            let _ = writeln!(out, "({n} access log lines dropped: stdout fell behind)");
          }
          let _ = writeln!(out, "{line}");
        }
      })
      .map_err(HttpError::AccessLog)?;
    Ok(Self { lines, dropped })
  }

  fn write(&self, line: String) {
    if let Err(TrySendError::Full(_)) = self.lines.try_send(line) {
      self.dropped.fetch_add(1, Ordering::Relaxed);
    }
  }
}

#[cfg(test)]
mod tests {
  use std::net::IpAddr;

  use super::*;
  use crate::core::clock::FakeClock;
  use crate::core::config::PoolConfig;
  use crate::core::quota::Quota;
  use crate::log::SilentLog;

  const KEY: &str = "AIzaSyHTTPTEST000000000000000000000000001";

  fn pool() -> Arc<KeyPool> {
    let config = PoolConfig::of(
      vec![
        KEY.to_owned(),
        "AIzaSyHTTPTEST000000000000000000000000002".to_owned(),
      ],
      Quota::default(),
    );
    let clock = Arc::new(FakeClock::at(1_700_000_000_000));
    Arc::new(KeyPool::new(config, clock, Arc::new(SilentLog)).unwrap())
  }

  async fn server(options: ServerOptions) -> ServerHandle {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    start(pool(), Listen::Addr(addr), options).await.unwrap()
  }

  // tokio's `io-util` feature is off, so the test client reads and writes through readiness.
  async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> usize {
    loop {
      stream.readable().await.unwrap();
      match stream.try_read(buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
        other => return other.unwrap(),
      }
    }
  }

  async fn write_all(stream: &TcpStream, mut data: &[u8]) {
    while !data.is_empty() {
      stream.writable().await.unwrap();
      match stream.try_write(data) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
        other => data = &data[other.unwrap()..],
      }
    }
  }

  struct Answer {
    status: u16,
    /// Header lines, lower-cased.
    head: String,
    body: String,
  }

  /// Reads one response off a keep-alive connection, using its Content-Length.
  async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
      if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8(buf[..end].to_vec())
          .unwrap()
          .to_lowercase();
        let length: usize = head
          .lines()
          .find_map(|l| l.strip_prefix("content-length: "))
          .unwrap()
          .parse()
          .unwrap();
        while buf.len() < end + 4 + length {
          let n = read_some(stream, &mut chunk).await;
          assert!(n > 0, "connection closed mid-body");
          buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8(buf[end + 4..end + 4 + length].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        return Answer { status, head, body };
      }
      let n = read_some(stream, &mut chunk).await;
      assert!(n > 0, "connection closed before a response");
      buf.extend_from_slice(&chunk[..n]);
    }
  }

  async fn ask(stream: &mut TcpStream, request: &str) -> Answer {
    write_all(stream, request.as_bytes()).await;
    read_answer(stream).await
  }

  fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn serves_the_route_table_over_one_keep_alive_connection() {
    let handle = server(ServerOptions::default()).await;
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();

    let a = ask(&mut s, &get("/api/keys/status")).await;
    assert_eq!(a.status, 200);
    assert!(a
      .head
      .contains("content-type: application/json; charset=utf-8"));
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    let a = ask(&mut s, &get("/api/keys/best")).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("\"rotationMethod\":\"round-robin\""));
    assert!(!a.body.contains(KEY));

    let a = ask(&mut s, &get("/api/keys/nope")).await;
    assert_eq!(a.status, 404);

    let a = ask(&mut s, &get("/api/keys/rotate")).await;
    assert_eq!(a.status, 405);
    assert!(a.head.contains("\r\nallow: post"));

    let a = ask(&mut s, &get(&format!("/api/keys/rate-limit/{KEY}"))).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains(KEY));

    let rotate = "POST /api/keys/rotate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(ask(&mut s, rotate).await.status, 200);
    handle.shutdown().await;
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn oversized_bodies_get_a_400_not_a_reset() {
    let handle = server(ServerOptions {
      max_body_bytes: 16,
      access_log: true,
      ..ServerOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    let body = format!("[{}0]", "0,".repeat(500));
    let request = format!(
      "POST /api/keys/rotate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
      body.len()
    );
    let a = ask(&mut s, &request).await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("Request body too large"), "{}", a.body);
    // The body was drained, so the connection is still good.
    assert_eq!(ask(&mut s, &get("/api/keys/best")).await.status, 200);

    // A declared length past what is worth draining is refused before it is sent.
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    let huge = "POST /api/keys/rotate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n";
    let a = ask(&mut s, huge).await;
    assert_eq!(a.status, 400);
    assert!(a.head.contains("connection: close"));
    handle.shutdown().await;
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn shutdown_waits_for_the_request_in_flight() {
    let handle = server(ServerOptions::default()).await;
    let addr = handle.local_addrs()[0];
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(&mut idle, &get("/api/keys/status")).await.status, 200);
    // Headers now, body later: the request is in flight until the body arrives.
    let head = b"POST /api/keys/refresh-cache HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n";
    write_all(&busy, head).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
      !stopping.is_finished(),
      "shutdown returned with a request in flight"
    );
    // The idle keep-alive connection is closed, and no new connection is accepted.
    assert_eq!(read_some(&idle, &mut [0u8; 64]).await, 0);
    assert!(TcpStream::connect(addr).await.is_err());

    write_all(&busy, b"{}").await;
    let a = read_answer(&mut busy).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("cacheRefreshed"));
    tokio::time::timeout(Duration::from_secs(2), stopping)
      .await
      .unwrap()
      .unwrap();
  }

  /// Reads until the peer closes the connection; returns what came.
  async fn read_to_close(stream: &TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
      stream.readable().await.unwrap();
      match stream.try_read(&mut chunk) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
        Ok(0) | Err(_) => return out,
        Ok(n) => out.extend_from_slice(&chunk[..n]),
      }
    }
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn head_is_get_without_a_body_and_http_1_1_needs_a_host() {
    let handle = server(ServerOptions::default()).await;
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    let full = ask(&mut s, &get("/api/keys/status")).await;
    write_all(&s, b"HEAD /api/keys/status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The head alone, saying how long the GET body is; then the connection serves on.
    let mut buf = vec![0u8; 4096];
    let n = read_some(&s, &mut buf).await;
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
      head.ends_with("\r\n\r\n"),
      "a body came after the head: {head}"
    );
    assert!(
      head.contains(&format!("content-length: {}", full.body.len())),
      "{head}"
    );
    assert_eq!(ask(&mut s, &get("/api/keys/status")).await.status, 200);

    let s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    write_all(&s, b"GET /api/keys/status HTTP/1.1\r\n\r\n").await;
    let answer = String::from_utf8(read_to_close(&s).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Host header"), "{answer}");
    // HTTP/1.0 has no Host requirement.
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    let a = ask(&mut s, "GET /api/keys/status HTTP/1.0\r\n\r\n").await;
    assert_eq!(a.status, 200);
    handle.shutdown().await;
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn at_the_cap_slow_connections_make_room_and_clients_keep_being_served() {
    let handle = server(ServerOptions {
      max_connections: 4,
      head_timeout: Duration::from_millis(300),
      ..ServerOptions::default()
    })
    .await;
    let addr = handle.local_addrs()[0];
    // Two clients that were served, then two connections that never send a whole head.
    let mut clients = Vec::new();
    for _ in 0..2 {
      let mut c = TcpStream::connect(addr).await.unwrap();
      assert_eq!(ask(&mut c, &get("/api/keys/status")).await.status, 200);
      clients.push(c);
    }
    let slow: Vec<TcpStream> = {
      let mut v = Vec::new();
      for _ in 0..2 {
        let c = TcpStream::connect(addr).await.unwrap();
        write_all(&c, b"GET /api/keys/status HTTP/1.1\r\nHo").await;
        v.push(c);
      }
      v
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A fifth connection takes the oldest slow one's place and is served at once.
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(&mut fresh, &get("/api/keys/status")).await.status, 200);
    assert!(
      read_to_close(&slow[0]).await.is_empty(),
      "the oldest slow connection is cut"
    );
    // The clients that were served keep their connections.
    for c in &mut clients {
      assert_eq!(ask(c, &get("/api/keys/status")).await.status, 200);
    }
    // The other slow one runs out of time for its head.
    let started = Instant::now();
    let _ = read_to_close(&slow[1]).await;
    assert!(
      started.elapsed() < Duration::from_secs(2),
      "{:?}",
      started.elapsed()
    );
    // Now every open connection is a served client's: one more is refused at once, with a 503.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(&mut extra, &get("/api/keys/status")).await.status, 200);
    let refused = TcpStream::connect(addr).await.unwrap();
    let answer = String::from_utf8(read_to_close(&refused).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    handle.shutdown().await;
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn binding_a_busy_port_is_an_error() {
    let handle = server(ServerOptions::default()).await;
    let err = start(
      pool(),
      Listen::Addr(handle.local_addrs()[0]),
      ServerOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HttpError::Bind { .. }), "{err}");
    handle.shutdown().await;
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn localhost_is_served_on_both_loopbacks_on_one_port() {
    let handle = start(
      pool(),
      Listen::Localhost { port: 0 },
      ServerOptions::default(),
    )
    .await
    .unwrap();
    let addrs = handle.local_addrs().to_vec();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert_eq!(addrs[0].port(), addrs[1].port());
    for ip in [
      IpAddr::from(Ipv4Addr::LOCALHOST),
      IpAddr::from(Ipv6Addr::LOCALHOST),
    ] {
      let mut s = TcpStream::connect((ip, handle.port())).await.unwrap();
      assert_eq!(
        ask(&mut s, &get("/api/keys/status")).await.status,
        200,
        "{ip}"
      );
    }
    // A port taken on ::1 by someone else is not silently left to them.
    let taken = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = start(pool(), Listen::Localhost { port }, ServerOptions::default())
      .await
      .unwrap_err();
    assert!(matches!(err, HttpError::Bind { .. }), "{err}");
    handle.shutdown().await;
  }

  #[test]
  fn access_lines_mask_keys() {
    let p = pool();
    let line = access_line(
      &p,
      "GET",
      &format!("/api/keys/rate-limit/{KEY}?k={KEY}"),
      200,
      Duration::from_micros(1_500),
    );
    assert_eq!(
      line,
      "2023-11-14T22:13:20.000Z GET /api/keys/rate-limit/AIzaSyHT...0001 200 1.500ms"
    );
    let line = access_line(&p, KEY, "/", 400, Duration::ZERO);
    assert!(!line.contains(KEY), "{line}");
    assert!(line.contains(" (other method) / 400 "), "{line}");
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn no_listening_beyond_loopback_without_a_token_unless_allowed() {
    let anywhere = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let err = start(pool(), Listen::Addr(anywhere), ServerOptions::default())
      .await
      .unwrap_err();
    assert!(matches!(err, HttpError::Insecure { .. }), "{err}");
    assert!(err.to_string().contains(ADMIN_TOKEN_ENV), "{err}");
    for options in [
      ServerOptions {
        admin: AdminGuard::with_token("t0ken").unwrap(),
        ..ServerOptions::default()
      },
      ServerOptions {
        allow_insecure: true,
        ..ServerOptions::default()
      },
    ] {
      start(pool(), Listen::Addr(anywhere), options)
        .await
        .unwrap()
        .shutdown()
        .await;
    }
  }

  #[tokio::test(flavor = "multi_thread")]
  async fn admin_endpoints_answer_401_with_a_challenge_over_the_wire() {
    let handle = server(ServerOptions {
      admin: AdminGuard::with_token("t0ken").unwrap(),
      ..ServerOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
    let a = ask(&mut s, "POST /api/keys/rotate HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(a.status, 401);
    assert!(a
      .head
      .contains("\r\nwww-authenticate: bearer realm=\"gemini-key-manager\""));
    let authorized =
      "POST /api/keys/rotate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n";
    assert_eq!(ask(&mut s, authorized).await.status, 200);
    let a = ask(&mut s, &get("/api/keys/dashboard")).await;
    assert_eq!(a.status, 200);
    assert!(a.head.contains("content-type: text/html; charset=utf-8"));
    assert!(a
      .head
      .contains("content-security-policy: default-src 'none'"));
    handle.shutdown().await;
  }
}
