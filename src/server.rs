//! The exporting side: accept TCP, TLS (with the handshake timeout), HTTP/1.1; route
//! `/pipes` and `/pipes/{name}`; refuse before the upgrade in DESIGN.md's order
//! (400, 426, 401, 403, 409, 503, 502); open the local endpoint; upgrade to WebSocket and
//! hand the session to the bridge. Sessions are tracked in a [`Registry`] for limits,
//! status and drain.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{self, CertNames, Identity};
use crate::bridge::{self, Counters, StopHandle};
use crate::config::{
    Config, Direction, MessageSize, Mode, PipeConfig, MAX_BYTE_MODE_MESSAGE_BYTES,
};
use crate::endpoint::{self, OpenContext};
use crate::error::{Refusal, RefusalKind};
use crate::logfmt::Preformatted;
use crate::tunnel::h2io::InFlight;
use crate::tunnel::readahead::ReadAhead;
use crate::tunnel::{self, protocol};

/// The state one exporting gateway shares between connections.
pub struct Gateway {
    config: RwLock<Arc<Config>>,
    /// The TLS setup in force, and how many reloads replaced it. A connection checked
    /// its client's certificate at the handshake; once a reload has replaced the setup,
    /// its requests check it again ([`Gateway::still_trusted`]): an HTTP/2 connection
    /// carries sessions for as long as it lives.
    tls: RwLock<TlsSetup>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    draining: AtomicBool,
    /// Cancelled when the drain starts: HTTP/2 connections send GOAWAY then (their live
    /// sessions go on), so that idle ones close at once instead of holding the drain's
    /// final wait to its limit.
    drain_started: CancellationToken,
    tracker: TaskTracker,
    auth_failures: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

/// A gateway's TLS acceptor, the client-certificate verifier inside it with a digest
/// of what it trusts (`None`: no client CA, certificates are not accepted), and its
/// generation: 0 at start, one more for each reload that changed what it trusts.
struct TlsSetup {
    acceptor: TlsAcceptor,
    verifier: Option<tunnel::tls::ClientVerifier>,
    generation: u64,
}

impl TlsSetup {
    fn new(tls: tunnel::tls::ServerTls, generation: u64) -> TlsSetup {
        TlsSetup {
            acceptor: TlsAcceptor::from(tls.config),
            verifier: tls.client_verifier,
            generation,
        }
    }

