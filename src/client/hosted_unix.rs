//! Hosted forward endpoints on Unix: a stream or seqpacket socket file, or a FIFO; the
//! local caller is identified by SO_PEERCRED.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::{accept_failed, forward_one, session_span, spawn_session, ForwardSettings, Target};
use crate::config::{Direction, ForwardConfig, Mode};
use crate::endpoint::unix::{self, HostedFile};
use crate::endpoint::{fifo, seqpacket, BoxRead, BoxWrite, EndpointSpec, Local, Reader, Writer};
use crate::tunnel::protocol;

/// The local endpoint a forward hosts.
enum Hosted {
    /// A listening stream socket (non-blocking, registered with no reactor yet); callers
    /// are accepted without registering them with the accepting runtime's reactor (see
    /// [`accept_caller`]).
    Stream(std::os::unix::net::UnixListener),
    /// A listening seqpacket socket, likewise.
    Seqpacket(OwnedFd),
    /// A FIFO; `direction` is the remote session's (from our point of view as client).
    Fifo(Direction),
}

/// A local caller of a hosted endpoint (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct LocalCaller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// A running forward.
pub struct Forward {
    hosted: Hosted,
    file: HostedFile,
    settings: Arc<ForwardSettings>,
}

impl Forward {
    /// Binds the forward's local endpoint (fails at start, not at first use).
    pub async fn bind(fwd: ForwardConfig) -> Result<Forward, String> {
        let path: PathBuf = fwd
            .listen
            .hosted_file()
            .ok_or_else(|| format!("cannot host {}", fwd.listen.kind()))?;
        let ctx = |e: &dyn std::fmt::Display| format!("forward {}: {e}", path.display());
        let query = protocol::SessionQuery::parse(fwd.to.query()).map_err(|e| ctx(&e))?;
        let mut extra = Vec::new();
        let hosted = match &fwd.listen {
            EndpointSpec::Seqpacket(_) => {
                unix::prepare_socket_path(&path)
                    .await
                    .map_err(|e| ctx(&e))?;
                if query.mode.is_none() {
                    extra.push("mode=message");
                } else if query.mode != Some(Mode::Message) {
                    return Err(ctx(
                        &"a seqpacket: forward needs a message-mode pipe (mode=message)",
                    ));
                }
                Hosted::Seqpacket(listen_seqpacket(&path).map_err(|e| ctx(&e))?)
            }
            EndpointSpec::Fifo(_) => {
                let dir = match query.direction {
                    Some(d @ (Direction::In | Direction::Out)) => d,
                    _ => {
                        return Err(ctx(
                            &"a fifo: forward is one-way: give ?direction=in (local writers feed the remote pipe) or ?direction=out (the remote pipe feeds local readers) in its URL",
                        ))
                    }
                };
                fifo::create(&path, fwd.socket_mode).map_err(|e| ctx(&e))?;
                Hosted::Fifo(dir)
            }
            _ => {
                unix::prepare_socket_path(&path)
                    .await
                    .map_err(|e| ctx(&e))?;
                // tokio's bind (backlog 1024, non-blocking), out of its reactor again.
                let listener = tokio::net::UnixListener::bind(&path)
                    .and_then(|l| l.into_std())
                    .map_err(|e| ctx(&e))?;
                Hosted::Stream(listener)
            }
        };
        let file = HostedFile::new(&path);
        unix::set_mode(&path, fwd.socket_mode).map_err(|e| ctx(&e))?;
        if fwd.socket_owner.is_some() || fwd.socket_group.is_some() {
            let uid = match &fwd.socket_owner {
                Some(o) => Some(lookup_user(o).map_err(|e| ctx(&format!("socket_owner: {e}")))?),
                None => None,
            };
            let gid = match &fwd.socket_group {
                Some(g) => Some(lookup_group(g).map_err(|e| ctx(&format!("socket_group: {e}")))?),
                None => None,
            };
            std::os::unix::fs::chown(&path, uid.map(|u| u.as_raw()), gid.map(|g| g.as_raw()))
                .map_err(|e| ctx(&format!("chown: {e}")))?;
            unix::set_mode(&path, fwd.socket_mode).map_err(|e| ctx(&e))?;
        }
        Ok(Forward {
            hosted,
            file,
            settings: ForwardSettings::new(fwd, extra),
        })
    }

    /// Its settings, which a reload may replace ([`ForwardSettings::replace`]).
    pub fn settings(&self) -> Arc<ForwardSettings> {
        self.settings.clone()
    }

    /// The hosted file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Accepts local callers until `shutdown`; each becomes a session to `to`. The hosted
    /// file is removed when this returns; live sessions go on.
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let Forward {
            hosted,
            file,
            settings,
        } = self;
        info!(listen = %file.path().display(), to = %settings.get().0.to, "forward ready");
        match hosted {
            Hosted::Stream(listener) => {
                serve_callers(listener, caller_session, shutdown, tracker, settings).await
            }
            Hosted::Seqpacket(listener) => {
                serve_callers(listener, seqpacket_session, shutdown, tracker, settings).await
            }
            Hosted::Fifo(direction) => {
                fifo_loop(file.path(), direction, &settings, &shutdown, &tracker).await
            }
        }
        drop(file);
    }
}

/// A listening seqpacket socket at `path` (non-blocking, close-on-exec, backlog 1024 as
/// a stream forward's), registered with no reactor yet.
fn listen_seqpacket(path: &Path) -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 1024)?;
    Ok(fd)
}

