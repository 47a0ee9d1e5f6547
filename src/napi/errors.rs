//! The one way an error crosses into JS. Every failure of this layer is a [`BindingError`], and
//! its status says whose fault it was: `InvalidArg` for bad input (options, arguments, and the
//! configuration they and the environment make up), `GenericFailure` for anything else. The
//! message is the error's own: JS callers read it, and some match on it (SPEC section 1).

use napi::Status;
use thiserror::Error;

use crate::core::error::PoolError;
use crate::http::proxy_auth::ProxyConfigError;
use crate::http::{AuthConfigError, HttpError, UsageStatsError};
use crate::routing::{InvalidRouteSwitch, UpstreamError};
use crate::store::KeyStorageError;

/// Why a call into this layer failed.
#[derive(Debug, Error)]
pub enum BindingError {
  #[error(transparent)]
  Pool(#[from] PoolError),
  /// An argument or option checked in this layer.
  #[error("{0}")]
  BadInput(String),
  #[error(transparent)]
  AdminAuth(#[from] AuthConfigError),
  #[error(transparent)]
  ProxyAccess(#[from] ProxyConfigError),
  #[error(transparent)]
  KeyStorage(#[from] KeyStorageError),
  #[error(transparent)]
  RouteSwitch(#[from] InvalidRouteSwitch),
  #[error(transparent)]
  Upstream(#[from] UpstreamError),
  #[error(transparent)]
  Server(#[from] HttpError),
  #[error(transparent)]
  UsageStats(#[from] UsageStatsError),
  #[error("a store is already attached")]
  StoreAttached,
  /// A raw N-API call of the fast path's set-up.
  #[error("N-API call failed: {what} (status {status})")]
  NapiCall {
    what: &'static str,
    status: napi::sys::napi_status,
  },
  /// What JS threw (a getter of the options, say), or napi's own conversion of a value: passed on
  /// as it is.
  #[error(transparent)]
  Js(#[from] napi::Error),
}

impl BindingError {
  /// Whose fault it was, as the thrown error's `code` says.
  pub fn status(&self) -> Status {
    match self {
      Self::Pool(e) => match e {
        PoolError::NoKeysConfigured
        | PoolError::KeyNotFound
        | PoolError::InvalidTokens { .. }
        | PoolError::InvalidLimitType { .. }
        | PoolError::InvalidConfig(_)
        | PoolError::InvalidKey(_)
        | PoolError::DuplicateKey
        | PoolError::InvalidModel(_)
        | PoolError::InvalidProject(_) => Status::InvalidArg,
        PoolError::NoActiveKeys | PoolError::Closed | PoolError::KeyNotStorable(_) => {
          Status::GenericFailure
        }
      },
      Self::BadInput(_)
      | Self::AdminAuth(_)
      | Self::ProxyAccess(_)
      | Self::KeyStorage(_)
      | Self::RouteSwitch(_) => Status::InvalidArg,
      Self::Upstream(e) => match e {
        UpstreamError::BadBaseUrl(_) | UpstreamError::CaFile { .. } => Status::InvalidArg,
        _ => Status::GenericFailure,
      },
      Self::Server(e) => match e {
        HttpError::Insecure { .. } => Status::InvalidArg,
        _ => Status::GenericFailure,
      },
      Self::UsageStats(e) => match e {
        UsageStatsError::BadRange { .. } => Status::InvalidArg,
        UsageStatsError::Pool(_) => Status::GenericFailure,
      },
      Self::StoreAttached | Self::NapiCall { .. } => Status::GenericFailure,
      Self::Js(e) => e.status,
    }
  }
}

impl From<BindingError> for napi::Error {
  fn from(e: BindingError) -> Self {
    match e {
      BindingError::Js(e) => e,
      e => napi::Error::new(e.status(), e.to_string()),
    }
  }
}

/// Lets `?` in a `#[napi]` function take each of these errors into JS through [`BindingError`].
macro_rules! into_js_through_binding_error {
  ($($source:ty),* $(,)?) => {
    $(impl From<$source> for napi::Error {
      fn from(e: $source) -> Self {
        BindingError::from(e).into()
      }
    })*
  };
}

into_js_through_binding_error!(
  PoolError,
  AuthConfigError,
  ProxyConfigError,
  KeyStorageError,
  InvalidRouteSwitch,
  UpstreamError,
  HttpError,
  UsageStatsError,
);

/// A [`BindingError::BadInput`], for `Err(bad_input(...))?`.
pub fn bad_input(message: impl Into<String>) -> BindingError {
  BindingError::BadInput(message.into())
}
