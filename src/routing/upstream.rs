//! The connection to Gemini: one pooled hyper client, HTTPS through rustls (webpki roots, and the
//! certificates of `GEMINI_CA_FILE` when set) with HTTP/2 where the server offers it, to
//! `GEMINI_BASE_URL` (Google's endpoint by default). The key always travels in the
//! `x-goog-api-key` header, never in the URL.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use thiserror::Error;
use tower_service::Service;

/// Gemini's REST endpoint.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// Where requests go instead (a fake in tests, a gateway in some deployments).
pub const BASE_URL_ENV: &str = "GEMINI_BASE_URL";
/// The header Gemini reads the key from.
pub const KEY_HEADER: &str = "x-goog-api-key";
/// A PEM file of root certificates trusted besides the webpki (Mozilla) ones: a test upstream's,
/// or a TLS-inspecting gateway's.
pub const CA_FILE_ENV: &str = "GEMINI_CA_FILE";

/// `GEMINI_BASE_URL` when set, else Google's endpoint.
pub fn base_url(env: &dyn Fn(&str) -> Option<String>) -> String {
  env(BASE_URL_ENV)
    .map(|b| b.trim().to_owned())
    .filter(|b| !b.is_empty())
    .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned())
}

/// How long to wait for a connection, for the response head, and for each next chunk of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
  pub connect: Duration,
  pub first_byte: Duration,
  pub between_chunks: Duration,
}

impl Default for Timeouts {
  fn default() -> Self {
    Self {
      connect: Duration::from_secs(10),
      // A long generation answers its head only once it is done.
      first_byte: Duration::from_secs(300),
      between_chunks: Duration::from_secs(120),
    }
  }
}

/// A request body that notes when its last byte was handed to the connection: Gemini counts a
/// request from about then (a connection being set up first delays it, and must not count).
#[derive(Debug)]
pub struct Outgoing {
  body: Full<Bytes>,
  written: Arc<OnceLock<Instant>>,
}

impl Body for Outgoing {
  type Data = Bytes;
  type Error = std::convert::Infallible;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
    let polled = Pin::new(&mut self.body).poll_frame(cx);
    // The one data frame, or the end: whichever hyper takes last is the moment the body left.
    if polled.is_ready() && self.body.is_end_stream() {
      let _ = self.written.set(Instant::now());
    }
    polled
  }

  fn is_end_stream(&self) -> bool {
    self.body.is_end_stream()
  }

  fn size_hint(&self) -> SizeHint {
    self.body.size_hint()
  }
}

/// A response head from Gemini, and when the request's body was sent (unknown for an empty body,
/// which hyper never polls).
#[derive(Debug)]
pub struct Answered {
  pub response: Response<Incoming>,
  pub body_sent_at: Option<Instant>,
}

#[derive(Debug, Error)]
pub enum UpstreamError {
  #[error("GEMINI_BASE_URL must be an http or https URL (got {0:?})")]
  BadBaseUrl(String),
  #[error("Gemini did not answer within {0:?}")]
  TimedOut(Duration),
  #[error("no connection to Gemini within {0:?}")]
  ConnectTimedOut(Duration),
  #[error("cannot read the root certificates of {CA_FILE_ENV} ({path}): {why}")]
  CaFile { path: String, why: String },
  /// No connection was made (refused, no route, a failed TLS handshake): the request never left.
  #[error("Gemini could not be reached: {0}")]
  NotConnected(String),
  /// The connection broke after the request may have gone out.
  #[error("Gemini could not be reached: {0}")]
  Unreachable(String),
  #[error("invalid upstream request: {0}")]
  Request(String),
}

/// The pooled client to Gemini.
#[derive(Debug, Clone)]
pub struct Upstream {
  client: Client<Connecting<HttpsConnector<HttpConnector>>, Outgoing>,
  /// Scheme and authority of the base URL, and the path it starts with (without a trailing
  /// slash).
  origin: String,
  host: HeaderValue,
  timeouts: Timeouts,
}