/// Accepts local callers on `listener` until `shutdown` and runs each one's `session`.
///
/// With shards, the first shard accepts (on the listening socket registered with its own
/// reactor) and keeps a caller's session unless another shard is less loaded: no hop
/// through the main runtime's thread per caller, and no hand-off to another thread while
/// this one keeps up. Without, this runtime does both.
async fn serve_callers<L, S, Fut>(
    listener: L,
    session: S,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    settings: Arc<ForwardSettings>,
) where
    L: AsRawFd + AsFd + Send + Sync + 'static,
    S: Fn(OwnedFd, Option<LocalCaller>, Arc<ForwardConfig>, Arc<Target>) -> Fut
        + Copy
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let serve = async move {
        match readiness(listener) {
            Ok(l) => accept_loop(&l, session, &shutdown, &tracker, &settings).await,
            Err(e) => warn!(error = %e, "cannot register the forward's socket"),
        }
    }
    .in_current_span();
    match crate::shard::handles() {
        Some(shards) => {
            let _ = shards[0].spawn(serve).await;
        }
        None => serve.await,
    }
}

/// Registers a listening socket with this runtime's reactor, for readiness only.
#[allow(unsafe_code)]
fn readiness<L: AsRawFd>(l: L) -> std::io::Result<tokio::io::unix::AsyncFd<L>> {
    // SAFETY: the listener owns its descriptor, which stays open and the same until the
    // AsyncFd (which owns the listener) is dropped; nothing else closes or replaces it.
    unsafe { tokio::io::unix::AsyncFd::register(l) }.map_err(std::io::Error::from)
}

/// Accepts local callers on `listener` until `shutdown`; each caller's `session` runs on
/// a shard ([`crate::shard::spawn`]: this one unless another is less loaded), or on
/// this runtime when shards are off.
async fn accept_loop<L, S, Fut>(
    listener: &tokio::io::unix::AsyncFd<L>,
    session: S,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    settings: &ForwardSettings,
) where
    L: AsRawFd + AsFd + Sync,
    S: Fn(OwnedFd, Option<LocalCaller>, Arc<ForwardConfig>, Arc<Target>) -> Fut
        + Copy
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = accept_caller(listener) => r,
        };
        match r {
            Ok((fd, caller)) => {
                let (fwd, target) = settings.get();
                crate::shard::spawn(tracker, fd, move |fd| session(fd, caller, fwd, target));
            }
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Accepts one local caller (non-blocking, close-on-exec) with its SO_PEERCRED, without
/// registering it with a reactor yet (its session does, on the runtime it runs on).
async fn accept_caller<L: AsRawFd + AsFd>(
    listener: &tokio::io::unix::AsyncFd<L>,
) -> std::io::Result<(OwnedFd, Option<LocalCaller>)> {
    use rustix::net::SocketFlags;
    loop {
        let mut guard = listener.readable().await?;
        let accepted = guard.try_io(|l| {
            rustix::net::accept_with(l.get_ref(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
                .map_err(std::io::Error::from)
        });
        if let Ok(r) = accepted {
            let fd = r?;
            let caller = rustix::net::sockopt::socket_peercred(&fd)
                .ok()
                .map(|c| LocalCaller {
                    uid: c.uid.as_raw(),
                    gid: c.gid.as_raw(),
                });
            return Ok((fd, caller));
        }
    }
}

/// The session of an accepted stream caller; registers the caller's socket with the
/// reactor of the runtime it runs on.
fn caller_session(
    fd: OwnedFd,
    caller: Option<LocalCaller>,
    fwd: Arc<ForwardConfig>,
    target: Arc<Target>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let span = session_span(&target, caller.as_ref());
    async move {
        let stream = std::os::unix::net::UnixStream::from(fd);
        let early = read_early(&stream);
        match tokio::net::UnixStream::from_std(stream) {
            Ok(s) => {
                forward_one(stream_local(s), early, caller, &fwd, &target, span).await;
            }
            Err(e) => span.in_scope(|| warn!(error = %e, "cannot register the local caller")),
        }
    }
}

/// The session of an accepted seqpacket caller, whose first record (if already there
/// and at most [`EARLY_BYTES`]) goes out with the session's request, as a stream
/// caller's first bytes do.
fn seqpacket_session(
    fd: OwnedFd,
    caller: Option<LocalCaller>,
    fwd: Arc<ForwardConfig>,
    target: Arc<Target>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let span = session_span(&target, caller.as_ref());
    async move {
        let early = read_early_record(&fd);
        if !early.is_empty() {
            span.in_scope(|| debug!(bytes = early.len(), "first record taken early"));
        }
        let local = tokio_seqpacket::UnixSeqpacket::try_from(fd).and_then(|s| {
            // A caller that closes entirely ends its session at once (`Local::hangup`).
            let hangup = Some(crate::endpoint::Hangup::of(&s));
            seqpacket::local(s, seqpacket::auto_max_message(), true, true)
                .map(|l| Local { hangup, ..l })
        });
        match local {
            Ok(local) => {
                forward_one(local, early, caller, &fwd, &target, span).await;
            }
            Err(e) => {
                span.in_scope(|| warn!(error = %e, "cannot set up the accepted seqpacket socket"))
            }
        }
    }
}

/// A new seqpacket caller's first record, taken without waiting when it is there and
/// fits [`EARLY_BYTES`] (and the session reader's own limit): a peek gives its length
/// first, so a longer one stays whole for the session's reader, which sizes its
/// buffer. Empty otherwise: nothing yet, a zero-length record or EOF (which read
/// alike, and which the session's reader sees again), or an error (likewise).
fn read_early_record(fd: &OwnedFd) -> Bytes {
    use rustix::net::RecvFlags;
    let fits = EARLY_BYTES.min(seqpacket::auto_max_message());
    let peek = RecvFlags::PEEK | RecvFlags::TRUNC | RecvFlags::DONTWAIT;
    match rustix::net::recv(fd, &mut [0u8; 0][..], peek) {
        Ok((_, len)) if len > 0 && len <= fits => {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); EARLY_BYTES];
            match rustix::net::recv(fd, &mut buf, RecvFlags::DONTWAIT) {
                // Whatever came, once consumed, is the caller's first record.
                Ok(((got, _), _)) => Bytes::copy_from_slice(got),
                Err(_) => Bytes::new(),
            }
        }
        _ => Bytes::new(),
    }
}

/// Most data taken from a new caller before its session opens ([`read_early`]).
const EARLY_BYTES: usize = 16 * 1024;

/// What a new caller has already sent (most callers speak first: a request), read
/// without waiting: it goes out with the session's request. Empty when nothing is
/// there yet, at end of stream (which the session's reads see again) or on an error
/// (likewise).
fn read_early(stream: &std::os::unix::net::UnixStream) -> Bytes {
    // Read into memory not zeroed first: a zeroed 16 KiB per session was a memset as
    // long as the rest of the session's set-up copies.
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); EARLY_BYTES];
    match rustix::io::read(stream, &mut buf) {
        Ok((got, _)) => Bytes::copy_from_slice(got),
        Err(_) => Bytes::new(),
    }
}

