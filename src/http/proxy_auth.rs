//! Who may use the Gemini proxy: clients presenting one of the proxy tokens
//! (`KEY_MANAGER_PROXY_TOKENS` or the `proxyTokens` option) where SDKs put a key, or anyone when
//! explicitly opened (`proxyOpen`, `KEY_MANAGER_PROXY_OPEN`), which only a loopback server may be.
//! Neither: the proxy routes are off.

use std::fmt;

use thiserror::Error;

use super::auth::constant_time_eq;
use crate::core::config::env_flag;

/// Comma-separated proxy tokens.
pub const PROXY_TOKENS_ENV: &str = "KEY_MANAGER_PROXY_TOKENS";
/// Opens the proxy without tokens on a loopback server.
pub const PROXY_OPEN_ENV: &str = "KEY_MANAGER_PROXY_OPEN";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyConfigError {
  #[error(
    "proxy tokens must be non-empty strings of visible ASCII without commas (token {0} is not)"
  )]
  InvalidToken(usize),
  #[error("{PROXY_OPEN_ENV} must be 1, true, yes, 0, false or no (got {0:?})")]
  InvalidOpen(String),
}

/// Who may use the proxy. `Debug` never shows a token.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum ClientAccess {
  /// No proxy routes.
  #[default]
  Off,
  /// Anyone who can reach the (loopback) server.
  Open,
  /// Clients presenting one of these.
  Tokens(Vec<Box<[u8]>>),
}

impl fmt::Debug for ClientAccess {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match self {
      Self::Off => f.write_str("Off"),
      Self::Open => f.write_str("Open"),
      Self::Tokens(t) => write!(f, "Tokens(<{} redacted>)", t.len()),
    }
  }
}

impl ClientAccess {
  /// The explicit tokens first (an empty list: none), then [`PROXY_TOKENS_ENV`]; without tokens,
  /// open when `explicit_open` (else [`PROXY_OPEN_ENV`]) says so.
  pub fn resolve(
    explicit_tokens: Option<&[String]>,
    explicit_open: Option<bool>,
    env: &dyn Fn(&str) -> Option<String>,
  ) -> Result<Self, ProxyConfigError> {
    let from_env;
    let tokens: Vec<&str> = match explicit_tokens {
      Some(list) => list.iter().map(String::as_str).collect(),
      None => {
        from_env = env(PROXY_TOKENS_ENV).unwrap_or_default();
        from_env
          .split(',')
          .map(str::trim)
          .filter(|t| !t.is_empty())
          .collect()
      }
    };
    if !tokens.is_empty() {
      let mut checked = Vec::with_capacity(tokens.len());
      for (i, t) in tokens.iter().enumerate() {
        let valid = !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b',');
        if !valid {
          return Err(ProxyConfigError::InvalidToken(i + 1));
        }
        checked.push(t.as_bytes().into());
      }
      return Ok(Self::Tokens(checked));
    }
    let open = match explicit_open {
      Some(open) => open,
      None => env_flag(PROXY_OPEN_ENV, env)
        .map_err(ProxyConfigError::InvalidOpen)?
        .unwrap_or(false),
    };
    Ok(if open { Self::Open } else { Self::Off })
  }

  pub fn is_on(&self) -> bool {
    !matches!(self, Self::Off)
  }

  /// Whether a client presenting `token` may call. Every token is compared, each in constant
  /// time, so how long a refusal takes says nothing about which token came close.
  pub fn admits(&self, token: Option<&str>) -> bool {
    match self {
      Self::Off => false,
      Self::Open => true,
      Self::Tokens(tokens) => {
        let presented = token.unwrap_or_default().as_bytes();
        tokens
          .iter()
          .fold(false, |ok, t| constant_time_eq(presented, t) | ok)
      }
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::http::auth::tests::env_of;

  #[test]
  fn tokens_come_from_the_option_then_the_environment() {
    let env = env_of(&[(PROXY_TOKENS_ENV, " alpha , beta,,\n")]);
    let access = ClientAccess::resolve(None, None, &env).unwrap();
    assert!(access.admits(Some("alpha")) && access.admits(Some("beta")));
    assert!(!access.admits(Some("alph")) && !access.admits(Some("")) && !access.admits(None));
    assert!(!access.admits(Some("alpha,beta")));
    let explicit = ClientAccess::resolve(Some(&["gamma".to_owned()]), None, &env).unwrap();
    assert!(explicit.admits(Some("gamma")) && !explicit.admits(Some("alpha")));
    assert!(!format!("{explicit:?}").contains("gamma"));
    assert_eq!(
      ClientAccess::resolve(Some(&["two words".to_owned()]), None, &env),
      Err(ProxyConfigError::InvalidToken(1))
    );
  }

  #[test]
  fn without_tokens_the_proxy_is_off_unless_opened() {
    let none = env_of(&[(PROXY_TOKENS_ENV, " , ")]);
    let off = ClientAccess::resolve(None, None, &none).unwrap();
    assert_eq!(off, ClientAccess::Off);
    assert!(!off.is_on() && !off.admits(Some("anything")));
    let open = ClientAccess::resolve(None, Some(true), &none).unwrap();
    assert!(open.is_on() && open.admits(None));
    let env_open = env_of(&[(PROXY_OPEN_ENV, "YES")]);
    assert_eq!(
      ClientAccess::resolve(None, None, &env_open),
      Ok(ClientAccess::Open)
    );
    assert_eq!(
      ClientAccess::resolve(None, Some(false), &env_open),
      Ok(ClientAccess::Off)
    );
    let bad = env_of(&[(PROXY_OPEN_ENV, "perhaps")]);
    assert!(matches!(
      ClientAccess::resolve(None, None, &bad),
      Err(ProxyConfigError::InvalidOpen(_))
    ));
    // Tokens win over opening: a token set is never bypassed.
    let both = ClientAccess::resolve(Some(&["t".to_owned()]), Some(true), &none).unwrap();
    assert!(!both.admits(None));
  }
}
