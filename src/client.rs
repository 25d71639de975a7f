//! The dialling side: open a session on a remote gateway (TLS, HTTP/1.1 upgrade to
//! WebSocket with the `pipebridge.v1` subprotocol), turn refusals into typed errors,
//! and host forwards (a local socket whose every connection becomes a session).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::bridge::{self, Counters, StopSignal};
use crate::config::secret::Secret;
use crate::config::{Direction, ForwardConfig, Mode, MAX_BYTE_MODE_MESSAGE_BYTES};
use crate::endpoint::Local;
use crate::tunnel::h2io::{H2Stream, InFlight};
use crate::tunnel::readahead::ReadAhead;
use crate::tunnel::ws::{self, WebSocket};
use crate::tunnel::{self, protocol, tls};

/// A WebSocket session to a remote gateway.
pub type WsStream = WebSocket<Carrier>;

/// What a session's WebSocket runs on: an upgraded HTTP/1.1 connection of its own
/// (`Left`, RFC 6455), or one stream of a pooled HTTP/2 connection (`Right`, RFC 8441).
pub type Carrier = tokio_util::either::Either<TokioIo<hyper::upgrade::Upgraded>, H2Stream>;

/// Response header of a 101 naming the session's effective direction.
pub const HEADER_DIRECTION: &str = "pipebridge-direction";
/// Response header of a 101 naming the session's mode.
pub const HEADER_MODE: &str = "pipebridge-mode";
/// Request header of a session whose first binary message goes with the request, before
/// the client knows the session's direction (a forward's early data): a gateway drops
/// that message on a session that carries nothing from the client (`out`), where any
/// other data is `forbidden_direction` (1008).
pub const HEADER_EARLY: &str = "pipebridge-early";

/// An open session and what the gateway said about it.
pub struct Session {
    /// The WebSocket.
    pub ws: WsStream,
    /// The session's direction (from the client's point of view), if the gateway said.
    pub direction: Option<Direction>,
    /// The session's mode, if the gateway said.
    pub mode: Option<Mode>,
}

/// Where the dev PKI lives, relative to the working directory.
pub const DEV_PKI_DIR: &str = ".pipebridge/pki";
/// Bound on TCP connect + TLS + upgrade when dialling.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session's open waits for the gateway's answer on a pooled HTTP/2
/// connection before the connection is pinged ([`pooled_keepalive`]).
const PROBE_AFTER: Duration = Duration::from_secs(1);
/// How long a pooled connection's ping may go unanswered before new sessions stop
/// using it (it stays up for the sessions it carries until the keepalive timeout).
const SUSPECT_AFTER: Duration = Duration::from_secs(3);
/// Largest refusal body read.
const MAX_REFUSAL_BODY_BYTES: usize = 64 * 1024;

/// Credential settings of a client (CLI flags or a `[[forward]]`); paths may hold
/// `{user}`, replaced by the local caller's user name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CredentialPaths {
    /// CA bundle to verify the server (absent: the system trust store).
    pub ca: Option<String>,
    /// Client certificate.
    pub cert: Option<String>,
    /// Client key.
    pub key: Option<String>,
    /// File holding a bearer token.
    pub token_file: Option<String>,
    /// A bearer token given directly (`PIPEBRIDGE_TOKEN`).
    pub token: Option<Secret>,
    /// The uid the files made from paths with `{user}` must belong to: the local
    /// caller (Unix; [`tls::read_credential`]). The others may belong to anyone.
    pub owner: Option<u32>,
    /// Which of `ca`, `cert`, `key`, `token_file` were made from a path with `{user}`.
    pub per_user: [bool; 4],
}

impl CredentialPaths {
    /// The owner the file of `field` (0 `ca`, 1 `cert`, 2 `key`, 3 `token_file`) must
    /// have.
    fn owner_of(&self, field: usize) -> Option<u32> {
        self.owner.filter(|_| self.per_user[field])
    }

    fn any_given(&self) -> bool {
        self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.token_file.is_some()
            || self.token.is_some()
    }

    /// Applies DESIGN.md's discovery: nothing given and a dev PKI in the working
    /// directory → its CA and client `dev`.
    pub fn discover(mut self) -> CredentialPaths {
        if !self.any_given() && Path::new(DEV_PKI_DIR).join("ca.pem").exists() {
            let d = Path::new(DEV_PKI_DIR);
            self.ca = Some(d.join("ca.pem").to_string_lossy().into_owned());
            if d.join("dev.pem").exists() && d.join("dev.key").exists() {
                self.cert = Some(d.join("dev.pem").to_string_lossy().into_owned());
                self.key = Some(d.join("dev.key").to_string_lossy().into_owned());
            }
        }
        self
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway refused with a status and a JSON body.
    #[error("refused: {status} {kind}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `error` kind.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The server rejected our client certificate in the TLS handshake.
    #[error("the server rejected our certificate")]
    CertificateRejected,
    /// Bad usage or unreadable credentials.
    #[error("{0}")]
    Setup(String),
    /// Network, TLS or HTTP failure.
    #[error("{0}")]
    Network(String),
}

impl ClientError {
    /// The process exit code for this error (DESIGN.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Refused {
                status: 401 | 403, ..
            }
            | ClientError::CertificateRejected => 3,
            ClientError::Setup(_) => 2,
            _ => 1,
        }
    }

    /// Whether it is a 503 `busy`.
    pub fn is_busy(&self) -> bool {
        matches!(self, ClientError::Refused { status: 503, kind, .. } if kind == "busy")
    }

    /// Whether the gateway could not be reached (retryable with `--retry`).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Network(_))
    }
}

/// Parses and checks `wss://HOST:PORT/pipes/NAME[?query]`.
pub fn parse_pipe_url(s: &str) -> Result<Uri, String> {
    let u = parse_base_url(s)?;
    let name = u
        .path()
        .strip_prefix("/pipes/")
        .ok_or_else(|| format!("invalid pipe URL {s:?}: the path must be /pipes/NAME"))?;
    if !crate::config::valid_name(name) {
        return Err(format!("invalid pipe URL {s:?}: bad pipe name {name:?}"));
    }
    protocol::SessionQuery::parse(u.query()).map_err(|e| format!("invalid pipe URL {s:?}: {e}"))?;
    Ok(u)
}

/// Parses a `wss://HOST[:PORT][/path]` URL.
pub fn parse_base_url(s: &str) -> Result<Uri, String> {
    let u: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if u.scheme_str() != Some("wss") {
        return Err(format!("invalid URL {s:?}: the scheme must be wss://"));
    }
    if u.host().is_none_or(|h| h.is_empty()) {
        return Err(format!("invalid URL {s:?}: no host"));
    }
    Ok(u)
}

/// A shard's gate for dialling its warm HTTP/2 connection ([`Dialer::open_early`]).
/// The gate, and how many dials made at it failed: the sessions that waited for a dial
/// that failed dial on their own instead of one after another.
type DialGate = Arc<(tokio::sync::Mutex<()>, std::sync::atomic::AtomicU64)>;
/// Each shard's gate (`None`: the main runtime).
type DialGates = Vec<(Option<usize>, DialGate)>;

/// Dials sessions to one gateway with one set of credentials.
#[derive(Clone)]
pub struct Dialer {
    connector: TlsConnector,
    /// Offers h2 and http/1.1 (ALPN), for dialers that pool HTTP/2 connections.
    connector_h2: TlsConnector,
    /// Warm HTTP/2 connections to this gateway with these credentials (shared by clones).
    h2_pool: Arc<std::sync::Mutex<Vec<H2Sender>>>,
    /// One gate per shard: while a session dials the shard's warm connection, the others
    /// of a burst wait for it instead of each dialling (and keeping) one of their own.
    h2_dialing: Arc<std::sync::Mutex<DialGates>>,
    /// The gateway answered the last dial without HTTP/2: sessions dial at once, each its
    /// own HTTP/1.1 connection, without the gate.
    h2_absent: Arc<AtomicBool>,
    /// The gateway (or a TLS-terminating proxy in front of it) spoke HTTP/2 without
    /// WebSocket over HTTP/2 (RFC 8441): this dialer speaks HTTP/1.1 to it from then on.
    h2_no_websocket: Arc<AtomicBool>,
    /// The last HTTP/2 request URI and its path (a forward's sessions all open one):
    /// cloned, where formatting and parsing it was about 6,000 instructions a session.
    last_uri: Arc<std::sync::Mutex<Option<(String, Uri)>>>,
    http2: bool,
    token: Option<Secret>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    keepalive: (Duration, Duration),
}

