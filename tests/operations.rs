//! End-to-end tests of the operations features (issue 6): admin endpoints and metrics,
//! `pipebridge status`, hot reload on SIGHUP and on file change (symlink swaps of the TLS
//! material included), withdrawal of access by a reload, graceful drain, idle and
//! handshake timeouts, dead-peer detection, forward recovery after the remote gateway
//! restarts, `connect --retry`, and HTTPS_PROXY/NO_PROXY. Every gateway listens on
//! 127.0.0.1:0 (or a port it had before), every file lives in the test's temp dir, and
//! every process a test starts is killed by pid at the end.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

// === helpers ===

/// A `[[pipe]]` table run as the gateway's own account.
fn pipe(name: &str, endpoint: &str, allow: &[&str], extra: &str) -> String {
    let allow: Vec<String> = allow.iter().map(|a| q(a)).collect();
    format!(
        "[[pipe]]\nname = {}\nendpoint = {}\nallow = [{}]\nrun_as = \"gateway\"\n{extra}\n",
        q(name),
        q(endpoint),
        allow.join(", ")
    )
}

/// A `[[forward]]` table using `client`'s certificate from the fixture PKI.
fn forward(fx: &Fixture, listen: &Path, to: &str, client: &str) -> String {
    format!(
        "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\n\n",
        q(&format!("unix:{}", listen.display())),
        q(to),
        q(&fx.ca()),
        q(&fx.cert(client)),
        q(&fx.key(client))
    )
}

/// An `[admin]` section on an ephemeral loopback port.
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n\n";

/// Every config a test may later rewrite "unnoticed" is padded to this many bytes.
const PADDED_LEN: usize = 8192;

/// `text` followed by a comment that makes it exactly `len` bytes long.
fn padded_to(text: &str, len: usize) -> String {
    assert!(
        text.len() + 2 <= len,
        "config of {} bytes is too long to pad to {len}",
        text.len()
    );
    format!("{text}\n#{}", "#".repeat(len - text.len() - 2))
}

/// `text` padded to [`PADDED_LEN`].
fn padded(text: &str) -> String {
    padded_to(text, PADDED_LEN)
}

/// Rewrites `path` in place with `text` (padded to the file's current length) and puts
/// the old modification time back, so that device, inode, size and mtime are all
/// unchanged: the file watcher cannot see the edit and only SIGHUP can load it.
fn rewrite_unnoticed(path: &Path, text: &str) {
    let meta = std::fs::metadata(path).expect("stat the config");
    let mtime = meta.modified().expect("mtime");
    let body = padded_to(text, meta.len() as usize);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the config");
    f.write_all(body.as_bytes()).expect("rewrite the config");
    f.set_modified(mtime).expect("restore mtime");
    drop(f);
    let after = std::fs::metadata(path).expect("stat the config");
    assert_eq!(after.len(), meta.len());
    assert_eq!(after.modified().expect("mtime"), mtime);
}

/// Starts a gateway whose config has an `[admin]` section; returns it and the admin
/// address.
fn serve_admin(fx: &Fixture, name: &str, text: &str) -> (Gateway, String) {
    let mut gw = fx.serve(name, text);
    let line = gw
        .proc
        .wait_for_line("pipebridge: admin on ", START_TIMEOUT);
    let addr = line
        .trim_start_matches("pipebridge: admin on ")
        .trim()
        .to_string();
    (gw, addr)
}

/// A plain HTTP/1.1 GET on the admin listener (std only, bounded): status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let sa: std::net::SocketAddr = addr.parse().expect("admin address");
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send admin request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read admin response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head from {addr}{path}: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line from {addr}{path}: {head:?}"));
    (status, body.to_string())
}

/// `/metrics` (asserting 200).
fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body
}

/// One sample line: `(name, labels, value)`.
fn parse_sample(line: &str) -> (String, Vec<(String, String)>, f64) {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad sample line {line:?}"));
    let value: f64 = value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => {
            let inner = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("bad label set in {line:?}"));
            let labels = inner
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (n.to_string(), labels)
        }
        None => (series.to_string(), Vec::new()),
    };
    (name, labels, value)
}

