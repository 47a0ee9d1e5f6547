use std::net::IpAddr;

use super::*;
use crate::core::pool::testing::TestPool;
use crate::core::quota::Quota;
use crate::log::CapturedLog;

const KEY: &str = "AIzaSyHTTPTEST000000000000000000000000001";

/// The state servers are started with: two keys, no store.
fn state() -> Arc<ApiState> {
  let test = TestPool::new(
    &[KEY, "AIzaSyHTTPTEST000000000000000000000000002"],
    Quota::default(),
  );
  Arc::new(ApiState::new(test.shared()))
}

async fn server(options: ServerOptions) -> ServerHandle {
  let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
  start(state(), Listen::Addr(addr), options).await.unwrap()
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
async fn access_lines_go_to_the_servers_log_in_the_order_answered() {
  let log = Arc::new(CapturedLog::default());
  let handle = server(ServerOptions {
    access_log: true,
    log: log.clone(),
    ..ServerOptions::default()
  })
  .await;
  let mut s = TcpStream::connect(handle.local_addrs()[0]).await.unwrap();
  assert_eq!(ask(&mut s, &get("/api/keys/status")).await.status, 200);
  let rate_limit = format!("/api/keys/rate-limit/{KEY}");
  assert_eq!(ask(&mut s, &get(&rate_limit)).await.status, 200);
  assert_eq!(ask(&mut s, &get("/api/keys/nope")).await.status, 404);
  handle.shutdown().await;
  let lines = log.0.lock().clone();
  let ends: Vec<_> = lines
    .iter()
    .map(|l| l.split_once(' ').unwrap().1.rsplit_once(' ').unwrap().0)
    .collect();
  assert_eq!(
    ends,
    [
      "GET /api/keys/status 200",
      "GET /api/keys/rate-limit/AIzaSyHT...0001 200",
      "GET /api/keys/nope 404",
    ],
    "{lines:?}"
  );
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
    state(),
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
    state(),
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
  let err = start(
    state(),
    Listen::Localhost { port },
    ServerOptions::default(),
  )
  .await
  .unwrap_err();
  assert!(matches!(err, HttpError::Bind { .. }), "{err}");
  handle.shutdown().await;
}

#[test]
fn access_lines_mask_keys() {
  let s = state();
  let line = access_line(
    &s,
    "GET",
    &format!("/api/keys/rate-limit/{KEY}?k={KEY}"),
    200,
    Duration::from_micros(1_500),
  );
  assert_eq!(
    line,
    "2023-11-14T22:13:20.000Z GET /api/keys/rate-limit/AIzaSyHT...0001 200 1.500ms"
  );
  let line = access_line(&s, KEY, "/", 400, Duration::ZERO);
  assert!(!line.contains(KEY), "{line}");
  assert!(line.contains(" (other method) / 400 "), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_listening_beyond_loopback_without_a_token_unless_allowed() {
  let anywhere = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
  let err = start(state(), Listen::Addr(anywhere), ServerOptions::default())
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
    start(state(), Listen::Addr(anywhere), options)
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
