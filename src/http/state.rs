//! What the route table's handlers work on: the pool, where usage statistics come from, and how
//! stored documents name keys. The pool itself knows no store; what the API needs of one is here.

use std::sync::{Arc, OnceLock};

use crate::core::pool::KeyPool;
use crate::store::{KeyNaming, UsageSource};

/// The state every route is served from: one per pool, shared by its servers and its Express
/// routers.
pub struct ApiState {
  pool: Arc<KeyPool>,
  usage: UsageSource,
  /// Set once a store is attached: from then on a URL may name a key by its stored name.
  naming: OnceLock<KeyNaming>,
}

impl ApiState {
  /// The state of `pool` with no store attached: usage statistics come from its recent calls, and
  /// URLs name keys in full or masked.
  pub fn new(pool: Arc<KeyPool>) -> Self {
    Self {
      pool,
      usage: UsageSource::default(),
      naming: OnceLock::new(),
    }
  }

  /// The keys.
  pub fn pool(&self) -> &Arc<KeyPool> {
    &self.pool
  }

  /// Where usage statistics come from; the writer that attaches the store connects it.
  pub fn usage(&self) -> &UsageSource {
    &self.usage
  }

  /// How stored documents name keys, once a store is attached.
  pub fn naming(&self) -> Option<&KeyNaming> {
    self.naming.get()
  }

  /// URLs may name keys as `naming` stores them from now on. A pool attaches one store at most:
  /// a later naming is ignored.
  pub fn name_keys(&self, naming: KeyNaming) {
    let _ = self.naming.set(naming);
  }
}
