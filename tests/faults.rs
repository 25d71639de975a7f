//! Fault injection (hardening issue), end to end through the real gateway binary: the
//! local pipe server dies mid-transfer (the client gets Close 1011 with a reason within
//! 2 s; `connect` exits 1 saying the endpoint failed), a gateway is SIGKILLed
//! mid-transfer (the other side ends cleanly within the keepalive bound; a forward
//! recovers when its gateway returns on the same port; a forward gateway that comes
//! back replaces its stale socket), a reader stalls for a minute while the sender pushes
//! (the gateway's memory stays bounded and, once the reader resumes, every byte arrives:
//! SHA-256 end to end), and a network link between two network namespaces is cut (the
//! session ends within the keepalive bound; a new one works once the link is back).
//!
//! Every process is killed by pid when its guard drops; namespaces are deleted by a guard
//! (also when a test fails). The namespace test needs root: without it, it says why and
//! passes, except when `CI` is set, where it fails.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

/// `[keepalive]` of every gateway here: ping after 1 s of silence, dead after 3 s.
const KEEPALIVE: &str = "[keepalive]\ninterval = \"1s\"\ntimeout = \"3s\"\n\n";
/// The keepalive bound: `timeout` plus one `interval`, plus 2 s for scheduling and the
/// kernel's retransmission timer (TCP_USER_TIMEOUT fires on a retransmission).
const KEEPALIVE_BOUND: Duration = Duration::from_secs(3 + 1 + 2);

// === helpers ===

/// A `[[pipe]]` run as the gateway's own account.
fn pipe(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[[pipe]]\nname = {}\nendpoint = {}\nallow = [\"alice\", \"bob\"]\nrun_as = \"gateway\"\n{extra}\n",
        q(name),
        q(endpoint)
    )
}

/// A `[[forward]]` with alice's certificate.
fn forward(fx: &Fixture, listen: &Path, to: &str) -> String {
    format!(
        "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\n\n",
        q(&format!("unix:{}", listen.display())),
        q(to),
        q(&fx.ca()),
        q(&fx.cert("alice")),
        q(&fx.key("alice"))
    )
}

/// `text` with `[server] listen` set to `listen`.
fn listen_on(text: &str, listen: &str) -> String {
    text.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = {}", q(listen)),
        1,
    )
}

/// Starts a gateway with an `[admin]` listener; returns it and the admin address.
fn serve_admin(fx: &Fixture, name: &str, text: &str) -> (Gateway, String) {
    let text = format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{text}");
    let mut gw = fx.serve(name, &text);
    let line = gw
        .proc
        .wait_for_line("pipebridge: admin on ", START_TIMEOUT);
    let addr = line
        .trim_start_matches("pipebridge: admin on ")
        .trim()
        .to_string();
    (gw, addr)
}

/// Live sessions on a gateway's admin listener.
fn sessions(addr: &str) -> Vec<serde_json::Value> {
    let sa: std::net::SocketAddr = addr.parse().expect("admin address");
    let mut s =
        std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /sessions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read /sessions");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/sessions: {e}: {text}"));
    v["sessions"].as_array().cloned().unwrap_or_default()
}

/// Polls `f` every 50 ms until it holds; false after `timeout`.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A fast deterministic byte stream (xorshift64*), so large transfers need no copy.
struct Prng(u64);

impl Prng {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A running `pipebridge connect` with piped stdio; killed and reaped on drop.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Client {
    /// `connect URL` as alice, collecting stdout.
    fn connect(fx: &Fixture, url: &str) -> Client {
        Client::spawn(fx, url, true)
    }

