//! The step's configuration through `wasi:config`: values the workflow (or
//! `stepbox step run --config k=v`) gives this step.

use std::fmt;
use std::str::FromStr;

use crate::StepError;
use crate::bindings::wasi::config::store;

/// The host could not read the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading configuration failed: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl From<store::Error> for ConfigError {
    fn from(err: store::Error) -> Self {
        match err {
            store::Error::Upstream(msg) | store::Error::Io(msg) => ConfigError(msg),
        }
    }
}

/// The value of `key`, or `None` when it is not configured.
pub fn get(key: &str) -> Result<Option<String>, ConfigError> {
    Ok(store::get(key)?)
}

/// The value of `key`; a fatal error naming the key when it is missing.
pub fn require(key: &str) -> Result<String, StepError> {
    get(key)?
        .ok_or_else(|| StepError::fatal(format!("the config value `{key}` is not set; give it in the step's `config`")))
}

/// The value of `key` parsed as `T`, or `None` when it is not configured; a
/// fatal error naming the key when it does not parse.
pub fn get_parsed<T>(key: &str) -> Result<Option<T>, StepError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    get(key)?
        .map(|value| {
            value.parse().map_err(|err| {
                StepError::fatal(format!(
                    "the config value `{key}` = {value:?} is not a valid {}: {err}",
                    std::any::type_name::<T>()
                ))
            })
        })
        .transpose()
}

/// Every configured key and value.
pub fn all() -> Result<Vec<(String, String)>, ConfigError> {
    Ok(store::get_all()?)
}
