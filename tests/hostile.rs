//! The hostile-client suite (hardening issue): a real gateway binary on 127.0.0.1:0 is
//! fed TLS garbage and truncated handshakes, slowloris connections, oversized headers,
//! traversal/NUL/percent pipe names, wrong subprotocols, hand-crafted WebSocket frames
//! (too big, fragmented forever, unmasked, reserved bits and opcodes, bad control frames,
//! invalid UTF-8, unknown and malformed control messages, data in a forbidden direction),
//! a flood of 2,000 idle TCP connections and repeated bad tokens. Every case must get its
//! documented refusal (an HTTP status with the JSON body of DESIGN.md, a TLS failure, or a
//! WebSocket Close code), and after every case the gateway must still serve a normal
//! session (256 KiB echoed, SHA-256 compared, Close 1000) while its resident memory
//! (VmRSS of the gateway pid) stays below [`RSS_BOUND_KB`].
//!
//! Every process is killed by pid when its guard drops; every loop and wait is bounded.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::Message;

/// Resident memory bound of the gateway after (and during) every hostile case: 100 MiB.
/// An idle debug-build gateway uses ~10-20 MiB; each session is bounded to a few MiB.
const RSS_BOUND_KB: u64 = 100 * 1024;

/// `limits.handshake_timeout` of the gateways in this suite.
const HANDSHAKE: Duration = Duration::from_secs(2);

/// The bearer token of identity `tok`.
const TOKEN: &str = "hostile-suite-good-token-0123456789abcdef";

/// The byte-mode message limit (1 MiB, `MAX_BYTE_MODE_MESSAGE_BYTES`).
const BYTE_LIMIT: u64 = pipebridge::config::MAX_BYTE_MODE_MESSAGE_BYTES as u64;

// === /proc ===

/// Open file descriptors of `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// === the gateway under attack ===

/// A gateway with an admin listener, an echo pipe, an `out`-only pipe and a duplex pipe
/// whose child never reads or writes, and an `out` pipe that produces endlessly
/// (`cat /dev/zero`); identities alice, bob (certificates) and `tok` (bearer token).
struct Target {
    fx: Fixture,
    gw: Gateway,
    admin: String,
    _echo: UnixServer,
}

impl Target {
    /// Starts a gateway whose `[limits]` are `limits` (TOML lines).
    fn start(limits: &str) -> Target {
        let fx = Fixture::new();
        let echo = UnixServer::echo(&fx.path("echo.sock"));
        let allow = "allow = [\"alice\", \"bob\", \"tok\"]\nrun_as = \"gateway\"\n";
        let noreader = fx.path("noreader.fifo");
        mkfifo(&noreader);
        let text = fx.server_config(&format!(
            "[[identity]]\nname = \"tok\"\ntoken_sha256 = {tok}\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [limits]\n{limits}\n\n\
             [[pipe]]\nname = \"echo\"\nendpoint = {echo}\n{allow}\n\
             [[pipe]]\nname = \"quiet\"\nendpoint = \"exec\"\nargv = [\"sleep\", \"30\"]\n\
             direction = \"out\"\n{allow}\n\
             [[pipe]]\nname = \"sink\"\nendpoint = \"exec\"\nargv = [\"sleep\", \"30\"]\n{allow}\n\
             [[pipe]]\nname = \"zero\"\nendpoint = \"exec\"\nargv = [\"cat\", \"/dev/zero\"]\n\
             direction = \"out\"\n{allow}\n\
             [[pipe]]\nname = \"noreader\"\nendpoint = {fifo}\ndirection = \"in\"\n{allow}\n",
            tok = q(&pipebridge::pki::token_sha256_hex(TOKEN)),
            echo = q(&format!("unix:{}", fx.path("echo.sock").display())),
            fifo = q(&format!("fifo:{}", noreader.display())),
        ));
        let mut gw = fx.serve("gw.toml", &text);
        let line = gw
            .proc
            .wait_for_line("pipebridge: admin on ", START_TIMEOUT);
        let admin = line
            .trim_start_matches("pipebridge: admin on ")
            .trim()
            .to_string();
        Target {
            fx,
            gw,
            admin,
            _echo: echo,
        }
    }

    /// The usual limits: a 2 s handshake timeout, 16 KiB headers, 5 failed
    /// authentications per 3 s.
    fn standard() -> Target {
        Target::start(
            "handshake_timeout = \"2s\"\nmax_header_size = \"16KiB\"\n\
             max_auth_failures = 5\nauth_failure_window = \"3s\"",
        )
    }

    fn port(&self) -> u16 {
        self.gw.port
    }

    fn pid(&self) -> u32 {
        self.gw.proc.pid()
    }

    fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }

    /// Asserts the gateway is alive, serves a normal session from 127.0.0.1 and stays
    /// under [`RSS_BOUND_KB`]; `after` names the case for the messages.
    async fn assert_healthy(&self, after: &str) {
        self.assert_healthy_from(after, None).await;
    }

    /// Like [`Target::assert_healthy`], the session coming from `src`.
    async fn assert_healthy_from(&self, after: &str, src: Option<IpAddr>) {
        let pid = self.pid();
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the gateway died after {after}; log:\n{}",
            self.gw.log()
        );
        if let Err(e) = normal_session(&self.fx, self.port(), src).await {
            panic!(
                "after {after}: a normal session failed: {e}\ngateway log tail:\n{}",
                tail(&self.gw.log(), 20)
            );
        }
        let rss = self.rss_kb();
        eprintln!("after {after}: normal session ok, gateway VmRSS {rss} KiB");
        assert!(
            rss < RSS_BOUND_KB,
            "after {after}: gateway VmRSS {rss} KiB is over the bound of {RSS_BOUND_KB} KiB"
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // The gateway's own children (exec pipes) first, by pid, while they are still
        // its children; then the gateway itself (Proc's drop).
        for pid in descendants(self.pid()) {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// All descendants of `pid` (through /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
            {
                out.push(k);
                todo.push(k);
            }
        }
    }
    out
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// === TLS and HTTP clients ===

/// How a client authenticates.
#[derive(Clone, Copy)]
enum Who<'a> {
    /// No certificate, no token.
    Nobody,
    /// A client certificate of the fixture PKI.
    Cert(&'a str),
}