/// The sum of the samples of `name` whose labels include all of `want` (0 if none).
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(parse_sample)
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `/metrics` until `pred` holds; returns that scrape.
fn wait_metrics(addr: &str, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let m = scrape(addr);
        if pred(&m) {
            return m;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for metrics: {what}; last scrape:\n{m}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The live sessions `/sessions` lists.
fn sessions(addr: &str) -> Vec<serde_json::Value> {
    let (status, body) = http_get(addr, "/sessions");
    assert_eq!(status, 200, "/sessions answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/sessions is not JSON ({e}): {body}"));
    v["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("/sessions has no sessions array: {body}"))
        .clone()
}

/// Sends `sig` to `pid`.
fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// How many lines of `log` contain `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
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

/// SIGKILLs the processes in `pids` still running `comm` (orphans a test caused).
fn kill_orphans(pids: &[u32], comm: &str) {
    for &p in pids {
        let c = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if c.trim() == comm {
            if let Some(pid) = rustix::process::Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A long-running `pipebridge` client (usually `connect`) with piped stdin, and stdout
/// and stderr collected by background threads; killed and reaped on drop.
struct Live {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Live {
    /// Runs the binary with `args` and extra `env` in the fixture's temp dir.
    fn spawn(fx: &Fixture, args: &[String], env: &[(&str, &str)]) -> Live {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        scrub(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(fx.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pipebridge");
        let stdin = child.stdin.take();
        let mut sout = child.stdout.take().expect("stdout");
        let mut serr = child.stderr.take().expect("stderr");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let (out2, err2) = (out.clone(), err.clone());
        let r1 = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out2.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        let r2 = thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match serr.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => err2
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        Live {
            child,
            stdin,
            out,
            err,
            readers: vec![r1, r2],
            started: Instant::now(),
        }
    }

    /// `pipebridge connect URL` with `client`'s certificate from the fixture PKI.
    fn connect(fx: &Fixture, url: &str, client: &str) -> Live {
        Live::connect_args(fx, url, &fx.cert_args(client), &[])
    }

    /// `pipebridge connect URL` with explicit credential (and other) arguments.
    fn connect_args(fx: &Fixture, url: &str, extra: &[String], env: &[(&str, &str)]) -> Live {
        let mut args = vec!["connect".to_string(), url.to_string()];
        args.extend(extra.iter().cloned());
        Live::spawn(fx, &args, env)
    }

    /// Writes `data` to the client's stdin.
    fn send(&mut self, data: &[u8]) {
        let s = self.stdin.as_mut().expect("stdin already closed");
        s.write_all(data).expect("write to connect's stdin");
        s.flush().expect("flush");
    }

    /// Hands the client's stdin over (to a writer thread).
    fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin already taken")
    }

    /// Closes stdin: the session's upstream reaches EOF.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Stdout so far.
    fn out(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    /// How many stdout bytes so far.
    fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Stderr so far.
    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until stdout holds at least `n` bytes.
    fn wait_out(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.out_len() < n {
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                if self.out_len() >= n {
                    return;
                }
                panic!(
                    "connect exited ({st}) after {} of {n} bytes; stderr:\n{}",
                    self.out_len(),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out with {} of {n} bytes on stdout; stderr:\n{}",
                    self.out_len(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `data` through an echoing session and checks it comes back exactly.
    fn echo(&mut self, data: &[u8]) {
        let start = self.out_len();
        self.send(data);
        self.wait_out(start + data.len(), Duration::from_secs(20));
        let out = self.out();
        assert!(
            out[start..start + data.len()] == *data,
            "the echo differs from what was sent"
        );
    }

    /// Whether the process still runs.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the process to exit and its output to be collected.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
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

    /// Waits for the exit and asserts its code; returns how long the process ran.
    fn expect_exit(&mut self, code: i32, timeout: Duration) -> Duration {
        let st = self.wait(timeout).unwrap_or_else(|| {
            panic!(
                "connect still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            )
        });
        assert_eq!(
            st.code(),
            Some(code),
            "connect exit status {st}; stdout {:?}; stderr:\n{}",
            String::from_utf8_lossy(&self.out()),
            self.stderr()
        );
        self.started.elapsed()
    }
}

impl Drop for Live {
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

/// A continuous transfer through an echoing session: a background thread writes random
/// chunks (throttled) to the client's stdin and keeps a copy of everything it sent.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<u8>>>,
    writer: Option<JoinHandle<Result<(), String>>>,
}

impl Stream {
    fn start(live: &mut Live) -> Stream {
        let mut stdin = live.take_stdin();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let writer = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let chunk = random_bytes(16 * 1024);
                stdin.write_all(&chunk).map_err(|e| {
                    format!("write after {} bytes: {e}", sent2.lock().unwrap().len())
                })?;
                sent2.lock().unwrap().extend_from_slice(&chunk);
                thread::sleep(Duration::from_millis(4));
            }
            // Dropping stdin sends EOF through the session.
            Ok(())
        });
        Stream {
            stop,
            sent,
            writer: Some(writer),
        }
    }

    /// Waits until `live` echoed `more` bytes beyond `from` (proving the transfer goes on).
    fn wait_progress(&self, live: &mut Live, from: usize, more: usize) {
        live.wait_out(from + more, Duration::from_secs(30));
    }

    /// Stops writing, waits for the session to end with exit 0 and checks that every
    /// byte came back, in order.
    fn finish(mut self, live: &mut Live) {
        self.stop.store(true, Ordering::SeqCst);
        let w = self.writer.take().expect("writer").join().expect("writer");
        if let Err(e) = w {
            panic!("the stream writer failed: {e}; stderr:\n{}", live.stderr());
        }
        live.expect_exit(0, Duration::from_secs(60));
        let sent = self.sent.lock().unwrap();
        let got = live.out();
        assert_eq!(got.len(), sent.len(), "echoed byte count");
        if let Some(i) = (0..sent.len()).find(|&i| got[i] != sent[i]) {
            panic!("the echo differs first at byte {i} of {}", sent.len());
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `n` random bytes ending in a newline: `connect` writes its stdout through Rust's
/// line-buffered `std::io::stdout()`, so bytes after the last newline would only show
/// up at the end of the session (reported as a bug; not what these tests are about).
fn line_payload(n: usize) -> Vec<u8> {
    let mut v = random_bytes(n);
    if let Some(last) = v.last_mut() {
        *last = b'\n';
    }
    v
}

/// Reads from a local socket until EOF or error; `true` if that happened before
/// `timeout`.
fn closed_within(s: &mut UnixStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

// === 1. metrics, health, sessions, status ===

#[test]
fn metrics_change_as_sessions_run_and_are_refused() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{ADMIN}{}{}{}",
        pipe("m1", "exec:cat", &["alice"], ""),
        pipe("wc", "exec:wc -c", &["alice"], ""),
        pipe(
            "gone",
            &format!("unix:{}", fx.path("nobody-listens.sock").display()),
            &["alice"],
            ""
        )
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let gw_url = |p: &str| gw.url(p);

    // Health.
    let (st, body) = http_get(&admin, "/healthz");
    assert_eq!(st, 200, "/healthz: {body}");
    let (st, body) = http_get(&admin, "/readyz");
    assert_eq!(st, 200, "/readyz: {body}");

    let m0 = scrape(&admin);
    let s_m1 = [("pipe", "m1"), ("identity", "alice")];
    let total0 = metric(&m0, "pipebridge_sessions_total", &s_m1);
    let forbidden0 = metric(&m0, "pipebridge_refusals_total", &[("reason", "forbidden")]);
    let unauth0 = metric(
        &m0,
        "pipebridge_refusals_total",
        &[("reason", "unauthenticated")],
    );
    let hs0 = metric(&m0, "pipebridge_handshake_seconds_count", &[]);

    // A session held open.
    let mut live = Live::connect(&fx, &gw_url("m1"), "alice");
    live.echo(b"ping\n");
    let m1 = scrape(&admin);
    assert_eq!(
        metric(&m1, "pipebridge_sessions_active", &[("pipe", "m1")]),
        1.0,
        "sessions_active while a session is open:\n{m1}"
    );
    assert_eq!(
        metric(&m1, "pipebridge_sessions_total", &s_m1),
        total0 + 1.0,
        "sessions_total after one session:\n{m1}"
    );
    assert!(
        metric(&m1, "pipebridge_handshake_seconds_count", &[]) > hs0,
        "handshake_seconds observed the upgrade:\n{m1}"
    );

    // /sessions and `pipebridge status` list it.
    let list = sessions(&admin);
    assert_eq!(list.len(), 1, "{list:?}");
    let s = &list[0];
    assert_eq!(s["identity"], "alice", "{s}");
    assert_eq!(s["pipe"], "m1", "{s}");
    assert_eq!(s["direction"], "duplex", "{s}");
    assert!(s["age_seconds"].as_f64().is_some(), "{s}");
    let status = fx.run(&["status", "--admin", &admin], b"");
    status.expect_code(0);
    let table = status.out();
    assert!(
        table
            .lines()
            .any(|l| l.contains("m1") && l.contains("alice")),
        "status table lacks the session:\n{table}"
    );

    // End it: active back to 0, bytes added.
    let payload = line_payload(1000);
    live.echo(&payload);
    live.close_stdin();
    live.expect_exit(0, CLIENT_TIMEOUT);
    let moved = (5 + payload.len()) as f64;
    let m2 = wait_metrics(
        &admin,
        Duration::from_secs(10),
        "the m1 session to end",
        |m| {
            metric(m, "pipebridge_sessions_active", &[("pipe", "m1")]) == 0.0
                && metric(
                    m,
                    "pipebridge_bytes_total",
                    &[("pipe", "m1"), ("direction", "in")],
                ) > 0.0
        },
    );
    assert_eq!(
        metric(
            &m2,
            "pipebridge_bytes_total",
            &[("pipe", "m1"), ("direction", "in")]
        ),
        moved,
        "{m2}"
    );
    assert_eq!(
        metric(
            &m2,
            "pipebridge_bytes_total",
            &[("pipe", "m1"), ("direction", "out")]
        ),
        moved,
        "{m2}"
    );
    assert!(sessions(&admin).is_empty(), "/sessions after the end");

    // An asymmetric session tells `in` from `out`.
    let out = fx.connect(&gw_url("wc"), "alice", &[b'x'; 1000]);
    out.expect_code(0);
    assert_eq!(out.out().trim(), "1000");
    let m3 = wait_metrics(
        &admin,
        Duration::from_secs(10),
        "the wc session to end",
        |m| {
            metric(
                m,
                "pipebridge_session_duration_seconds_count",
                &[("pipe", "wc")],
            ) == 1.0
        },
    );
    assert_eq!(
        metric(
            &m3,
            "pipebridge_bytes_total",
            &[("pipe", "wc"), ("direction", "in")]
        ),
        1000.0,
        "{m3}"
    );
    assert_eq!(
        metric(
            &m3,
            "pipebridge_bytes_total",
            &[("pipe", "wc"), ("direction", "out")]
        ),
        out.stdout.len() as f64,
        "{m3}"
    );
    assert_eq!(
        metric(
            &m3,
            "pipebridge_sessions_total",
            &[("pipe", "wc"), ("identity", "alice")]
        ),
        1.0
    );

    // Refusals: bob on m1 and alice on an unknown pipe are 403; carol (valid
    // certificate, no identity) is 401.
    fx.connect(&gw_url("m1"), "bob", b"").expect_code(3);
    fx.connect(&gw_url("nosuch"), "alice", b"").expect_code(3);
    let carol = fx.connect(&gw_url("m1"), "carol", b"");
    carol.expect_code(3);
    assert!(carol.stderr.contains("401"), "{}", carol.stderr);
    // Admitted, then refused: its endpoint has no listener (502).
    let gone = fx.connect(&gw_url("gone"), "alice", b"");
    gone.expect_code(1);
    assert!(gone.stderr.contains("502"), "{}", gone.stderr);
    let m4 = scrape(&admin);
    assert_eq!(
        metric(&m4, "pipebridge_refusals_total", &[("reason", "forbidden")]),
        forbidden0 + 2.0,
        "{m4}"
    );
    assert_eq!(
        metric(
            &m4,
            "pipebridge_refusals_total",
            &[("reason", "endpoint_unavailable")]
        ),
        1.0,
        "{m4}"
    );
    let s_gone = [("pipe", "gone"), ("identity", "alice")];
    assert_eq!(
        metric(&m4, "pipebridge_sessions_total", &s_gone),
        0.0,
        "a session refused after its admission is not a session:\n{m4}"
    );
    assert_eq!(
        metric(
            &m4,
            "pipebridge_session_duration_seconds_count",
            &[("pipe", "gone")]
        ),
        0.0,
        "{m4}"
    );
    assert_eq!(
        metric(
            &m4,
            "pipebridge_refusals_total",
            &[("reason", "unauthenticated")]
        ),
        unauth0 + 1.0,
        "{m4}"
    );
    assert_eq!(
        metric(&m4, "pipebridge_sessions_total", &s_m1),
        total0 + 1.0,
        "a refusal is not a session:\n{m4}"
    );

    // Every series is pipebridge_*, in samples and in HELP/TYPE/UNIT lines alike.
    for line in m4.lines().filter(|l| !l.trim().is_empty() && *l != "# EOF") {
        let name = match line.strip_prefix("# ") {
            Some(meta) => meta.split_whitespace().nth(1).unwrap_or("").to_string(),
            None => parse_sample(line).0,
        };
        assert!(
            name.starts_with("pipebridge_"),
            "series {name:?} is not pipebridge_* (line {line:?})"
        );
    }
    for name in [
        "pipebridge_sessions_active",
        "pipebridge_sessions_total",
        "pipebridge_bytes_total",
        "pipebridge_session_duration_seconds_count",
        "pipebridge_handshake_seconds_count",
        "pipebridge_refusals_total",
        "pipebridge_impersonation_failures_total",
        "pipebridge_reloads_total",
        "pipebridge_forward_dials_total",
    ] {
        assert!(
            m4.lines().any(|l| l.starts_with(name)),
            "no {name} series:\n{m4}"
        );
    }
    // Bounded labels: no peer address anywhere.
    assert!(
        !m4.contains("127.0.0.1"),
        "a peer address in metrics:\n{m4}"
    );
    let (st, _) = http_get(&admin, "/nope");
    assert_eq!(st, 404);
}

// === 2. SIGHUP reload ===

#[test]
fn sighup_reload_adds_a_pipe_without_dropping_a_live_transfer_and_rejects_a_broken_config() {
    let fx = Fixture::new();
    let v1 = fx.server_config(&format!(
        "{ADMIN}{}",
        pipe("cat", "exec:cat", &["alice"], "")
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &padded(&v1));
    let cfg = fx.path("gw.toml");

    // The new pipe does not exist yet.
    fx.connect(&gw.url("added"), "alice", b"x").expect_code(3);

    let mut live = Live::connect(&fx, &gw.url("cat"), "alice");
    let stream = Stream::start(&mut live);
    stream.wait_progress(&mut live, 0, 256 * 1024);

    // A changed config loaded by SIGHUP alone (the file watcher cannot see this edit).
    let m0 = scrape(&admin);
    let ok0 = metric(&m0, "pipebridge_reloads_total", &[("result", "ok")]);
    let err0 = metric(&m0, "pipebridge_reloads_total", &[("result", "error")]);
    let v2 = format!("{v1}{}", pipe("added", "exec:cat", &["alice"], ""));
    rewrite_unnoticed(&cfg, &v2);
    let at_reload = live.out_len();
    signal(gw.proc.pid(), rustix::process::Signal::HUP);
    wait_metrics(&admin, Duration::from_secs(10), "the SIGHUP reload", |m| {
        metric(m, "pipebridge_reloads_total", &[("result", "ok")]) > ok0
    });
    // With today's watcher (device, inode, size, mtime) only SIGHUP can have loaded it,
    // so the count is exact; a watcher that does notice in-place edits would add more.
    let watcher_saw_it = count(&gw.log(), "a watched file changed") > 0;
    if !watcher_saw_it {
        assert_eq!(
            metric(
                &scrape(&admin),
                "pipebridge_reloads_total",
                &[("result", "ok")]
            ),
            ok0 + 1.0,
            "one SIGHUP, one reload"
        );
    }
    let out = fx.connect(&gw.url("added"), "alice", b"new pipe\n");
    out.expect_code(0);
    assert_eq!(out.out(), "new pipe\n");
    // The live session keeps transferring after the reload.
    stream.wait_progress(&mut live, at_reload, 1024 * 1024);

    // A broken config on SIGHUP: rejected, old pipes keep working, log + metric say so.
    let broken = format!("{v2}{}", pipe("broken", "bogus:/nowhere", &["alice"], ""));
    rewrite_unnoticed(&cfg, &broken);
    let at_broken = live.out_len();
    signal(gw.proc.pid(), rustix::process::Signal::HUP);
    wait_metrics(
        &admin,
        Duration::from_secs(10),
        "the rejected reload",
        |m| metric(m, "pipebridge_reloads_total", &[("result", "error")]) > err0,
    );
    if !watcher_saw_it {
        assert_eq!(
            metric(
                &scrape(&admin),
                "pipebridge_reloads_total",
                &[("result", "error")]
            ),
            err0 + 1.0,
            "one SIGHUP, one rejected reload"
        );
    }
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload rejected"))
        .unwrap_or_else(|| panic!("no 'reload rejected' line:\n{log}"))
        .to_string();
    assert!(
        line.contains("endpoint") && line.contains("bogus"),
        "the rejection does not say why: {line}"
    );
    for p in ["cat", "added"] {
        let out = fx.connect(&gw.url(p), "alice", b"still here\n");
        out.expect_code(0);
        assert_eq!(out.out(), "still here\n", "pipe {p}");
    }
    fx.connect(&gw.url("broken"), "alice", b"x").expect_code(3);
    if !watcher_saw_it {
        let m = scrape(&admin);
        assert_eq!(
            metric(&m, "pipebridge_reloads_total", &[("result", "ok")]),
            ok0 + 1.0,
            "a rejected reload counted as ok"
        );
    }
    stream.wait_progress(&mut live, at_broken, 512 * 1024);
    stream.finish(&mut live);

    // A moved [admin] listener takes a restart: the reload says so, and the admin
    // endpoint stays where it was.
    let v3 = v2.replace(ADMIN, "[admin]\nlisten = \"[::1]:0\"\n\n");
    assert_ne!(v3, v2);
    reload_by_sighup(&gw, &admin, &cfg, &v3, "ok");
    assert!(
        gw.log()
            .contains("a changed [admin] listener takes a restart"),
        "{}",
        gw.log()
    );
}

/// Sends `data` over a connected Unix socket and reads until `want` bytes came back.
fn echo_over(sock: &mut UnixStream, data: &[u8], want: usize) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    sock.write_all(data).expect("write to the forward");
    let mut got = vec![0u8; want];
    sock.read_exact(&mut got)
        .expect("the reply through the forward");
    got
}

/// Reads lines from `path` (a FIFO) on a thread of its own; each line (or `None` at end
/// of file) arrives on the channel.
fn fifo_lines(path: &Path) -> std::sync::mpsc::Receiver<Option<String>> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open the hosted FIFO");
        for line in std::io::BufReader::new(f).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    rx
}

/// Rewrites `cfg` with `text` unnoticed by the file watcher, sends SIGHUP to `gw` and
/// waits until the reloads counted with `result` ("ok" or "error") went up.
fn reload_by_sighup(gw: &Gateway, admin: &str, cfg: &Path, text: &str, result: &str) {
    let before = metric(
        &scrape(admin),
        "pipebridge_reloads_total",
        &[("result", result)],
    );
    rewrite_unnoticed(cfg, text);
    signal(gw.proc.pid(), rustix::process::Signal::HUP);
    wait_metrics(admin, Duration::from_secs(10), "the SIGHUP reload", |m| {
        metric(m, "pipebridge_reloads_total", &[("result", result)]) > before
    });
}

#[test]
fn sighup_reloads_the_forwards_of_a_forwards_only_gateway() {
    let fx = Fixture::new();
    // About 5 s of numbered lines, so the test can see the FIFO session outlive the
    // reload, then its end (by itself: no process left behind).
    let ticks =
        "exec:sh -c 'i=0; while [ $i -lt 250 ]; do echo tick$i; i=$((i+1)); sleep 0.02; done'";
    let remote = fx.serve(
        "remote.toml",
        &fx.server_config(&format!(
            "{}{}{}",
            pipe("cat", "exec:cat", &["alice"], ""),
            pipe("upper", "exec:tr a-z A-Z", &["alice"], ""),
            pipe("ticks", ticks, &["alice"], "direction = \"out\"")
        )),
    );
    let (a, b, c) = (fx.path("a.sock"), fx.path("b.sock"), fx.path("c.sock"));
    let f = fx.path("f.fifo");
    let fifo_forward = format!(
        "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\n\n",
        q(&format!("fifo:{}", f.display())),
        q(&format!("{}?direction=out", remote.url("ticks"))),
        q(&fx.ca()),
        q(&fx.cert("alice")),
        q(&fx.key("alice"))
    );
    let v1 = format!(
        "{ADMIN}{}{}{fifo_forward}",
        forward(&fx, &a, &remote.url("cat"), "alice"),
        forward(&fx, &b, &remote.url("cat"), "alice")
    );
    let (mut local, admin) = serve_admin(&fx, "local.toml", &padded(&v1));
    let cfg = fx.path("local.toml");
    assert_eq!(unix_request(&b, b"abc\n", CLIENT_TIMEOUT), b"abc\n");
    // Live sessions through a (which the reload removes), b (whose remote pipe it
    // changes) and the FIFO forward (which it removes).
    let mut live_a = unix_connect(&a);
    assert_eq!(echo_over(&mut live_a, b"before\n", 7), b"before\n");
    let mut live_b = unix_connect(&b);
    assert_eq!(echo_over(&mut live_b, b"before\n", 7), b"before\n");
    let b_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&b).expect("b"));
    let ticks_rx = fifo_lines(&f);
    let first = ticks_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a line from the FIFO forward");
    assert_eq!(first.as_deref(), Some("tick0"));

    // a and the FIFO removed, b pointed at another pipe, c added: SIGHUP alone loads it.
    let v2 = format!(
        "{ADMIN}{}{}",
        forward(&fx, &b, &remote.url("upper"), "alice"),
        forward(&fx, &c, &remote.url("cat"), "alice")
    );
    reload_by_sighup(&local, &admin, &cfg, &v2, "ok");
    assert!(
        !a.exists(),
        "the removed forward's socket file is still there"
    );
    assert!(
        !f.exists(),
        "the removed FIFO forward's file is still there"
    );
    assert_eq!(
        echo_over(&mut live_a, b"after\n", 6),
        b"after\n",
        "the live session of the removed forward ended"
    );
    // b's new remote pipe serves new callers; its socket was not bound again (no
    // refusals while it changed), and its live session keeps the old pipe.
    assert_eq!(unix_request(&b, b"abc\n", CLIENT_TIMEOUT), b"ABC\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&b).expect("b")),
        b_inode,
        "b's socket was bound again for a change of its remote pipe"
    );
    assert_eq!(echo_over(&mut live_b, b"after\n", 6), b"after\n");
    assert_eq!(unix_request(&c, b"new\n", CLIENT_TIMEOUT), b"new\n");
    // The removed FIFO forward's live session goes on: five more lines arrive after what
    // was queued by the time the reload was done, and then every line up to the last.
    let mut lines = vec![first.expect("tick0")];
    while let Ok(l) = ticks_rx.try_recv() {
        lines.push(l.unwrap_or_else(|| panic!("the FIFO session ended: {lines:?}")));
    }
    let queued = lines.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ticks_rx.recv_timeout(left) {
            Ok(Some(l)) => lines.push(l),
            Ok(None) => break,
            Err(e) => panic!(
                "no end of the FIFO session: {e} after {} lines",
                lines.len()
            ),
        }
    }
    assert!(
        lines.len() >= queued + 5,
        "the FIFO forward's live session ended at the reload: {} lines, {queued} before it",
        lines.len()
    );
    let want: Vec<String> = (0..250).map(|i| format!("tick{i}")).collect();
    assert_eq!(lines, want, "the FIFO session lost or reordered lines");
    drop((live_a, live_b));

    // A changed forward whose new settings name no account (no such owner): the config
    // is refused as a whole (check-config says the same), so the forward goes on with
    // its old settings and the reload counts as failed, saying why. Setting an owner
    // needs CAP_CHOWN (without it the config is refused for that).
    if rustix::process::geteuid().is_root() {
        let v3 = v2.replace(
            &format!("listen = {}\n", q(&format!("unix:{}", c.display()))),
            &format!(
                "listen = {}\nsocket_owner = \"no-such-user-pb\"\n",
                q(&format!("unix:{}", c.display()))
            ),
        );
        assert_ne!(v3, v2);
        reload_by_sighup(&local, &admin, &cfg, &v3, "error");
        local.proc.wait_until(Duration::from_secs(10), |log| {
            log.contains("reload rejected")
                && log.contains("socket_owner: no such user \"no-such-user-pb\"")
        });
        assert_eq!(unix_request(&c, b"kept\n", CLIENT_TIMEOUT), b"kept\n");
        assert_eq!(unix_request(&b, b"b too\n", CLIENT_TIMEOUT), b"B TOO\n");
    } else {
        eprintln!(
            "skipping the unbindable-change step: socket_owner needs CAP_CHOWN (run as root)"
        );
    }

    // A config that does not validate changes nothing.
    let broken = format!("{v2}[[forward]]\nlisten = \"bogus:x\"\n");
    reload_by_sighup(&local, &admin, &cfg, &broken, "error");
    local.proc.wait_until(Duration::from_secs(10), |log| {
        log.contains("reload rejected")
    });
    assert_eq!(unix_request(&b, b"xyz\n", CLIENT_TIMEOUT), b"XYZ\n");
    assert_eq!(unix_request(&c, b"xyz\n", CLIENT_TIMEOUT), b"xyz\n");
    assert!(!a.exists());

    // A new forward whose socket another live server holds cannot be bound: the reload
    // says so. Once that server is gone, the forward binds by itself (tried again after
    // 1 s, then 2 s, 4 s...), with no reload.
    let d = fx.path("d.sock");
    let holder = std::os::unix::net::UnixListener::bind(&d).expect("hold d.sock");
    let v4 = format!("{v2}{}", forward(&fx, &d, &remote.url("cat"), "alice"));
    reload_by_sighup(&local, &admin, &cfg, &v4, "error");
    local.proc.wait_until(Duration::from_secs(10), |log| {
        log.contains("the new forward cannot be bound") && log.contains("in use by a live server")
    });
    assert_eq!(unix_request(&c, b"still\n", CLIENT_TIMEOUT), b"still\n");
    // Each try to bind first connects to see whether the socket is served: the reload's
    // and then a retry's (a second later) reach the holder, which stays in place.
    holder.set_nonblocking(true).expect("nonblocking");
    let mut probes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while probes.len() < 2 && Instant::now() < deadline {
        match holder.accept() {
            Ok((s, _)) => probes.push(s),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert_eq!(probes.len(), 2, "no retry reached the live socket");
    assert!(
        !local.proc.log().contains("forward bound on a retry"),
        "a forward was bound over a live server's socket"
    );
    drop((holder, probes));
    // The next try comes at most 4 s after the first retry (1 s, then 2 s, 4 s...).
    local.proc.wait_until(Duration::from_secs(30), |log| {
        log.contains("forward bound on a retry")
    });
    assert_eq!(unix_request(&d, b"later\n", CLIENT_TIMEOUT), b"later\n");
    assert_eq!(unix_request(&b, b"b\n", CLIENT_TIMEOUT), b"B\n");

    // A live server whose listen backlog is full (a connect fails with EAGAIN) is live
    // all the same: its socket is not taken over.
    let e = fx.path("e.sock");
    let full = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::bind(
        &full,
        &rustix::net::SocketAddrUnix::new(&e).expect("address"),
    )
    .expect("bind e.sock");
    rustix::net::listen(&full, 0).expect("listen");
    // A backlog of 0 holds one connection: the queue is full.
    let queued = unix_connect(&e);
    let v5 = format!("{v4}{}", forward(&fx, &e, &remote.url("cat"), "alice"));
    reload_by_sighup(&local, &admin, &cfg, &v5, "error");
    let refused = format!("{} is in use by a live server", e.display());
    local
        .proc
        .wait_until(Duration::from_secs(10), |log| log.contains(&refused));
    assert_eq!(unix_request(&d, b"d\n", CLIENT_TIMEOUT), b"d\n");
    drop((queued, full));
}

// === 3. reload on file change, certificate symlink swap ===

#[test]
fn file_change_and_certificate_symlink_swap_reload_without_dropping_a_session() {
    let fx = Fixture::new();
    // Kubernetes-Secret layout: secret/{server.pem,server.key,ca.pem} -> ..data/NAME,
    // ..data -> v1 (or v2 after the swap).
    let secret = fx.path("secret");
    std::fs::create_dir_all(secret.join("v1")).expect("mkdir v1");
    for f in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(fx.path(&format!("pki/{f}")), secret.join("v1").join(f)).expect("copy");
    }
    pipebridge::pki::init(&pipebridge::pki::CertsInit {
        dir: secret.join("v2"),
        server_names: vec!["localhost".into()],
        clients: vec!["alice".into()],
        force: false,
    })
    .expect("pki v2");
    std::os::unix::fs::symlink("v1", secret.join("..data")).expect("symlink ..data");
    for f in ["server.pem", "server.key", "ca.pem"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), secret.join(f)).expect("symlink");
    }
    let s = |f: &str| secret.join(f).to_string_lossy().into_owned();
    let tls = format!(
        "[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n",
        q(&s("server.pem")),
        q(&s("server.key")),
        q(&s("ca.pem"))
    );
    let base = fx.server_config("").replace(&fx.tls_section(), &tls);
    assert!(base.contains("secret"), "the TLS section was not replaced");
    let v1 = format!("{base}{ADMIN}{}", pipe("cat", "exec:cat", &["alice"], ""));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &v1);
    let v2_creds: Vec<String> = vec![
        "--ca".into(),
        s("v2/ca.pem"),
        "--cert".into(),
        s("v2/alice.pem"),
        "--key".into(),
        s("v2/alice.key"),
    ];

    // A live session (v1 credentials) that keeps transferring throughout.
    let mut live = Live::connect(&fx, &gw.url("cat"), "alice");
    let stream = Stream::start(&mut live);
    stream.wait_progress(&mut live, 0, 128 * 1024);

    // (a) An edit of the config file, no signal, is picked up within a few seconds.
    fx.connect(&gw.url("later"), "alice", b"x").expect_code(3);
    let ok0 = metric(
        &scrape(&admin),
        "pipebridge_reloads_total",
        &[("result", "ok")],
    );
    std::fs::write(
        fx.path("gw.toml"),
        format!("{v1}{}", pipe("later", "exec:cat", &["alice"], "")),
    )
    .expect("edit the config");
    let t0 = Instant::now();
    wait_for(Duration::from_secs(15), "the edited config to load", || {
        let out = fx.connect(&gw.url("later"), "alice", b"later\n");
        (out.code == Some(0)).then_some(out)
    });
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "file change took {took:?}");
    assert!(
        gw.log().contains("a watched file changed"),
        "no watcher line:\n{}",
        gw.log()
    );
    let at_edit = live.out_len();
    stream.wait_progress(&mut live, at_edit, 512 * 1024);

    // (b) The certificate symlink swap.
    let args: Vec<String> = [vec!["connect".to_string(), gw.url("cat")], v2_creds].concat();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = fx.run(&a, b"x");
    assert_ne!(
        before.code,
        Some(0),
        "a client trusting only the v2 CA got in before the swap"
    );
    let ok1 = metric(
        &scrape(&admin),
        "pipebridge_reloads_total",
        &[("result", "ok")],
    );
    assert!(ok1 > ok0, "the config edit was not counted as a reload");
    std::os::unix::fs::symlink("v2", secret.join("..data_tmp")).expect("symlink tmp");
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).expect("swap ..data");
    let at_swap = live.out_len();
    let t1 = Instant::now();
    let out = wait_for(
        Duration::from_secs(15),
        "the swapped certificates to load",
        || {
            let out = fx.run(&a, b"new CA\n");
            (out.code == Some(0)).then_some(out)
        },
    );
    assert_eq!(out.out(), "new CA\n");
    let took = t1.elapsed();
    assert!(took < Duration::from_secs(5), "the swap took {took:?}");
    assert!(
        metric(
            &scrape(&admin),
            "pipebridge_reloads_total",
            &[("result", "ok")]
        ) > ok1,
        "the swap was not counted as a reload"
    );
    // A client trusting only the old CA is now refused in TLS.
    let old = fx.connect(&gw.url("cat"), "alice", b"x");
    assert_eq!(
        old.code,
        Some(1),
        "old-CA client after the swap: {:?} {}",
        old.code,
        old.stderr
    );
    // The session opened before the swap keeps transferring, byte-exact.
    stream.wait_progress(&mut live, at_swap, 1024 * 1024);
    assert_eq!(sessions(&admin).len(), 1, "the live session is listed");
    stream.finish(&mut live);
}

/// A config rejected because a file it names does not exist yet is loaded once that
/// file appears: the watcher watches the rejected config's files too (it used to watch
/// only the files of the config in force, so nothing happened until the next SIGHUP).
#[test]
fn a_config_rejected_for_a_missing_file_is_loaded_when_the_file_appears() {
    let fx = Fixture::new();
    let v1 = fx.server_config(&format!(
        "{ADMIN}{}",
        pipe("cat", "exec:cat", &["alice"], "")
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &v1);
    let m0 = scrape(&admin);
    let ok0 = metric(&m0, "pipebridge_reloads_total", &[("result", "ok")]);
    let err0 = metric(&m0, "pipebridge_reloads_total", &[("result", "error")]);
    let hash_file = fx.path("robot.sha256");
    let v2 = format!(
        "{v1}[[identity]]\nname = \"robot\"\ntoken_sha256_file = {}\n\n{}",
        q(&hash_file.display().to_string()),
        pipe("robotcat", "exec:cat", &["robot"], "")
    );
    std::fs::write(fx.path("gw.toml"), &v2).expect("rewrite");
    wait_metrics(
        &admin,
        Duration::from_secs(15),
        "the rejected reload",
        |m| metric(m, "pipebridge_reloads_total", &[("result", "error")]) > err0,
    );
    let token = "pbt_robot_token_0123456789abcdef";
    std::fs::write(&hash_file, pipebridge::pki::token_sha256_hex(token)).expect("hash file");
    wait_metrics(
        &admin,
        Duration::from_secs(15),
        "the reload once the file is there",
        |m| metric(m, "pipebridge_reloads_total", &[("result", "ok")]) > ok0,
    );
    let out = fx.run_env(
        &["connect", &gw.url("robotcat"), "--ca", &fx.ca()],
        &[("PIPEBRIDGE_TOKEN", token)],
        b"beep\n",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(out.out(), "beep\n");
}

// === 4. withdrawal ===

/// A reload that rotates a token identity's hash (its token leaked) ends the sessions
/// opened with the old token, as a certificate's revocation does; the identity and its
/// allow rules are unchanged, and another identity's session goes on.
#[test]
fn rotating_a_token_ends_the_sessions_opened_with_the_old_one() {
    let fx = Fixture::new();
    let text = |token: &str| {
        fx.server_config(&format!(
            "[[identity]]\nname = \"robot\"\ntoken_sha256 = {}\n\n{}",
            q(&pipebridge::pki::token_sha256_hex(token)),
            pipe("shared", "exec:cat", &["robot", "alice"], "")
        ))
    };
    let old = "pbt_old_token_0123456789abcdef";
    let gw = fx.serve("gw.toml", &text(old));
    let mut robot = Live::connect_args(
        &fx,
        &gw.url("shared"),
        &["--ca".to_string(), fx.ca()],
        &[("PIPEBRIDGE_TOKEN", old)],
    );
    let mut a = Live::connect(&fx, &gw.url("shared"), "alice");
    robot.echo(b"robot 1\n");
    a.echo(b"alice 1\n");

    std::fs::write(fx.path("gw.toml"), text("pbt_new_token_fedcba9876543210")).expect("rewrite");
    signal(gw.proc.pid(), rustix::process::Signal::HUP);

    robot.expect_exit(1, Duration::from_secs(15));
    let err = robot.stderr();
    assert!(
        err.contains("remote error: access_withdrawn"),
        "the old token's connect stderr:\n{err}"
    );
    assert!(
        gw.log()
            .contains("its credentials no longer authenticate this identity"),
        "{}",
        gw.log()
    );
    assert!(a.running(), "alice's session ended: {}", a.stderr());
    a.echo(b"alice 2\n");
    a.close_stdin();
    a.expect_exit(0, CLIENT_TIMEOUT);
}

/// A reload that withdraws access while a session's open still waits (an `in` FIFO with
/// no reader yet) refuses that session once the open completes: 403 (connect exits 3),
/// and nothing the client sent reaches the pipe (the reader sees EOF at once). Before,
/// the session was upgraded and its first pass moved the client's data into the pipe.
#[test]
fn a_session_whose_access_is_withdrawn_while_it_opens_is_refused() {
    let fx = Fixture::new();
    let f = fx.path("in.fifo");
    mkfifo(&f);
    // A long handshake timeout: the open (half of it) outlasts the reload on a loaded
    // machine.
    let text = |allow: &[&str]| {
        fx.server_config(&format!(
            "{ADMIN}[limits]\nhandshake_timeout = \"60s\"\n\n{}",
            pipe(
                "f",
                &format!("fifo:{}", f.display()),
                allow,
                "direction = \"in\""
            )
        ))
    };
    let (gw, admin) = serve_admin(&fx, "gw.toml", &text(&["alice"]));
    thread::scope(|sc| {
        let client = sc.spawn(|| fx.connect(&gw.url("f"), "alice", b"secret\n"));
        wait_metrics(
            &admin,
            Duration::from_secs(10),
            "the session admitted",
            |m| metric(m, "pipebridge_sessions_active", &[("pipe", "f")]) >= 1.0,
        );
        let reloads = |m: &str| metric(m, "pipebridge_reloads_total", &[("result", "ok")]);
        let before = reloads(&scrape(&admin));
        std::fs::write(fx.path("gw.toml"), text(&["bob"])).expect("rewrite");
        signal(gw.proc.pid(), rustix::process::Signal::HUP);
        wait_metrics(&admin, Duration::from_secs(10), "the reload", |m| {
            reloads(m) > before
        });
        // The reader lets the open complete.
        let lines = fifo_lines(&f);
        let out = client.join().expect("connect thread");
        out.expect_code(3);
        assert_eq!(
            lines.recv_timeout(Duration::from_secs(10)),
            Ok(None),
            "the pipe got data from a session whose access was withdrawn"
        );
    });
    assert!(
        gw.log()
            .contains("refusing a session stopped while it opened"),
        "{}",
        gw.log()
    );
}

#[test]
fn reload_that_withdraws_access_ends_only_that_identitys_sessions() {
    let fx = Fixture::new();
    let text = |allow: &[&str]| fx.server_config(&pipe("shared", "exec:cat", allow, ""));
    let gw = fx.serve("gw.toml", &text(&["alice", "bob"]));
    let mut a = Live::connect(&fx, &gw.url("shared"), "alice");
    let mut b = Live::connect(&fx, &gw.url("shared"), "bob");
    a.echo(b"alice 1\n");
    b.echo(b"bob 1\n");

    std::fs::write(fx.path("gw.toml"), text(&["bob"])).expect("rewrite");
    signal(gw.proc.pid(), rustix::process::Signal::HUP);

    let took = a.expect_exit(1, Duration::from_secs(15));
    let err = a.stderr();
    assert!(
        err.contains("remote error: access_withdrawn"),
        "alice's connect stderr:\n{err}"
    );
    assert!(took < Duration::from_secs(15));
    assert!(
        gw.log().contains("access withdrawn"),
        "the gateway did not log the withdrawal:\n{}",
        gw.log()
    );
    // Bob's session on the same pipe goes on.
    assert!(b.running(), "bob's session ended: {}", b.stderr());
    b.echo(&line_payload(64 * 1024));
    b.echo(b"bob 2\n");
    b.close_stdin();
    b.expect_exit(0, CLIENT_TIMEOUT);
    // And alice cannot open a new one.
    fx.connect(&gw.url("shared"), "alice", b"x").expect_code(3);
}

// === 5. drain ===

#[test]
fn sigterm_drain_lets_an_in_flight_session_finish_and_refuses_new_ones() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{ADMIN}{}",
        pipe("slow", "exec:sh -c 'sleep 3; echo done'", &["alice"], "")
    ));
    let (mut gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let mut live = Live::connect(&fx, &gw.url("slow"), "alice");
    live.close_stdin();
    wait_for(Duration::from_secs(10), "the session to start", || {
        (sessions(&admin).len() == 1).then_some(())
    });
    gw.proc.sigterm();

    wait_for(Duration::from_secs(2), "/readyz to turn 503", || {
        (http_get(&admin, "/readyz").0 == 503).then_some(())
    });
    let (st, _) = http_get(&admin, "/healthz");
    assert_eq!(st, 200, "/healthz while draining");
    let refused = fx.connect(&gw.url("slow"), "alice", b"");
    refused.expect_code(1);
    assert!(
        refused.stderr.contains("503 draining"),
        "new session during the drain: {}",
        refused.stderr
    );
    assert!(
        live.running(),
        "the in-flight session ended before the refusal was checked"
    );
    live.expect_exit(0, Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&live.out()), "done\n");
    let st = gw
        .proc
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the gateway did not exit after the drain:\n{}", gw.log()));
    assert!(st.success(), "gateway exit status {st}; log:\n{}", gw.log());
}

#[test]
fn drain_grace_period_ends_long_sessions_with_1001() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{ADMIN}[shutdown]\ngrace_period = \"1s\"\n\n{}",
        pipe("long", "exec:sleep 30", &["alice"], "")
    ));
    let (mut gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let mut live = Live::connect(&fx, &gw.url("long"), "alice");
    wait_for(Duration::from_secs(10), "the session to start", || {
        (sessions(&admin).len() == 1).then_some(())
    });
    let t0 = Instant::now();
    gw.proc.sigterm();
    live.expect_exit(1, Duration::from_secs(15));
    let took = t0.elapsed();
    let err = live.stderr();
    assert!(
        err.contains("draining") || err.contains("1001"),
        "connect stderr:\n{err}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(6),
        "the session ended {took:?} after SIGTERM (grace 1s)"
    );
    let st = gw
        .proc
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the gateway did not exit:\n{}", gw.log()));
    assert!(st.success(), "gateway exit status {st}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the gateway took {:?} to exit",
        t0.elapsed()
    );
}

/// A drain sends GOAWAY on the HTTP/2 connections forwards keep warm: one with no
/// session left closes at once, and the gateway exits without waiting for it (it used
/// to wait out its final limit, 6 s, on every shutdown a forward's connection was open).
#[test]
fn a_drain_closes_idle_http2_connections_at_once() {
    let fx = Fixture::new();
    let text = fx.server_config(&pipe("cat", "exec:cat", &["alice"], ""));
    let mut gw = fx.serve("a.toml", &text);
    let fwd = fx.path("fwd.sock");
    let _b = fx.serve("b.toml", &forward(&fx, &fwd, &gw.url("cat"), "alice"));
    assert_eq!(
        unix_request(&fwd, b"warm\n", Duration::from_secs(10)),
        b"warm\n"
    );
    wait_for(Duration::from_secs(10), "the session's audit line", || {
        gw.log().contains("session end").then_some(())
    });
    let t0 = Instant::now();
    gw.proc.sigterm();
    let st = gw
        .proc
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the gateway did not exit:\n{}", gw.log()));
    let took = t0.elapsed();
    assert!(st.success(), "gateway exit status {st}");
    // It waited at least 6 s before (its final wait's limit).
    assert!(
        took < Duration::from_secs(5),
        "the gateway took {took:?} to exit with only an idle HTTP/2 connection open"
    );
}

#[test]
fn second_sigterm_during_drain_exits_at_once() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{ADMIN}{}",
        pipe("long", "exec:sleep 30", &["alice"], "")
    ));
    let (mut gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let _live = Live::connect(&fx, &gw.url("long"), "alice");
    wait_for(Duration::from_secs(10), "the session to start", || {
        (sessions(&admin).len() == 1).then_some(())
    });
    let kids = descendants(gw.proc.pid());
    gw.proc.sigterm();
    gw.proc
        .wait_until(Duration::from_secs(5), |l| l.contains("draining"));
    thread::sleep(Duration::from_millis(200));
    assert!(
        gw.proc.child.try_wait().expect("try_wait").is_none(),
        "the gateway exited on the first SIGTERM despite a live session (grace 30s)"
    );
    let t0 = Instant::now();
    gw.proc.sigterm();
    let st = gw.proc.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    kill_orphans(&kids, "sleep");
    assert!(
        st.is_some(),
        "the gateway ignored the second SIGTERM:\n{}",
        gw.log()
    );
    assert!(
        took < Duration::from_secs(4),
        "the second SIGTERM took {took:?} to stop the gateway"
    );
}

