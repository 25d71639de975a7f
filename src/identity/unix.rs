//! The credential switch (Linux): open a local endpoint *as* a principal.
//!
//! Linux credentials are per thread in the kernel; glibc's set*id wrappers broadcast to
//! every thread, raw syscalls do not (shared/notes/semantics.md, measured). So:
//!
//! - A switch is one synchronous call ([`run_as`]): switch, one non-blocking system call
//!   sequence (`socket` + `connect`, or `open`), switch back, before it returns. Nothing
//!   else runs on the thread while it is switched: no `.await` (so no other task), no
//!   allocation, no logging, no thread creation (threads inherit credentials). The
//!   address, path and group list are prepared before. A guard restores on every way
//!   out, unwinding included.
//! - Where it runs: on one of a small fixed pool of dedicated threads ([`POOL_THREADS`]),
//!   created before the first switch and never used for other work, so a lookup that
//!   blocks (a FUSE mount that answers only the user, a hung network filesystem: the
//!   lookup is not covered by `O_NONBLOCK`) holds one of them, not a thread that runs
//!   other sessions; a pool open waits at most until the open's deadline, and one uid
//!   holds at most [`MAX_POOL_OPENS_PER_UID`] of the threads at a time. The pool costs
//!   two thread hops per open (about a quarter of the sequential session rate), so an
//!   open runs on the session's own thread instead when the judging thread found, within the
//!   last [`VERDICT_TTL`], that only root or the gateway's account can change or slow the
//!   lookup of its directory, on local filesystems ([`chain_is_trusted`]: no directory on
//!   the way writable by anyone else, so within the verdict's life only they can change
//!   it), and the entry is the socket or FIFO itself ([`switch_here_is_safe`]).
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
//!   a bounded deadline, switched only for each try.
//!
//! `exec:` children are switched differently: fully (real, effective, saved ids and
//! groups) in the forked child before exec, where only one thread exists.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
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

/// Threads in the impersonation pool (opens whose path lookup someone other than root
/// could slow down: [`switch_here_is_safe`]).
pub const POOL_THREADS: usize = 4;
/// How often a busy target is retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// What to open as the principal, prepared before the switch (nothing is allocated or
/// converted while switched).
#[derive(Clone)]
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
            Op::Connect(ty, addr) => connect_now(*ty, addr),
            Op::Open(path, flags) => Ok(rustix::fs::open(path.as_c_str(), *flags, Mode::empty())?),
        }
    }
}

/// A non-blocking, close-on-exec Unix socket of type `ty` connected to `addr`, with the
/// calling thread's credentials. A Unix socket's `connect` completes or fails at once
/// (never `EINPROGRESS`; `EAGAIN` when the listen backlog is full). System calls only:
/// it also runs switched ([`Op::perform`]).
pub fn connect_now(ty: SocketType, addr: &SocketAddrUnix) -> io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        ty,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, addr)?;
    Ok(fd)
}

/// A principal's ids as the switch takes them (converted before the switch).
struct Target {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

impl Target {
    fn of(p: &Principal) -> Target {
        Target {
            uid: Uid::from_raw(p.uid),
            gid: Gid::from_raw(p.gid),
            groups: p.groups.iter().map(|&g| Gid::from_raw(g)).collect(),
        }
    }
}

/// The gateway's own credentials, read once (at start, [`start`], before any switch):
/// every switch restores them and verifies that it did, or the process aborts. Every
/// thread holds them whenever it is not inside a switch: nothing else changes a thread's
/// credentials (the gateway never calls glibc's set*id, which would change every
/// thread, and `exec_as` switches only the forked child).
fn baseline() -> io::Result<&'static Saved> {
    static BASELINE: OnceLock<Result<Saved, (io::ErrorKind, String)>> = OnceLock::new();
    BASELINE
        .get_or_init(|| current().map_err(|e| (e.kind(), e.to_string())))
        .as_ref()
        .map_err(|(kind, e)| {
            io::Error::new(*kind, format!("cannot read the gateway's credentials: {e}"))
        })
}

/// Performs `op` as `p` on the calling thread ([`run_as`]): one synchronous call, so
/// nothing else runs on the thread while it is switched. Only for opens whose lookup
/// cannot block ([`switch_here_is_safe`]).
fn switch_here(p: &Principal, op: &Op) -> io::Result<OwnedFd> {
    let target = Target::of(p);
    run_as(&target, baseline()?, || op.perform())
}

