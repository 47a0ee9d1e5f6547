//! Admin auth: the endpoints that change state want `Authorization: Bearer <token>` once an admin
//! token is configured (`KEY_MANAGER_ADMIN_TOKEN` or an explicit option), and a server without one
//! listens only on loopback unless told otherwise.

use std::fmt;
use std::net::IpAddr;

use thiserror::Error;

use crate::core::config::env_flag;

/// The environment variable holding the admin token.
pub const ADMIN_TOKEN_ENV: &str = "KEY_MANAGER_ADMIN_TOKEN";
/// The environment variable that lets a server without a token listen beyond loopback.
pub const ALLOW_INSECURE_ENV: &str = "KEY_MANAGER_ALLOW_INSECURE";

/// A configuration of admin auth that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthConfigError {
  #[error("adminToken must be a non-empty string without spaces or control characters")]
  InvalidToken,
  #[error("{ALLOW_INSECURE_ENV} must be 1, true, yes, 0, false or no (got {0:?})")]
  InvalidAllowInsecure(String),
}

/// The admin token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Box<[u8]>);

impl fmt::Debug for AdminToken {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("AdminToken(<redacted>)")
  }
}

impl AdminToken {
  /// A token must fit in a header as one word, or no client could ever send it.
  fn new(text: &str) -> Result<Self, AuthConfigError> {
    let valid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic());
    if valid {
      Ok(Self(text.as_bytes().into()))
    } else {
      Err(AuthConfigError::InvalidToken)
    }
  }
}

/// Why a request to an admin endpoint is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
  /// No `Authorization: Bearer ...` header.
  Missing,
  /// A bearer token that is not the admin token.
  Wrong,
}

/// Whether admin endpoints need a token, and which.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminGuard {
  token: Option<AdminToken>,
}

impl AdminGuard {
  /// No token: every endpoint is open (the old service's behaviour).
  pub fn open() -> Self {
    Self::default()
  }

  /// Admin endpoints need `token`.
  pub fn with_token(token: &str) -> Result<Self, AuthConfigError> {
    Ok(Self {
      token: Some(AdminToken::new(token)?),
    })
  }

  /// The explicit option first, then [`ADMIN_TOKEN_ENV`] (ignored when empty, as unset variables
  /// often are written). Surrounding whitespace of the variable is dropped: files that feed it end
  /// in a newline.
  pub fn resolve(
    explicit: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, AuthConfigError> {
    if let Some(token) = explicit {
      return Self::with_token(token);
    }
    match env(ADMIN_TOKEN_ENV) {
      Some(value) if !value.trim().is_empty() => Self::with_token(value.trim()),
      _ => Ok(Self::open()),
    }
  }

  /// Whether a token is configured.
  pub fn is_set(&self) -> bool {
    self.token.is_some()
  }

  /// Checks an `Authorization` header value against the token; always passes without one.
  pub fn check(&self, authorization: Option<&str>) -> Result<(), Denied> {
    let Some(token) = &self.token else {
      return Ok(());
    };
    let presented = authorization.and_then(bearer).ok_or(Denied::Missing)?;
    if constant_time_eq(presented.as_bytes(), &token.0) {
      Ok(())
    } else {
      Err(Denied::Wrong)
    }
  }
}

/// The credentials of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(header: &str) -> Option<&str> {
  let (scheme, rest) = header.trim().split_once(' ')?;
  let token = rest.trim_start();
  (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares a presented secret with the expected one in a time that depends only on the presented
/// length, so a caller learns nothing about the expected bytes from how long a refusal takes. A
/// dozen lines do not justify a crate.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
  if expected.is_empty() {
    return false;
  }
  let mut diff = presented.len() ^ expected.len();
  for (i, &byte) in presented.iter().enumerate() {
    diff |= usize::from(byte ^ expected[i % expected.len()]);
  }
  // Keeps the optimizer from turning the fold into an early exit.
  std::hint::black_box(diff) == 0
}

/// Whether a server may listen on `ip`: always on loopback, elsewhere only with a token or when
/// told explicitly.
pub fn may_listen(ip: IpAddr, guard: &AdminGuard, allow_insecure: bool) -> bool {
  ip.to_canonical().is_loopback() || guard.is_set() || allow_insecure
}

/// The explicit option first, then [`ALLOW_INSECURE_ENV`]; off by default.
pub fn resolve_allow_insecure(
  explicit: Option<bool>,
  env: &dyn Fn(&str) -> Option<String>,
) -> Result<bool, AuthConfigError> {
  if let Some(allow) = explicit {
    return Ok(allow);
  }
  let flag = env_flag(ALLOW_INSECURE_ENV, env).map_err(AuthConfigError::InvalidAllowInsecure)?;
  Ok(flag.unwrap_or(false))
}

#[cfg(test)]
pub(super) mod tests {
  use std::net::{Ipv4Addr, Ipv6Addr};

  use super::*;

  /// An environment holding `pairs` only.
  pub(in crate::http) fn env_of(
    pairs: &'static [(&'static str, &'static str)],
  ) -> impl Fn(&str) -> Option<String> {
    move |name| {
      pairs
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
    }
  }

