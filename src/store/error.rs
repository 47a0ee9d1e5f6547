//! What can go wrong talking to the store. None of these messages is built from the connection
//! string, which may hold credentials.

use std::time::Duration;

use thiserror::Error;

/// Why a store call failed.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
  #[error("MongoDB did not answer within {0:?}")]
  Unreachable(Duration),
  #[error("MongoDB: {0}")]
  Driver(#[from] mongodb::error::Error),
  #[error("MongoDB refused {failed} of a batch's writes: {first}")]
  Write { failed: usize, first: String },
  #[error("MongoDB did not confirm a batch: {0}")]
  WriteConcern(String),
  #[error("invalid lease request: {0}")]
  InvalidLease(String),
  #[error(
    "a key added at run time can only be stored sealed, and no secret is set to seal it under \
     (KEY_MANAGER_FINGERPRINT_SECRET)"
  )]
  CannotSeal,
  #[error("the store is closed")]
  Closed,
}
