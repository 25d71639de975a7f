//! One function per CLI verb, each returning the process exit code of DESIGN.md
//! (0 ok, 1 runtime failure, 2 usage or config error, 3 refused by the peer).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::bridge::{self, Counters, StopSignal};
use crate::cli::{ConnectArgs, CredentialArgs, ForwardArgs, Framing, LsArgs};
use crate::client::{self, ClientError, CredentialPaths, Dialer, Forward};
use crate::config::secret::Secret;
use crate::config::{self, units, Config, Direction, ForwardConfig, Mode};
use crate::endpoint::message::{MsgReader, MsgWriter};
use crate::endpoint::{BoxRead, BoxWrite, EndpointSpec, Local, Reader, Writer};
use crate::platform::{self, SignalAction};
use crate::server::{self, Gateway};
use crate::tunnel::protocol::Control;
use crate::tunnel::tls;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: runtime failure.
pub const EXIT_RUNTIME: i32 = 1;
/// Exit code: usage or config error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: refused by the peer.
pub const EXIT_REFUSED: i32 = 3;

fn creds(a: &CredentialArgs) -> CredentialPaths {
    CredentialPaths {
        ca: a.ca.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        token_file: a.token_file.clone(),
        token: a.token.clone().filter(|t| !t.is_empty()).map(Secret::new),
        owner: None,
        per_user: [false; 4],
    }
    .discover()
}

fn load_config(path: Option<&Path>) -> Result<Config, i32> {
    let path = path
        .map(Path::to_path_buf)
        .unwrap_or_else(config::default_path);
    Config::load(&path).map_err(|errs| {
        for e in &errs.0 {
            eprintln!("pipebridge: config error: {e}");
        }
        EXIT_USAGE
    })
}

/// `check-config`.
pub fn check_config(path: Option<&Path>) -> i32 {
    match load_config(path) {
        Ok(c) => {
            if let Err(e) = check_tls_files(&c) {
                eprintln!("pipebridge: {e}");
                return EXIT_USAGE;
            }
            println!(
                "{}: OK ({} identities, {} pipes, {} forwards)",
                c.source.display(),
                c.identities.len(),
                c.pipes.len(),
                c.forwards.len()
            );
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// Refuses to start when a message-mode pipe's `max_message_size` cannot be honoured by
/// the kernel (never fail one message at run time instead).
pub fn check_message_limits(cfg: &Config) -> Result<(), String> {
    #[cfg(unix)]
    for p in &cfg.pipes {
        if let (EndpointSpec::Seqpacket(_), config::MessageSize::Bytes(n)) =
            (&p.endpoint, p.max_message_size)
        {
            crate::endpoint::seqpacket::check_limit(n)
                .map_err(|e| format!("pipe {:?}: {e}", p.name))?;
        }
    }
    #[cfg(windows)]
    let _ = cfg; // Windows named pipes set no message limit of their own.
    Ok(())
}

/// Why the server's TLS could not be set up ([`server_tls`]).
pub enum TlsSetupError {
    /// The development PKI could not be generated: local I/O, a runtime failure.
    DevPki(String),
    /// A `[tls]` file did not load (missing, unreadable, not PEM, a key that does not fit
    /// its certificate): a config error, named by file, line and key.
    Files(config::ConfigError),
}

impl std::fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsSetupError::DevPki(e) => write!(f, "dev PKI: {e}"),
            TlsSetupError::Files(e) => write!(f, "config error: {e}"),
        }
    }
}

/// Builds the server TLS config of `cfg` (generating the dev PKI first if configured).
pub fn server_tls(cfg: &Config) -> Result<tls::ServerTls, TlsSetupError> {
    let Some(t) = cfg.tls.as_ref() else {
        return Err(TlsSetupError::Files(config::ConfigError {
            file: cfg.source.clone(),
            line: None,
            key: "tls".into(),
            message: "a [server] needs [tls]".into(),
        }));
    };
    if let Some(dir) = &t.dev_pki {
        match crate::pki::ensure_dev_pki(dir) {
            Ok(true) => info!(dir = %dir.display(), "generated a development PKI"),
            Ok(false) => {}
            Err(e) => return Err(TlsSetupError::DevPki(e.to_string())),
        }
    }
    load_server_tls(cfg, t)
}

/// Loads the `[tls]` files `t` of `cfg` (nothing generated).
fn load_server_tls(cfg: &Config, t: &config::TlsSection) -> Result<tls::ServerTls, TlsSetupError> {
    let tokens = cfg.identities.iter().any(|i| i.token_sha256.is_some());
    tls::server_config(&t.cert, &t.key, t.client_ca.as_deref(), &t.crl, tokens).map_err(|e| {
        TlsSetupError::Files(match e {
            tls::TlsError::File { path, message } => cfg.tls_file_error(Some(&path), message),
            tls::TlsError::Rustls(m) => cfg.tls_file_error(None, m),
        })
    })
}

