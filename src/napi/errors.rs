//! How errors cross into JS.

use crate::core::error::PoolError;

pub(super) fn js_error(e: PoolError) -> napi::Error {
  napi::Error::from_reason(e.to_string())
}
