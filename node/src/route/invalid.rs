//! The error of a `[route]` setting that makes no sense, shared by the sections that validate
//! themselves (breaker, retry budget, backoff).

/// A setting that makes no sense; `field` is its key inside its section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidConfig {
    pub field: &'static str,
    pub message: &'static str,
}

/// `Err` naming `field`.
pub fn invalid(field: &'static str, message: &'static str) -> Result<(), InvalidConfig> {
    Err(InvalidConfig { field, message })
}