impl Dialer {
    /// A dialer for the gateway in `url` with `creds` (already discovered/substituted).
    pub fn new(url: &Uri, creds: &CredentialPaths) -> Result<Dialer, ClientError> {
        let host = url
            .host()
            .ok_or_else(|| ClientError::Setup("the URL has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(443);
        let cert_key = match (&creds.cert, &creds.key) {
            (Some(c), Some(k)) => Some((Path::new(c), Path::new(k))),
            (None, None) => None,
            _ => return Err(ClientError::Setup("--cert and --key go together".into())),
        };
        let cfg = tls::client_config(
            creds
                .ca
                .as_deref()
                .map(|p| (Path::new(p), creds.owner_of(0))),
            cert_key.map(|(c, k)| ((c, creds.owner_of(1)), (k, creds.owner_of(2)))),
        )
        .map_err(|e| ClientError::Setup(e.to_string()))?;
        let token = match (&creds.token, &creds.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => {
                let t = tls::read_credential(Path::new(f), creds.owner_of(3)).map_err(|e| {
                    ClientError::Setup(format!("cannot read the token file {f}: {e}"))
                })?;
                let t = String::from_utf8(t)
                    .map_err(|_| ClientError::Setup(format!("the token file {f} is not UTF-8")))?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(ClientError::Setup(format!("the token file {f} is empty")));
                }
                Some(Secret::new(t))
            }
            (None, None) => None,
        };
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| ClientError::Setup(format!("invalid server name {host:?}")))?;
        let mut cfg_h2 = (*cfg).clone();
        cfg_h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Dialer {
            connector: TlsConnector::from(cfg),
            connector_h2: TlsConnector::from(Arc::new(cfg_h2)),
            h2_pool: Arc::default(),
            h2_dialing: Arc::default(),
            h2_absent: Arc::default(),
            h2_no_websocket: Arc::default(),
            last_uri: Arc::default(),
            http2: false,
            token,
            host,
            port,
            server_name,
            keepalive: (
                crate::config::DEFAULT_KEEPALIVE_INTERVAL,
                crate::config::DEFAULT_KEEPALIVE_TIMEOUT,
            ),
        })
    }

    async fn tls(
        &self,
        h2: bool,
    ) -> Result<tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>, ClientError> {
        let tcp = match proxy_for(&self.host) {
            Some(proxy) => {
                let proxy = proxy.map_err(ClientError::Network)?;
                connect_via_proxy(&proxy, &self.host, self.port).await?
            }
            None => TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    ClientError::Network(format!("cannot reach {}:{}: {e}", self.host, self.port))
                })?,
        };
        let _ = tcp.set_nodelay(true);
        tls::set_keepalive(&tcp, self.keepalive.0, self.keepalive.1);
        let connector = if h2 {
            &self.connector_h2
        } else {
            &self.connector
        };
        connector
            .connect(self.server_name.clone(), ReadAhead::new(tcp))
            .await
            .map_err(|e| classify(&e, "TLS handshake failed"))
    }

    /// Runs sessions over pooled HTTP/2 connections (RFC 8441 extended CONNECT) when the
    /// gateway offers h2: a new session then costs one stream, not a TCP and TLS
    /// handshake. Falls back to HTTP/1.1 upgrades when it does not.
    pub fn with_http2(mut self, on: bool) -> Dialer {
        self.http2 = on;
        self
    }

    /// Uses `interval`/`timeout` for dead-peer detection on dialled connections.
    pub fn with_keepalive(mut self, interval: Duration, timeout: Duration) -> Dialer {
        self.keepalive = (interval, timeout);
        self
    }

    /// Sends `req_path` (path and query) as a plain GET and returns status and body.
    pub async fn get(&self, req_path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        tokio::time::timeout(DIAL_TIMEOUT, async {
            let io = TokioIo::new(self.tls(false).await?);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| classify(&e, "HTTP handshake failed"))?;
            let conn_err = spawn_conn(conn);
            let req = self.request(req_path, false)?;
            let resp = send(&mut sender, req, conn_err).await?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_REFUSAL_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Network(format!("reading the response: {e}")))?
                .to_bytes();
            Ok((status, body))
        })
        .await
        .map_err(|_| ClientError::Network("timed out talking to the gateway".into()))?
    }

    fn request(&self, path: &str, upgrade: bool) -> Result<Request<Empty<Bytes>>, ClientError> {
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut b = Request::get(path).header(header::HOST, authority);
        if upgrade {
            b = b
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(
                    header::SEC_WEBSOCKET_KEY,
                    tokio_tungstenite::tungstenite::handshake::client::generate_key(),
                )
                .header(header::SEC_WEBSOCKET_PROTOCOL, protocol::SUBPROTOCOL);
        }
        let mut req = b
            .body(Empty::new())
            .map_err(|e| ClientError::Setup(format!("bad request: {e}")))?;
        if let Some(t) = &self.token {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", t.expose())).map_err(|_| {
                ClientError::Setup("the token holds characters not allowed in a header".into())
            })?;
            v.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        Ok(req)
    }

    /// Opens a session at `path` (path and query); `max_message` bounds incoming messages.
    pub async fn open(&self, path: &str, max_message: usize) -> Result<Session, ClientError> {
        self.open_early(path, max_message, &Bytes::new())
            .await
            .map(|(s, _)| s)
    }

    /// Opens a session like [`Dialer::open`], with `early`: data the local caller already
    /// sent. Over HTTP/2 it goes out as the session's first binary message right behind
    /// the request, without waiting for the gateway's answer: one round trip less
    /// before the first reply. The stream confines it, so a refused session's early
    /// data is discarded with the stream and never read as anything else (unlike an
    /// HTTP/1.1 upgrade, where data sent before the 101 would be read as a request,
    /// RFC 9931: there it is never sent early). Returns whether `early` was sent; if
    /// not, the caller sends it as its first data.
    pub async fn open_early(
        &self,
        path: &str,
        max_message: usize,
        early: &Bytes,
    ) -> Result<(Session, bool), ClientError> {
        let (upgraded, direction, mode) = tokio::time::timeout(DIAL_TIMEOUT, async {
            // A warm connection first.
            if self.wants_h2() {
                if let Some(r) = self.open_pooled(path, early).await {
                    return r;
                }
            }
            // Boxed: dialling (TLS, HTTP/2 or HTTP/1.1 handshakes) is the rare path, and
            // inline it would make every forwarded session's state as big as its own.
            Box::pin(self.dial(path, early)).await
        })
        .await
        .map_err(|_| ClientError::Network("timed out opening the session".into()))??;
        let sent = matches!(upgraded, Carrier::Right(_)) && !early.is_empty();
        let ws = WebSocket::new(upgraded, Role::Client, max_message);
        Ok((
            Session {
                ws,
                direction,
                mode,
            },
            sent,
        ))
    }

    /// Whether sessions go over HTTP/2: asked for, and not found unable to carry them.
    fn wants_h2(&self) -> bool {
        self.http2 && !self.h2_no_websocket.load(Ordering::Relaxed)
    }

    /// A session on a new connection: HTTP/2 (then pooled) if the gateway offers it,
    /// else HTTP/1.1.
    async fn dial(
        &self,
        path: &str,
        early: &Bytes,
    ) -> Result<(Carrier, Option<Direction>, Option<Mode>), ClientError> {
        let http2 = self.wants_h2();
        // A dialer without HTTP/2 has no pooled connection to share: no gate.
        let dial_gate = http2.then(|| self.dial_gate());
        let mut gate = None;
        let failed = || {
            if let Some(g) = &dial_gate {
                g.1.fetch_add(1, Ordering::Relaxed);
            }
        };
        // No warm connection on this shard: one session of a burst dials it, the others
        // wait and then take it. The gate is held for the dial only, never while a
        // session waits for the gateway's answer. A connection that fails the session
        // that waited for it (a GOAWAY as the burst lands) sends it back to the gate
        // once, for the next dial.
        for _ in 0..2 {
            let Some(dial_gate) = &dial_gate else { break };
            if self.h2_absent.load(Ordering::Relaxed) {
                break;
            }
            let failures = dial_gate.1.load(Ordering::Relaxed);
            let held = dial_gate.0.lock().await;
            if let Some(sender) = self.pooled_h2() {
                drop(held);
                if let Some(r) = self.open_on(sender, path, early).await {
                    return r;
                }
                continue;
            }
            if !self.h2_absent.load(Ordering::Relaxed)
                && dial_gate.1.load(Ordering::Relaxed) == failures
            {
                gate = Some(held);
            }
            // Else the dial it waited for failed or found no HTTP/2: it dials on its own
            // (a burst against a failing gateway fails at once, not one dial after another).
            break;
        }
        // The connection waited for may have shown that HTTP/2 cannot carry sessions:
        // then nothing this dial makes is for the pool, and the gate is not held.
        let http2 = http2 && self.wants_h2();
        if !http2 {
            gate = None;
        }
        let tls = match self.tls(http2).await {
            Ok(t) => t,
            Err(e) => {
                if gate.is_some() {
                    failed();
                }
                return Err(e);
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        if http2 {
            self.h2_absent.store(!h2, Ordering::Relaxed);
        }
        if h2 {
            let sender = match self.new_h2(tls).await {
                Ok(s) => s,
                Err(e) => {
                    if gate.is_some() {
                        failed();
                    }
                    return Err(e);
                }
            };
            // A connection the gateway closed at once (draining, overloaded) is a failed
            // dial too; its request below reports why.
            if gate.is_some() && !sender.alive.load(Ordering::Acquire) {
                failed();
            }
            // Pooled and ready: the sessions waiting at the gate take it.
            drop(gate);
            return match self.open_h2(sender, path, early).await {
                Ok(v) => Ok(v),
                // This session again, over HTTP/1.1 (nothing of it was sent).
                Err(H2Error::Connection(_)) if !self.wants_h2() => {
                    let tls = self.tls(false).await?;
                    self.open_h1(tls, path).await
                }
                Err(H2Error::Connection(e) | H2Error::Session(e)) => Err(e),
            };
        }
        drop(gate);
        self.open_h1(tls, path).await
    }

    /// A session on the new connection `tls` by an HTTP/1.1 upgrade.
    async fn open_h1(
        &self,
        tls: tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>,
        path: &str,
    ) -> Result<(Carrier, Option<Direction>, Option<Mode>), ClientError> {
        let io = TokioIo::new(tls);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| classify(&e, "HTTP handshake failed"))?;
        let conn_err = spawn_conn(async move { conn.with_upgrades().await });
        let req = self.request(path, true)?;
        let resp = send(&mut sender, req, conn_err).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(read_refusal(resp).await);
        }
        let (direction, mode) = session_headers(&resp)?;
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Network(format!("upgrade failed: {e}")))?;
        Ok((Carrier::Left(TokioIo::new(up)), direction, mode))
    }

    /// A session on this shard's warm HTTP/2 connection, if it has one that works (one
    /// that turns out dead is dropped from the pool).
    async fn open_pooled(
        &self,
        path: &str,
        early: &Bytes,
    ) -> Option<Result<(Carrier, Option<Direction>, Option<Mode>), ClientError>> {
        let sender = self.pooled_h2()?;
        self.open_on(sender, path, early).await
    }

    /// A session on the pooled connection `sender`; `None` if the connection turned out
    /// dead (it is dropped from the pool).
    async fn open_on(
        &self,
        sender: H2Sender,
        path: &str,
        early: &Bytes,
    ) -> Option<Result<(Carrier, Option<Direction>, Option<Mode>), ClientError>> {
        let failed = sender.alive.clone();
        match self.open_h2(sender, path, early).await {
            Err(H2Error::Connection(e)) => {
                debug!(error = %e, "pooled HTTP/2 connection failed; dropping it");
                if let Ok(mut pool) = self.h2_pool.lock() {
                    pool.retain(|s| !Arc::ptr_eq(&s.alive, &failed));
                }
                None
            }
            Err(H2Error::Session(e)) => Some(Err(e)),
            Ok(v) => Some(Ok(v)),
        }
    }

    /// The gate of this shard's dialling ([`Dialer::open_early`]).
    fn dial_gate(&self) -> DialGate {
        let shard = crate::shard::current();
        let mut gates = self
            .h2_dialing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, g)) = gates.iter().find(|(s, _)| *s == shard) {
            return g.clone();
        }
        let g: DialGate = Arc::default();
        gates.push((shard, g.clone()));
        g
    }

    /// A pooled HTTP/2 connection to use, or `None` when the pool should grow.
    fn pooled_h2(&self) -> Option<H2Sender> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let shard = crate::shard::current();
        let mut pool = self.h2_pool.lock().ok()?;
        pool.retain(|s| s.alive.load(Ordering::Acquire));
        let mine = pool.iter().filter(|s| s.shard == shard).count();
        if mine < h2_pool_connections(shard) {
            return None;
        }
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % mine;
        pool.iter().filter(|s| s.shard == shard).nth(i).cloned()
    }

    async fn new_h2(
        &self,
        tls: tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>,
    ) -> Result<H2Sender, ClientError> {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(tunnel::H2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(tunnel::H2_CONN_WINDOW_BYTES)
            .max_frame_size(tunnel::H2_MAX_FRAME_BYTES)
            .data_frame_budget(tunnel::H2_DATA_FRAME_BUDGET)
            .enable_push(false);
        let (send, mut conn) = b
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| classify(&e, "HTTP/2 handshake failed"))?;
        let alive = Arc::new(AtomicBool::new(true));
        let mut ping = conn.ping_pong();
        let keepalive = self.keepalive;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let still = alive.clone();
        let probe = Arc::new(tokio::sync::Notify::new());
        let probed = probe.clone();
        let gateway = format!("{}:{}", self.host, self.port);
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = in_flight.clone();
        tokio::spawn(tunnel::h2io::batched(
            async move {
                let pings = async {
                    // The gateway's SETTINGS (with RFC 8441's ENABLE_CONNECT_PROTOCOL) come
                    // before its answer to our first ping: sessions wait for that answer.
                    // An answer later than DIAL_TIMEOUT: the sessions go ahead, the
                    // connection takes no new ones, and the ping is still waited for
                    // (h2 sends no other while it is pending), up to the keepalive's.
                    if let Some(p) = ping.as_mut() {
                        let mut first = std::pin::pin!(p.ping(h2::Ping::opaque()));
                        let answered = tokio::time::timeout(DIAL_TIMEOUT, first.as_mut()).await;
                        let _ = ready_tx.send(());
                        if answered.is_err() {
                            still.store(false, Ordering::Release);
                            let rest = keepalive.1.saturating_sub(DIAL_TIMEOUT);
                            if !matches!(tokio::time::timeout(rest, first).await, Ok(Ok(_))) {
                                return;
                            }
                        }
                    } else {
                        let _ = ready_tx.send(());
                    }
                    pooled_keepalive(ping, keepalive, &probed, &still, &gateway).await
                };
                tokio::select! {
                    r = &mut conn => if let Err(e) = r {
                        debug!(error = %e, "HTTP/2 connection ended");
                    },
                    _ = pings => debug!("the gateway did not answer HTTP/2 pings; dropping the connection"),
                }
                still.store(false, Ordering::Release);
            },
            counted,
        ));
        // An error here means the connection already ended: the request will say so.
        let _ = ready_rx.await;
        let sender = H2Sender {
            send,
            alive,
            probe,
            in_flight,
            shard: crate::shard::current(),
        };
        if let Ok(mut pool) = self.h2_pool.lock() {
            let mine = pool.iter().filter(|s| s.shard == sender.shard).count();
            if mine < h2_pool_connections(sender.shard) {
                pool.push(sender.clone());
            }
        }
        Ok(sender)
    }

    /// The HTTP/2 request URI for `path` (an invalid one fails the request's build).
    fn h2_uri(&self, path: &str) -> Result<Uri, hyper::http::uri::InvalidUri> {
        if let Ok(g) = self.last_uri.lock() {
            if let Some((_, uri)) = g.as_ref().filter(|(p, _)| p == path) {
                return Ok(uri.clone());
            }
        }
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let uri: Uri = format!("https://{authority}{path}").parse()?;
        if let Ok(mut g) = self.last_uri.lock() {
            *g = Some((path.to_string(), uri.clone()));
        }
        Ok(uri)
    }

    async fn open_h2(
        &self,
        sender: H2Sender,
        path: &str,
        early: &Bytes,
    ) -> Result<(Carrier, Option<Direction>, Option<Mode>), H2Error> {
        let in_flight = InFlight::new(&sender.in_flight);
        let conn_err = |e: h2::Error| {
            sender.alive.store(false, Ordering::Release);
            H2Error::Connection(classify(&e, "HTTP/2 request failed"))
        };
        let mut send = sender.send.clone().ready().await.map_err(conn_err)?;
        if !send.is_extended_connect_protocol_enabled() {
            // A TLS-terminating proxy that speaks HTTP/2 but not RFC 8441, say: the
            // connection is dropped and this dialer's sessions (this one too) go over
            // HTTP/1.1 from now on.
            if !self.h2_no_websocket.swap(true, Ordering::Relaxed) {
                warn!(
                    "the gateway speaks HTTP/2 without WebSocket over HTTP/2 (RFC 8441); its sessions go over HTTP/1.1"
                );
            }
            sender.alive.store(false, Ordering::Release);
            return Err(H2Error::Connection(ClientError::Network(
                "the gateway does not offer WebSocket over HTTP/2 (RFC 8441)".into(),
            )));
        }
        let uri = self
            .h2_uri(path)
            .map_err(|e| H2Error::Session(ClientError::Setup(format!("bad request: {e}"))))?;
        let mut req = Request::builder()
            .method(hyper::Method::CONNECT)
            .version(hyper::Version::HTTP_2)
            .uri(uri)
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_PROTOCOL, protocol::SUBPROTOCOL)
            .body(())
            .map_err(|e| H2Error::Session(ClientError::Setup(format!("bad request: {e}"))))?;
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        if !early.is_empty() {
            req.headers_mut()
                .insert(HEADER_EARLY, HeaderValue::from_static("1"));
        }
        if let Some(t) = &self.token {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", t.expose())).map_err(|_| {
                H2Error::Session(ClientError::Setup(
                    "the token holds characters not allowed in a header".into(),
                ))
            })?;
            v.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        let (resp, mut stream) = send.send_request(req, false).map_err(conn_err)?;
        if !early.is_empty() {
            // Queued behind the request's HEADERS, flushed with them; within the
            // stream's initial window, so it needs no capacity reservation.
            stream
                .send_data(ws::binary_frame(Role::Client, early), false)
                .map_err(conn_err)?;
        }
        let mut resp = std::pin::pin!(resp);
        let resp = match tokio::time::timeout(PROBE_AFTER, resp.as_mut()).await {
            Ok(r) => r,
            Err(_) => {
                // No answer yet: a slow open (a FIFO waiting for its reader), or a
                // connection that died without a word (a NAT or firewall that forgot
                // it). A ping tells which ([`pooled_keepalive`]).
                sender.probe.notify_one();
                resp.await
            }
        };
        let resp = resp.map_err(|e| {
            if e.is_reset() && !e.is_go_away() {
                // The gateway refused this stream (e.g. too many at once), not the connection.
                H2Error::Session(ClientError::Network(format!("HTTP/2 stream reset: {e}")))
            } else if !(early.is_empty() || unprocessed(&e)) {
                // The gateway may have opened the pipe and passed the early data on before
                // the connection failed: never send it again on another connection. Only
                // the gateway's own GOAWAY says it did not ([`unprocessed`]).
                sender.alive.store(false, Ordering::Release);
                H2Error::Session(ClientError::Network(format!(
                    "HTTP/2 connection failed after the session's first data was sent: {e}"
                )))
            } else {
                conn_err(e)
            }
        })?;
        let status = resp.status();
        if status != StatusCode::OK {
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                if got.len() + chunk.len() > MAX_REFUSAL_BODY_BYTES {
                    break;
                }
                got.extend_from_slice(&chunk);
            }
            return Err(H2Error::Session(refusal(status, &got)));
        }
        let (direction, mode) = session_headers(&resp).map_err(H2Error::Session)?;
        Ok((
            Carrier::Right(H2Stream::new(stream, resp.into_body(), Some(in_flight))),
            direction,
            mode,
        ))
    }
}

