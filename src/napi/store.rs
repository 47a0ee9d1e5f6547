//! Persistence as JS starts it: `attachStore` and its start-up lines, `closeStore`, the writer's
//! figures, and the names documents give keys.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use napi::bindgen_prelude::{Env, PromiseRaw, Unknown};
use napi_derive::napi;

use crate::core::config;
use crate::napi::errors::{bad_input, BindingError};
use crate::napi::key_pool::NativeKeyPool;
use crate::napi::log::AfterLog;
use crate::napi::options::{millis_option, process_env, StoreOptions};
use crate::napi::values::Given;
use crate::persistence::{PersistOptions, Started, WriteBehind, CONNECTED_LINE};
use crate::store::{KeyNaming, KeyStorage, UsageSource};

/// How `attachStore` went.
#[napi(object)]
pub struct StoreStart {
  /// Connected and loaded; otherwise the pool runs in memory and keeps trying in the background.
  pub connected: bool,
  /// Why it could not connect.
  pub error: Option<String>,
}

/// What the MongoDB writer has done.
#[napi(object)]
pub struct PersistenceStats {
  /// Connected, and the last write (if any) succeeded.
  pub connected: bool,
  /// Database round trips so far.
  pub ops: f64,
  /// Recorded calls waiting to be written.
  pub queued: u32,
  /// Recorded calls of a write being retried.
  pub pending: u32,
  /// Recorded calls lost: dropped because more than `usageQueueCapacity` waited, or neither
  /// written nor spilled at close.
  pub dropped: f64,
  /// Recorded calls kept in a spill file at close, written at the next start.
  pub spilled: f64,
  /// Processes seen sharing the keys' quota, this one included; 0 when `sharedQuota` is off.
  pub peers: u32,
}

/// SPEC section 3's start-up line of a pool that runs in memory.
pub(super) fn in_memory_line(keys: usize) -> String {
  format!("✅ In-memory API Key Manager initialized with {keys} keys")
}

/// The writer's options from `attachStore`'s, checked.
fn persist_options(
  options: StoreOptions,
  usage: &UsageSource,
) -> Result<PersistOptions, BindingError> {
  let key_storage = KeyStorage::resolve(
    options.fingerprint_secret,
    options.store_plaintext_keys,
    &process_env,
  )?;
  let defaults = PersistOptions::new(options.uri);
  Ok(PersistOptions {
    key_storage,
    db_name: options.db_name.unwrap_or(defaults.db_name.clone()),
    connect_timeout: millis_option(
      "mongoConnectTimeoutMs",
      options.connect_timeout_ms,
      defaults.connect_timeout,
    )?,
    flush_interval: millis_option(
      "flushIntervalMs",
      options.flush_interval_ms,
      defaults.flush_interval,
    )?,
    retry_interval: millis_option(
      "retryIntervalMs",
      options.retry_interval_ms,
      defaults.retry_interval,
    )?,
    key_sync_interval: millis_option(
      "keySyncIntervalMs",
      options.key_sync_interval_ms,
      defaults.key_sync_interval,
    )?,
    close_timeout: millis_option(
      "closeTimeoutMs",
      options.close_timeout_ms,
      defaults.close_timeout,
    )?,
    spill_dir: config::spill_dir(options.spill_dir, &process_env)
      .map_or(defaults.spill_dir.clone(), PathBuf::from),
    batch_size: options
      .batch_size
      .map_or(defaults.batch_size, |n| n as usize),
    queue_capacity: options
      .queue_capacity
      .map_or(defaults.queue_capacity, |n| n as usize),
    share_quota: options.shared_quota.unwrap_or(defaults.share_quota),
    usage: usage.clone(),
    ..defaults
  })
}

