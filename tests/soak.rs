//! Soak test (hardening issue): many concurrent sessions through the real gateway
//! binaries, across three identities (alice, bob, carol) and several pipe kinds, with
//! random sizes and half-closes, every byte verified by SHA-256 (zero loss, zero
//! reorder; message boundaries too in message mode), and no growth of the exporting
//! gateway's (and the forwarding gateway's) file descriptors, threads or resident memory
//! between a warm-up point and the end.
//!
//! Pipe kinds: a Unix echo server reached through a forward gateway (one forward per
//! identity), `exec:cat`, a SOCK_SEQPACKET echo server (in-test WebSocket client in
//! message mode, and `pipebridge connect --mode message --framing u32be`), `connect` in
//! byte mode, and FIFOs in both directions.
//!
//! Duration: `PIPEBRIDGE_SOAK_SECS` (default 20: the short CI mode; set e.g. 3600 by
//! hand for a long run), of which a fifth (at least 3 s) is warm-up. Concurrency of
//! the in-test WebSocket clients: `PIPEBRIDGE_SOAK_CLIENTS` (default 10).
//!
//! Resource tolerances, measured with no session live (after the warm-up and at the
//! end): open fds equal; threads at most warm-up + 2 (tokio's blocking pool may keep an
//! extra idle thread for a few seconds); VmRSS at most 1.5 x warm-up + 10 MiB.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

const IDENTITIES: [&str; 3] = ["alice", "bob", "carol"];

/// Bound on one session of the workload.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// === /proc ===

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kb: u64,
}

fn usage(pid: u32) -> Usage {
    let count = |d: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{d}"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    Usage {
        fds: count("fd"),
        threads: count("task"),
        rss_kb: rss_kb(pid),
    }
}

/// `pid`'s established TCP connections to `port` on loopback (the forwarding gateway's
/// warm HTTP/2 connections to the exporting one).
fn tcp_conns_to(pid: u32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let want_port = format!(":{port:04X}");
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state, ..., inode (field 9).
            if f.len() > 9
                && f[2].ends_with(&want_port)
                && f[3] == "01"
                && inodes.iter().any(|i| i == f[9])
            {
                n += 1;
            }
        }
    }
    n
}

/// The number of shards a gateway started by this test runs (the test harness scrubs
/// `PIPEBRIDGE_SHARDS`, so one per core, at most 256: `shard::configured`).
fn gateway_shards() -> usize {
    thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(256)
}

// === random data ===

/// xorshift64*: cheap, reproducible bytes and choices.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut s = [0u8; 8];
        getrandom::fill(&mut s).expect("getrandom");
        Rng(u64::from_le_bytes(s) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        v
    }

    /// Random bytes of a random session size.
    fn data(&mut self) -> Vec<u8> {
        let n = self.size();
        self.bytes(n)
    }

    /// A session size: often small, sometimes large, now and then empty.
    fn size(&mut self) -> usize {
        match self.below(20) {
            0 => 0,
            1..=8 => self.below(4096) as usize + 1,
            9..=16 => self.below(256 * 1024) as usize + 1,
            _ => self.below(2 << 20) as usize + 1,
        }
    }
}

// === local servers ===

fn seq_socket() -> OwnedFd {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("seqpacket socket")
}