    /// `connect URL` as alice; stdout is collected when `collect`, else left in
    /// `child.stdout` for the caller.
    fn spawn(fx: &Fixture, url: &str, collect: bool) -> Client {
        let mut cmd = Command::new(BIN);
        cmd.arg("connect").arg(url).args(fx.cert_args("alice"));
        scrub(&mut cmd);
        cmd.current_dir(fx.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn connect");
        let stdin = child.stdin.take();
        let mut serr = child.stderr.take().expect("stderr");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let (o2, e2) = (out.clone(), err.clone());
        let mut readers = vec![thread::spawn(move || {
            let mut s = String::new();
            let _ = serr.read_to_string(&mut s);
            e2.lock().unwrap().push_str(&s);
        })];
        if collect {
            let mut sout = child.stdout.take().expect("stdout");
            readers.push(thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    o2.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        Client {
            child,
            stdin,
            out,
            err,
            readers,
        }
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits (bounded) for the exit; `None` if still running. Output is complete after.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// A continuous transfer over a byte stream: one thread writes random 16 KiB chunks
/// (keeping a copy), another collects what comes back and notes when the stream ended.
struct Duplex {
    sent: Arc<Mutex<Vec<u8>>>,
    got: Arc<Mutex<Vec<u8>>>,
    ended: Arc<Mutex<Option<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Duplex {
    fn start<R, W>(mut r: R, mut w: W, pause: Duration) -> Duplex
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (sent.clone(), stop.clone());
        let writer = thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                let chunk = random_bytes(16 * 1024);
                if w.write_all(&chunk).is_err() || w.flush().is_err() {
                    break;
                }
                s2.lock().unwrap().extend_from_slice(&chunk);
                thread::sleep(pause);
            }
        });
        let (g2, e2) = (got.clone(), ended.clone());
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let how = loop {
                match r.read(&mut buf) {
                    Ok(0) => break "EOF".to_string(),
                    Ok(n) => g2.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e) => break format!("error: {e}"),
                }
            };
            *e2.lock().unwrap() = Some((Instant::now(), how));
        });
        Duplex {
            sent,
            got,
            ended,
            stop,
            threads: vec![writer, reader],
        }
    }

    fn got_len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until `n` bytes came back.
    fn wait_got(&self, n: usize, timeout: Duration, what: &str) {
        assert!(
            eventually(timeout, || self.got_len() >= n),
            "{what}: only {} of {n} bytes came back",
            self.got_len()
        );
    }

    /// When and how the stream ended, waiting up to `timeout`.
    fn wait_end(&self, timeout: Duration) -> Option<(Instant, String)> {
        eventually(timeout, || self.ended.lock().unwrap().is_some());
        self.ended.lock().unwrap().clone()
    }

    /// Asserts that what came back is a prefix of what was sent (nothing corrupted,
    /// reordered or invented).
    fn assert_prefix(&self, what: &str) {
        let sent = self.sent.lock().unwrap();
        let got = self.got.lock().unwrap();
        assert!(
            got.len() <= sent.len() && sent[..got.len()] == got[..],
            "{what}: the {} bytes that came back are not a prefix of the {} sent",
            got.len(),
            sent.len()
        );
    }
}

impl Drop for Duplex {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The threads end when their stream does (their owner closes it); never joined
        // here, so a stuck peer cannot hang the test.
        self.threads.clear();
    }
}

