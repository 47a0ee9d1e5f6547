//! Sends a Gemini request with a key of the pool: the key the caller's own hand-out reserved when
//! it has one (the caller asked the pool just before), else the best key, reserved at once. When
//! no key has room the request waits for one (bounded), instead of going out to be refused; past
//! the bound it gets a 429 in Google's shape without reaching Gemini. A 429, 500 or 503 that comes
//! back before any byte went to the caller is counted (the pool reads it as it reads any failure)
//! and the request tried again, on another key or after a back-off; once bytes are on their way a
//! failure passes through as it is. Tokens come from the answer's `usageMetadata` (a stream's last
//! chunk), read as it streams by.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Response, StatusCode};
use tokio::time::Sleep;

use super::upstream::{Upstream, UpstreamError};
use super::usage_scan::UsageScan;
use crate::mask::scrub;
use crate::pool::{KeyPool, Outcome, RouteKey};

/// The body of an answer the server sends: whole, or streamed through from Gemini.
pub type AnswerBody = BoxBody<Bytes, io::Error>;

/// How the router waits and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOptions {
  /// How long a request may wait for a key with room before it gets a 429 (default 60 s).
  pub max_wait: Duration,
  /// Requests sent to Gemini for one call at most, the first included (default 4).
  pub max_attempts: u32,
}

impl Default for RouteOptions {
  fn default() -> Self {
    Self {
      max_wait: Duration::from_secs(60),
      max_attempts: 4,
    }
  }
}

/// Error bodies read for the pool's reading and scrubbing, at most.
const MAX_ERROR_BODY: usize = 1 << 20;
/// The first back-off after an overload, doubled each attempt (with jitter), capped.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Headers that concern one connection, never forwarded (RFC 9110 section 7.6.1), and those that
/// carry credentials or are set per request. `accept-encoding` too: the answer's tokens are read
/// as it streams by, which a compressed body would hide.
const DROPPED: [&str; 13] = [
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "host",
  "authorization",
  "x-goog-api-key",
  "accept-encoding",
];

/// One request to send on.
#[derive(Debug)]
pub struct RoutedRequest {
  pub method: Method,
  /// Path and query to send to Gemini (no key in it).
  pub path_and_query: String,
  pub headers: HeaderMap,
  pub body: Bytes,
  /// The pool key the caller's request carried, if it carried one.
  pub asked: Option<usize>,
}

/// The router: a pool, the connection to Gemini, and how to wait and retry.
#[derive(Clone)]
pub struct Router {
  pool: Arc<KeyPool>,
  upstream: Upstream,
  options: RouteOptions,
}

/// Headers fit to forward: connection-level and credential headers dropped.
pub fn forwardable(headers: &HeaderMap, extra_dropped: &[&str]) -> HeaderMap {
  let mut out = HeaderMap::with_capacity(headers.len());
  for (name, value) in headers {
    let n = name.as_str();
    if !DROPPED.contains(&n) && !extra_dropped.contains(&n) && n != CONTENT_LENGTH.as_str() {
      out.append(name.clone(), value.clone());
    }
  }
  out
}

fn whole(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<AnswerBody> {
  let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
  *response.status_mut() = status;
  *response.headers_mut() = headers;
  response
}

/// An error in Google's shape (`{ error: { code, message, status, details } }`).
pub fn google_error(
  status: StatusCode,
  message: &str,
  retry_after: Option<Duration>,
) -> Response<AnswerBody> {
  let code = status.as_u16();
  let grpc = match code {
    400 => "INVALID_ARGUMENT",
    401 => "UNAUTHENTICATED",
    404 => "NOT_FOUND",
    413 => "INVALID_ARGUMENT",
    429 => "RESOURCE_EXHAUSTED",
    503 => "UNAVAILABLE",
    504 => "DEADLINE_EXCEEDED",
    _ => "INTERNAL",
  };
  let mut error = serde_json::json!({ "code": code, "message": message, "status": grpc });
  let mut headers = HeaderMap::new();
  headers.insert(
    CONTENT_TYPE,
    HeaderValue::from_static("application/json; charset=utf-8"),
  );
  if let Some(wait) = retry_after {
    error["details"] = serde_json::json!([{
      "@type": "type.googleapis.com/google.rpc.RetryInfo",
      "retryDelay": format!("{:.3}s", wait.as_secs_f64()),
    }]);
    let seconds = wait.as_millis().div_ceil(1_000).max(1);
    if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
      headers.insert(RETRY_AFTER, v);
    }
  }
  let body = serde_json::json!({ "error": error }).to_string();
  whole(status, headers, Bytes::from(body))
}

impl Router {
  pub fn new(pool: Arc<KeyPool>, upstream: Upstream, options: RouteOptions) -> Self {
    Self {
      pool,
      upstream,
      options,
    }
  }

  pub fn pool(&self) -> &Arc<KeyPool> {
    &self.pool
  }