    fn trusts(&self) -> Option<&[u8; 32]> {
        self.verifier.as_ref().map(|v| &v.digest)
    }
}

impl Gateway {
    /// A gateway serving `config` with TLS `tls`.
    pub fn new(config: Arc<Config>, tls: tunnel::tls::ServerTls) -> Arc<Gateway> {
        Arc::new(Gateway {
            config: RwLock::new(config),
            tls: RwLock::new(TlsSetup::new(tls, 0)),
            registry: Arc::new(Registry::default()),
            draining: AtomicBool::new(false),
            drain_started: CancellationToken::new(),
            tracker: TaskTracker::new(),
            auth_failures: Mutex::new(HashMap::new()),
        })
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Swaps in a new config and TLS setup; new connections and sessions see them, live
    /// sessions go on — except those whose access the new config withdraws (identity
    /// removed, certificate revoked, pipe gone or no longer allowed), which end with 1008
    /// `access_withdrawn`. Returns how many sessions were ended.
    pub fn replace(&self, config: Arc<Config>, tls: tunnel::tls::ServerTls) -> usize {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config.clone();
        {
            // When what it trusts changed, every older connection checks its certificate
            // again, once (one chain verification each), with the new verifier.
            let mut t = self.tls.write().unwrap_or_else(|p| p.into_inner());
            let changed = t.trusts() != tls.client_verifier.as_ref().map(|v| &v.digest);
            *t = TlsSetup::new(tls, t.generation + u64::from(changed));
        }
        let mut ended = 0;
        for s in self.registry.snapshot() {
            let cert = s.conn.as_ref().and_then(|c| c.cert.as_ref());
            let reason =
                withdrawn(&config, &s.identity, &s.pipe, cert, s.token.as_ref()).or_else(|| {
                    // Checked with the new TLS setup. A certificate no longer trusted has its
                    // connection asked to close; its live sessions end only if a CRL revoked
                    // it (a CA rotation drops no session).
                    s.conn
                        .as_ref()
                        .is_some_and(|c| self.retire_untrusted(c))
                        .then_some("the client certificate was revoked")
                });
            if let Some(r) = reason {
                info!(id = s.id, identity = %s.identity, pipe = %s.pipe, reason = r, "ending a session: access withdrawn");
                s.stop.stop(protocol::ErrorKind::AccessWithdrawn, r);
                ended += 1;
            }
        }
        ended
    }

    /// Whether the client certificate `conn` presented (if any) still passes the checks
    /// in force: the handshake's, unless a reload changed the client CA or CRLs since or a
    /// certificate of the chain has expired since, in which case the chain is verified
    /// again ([`Gateway::trust_of`]).
    fn still_trusted(&self, conn: &ConnInfo) -> bool {
        self.trust_of(conn) == Trust::Trusted
    }

    /// For a live session at a reload: asks `conn` to close if its certificate is no
    /// longer trusted, and says whether a CRL revoked it.
    fn retire_untrusted(&self, conn: &ConnInfo) -> bool {
        let trust = self.trust_of(conn);
        if trust != Trust::Trusted {
            conn.retire.notify_one();
        }
        trust == Trust::Revoked
    }

    /// [`Gateway::still_trusted`], telling a revoked certificate from one that is
    /// untrusted otherwise (expired, its CA removed, or no client CA any more).
    fn trust_of(&self, conn: &ConnInfo) -> Trust {
        if conn.chain.is_empty() {
            return Trust::Trusted;
        }
        let now = rustls::pki_types::UnixTime::now();
        let secs = now.as_secs();
        let leaf = conn.leaf_expires.unwrap_or(0);
        let trust = self.tls.read().unwrap_or_else(|p| p.into_inner());
        let recheck = if secs > leaf {
            // The client's own certificate is in every path: expired for good.
            Recheck::LeafExpired
        } else if secs > conn.chain_expires {
            // Another certificate it presented has expired, which its verified path
            // may not need: verified again now and then.
            Recheck::Minute(secs / 60)
        } else if trust.generation == conn.trust_generation {
            return Trust::Trusted;
        } else {
            Recheck::Reload
        };
        let key = (trust.generation, recheck);
        let mut checked = conn.trust_checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, verdict)) = *checked {
            if k == key {
                return verdict;
            }
        }
        // An expired certificate is verified as of its expiry, to tell whether a CRL
        // revokes it (a revoked certificate's live sessions end at a reload).
        let at = match recheck {
            Recheck::LeafExpired => {
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(leaf))
            }
            _ => now,
        };
        let verdict = match &trust.verifier {
            None => Trust::Untrusted,
            Some(v) => match v
                .verifier
                .verify_client_cert(&conn.chain[0], &conn.chain[1..], at)
            {
                Ok(_) if recheck == Recheck::LeafExpired => Trust::Untrusted,
                Ok(_) => Trust::Trusted,
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                    Trust::Revoked
                }
                Err(_) => Trust::Untrusted,
            },
        };
        *checked = Some((key, verdict));
        verdict
    }

    /// 429 when `ip` had too many failed authentications within the window.
    fn check_rate(&self, ip: std::net::IpAddr, cfg: &Config) -> Result<(), Refusal> {
        let map = self.auth_failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&ip) {
            Some((n, since))
                if *n >= cfg.limits.max_auth_failures
                    && since.elapsed() < cfg.limits.auth_failure_window =>
            {
                Err(Refusal::new(
                    RefusalKind::RateLimited,
                    "too many failed authentications from this address; try again later",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from `ip`. The table is bounded: expired entries
    /// are dropped when it grows past [`MAX_RATE_ENTRIES`].
    fn auth_failed(&self, ip: std::net::IpAddr, cfg: &Config) {
        let window = cfg.limits.auth_failure_window;
        let mut map = self.auth_failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_RATE_ENTRIES {
            map.retain(|_, (_, since)| since.elapsed() < window);
            if map.len() >= MAX_RATE_ENTRIES {
                // Still full of live entries: forget the oldest half rather than grow.
                let mut ages: Vec<_> = map.iter().map(|(k, (_, t))| (*t, *k)).collect();
                ages.sort();
                for (_, k) in ages.into_iter().take(MAX_RATE_ENTRIES / 2) {
                    map.remove(&k);
                }
            }
        }
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    /// Starts draining: new sessions get 503 `draining`.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.cancel();
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits until no session is live or `grace` passes, then ends the rest with 1001
    /// and waits (bounded) for their tasks.
    pub async fn drain(&self, grace: Duration) {
        self.start_drain();
        let deadline = Instant::now() + grace;
        while !self.registry.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.registry.len();
        if left > 0 {
            info!(
                sessions = left,
                "grace period over; closing the remaining sessions"
            );
            self.registry.stop_all(
                protocol::ErrorKind::Draining,
                "the gateway is shutting down",
            );
        }
        self.tracker.close();
        let _ = tokio::time::timeout(
            bridge::CLOSE_TIMEOUT + Duration::from_secs(1),
            self.tracker.wait(),
        )
        .await;
    }
}

/// Bound on the per-address failed-authentication table.
pub const MAX_RATE_ENTRIES: usize = 65_536;

// === registry ===

/// A live session as status and limits see it.
pub struct SessionEntry {
    /// Registry id.
    pub id: u64,
    /// Peer address, as the audit line writes it.
    pub peer: Preformatted,
    /// Identity name.
    pub identity: String,
    /// Pipe name.
    pub pipe: String,
    /// Session direction.
    pub direction: Direction,
    /// When it started.
    pub started: Instant,
    /// Bytes each way.
    pub counters: Counters,
    /// Its connection, if its client presented a certificate (checked again on reload).
    conn: Option<Arc<ConnInfo>>,
    /// The SHA-256 of the bearer token it presented, if any (never the token): a reload
    /// authenticates the session again with it and the certificate.
    token: Option<[u8; 32]>,
    stop: StopHandle,
    metrics: Arc<crate::metrics::SessionMetrics>,
}

/// Live sessions, with per-pipe and per-identity counts for limits.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct RegistryInner {
    sessions: HashMap<u64, Arc<SessionEntry>>,
    per_pipe: HashMap<String, usize>,
    per_identity: HashMap<String, usize>,
    /// Metric handles by pipe, then identity: one entry per pair ever admitted, as the
    /// metric families themselves keep every label set they were given.
    metrics: HashMap<String, HashMap<String, Arc<crate::metrics::SessionMetrics>>>,
}

/// A slot in the registry; dropping it ends the session's accounting.
pub struct Admission {
    registry: Arc<Registry>,
    /// The session's entry.
    pub entry: Arc<SessionEntry>,
    /// The session ran ([`Admission::started`]): counted in `sessions` and
    /// `session_duration`. One refused after its admission (its endpoint failed, say)
    /// counts as a refusal only.
    started: bool,
}

impl Admission {
    /// Counts the session as started (its transport is up).
    fn started(&mut self) {
        self.started = true;
        self.entry.metrics.started.inc();
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live session count.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the live sessions.
    pub fn snapshot(&self) -> Vec<Arc<SessionEntry>> {
        self.lock().sessions.values().cloned().collect()
    }

    /// Ends every live session with `kind`.
    pub fn stop_all(&self, kind: protocol::ErrorKind, message: &str) {
        for s in self.lock().sessions.values() {
            s.stop.stop(kind, message);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        self: &Arc<Self>,
        cfg: &Config,
        pipe: &PipeConfig,
        identity: &str,
        peer: Preformatted,
        direction: Direction,
        (conn, token): (Option<Arc<ConnInfo>>, Option<[u8; 32]>),
        stop: StopHandle,
    ) -> Result<Admission, Refusal> {
        let mut g = self.lock();
        if g.sessions.len() >= cfg.limits.max_sessions {
            return Err(Refusal::new(
                RefusalKind::Busy,
                "the gateway is at its session limit",
            ));
        }
        if g.per_identity.get(identity).copied().unwrap_or(0)
            >= cfg.limits.max_sessions_per_identity
        {
            return Err(Refusal::new(
                RefusalKind::Busy,
                "this identity is at its session limit",
            ));
        }
        if g.per_pipe.get(&pipe.name).copied().unwrap_or(0) >= pipe.max_instances as usize {
            return Err(Refusal::new(
                RefusalKind::Busy,
                "all pipe instances are busy",
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let metrics = match g.metrics.get(&pipe.name).and_then(|m| m.get(identity)) {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new(crate::metrics::get().session_metrics(&pipe.name, identity));
                g.metrics
                    .entry(pipe.name.clone())
                    .or_default()
                    .insert(identity.to_string(), h.clone());
                h
            }
        };
        metrics.active.inc();
        let entry = Arc::new(SessionEntry {
            id,
            peer,
            identity: identity.to_string(),
            pipe: pipe.name.clone(),
            direction,
            started: Instant::now(),
            counters: Counters::default(),
            conn,
            token,
            stop,
            metrics,
        });
        g.sessions.insert(id, entry.clone());
        *g.per_pipe.entry(pipe.name.clone()).or_default() += 1;
        *g.per_identity.entry(identity.to_string()).or_default() += 1;
        Ok(Admission {
            registry: self.clone(),
            entry,
            started: false,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut guard = self.registry.lock();
        let g = &mut *guard;
        g.sessions.remove(&self.entry.id);
        let m = &self.entry.metrics;
        m.active.dec();
        m.bytes_in
            .inc_by(self.entry.counters.to_local.load(Ordering::Relaxed));
        m.bytes_out
            .inc_by(self.entry.counters.from_local.load(Ordering::Relaxed));
        if self.started {
            m.duration
                .observe(self.entry.started.elapsed().as_secs_f64());
        }
        for (map, key) in [
            (&mut g.per_pipe, &self.entry.pipe),
            (&mut g.per_identity, &self.entry.identity),
        ] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

// === accept loop ===

/// Serves `listener` until `shutdown` is cancelled. Connections already accepted keep
/// running (their sessions end through [`Gateway::drain`]).
pub async fn run(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        {
            let cfg = gw.config();
            tunnel::tls::set_keepalive(&tcp, cfg.keepalive.interval, cfg.keepalive.timeout);
        }
        let gw2 = gw.clone();
        let span = tracing::debug_span!("conn", %peer);
        if !crate::shard::enabled() {
            gw.tracker
                .spawn(async move { connection(tcp, peer, gw2).await }.instrument(span));
            continue;
        }
        // The connection moves to a shard and registers with that shard's reactor.
        match tcp.into_std() {
            Ok(std) => crate::shard::spawn(&gw.tracker, std, move |std| {
                async move {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(tcp) => connection(tcp, peer, gw2).await,
                        Err(e) => warn!(error = %e, "cannot register the connection"),
                    }
                }
                .instrument(span)
            }),
            Err(e) => warn!(error = %e, "cannot hand the connection to a shard"),
        }
    }
}

async fn connection(tcp: tokio::net::TcpStream, peer: SocketAddr, gw: Arc<Gateway>) {
    let cfg = gw.config();
    let started = Instant::now();
    let timeout = cfg.limits.handshake_timeout;
    // The acceptor and its generation, together.
    let (acceptor, trust_generation) = {
        let t = gw.tls.read().unwrap_or_else(|p| p.into_inner());
        (t.acceptor.clone(), t.generation)
    };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(ReadAhead::new(tcp))).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let cert = chain.first().and_then(|c| CertNames::from_der(c.as_ref()));
    // The handshake checked the validity dates at the connection's start; a warm
    // connection, or one that resumes a TLS session, may outlive them.
    let leaf_expires = cert.as_ref().map(|c| c.not_after);
    let chain_expires = chain
        .iter()
        .skip(1)
        .map(|c| auth::not_after(c).unwrap_or(0))
        .chain(leaf_expires)
        .min()
        .unwrap_or(0);
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conn = Arc::new(ConnInfo {
        peer,
        peer_text: Preformatted::of(&peer),
        cert,
        chain,
        leaf_expires,
        chain_expires,
        trust_generation,
        trust_checked: Mutex::new(None),
        retire: tokio::sync::Notify::new(),
        refused_untrusted: std::sync::atomic::AtomicBool::new(false),
        authenticated: std::sync::atomic::AtomicBool::new(false),
        accepted: started,
        upgrade_by: started + timeout,
        busy: busy.clone(),
    });
    let remaining = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        let in_flight = conn.busy.clone();
        tunnel::h2io::batched(serve_h2(tls, conn, gw, remaining), in_flight).await;
        return;
    }
    let gw2 = gw.clone();
    let svc = hyper::service::service_fn(move |req| {
        let gw = gw2.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, conn, gw).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(remaining)
        // (The config holds it at 8 KiB or more; hyper panics below that.)
        .max_buf_size(cfg.limits.max_header_size.max(8192));
    // The connection future ends when a session upgrades (the bridge runs elsewhere),
    // so this bounds only the HTTP phase: requests, refusals and idle keep-alive.
    match tokio::time::timeout(
        remaining,
        builder
            .serve_connection(TokioIo::new(tls), svc)
            .with_upgrades(),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "HTTP connection ended with an error"),
        Err(_) => debug!("HTTP phase exceeded the handshake timeout; closing"),
    }
}

/// HTTP/2: many sessions share this connection (RFC 8441 extended CONNECT), so it lives
/// as long as the peer keeps it; pings detect a dead peer, and a connection with no
/// session for a while is closed (gracefully), so an idle peer cannot hold it forever
/// just by answering pings. Sessions read and write their streams directly
/// ([`tunnel::h2io`]).
async fn serve_h2(
    tls: tokio_rustls::server::TlsStream<ReadAhead<tokio::net::TcpStream>>,
    conn: Arc<ConnInfo>,
    gw: Arc<Gateway>,
    remaining: Duration,
) {
    let cfg = gw.config();
    let mut b = h2::server::Builder::new();
    b.enable_connect_protocol()
        .max_header_list_size(cfg.limits.max_header_size as u32)
        .initial_window_size(tunnel::H2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(tunnel::H2_CONN_WINDOW_BYTES)
        .max_frame_size(tunnel::H2_MAX_FRAME_BYTES)
        .max_concurrent_streams(tunnel::H2_MAX_STREAMS)
        .data_frame_budget(tunnel::H2_DATA_FRAME_BUDGET);
    let mut h2c = match tokio::time::timeout(remaining, b.handshake::<_, Bytes>(tls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!("HTTP/2 handshake timed out");
            return;
        }
    };
    let ka = tunnel::h2io::keepalive(
        h2c.ping_pong(),
        cfg.keepalive.interval,
        cfg.keepalive.timeout,
    );
    let idle_limit = cfg.keepalive.timeout.max(cfg.limits.handshake_timeout);
    let idle = idle_for(&conn.busy, idle_limit);
    let drain = gw.drain_started.clone().cancelled_owned();
    // A connection must authenticate a request within the handshake timeout (else it
    // lived for the idle limit, 90 s by default, on pings alone, credentials or not).
    let handshake = cfg.limits.handshake_timeout;
    let auth_by = tokio::time::sleep(handshake);
    // Once closing (GOAWAY sent), h2 ends the connection when the peer answers the PING
    // that follows it; one that never does is dropped a handshake timeout later, once
    // nothing is in flight on it.
    let close_by = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(ka, idle, drain, auth_by, close_by);
    let mut closing = false;
    let mut close_armed = false;
    loop {
        let mut rearm = false;
        tokio::select! {
            r = h2c.accept() => match r {
                Some(Ok((req, respond))) => {
                    // Counted from here, not from the task's first poll: the close
                    // below must not take an accepted request for none.
                    let busy = InFlight::new(&conn.busy);
                    let (conn, gw2) = (conn.clone(), gw.clone());
                    // Boxed here, once: the session's future is kilobytes, and
                    // moved by value it would be copied whole at each step of the
                    // spawn (the tracker's wrapper, the task's cell).
                    gw.tracker.spawn(Box::pin(
                        async move { handle_h2(req, respond, conn, gw2, busy).await }
                            .in_current_span(),
                    ));
                }
                Some(Err(e)) => {
                    debug!(error = %e, "HTTP/2 connection ended with an error");
                    break;
                }
                None => break,
            },
            _ = &mut ka => {
                debug!("the peer did not answer HTTP/2 pings; closing the connection");
                break;
            }
            _ = &mut idle, if !closing => {
                debug!("closing an HTTP/2 connection idle for {idle_limit:?}");
                h2c.graceful_shutdown();
                closing = true;
            }
            _ = &mut drain, if !closing => {
                debug!("draining: no new sessions on this HTTP/2 connection (GOAWAY)");
                h2c.graceful_shutdown();
                closing = true;
            }
            _ = conn.retire.notified(), if !closing => {
                info!(peer = %conn.peer, "closing an HTTP/2 connection whose client certificate is no longer trusted (its live sessions go on)");
                h2c.graceful_shutdown();
                closing = true;
            }
            _ = &mut auth_by, if !closing && !conn.authenticated.load(Ordering::Acquire) => {
                // Read again: the condition was read when this wait began, and a request
                // accepted just before may have authenticated since (its task runs on
                // this thread, after this loop yields).
                if !conn.authenticated.load(Ordering::Acquire) {
                    debug!("closing an HTTP/2 connection that authenticated no request within {handshake:?}");
                    h2c.graceful_shutdown();
                    closing = true;
                }
            }
            _ = &mut close_by, if close_armed => {
                if conn.busy.load(Ordering::Relaxed) == 0 {
                    // What the last requests queued (a refusal's body, a session's
                    // last frames) goes out first, for at most a second.
                    let flush = std::future::poll_fn(|cx| h2c.poll_closed(cx));
                    let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                    debug!("dropping an HTTP/2 connection that did not close after its GOAWAY");
                    break;
                }
                rearm = true;
            }
        }
        if (closing && !close_armed) || rearm {
            close_armed = true;
            close_by
                .as_mut()
                .reset(tokio::time::Instant::now() + handshake);
        }
    }
}

/// One request on an HTTP/2 connection: a session (extended CONNECT), the pipe list, or
/// a refusal.
async fn handle_h2(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    conn: Arc<ConnInfo>,
    gw: Arc<Gateway>,
    _busy: InFlight,
) {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let (resp, start) = match route(&req, &conn, &gw).await {
        Routed::Reply(r) => (r, None),
        Routed::Session(r, start) => (r, Some(start)),
    };
    let (parts, full) = resp.into_parts();
    let payload = http_body_util::BodyExt::collect(full)
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let empty = payload.is_empty();
    let mut send =
        match respond.send_response(Response::from_parts(parts, ()), empty && start.is_none()) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "could not send the HTTP/2 response");
                return;
            }
        };
    match start {
        Some(start) => {
            start
                .run(tunnel::h2io::H2Stream::new(send, body, None))
                .await
        }
        None if !empty => {
            let _ = send.send_data(payload, true);
        }
        None => {}
    }
}

struct ConnInfo {
    peer: SocketAddr,
    /// `peer` as text, for each session's span and audit line.
    peer_text: Preformatted,
    cert: Option<CertNames>,
    /// The certificate chain the client presented (empty: none).
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The `notAfter` of the client's certificate, the first of `chain` (seconds since
    /// the Unix epoch; `None`: it does not parse, and is not trusted).
    leaf_expires: Option<u64>,
    /// The earliest `notAfter` of all certificates the client presented (an extra one
    /// that its verified path does not need included; one that does not parse counts as
    /// 0). Once past, the chain is verified again ([`Gateway::trust_of`]).
    chain_expires: u64,
    /// The client-certificate trust its handshake checked against.
    trust_generation: u64,
    /// What its certificate was last checked against again (the trust generation, and
    /// [`Recheck`]), and the verdict ([`Gateway::trust_of`]).
    trust_checked: Mutex<Option<((u64, Recheck), Trust)>>,
    /// Notified when its certificate is no longer trusted: an HTTP/2 connection then
    /// takes no new streams (GOAWAY; its live sessions go on).
    retire: tokio::sync::Notify,
    /// A request of it was refused for that ([`untrusted`]).
    refused_untrusted: std::sync::atomic::AtomicBool,
    /// A request of it authenticated ([`authenticate`]): an HTTP/2 connection with none
    /// within the handshake timeout is closed.
    authenticated: std::sync::atomic::AtomicBool,
    accepted: Instant,
    /// When its HTTP/1.1 phase must have ended (accepted + the handshake timeout in force
    /// then), which an open on it must leave time before.
    upgrade_by: Instant,
    /// Requests and sessions in flight on this connection (HTTP/2 idle detection).
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// Completes once `busy` has been zero for `limit` (checked every second).
async fn idle_for(busy: &std::sync::atomic::AtomicUsize, limit: Duration) {
    let mut idle = Duration::ZERO;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if busy.load(Ordering::Relaxed) == 0 {
            idle += Duration::from_secs(1);
            if idle >= limit {
                return;
            }
        } else {
            idle = Duration::ZERO;
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(r: &Refusal, conn: &ConnInfo, path: &str) -> Response<Full<Bytes>> {
    crate::metrics::get().refused(r.kind);
    info!(peer = %conn.peer, status = r.kind.status().as_u16(), kind = %r.kind, path = %crate::tunnel::protocol::clean(&path.chars().take(200).collect::<String>()), "refused");
    json_response(r.kind.status(), r.body())
}

/// What a request gets: a response, or the response that opens a session and what
/// runs it once the transport is upgraded.
enum Routed {
    Reply(Response<Full<Bytes>>),
    Session(Response<Full<Bytes>>, Box<SessionStart>),
}

async fn route<B>(req: &Request<B>, conn: &Arc<ConnInfo>, gw: &Arc<Gateway>) -> Routed {
    let path = req.uri().path();
    let result = if path == "/pipes" || path == "/pipes/" {
        list(req, conn, gw).map(Routed::Reply)
    } else if let Some(name) = path.strip_prefix("/pipes/") {
        session(req, name, conn, gw)
            .await
            .map(|(r, s)| Routed::Session(r, Box::new(s)))
    } else {
        Err(Refusal::new(
            RefusalKind::NotFound,
            "no such path: sessions are at /pipes/{name}",
        ))
    };
    result.unwrap_or_else(|r| Routed::Reply(refuse(&r, conn, path)))
}

/// One request on an HTTP/1.1 connection; a session starts once hyper hands over the
/// upgraded connection.
async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    gw: Arc<Gateway>,
) -> Response<Full<Bytes>> {
    let _busy = InFlight::new(&conn.busy);
    match route(&req, &conn, &gw).await {
        Routed::Reply(r) => r,
        Routed::Session(r, start) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            // Boxed once, as an HTTP/2 session is (handle_h2's spawn).
            gw.tracker.spawn(Box::pin(
                async move {
                    match on_upgrade.await {
                        Ok(u) => start.run(TokioIo::new(u)).await,
                        Err(e) => debug!(error = %e, "upgrade failed"),
                    }
                }
                .in_current_span(),
            ));
            r
        }
    }
}

fn authenticate<B>(
    req: &Request<B>,
    conn: &ConnInfo,
    cfg: &Config,
    gw: &Gateway,
) -> Result<Identity, Refusal> {
    let ip = conn.peer.ip();
    gw.check_rate(ip, cfg)?;
    // Whatever the request presents: a handshake with this certificate would now fail.
    // The connection is asked to close, so that its client's next try is a handshake.
    if !gw.still_trusted(conn) {
        return Err(untrusted(conn, gw, cfg));
    }
    let r = authenticate_inner(req, conn, cfg);
    match &r {
        Ok(_) => conn.authenticated.store(true, Ordering::Release),
        Err(_) => gw.auth_failed(ip, cfg),
    }
    r
}

/// Why `config` no longer lets `identity` use `pipe` (DESIGN's reload rule), if it does
/// not: the identity or the pipe was removed, the pipe no longer allows it, or the
/// session's credentials (its certificate's names, its token's SHA-256) no longer
/// authenticate it as that identity (a rotated token, a certificate mapped elsewhere).
fn withdrawn(
    config: &Config,
    identity: &str,
    pipe: &str,
    cert: Option<&CertNames>,
    token: Option<&[u8; 32]>,
) -> Option<&'static str> {
    let Some(ic) = config.identity(identity) else {
        return Some("the identity was removed");
    };
    if !auth::authenticate_hashed(&config.identities, cert, token).is_ok_and(|i| i.name == identity)
    {
        return Some("its credentials no longer authenticate this identity");
    }
    let id = Identity {
        name: ic.name.clone(),
        groups: ic.groups.clone(),
        method: auth::AuthMethod::Certificate,
    };
    match config.pipe(pipe) {
        None => Some("the pipe was removed"),
        Some(p) if !auth::allowed(&id, p) => Some("the identity may no longer use this pipe"),
        Some(_) => None,
    }
}

/// Why a connection's certificate chain is verified again after its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recheck {
    /// A reload changed the client CA or CRLs.
    Reload,
    /// A certificate the client presented, not its own, has expired (this minute).
    Minute(u64),
    /// The client's certificate has expired.
    LeafExpired,
}

/// What a connection's client certificate is to the TLS setup in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    Trusted,
    /// A CRL revokes it (or a certificate of its chain).
    Revoked,
    /// It does not verify otherwise (expired, its CA removed, or no client CA any more).
    Untrusted,
}

/// The refusal of a request whose connection's certificate is no longer trusted; asks
/// the connection to close. The first such refusal of a connection is not counted as a
/// failed authentication (its certificate was good at the handshake, and a client
/// behind the same address must not be rate-limited for one forward's warm
/// connection); a client that goes on sending requests on it is.
fn untrusted(conn: &ConnInfo, gw: &Gateway, cfg: &Config) -> Refusal {
    conn.retire.notify_one();
    if conn.refused_untrusted.swap(true, Ordering::Relaxed) {
        gw.auth_failed(conn.peer.ip(), cfg);
    }
    Refusal::new(
        RefusalKind::Unauthenticated,
        "the client certificate is no longer trusted (expired, revoked, or its CA removed)",
    )
}

/// The SHA-256 of the request's bearer token, if it has a well-formed one.
fn bearer_hash<B>(req: &Request<B>) -> Option<[u8; 32]> {
    let h = req.headers().get(header::AUTHORIZATION)?;
    auth::bearer(Some(h.as_bytes())).ok()?.map(auth::token_hash)
}

fn authenticate_inner<B>(
    req: &Request<B>,
    conn: &ConnInfo,
    cfg: &Config,
) -> Result<Identity, Refusal> {
    let bearer = auth::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )?;
    auth::authenticate(&cfg.identities, conn.cert.as_ref(), bearer)
}

fn list<B>(
    req: &Request<B>,
    conn: &ConnInfo,
    gw: &Gateway,
) -> Result<Response<Full<Bytes>>, Refusal> {
    if req.method() != Method::GET {
        return Err(Refusal::new(
            RefusalKind::BadRequest,
            "only GET is supported",
        ));
    }
    let cfg = gw.config();
    let id = authenticate(req, conn, &cfg, gw)?;
    let pipes: Vec<_> = cfg
        .pipes
        .iter()
        .filter(|p| auth::allowed(&id, p))
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "kind": p.endpoint.kind(),
                "direction": p.direction.as_str(),
                "mode": p.mode.as_str(),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        serde_json::json!({ "pipes": pipes }).to_string(),
    ))
}

