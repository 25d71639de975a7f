//! End-to-end tests of the real `pipebridge` binary: exec and unix exports, forwards,
//! byte-exactness under load, refusals, TLS rejection, tokens, config checking, hosted
//! socket files and the exec environment. Every gateway listens on 127.0.0.1:0, every
//! socket lives in the test's temp dir, and every process is killed at the end.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

// === helpers ===

/// A `[[pipe]]` table.
fn pipe(name: &str, endpoint: &str, allow: &[&str], extra: &str) -> String {
    let allow: Vec<String> = allow.iter().map(|a| q(a)).collect();
    format!(
        "[[pipe]]\nname = {}\nendpoint = {}\nallow = [{}]\nrun_as = \"gateway\"\n{extra}\n",
        q(name),
        q(endpoint),
        allow.join(", ")
    )
}

/// A `[[forward]]` table using `client`'s certificate.
fn forward(fx: &Fixture, listen: &Path, to: &str, client: &str, extra: &str) -> String {
    format!(
        "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\n{extra}\n",
        q(&format!("unix:{}", listen.display())),
        q(to),
        q(&fx.ca()),
        q(&fx.cert(client)),
        q(&fx.key(client))
    )
}

/// Gateway A exporting `name` (the test server's Unix socket `sock`, with `extra` pipe
/// settings) to alice, and gateway B with one `[[forward]]` to it; `prefix` starts both
/// configs. Returns A, B and B's forward socket.
fn exported_and_forwarded(
    fx: &Fixture,
    name: &str,
    sock: &str,
    extra: &str,
    prefix: &str,
) -> (Gateway, Gateway, std::path::PathBuf) {
    let pipe_cfg = pipe(name, &format!("unix:{}", fx.p(sock)), &["alice"], extra);
    let a = fx.serve(
        "a.toml",
        &format!("{prefix}{}", fx.server_config(&pipe_cfg)),
    );
    let fwd = fx.path("fwd.sock");
    let b = fx.serve(
        "b.toml",
        &format!("{prefix}{}", forward(fx, &fwd, &a.url(name), "alice", "")),
    );
    (a, b, fwd)
}

/// The non-empty lines of `s`.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Asserts that a refused `connect` exited with `code` and printed exactly one line,
/// `pipebridge: refused: <status> <kind>: <message>`; returns the message.
fn expect_refused(out: &Output, code: i32, status: u16, kind: &str) -> String {
    out.expect_code(code);
    let l = lines(&out.stderr);
    assert_eq!(
        l.len(),
        1,
        "expected one line on stderr, got:\n{}",
        out.stderr
    );
    let prefix = format!("pipebridge: refused: {status} {kind}: ");
    assert!(
        l[0].starts_with(&prefix),
        "expected {prefix:?}..., got {:?}",
        l[0]
    );
    assert!(
        out.stdout.is_empty(),
        "refused session wrote to stdout: {:?}",
        out.out()
    );
    l[0][prefix.len()..].to_string()
}

// === 1. exec ===

#[test]
fn exec_wc_exit_codes_and_signals() {
    let fx = Fixture::new();
    let extra = [
        pipe("wc", "exec:wc -c", &["alice"], ""),
        pipe("exit7", "exec:sh -c 'exit 7'", &["alice"], ""),
        pipe("killed", "exec:sh -c 'kill -9 $$'", &["alice"], ""),
    ]
    .concat();
    let gw = fx.serve("gw.toml", &fx.server_config(&extra));

    // printf abc | pipebridge connect .../pipes/wc: the reply arrives after our EOF.
    let out = fx.connect(&gw.url("wc"), "alice", b"abc");
    out.expect_code(0);
    assert_eq!(out.out().trim(), "3", "stderr:\n{}", out.stderr);

    // Empty input still gets an answer.
    let out = fx.connect(&gw.url("wc"), "alice", b"");
    out.expect_code(0);
    assert_eq!(out.out().trim(), "0");

    // The child's exit code becomes connect's.
    let out = fx.connect(&gw.url("exit7"), "alice", b"");
    out.expect_code(7);
    assert!(out.stdout.is_empty());

    // A child killed by signal N: 128 + N.
    let out = fx.connect(&gw.url("killed"), "alice", b"");
    out.expect_code(137);
}

/// Output that arrives just before the exporting side's `eof` must reach connect's
/// stdout every time, also when connect's own direction finished first (an out-only
/// session, or empty stdin). Repeated because the loss, when it happens, is a race.
#[test]
fn exec_output_is_never_lost_at_eof() {
    let fx = Fixture::new();
    let extra = [
        pipe("hi-out", "exec:echo hi", &["alice"], "direction = \"out\""),
        pipe("hi", "exec:echo hi", &["alice"], ""),
    ]
    .concat();
    let gw = fx.serve("gw.toml", &fx.server_config(&extra));
    // Six clients at a time, so the race also shows on an idle machine.
    let lost: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|t| {
                let (fx, gw) = (&fx, &gw);
                s.spawn(move || {
                    let mut lost = Vec::new();
                    for i in 0..30 {
                        let name = if i % 2 == 0 { "hi-out" } else { "hi" };
                        let out = fx.connect(&gw.url(name), "alice", b"");
                        out.expect_code(0);
                        if out.stdout != b"hi\n" {
                            lost.push(format!(
                                "client {t} run {i} ({name}): stdout {:?}",
                                out.out()
                            ));
                        }
                    }
                    lost
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert!(
        lost.is_empty(),
        "{} of 180 sessions lost output:\n{}",
        lost.len(),
        lost.join("\n")
    );
}

// === 2. unix ===

#[test]
fn unix_echo_and_half_close_through_connect() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let _sha = UnixServer::sha_reply(&fx.path("sha.sock"));
    let extra = [
        pipe(
            "echo",
            &format!("unix:{}", fx.p("echo.sock")),
            &["alice"],
            "",
        ),
        pipe("sha", &format!("unix:{}", fx.p("sha.sock")), &["alice"], ""),
    ]
    .concat();
    let gw = fx.serve("gw.toml", &fx.server_config(&extra));

    let out = fx.connect(&gw.url("echo"), "alice", b"hello pipebridge\n");
    out.expect_code(0);
    assert_eq!(out.stdout, b"hello pipebridge\n");

    // Byte-exact for binary data larger than one chunk.
    let data = random_bytes((3 << 20) + 12345);
    let out = fx.connect(&gw.url("echo"), "alice", &data);
    out.expect_code(0);
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "echoed bytes differ");

    // The server replies only after our EOF (half-close).
    let data = random_bytes(200_000);
    let out = fx.connect(&gw.url("sha"), "alice", &data);
    out.expect_code(0);
    assert_eq!(out.out(), sha_hex(&data));
}

#[test]
fn half_close_through_forward_config_and_forward_verb() {
    let fx = Fixture::new();
    let _sha = UnixServer::sha_reply(&fx.path("sha.sock"));
    // A second gateway with only a [[forward]].
    let (gw, _b, fwd_sock) = exported_and_forwarded(&fx, "sha", "sha.sock", "", "");
    for size in [0usize, 1, 100_000, 2 << 20] {
        let data = random_bytes(size);
        let reply = unix_request(&fwd_sock, &data, Duration::from_secs(60));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            sha_hex(&data),
            "size {size}"
        );
    }

    // The `forward` verb.
    let verb_sock = fx.path("fwd-verb.sock");
    let mut fwd = fx.spawn_forward(&verb_sock, &gw.url("sha"), "alice");
    fwd.wait_for_line("pipebridge: forwarding ", START_TIMEOUT);
    let data = random_bytes(300_000);
    let reply = unix_request(&verb_sock, &data, Duration::from_secs(60));
    assert_eq!(String::from_utf8_lossy(&reply), sha_hex(&data));
}

/// Waits (bounded) until `gw`'s log holds a line with every one of `parts`; returns it.
fn log_line_with(gw: &Gateway, parts: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = gw.log();
        if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} within {timeout:?}; the log:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that both gateways logged the session on `pipe` as ended in order by the
/// forward's caller leaving: 1000, each saying which side closed.
fn assert_caller_left(a: &Gateway, b: &Gateway, pipe: &str) {
    let t = Duration::from_secs(10);
    let end = log_line_with(a, &["session end", &format!("pipe={pipe}")], t);
    assert!(
        end.contains("close_code=1000") && end.contains("the peer's local side closed"),
        "exporting side: {end}"
    );
    let end = log_line_with(b, &["close_code="], t);
    assert!(
        end.contains("close_code=1000") && end.contains("the local side closed"),
        "dialling side: {end}"
    );
}

/// A caller of the forward at `path`, whose reads and writes give up after 30 s.
fn caller(path: &Path) -> UnixStream {
    let c = unix_connect(path);
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c
}

/// A Unix server that accepts one connection and serves it on a thread of its own, with
/// 30 s read and write timeouts, until `serve` returns.
struct OneShot<T> {
    rx: std::sync::mpsc::Receiver<T>,
    thread: thread::JoinHandle<()>,
}

impl<T: Send + 'static> OneShot<T> {
    fn start(path: &Path, serve: impl FnOnce(UnixStream) -> T + Send + 'static) -> OneShot<T> {
        let listener = UnixListener::bind(path).expect("bind");
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let t = Some(Duration::from_secs(30));
            s.set_read_timeout(t).expect("timeout");
            s.set_write_timeout(t).expect("timeout");
            let _ = tx.send(serve(s));
        });
        OneShot { rx, thread }
    }

    /// What `serve` returned (waited for at most 40 s).
    fn result(self) -> T {
        let r = self
            .rx
            .recv_timeout(Duration::from_secs(40))
            .expect("the target thread reports");
        self.thread.join().expect("target thread");
        r
    }
}

