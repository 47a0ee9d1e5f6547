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

mod against_a_fake_gemini {
  use std::collections::VecDeque;
  use std::net::{Ipv4Addr, SocketAddr};

  use http_body_util::BodyExt;
  use hyper::server::conn::http1;
  use hyper::service::service_fn;
  use hyper_util::rt::TokioIo;
  use parking_lot::Mutex;
  use tokio::net::TcpListener;

  use super::*;
  use crate::core::config::PoolConfig;
  use crate::core::pool::testing::on_system_clock;
  use crate::core::quota::Quota;
  use crate::routing::Timeouts;

  const KEYS: [&str; 2] = [
    "AIzaSyROUTERtest00000000000000000000000001",
    "AIzaSyROUTERtest00000000000000000000000002",
  ];

  /// What the fake answers, in turn (then 200s), and the keys it was sent.
  #[derive(Default)]
  struct Script {
    answers: Mutex<VecDeque<(u16, &'static str)>>,
    keys: Mutex<Vec<String>>,
  }

  const OK: &str =
    r#"{"candidates":[],"usageMetadata":{"promptTokenCount":30,"totalTokenCount":42}}"#;

  /// A fake Gemini on a free port; its base URL.
  async fn fake(script: Arc<Script>) -> String {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
      .await
      .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
      loop {
        let Ok((stream, _)) = listener.accept().await else {
          return;
        };
        let script = script.clone();
        tokio::spawn(async move {
          let service = service_fn(move |req: hyper::Request<Incoming>| {
            let script = script.clone();
            async move {
              let key = req
                .headers()
                .get("x-goog-api-key")
                .map(|v| v.to_str().unwrap_or("").to_owned());
              script.keys.lock().push(key.unwrap_or_default());
              let (status, body) = script.answers.lock().pop_front().unwrap_or((200, OK));
              let mut res = Response::new(Full::new(Bytes::from(body)));
              *res.status_mut() = StatusCode::from_u16(status).unwrap();
              Ok::<_, std::convert::Infallible>(res)
            }
          });
          let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
        });
      }
    });
    format!("http://{addr}")
  }

  fn router(base: &str, rpm: u64) -> Router {
    router_with(base, rpm, Timeouts::default())
  }

  fn router_with(base: &str, rpm: u64, timeouts: Timeouts) -> Router {
    let quota = Quota {
      rpm,
      rpd: 1_000,
      tpm: 1_000_000,
    };
    let (pool, _) = on_system_clock(PoolConfig::of(
      KEYS.iter().map(|k| k.to_string()).collect(),
      quota,
    ));
    let upstream = Upstream::new(base, timeouts).unwrap();
    Router::new(
      pool,
      upstream,
      RouteOptions {
        // Long enough for the model's first back-off after an overload (about a second).
        max_wait: Duration::from_secs(3),
        max_attempts: 4,
      },
    )
  }

  fn request(asked: Option<usize>) -> RoutedRequest {
    RoutedRequest {
      method: Method::POST,
      path_and_query: "/v1beta/models/gemini-2.0-flash:generateContent".into(),
      headers: HeaderMap::new(),
      body: Bytes::from_static(br#"{"contents":[{"parts":[{"text":"hi"}]}]}"#),
      asked,
      model: 0,
      counted: true,
    }
  }

  async fn text(answer: Response<AnswerBody>) -> (StatusCode, String) {
    let status = answer.status();
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
  }

  #[tokio::test]
  async fn an_overload_is_retried_and_a_429_moves_to_another_key_before_the_caller_sees_one_answer()
  {
    let script = Arc::new(Script::default());
    script.answers.lock().extend([
      (
        503,
        r#"{"error":{"code":503,"message":"The model is overloaded."}}"#,
      ),
      (
        429,
        r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#,
      ),
    ]);
    let r = router(&fake(script.clone()).await, 30);
    let (status, body) = text(r.forward(request(Some(0))).await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"totalTokenCount\":42"));
    let sent = script.keys.lock().clone();
    assert_eq!(sent.len(), 3);
    assert_ne!(sent[1], sent[2], "the 429's key is not tried again");
    // Counted: three requests went out; the answer's tokens on the key that served it.
    let figures: Vec<_> = (0..2).map(|i| r.pool().figures(i).unwrap()).collect();
    assert_eq!(figures.iter().map(|f| f.rpm.current).sum::<u64>(), 3);
    assert_eq!(figures.iter().map(|f| f.tpm.current).sum::<u64>(), 42);
  }

  #[tokio::test]
  async fn without_room_the_caller_gets_googles_429_and_gemini_sees_nothing() {
    let script = Arc::new(Script::default());
    let r = router(&fake(script.clone()).await, 1);
    for _ in 0..2 {
      assert_eq!(text(r.forward(request(None)).await).await.0, StatusCode::OK);
    }
    let (status, body) = text(r.forward(request(None)).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
      body.contains("RESOURCE_EXHAUSTED") && body.contains("google.rpc.RetryInfo"),
      "{body}"
    );
    assert_eq!(script.keys.lock().len(), 2);
  }

  #[tokio::test]
  async fn an_error_body_never_carries_a_key_back() {
    let script = Arc::new(Script::default());
    let leak: &'static str = Box::leak(
      format!(
        r#"{{"error":{{"code":400,"message":"Invalid JSON payload received near {}"}}}}"#,
        KEYS[0]
      )
      .into_boxed_str(),
    );
    script.answers.lock().push_back((400, leak));
    let r = router(&fake(script).await, 30);
    let (status, body) = text(r.forward(request(Some(0))).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
      !body.contains(KEYS[0]) && body.contains("AIzaSyRO...0001"),
      "{body}"
    );
  }

  #[tokio::test]
  async fn a_tls_handshake_that_never_ends_is_a_504_at_the_connect_timeout_and_not_the_keys_fault()
  {
    // Accepts TCP connections and holds them, never reading the ClientHello nor answering it.
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
      .await
      .unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    tokio::spawn(async move {
      while let Ok((stream, _)) = listener.accept().await {
        held.lock().push(stream);
      }
    });
    let connect = Duration::from_millis(300);
    let r = router_with(
      &base,
      30,
      Timeouts {
        connect,
        first_byte: Duration::from_secs(30),
        between_chunks: Duration::from_secs(30),
      },
    );
    let started = Instant::now();
    let (status, body) = text(r.forward(request(None)).await).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], 504);
    assert_eq!(error["error"]["status"], "DEADLINE_EXCEEDED");
    assert_eq!(
      error["error"]["message"],
      "no connection to Gemini within 300ms"
    );
    // About the connect timeout, far from the first-byte one (a loaded machine gets slack).
    assert!(took >= connect && took < Duration::from_secs(5), "{took:?}");
    assert_eq!(accepted.lock().len(), 1, "the TCP connection was made");
    // Nothing counted nor held against either key: no request left.
    for i in 0..KEYS.len() {
      let f = r.pool().figures(i).unwrap();
      assert_eq!(f.error_count, 0, "key {i}");
      assert_eq!(f.state, crate::core::health::HealthState::Active, "key {i}");
      assert_eq!(f.rpm.current, 0, "key {i}");
      assert_eq!(r.pool().last_error(i).unwrap(), None, "key {i}");
    }
  }

  /// A model read: counted nowhere, sent on with any key in service.
  fn model_read() -> RoutedRequest {
    RoutedRequest {
      method: Method::GET,
      path_and_query: "/v1beta/models".into(),
      headers: HeaderMap::new(),
      body: Bytes::new(),
      asked: None,
      model: 0,
      counted: false,
    }
  }

  #[tokio::test]
  async fn model_reads_go_on_any_key_in_service_whatever_its_budgets() {
    let script = Arc::new(Script::default());
    let r = router(&fake(script.clone()).await, 1);
    // Both keys' minute spent: a generation waits, a read does not.
    for _ in 0..2 {
      assert_eq!(text(r.forward(request(None)).await).await.0, StatusCode::OK);
    }
    assert_eq!(
      text(r.forward(request(None)).await).await.0,
      StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..2 {
      assert_eq!(text(r.forward(model_read()).await).await.0, StatusCode::OK);
    }
    let sent = script.keys.lock().clone();
    assert_eq!(sent.len(), 4);
    assert_ne!(sent[2], sent[3], "reads spread over the keys");
    let counted: u64 = (0..2)
      .map(|i| r.pool().figures(i).unwrap().rpm.current)
      .sum();
    assert_eq!(counted, 2, "reads count nothing");
    // One key taken out by an operator: the other answers every read.
    r.pool()
      .admit(0, crate::core::key::Admission::Disabled)
      .unwrap();
    for _ in 0..2 {
      assert_eq!(text(r.forward(model_read()).await).await.0, StatusCode::OK);
    }
    assert!(script.keys.lock()[4..].iter().all(|k| k == KEYS[1]));
    // The other refused by Gemini: no key in service, a 503 that reaches no Gemini.
    r.pool()
      .record_usage(1, 0, Outcome::Failure("400 API_KEY_INVALID"), 1.0, None)
      .unwrap();
    let (status, body) = text(r.forward(model_read()).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
      body.contains("UNAVAILABLE") && body.contains("in service"),
      "{body}"
    );
    assert_eq!(script.keys.lock().len(), 6);
  }

  #[tokio::test]
  async fn a_caller_gone_mid_request_lets_go_of_the_hand_out_it_was_using() {
    // A fake that never answers: the caller gives up first.
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
      .await
      .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let r = router(&base, 30);
    let handed = r
      .pool()
      .best(
        crate::core::pool::Claim::Reserve {
          estimated_tokens: 0,
        },
        0,
      )
      .unwrap()
      .pick
      .index;
    let gone =
      tokio::time::timeout(Duration::from_millis(100), r.forward(request(Some(handed)))).await;
    assert!(gone.is_err());
    // The hand-out is open again: the next request with that key uses it.
    let key = r.pool().route_key(Some(handed), 0).unwrap().unwrap();
    assert_eq!(key.index, handed);
    drop(listener);
  }
}