/// A local caller's stream as a session's local side.
fn stream_local(stream: tokio::net::UnixStream) -> Local {
    // A caller that closes entirely ends its session at once (`Local::hangup`).
    let hangup = Some(crate::endpoint::Hangup::of(&stream));
    let (r, w) = stream.into_split();
    Local {
        reader: Some(Reader::Bytes(Box::new(r) as BoxRead)),
        writer: Some(Writer::Bytes(Box::new(w) as BoxWrite)),
        child: None,
        hangup,
    }
}

/// Pause between two rounds of a hosted `out` FIFO.
const FIFO_ROUND_GAP: Duration = Duration::from_millis(200);
/// Pause after a hosted FIFO's session failed to open, before the next round.
const FIFO_RETRY: Duration = Duration::from_secs(1);

/// A hosted FIFO serves one local writer group (or reader) at a time, sequentially, until
/// `shutdown`. Each round's session runs as a task of its own (tracked by `tracker`), so
/// a stop (a reload that removes or changes the forward, or the gateway's shutdown)
/// ends the waiting for the next round, never a live session.
async fn fifo_loop(
    path: &Path,
    direction: Direction,
    settings: &ForwardSettings,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    // A round's session is a task of its own: stopping here drops only the waiting.
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = fifo_rounds(path, direction, settings, tracker) => {}
    }
}

/// The rounds of [`fifo_loop`], for ever.
async fn fifo_rounds(
    path: &Path,
    direction: Direction,
    settings: &ForwardSettings,
    tracker: &TaskTracker,
) {
    // Local writers of an `in` FIFO always have a reader: this spare (which never reads)
    // from one round's session until the next round's reader is open. Through a session
    // that fails to open and the pause after it, their data waits in the pipe and their
    // writes neither fail (EPIPE) nor end them.
    let mut spare = None;
    loop {
        let local = if direction == Direction::In {
            // Local writers feed the remote pipe: wait for the first writer's data or close.
            let rx = match fifo::open_reader(path) {
                Ok(rx) => {
                    drop(spare.take());
                    rx
                }
                Err(e) => {
                    warn!(error = %e, "cannot open the hosted FIFO");
                    tokio::time::sleep(FIFO_RETRY).await;
                    continue;
                }
            };
            if let Err(e) = rx.readable().await {
                warn!(error = %e, "hosted FIFO failed");
                continue;
            }
            Local {
                reader: Some(Reader::Bytes(Box::new(rx) as BoxRead)),
                writer: None,
                child: None,
                hangup: None,
            }
        } else {
            // The remote pipe feeds local readers: wait for a reader.
            let far = std::time::Instant::now() + Duration::from_secs(365 * 86400);
            match fifo::open_writer(path, far).await {
                Ok(tx) => Local {
                    reader: None,
                    writer: Some(Writer::Bytes(
                        Box::new(fifo::DrainingSender::new(tx)) as BoxWrite
                    )),
                    child: None,
                    hangup: None,
                },
                Err(e) => {
                    warn!(error = %e, "cannot open the hosted FIFO");
                    tokio::time::sleep(FIFO_RETRY).await;
                    continue;
                }
            }
        };
        let (fwd, target) = settings.get();
        if direction == Direction::In {
            spare = fifo::open_reader(path).ok();
        }
        // Its early bytes are not read here: a session that then failed to open would
        // lose them, where unread they stay in the pipe for the next round.
        let opened = spawn_session(tracker, &fwd, &target, local, None)
            .await
            .unwrap_or(false);
        if !opened {
            // The far side is down or refuses: no tight loop of failing rounds.
            tokio::time::sleep(FIFO_RETRY).await;
            continue;
        }
        if direction == Direction::Out {
            // The writer closed after readers drained the pipe; give them a moment to
            // read the EOF before the next round opens a writer again.
            tokio::time::sleep(FIFO_ROUND_GAP).await;
        }
    }
}

/// A user by number or name (the user database): whose a hosted file becomes.
pub fn lookup_user(name: &str) -> Result<nix::unistd::Uid, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(nix::unistd::Uid::from_raw(n));
    }
    nix::unistd::User::from_name(name)
        .map_err(|e| e.to_string())?
        .map(|u| u.uid)
        .ok_or_else(|| format!("no such user {name:?}"))
}

/// A group by number or name (the user database): a hosted file's group.
pub fn lookup_group(name: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    nix::unistd::Group::from_name(name)
        .map_err(|e| e.to_string())?
        .map(|g| g.gid)
        .ok_or_else(|| format!("no such group {name:?}"))
}

