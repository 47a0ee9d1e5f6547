//! Whether the app's own Gemini requests are routed through the pool: on unless an option or
//! `KEY_MANAGER_ROUTE_REQUESTS` says otherwise.

use thiserror::Error;

use crate::core::config::env_flag;

/// The environment variable that switches routing off (`false`, `0`, `no`) or on.
pub const ROUTE_REQUESTS_ENV: &str = "KEY_MANAGER_ROUTE_REQUESTS";

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{ROUTE_REQUESTS_ENV} must be 1, true, yes, 0, false or no (got {0:?})")]
pub struct InvalidRouteSwitch(pub String);

/// The option when given, else the environment, else on.
pub fn route_requests(
  explicit: Option<bool>,
  env: &dyn Fn(&str) -> Option<String>,
) -> Result<bool, InvalidRouteSwitch> {
  if let Some(on) = explicit {
    return Ok(on);
  }
  let flag = env_flag(ROUTE_REQUESTS_ENV, env).map_err(InvalidRouteSwitch)?;
  Ok(flag.unwrap_or(true))
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn the_option_wins_then_the_environment_then_on() {
    let unset = |_: &str| None;
    let set = |v: &'static str| move |_: &str| Some(v.to_owned());
    assert_eq!(route_requests(None, &unset), Ok(true));
    assert_eq!(route_requests(Some(false), &unset), Ok(false));
    assert_eq!(route_requests(None, &set(" FALSE ")), Ok(false));
    assert_eq!(route_requests(None, &set("0")), Ok(false));
    assert_eq!(route_requests(None, &set("yes")), Ok(true));
    assert_eq!(route_requests(Some(true), &set("off?")), Ok(true));
    assert_eq!(
      route_requests(None, &set("off?")),
      Err(InvalidRouteSwitch("off?".to_owned()))
    );
  }
}