/// check-config's check of a `[server]`'s `[tls]` files: they load as `serve` would load
/// them (a development PKI that is not whole is not checked: `serve` makes it anew).
fn check_tls_files(cfg: &Config) -> Result<(), TlsSetupError> {
    let (Some(t), Some(_)) = (&cfg.tls, &cfg.server) else {
        return Ok(());
    };
    if let Some(dir) = &t.dev_pki {
        if !crate::pki::dev_pki_complete(dir).unwrap_or(false) {
            return Ok(());
        }
    }
    load_server_tls(cfg, t).map(|_| ())
}

/// Backlog of the gateway's TCP listener: bursts of new sessions must not wait for SYN
/// retransmissions (the default 128 overflowed under load).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (host:port) with a deep accept backlog.
pub async fn bind_tcp(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        match sock.bind(a).and_then(|()| sock.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr}: no address to bind"))))
}

/// `serve`.
pub async fn serve(config_path: Option<&Path>) -> i32 {
    let cfg = match load_config(config_path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    platform::raise_nofile();
    if let Err(e) = check_message_limits(&cfg).and_then(|()| platform::check_capabilities(&cfg)) {
        eprintln!("pipebridge: {e}");
        return EXIT_USAGE;
    }
    // Shard threads only once the config is known to be usable.
    match crate::shard::configured() {
        Ok(n) => {
            if let Err(e) = crate::shard::start(n) {
                eprintln!("pipebridge: cannot start the shard threads: {e}");
                return EXIT_RUNTIME;
            }
        }
        Err(e) => {
            eprintln!("pipebridge: {e}");
            return EXIT_USAGE;
        }
    }
    crate::shard::set_busy_poll(cfg.tuning.busy_poll);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut gateway = None;
    if let Some(srv) = &cfg.server {
        let tls = match server_tls(&cfg) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("pipebridge: {e}");
                return match e {
                    TlsSetupError::DevPki(_) => EXIT_RUNTIME,
                    TlsSetupError::Files(_) => EXIT_USAGE,
                };
            }
        };
        let listener = match bind_tcp(&srv.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pipebridge: cannot listen on {}: {e}", srv.listen);
                return EXIT_RUNTIME;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let gw = Gateway::new(cfg.clone(), tls);
        info!(listen = %addr, pipes = cfg.pipes.len(), "gateway listening");
        // A stable line for scripts and tests that bind port 0.
        eprintln!("pipebridge: listening on {addr}");
        if let Some(p) = cfg.pipes.first() {
            let host = addr.replace("0.0.0.0", "127.0.0.1");
            let mut hint = format!("pipebridge connect wss://{host}/pipes/{}", p.name);
            if cfg.tls.as_ref().is_none_or(|t| t.dev_pki.is_none()) {
                hint.push_str(" --ca CA.pem --cert CLIENT.pem --key CLIENT.key");
            }
            eprintln!(
                "pipebridge: serving {} pipe(s) on {addr}; try: {hint}",
                cfg.pipes.len()
            );
        }
        tracker.spawn(server::run(listener, gw.clone(), shutdown.clone()));
        gateway = Some(gw);
    }
    let mut bound = Vec::new();
    for f in &cfg.forwards {
        match Forward::bind(f.clone()).await {
            Ok(fw) => bound.push(fw),
            Err(e) => {
                eprintln!("pipebridge: {e}");
                return EXIT_RUNTIME;
            }
        }
    }
    let mut forwards = Forwards {
        running: Vec::new(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        retry: (None, RETRY_FIRST),
    };
    for fw in bound {
        forwards.start(fw);
    }
    if cfg.server.is_none() && cfg.forwards.is_empty() {
        eprintln!("pipebridge: the config has neither a [server] nor a [[forward]]: nothing to do");
        return EXIT_USAGE;
    }
    if let Some(adm) = &cfg.admin {
        let listener = match TcpListener::bind(&adm.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("pipebridge: cannot listen on {} (admin): {e}", adm.listen);
                return EXIT_RUNTIME;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let st = Arc::new(crate::admin::AdminState {
            gateway: gateway.clone(),
            ready: std::sync::atomic::AtomicBool::new(true),
        });
        eprintln!("pipebridge: admin on {addr}");
        tracker.spawn(crate::admin::run(listener, st, shutdown.clone()));
    }
    let reloader = Arc::new(Reloader {
        config_path: config_path
            .map(Path::to_path_buf)
            .unwrap_or_else(config::default_path),
        current: std::sync::RwLock::new(cfg.clone()),
        gateway,
        forwards: tokio::sync::Mutex::new(forwards),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    tracker.spawn(watch_files(reloader.clone(), shutdown.clone()));
    crate::sd_notify::ready();
    let code = wait_for_signals(reloader).await;
    shutdown.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    code
}

async fn wait_for_signals(r: Arc<Reloader>) -> i32 {
    let Ok(mut signals) = platform::Signals::new() else {
        error!("cannot install signal handlers");
        return EXIT_RUNTIME;
    };
    loop {
        match signals.recv().await {
            SignalAction::Stop => break,
            SignalAction::Reload => {
                // A task of its own: a reload may wait (for one in progress, for forwards
                // to stop), and neither a stop signal nor another SIGHUP meanwhile may be
                // held up by it or cut it short. Reloads run one at a time, in order.
                let r = r.clone();
                tokio::spawn(async move { reload(&r, Trigger::Signal).await });
            }
        }
    }
    r.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::sd_notify::stopping();
    // The grace period of the config in force (it may have been reloaded).
    let grace = r.current().shutdown.grace_period;
    info!(grace = ?grace, "draining: new sessions are refused");
    if let Some(gw) = &r.gateway {
        let second_stop = async { while signals.recv().await != SignalAction::Stop {} };
        tokio::select! {
            _ = gw.drain(grace) => {}
            _ = second_stop => { warn!("second signal: exiting now"); }
        }
    }
    info!("stopped");
    EXIT_OK
}

/// What a reload changes: the gateway's config and TLS, the running forwards, tuning.
struct Reloader {
    config_path: PathBuf,
    /// The config in force.
    current: std::sync::RwLock<Arc<Config>>,
    gateway: Option<Arc<Gateway>>,
    /// Also serializes reloads (SIGHUP and the file watcher).
    forwards: tokio::sync::Mutex<Forwards>,
    /// Set once a stop signal came: no more reloads.
    stopping: std::sync::atomic::AtomicBool,
}

impl Reloader {
    fn current(&self) -> Arc<Config> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }
}

/// How long a reload waits for a removed or changed forward to stop accepting (and its
/// hosted file to go) before it binds the new one.
const FORWARD_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The running `[[forward]]`s, brought in line with the config at each reload.
struct Forwards {
    running: Vec<RunningForward>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// When forwards that could not be bound are next tried ([`retry_unbound`]; `None`:
    /// at the next tick), and the pause after that try if it fails too.
    retry: (Option<Instant>, Duration),
}

/// The first pause before a forward that could not be bound is tried again; it doubles
/// after each failed try, up to [`RETRY_MAX`], so a socket another live server holds is
/// not probed every second for ever.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between tries of a forward that could not be bound.
const RETRY_MAX: Duration = Duration::from_secs(32);

/// The retry schedule of an unbound forward, for its log lines.
struct RetryNote;

impl std::fmt::Display for RetryNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "after {:?}, then at doubling pauses up to {:?}",
            RETRY_FIRST, RETRY_MAX
        )
    }
}