/// A SOCK_SEQPACKET server answering every record with the same record.
fn seq_echo_server(path: &Path) {
    let fd = seq_socket();
    rustix::net::bind(&fd, &SocketAddrUnix::new(path).expect("addr")).expect("bind seqpacket");
    rustix::net::listen(&fd, 128).expect("listen");
    thread::spawn(move || {
        while let Ok(c) = rustix::net::accept(&fd) {
            thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    match rustix::net::recv(&c, &mut buf[..], RecvFlags::TRUNC) {
                        Ok((_, 0)) | Err(_) => break,
                        Ok((n, full)) => {
                            assert!(full <= n, "a {full}-byte record was truncated");
                            if rustix::net::send(&c, &buf[..n], SendFlags::NOSIGNAL).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

// === WebSocket clients ===

type Ws = tokio_tungstenite::WebSocketStream<TlsStream>;

/// Opens a session on `path` as `who`; `Err` on any failure.
async fn ws_open(fx: &Fixture, port: u16, who: &str, path: &str) -> Result<Ws, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(client_config(fx, who))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let req = upgrade_request(port, path, "pipebridge.v1", "");
    s.write_all(&req).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before the 101: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("not upgraded: {head:?}"));
    }
    Ok(tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        buf[end..].to_vec(),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await)
}

/// Client TLS configs per identity, built once.
fn client_config(fx: &Fixture, who: &str) -> Arc<rustls::ClientConfig> {
    static CACHE: Mutex<Vec<(PathBuf, Arc<rustls::ClientConfig>)>> = Mutex::new(Vec::new());
    let key = fx.path(&format!("pki/{who}.pem"));
    if let Some((_, c)) = CACHE.lock().unwrap().iter().find(|(k, _)| *k == key) {
        return c.clone();
    }
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fx.ca()).expect("read CA") {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(fx.cert(who))
        .expect("read cert")
        .map(|c| c.expect("cert PEM"))
        .collect();
    let pk = PrivateKeyDer::from_pem_file(fx.key(who)).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, pk)
        .expect("client cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    CACHE.lock().unwrap().push((key, cfg.clone()));
    cfg
}

/// One session: sends `msgs` as binary messages then `eof` (a half-close) while
/// collecting what comes back until the gateway's `eof` and Close 1000. Returns the
/// received messages.
async fn ws_session(ws: Ws, msgs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, String> {
    let (mut sink, mut stream) = ws.split();
    let send = async move {
        for m in msgs {
            sink.send(Message::binary(m))
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        sink.send(Message::text(r#"{"type":"eof"}"#))
            .await
            .map_err(|e| format!("send eof: {e}"))?;
        Ok::<_, String>(sink)
    };
    let recv = async move {
        let mut got = Vec::new();
        let mut eof = false;
        loop {
            match stream.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if eof {
                        return Err("data after the gateway's eof".to_string());
                    }
                    got.push(b.to_vec());
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str())
                        .map_err(|e| format!("control {t:?}: {e}"))?;
                    match v["type"].as_str() {
                        Some("eof") => eof = true,
                        Some("exit") => {}
                        _ => return Err(format!("unexpected control {t}")),
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
    let _sink = s?;
    r
}

fn digest(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Splits `data` into messages of random sizes (1 B .. 128 KiB).
fn chunks(rng: &mut Rng, data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = (rng.below(128 * 1024) as usize + 1).min(data.len() - at);
        out.push(data[at..at + n].to_vec());
        at += n;
    }
    out
}

// === the workload ===

#[derive(Default)]
struct Stats {
    sessions: AtomicU64,
    bytes: AtomicU64,
    failures: Mutex<Vec<String>>,
    by_kind: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Stats {
    fn ok(&self, kind: &'static str, bytes: usize) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        *self.by_kind.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

struct Soak {
    fx: Arc<Fixture>,
    port: u16,
    forwards: Vec<PathBuf>,
    stats: Arc<Stats>,
    clients: usize,
}

/// A byte-stream session on `pipe` (echo or cat) from the in-test client.
async fn byte_session(
    fx: &Fixture,
    port: u16,
    who: &str,
    pipe: &str,
    rng: &mut Rng,
) -> Result<usize, String> {
    let data = rng.data();
    let msgs = chunks(rng, &data);
    let ws = ws_open(fx, port, who, &format!("/pipes/{pipe}")).await?;
    let got = ws_session(ws, msgs).await?.concat();
    if got.len() != data.len() || digest(&got) != digest(&data) {
        return Err(format!(
            "{pipe} as {who}: sent {} bytes (sha {}), got {} (sha {})",
            data.len(),
            &digest(&data)[..12],
            got.len(),
            &digest(&got)[..12]
        ));
    }
    Ok(data.len())
}

/// A message-mode session on the seqpacket pipe: every message comes back whole, in
/// order.
async fn message_session(
    fx: &Fixture,
    port: u16,
    who: &str,
    rng: &mut Rng,
) -> Result<usize, String> {
    let n = rng.below(40) as usize;
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let len = rng.below(64 * 1024) as usize + 1;
            rng.bytes(len)
        })
        .collect();
    let total = msgs.iter().map(Vec::len).sum();
    let ws = ws_open(fx, port, who, "/pipes/seq").await?;
    let got = ws_session(ws, msgs.clone()).await?;
    if got != msgs {
        let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
        return Err(format!(
            "seq as {who}: sent {} messages {:?}, got {} {:?}",
            msgs.len(),
            lens(&msgs),
            got.len(),
            lens(&got)
        ));
    }
    Ok(total)
}

/// A FIFO `in` session: the client writes, a local reader reads to EOF.
async fn fifo_in_session(
    fx: &Fixture,
    port: u16,
    who: &str,
    rng: &mut Rng,
) -> Result<usize, String> {
    let data = rng.data();
    let path = fx.path("in.fifo");
    let reader = thread::spawn(move || -> Result<Vec<u8>, String> {
        // Blocks until the gateway opens the write end.
        let mut f = std::fs::File::open(&path).map_err(|e| format!("open: {e}"))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(|e| format!("read: {e}"))?;
        Ok(v)
    });
    let msgs = chunks(rng, &data);
    let r = async {
        let ws = ws_open(fx, port, who, "/pipes/fin").await?;
        let got = ws_session(ws, msgs).await?;
        if !got.is_empty() {
            return Err("data from an in-only FIFO session".to_string());
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        // Unblock the reader thread if the gateway never opened the FIFO.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags_nonblock()
            .open(fx.path("in.fifo"));
        return Err(format!("fifo in: {e}"));
    }
    let got = tokio::task::spawn_blocking(move || reader.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "reader panicked".to_string())??;
    if digest(&got) != digest(&data) {
        return Err(format!(
            "fifo in as {who}: wrote {} bytes, the reader got {}",
            data.len(),
            got.len()
        ));
    }
    Ok(data.len())
}

/// A FIFO `out` session: a local writer writes and closes, the client reads to EOF.
async fn fifo_out_session(
    fx: &Fixture,
    port: u16,
    who: &str,
    rng: &mut Rng,
) -> Result<usize, String> {
    let data = rng.data();
    let path = fx.path("out.fifo");
    let d2 = data.clone();
    let writer = thread::spawn(move || -> Result<(), String> {
        // Blocks until the gateway opens the read end.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| format!("open: {e}"))?;
        f.write_all(&d2).map_err(|e| format!("write: {e}"))
    });
    let r = async {
        let ws = ws_open(fx, port, who, "/pipes/fout").await?;
        Ok::<_, String>(ws_session(ws, Vec::new()).await?.concat())
    }
    .await;
    let got = match r {
        Ok(g) => g,
        Err(e) => {
            // Unblock the writer thread if the gateway never opened the FIFO.
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_nonblock()
                .open(fx.path("out.fifo"));
            return Err(format!("fifo out: {e}"));
        }
    };
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "writer panicked".to_string())??;
    if digest(&got) != digest(&data) {
        return Err(format!(
            "fifo out as {who}: wrote {} bytes, the client got {}",
            data.len(),
            got.len()
        ));
    }
    Ok(data.len())
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
    }
}

/// Through a forward: a local client writes random data with a half-close and reads
/// the echo to EOF.
fn forward_session(path: &Path, rng: &mut Rng) -> Result<usize, String> {
    let data = rng.data();
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let d2 = data.clone();
    let mut r2 = rng.clone();
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut at = 0;
        while at < d2.len() {
            let n = (r2.below(64 * 1024) as usize + 1).min(d2.len() - at);
            w.write_all(&d2[at..at + n])
                .map_err(|e| format!("write: {e}"))?;
            at += n;
        }
        w.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut got = Vec::new();
    let r = s.read_to_end(&mut got);
    let w = writer.join().map_err(|_| "writer panicked".to_string())?;
    r.map_err(|e| format!("read after {} of {} bytes: {e}", got.len(), data.len()))?;
    w?;
    if got.len() != data.len() || digest(&got) != digest(&data) {
        return Err(format!(
            "forward {}: sent {} bytes, got {}",
            path.display(),
            data.len(),
            got.len()
        ));
    }
    Ok(data.len())
}

/// `pipebridge connect` runs: byte mode through `cat`, and message mode with u32be
/// framing through the seqpacket echo.
fn connect_session(
    fx: &Fixture,
    port: u16,
    who: &str,
    rng: &mut Rng,
) -> Result<(&'static str, usize), String> {
    let message = rng.below(2) == 0;
    let (input, args): (Vec<u8>, Vec<&str>) = if message {
        let mut framed = Vec::new();
        for _ in 0..rng.below(30) + 1 {
            let len = rng.below(32 * 1024) as usize + 1;
            framed.extend_from_slice(&(len as u32).to_be_bytes());
            framed.extend(rng.bytes(len));
        }
        (framed, vec!["--mode", "message", "--framing", "u32be"])
    } else {
        (rng.data(), vec![])
    };
    let url = format!(
        "wss://localhost:{port}/pipes/{}",
        if message { "seq" } else { "cat" }
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("connect")
        .arg(&url)
        .args(fx.cert_args(who))
        .args(&args);
    scrub(&mut cmd);
    let out = run_command(cmd, fx.dir(), &input, Duration::from_secs(60));
    if out.code != Some(0) {
        return Err(format!(
            "connect {url} {args:?} as {who}: exit {:?}: {}",
            out.code, out.stderr
        ));
    }
    if digest(&out.stdout) != digest(&input) {
        return Err(format!(
            "connect {url} {args:?} as {who}: sent {} bytes, got {}",
            input.len(),
            out.stdout.len()
        ));
    }
    Ok((
        if message {
            "connect u32be seqpacket"
        } else {
            "connect cat"
        },
        input.len(),
    ))
}

/// Runs the whole workload until `until`; returns when every worker is done.
fn run_workload(s: &Soak, until: Instant) {
    let mut threads = Vec::new();
    // Forward clients, one per identity's forward.
    for path in s.forwards.clone() {
        let stats = s.stats.clone();
        threads.push(thread::spawn(move || {
            let mut rng = Rng::new();
            while Instant::now() < until {
                match forward_session(&path, &mut rng) {
                    Ok(n) => stats.ok("unix echo via forward", n),
                    Err(e) => stats.fail(e),
                }
            }
        }));
    }
    // `connect` processes.
    {
        let (fx, port, stats) = (s.fx.clone(), s.port, s.stats.clone());
        threads.push(thread::spawn(move || {
            let mut rng = Rng::new();
            let mut i = 0;
            while Instant::now() < until {
                let who = IDENTITIES[i % 3];
                i += 1;
                match connect_session(&fx, port, who, &mut rng) {
                    Ok((kind, n)) => stats.ok(kind, n),
                    Err(e) => stats.fail(e),
                }
            }
        }));
    }
    // In-test WebSocket clients: exec cat, unix echo direct, seqpacket; one of them
    // also takes turns on the two FIFOs (one session at a time each).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..s.clients {
            let (fx, port, stats) = (s.fx.clone(), s.port, s.stats.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new();
                let mut i = c;
                while Instant::now() < until {
                    let who = IDENTITIES[i % 3];
                    i += 1;
                    let pick = if c == 0 {
                        4 + (i % 2)
                    } else {
                        rng.below(4) as usize
                    };
                    type Fut<'a> = std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<usize, String>> + Send + 'a>,
                    >;
                    let (kind, fut): (&str, Fut<'_>) = match pick {
                        0 => (
                            "exec cat",
                            Box::pin(byte_session(&fx, port, who, "cat", &mut rng)),
                        ),
                        1 => (
                            "unix echo",
                            Box::pin(byte_session(&fx, port, who, "echo", &mut rng)),
                        ),
                        2 | 3 => (
                            "seqpacket messages",
                            Box::pin(message_session(&fx, port, who, &mut rng)),
                        ),
                        4 => (
                            "fifo in",
                            Box::pin(fifo_in_session(&fx, port, who, &mut rng)),
                        ),
                        _ => (
                            "fifo out",
                            Box::pin(fifo_out_session(&fx, port, who, &mut rng)),
                        ),
                    };
                    match tokio::time::timeout(SESSION_TIMEOUT, fut).await {
                        Ok(Ok(n)) => stats.ok(kind, n),
                        Ok(Err(e)) => stats.fail(format!("{kind} as {who}: {e}")),
                        Err(_) => stats.fail(format!(
                            "{kind} as {who}: no end within {SESSION_TIMEOUT:?}"
                        )),
                    }
                }
            }));
        }
        for t in tasks {
            if let Err(e) = t.await {
                s.stats.fail(format!("client task: {e}"));
            }
        }
    });
    for t in threads {
        if t.join().is_err() {
            s.stats.fail("a worker thread panicked".into());
        }
    }
}

/// Tops up the warm-up until the forwarding gateway (`b_pid`) holds a warm HTTP/2
/// connection to the exporting one per identity and shard. A shard dials its own when a
/// session first lands on it, so one that got no forward session during the warm-up would
/// open it in the soak proper: one more fd on each side, not a leak. Bursts of concurrent
/// forward sessions (the least-loaded shard takes each) fill the gaps; bounded.
fn warm_every_shard(s: &Soak, b_pid: u32) {
    let shards = gateway_shards();
    let want = s.forwards.len() * shards;
    // Enough at once to reach every shard; well under the pipe's max_instances (256).
    let per_forward = (2 * shards).min(32);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut have = tcp_conns_to(b_pid, s.port);
    while have < want && Instant::now() < deadline {
        let mut burst = Vec::new();
        for path in &s.forwards {
            for _ in 0..per_forward {
                let (path, stats) = (path.clone(), s.stats.clone());
                burst.push(thread::spawn(move || {
                    match forward_session(&path, &mut Rng::new()) {
                        Ok(n) => stats.ok("unix echo via forward", n),
                        Err(e) => stats.fail(e),
                    }
                }));
            }
        }
        for t in burst {
            if t.join().is_err() {
                s.stats.fail("a forward thread panicked".into());
            }
        }
        thread::sleep(Duration::from_millis(100));
        have = tcp_conns_to(b_pid, s.port);
    }
    assert!(
        have >= want,
        "the warm-up left B with {have} HTTP/2 connections to A, not one per identity and \
         shard ({want}): the soak's fd count would grow when a shard dials its own"
    );
    eprintln!("soak warm-up: B holds {have} connections to A (want {want})");
}

/// Waits until `pid` has no live session (per `/sessions` when `admin` is given) and
/// its fd count is stable; returns its usage then.
fn quiesce(pid: u32, admin: Option<&str>) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Some(addr) = admin {
        while !sessions_empty(addr) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
    }
    let mut last = usage(pid);
    let mut stable = 0;
    while stable < 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        let u = usage(pid);
        if u.fds == last.fds {
            stable += 1;
        } else {
            stable = 0;
        }
        last = u;
    }
    last
}

fn sessions_empty(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /sessions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["sessions"].as_array().map(|a| a.is_empty()))
        .unwrap_or(false)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn soak_many_sessions_across_identities_and_pipe_kinds() {
    let secs = env_u64("PIPEBRIDGE_SOAK_SECS", 20).max(5);
    let clients = env_u64("PIPEBRIDGE_SOAK_CLIENTS", 10).max(2) as usize;
    let warmup = Duration::from_secs((secs / 5).max(3));
    let main = Duration::from_secs(secs) - warmup;
    let started = Instant::now();

    // The PKI with a third client, carol.
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    seq_echo_server(&fx.path("seq.sock"));
    mkfifo(&fx.path("in.fifo"));
    mkfifo(&fx.path("out.fifo"));
    let allow =
        "allow = [\"alice\", \"bob\", \"carol\"]\nrun_as = \"gateway\"\nmax_instances = 256\n";
    let a_text = fx.server_config(&format!(
        "[[identity]]\nname = \"carol\"\ncert_cn = \"carol\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[pipe]]\nname = \"echo\"\nendpoint = {echo}\n{allow}\n\
         [[pipe]]\nname = \"cat\"\nendpoint = \"exec\"\nargv = [\"cat\"]\n{allow}\n\
         [[pipe]]\nname = \"seq\"\nendpoint = {seq}\n{allow}\n\
         [[pipe]]\nname = \"fin\"\nendpoint = {fin}\ndirection = \"in\"\n{allow}\n\
         [[pipe]]\nname = \"fout\"\nendpoint = {fout}\ndirection = \"out\"\n{allow}\n",
        echo = q(&format!("unix:{}", fx.path("echo.sock").display())),
        seq = q(&format!("seqpacket:{}", fx.path("seq.sock").display())),
        fin = q(&format!("fifo:{}", fx.path("in.fifo").display())),
        fout = q(&format!("fifo:{}", fx.path("out.fifo").display())),
    ));
    let mut a = fx.serve("a.toml", &a_text);
    let line = a.proc.wait_for_line("pipebridge: admin on ", START_TIMEOUT);
    let admin = line
        .trim_start_matches("pipebridge: admin on ")
        .trim()
        .to_string();
    let mut b_text = String::new();
    let mut forwards = Vec::new();
    for who in IDENTITIES {
        let path = fx.path(&format!("fwd-{who}.sock"));
        b_text.push_str(&format!(
            "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\n\n",
            q(&format!("unix:{}", path.display())),
            q(&a.url("echo")),
            q(&fx.ca()),
            q(&fx.cert(who)),
            q(&fx.key(who))
        ));
        forwards.push(path);
    }
    let b = fx.serve("b.toml", &b_text);
    let (a_pid, b_pid) = (a.proc.pid(), b.proc.pid());
    let soak = Soak {
        fx: Arc::new(fx),
        port: a.port,
        forwards,
        stats: Arc::new(Stats::default()),
        clients,
    };

    // Warm-up, then the reference point with no session live.
    run_workload(&soak, Instant::now() + warmup);
    warm_every_shard(&soak, b_pid);
    let (warm_a, warm_b) = (quiesce(a_pid, Some(&admin)), quiesce(b_pid, None));
    let warm_sessions = soak.stats.sessions.load(Ordering::Relaxed);
    eprintln!("soak warm-up ({warmup:?}): {warm_sessions} sessions; A {warm_a:?}; B {warm_b:?}");
    {
        let f = soak.stats.failures.lock().unwrap();
        assert!(
            f.is_empty(),
            "{} sessions failed during the warm-up: {:#?}",
            f.len(),
            &f[..f.len().min(10)]
        );
    }

    // The soak proper, sampling the gateways while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new((warm_a, warm_b)));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (ua, ub) = (usage(a_pid), usage(b_pid));
                let mut p = peak.lock().unwrap();
                p.0.fds = p.0.fds.max(ua.fds);
                p.0.threads = p.0.threads.max(ua.threads);
                p.0.rss_kb = p.0.rss_kb.max(ua.rss_kb);
                p.1.fds = p.1.fds.max(ub.fds);
                p.1.threads = p.1.threads.max(ub.threads);
                p.1.rss_kb = p.1.rss_kb.max(ub.rss_kb);
                drop(p);
                thread::sleep(Duration::from_millis(250));
            }
        })
    };
    run_workload(&soak, Instant::now() + main);
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let (mut end_a, mut end_b) = (quiesce(a_pid, Some(&admin)), quiesce(b_pid, None));
    // Idle blocking-pool threads time out after 10 s: give them that long to go.
    let deadline = Instant::now() + Duration::from_secs(12);
    while (end_a.threads > warm_a.threads + 2 || end_b.threads > warm_b.threads + 2)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(250));
        end_a = usage(a_pid);
        end_b = usage(b_pid);
    }
    let stats = &soak.stats;
    let total = stats.sessions.load(Ordering::Relaxed);
    let peak = *peak.lock().unwrap();
    eprintln!(
        "soak ({secs} s, {clients} WebSocket clients + 3 forward clients + 1 connect runner): \
         {total} sessions, {} MiB verified, by kind {:?}\n  A: warm-up {warm_a:?}, peak {:?}, end {end_a:?}\n  \
         B: warm-up {warm_b:?}, peak {:?}, end {end_b:?}\n  took {:?}",
        stats.bytes.load(Ordering::Relaxed) >> 20,
        stats.by_kind.lock().unwrap(),
        peak.0,
        peak.1,
        started.elapsed()
    );
    let failures = stats.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} sessions failed; first: {:#?}\nA log tail:\n{}",
        failures.len(),
        total + failures.len() as u64,
        &failures[..failures.len().min(10)],
        strip_ansi(&a.log())
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(total > warm_sessions, "no session ran after the warm-up");
    for kind in [
        "unix echo via forward",
        "exec cat",
        "unix echo",
        "seqpacket messages",
        "fifo in",
        "fifo out",
    ] {
        assert!(
            stats
                .by_kind
                .lock()
                .unwrap()
                .get(kind)
                .copied()
                .unwrap_or(0)
                > 0,
            "no {kind} session completed"
        );
    }
    // Every session the exporting gateway audited ended with 1000.
    let log = strip_ansi(&a.log());
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session end") && !l.contains("close_code=1000"))
        .collect();
    assert!(
        bad.is_empty(),
        "{} sessions did not end with 1000: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    // No growth.
    for (name, warm, end) in [("A", warm_a, end_a), ("B", warm_b, end_b)] {
        assert_eq!(
            end.fds, warm.fds,
            "{name}: open fds {} after the warm-up, {} at the end",
            warm.fds, end.fds
        );
        assert!(
            end.threads <= warm.threads + 2,
            "{name}: {} threads after the warm-up, {} at the end",
            warm.threads,
            end.threads
        );
        assert!(
            end.rss_kb <= warm.rss_kb * 3 / 2 + 10 * 1024,
            "{name}: VmRSS {} KiB after the warm-up, {} KiB at the end",
            warm.rss_kb,
            end.rss_kb
        );
    }
    drop(b);
    a.proc.sigterm();
    let _ = a.proc.wait_exit(Duration::from_secs(10));
}