/// A pooled connection's keepalive: a ping every `interval`, and one at once when an
/// open has waited [`PROBE_AFTER`] for its answer (`probe`). A ping unanswered for
/// [`SUSPECT_AFTER`] (or four times the slowest recent answer, if more) takes the
/// connection out of the pool (`alive`): new sessions go over
/// a new one, while the sessions it carries go on; unanswered for `timeout`, the
/// connection is dead and this completes. Without it, a connection that died silently
/// took every new session for up to `interval` + `timeout` (two minutes by default),
/// and each failed after [`DIAL_TIMEOUT`].
async fn pooled_keepalive(
    ping: Option<h2::PingPong>,
    (interval, timeout): (Duration, Duration),
    probe: &tokio::sync::Notify,
    alive: &AtomicBool,
    gateway: &str,
) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    // The slowest recent answer: a link that is slow but alive (a deep queue behind a
    // bulk transfer) is given four times it before it counts as suspect.
    let mut slowest = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = probe.notified() => {}
        }
        let sent = tokio::time::Instant::now();
        let suspect = SUSPECT_AFTER.max(slowest.saturating_mul(4)).min(timeout);
        let mut pong = std::pin::pin!(tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())));
        let answer = match tokio::time::timeout(suspect, pong.as_mut()).await {
            Ok(a) => a,
            Err(_) => {
                if alive.swap(false, Ordering::AcqRel) {
                    warn!(%gateway, after = ?suspect, "a pooled HTTP/2 connection left a ping unanswered; new sessions go over a new connection");
                }
                pong.await
            }
        };
        if !matches!(answer, Ok(Ok(_))) {
            return;
        }
        // Halved at each answer: one slow answer (behind a bulk transfer) does not keep
        // a dead connection in the pool for the connection's whole life.
        slowest = (slowest / 2).max(sent.elapsed());
    }
}