impl LocalCaller {
    /// Whether `rules` (`allow_local`: user names, `@group`, `uid:N`) admit this caller;
    /// an error (which admits nothing) when the user database could not be asked
    /// ([`off_the_shard`]). A `uid:` rule is judged at once. The rest are judged by
    /// [`LocalCaller::judge`] from the kept answers if they suffice ([`USER_DB_TTL`]),
    /// else on the blocking pool, asking the user database for what is not kept: all
    /// of one caller's questions within one lookup limit.
    pub async fn admitted(&self, rules: &[String]) -> Result<bool, String> {
        if rules.iter().any(|r| uid_rule(r) == Some(self.uid)) {
            return Ok(true);
        }
        if rules.iter().all(|r| r.starts_with("uid:")) {
            return Ok(false);
        }
        let kept = Lookup::start(false);
        let uid = self.uid;
        if let Some(v) = self.judge(rules, || kept.user(uid), |g| kept.group(g)) {
            return Ok(v);
        }
        let (me, rules) = (*self, rules.to_vec());
        off_the_shard(move || {
            // Kept answers judged by the time now (the turn may have waited); with
            // `ask`, every answer comes: never undecided.
            let ask = kept.asking();
            me.judge(&rules, || ask.user(uid), |g| ask.group(g))
                .unwrap_or(false)
        })
        .await
    }

    /// The caller's user name (for `{user}` in credential paths; `None`: it has none):
    /// kept, or from the user database on the blocking pool ([`off_the_shard`]): NSS may
    /// ask LDAP or sssd, and a slow answer holds this session only, not the other
    /// sessions of the thread it runs on.
    pub async fn name(&self) -> Result<Option<String>, String> {
        let kept = Lookup::start(false);
        let uid = self.uid;
        let user = match kept.user(uid) {
            Some(u) => u,
            None => off_the_shard(move || kept.asking().user(uid).flatten()).await?,
        };
        Ok(user.map(|u| u.name.clone()))
    }

    /// Whether `rules` admit this caller, with `user` (the user its uid names) and
    /// `group` (a group by name) as the user database: `None` from either means the
    /// answer is not at hand, and then so is the verdict, if it needs that answer. The
    /// user is asked first and the name and uid rules judged; then, only if none
    /// admits, the groups, one at a time in rule order until one admits: a group whose
    /// answer is slow holds no caller that an earlier rule admits.
    fn judge(
        &self,
        rules: &[String],
        user: impl FnOnce() -> Option<Answer<UserEntry>>,
        mut group: impl FnMut(&str) -> Option<Answer<GroupEntry>>,
    ) -> Option<bool> {
        let user = user()?;
        let user = user.as_deref();
        let by_name = rules.iter().any(|r| match r.strip_prefix("uid:") {
            Some(_) => uid_rule(r) == Some(self.uid),
            None => !r.starts_with('@') && user.is_some_and(|u| u.name == *r),
        });
        if by_name {
            return Some(true);
        }
        for g in rules.iter().filter_map(|r| r.strip_prefix('@')) {
            let Some(grp) = group(g)? else {
                continue;
            };
            if grp.gid == self.gid
                || user.is_some_and(|u| grp.members.contains(&u.name) || u.gid == grp.gid)
            {
                return Some(true);
            }
        }
        Some(false)
    }
}

/// How long the user database's answers about callers stay good here: the user a uid
/// names (or that it names none), a group's id and members (or that there is no such
/// group), counted from when they were asked. Asking on every session costs two thread
/// hops (the blocking pool) and a read of the databases; callers come back, and their
/// accounts rarely change. So for at most this long a user removed from a group, or
/// renamed, is still judged by the old answer, and a user or member just added is not
/// yet known (name-service caches such as nscd keep answers far longer by default). An
/// accepted reload forgets every answer ([`forget_user_db`]); a lookup that failed is
/// never kept.
const USER_DB_TTL: Duration = Duration::from_secs(10);

/// Most answers kept (uids and group names together); a new one past this drops the
/// stale ones, or all if none is stale.
const USER_DB_MAX: usize = 4096;

/// A user database entry: a user's name and primary group.
#[derive(Debug, PartialEq)]
struct UserEntry {
    name: String,
    gid: u32,
}

/// A group database entry: its id and listed members.
#[derive(Debug, PartialEq)]
struct GroupEntry {
    gid: u32,
    members: Vec<String>,
}

/// An answer of the user database (`None`: no such user or group).
type Answer<T> = Option<Arc<T>>;

/// Where a judge's answers come from: the kept ones, and (if `ask`) the user database
/// (blocking: NSS) for the others, kept if they answered.
#[derive(Clone, Copy)]
struct Lookup {
    /// When the answers were wanted: what freshness is judged by, and the time a new
    /// answer is kept as asked at.
    asked: Instant,
    /// [`UserDb::generation`] at `asked`: a reload since then keeps the new answers out.
    generation: u64,
    ask: bool,
}

impl Lookup {
    fn start(ask: bool) -> Lookup {
        Lookup {
            asked: Instant::now(),
            generation: UserDb::with(|db| db.generation),
            ask,
        }
    }

    /// This lookup, asking the user database now (on the blocking pool), with kept
    /// answers judged by the time now; its generation stays the one it started with.
    fn asking(self) -> Lookup {
        Lookup {
            asked: Instant::now(),
            ask: true,
            ..self
        }
    }