fn header_has_token<B>(req: &Request<B>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The message limit of a session on `pipe`.
pub fn session_message_limit(pipe: &PipeConfig, mode: Mode) -> usize {
    match mode {
        Mode::Byte => MAX_BYTE_MODE_MESSAGE_BYTES,
        Mode::Message => match pipe.max_message_size {
            MessageSize::Auto => endpoint::auto_max_message(),
            MessageSize::Bytes(n) => n,
        },
    }
}

/// What the request-level checks (before authentication) extract from a session request.
#[derive(Debug)]
pub struct Precheck {
    /// `?mode=&direction=`.
    pub query: protocol::SessionQuery,
    /// `Sec-WebSocket-Key` (HTTP/1.1 upgrades; `None` for HTTP/2 extended CONNECT).
    pub key: Option<HeaderValue>,
}

/// The checks of a session request that need no state, in DESIGN.md's order: 400 (name,
/// query, method), 426 (no upgrade), 400 (bad WebSocket headers or subprotocol). Pure;
/// a fuzz target drives it with arbitrary requests.
pub fn precheck<B>(req: &Request<B>, name: &str) -> Result<Precheck, Refusal> {
    // 400: the name is a raw path segment and must be a valid pipe name.
    if !crate::config::valid_name(name) {
        return Err(Refusal::new(
            RefusalKind::BadRequest,
            "invalid pipe name: expected [A-Za-z0-9_-][A-Za-z0-9._-]{0,127}",
        ));
    }
    let query = protocol::SessionQuery::parse(req.uri().query())
        .map_err(|m| Refusal::new(RefusalKind::BadRequest, format!("invalid query: {m}")))?;
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let key = if req.version() == hyper::Version::HTTP_2 {
        // RFC 8441: CONNECT with :protocol = websocket; no Upgrade, no key.
        let is_ws = req.method() == Method::CONNECT
            && req
                .extensions()
                .get::<h2::ext::Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        if !is_ws {
            return Err(Refusal::new(
                RefusalKind::UpgradeRequired,
                "a pipe session needs a WebSocket (extended CONNECT over HTTP/2)",
            ));
        }
        if !version_ok {
            return Err(Refusal::new(
                RefusalKind::BadRequest,
                "a WebSocket needs Sec-WebSocket-Version: 13",
            ));
        }
        None
    } else {
        let is_upgrade = header_has_token(req, header::UPGRADE, "websocket")
            && header_has_token(req, header::CONNECTION, "upgrade");
        if req.method() != Method::GET {
            return Err(Refusal::new(
                RefusalKind::BadRequest,
                "sessions are opened with GET",
            ));
        }
        if !is_upgrade {
            return Err(Refusal::new(
                RefusalKind::UpgradeRequired,
                "a pipe session needs a WebSocket upgrade",
            ));
        }
        let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
        let Some(key) = key.filter(|_| version_ok) else {
            return Err(Refusal::new(
                RefusalKind::BadRequest,
                "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
            ));
        };
        Some(key)
    };
    if !header_has_token(req, header::SEC_WEBSOCKET_PROTOCOL, protocol::SUBPROTOCOL) {
        return Err(Refusal::new(
            RefusalKind::BadRequest,
            format!(
                "the WebSocket subprotocol must be {}",
                protocol::SUBPROTOCOL
            ),
        ));
    }
    Ok(Precheck { query, key })
}

async fn session<B>(
    req: &Request<B>,
    name: &str,
    conn: &Arc<ConnInfo>,
    gw: &Arc<Gateway>,
) -> Result<(Response<Full<Bytes>>, SessionStart), Refusal> {
    let Precheck { query, key } = precheck(req, name)?;
    let cfg = gw.config();
    let identity = authenticate(req, conn, &cfg, gw)?;
    let forbidden = || {
        Refusal::new(
            RefusalKind::Forbidden,
            "not allowed on this pipe, or no such pipe",
        )
    };
    let pipe = cfg.pipe(name).ok_or_else(forbidden)?;
    if !auth::allowed(&identity, pipe) {
        return Err(forbidden());
    }
    let direction = query.direction.unwrap_or(pipe.direction);
    if !pipe.direction.permits(direction) {
        return Err(Refusal::new(
            RefusalKind::Unsupported,
            format!("this pipe offers direction {} only", pipe.direction),
        ));
    }
    let mode = query.mode.unwrap_or(pipe.mode);
    if mode != pipe.mode {
        return Err(Refusal::new(
            RefusalKind::Unsupported,
            format!("this pipe offers {} mode only", pipe.mode),
        ));
    }
    if gw.is_draining() {
        return Err(Refusal::new(
            RefusalKind::Draining,
            "the gateway is shutting down",
        ));
    }
    let principal = cfg
        .identities
        .iter()
        .find(|i| i.name == identity.name)
        .ok_or_else(|| Refusal::new(RefusalKind::Unauthenticated, "unknown identity"))
        .and_then(|ic| {
            crate::identity::session_principal(pipe, ic).map_err(|e| {
                warn!(error = %e, pipe = %pipe.name, "refusing: no account to open the pipe as");
                Refusal::new(
                    RefusalKind::EndpointUnavailable,
                    "this identity has no local account for this pipe",
                )
            })
        })?;
    let (uid, gid) = principal
        .as_ref()
        .map(|p| (p.uid, p.gid))
        .unwrap_or_else(crate::platform::current_ids);
    // What a reload checks the session's credentials with again (never the token).
    let token = bearer_hash(req);
    let (stop, stop_signal) = bridge::stop_pair();
    let admission = gw.registry.admit(
        &cfg,
        pipe,
        &identity.name,
        conn.peer_text.clone(),
        direction,
        ((!conn.chain.is_empty()).then(|| conn.clone()), token),
        stop,
    )?;
    // A reload between the authentication above and the admission did not see this
    // session among the live ones (it replaces the config, then the TLS setup, before it
    // lists them): the session is checked against what that reload put in force here.
    // Without one, the checks above stand.
    let current = gw.config();
    if !Arc::ptr_eq(&current, &cfg) {
        let reason = withdrawn(
            &current,
            &identity.name,
            &pipe.name,
            conn.cert.as_ref(),
            token.as_ref(),
        );
        if let Some(r) = reason {
            info!(identity = %identity.name, pipe = %pipe.name, reason = r, "refusing a session admitted during a reload: access withdrawn");
            return Err(forbidden());
        }
        if !gw.still_trusted(conn) {
            return Err(untrusted(conn, gw, &cfg));
        }
    }
    let span = tracing::info_span!(
        "session",
        id = admission.entry.id,
        peer = %conn.peer_text,
        identity = %identity.name,
        principal = uid,
        pipe = %pipe.name,
        direction = %direction,
    );
    // An open waits at most half the handshake timeout; on HTTP/1.1, whose connection
    // must upgrade within the handshake timeout from its accept, also no later than
    // shortly before that ends (a tenth of it, at most 100 ms), so that a late request's
    // refusal (502) still goes out instead of the connection being dropped.
    let handshake = cfg.limits.handshake_timeout;
    let mut open_within = handshake / 2;
    if req.version() < hyper::Version::HTTP_2 {
        let margin = (handshake / 10).min(Duration::from_millis(100));
        let left = conn.upgrade_by.saturating_duration_since(Instant::now());
        open_within = open_within.min(left.saturating_sub(margin));
    }
    let ctx = OpenContext {
        identity: identity.name.clone(),
        direction,
        timeout: open_within,
        max_message: session_message_limit(pipe, mode),
        principal,
        mode,
    };
    // A reload that withdraws access, or a drain, after the admission stops the session
    // through its registry entry: checked before the open and again after it (the open
    // may wait, for a FIFO's reader say), so a stopped session opens nothing, or closes
    // what it opened, and is refused.
    let stopped = |signal: &bridge::StopSignal| {
        signal.fired().map(|(kind, _)| {
            info!(identity = %identity.name, pipe = %pipe.name, reason = kind.as_str(), "refusing a session stopped while it opened");
            match kind {
                crate::tunnel::protocol::ErrorKind::Draining => {
                    Refusal::new(RefusalKind::Draining, "the gateway is shutting down")
                }
                _ => forbidden(),
            }
        })
    };
    if let Some(r) = stopped(&stop_signal) {
        return Err(r);
    }
    let local = match endpoint::open(pipe, &ctx).instrument(span.clone()).await {
        Ok(l) => l,
        Err(e) => {
            span.in_scope(|| warn!(error = %e.log, "cannot open the local endpoint"));
            return Err(Refusal::new(RefusalKind::EndpointUnavailable, e.public));
        }
    };
    if let Some(r) = stopped(&stop_signal) {
        // (Dropping `local` kills an exec child with its process group.)
        return Err(r);
    }
    let start = SessionStart {
        local,
        max_message: session_message_limit(pipe, mode),
        method: identity.method,
        ids: (uid, gid),
        accepted: conn.accepted,
        busy: InFlight::new(&conn.busy),
        opts: bridge::Options {
            idle_timeout: cfg.limits.idle_timeout,
            keepalive: Some((cfg.keepalive.interval, cfg.keepalive.timeout)),
            blind_first: req
                .headers()
                .get(crate::client::HEADER_EARLY)
                .is_some_and(|v| v.as_bytes() == b"1"),
        },
        stop_signal,
        admission,
        span,
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    match &key {
        Some(key) => {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
                    .map_err(|_| Refusal::new(RefusalKind::BadRequest, "bad Sec-WebSocket-Key"))?,
            );
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        }
        // HTTP/2 extended CONNECT: 200 opens the stream.
        None => *resp.status_mut() = StatusCode::OK,
    }
    let h = resp.headers_mut();
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol::SUBPROTOCOL),
    );
    h.insert(
        crate::client::HEADER_DIRECTION,
        HeaderValue::from_static(direction.as_str()),
    );
    h.insert(
        crate::client::HEADER_MODE,
        HeaderValue::from_static(mode.as_str()),
    );
    Ok((resp, start))
}

