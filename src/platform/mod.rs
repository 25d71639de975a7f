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

/// Keepalive probes before a silent peer counts as gone.
pub const KEEPALIVE_PROBES: u32 = 3;

/// The kernel keepalive timing for `[keepalive]`: idle time before the first probe and
/// the gap between probes, so that `KEEPALIVE_PROBES` unanswered probes fit in `timeout`
/// (each at least 1 s).
pub fn keepalive_timing(
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> (std::time::Duration, std::time::Duration) {
    let second = std::time::Duration::from_secs(1);
    let idle = interval.max(second);
    let gap = (timeout.saturating_sub(interval) / KEEPALIVE_PROBES).max(second);
    (idle, gap)
}