fn client_config(fx: &Fixture, who: Who<'_>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fx.ca()).expect("read CA") {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match who {
        Who::Nobody => b.with_no_client_auth(),
        Who::Cert(name) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(fx.cert(name))
                .expect("read cert")
                .map(|c| c.expect("cert PEM"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(fx.key(name)).expect("read key");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// TCP to the gateway, from `src` when given (any 127/8 address works on Linux).
async fn tcp(port: u16, src: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        sock.connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
    )
    .await
    .map_err(|_| std::io::Error::other("TCP connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A TLS connection to the gateway.
async fn tls(
    fx: &Fixture,
    port: u16,
    who: Who<'_>,
    src: Option<IpAddr>,
) -> Result<TlsStream, String> {
    tls_with(client_config(fx, who), port, src).await
}

/// A TLS connection to the gateway with a prepared client config.
async fn tls_with(
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    src: Option<IpAddr>,
) -> Result<TlsStream, String> {
    let t = tcp(port, src).await.map_err(|e| format!("tcp: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(name, t),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))
}

/// A response head (and body, for non-101 statuses).
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a documented refusal: the status and a JSON body with `error` = `kind`
    /// and a non-empty `message`.
    fn expect_refusal(&self, status: u16, kind: &str, what: &str) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, status, "{what}: status; body {body:?}");
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
        assert_eq!(v["error"], kind, "{what}: error kind in {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message in {v}"
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{what}: content type"
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `r` (bytes already read in `buf`); returns it and leaves what
/// follows the head of a 101 in `buf`. `Err` if the connection ends first.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Head, String> {
    let mut chunk = vec![0u8; 16 * 1024];
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    buf.drain(..end);
    let mut body = Vec::new();
    if status != 101 {
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        body.append(buf);
        while body.len() < len {
            let n = r
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    }
    Ok(Head {
        status,
        headers,
        body,
    })
}

/// A WebSocket upgrade request for `path` with the given subprotocol header line (or
/// none) and `extra` header lines.
fn upgrade(port: u16, path: &str, protocol: Option<&str>, extra: &str) -> Vec<u8> {
    let proto = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{proto}{extra}\r\n"
    )
    .into_bytes()
}

/// Sends `request` on a new TLS connection and reads one response (bounded).
async fn exchange(
    fx: &Fixture,
    port: u16,
    who: Who<'_>,
    src: Option<IpAddr>,
    request: &[u8],
) -> Result<(Head, TlsStream, Vec<u8>), String> {
    let mut s = tls(fx, port, who, src).await?;
    tokio::time::timeout(Duration::from_secs(15), async {
        s.write_all(request)
            .await
            .map_err(|e| format!("send request: {e}"))?;
        s.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf).await?;
        Ok((head, s, buf))
    })
    .await
    .map_err(|_| "timed out waiting for a response".to_string())?
}

/// Like [`exchange`], keeping only the response.
async fn request(fx: &Fixture, port: u16, who: Who<'_>, request: &[u8]) -> Head {
    match exchange(fx, port, who, None, request).await {
        Ok((h, _, _)) => h,
        Err(e) => panic!("request {:?}: {e}", String::from_utf8_lossy(request)),
    }
}

/// An HTTP/1.1 request that comes late in the handshake window still gets its refusal:
/// its open, which waits (an `in` FIFO with no reader), gives up before the connection's
/// `handshake_timeout` (2 s) ends, with 502 `endpoint_unavailable`; it used to wait its
/// own full second and the connection was dropped without a response.
#[tokio::test]
async fn a_late_request_whose_open_waits_gets_its_refusal_within_the_handshake_timeout() {
    let t = Target::standard();
    let mut s = tls(&t.fx, t.port(), Who::Cert("alice"), None)
        .await
        .expect("tls");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let req = upgrade(t.port(), "/pipes/noreader", Some("pipebridge.v1"), "");
    s.write_all(&req).await.expect("send the request");
    let mut buf = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s, &mut buf))
        .await
        .expect("a response in time")
        .unwrap_or_else(|e| panic!("no response to a late request: {e}"));
    head.expect_refusal(
        502,
        "endpoint_unavailable",
        "a late open without a FIFO reader",
    );
}

// === a normal session (tungstenite, masking done right) ===

type Ws = tokio_tungstenite::WebSocketStream<TlsStream>;

async fn ws_open(fx: &Fixture, port: u16, src: Option<IpAddr>, path: &str) -> Result<Ws, String> {
    let req = upgrade(port, path, Some("pipebridge.v1"), "");
    let (head, s, rest) = exchange(fx, port, Who::Cert("alice"), src, &req).await?;
    if head.status != 101 {
        return Err(format!(
            "not upgraded: {} {}",
            head.status,
            String::from_utf8_lossy(&head.body)
        ));
    }
    Ok(tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        rest,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await)
}

/// Echoes 256 KiB through the echo pipe (with a half-close) and checks every byte and
/// the Close 1000.
async fn normal_session(fx: &Fixture, port: u16, src: Option<IpAddr>) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let ws = ws_open(fx, port, src, "/pipes/echo").await?;
        echo_through(ws, &random_bytes(256 * 1024)).await
    })
    .await
    .map_err(|_| "normal session timed out".to_string())?
}

/// Sends `data` (then `eof`) through an echoing session while reading the echo; checks
/// the echo and the final Close 1000.
async fn echo_through(ws: Ws, data: &[u8]) -> Result<(), String> {
    let (mut sink, mut stream) = ws.split();
    let send = async {
        for c in data.chunks(64 * 1024) {
            sink.send(Message::binary(c.to_vec()))
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        sink.send(Message::text(r#"{"type":"eof"}"#))
            .await
            .map_err(|e| format!("send eof: {e}"))?;
        Ok::<_, String>(())
    };
    let recv = async {
        let mut got = Vec::new();
        let mut eof = false;
        loop {
            match stream.next().await {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(Message::Text(t))) => {
                    if t.as_str().contains("\"eof\"") {
                        eof = true;
                    } else {
                        return Err(format!("unexpected control {t}"));
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    let code = c.as_ref().map(|c| u16::from(c.code));
                    if code != Some(1000) || !eof {
                        return Err(format!("closed with {c:?} (eof seen: {eof})"));
                    }
                    return Ok(got);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("websocket: {e}")),
                None => return Err("ended without a Close".into()),
            }
        }
    };
    let (s, r) = tokio::join!(send, recv);
    s?;
    let got = r?;
    if got.len() != data.len() || sha_hex(&got) != sha_hex(data) {
        return Err(format!(
            "echo differs: sent {} bytes, got {}",
            data.len(),
            got.len()
        ));
    }
    Ok(())
}

// === raw WebSocket frames ===

/// Encodes a client frame: FIN flag, RSV bits (0..7), opcode, an optional mask key and
/// the payload (masked with the key when given).
fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(fin, rsv, opcode, mask, payload.len() as u64);
    match mask {
        Some(k) => f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4])),
        None => f.extend_from_slice(payload),
    }
    f
}

/// Just a frame header announcing `len` payload bytes.
fn frame_header(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | ((rsv & 7) << 4) | (opcode & 0x0f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        f.push(m | len as u8);
    } else if len <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        f.extend_from_slice(&k);
    }
    f
}

const KEY: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// A masked text frame.
fn text(s: &str) -> Vec<u8> {
    frame(true, 0, OP_TEXT, KEY, s.as_bytes())
}

/// A masked binary frame.
fn binary(b: &[u8]) -> Vec<u8> {
    frame(true, 0, OP_BINARY, KEY, b)
}

/// How a raw session ended.
#[derive(Debug, Default)]
struct Ending {
    /// Text (control) messages received.
    texts: Vec<String>,
    /// Binary payload bytes received.
    data: Vec<u8>,
    /// The Close frame's code and reason.
    close: Option<(u16, String)>,
    /// How long after the probe the Close arrived.
    after: Duration,
    /// What ended the read when no Close came.
    other: Option<String>,
}

impl Ending {
    fn code(&self) -> Option<u16> {
        self.close.as_ref().map(|c| c.0)
    }

    /// Asserts Close `code` (one of `codes`) preceded by an `error` control naming `kind`.
    fn expect(&self, codes: &[u16], kind: &str, what: &str) -> u16 {
        let code = self
            .code()
            .unwrap_or_else(|| panic!("{what}: no Close frame: {self:?}"));
        assert!(
            codes.contains(&code),
            "{what}: Close code {code}, want one of {codes:?}: {self:?}"
        );
        assert!(
            self.texts.iter().any(|t| {
                serde_json::from_str::<serde_json::Value>(t)
                    .is_ok_and(|v| v["type"] == "error" && v["kind"] == kind)
            }),
            "{what}: want an error control message of kind {kind} before the Close: {self:?}"
        );
        code
    }
}

/// A frame from the gateway: FIN, opcode, payload and the bytes it took.
type ServerFrame = (bool, u8, Vec<u8>, usize);

/// An upgraded session spoken frame by frame.
struct Raw {
    r: ReadHalf<TlsStream>,
    w: WriteHalf<TlsStream>,
    buf: Vec<u8>,
}

impl Raw {
    /// Opens a session on `path` as alice.
    async fn open(t: &Target, path: &str) -> Raw {
        let req = upgrade(t.port(), path, Some("pipebridge.v1"), "");
        let (head, s, buf) = exchange(&t.fx, t.port(), Who::Cert("alice"), None, &req)
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        assert_eq!(
            head.status,
            101,
            "open {path}: {}",
            String::from_utf8_lossy(&head.body)
        );
        let (r, w) = tokio::io::split(s);
        Raw { r, w, buf }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("send frame bytes");
        self.w.flush().await.expect("flush");
    }

    /// Parses one server frame out of `buf`: `(fin, opcode, payload, bytes used)`.
    fn parse(buf: &[u8]) -> Result<Option<ServerFrame>, String> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let fin = buf[0] & 0x80 != 0;
        let op = buf[0] & 0x0f;
        if buf[1] & 0x80 != 0 {
            return Err("the server sent a masked frame".into());
        }
        let (len, mut at) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if buf.len() < at + len {
            return Ok(None);
        }
        let payload = buf[at..at + len].to_vec();
        at += len;
        Ok(Some((fin, op, payload, at)))
    }

    /// Reads server frames until a Close (answered with our Close), the end of the
    /// connection, or `timeout`.
    async fn until_close(&mut self, timeout: Duration) -> Ending {
        let (end, close) = read_until_close(&mut self.r, &mut self.buf, timeout).await;
        if let Some(payload) = close {
            let reply = frame(true, 0, OP_CLOSE, KEY, &payload[..payload.len().min(2)]);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.w.write_all(&reply).await;
                let _ = self.w.flush().await;
            })
            .await;
        }
        end
    }

    /// Writes `bytes` (stopping at the first error) while reading until the Close.
    async fn send_until_close(&mut self, bytes: &[u8], timeout: Duration) -> Ending {
        let w = &mut self.w;
        let writer = async move {
            for c in bytes.chunks(64 * 1024) {
                if w.write_all(c).await.is_err() || w.flush().await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        };
        let reader = read_until_close(&mut self.r, &mut self.buf, timeout);
        tokio::select! {
            (end, _) = reader => end,
            _ = writer => unreachable!(),
        }
    }
}

