//! Loading a service's TOML config file.
//!
//! Each binary defines a `serde` struct with a default for every key and
//! `#[serde(deny_unknown_fields)]`, so a misspelt key is an error rather than a silently ignored
//! line. Command-line flags override what the file says; secrets come from the environment or
//! the file, never from a flag alone.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file is not valid TOML for this service.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, on one line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Checks the link timing settings both services have: heartbeat interval, heartbeat timeout
/// (longer than the interval) and handshake timeout.
pub fn check_link_timing(
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    handshake_timeout_ms: u64,
) -> Result<(), ConfigError> {
    ensure(
        heartbeat_interval_ms > 0,
        "heartbeat_interval_ms",
        "must be positive",
    )?;
    ensure(
        heartbeat_timeout_ms > heartbeat_interval_ms,
        "heartbeat_timeout_ms",
        "must be greater than heartbeat_interval_ms",
    )?;
    ensure(
        handshake_timeout_ms > 0,
        "handshake_timeout_ms",
        "must be positive",
    )
}

/// Checks the HTTP serving settings both services have: connections at most, in all and per
/// source address, the request timeout and the body size limit.
pub fn check_serving(
    max_connections: usize,
    max_connections_per_ip: usize,
    request_timeout_ms: u64,
    max_body_bytes: usize,
) -> Result<(), ConfigError> {
    ensure(max_connections > 0, "max_connections", "must be positive")?;
    ensure(
        max_connections_per_ip > 0,
        "max_connections_per_ip",
        "must be positive (for no limit per address, set it to max_connections)",
    )?;
    ensure(
        request_timeout_ms > 0,
        "request_timeout_ms",
        "must be positive",
    )?;
    ensure(max_body_bytes > 0, "max_body_bytes", "must be positive")
}

/// Checks how many connections both services set up at once, and how long one may count
/// among them ([`crate::serve::ServeOptions::max_setups`], `setup_timeout`).
pub fn check_setups(max_setups: usize, setup_timeout_ms: u64) -> Result<(), ConfigError> {
    ensure(
        max_setups > 0 && max_setups <= tokio::sync::Semaphore::MAX_PERMITS,
        "max_setups",
        "must be positive (and at most 2^61 - 1)",
    )?;
    ensure(setup_timeout_ms > 0, "setup_timeout_ms", "must be positive")
}

/// Getters that read a config's `*_ms` fields as [`std::time::Duration`]s; both services'
/// configs use it inside an `impl` block:
///
/// ```
/// struct Config { heartbeat_interval_ms: u64 }
/// impl Config {
///     relaymesh_net::durations! {
///         /// The heartbeat interval.
///         pub fn heartbeat_interval = heartbeat_interval_ms;
///     }
/// }
/// let c = Config { heartbeat_interval_ms: 250 };
/// assert_eq!(c.heartbeat_interval(), std::time::Duration::from_millis(250));
/// ```
#[macro_export]
macro_rules! durations {
    ($($(#[$meta:meta])* $vis:vis fn $name:ident = $field:ident;)+) => {
        $(
            $(#[$meta])*
            $vis fn $name(&self) -> ::std::time::Duration {
                ::std::time::Duration::from_millis(self.$field)
            }
        )+
    };
}

/// Reads `path` as TOML into `T`, or returns `T::default()` when there is no file.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(&text, path)
}

/// Parses `text`, the contents of the config file `path`, as TOML into `T`.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Fails with [`ConfigError::Invalid`] naming `key` when `ok` is false.
pub fn ensure(ok: bool, key: &str, rule: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!("`{key}` {rule}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        limit: u32,
    }

    #[test]
    fn missing_file_means_defaults_and_typos_are_errors() {
        assert_eq!(load::<Sample>(None).unwrap(), Sample::default());
        let dir = std::env::temp_dir().join(format!("relaymesh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "limit = 5\n").unwrap();
        assert_eq!(load::<Sample>(Some(&good)).unwrap(), Sample { limit: 5 });
        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "limt = 5\n").unwrap();
        let err = load::<Sample>(Some(&typo)).unwrap_err().to_string();
        assert!(err.contains("limt") && !err.contains('\n'), "{err}");
        let missing = load::<Sample>(Some(&dir.join("nope.toml")))
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("cannot read config file"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serving_limits_must_be_positive() {
        assert!(check_serving(100, 10, 1_000, 1_024).is_ok());
        assert!(
            check_serving(100, 1_000, 1_000, 1_024).is_ok(),
            "above max_connections"
        );
        let zero = check_serving(100, 0, 1_000, 1_024).unwrap_err().to_string();
        assert!(
            zero.contains("`max_connections_per_ip` must be positive"),
            "{zero}"
        );
    }
}