struct Job {
    target: Target,
    op: Op,
    /// The directory whose lookup to judge for later opens ([`chain_is_trusted`]).
    dir: PathBuf,
    reply: tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
    /// Its principal's place in the pool, given back when the job is done (not when its
    /// session stops waiting: a job stuck in the kernel keeps holding it).
    _slot: PoolSlot,
}

struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
    /// Directories to judge ([`judge`]), on a thread of their own: a judgement that
    /// blocks (a hung network filesystem) holds neither an opening thread nor the
    /// verdicts of other directories' opens.
    judge_tx: Mutex<mpsc::Sender<PathBuf>>,
}

/// Pool opens one principal (uid) may have in flight: a user whose targets hang (a FUSE
/// mount of theirs that never answers) holds at most this many of the pool's threads;
/// their further opens wait for one of these places, until their deadline.
const MAX_POOL_OPENS_PER_UID: usize = 2;

fn pool() -> io::Result<&'static Pool> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..POOL_THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("pb-impersonate-{i}"))
                .spawn(move || worker(&rx))
                .map_err(|e| format!("cannot start impersonation threads: {e}"))?;
        }
        let (judge_tx, judge_rx) = mpsc::channel::<PathBuf>();
        std::thread::Builder::new()
            .name("pb-judge".into())
            .spawn(move || {
                while let Ok(dir) = judge_rx.recv() {
                    if let Ok(base) = baseline() {
                        judge(&dir, base);
                    }
                    if let Ok(mut pending) = judging().lock() {
                        pending.remove(&dir);
                    }
                }
            })
            .map_err(|e| format!("cannot start impersonation threads: {e}"))?;
        Ok(Pool {
            tx: Mutex::new(tx),
            judge_tx: Mutex::new(judge_tx),
        })
    })
    .as_ref()
    .map_err(|e| io::Error::other(e.clone()))
}

/// Reads the gateway's credentials and starts the impersonation threads now (at gateway
/// start, before any session), so that no thread is ever created later from a context
/// that could be switched.
pub fn start() -> io::Result<()> {
    baseline()?;
    pool().map(|_| ())
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        // Nobody waits for it any more (its deadline passed): an open now would only
        // show the target a connection or a FIFO end that closes at once.
        if job.reply.is_closed() {
            continue;
        }
        let res = baseline().and_then(|base| run_as(&job.target, base, || job.op.perform()));
        // A reply nobody waits for any more closes its fd here.
        let _ = job.reply.send(res);
        // Then, on the judging thread, the verdict on the directory for later opens.
        request_judgement(job.dir);
    }
}

/// Directories waiting for the judging thread (each once).
fn judging() -> &'static Mutex<std::collections::HashSet<PathBuf>> {
    static J: OnceLock<Mutex<std::collections::HashSet<PathBuf>>> = OnceLock::new();
    J.get_or_init(Default::default)
}

/// Asks the judging thread for a verdict on `dir`, unless one is fresh or on its way.
fn request_judgement(dir: PathBuf) {
    let fresh = verdicts().lock().map_or(true, |v| {
        v.get(&dir)
            .is_some_and(|(_, at)| at.elapsed() < VERDICT_TTL / 2)
    });
    if fresh {
        return;
    }
    let Ok(mut pending) = judging().lock() else {
        return;
    };
    if pending.len() >= MAX_VERDICTS || !pending.insert(dir.clone()) {
        return;
    }
    drop(pending);
    if let Ok(pool) = pool() {
        if let Ok(tx) = pool.judge_tx.lock() {
            let _ = tx.send(dir);
        }
    }
}

