//! How the core asks a task outside it to run: a hook the task's owner fills (with a tokio
//! `Notify`, say), so that the core never names a runtime.

use std::sync::Arc;

/// Wakes a task (the write-behind writer, the leasing task). Called under the pool's lock: it must
/// only signal, never block or wait.
pub type Wake = Arc<dyn Fn() + Send + Sync>;