/// A caller that reads its whole reply and then closes its socket entirely (not a
/// half-close) ends its session at once: the exporting gateway closes the target's
/// connection, so a write the target makes after that fails, as on a direct socket, and
/// both gateways log a normal end (1000) saying which side closed. Before, the target was
/// only shut down for writing, its late write went through, and the dialling gateway's
/// write of it into the closed caller failed (1011).
#[test]
fn a_caller_that_closes_entirely_ends_its_session_in_order() {
    let fx = Fixture::new();
    let target = OneShot::start(&fx.path("late.sock"), |mut s| {
        let mut req = [0u8; 3];
        s.read_exact(&mut req).expect("the caller's request");
        s.write_all(&[b'r'; 4096]).expect("the reply");
        let mut rest = Vec::new();
        let eof = s.read_to_end(&mut rest).map(|_| rest.len());
        // Late words after the caller left, until one fails (at most 10 s).
        let start = Instant::now();
        let late = loop {
            if let Err(e) = s.write_all(b"late") {
                break Err(e.kind());
            }
            if start.elapsed() > Duration::from_secs(10) {
                break Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        };
        (eof.map_err(|e| e.kind()), late)
    });
    let (a, b, fwd) = exported_and_forwarded(&fx, "late", "late.sock", "", "");
    let mut c = caller(&fwd);
    c.write_all(b"go\n").expect("request");
    let mut reply = [0u8; 4096];
    c.read_exact(&mut reply).expect("the whole reply");
    assert!(reply.iter().all(|&x| x == b'r'));
    drop(c);
    let (eof, late) = target.result();
    assert_eq!(
        eof,
        Ok(0),
        "the target reads the caller's end, and nothing else"
    );
    assert!(
        matches!(
            late,
            Err(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        ),
        "the target's write after the caller left: {late:?}"
    );
    assert_caller_left(&a, &b, "late");
}

/// A caller that closes its socket entirely while the target still streams, with part
/// of the stream unread, also ends its session in order (1000): the read that meets the
/// reset, or the write into the closed caller, is the caller's end, not a failure of the
/// local endpoint (before, both sides ended with 1011). The target's writes then fail.
#[test]
fn a_caller_that_closes_with_a_stream_unread_ends_its_session_in_order() {
    caller_leaves_a_stream(false);
}

/// The same for a caller that first shuts its socket down for writing (its end goes to
/// the target as EOF) and later closes it: the next write into it ends the session.
#[test]
fn a_half_closed_caller_that_then_closes_ends_its_session_in_order() {
    caller_leaves_a_stream(true);
}

fn caller_leaves_a_stream(half_close_first: bool) {
    let fx = Fixture::new();
    let target = OneShot::start(&fx.path("stream.sock"), |mut s| {
        let mut go = [0u8; 3];
        s.read_exact(&mut go).expect("the caller's request");
        let start = Instant::now();
        // Streams until a write fails, for at most 30 s.
        loop {
            if start.elapsed() > Duration::from_secs(30) {
                break Err("the target's writes never failed".to_string());
            }
            match s.write_all(&[b'x'; 1024]) {
                Ok(()) => thread::sleep(Duration::from_millis(1)),
                Err(e) => break Ok(e.kind()),
            }
        }
    });
    let (a, b, fwd) = exported_and_forwarded(&fx, "stream", "stream.sock", "", "");
    let mut c = caller(&fwd);
    c.write_all(b"go\n").expect("request");
    if half_close_first {
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let mut got = [0u8; 4096];
    c.read_exact(&mut got)
        .expect("the stream reaches the caller");
    assert!(got.iter().all(|&x| x == b'x'));
    // More of the stream arrives meanwhile, and is left unread.
    thread::sleep(Duration::from_millis(50));
    drop(c);
    let r = target.result();
    assert!(
        matches!(
            r,
            Ok(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        ),
        "the target's write after the caller left: {r:?}"
    );
    assert_caller_left(&a, &b, "stream");
}

/// A caller that stops reading (`SHUT_RD`) but goes on sending: every byte it sends
/// still reaches the target, then its end; what the target sends back meanwhile is
/// discarded, and the session ends in order once the caller is done. Before, the first
/// write into the caller failed the session (1011) and cut its upload short.
#[test]
fn a_caller_that_stops_reading_still_delivers_all_it_sends() {
    let fx = Fixture::new();
    let target = OneShot::start(&fx.path("echo.sock"), |mut s| {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        // Echoes what comes (writes may fail once the gateway closes) until EOF. The
        // gateway closes this connection with echoes of it unread when they were still
        // on their way, and then the end reads as a reset, after all the data (Linux
        // reports it only once the queue is empty).
        loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(hex(&h.finalize())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    break Ok(hex(&h.finalize()))
                }
                Ok(n) => {
                    h.update(&buf[..n]);
                    let _ = s.write_all(&buf[..n]);
                }
                Err(e) => break Err(e.to_string()),
            }
        }
    });
    let (a, b, fwd) = exported_and_forwarded(&fx, "echo", "echo.sock", "", "");
    let mut c = caller(&fwd);
    c.shutdown(std::net::Shutdown::Read).expect("shutdown");
    let data = random_bytes(3 << 20);
    for chunk in data.chunks(64 * 1024) {
        c.write_all(chunk).expect("write into the forward");
    }
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let got = target.result();
    assert_eq!(got, Ok(sha_hex(&data)), "what the target received");
    drop(c);
    let t = Duration::from_secs(10);
    let end = log_line_with(&a, &["session end", "pipe=echo"], t);
    assert!(end.contains("close_code=1000"), "exporting side: {end}");
    let end = log_line_with(&b, &["close_code="], t);
    assert!(end.contains("close_code=1000"), "dialling side: {end}");
}

/// An `exec:` child whose caller sent its input and closed its socket entirely is not
/// killed when the dialling gateway ends the session at once: it runs to its own end, as
/// `data | child` would (here it writes the input to a file only after a pause).
#[test]
fn an_exec_child_outlives_a_caller_that_closed_entirely() {
    let fx = Fixture::new();
    let out = fx.path("out");
    let go = fx.path("go");
    // It keeps its input aside until the test says go (at most 30 s), so it is still
    // running when the session has ended.
    let child = format!(
        "exec:sh -c 'cat > {0}.tmp; i=0; while [ ! -e {1} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; mv {0}.tmp {0}'",
        out.display(),
        go.display()
    );
    let a = fx.serve(
        "a.toml",
        &fx.server_config(&pipe("store", &child, &["alice"], "")),
    );
    let fwd = fx.path("fwd.sock");
    let b = fx.serve("b.toml", &forward(&fx, &fwd, &a.url("store"), "alice", ""));
    let data = random_bytes(200_000);
    let mut c = caller(&fwd);
    c.write_all(&data).expect("write the input");
    drop(c);
    let end = log_line_with(&b, &["close_code="], Duration::from_secs(20));
    assert!(end.contains("close_code=1000"), "dialling side: {end}");
    std::fs::write(&go, b"").expect("go");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.exists() {
        assert!(
            Instant::now() < deadline,
            "the child never finished; exporting side:\n{}",
            a.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::fs::read(&out).expect("read out") == data,
        "the child's file differs"
    );
    log_line_with(
        &a,
        &["exec child exited after the peer left"],
        Duration::from_secs(10),
    );
}

// === 3. byte-exact under load ===

/// Streams `total` random bytes into `path` while reading the echo; returns
/// (sha sent, sha received, bytes received). A first small round trip proves the
/// session is open end to end; `opened` runs then, before the bulk of the data. Fails
/// if one read or write makes no progress for `stall`, or if the whole exchange takes
/// longer than `limit`.
fn stream_through(
    path: &Path,
    total: usize,
    stall: Duration,
    limit: Duration,
    opened: &dyn Fn(),
) -> (String, String, usize) {
    let deadline = Instant::now() + limit;
    let mut s = unix_connect(path);
    s.set_read_timeout(Some(stall)).expect("timeout");
    s.set_write_timeout(Some(stall)).expect("timeout");
    let first = random_bytes(total.min(4096));
    s.write_all(&first).expect("write the first chunk");
    let mut back = vec![0u8; first.len()];
    s.read_exact(&mut back)
        .expect("read the first chunk back (is the session open?)");
    assert!(back == first, "the first chunk came back different");
    opened();
    let mut sent_hash = Sha256::new();
    sent_hash.update(&first);
    let mut w = s.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let mut h = sent_hash;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = total - first.len();
        while left > 0 {
            let n = left.min(buf.len());
            getrandom::fill(&mut buf[..n]).expect("getrandom");
            h.update(&buf[..n]);
            w.write_all(&buf[..n]).expect("write into the forward");
            left -= n;
        }
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
        hex(&h.finalize())
    });
    let mut h = Sha256::new();
    h.update(&back);
    let mut got = back.len();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf).expect("read from the forward");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
        assert!(
            Instant::now() < deadline,
            "took longer than {limit:?}: {got} of {total} bytes back"
        );
    }
    let sent = writer.join().expect("writer thread");
    (sent, hex(&h.finalize()), got)
}

/// A rendezvous of `n` threads that never hangs: a thread that fails before arriving
/// still counts (its [`Ticket`] is dropped), and waiting ends at a deadline.
struct Gate {
    count: std::sync::atomic::AtomicUsize,
    n: usize,
    deadline: Instant,
}

struct Ticket {
    gate: std::sync::Arc<Gate>,
    used: std::cell::Cell<bool>,
}

