//! Every failure the key manager reports. The messages of the first three are the old service's,
//! which callers match on.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolError {
  #[error("No Gemini API keys provided in environment variables")]
  NoKeysConfigured,
  #[error("No active API keys available")]
  NoActiveKeys,
  #[error("API key not found")]
  KeyNotFound,
  #[error("tokensUsed must be a non-negative integer no larger than {max} (got {got})")]
  InvalidTokens { got: String, max: u64 },
  #[error("limitType must be 'RPM', 'RPD' or 'TPM' (got {got})")]
  InvalidLimitType { got: String },
  #[error("invalid configuration: {0}")]
  InvalidConfig(String),
  #[error("API key manager is closed")]
  Closed,
  #[error("Invalid API key: {0}")]
  InvalidKey(&'static str),
  #[error("API key already exists")]
  DuplicateKey,
  #[error("API key cannot be stored: {0}")]
  KeyNotStorable(String),
  #[error("Invalid model: {0}")]
  InvalidModel(String),
  #[error("Invalid project: {0}")]
  InvalidProject(String),
}
