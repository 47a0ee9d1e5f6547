//! The HTTP API of SPEC section 4: one route table ([`routes`]) that both the hyper server
//! ([`server`]) and the Express adapter in the bindings serve.

mod json;
pub mod routes;
pub mod server;
pub mod usage;

pub use routes::{
  redact_path, route, route_mounted, usage_stats_request, usage_stats_request_mounted, Reply,
};
pub use server::{start, HttpError, ServerHandle, ServerOptions};