/// A principal's place in the pool ([`MAX_POOL_OPENS_PER_UID`]), given back when dropped.
struct PoolSlot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl PoolSlot {
    /// Waits (until `deadline`) for one of `uid`'s places in the pool.
    async fn take(uid: u32, deadline: Instant) -> io::Result<PoolSlot> {
        let sem = {
            let mut m = pool_slots()
                .lock()
                .map_err(|_| io::Error::other("impersonation pool poisoned"))?;
            if m.len() >= MAX_VERDICTS {
                m.retain(|_, s| s.available_permits() < MAX_POOL_OPENS_PER_UID);
            }
            m.entry(uid)
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_POOL_OPENS_PER_UID))
                })
                .clone()
        };
        let permit = tokio::time::timeout_at(deadline.into(), sem.acquire_owned())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("uid {uid}'s earlier opens still hold the impersonation threads"),
                )
            })?
            .map_err(|_| io::Error::other("impersonation pool closed"))?;
        Ok(PoolSlot(permit))
    }
}

fn pool_slots(
) -> &'static Mutex<std::collections::HashMap<u32, std::sync::Arc<tokio::sync::Semaphore>>> {
    type Slots = Mutex<std::collections::HashMap<u32, std::sync::Arc<tokio::sync::Semaphore>>>;
    static S: OnceLock<Slots> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// Performs `op` as `p` on a pool thread and waits for it until `deadline` (two thread
/// hops); the judging thread then judges the lookup of `path`'s directory for the opens
/// that follow ([`verdicts`]).
async fn on_pool(p: &Principal, path: &Path, op: Op, deadline: Instant) -> io::Result<OwnedFd> {
    #[cfg(test)]
    tests::POOL_JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let slot = PoolSlot::take(p.uid, deadline).await?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    {
        let pool = pool()?;
        let tx = pool
            .tx
            .lock()
            .map_err(|_| io::Error::other("impersonation pool poisoned"))?;
        tx.send(Job {
            target: Target::of(p),
            op,
            dir: path.parent().unwrap_or(path).to_path_buf(),
            reply,
            _slot: slot,
        })
        .map_err(|_| io::Error::other("impersonation pool stopped"))?;
    }
    tokio::time::timeout_at(deadline.into(), rx)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for the impersonation threads",
            )
        })?
        .map_err(|_| io::Error::other("impersonation thread went away"))?
}

/// Judges `dir` ([`chain_is_trusted`]) and keeps the verdict with the time it was
/// reached (an older verdict never replaces a newer one). On the judging thread, which
/// [`request_judgement`] asks only when no fresh verdict stands: judging may block.
fn judge(dir: &Path, base: &Saved) {
    let at = Instant::now();
    let trusted = chain_is_trusted(dir, base);
    if let Ok(mut v) = verdicts().lock() {
        if v.get(dir).is_some_and(|(_, old)| *old >= at) {
            return;
        }
        if v.len() >= MAX_VERDICTS {
            v.retain(|_, (_, t)| t.elapsed() < VERDICT_TTL);
            if v.len() >= MAX_VERDICTS {
                v.clear();
            }
        }
        v.insert(dir.to_path_buf(), (trusted, at));
    }
}

/// How long a directory's verdict ([`chain_is_trusted`]) stands before it is judged
/// again.
const VERDICT_TTL: Duration = Duration::from_secs(2);
/// Bound on remembered verdicts (one per target directory).
const MAX_VERDICTS: usize = 4096;

/// Verdicts by directory: whether nobody but root or the gateway can steer or slow a
/// lookup through it, and when the judging thread found that.
fn verdicts() -> &'static Mutex<std::collections::HashMap<PathBuf, (bool, Instant)>> {
    static V: OnceLock<Mutex<std::collections::HashMap<PathBuf, (bool, Instant)>>> =
        OnceLock::new();
    V.get_or_init(Default::default)
}

