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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{
  HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::{Method, Response, StatusCode};
use tokio::time::Sleep;

use super::upstream::{Upstream, UpstreamError, KEY_HEADER};
use super::usage_scan::UsageScan;
use crate::core::clock::SECOND_MS;
use crate::core::failure::{classify, Failure};
use crate::core::models::ModelId;
use crate::core::pool::{KeyPool, Outcome, RouteKey};
use crate::mask::scrub;

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
  KEY_HEADER,
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
  /// The model the path names (the default one for paths that name none).
  pub model: ModelId,
  /// Whether Gemini counts it against the model's quota (generation and embedding do; reading
  /// models and counting tokens do not).
  pub counted: bool,
}

/// The router: a pool, the connection to Gemini, and how to wait and retry.
#[derive(Clone)]
pub struct Router {
  pool: Arc<KeyPool>,
  upstream: Upstream,
  options: RouteOptions,
  /// Where the next uncounted request starts looking for a key in service, so they spread.
  next_uncounted: Arc<AtomicUsize>,
}

/// Headers fit to forward: connection-level and credential headers dropped, and those the
/// `Connection` header names as this hop's own.
pub fn forwardable(headers: &HeaderMap, extra_dropped: &[&str]) -> HeaderMap {
  let named: Vec<String> = headers
    .get_all(CONNECTION)
    .iter()
    .filter_map(|v| v.to_str().ok())
    .flat_map(|v| v.split(','))
    .map(|t| t.trim().to_ascii_lowercase())
    .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
    .collect();
  let mut out = HeaderMap::with_capacity(headers.len());
  for (name, value) in headers {
    let n = name.as_str();
    if !DROPPED.contains(&n)
      && !extra_dropped.contains(&n)
      && n != CONTENT_LENGTH.as_str()
      && !named.iter().any(|t| t == n)
    {
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

/// The content type of every JSON body the crate writes: Google's errors here, the operators'
/// API's replies in `http`, which serves these too.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

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
  headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
  if let Some(wait) = retry_after {
    error["details"] = serde_json::json!([{
      "@type": "type.googleapis.com/google.rpc.RetryInfo",
      "retryDelay": format!("{:.3}s", wait.as_secs_f64()),
    }]);
    let seconds = wait.as_millis().div_ceil(SECOND_MS as u128).max(1);
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
      next_uncounted: Arc::new(AtomicUsize::new(0)),
    }
  }

  pub fn pool(&self) -> &Arc<KeyPool> {
    &self.pool
  }

  /// Sends `req` on with a key of the pool, waiting, retrying and counting as the module says.
  pub async fn forward(&self, req: RoutedRequest) -> Response<AnswerBody> {
    let deadline = Instant::now() + self.options.max_wait;
    let mut asked = req.asked;
    let mut last: Option<Response<AnswerBody>> = None;
    for _ in 0..self.options.max_attempts {
      // A call Gemini counts holds a reservation until it is counted; one it does not count (a
      // model read, a token count) only needs a key in service, whatever its budgets' windows
      // and rests, and spends none of the pool's.
      let (index, mut held) = if req.counted {
        match self.wait_for_key(asked, req.model, deadline).await {
          Ok(key) => (key.index, Some(Held::new(&self.pool, key))),
          Err(answer) => return self.answered(&req, last.unwrap_or(answer)),
        }
      } else {
        let from = self.next_uncounted.fetch_add(1, Ordering::Relaxed);
        match self.pool.key_in_service(from) {
          Ok(Some(index)) => (index, None),
          Ok(None) => {
            let why =
              "No API key of the pool is in service: every key is refused, disabled or removed";
            return last
              .unwrap_or_else(|| google_error(StatusCode::SERVICE_UNAVAILABLE, why, None));
          }
          Err(e) => {
            let refused = google_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None);
            return last.unwrap_or(refused);
          }
        }
      };
      // Only the first attempt may use the caller's hand-out: a retry goes on the best key.
      asked = None;
      let started = Instant::now();
      let names = self.pool.names();
      let sent = self
        .upstream
        .send(
          &req.method,
          &req.path_and_query,
          &req.headers,
          req.body.clone(),
          names.get(index).unwrap_or_default(),
        )
        .await;
      let response = match sent {
        Ok(answered) => {
          // Counted from when the body left rather than from the choice: connecting came between.
          if let (Some(at), Some(held)) = (answered.body_sent_at, held.as_mut()) {
            held.sent_after(at.saturating_duration_since(started));
          }
          answered.response
        }
        Err(e) => {
          let timed_out = matches!(
            e,
            UpstreamError::TimedOut(_) | UpstreamError::ConnectTimedOut(_)
          );
          let status = match timed_out {
            true => StatusCode::GATEWAY_TIMEOUT,
            false => StatusCode::BAD_GATEWAY,
          };
          let why = e.to_string();
          let unsent = matches!(
            e,
            UpstreamError::NotConnected(_) | UpstreamError::ConnectTimedOut(_)
          );
          match held {
            // No connection, no request: neither the key's fault nor its quota.
            Some(held) if unsent => held.unsent(),
            // It may have reached Gemini: the key is told, as for any transient error.
            held => self.failed(held, status, &why, started),
          }
          let answer = google_error(status, &why, None);
          // A timeout is final: Gemini may be working on it, and the caller was kept waiting.
          if timed_out {
            return self.answered(&req, answer);
          }
          last = Some(answer);
          continue;
        }
      };
      let status = response.status();
      if status.is_success() {
        let (head, mut body) = response.into_parts();
        // The first chunk before the head goes out: a stall until then is still a clean 504.
        let idle = self.upstream.timeouts().between_chunks;
        let first = match tokio::time::timeout(idle, body.frame()).await {
          Ok(None) => None,
          Ok(Some(Ok(frame))) => Some(frame),
          Ok(Some(Err(e))) => {
            let why = format!("Gemini's answer broke off before its first byte: {e}");
            self.failed(held, StatusCode::BAD_GATEWAY, &why, started);
            return self.answered(&req, google_error(StatusCode::BAD_GATEWAY, &why, None));
          }
          Err(_) => {
            let why = format!("Gemini sent the head of its answer, then nothing for {idle:?}");
            self.failed(held, StatusCode::GATEWAY_TIMEOUT, &why, started);
            return self.answered(&req, google_error(StatusCode::GATEWAY_TIMEOUT, &why, None));
          }
        };
        let key = held.map(Held::release);
        let answer = self.stream_through(key, head, body, first, started);
        return self.answered(&req, answer);
      }
      let (head, body) = response.into_parts();
      let text = match Limited::new(body, MAX_ERROR_BODY).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => String::new(),
      };
      let names = self.pool.names();
      let scrubbed = scrub(&text, names.keys());
      if let Some(held) = held {
        let _ = self.pool.finish_routed(
          held.release(),
          0,
          Outcome::Failure(&format!("{} {scrubbed}", status.as_u16())),
          ms(started),
        );
      }
      let refused = matches!(classify(&scrubbed), Failure::KeyRejected);
      let mut headers = forwardable(&head.headers, &[]);
      headers.remove(CONTENT_LENGTH);
      last = Some(whole(status, headers, Bytes::from(scrubbed)));
      // The key's quota or the key itself (another key may do; Gemini refuses a bad key with a
      // 400), or the model's trouble (the pool backs the model off, and the next attempt waits
      // for that).
      let retry = refused || matches!(status.as_u16(), 429 | 401 | 403 | 500 | 503);
      if !retry || Instant::now() >= deadline {
        break;
      }
    }
    let answer = last.unwrap_or_else(|| {
      google_error(StatusCode::BAD_GATEWAY, "Gemini could not be reached", None)
    });
    self.answered(&req, answer)
  }

  /// Counts a request that got no answer to pass on, when it was one to count.
  fn failed(&self, held: Option<Held<'_>>, status: StatusCode, why: &str, started: Instant) {
    if let Some(held) = held {
      let _ = self.pool.finish_routed(
        held.release(),
        0,
        Outcome::Failure(&format!("{} {why}", status.as_u16())),
        ms(started),
      );
    }
  }

  /// Notes the answer for the caller's own bookkeeping (see [`KeyPool::routed_answer`]).
  fn answered(&self, req: &RoutedRequest, answer: Response<AnswerBody>) -> Response<AnswerBody> {
    if let Some(asked) = req.asked.filter(|_| req.counted) {
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
    model: ModelId,
    deadline: Instant,
  ) -> Result<RouteKey, Response<AnswerBody>> {
    loop {
      let next = match self.pool.route_key(asked, model) {
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
    key: Option<RouteKey>,
    head: hyper::http::response::Parts,
    body: Incoming,
    first: Option<Frame<Bytes>>,
    started: Instant,
  ) -> Response<AnswerBody> {
    let mut scan = UsageScan::default();
    if let Some(data) = first.as_ref().and_then(Frame::data_ref) {
      scan.feed(data);
    }
    let mut headers = forwardable(&head.headers, &[]);
    if let Some(length) = head.headers.get(CONTENT_LENGTH) {
      headers.insert(CONTENT_LENGTH, length.clone());
    }
    let watched = Watched {
      first,
      inner: body,
      scan,
      idle: self.upstream.timeouts().between_chunks,
      timer: None,
      finish: key.map(|key| Finish {
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

/// A key chosen for a request not yet counted. When the caller goes away meanwhile (its request
/// future dropped), the request's hold on the reservation is let go; the reservation itself stays
/// until it expires, as an unreported hand-out's does, since the request may have reached Gemini.
struct Held<'a> {
  pool: &'a KeyPool,
  key: RouteKey,
}

impl<'a> Held<'a> {
  fn new(pool: &'a KeyPool, key: RouteKey) -> Self {
    Self { pool, key }
  }

  /// The request's body left `after` the key was chosen: it counts from then.
  fn sent_after(&mut self, after: Duration) {
    self.key.at += after.as_millis() as i64;
  }

  /// The request never went out: its reservation is let go, nothing counted.
  fn unsent(self) {
    self.pool.unsent_routed(self.key);
    // Let go of already.
    std::mem::forget(self);
  }

  /// The key, to be counted now by the caller of this.
  fn release(self) -> RouteKey {
    let key = self.key;
    // Counted by the caller instead: nothing to let go.
    std::mem::forget(self);
    key
  }
}

impl Drop for Held<'_> {
  fn drop(&mut self) {
    self.pool.abandon_routed(self.key);
  }
}

fn ms(started: Instant) -> f64 {
  started.elapsed().as_secs_f64() * SECOND_MS as f64
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
  /// The chunk read before the head went out, sent first.
  first: Option<Frame<Bytes>>,
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
    if let Some(first) = this.first.take() {
      return Poll::Ready(Some(Ok(first)));
    }
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
    self.first.is_none() && self.inner.is_end_stream()
  }
}

/// The `:model` of a Gemini path (`/v1beta/models/gemini-2.0-flash:generateContent`).
pub fn model_of(path: &str) -> Option<&str> {
  let rest = path.split("/models/").nth(1)?;
  let model = rest.split([':', '/', '?']).next()?;
  (!model.is_empty()).then_some(model)
}

#[cfg(test)]
mod tests;