    /// The user `uid` names: kept, else asked if `ask` (a failed lookup is judged as
    /// none, and not kept), else not at hand.
    fn user(&self, uid: u32) -> Option<Answer<UserEntry>> {
        self.answer(
            Question::User(uid),
            |db| db.user(uid, self.asked),
            || {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).map(|u| {
                    u.map(|u| UserEntry {
                        name: u.name,
                        gid: u.gid.as_raw(),
                    })
                })
            },
            |db, e| db.keep_user(uid, e, self.asked, self.generation),
        )
    }

    /// The group `name`, likewise.
    fn group(&self, name: &str) -> Option<Answer<GroupEntry>> {
        self.answer(
            Question::Group(name.to_string()),
            |db| db.group(name, self.asked),
            || {
                nix::unistd::Group::from_name(name).map(|g| {
                    g.map(|g| GroupEntry {
                        gid: g.gid.as_raw(),
                        members: g.mem,
                    })
                })
            },
            |db, e| db.keep_group(name, e, self.asked, self.generation),
        )
    }

    /// The answer `kept` finds if at hand; else, if `ask`, what `query` answers, kept by
    /// `keep` (a failed lookup is judged as none, and not kept); else not at hand.
    /// While one lookup asks `question`, others that want the same answer wait for it
    /// (until the asker's [`LOOKUP_TIMEOUT`] ends, then they are judged unanswered)
    /// instead of asking too: a burst of one user's callers asks the user database
    /// once. If the answer was not kept (the lookup failed, or a reload came in
    /// between), each waiter asks for itself; a question asked longer ago than the limit
    /// is abandoned and asked again.
    fn answer<T>(
        &self,
        question: Question,
        kept: impl Fn(&UserDb) -> Option<Answer<T>>,
        query: impl FnOnce() -> nix::Result<Option<T>>,
        keep: impl FnOnce(&mut UserDb, &Answer<T>),
    ) -> Option<Answer<T>> {
        if !self.ask {
            return UserDb::with(|db| kept(db));
        }
        let turn = UserDb::with(|db| {
            if let Some(k) = kept(db) {
                return Ok(k);
            }
            Err(match db.asking.get(&question) {
                // A question asked longer than the lookup limit ago is abandoned (a hung
                // source): this lookup asks again rather than wait for it.
                Some(f) if f.asked.elapsed() < LOOKUP_TIMEOUT => (f.clone(), false),
                _ => {
                    let f = Arc::new(Flight::new());
                    db.asking.insert(question.clone(), f.clone());
                    (f, true)
                }
            })
        });
        match turn {
            Ok(k) => Some(k),
            Err((flight, true)) => {
                let _landing = Landing { question, flight };
                Some(ask_now(query, keep))
            }
            Err((flight, false)) => {
                tracing::debug!(
                    question = %question,
                    "waiting for the user database's answer another session asked for"
                );
                // At most until the asker's own lookup limit ends: past it, the session
                // that waits here has been refused too, so no answer is wanted any more.
                if !flight.wait_until(flight.asked + LOOKUP_TIMEOUT) {
                    return Some(None);
                }
                Some(UserDb::with(|db| kept(db)).unwrap_or_else(|| ask_now(query, keep)))
            }
        }
    }
}

/// What `query` answers, kept by `keep`; a failed lookup is judged as none, not kept.
fn ask_now<T>(
    query: impl FnOnce() -> nix::Result<Option<T>>,
    keep: impl FnOnce(&mut UserDb, &Answer<T>),
) -> Answer<T> {
    match query() {
        Ok(e) => {
            let e = e.map(Arc::new);
            UserDb::with(|db| keep(db, &e));
            e
        }
        Err(_) => None,
    }
}

/// A question to the user database.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Question {
    /// The user a uid names.
    User(u32),
    /// A group by name.
    Group(String),
}

impl std::fmt::Display for Question {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Question::User(uid) => write!(f, "uid {uid}"),
            Question::Group(name) => write!(f, "group {name}"),
        }
    }
}