/// Whether a switched open of `path` may run on the calling thread, which runs other
/// sessions too. `O_NONBLOCK` does not cover the path lookup: a lookup through a FUSE
/// mount, a hung network filesystem or an automount point can block, and one the user
/// controls (a symlink they planted, a FUSE mount of theirs that answers only them)
/// could hold the thread, switched, for as long as they like. So an open runs here only
/// when the judging thread found, within [`VERDICT_TTL`], that nobody but root (or the
/// gateway's account) can steer the lookup of its directory, all on local filesystems
/// ([`chain_is_trusted`]: judged there, since judging may block too), and the last
/// entry is the socket or FIFO `op` expects: not a symlink or a mount point (checked
/// here with `statx` from cached attributes; the path is resolved again, through
/// directories only root or the gateway can have changed since). Any other open goes
/// to the pool's threads, which run nothing else.
fn switch_here_is_safe(path: &Path, op: &Op) -> bool {
    use rustix::fs::{AtFlags, FileType, StatxAttributes, StatxFlags};
    if !normal_absolute(path) {
        return false;
    }
    let Some(dir) = path.parent() else {
        return false;
    };
    let trusted = verdicts()
        .lock()
        .ok()
        .and_then(|v| v.get(dir).copied())
        .is_some_and(|(ok, at)| ok && at.elapsed() < VERDICT_TTL);
    if !trusted {
        return false;
    }
    let Ok(st) = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT | AtFlags::STATX_DONT_SYNC,
        StatxFlags::TYPE,
    ) else {
        return false;
    };
    let want = match op {
        Op::Connect(..) => FileType::Socket,
        Op::Open(..) => FileType::Fifo,
    };
    FileType::from_raw_mode(u32::from(st.stx_mode)) == want
        && st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && !st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

/// An absolute path without `.` or `..`.
fn normal_absolute(path: &Path) -> bool {
    use std::path::Component;
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Whether nobody but root (or the gateway's own account) can steer or slow a lookup
/// through `dir`: an absolute path without `.` or `..`, every directory on the way (`dir`
/// included) a real directory (not a symlink) owned by root or the gateway and writable
/// by nobody else (not even sticky, such as /tmp), on a local filesystem type where it
/// is a mount point. Checked with `lstat` and `statfs` as the gateway: may block on the
/// filesystems it refuses, so the judging thread does it.
fn chain_is_trusted(dir: &Path, base: &Saved) -> bool {
    use rustix::fs::FileType;
    if !normal_absolute(dir) {
        return false;
    }
    let trusted = |uid: u32| uid == 0 || uid == base.euid.as_raw();
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    let mut parent: Option<rustix::fs::Stat> = None;
    for d in ancestors {
        let Ok(st) = rustix::fs::lstat(d) else {
            return false;
        };
        // Only root or the gateway may add, rename or remove entries anywhere on the
        // way, so nobody else can change what this path resolves to while the verdict
        // stands (the session's thread resolves it again; a sticky directory such as
        // /tmp would let a user re-create an entry root removed).
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory
            || !trusted(st.st_uid)
            || st.st_mode & 0o022 != 0
        {
            return false;
        }
        if parent.is_none_or(|p| p.st_dev != st.st_dev)
            && !rustix::fs::statfs(d).is_ok_and(|fs| local_fs(fs.f_type as u64))
        {
            return false;
        }
        parent = Some(st);
    }
    parent.is_some()
}

/// Filesystem types whose lookups stay on this machine and answer at once (statfs
/// magic numbers, linux/magic.h): not FUSE, NFS, SMB, 9p, autofs or the like.
fn local_fs(magic: u64) -> bool {
    const LOCAL: [u64; 10] = [
        0x0102_1994, // tmpfs (and devtmpfs)
        0x8584_58f6, // ramfs
        0xef53,      // ext2/3/4
        0x5846_5342, // xfs
        0x9123_683e, // btrfs
        0x794c_7630, // overlayfs
        0x2fc1_2fc1, // zfs
        0xf2f5_2010, // f2fs
        0xca45_1a4e, // bcachefs
        0x7371_7368, // squashfs
    ];
    LOCAL.contains(&(magic & 0xffff_ffff))
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

/// Why a switch did not take (no allocation while switched).
#[derive(Debug)]
enum SwitchError {
    Sys(Errno),
    /// The ids or capabilities read back were not those asked for.
    NotSwitched,
}

impl std::fmt::Display for SwitchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchError::Sys(e) => write!(f, "{e}"),
            SwitchError::NotSwitched => f.write_str("credentials did not switch"),
        }
    }
}