  #[test]
  fn constant_time_eq_is_equality() {
    assert!(constant_time_eq(b"s3cret-token", b"s3cret-token"));
    assert!(!constant_time_eq(b"s3cret-tokem", b"s3cret-token"));
    assert!(!constant_time_eq(b"s3cret", b"s3cret-token"));
    assert!(!constant_time_eq(b"s3cret-token-and-more", b"s3cret-token"));
    // A presented value that repeats a shorter expected one is not equal to it.
    assert!(!constant_time_eq(b"abab", b"ab"));
    assert!(!constant_time_eq(b"", b"x"));
    assert!(!constant_time_eq(b"", b""));
  }

  #[test]
  fn an_open_guard_lets_everything_through() {
    let guard = AdminGuard::open();
    assert!(!guard.is_set());
    assert_eq!(guard.check(None), Ok(()));
    assert_eq!(guard.check(Some("Bearer anything")), Ok(()));
  }

  #[test]
  fn a_guard_wants_the_bearer_token() {
    let guard = AdminGuard::with_token("tok-123").unwrap();
    assert_eq!(guard.check(Some("Bearer tok-123")), Ok(()));
    assert_eq!(guard.check(Some("bearer   tok-123 ")), Ok(()));
    assert_eq!(guard.check(Some("Bearer tok-124")), Err(Denied::Wrong));
    assert_eq!(guard.check(Some("Bearer tok-1234")), Err(Denied::Wrong));
    assert_eq!(guard.check(Some("Bearer")), Err(Denied::Missing));
    assert_eq!(guard.check(Some("Bearer ")), Err(Denied::Missing));
    assert_eq!(
      guard.check(Some("Basic dG9rLTEyMw==")),
      Err(Denied::Missing)
    );
    assert_eq!(guard.check(Some("tok-123")), Err(Denied::Missing));
    assert_eq!(guard.check(None), Err(Denied::Missing));
  }

  #[test]
  fn tokens_come_from_the_option_then_the_environment() {
    let env = env_of(&[(ADMIN_TOKEN_ENV, " from-env\n")]);
    let guard = AdminGuard::resolve(None, &env).unwrap();
    assert_eq!(guard.check(Some("Bearer from-env")), Ok(()));
    let guard = AdminGuard::resolve(Some("explicit"), &env).unwrap();
    assert_eq!(guard.check(Some("Bearer from-env")), Err(Denied::Wrong));
    assert_eq!(guard.check(Some("Bearer explicit")), Ok(()));

    let empty = env_of(&[(ADMIN_TOKEN_ENV, "  ")]);
    assert!(!AdminGuard::resolve(None, &empty).unwrap().is_set());
    assert!(!AdminGuard::resolve(None, &env_of(&[])).unwrap().is_set());
    for bad in ["", "two words", "tab\there", "é"] {
      assert_eq!(
        AdminGuard::resolve(Some(bad), &env_of(&[])),
        Err(AuthConfigError::InvalidToken),
        "{bad:?}"
      );
    }
  }

  #[test]
  fn debug_never_shows_the_token() {
    let guard = AdminGuard::with_token("very-secret").unwrap();
    assert!(!format!("{guard:?}").contains("very-secret"));
  }

  #[test]
  fn only_loopback_is_open_to_a_server_without_a_token() {
    let open = AdminGuard::open();
    let guarded = AdminGuard::with_token("t").unwrap();
    let v4_any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let lan = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2));
    assert!(may_listen(IpAddr::V4(Ipv4Addr::LOCALHOST), &open, false));
    assert!(may_listen(
      IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)),
      &open,
      false
    ));
    assert!(may_listen(IpAddr::V6(Ipv6Addr::LOCALHOST), &open, false));
    assert!(may_listen(
      IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
      &open,
      false
    ));
    assert!(!may_listen(v4_any, &open, false));
    assert!(!may_listen(lan, &open, false));
    assert!(!may_listen(IpAddr::V6(Ipv6Addr::UNSPECIFIED), &open, false));
    assert!(may_listen(v4_any, &guarded, false));
    assert!(may_listen(lan, &open, true));
  }

  #[test]
  fn allow_insecure_comes_from_the_option_then_the_environment() {
    let yes = env_of(&[(ALLOW_INSECURE_ENV, "TRUE")]);
    assert_eq!(resolve_allow_insecure(None, &yes), Ok(true));
    assert_eq!(resolve_allow_insecure(Some(false), &yes), Ok(false));
    assert_eq!(resolve_allow_insecure(None, &env_of(&[])), Ok(false));
    let no = env_of(&[(ALLOW_INSECURE_ENV, "0")]);
    assert_eq!(resolve_allow_insecure(None, &no), Ok(false));
    let bad = env_of(&[(ALLOW_INSECURE_ENV, "maybe")]);
    assert!(matches!(
      resolve_allow_insecure(None, &bad),
      Err(AuthConfigError::InvalidAllowInsecure(_))
    ));
  }
}