impl Upstream {
  /// A client for `base_url` (see [`DEFAULT_BASE_URL`]), trusting the webpki roots.
  pub fn new(base_url: &str, timeouts: Timeouts) -> Result<Self, UpstreamError> {
    Self::with_roots(base_url, timeouts, None)
  }

  /// [`Self::new`], trusting the certificates of the PEM file `ca_file` too.
  pub fn with_roots(
    base_url: &str,
    timeouts: Timeouts,
    ca_file: Option<&Path>,
  ) -> Result<Self, UpstreamError> {
    let bad = || UpstreamError::BadBaseUrl(base_url.to_owned());
    let uri: Uri = base_url.trim().parse().map_err(|_| bad())?;
    let scheme = uri
      .scheme_str()
      .filter(|s| matches!(*s, "http" | "https"))
      .ok_or_else(bad)?;
    let authority = uri.authority().ok_or_else(bad)?.clone();
    let path = uri.path().trim_end_matches('/');
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
      .with_tls_config(tls_config(ca_file)?)
      .https_or_http()
      .enable_http1()
      .enable_http2()
      .wrap_connector(http);
    let connecting = Connecting {
      inner: https,
      limit: timeouts.connect,
    };
    let client = Client::builder(TokioExecutor::new())
      .pool_idle_timeout(Duration::from_secs(90))
      .build(connecting);
    Ok(Self {
      client,
      origin: format!("{scheme}://{authority}{path}"),
      host: HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?,
      timeouts,
    })
  }

  /// To [`base_url`], trusting [`CA_FILE_ENV`]'s certificates too when it is set.
  pub fn from_env(
    env: &dyn Fn(&str) -> Option<String>,
    timeouts: Timeouts,
  ) -> Result<Self, UpstreamError> {
    let ca_file = env(CA_FILE_ENV).filter(|p| !p.trim().is_empty());
    Self::with_roots(
      &base_url(env),
      timeouts,
      ca_file.as_deref().map(|p| Path::new(p.trim())),
    )
  }

  pub fn timeouts(&self) -> Timeouts {
    self.timeouts
  }

  /// Sends one request with `key`, `path_and_query` relative to the base URL; resolves once the
  /// response head is in (within the first-byte timeout), with when the body went out.
  pub async fn send(
    &self,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    key: &str,
  ) -> Result<Answered, UpstreamError> {
    let uri = format!("{}{path_and_query}", self.origin);
    let written = Arc::new(OnceLock::new());
    let outgoing = Outgoing {
      body: Full::new(body),
      written: written.clone(),
    };
    let mut request = Request::builder()
      .method(method.clone())
      .uri(&uri)
      .body(outgoing)
      .map_err(|e| UpstreamError::Request(e.to_string()))?;
    // Copied whole: one allocation, where appending grows the map header by header.
    *request.headers_mut() = headers.clone();
    let out = request.headers_mut();
    out.insert(HOST, self.host.clone());
    let key = HeaderValue::from_str(key)
      .map_err(|_| UpstreamError::Request("a key that is not a header value".into()))?;
    out.insert(HeaderName::from_static(KEY_HEADER), key);
    match tokio::time::timeout(self.timeouts.first_byte, self.client.request(request)).await {
      Ok(Ok(response)) => Ok(Answered {
        response,
        body_sent_at: written.get().copied(),
      }),
      Ok(Err(e)) if connect_timed_out(&e) => {
        Err(UpstreamError::ConnectTimedOut(self.timeouts.connect))
      }
      Ok(Err(e)) if e.is_connect() => Err(UpstreamError::NotConnected(describe(&e))),
      Ok(Err(e)) => Err(UpstreamError::Unreachable(describe(&e))),
      Err(_) => Err(UpstreamError::TimedOut(self.timeouts.first_byte)),
    }
  }
}