/// Echoes `data` through the forward socket `path` (retrying for up to `within` while
/// the connection is refused or closed early) and checks the SHA-256.
fn echo_via(path: &Path, data: &[u8], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let attempt = (|| -> Result<Vec<u8>, String> {
            let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(15)))
                .map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let d = data.to_vec();
            let writer = thread::spawn(move || {
                let _ = w.write_all(&d);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
            let mut reply = Vec::new();
            let r = s.read_to_end(&mut reply);
            let _ = writer.join();
            r.map_err(|e| format!("read: {e}"))?;
            Ok(reply)
        })();
        match attempt {
            Ok(r) if r.len() == data.len() && sha_hex(&r) == sha_hex(data) => return Ok(()),
            Ok(r) if !r.is_empty() => {
                return Err(format!("echo differs: {} of {} bytes", r.len(), data.len()))
            }
            other => {
                if Instant::now() > deadline {
                    return Err(format!("no echo within {within:?}: {other:?}"));
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

// === a raw WebSocket client (for Close codes) ===

type Ws = tokio_tungstenite::WebSocketStream<TlsStream>;

async fn ws_open(fx: &Fixture, port: u16, pipe: &str) -> Ws {
    let req = upgrade_request(port, &format!("/pipes/{pipe}"), "pipebridge.v1", "");
    let (resp, s) = raw_exchange(fx, port, Creds::Cert("alice"), &req).await;
    assert_eq!(
        resp.status,
        101,
        "open {pipe}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    tokio_tungstenite::WebSocketStream::from_partially_read(
        s,
        Vec::new(),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await
}

fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

// === 1. the local pipe server dies mid-transfer ===

/// A Unix server that accepts one connection, reads `n` bytes, then closes it and its
/// listener (unread data pending) and reports when.
fn dying_server(path: &Path, n: usize) -> mpsc::Receiver<Instant> {
    let l = UnixListener::bind(path).expect("bind");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < n {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => total += k,
                }
            }
            drop(s);
            drop(l);
            let _ = tx.send(Instant::now());
        }
    });
    rx
}

/// Waits for `child` to exit (bounded), returning when it did.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn local_server_dying_mid_transfer_ends_the_session_with_1011_quickly() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let text = fx.server_config(&format!(
        "{}{}{}",
        pipe(
            "dies",
            &format!("unix:{}", fx.path("dies.sock").display()),
            ""
        ),
        pipe(
            "killed",
            &format!("unix:{}", fx.path("killed.sock").display()),
            ""
        ),
        pipe(
            "echo",
            &format!("unix:{}", fx.path("echo.sock").display()),
            ""
        ),
    ));
    let gw = fx.serve("gw.toml", &text);

    // (a) `connect` pushing data; the server reads 256 KiB and closes.
    let died = dying_server(&fx.path("dies.sock"), 256 * 1024);
    let mut c = Client::connect(&fx, &gw.url("dies"));
    let mut stdin = c.stdin.take().expect("stdin");
    let pusher = thread::spawn(move || {
        let mut p = Prng(7);
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..1024 {
            p.fill(&mut buf);
            if stdin.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let at = died
        .recv_timeout(Duration::from_secs(20))
        .expect("the server read 256 KiB");
    let st = c.wait(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "connect still runs 10 s after the local server died; stderr:\n{}",
            c.stderr()
        )
    });
    let took = at.elapsed();
    let err = c.stderr();
    eprintln!("server died -> connect exited {st} after {took:?}; stderr: {err:?}");
    assert_eq!(st.code(), Some(1), "connect exit; stderr:\n{err}");
    assert!(
        err.contains("endpoint_failed") || err.contains("endpoint failed"),
        "connect should say the endpoint failed:\n{err}"
    );
    assert!(
        took < Duration::from_secs(2),
        "connect exited {took:?} after the server died"
    );
    let _ = pusher.join();

    // (b) A raw client sees Close 1011 with a reason (and an endpoint_failed control)
    // when the server process is SIGKILLed mid-transfer.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (kind, code, reason, after) = match python() {
        Some(py) => {
            let script = "import socket,os,sys\n\
                s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen(1)\n\
                print('ready',flush=True)\nc,_=s.accept();n=0\n\
                while n<262144:\n  b=c.recv(65536)\n  if not b: break\n  n+=len(b)\n\
                os.kill(os.getpid(),9)\n";
            let mut srv = KillOnDrop(
                Command::new(py)
                    .arg("-c")
                    .arg(script)
                    .arg(fx.path("killed.sock"))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("spawn python"),
            );
            let mut line = String::new();
            BufReader::new(srv.0.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("ready line");
            assert_eq!(line.trim(), "ready");
            let pid = srv.0.id();
            let (death_tx, death_rx) = mpsc::channel();
            let watcher = thread::spawn(move || {
                let at = wait_child(&mut srv.0, Duration::from_secs(30));
                let _ = death_tx.send(at);
                srv
            });
            let got = rt.block_on(async {
                let ws = ws_open(&fx, gw.port, "killed").await;
                let (mut sink, mut stream) = ws.split();
                let push = async {
                    let chunk = vec![0x61u8; 64 * 1024];
                    loop {
                        if sink.send(Message::binary(chunk.clone())).await.is_err() {
                            break;
                        }
                    }
                    std::future::pending::<()>().await
                };
                let read = async {
                    let mut kind = None;
                    loop {
                        match stream.next().await {
                            Some(Ok(Message::Text(t))) => {
                                let v: serde_json::Value =
                                    serde_json::from_str(t.as_str()).unwrap_or_default();
                                if v["type"] == "error" {
                                    kind = v["kind"].as_str().map(str::to_string);
                                }
                            }
                            Some(Ok(Message::Close(c))) => {
                                let (code, reason) = c
                                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                                    .unwrap_or((1005, String::new()));
                                return (kind, code, reason, Instant::now());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => panic!("websocket error before the Close: {e}"),
                            None => panic!("no Close frame"),
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(20), async {
                    tokio::select! {
                        r = read => r,
                        _ = push => unreachable!(),
                    }
                })
                .await
                .expect("the session did not end within 20 s")
            });
            let died_at = death_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("watcher")
                .unwrap_or_else(|| panic!("the python server {pid} did not die"));
            let _ = watcher.join();
            let (kind, code, reason, closed_at) = got;
            (
                kind,
                code,
                reason,
                closed_at.saturating_duration_since(died_at),
            )
        }
        None => {
            if std::env::var_os("CI").is_some() {
                panic!("python3 is needed for the SIGKILLed server; CI is set");
            }
            eprintln!("no python3: the SIGKILLed-server half is skipped");
            (
                Some("endpoint_failed".into()),
                1011,
                "skipped".into(),
                Duration::ZERO,
            )
        }
    };
    eprintln!("server SIGKILLed -> Close {code} {reason:?} after {after:?} (error kind {kind:?})");
    assert_eq!(code, 1011, "close code (reason {reason:?})");
    assert!(!reason.is_empty(), "the Close carries no reason");
    assert_eq!(kind.as_deref(), Some("endpoint_failed"));
    assert!(
        after < Duration::from_secs(2),
        "Close 1011 {after:?} after the death"
    );

    // The gateway serves on.
    let out = fx.connect(&gw.url("echo"), "alice", b"still here\n");
    out.expect_code(0);
    assert_eq!(out.out(), "still here\n");
    assert!(
        gw.log().contains("1011") || gw.log().contains("local endpoint failed"),
        "the gateway logged no endpoint failure:\n{}",
        tail(&gw.log(), 20)
    );
}

// === 2. a gateway SIGKILLed mid-transfer ===

fn sigkill(p: &mut Proc) {
    p.child.kill().expect("SIGKILL");
    p.wait_exit(Duration::from_secs(10)).expect("exits");
}

#[test]
fn gateway_killed_mid_transfer_ends_the_other_side_and_forwards_recover() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let a_text = fx.server_config(&format!(
        "{KEEPALIVE}{}",
        pipe(
            "echo",
            &format!("unix:{}", fx.path("echo.sock").display()),
            ""
        )
    ));
    let (mut a, a_admin) = serve_admin(&fx, "a.toml", &a_text);
    let port = a.port;
    let fwd = fx.path("fwd.sock");
    let b_text = format!("{KEEPALIVE}{}", forward(&fx, &fwd, &a.url("echo")));
    let (mut b, _b_admin) = serve_admin(&fx, "b.toml", &b_text);

    // --- A (the exporting gateway) dies ---
    // A `connect` straight to A and a local client of B's forward, both mid-transfer.
    let mut c = Client::spawn(&fx, &a.url("echo"), false);
    let c_in = c.stdin.take().expect("stdin");
    let c_out = c.child.stdout.take().expect("stdout");
    let c_dup = Duplex::start(c_out, c_in, Duration::from_millis(2));
    let l = unix_connect(&fwd);
    let l_dup = Duplex::start(
        l.try_clone().expect("clone"),
        l.try_clone().expect("clone"),
        Duration::from_millis(2),
    );
    c_dup.wait_got(1 << 20, Duration::from_secs(30), "connect to A");
    l_dup.wait_got(1 << 20, Duration::from_secs(30), "local client of B");
    assert_eq!(sessions(&a_admin).len(), 2, "two live sessions on A");

    let killed = Instant::now();
    sigkill(&mut a.proc);
    let st = c.wait(KEEPALIVE_BOUND).unwrap_or_else(|| {
        panic!(
            "connect still runs {KEEPALIVE_BOUND:?} after its gateway was killed; stderr:\n{}",
            c.stderr()
        )
    });
    let c_took = killed.elapsed();
    let (l_end, l_how) = l_dup.wait_end(KEEPALIVE_BOUND).unwrap_or_else(|| {
        panic!("the forward's local client saw no EOF/reset {KEEPALIVE_BOUND:?} after A died")
    });
    let l_took = l_end.saturating_duration_since(killed);
    eprintln!(
        "A SIGKILLed: connect exited {st} after {c_took:?} ({:?}); forward client saw {l_how} after {l_took:?}",
        c.stderr().trim()
    );
    assert!(
        st.code().is_some_and(|c| c != 0),
        "connect must exit non-zero (not by a signal): {st}; stderr:\n{}",
        c.stderr()
    );
    assert!(
        !c.stderr().contains("panicked"),
        "connect panicked:\n{}",
        c.stderr()
    );
    c_dup.assert_prefix("connect to A");
    l_dup.assert_prefix("local client of B");
    drop(l);
    assert!(
        b.proc.child.try_wait().expect("try_wait").is_none(),
        "B died with A"
    );

    // A returns on the same port: the forward works again.
    let (a2, a2_admin) = serve_admin(
        &fx,
        "a2.toml",
        &listen_on(&a_text, &format!("127.0.0.1:{port}")),
    );
    assert_eq!(a2.port, port);
    echo_via(&fwd, &random_bytes(1 << 20), Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "the forward did not recover: {e}\nB log:\n{}",
            tail(&b.log(), 20)
        )
    });

    // --- B (the forwarding gateway) dies ---
    let l = unix_connect(&fwd);
    let l_dup = Duplex::start(
        l.try_clone().expect("clone"),
        l.try_clone().expect("clone"),
        Duration::from_millis(2),
    );
    l_dup.wait_got(1 << 20, Duration::from_secs(30), "local client of B (2)");
    assert_eq!(sessions(&a2_admin).len(), 1, "one live session on A");
    let killed = Instant::now();
    sigkill(&mut b.proc);
    let (l_end, l_how) = l_dup
        .wait_end(KEEPALIVE_BOUND)
        .expect("the local client saw no EOF/reset after B died");
    assert!(
        eventually(KEEPALIVE_BOUND, || sessions(&a2_admin).is_empty()),
        "A still holds B's session {KEEPALIVE_BOUND:?} after B died"
    );
    let a_took = killed.elapsed();
    eprintln!(
        "B SIGKILLed: its local client saw {l_how} after {:?}; A ended the session within {a_took:?}",
        l_end.saturating_duration_since(killed)
    );
    l_dup.assert_prefix("local client of B (2)");
    drop(l);
    // B returns (its stale socket file is replaced) and forwards again.
    let b2 = fx.serve(
        "b2.toml",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{b_text}"),
    );
    echo_via(&fwd, &random_bytes(1 << 20), Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "the restarted forward does not work: {e}\n{}",
            tail(&b2.log(), 20)
        )
    });
    drop(a2);
}

