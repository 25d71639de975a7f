//! The credential switch (Linux): open a local endpoint *as* a principal.
//!
//! Linux credentials are per thread in the kernel; glibc's set*id wrappers broadcast to
//! every thread, raw syscalls do not (shared/notes/semantics.md, measured). So:
//!
//! - The switch is one synchronous call on the calling thread ([`as_principal`]): switch,
//!   one non-blocking system call sequence (`socket` + `connect`, or `open`), switch back,
//!   before it returns. Nothing else runs on the thread while it is switched: no
//!   `.await` (so no other task), no allocation, no logging, no thread creation
//!   (threads inherit credentials). The address or path is prepared before the switch.
//!   A guard restores on every way out, unwinding included. (Earlier builds sent each
//!   open to a pool of dedicated threads and back: two thread hops per session, about
//!   a quarter of the sequential session rate, for the same switched section.)
//! - The switch changes **effective** ids only (`setresuid(-1, uid, -1)`): the real and
//!   saved ids stay the gateway's, so the mapped user cannot signal the thread, and the
//!   way back is always allowed. Supplementary groups are set, then the effective gid,
//!   then the effective uid; then the **effective capability set is cleared**, so a
//!   gateway holding e.g. CAP_DAC_OVERRIDE gets no more access than the user would.
//! - Restore runs in reverse and is **verified** (uids, gids, groups, capabilities read
//!   back); if anything differs the process aborts rather than run on with borrowed
//!   rights. A switch that fails half-way is restored the same way and reported, and the
//!   session is refused: never fall back to the gateway's own rights.
//! - Every operation is non-blocking (`SOCK_NONBLOCK` connect, `O_NONBLOCK` open); a
//!   busy target (full backlog, FIFO without reader) is retried by the async caller with
//!   a bounded deadline, switched only for each try, so a slow target never holds a
//!   thread switched or stalls it.
//!
//! `exec:` children are switched differently: fully (real, effective, saved ids and
//! groups) in the forked child before exec, where only one thread exists.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::{Gid, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets};

use super::Principal;

/// Resolves a principal spec through the user database.
pub fn resolve(spec: &crate::config::PrincipalSpec) -> Result<Principal, String> {
    match spec {
        crate::config::PrincipalSpec::User(name) => resolve_user(name),
        crate::config::PrincipalSpec::Ids { uid, gid, gids } => {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid))
                .ok()
                .flatten();
            Ok(Principal {
                uid: *uid,
                gid: *gid,
                groups: gids.clone(),
                name: user
                    .as_ref()
                    .map(|u| u.name.clone())
                    .unwrap_or_else(|| uid.to_string()),
                home: user.map(|u| u.dir).unwrap_or_else(|| PathBuf::from("/")),
            })
        }
    }
}

/// Resolves a user name: uid, primary gid, supplementary groups (getgrouplist), home.
pub fn resolve_user(name: &str) -> Result<Principal, String> {
    let user = nix::unistd::User::from_name(name)
        .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
        .ok_or_else(|| format!("no such user {name:?} in the user database"))?;
    let cname = std::ffi::CString::new(name).map_err(|_| format!("invalid user name {name:?}"))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map_err(|e| format!("cannot list the groups of {name:?}: {e}"))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(Principal {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        name: user.name,
        home: user.dir,
    })
}

/// How often a busy target is retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// What to open as the principal, prepared before the switch (nothing is allocated or
/// converted while switched).
enum Op {
    Connect(SocketType, SocketAddrUnix),
    Open(std::ffi::CString, OFlags),
}

impl Op {
    fn connect(ty: SocketType, path: &Path) -> io::Result<Op> {
        Ok(Op::Connect(ty, SocketAddrUnix::new(path)?))
    }

    fn open_fifo(path: &Path, write: bool) -> io::Result<Op> {
        use std::os::unix::ffi::OsStrExt;
        let access = if write {
            OFlags::WRONLY
        } else {
            OFlags::RDONLY
        };
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
        Ok(Op::Open(
            c,
            access | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        ))
    }

    /// System calls only.
    fn perform(&self) -> io::Result<OwnedFd> {
        match self {
            Op::Connect(ty, addr) => {
                let fd = rustix::net::socket_with(
                    AddressFamily::UNIX,
                    *ty,
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                    None,
                )?;
                rustix::net::connect(&fd, addr)?;
                Ok(fd)
            }
            Op::Open(path, flags) => Ok(rustix::fs::open(path.as_c_str(), *flags, Mode::empty())?),
        }
    }
}