/// A connector held to the connect timeout for the whole of connecting, the TLS handshake
/// included: the TCP connector's own timeout ends at the TCP handshake, and a server that accepts
/// but never answers the ClientHello would otherwise hold the request until the first-byte timeout.
#[derive(Debug, Clone)]
pub struct Connecting<C> {
  inner: C,
  limit: Duration,
}

type ConnectError = Box<dyn std::error::Error + Send + Sync>;

impl<C> Service<Uri> for Connecting<C>
where
  C: Service<Uri>,
  C::Future: Send + 'static,
  C::Error: Into<ConnectError>,
{
  type Response = C::Response;
  type Error = ConnectError;
  type Future = Pin<Box<dyn Future<Output = Result<C::Response, ConnectError>> + Send>>;

  fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
    self.inner.poll_ready(cx).map_err(Into::into)
  }

  fn call(&mut self, uri: Uri) -> Self::Future {
    let connecting = self.inner.call(uri);
    let limit = self.limit;
    Box::pin(async move {
      match tokio::time::timeout(limit, connecting).await {
        Ok(connected) => connected.map_err(Into::into),
        Err(_) => Err(Box::new(io::Error::new(
          io::ErrorKind::TimedOut,
          format!("not connected within {limit:?}"),
        )) as ConnectError),
      }
    })
  }
}

/// Rustls with its safe defaults, the webpki roots and those of `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamError> {
  use rustls::pki_types::pem::PemObject;
  use rustls::pki_types::CertificateDer;
  let mut roots = rustls::RootCertStore {
    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
  };
  if let Some(path) = ca_file {
    let failed = |why: String| UpstreamError::CaFile {
      path: path.display().to_string(),
      why,
    };
    let certs = CertificateDer::pem_file_iter(path)
      .map_err(|e| failed(e.to_string()))?
      .collect::<Result<Vec<_>, _>>()
      .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
      return Err(failed("no certificate in it".to_owned()));
    }
    for cert in certs {
      roots.add(cert).map_err(|e| failed(e.to_string()))?;
    }
  }
  let provider = Arc::new(rustls::crypto::ring::default_provider());
  Ok(
    rustls::ClientConfig::builder_with_provider(provider)
      .with_safe_default_protocol_versions()
      .map_err(|e| UpstreamError::Request(e.to_string()))?
      .with_root_certificates(roots)
      .with_no_client_auth(),
  )
}

/// Whether connecting gave up at its timeout (an `io::Error` of kind `TimedOut` somewhere in the
/// chain), rather than being refused.
fn connect_timed_out(e: &hyper_util::client::legacy::Error) -> bool {
  if !e.is_connect() {
    return false;
  }
  let mut source = std::error::Error::source(e);
  while let Some(cause) = source {
    if cause
      .downcast_ref::<io::Error>()
      .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
    {
      return true;
    }
    source = cause.source();
  }
  false
}

/// A client error with its cause: hyper's own message says little.
fn describe(e: &hyper_util::client::legacy::Error) -> String {
  let mut text = e.to_string();
  let mut source = std::error::Error::source(e);
  while let Some(cause) = source {
    text.push_str(": ");
    text.push_str(&cause.to_string());
    source = cause.source();
  }
  text
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn base_urls_are_http_or_https_with_a_host() {
    let t = Timeouts::default();
    let u = Upstream::new("http://127.0.0.1:9/prefix/", t).unwrap();
    assert_eq!(u.origin, "http://127.0.0.1:9/prefix");
    assert_eq!(u.host, "127.0.0.1:9");
    assert_eq!(
      Upstream::new(DEFAULT_BASE_URL, t).unwrap().origin,
      DEFAULT_BASE_URL
    );
    for bad in ["", "ftp://x", "not a url", "/just/a/path"] {
      assert!(
        matches!(Upstream::new(bad, t), Err(UpstreamError::BadBaseUrl(_))),
        "{bad}"
      );
    }
  }
}