// === 3. a reader stalls ===

/// How long the reader stalls: 60 s, or `PIPEBRIDGE_STALL_SECS` (at least 6 s, so that
/// the buffers fill well before the middle of the stall).
fn stall_secs() -> u64 {
    std::env::var("PIPEBRIDGE_STALL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .max(6)
}

/// The memory bound while stalled: the gateway's VmRSS may grow by at most 16 MiB over
/// its value before the session. The design bound per session is a few MiB (one
/// incoming message of at most 1 MiB, one 128 KiB read buffer, tungstenite's and
/// rustls's buffers); the rest is allocator slack.
const STALL_GROWTH_KB: u64 = 16 * 1024;

#[test]
fn a_reader_stalled_for_a_minute_keeps_memory_bounded_and_loses_nothing() {
    let stall = Duration::from_secs(stall_secs());
    let fx = Fixture::new();
    let sock = fx.path("stall.sock");
    // The local server: accepts, reads nothing for `stall`, then reads to EOF and
    // answers with the byte count and SHA-256.
    let listener = UnixListener::bind(&sock).expect("bind");
    let resumed = Arc::new(AtomicBool::new(false));
    let resumed2 = resumed.clone();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        thread::sleep(stall);
        resumed2.store(true, Ordering::SeqCst);
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                Err(e) => panic!("server read: {e}"),
            }
        }
        let _ = writeln!(s, "{n} {}", hex(&h.finalize()));
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    // Keepalive 1s/3s on purpose: a stalled but live session must not look dead.
    let text = fx.server_config(&format!(
        "{KEEPALIVE}{}",
        pipe("stall", &format!("unix:{}", sock.display()), "")
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let pid = gw.proc.pid();
    thread::sleep(Duration::from_millis(300));
    let rss0 = rss_kb(pid);

    let mut c = Client::connect(&fx, &gw.url("stall"));
    let mut stdin = c.stdin.take().expect("stdin");
    // The sender pushes until the reader resumed, then 16 MiB more, then EOF.
    let written = Arc::new(AtomicU64::new(0));
    let (w2, r2) = (written.clone(), resumed.clone());
    let sender = thread::spawn(move || {
        let mut p = Prng(0x5eed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut after = 0usize;
        while after < 16 << 20 {
            p.fill(&mut buf);
            stdin.write_all(&buf).expect("write to connect");
            h.update(&buf);
            w2.fetch_add(buf.len() as u64, Ordering::SeqCst);
            if r2.load(Ordering::SeqCst) {
                after += buf.len();
            }
        }
        drop(stdin);
        (w2.load(Ordering::SeqCst), hex(&h.finalize()))
    });

    // Watch the stall: memory, the sender's progress, the session.
    let t0 = Instant::now();
    let mut peak = 0u64;
    let mut samples = Vec::new();
    while !resumed.load(Ordering::SeqCst) && t0.elapsed() < stall + Duration::from_secs(5) {
        let rss = rss_kb(pid);
        peak = peak.max(rss);
        samples.push((t0.elapsed(), rss, written.load(Ordering::SeqCst)));
        thread::sleep(Duration::from_millis(250));
    }
    let live = sessions(&admin);
    let stalled_in = live
        .first()
        .and_then(|s| s["bytes_in"].as_u64())
        .unwrap_or(0);
    // The sender was blocked: during the second half of the stall it made no progress.
    let half = samples
        .iter()
        .find(|s| s.0 >= stall / 2)
        .map(|s| s.2)
        .unwrap_or(0);
    let at_end = samples.last().map(|s| s.2).unwrap_or(0);
    eprintln!(
        "stall {stall:?}: gateway VmRSS {rss0} KiB before, peak {peak} KiB; sender wrote {half} B by mid-stall, \
         {at_end} B by its end; the gateway wrote {stalled_in} B to the stalled socket"
    );
    assert_eq!(live.len(), 1, "the stalled session is gone: {live:?}");
    assert!(
        at_end == half,
        "the sender was not held back during the stall ({half} -> {at_end} bytes)"
    );
    assert!(
        peak <= rss0 + STALL_GROWTH_KB,
        "gateway VmRSS peaked at {peak} KiB, over {rss0} + {STALL_GROWTH_KB} KiB; samples {samples:?}"
    );

    // Resumed: everything arrives.
    let (total, want) = sender.join().expect("sender");
    let st = c
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("connect did not finish; stderr:\n{}", c.stderr()));
    server.join().expect("server");
    let reply = String::from_utf8_lossy(&c.out.lock().unwrap()).into_owned();
    eprintln!("after the stall: sent {total} B, the reader got {reply:?}");
    assert_eq!(st.code(), Some(0), "connect: {st}; stderr:\n{}", c.stderr());
    assert_eq!(
        reply.trim(),
        format!("{total} {want}"),
        "byte count and SHA-256 at the reader"
    );
    assert!(
        !gw.log().contains("keepalive"),
        "the keepalive fired on a stalled session:\n{}",
        tail(&gw.log(), 10)
    );
}

// === 4. a network link is cut ===

/// Runs `ip ARGS`; `Err` with its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two network namespaces joined by a veth pair (`veth-NAME` in each); deleted on drop.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn up(addr_a: &str, addr_b: &str) -> Result<Netns, String> {
        let tag = std::process::id() % 100_000;
        let ns = Netns {
            a: format!("pbf{tag}a"),
            b: format!("pbf{tag}b"),
        };
        // Leftovers of an earlier run with the same pid are removed first.
        let _ = ip(&["netns", "del", &ns.a]);
        let _ = ip(&["netns", "del", &ns.b]);
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        let (va, vb) = (ns.dev_a(), ns.dev_b());
        ip(&[
            "link", "add", &va, "netns", &ns.a, "type", "veth", "peer", "name", &vb, "netns", &ns.b,
        ])?;
        ip(&["-n", &ns.a, "addr", "add", addr_a, "dev", &va])?;
        ip(&["-n", &ns.b, "addr", "add", addr_b, "dev", &vb])?;
        for (n, v) in [(&ns.a, &va), (&ns.b, &vb)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", v, "up"])?;
        }
        Ok(ns)
    }

    fn dev_a(&self) -> String {
        format!("veth-{}", self.a)
    }

    fn dev_b(&self) -> String {
        format!("veth-{}", self.b)
    }

    /// `ip netns exec NS BIN serve --config CFG`, with stderr drained.
    fn serve(&self, ns: &str, fx: &Fixture, cfg: &Path) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN, "serve", "--config"])
            .arg(cfg);
        scrub(&mut cmd);
        Proc::spawn(cmd, fx.dir(), false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// True when the test may create namespaces; otherwise says why (and fails under CI).
fn root_or_skip(test: &str) -> bool {
    let why = if !rustix::process::geteuid().is_root() {
        Some("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("needs iproute2 (`ip`)")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: {why}; CI is set, so this is a failure rather than a skip")
        }
        Some(why) => {
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

/// A fixture whose server certificate is also valid for `ip`.
fn fixture_for(ip: &str) -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("pbflt")
        .tempdir()
        .expect("tempdir");
    pipebridge::pki::init(&pipebridge::pki::CertsInit {
        dir: tmp.path().join("pki"),
        server_names: vec!["localhost".into(), ip.into()],
        clients: vec!["alice".into(), "bob".into()],
        force: false,
    })
    .expect("pki init");
    Fixture { tmp }
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn link_cut_between_namespaces_ends_the_session_within_the_keepalive_bound() {
    if !root_or_skip("link_cut_between_namespaces_ends_the_session_within_the_keepalive_bound") {
        return;
    }
    let ns = Netns::up("198.18.0.1/30", "198.18.0.2/30")
        .unwrap_or_else(|e| panic!("cannot set up the namespaces: {e}"));
    let fx = fixture_for("198.18.0.1");
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    // Gateway A in namespace a, on 198.18.0.1.
    let a_text = listen_on(
        &fx.server_config(&format!(
            "{KEEPALIVE}{}",
            pipe(
                "echo",
                &format!("unix:{}", fx.path("echo.sock").display()),
                ""
            )
        )),
        "198.18.0.1:0",
    );
    let mut a = ns.serve(&ns.a, &fx, &fx.write("a.toml", &a_text));
    let line = a.wait_for_line("pipebridge: listening on ", START_TIMEOUT);
    let addr = line
        .trim_start_matches("pipebridge: listening on ")
        .trim()
        .to_string();
    // Gateway B in namespace b forwards a local socket to A across the veth pair.
    let fwd = fx.path("fwd.sock");
    let b_text = format!(
        "{KEEPALIVE}{}",
        forward(&fx, &fwd, &format!("wss://{addr}/pipes/echo"))
    );
    let mut b = ns.serve(&ns.b, &fx, &fx.write("b.toml", &b_text));
    b.wait_for_line("pipebridge: forwarding ", START_TIMEOUT);
    echo_via(&fwd, &random_bytes(256 * 1024), Duration::from_secs(15)).unwrap_or_else(|e| {
        panic!(
            "no session across the link: {e}\nB:\n{}",
            tail(&b.log(), 20)
        )
    });

    // Two sessions across the link: one idle, one mid-transfer.
    let idle = unix_connect(&fwd);
    let idle_dup = Duplex::start(
        idle.try_clone().expect("clone"),
        std::io::sink(),
        Duration::from_millis(50),
    );
    {
        let mut w = idle.try_clone().expect("clone");
        w.write_all(b"ping\n").expect("write");
    }
    idle_dup.wait_got(5, Duration::from_secs(10), "idle session");
    let busy = unix_connect(&fwd);
    let busy_dup = Duplex::start(
        busy.try_clone().expect("clone"),
        busy.try_clone().expect("clone"),
        Duration::from_millis(5),
    );
    busy_dup.wait_got(512 * 1024, Duration::from_secs(20), "busy session");
    let ends0 = count(&a.log(), "session end");

    // Cut the link.
    ip(&["-n", &ns.b, "link", "set", &ns.dev_b(), "down"]).expect("link down");
    let cut = Instant::now();
    let (i_end, i_how) = idle_dup
        .wait_end(KEEPALIVE_BOUND + Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the idle session did not end after the link was cut\nB:\n{}",
                tail(&b.log(), 20)
            )
        });
    let (b_end, b_how) = busy_dup
        .wait_end(KEEPALIVE_BOUND + Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the busy session did not end after the link was cut\nB:\n{}",
                tail(&b.log(), 20)
            )
        });
    let a_ended = eventually(KEEPALIVE_BOUND + Duration::from_secs(5), || {
        count(&a.log(), "session end") >= ends0 + 2
    });
    let a_took = cut.elapsed();
    let (i_took, b_took) = (
        i_end.saturating_duration_since(cut),
        b_end.saturating_duration_since(cut),
    );
    eprintln!(
        "link cut: B's idle session ended ({i_how}) after {i_took:?}, the busy one ({b_how}) after {b_took:?}; \
         A ended both within {a_took:?} (keepalive interval 1s, timeout 3s)"
    );
    assert!(
        i_took <= KEEPALIVE_BOUND,
        "the idle session ended {i_took:?} after the cut (bound {KEEPALIVE_BOUND:?})"
    );
    assert!(
        b_took <= KEEPALIVE_BOUND,
        "the busy session ended {b_took:?} after the cut (bound {KEEPALIVE_BOUND:?})"
    );
    assert!(
        a_ended && a_took <= KEEPALIVE_BOUND,
        "A did not end both sessions within {KEEPALIVE_BOUND:?} ({a_took:?}):\n{}",
        tail(&a.log(), 20)
    );
    busy_dup.assert_prefix("busy session");
    drop((idle, busy));

    // Link back up: a new session works.
    ip(&["-n", &ns.b, "link", "set", &ns.dev_b(), "up"]).expect("link up");
    echo_via(&fwd, &random_bytes(256 * 1024), Duration::from_secs(15)).unwrap_or_else(|e| {
        panic!(
            "no new session after the link came back: {e}\nB:\n{}",
            tail(&b.log(), 20)
        )
    });
    assert!(a.child.try_wait().expect("try_wait").is_none(), "A died");
    assert!(b.child.try_wait().expect("try_wait").is_none(), "B died");
    drop((a, b));
    drop(ns);
}

