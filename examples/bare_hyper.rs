//! The baseline of `npm run bench:http`: a bare hyper server that answers every request with one
//! fixed reply, with the HTTP/1 settings and the runtime class of the package's server (tokio's
//! multi-threaded runtime, a worker per core; keep-alive, the head-read timer, no Nagle), and
//! nothing else: no routing, no pool, no JSON. Its reply is the one `GET /api/keys/best` gave.
//!
//! `bare_hyper <reply file>`: the file holds the status on its first line, then `name: value`
//! header lines, an empty line, and the body. Prints `READY <port>` once listening on 127.0.0.1.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The package's default `headTimeoutMs`.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

fn read_reply(path: &str) -> (StatusCode, Vec<(HeaderName, HeaderValue)>, Bytes) {
  let text = std::fs::read_to_string(path).expect("the reply file");
  let (head, body) = text.split_once("\n\n").expect("a head and a body");
  let mut lines = head.lines();
  let status = StatusCode::from_u16(lines.next().and_then(|s| s.parse().ok()).expect("a status"))
    .expect("a valid status");
  let headers = lines
    .map(|line| {
      let (name, value) = line.split_once(": ").expect("name: value");
      (
        HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
        HeaderValue::from_str(value).expect("a header value"),
      )
    })
    .collect();
  (status, headers, Bytes::from(body.to_owned()))
}

#[tokio::main]
async fn main() {
  let path = std::env::args()
    .nth(1)
    .expect("usage: bare_hyper <reply file>");
  let (status, headers, body) = read_reply(&path);
  let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
  println!("READY {}", listener.local_addr().expect("address").port());
  let mut http = http1::Builder::new();
  http
    .timer(TokioTimer::new())
    .header_read_timeout(HEAD_TIMEOUT)
    .keep_alive(true);
  loop {
    let Ok((stream, _)) = listener.accept().await else {
      continue;
    };
    let _ = stream.set_nodelay(true);
    let (http, headers, body) = (http.clone(), headers.clone(), body.clone());
    tokio::spawn(async move {
      let service = service_fn(move |_req| {
        let mut res = Response::new(Full::new(body.clone()));
        *res.status_mut() = status;
        for (name, value) in &headers {
          res.headers_mut().insert(name.clone(), value.clone());
        }
        async move { Ok::<_, Infallible>(res) }
      });
      let _ = http.serve_connection(TokioIo::new(stream), service).await;
    });
  }
}