#[test]
fn drain_uses_the_grace_period_of_a_reloaded_config() {
    let fx = Fixture::new();
    let text = |grace: &str| {
        fx.server_config(&format!(
            "{ADMIN}[shutdown]\ngrace_period = \"{grace}\"\n\n{}",
            pipe("long", "exec:sleep 30", &["alice"], "")
        ))
    };
    let (mut gw, admin) = serve_admin(&fx, "gw.toml", &text("30s"));
    let ok0 = metric(
        &scrape(&admin),
        "pipebridge_reloads_total",
        &[("result", "ok")],
    );
    std::fs::write(fx.path("gw.toml"), text("1s")).expect("rewrite");
    signal(gw.proc.pid(), rustix::process::Signal::HUP);
    wait_metrics(&admin, Duration::from_secs(10), "the reload", |m| {
        metric(m, "pipebridge_reloads_total", &[("result", "ok")]) > ok0
    });
    let mut live = Live::connect(&fx, &gw.url("long"), "alice");
    wait_for(Duration::from_secs(10), "the session to start", || {
        (sessions(&admin).len() == 1).then_some(())
    });
    let kids = descendants(gw.proc.pid());
    let t0 = Instant::now();
    gw.proc.sigterm();
    let st = live.wait(Duration::from_secs(8));
    let took = t0.elapsed();
    if st.is_none() {
        // Do not leave the drain running for 30 s.
        gw.proc.sigterm();
        let _ = gw.proc.wait_exit(Duration::from_secs(5));
        kill_orphans(&kids, "sleep");
    }
    assert!(
        st.is_some(),
        "after reloading grace_period = 1s, SIGTERM still waited {took:?} without closing the session (the drain used the startup config's 30s)"
    );
}

