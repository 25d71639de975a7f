//! Windows: console control events for stop, modification time for the file watcher,
//! keepalive through socket2, and the environment of `exec:` children.

use std::io;

use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
use tokio::signal::windows::{CtrlBreak, CtrlC, CtrlClose, CtrlShutdown};

use super::SignalAction;
use crate::config::Config;

/// Windows has no soft descriptor limit to raise.
pub fn raise_nofile() {}

/// The Windows heap keeps its defaults.
pub fn tune_allocator() {}

/// The console events the gateway acts on (all mean stop; a reload follows a change of
/// the config or credential files).
pub struct Signals {
    c: CtrlC,
    brk: CtrlBreak,
    close: CtrlClose,
    shutdown: CtrlShutdown,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            c: ctrl_c()?,
            brk: ctrl_break()?,
            close: ctrl_close()?,
            shutdown: ctrl_shutdown()?,
        })
    }

    /// The next event.
    pub async fn recv(&mut self) -> SignalAction {
        tokio::select! {
            _ = self.c.recv() => SignalAction::Stop,
            _ = self.brk.recv() => SignalAction::Stop,
            _ = self.close.recv() => SignalAction::Stop,
            _ = self.shutdown.recv() => SignalAction::Stop,
        }
    }
}

/// What identifies a file's content for the watcher: size and modification time.
pub type FileStamp = (u64, Option<std::time::SystemTime>);

/// The stamp of `m`.
pub fn file_stamp(m: &std::fs::Metadata) -> FileStamp {
    (m.len(), m.modified().ok())
}

/// Nothing to check at start on Windows: opening as a principal needs an S4U token at
/// session time and fails closed there (identity/windows.rs).
pub fn check_capabilities(_cfg: &Config) -> Result<(), String> {
    Ok(())
}

/// TCP keepalive for dead-peer detection (Windows has no TCP_USER_TIMEOUT; WebSocket
/// pings bound the rest).
pub fn set_keepalive(
    tcp: &tokio::net::TcpStream,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) {
    let (idle, gap) = super::keepalive_timing(interval, timeout);
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(gap);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Windows processes end with a code, never a signal.
pub fn exit_signal(_status: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// The gateway's own account name and profile directory.
pub fn current_user() -> (String, std::path::PathBuf) {
    let name = std::env::var("USERNAME").unwrap_or_else(|_| "gateway".into());
    let home = std::env::var_os("USERPROFILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("C:\\"));
    (name, home)
}

/// The environment every `exec:` child starts from: what Windows programs need to run
/// (`SystemRoot`, a system `PATH`), nothing of the gateway's own.
pub fn child_base_env() -> Vec<(String, String)> {
    let root = std::env::var("SystemRoot").unwrap_or_else(|_| "C:\\windows".into());
    vec![
        (
            "PATH".into(),
            format!("{root}\\system32;{root};{root}\\System32\\Wbem"),
        ),
        ("SystemRoot".into(), root.clone()),
        ("windir".into(), root),
    ]
}

/// Audit lines carry uid/gid, which Windows has not.
pub fn current_ids() -> (u32, u32) {
    (0, 0)
}
