//! What differs between Unix and Windows builds outside the endpoints and the
//! credential switch: process limits, signals, file identity for the watcher, and the
//! checks a config needs before the gateway starts. One file per platform; both export
//! the same names.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;

/// What a signal asks the gateway to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Drain and stop (SIGTERM, SIGINT; Ctrl-C, Ctrl-Break, console close on Windows).
    Stop,
    /// Reload the config (SIGHUP; Windows has no such signal: the file watcher reloads).
    Reload,
}