impl Ticket {
    fn arrive_and_wait(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.used.replace(true) {
            self.gate.count.fetch_add(1, SeqCst);
        }
        while self.gate.count.load(SeqCst) < self.gate.n && Instant::now() < self.gate.deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.used.get() {
            self.gate
                .count
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[test]
fn byte_exact_under_load_through_forward_and_export() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let gw = fx.serve(
        "a.toml",
        &fx.server_config(&pipe(
            "echo",
            &format!("unix:{}", fx.p("echo.sock")),
            &["alice"],
            "max_instances = 256",
        )),
    );
    let fwd_sock = fx.path("fwd.sock");
    let b = fx.serve(
        "b.toml",
        &forward(&fx, &fwd_sock, &gw.url("echo"), "alice", ""),
    );

    // 256 MiB each way, written and read at once.
    const BIG: usize = 256 << 20;
    let t = Instant::now();
    let (sent, received, n) = stream_through(
        &fwd_sock,
        BIG,
        Duration::from_secs(120),
        Duration::from_secs(900),
        &|| {},
    );
    let big_time = t.elapsed();
    eprintln!("256 MiB each way through forward+export: {big_time:?}");
    assert_eq!(n, BIG, "byte count");
    assert_eq!(
        sent, received,
        "SHA-256 of what was sent vs. what came back"
    );

    // 100 concurrent sessions, each with its own ~1 MiB stream. They open a few ms
    // apart, wait until all 100 are open end to end, then all stream at once.
    let t = Instant::now();
    let gate = std::sync::Arc::new(Gate {
        count: 0.into(),
        n: 100,
        deadline: Instant::now() + Duration::from_secs(300),
    });
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let path = fwd_sock.clone();
            let ticket = Ticket {
                gate: gate.clone(),
                used: false.into(),
            };
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20) * i as u32);
                let size = (1 << 20) + i * 997;
                let (sent, received, n) = stream_through(
                    &path,
                    size,
                    Duration::from_secs(120),
                    Duration::from_secs(600),
                    &|| ticket.arrive_and_wait(),
                );
                assert_eq!(n, size, "session {i}: byte count");
                assert_eq!(sent, received, "session {i}: SHA-256");
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("session {i}: {msg}"));
        }
    }
    eprintln!("100 concurrent ~1 MiB sessions: {:?}", t.elapsed());
    if !failures.is_empty() {
        // Say why: the gateways' warnings and errors.
        let problems = |log: String| -> String {
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(40)
                .map(|l| format!("  {l}\n"))
                .collect()
        };
        // Keep the full logs: the temp dir goes away with the test.
        let keep = std::env::temp_dir().join(format!("pipebridge-load-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::write(keep.join("export.log"), gw.log());
        let _ = std::fs::write(keep.join("forward.log"), b.log());
        panic!(
            "{} sessions failed:\n{}\nexporting gateway:\n{}forwarding gateway:\n{}full logs in {}",
            failures.len(),
            failures.join("\n"),
            problems(gw.log()),
            problems(b.log()),
            keep.display()
        );
    }
}

// === 4. refusals ===

struct RefusalSetup {
    fx: Fixture,
    gw: Gateway,
    _echo: UnixServer,
}

const TOKEN: &str = "pbt_refusal_test_token_0123456789";

fn refusal_setup() -> RefusalSetup {
    let fx = Fixture::new();
    let echo = UnixServer::echo(&fx.path("echo.sock"));
    let extra = [
        // A token identity makes client certificates optional at the TLS layer, so a
        // client with no credentials reaches HTTP and gets a 401.
        format!(
            "[[identity]]\nname = \"tok\"\ntoken_sha256 = {}\n\n",
            q(&pipebridge::pki::token_sha256_hex(TOKEN))
        ),
        pipe(
            "echo",
            &format!("unix:{}", fx.p("echo.sock")),
            &["alice", "tok"],
            "",
        ),
        pipe("secret", "exec:cat", &["bob"], ""),
        pipe(
            "dead",
            &format!("unix:{}", fx.p("nobody-listens.sock")),
            &["alice"],
            "",
        ),
        pipe("outonly", "exec:echo hi", &["alice"], "direction = \"out\""),
        pipe("single", "exec:cat", &["alice"], "max_instances = 1"),
        pipe(
            "noprog",
            "exec:pipebridge-test-no-such-program",
            &["alice"],
            "",
        ),
    ]
    .concat();
    let gw = fx.serve("gw.toml", &fx.server_config(&extra));
    RefusalSetup {
        fx,
        gw,
        _echo: echo,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unauthenticated() {
    let RefusalSetup { fx, gw, _echo } = refusal_setup();
    let port = gw.port;
    let up = |extra: &str| upgrade_request(port, "/pipes/echo", "pipebridge.v1", extra);

    // Sanity: the same request with good credentials is upgraded.
    let ok = raw_request(&fx, port, Creds::Cert("alice"), &up("")).await;
    assert_eq!(ok.status, 101, "{:?}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.header("sec-websocket-protocol"), Some("pipebridge.v1"));
    let ok = raw_request(
        &fx,
        port,
        Creds::None,
        &up(&format!("Authorization: Bearer {TOKEN}\r\n")),
    )
    .await;
    assert_eq!(ok.status, 101);

    // No credentials.
    let none = raw_request(&fx, port, Creds::None, &up("")).await;
    let m_none = none.expect_refusal(401, "unauthenticated");
    // A bad token.
    let bad = raw_request(
        &fx,
        port,
        Creds::None,
        &up("Authorization: Bearer not-the-token\r\n"),
    )
    .await;
    let m_bad = bad.expect_refusal(401, "unauthenticated");
    // carol's certificate chains to the CA but matches no [[identity]].
    let carol = raw_request(&fx, port, Creds::Cert("carol"), &up("")).await;
    let m_carol = carol.expect_refusal(401, "unauthenticated");

    // connect reports each one on one line and exits 3.
    let url = gw.url("echo");
    let ca = fx.ca();
    let out = fx.run(&["connect", &url, "--ca", &ca], b"");
    assert_eq!(expect_refused(&out, 3, 401, "unauthenticated"), m_none);
    let out = fx.run_env(
        &["connect", &url, "--ca", &ca],
        &[("PIPEBRIDGE_TOKEN", "not-the-token")],
        b"",
        CLIENT_TIMEOUT,
    );
    assert_eq!(expect_refused(&out, 3, 401, "unauthenticated"), m_bad);
    let out = fx.connect(&url, "carol", b"");
    assert_eq!(expect_refused(&out, 3, 401, "unauthenticated"), m_carol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_forbidden_is_the_same_for_unknown_and_disallowed() {
    let RefusalSetup { fx, gw, _echo } = refusal_setup();
    let port = gw.port;
    let unknown = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/nosuch", "pipebridge.v1", ""),
    )
    .await;
    unknown.expect_refusal(403, "forbidden");
    let disallowed = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/secret", "pipebridge.v1", ""),
    )
    .await;
    disallowed.expect_refusal(403, "forbidden");
    assert_eq!(
        unknown.body, disallowed.body,
        "403 bodies must not tell the two apart"
    );

    let a = fx.connect(&gw.url("nosuch"), "alice", b"");
    let b = fx.connect(&gw.url("secret"), "alice", b"");
    expect_refused(&a, 3, 403, "forbidden");
    expect_refused(&b, 3, 403, "forbidden");
    assert_eq!(a.stderr, b.stderr);

    // bob may use it.
    let out = fx.connect(&gw.url("secret"), "bob", b"for bob");
    out.expect_code(0);
    assert_eq!(out.stdout, b"for bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_bad_requests() {
    let RefusalSetup { fx, gw, _echo } = refusal_setup();
    let port = gw.port;
    for path in [
        "/pipes/a%2Fb",
        "/pipes/..",
        "/pipes/a%00b",
        "/pipes/.hidden",
        "/pipes/a/b",
    ] {
        // With and without credentials: the name is checked first.
        for creds in [Creds::Cert("alice"), Creds::None] {
            let r = raw_request(
                &fx,
                port,
                creds,
                &upgrade_request(port, path, "pipebridge.v1", ""),
            )
            .await;
            r.expect_refusal(400, "bad_request");
        }
    }
    // A bad query.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/echo?direction=sideways", "pipebridge.v1", ""),
    )
    .await;
    r.expect_refusal(400, "bad_request");

    // A plain GET on a pipe: 426.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &get_request(port, "/pipes/echo", ""),
    )
    .await;
    r.expect_refusal(426, "upgrade_required");

    // An upgrade with the wrong subprotocol: 400.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/echo", "chat", ""),
    )
    .await;
    r.expect_refusal(400, "bad_request");
    // ... and with none at all.
    let no_proto = format!(
        "GET /pipes/echo HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let r = raw_request(&fx, port, Creds::Cert("alice"), no_proto.as_bytes()).await;
    r.expect_refusal(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_endpoint_unavailable_and_unsupported_direction() {
    let RefusalSetup { fx, mut gw, _echo } = refusal_setup();
    let port = gw.port;

    // A unix: pipe with nothing listening: 502, and the body names no path.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/dead", "pipebridge.v1", ""),
    )
    .await;
    let msg = r.expect_refusal(502, "endpoint_unavailable");
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        !body.contains("nobody-listens"),
        "the body leaks the endpoint path: {body}"
    );
    assert!(!body.contains(&fx.p("")), "the body leaks a path: {body}");
    let out = fx.connect(&gw.url("dead"), "alice", b"");
    assert_eq!(expect_refused(&out, 1, 502, "endpoint_unavailable"), msg);
    // The details go to the gateway's log instead.
    gw.proc.wait_until(Duration::from_secs(10), |log| {
        log.lines()
            .any(|l| l.contains("nobody-listens.sock") && l.contains("dead"))
    });

    // An exec: program that cannot be started: 502 as well.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/noprog", "pipebridge.v1", ""),
    )
    .await;
    let msg = r.expect_refusal(502, "endpoint_unavailable");
    assert!(
        !msg.contains("pipebridge-test-no-such-program"),
        "the message leaks the command: {msg}"
    );
    let out = fx.connect(&gw.url("noprog"), "alice", b"");
    assert_eq!(expect_refused(&out, 1, 502, "endpoint_unavailable"), msg);

    // direction=in on an out-only pipe: 409.
    let r = raw_request(
        &fx,
        port,
        Creds::Cert("alice"),
        &upgrade_request(port, "/pipes/outonly?direction=in", "pipebridge.v1", ""),
    )
    .await;
    let msg = r.expect_refusal(409, "unsupported");
    let mut args = vec![
        "connect".to_string(),
        gw.url("outonly"),
        "--direction".into(),
        "in".into(),
    ];
    args.extend(fx.cert_args("alice"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fx.run(&a, b"");
    assert_eq!(expect_refused(&out, 1, 409, "unsupported"), msg);
    // The same through the URL's query.
    let out = fx.connect(&format!("{}?direction=in", gw.url("outonly")), "alice", b"");
    expect_refused(&out, 1, 409, "unsupported");
    // The pipe's own direction works (that its output always arrives is checked by
    // exec_output_is_never_lost_at_eof).
    let out = fx.connect(&gw.url("outonly"), "alice", b"");
    out.expect_code(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_busy_at_max_instances() {
    let RefusalSetup { fx, gw, _echo } = refusal_setup();
    let port = gw.port;
    let req = upgrade_request(port, "/pipes/single", "pipebridge.v1", "");
    let (first, held) = raw_exchange(&fx, port, Creds::Cert("alice"), &req).await;
    assert_eq!(
        first.status,
        101,
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );

    let second = raw_request(
        &fx,
        port,
        Creds::Cert("bob"),
        &upgrade_request(port, "/pipes/secret", "pipebridge.v1", ""),
    )
    .await;
    assert_eq!(second.status, 101, "another pipe is not affected");

    let r = raw_request(&fx, port, Creds::Cert("alice"), &req).await;
    let msg = r.expect_refusal(503, "busy");
    let out = fx.connect(&gw.url("single"), "alice", b"");
    assert_eq!(expect_refused(&out, 1, 503, "busy"), msg);

    // Once the held session is gone, the slot frees up.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = raw_request(&fx, port, Creds::Cert("alice"), &req).await;
        if r.status == 101 {
            break;
        }
        r.expect_refusal(503, "busy");
        assert!(
            Instant::now() < deadline,
            "the slot was not freed after the session ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn connect_to_an_unreachable_gateway_exits_1() {
    let fx = Fixture::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("wss://localhost:{port}/pipes/echo");
    let out = fx.connect(&url, "alice", b"x");
    out.expect_code(1);
    assert!(out.stdout.is_empty());
    assert!(!out.stderr.trim().is_empty(), "no message on stderr");
    let base = format!("wss://localhost:{port}");
    let mut args = vec!["ls".to_string(), base];
    args.extend(fx.cert_args("alice"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fx.run(&a, b"").expect_code(1);
}

// === 5. a certificate from another CA ===

#[test]
fn certificate_from_another_ca_is_rejected_in_tls() {
    let fx = Fixture::new();
    let other = fx.path("other-pki");
    pipebridge::pki::init(&pipebridge::pki::CertsInit {
        dir: other.clone(),
        server_names: vec!["localhost".into()],
        clients: vec!["alice".into()],
        force: false,
    })
    .expect("second pki");
    let cert = other.join("alice.pem").to_string_lossy().into_owned();
    let key = other.join("alice.key").to_string_lossy().into_owned();
    let ca = fx.ca();

    // Without tokens configured (client certificates mandatory), and with (optional,
    // but a presented one is still verified).
    let token_identity = format!(
        "[[identity]]\nname = \"tok\"\ntoken_sha256 = {}\n",
        q(&pipebridge::pki::token_sha256_hex(TOKEN))
    );
    for (i, extra) in ["", token_identity.as_str()].into_iter().enumerate() {
        let cfg = fx.server_config(&format!(
            "{extra}\n{}",
            pipe("cat", "exec:cat", &["alice"], "")
        ));
        let gw = fx.serve(&format!("gw{i}.toml"), &cfg);
        let url = gw.url("cat");
        let out = fx.run(
            &["connect", &url, "--ca", &ca, "--cert", &cert, "--key", &key],
            b"x",
        );
        out.expect_code(3);
        assert!(
            out.stderr.contains("the server rejected our certificate"),
            "stderr:\n{}",
            out.stderr
        );
        assert!(out.stdout.is_empty());
        let base = gw.base();
        let out = fx.run(
            &["ls", &base, "--ca", &ca, "--cert", &cert, "--key", &key],
            b"",
        );
        out.expect_code(3);
        assert!(
            out.stderr.contains("the server rejected our certificate"),
            "{}",
            out.stderr
        );
        if i == 0 {
            // mTLS only: no certificate at all is refused in the handshake too.
            let out = fx.run(&["connect", &url, "--ca", &ca], b"x");
            out.expect_code(3);
            assert!(out.stdout.is_empty());
        }
        // The right certificate still works.
        let out = fx.connect(&url, "alice", b"x");
        out.expect_code(0);
        assert_eq!(out.stdout, b"x");
    }
}

// === 6. tokens and ls ===

#[test]
fn token_auth_and_ls_lists_only_allowed_pipes() {
    let fx = Fixture::new();
    let token = pipebridge::pki::new_token().expect("token");
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let echo_sock = fx.p("echo.sock");
    let extra = [
        format!(
            "[[identity]]\nname = \"robot\"\ntoken_sha256 = {}\ngroups = [\"bots\"]\n\n",
            q(&pipebridge::pki::token_sha256_hex(&token))
        ),
        pipe(
            "echo",
            &format!("unix:{echo_sock}"),
            &["alice", "@bots"],
            "",
        ),
        pipe("wc", "exec:wc -c", &["robot"], ""),
        pipe("secret", "exec:cat", &["bob"], ""),
        pipe("ops-only", "exec:cat", &["@ops"], ""),
    ]
    .concat();
    let gw = fx.serve("gw.toml", &fx.server_config(&extra));
    let ca = fx.ca();
    let tf = fx.write("token.txt", &format!("{token}\n"));
    let tf = tf.to_string_lossy().into_owned();

    let url = gw.url("echo");
    let out = fx.run(
        &["connect", &url, "--ca", &ca, "--token-file", &tf],
        b"by file",
    );
    out.expect_code(0);
    assert_eq!(out.stdout, b"by file");
    let out = fx.run_env(
        &["connect", &url, "--ca", &ca],
        &[("PIPEBRIDGE_TOKEN", &token)],
        b"by env",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(out.stdout, b"by env");
    let wc = gw.url("wc");
    let out = fx.run(
        &["connect", &wc, "--ca", &ca, "--token-file", &tf],
        b"12345",
    );
    out.expect_code(0);
    assert_eq!(out.out().trim(), "5");
    // The token does not open bob's pipe.
    let secret = gw.url("secret");
    let out = fx.run(&["connect", &secret, "--ca", &ca, "--token-file", &tf], b"");
    expect_refused(&out, 3, 403, "forbidden");

    // Which of the configured pipe names `ls` shows (as whole words, whatever the
    // layout around them).
    let names = |out: &Output| -> Vec<&'static str> {
        let text = out.out();
        let words: Vec<&str> = text.split_whitespace().collect();
        ["echo", "ops-only", "secret", "wc"]
            .into_iter()
            .filter(|n| words.contains(n))
            .collect()
    };
    let base = gw.base();
    let out = fx.run(&["ls", &base, "--ca", &ca, "--token-file", &tf], b"");
    out.expect_code(0);
    assert_eq!(names(&out), ["echo", "wc"], "ls as robot:\n{}", out.out());
    assert!(
        !out.out().contains(&echo_sock),
        "ls shows an endpoint path:\n{}",
        out.out()
    );
    assert!(
        !out.out().contains("echo.sock"),
        "ls shows an endpoint path:\n{}",
        out.out()
    );
    assert!(
        !out.out().contains("wc -c"),
        "ls shows a command line:\n{}",
        out.out()
    );
    // The echo row shows its kind, direction and mode.
    let echo_row = lines(&out.out())
        .into_iter()
        .find(|l| l.split_whitespace().any(|w| w == "echo"))
        .unwrap_or_default()
        .to_string();
    for want in ["unix", "duplex", "byte"] {
        assert!(
            echo_row.split_whitespace().any(|w| w == want),
            "no {want:?} in the echo row of:\n{}",
            out.out()
        );
    }

    let out = fx.run_env(
        &["ls", &base, "--ca", &ca],
        &[("PIPEBRIDGE_TOKEN", &token)],
        b"",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(names(&out), ["echo", "wc"]);

    let mut args = vec!["ls".to_string(), base.clone()];
    args.extend(fx.cert_args("alice"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fx.run(&a, b"");
    out.expect_code(0);
    assert_eq!(
        names(&out),
        ["echo", "ops-only"],
        "ls as alice:\n{}",
        out.out()
    );
    assert!(!out.out().contains(&echo_sock));

    // ls without credentials is refused.
    let out = fx.run(&["ls", &base, "--ca", &ca], b"");
    expect_refused(&out, 3, 401, "unauthenticated");
}

// === 7. check-config, certs init, token new ===

fn line_no(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

#[test]
fn check_config_reports_every_error_with_file_line_and_key() {
    let fx = Fixture::new();
    let text = r#"[server]
listen = "127.0.0.1:0"

[tls]
cert = "server.pem"
key = "server.key"

[limits]
handshake_timeout = "soon"

[[identity]]
name = "alice"
cert_cn = "alice"

[[pipe]]
name = "a/b"
endpoint = "bogus:x"
allow = ["mallory"]
run_as = "gateway"

[[pipe]]
name = "ok"
endpoint = "exec:cat"
allow = ["alice"]
run_as = "sometimes"
"#;
    let cfg = fx.write("bad.toml", text);
    let cfg_s = cfg.to_string_lossy().into_owned();
    let out = fx.run(&["check-config", "--config", &cfg_s], b"");
    out.expect_code(2);
    let expected = [
        (
            line_no(text, "handshake_timeout"),
            "limits.handshake_timeout",
        ),
        (line_no(text, "\"a/b\""), "pipe \"a/b\".name"),
        (line_no(text, "bogus:x"), "pipe \"a/b\".endpoint"),
        (line_no(text, "mallory"), "pipe \"a/b\".allow"),
        (line_no(text, "sometimes"), "pipe \"ok\".run_as"),
    ];
    for (line, key) in expected {
        let want = format!("{cfg_s}:{line}: {key}");
        assert!(
            out.stderr.lines().any(|l| l.contains(&want)),
            "missing {want:?} in:\n{}",
            out.stderr
        );
    }
    assert!(lines(&out.stderr).len() >= expected.len(), "{}", out.stderr);

    // A TOML syntax error: exit 2, with its line.
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls\ncert = \"x\"\n";
    let cfg = fx.write("syntax.toml", text);
    let cfg_s = cfg.to_string_lossy().into_owned();
    let out = fx.run(&["check-config", "--config", &cfg_s], b"");
    out.expect_code(2);
    assert!(
        out.stderr.contains(&format!("{cfg_s}:4:")),
        "stderr:\n{}",
        out.stderr
    );

    // A missing file: exit 2.
    let missing = fx.p("missing.toml");
    let out = fx.run(&["check-config", "--config", &missing], b"");
    out.expect_code(2);

    // A good config: exit 0.
    let good = fx.write(
        "good.toml",
        &fx.server_config(&pipe("cat", "exec:cat", &["alice"], "")),
    );
    let good = good.to_string_lossy().into_owned();
    let out = fx.run(&["check-config", "--config", &good], b"");
    out.expect_code(0);

    // A [tls] file that does not load is a config error (exit 2), named by file, line
    // and key, at check-config and at serve alike (serve used to exit 1, and
    // check-config to say OK).
    let bad_key = fx.write("not-a-key.pem", "not PEM at all\n");
    for (what, from, to, key) in [
        (
            "missing",
            fx.p("pki/server.pem"),
            fx.p("gone.pem"),
            "tls.cert",
        ),
        (
            "not PEM",
            fx.p("pki/server.key"),
            bad_key.to_string_lossy().into_owned(),
            "tls.key",
        ),
    ] {
        let text = fx
            .server_config(&pipe("cat", "exec:cat", &["alice"], ""))
            .replace(&from, &to);
        let cfg = fx.write("badtls.toml", &text);
        let cfg_s = cfg.to_string_lossy().into_owned();
        let want = format!("{cfg_s}:{}: {key}: {to}", line_no(&text, &to));
        let out = fx.run(&["check-config", "--config", &cfg_s], b"");
        out.expect_code(2);
        assert!(
            out.stderr.contains(&want),
            "{what}: want {want:?} in:\n{}",
            out.stderr
        );
        let out = fx.run_env(
            &["serve", "--config", &cfg_s],
            &[],
            b"",
            Duration::from_secs(20),
        );
        out.expect_code(2);
        assert!(
            out.stderr.contains(&want),
            "{what}: want {want:?} in:\n{}",
            out.stderr
        );
    }
    // A development PKI that serve has not made yet is not checked, and check-config
    // makes nothing.
    let dev = fx.path("devpki");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ndev_pki = {}\n\n\
         [[identity]]\nname = \"dev\"\ncert_cn = \"dev\"\n\n{}",
        q(&dev.display().to_string()),
        pipe("cat", "exec:cat", &["dev"], "")
    );
    let cfg = fx.write("dev.toml", &text);
    let out = fx.run(&["check-config", "--config", &cfg.to_string_lossy()], b"");
    out.expect_code(0);
    assert!(!dev.exists(), "check-config made the development PKI");
}

#[test]
fn certs_init_refuses_to_overwrite_without_force() {
    let fx = Fixture::new();
    let dir = fx.p("newpki");
    let out = fx.run(
        &[
            "certs",
            "init",
            "--dir",
            &dir,
            "--client",
            "x",
            "--server-name",
            "gw.example",
        ],
        b"",
    );
    out.expect_code(0);
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "x.pem",
        "x.key",
    ] {
        assert!(Path::new(&dir).join(f).is_file(), "{f} missing");
    }
    for f in ["ca.key", "server.key", "x.key"] {
        let mode = std::fs::metadata(Path::new(&dir).join(f))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f} mode {mode:o}");
    }
    let before = std::fs::read(Path::new(&dir).join("ca.pem")).expect("read");
    let out = fx.run(&["certs", "init", "--dir", &dir, "--client", "x"], b"");
    out.expect_code(2);
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert_eq!(
        std::fs::read(Path::new(&dir).join("ca.pem")).expect("read"),
        before,
        "overwritten"
    );
    let out = fx.run(
        &["certs", "init", "--dir", &dir, "--client", "x", "--force"],
        b"",
    );
    out.expect_code(0);
    assert_ne!(
        std::fs::read(Path::new(&dir).join("ca.pem")).expect("read"),
        before
    );
}

#[test]
fn token_new_prints_token_and_identity_lines() {
    let fx = Fixture::new();
    let out = fx.run(&["token", "new", "--name", "x"], b"");
    out.expect_code(0);
    let stdout = out.out();
    let l = lines(&stdout);
    assert_eq!(l.len(), 1, "stdout: {stdout:?}");
    let token = l[0].trim();
    assert_eq!(token, l[0], "the token line has stray whitespace");
    assert!(token.len() >= 32, "token too short for 128 bits: {token:?}");
    assert!(!out.stderr.contains(token), "the token leaks to stderr");
    assert!(out.stderr.contains("[[identity]]"), "{}", out.stderr);
    assert!(out.stderr.contains("name = \"x\""), "{}", out.stderr);
    let want = format!(
        "token_sha256 = \"{}\"",
        pipebridge::pki::token_sha256_hex(token)
    );
    assert!(
        out.stderr.contains(&want),
        "missing {want:?} in:\n{}",
        out.stderr
    );
    // Two tokens differ.
    let again = fx.run(&["token", "new", "--name", "x"], b"");
    again.expect_code(0);
    assert_ne!(again.out().trim(), token);
    // The stderr lines paste into a working config.
    let ident: String = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let cfg = fx.write(
        "pasted.toml",
        &fx.server_config(&format!("{ident}\n{}", pipe("cat", "exec:cat", &["x"], ""))),
    );
    let cfg = cfg.to_string_lossy().into_owned();
    fx.run(&["check-config", "--config", &cfg], b"")
        .expect_code(0);
}

// === 8. hosted socket files ===

fn socket_mode(p: &Path) -> u32 {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket",
        p.display()
    );
    md.permissions().mode() & 0o7777
}

#[test]
fn forward_socket_mode_stale_live_and_removal() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let gw = fx.serve(
        "a.toml",
        &fx.server_config(&pipe(
            "echo",
            &format!("unix:{}", fx.p("echo.sock")),
            &["alice"],
            "",
        )),
    );
    let url = gw.url("echo");

    // Default mode 0660, for the verb and for a [[forward]].
    let verb_sock = fx.path("verb.sock");
    let mut verb = fx.spawn_forward(&verb_sock, &url, "alice");
    verb.wait_for_line("pipebridge: forwarding ", START_TIMEOUT);
    assert_eq!(socket_mode(&verb_sock), 0o660);
    assert_eq!(
        unix_request(&verb_sock, b"ping", Duration::from_secs(30)),
        b"ping"
    );

    let cfg_sock = fx.path("sub/dir/cfg.sock");
    let mut b = fx.serve("b.toml", &forward(&fx, &cfg_sock, &url, "alice", ""));
    assert_eq!(socket_mode(&cfg_sock), 0o660);
    assert_eq!(
        unix_request(&cfg_sock, b"pong", Duration::from_secs(30)),
        b"pong"
    );

    let mode_sock = fx.path("mode.sock");
    let _c = fx.serve(
        "c.toml",
        &forward(&fx, &mode_sock, &url, "alice", "socket_mode = \"0600\""),
    );
    assert_eq!(socket_mode(&mode_sock), 0o600);

    // A stale socket file (its listener is gone) is replaced.
    let stale = fx.path("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists(), "the stale file should be left behind");
    let mut st = fx.spawn_forward(&stale, &url, "alice");
    st.wait_for_line("pipebridge: forwarding ", START_TIMEOUT);
    assert_eq!(
        unix_request(&stale, b"stale ok", Duration::from_secs(30)),
        b"stale ok"
    );

    // A live one is refused: the forward exits non-zero with a message, and the live
    // server keeps its socket.
    let live = fx.path("live.sock");
    let live_listener = UnixListener::bind(&live).expect("bind");
    let mut lv = fx.spawn_forward(&live, &url, "alice");
    let status = lv
        .wait_exit(Duration::from_secs(20))
        .expect("the forward should exit on a live socket");
    assert!(!status.success(), "exit status {status}");
    let log = lv.log();
    assert!(
        log.contains("live.sock"),
        "the message names the socket:\n{log}"
    );
    assert!(
        log.contains("in use"),
        "the message says it is in use:\n{log}"
    );
    assert!(live.exists(), "the live socket was removed");
    let _c = std::os::unix::net::UnixStream::connect(&live).expect("the live server still answers");
    live_listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        live_listener.accept().is_ok(),
        "the connection reached the original listener"
    );

    // The same refusal through a config.
    let mut live_cfg = {
        let cfg = fx.write("d.toml", &forward(&fx, &live, &url, "alice", ""));
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(&cfg);
        scrub(&mut cmd);
        Proc::spawn(cmd, fx.dir(), false)
    };
    let status = live_cfg
        .wait_exit(Duration::from_secs(20))
        .expect("serve should exit on a live socket");
    assert!(!status.success(), "exit status {status}");
    assert!(live_cfg.log().contains("in use"), "{}", live_cfg.log());

    // SIGTERM removes the socket files.
    b.proc.sigterm();
    let status = b
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway should exit on SIGTERM");
    assert!(status.success(), "exit status {status}; log:\n{}", b.log());
    assert!(
        !cfg_sock.exists(),
        "{} left behind after SIGTERM",
        cfg_sock.display()
    );

    verb.sigterm();
    let status = verb
        .wait_exit(Duration::from_secs(20))
        .expect("forward should exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        !verb_sock.exists(),
        "{} left behind after SIGTERM",
        verb_sock.display()
    );
}

// === 9. exec environment ===

#[test]
fn exec_environment_is_scrubbed() {
    let fx = Fixture::new();
    let extra = pipe(
        "env-pipe",
        "exec:env",
        &["alice"],
        "env = { EXTRA_FOR_CHILD = \"yes\" }",
    );
    let gw = fx.serve_env(
        "gw.toml",
        &fx.server_config(&extra),
        &[
            ("SECRET_GATEWAY_VAR", "x"),
            ("PIPEBRIDGE_TOKEN", "gateway-token"),
        ],
    );
    let out = fx.connect(&gw.url("env-pipe"), "alice", b"");
    out.expect_code(0);
    let env = out.out();
    let vars: Vec<&str> = env.lines().collect();
    for want in [
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=C.UTF-8",
        "PIPEBRIDGE_IDENTITY=alice",
        "PIPEBRIDGE_PIPE=env-pipe",
        "EXTRA_FOR_CHILD=yes",
    ] {
        assert!(vars.contains(&want), "missing {want:?} in:\n{env}");
    }
    assert!(
        vars.iter().any(|v| v.starts_with("HOME=")),
        "no HOME in:\n{env}"
    );
    assert!(
        vars.iter().any(|v| v.starts_with("USER=")),
        "no USER in:\n{env}"
    );
    assert!(
        !env.contains("SECRET_GATEWAY_VAR"),
        "the gateway's environment leaked:\n{env}"
    );
    assert!(
        !env.contains("gateway-token"),
        "the gateway's token leaked:\n{env}"
    );

    // bob's identity shows up as bob.
    let extra = pipe("env2", "exec:env", &["alice", "bob"], "");
    let gw2 = fx.serve("gw2.toml", &fx.server_config(&extra));
    let out = fx.connect(&gw2.url("env2"), "bob", b"");
    out.expect_code(0);
    assert!(
        out.out().lines().any(|l| l == "PIPEBRIDGE_IDENTITY=bob"),
        "{}",
        out.out()
    );
    assert!(
        out.out().lines().any(|l| l == "PIPEBRIDGE_PIPE=env2"),
        "{}",
        out.out()
    );
}

// === config files ===

fn toml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let files = toml_files(&dir);
    assert!(!files.is_empty(), "no config files in {}", dir.display());
    for f in files {
        if let Err(e) = pipebridge::config::Config::load(&f) {
            panic!("{} does not load:\n{e}", f.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let files = toml_files(&dir);
    assert!(
        files.len() >= 5,
        "expected the invalid fixtures in {}",
        dir.display()
    );
    for f in files {
        // Each fixture says what its error must mention: `# expect: KEY or TEXT`.
        let text = std::fs::read_to_string(&f).expect("read fixture");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()))
            .trim()
            .to_string();
        match pipebridge::config::Config::load(&f) {
            Ok(_) => panic!("{} should not load", f.display()),
            Err(errs) => {
                for e in &errs.0 {
                    assert_eq!(e.file, f, "{e}");
                    assert!(
                        e.line.is_some(),
                        "{}: error without a line: {e}",
                        f.display()
                    );
                }
                assert!(
                    errs.0
                        .iter()
                        .any(|e| e.key == expect || e.to_string().contains(&expect)),
                    "{}: no error mentions {expect:?}:\n{errs}",
                    f.display()
                );
            }
        }
    }
}

// === HTTP/2 session reuse ===

/// Established TCP connections to `port` (as seen by `ss`).
fn established_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn forward_sessions_share_http2_connections_and_idle_ones_are_closed() {
    let fx = Fixture::new();
    let _sha = UnixServer::sha_reply(&fx.path("sha.sock"));
    let keepalive = "[keepalive]\ninterval = \"1s\"\ntimeout = \"2s\"\n";
    let (gw, _b, fwd_sock) = exported_and_forwarded(&fx, "sha", "sha.sock", "", keepalive);
    // Twenty sessions, one after the other: they share the forward's pooled HTTP/2
    // connections instead of dialling twenty.
    for i in 0..20usize {
        let data = random_bytes(1000 + i);
        let reply = unix_request(&fwd_sock, &data, Duration::from_secs(30));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            sha_hex(&data),
            "session {i}"
        );
    }
    let open = established_to(gw.port);
    // One pooled connection per shard (one shard per core by default).
    let most = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    assert!(
        (1..=most).contains(&open),
        "20 sessions should share at most {most} connections, found {open}"
    );
    assert_eq!(
        gw.log().matches("session end").count(),
        20,
        "every session ends on the exporting side:\n{}",
        gw.log()
    );
    // run_as = "gateway": every audit line names the gateway's own uid and gid.
    let me = std::fs::metadata("/proc/self").expect("/proc/self");
    let ids = format!(
        "uid={} gid={}",
        std::os::unix::fs::MetadataExt::uid(&me),
        std::os::unix::fs::MetadataExt::gid(&me)
    );
    let log = gw.log();
    let ends: Vec<&str> = log.lines().filter(|l| l.contains("session end")).collect();
    assert!(
        ends.iter().all(|l| l.contains(&ids)),
        "audit lines without {ids}:\n{}",
        ends.join("\n")
    );
    // Idle connections are closed by the exporting gateway (keepalive.timeout, at least
    // the handshake timeout of 10 s), and the forward dials again when needed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while established_to(gw.port) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle HTTP/2 connections still open after 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let data = random_bytes(5000);
    let reply = unix_request(&fwd_sock, &data, Duration::from_secs(30));
    assert_eq!(String::from_utf8_lossy(&reply), sha_hex(&data));
}

#[test]
fn a_forward_without_http2_keeps_no_connection_once_its_sessions_end() {
    let fx = Fixture::new();
    let _sha = UnixServer::sha_reply(&fx.path("sha.sock"));
    let pipe_cfg = pipe("sha", &format!("unix:{}", fx.p("sha.sock")), &["alice"], "");
    let mut gw = fx.serve("a.toml", &fx.server_config(&pipe_cfg));
    let fwd_sock = fx.path("fwd.sock");
    let _b = fx.serve(
        "b.toml",
        &forward(&fx, &fwd_sock, &gw.url("sha"), "alice", "http2 = false"),
    );
    // Sequential sessions and a few at once, each over an HTTP/1.1 upgrade of its own
    // (with HTTP/2, an idle pooled connection would stay open for the keepalive
    // timeout, at least 10 s, and fail the last check).
    for i in 0..3usize {
        let data = random_bytes(3000 + i);
        let reply = unix_request(&fwd_sock, &data, Duration::from_secs(30));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            sha_hex(&data),
            "session {i}"
        );
    }
    let callers: Vec<_> = (0..4usize)
        .map(|i| {
            let fwd_sock = fwd_sock.clone();
            std::thread::spawn(move || {
                let data = random_bytes(7000 + i);
                let reply = unix_request(&fwd_sock, &data, Duration::from_secs(30));
                (sha_hex(&data), String::from_utf8_lossy(&reply).into_owned())
            })
        })
        .collect();
    for c in callers {
        let (want, got) = c.join().expect("caller");
        assert_eq!(got, want);
    }
    gw.proc.wait_until(Duration::from_secs(10), |l| {
        l.matches("session end").count() == 7
    });
    // No connection is kept once its session ended (nothing pools HTTP/1.1).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while established_to(gw.port) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "HTTP/1.1 connections still open after their sessions ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_burst_of_first_sessions_dials_one_http2_connection_per_shard() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let pipe_cfg = pipe(
        "echo",
        &format!("unix:{}", fx.p("echo.sock")),
        &["alice"],
        "",
    );
    let gw = fx.serve("a.toml", &fx.server_config(&pipe_cfg));
    let fwd_sock = fx.path("fwd.sock");
    // Two shards whatever the cores, so that the bound below is below what each caller
    // dialling its own connection made (13 of 24 before the gate).
    let _b = fx.serve_env(
        "b.toml",
        &forward(&fx, &fwd_sock, &gw.url("echo"), "alice", ""),
        &[("PIPEBRIDGE_SHARDS", "2")],
    );
    // Callers arrive at once at a forward that has no connection yet: one of them per
    // shard dials, the others wait for that connection and open their streams on it.
    const CALLERS: usize = 24;
    let start = Arc::new(std::sync::Barrier::new(CALLERS));
    let answered = Arc::new(std::sync::Barrier::new(CALLERS + 1));
    let release = Arc::new(std::sync::Barrier::new(CALLERS + 1));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (start, answered, release) = (start.clone(), answered.clone(), release.clone());
            let sock = fwd_sock.clone();
            thread::spawn(move || {
                start.wait();
                let msg = format!("caller {i:02}");
                // No panic before the barriers (the others would wait for ever); each
                // step is bounded by the read timeout.
                let exchange = || -> std::io::Result<(UnixStream, String)> {
                    let mut s = UnixStream::connect(&sock)?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    s.write_all(msg.as_bytes())?;
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got)?;
                    Ok((s, String::from_utf8_lossy(&got).into_owned()))
                };
                let r = exchange();
                answered.wait();
                // Each session stays open until the connections are counted.
                release.wait();
                r.map(|(_open, got)| (msg, got))
            })
        })
        .collect();
    answered.wait();
    let open = established_to(gw.port);
    release.wait();
    for c in callers {
        let (sent, got) = c.join().expect("caller thread").expect("echo");
        assert_eq!(got, sent);
    }
    assert!(
        (1..=2).contains(&open),
        "{CALLERS} sessions opened at once on two shards should share at most 2 connections, found {open}"
    );
}

/// Bytes the processes under `pid` (not `pid` itself) have written (`wchar` of
/// /proc/PID/io).
fn written_by_children(pid: u32) -> u64 {
    let parent_of = |p: u32| -> Option<u32> {
        let st = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        st.rsplit_once(") ")?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let under = |mut p: u32| {
        for _ in 0..8 {
            match parent_of(p) {
                Some(q) if q == pid => return true,
                Some(q) if q > 1 => p = q,
                _ => return false,
            }
        }
        false
    };
    pids.into_iter()
        .filter(|&p| p != pid && under(p))
        .filter_map(|p| {
            let io = std::fs::read_to_string(format!("/proc/{p}/io")).ok()?;
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: "))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Sessions whose local callers stop reading fill their own HTTP/2 stream windows but
/// never the connection's: the other sessions on the same pooled connection go on. (The
/// connection window was 16 MiB, eight stalled streams' worth: a ninth session's data
/// could no longer be sent, and its keepalive ended it.)
#[test]
fn callers_that_stop_reading_do_not_stall_the_other_sessions_on_their_connection() {
    let fx = Fixture::new();
    // One pipe: a caller that says "big" gets 6 MB, any other line comes back.
    let pipe_cfg = pipe(
        "chatty",
        "exec:sh -c 'read x; if [ \"$x\" = big ]; then head -c 6000000 /dev/zero; else echo \"$x\"; fi'",
        &["alice"],
        "",
    );
    let gw = fx.serve("a.toml", &fx.server_config(&pipe_cfg));
    let fwd = fx.path("fwd.sock");
    // One shard: every session of the forward shares one HTTP/2 connection.
    let _b = fx.serve_env(
        "b.toml",
        &forward(&fx, &fwd, &gw.url("chatty"), "alice", ""),
        &[("PIPEBRIDGE_SHARDS", "1")],
    );
    // Ten callers that ask for 6 MB and read none of it: each stream's window (2 MiB)
    // and more waits for them.
    let stalled: Vec<UnixStream> = (0..10)
        .map(|_| {
            let mut s = unix_connect(&fwd);
            s.write_all(b"big\n").expect("ask for 6 MB");
            s
        })
        .collect();
    // Until the stalled sessions are stuck: their children have written more than the
    // old connection window (16 MiB) and write no more for half a second (or 30 s
    // passed). Whatever holds them back then holds them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut still) = (0, 0);
    while still < 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        let now = written_by_children(gw.proc.pid());
        still = if now == last && now > 16 << 20 {
            still + 1
        } else {
            0
        };
        last = now;
    }
    let reply = unix_request(&fwd, b"still here\n", Duration::from_secs(20));
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "still here\n",
        "a session beside ten stalled ones on one connection"
    );
    assert_eq!(established_to(gw.port), 1, "one shared connection");
    drop(stalled);
}

/// A forward's caller that types into a session of an `out` pipe (a reader such as
/// `nc -U` on a terminal) keeps it: what it types is dropped and the pipe's output goes
/// on to its end. (It was sent, and the exporting side ended the session with 1008.)
#[test]
fn a_forward_caller_that_types_into_an_out_session_keeps_it() {
    let fx = Fixture::new();
    let text = fx.server_config(&pipe(
        "news",
        "exec:sh -c 'echo first; sleep 1; echo second'",
        &["alice"],
        "direction = \"out\"",
    ));
    let gw = fx.serve("a.toml", &text);
    let fwd = fx.path("fwd.sock");
    let _b = fx.serve("b.toml", &forward(&fx, &fwd, &gw.url("news"), "alice", ""));
    let mut s = unix_connect(&fwd);
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).expect("the first line");
    assert_eq!(line, "first\n");
    s.write_all(b"typing at it\n").expect("type");
    let mut rest = String::new();
    r.read_to_string(&mut rest).expect("the rest");
    assert_eq!(rest, "second\n", "forward log:\n{}", _b.log());
}

#[test]
fn forward_over_http2_refusals_leave_the_shared_connection_usable() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let (gw, mut b, fwd_sock) =
        exported_and_forwarded(&fx, "echo", "echo.sock", "max_instances = 1", "");
    // Session 1 holds the pipe's only instance; its first echo proves it is open.
    let mut held = unix_connect(&fwd_sock);
    held.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    held.write_all(b"first\n").expect("write session 1");
    let mut got = [0u8; 6];
    held.read_exact(&mut got).expect("session 1 echo");
    assert_eq!(&got, b"first\n");
    // Session 2, on the same pooled HTTP/2 connection, is refused with 503 busy: the
    // forward closes the local connection and logs the gateway's refusal.
    let mut refused = unix_connect(&fwd_sock);
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = refused.read_to_end(&mut got);
    assert!(got.is_empty(), "a refused session carried data: {got:?}");
    b.proc
        .wait_until(Duration::from_secs(10), |l| l.contains("refused: 503 busy"));
    // Session 1 is unaffected: more data both ways, then a clean half-close.
    let more = random_bytes(200_000);
    let mut w = held.try_clone().expect("clone");
    let sent = more.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent).expect("write session 1");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut reply = Vec::new();
    held.read_to_end(&mut reply).expect("read session 1");
    writer.join().expect("writer");
    assert!(reply == more, "session 1 echoed {} bytes", reply.len());
    // And the shared connection carries the next session once the slot is free.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let data = random_bytes(3000);
        // Write errors are expected while the slot is taken (the forward closes).
        let mut s = unix_connect(&fwd_sock);
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let _ = s.write_all(&data);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        if reply == data {
            break;
        }
        assert!(
            reply.is_empty(),
            "unexpected reply of {} bytes",
            reply.len()
        );
        assert!(Instant::now() < deadline, "the pipe's slot was never freed");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        established_to(gw.port) <= 2,
        "refusals must not cost the pooled connections"
    );
}

