//! The cheapest upstream `npm run bench:proxy` can measure a proxy against: one thread answering
//! every request with the same bytes (an answer of the fake Gemini, recorded by the bench), so
//! the requests per second measured are the proxies', not the upstream's.
//!
//! Reads `{ "status": 200, "headers": [["content-type", "..."]], "body": "..." }` on stdin, listens
//! on a free port of 127.0.0.1, prints `READY <port>`, and serves until killed.

use std::convert::Infallible;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(serde::Deserialize)]
struct Answer {
  status: u16,
  headers: Vec<(String, String)>,
  body: String,
}

type Failed = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Failed> {
  let mut input = String::new();
  std::io::stdin().read_to_string(&mut input)?;
  let answer: Answer = serde_json::from_str(&input)?;
  let status = StatusCode::from_u16(answer.status)?;
  let mut headers = HeaderMap::new();
  for (name, value) in &answer.headers {
    headers.append(
      HeaderName::from_bytes(name.as_bytes())?,
      HeaderValue::from_str(value)?,
    );
  }
  let body = Bytes::from(answer.body);
  let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
  println!("READY {}", listener.local_addr()?.port());
  loop {
    let (stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let (headers, body) = (headers.clone(), body.clone());
    tokio::spawn(async move {
      let service = service_fn(move |req: Request<Incoming>| {
        let (headers, body) = (headers.clone(), body.clone());
        async move {
          // The request body read to its end, as any server does before it answers.
          let _ = req.into_body().collect().await;
          let mut res = Response::new(Full::new(body));
          *res.status_mut() = status;
          *res.headers_mut() = headers;
          Ok::<_, Infallible>(res)
        }
      });
      let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
    });
  }
}