// === 5. a pooled connection dies without a word ===

/// A TCP relay on 127.0.0.1 to `to` whose relayed connections can be frozen: a frozen
/// one moves no byte either way and stays open, as a connection a NAT or firewall
/// forgot (no FIN, no RST). Its threads end when it drops.
struct Relay {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (conns.clone(), stop.clone());
        let accept = thread::spawn(move || {
            let mut pumps = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                let Ok((a, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                // (Accepted sockets inherit no O_NONBLOCK on Linux; elsewhere they may.)
                a.set_nonblocking(false).expect("blocking");
                let Ok(b) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                c2.lock().expect("conns").push(frozen.clone());
                for (from, into) in [
                    (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
                    (b, a),
                ] {
                    let (frozen, stop) = (frozen.clone(), s2.clone());
                    pumps.push(thread::spawn(move || {
                        relay_pump(from, into, &frozen, &stop)
                    }));
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Relay {
            port,
            conns,
            stop,
            accept: Some(accept),
        }
    }

    /// Relayed connections so far.
    fn count(&self) -> usize {
        self.conns.lock().expect("conns").len()
    }

    /// Freezes every connection relayed so far.
    fn freeze_all(&self) {
        for c in self.conns.lock().expect("conns").iter() {
            c.store(true, Ordering::Relaxed);
        }
    }
}

/// Copies `from` into `into` until either ends or `stop`; once `frozen`, moves nothing
/// and holds both open.
fn relay_pump(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    frozen: &AtomicBool,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            // What a read that was under way when the freeze came got is lost, as in
            // a black hole.
            Ok(_) if frozen.load(Ordering::Relaxed) => {}
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A forward's pooled HTTP/2 connection that dies without a word (frozen in a relay,
/// as a NAT forgets it) stops taking new sessions a few seconds after one of them
/// waits on it: an open unanswered for 1 s pings the connection, and a ping unanswered
/// for 3 s takes it out of the pool. It used to take every new session, each failing
/// after 10 s, until the keepalive gave up on it (30 s + 90 s by default, as here).
#[test]
fn a_pooled_connection_that_dies_silently_stops_taking_new_sessions() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "echo",
            &format!("unix:{}", fx.path("echo.sock").display()),
            "",
        )),
    );
    let relay = Relay::start(([127, 0, 0, 1], gw.port).into());
    let fwd = fx.path("fwd.sock");
    // One shard: every session shares its one pooled connection (with two, a session
    // that arrives while another waits is given the idle shard, and its own connection).
    let mut b = fx.serve_env(
        "b.toml",
        &forward(
            &fx,
            &fwd,
            &format!("wss://localhost:{}/pipes/echo", relay.port),
        ),
        &[("PIPEBRIDGE_SHARDS", "1")],
    );
    echo_via(&fwd, b"first\n", Duration::from_secs(15)).expect("a session over the relay");
    assert_eq!(relay.count(), 1, "one pooled connection");

    relay.freeze_all();
    // A session that lands on the dead connection waits for its answer; it may fail.
    let waiting = {
        let fwd = fwd.clone();
        thread::spawn(move || echo_via(&fwd, b"lost\n", Duration::ZERO))
    };
    b.proc.wait_until(Duration::from_secs(10), |log| {
        log.contains("left a ping unanswered")
    });
    let t = Instant::now();
    echo_via(&fwd, b"after\n", Duration::ZERO).unwrap_or_else(|e| {
        panic!(
            "a new session after the pooled connection died: {e}\nB:\n{}",
            tail(&b.log(), 20)
        )
    });
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the new session took {took:?}: it waited on the dead connection"
    );
    assert_eq!(relay.count(), 2, "the new session dialled a new connection");
    let _ = waiting.join();
    drop(b);
    drop(relay);
}