struct RunningForward {
    /// The settings it runs with.
    settings: Arc<client::ForwardSettings>,
    /// Stops this forward's accepting (its live sessions go on).
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Settings a reload asked for that could not be bound, and why: while the config
    /// asks for the same, later reloads by the file watcher leave this forward alone
    /// (SIGHUP tries them again).
    refused: Option<(ForwardConfig, String)>,
}

impl Forwards {
    fn start(&mut self, fw: Forward) -> &mut RunningForward {
        eprintln!("pipebridge: forwarding {}", fw.path().display());
        let stop = self.shutdown.child_token();
        let settings = fw.settings();
        let task = self
            .tracker
            .spawn(fw.run(stop.clone(), self.tracker.clone()));
        self.running.push(RunningForward {
            settings,
            stop,
            task,
            refused: None,
        });
        self.running.last_mut().expect("just pushed")
    }

    /// Whether a forward runs at `listen`.
    fn runs(&self, listen: &EndpointSpec) -> bool {
        self.running
            .iter()
            .any(|r| r.settings.get().0.listen == *listen)
    }

    /// Brings the running forwards in line with `wanted` (whose endpoints are distinct:
    /// the config checks that), matching them by endpoint. An unchanged forward runs on
    /// untouched. One whose endpoint is bound alike takes its new settings in place for
    /// new callers ([`client::ForwardSettings::replace`]). Any other change stops it and
    /// binds it again with its new settings, or, if those cannot be bound, with its old
    /// ones. A removed one stops. Stopping ends the accepting and removes the hosted file;
    /// live sessions go on. Settings that could not be bound before are tried again only
    /// if `retry_refused`. Returns what could not be bound.
    async fn reconcile(&mut self, wanted: &[ForwardConfig], retry_refused: bool) -> Vec<String> {
        // What this reload cannot bind is tried again a second from now at the earliest.
        self.retry = (Some(Instant::now() + RETRY_FIRST), RETRY_FIRST * 2);
        let mut errors = Vec::new();
        let mut keep = Vec::new();
        let mut stopped = Vec::new();
        for mut r in std::mem::take(&mut self.running) {
            let cfg = r.settings.get().0;
            let Some(w) = wanted.iter().find(|w| w.listen == cfg.listen) else {
                stopped.push(stop_forward(r).await);
                continue;
            };
            if *w == *cfg {
                r.refused = None;
            } else if !retry_refused && r.refused.as_ref().is_some_and(|(f, _)| f == w) {
                let why = r
                    .refused
                    .as_ref()
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default();
                errors.push(format!(
                    "{why} (still; the forward runs with its old settings)"
                ));
            } else if r.settings.replace(w) {
                info!(listen = ?w.listen, to = %w.to, "forward settings replaced by the reload");
                r.refused = None;
            } else {
                stopped.push(stop_forward(r).await);
                continue;
            }
            keep.push(r);
        }
        self.running = keep;
        for cfg in wanted {
            if self.runs(&cfg.listen) {
                continue;
            }
            let old = stopped
                .iter()
                .position(|o| o.listen == cfg.listen)
                .map(|i| stopped.swap_remove(i));
            match Forward::bind(cfg.clone()).await {
                Ok(fw) => {
                    info!(listen = ?cfg.listen, to = %cfg.to, changed = old.is_some(), "forward bound by the reload");
                    self.start(fw);
                }
                Err(e) => {
                    if let Some(old) = old {
                        match Forward::bind((*old).clone()).await {
                            Ok(fw) => {
                                warn!(error = %e, "the changed forward cannot be bound; it goes on with its old settings");
                                self.start(fw).refused = Some((cfg.clone(), e.clone()));
                            }
                            Err(e2) => {
                                error!(error = %e, old_error = %e2, retry = %RetryNote, "the changed forward cannot be bound, nor with its old settings; it is stopped and tried again")
                            }
                        }
                    } else {
                        error!(error = %e, retry = %RetryNote, "the new forward cannot be bound; it is tried again");
                    }
                    errors.push(e);
                }
            }
        }
        for o in stopped {
            info!(listen = ?o.listen, "forward removed by the reload");
        }
        errors
    }