/// Runs `f` on this thread with `t`'s effective uid, gid and groups and no effective
/// capabilities; restores `saved` (the gateway's credentials) and verifies afterwards
/// (aborting the process if it cannot), also if `f` or the switch unwinds. `f` must be
/// system calls only: nothing that awaits, allocates, logs or starts a thread. (A panic
/// hook would still run switched, before the guard: `f` does not panic.)
fn run_as<T>(t: &Target, saved: &Saved, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let switched = Switched(saved);
    if let Err(e) = enter(t, saved) {
        drop(switched);
        crate::metrics::get().impersonation_failures.inc();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("impersonation of uid {} failed: {e}", t.uid.as_raw()),
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

fn enter(t: &Target, saved: &Saved) -> Result<(), SwitchError> {
    let sys = SwitchError::Sys;
    rustix::thread::set_thread_groups(&t.groups).map_err(sys)?;
    rustix::thread::set_thread_res_gid(None, t.gid, None).map_err(sys)?;
    rustix::thread::set_thread_res_uid(None, t.uid, None).map_err(sys)?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: saved.caps.permitted,
            inheritable: saved.caps.inheritable,
        },
    )
    .map_err(sys)?;
    // Verify the switch took: never run the operation with other rights than asked.
    // (What the operation's permission checks use: the effective ids and capabilities.)
    let euid = rustix::process::geteuid();
    let egid = rustix::process::getegid();
    let caps = rustix::thread::capabilities(None).map_err(sys)?;
    if euid != t.uid || egid != t.gid || !caps.effective.is_empty() {
        return Err(SwitchError::NotSwitched);
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
    // What counts is the state read back: a step that fails on a value that never changed
    // (a switch refused at its first step, where setting the groups back needs a
    // capability the thread does not hold in effect) is no reason to abort.
    let _ = restore(saved);
    let ok = current().is_ok_and(|now| now == *saved);
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
    path: &Path,
    op: Op,
    deadline: Instant,
    busy: &[Errno],
) -> io::Result<OwnedFd> {
    loop {
        let r = if switch_here_is_safe(path, &op) {
            switch_here(p, &op)
        } else {
            on_pool(p, path, op.clone(), deadline).await
        };
        match r {
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
    with_retry(p, path, Op::connect(ty, path)?, deadline, &[Errno::AGAIN]).await
}

/// Opens a FIFO as `p`: the read end at once, the write end retried until a reader
/// exists or `deadline`.
pub async fn open_fifo(
    p: &Principal,
    path: &Path,
    write: bool,
    deadline: Instant,
) -> io::Result<OwnedFd> {
    // ENXIO on a write open: no reader yet, retried. On a read open (which needs no
    // writer) it means the path is not a FIFO (a socket): no retry.
    let busy: &[Errno] = if write { &[Errno::NXIO] } else { &[] };
    with_retry(p, path, Op::open_fifo(path, write)?, deadline, busy).await
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

/// Has `cmd`'s child drop every capability before exec (added after the switch, and
/// before a principal's working directory, which it enters without them), unless it
/// runs as a principal that is root (`principal` is its uid; `None`: the gateway's own
/// account). Switching between two uids that are
/// not root keeps the capability sets, and exec makes the ambient ones the child's: a
/// child of a gateway run as a user with ambient `CAP_SETUID` (systemd's
/// `AmbientCapabilities=`) would hold what lets it become root. A root gateway's own
/// child gets root's capabilities back at exec, unless `NoNewPrivileges` holds (the
/// shipped units): then it keeps none, not the ones the gateway was given to switch.
pub fn exec_drops_capabilities(cmd: &mut tokio::process::Command, principal: Option<u32>) {
    if principal == Some(0) {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and makes only the
    // prctl and capset system calls through rustix; it allocates nothing and takes no
    // locks.
    unsafe {
        cmd.pre_exec(drop_capabilities);
    }
}

/// Empties this thread's ambient, inheritable, permitted and effective capability sets.
/// Between fork and exec: system calls only.
fn drop_capabilities() -> io::Result<()> {
    let none = CapabilitySet::empty();
    rustix::thread::clear_ambient_capability_set()?;
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )?;
    Ok(())
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

    /// Opens sent to the pool.
    pub(super) static POOL_JOBS: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[tokio::test]
    async fn switch_is_per_thread_and_restored() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID) to switch credentials");
            return;
        }
        // In /run, which only root may write: a directory whose lookups nobody else steers.
        let dir = tempfile::tempdir_in("/run").unwrap();
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
        // A deadline of its own for each open (a loaded machine is slow).
        let deadline = || Instant::now() + Duration::from_secs(10);
        let pool_jobs = || POOL_JOBS.load(std::sync::atomic::Ordering::Relaxed);
        // 0600 root-owned socket: the mapped user may not connect. The first open of a
        // directory goes to the pool, which judges the directory.
        let pooled = pool_jobs();
        let e = connect(&p, SocketType::STREAM, &path, deadline())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(pool_jobs(), pooled + 1, "the first open went to the pool");
        // Root's directory in /run: the next opens switch on this thread, once the pool
        // thread has judged it (after its reply).
        let judged = Instant::now() + Duration::from_secs(5);
        while verdicts().lock().unwrap().get(dir.path()).is_none() && Instant::now() < judged {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            verdicts().lock().unwrap().get(dir.path()).map(|v| v.0),
            Some(true),
            "root's directory in /run is trusted"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let fd = connect(&p, SocketType::STREAM, &path, deadline())
            .await
            .unwrap();
        assert_eq!(
            pool_jobs(),
            pooled + 1,
            "the second open ran on this thread"
        );
        let (srv, _) = listener.accept().unwrap();
        let cred = rustix::net::sockopt::socket_peercred(&srv).unwrap();
        assert_eq!((cred.uid.as_raw(), cred.gid.as_raw()), (54321, 54322));
        drop(fd);
        // A socket in a directory the user owns: switched on a pool thread, same result.
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(54321), Some(54322)).unwrap();
        let path = theirs.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        for i in 0..2 {
            let pooled = pool_jobs();
            let fd = connect(&p, SocketType::STREAM, &path, deadline())
                .await
                .unwrap();
            assert_eq!(pool_jobs(), pooled + 1, "open {i} went to the pool");
            let (srv, _) = listener.accept().unwrap();
            let cred = rustix::net::sockopt::socket_peercred(&srv).unwrap();
            assert_eq!((cred.uid.as_raw(), cred.gid.as_raw()), (54321, 54322));
            drop(fd);
        }
        // The switch ran on this thread (a current-thread runtime), and it is back: ids,
        // groups and capabilities as before.
        assert!(rustix::process::geteuid().is_root());
        assert_eq!(current().unwrap(), before);
    }

    #[test]
    fn only_lookups_nobody_but_root_can_steer_switch_on_the_calling_thread() {
        if !is_root() {
            eprintln!("skipped: needs root to make files of other owners");
            return;
        }
        use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
        let base = current().unwrap();
        // In /run, which only root may write (/tmp is world-writable: nothing below it
        // is trusted).
        let dir = tempfile::tempdir_in("/run").unwrap();
        let d = dir.path();
        assert!(
            !chain_is_trusted(&std::env::temp_dir(), &base),
            "/tmp or the like"
        );
        let bind = |p: &Path| std::os::unix::net::UnixListener::bind(p).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let mkdir = |p: &Path| std::fs::create_dir(p).unwrap();
        // Directories, as the judging thread judges them.
        mode(d, 0o755);
        assert!(chain_is_trusted(d, &base), "root's directory in /run");
        assert!(
            !chain_is_trusted(Path::new("tmp"), &base),
            "a relative path"
        );
        mkdir(&d.join("x"));
        assert!(!chain_is_trusted(&d.join("x/.."), &base), "a path with ..");
        symlink(d, d.join("dirlink")).unwrap();
        assert!(!chain_is_trusted(&d.join("dirlink"), &base), "a symlink");
        assert!(
            !chain_is_trusted(&d.join("missing"), &base),
            "a missing directory"
        );
        let other = d.join("other");
        mkdir(&other);
        chown(&other, Some(54321), Some(54321)).unwrap();
        assert!(!chain_is_trusted(&other, &base), "another user's directory");
        mkdir(&other.join("sub"));
        assert!(
            !chain_is_trusted(&other.join("sub"), &base),
            "below another user's"
        );
        let open = d.join("open");
        mkdir(&open);
        mkdir(&open.join("root"));
        mkdir(&open.join("theirs"));
        lchown(open.join("theirs"), Some(54321), None).unwrap();
        for (m, what) in [(0o777, "world-writable"), (0o775, "group-writable")] {
            mode(&open, m);
            assert!(!chain_is_trusted(&open, &base), "a {what} directory");
            assert!(
                !chain_is_trusted(&open.join("root"), &base),
                "in a {what} one"
            );
        }
        mode(&open, 0o1777);
        assert!(!chain_is_trusted(&open, &base), "a sticky one");
        assert!(
            !chain_is_trusted(&open.join("root"), &base),
            "root's entry in a sticky one"
        );
        mode(&open, 0o755);
        assert!(
            chain_is_trusted(&open.join("root"), &base),
            "the same, not writable"
        );
        assert!(
            !chain_is_trusted(&open.join("theirs"), &base),
            "another user's entry"
        );
        // Only local filesystem types: not /proc, FUSE (0x65735546) or NFS (0x6969).
        assert!(!chain_is_trusted(Path::new("/proc/self"), &base), "/proc");
        assert!(!local_fs(0x6573_5546) && !local_fs(0x6969));
        // The last entry, on the session's thread: only with a fresh verdict on its
        // directory, and only the socket or FIFO the open expects.
        let sock = d.join("s.sock");
        let _l = bind(&sock);
        let fifo = d.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let file = d.join("file");
        std::fs::write(&file, b"").unwrap();
        let link = d.join("link");
        symlink(&sock, &link).unwrap();
        let connect = |p: &Path| Op::connect(SocketType::STREAM, p).unwrap();
        let open_fifo = |p: &Path| Op::open_fifo(p, false).unwrap();
        assert!(
            !switch_here_is_safe(&sock, &connect(&sock)),
            "no verdict yet"
        );
        let verdict = |dir: &Path, ok: bool, at: Instant| {
            verdicts()
                .lock()
                .unwrap()
                .insert(dir.to_path_buf(), (ok, at));
        };
        verdict(d, true, Instant::now());
        assert!(switch_here_is_safe(&sock, &connect(&sock)), "a socket");
        assert!(switch_here_is_safe(&fifo, &open_fifo(&fifo)), "a FIFO");
        assert!(
            !switch_here_is_safe(&fifo, &connect(&fifo)),
            "a FIFO to connect to"
        );
        assert!(
            !switch_here_is_safe(&sock, &open_fifo(&sock)),
            "a socket to open"
        );
        assert!(
            !switch_here_is_safe(&file, &open_fifo(&file)),
            "a regular file"
        );
        assert!(!switch_here_is_safe(&link, &connect(&link)), "a symlink");
        let gone = d.join("gone.sock");
        assert!(
            !switch_here_is_safe(&gone, &connect(&gone)),
            "a missing entry"
        );
        let dotdot = d.join("x/../s.sock");
        assert!(
            !switch_here_is_safe(&dotdot, &connect(&dotdot)),
            "a path with .."
        );
        verdict(d, false, Instant::now());
        assert!(
            !switch_here_is_safe(&sock, &connect(&sock)),
            "a directory found untrusted"
        );
        if let Some(old) = Instant::now().checked_sub(VERDICT_TTL) {
            verdict(d, true, old);
            assert!(
                !switch_here_is_safe(&sock, &connect(&sock)),
                "a stale verdict"
            );
        }
        // A verdict, reached later, replaces an older one; not the reverse.
        verdicts().lock().unwrap().remove(d);
        judge(d, &base);
        assert_eq!(verdicts().lock().unwrap().get(d).map(|v| v.0), Some(true));
    }

    #[tokio::test]
    async fn one_user_holds_at_most_two_pool_threads() {
        let uid = 4_000_000_007;
        let soon = || Instant::now() + Duration::from_millis(100);
        let a = PoolSlot::take(uid, soon()).await.unwrap();
        let _b = PoolSlot::take(uid, soon()).await.unwrap();
        let e = PoolSlot::take(uid, soon())
            .await
            .err()
            .expect("a third waits, in vain");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            PoolSlot::take(uid + 1, soon()).await.is_ok(),
            "another user's does not"
        );
        drop(a);
        assert!(
            PoolSlot::take(uid, soon()).await.is_ok(),
            "a place given back is taken"
        );
    }

    #[test]
    fn a_switch_that_unwinds_is_restored() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_SETUID/CAP_SETGID) to switch credentials");
            return;
        }
        let saved = current().unwrap();
        let t = Target::of(&Principal {
            uid: 54321,
            gid: 54322,
            groups: vec![54323],
            name: "t".into(),
            home: "/".into(),
        });
        let inside = std::cell::Cell::new(None);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_as(&t, &saved, || -> io::Result<()> {
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
