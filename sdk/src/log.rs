//! Structured logs through `wasi:logging`: the host keeps them with the
//! attempt's result and forwards them to its own log.
//!
//! Use the macros ([`info!`](crate::info), [`warn!`](crate::warn), ...); they
//! take `format!` arguments and record the calling module as the context.

use crate::bindings::wasi::logging::logging;

/// How severe a log message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// Send one log message to the host. `context` names where it came from.
pub fn log(level: Level, context: &str, message: &str) {
    let level = match level {
        Level::Trace => logging::Level::Trace,
        Level::Debug => logging::Level::Debug,
        Level::Info => logging::Level::Info,
        Level::Warn => logging::Level::Warn,
        Level::Error => logging::Level::Error,
        Level::Critical => logging::Level::Critical,
    };
    logging::log(level, context, message);
}

/// Log at a given [`Level`] with `format!` arguments.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::log::log($level, ::core::module_path!(), &::std::format!($($arg)+))
    };
}

/// Log at trace level.
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Trace, $($arg)+) }; }
/// Log at debug level.
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Debug, $($arg)+) }; }
/// Log at info level.
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Info, $($arg)+) }; }
/// Log at warn level.
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Warn, $($arg)+) }; }
/// Log at error level.
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::log::Level::Error, $($arg)+) }; }
