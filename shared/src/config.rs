//! Configuration comes from the environment, as Lambda gives it (names set in `template.yaml`).
//! Readers take a variable lookup ([`Vars`]) so the local runner can give each in-process
//! function its own environment; in Lambda it is the process environment ([`process_env`]).

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is not set")]
    Missing(String),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// A lookup of environment variables by name.
pub type Vars<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The process environment: set, non-blank variables.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub fn required(vars: Vars<'_>, name: &str) -> Result<String, ConfigError> {
    vars(name).filter(|v| !v.trim().is_empty()).ok_or_else(|| ConfigError::Missing(name.to_owned()))
}