    /// Binds each forward of `wanted` that is not running ([`retry_unbound`]). A failure
    /// is logged at debug level only: the reload that could not bind it said why.
    async fn bind_missing(&mut self, wanted: &[ForwardConfig]) {
        let now = Instant::now();
        if self.retry.0.is_some_and(|at| now < at) {
            return;
        }
        let mut failed = false;
        for cfg in wanted {
            if self.runs(&cfg.listen) {
                continue;
            }
            match Forward::bind(cfg.clone()).await {
                Ok(fw) => {
                    info!(listen = ?cfg.listen, to = %cfg.to, "forward bound on a retry");
                    self.start(fw);
                }
                Err(e) => {
                    debug!(error = %e, "a forward still cannot be bound");
                    failed = true;
                }
            }
        }
        let pause = self.retry.1;
        self.retry = if failed {
            (Some(now + pause), (pause * 2).min(RETRY_MAX))
        } else {
            (None, RETRY_FIRST)
        };
    }
}

/// Stops a forward's accepting and waits (bounded) until its hosted file is gone; returns
/// its settings.
async fn stop_forward(mut r: RunningForward) -> Arc<ForwardConfig> {
    let cfg = r.settings.get().0;
    r.stop.cancel();
    if tokio::time::timeout(FORWARD_STOP_TIMEOUT, &mut r.task)
        .await
        .is_err()
    {
        warn!(listen = ?cfg.listen, "a forward did not stop in time; aborting it");
        r.task.abort();
        let _ = tokio::time::timeout(FORWARD_STOP_TIMEOUT, r.task).await;
    }
    cfg
}

/// How often watched files are checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// A change must be stable this long before it is reloaded (debounce).
const WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

type Fingerprint = Vec<Option<platform::FileStamp>>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| platform::file_stamp(&m)))
        .collect()
}

