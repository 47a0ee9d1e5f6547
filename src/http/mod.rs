//! The HTTP API of SPEC section 4: one route table ([`routes`]) that both the hyper server
//! ([`server`]) and the Express adapter in the bindings serve, with admin auth ([`auth`]) and key
//! references ([`key_ref`]) decided in one place for both.

pub mod auth;
pub mod connections;
#[cfg(test)]
mod hostile;
mod json;
pub mod key_ref;
pub mod proxy;
pub mod proxy_auth;
pub mod routes;
pub mod server;
pub mod usage;

pub use auth::{AdminGuard, AuthConfigError};
pub use routes::{
  redact_path, route, route_mounted, usage_stats_request, usage_stats_request_mounted, ApiRequest,
  Reply,
};
pub use server::{start, HttpError, Listen, ServerHandle, ServerOptions};
