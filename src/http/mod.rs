//! The HTTP API of SPEC section 4: one route table ([`routes`]) over one state ([`state`]) that
//! the hyper server ([`server`]), the N-API router and so the Express adapter serve, with its
//! replies ([`reply`]), admin auth ([`auth`]) and key references ([`key_ref`]) decided in one place
//! for all of them; and the Gemini proxy ([`proxy`], [`proxy_auth`]) the server also serves.

pub mod auth;
pub mod connections;
#[cfg(test)]
mod hostile;
pub(crate) mod json;
pub mod key_ref;
pub mod proxy;
pub mod proxy_auth;
pub mod reply;
pub mod routes;
pub mod server;
pub mod state;

pub use auth::{AdminGuard, AuthConfigError};
pub use reply::Reply;
pub use routes::{
  parse_range, redact_path, route, route_mounted, ApiRequest, KeyUsageStats, Routed, UsageStats,
  UsageStatsError, UsageStatsMeta,
};
pub use server::{start, HttpError, Listen, ServerHandle, ServerOptions};
pub use state::ApiState;