// === 6. timeouts ===

/// Serves pipe `idle` (`exec:cat`) with the config sections `limits`, opens a session
/// that sends nothing and asserts that it is closed for its idle timeout within
/// `closed` of its start; returns the fixture and the gateway.
fn an_idle_session_is_closed(
    limits: &str,
    closed: std::ops::Range<Duration>,
) -> (Fixture, Gateway) {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{limits}\n\n{}",
        pipe("idle", "exec:cat", &["alice"], "")
    ));
    let gw = fx.serve("gw.toml", &text);
    let mut live = Live::connect(&fx, &gw.url("idle"), "alice");
    let took = live.expect_exit(1, Duration::from_secs(15));
    let err = live.stderr();
    assert!(err.contains("idle timeout"), "connect stderr:\n{err}");
    assert!(
        closed.contains(&took),
        "the idle session was closed after {took:?}, not within {closed:?} ({limits})"
    );
    (fx, gw)
}

#[test]
fn idle_timeout_closes_an_idle_session() {
    let (fx, gw) = an_idle_session_is_closed(
        "[limits]\nidle_timeout = \"1s\"",
        Duration::from_millis(900)..Duration::from_secs(6),
    );
    // Activity resets the timer: a session that sends every 300 ms lives on.
    let mut busy = Live::connect(&fx, &gw.url("idle"), "alice");
    for i in 0..10 {
        busy.echo(format!("tick {i}\n").as_bytes());
        thread::sleep(Duration::from_millis(300));
    }
    assert!(
        busy.running(),
        "an active session was closed: {}",
        busy.stderr()
    );
    busy.close_stdin();
    busy.expect_exit(0, CLIENT_TIMEOUT);
}

