//! Routing of Gemini requests through the pool: the connection to Gemini (`upstream`), the
//! choice of a key, waiting and retrying (`router`), and the tokens an answer reports
//! (`usage_scan`). The HTTP server serves it on loopback for the app's own SDK calls (the JS face
//! sends them there) and, with proxy tokens, to any client.

pub mod revalidate;
pub mod router;
pub mod switch;
pub mod upstream;
pub mod usage_scan;

pub use router::{
  google_error, model_of, AnswerBody, RouteOptions, RoutedRequest, Router, JSON_CONTENT_TYPE,
};
pub use switch::{route_requests, InvalidRouteSwitch, ROUTE_REQUESTS_ENV};
pub use upstream::{base_url, Timeouts, Upstream, UpstreamError};