/// Reloads when the config, certificates, CA, CRLs or token files change.
async fn watch_files(r: Arc<Reloader>, shutdown: CancellationToken) {
    let mut paths = r.current().watched_files();
    let mut last = fingerprint(&paths);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        let now = fingerprint(&paths);
        if now == last {
            // Only while no file changed: a changed config's reload comes first.
            retry_unbound(&r).await;
            continue;
        }
        tokio::time::sleep(WATCH_DEBOUNCE).await;
        if fingerprint(&paths) != now {
            continue; // still changing: look again next round
        }
        info!("a watched file changed; reloading");
        // The files the config being loaded names, as they are before it is: if it is
        // rejected, a change to one of them from now on is seen.
        let named = Config::named_files(&r.config_path);
        let named_before = fingerprint(&named);
        reload(&r, Trigger::FileChange).await;
        // The files as they were before the reload read them: one that changes while it
        // runs is seen as a change at the next tick (a fingerprint taken now would hide
        // it until the next one). Files the new config names first are taken as they are.
        let mut new_paths = r.current().watched_files();
        // A rejected config's files too (a CRL or token file it names before the file
        // exists, say): when one appears or changes, it is tried again. Each as it was
        // before the reload, so one that appeared while the reload ran is a change at
        // the next tick. An accepted config's are the same as its own.
        for p in &named {
            if !new_paths.contains(p) {
                new_paths.push(p.clone());
            }
        }
        let fresh = fingerprint(&new_paths);
        last = new_paths
            .iter()
            .zip(fresh)
            .map(|(p, f)| {
                if let Some(j) = paths.iter().position(|q| q == p) {
                    now[j]
                } else if let Some(k) = named.iter().position(|q| q == p) {
                    named_before[k]
                } else {
                    f
                }
            })
            .collect();
        paths = new_paths;
    }
}

/// Binds the forwards the config asks for that are not running: a reload could not
/// bind them, with their new settings nor their old ones. On Windows that is a named
/// pipe whose settings changed while live sessions held its old instances (a pipe name's
/// first instance can only be created while no other exists); anywhere, a socket path
/// that another live server holds. Runs at each tick of the file watcher, between
/// reloads (a tick that finds one running skips its turn), and tries at growing pauses
/// ([`RETRY_FIRST`] to [`RETRY_MAX`]; a reload starts them over). Settings that fell back
/// to the old ones are not retried here: they run, and SIGHUP retries them.
async fn retry_unbound(r: &Reloader) {
    let Ok(mut forwards) = r.forwards.try_lock() else {
        return;
    };
    // Read under the lock: a reload replaces the config and the forwards together.
    let cfg = r.current();
    if forwards.running.len() >= cfg.forwards.len()
        || r.stopping.load(std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    forwards.bind_missing(&cfg.forwards).await;
}

/// What asked for a reload.
#[derive(Clone, Copy, PartialEq)]
enum Trigger {
    /// SIGHUP: an operator's request, which also retries forward settings that could not
    /// be bound before.
    Signal,
    /// The file watcher.
    FileChange,
}

async fn reload(r: &Reloader, trigger: Trigger) {
    let mut forwards = r.forwards.lock().await;
    if r.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    crate::sd_notify::reloading();
    let ok = match reload_inner(r, &mut forwards, trigger).await {
        Ok((ended, unbound)) if unbound.is_empty() => {
            info!(sessions_ended = ended, "reloaded the config");
            true
        }
        Ok((ended, unbound)) => {
            warn!(sessions_ended = ended, error = %unbound.join("; "), "reloaded the config, but not every forward could be bound");
            false
        }
        Err(e) => {
            warn!(error = %e, "reload rejected; keeping the old config");
            false
        }
    };
    crate::metrics::Metrics::result(&crate::metrics::get().reloads, ok);
    if !r.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        crate::sd_notify::ready();
    }
}