/// Performs `op` on this thread as `p` ([`run_as`]). The thread's own credentials are
/// read once per thread, at its first switch: every switch restores them and verifies
/// that it did (or aborts), so they hold at the start of every switch. (Nothing changes
/// a thread's credentials otherwise: the gateway never calls glibc's set*id, which would
/// change every thread, and `exec_as` switches only the forked child.)
fn as_principal(p: &Principal, op: &Op) -> io::Result<OwnedFd> {
    thread_local! {
        static SAVED: std::cell::OnceCell<Result<Saved, (io::ErrorKind, String)>> =
            const { std::cell::OnceCell::new() };
    }
    SAVED.with(|saved| {
        match saved.get_or_init(|| current().map_err(|e| (e.kind(), e.to_string()))) {
            Ok(saved) => run_as(p, saved, || op.perform()),
            Err((kind, e)) => Err(io::Error::new(
                *kind,
                format!("cannot read this thread's credentials: {e}"),
            )),
        }
    })
}

// === the switch ===

/// The credentials of the calling thread, as saved before a switch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Saved {
    ruid: Uid,
    euid: Uid,
    rgid: Gid,
    egid: Gid,
    groups: Vec<Gid>,
    caps: CapabilitySets,
}

fn current() -> io::Result<Saved> {
    // These are raw syscalls, so they read the calling thread's credentials.
    Ok(Saved {
        ruid: rustix::process::getuid(),
        euid: rustix::process::geteuid(),
        rgid: rustix::process::getgid(),
        egid: rustix::process::getegid(),
        groups: rustix::process::getgroups()?,
        caps: rustix::thread::capabilities(None)?,
    })
}

/// Runs `f` on this thread with `p`'s effective uid, gid and groups and no effective
/// capabilities; restores `saved` (the thread's credentials now) and verifies afterwards
/// (aborting the process if it cannot), also if `f` or the switch unwinds. `f` must be
/// system calls only: nothing that awaits, allocates, logs or starts a thread.
fn run_as<T>(p: &Principal, saved: &Saved, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let switched = Switched(saved);
    if let Err(e) = enter(p, saved) {
        drop(switched);
        crate::metrics::get().impersonation_failures.inc();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("impersonation of uid {} failed: {e}", p.uid),
        ));
    }
    let r = f();
    drop(switched);
    r
}

/// Restores (or aborts) when dropped: on return and on unwinding.
struct Switched<'a>(&'a Saved);

impl Drop for Switched<'_> {
    fn drop(&mut self) {
        restore_or_abort(self.0);
    }
}

fn enter(p: &Principal, saved: &Saved) -> io::Result<()> {
    let groups: Vec<Gid> = p.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    rustix::thread::set_thread_groups(&groups)?;
    rustix::thread::set_thread_res_gid(None, Gid::from_raw(p.gid), None)?;
    rustix::thread::set_thread_res_uid(None, Uid::from_raw(p.uid), None)?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: saved.caps.permitted,
            inheritable: saved.caps.inheritable,
        },
    )?;
    // Verify the switch took: never run the operation with other rights than asked.
    // (What the operation's permission checks use: the effective ids and capabilities.)
    let euid = rustix::process::geteuid();
    let egid = rustix::process::getegid();
    let caps = rustix::thread::capabilities(None)?;
    if euid.as_raw() != p.uid || egid.as_raw() != p.gid || !caps.effective.is_empty() {
        return Err(io::Error::other("credentials did not switch"));
    }
    Ok(())
}

fn restore(saved: &Saved) -> io::Result<()> {
    // euid first (allowed: the saved/real uid is unchanged), then capabilities, then
    // gid and groups, which need CAP_SETGID in effect again.
    rustix::thread::set_thread_res_uid(None, saved.euid, None)?;
    rustix::thread::set_capabilities(None, saved.caps)?;
    rustix::thread::set_thread_res_gid(None, saved.egid, None)?;
    rustix::thread::set_thread_groups(&saved.groups)?;
    Ok(())
}

fn restore_or_abort(saved: &Saved) {
    let ok = restore(saved).is_ok() && current().is_ok_and(|now| now == *saved);
    if !ok {
        // Running on with a mapped user's (or mixed) credentials is worse than dying.
        eprintln!(
            "pipebridge: FATAL: could not restore thread credentials after impersonation; aborting"
        );
        std::process::abort();
    }
}

// === async API ===