/// A GOAWAY the gateway sent: h2 reports it only to the streams above its last stream
/// id, which the gateway did not process (RFC 9113 6.8), whatever its error code. h2's
/// own GOAWAYs (a protocol error it found) reach every stream, processed or not.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote()
}

/// A handle on a pooled HTTP/2 connection.
#[derive(Clone)]
struct H2Sender {
    send: h2::client::SendRequest<Bytes>,
    /// Cleared when the connection ended, failed a request or left a ping unanswered:
    /// new sessions stop using it.
    alive: Arc<AtomicBool>,
    /// Asks the connection for a ping now (an open waits long for its answer).
    probe: Arc<tokio::sync::Notify>,
    /// Sessions (and their requests) in flight on the connection.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The shard whose runtime drives the connection (`None`: the main runtime). Sessions
    /// use their own shard's connections, so a session and its connection share a thread.
    shard: Option<usize>,
}

/// HTTP/2 connections a dialer keeps per gateway and credential set for sessions on
/// `shard`: one per shard (the shards spread the TLS work over the cores), two for
/// sessions on the main multi-threaded runtime (shards off, or a kind of forward that
/// does not use them), spread so that two cores can carry TLS work.
fn h2_pool_connections(shard: Option<usize>) -> usize {
    if shard.is_some() {
        1
    } else {
        2
    }
}

/// An HTTP/2 session attempt failed because of its connection (retry on another) or
/// because of the session itself (a refusal: report it).
enum H2Error {
    Connection(ClientError),
    Session(ClientError),
}

async fn read_refusal(resp: hyper::Response<hyper::body::Incoming>) -> ClientError {
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_REFUSAL_BODY_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    refusal(status, &body)
}

fn session_headers<B>(
    resp: &hyper::Response<B>,
) -> Result<(Option<Direction>, Option<Mode>), ClientError> {
    let proto_ok = resp
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .is_some_and(|v| v.as_bytes() == protocol::SUBPROTOCOL.as_bytes());
    if !proto_ok {
        return Err(ClientError::Network(
            "the server did not agree to pipebridge.v1".into(),
        ));
    }
    let hdr = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Ok((
        hdr(HEADER_DIRECTION).and_then(|d| Direction::parse(&d)),
        hdr(HEADER_MODE).and_then(|m| Mode::parse(&m)),
    ))
}

/// An HTTP proxy named by the environment: its address, and the `Proxy-Authorization`
/// the user name and password in its URL make (never shown: errors name the address).
#[derive(Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `Basic` credentials, from `http://user:password@host:port`.
    auth: Option<String>,
}