/// An `exec:` child that exits ends its session although the client's stdin is still
/// open (a remote shell's `exit` typed at a terminal): `connect` prints what it wrote and
/// exits with its code, as `ssh host` does, instead of waiting for an EOF that nothing
/// could read any more.
#[test]
fn an_exec_child_that_exits_ends_the_session_while_stdin_stays_open() {
    let fx = Fixture::new();
    let text = fx.server_config(&pipe(
        "shell",
        "exec:sh -c 'read line; echo \"got $line\"; exit 5'",
        &["alice"],
        "",
    ));
    let gw = fx.serve("gw.toml", &text);
    let mut live = Live::connect(&fx, &gw.url("shell"), "alice");
    live.send(b"hello\n");
    live.expect_exit(5, Duration::from_secs(15));
    assert_eq!(String::from_utf8_lossy(&live.out()), "got hello\n");
}

/// Keepalive's Pings and Pongs are not activity: with Pings every 300 ms, an idle session
/// is still closed at its `idle_timeout` (each Pong used to reset the timer, so any
/// timeout longer than the keepalive interval never passed).
#[test]
fn keepalive_pings_do_not_keep_an_idle_session_open() {
    an_idle_session_is_closed(
        "[limits]\nidle_timeout = \"2s\"\n[keepalive]\ninterval = \"300ms\"\ntimeout = \"3s\"",
        Duration::from_millis(1900)..Duration::from_secs(8),
    );
}