/// Reads server frames until a Close, the end of the connection, or `timeout`; returns
/// what came and the Close payload.
async fn read_until_close(
    r: &mut ReadHalf<TlsStream>,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> (Ending, Option<Vec<u8>>) {
    let t0 = Instant::now();
    let mut end = Ending::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut close = None;
    loop {
        match Raw::parse(buf) {
            Err(e) => {
                end.other = Some(e);
                break;
            }
            Ok(Some((_fin, op, payload, used))) => {
                buf.drain(..used);
                match op {
                    OP_TEXT => end
                        .texts
                        .push(String::from_utf8_lossy(&payload).into_owned()),
                    OP_BINARY | OP_CONT => end.data.extend_from_slice(&payload),
                    OP_CLOSE => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        let reason =
                            String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
                        end.close = Some((code.unwrap_or(1005), reason));
                        close = Some(payload);
                        break;
                    }
                    _ => {} // pings and pongs
                }
                continue;
            }
            Ok(None) => {}
        }
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Err(_) => {
                end.other = Some(format!("no Close within {timeout:?}"));
                break;
            }
            Ok(Ok(0)) => {
                end.other = Some("connection ended without a Close".into());
                break;
            }
            Ok(Err(e)) => {
                end.other = Some(format!("read: {e}"));
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    end.after = t0.elapsed();
    (end, close)
}

/// Opens a session on `path`, sends `bytes` and waits (bounded) for the Close.
async fn probe(t: &Target, path: &str, bytes: &[u8]) -> Ending {
    let mut raw = Raw::open(t, path).await;
    raw.send(bytes).await;
    raw.until_close(Duration::from_secs(10)).await
}

// === metrics ===

/// A plain HTTP GET on the admin listener: status and body.
fn admin_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let sa: SocketAddr = addr.parse().expect("admin address");
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5)).expect("admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read admin response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("admin response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("admin status");
    (status, body.to_string())
}

/// The value of the sample `series` (exact text before the value), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}

// === 1. TLS garbage and truncated handshakes ===

/// What a raw TCP probe saw: the bytes the gateway sent back and when the connection
/// ended (`None`: still open at the deadline).
struct TcpProbe {
    got: Vec<u8>,
    closed_after: Option<Duration>,
}