impl Proxy {
    /// Parses an `http://[user[:password]@]host[:port][/]` proxy URL (the scheme may be
    /// left out; the port defaults to 80; user and password are percent-decoded). Errors
    /// never repeat the URL, which may hold a password.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "HTTPS_PROXY: a {scheme}:// proxy is not supported (only http://)"
                ))
            }
            None => url,
        };
        // The host ends at the first `/` after the user information, which may hold
        // one (a password with an unencoded `/`).
        // (Only before a query or fragment: an `@` there is none of the authority's.)
        let head = rest.split(['?', '#']).next().unwrap_or_default();
        let (userinfo, after) = match head.rsplit_once('@') {
            Some(("", h)) => (None, h),
            Some((u, h)) => (Some(u), h),
            None => (None, head),
        };
        let hostport = after.split('/').next().unwrap_or_default();
        if hostport.is_empty() {
            return Err("HTTPS_PROXY: the proxy URL names no host".into());
        }
        let has_port = match hostport.rfind(']') {
            Some(end) => hostport[end..].contains(':'),
            None => hostport.contains(':'),
        };
        let addr = if has_port {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let auth = match userinfo {
            Some(u) => {
                let mut plain = percent_decode(u)
                    .ok_or("HTTPS_PROXY: the proxy URL's user name or password is not valid percent-encoding")?;
                // Basic credentials are `user:password` (RFC 7617), the password maybe
                // empty.
                if !u.contains(':') {
                    plain.push(b':');
                }
                Some(format!(
                    "Basic {}",
                    data_encoding::BASE64.encode(plain.as_slice())
                ))
            }
            None => None,
        };
        Ok(Proxy { addr, auth })
    }
}

/// Decodes `%XX` escapes; None on a cut or invalid one.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The proxy to use for `host` from `HTTPS_PROXY`/`https_proxy`, unless `NO_PROXY`/
/// `no_proxy` exempts it (exact names, domain suffixes, `*`); an error for a proxy URL
/// that cannot be used.
pub fn proxy_for(host: &str) -> Option<Result<Proxy, String>> {
    let env = |a: &str, b: &str| {
        std::env::var(a)
            .ok()
            .or_else(|| std::env::var(b).ok())
            .filter(|v| !v.is_empty())
    };
    let proxy = env("HTTPS_PROXY", "https_proxy")?;
    if let Some(no) = env("NO_PROXY", "no_proxy") {
        let h = host.to_ascii_lowercase();
        for entry in no.split(',').map(|e| e.trim().to_ascii_lowercase()) {
            let e = entry.trim_start_matches('.');
            if entry == "*" || (!e.is_empty() && (h == e || h.ends_with(&format!(".{e}")))) {
                return None;
            }
        }
    }
    Some(Proxy::parse(&proxy))
}

/// Opens a tunnel through an HTTP proxy with CONNECT.
async fn connect_via_proxy(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, ClientError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = proxy
        .auth
        .as_ref()
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let proxy = proxy.addr.as_str();
    let mut tcp = TcpStream::connect(proxy)
        .await
        .map_err(|e| ClientError::Network(format!("cannot reach the proxy {proxy}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .map_err(|e| ClientError::Network(format!("proxy {proxy}: {e}")))?;
    // Read the response head byte by byte so no tunnelled byte is consumed.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(ClientError::Network(format!(
                "proxy {proxy}: response head too long"
            )));
        }
        let b = tcp
            .read_u8()
            .await
            .map_err(|e| ClientError::Network(format!("proxy {proxy}: {e}")))?;
        head.push(b);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        let first = protocol::clean(line.lines().next().unwrap_or("")).into_owned();
        return Err(ClientError::Network(format!(
            "proxy {proxy} refused CONNECT: {first}"
        )));
    }
    Ok(tcp)
}

/// Drives a client connection; its error (which may carry the TLS alert that says our
/// certificate was rejected) is handed back through the returned channel.
fn spawn_conn<F>(conn: F) -> tokio::sync::oneshot::Receiver<hyper::Error>
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "client connection ended");
            let _ = tx.send(e);
        }
    });
    rx
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
    conn_err: tokio::sync::oneshot::Receiver<hyper::Error>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    match sender.send_request(req).await {
        Ok(r) => Ok(r),
        Err(e) => {
            // With TLS 1.3 a rejected client certificate shows up only now, as an
            // alert on the connection: prefer the connection's error when there is one.
            if let Ok(Ok(ce)) = tokio::time::timeout(Duration::from_secs(1), conn_err).await {
                return Err(classify(&ce, "request failed"));
            }
            Err(classify(&e, "request failed"))
        }
    }
}

pub(crate) fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    // The gateway's text, printed and logged: made safe first.
    let kind = v.get("error").and_then(|k| k.as_str()).map_or_else(
        || "unknown".to_string(),
        |k| protocol::clean(k).into_owned(),
    );
    let message = v
        .get("message")
        .and_then(|k| k.as_str())
        .map(|m| protocol::clean(m).into_owned())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
    ClientError::Refused {
        status: status.as_u16(),
        kind,
        message,
    }
}

/// Maps an error whose chain may hold a TLS alert about our certificate.
fn classify(e: &(dyn std::error::Error + 'static), what: &str) -> ClientError {
    use rustls::AlertDescription as A;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::DecryptError,
        )) = tls_err
        {
            return ClientError::CertificateRejected;
        }
        cur = err.source();
    }
    ClientError::Network(format!("{what}: {}", chain(e)))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The path and query of a pipe URL.
pub fn path_and_query(u: &Uri) -> String {
    u.path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into())
}

/// The largest incoming message a client session accepts.
pub fn client_message_limit() -> usize {
    MAX_BYTE_MODE_MESSAGE_BYTES.max(64 << 20)
}

// === forwards ===

#[cfg(unix)]
#[path = "client/hosted_unix.rs"]
mod hosted;
#[cfg(windows)]
#[path = "client/hosted_windows.rs"]
mod hosted;
#[cfg(unix)]
pub use hosted::{lookup_group, lookup_user};
pub use hosted::{Forward, LocalCaller};

/// Forgets the user database's answers kept about forwards' local callers (a reload;
/// Unix only: on Windows a caller's account comes from its own token).
pub fn forget_user_db() {
    #[cfg(unix)]
    hosted::forget_user_db();
}

/// A running forward's settings, which a reload may replace without binding its local
/// endpoint again when only the remote side changed (the URL's host and path,
/// credentials, `allow_local`, keepalive, HTTP/2): each new caller's session takes the
/// settings in force when it arrives; live sessions keep theirs.
pub struct ForwardSettings {
    /// Query parameters the bind added to the remote URL's (`mode=message` for a
    /// seqpacket forward).
    extra: Vec<&'static str>,
    /// The forward's config and what its sessions open.
    now: std::sync::RwLock<(Arc<ForwardConfig>, Arc<Target>)>,
}

/// What a forward's sessions open, for one version of its settings (a reload that
/// changes them makes a new one).
pub struct Target {
    /// The path and query its sessions request.
    path: String,
    /// The remote URL as its sessions' spans name it.
    to: crate::logfmt::Preformatted,
    /// Whether a credential path names `{user}` (a dialer per local user).
    per_user: bool,
    /// The dialer of its sessions while no credential path names `{user}`, and when
    /// [`session_dialer`] last read its credentials: taken without formatting the cache
    /// key per session.
    dialer: std::sync::Mutex<Option<(Arc<Dialer>, std::time::Instant)>>,
}

impl Target {
    fn new(fwd: &ForwardConfig, extra: &[&str]) -> Arc<Target> {
        let c = &fwd.credentials;
        Arc::new(Target {
            path: target_of(&fwd.to, extra),
            to: crate::logfmt::Preformatted::of(&fwd.to),
            per_user: [&c.ca, &c.cert, &c.key, &c.token_file]
                .iter()
                .any(|p| p.as_deref().is_some_and(|p| p.contains("{user}"))),
            dialer: std::sync::Mutex::new(None),
        })
    }

    /// The dialer for `fwd`'s own credentials (those this target was made for), checked
    /// like [`session_dialer`]'s: at most [`DIALER_TTL`] after its credentials were read.
    async fn dialer(&self, fwd: &ForwardConfig) -> Result<Arc<Dialer>, ClientError> {
        let fresh = |read: &std::time::Instant| read.elapsed() < DIALER_TTL;
        if let Ok(g) = self.dialer.lock() {
            if let Some((d, _)) = g.as_ref().filter(|(_, read)| fresh(read)) {
                return Ok(d.clone());
            }
        }
        let (d, read) = session_dialer(
            &fwd.to,
            &fwd.credentials,
            fwd.keepalive,
            fwd.http2,
            DIALER_TTL,
        )
        .await?;
        if let Ok(mut g) = self.dialer.lock() {
            *g = Some((d.clone(), read));
        }
        Ok(d)
    }
}

impl ForwardSettings {
    fn new(fwd: ForwardConfig, extra: Vec<&'static str>) -> Arc<ForwardSettings> {
        let target = Target::new(&fwd, &extra);
        Arc::new(ForwardSettings {
            extra,
            now: std::sync::RwLock::new((Arc::new(fwd), target)),
        })
    }