/// Loads and checks the config, then applies it; returns the number of sessions whose
/// access it withdrew and the forwards that could not be bound. Nothing changes unless
/// the whole config validates.
async fn reload_inner(
    r: &Reloader,
    forwards: &mut Forwards,
    trigger: Trigger,
) -> Result<(usize, Vec<String>), String> {
    let new = Config::load(&r.config_path).map_err(|e| e.to_string())?;
    platform::check_capabilities(&new)?;
    check_message_limits(&new)?;
    let tls = match (&r.gateway, &new.server) {
        (Some(_), Some(_)) => Some(server_tls(&new).map_err(|e| e.to_string())?),
        (None, None) => None,
        (Some(_), None) => return Err("the [server] was removed: that takes a restart".into()),
        (None, Some(_)) => return Err("a [server] was added: that takes a restart".into()),
    };
    if new.forwards.is_empty() && new.server.is_none() {
        return Err("the config has neither a [server] nor a [[forward]]".into());
    }
    if let (Some(old), Some(now)) = (&r.current().server, &new.server) {
        if old.listen != now.listen {
            warn!(listen = %old.listen, new_listen = %now.listen, "a new [server] listen address takes a restart; still listening on the old one");
        }
    }
    let admin = |c: &Config| c.admin.as_ref().map(|a| a.listen.clone());
    let (old_admin, new_admin) = (admin(&r.current()), admin(&new));
    if old_admin != new_admin {
        let shown = |a: &Option<String>| a.clone().unwrap_or_else(|| "none".into());
        warn!(admin = %shown(&old_admin), new_admin = %shown(&new_admin), "a changed [admin] listener takes a restart; the admin endpoint stays as it was");
    }
    let new = Arc::new(new);
    crate::shard::set_busy_poll(new.tuning.busy_poll);
    client::forget_user_db();
    let ended = match (&r.gateway, tls) {
        (Some(gw), Some(tls)) => gw.replace(new.clone(), tls),
        _ => 0,
    };
    match r.current.write() {
        Ok(mut c) => *c = new.clone(),
        Err(e) => *e.into_inner() = new.clone(),
    }
    let retry = trigger == Trigger::Signal;
    Ok((ended, forwards.reconcile(&new.forwards, retry).await))
}

fn print_client_error(e: &ClientError) {
    match e {
        ClientError::Refused { .. } => eprintln!("pipebridge: {e}"),
        _ => eprintln!("pipebridge: {e}"),
    }
}

fn build_url_path(url: &hyper::Uri, mode: Option<Mode>, direction: Option<Direction>) -> String {
    let mut q: Vec<String> = url
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| !(mode.is_some() && p.starts_with("mode=")))
        .filter(|p| !(direction.is_some() && p.starts_with("direction=")))
        .map(str::to_string)
        .collect();
    if let Some(m) = mode {
        q.push(format!("mode={m}"));
    }
    if let Some(d) = direction {
        q.push(format!("direction={d}"));
    }
    if q.is_empty() {
        url.path().to_string()
    } else {
        format!("{}?{}", url.path(), q.join("&"))
    }
}

/// Opens a session with `--wait` (busy) and `--retry` (unreachable) handling.
async fn open_with_retries(
    dialer: &Dialer,
    path: &str,
    wait: Option<Duration>,
    retry: u32,
) -> Result<client::Session, ClientError> {
    let started = Instant::now();
    let mut retries_left = retry;
    let mut backoff = Duration::from_millis(200);
    loop {
        match dialer.open(path, client::client_message_limit()).await {
            Ok(s) => return Ok(s),
            Err(e) if e.is_busy() && wait.is_some_and(|w| started.elapsed() < w) => {
                let left = wait.unwrap_or_default().saturating_sub(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100).min(left)).await;
            }
            Err(e) if e.is_unreachable() && retries_left > 0 => {
                retries_left -= 1;
                warn!(error = %e, "gateway unreachable; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `connect`.
pub async fn connect(a: ConnectArgs) -> i32 {
    let url = match client::parse_pipe_url(&a.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("pipebridge: {e}");
            return EXIT_USAGE;
        }
    };
    let mode = match a.mode.as_deref().map(|m| Mode::parse(m).ok_or(m)) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(m)) => {
            eprintln!("pipebridge: --mode must be byte or message, not {m:?}");
            return EXIT_USAGE;
        }
    };
    let direction = match a.direction.as_deref().map(|d| Direction::parse(d).ok_or(d)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(d)) => {
            eprintln!("pipebridge: --direction must be duplex, in or out, not {d:?}");
            return EXIT_USAGE;
        }
    };
    let wait = match a.wait.as_deref().map(units::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            eprintln!("pipebridge: --wait: {e}");
            return EXIT_USAGE;
        }
    };
    let dialer = match Dialer::new(&url, &creds(&a.creds)) {
        Ok(d) => d,
        Err(e) => {
            print_client_error(&e);
            return e.exit_code();
        }
    };
    let path = build_url_path(&url, mode, direction);
    let session = match open_with_retries(&dialer, &path, wait, a.retry).await {
        Ok(s) => s,
        Err(e) => {
            print_client_error(&e);
            return e.exit_code();
        }
    };
    let dir = session.direction.or(direction).unwrap_or(Direction::Duplex);
    let mode = session.mode.or(mode).unwrap_or(Mode::Byte);
    let local = stdio_local(dir, mode, a.framing);
    let counters = Arc::new(Counters::default());
    let progress = (a.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| tokio::spawn(show_progress(counters.clone())));
    let out = bridge::run(
        session.ws,
        local,
        &counters,
        StopSignal::never(),
        bridge::Options {
            idle_timeout: None,
            keepalive: Some((
                config::DEFAULT_KEEPALIVE_INTERVAL,
                config::DEFAULT_KEEPALIVE_TIMEOUT,
            )),
            blind_first: false,
        },
        &tracing::Span::current(),
    )
    .await;
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    match out.exit {
        Some(Control::ExitCode(c)) => return exit_status_byte(c),
        Some(Control::ExitSignal(s)) => return exit_status_byte(128i32.saturating_add(s)),
        _ => {}
    }
    if out.clean {
        return EXIT_OK;
    }
    match &out.peer_error {
        Some((kind, message)) => eprintln!("pipebridge: remote error: {kind}: {message}"),
        None => eprintln!("pipebridge: session ended: {}", out.reason),
    }
    EXIT_RUNTIME
}