  /// Sends `req` on with a key of the pool, waiting, retrying and counting as the module says.
  pub async fn forward(&self, req: RoutedRequest) -> Response<AnswerBody> {
    let deadline = Instant::now() + self.options.max_wait;
    let mut asked = req.asked;
    let mut backoff = FIRST_BACKOFF;
    let mut last: Option<Response<AnswerBody>> = None;
    for attempt in 1..=self.options.max_attempts {
      let mut key = match self.wait_for_key(asked, deadline).await {
        Ok(key) => key,
        Err(answer) => return self.answered(req.asked, last.unwrap_or(answer)),
      };
      let chosen = Instant::now();
      // Only the first attempt may use the caller's hand-out: a retry goes on the best key.
      asked = None;
      let started = Instant::now();
      let text = self
        .pool
        .names()
        .get(key.index)
        .unwrap_or_default()
        .to_owned();
      let sent = self
        .upstream
        .send(
          &req.method,
          &req.path_and_query,
          &req.headers,
          req.body.clone(),
          &text,
        )
        .await;
      let response = match sent {
        Ok(answered) => {
          // Counted from when the body left rather than from the choice: connecting came between.
          if let Some(at) = answered.body_sent_at {
            key.at += at.saturating_duration_since(chosen).as_millis() as i64;
          }
          answered.response
        }
        Err(e) => {
          let (status, why) = match &e {
            UpstreamError::TimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, e.to_string()),
            _ => (StatusCode::BAD_GATEWAY, e.to_string()),
          };
          // A network failure is nobody's quota: the key is told, as for any transient error.
          let _ = self.pool.finish_routed(
            key,
            0,
            Outcome::Failure(&format!("{} {why}", status.as_u16())),
            ms(started),
          );
          last = Some(google_error(status, &why, None));
          continue;
        }
      };
      let status = response.status();
      if status.is_success() {
        return self.answered(req.asked, self.stream_through(key, response, started));
      }
      let (head, body) = response.into_parts();
      let text = match Limited::new(body, MAX_ERROR_BODY).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => String::new(),
      };
      let names = self.pool.names();
      let scrubbed = scrub(&text, names.keys());
      let _ = self.pool.finish_routed(
        key,
        0,
        Outcome::Failure(&format!("{} {scrubbed}", status.as_u16())),
        ms(started),
      );
      let mut headers = forwardable(&head.headers, &[]);
      headers.remove(CONTENT_LENGTH);
      last = Some(whole(status, headers, Bytes::from(scrubbed)));
      let retry = match status.as_u16() {
        // The key's quota, or the key itself: another key may do.
        429 | 401 | 403 => true,
        // The model's trouble: wait a little first.
        500 | 503 => {
          let pause = jittered(backoff);
          backoff = (backoff * 2).min(MAX_BACKOFF);
          if attempt < self.options.max_attempts && Instant::now() + pause < deadline {
            tokio::time::sleep(pause).await;
          }
          true
        }
        _ => false,
      };
      if !retry || Instant::now() >= deadline {
        break;
      }
    }
    let answer = last.unwrap_or_else(|| {
      google_error(StatusCode::BAD_GATEWAY, "Gemini could not be reached", None)
    });
    self.answered(req.asked, answer)
  }

  /// Notes the answer for the caller's own bookkeeping (see [`KeyPool::routed_answer`]).
  fn answered(&self, asked: Option<usize>, answer: Response<AnswerBody>) -> Response<AnswerBody> {
    if let Some(asked) = asked {
      self
        .pool
        .routed_answer(asked, answer.status() == StatusCode::TOO_MANY_REQUESTS);
    }
    answer
  }

  /// A key with room, waiting for one until `deadline`; past it, the 429 to answer.
  async fn wait_for_key(
    &self,
    asked: Option<usize>,
    deadline: Instant,
  ) -> Result<RouteKey, Response<AnswerBody>> {
    loop {
      let next = match self.pool.route_key(asked) {
        Ok(Ok(key)) => return Ok(key),
        Ok(Err(next)) => next,
        Err(e) => {
          return Err(google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &e.to_string(),
            None,
          ))
        }
      };
      let now = self.pool.now();
      let Some(at) = next else {
        return Err(google_error(
          StatusCode::SERVICE_UNAVAILABLE,
          "No API key of the pool can serve: every key is refused, disabled or removed",
          None,
        ));
      };
      let wait = Duration::from_millis((at - now).max(1) as u64);
      if Instant::now() + wait > deadline {
        return Err(google_error(
          StatusCode::TOO_MANY_REQUESTS,
          &format!(
            "No API key of the pool has room for this request within the wait allowed: retry in {:.1}s",
            wait.as_secs_f64()
          ),
          Some(wait),
        ));
      }
      tokio::time::sleep(wait).await;
    }
  }

  /// The answer streamed through as Gemini sends it, its tokens read on the way and counted on
  /// the key when it ends.
  fn stream_through(
    &self,
    key: RouteKey,
    response: Response<Incoming>,
    started: Instant,
  ) -> Response<AnswerBody> {
    let (head, body) = response.into_parts();
    let mut headers = forwardable(&head.headers, &[]);
    if let Some(length) = head.headers.get(CONTENT_LENGTH) {
      headers.insert(CONTENT_LENGTH, length.clone());
    }
    let watched = Watched {
      inner: body,
      scan: UsageScan::default(),
      idle: self.upstream.timeouts().between_chunks,
      timer: None,
      finish: Some(Finish {
        pool: self.pool.clone(),
        key,
        started,
      }),
    };
    let mut answer = Response::new(watched.boxed());
    *answer.status_mut() = head.status;
    *answer.headers_mut() = headers;
    answer
  }
}