/// A forward's memory does not grow with the number of sessions it has carried: each
/// forwarded session once leaked its stop channel (a forgotten watch sender, ~380 bytes),
/// about 4.5 MiB over the 12,000 sessions here.
#[test]
fn forward_memory_does_not_grow_with_the_sessions_it_carried() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let (_a, b, fwd_sock) = exported_and_forwarded(&fx, "echo", "echo.sock", "", "");
    let pid = b.proc.pid();
    // `n` sessions, 8 at a time: each echoes its bytes back and half-closes.
    let sessions = |n: usize| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let sock = fwd_sock.clone();
                thread::spawn(move || {
                    for i in 0..n / 8 {
                        let data = format!("session {w}/{i}\n");
                        let mut s = unix_connect(&sock);
                        s.set_read_timeout(Some(Duration::from_secs(30)))
                            .expect("timeout");
                        s.write_all(data.as_bytes()).expect("write");
                        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                        let mut got = String::new();
                        s.read_to_string(&mut got).expect("read");
                        assert_eq!(got, data);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("session worker");
        }
    };
    // Warm-up: the HTTP/2 pool, buffers and allocator arenas reach their working size.
    sessions(2_000);
    let warm = rss_kb(pid);
    sessions(12_000);
    let end = rss_kb(pid);
    assert!(
        end < warm + 2_048,
        "the forward grew from {warm} to {end} KiB over 12,000 sessions"
    );
}