/// The exit code `connect` gives for the remote child's code (or 128 + its signal):
/// the system keeps only its low byte, so a code outside 0..=255 is cut to it, and one
/// whose low byte is 0 (256, a Windows status that is a multiple of 256) becomes 1:
/// a failed child never reads as success.
fn exit_status_byte(c: i32) -> i32 {
    if (0..=255).contains(&c) {
        return c;
    }
    match c & 0xff {
        0 => EXIT_RUNTIME,
        low => low,
    }
}

/// Prints bytes each way and the rate on stderr until aborted.
async fn show_progress(c: Arc<Counters>) {
    use std::sync::atomic::Ordering::Relaxed;
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (up, down) = (c.from_local.load(Relaxed), c.to_local.load(Relaxed));
        let secs = start.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r\x1b[Ksent {} B, received {} B, {:.1} MB/s",
            up,
            down,
            (up + down) as f64 / secs / 1e6
        );
    }
}

/// The process's stdin/stdout as a session's local side; in message mode framed as
/// `framing` says.
fn stdio_local(dir: Direction, mode: Mode, framing: Framing) -> Local {
    let stdin = || Box::new(tokio::io::stdin()) as BoxRead;
    let stdout = || Box::new(tokio::io::stdout()) as BoxWrite;
    let max = client::client_message_limit();
    let (reader, writer) = match mode {
        Mode::Byte => (
            dir.client_writes().then(|| Reader::Bytes(stdin())),
            dir.client_reads().then(|| Writer::Bytes(stdout())),
        ),
        Mode::Message => match framing {
            Framing::Lines => (
                dir.client_writes().then(|| {
                    Reader::Messages(MsgReader::Lines {
                        input: tokio::io::BufReader::with_capacity(64 * 1024, stdin()),
                        max,
                    })
                }),
                dir.client_reads()
                    .then(|| Writer::Messages(MsgWriter::Lines(stdout()))),
            ),
            Framing::U32be => (
                dir.client_writes().then(|| {
                    Reader::Messages(MsgReader::U32be {
                        input: stdin(),
                        max,
                    })
                }),
                dir.client_reads()
                    .then(|| Writer::Messages(MsgWriter::U32be(stdout()))),
            ),
        },
    };
    Local {
        reader,
        writer,
        child: None,
        hangup: None,
    }
}

/// `forward`.
pub async fn forward(a: ForwardArgs) -> i32 {
    let listen = match EndpointSpec::parse_hosted(&a.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pipebridge: --listen: {e}");
            return EXIT_USAGE;
        }
    };
    let to = match client::parse_pipe_url(&a.to) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("pipebridge: --to: {e}");
            return EXIT_USAGE;
        }
    };
    let socket_mode = match units::parse_mode(&a.socket_mode) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("pipebridge: --socket-mode: {e}");
            return EXIT_USAGE;
        }
    };
    let fwd = ForwardConfig {
        listen,
        to,
        credentials: creds(&a.creds),
        socket_owner: None,
        socket_group: None,
        socket_mode,
        allow_local: Vec::new(),
        keepalive: (
            config::DEFAULT_KEEPALIVE_INTERVAL,
            config::DEFAULT_KEEPALIVE_TIMEOUT,
        ),
        http2: true,
        max_instances: 255,
        security_descriptor: None,
        npipe_eof: config::NpipeEof::None,
    };
    // Check credentials once up front so typos fail now, not at the first connection.
    if let Err(e) = Dialer::new(&fwd.to, &fwd.credentials) {
        print_client_error(&e);
        return e.exit_code();
    }
    let fw = match Forward::bind(fwd).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pipebridge: {e}");
            return EXIT_RUNTIME;
        }
    };
    eprintln!("pipebridge: forwarding {} to {}", fw.path().display(), a.to);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let run = tracker.spawn(fw.run(shutdown.clone(), tracker.clone()));
    let Ok(mut signals) = platform::Signals::new() else {
        return EXIT_RUNTIME;
    };
    while signals.recv().await != SignalAction::Stop {}
    shutdown.cancel();
    let _ = run.await;
    EXIT_OK
}