    /// The settings in force: the config and what sessions open.
    pub fn get(&self) -> (Arc<ForwardConfig>, Arc<Target>) {
        match self.now.read() {
            Ok(g) => g.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    /// Takes `fwd` as the settings for new callers if its local endpoint is bound just
    /// like the current one ([`same_endpoint`]); else changes nothing and returns false.
    pub fn replace(&self, fwd: &ForwardConfig) -> bool {
        if !same_endpoint(&self.get().0, fwd) {
            return false;
        }
        let new = (Arc::new(fwd.clone()), Target::new(fwd, &self.extra));
        match self.now.write() {
            Ok(mut g) => *g = new,
            Err(e) => *e.into_inner() = new,
        }
        true
    }
}

/// Whether two forwards bind their local endpoints alike: the same endpoint, file owner,
/// group and mode, named-pipe settings, and remote URL query (which sets the mode and
/// direction a seqpacket socket, FIFO or named pipe is bound with).
fn same_endpoint(a: &ForwardConfig, b: &ForwardConfig) -> bool {
    a.listen == b.listen
        && a.socket_owner == b.socket_owner
        && a.socket_group == b.socket_group
        && a.socket_mode == b.socket_mode
        && a.max_instances == b.max_instances
        && a.security_descriptor == b.security_descriptor
        && a.npipe_eof == b.npipe_eof
        && a.to.query() == b.to.query()
}

/// The path and query a forward's sessions request: `to`'s, plus `extra` parameters.
fn target_of(to: &Uri, extra: &[&str]) -> String {
    let mut target = path_and_query(to);
    for e in extra {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(e);
    }
    target
}

/// Pause after a failed accept (e.g. out of file descriptors) before the next.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "forward accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs a forwarded session as a task tracked by `tracker`; its result says whether the
/// remote session opened ([`forward_one`]).
fn spawn_session(
    tracker: &TaskTracker,
    fwd: &Arc<ForwardConfig>,
    target: &Arc<Target>,
    local: Local,
    caller: Option<LocalCaller>,
) -> tokio::task::JoinHandle<bool> {
    let fwd = fwd.clone();
    let target = target.clone();
    let span = session_span(&target, caller.as_ref());
    // Boxed once, as shard::spawn does: moved by value, the session's future would be
    // copied whole at each step of the spawn.
    tracker.spawn(Box::pin(async move {
        forward_one(local, Bytes::new(), caller, &fwd, &target, span).await
    }))
}

/// The tracing span of one forwarded session.
fn session_span(target: &Target, caller: Option<&LocalCaller>) -> tracing::Span {
    tracing::info_span!("forward", to = %target.to, local_caller = caller.map(tracing::field::display))
}

/// One forwarded session: `local` (whose first data, already read, is `early`) bridged
/// to a session opened on `target`, in `span`, which is entered while the session opens
/// and for its log lines, but not at every poll while it runs ([`bridge::run`]). False
/// when the remote session did not open (refused here or there, or unreachable).
async fn forward_one(
    local: Local,
    early: Bytes,
    caller: Option<LocalCaller>,
    fwd: &ForwardConfig,
    target: &Target,
    span: tracing::Span,
) -> bool {
    if !fwd.allow_local.is_empty() {
        let admitted = match &caller {
            Some(c) => c.admitted(&fwd.allow_local).await,
            None => Ok(false),
        };
        match admitted {
            Ok(true) => {}
            Ok(false) => {
                span.in_scope(|| warn!("local caller not in allow_local; closing"));
                return false;
            }
            Err(e) => {
                span.in_scope(
                    || warn!(error = %e, "cannot judge the local caller by allow_local; closing"),
                );
                return false;
            }
        }
    }
    // The user database is consulted only when a credential path names `{user}`: it is
    // a per-connection cost on the hot path of new sessions otherwise.
    let dialer = if target.per_user {
        let user = match &caller {
            Some(c) => c.name().await,
            None => Ok(None),
        };
        let user = match user {
            // A name that would step out of its place in a path is no name here.
            Ok(Some(u)) if !u.is_empty() && !u.contains('/') && u != "." && u != ".." => u,
            Ok(_) => {
                span.in_scope(|| warn!("the local caller has no usable user name for {{user}} in the credential paths; closing"));
                return false;
            }
            Err(e) => {
                span.in_scope(|| warn!(error = %e, "cannot look up the local caller's user name for {{user}}; closing"));
                return false;
            }
        };
        let creds = CredentialPaths {
            // The caller's own files: never another user's or root's, which the
            // gateway could read and the caller could not.
            owner: caller_uid(caller.as_ref()),
            ..substitute_user(&fwd.credentials, &user)
        };
        session_dialer(&fwd.to, &creds, fwd.keepalive, fwd.http2, DIALER_TTL)
            .await
            .map(|(d, _)| d)
    } else {
        target.dialer(fwd).await
    };
    let session = match dialer {
        Ok(d) => {
            d.open_early(&target.path, client_message_limit(), &early)
                .instrument(span.clone())
                .await
        }
        Err(e) => Err(e),
    };
    crate::metrics::get().forward_dialed(session.is_ok());
    let (ws, sent, direction) = match session {
        Ok((s, sent)) => (s.ws, sent, s.direction),
        Err(e) => {
            span.in_scope(|| warn!(error = %e, "forward could not open the remote session; closing the local connection"));
            return false;
        }
    };
    let counters = Counters::default();
    let local = if direction.is_some_and(|d| !d.client_writes()) {
        // Nothing of the caller's goes to an `out` session (its first bytes included,
        // when they were not sent with the request).
        local.discard_input()
    } else if sent {
        counters
            .from_local
            .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Not held for the session's life.
        drop(early);
        local
    } else {
        local.prepend(early)
    };
    let out = bridge::run(
        ws,
        local,
        &counters,
        StopSignal::never(),
        bridge::Options {
            idle_timeout: None,
            keepalive: Some(fwd.keepalive),
            blind_first: false,
        },
        &span,
    )
    .await;
    span.in_scope(|| {
        info!(
            bytes_in = counters.to_local.load(std::sync::atomic::Ordering::Relaxed),
            bytes_out = counters.from_local.load(std::sync::atomic::Ordering::Relaxed),
            close_code = out.code,
            close_reason = %out.reason,
            "forward session end"
        )
    });
    true
}

/// How long a forward reuses a dialer (its TLS config and session-resumption cache)
/// before re-reading its credential files. A dialer whose files still hold the same
/// bytes goes on, with its warm connections ([`credential_digest`]).
const DIALER_TTL: Duration = Duration::from_secs(30);
/// Bound on cached dialers (one per distinct credential set, e.g. per local user).
const MAX_CACHED_DIALERS: usize = 1024;

/// A dialer for `url` with `creds` for a session, reused across sessions so TLS session
/// resumption works and credential files are not re-read per connection: an entry read
/// within `ttl` at once; a re-read of the credential files (and, without a CA file, of
/// the whole system trust store) on the blocking pool ([`cached_dialer_within`]), not
/// on the shard thread, which runs other sessions meanwhile.
async fn session_dialer(
    url: &Uri,
    creds: &CredentialPaths,
    keepalive: (Duration, Duration),
    http2: bool,
    ttl: Duration,
) -> Result<(Arc<Dialer>, std::time::Instant), ClientError> {
    let key = dialer_key(url, creds, keepalive, http2);
    let fresh = |key: &str| {
        cached_entry(key)
            .filter(|(_, read, _)| read.elapsed() < ttl)
            .map(|(d, read, _)| (d, read))
    };
    if let Some(hit) = fresh(&key) {
        return Ok(hit);
    }
    // One re-read per key at a time: the sessions of a burst that found the entry due
    // wait for the first one's and take its dialer (each would read the files, and
    // the system trust store, on a blocking thread of its own).
    let gate = reread_gate(&key);
    let reread = async {
        let _held = gate.lock().await;
        if let Some(hit) = fresh(&key) {
            return Ok(hit);
        }
        let (url, creds) = (url.clone(), creds.clone());
        tokio::task::spawn_blocking(move || {
            cached_dialer_within(&url, &creds, keepalive, http2, ttl)
        })
        .await
        .map_err(|e| ClientError::Setup(format!("reading the credentials failed: {e}")))?
    };
    tokio::time::timeout(REREAD_TIMEOUT, reread)
        .await
        .map_err(|_| ClientError::Setup("reading the credential files timed out".into()))?
}

/// Bound on a session's wait for its forward's credential files (a hung disk).
const REREAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The lock that lets one session at a time re-read the credentials under `key`.
fn reread_gate(key: &str) -> Arc<tokio::sync::Mutex<()>> {
    type Gates = std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>;
    static GATES: std::sync::OnceLock<Gates> = std::sync::OnceLock::new();
    let mut gates = GATES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if gates.len() >= MAX_CACHED_DIALERS {
        // Those nobody holds or waits for.
        gates.retain(|_, g| Arc::strong_count(g) > 1);
    }
    gates.entry(key.to_string()).or_default().clone()
}

/// A dialer, when its credentials were last read, and their digest.
type DialerEntry = (Arc<Dialer>, std::time::Instant, Option<[u8; 32]>);

/// The dialers by [`dialer_key`].
fn dialer_cache() -> &'static std::sync::Mutex<std::collections::HashMap<String, DialerEntry>> {
    type Cache = std::sync::Mutex<std::collections::HashMap<String, DialerEntry>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// What a dialer is made from, as its cache key.
fn dialer_key(
    url: &Uri,
    creds: &CredentialPaths,
    keepalive: (Duration, Duration),
    http2: bool,
) -> String {
    format!(
        "{url}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{http2}|{keepalive:?}",
        creds.ca,
        creds.cert,
        creds.key,
        creds.token_file,
        creds.token.is_some(),
        (creds.owner, creds.per_user)
    )
}

/// The cached entry under `key`, fresh or not.
fn cached_entry(key: &str) -> Option<DialerEntry> {
    dialer_cache().lock().ok().and_then(|c| c.get(key).cloned())
}

/// A dialer for `url` with `creds`, and when its credentials were last read: the cached
/// one, re-reading the credentials once an entry is older than `ttl`.
/// Reads files when it does: not for a shard thread ([`session_dialer`]).
fn cached_dialer_within(
    url: &Uri,
    creds: &CredentialPaths,
    keepalive: (Duration, Duration),
    http2: bool,
    ttl: Duration,
) -> Result<(Arc<Dialer>, std::time::Instant), ClientError> {
    let key = dialer_key(url, creds, keepalive, http2);
    let cache = dialer_cache();
    let cached = cached_entry(&key);
    if let Some((d, read, _)) = &cached {
        if read.elapsed() < ttl {
            return Ok((d.clone(), *read));
        }
    }
    // Due for a re-read. The same bytes keep the dialer: its pooled HTTP/2 connections
    // stay warm and its TLS session cache stays (a new dialer would start cold, a full
    // handshake for the next session). New bytes (a rotated certificate or token) make
    // a new one; the old one's connections close once their sessions end.
    let digest = credential_digest(creds);
    let read = std::time::Instant::now();
    let seen = cached.as_ref().map(|(d, _, _)| d.clone());
    let d = match cached {
        Some((d, _, had)) if digest.is_some() && had == digest => d,
        _ => Arc::new(
            Dialer::new(url, creds)?
                .with_keepalive(keepalive.0, keepalive.1)
                .with_http2(http2),
        ),
    };
    if let Ok(mut c) = cache.lock() {
        // Sessions that came for a dialer at once each made one: all take the first one
        // stored (an entry that is not the one they looked at), so that its warm
        // connections serve them all.
        if let Some((other, when, had)) = c.get(&key) {
            let stored_since = !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, other));
            if stored_since && *had == digest && digest.is_some() {
                return Ok((other.clone(), *when));
            }
        }
        if c.len() >= MAX_CACHED_DIALERS {
            c.clear();
        }
        c.insert(key, (d.clone(), read, digest));
    }
    Ok((d, read))
}