/// Per-thread CPU ticks (utime + stime) of `pid`, by thread name.
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for e in std::fs::read_dir(&dir).expect("task dir").flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (head, rest) = stat.rsplit_once(')').expect("stat comm");
        let name = head.split_once('(').expect("stat comm").1.to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the comm: state is field 3, utime 14 and stime 15 (1-based).
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        out.push((name, ticks));
    }
    out
}

/// CPU ticks (utime + stime) of `pid`'s shard threads together.
fn shard_ticks(pid: u32) -> u64 {
    thread_ticks(pid)
        .into_iter()
        .filter(|(n, _)| n.starts_with("pb-shard-"))
        .map(|(_, t)| t)
        .sum()
}

/// Busy polling (`[tuning] busy_poll`, off by default) lasts only while traffic is
/// steady: after thousands of back-to-back round trips through a forward, with the
/// session still open, both gateways' shard threads go back to sleep and use almost no
/// CPU over two idle seconds (a shard that kept polling would use a whole core). The
/// same holds at the largest window, and with polling off the traffic flows the same.
#[test]
fn busy_polling_stops_once_traffic_does() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    for (label, tuning) in [
        ("200us", "[tuning]\nbusy_poll = \"200us\"\n".to_string()),
        ("off", String::new()),
        ("largest", "[tuning]\nbusy_poll = \"10ms\"\n".to_string()),
    ] {
        let pipe_cfg = pipe(
            "echo",
            &format!("unix:{}", fx.p("echo.sock")),
            &["alice"],
            "",
        );
        let a = fx.serve(
            &format!("a-{label}.toml"),
            &format!("{tuning}{}", fx.server_config(&pipe_cfg)),
        );
        let sock = fx.path(&format!("fwd-{label}.sock"));
        let b = fx.serve(
            &format!("b-{label}.toml"),
            &format!(
                "{tuning}{}",
                forward(&fx, &sock, &a.url("echo"), "alice", "")
            ),
        );
        let mut s = unix_connect(&sock);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = [0u8; 64];
        for i in 0..3000u32 {
            let msg = [(i % 251) as u8; 64];
            s.write_all(&msg).unwrap();
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{label}: round trip {i}: {e}"));
            assert_eq!(got, msg, "{label}: round trip {i}");
        }
        thread::sleep(Duration::from_millis(300));
        let before = [shard_ticks(a.proc.pid()), shard_ticks(b.proc.pid())];
        thread::sleep(Duration::from_secs(2));
        let after = [shard_ticks(a.proc.pid()), shard_ticks(b.proc.pid())];
        for (side, (x, y)) in ["exporting", "dialling"]
            .iter()
            .zip(after.iter().zip(before))
        {
            // 10 ticks = 100 ms of CPU in 2 s; a polling shard would use about 200.
            assert!(
                x - y <= 10,
                "{label}: the {side} gateway's shards used {} ticks while idle",
                x - y
            );
        }
        // The idle session still works.
        s.write_all(b"still there").unwrap();
        let mut back = [0u8; 11];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still there", "{label}");
    }
}