/// `ls`.
pub async fn ls(a: LsArgs) -> i32 {
    let url = match client::parse_base_url(&a.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("pipebridge: {e}");
            return EXIT_USAGE;
        }
    };
    let dialer = match Dialer::new(&url, &creds(&a.creds)) {
        Ok(d) => d,
        Err(e) => {
            print_client_error(&e);
            return e.exit_code();
        }
    };
    let (status, body) = match dialer.get("/pipes").await {
        Ok(v) => v,
        Err(e) => {
            print_client_error(&e);
            return e.exit_code();
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let e = client::refusal(status, &body);
        print_client_error(&e);
        return e.exit_code();
    }
    println!("{:<32} {:<10} {:<8} MODE", "NAME", "KIND", "DIRECTION");
    for p in v
        .get("pipes")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        // The gateway's text, printed: made safe first.
        let f = |k: &str| {
            let v = p.get(k).and_then(|x| x.as_str()).unwrap_or("?");
            crate::tunnel::protocol::clean(v).into_owned()
        };
        println!(
            "{:<32} {:<10} {:<8} {}",
            f("name"),
            f("kind"),
            f("direction"),
            f("mode")
        );
    }
    EXIT_OK
}

/// `certs init`.
pub fn certs_init(
    dir: PathBuf,
    server_names: Vec<String>,
    clients: Vec<String>,
    force: bool,
) -> i32 {
    let opts = crate::pki::CertsInit {
        dir,
        server_names,
        clients,
        force,
    };
    match crate::pki::init(&opts) {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("pipebridge: {e}");
            match e {
                crate::pki::PkiError::Exists { .. }
                | crate::pki::PkiError::InvalidClientName { .. }
                | crate::pki::PkiError::InvalidServerName { .. } => EXIT_USAGE,
                _ => EXIT_RUNTIME,
            }
        }
    }
}

/// `token new`.
pub fn token_new(name: &str) -> i32 {
    if !config::valid_name(name) {
        eprintln!("pipebridge: invalid identity name {name:?}");
        return EXIT_USAGE;
    }
    match crate::pki::new_token() {
        Ok(t) => {
            println!("{t}");
            eprintln!(
                "# add to the gateway's config:\n[[identity]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"",
                crate::pki::token_sha256_hex(&t)
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("pipebridge: {e}");
            EXIT_RUNTIME
        }
    }
}

/// `status`: a table of live sessions from the admin endpoint.
pub async fn status(admin: &str) -> i32 {
    let (code, body) = match crate::admin::fetch(admin, "/sessions").await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pipebridge: {e}");
            return EXIT_RUNTIME;
        }
    };
    if !code.is_success() {
        eprintln!("pipebridge: the admin endpoint answered {code}");
        return EXIT_RUNTIME;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let list = v
        .get("sessions")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    println!(
        "{:<6} {:<20} {:<24} {:<9} {:>9} {:>14} {:>14}",
        "ID", "IDENTITY", "PIPE", "DIRECTION", "AGE", "BYTES_IN", "BYTES_OUT"
    );
    for s in &list {
        let f = |k: &str| s.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
        let n = |k: &str| s.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let age = s.get("age_seconds").and_then(|x| x.as_f64()).unwrap_or(0.0);
        println!(
            "{:<6} {:<20} {:<24} {:<9} {:>8.1}s {:>14} {:>14}",
            n("id"),
            f("identity"),
            f("pipe"),
            f("direction"),
            age,
            n("bytes_in"),
            n("bytes_out")
        );
    }
    println!("{} session(s)", list.len());
    EXIT_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_exit_code_is_cut_to_a_byte_and_failure_stays_failure() {
        for (code, want) in [
            (0, 0),
            (1, 1),
            (255, 255),
            (256, EXIT_RUNTIME),
            (257, 1),
            (-1, 255),
            (0x4000_0000, EXIT_RUNTIME),
            (128 + 9, 137),
            (128i32.saturating_add(i32::MAX), 255),
        ] {
            assert_eq!(exit_status_byte(code), want, "{code}");
        }
    }
}