/// An accepted session waiting for its transport (the upgraded HTTP/1.1 connection or
/// the HTTP/2 stream).
struct SessionStart {
    local: endpoint::Local,
    max_message: usize,
    method: auth::AuthMethod,
    ids: (u32, u32),
    accepted: Instant,
    busy: InFlight,
    opts: bridge::Options,
    stop_signal: bridge::StopSignal,
    admission: Admission,
    span: tracing::Span,
}

impl SessionStart {
    /// Runs the session over `io` to its end, then writes its audit record.
    async fn run<S: tunnel::ws::Transport>(self, io: S) {
        let SessionStart {
            local,
            max_message,
            method,
            ids,
            accepted,
            busy,
            opts,
            stop_signal,
            mut admission,
            span,
        } = self;
        admission.started();
        let _busy = busy;
        crate::metrics::get()
            .handshake
            .observe(accepted.elapsed().as_secs_f64());
        let ws = tunnel::ws::WebSocket::new(io, Role::Server, max_message);
        let entry = admission.entry.clone();
        span.in_scope(|| debug!("session started"));
        // Not instrumented: the bridge logs in the span itself ([`bridge::run`]).
        let out = bridge::run(ws, local, &entry.counters, stop_signal, opts, &span).await;
        span.in_scope(|| audit(&entry, method.as_str(), ids, &out));
        drop(admission);
    }
}

fn audit(entry: &SessionEntry, method: &str, (uid, gid): (u32, u32), out: &bridge::Outcome) {
    info!(
        target: "pipebridge::audit",
        peer = %entry.peer,
        identity = %entry.identity,
        auth = method,
        uid,
        gid,
        pipe = %entry.pipe,
        direction = %entry.direction,
        bytes_in = entry.counters.to_local.load(Ordering::Relaxed),
        bytes_out = entry.counters.from_local.load(Ordering::Relaxed),
        duration_ms = entry.started.elapsed().as_millis() as u64,
        close_code = out.code,
        close_reason = %out.reason,
        "session end"
    );
}
