//! systemd readiness notification (`Type=notify`): datagrams to `$NOTIFY_SOCKET`
//! (a path, or `@name` for the abstract namespace). A no-op when the variable is unset,
//! and on Windows.

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening.
#[cfg(windows)]
pub fn notify(_state: &str) {}

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening.
#[cfg(unix)]
pub fn notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: listeners are up.
pub fn ready() {
    notify("READY=1");
}

/// `RELOADING=1` with the monotonic timestamp systemd requires for `Type=notify-reload`.
#[cfg(unix)]
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// `RELOADING=1` (a no-op on Windows).
#[cfg(windows)]
pub fn reloading() {}

/// `STOPPING=1`: draining.
pub fn stopping() {
    notify("STOPPING=1");
}