/// A question being asked now ([`UserDb::asking`]): it lands when its lookup returns.
struct Flight {
    /// When it was asked.
    asked: Instant,
    landed: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Flight {
    fn new() -> Flight {
        Flight {
            asked: Instant::now(),
            landed: std::sync::Mutex::new(false),
            cv: std::sync::Condvar::new(),
        }
    }

    /// Waits until the question lands, at most until `deadline`; whether it landed.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut landed = self.landed.lock().unwrap_or_else(|e| e.into_inner());
        while !*landed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            landed = match self.cv.wait_timeout(landed, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// The asking of a [`Flight`]: when dropped (the lookup returned, its answer kept or
/// not, or it panicked), the question is no longer being asked and its waiters wake.
struct Landing {
    question: Question,
    flight: Arc<Flight>,
}

impl Drop for Landing {
    fn drop(&mut self) {
        UserDb::with(|db| {
            if db
                .asking
                .get(&self.question)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                db.asking.remove(&self.question);
            }
        });
        *self.flight.landed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.flight.cv.notify_all();
    }
}

/// The user database's answers kept for [`USER_DB_TTL`], gateway-wide.
#[derive(Default)]
struct UserDb {
    users: std::collections::HashMap<u32, (Instant, Answer<UserEntry>)>,
    groups: std::collections::HashMap<String, (Instant, Answer<GroupEntry>)>,
    /// Counts [`forget_user_db`]s: an answer asked before one is not kept after it.
    generation: u64,
    /// The questions being asked now, which others that want the same answer wait for.
    asking: std::collections::HashMap<Question, Arc<Flight>>,
}

static USER_DB: std::sync::Mutex<Option<UserDb>> = std::sync::Mutex::new(None);

impl UserDb {
    fn with<T>(f: impl FnOnce(&mut UserDb) -> T) -> T {
        let mut g = USER_DB.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(UserDb::default))
    }

    /// The answer about `uid` if it was asked less than [`USER_DB_TTL`] before `now`.
    fn user(&self, uid: u32, now: Instant) -> Option<Answer<UserEntry>> {
        fresh_answer(self.users.get(&uid), now)
    }

    /// The answer about group `name`, likewise.
    fn group(&self, name: &str, now: Instant) -> Option<Answer<GroupEntry>> {
        fresh_answer(self.groups.get(name), now)
    }

    /// Keeps `e`, the answer about `uid` asked at `asked`, unless the answers were
    /// forgotten since `generation` was read or a later-asked answer is kept.
    fn keep_user(&mut self, uid: u32, e: &Answer<UserEntry>, asked: Instant, generation: u64) {
        let kept = self.users.get(&uid).map(|(at, _)| *at);
        if self.may_keep(kept, asked, generation) {
            self.users.insert(uid, (asked, e.clone()));
        }
    }

    /// Keeps `e`, the answer about group `name`, likewise.
    fn keep_group(&mut self, name: &str, e: &Answer<GroupEntry>, asked: Instant, generation: u64) {
        let kept = self.groups.get(name).map(|(at, _)| *at);
        if self.may_keep(kept, asked, generation) {
            self.groups.insert(name.to_string(), (asked, e.clone()));
        }
    }

    /// Whether an answer asked at `asked` under `generation` may replace the one kept
    /// (asked at `kept`, if any); if so, with room made for it.
    fn may_keep(&mut self, kept: Option<Instant>, asked: Instant, generation: u64) -> bool {
        let ok = generation == self.generation && kept.is_none_or(|at| at <= asked);
        if ok {
            self.make_room(kept.is_none());
        }
        ok
    }

    /// Makes room for one more answer (if `new`): past [`USER_DB_MAX`], the stale ones
    /// go, and if none was stale, all.
    fn make_room(&mut self, new: bool) {
        if new && self.users.len() + self.groups.len() >= USER_DB_MAX {
            let now = Instant::now();
            self.users.retain(|_, (at, _)| fresh(*at, now));
            self.groups.retain(|_, (at, _)| fresh(*at, now));
            if self.users.len() + self.groups.len() >= USER_DB_MAX {
                self.users.clear();
                self.groups.clear();
            }
        }
    }
}

/// A kept answer (asked at, answer) if it is still good at `now`.
fn fresh_answer<T>(kept: Option<&(Instant, Answer<T>)>, now: Instant) -> Option<Answer<T>> {
    let (at, e) = kept?;
    fresh(*at, now).then(|| e.clone())
}

/// Whether an answer asked at `at` is still good at `now`.
fn fresh(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < USER_DB_TTL
}

/// Forgets every kept user-database answer, and any being asked now (an accepted
/// reload: accounts may have changed with the config).
pub fn forget_user_db() {
    UserDb::with(|db| {
        db.users.clear();
        db.groups.clear();
        // Their answers will not be kept: later lookups ask anew instead of waiting.
        db.asking.clear();
        db.generation += 1;
    });
}

/// The uid an `allow_local` rule `uid:N` names (none for other rules, or a bad number).
fn uid_rule(rule: &str) -> Option<u32> {
    rule.strip_prefix("uid:").and_then(|n| n.parse().ok())
}

/// Most user-database lookups running at once, gateway-wide: a hung NSS source holds at
/// most this many blocking threads, however many callers come.
const MAX_LOOKUPS: usize = 16;
/// How long a session waits for its lookup (its turn, then the answer) before it is
/// refused.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a user-database lookup on the blocking pool, at most [`MAX_LOOKUPS`] at once;
/// an error if it did not answer within [`LOOKUP_TIMEOUT`] (it keeps its thread and its
/// turn until it returns), panicked, or could not run (the runtime is shutting down).
async fn off_the_shard<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);
    let lookup = async {
        let turn = LOOKUPS
            .acquire()
            .await
            .map_err(|_| "the lookup limiter was closed".to_string())?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            f()
        })
        .await
        .map_err(|e| format!("the user-database lookup failed: {e}"))
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the user database did not answer within {} s",
                LOOKUP_TIMEOUT.as_secs()
            ))
        })
}

