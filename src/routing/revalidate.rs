//! Keys that come back: a key deactivated because Gemini refused it (a revoked key, a project
//! whose API was off) is re-tested now and then with `GET /v1beta/models/{model}`, which spends no
//! generation quota, and brought back into service when Gemini accepts it again. Only keys an
//! operator left enabled are tried; a disabled or removed key stays out.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::Method;
use tokio::time::MissedTickBehavior;

use super::upstream::Upstream;
use crate::core::health::HealthState;
use crate::core::key::Admission;
use crate::core::models::DEFAULT_MODEL_ID;
use crate::core::pool::KeyPool;

/// Re-tests the refused keys of `pool` every `interval` until the pool closes.
pub async fn run(pool: Arc<KeyPool>, upstream: Upstream, interval: Duration) {
  let mut ticks = tokio::time::interval(interval);
  ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
  // The first tick is at once: a key refused a moment ago is not tried again straight away.
  ticks.tick().await;
  // Keys whose refusal was logged already: said once, not every round.
  let mut said_refused = HashSet::new();
  loop {
    ticks.tick().await;
    let Ok(statuses) = pool.every_status() else {
      return;
    };
    let refused: Vec<usize> = statuses
      .iter()
      .enumerate()
      .filter(|(_, s)| {
        s.figures.state == HealthState::Deactivated && s.figures.admission == Admission::Enabled
      })
      .map(|(i, _)| i)
      .collect();
    said_refused.retain(|i| refused.contains(i));
    for index in refused {
      retest(&pool, &upstream, index, &mut said_refused).await;
    }
  }
}

/// One refused key tried once: back in service when Gemini accepts it.
async fn retest(pool: &KeyPool, upstream: &Upstream, index: usize, said: &mut HashSet<usize>) {
  let Some(key) = pool.names().get(index).map(str::to_owned) else {
    return;
  };
  let path = format!("/v1beta/models/{}", pool.model_name(DEFAULT_MODEL_ID));
  let tried = upstream
    .send(&Method::GET, &path, &HeaderMap::new(), Bytes::new(), &key)
    .await;
  let masked = pool.masked(index);
  match tried {
    Ok(answer) if answer.response.status().is_success() => {
      if pool.reactivate(index).is_ok() {
        said.remove(&index);
        pool.log().info(&format!(
          "✅ API key {masked} accepted by Gemini again: back in service"
        ));
      }
    }
    Ok(answer) => {
      if said.insert(index) {
        pool.log().warn(&format!(
          "⚠️ API key {masked} still refused by Gemini ({}): tried again every round until it is accepted",
          answer.response.status().as_u16()
        ));
      }
    }
    // Gemini out of reach says nothing about the key: tried again next round, unlogged.
    Err(_) => {}
  }
}

#[cfg(test)]
mod tests {
  use std::convert::Infallible;
  use std::net::{Ipv4Addr, SocketAddr};
  use std::sync::atomic::{AtomicBool, Ordering};

  use http_body_util::Full;
  use hyper::server::conn::http1;
  use hyper::service::service_fn;
  use hyper::{Request, Response};
  use hyper_util::rt::TokioIo;
  use parking_lot::Mutex;
  use tokio::net::TcpListener;

  use super::*;
  use crate::core::config::PoolConfig;
  use crate::core::pool::testing::on_system_clock;
  use crate::core::pool::Outcome;
  use crate::core::quota::Quota;
  use crate::routing::Timeouts;

  const KEY: &str = "AIzaSyREVALIDATE000000000000000000000001";

  /// A Gemini that refuses the key until `accept` is set; the requests it saw (method, target,
  /// key header).
  async fn fake(
    accept: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
  ) -> String {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
      .await
      .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
      while let Ok((stream, _)) = listener.accept().await {
        let (accept, seen) = (accept.clone(), seen.clone());
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
          let key = req
            .headers()
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
          seen
            .lock()
            .push((req.method().to_string(), req.uri().to_string(), key));
          let status = if accept.load(Ordering::SeqCst) {
            200
          } else {
            400
          };
          let body = match status {
            200 => r#"{"name":"models/gemini-2.0-flash"}"#,
            _ => {
              r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"reason":"API_KEY_INVALID"}]}}"#
            }
          };
          let mut res = Response::new(Full::new(Bytes::from(body)));
          *res.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
          async move { Ok::<_, Infallible>(res) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
      }
    });
    format!("http://{addr}")
  }

  async fn until(what: impl Fn() -> bool) {
    for _ in 0..200 {
      if what() {
        return;
      }
      tokio::time::sleep(Duration::from_millis(10)).await;
    }
  }

  #[tokio::test]
  async fn a_refused_key_is_retested_and_comes_back_once_accepted() {
    let accept = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let base = fake(accept.clone(), seen.clone()).await;
    let (pool, log) = on_system_clock(PoolConfig::of(vec![KEY.to_owned()], Quota::default()));
    pool
      .record_usage(0, 0, Outcome::Failure("400 API_KEY_INVALID"), 1.0, None)
      .unwrap();
    assert_eq!(pool.figures(0).unwrap().state, HealthState::Deactivated);
    let upstream = Upstream::new(&base, Timeouts::default()).unwrap();
    let task = tokio::spawn(run(pool.clone(), upstream, Duration::from_millis(20)));

    until(|| seen.lock().len() >= 3).await;
    assert_eq!(pool.figures(0).unwrap().state, HealthState::Deactivated);
    let refused = |l: &String| l.contains("still refused by Gemini (400)");
    assert_eq!(log.0.lock().iter().filter(|l| refused(l)).count(), 1);

    accept.store(true, Ordering::SeqCst);
    until(|| pool.figures(0).unwrap().active).await;
    assert!(pool.figures(0).unwrap().active);
    let lines = log.0.lock().clone();
    assert!(
      lines
        .iter()
        .any(|l| l.contains("AIzaSyRE...0001 accepted by Gemini again")),
      "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.contains(KEY)), "{lines:?}");
    let calls = seen.lock().clone();
    for (method, target, key) in &calls {
      assert_eq!(
        (method.as_str(), target.as_str(), key.as_str()),
        ("GET", "/v1beta/models/gemini-2.0-flash-lite", KEY)
      );
    }
    // Back in service: nothing more to re-test, and a closed pool ends the task.
    let tried = calls.len();
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(seen.lock().len(), tried);
    pool.close();
    tokio::time::timeout(Duration::from_secs(1), task)
      .await
      .unwrap()
      .unwrap();
  }
}
