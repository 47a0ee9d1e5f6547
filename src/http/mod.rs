//! The HTTP API of SPEC section 4: one route table ([`routes`]) that both the hyper server
//! ([`server`]) and the Express adapter in the bindings serve.

mod json;
pub mod routes;
pub mod server;

pub use routes::{redact_path, route, route_mounted, Reply};
pub use server::{start, HttpError, ServerHandle, ServerOptions};