/// Both gateways carry their sessions on the shard threads (`PIPEBRIDGE_SHARDS`, one
/// single-threaded runtime each), not on the main runtime that accepts; with shards
/// off the same transfer still works and no shard thread exists; a bad value is refused.
#[test]
fn sessions_run_on_the_shard_threads_and_shards_can_be_turned_off() {
    let fx = Fixture::new();
    let _sha = UnixServer::sha_reply(&fx.path("sha.sock"));
    let data = random_bytes(96 << 20);
    let want = sha_hex(&data);
    for shards in ["2", "0"] {
        let env = [("PIPEBRIDGE_SHARDS", shards)];
        let pipe_cfg = pipe("sha", &format!("unix:{}", fx.p("sha.sock")), &["alice"], "");
        let a = fx.serve_env(
            &format!("a{shards}.toml"),
            &fx.server_config(&pipe_cfg),
            &env,
        );
        if shards == "2" {
            // Two HTTP/1.1 sessions (the connect verb: a connection each, whose handler
            // ends once upgraded), the second started while the first streams: they run
            // on different shards (a shard's load is its live tasks, sessions included).
            let per_shard = |pid: u32| -> Vec<u64> {
                let mut t: Vec<(String, u64)> = thread_ticks(pid)
                    .into_iter()
                    .filter(|(n, _)| n.starts_with("pb-shard-"))
                    .collect();
                t.sort();
                t.into_iter().map(|(_, v)| v).collect()
            };
            let before = per_shard(a.proc.pid());
            // The first session is fed in pieces over a second, so that it is still live
            // when the second starts, however fast the machine moves the data.
            let mut args = vec!["connect".to_string(), a.url("sha")];
            args.extend(fx.cert_args("alice"));
            let mut cmd = std::process::Command::new(BIN);
            cmd.args(&args)
                .current_dir(fx.dir())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            scrub(&mut cmd);
            let mut first = cmd.spawn().expect("start the first connect");
            let first_pid = first.id();
            // Ended by its pid whatever happens below.
            struct Kill(u32);
            impl Drop for Kill {
                fn drop(&mut self) {
                    let _ = std::process::Command::new("kill")
                        .args(["-9", &self.0.to_string()])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
            let _first_guard = Kill(first_pid);
            let mut stdin = first.stdin.take().expect("stdin");
            let mut stdout = first.stdout.take().expect("stdout");
            let reader = thread::spawn(move || {
                let mut out = Vec::new();
                let _ = stdout.read_to_end(&mut out);
                out
            });
            thread::scope(|sc| {
                let mut second = None;
                for (i, piece) in data.chunks(data.len() / 8).enumerate() {
                    stdin.write_all(piece).expect("feed the first session");
                    if i == 1 {
                        second = Some(sc.spawn(|| fx.connect(&a.url("sha"), "alice", &data)));
                    }
                    thread::sleep(Duration::from_millis(150));
                }
                drop(stdin);
                let out = second.expect("started").join().expect("connect thread");
                out.expect_code(0);
                assert_eq!(String::from_utf8_lossy(&out.stdout), want);
            });
            let status = first.wait().expect("wait for the first connect");
            assert!(status.success(), "the first connect: {status}");
            assert_eq!(
                String::from_utf8_lossy(&reader.join().expect("reader")),
                want
            );
            let after = per_shard(a.proc.pid());
            let delta: Vec<u64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
            let total: u64 = delta.iter().sum();
            assert!(
                total >= 4 && delta.iter().all(|d| d * 5 >= total),
                "two HTTP/1.1 sessions should use both shards: ticks {delta:?}"
            );
        }
        let fwd = fx.path(&format!("fwd{shards}.sock"));
        let b = fx.serve_env(
            &format!("b{shards}.toml"),
            &forward(&fx, &fwd, &a.url("sha"), "alice", ""),
            &env,
        );
        // Four sessions, so that with two shards the exporting side may use both, and
        // enough CPU to measure even on a fast machine.
        for _ in 0..4 {
            let got = unix_request(&fwd, &data, Duration::from_secs(120));
            assert_eq!(String::from_utf8_lossy(&got), want, "shards={shards}");
        }
        for (side, gw) in [("exporting", &a), ("dialling", &b)] {
            let threads = thread_ticks(gw.proc.pid());
            let shard: Vec<_> = threads
                .iter()
                .filter(|(n, _)| n.starts_with("pb-shard-"))
                .collect();
            let on_shards: u64 = shard.iter().map(|(_, t)| t).sum();
            let all: u64 = threads.iter().map(|(_, t)| t).sum();
            if shards == "0" {
                assert!(
                    shard.is_empty(),
                    "{side}: shard threads with shards off: {threads:?}"
                );
                continue;
            }
            assert_eq!(shard.len(), 2, "{side}: {threads:?}");
            // 384 MiB through TLS takes well over a tenth of a second of CPU even on a
            // fast machine (192 MiB took 7 ticks of 10 ms on one): most of it must have
            // been on the shard threads.
            assert!(all >= 8, "{side}: too little CPU measured: {threads:?}");
            assert!(
                on_shards * 10 >= all * 8,
                "{side}: {on_shards} of {all} ticks on the shards: {threads:?}"
            );
        }
    }
    let gw = fx.write(
        "bad.toml",
        &forward(
            &fx,
            &fx.path("x.sock"),
            "wss://127.0.0.1:1/pipes/x",
            "alice",
            "",
        ),
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pipebridge"));
    cmd.arg("serve").arg("--config").arg(&gw);
    scrub(&mut cmd);
    cmd.env("PIPEBRIDGE_SHARDS", "lots");
    let out = run_command(cmd, fx.dir(), b"", Duration::from_secs(20));
    out.expect_code(2);
    assert!(
        out.stderr
            .contains("PIPEBRIDGE_SHARDS=\"lots\": expected a number from 0 (off) to 256"),
        "{}",
        out.stderr
    );
}

// === early data: a forward's first bytes go out with its HTTP/2 request ===

/// What a fake exporting gateway saw on one HTTP/2 stream: the connection it came on
/// and the first WebSocket payload that had arrived *before* it answered.
#[derive(Debug, Clone)]
struct EarlyStream {
    conn: usize,
    early: Option<Vec<u8>>,
}

/// A fake exporting gateway: real TLS with the fixture's server certificate, HTTP/2
/// with RFC 8441. Before answering each stream it waits up to 8 s for the first DATA;
/// then it answers 200 and sends `reply:` + that payload back, unless `kill_conn(n)`
/// for the n-th stream (from 0) says to drop the whole connection instead.
async fn fake_h2_gateway(
    fx: &Fixture,
    kill_conn: fn(usize) -> bool,
) -> (u16, Arc<Mutex<Vec<EarlyStream>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<_> = CertificateDer::pem_file_iter(fx.p("pki/server.pem"))
        .expect("server cert")
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(fx.p("pki/server.key")).expect("server key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen: Arc<Mutex<Vec<EarlyStream>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        for conn in 0..10 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut b = h2::server::Builder::new();
                b.enable_connect_protocol();
                let Ok(mut h2c) = b.handshake::<_, bytes::Bytes>(tls).await else {
                    return;
                };
                let (kill_tx, mut kill_rx) = tokio::sync::mpsc::channel::<()>(1);
                loop {
                    let (req, mut respond) = tokio::select! {
                        r = h2c.accept() => match r {
                            Some(Ok(v)) => v,
                            _ => return,
                        },
                        // Drops the connection: TCP closed under every stream.
                        _ = kill_rx.recv() => return,
                    };
                    let (log, kill_tx) = (log.clone(), kill_tx.clone());
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        // Long enough for a loaded machine (the suite runs its tests in
                        // parallel): a forward that sent nothing with its request gets no
                        // 200, so it never sends, and the wait runs out all the same.
                        let first = tokio::time::timeout(Duration::from_secs(8), body.data())
                            .await
                            .ok()
                            .flatten()
                            .and_then(Result::ok);
                        let early = first.as_deref().map(unmask_client_frame);
                        let n = {
                            let mut l = log.lock().expect("log");
                            l.push(EarlyStream {
                                conn,
                                early: early.clone(),
                            });
                            l.len() - 1
                        };
                        if kill_conn(n) {
                            let _ = kill_tx.send(()).await;
                            return;
                        }
                        let resp = hyper::Response::builder()
                            .status(200)
                            .header("sec-websocket-protocol", "pipebridge.v1")
                            .body(())
                            .expect("resp");
                        let Ok(mut send) = respond.send_response(resp, false) else {
                            return;
                        };
                        let mut reply = b"reply:".to_vec();
                        reply.extend_from_slice(&early.unwrap_or_default());
                        let mut frame = vec![0x82, reply.len() as u8];
                        frame.extend_from_slice(&reply);
                        let _ = send.send_data(frame.into(), false);
                        // Hold the stream open until the client ends it.
                        while let Some(Ok(_)) = body.data().await {}
                    });
                }
            });
        }
    });
    (port, seen)
}