/// Connects, sends `bytes` (then half-closes when `fin`), and reads until the gateway
/// ends the connection or `wait` passes.
async fn tcp_probe(port: u16, bytes: &[u8], fin: bool, wait: Duration) -> TcpProbe {
    let mut s = tcp(port, None).await.expect("tcp connect");
    let t0 = Instant::now();
    // The gateway may reset the connection before everything is written.
    let _ = s.write_all(bytes).await;
    if fin {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => {
                return TcpProbe {
                    got,
                    closed_after: None,
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return TcpProbe {
                    got,
                    closed_after: Some(t0.elapsed()),
                }
            }
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A real ClientHello as rustls sends it.
fn client_hello(fx: &Fixture) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn =
        rustls::ClientConnection::new(client_config(fx, Who::Cert("alice")), name).expect("conn");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write ClientHello");
    }
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

/// Asserts that what the gateway sent back to a non-TLS or broken client is nothing or
/// TLS alert records only (never HTTP, never a handshake).
fn assert_tls_failure(p: &TcpProbe, what: &str) {
    let mut at = 0;
    while at + 5 <= p.got.len() {
        assert_eq!(
            p.got[at],
            0x15,
            "{what}: the gateway answered with a non-alert TLS record or plaintext: {:?}",
            String::from_utf8_lossy(&p.got)
        );
        at += 5 + u16::from_be_bytes([p.got[at + 3], p.got[at + 4]]) as usize;
    }
    assert!(
        !p.got.windows(5).any(|w| w == b"HTTP/"),
        "{what}: an HTTP answer on the TLS port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_and_truncated_client_hellos_fail_in_tls() {
    let t = Target::standard();
    let port = t.port();
    let quick = Duration::from_millis(1500);
    let bound = HANDSHAKE + Duration::from_millis(1500);

    // Random bytes whose first byte is no TLS content type (20..=24): refused at once.
    for i in 0..5 {
        let mut junk = random_bytes(4096);
        junk[0] = (junk[0] % 20).max(1);
        let p = tcp_probe(port, &junk, false, Duration::from_secs(6)).await;
        let took = p
            .closed_after
            .unwrap_or_else(|| panic!("random bytes #{i}: the gateway kept the connection open"));
        assert!(took < quick, "random bytes #{i}: closed after {took:?}");
        assert_tls_failure(&p, "random bytes");
    }
    // Entirely random bytes (may look like a record header): closed within the
    // handshake timeout at the latest.
    for i in 0..5 {
        let p = tcp_probe(port, &random_bytes(4096), false, Duration::from_secs(6)).await;
        let took = p
            .closed_after
            .unwrap_or_else(|| panic!("fully random bytes #{i}: still open after 6 s"));
        assert!(
            took < bound,
            "fully random bytes #{i}: closed after {took:?}"
        );
        assert_tls_failure(&p, "fully random bytes");
    }
    // Plain HTTP on the TLS port.
    let p = tcp_probe(
        port,
        b"GET /pipes/echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
        false,
        Duration::from_secs(6),
    )
    .await;
    assert!(
        p.closed_after.is_some_and(|d| d < quick),
        "plain HTTP on the TLS port: closed after {:?}",
        p.closed_after
    );
    assert_tls_failure(&p, "plain HTTP");
    // A handshake record header announcing 65,535 bytes (over the TLS record limit).
    let mut big = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    big.extend(random_bytes(2048));
    let p = tcp_probe(port, &big, false, Duration::from_secs(6)).await;
    assert!(
        p.closed_after.is_some_and(|d| d < bound),
        "oversized record: closed after {:?}",
        p.closed_after
    );
    assert_tls_failure(&p, "oversized record");

    // A real ClientHello cut in half, then silence: the handshake timeout ends it.
    let hello = client_hello(&t.fx);
    for cut in [3, 5, hello.len() / 2, hello.len() - 1] {
        let p = tcp_probe(port, &hello[..cut], false, Duration::from_secs(8)).await;
        let took = p
            .closed_after
            .unwrap_or_else(|| panic!("ClientHello cut at {cut}: still open after 8 s"));
        assert!(
            took >= HANDSHAKE - Duration::from_millis(300) && took < bound,
            "ClientHello cut at {cut} of {}: closed after {took:?} (handshake_timeout {HANDSHAKE:?})",
            hello.len()
        );
        assert!(
            p.got.is_empty() || p.got[0] == 0x15,
            "cut at {cut}: {:?}",
            p.got
        );
    }
    // ... and cut in half followed by our FIN: ended at once.
    let p = tcp_probe(
        port,
        &hello[..hello.len() / 2],
        true,
        Duration::from_secs(6),
    )
    .await;
    assert!(
        p.closed_after.is_some_and(|d| d < quick),
        "truncated ClientHello + FIN: closed after {:?}",
        p.closed_after
    );
    // A whole ClientHello followed by garbage records.
    let mut bad = hello.clone();
    bad.extend([0x17, 0x03, 0x03, 0x00, 0x10]);
    bad.extend(random_bytes(16));
    let p = tcp_probe(port, &bad, false, Duration::from_secs(6)).await;
    assert!(
        p.closed_after.is_some_and(|d| d < bound),
        "ClientHello + garbage: closed after {:?}",
        p.closed_after
    );

    t.assert_healthy("TLS garbage and truncated ClientHellos")
        .await;
}

// === 2. slowloris ===

/// One slowloris connection: TLS completes, then one byte of a never-ending request
/// head every 200 ms. Returns how long after the TCP connect the gateway ended it.
async fn slow_http(cfg: Arc<rustls::ClientConfig>, port: u16) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = tls_with(cfg, port, None).await?;
    let mut head =
        format!("GET /pipes/echo HTTP/1.1\r\nHost: localhost:{port}\r\nX-Slow: ").into_bytes();
    head.extend(std::iter::repeat_n(b'a', 200));
    let mut got = Vec::new();
    for b in head {
        if s.write_all(&[b]).await.is_err() || s.flush().await.is_err() {
            return Ok(t0.elapsed());
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(t0.elapsed()),
            // hyper may answer 408 before closing; keep reading until the end.
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
    Err(format!(
        "still open after the whole head ({:?}); got {:?}",
        t0.elapsed(),
        String::from_utf8_lossy(&got)
    ))
}

/// One slowloris connection one level down: a ClientHello one byte per 200 ms.
async fn slow_tls(port: u16, hello: Vec<u8>) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = tcp(port, None).await.map_err(|e| e.to_string())?;
    for b in hello {
        if s.write_all(&[b]).await.is_err() {
            return Ok(t0.elapsed());
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(t0.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
    Err(format!(
        "still open after the whole ClientHello ({:?})",
        t0.elapsed()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_handshake_timeout() {
    let t = Target::standard();
    let port = t.port();
    let hello = client_hello(&t.fx);
    let mut tasks = Vec::new();
    let cfg = client_config(&t.fx, Who::Cert("alice"));
    for _ in 0..50 {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(
            async move { ("http", slow_http(cfg, port).await) },
        ));
    }
    for _ in 0..10 {
        let hello = hello.clone();
        tasks.push(tokio::spawn(
            async move { ("tls", slow_tls(port, hello).await) },
        ));
    }
    // While 60 slow clients hold connections, a normal client is served.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = normal_session(&t.fx, port, None).await;
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await.expect("slowloris task") {
            (kind, Ok(d)) => times.push((kind, d)),
            (kind, Err(e)) => failures.push(format!("{kind}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "slowloris connections not closed: {failures:#?}"
    );
    let bound = HANDSHAKE + Duration::from_millis(1500);
    let max = times.iter().map(|t| t.1).max().unwrap_or_default();
    let min = times.iter().map(|t| t.1).min().unwrap_or_default();
    eprintln!(
        "slowloris: 60 connections closed after {min:?}..{max:?} (handshake_timeout {HANDSHAKE:?})"
    );
    assert!(
        max < bound,
        "a slowloris connection lived {max:?} (handshake_timeout {HANDSHAKE:?}): {times:?}"
    );
    assert!(
        min >= HANDSHAKE - Duration::from_millis(300),
        "a slowloris connection was closed after only {min:?}, before the handshake timeout: {times:?}"
    );
    during.unwrap_or_else(|e| panic!("a normal session during the slowloris failed: {e}"));
    t.assert_healthy("slowloris (50 HTTP + 10 TLS connections)")
        .await;
}

// === 3. oversized headers ===

/// Sends a request head with `header_bytes` of header data (in one header or in many)
/// while reading the answer; returns the status (if any) and whether the connection
/// ended within 10 s.
async fn big_head(t: &Target, header_bytes: usize, many: bool) -> (Option<u16>, bool) {
    let s = tls(&t.fx, t.port(), Who::Cert("alice"), None)
        .await
        .expect("tls");
    let (mut r, mut w) = tokio::io::split(s);
    let mut req = format!(
        "GET /pipes/echo HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: pipebridge.v1\r\n",
        t.port()
    )
    .into_bytes();
    if many {
        let mut i = 0;
        while req.len() < header_bytes {
            req.extend(format!("X-Pad-{i}: {}\r\n", "p".repeat(90)).bytes());
            i += 1;
        }
    } else {
        req.extend(b"X-Big: ");
        req.extend(std::iter::repeat_n(b'b', header_bytes));
        req.extend(b"\r\n");
    }
    req.extend(b"\r\n");
    let writer = async move {
        for c in req.chunks(16 * 1024) {
            if w.write_all(c).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
        w
    };
    let reader = async {
        let mut buf = Vec::new();
        let status = read_head(&mut r, &mut buf).await.ok().map(|h| h.status);
        if status == Some(101) {
            return (status, false);
        }
        // Then the connection must end.
        let mut chunk = [0u8; 4096];
        let ended = loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            }
        };
        (status, ended)
    };
    let both = async { tokio::join!(writer, reader) };
    match tokio::time::timeout(Duration::from_secs(10), both).await {
        Ok((_w, (status, ended))) => (status, ended),
        Err(_) => (None, false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_or_400() {
    let t = Target::standard();
    // Under the limit (8 KiB of headers): a normal upgrade.
    let (status, _) = big_head(&t, 8 * 1024, false).await;
    assert_eq!(status, Some(101), "an 8 KiB head under the 16 KiB limit");
    for (bytes, many, what) in [
        (20 * 1024, false, "one 20 KiB header"),
        (20 * 1024, true, "~200 headers of 100 bytes"),
        (64 * 1024, true, "64 KiB of headers"),
        (1 << 20, false, "a 1 MiB header"),
    ] {
        let (status, ended) = big_head(&t, bytes, many).await;
        eprintln!("oversized headers: {what}: status {status:?}, connection ended: {ended}");
        assert!(
            matches!(status, Some(431) | Some(400)),
            "{what}: want 431 or 400 from hyper, got {status:?}"
        );
        assert!(
            ended,
            "{what}: the connection stayed open after the refusal"
        );
        let rss = t.rss_kb();
        assert!(rss < RSS_BOUND_KB, "{what}: VmRSS {rss} KiB");
    }
    // Many small headers (1.5 KiB in all, but over hyper's count limit of 100).
    let mut req = String::from_utf8(upgrade(t.port(), "/pipes/echo", Some("pipebridge.v1"), ""))
        .expect("utf8");
    req.truncate(req.len() - 2);
    for i in 0..150 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    match exchange(&t.fx, t.port(), Who::Cert("alice"), None, req.as_bytes()).await {
        Ok((h, _, _)) => {
            eprintln!("oversized headers: 150 small headers: status {}", h.status);
            assert!(
                h.status == 431 || h.status == 400,
                "150 headers: want 431 or 400, got {}",
                h.status
            );
        }
        Err(e) => panic!("150 headers: no answer: {e}"),
    }
    t.assert_healthy("oversized headers").await;
}

// === 4. names, subprotocols ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_nul_and_percent_names_get_400_json() {
    let t = Target::standard();
    let port = t.port();
    let long = format!("/pipes/{}", "a".repeat(129));
    let paths = [
        "/pipes/..",
        "/pipes/.",
        "/pipes/../echo",
        "/pipes/../../../../etc/passwd",
        "/pipes/..%2f..%2fetc%2fpasswd",
        "/pipes/%2e%2e",
        "/pipes/%2e%2e%2fecho",
        "/pipes/ech%6f",
        "/pipes/echo%00",
        "/pipes/%00",
        "/pipes/a%2Fb",
        "/pipes/a/b",
        "/pipes//etc/passwd",
        "/pipes/echo/",
        "/pipes/.echo",
        "/pipes/echo%20",
        "/pipes/~root",
        "/pipes/echo;x",
        "/pipes/..\\..\\echo",
        long.as_str(),
    ];
    for path in paths {
        for who in [Who::Cert("alice"), Who::Nobody] {
            let h = request(
                &t.fx,
                port,
                who,
                &upgrade(port, path, Some("pipebridge.v1"), ""),
            )
            .await;
            h.expect_refusal(400, "bad_request", path);
        }
    }
    // Queries are checked as strictly.
    for path in [
        "/pipes/echo?direction=sideways",
        "/pipes/echo?mode=..%2f..",
        "/pipes/echo?mode=byte%00",
    ] {
        let h = request(
            &t.fx,
            port,
            Who::Cert("alice"),
            &upgrade(port, path, Some("pipebridge.v1"), ""),
        )
        .await;
        h.expect_refusal(400, "bad_request", path);
    }
    // A literal NUL (or a space, a DEL) in the request line: hyper's bare 400 (DESIGN.md:
    // "a literal NUL ... may get hyper's bare 400"); never a session.
    for path in ["/pipes/ec\0ho", "/pipes/ec ho", "/pipes/ec\x7fho"] {
        let req = upgrade(port, path, Some("pipebridge.v1"), "");
        match exchange(&t.fx, port, Who::Cert("alice"), None, &req).await {
            Ok((h, _, _)) => {
                eprintln!(
                    "{path:?}: {} {:?}",
                    h.status,
                    String::from_utf8_lossy(&h.body)
                );
                assert_eq!(
                    h.status,
                    400,
                    "{path:?}: {:?}",
                    String::from_utf8_lossy(&h.body)
                );
            }
            Err(e) => eprintln!("{path:?}: no response ({e}); the connection was refused"),
        }
    }
    // A valid name that is no pipe: the same 403 as a disallowed one.
    let h = request(
        &t.fx,
        port,
        Who::Cert("alice"),
        &upgrade(port, "/pipes/etc", Some("pipebridge.v1"), ""),
    )
    .await;
    h.expect_refusal(403, "forbidden", "/pipes/etc");
    t.assert_healthy("traversal, NUL and percent names").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_subprotocols_get_400_json() {
    let t = Target::standard();
    let port = t.port();
    for proto in [
        Some("chat"),
        Some("pipebridge.v2"),
        Some("pipebridge.v1x"),
        Some("PIPEBRIDGE"),
        Some(""),
        None,
    ] {
        let h = request(
            &t.fx,
            port,
            Who::Cert("alice"),
            &upgrade(port, "/pipes/echo", proto, ""),
        )
        .await;
        h.expect_refusal(400, "bad_request", &format!("subprotocol {proto:?}"));
    }
    // A wrong WebSocket version and a missing key are 400 as well.
    let v8 = String::from_utf8(upgrade(port, "/pipes/echo", Some("pipebridge.v1"), ""))
        .expect("utf8")
        .replace("Version: 13", "Version: 8");
    request(&t.fx, port, Who::Cert("alice"), v8.as_bytes())
        .await
        .expect_refusal(400, "bad_request", "version 8");
    let nokey = String::from_utf8(upgrade(port, "/pipes/echo", Some("pipebridge.v1"), ""))
        .expect("utf8")
        .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    request(&t.fx, port, Who::Cert("alice"), nokey.as_bytes())
        .await
        .expect_refusal(400, "bad_request", "no key");
    // No upgrade at all: 426.
    let plain = format!("GET /pipes/echo HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    request(&t.fx, port, Who::Cert("alice"), plain.as_bytes())
        .await
        .expect_refusal(426, "upgrade_required", "plain GET");
    t.assert_healthy("wrong subprotocols").await;
}

// === 5. WebSocket frames after the upgrade ===
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_limit_close_with_1009() {
    let t = Target::standard();
    // Frame headers announcing 1 MiB + 1, 4 GiB and 2^63-1 bytes: refused from the header
    // alone (no payload is sent, so none of it can be buffered).
    for len in [BYTE_LIMIT + 1, 4 << 30, i64::MAX as u64] {
        let e = probe(
            &t,
            "/pipes/echo",
            &frame_header(true, 0, OP_BINARY, KEY, len),
        )
        .await;
        e.expect(
            &[1009],
            "message_too_big",
            &format!("a {len}-byte frame header"),
        );
        assert!(e.after < Duration::from_secs(2), "1009 after {:?}", e.after);
        assert!(e.data.is_empty(), "nothing may be echoed: {e:?}");
        let rss = t.rss_kb();
        assert!(
            rss < RSS_BOUND_KB,
            "VmRSS {rss} KiB after a {len}-byte header"
        );
    }
    // A whole binary frame of 1 MiB + 1, sent in full.
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let big = binary(&vec![b'x'; BYTE_LIMIT as usize + 1]);
    let e = raw.send_until_close(&big, Duration::from_secs(10)).await;
    e.expect(&[1009], "message_too_big", "a full 1 MiB + 1 binary frame");
    assert!(e.data.is_empty(), "nothing may be echoed");
    // Exactly at the limit is fine: 1 MiB echoed whole, then Close 1000.
    let data = random_bytes(BYTE_LIMIT as usize);
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let mut bytes = binary(&data);
    bytes.extend(text(r#"{"type":"eof"}"#));
    let e = raw.send_until_close(&bytes, Duration::from_secs(20)).await;
    assert_eq!(
        e.code(),
        Some(1000),
        "a 1 MiB frame: {:?}",
        (&e.close, &e.other, &e.texts)
    );
    assert!(
        e.data == data,
        "the 1 MiB frame came back different ({} bytes)",
        e.data.len()
    );
    t.assert_healthy("frames over the limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_forever_close_with_1009() {
    let t = Target::standard();
    let chunk = vec![0x42u8; 64 * 1024];
    for (first, what) in [(OP_BINARY, "binary"), (OP_TEXT, "text")] {
        // A first frame without FIN, then continuation frames without FIN: 4 MiB offered,
        // the limit is 1 MiB.
        let mut bytes = frame(false, 0, first, KEY, &chunk);
        for _ in 0..63 {
            bytes.extend(frame(false, 0, OP_CONT, KEY, &chunk));
        }
        let mut raw = Raw::open(&t, "/pipes/echo").await;
        let e = raw.send_until_close(&bytes, Duration::from_secs(10)).await;
        e.expect(
            &[1009],
            "message_too_big",
            &format!("{what} fragments forever"),
        );
        assert!(
            e.data.is_empty(),
            "nothing may be delivered: {} bytes",
            e.data.len()
        );
        let rss = t.rss_kb();
        assert!(rss < RSS_BOUND_KB, "VmRSS {rss} KiB after {what} fragments");
    }
    // Empty fragments forever never grow the message: 200,000 of them cost the gateway
    // CPU only; memory stays flat and the session still works when the message ends.
    let rss0 = t.rss_kb();
    let mut bytes = frame(false, 0, OP_BINARY, KEY, b"");
    for _ in 0..200_000 {
        bytes.extend(frame(false, 0, OP_CONT, KEY, b""));
    }
    bytes.extend(frame(true, 0, OP_CONT, KEY, b"end"));
    bytes.extend(text(r#"{"type":"eof"}"#));
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let e = raw.send_until_close(&bytes, Duration::from_secs(30)).await;
    assert_eq!(
        e.code(),
        Some(1000),
        "empty fragments: {:?}",
        (&e.close, &e.other)
    );
    assert_eq!(e.data, b"end", "empty fragments: the message after them");
    let rss1 = t.rss_kb();
    eprintln!("200,000 empty fragments: VmRSS {rss0} -> {rss1} KiB");
    assert!(
        rss1 < rss0 + 16 * 1024,
        "VmRSS grew from {rss0} to {rss1} KiB"
    );
    t.assert_healthy("fragments forever").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1008() {
    let t = Target::standard();
    let mut codes = Vec::new();
    let two = |a: Vec<u8>, b: Vec<u8>| [a, b].concat();
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        // RFC 6455 §5.1: a server MUST close on an unmasked client frame. The gateway
        // maps every WebSocket protocol violation to its `protocol_error` kind, whose
        // Close code is 1008 (DESIGN.md lists 1000/1001/1008/1009/1011, not 1002), as
        // SECURITY.md documents; so 1008 exactly.
        (
            "an unmasked binary frame",
            frame(true, 0, OP_BINARY, None, b"hello"),
            &[1008],
        ),
        (
            "an unmasked text frame",
            frame(true, 0, OP_TEXT, None, br#"{"type":"eof"}"#),
            &[1008],
        ),
        (
            "RSV1 set without an extension",
            frame(true, 4, OP_BINARY, KEY, b"x"),
            &[1008],
        ),
        (
            "RSV3 set on a text frame",
            frame(true, 1, OP_TEXT, KEY, b"{}"),
            &[1008],
        ),
        (
            "reserved data opcode 0x3",
            frame(true, 0, 0x3, KEY, b"x"),
            &[1008],
        ),
        (
            "reserved control opcode 0xB",
            frame(true, 0, 0xB, KEY, b""),
            &[1008],
        ),
        (
            "a fragmented ping",
            frame(false, 0, OP_PING, KEY, b"p"),
            &[1008],
        ),
        (
            "a ping of 126 bytes",
            frame(true, 0, OP_PING, KEY, &[0u8; 126]),
            &[1008],
        ),
        (
            "a continuation without a start",
            frame(true, 0, OP_CONT, KEY, b"x"),
            &[1008],
        ),
        (
            "a new message inside a fragmented one",
            two(
                frame(false, 0, OP_BINARY, KEY, b"a"),
                frame(true, 0, OP_BINARY, KEY, b"b"),
            ),
            &[1008],
        ),
        // Invalid UTF-8 in a text message: RFC 6455 suggests 1007; the gateway treats it
        // as a protocol error (1008). Either is accepted, the kind must be protocol_error.
        (
            "a text frame with invalid UTF-8",
            frame(true, 0, OP_TEXT, KEY, &[0xff, 0xfe, 0x80]),
            &[1007, 1008],
        ),
        (
            "invalid UTF-8 across text fragments",
            two(
                frame(false, 0, OP_TEXT, KEY, &[b'{', 0xe2, 0x82]),
                frame(true, 0, OP_CONT, KEY, &[0x28, b'}']),
            ),
            &[1007, 1008],
        ),
        (
            "an overlong UTF-8 encoding",
            frame(true, 0, OP_TEXT, KEY, &[0xc0, 0xaf]),
            &[1007, 1008],
        ),
        (
            "a UTF-16 surrogate in UTF-8",
            frame(true, 0, OP_TEXT, KEY, &[0xed, 0xa0, 0x80]),
            &[1007, 1008],
        ),
    ];
    for (what, bytes, want) in cases {
        let e = probe(&t, "/pipes/echo", &bytes).await;
        let code = e.expect(want, "protocol_error", what);
        assert!(
            e.after < Duration::from_secs(2),
            "{what}: Close after {:?}",
            e.after
        );
        assert!(
            e.data.is_empty(),
            "{what}: data was delivered: {:?}",
            e.data
        );
        codes.push(format!("{what}: {code}"));
    }
    eprintln!("protocol violations:\n  {}", codes.join("\n  "));
    t.assert_healthy("protocol violations").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_controls_are_ignored_and_malformed_ones_close_with_1008() {
    let t = Target::standard();
    // Unknown control types are ignored (forward compatibility): the session goes on.
    let data = random_bytes(100_000);
    let mut bytes = text(r#"{"type":"hello"}"#);
    bytes.extend(text(
        r#"{"type":"hello","from":"the future","n":[1,2,{"x":null}]}"#,
    ));
    bytes.extend(binary(&data[..50_000]));
    bytes.extend(text(r#"{"type":"resize","rows":24}"#));
    bytes.extend(binary(&data[50_000..]));
    bytes.extend(text(r#"{"type":"eof"}"#));
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let e = raw.send_until_close(&bytes, Duration::from_secs(15)).await;
    assert_eq!(
        e.code(),
        Some(1000),
        "unknown controls: {:?}",
        (&e.close, &e.other, &e.texts)
    );
    assert!(
        e.data == data,
        "unknown controls: echo differs ({} bytes)",
        e.data.len()
    );
    assert!(
        e.texts.iter().all(|t| !t.contains("error")),
        "unknown controls: {:?}",
        e.texts
    );

    // Malformed control JSON closes with 1008 protocol_error.
    let huge = format!(r#"{{"type":"hello","pad":"{}"}}"#, "x".repeat(5000));
    for (what, msg) in [
        ("truncated JSON", r#"{"type":"#),
        ("not JSON", "eof"),
        ("a JSON array", r#"["eof"]"#),
        ("a JSON string", r#""eof""#),
        ("a numeric type", r#"{"type":5}"#),
        ("no type", r#"{"kind":"eof"}"#),
        ("exit without code or signal", r#"{"type":"exit"}"#),
        ("exit with a float code", r#"{"type":"exit","code":1.5}"#),
        ("error without kind", r#"{"type":"error","message":"m"}"#),
        ("an empty text message", ""),
        ("a control over 4 KiB", huge.as_str()),
    ] {
        let e = probe(&t, "/pipes/echo", &text(msg)).await;
        e.expect(&[1008], "protocol_error", what);
    }
    // Data after our eof, and eof twice (the sink pipe's child never writes or exits, so
    // the session cannot end normally in between).
    let mut after = text(r#"{"type":"eof"}"#);
    after.extend(binary(b"late"));
    probe(&t, "/pipes/sink", &after)
        .await
        .expect(&[1008], "protocol_error", "data after eof");
    let mut twice = text(r#"{"type":"eof"}"#);
    twice.extend(text(r#"{"type":"eof"}"#));
    probe(&t, "/pipes/sink", &twice)
        .await
        .expect(&[1008], "protocol_error", "eof twice");
    t.assert_healthy("control messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_an_out_only_session_closes_with_1008() {
    let t = Target::standard();
    for path in ["/pipes/quiet", "/pipes/echo?direction=out"] {
        let mut raw = Raw::open(&t, path).await;
        raw.send(&binary(b"not allowed")).await;
        let e = raw.until_close(Duration::from_secs(10)).await;
        e.expect(&[1008], "forbidden_direction", path);
        assert!(e.data.is_empty(), "{path}: {:?}", e.data);
    }
    // An `in` request on the out-only pipe is refused before the upgrade (409).
    let h = request(
        &t.fx,
        t.port(),
        Who::Cert("alice"),
        &upgrade(
            t.port(),
            "/pipes/quiet?direction=in",
            Some("pipebridge.v1"),
            "",
        ),
    )
    .await;
    h.expect_refusal(409, "unsupported", "direction=in on an out pipe");
    t.assert_healthy("data in a forbidden direction").await;
}

/// Reads `stream` until `until`: Pongs' payloads into `pongs`, binary bytes counted.
async fn read_for(
    stream: &mut futures_util::stream::SplitStream<Ws>,
    until: tokio::time::Instant,
    pongs: &mut Vec<Vec<u8>>,
    bytes: &mut usize,
) {
    while let Ok(Some(m)) = tokio::time::timeout_at(until, stream.next()).await {
        match m.expect("a message") {
            Message::Pong(p) => pongs.push(p.to_vec()),
            Message::Binary(b) => *bytes += b.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// RFC 6455 5.5.2: a Ping is answered with a Pong even while the session's sink is
/// busy streaming (the latest Ping at least, 5.5.3). Before, a Ping that found the sink
/// held by a send waiting on backpressure went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_while_the_session_streams() {
    let t = Target::standard();
    let ws = ws_open(&t.fx, t.port(), None, "/pipes/zero")
        .await
        .expect("open the zero pipe");
    let (mut sink, mut stream) = ws.split();
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    let mut bytes = 0usize;
    // Twenty Pings while the data streams in, read slower than it comes: the
    // gateway's sends wait on backpressure, holding its sink, when the Pings land.
    for i in 0..20u8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sink.send(Message::Ping(vec![b'p', i].into()))
            .await
            .expect("send a ping");
        let until = tokio::time::Instant::now() + Duration::from_millis(5);
        read_for(&mut stream, until, &mut pongs, &mut bytes).await;
    }
    // The last one's Pong comes (behind data already sent), within 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pongs.iter().any(|p| p[..] == [b'p', 19]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last Ping was not answered in 10 s; Pongs: {pongs:?}"
        );
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        read_for(&mut stream, until, &mut pongs, &mut bytes).await;
    }
    // Pongs answer Pings, in order (some may be answered by a later one's Pong).
    let order: Vec<u8> = pongs.iter().map(|p| p[1]).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(bytes > 1 << 20, "the session streamed only {bytes} bytes");
    drop((sink, stream));
    t.assert_healthy("pings while streaming").await;
}

// === 6. a flood of connections ===

/// Raises this process's RLIMIT_NOFILE (soft, and hard when needed: root) to `need`,
/// so that the gateway started afterwards inherits it too.
fn raise_nofile(need: u64) -> Result<(), String> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let cur = lim.current.unwrap_or(u64::MAX);
    let max = lim.maximum.unwrap_or(u64::MAX);
    if cur >= need {
        return Ok(());
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(need),
            maximum: Some(max.max(need)),
        },
    )
    .map_err(|e| format!("setrlimit(NOFILE, {need}) with hard limit {max}: {e}"))
}

const FLOOD: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_2000_idle_connections_is_survived() {
    if let Err(e) = raise_nofile(FLOOD as u64 + 1024) {
        if std::env::var_os("CI").is_some() {
            panic!("cannot raise RLIMIT_NOFILE for the flood ({e}); CI is set, so this fails");
        }
        eprintln!("skipped a_flood_of_2000_idle_connections_is_survived: {e} (run as root)");
        return;
    }
    // A 10 s handshake timeout so that all 2,000 are held at once.
    let t = Target::start(
        "handshake_timeout = \"10s\"\nmax_auth_failures = 5\nauth_failure_window = \"3s\"",
    );
    let (port, pid) = (t.port(), t.pid());
    let (fds0, rss0) = (fd_count(pid), t.rss_kb());
    let t0 = Instant::now();
    // At most 64 connects in flight: the gateway listens with tokio's default backlog
    // of 128, so a bigger burst only adds SYN retransmissions (1 s each) to the count.
    let mut conns = Vec::with_capacity(FLOOD);
    let mut failed = Vec::new();
    let mut slow = 0;
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    while conns.len() + failed.len() < FLOOD {
        while started < FLOOD && set.len() < 64 {
            started += 1;
            set.spawn(async move {
                let a = Instant::now();
                let r = tcp(port, None).await;
                (a.elapsed(), Instant::now(), r)
            });
        }
        match set
            .join_next()
            .await
            .expect("a connect task")
            .expect("join")
        {
            (took, at, Ok(s)) => {
                if took > Duration::from_millis(900) {
                    slow += 1;
                }
                conns.push((at, s));
            }
            (_, _, Err(e)) => failed.push(e.to_string()),
        }
    }
    let opened = t0.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {FLOOD} connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Give the accept loop a moment, then look at the gateway while all are held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_flood = fd_count(pid);
    let rss_flood = t.rss_kb();
    // A real session during the flood.
    let during = normal_session(&t.fx, port, None).await;
    let rss_flood2 = t.rss_kb();
    eprintln!(
        "flood: {FLOOD} connections open after {opened:?} ({slow} needed a SYN retransmission); gateway fds {fds0} -> {fds_flood}, \
         VmRSS {rss0} -> {rss_flood} KiB ({rss_flood2} after a session during the flood)"
    );
    during.unwrap_or_else(|e| panic!("a normal session during the flood failed: {e}"));
    assert!(
        fds_flood >= fds0 + FLOOD * 9 / 10,
        "the gateway held only {} of the {FLOOD} connections at once",
        fds_flood.saturating_sub(fds0)
    );
    assert!(
        rss_flood.max(rss_flood2) < RSS_BOUND_KB,
        "VmRSS {rss_flood}/{rss_flood2} KiB during the flood"
    );
    // Every flood connection is ended by the gateway at the handshake timeout.
    let mut set = tokio::task::JoinSet::new();
    for (at, mut s) in conns {
        set.spawn(async move {
            let mut b = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await;
            let closed = matches!(r, Ok(Ok(0)) | Ok(Err(_)));
            (closed, at.elapsed())
        });
    }
    let mut lived = Vec::new();
    let mut open = 0;
    while let Some(r) = set.join_next().await {
        let (closed, life) = r.expect("reader task");
        if closed {
            lived.push(life);
        } else {
            open += 1;
        }
    }
    let longest = lived.iter().max().copied().unwrap_or_default();
    eprintln!(
        "flood: all closed by the gateway; longest lived {longest:?} (handshake_timeout 10s)"
    );
    assert_eq!(
        open, 0,
        "{open} flood connections were still open after 15 s"
    );
    assert!(
        longest < Duration::from_secs(13),
        "a flood connection lived {longest:?}"
    );
    // Its descriptors are released.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fd_count(pid) > fds0 + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fds1 = fd_count(pid);
    assert!(
        fds1 <= fds0 + 2,
        "gateway fds {fds0} before, {fds1} after the flood"
    );
    t.assert_healthy("a flood of 2,000 idle connections").await;
}

// === 7. repeated bad tokens ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_bad_tokens_are_rate_limited_per_address_and_counted() {
    let window = Duration::from_secs(4);
    let t = Target::start(
        "handshake_timeout = \"2s\"\nmax_auth_failures = 5\nauth_failure_window = \"4s\"",
    );
    let port = t.port();
    let with_token = |tok: &str| {
        upgrade(
            port,
            "/pipes/echo",
            Some("pipebridge.v1"),
            &format!("Authorization: Bearer {tok}\r\n"),
        )
    };
    // The good token works (successes are not counted).
    let h = request(&t.fx, port, Who::Nobody, &with_token(TOKEN)).await;
    assert_eq!(
        h.status,
        101,
        "the good token: {}",
        String::from_utf8_lossy(&h.body)
    );
    let first = Instant::now();
    for i in 0..5 {
        request(&t.fx, port, Who::Nobody, &with_token(&format!("bad-{i}")))
            .await
            .expect_refusal(401, "unauthenticated", &format!("bad token {i}"));
    }
    // Over max_auth_failures: 429, whatever the credentials, from this address (429 is
    // checked before 401 in DESIGN.md's order), sessions and listings alike.
    let mut limited = 0;
    for i in 0..5 {
        request(&t.fx, port, Who::Nobody, &with_token(&format!("more-{i}")))
            .await
            .expect_refusal(
                429,
                "rate_limited",
                &format!("bad token {} over the limit", 5 + i),
            );
        limited += 1;
    }
    request(&t.fx, port, Who::Nobody, &with_token(TOKEN))
        .await
        .expect_refusal(429, "rate_limited", "the good token while limited");
    limited += 1;
    request(
        &t.fx,
        port,
        Who::Cert("alice"),
        &upgrade(port, "/pipes/echo", Some("pipebridge.v1"), ""),
    )
    .await
    .expect_refusal(429, "rate_limited", "a good certificate while limited");
    limited += 1;
    let list =
        format!("GET /pipes HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    request(&t.fx, port, Who::Nobody, list.as_bytes())
        .await
        .expect_refusal(429, "rate_limited", "GET /pipes while limited");
    limited += 1;
    assert!(
        first.elapsed() < window,
        "the probes took {:?}, longer than the {window:?} window; the test cannot tell",
        first.elapsed()
    );
    // Another source address is not limited: a bad token there is a plain 401, a good
    // session works.
    let other = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let (h, _, _) = exchange(
        &t.fx,
        port,
        Who::Nobody,
        other,
        &with_token("bad-elsewhere"),
    )
    .await
    .expect("request from 127.0.0.2");
    h.expect_refusal(401, "unauthenticated", "a bad token from 127.0.0.2");
    t.assert_healthy_from("bad tokens from 127.0.0.1 (session from 127.0.0.2)", other)
        .await;
    // Counted.
    let (status, m) = admin_get(&t.admin, "/metrics");
    assert_eq!(status, 200);
    let rl = sample(&m, "pipebridge_refusals_total{reason=\"rate_limited\"}");
    let un = sample(&m, "pipebridge_refusals_total{reason=\"unauthenticated\"}");
    eprintln!("rate limit: {limited} answers 429, metrics rate_limited={rl} unauthenticated={un}");
    assert_eq!(
        rl, limited as f64,
        "pipebridge_refusals_total{{reason=\"rate_limited\"}}:\n{m}"
    );
    assert_eq!(
        un, 6.0,
        "pipebridge_refusals_total{{reason=\"unauthenticated\"}}"
    );
    // After the window, 127.0.0.1 is served again.
    let wait = window.saturating_sub(first.elapsed()) + Duration::from_millis(300);
    tokio::time::sleep(wait).await;
    t.assert_healthy("bad tokens, after the window").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_session_ends_its_stream_right_after_its_close() {
    let t = Target::standard();
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let data = random_bytes(1000);
    let mut bytes = binary(&data);
    bytes.extend(text(r#"{"type":"eof"}"#));
    raw.send(&bytes).await;
    let (end, close) = read_until_close(&mut raw.r, &mut raw.buf, Duration::from_secs(10)).await;
    assert_eq!(end.code(), Some(1000), "echo session: {end:?}");
    assert!(end.data == data, "echo of {} bytes", end.data.len());
    assert!(close.is_some());
    // Our Close is not sent yet. The gateway has nothing to send after its Close, so
    // the end of its stream (TLS close_notify) follows at once: a peer can answer with
    // its Close and its own end together (one round trip, not two).
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), raw.r.read(&mut rest))
        .await
        .expect("no end of stream within 3 s of the gateway's Close (it waited for ours)")
        .expect("read after the Close");
    assert_eq!(n, 0, "bytes after the Close: {:?}", &rest[..n]);
    // Our Close still goes through (the gateway reads on after its end of stream).
    raw.send(&frame(true, 0, OP_CLOSE, KEY, &1000u16.to_be_bytes()))
        .await;
    t.assert_healthy("a session that ended with a Close and an end of stream")
        .await;
}

// === 8. pipelined frames, a reader that never reads ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let t = Target::standard();
    // The request, data and eof in one write: the bytes after the request head must
    // reach the session (a client may pipeline its first frames).
    let data = random_bytes(3000);
    let mut bytes = upgrade(t.port(), "/pipes/echo", Some("pipebridge.v1"), "");
    bytes.extend(binary(&data));
    bytes.extend(text(r#"{"type":"eof"}"#));
    let (head, s, buf) = exchange(&t.fx, t.port(), Who::Cert("alice"), None, &bytes)
        .await
        .expect("pipelined upgrade");
    assert_eq!(head.status, 101);
    let (r, w) = tokio::io::split(s);
    let mut raw = Raw { r, w, buf };
    let e = raw.until_close(Duration::from_secs(10)).await;
    assert_eq!(e.code(), Some(1000), "pipelined frames: {e:?}");
    assert!(
        e.data == data,
        "pipelined frames: echo of {} bytes",
        e.data.len()
    );
    t.assert_healthy("pipelined frames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_keeps_gateway_memory_bounded() {
    let t = Target::standard();
    let rss0 = t.rss_kb();
    // Upgrade on a pipe that produces without end, then never read: the gateway must be
    // held back by TCP backpressure, not buffer the output.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Raw::open(&t, "/pipes/zero").await);
    }
    let mut peak = rss0;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(t.rss_kb());
    }
    eprintln!(
        "4 sessions never read from an endless pipe: VmRSS {rss0} -> peak {peak} KiB over 3 s"
    );
    assert!(
        peak < rss0 + 32 * 1024,
        "VmRSS grew from {rss0} to {peak} KiB with 4 non-reading clients"
    );
    t.assert_healthy("clients that never read (while they hold their sessions)")
        .await;
    drop(held);
    t.assert_healthy("clients that never read").await;
}

// === HTTP/2 ===

/// [`client_config`] offering HTTP/2 only.
fn h2_config(fx: &Fixture, who: Who<'_>) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*client_config(fx, who)).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// An HTTP/2 connection to the gateway as alice, once the gateway's SETTINGS (extended
/// CONNECT) are in: its request handle, its ping handle and the task driving it.
async fn h2_client(
    t: &Target,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::PingPong,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let s = tls_with(h2_config(&t.fx, Who::Cert("alice")), t.port(), None)
        .await
        .expect("TLS");
    let (client, mut conn) = h2::client::handshake(s).await.expect("HTTP/2 handshake");
    let pings = conn.ping_pong().expect("ping handle");
    let conn = tokio::spawn(conn);
    let client = client.ready().await.expect("ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_extended_connect_protocol_enabled() {
        assert!(
            Instant::now() < deadline,
            "no extended CONNECT from the gateway"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (client, pings, conn)
}

/// Opens a session on `pipe` over the HTTP/2 connection `client`.
async fn h2_session(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    port: u16,
    pipe: &str,
) -> (h2::SendStream<bytes::Bytes>, h2::RecvStream) {
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .version(hyper::Version::HTTP_2)
        .uri(format!("https://localhost:{port}/pipes/{pipe}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "pipebridge.v1")
        .body(())
        .expect("request");
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let ready = client.clone().ready().await.expect("ready");
    *client = ready;
    let (resp, stream) = client.send_request(req, false).expect("send request");
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no answer")
        .expect("response");
    assert_eq!(resp.status(), 200, "the session on {pipe} opens");
    (stream, resp.into_body())
}

/// Sessions whose local writer is blocked, with their HTTP/2 windows full of small
/// messages (many sessions of 30-byte ones, or one of 1-byte DATA frames as a hostile
/// peer sends them), cost the gateway their bytes, not h2's bookkeeping of about 256
/// bytes a frame: the frames are taken out of h2 while the write waits. The connection
/// goes on carrying sessions. Before, every frame stayed in h2 until read: under h2's
/// default limit (half the connection window, about 1 GiB at ours) a peer's 1-byte
/// frames made the gateway hold hundreds of MiB per session, and under a tighter one
/// ordinary stalled sessions of small messages ended the connection (ENHANCE_YOUR_CALM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_http2_frames_into_stalled_sessions_cost_only_their_bytes() {
    let t = Target::standard();
    let (mut client, mut pings, mut conn) = h2_client(&t).await;
    let rss0 = t.rss_kb();
    let mut streams = Vec::new();
    for i in 0..4 {
        let (mut stream, body) = h2_session(&mut client, t.port(), "sink").await;
        // A message bigger than the child's stdin pipe (it never reads): the gateway's
        // write blocks.
        let len = 512 * 1024;
        let mut first = frame_header(true, 0, OP_BINARY, Some([0; 4]), len);
        first.resize(first.len() + len as usize, 0);
        stream
            .send_data(bytes::Bytes::from(first), false)
            .expect("first message");
        if i == 0 {
            // A message whose bytes come one per DATA frame.
            let n = 200_000;
            stream
                .send_data(
                    bytes::Bytes::from(frame_header(true, 0, OP_BINARY, Some([0; 4]), n)),
                    false,
                )
                .expect("header");
            // In batches a little apart: h2 counts what it holds between the session's
            // turns against its budget (32 MiB, about 130,000 such frames), and a
            // loaded machine may give the gateway's connection task many batches at once.
            for _ in 0..n / 10_000 {
                for _ in 0..10_000 {
                    stream
                        .send_data(bytes::Bytes::from_static(&[7]), false)
                        .expect("1-byte frame");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            // 30-byte messages, one per DATA frame.
            let msg = bytes::Bytes::from(frame(true, 0, OP_BINARY, Some([0; 4]), &[7; 30]));
            for _ in 0..4 {
                for _ in 0..10_000 {
                    stream.send_data(msg.clone(), false).expect("small message");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        streams.push((stream, body));
    }
    // h2 sends a PING ahead of data still queued: its answer, then 2 s, for the frames
    // to have reached the gateway (2.6 MB over loopback).
    tokio::time::timeout(Duration::from_secs(20), pings.ping(h2::Ping::opaque()))
        .await
        .expect("no answer to a ping after the frames")
        .expect("ping");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = t.rss_kb();
    assert!(
        !conn.is_finished(),
        "the gateway ended the connection: {:?}",
        (&mut conn).await
    );
    eprintln!("small frames into 4 stalled sessions: VmRSS {rss0} -> {rss} KiB");
    // Their bytes (2.3 MB), the stalled writes' buffers and what h2 holds between the
    // sessions' turns (at most its 32 MiB budget, else the connection would have ended
    // above), not h2's bookkeeping of 320,000 frames (about 80 MiB).
    assert!(
        rss < rss0 + 64 * 1024,
        "VmRSS grew from {rss0} to {rss} KiB"
    );
    // The connection still carries a session.
    let (mut stream, mut body) = h2_session(&mut client, t.port(), "echo").await;
    stream
        .send_data(
            bytes::Bytes::from(frame(true, 0, OP_BINARY, KEY, b"still here")),
            false,
        )
        .expect("send");
    let mut got = Vec::new();
    let want = [&[0x82u8, 10][..], b"still here"].concat();
    while got.len() < want.len() {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("no echo")
            .expect("stream open")
            .expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, want, "the echo on the same connection");
    drop(streams);
    conn.abort();
    t.assert_healthy("small HTTP/2 frames into stalled sessions")
        .await;
}

/// An HTTP/2 connection that sends no request, and answers neither pings nor the PING
/// that follows a GOAWAY, is dropped about two handshake timeouts after it opened: one
/// to authenticate a request, one to close once told to. It lived for the idle limit
/// (90 s by default) on HTTP/2 alone, and after a GOAWAY until its peer answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_never_authenticates_is_dropped() {
    let t = Target::standard();
    let mut s = tls_with(h2_config(&t.fx, Who::Nobody), t.port(), None)
        .await
        .expect("TLS");
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 offered"
    );
    // The connection preface and an empty SETTINGS frame; nothing more, ever.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    s.write_all(&hello).await.expect("preface");
    s.flush().await.expect("flush");
    let opened = Instant::now();
    let mut buf = vec![0u8; 4096];
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return opened.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection was still open after 30 s"));
    eprintln!("an HTTP/2 connection that never authenticated was dropped after {end:?}");
    assert!(
        end < HANDSHAKE * 2 + Duration::from_secs(4),
        "dropped after {end:?}, past twice the handshake timeout ({HANDSHAKE:?})"
    );
    t.assert_healthy("an HTTP/2 connection that never authenticated")
        .await;
}

/// A Close frame's reason is the peer's text: a newline or a terminal escape in it is
/// logged as an escape, so it cannot start a forged line in the text log (the audit
/// line's `close_reason` was written raw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_close_reason_cannot_forge_log_lines() {
    let mut t = Target::standard();
    let mut raw = Raw::open(&t, "/pipes/echo").await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye\nFORGED INFO pipebridge::audit: identity=admin\x1b[2J");
    raw.send(&frame(true, 0, OP_CLOSE, KEY, &payload)).await;
    let _ = raw.until_close(Duration::from_secs(10)).await;
    t.gw.proc.wait_until(Duration::from_secs(10), |log| {
        log.lines()
            .any(|l| l.contains("session end") && l.contains("bye"))
    });
    let log = t.gw.log();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged line:\n{}",
        tail(&log, 10)
    );
    assert!(
        !log.contains('\x1b'),
        "a raw escape in the log:\n{}",
        tail(&log, 10)
    );
    assert!(
        log.contains("bye\\nFORGED"),
        "the reason, escaped:\n{}",
        tail(&log, 10)
    );
}

/// An HTTP/2 connection whose one request authenticated is not taken for one that
/// never did: past the handshake timeout it still carries new sessions. (The check
/// read whether a request had authenticated when it began to wait, before the
/// request's task ran, and sent GOAWAY at the handshake timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_http2_connection_outlives_the_handshake_timeout() {
    let t = Target::standard();
    let (mut client, _pings, conn) = h2_client(&t).await;
    let first = h2_session(&mut client, t.port(), "echo").await;
    tokio::time::sleep(HANDSHAKE + Duration::from_secs(2)).await;
    assert!(!conn.is_finished(), "the connection ended");
    let second = h2_session(&mut client, t.port(), "echo").await;
    drop((first, second));
    conn.abort();
}