fn ms(started: Instant) -> f64 {
  started.elapsed().as_secs_f64() * 1_000.0
}

/// `d` give or take a quarter, so callers backing off together do not come back together.
fn jittered(d: Duration) -> Duration {
  let nanos = std::time::SystemTime::now()
    .duration_since(std::time::UNIX_EPOCH)
    .map_or(0, |t| t.subsec_nanos());
  let quarter = d / 4;
  d - quarter + quarter * (nanos % 1_000) / 500
}

/// Counts a streamed answer when it ends (or is dropped, the caller having gone: the request
/// was made all the same).
struct Finish {
  pool: Arc<KeyPool>,
  key: RouteKey,
  started: Instant,
}

/// A body streamed through, watched for its tokens and for a stall between chunks.
struct Watched {
  inner: Incoming,
  scan: UsageScan,
  idle: Duration,
  timer: Option<Pin<Box<Sleep>>>,
  finish: Option<Finish>,
}

impl Watched {
  fn done(&mut self) {
    if let Some(f) = self.finish.take() {
      let tokens = self.scan.total_tokens().unwrap_or(0);
      let _ = f
        .pool
        .finish_routed(f.key, tokens, Outcome::Success, ms(f.started));
    }
  }
}

impl Drop for Watched {
  fn drop(&mut self) {
    self.done();
  }
}

impl Body for Watched {
  type Data = Bytes;
  type Error = io::Error;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
    let this = &mut *self;
    match Pin::new(&mut this.inner).poll_frame(cx) {
      Poll::Ready(Some(Ok(frame))) => {
        this.timer = None;
        if let Some(data) = frame.data_ref() {
          this.scan.feed(data);
        }
        Poll::Ready(Some(Ok(frame)))
      }
      Poll::Ready(Some(Err(e))) => {
        this.done();
        Poll::Ready(Some(Err(io::Error::other(e))))
      }
      Poll::Ready(None) => {
        this.done();
        Poll::Ready(None)
      }
      Poll::Pending => {
        let idle = this.idle;
        let timer = this
          .timer
          .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
          Poll::Ready(()) => {
            this.done();
            Poll::Ready(Some(Err(io::Error::new(
              io::ErrorKind::TimedOut,
              format!("Gemini sent nothing for {idle:?}"),
            ))))
          }
          Poll::Pending => Poll::Pending,
        }
      }
    }
  }

  fn is_end_stream(&self) -> bool {
    self.inner.is_end_stream()
  }
}

/// The `:model` of a Gemini path (`/v1beta/models/gemini-2.0-flash:generateContent`).
pub fn model_of(path: &str) -> Option<&str> {
  let rest = path.split("/models/").nth(1)?;
  let model = rest.split([':', '/', '?']).next()?;
  (!model.is_empty()).then_some(model)
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn models_come_from_the_path() {
    assert_eq!(
      model_of("/v1beta/models/gemini-2.0-flash:generateContent"),
      Some("gemini-2.0-flash")
    );
    assert_eq!(model_of("/v1/models/gemini-pro/x"), Some("gemini-pro"));
    assert_eq!(model_of("/v1beta/models/"), None);
    assert_eq!(model_of("/v1beta/files"), None);
  }

  #[test]
  fn connection_and_credential_headers_are_not_forwarded() {
    use hyper::header::HeaderName;
    let mut h = HeaderMap::new();
    for (n, v) in [
      ("connection", "close"),
      ("x-goog-api-key", "secret"),
      ("authorization", "Bearer t"),
      ("content-type", "application/json"),
      ("content-length", "3"),
      ("x-goog-api-client", "genai-js/1"),
      ("x-gkm-route-token", "t"),
    ] {
      h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    let out = forwardable(&h, &["x-gkm-route-token"]);
    let mut names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-type", "x-goog-api-client"]);
  }

  #[test]
  fn jitter_stays_within_a_quarter() {
    for _ in 0..100 {
      let d = jittered(Duration::from_millis(400));
      assert!(
        d >= Duration::from_millis(300) && d <= Duration::from_millis(500),
        "{d:?}"
      );
    }
  }
}