/// A digest of the credentials a dialer is made from: the bytes of its CA, certificate,
/// key and token files, and its inline token; without a CA file, the certificates of
/// the system trust store instead. `None` when a file cannot be read ([`Dialer::new`]
/// then says why).
fn credential_digest(creds: &CredentialPaths) -> Option<[u8; 32]> {
    use crate::tunnel::tls::hash_field;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if creds.ca.is_none() {
        // What tls::client_config trusts then.
        for c in rustls_native_certs::load_native_certs().certs {
            hash_field(&mut h, &c);
        }
    }
    for (field, path) in [&creds.ca, &creds.cert, &creds.key, &creds.token_file]
        .into_iter()
        .enumerate()
    {
        match path {
            Some(p) => hash_field(
                &mut h,
                &crate::tunnel::tls::read_credential(Path::new(p), creds.owner_of(field)).ok()?,
            ),
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    match &creds.token {
        Some(t) => {
            h.update([1]);
            h.update(t.expose().as_bytes());
        }
        None => h.update([0]),
    }
    Some(h.finalize().into())
}

/// The local caller's uid (Unix): whose `{user}` credential files may be used.
#[cfg(unix)]
fn caller_uid(c: Option<&LocalCaller>) -> Option<u32> {
    c.map(|c| c.uid)
}

/// Windows: credential files are not checked for their owner.
#[cfg(not(unix))]
fn caller_uid(_: Option<&LocalCaller>) -> Option<u32> {
    None
}

fn substitute_user(c: &CredentialPaths, user: &str) -> CredentialPaths {
    let sub =
        |s: &Option<String>| -> Option<String> { s.as_ref().map(|p| p.replace("{user}", user)) };
    CredentialPaths {
        ca: sub(&c.ca),
        cert: sub(&c.cert),
        key: sub(&c.key),
        token_file: sub(&c.token_file),
        token: c.token.clone(),
        owner: c.owner,
        per_user: [&c.ca, &c.cert, &c.key, &c.token_file]
            .map(|f| f.as_ref().is_some_and(|p| p.contains("{user}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_url_gives_an_address_and_its_credentials_never_show() {
        let p = |u: &str| Proxy::parse(u);
        let plain = |addr: &str| {
            Ok(Proxy {
                addr: addr.into(),
                auth: None,
            })
        };
        assert_eq!(p("http://proxy:3128"), plain("proxy:3128"));
        assert_eq!(p("HTTP://proxy:3128/"), plain("proxy:3128"));
        assert_eq!(p("proxy"), plain("proxy:80"));
        assert_eq!(p("http://[::1]:8080/"), plain("[::1]:8080"));
        assert_eq!(p("http://[::1]"), plain("[::1]:80"));
        let with = p("http://pb%20user:p%40ss@proxy:3128/").expect("parse");
        assert_eq!(with.addr, "proxy:3128");
        // base64("pb user:p@ss")
        assert_eq!(with.auth.as_deref(), Some("Basic cGIgdXNlcjpwQHNz"));
        assert!(!format!("{:?}", with.addr).contains("ss"));
        // base64("user:"): a user without a password.
        assert_eq!(
            p("http://user@proxy:3128").expect("parse").auth.as_deref(),
            Some("Basic dXNlcjo=")
        );
        // A `/` in the password does not end the host part early.
        assert_eq!(p("http://proxy:3128/?a=x@y"), plain("proxy:3128"));
        assert_eq!(p("http://@proxy:3128"), plain("proxy:3128"));
        let slash = p("http://u:pa/ss@proxy:3128/").expect("parse");
        assert_eq!(slash.addr, "proxy:3128");
        assert_eq!(slash.auth.as_deref(), Some("Basic dTpwYS9zcw=="));
        for bad in [
            "https://u:secret@proxy:443",
            "socks5://u:secret@p:1080",
            "http://u:secret@",
            "http://u:secret%4@p",
        ] {
            let e = p(bad).expect_err(bad);
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    fn pki(dir: &Path) {
        crate::pki::init(&crate::pki::CertsInit {
            dir: dir.to_path_buf(),
            server_names: Vec::new(),
            clients: vec!["a".into()],
            force: true,
        })
        .expect("pki");
    }

    fn creds(dir: &Path) -> CredentialPaths {
        let p = |f: &str| Some(dir.join(f).display().to_string());
        CredentialPaths {
            ca: p("ca.pem"),
            cert: p("a.pem"),
            key: p("a.key"),
            token_file: None,
            token: None,
            owner: None,
            per_user: [false; 4],
        }
    }

    /// Credentials in a new PKI dir whose CA file is a FIFO, and a thread that writes
    /// the CA into it twice (`before` each open, `after` each write): each read of the
    /// file waits for a write, as a read from a hung disk would.
    #[cfg(unix)]
    fn fifo_ca(
        before: Duration,
        after: Duration,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        CredentialPaths,
        std::thread::JoinHandle<()>,
    ) {
        use std::os::unix::fs::OpenOptionsExt;
        let a = tempfile::tempdir().expect("dir");
        pki(a.path());
        let ca = std::fs::read(a.path().join("ca.pem")).expect("ca");
        let fifo = a.path().join("ca.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let mut c = creds(a.path());
        c.ca = Some(fifo.display().to_string());
        let path = fifo.clone();
        let writer = std::thread::spawn(move || {
            for _ in 0..2 {
                std::thread::sleep(before);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let open = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&path);
                    match open {
                        Ok(mut f) => {
                            std::io::Write::write_all(&mut f, &ca).expect("write ca");
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                            assert!(std::time::Instant::now() < deadline, "no reader");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("open fifo: {e}"),
                    }
                }
                std::thread::sleep(after);
            }
        });
        (a, fifo, c, writer)
    }

    /// Opens `fifo` for writing too (held while the result lives), which releases a
    /// read still waiting for a writer: no blocking thread outlives a test.
    #[cfg(unix)]
    fn release(fifo: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
    }

    /// A dialer keeps the request URI of the path it last opened, and makes a new one
    /// for another path: every URI is the one the URL and the path spell.
    #[test]
    fn a_request_uri_is_kept_for_its_path_only() {
        for (url, base) in [
            ("wss://localhost:1/pipes/x", "https://localhost:1"),
            ("wss://[::1]:2/pipes/x", "https://[::1]:2"),
        ] {
            let url: Uri = url.parse().expect("url");
            let d = Dialer::new(&url, &CredentialPaths::default()).expect("dialer");
            for path in ["/pipes/a", "/pipes/a", "/pipes/b?mode=message", "/pipes/a"] {
                let uri = d.h2_uri(path).expect("uri");
                assert_eq!(uri.to_string(), format!("{base}{path}"));
            }
            assert!(d.h2_uri("/pipes/a b").is_err(), "a space is no URI");
            assert_eq!(d.h2_uri("/pipes/a").expect("uri").path(), "/pipes/a");
        }
    }

    /// A session's re-read of its credential files runs off the runtime's thread: with
    /// the CA file a FIFO whose reads wait (as a file on a hung disk would), other
    /// tasks of the runtime go on meanwhile.
    #[cfg(unix)]
    #[tokio::test(flavor = "current_thread")]
    async fn a_session_reads_its_credential_files_off_the_runtime_thread() {
        // Two reads (the digest, then the dialer's own), each 200 ms late.
        let (_dir, fifo, c, writer) = fifo_ca(Duration::from_millis(200), Duration::ZERO);
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let url: Uri = "wss://localhost:1/pipes/x".parse().expect("url");
        let ka = (Duration::from_secs(20), Duration::from_secs(60));
        let before = ticks.load(Ordering::Relaxed);
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            session_dialer(&url, &c, ka, true, Duration::ZERO),
        )
        .await;
        let during = ticks.load(Ordering::Relaxed) - before;
        ticker.abort();
        // Releases a read still waiting for a writer (none if the reads were two), so
        // that no blocking thread outlives the test.
        let _release = release(&fifo);
        writer.join().expect("writer");
        let (d, _) = got.expect("the re-read timed out").expect("dialer");
        // About 200 ticks in the 400 ms the reads waited; none if they blocked the thread.
        assert!(
            during >= 20,
            "the runtime's thread waited for the files ({during} ticks)"
        );
        // Within its time, the same dialer, without reading the files (the FIFO has no
        // writer now: a read would wait for ever).
        let (again, _) = session_dialer(&url, &c, ka, true, Duration::from_secs(3600))
            .await
            .expect("dialer");
        assert!(Arc::ptr_eq(&d, &again));
    }

    /// Sessions that find a forward's dialer due at once read its files once: with
    /// the CA file a FIFO written for one re-read (two reads), eight sessions at once
    /// all get the dialer (a second re-read would wait on the FIFO and time out).
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_sessions_reads_the_credential_files_once() {
        // One re-read (two reads); the reader sees the end before the next write.
        let (_dir, fifo, c, writer) = fifo_ca(Duration::ZERO, Duration::from_millis(50));
        let url: Uri = "wss://localhost:1/pipes/burst".parse().expect("url");
        let ka = (Duration::from_secs(20), Duration::from_secs(60));
        let sessions: Vec<_> = (0..8)
            .map(|_| {
                let (url, c) = (url.clone(), c.clone());
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        session_dialer(&url, &c, ka, true, Duration::from_secs(3600)),
                    )
                    .await
                })
            })
            .collect();
        let mut got = Vec::new();
        for s in sessions {
            got.push(s.await.expect("session"));
        }
        // Releases a third read, if one is waiting, so no blocking thread outlives us.
        let _release = release(&fifo);
        writer.join().expect("writer");
        let dialers: Vec<Arc<Dialer>> = got
            .into_iter()
            .map(|r| {
                r.expect("a session waited for a second read")
                    .expect("dialer")
                    .0
            })
            .collect();
        assert!(dialers.iter().all(|d| Arc::ptr_eq(d, &dialers[0])));
    }

    /// A dialer whose credential files still hold the same bytes when they are read
    /// again is kept (with its warm connections); new bytes make a new dialer.
    #[test]
    fn a_dialer_is_renewed_only_when_its_credentials_change() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        pki(a.path());
        pki(b.path());
        let url: Uri = "wss://localhost:1/pipes/x".parse().expect("url");
        let c = creds(a.path());
        let ka = (Duration::from_secs(20), Duration::from_secs(60));
        // A zero TTL: every call reads the files again.
        let get = || cached_dialer_within(&url, &c, ka, true, Duration::ZERO).map(|(d, _)| d);
        let first = get().expect("dialer");
        let again = get().expect("dialer");
        assert!(Arc::ptr_eq(&first, &again), "same bytes, new dialer");
        // Rewritten with the same bytes: still the same dialer.
        let cert = std::fs::read(a.path().join("a.pem")).expect("read");
        std::fs::write(a.path().join("a.pem"), &cert).expect("write");
        assert!(Arc::ptr_eq(&first, &get().expect("dialer")));
        // A rotated certificate and key: a new dialer.
        for f in ["a.pem", "a.key"] {
            std::fs::copy(b.path().join(f), a.path().join(f)).expect("copy");
        }
        let rotated = get().expect("dialer");
        assert!(
            !Arc::ptr_eq(&first, &rotated),
            "rotated credentials kept the old dialer"
        );
        assert!(Arc::ptr_eq(&rotated, &get().expect("dialer")));
        // Within its time a dialer is taken as it is, without reading the files.
        let within = || cached_dialer_within(&url, &c, ka, true, Duration::from_secs(3600));
        let (kept, read) = within().expect("dialer");
        std::fs::copy(b.path().join("ca.pem"), a.path().join("ca.pem")).expect("copy");
        let (again, read_again) = within().expect("dialer");
        assert!(Arc::ptr_eq(&kept, &again) && read == read_again);
        // A key that cannot be read is an error, never the old dialer.
        std::fs::remove_file(a.path().join("a.key")).expect("rm");
        assert!(get().is_err(), "a missing key still gave a dialer");
    }

    #[test]
    fn the_credential_digest_covers_every_file_and_the_inline_token() {
        let a = tempfile::tempdir().expect("dir");
        pki(a.path());
        let c = creds(a.path());
        let d = credential_digest(&c).expect("digest");
        let tok = |t: &str| CredentialPaths {
            token: Some(Secret::new(t)),
            ..creds(a.path())
        };
        assert_ne!(credential_digest(&tok("one")), Some(d));
        assert_ne!(
            credential_digest(&tok("one")),
            credential_digest(&tok("two"))
        );
        let mut swapped = creds(a.path());
        std::mem::swap(&mut swapped.cert, &mut swapped.ca);
        assert_ne!(credential_digest(&swapped), Some(d), "files in other roles");
        // Each file on its own: new bytes, a new digest.
        let token = a.path().join("token");
        std::fs::write(&token, "t1").expect("token");
        let with_file = CredentialPaths {
            token_file: Some(token.display().to_string()),
            ..creds(a.path())
        };
        let mut last = credential_digest(&with_file).expect("digest");
        assert_ne!(last, d, "the token file");
        for f in ["ca.pem", "a.pem", "a.key", "token"] {
            let p = a.path().join(f);
            let mut bytes = std::fs::read(&p).expect("read");
            bytes.push(b'\n');
            std::fs::write(&p, bytes).expect("write");
            let now = credential_digest(&with_file).expect("digest");
            assert_ne!(now, last, "{f} changed, the digest did not");
            last = now;
        }
        let no_ca = CredentialPaths {
            ca: None,
            ..creds(a.path())
        };
        assert!(
            credential_digest(&no_ca).is_some_and(|n| n != d),
            "the system trust store stands in for the CA file"
        );
        std::fs::remove_file(a.path().join("a.pem")).expect("rm");
        assert_eq!(credential_digest(&c), None);
    }
}
