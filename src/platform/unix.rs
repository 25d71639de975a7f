//! Unix: RLIMIT_NOFILE, signals, inode-based file identity, capability checks.

use std::io;

use rustix::thread::CapabilitySet as C;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::SignalAction;
use crate::config::{self, Config};
use crate::endpoint::EndpointSpec;

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
}

/// glibc malloc, unless the environment sets malloc parameters itself (`GLIBC_TUNABLES`
/// with `glibc.malloc.*`, or `MALLOC_*_`): buffers of up to
/// 1 MiB come from the heap instead of a fresh `mmap` each (the data path's read buffers
/// and frames of 128–256 KiB are freed and allocated again at the rate data flows), and
/// a heap gives memory back to the system only beyond 4 MiB free at its top, not at
/// every dip. Both are off by default because glibc's dynamic thresholds let them drift:
/// in a bulk transfer the gateways page-faulted freshly mapped or trimmed memory on
/// every frame (page faults per 2 s of bulk: about 90,000 before, under 200 after;
/// BENCHMARKS.md has the throughput and the few MiB more RSS it costs). Called
/// before any other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    if malloc_set_by_environment() {
        return;
    }
    // SAFETY: mallopt only changes the allocator's parameters (it takes the arena lock
    // itself); no pointer is passed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Whether the environment sets glibc malloc parameters itself (any `glibc.malloc.*`
/// tunable, or the older `MALLOC_*_` variables): then they are left as set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_set_by_environment() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || std::env::vars_os().any(|(k, _)| {
            k.to_str()
                .is_some_and(|k| k.starts_with("MALLOC_") && k.ends_with('_'))
        })
}

/// Other C libraries keep their defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// The signals the gateway acts on.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> SignalAction {
        tokio::select! {
            _ = self.term.recv() => SignalAction::Stop,
            _ = self.int.recv() => SignalAction::Stop,
            _ = self.hup.recv() => SignalAction::Reload,
        }
    }
}

/// What identifies a file's content for the watcher: device, inode, mtime, size.
/// `metadata()` follows symlinks, so a symlink swap (Kubernetes Secrets, certbot) shows
/// as a new inode even though the watched path is the same.
pub type FileStamp = (u64, u64, i64, i64, u64);

/// The stamp of `m`.
pub fn file_stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len())
}

/// Refuses a config that needs impersonation (or socket ownership changes) on a gateway
/// lacking the capabilities for it, naming the capability and the pipe; reads the
/// gateway's credentials and starts the impersonation threads when needed.
pub fn check_capabilities(cfg: &Config) -> Result<(), String> {
    let mut any = false;
    for p in &cfg.pipes {
        if p.run_as == config::RunAs::Gateway {
            continue;
        }
        any = true;
        let mut need = C::SETUID | C::SETGID;
        if matches!(p.endpoint, EndpointSpec::Exec { .. }) {
            need |= C::KILL;
        }
        let missing = crate::identity::unix::missing_capabilities(need);
        if !missing.is_empty() {
            return Err(format!(
                "pipe {:?}: run_as = {} needs {}, which this gateway does not have (run it as root or grant the capabilities)",
                p.name,
                p.run_as.describe(),
                missing.join(", ")
            ));
        }
    }
    for f in &cfg.forwards {
        if f.socket_owner.is_some() || f.socket_group.is_some() {
            let missing = crate::identity::unix::missing_capabilities(C::CHOWN);
            if !missing.is_empty() {
                return Err(format!(
                    "forward {}: socket_owner/socket_group need {}, which this gateway does not have",
                    f.listen.socket_path().map(|p| p.display().to_string()).unwrap_or_default(),
                    missing.join(", ")
                ));
            }
        }
    }
    if any {
        crate::identity::unix::start().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// TCP keepalive and TCP_USER_TIMEOUT for dead-peer detection: an idle connection is
/// probed after `interval` (kernel probes, answered even by a peer whose application is
/// stalled), and data left unacknowledged for `timeout` fails the connection. A slow but
/// live peer keeps acknowledging, so it is never dropped.
pub fn set_keepalive(
    tcp: &tokio::net::TcpStream,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) {
    use rustix::net::sockopt;
    let (idle, gap) = super::keepalive_timing(interval, timeout);
    let _ = sockopt::set_socket_keepalive(tcp, true);
    let _ = sockopt::set_tcp_keepidle(tcp, idle);
    let _ = sockopt::set_tcp_keepintvl(tcp, gap);
    let _ = sockopt::set_tcp_keepcnt(tcp, super::KEEPALIVE_PROBES);
    let _ =
        sockopt::set_tcp_user_timeout(tcp, u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
}

/// Whether the socket `fd`'s peer is gone entirely: `POLLHUP` (on a Unix socket, both
/// directions shut down). Asks without waiting; an error counts as not known, so no.
#[allow(unsafe_code)]
pub fn hung_up(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLHUP != 0
}

/// The signal that ended a child, if one did.
pub fn exit_signal(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

/// The gateway's own account: name and home directory (`exec:` children of
/// `run_as = "gateway"` pipes get them as `USER` and `HOME`).
pub fn current_user() -> (String, std::path::PathBuf) {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid).ok().flatten() {
        Some(u) => (u.name, u.dir),
        None => (uid.to_string(), std::path::PathBuf::from("/")),
    }
}

/// The environment every `exec:` child starts from (before the pipe's own `env`).
pub fn child_base_env() -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

/// The gateway's effective uid and gid (for audit lines of `run_as = "gateway"` sessions),
/// read once: the process never changes its own credentials (impersonation changes only
/// the credentials of the thread doing an open), and every session would pay two
/// syscalls otherwise.
pub fn current_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    })
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod tests {
    /// Blocks malloc currently holds as mappings of their own.
    fn mapped_blocks() -> i32 {
        // SAFETY: mallinfo only reads the allocator's statistics (mallinfo, not
        // mallinfo2, which older glibc lacks: the test binary would not load there).
        unsafe { libc::mallinfo() }.hblks
    }

    /// This changes the allocator's settings for every test in this binary, as the
    /// gateway's `main` does for the gateway (harmless: only thresholds).
    #[test]
    fn buffers_of_up_to_a_mebibyte_come_from_the_heap_after_tune_allocator() {
        if super::malloc_set_by_environment() {
            eprintln!("skipped: the environment sets malloc parameters, which tune_allocator leaves alone");
            return;
        }
        super::tune_allocator();
        // After tuning, 768 KiB comes from the heap and 4 MiB is mapped on its own. Other tests run alongside and may map or unmap blocks meanwhile, so
        // each check passes on the first of a few attempts that sees no interference.
        let grows_by = |size: usize| {
            let before = mapped_blocks();
            let v: Vec<u8> = Vec::with_capacity(size);
            let during = mapped_blocks();
            drop(std::hint::black_box(v));
            during - before
        };
        assert!(
            (0..20).any(|_| grows_by(768 << 10) == 0),
            "a 768 KiB buffer got a mapping of its own every time"
        );
        // With glibc's floating default, freeing a mapped block raises the threshold to
        // its size, so a second 4 MiB buffer would come from the heap: tuned thresholds
        // are fixed, and it keeps its own mapping.
        grows_by(4 << 20);
        assert!(
            (0..20).any(|_| grows_by(4 << 20) == 1),
            "a 4 MiB buffer no longer gets a mapping of its own: the threshold floats"
        );
    }
}