impl std::fmt::Display for LocalCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {}", self.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    fn send(fd: &OwnedFd, data: &[u8]) {
        let n = rustix::net::send(fd, data, rustix::net::SendFlags::NOSIGNAL).unwrap();
        assert_eq!(n, data.len());
    }

    /// The next record's length and bytes, consumed.
    fn next(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 20];
        let (got, len) =
            rustix::net::recv(fd, &mut buf[..], rustix::net::RecvFlags::TRUNC).unwrap();
        assert!(len <= got, "record of {len} bytes cut");
        buf.truncate(got);
        buf
    }

    fn user(name: &str, gid: u32) -> Answer<UserEntry> {
        Some(Arc::new(UserEntry {
            name: name.into(),
            gid,
        }))
    }

    fn group(gid: u32, members: &[&str]) -> Answer<GroupEntry> {
        Some(Arc::new(GroupEntry {
            gid,
            members: members.iter().map(|m| m.to_string()).collect(),
        }))
    }

    fn rules(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    /// `caller`'s verdict on `rules` with `who` as its user and `groups` as the group
    /// database (a name it lacks is not at hand), and the groups it asked, in order.
    fn judged(
        caller: LocalCaller,
        r: &[&str],
        who: Option<Answer<UserEntry>>,
        groups: &[(&str, Answer<GroupEntry>)],
    ) -> (Option<bool>, Vec<String>) {
        let mut asked = Vec::new();
        let v = caller.judge(
            &rules(r),
            || who,
            |g| {
                asked.push(g.to_string());
                groups.iter().find(|(n, _)| *n == g).map(|(_, e)| e.clone())
            },
        );
        (v, asked)
    }

    #[test]
    fn allow_local_rules_judge_the_user_databases_answers() {
        let groups = [
            ("docker", group(999, &["alice"])),
            ("wheel", group(10, &["bob"])),
            ("users", group(1000, &[])),
            ("gone", None),
        ];
        let c = LocalCaller {
            uid: 1000,
            gid: 1000,
        };
        let alice = Some(user("alice", 1000));
        let v = |r: &[&str]| judged(c, r, alice.clone(), &groups).0;
        assert_eq!(v(&["alice"]), Some(true));
        assert_eq!(v(&["bob"]), Some(false));
        assert_eq!(v(&["@docker"]), Some(true), "a listed member");
        assert_eq!(v(&["@wheel"]), Some(false), "not a member");
        assert_eq!(v(&["@users"]), Some(true), "the caller's gid");
        assert_eq!(v(&["@gone"]), Some(false), "no such group");
        assert_eq!(v(&["bob", "@wheel", "uid:1000"]), Some(true));
        // The caller runs with another gid: its user's primary group still counts.
        let other_gid = LocalCaller { uid: 1000, gid: 5 };
        assert_eq!(
            judged(other_gid, &["@users"], alice.clone(), &groups).0,
            Some(true)
        );
        // A uid without a user: no name matches; a group only by the caller's gid.
        let nameless = Some(None);
        assert_eq!(
            judged(c, &["alice"], nameless.clone(), &groups).0,
            Some(false)
        );
        assert_eq!(
            judged(c, &["@users"], nameless.clone(), &groups).0,
            Some(true)
        );
        assert_eq!(
            judged(other_gid, &["@users"], nameless.clone(), &groups).0,
            Some(false)
        );
        let listed = [("users", group(1000, &["alice"]))];
        assert_eq!(
            judged(other_gid, &["@users"], nameless, &listed).0,
            Some(false),
            "a member list needs a user name to match"
        );
    }

    #[test]
    fn groups_are_asked_only_when_reached_and_only_what_is_needed_must_be_at_hand() {
        let c = LocalCaller {
            uid: 1000,
            gid: 1000,
        };
        let alice = Some(user("alice", 1000));
        let groups = [
            ("docker", group(999, &["alice"])),
            ("wheel", group(10, &[])),
        ];
        // A name or uid rule admits: no group is asked, wherever it stands.
        let (v, asked) = judged(c, &["@wheel", "alice"], alice.clone(), &groups);
        assert_eq!((v, asked.len()), (Some(true), 0));
        // Groups in rule order, until one admits.
        let (v, asked) = judged(c, &["@docker", "@wheel"], alice.clone(), &groups);
        assert_eq!((v, asked), (Some(true), vec!["docker".to_string()]));
        let (v, asked) = judged(c, &["@wheel", "@docker"], alice.clone(), &groups);
        assert_eq!((v, asked.len()), (Some(true), 2));
        // An answer not at hand leaves the verdict open only where it is needed.
        assert_eq!(
            judged(c, &["@slow", "@docker"], alice.clone(), &groups).0,
            None
        );
        assert_eq!(
            judged(c, &["@docker", "@slow"], alice.clone(), &groups).0,
            Some(true)
        );
        assert_eq!(judged(c, &["alice", "@slow"], alice, &groups).0, Some(true));
        assert_eq!(
            judged(c, &["uid:1000"], None, &groups).0,
            None,
            "the user is asked first"
        );
    }

    #[test]
    fn user_database_answers_are_kept_for_the_ttl_from_when_they_were_asked() {
        let t0 = Instant::now();
        let mut db = UserDb::default();
        let carol = user("carol", 77);
        let staff = group(77, &["carol"]);
        assert!(db.user(7, t0).is_none(), "nothing asked yet");
        db.keep_user(7, &carol, t0, 0);
        assert_eq!(db.user(7, t0 + USER_DB_TTL / 2), Some(carol.clone()));
        assert_eq!(db.user(7, t0 + USER_DB_TTL), None, "stale at the TTL");
        // "No such user" is an answer, kept too.
        db.keep_user(8, &None, t0, 0);
        assert_eq!(db.user(8, t0), Some(None));
        // A group's answer ages on its own: asked before the user's, stale before it.
        db.keep_group("staff", &staff, t0, 0);
        db.keep_user(7, &carol, t0 + USER_DB_TTL / 2, 0);
        assert_eq!(db.group("staff", t0), Some(staff.clone()));
        assert!(db.user(7, t0 + USER_DB_TTL).is_some());
        assert_eq!(
            db.group("staff", t0 + USER_DB_TTL),
            None,
            "the group is stale"
        );
        assert_eq!(db.group("other", t0), None, "a group not asked about yet");
        // An answer asked earlier than the kept one (a slow lookup) does not replace it.
        db.keep_user(7, &None, t0, 0);
        assert_eq!(
            db.user(7, t0 + USER_DB_TTL),
            Some(carol),
            "the later answer stays"
        );
    }

    #[test]
    fn an_answer_asked_before_a_reload_is_not_kept_after_it() {
        let t0 = Instant::now();
        let mut db = UserDb::default();
        let before = db.generation;
        db.generation += 1; // forget_user_db while the lookup ran
        db.keep_user(9, &user("dave", 1), t0, before);
        db.keep_group("g", &None, t0, before);
        assert!(db.user(9, t0).is_none() && db.group("g", t0).is_none());
        db.keep_user(9, &user("dave", 1), t0, db.generation);
        assert!(db.user(9, t0).is_some(), "asked after it: kept");
    }

    #[test]
    fn the_kept_answers_are_bounded() {
        let now = Instant::now();
        // Answers asked over twice the TTL ago are stale now.
        let Some(old) = now.checked_sub(USER_DB_TTL * 2) else {
            return; // a clock too young to hold a stale answer; the rest needs one
        };
        let mut db = UserDb::default();
        for uid in 0..USER_DB_MAX as u32 {
            db.keep_user(uid, &None, now, 0);
        }
        // Full: a refreshed answer takes no room; a new one, when all are fresh, starts
        // afresh.
        db.keep_user(0, &None, now, 0);
        assert_eq!(db.users.len(), USER_DB_MAX);
        db.keep_group("g", &None, now, 0);
        assert_eq!((db.users.len(), db.groups.len()), (0, 1));
        // Past the limit with stale answers: only those go.
        db.groups.clear();
        for uid in 0..USER_DB_MAX as u32 - 1 {
            db.keep_user(uid, &None, old, 0);
        }
        db.keep_user(u32::MAX, &None, now, 0);
        assert_eq!(db.users.len(), USER_DB_MAX);
        // (Stamped when it was asked, long ago: staleness is judged by the clock.)
        db.keep_group("g", &None, old, 0);
        assert_eq!(
            (db.users.len(), db.groups.len()),
            (1, 1),
            "only the stale answers went"
        );
    }

    /// The only test that touches the gateway-wide answers (tests run at once).
    #[test]
    fn a_question_is_asked_once_at_a_time_and_forgetting_drops_the_answers() {
        // (The one test of the gateway-wide answers, so that no other test's forgetting
        // runs in between.) While one lookup asks a question, another that wants the
        // same answer waits for it and takes it, not asking.
        let uid = 4_000_200;
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let carol = user("carol", 7);
        let ask = |release: Option<std::sync::mpsc::Receiver<()>>| {
            let look = Lookup::start(true);
            look.answer(
                Question::User(uid),
                |db| db.user(uid, look.asked),
                || {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Some(r) = release {
                        let _ = r.recv_timeout(Duration::from_secs(10));
                    }
                    Ok(Some(UserEntry {
                        name: "carol".into(),
                        gid: 7,
                    }))
                },
                |db, e| db.keep_user(uid, e, look.asked, look.generation),
            )
        };
        let until = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done() {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let flight = || UserDb::with(|db| db.asking.get(&Question::User(uid)).cloned());
        std::thread::scope(|scope| {
            let (release, wait) = std::sync::mpsc::channel();
            let first = scope.spawn(|| ask(Some(wait)));
            until("the first lookup never asked", &|| flight().is_some());
            let second = scope.spawn(|| ask(None));
            // The question's flight is held by the table, the asker and the waiter.
            until("the second lookup never waited", &|| {
                flight().is_some_and(|f| Arc::strong_count(&f) >= 4)
            });
            assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
            release.send(()).unwrap();
            assert_eq!(first.join().unwrap(), Some(carol.clone()));
            assert_eq!(second.join().unwrap(), Some(carol.clone()));
        });
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "asked once for both"
        );
        assert!(flight().is_none(), "the question landed");

        // A question asked longer than the lookup limit ago (a hung source) is abandoned:
        // the next lookup asks again, instead of waiting for it.
        let hung = 4_000_300;
        let stale = Arc::new(Flight {
            asked: Instant::now() - LOOKUP_TIMEOUT - Duration::from_secs(1),
            ..Flight::new()
        });
        UserDb::with(|db| db.asking.insert(Question::User(hung), stale.clone()));
        let look = Lookup::start(true);
        let started = Instant::now();
        let got = look.answer(
            Question::User(hung),
            |db| db.user(hung, look.asked),
            || {
                Ok(Some(UserEntry {
                    name: "dave".into(),
                    gid: 8,
                }))
            },
            |db, e| db.keep_user(hung, e, look.asked, look.generation),
        );
        assert_eq!(got, Some(user("dave", 8)));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "it waited for the hung one"
        );
        assert!(
            UserDb::with(|db| !db.asking.contains_key(&Question::User(hung))),
            "the new question landed, the abandoned one is gone"
        );

        // Forgetting drops the kept answers and moves the generation on.
        let t0 = Instant::now();
        let generation = UserDb::with(|db| {
            db.keep_user(4_000_100, &None, t0, db.generation);
            db.generation
        });
        assert!(UserDb::with(|db| db.user(4_000_100, t0)).is_some());
        forget_user_db();
        assert!(UserDb::with(|db| db.user(4_000_100, t0)).is_none());
        assert_eq!(UserDb::with(|db| db.generation), generation + 1);
    }

    #[test]
    fn an_early_record_is_taken_whole_and_only_when_it_fits() {
        let (caller, gw) = pair();
        // Nothing there yet: nothing taken, nothing waited for.
        assert!(read_early_record(&gw).is_empty());
        // A record that fits is taken whole; the next one stays.
        send(&caller, b"first");
        send(&caller, b"second");
        assert_eq!(&read_early_record(&gw)[..], b"first");
        assert_eq!(next(&gw), b"second");
        // Exactly EARLY_BYTES fits; one byte more stays, whole, for the session's reader.
        let fits = vec![1u8; EARLY_BYTES];
        send(&caller, &fits);
        assert_eq!(read_early_record(&gw).len(), EARLY_BYTES);
        let big = vec![2u8; EARLY_BYTES + 1];
        send(&caller, &big);
        assert!(read_early_record(&gw).is_empty());
        assert_eq!(next(&gw), big);
        // A zero-length record reads like EOF: left for the session's reader too.
        send(&caller, b"");
        assert!(read_early_record(&gw).is_empty());
        assert_eq!(next(&gw), b"");
        drop(caller);
        assert!(read_early_record(&gw).is_empty(), "EOF");
    }
}