/// A TLS-terminating front for `backend_port` (the fixture's server certificate, ALPN
/// h2 and http/1.1), as an ingress that speaks HTTP/2 without RFC 8441 is: an h2
/// connection gets SETTINGS without ENABLE_CONNECT_PROTOCOL and a 404 for any request;
/// an http/1.1 one is carried, bytes as they are, over a new TLS connection to the
/// gateway. Returns its port and the number of h2 connections it took.
async fn h2_front_without_websocket(
    fx: &Fixture,
    backend_port: u16,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<_> = CertificateDer::pem_file_iter(fx.p("pki/server.pem"))
        .expect("server cert")
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(fx.p("pki/server.key")).expect("server key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fx.p("pki/ca.pem")).expect("ca") {
        roots.add(c.expect("ca PEM")).expect("root");
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let h2_conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = h2_conns.clone();
    tokio::spawn(async move {
        for _ in 0..20 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, connector, counted) =
                (acceptor.clone(), connector.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Ok(mut h2c) = h2::server::Builder::new()
                        .handshake::<_, bytes::Bytes>(tls)
                        .await
                    else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = h2c.accept().await {
                        let resp = hyper::Response::builder()
                            .status(404)
                            .body(())
                            .expect("404");
                        let _ = respond.send_response(resp, true);
                    }
                    return;
                }
                let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await
                else {
                    return;
                };
                let name = ServerName::try_from("localhost").expect("name");
                let Ok(mut up) = connector.connect(name, tcp).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, h2_conns)
}

/// Behind a front that speaks HTTP/2 but not WebSocket over HTTP/2 (RFC 8441, an
/// ingress terminating TLS), a forward's sessions go over HTTP/1.1: the first one too,
/// and the dialer dials no more HTTP/2 connections to it. (Every session used to fail
/// with "the gateway does not offer WebSocket over HTTP/2", for ever.)
#[test]
fn a_forward_behind_http2_without_websocket_falls_back_to_http1() {
    let fx = Fixture::new();
    const TOKEN: &str = "pbt_front_token_0123456789abcdef";
    let gw = fx.serve(
        "a.toml",
        &fx.server_config(&format!(
            "[[identity]]\nname = \"robot\"\ntoken_sha256 = {}\n\n{}",
            q(&pipebridge::pki::token_sha256_hex(TOKEN)),
            pipe("cat", "exec:cat", &["robot"], "")
        )),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (front, h2_conns) = rt.block_on(h2_front_without_websocket(&fx, gw.port));
    let token_file = fx.path("token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let fwd = fx.path("fwd.sock");
    let b = fx.serve(
        "b.toml",
        &format!(
            "[[forward]]\nlisten = {}\nto = {}\nca = {}\ntoken_file = {}\n",
            q(&format!("unix:{}", fwd.display())),
            q(&format!("wss://localhost:{front}/pipes/cat")),
            q(&fx.ca()),
            q(&token_file.display().to_string())
        ),
    );
    for i in 0..3 {
        let msg = format!("through the front {i}\n");
        assert_eq!(
            String::from_utf8_lossy(&unix_request(&fwd, msg.as_bytes(), CLIENT_TIMEOUT)),
            msg,
            "session {i}; forward log:\n{}",
            b.log()
        );
    }
    assert_eq!(
        h2_conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one HTTP/2 connection, then HTTP/1.1 only"
    );
    assert_eq!(
        b.log().matches("its sessions go over HTTP/1.1").count(),
        1,
        "{}",
        b.log()
    );
    drop(rt);
}

/// The payload of one whole masked WebSocket binary frame (a client's) of under 126
/// bytes; panics on anything else.
fn unmask_client_frame(f: &[u8]) -> Vec<u8> {
    assert_eq!(f[0], 0x82, "not a final binary frame: {f:?}");
    assert!(f[1] & 0x80 != 0, "a client's frame must be masked: {f:?}");
    let len = (f[1] & 0x7f) as usize;
    assert!(
        len < 126 && f.len() == 6 + len,
        "one short frame expected: {f:?}"
    );
    let mask = &f[2..6];
    f[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect()
}

/// Sends `sig` (`-STOP`, `-CONT`) to `pid`.
fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// Connects to the forward socket (of the gateway `pid`), writes `msg` and reads until
/// the forward closes or `want` bytes came; returns what came. The gateway is stopped
/// while the caller connects and writes (the connection waits in the listen backlog),
/// so `msg` is there when the gateway accepts: the caller speaks first, every time.
fn caller_exchange(pid: u32, sock: &Path, msg: &[u8], want: usize) -> Vec<u8> {
    signal(pid, "-STOP");
    let r = std::os::unix::net::UnixStream::connect(sock)
        .and_then(|mut s| s.write_all(msg).map(|()| s));
    signal(pid, "-CONT");
    let mut s = r.expect("connect and write to the forward");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_sends_its_callers_first_bytes_with_the_http2_request_and_never_twice() {
    let fx = Fixture::new();
    // Stream 0 is answered; stream 1's connection is dropped after its early data came.
    let (port, seen) = fake_h2_gateway(&fx, |n| n == 1).await;
    let sock = fx.path("fwd.sock");
    let url = format!("wss://localhost:{port}/pipes/echo");
    // One shard: every session uses the shard's one pooled connection.
    let b = fx.serve_env(
        "b.toml",
        &forward(&fx, &sock, &url, "alice", ""),
        &[("PIPEBRIDGE_SHARDS", "1")],
    );
    let pid = b.proc.pid();
    let sock2 = sock.clone();
    // The caller speaks first; the fake gateway answers only with what had arrived
    // before its answer: the reply proves the bytes came with the request.
    let got = tokio::task::spawn_blocking(move || caller_exchange(pid, &sock2, b"ping-1", 12))
        .await
        .expect("caller");
    assert_eq!(
        got,
        b"reply:ping-1",
        "got {:?}; streams the fake gateway saw: {:?}\nforward log:\n{}",
        String::from_utf8_lossy(&got),
        seen.lock().expect("log").clone(),
        b.log()
    );
    // The second session goes out on the pooled connection, which dies after the gateway
    // got the early data: the forward must not send that data again on a new connection
    // (the pipe may already have acted on it); its caller is closed instead.
    let sock3 = sock.clone();
    let got = tokio::task::spawn_blocking(move || caller_exchange(pid, &sock3, b"ping-2", 12))
        .await
        .expect("caller");
    assert!(got.is_empty(), "the failed session answered: {got:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streams = seen.lock().expect("log").clone();
    assert_eq!(streams.len(), 2, "{streams:?}\nforward log:\n{}", b.log());
    assert_eq!(
        streams[0].early.as_deref(),
        Some(&b"ping-1"[..]),
        "{streams:?}"
    );
    assert_eq!(
        streams[1].early.as_deref(),
        Some(&b"ping-2"[..]),
        "{streams:?}"
    );
    assert_eq!(streams[1].conn, streams[0].conn, "not pooled: {streams:?}");
    // A new session afterwards works on a new connection.
    let sock4 = sock.clone();
    let got = tokio::task::spawn_blocking(move || caller_exchange(pid, &sock4, b"ping-3", 12))
        .await
        .expect("caller");
    assert_eq!(got, b"reply:ping-3", "forward log:\n{}", b.log());
    let streams = seen.lock().expect("log").clone();
    assert_eq!(streams.len(), 3, "{streams:?}");
    assert_ne!(streams[2].conn, streams[0].conn, "{streams:?}");
}