#[napi]
impl NativeKeyPool {
  /// Persists the pool in MongoDB from now on, written behind (see `persistence`): connects within
  /// the timeout, loads and merges what is stored, and starts the writer on the addon's tokio
  /// runtime. When the server cannot be reached the pool runs in memory and the writer keeps
  /// trying in the background. Says how it went in the log (SPEC section 3's lines, written before
  /// the promise resolves) and resolves with it; options it cannot use throw, said in the log too,
  /// and leave the pool in memory. A second call is refused.
  #[napi(ts_return_type = "Promise<StoreStart>")]
  pub fn attach_store<'env>(
    &self,
    env: &'env Env,
    options: StoreOptions,
  ) -> napi::Result<PromiseRaw<'env, AfterLog<StoreStart>>> {
    let keys = self.pool().len();
    let persist = match persist_options(options, self.api.usage()) {
      Ok(persist) => persist,
      Err(e) => {
        self
          .log
          .error(&format!("❌ MongoDB persistence disabled: {e}"));
        self.log.info(&in_memory_line(keys));
        Err(e)?
      }
    };
    if self.store_attached.swap(true, Ordering::AcqRel) {
      Err(BindingError::StoreAttached)?;
    }
    self
      .api
      .name_keys(KeyNaming::new(persist.key_storage.clone()));
    let (pool, log, slot) = (self.js.pool.clone(), self.log.clone(), self.writer.clone());
    if persist.share_quota {
      // Now, not once the connection is up: nothing may be handed out beyond the shared quota
      // while this process connects.
      pool.share_quota();
    }
    env.spawn_future(async move {
      let (writer, started) = WriteBehind::start(pool, persist, log.clone()).await;
      *slot.lock() = Some(Arc::new(writer));
      Ok(AfterLog(match started {
        Started::Connected => {
          log.info(CONNECTED_LINE);
          log.info(&format!("✅ API Key Manager initialized with {keys} keys"));
          StoreStart {
            connected: true,
            error: None,
          }
        }
        Started::Fallback(why) => {
          log.error(&format!("❌ MongoDB connection failed: {why}"));
          log.info("🔄 Falling back to in-memory mode...");
          log.info(&in_memory_line(keys));
          StoreStart {
            connected: false,
            error: Some(why),
          }
        }
      }))
    })
  }

  /// Writes what is left and stops the writer; resolves when done (at once without a store).
  /// Call `close()` first, so that nothing changes after the last write.
  /// What closing logs (a spill file kept, say) is written before the promise resolves.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn close_store<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, AfterLog<()>>> {
    let writer = self.writer.lock().clone();
    env.spawn_future(async move {
      if let Some(writer) = writer {
        writer.close().await;
      }
      Ok(AfterLog(()))
    })
  }

  /// What the MongoDB writer has done, or `null` without a store.
  #[napi]
  pub fn persistence_stats(&self) -> Option<PersistenceStats> {
    self.writer.lock().as_ref().map(|w| {
      let s = w.stats();
      PersistenceStats {
        connected: s.connected,
        ops: s.ops as f64,
        queued: s.queued as u32,
        pending: s.pending as u32,
        dropped: s.dropped as f64,
        spilled: s.spilled as f64,
        peers: u32::try_from(s.peers).unwrap_or(u32::MAX),
      }
    })
  }
}

impl Drop for NativeKeyPool {
  /// A pool collected without `closeStore()` still gets its last write, and its writer ends
  /// instead of retrying for the life of the process.
  fn drop(&mut self) {
    if let Some(writer) = self.writer.lock().take() {
      writer.stop();
    }
  }
}

/// The name MongoDB documents store for `apiKey`: its fingerprint under `secret` (else
/// `KEY_MANAGER_FINGERPRINT_SECRET`; at least 16 bytes), `fp_` and 32 hex digits, or without either
/// its SHA-256 digest, `sha256_` and 32 hex digits.
/// Throws for a secret shorter than that, or an argument that is no string.
#[napi(ts_args_type = "apiKey: string, secret?: string | undefined")]
pub fn key_fingerprint(api_key: Unknown, secret: Unknown) -> napi::Result<String> {
  let Some(api_key) = Given::of(api_key)?.string()? else {
    Err(bad_input("apiKey must be a string"))?
  };
  let secret = Given::of(secret)?;
  let secret = match secret.string()? {
    None if !secret.is_undefined() => Err(bad_input("secret must be a string"))?,
    secret => secret,
  };
  let storage = KeyStorage::resolve(secret, Some(false), &process_env)?;
  Ok(KeyNaming::new(storage).stored(&api_key))
}