async fn with_retry(
    p: &Principal,
    op: Op,
    deadline: Instant,
    busy: &[Errno],
) -> io::Result<OwnedFd> {
    loop {
        match as_principal(p, &op) {
            Err(e)
                if busy
                    .iter()
                    .any(|b| e.raw_os_error() == Some(b.raw_os_error())) =>
            {
                if Instant::now() + RETRY_INTERVAL > deadline {
                    return Err(e);
                }
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
            r => return r,
        }
    }
}

/// Connects a Unix socket of type `ty` at `path` as `p` (retrying a full backlog until
/// `deadline`). The returned socket is non-blocking; SO_PEERCRED on the server side
/// names `p`.
pub async fn connect(
    p: &Principal,
    ty: SocketType,
    path: &Path,
    deadline: Instant,
) -> io::Result<OwnedFd> {
    with_retry(p, Op::connect(ty, path)?, deadline, &[Errno::AGAIN]).await
}

/// Opens a FIFO as `p`: the read end at once, the write end retried until a reader
/// exists or `deadline`.
pub async fn open_fifo(
    p: &Principal,
    path: &Path,
    write: bool,
    deadline: Instant,
) -> io::Result<OwnedFd> {
    with_retry(p, Op::open_fifo(path, write)?, deadline, &[Errno::NXIO]).await
}

/// Makes `cmd`'s child run fully as `p`: groups, then real/effective/saved gid, then
/// uid, in the forked child before exec (single-threaded there).
pub fn exec_as(cmd: &mut tokio::process::Command, p: &Principal) {
    let groups: Vec<Gid> = p.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    let uid = Uid::from_raw(p.uid);
    let gid = Gid::from_raw(p.gid);
    // SAFETY: the closure runs in the child between fork and exec. It only makes raw
    // syscalls through rustix (setgroups, setresgid, setresuid), which allocate nothing
    // and take no locks; `groups` was allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(uid, uid, uid)?;
            Ok(())
        });
    }
}

/// Capabilities the gateway holds in its permitted set.
pub fn permitted_capabilities() -> CapabilitySet {
    rustix::thread::capabilities(None)
        .map(|c| c.permitted)
        .unwrap_or(CapabilitySet::empty())
}

/// Names of the capabilities in `needed` that the gateway lacks.
pub fn missing_capabilities(needed: CapabilitySet) -> Vec<&'static str> {
    let have = permitted_capabilities();
    [
        (CapabilitySet::SETUID, "CAP_SETUID"),
        (CapabilitySet::SETGID, "CAP_SETGID"),
        (CapabilitySet::KILL, "CAP_KILL"),
        (CapabilitySet::CHOWN, "CAP_CHOWN"),
    ]
    .into_iter()
    .filter(|(c, _)| needed.contains(*c) && !have.contains(*c))
    .map(|(_, n)| n)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[tokio::test]
    async fn switch_is_per_thread_and_restored() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID) to switch credentials");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = Principal {
            uid: 54321,
            gid: 54322,
            groups: vec![54323, 54324],
            name: "t".into(),
            home: "/".into(),
        };
        let before = current().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        // 0600 root-owned socket: the mapped user may not connect.
        let e = connect(&p, SocketType::STREAM, &path, deadline)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let fd = connect(&p, SocketType::STREAM, &path, deadline)
            .await
            .unwrap();
        let (srv, _) = listener.accept().unwrap();
        let cred = rustix::net::sockopt::socket_peercred(&srv).unwrap();
        assert_eq!((cred.uid.as_raw(), cred.gid.as_raw()), (54321, 54322));
        drop(fd);
        // The switch ran on this thread (a current-thread runtime), and it is back: ids,
        // groups and capabilities as before.
        assert!(rustix::process::geteuid().is_root());
        assert_eq!(current().unwrap(), before);
    }

    #[test]
    fn a_switch_that_unwinds_is_restored() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID) to switch credentials");
            return;
        }
        let saved = current().unwrap();
        let p = Principal {
            uid: 54321,
            gid: 54322,
            groups: vec![54323],
            name: "t".into(),
            home: "/".into(),
        };
        let inside = std::cell::Cell::new(None);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_as(&p, &saved, || -> io::Result<()> {
                inside.set(Some((
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                )));
                panic!("a panic while switched")
            })
        }));
        assert!(r.is_err(), "the panic came through");
        assert_eq!(inside.get(), Some((54321, 54322)), "it ran switched");
        assert_eq!(current().unwrap(), saved, "and the thread is back");
    }
}