#[test]
fn idle_timeout_never_fires_while_the_local_reader_is_stalled() {
    let fx = Fixture::new();
    // A local server that accepts and never reads.
    let sock = fx.path("stall.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let held: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let held2 = held.clone();
    let acceptor = thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            held2.lock().unwrap().push(s);
        }
    });
    let text = fx.server_config(&format!(
        "{ADMIN}[limits]\nidle_timeout = \"1s\"\n\n{}",
        pipe("stall", &format!("unix:{}", sock.display()), &["alice"], "")
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let mut live = Live::connect(&fx, &gw.url("stall"), "alice");
    let mut stdin = live.take_stdin();
    let writer = thread::spawn(move || {
        let data = vec![0x5au8; 10 << 20];
        let _ = stdin.write_all(&data);
        // Keep stdin open (no EOF) until the test ends.
        stdin
    });
    acceptor.join().expect("acceptor");
    // Data is pending: the gateway wrote some and is blocked on the rest.
    wait_for(
        Duration::from_secs(10),
        "data to reach the stalled socket",
        || {
            let l = sessions(&admin);
            (l.len() == 1 && l[0]["bytes_in"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    );
    thread::sleep(Duration::from_secs(3));
    assert!(
        live.running(),
        "the stalled session was closed: {}",
        live.stderr()
    );
    assert_eq!(sessions(&admin).len(), 1, "the session left /sessions");
    assert!(
        !gw.log().contains("idle timeout"),
        "the gateway logged an idle timeout:\n{}",
        gw.log()
    );
    drop(live);
    let _ = writer.join();
    drop(held);
}

#[test]
fn handshake_timeout_disconnects_silent_tcp_and_tls_clients() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "[limits]\nhandshake_timeout = \"1s\"\n\n{}",
        pipe("cat", "exec:cat", &["alice"], "")
    ));
    let gw = fx.serve("gw.toml", &text);

    // Raw TCP, nothing sent.
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port)).expect("tcp connect");
    tcp.set_read_timeout(Some(Duration::from_secs(6)))
        .expect("timeout");
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let r = tcp.read(&mut buf);
    let took = t0.elapsed();
    match &r {
        Ok(0) => {}
        Err(e)
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut => {}
        other => panic!("a silent TCP client was not disconnected: {other:?} after {took:?}"),
    }
    assert!(
        took < Duration::from_millis(2500),
        "silent TCP client disconnected after {took:?} (handshake_timeout 1s)"
    );

    // TLS completed, no HTTP request.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (res, took) = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut s = tls_connect(&fx, gw.port, Creds::Cert("alice")).await;
        let t0 = Instant::now();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await;
        (r.map(|r| r.map_err(|e| e.to_string())), t0.elapsed())
    });
    match res {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("a TLS client that sent no request was not disconnected: {other:?}"),
    }
    assert!(
        took < Duration::from_millis(2500),
        "silent TLS client disconnected after {took:?} (handshake_timeout 1s)"
    );

    // A normal session is not affected.
    let out = fx.connect(&gw.url("cat"), "alice", b"fine\n");
    out.expect_code(0);
    assert_eq!(out.out(), "fine\n");
}

