//! Logging set-up: text or JSON lines on stderr; `RUST_LOG`, when set, wins
//! over `log.level`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RUST_LOG={value:?} is not a log filter")]
    BadEnv {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Installs the global subscriber. `rust_log` is the value of `RUST_LOG`,
/// passed in so that the rule "the variable wins" is testable.
pub fn init(cfg: &LogConfig, rust_log: Option<String>) -> Result<(), LogError> {
    let filter = match rust_log.filter(|v| !v.is_empty()) {
        Some(value) => {
            EnvFilter::try_new(&value).map_err(|source| LogError::BadEnv { value, source })?
        }
        // Validated when the config was loaded.
        None => EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| LogError::Install(e.to_string()))
}