#[test]
fn keepalive_drops_a_peer_that_stops_answering_pings() {
    let fx = Fixture::new();
    let text = fx.server_config(&format!(
        "{ADMIN}[keepalive]\ninterval = \"1s\"\ntimeout = \"3s\"\n\n{}",
        pipe("cat", "exec:cat", &["alice"], "")
    ));
    let (gw, admin) = serve_admin(&fx, "gw.toml", &text);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Upgrade, then never read or write again: the kernel still acknowledges TCP, but
    // nothing answers WebSocket pings.
    let req = upgrade_request(gw.port, "/pipes/cat", "pipebridge.v1", "");
    let (resp, silent) = rt.block_on(raw_exchange(&fx, gw.port, Creds::Cert("alice"), &req));
    assert_eq!(resp.status, 101);
    wait_for(Duration::from_secs(5), "the session to start", || {
        (sessions(&admin).len() == 1).then_some(())
    });
    let t0 = Instant::now();
    let dropped = (|| {
        while t0.elapsed() < Duration::from_secs(20) {
            if sessions(&admin).is_empty() {
                return true;
            }
            thread::sleep(Duration::from_millis(200));
        }
        false
    })();
    rt.block_on(async move { drop(silent) });
    assert!(
        dropped,
        "a peer that answered no ping for 20 s (keepalive interval 1s, timeout 3s) still holds its session; gateway log:\n{}",
        gw.log()
    );
}

// === 7. forward recovery ===

#[test]
fn forward_fails_fast_while_its_gateway_is_down_and_recovers_on_restart() {
    let fx = Fixture::new();
    let _echo = UnixServer::echo(&fx.path("echo.sock"));
    let a_text = |listen: &str| {
        fx.server_config(&pipe(
            "echo",
            &format!("unix:{}", fx.path("echo.sock").display()),
            &["alice"],
            "",
        ))
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = {}", q(listen)),
            1,
        )
    };
    let mut a = fx.serve("a.toml", &a_text("127.0.0.1:0"));
    let port = a.port;
    let url = a.url("echo");
    let fwd = fx.path("fwd.sock");
    let b_text = format!("{ADMIN}{}", forward(&fx, &fwd, &url, "alice"));
    let (mut b, admin) = serve_admin(&fx, "b.toml", &b_text);

    assert_eq!(
        unix_request(&fwd, b"before\n", Duration::from_secs(10)),
        b"before\n"
    );
    let m0 = scrape(&admin);
    let dial_err0 = metric(
        &m0,
        "pipebridge_forward_dials_total",
        &[("result", "error")],
    );
    let dial_ok0 = metric(&m0, "pipebridge_forward_dials_total", &[("result", "ok")]);
    assert!(dial_ok0 >= 1.0, "{m0}");

    // A down: a local connection is closed quickly, and B says why.
    a.proc.child.kill().expect("SIGKILL gateway A");
    a.proc.wait_exit(Duration::from_secs(10)).expect("A exits");
    let mut s = unix_connect(&fwd);
    let _ = s.write_all(b"while down\n");
    let t0 = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "the forward kept a local connection open while its gateway is down"
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    b.proc.wait_until(Duration::from_secs(5), |l| {
        l.contains("forward could not open the remote session")
    });
    wait_metrics(&admin, Duration::from_secs(5), "a failed dial", |m| {
        metric(m, "pipebridge_forward_dials_total", &[("result", "error")]) > dial_err0
    });

    // `connect --retry` waits for the gateway to come back.
    let mut args = fx.cert_args("alice");
    args.extend(["--retry".to_string(), "8".to_string()]);
    let mut retry = Live::connect_args(&fx, &url, &args, &[]);
    retry.send(b"retried\n");
    retry.close_stdin();
    thread::sleep(Duration::from_millis(500));

    // A restarts on the same port: new local connections work again.
    let a2 = fx.serve("a2.toml", &a_text(&format!("127.0.0.1:{port}")));
    assert_eq!(a2.port, port);
    assert_eq!(
        unix_request(&fwd, b"after\n", Duration::from_secs(10)),
        b"after\n"
    );
    wait_metrics(&admin, Duration::from_secs(5), "a good dial", |m| {
        metric(m, "pipebridge_forward_dials_total", &[("result", "ok")]) > dial_ok0
    });
    retry.expect_exit(0, Duration::from_secs(30));
    assert_eq!(String::from_utf8_lossy(&retry.out()), "retried\n");
    drop(b);
}

// === 8. HTTPS_PROXY / NO_PROXY ===

/// A tiny HTTP CONNECT proxy counting the tunnels it opened (and keeping each CONNECT's
/// target and request head).
struct Proxy {
    port: u16,
    connects: Arc<AtomicUsize>,
    targets: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start() -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = l.local_addr().expect("addr").port();
        let connects = Arc::new(AtomicUsize::new(0));
        let targets: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, t2, s2) = (connects.clone(), targets.clone(), stop.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { break };
                let (c3, t3) = (c2.clone(), t2.clone());
                thread::spawn(move || proxy_conn(conn, &c3, &t3));
            }
        });
        Proxy {
            port,
            connects,
            targets,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn count(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn proxy_conn(mut c: TcpStream, connects: &AtomicUsize, targets: &Mutex<Vec<(String, String)>>) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || !matches!(c.read(&mut b), Ok(1)) {
            return;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = c.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    connects.fetch_add(1, Ordering::SeqCst);
    targets
        .lock()
        .unwrap()
        .push((target.to_string(), head.clone()));
    let Ok(up) = TcpStream::connect(target) else {
        let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let _ = c.set_read_timeout(None);
    let (Ok(mut c2), Ok(mut up2)) = (c.try_clone(), up.try_clone()) else {
        return;
    };
    let mut up = up;
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

#[test]
fn connect_and_forwards_honour_https_proxy_and_no_proxy() {
    let fx = Fixture::new();
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe("cat", "exec:cat", &["alice"], "")),
    );
    let proxy = Proxy::start();
    let mut args = vec!["connect".to_string(), gw.url("cat")];
    args.extend(fx.cert_args("alice"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let purl = proxy.url();

    // HTTPS_PROXY: through the proxy.
    let out = fx.run_env(
        &a,
        &[("HTTPS_PROXY", &purl)],
        b"via proxy\n",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(out.out(), "via proxy\n");
    assert_eq!(proxy.count(), 1, "CONNECTs seen by the proxy");
    assert_eq!(
        proxy.targets.lock().unwrap()[0].0,
        format!("localhost:{}", gw.port)
    );
    assert!(
        !proxy.targets.lock().unwrap()[0]
            .1
            .contains("Proxy-Authorization"),
        "no credentials, no Proxy-Authorization"
    );

    // https_proxy (lower case) too.
    let out = fx.run_env(&a, &[("https_proxy", &purl)], b"lower\n", CLIENT_TIMEOUT);
    out.expect_code(0);
    assert_eq!(out.out(), "lower\n");
    assert_eq!(proxy.count(), 2, "CONNECTs seen by the proxy");

    // NO_PROXY=localhost: direct.
    let out = fx.run_env(
        &a,
        &[("HTTPS_PROXY", &purl), ("NO_PROXY", "localhost")],
        b"direct\n",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(out.out(), "direct\n");
    assert_eq!(proxy.count(), 2, "NO_PROXY=localhost still used the proxy");

    // A forward of a gateway started with HTTPS_PROXY dials through the proxy.
    let fwd = fx.path("fwd.sock");
    let _b = fx.serve_env(
        "b.toml",
        &forward(&fx, &fwd, &gw.url("cat"), "alice"),
        &[("HTTPS_PROXY", &purl)],
    );
    assert_eq!(
        unix_request(&fwd, b"forwarded\n", Duration::from_secs(10)),
        b"forwarded\n"
    );
    assert_eq!(proxy.count(), 3, "the forward did not use the proxy");

    // A user name and password in the URL (percent-encoded) go as Basic credentials.
    let with_auth = format!("http://pb%20user:p%40ss@127.0.0.1:{}/", proxy.port);
    let out = fx.run_env(
        &a,
        &[("HTTPS_PROXY", &with_auth)],
        b"auth\n",
        CLIENT_TIMEOUT,
    );
    out.expect_code(0);
    assert_eq!(out.out(), "auth\n");
    let head = proxy
        .targets
        .lock()
        .unwrap()
        .iter()
        .map(|(_, head)| head.clone())
        .find(|h| h.contains("Proxy-Authorization"))
        .unwrap_or_default();
    assert!(
        head.contains("\r\nProxy-Authorization: Basic cGIgdXNlcjpwQHNz\r\n"),
        "base64 of \"pb user:p@ss\" in the CONNECT:\n{head}"
    );
    // A proxy that cannot be reached is named by its address, never with the password.
    let unreachable = "http://pbuser:s3cret-pw@127.0.0.1:1";
    let out = fx.run_env(&a, &[("HTTPS_PROXY", unreachable)], b"", CLIENT_TIMEOUT);
    out.expect_code(1);
    assert!(
        out.stderr.contains("127.0.0.1:1") && !out.stderr.contains("s3cret"),
        "{}",
        out.stderr
    );
}

// === logging ===

/// `--log` (here `PIPEBRIDGE_LOG`) filters by target and level, and by span (EnvFilter
/// syntax). A session's lines are in its `session{...}` span either way: the span is
/// entered at every poll only for a filter that selects by span.
#[test]
fn log_filters_select_by_target_and_by_session_span() {
    let fx = Fixture::new();
    let text = fx.server_config(&pipe("hello", "exec:echo ok", &["alice"], ""));
    let session_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("session{"))
            .map(str::to_string)
            .collect()
    };

    // A gateway with `env`, its log once one session has ended.
    let one_session = |name: &str, env: &[(&str, &str)]| {
        let gw = fx.serve_env(name, &text, env);
        fx.connect(&gw.url("hello"), "alice", b"").expect_code(0);
        wait_for(CLIENT_TIMEOUT, "the audit line", || {
            gw.log().contains("session end").then_some(())
        });
        gw.log()
    };

    // The default: info everywhere, the session's lines in its span.
    let log = one_session("default.toml", &[]);
    let lines = session_lines(&log);
    assert!(log.contains("gateway listening"), "{log}");
    for needle in ["exec child exited", "pipebridge::audit: session end"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(needle) && l.contains("identity=alice")),
            "no {needle:?} line in the session's span:\n{log}"
        );
    }

    // By target: only the audit line, outside any span (the session span's own target
    // is not selected). Empty directives are ignored, as EnvFilter ignores them.
    let log = one_session(
        "targets.toml",
        &[("PIPEBRIDGE_LOG", "warn,,pipebridge::audit=info,")],
    );
    assert!(!log.contains("gateway listening"), "{log}");
    assert!(!log.contains("exec child exited"), "{log}");
    assert!(!log.contains("TRACE") && !log.contains("DEBUG"), "{log}");
    assert!(session_lines(&log).is_empty(), "{log}");

    // JSON: a session's lines carry its span, in "span" and in "spans".
    let log = one_session("json.toml", &[("PIPEBRIDGE_LOG_FORMAT", "json")]);
    for needle in ["exec child exited", "session end"] {
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == needle)
            .unwrap_or_else(|| panic!("no JSON line {needle:?}:\n{log}"));
        assert_eq!(line["span"]["name"], "session", "{line}");
        assert_eq!(line["span"]["identity"], "alice", "{line}");
        let spans = line["spans"].as_array().cloned().unwrap_or_default();
        assert!(
            spans.iter().any(|s| s["name"] == "session"),
            "{needle:?} without its session in \"spans\": {line}"
        );
    }

    // A more verbose target: its debug lines.
    let log = one_session(
        "debug.toml",
        &[("PIPEBRIDGE_LOG", "info,pipebridge::server=debug")],
    );
    assert!(
        session_lines(&log)
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("session started")),
        "no debug line of pipebridge::server:\n{log}"
    );

    // By span: what happens in a session, at info, and nothing else below warn.
    let log = one_session("spans.toml", &[("PIPEBRIDGE_LOG", "warn,[session]=info")]);
    assert!(!log.contains("gateway listening"), "{log}");
    let lines = session_lines(&log);
    for needle in ["exec child exited", "pipebridge::audit: session end"] {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no {needle:?} line selected by its span:\n{log}"
        );
    }
}
