//! Integration tests for the pipe kinds of issue 3: seqpacket message mode (exported and
//! hosted, 1 byte to 1 MiB), `max_message_size` (1009), FIFOs (exported and hosted, both
//! directions, EOF, "no reader"), one-way `exec:` pipes (exit status, 409, 1008),
//! `max_instances` (503 busy, `--wait`), `dotnet:` pipes (exported and hosted) and hosted
//! socket files (mode, owner, group).
//!
//! Every test runs the real binary (`pipebridge serve` / `pipebridge connect`) in its own
//! temp dir with its own PKI on port 0; every process a test starts is killed and reaped
//! by pid when the test ends. Helpers are self-contained (no `tests/common`).
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_pipebridge");
/// How long a gateway may take to print its ready lines.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Message sizes that must cross intact: 1 byte to 1 MiB.
const SIZES: [usize; 5] = [1, 100, 4096, 65536, 1 << 20];

/// Environment that would change the behaviour under test if the developer has it set.
const SCRUBBED_ENV: &[&str] = &[
    "PIPEBRIDGE_TOKEN",
    "PIPEBRIDGE_LOG",
    "PIPEBRIDGE_LOG_FORMAT",
    "PIPEBRIDGE_CONFIG",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "RUST_LOG",
    "TMPDIR",
];

// === fixture ===

/// A temp dir with a PKI (CA, server cert for localhost, client alice) under `pki/`;
/// the working directory of every process a test starts.
struct Fx {
    tmp: tempfile::TempDir,
}

impl Fx {
    fn new() -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("pbk")
            .tempdir()
            .expect("tempdir");
        pipebridge::pki::init(&pipebridge::pki::CertsInit {
            dir: tmp.path().join("pki"),
            server_names: vec!["localhost".into()],
            clients: vec!["alice".into()],
            force: false,
        })
        .expect("pki init");
        Fx { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// `ca`, `cert`, `key` lines of a `[[forward]]`.
    fn creds_toml(&self) -> String {
        format!(
            "ca = {}\ncert = {}\nkey = {}\n",
            q(&self.s("pki/ca.pem")),
            q(&self.s("pki/alice.pem")),
            q(&self.s("pki/alice.key"))
        )
    }

    /// `--ca --cert --key` for alice.
    fn cred_args(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.s("pki/ca.pem"),
            "--cert".into(),
            self.s("pki/alice.pem"),
            "--key".into(),
            self.s("pki/alice.key"),
        ]
    }

    /// A gateway config exporting `body` (pipes, limits) to identity alice.
    fn server_config(&self, body: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n\n\
             [shutdown]\ngrace_period = \"1s\"\n\n[[identity]]\nname = \"alice\"\ncert_cn = \"alice\"\n\n{body}",
            q(&self.s("pki/server.pem")),
            q(&self.s("pki/server.key")),
            q(&self.s("pki/ca.pem"))
        )
    }

    /// A forwards-only gateway config.
    fn forward_config(&self, forwards: &str) -> String {
        format!("[shutdown]\ngrace_period = \"1s\"\n\n{forwards}")
    }

    /// One `[[forward]]` with alice's credentials.
    fn forward(&self, listen: &str, to: &str, extra: &str) -> String {
        format!(
            "[[forward]]\nlisten = {}\nto = {}\n{}{extra}\n\n",
            q(listen),
            q(to),
            self.creds_toml()
        )
    }

    /// Starts `pipebridge serve` with config `text` (written to `name`) and extra `env`;
    /// waits for the listening line and one `forwarding` line per `[[forward]]`.
    fn serve(&self, name: &str, text: &str, env: &[(&str, &str)]) -> Gw {
        self.serve_via(name, text, env, None)
    }

    /// Like [`Fx::serve`]; with `shell_prefix`, the gateway is started by
    /// `sh -c 'PREFIX exec pipebridge serve ...'` (e.g. to set a umask).
    fn serve_via(
        &self,
        name: &str,
        text: &str,
        env: &[(&str, &str)],
        shell_prefix: Option<&str>,
    ) -> Gw {
        let cfg = self.path(name);
        std::fs::write(&cfg, text).expect("write config");
        let mut cmd = match shell_prefix {
            None => Command::new(BIN),
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{prefix} exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
        };
        cmd.arg("serve").arg("--config").arg(&cfg);
        scrub(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn(cmd, self.tmp.path(), false);
        let mut port = 0;
        if text.contains("[server]") {
            proc.wait_until(START_TIMEOUT, "the listening line", |p| {
                p.stderr().contains("pipebridge: listening on ")
            });
            let log = proc.stderr();
            let line = log
                .lines()
                .find(|l| l.starts_with("pipebridge: listening on "))
                .expect("listening line");
            port = line
                .rsplit(':')
                .next()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("cannot parse {line:?}"));
        }
        let forwards = text.matches("[[forward]]").count();
        if forwards > 0 {
            proc.wait_until(START_TIMEOUT, "the forwarding lines", |p| {
                p.stderr().matches("pipebridge: forwarding ").count() >= forwards
            });
        }
        Gw { proc, port }
    }

    /// Runs `pipebridge serve` with config `text`, expecting it to refuse to start.
    fn serve_fails(&self, name: &str, text: &str) -> Output {
        let cfg = self.path(name);
        std::fs::write(&cfg, text).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(&cfg);
        scrub(&mut cmd);
        let out = Proc::spawn(cmd, self.tmp.path(), false).finish(Duration::from_secs(20));
        assert_ne!(
            out.code,
            Some(0),
            "the gateway should refuse to start; stderr:\n{}",
            out.stderr
        );
        assert!(
            out.code.is_some(),
            "the gateway was killed instead of exiting; stderr:\n{}",
            out.stderr
        );
        out
    }

    /// `pipebridge connect URL --ca --cert --key EXTRA...` (not started).
    fn connect_cmd(&self, url: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("connect")
            .arg(url)
            .args(self.cred_args())
            .args(extra);
        scrub(&mut cmd);
        cmd
    }

    /// Runs `connect` to completion, feeding `stdin` (then closing it).
    fn connect(&self, url: &str, extra: &[&str], stdin: &[u8]) -> Output {
        let mut p = Proc::spawn(self.connect_cmd(url, extra), self.tmp.path(), true);
        p.feed(stdin.to_vec());
        p.finish(CLIENT_TIMEOUT)
    }

    /// Starts `connect` with stdin kept open.
    fn spawn_connect(&self, url: &str, extra: &[&str]) -> Proc {
        Proc::spawn(self.connect_cmd(url, extra), self.tmp.path(), true)
    }

    /// Runs `sh -c SCRIPT` in the temp dir in the background.
    fn sh(&self, script: &str) -> Proc {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        Proc::spawn(cmd, self.tmp.path(), false)
    }
}

/// A TOML basic string holding `s`.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

fn scrub(cmd: &mut Command) {
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
}

/// A `[[pipe]]` run as the gateway, allowed to alice.
fn pipe(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[[pipe]]\nname = {}\nendpoint = {}\nrun_as = \"gateway\"\nallow = [\"alice\"]\n{extra}\n\n",
        q(name),
        q(endpoint)
    )
}

/// A running gateway.
struct Gw {
    proc: Proc,
    port: u16,
}

impl Gw {
    fn url(&self, pipe: &str) -> String {
        format!("wss://localhost:{}/pipes/{pipe}", self.port)
    }

    fn log(&self) -> String {
        self.proc.stderr()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        // A clean stop first (so hosted files are removed and exec children killed), then
        // SIGKILL by pid if it lingers (Proc's drop).
        if let Ok(None) = self.proc.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.proc.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.proc.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// === processes ===

/// A child whose stdout and stderr are collected by background threads; killed (by pid,
/// SIGKILL) and reaped on drop unless it already exited.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

/// What a finished process produced.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

impl Output {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with the output unless the exit code is `code`.
    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}; stdout ({} bytes): {:?}; stderr:\n{}",
            self.stdout.len(),
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(300)]),
            self.stderr
        );
        self
    }
}

fn drain<R: Read + Send + 'static>(r: R, buf: Arc<Mutex<Vec<u8>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::with_capacity(64 * 1024, r);
        loop {
            let n = match r.fill_buf() {
                Ok([]) | Err(_) => break,
                Ok(b) => {
                    buf.lock().unwrap().extend_from_slice(b);
                    b.len()
                }
            };
            r.consume(n);
        }
    })
}

impl Proc {
    fn spawn(mut cmd: Command, cwd: &Path, piped_stdin: bool) -> Proc {
        cmd.current_dir(cwd)
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let threads = vec![
            drain(child.stdout.take().expect("stdout"), out.clone()),
            drain(child.stderr.take().expect("stderr"), err.clone()),
        ];
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            threads,
            started: Instant::now(),
        }
    }

    fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Writes `data` to stdin from a background thread, then closes stdin.
    fn feed(&mut self, data: Vec<u8>) {
        if let Some(mut sin) = self.stdin.take() {
            self.threads.push(thread::spawn(move || {
                let _ = sin.write_all(&data);
            }));
        }
    }

    fn write_stdin(&mut self, data: &[u8]) {
        let sin = self.stdin.as_mut().expect("stdin is open");
        sin.write_all(data).expect("write stdin");
        sin.flush().expect("flush stdin");
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until `pred` holds; panics (with the output) on timeout, or when the process
    /// exited and `pred` still does not hold.
    fn wait_until(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Proc) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(200));
                if pred(self) {
                    return;
                }
                panic!(
                    "process exited ({st}) before {what}; stdout: {:?}; stderr:\n{}",
                    String::from_utf8_lossy(&self.stdout()),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; stdout: {:?}; stderr:\n{}",
                    String::from_utf8_lossy(&self.stdout()),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the process to exit; `None` if it is still running.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit (killing it and panicking after `timeout`) and collects the output.
    fn finish(self, timeout: Duration) -> Output {
        match self.finish_within(timeout) {
            Ok(out) => out,
            Err(out) => panic!(
                "process timed out after {timeout:?}; stdout: {:?}; stderr:\n{}",
                out.out(),
                out.stderr
            ),
        }
    }

    /// Waits for exit and collects the output; after `timeout` kills the process and
    /// returns what it produced as `Err`.
    fn finish_within(mut self, timeout: Duration) -> Result<Output, Output> {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let (status, timed_out) = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break (st, false);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break (self.child.wait().expect("wait"), true);
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let out = Output {
            code: status.code(),
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed,
        };
        if timed_out {
            Err(out)
        } else {
            Ok(out)
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// === data ===

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("getrandom");
    v
}

/// `n` random lowercase letters (no newline, so they survive lines framing).
fn random_letters(n: usize) -> Vec<u8> {
    random_bytes(n).into_iter().map(|b| b'a' + b % 26).collect()
}

/// What the test seqpacket server answers to one record: `"LEN:"` and the bytes reversed.
/// Two records where one was sent would give two answers with other lengths.
fn transform(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{}:", data.len()).into_bytes();
    v.extend(data.iter().rev());
    v
}

fn u32be_frame(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// Splits u32be-framed output into messages (panics on a cut frame).
fn u32be_split(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 4, "output ends inside a length prefix");
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        assert!(b.len() >= 4 + n, "output ends inside a frame of {n} bytes");
        v.push(b[4..4 + n].to_vec());
        b = &b[4 + n..];
    }
    v
}

/// Compares without dumping megabytes on failure.
fn same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {} bytes, first difference at byte {at}; got starts {:?}",
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[..got.len().min(80)])
        );
    }
}

/// Compares a list of messages (count, then each).
fn same_messages(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) {
    let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} messages of sizes {:?}, want {} of sizes {:?}",
        got.len(),
        lens(got),
        want.len(),
        lens(want)
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        same(&format!("{what}: message {i}"), g, w);
    }
}

// === local servers ===

/// A seqpacket transformer target at `sp.sock` and a gateway (config `name`) exporting
/// it as pipe `sp`.
fn seqpacket_export(fx: &Fx, name: &str) -> (SeqServer, Gw) {
    let sock = fx.path("sp.sock");
    let srv = SeqServer::transformer(&sock);
    let text = fx.server_config(&pipe("sp", &format!("seqpacket:{}", sock.display()), ""));
    (srv, fx.serve(name, &text, &[]))
}

/// A gateway (config `name`) hosting a `seqpacket:` forward at `hosted` to `a`'s pipe
/// "sp".
fn seqpacket_forward(fx: &Fx, name: &str, hosted: &Path, a: &Gw) -> Gw {
    fx.serve(
        name,
        &fx.forward_config(&fx.forward(
            &format!("seqpacket:{}", hosted.display()),
            &a.url("sp"),
            "",
        )),
        &[],
    )
}

/// A SOCK_SEQPACKET server run by background threads; stops accepting when dropped.
struct SeqServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

fn seq_socket() -> OwnedFd {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("seqpacket socket")
}

/// Lets `fd` send records up to a few MiB (SO_SNDBUFFORCE when privileged).
fn big_sndbuf(fd: &OwnedFd) {
    let want = 4 << 20;
    if rustix::net::sockopt::set_socket_send_buffer_size_force(fd, want).is_err() {
        rustix::net::sockopt::set_socket_send_buffer_size(fd, want).expect("SO_SNDBUF");
    }
}

fn recv_timeout(fd: &OwnedFd, t: Duration) {
    rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Recv, Some(t))
        .expect("SO_RCVTIMEO");
}

/// Receives one record; `None` at EOF (or a zero-length record). Panics on truncation.
fn seq_recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<Vec<u8>>> {
    let (n, full) = rustix::net::recv(fd, &mut buf[..], RecvFlags::TRUNC)?;
    if full == 0 {
        return Ok(None);
    }
    assert!(
        full <= n,
        "a record of {full} bytes did not fit a buffer of {} bytes",
        buf.len()
    );
    Ok(Some(buf[..n].to_vec()))
}

fn seq_send(fd: &OwnedFd, data: &[u8]) -> std::io::Result<()> {
    let n = rustix::net::send(fd, data, SendFlags::NOSIGNAL)?;
    assert_eq!(n, data.len(), "a seqpacket send was cut short");
    Ok(())
}

fn seq_connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seq_socket();
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

impl SeqServer {
    fn start(path: &Path, handler: fn(OwnedFd)) -> SeqServer {
        let fd = seq_socket();
        rustix::net::bind(&fd, &SocketAddrUnix::new(path).expect("addr")).expect("bind seqpacket");
        rustix::net::listen(&fd, 16).expect("listen");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            while let Ok(c) = rustix::net::accept(&fd) {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                thread::spawn(move || handler(c));
            }
        });
        SeqServer {
            path: path.to_path_buf(),
            stop,
        }
    }

    /// Answers every record with [`transform`] of it; closes at EOF.
    fn transformer(path: &Path) -> SeqServer {
        SeqServer::start(path, transform_conn)
    }
}

impl Drop for SeqServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = seq_connect(&self.path);
    }
}

fn transform_conn(fd: OwnedFd) {
    big_sndbuf(&fd);
    recv_timeout(&fd, Duration::from_secs(60));
    let mut buf = vec![0u8; 8 << 20];
    while let Ok(Some(msg)) = seq_recv(&fd, &mut buf) {
        if seq_send(&fd, &transform(&msg)).is_err() {
            return;
        }
    }
}

/// Answers the first record with one 2000-byte record.
fn big_reply_conn(fd: OwnedFd) {
    big_sndbuf(&fd);
    recv_timeout(&fd, Duration::from_secs(60));
    let mut buf = vec![0u8; 1 << 20];
    if let Ok(Some(_)) = seq_recv(&fd, &mut buf) {
        let _ = seq_send(&fd, &[b'x'; 2000]);
        // Keep the socket until the peer goes away.
        let _ = seq_recv(&fd, &mut buf);
    }
}

/// A Unix stream echo server; stops accepting when dropped.
struct EchoServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    fn start(path: &Path) -> EchoServer {
        let listener = UnixListener::bind(path).expect("bind echo server");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { break };
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        EchoServer {
            path: path.to_path_buf(),
            stop,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
    }
}

/// Sends `data` on a Unix stream socket, half-closes, reads the reply to EOF (bounded).
fn unix_request(path: &Path, data: &[u8]) -> Vec<u8> {
    let mut s =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let data = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&data).expect("write");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read the reply");
    writer.join().expect("writer");
    reply
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// Polls until `f` holds or `timeout` passes; returns whether it held.
fn eventually(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// === 1. seqpacket export ===

#[test]
fn seqpacket_export_u32be_framing_keeps_message_boundaries() {
    let fx = Fx::new();
    let (_srv, gw) = seqpacket_export(&fx, "gw.toml");
    let msgs: Vec<Vec<u8>> = SIZES.iter().map(|&n| random_bytes(n)).collect();
    let stdin: Vec<u8> = msgs.iter().flat_map(|m| u32be_frame(m)).collect();
    let out = fx.connect(
        &gw.url("sp"),
        &["--mode", "message", "--framing", "u32be"],
        &stdin,
    );
    out.expect_code(0);
    let want: Vec<Vec<u8>> = msgs.iter().map(|m| transform(m)).collect();
    same_messages("u32be replies", &u32be_split(&out.stdout), &want);
}

#[test]
fn seqpacket_export_lines_framing_keeps_message_boundaries() {
    let fx = Fx::new();
    let (_srv, gw) = seqpacket_export(&fx, "gw.toml");
    let msgs: Vec<Vec<u8>> = SIZES.iter().map(|&n| random_letters(n)).collect();
    let mut stdin = Vec::new();
    for m in &msgs {
        stdin.extend_from_slice(m);
        stdin.push(b'\n');
    }
    let out = fx.connect(
        &gw.url("sp"),
        &["--mode", "message", "--framing", "lines"],
        &stdin,
    );
    out.expect_code(0);
    let mut got: Vec<Vec<u8>> = out
        .stdout
        .split(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(
        got.pop(),
        Some(Vec::new()),
        "output must end with a newline"
    );
    let want: Vec<Vec<u8>> = msgs.iter().map(|m| transform(m)).collect();
    same_messages("line replies", &got, &want);
}

#[test]
fn seqpacket_zero_length_messages_from_the_network_are_dropped() {
    // message.rs documents the choice: a zero-length record would read as EOF on Linux,
    // so the gateway drops zero-length messages instead of writing them.
    let fx = Fx::new();
    let (_srv, gw) = seqpacket_export(&fx, "gw.toml");
    let out = fx.connect(&gw.url("sp"), &["--mode", "message"], b"a\n\nbc\n");
    out.expect_code(0);
    assert_eq!(out.out(), "1:a\n2:cb\n", "stderr:\n{}", out.stderr);
}

/// A seqpacket target whose listen backlog is full (a burst it has not accepted yet)
/// makes the open wait, not fail: a connect that gets `EAGAIN` is not connected, and the
/// gateway retries it until the target accepts (it used to take the socket for
/// connected, upgrade the session and then fail it with 1011).
#[test]
fn seqpacket_export_waits_out_a_full_listen_backlog() {
    let fx = Fx::new();
    let sock = fx.path("busy.sock");
    let lis = seq_socket();
    rustix::net::bind(&lis, &SocketAddrUnix::new(&sock).expect("addr")).expect("bind");
    // A backlog of 0 holds one connection: with it queued, the queue is full.
    rustix::net::listen(&lis, 0).expect("listen");
    let queued = seq_connect(&sock).expect("queue one connection");
    let text = fx.server_config(&pipe("sp", &format!("seqpacket:{}", sock.display()), ""));
    let gw = fx.serve("gw.toml", &text, &[]);
    // Accepts late: the queued connection, then the gateway's, each served by the
    // transformer (the queued one until it is closed below).
    let acceptor = thread::spawn(move || {
        // Long enough for connect to start and the gateway to try (and retry) its
        // connect while the backlog is full.
        thread::sleep(Duration::from_millis(1500));
        // An accept waits at most this long (SO_RCVTIMEO).
        recv_timeout(&lis, Duration::from_secs(15));
        let mut served = Vec::new();
        for _ in 0..2 {
            let Ok(c) = rustix::net::accept(&lis) else {
                break;
            };
            served.push(thread::spawn(move || transform_conn(c)));
        }
        served
    });
    let out = fx.connect(&gw.url("sp"), &["--mode", "message"], b"abc\n");
    drop(queued);
    let served = acceptor.join().expect("acceptor");
    for t in served {
        t.join().expect("a transformer thread");
    }
    out.expect_code(0);
    assert_eq!(out.out(), "3:cba\n", "stderr:\n{}", out.stderr);
}

// === 2. seqpacket hosted by a forward ===

#[test]
fn seqpacket_hosted_forward_keeps_message_boundaries_end_to_end() {
    let fx = Fx::new();
    let (_srv, a) = seqpacket_export(&fx, "a.toml");
    let hosted = fx.path("hosted/sp.sock");
    let _b = seqpacket_forward(&fx, "b.toml", &hosted, &a);
    let md = std::fs::symlink_metadata(&hosted).expect("hosted socket exists");
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket",
        hosted.display()
    );
    assert_eq!(mode_of(&hosted), 0o660, "default socket_mode");

    let fd = seq_connect(&hosted).expect("connect to the hosted seqpacket socket");
    big_sndbuf(&fd);
    recv_timeout(&fd, Duration::from_secs(30));
    let mut buf = vec![0u8; 8 << 20];
    for &n in &SIZES {
        let msg = random_bytes(n);
        seq_send(&fd, &msg).unwrap_or_else(|e| panic!("send a record of {n} bytes: {e}"));
        let reply = seq_recv(&fd, &mut buf)
            .unwrap_or_else(|e| panic!("no reply to the record of {n} bytes: {e}"))
            .unwrap_or_else(|| panic!("EOF instead of the reply to the record of {n} bytes"));
        same(&format!("reply to {n} bytes"), &reply, &transform(&msg));
    }
    // Several records in flight at once still come back one for one.
    let burst: Vec<Vec<u8>> = (1..=20).map(|i| random_bytes(i * 1000)).collect();
    for m in &burst {
        seq_send(&fd, m).expect("send burst");
    }
    for m in &burst {
        let reply = seq_recv(&fd, &mut buf)
            .expect("burst reply")
            .expect("burst reply, not EOF");
        same("burst reply", &reply, &transform(m));
    }
    // Half-close: the far server sees EOF, closes, and we see EOF.
    rustix::net::shutdown(&fd, rustix::net::Shutdown::Write).expect("shutdown");
    assert_eq!(
        seq_recv(&fd, &mut buf).expect("recv at EOF"),
        None,
        "expected EOF"
    );
}

/// Waits (at most 10 s) until every thread of process `pid` has stopped: `kill` returns
/// once SIGSTOP is queued, and a thread running on another core can still run (accept,
/// read) for a moment.
fn wait_stopped(pid: u32) {
    let stopped = || -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                // The state follows the command name, which ends at the last ')'.
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state == "T" || state == "t")
            })
        })
    };
    assert!(
        eventually(Duration::from_secs(10), stopped),
        "process {pid} did not stop"
    );
}

/// Sends a record, then another a second later, then closes: a pipe that only talks.
fn talker_conn(fd: OwnedFd) {
    let _ = seq_send(&fd, b"first");
    thread::sleep(Duration::from_secs(1));
    let _ = seq_send(&fd, b"second");
}

/// A seqpacket forward's caller that sends records into a session of an `out` pipe
/// keeps it: its records are read and dropped, and the pipe's records go on to its end.
/// (They were sent, and the exporting side ended the session with 1008.)
#[test]
fn seqpacket_forward_caller_that_writes_into_an_out_session_keeps_it() {
    let fx = Fx::new();
    let sock = fx.path("talk.sock");
    let _srv = SeqServer::start(&sock, talker_conn);
    let text = fx.server_config(&pipe(
        "sp",
        &format!("seqpacket:{}", sock.display()),
        "direction = \"out\"",
    ));
    let a = fx.serve("a.toml", &text, &[]);
    let hosted = fx.path("fwd.sock");
    let b = seqpacket_forward(&fx, "b.toml", &hosted, &a);
    // Its first record is there when the forward accepts it (the forward is stopped
    // meanwhile), so it goes with the request, before the direction is known: the
    // exporting side drops it (it ended the session with 1008). Nothing here panics
    // before SIGCONT but `wait_stopped`, and a stopped gateway is killed on drop.
    let pid = rustix::process::Pid::from_raw(b.proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    wait_stopped(b.proc.child.id());
    let caller = seq_connect(&hosted);
    let early = caller.as_ref().ok().map(|c| seq_send(c, b"early"));
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    let caller = caller.expect("connect to the forward");
    early.expect("connected").expect("send");
    recv_timeout(&caller, Duration::from_secs(20));
    let mut buf = vec![0u8; 4096];
    let got = seq_recv(&caller, &mut buf).expect("the first record");
    assert_eq!(
        got.as_deref(),
        Some(&b"first"[..]),
        "forward log:\n{}",
        b.log()
    );
    seq_send(&caller, b"typing at it").expect("send");
    seq_send(&caller, &[b'x'; 3000]).expect("send a bigger one");
    let got = seq_recv(&caller, &mut buf).expect("the second record");
    assert_eq!(
        got.as_deref(),
        Some(&b"second"[..]),
        "forward log:\n{}",
        b.log()
    );
    assert_eq!(seq_recv(&caller, &mut buf).expect("the end"), None);
}

/// A forward's caller that writes into a session of an `out` pipe before it opens (what
/// it wrote goes with the request over HTTP/2, before the direction is known) and after
/// keeps it: the first is dropped by the exporting side, the rest by the forward, and the
/// pipe's output goes on to its end. (The early bytes ended the session with 1008.)
#[test]
fn a_forward_callers_early_bytes_into_an_out_session_are_dropped() {
    let fx = Fx::new();
    let text = fx.server_config(&pipe(
        "news",
        "exec:sh -c 'echo first; sleep 2; echo second'",
        "direction = \"out\"",
    ));
    let a = fx.serve("a.toml", &text, &[]);
    let hosted = fx.path("fwd.sock");
    let b = fx.serve(
        "b.toml",
        &fx.forward_config(&fx.forward(&format!("unix:{}", hosted.display()), &a.url("news"), "")),
        &[],
    );
    // Nothing here panics before SIGCONT but `wait_stopped`, and a stopped gateway is
    // killed on drop.
    let pid = rustix::process::Pid::from_raw(b.proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    wait_stopped(b.proc.child.id());
    let caller = UnixStream::connect(&hosted);
    let early = caller
        .as_ref()
        .ok()
        .map(|mut c| c.write_all(b"typed early\n"));
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    let mut caller = caller.expect("connect to the forward");
    early.expect("connected").expect("write");
    caller
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut first = [0u8; 6];
    caller
        .read_exact(&mut first)
        .unwrap_or_else(|e| panic!("the first line: {e}; forward log:\n{}", b.log()));
    assert_eq!(&first, b"first\n");
    // (Not checked: a test thread held up past the child's end would find it closed.)
    let _ = caller.write_all(b"typed later\n");
    let mut rest = String::new();
    caller.read_to_string(&mut rest).expect("the rest");
    assert_eq!(rest, "second\n", "forward log:\n{}", b.log());
}

/// A seqpacket caller that reads its reply and closes its socket entirely ends its
/// session at once and in order: both sides log 1000 and say which side closed (before,
/// the exporting side shut its target down for writing and waited for its end: "done").
#[test]
fn seqpacket_caller_that_closes_entirely_ends_its_session_in_order() {
    let fx = Fx::new();
    let (_srv, a) = seqpacket_export(&fx, "a.toml");
    let hosted = fx.path("fwd.sock");
    let b = seqpacket_forward(&fx, "b.toml", &hosted, &a);
    let caller = seq_connect(&hosted).expect("connect to the forward");
    recv_timeout(&caller, Duration::from_secs(30));
    seq_send(&caller, b"record").expect("send");
    let mut buf = vec![0u8; 4096];
    let reply = seq_recv(&caller, &mut buf)
        .expect("recv")
        .expect("a reply, not EOF");
    same("the reply", &reply, &transform(b"record"));
    drop(caller);
    let ended = |gw: &Gw, reason: &str| {
        eventually(Duration::from_secs(10), || {
            gw.log()
                .lines()
                .any(|l| l.contains("close_code=1000") && l.contains(reason))
        })
    };
    assert!(
        ended(&a, "the peer's local side closed"),
        "exporting side:\n{}",
        a.log()
    );
    assert!(
        ended(&b, "the local side closed"),
        "dialling side:\n{}",
        b.log()
    );
}

/// An exported seqpacket target that sends its last records and closes with a record of
/// the caller's still unread: Linux fails the gateway's next read with ECONNRESET ahead
/// of those records. They still reach the caller, whole and in order, and only then does
/// the session end with 1011 (the local endpoint failed). Before, they were lost.
#[test]
fn seqpacket_target_closing_with_a_record_unread_still_delivers_its_last_records() {
    let fx = Fx::new();
    let sock = fx.path("rst.sock");
    let l = seq_socket();
    rustix::net::bind(&l, &SocketAddrUnix::new(&sock).expect("addr")).expect("bind");
    rustix::net::listen(&l, 4).expect("listen");
    let (to_test, from_target) = std::sync::mpsc::channel::<bool>();
    let (to_target, from_test) = std::sync::mpsc::channel::<()>();
    let target = thread::spawn(move || {
        let c = rustix::net::accept(&l).expect("accept");
        recv_timeout(&c, Duration::from_secs(30));
        let mut buf = vec![0u8; 4096];
        let first = seq_recv(&c, &mut buf)
            .expect("recv")
            .expect("a first record");
        assert_eq!(first, b"request");
        // Until the caller's second record waits here, unread (bounded).
        let queued = eventually(Duration::from_secs(20), || {
            let mut peek = [0u8; 16];
            rustix::net::recv(&c, &mut peek[..], RecvFlags::PEEK | RecvFlags::DONTWAIT).is_ok()
        });
        let _ = to_test.send(queued);
        if from_test.recv_timeout(Duration::from_secs(30)).is_ok() {
            for r in [&b"last-1"[..], b"last-2", b"last-3"] {
                seq_send(&c, r).expect("send");
            }
        }
        // Closed with the caller's record unread.
    });
    let a = fx.serve(
        "a.toml",
        &fx.server_config(&pipe("sp", &format!("seqpacket:{}", sock.display()), "")),
        &[],
    );
    let hosted = fx.path("fwd.sock");
    let _b = seqpacket_forward(&fx, "b.toml", &hosted, &a);
    let caller = seq_connect(&hosted).expect("connect to the forward");
    seq_send(&caller, b"request").expect("send");
    seq_send(&caller, b"unread").expect("send");
    assert_eq!(
        from_target.recv_timeout(Duration::from_secs(30)),
        Ok(true),
        "the caller's second record never reached the target"
    );
    // The exporting gateway is stopped while the target sends and closes, so its first
    // read after that meets the reset. Nothing here panics before SIGCONT but
    // `wait_stopped`, and a stopped gateway is still killed (SIGKILL) on drop.
    let pid = rustix::process::Pid::from_raw(a.proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    wait_stopped(a.proc.child.id());
    let _ = to_target.send(());
    let done = target.join();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    done.expect("target thread");
    recv_timeout(&caller, Duration::from_secs(30));
    let mut buf = vec![0u8; 4096];
    for want in ["last-1", "last-2", "last-3"] {
        let got = seq_recv(&caller, &mut buf)
            .expect("recv")
            .unwrap_or_else(|| panic!("EOF instead of {want}; exporting side:\n{}", a.log()));
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
    assert_eq!(seq_recv(&caller, &mut buf).expect("recv at the end"), None);
    assert!(
        eventually(Duration::from_secs(10), || a
            .log()
            .contains("close_code=1011")),
        "the exporting side should end with 1011:\n{}",
        a.log()
    );
}

/// A caller's first record, sent before the gateway has even accepted it (the gateway is
/// stopped meanwhile), is taken early and goes with the session's request (HTTP/2) or
/// first on the session (HTTP/1.1); it and the records behind it come back whole and in
/// order, whether the first fits the early read (16 KiB) or not.
#[test]
fn seqpacket_forward_callers_first_records_arrive_whole_and_in_order() {
    let fx = Fx::new();
    let (_srv, a) = seqpacket_export(&fx, "a.toml");
    let h2 = fx.path("h2.sock");
    let h1 = fx.path("h1.sock");
    let b = fx.serve(
        "b.toml",
        &fx.forward_config(&format!(
            "{}{}",
            fx.forward(&format!("seqpacket:{}", h2.display()), &a.url("sp"), ""),
            fx.forward(
                &format!("seqpacket:{}", h1.display()),
                &a.url("sp"),
                "http2 = false\n"
            ),
        )),
        &[("PIPEBRIDGE_LOG", "pipebridge=debug")],
    );
    let mut buf = vec![0u8; 1 << 20];
    for hosted in [&h2, &h1] {
        for first in [1, 100, 16 * 1024, 16 * 1024 + 1, 200_000] {
            let msgs = [random_bytes(first), random_bytes(7), random_bytes(3000)];
            // Connected and all three sent while the gateway is stopped: they wait in the
            // socket when it accepts. Nothing here panics before it runs again but
            // `wait_stopped`, and a stopped gateway is still killed (SIGKILL) on drop.
            let pid = rustix::process::Pid::from_raw(b.proc.child.id() as i32).expect("pid");
            rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
            wait_stopped(b.proc.child.id());
            let fd = seq_connect(hosted);
            let sent: Vec<_> = match &fd {
                Ok(fd) => {
                    big_sndbuf(fd);
                    msgs.iter().map(|m| seq_send(fd, m)).collect()
                }
                Err(_) => Vec::new(),
            };
            rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
            let fd = fd.expect("connect to the hosted seqpacket socket");
            for r in sent {
                r.expect("send");
            }
            recv_timeout(&fd, Duration::from_secs(30));
            for (i, m) in msgs.iter().enumerate() {
                let reply = seq_recv(&fd, &mut buf)
                    .unwrap_or_else(|e| {
                        panic!(
                            "{}: record {i} after a first of {first} bytes: {e}",
                            hosted.display()
                        )
                    })
                    .unwrap_or_else(|| panic!("{}: EOF instead of record {i}", hosted.display()));
                same(
                    &format!(
                        "{}: record {i} after a first of {first} bytes",
                        hosted.display()
                    ),
                    &reply,
                    &transform(m),
                );
            }
            rustix::net::shutdown(&fd, rustix::net::Shutdown::Write).expect("shutdown");
            assert_eq!(
                seq_recv(&fd, &mut buf).expect("recv at EOF"),
                None,
                "expected EOF"
            );
        }
    }
    // The first records that fit (1 B, 100 B, 16 KiB, on each forward) were taken early.
    let log = b.log();
    let mut sizes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("first record taken early"))
        .filter_map(|l| l.split("bytes=").nth(1)?.split_whitespace().next())
        .collect();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        ["1", "1", "100", "100", "16384", "16384"],
        "early records; forward log:\n{log}"
    );
}

#[test]
fn seqpacket_hosted_socket_is_not_stolen_and_is_removed_on_shutdown() {
    let fx = Fx::new();
    let (_srv, a) = seqpacket_export(&fx, "a.toml");
    // A live seqpacket listener on the path is never taken over.
    let live = fx.path("live.sock");
    let _live = SeqServer::transformer(&live);
    let out = fx.serve_fails(
        "live.toml",
        &fx.forward_config(&fx.forward(&format!("seqpacket:{}", live.display()), &a.url("sp"), "")),
    );
    assert!(
        out.stderr.contains("live"),
        "the refusal should say the socket is live:\n{}",
        out.stderr
    );
    assert!(
        seq_connect(&live).is_ok(),
        "the live server must still be reachable"
    );

    // Hosted seqpacket sockets, FIFOs and dotnet sockets are removed on a clean shutdown.
    let hosted = fx.path("hosted.sock");
    let fifo = fx.path("hosted.fifo");
    std::fs::create_dir(fx.path("dn")).expect("mkdir");
    let dotnet = fx.path("dn/CoreFxPipe_gone");
    let fwds = format!(
        "{}{}{}",
        fx.forward(&format!("seqpacket:{}", hosted.display()), &a.url("sp"), ""),
        fx.forward(
            &format!("fifo:{}", fifo.display()),
            &format!("{}?direction=in&mode=message", a.url("sp")),
            ""
        ),
        fx.forward("dotnet:gone", &a.url("sp"), "")
    );
    let mut b = fx.serve(
        "b.toml",
        &fx.forward_config(&fwds),
        &[("TMPDIR", &fx.s("dn"))],
    );
    for p in [&hosted, &fifo, &dotnet] {
        assert!(
            p.exists(),
            "{} was not created; log:\n{}",
            p.display(),
            b.log()
        );
    }
    let pid = rustix::process::Pid::from_raw(b.proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    assert!(
        b.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "the gateway did not exit after SIGTERM; log:\n{}",
        b.log()
    );
    for p in [&hosted, &fifo, &dotnet] {
        assert!(
            eventually(Duration::from_secs(5), || std::fs::symlink_metadata(p)
                .is_err()),
            "{} left behind after a clean shutdown; log:\n{}",
            p.display(),
            b.log()
        );
    }
}

#[test]
fn hosted_fifo_needs_a_direction_and_seqpacket_needs_message_mode() {
    let fx = Fx::new();
    let to = "wss://localhost:9/pipes/x";
    // check-config says it, with file, line and key (it used to print OK, and serve
    // failed only when binding, with exit 1).
    let fifo = format!("fifo:{}", fx.s("f.fifo"));
    for (listen, url, extra, key, says) in [
        (fifo.as_str(), to, "", "forward[0].to", "direction"),
        (
            fifo.as_str(),
            &format!("{to}?direction=in") as &str,
            "allow_local = [\"root\"]\n",
            "forward[0].allow_local",
            "no local caller",
        ),
        (
            &format!("seqpacket:{}", fx.s("s.sock")) as &str,
            &format!("{to}?mode=byte") as &str,
            "",
            "forward[0].to",
            "message",
        ),
        (
            &format!("unix:{}", fx.s("u.sock")) as &str,
            to,
            "socket_owner = \"no-such-user-pb\"\n",
            "forward[0].socket_owner",
            "no such user",
        ),
    ] {
        let cfg = fx.path("check.toml");
        let text = fx.forward_config(&fx.forward(listen, url, extra));
        std::fs::write(&cfg, &text).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("check-config").arg("--config").arg(&cfg);
        scrub(&mut cmd);
        let out = Proc::spawn(cmd, fx.tmp.path(), false).finish(Duration::from_secs(20));
        assert_eq!(out.code, Some(2), "{key}: {}", out.stderr);
        // The line of the key's value.
        let field = key.rsplit('.').next().expect("field");
        let line = 1 + text
            .lines()
            .position(|l| l.starts_with(&format!("{field} =")))
            .expect("the key's line");
        let want = format!("check.toml:{line}: {key}: ");
        assert!(
            out.stderr.contains(&want) && out.stderr.contains(says),
            "{want}... {says}:\n{}",
            out.stderr
        );
    }
    let out = fx.serve_fails(
        "fifo.toml",
        &fx.forward_config(&fx.forward(&format!("fifo:{}", fx.s("f.fifo")), to, "")),
    );
    assert!(
        out.stderr.contains("direction"),
        "should say a direction is needed:\n{}",
        out.stderr
    );
    let out = fx.serve_fails(
        "sp.toml",
        &fx.forward_config(&fx.forward(
            &format!("seqpacket:{}", fx.s("s.sock")),
            &format!("{to}?mode=byte"),
            "",
        )),
    );
    assert!(
        out.stderr.contains("message"),
        "should say message mode is needed:\n{}",
        out.stderr
    );
}

#[test]
fn hosted_parent_directories_are_not_world_writable_even_with_umask_0() {
    let fx = Fx::new();
    let backend = fx.path("echo.sock");
    let _echo = EchoServer::start(&backend);
    let a = fx.serve(
        "a.toml",
        &fx.server_config(&pipe("echo", &format!("unix:{}", backend.display()), "")),
        &[],
    );
    let sock = fx.path("sockdir/sub/s.sock");
    let fifo = fx.path("fifodir/sub/f.fifo");
    let fwds = format!(
        "{}{}",
        fx.forward(&format!("unix:{}", sock.display()), &a.url("echo"), ""),
        fx.forward(
            &format!("fifo:{}", fifo.display()),
            &format!("{}?direction=out", a.url("echo")),
            ""
        )
    );
    let _b = fx.serve_via("b.toml", &fx.forward_config(&fwds), &[], Some("umask 000;"));
    let mut bad = Vec::new();
    for d in ["sockdir", "sockdir/sub", "fifodir", "fifodir/sub"] {
        let m = mode_of(&fx.path(d));
        if m & 0o022 != 0 {
            bad.push(format!("{d}: {m:o}"));
        }
    }
    for f in [&sock, &fifo] {
        assert_eq!(mode_of(f), 0o660, "mode of {}", f.display());
    }
    assert!(
        bad.is_empty(),
        "parent directories created group/world-writable under umask 000: {bad:?}"
    );
}

// === 3. max_message_size ===

#[test]
fn message_over_max_message_size_from_the_network_closes_with_1009() {
    let fx = Fx::new();
    let sock = fx.path("sp.sock");
    let _srv = SeqServer::transformer(&sock);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "small",
            &format!("seqpacket:{}", sock.display()),
            "max_message_size = \"1KiB\"",
        )),
        &[],
    );
    let out = fx.connect(
        &gw.url("small"),
        &["--mode", "message", "--framing", "u32be"],
        &u32be_frame(&random_bytes(2000)),
    );
    out.expect_code(1);
    assert!(
        out.stderr.contains("message_too_big") || out.stderr.contains("1009"),
        "connect should report message_too_big/1009:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "nothing may be delivered: {:?}",
        out.out()
    );
    let mut gw = gw;
    gw.proc
        .wait_until(Duration::from_secs(10), "the limit log line", |p| {
            p.stderr()
                .lines()
                .any(|l| l.contains("1009") && l.contains("limit"))
        });
}

#[test]
fn message_over_max_message_size_from_the_local_endpoint_closes_with_1009() {
    let fx = Fx::new();
    let sock = fx.path("big.sock");
    let _srv = SeqServer::start(&sock, big_reply_conn);
    let mut gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "small",
            &format!("seqpacket:{}", sock.display()),
            "max_message_size = \"1KiB\"",
        )),
        &[],
    );
    let mut c = fx.spawn_connect(
        &gw.url("small"),
        &["--mode", "message", "--framing", "u32be"],
    );
    c.write_stdin(&u32be_frame(b"hello"));
    let out = c.finish(CLIENT_TIMEOUT);
    out.expect_code(1);
    assert!(
        out.stderr.contains("message_too_big"),
        "connect should report message_too_big:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "nothing may be delivered (no truncation): {:?}",
        out.out()
    );
    gw.proc
        .wait_until(Duration::from_secs(10), "the limit log line", |p| {
            p.stderr()
                .lines()
                .any(|l| l.contains("1009") && l.contains("too big"))
        });
}

// === 4. FIFOs ===

#[test]
fn fifo_export_out_streams_writers_and_ends_at_eof() {
    let fx = Fx::new();
    let fifo = fx.path("out.fifo");
    mkfifo(&fifo);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "fout",
            &format!("fifo:{}", fifo.display()),
            "direction = \"out\"",
        )),
        &[],
    );
    let mut c = fx.spawn_connect(&gw.url("fout"), &[]);
    c.close_stdin();
    thread::sleep(Duration::from_millis(500));
    assert!(
        c.running(),
        "connect must wait for a writer; stderr:\n{}",
        c.stderr()
    );
    // A writer started after connect; data streams before the writer closes.
    let go = fx.path("go");
    let _w = fx.sh(&format!(
        "exec 3>{f}; echo one >&3; while [ ! -e {g} ]; do sleep 0.05; done; echo two >&3",
        f = fifo.display(),
        g = go.display()
    ));
    c.wait_until(Duration::from_secs(15), "the first line", |p| {
        p.stdout() == b"one\n"
    });
    assert!(c.running(), "connect must go on while the writer is open");
    std::fs::write(&go, "").expect("touch go");
    let out = c.finish(CLIENT_TIMEOUT);
    out.expect_code(0);
    assert_eq!(out.out(), "one\ntwo\n");
}

#[test]
fn fifo_export_out_with_echo_writer() {
    let fx = Fx::new();
    let fifo = fx.path("out.fifo");
    mkfifo(&fifo);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "fout",
            &format!("fifo:{}", fifo.display()),
            "direction = \"out\"",
        )),
        &[],
    );
    let mut c = fx.spawn_connect(&gw.url("fout"), &[]);
    c.close_stdin();
    thread::sleep(Duration::from_millis(300));
    let _w = fx.sh(&format!("echo hello > {}", fifo.display()));
    let out = c.finish(CLIENT_TIMEOUT);
    out.expect_code(0);
    assert_eq!(out.out(), "hello\n");
}

#[test]
fn fifo_export_in_feeds_a_local_reader_until_eof() {
    let fx = Fx::new();
    let fifo = fx.path("in.fifo");
    mkfifo(&fifo);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "fin",
            &format!("fifo:{}", fifo.display()),
            "direction = \"in\"",
        )),
        &[],
    );
    let dest = fx.path("received");
    let reader = fx.sh(&format!("cat {} > {}", fifo.display(), dest.display()));
    // More than a pipe buffer, so the writer has to wait for the reader.
    let data = random_letters(300_000);
    let out = fx.connect(&gw.url("fin"), &[], &data);
    out.expect_code(0);
    let r = reader.finish(Duration::from_secs(15));
    r.expect_code(0);
    same(
        "FIFO reader's data",
        &std::fs::read(&dest).expect("read dest"),
        &data,
    );
}

#[test]
fn fifo_export_in_reader_going_away_ends_the_session_with_endpoint_failed() {
    let fx = Fx::new();
    let fifo = fx.path("in.fifo");
    mkfifo(&fifo);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe(
            "fin",
            &format!("fifo:{}", fifo.display()),
            "direction = \"in\"",
        )),
        &[],
    );
    let dest = fx.path("got");
    let reader = fx.sh(&format!(
        "head -c 10 {} > {}",
        fifo.display(),
        dest.display()
    ));
    let data = random_letters(4 << 20);
    let out = fx.connect(&gw.url("fin"), &[], &data);
    out.expect_code(1);
    assert!(
        out.stderr.contains("endpoint_failed"),
        "the client should learn the endpoint failed (1011):\n{}",
        out.stderr
    );
    reader.finish(Duration::from_secs(10)).expect_code(0);
    same(
        "what the reader took",
        &std::fs::read(&dest).expect("read"),
        &data[..10],
    );
}

#[test]
fn fifo_export_in_without_reader_is_refused_502_within_the_handshake_timeout() {
    let fx = Fx::new();
    let fifo = fx.path("in.fifo");
    mkfifo(&fifo);
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&format!(
            "[limits]\nhandshake_timeout = \"4s\"\n\n{}",
            pipe(
                "fin",
                &format!("fifo:{}", fifo.display()),
                "direction = \"in\""
            )
        )),
        &[],
    );
    let out = fx.connect(&gw.url("fin"), &[], b"data");
    out.expect_code(1);
    assert!(
        out.stderr.contains("refused: 502 endpoint_unavailable")
            && out.stderr.contains("no reader"),
        "want a 502 endpoint_unavailable refusal naming no reader:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(6),
        "took {:?} (handshake timeout 4s)",
        out.elapsed
    );
}

#[test]
fn fifo_hosted_out_feeds_local_readers_from_exec_and_fifo_exports() {
    let fx = Fx::new();
    let exported = fx.path("exported.fifo");
    mkfifo(&exported);
    let body = format!(
        "{}{}",
        pipe(
            "hi-out",
            "exec:printf hosted-fifo-data",
            "direction = \"out\""
        ),
        pipe(
            "fout",
            &format!("fifo:{}", exported.display()),
            "direction = \"out\""
        )
    );
    let a = fx.serve("a.toml", &fx.server_config(&body), &[]);
    let hosted1 = fx.path("h/one.fifo");
    let hosted2 = fx.path("h/two.fifo");
    let fwds = format!(
        "{}{}",
        fx.forward(
            &format!("fifo:{}", hosted1.display()),
            &format!("{}?direction=out", a.url("hi-out")),
            ""
        ),
        fx.forward(
            &format!("fifo:{}", hosted2.display()),
            &format!("{}?direction=out", a.url("fout")),
            ""
        )
    );
    let _b = fx.serve("b.toml", &fx.forward_config(&fwds), &[]);
    for h in [&hosted1, &hosted2] {
        let md = std::fs::symlink_metadata(h).expect("hosted FIFO exists");
        assert!(md.file_type().is_fifo(), "{} is not a FIFO", h.display());
        assert_eq!(mode_of(h), 0o660, "default mode of {}", h.display());
    }
    // exec out → hosted FIFO: each local reader gets the data once, then EOF, like a
    // reader of a local FIFO whose writer wrote and closed. The last reader is slow (it
    // opens the FIFO, then reads a second later): after a session the forward must not
    // reopen the FIFO under a reader that has not seen EOF yet.
    let mut failures = Vec::new();
    let slow = format!("exec 3<{}; sleep 1; cat <&3", hosted1.display());
    for (i, script) in [
        format!("cat {}", hosted1.display()),
        slow.clone(),
        format!("cat {}", hosted1.display()),
        slow,
    ]
    .iter()
    .enumerate()
    {
        match fx.sh(script).finish_within(Duration::from_secs(8)) {
            Ok(out) if out.code == Some(0) && out.out() == "hosted-fifo-data" => {}
            Ok(out) => failures.push(format!(
                "reader {i} ({script}): exit {:?}, got {} bytes ({} copies of the data)",
                out.code,
                out.stdout.len(),
                out.out().matches("hosted-fifo-data").count()
            )),
            Err(out) => failures.push(format!(
                "reader {i} ({script}): no EOF within 8s; got {} bytes ({} copies of the data)",
                out.stdout.len(),
                out.out().matches("hosted-fifo-data").count()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "a local reader of the hosted FIFO must get the remote data once, then EOF:\n{}",
        failures.join("\n")
    );
    // exported FIFO out → hosted FIFO: a local writer on host A reaches `cat` on host B.
    let mut cmd = Command::new("cat");
    cmd.arg(&hosted2);
    let reader = Proc::spawn(cmd, fx.tmp.path(), false);
    let writer = fx.sh(&format!("echo fifo-chain > {}", exported.display()));
    let out = reader.finish(Duration::from_secs(20));
    out.expect_code(0);
    assert_eq!(out.out(), "fifo-chain\n");
    writer.finish(Duration::from_secs(10)).expect_code(0);
}

/// The pipe "sink": an `in` exec pipe whose child writes what it gets to `dest`.
fn sink_pipe(dest: &Path) -> String {
    pipe(
        "sink",
        "exec",
        &format!(
            "argv = [\"sh\", \"-c\", {}]\ndirection = \"in\"",
            q(&format!("cat > {}", dest.display()))
        ),
    )
}

/// A gateway (config "b.toml") hosting an `in` FIFO forward at `hosted` to `a`'s "sink".
fn fifo_in_forward(fx: &Fx, hosted: &Path, a: &Gw) -> Gw {
    fx.serve(
        "b.toml",
        &fx.forward_config(&fx.forward(
            &format!("fifo:{}", hosted.display()),
            &format!("{}?direction=in", a.url("sink")),
            "",
        )),
        &[],
    )
}

#[test]
fn fifo_hosted_in_feeds_a_remote_exec_in_pipe() {
    let fx = Fx::new();
    let dest = fx.path("landed");
    let a = fx.serve("a.toml", &fx.server_config(&sink_pipe(&dest)), &[]);
    let hosted = fx.path("hosted-in.fifo");
    let _b = fifo_in_forward(&fx, &hosted, &a);
    fx.sh(&format!(
        "printf 'local writer data' > {}",
        hosted.display()
    ))
    .finish(Duration::from_secs(15))
    .expect_code(0);
    assert!(
        eventually(Duration::from_secs(15), || std::fs::read(&dest)
            .ok()
            .as_deref()
            == Some(b"local writer data".as_slice())),
        "the remote file holds {:?}",
        std::fs::read_to_string(&dest).ok()
    );
}

/// While the far gateway refuses a hosted `in` FIFO's sessions (its pipe is not there
/// yet), what a writer has written stays in the FIFO, round after failed round (paced,
/// not in a tight loop); once a reload adds the pipe, all of it arrives, in order, with
/// what the writer writes after.
#[test]
fn fifo_hosted_in_keeps_a_writers_data_while_its_sessions_are_refused() {
    let fx = Fx::new();
    let dest = fx.path("landed");
    let sink = sink_pipe(&dest);
    let other = pipe("other", "exec", "argv = [\"true\"]");
    let mut a = fx.serve("a.toml", &fx.server_config(&other), &[]);
    let hosted = fx.path("hosted-in.fifo");
    let b = fifo_in_forward(&fx, &hosted, &a);
    // Opening for writing waits for the forward's reader; from then on the FIFO keeps
    // a reader, through refused rounds and the pauses between them.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&hosted)
        .expect("open the hosted FIFO for writing");
    let first = random_letters(40_000);
    w.write_all(&first).expect("write the first part");
    assert!(
        eventually(Duration::from_secs(15), || b
            .log()
            .matches("could not open the remote session")
            .count()
            >= 2),
        "the forward's sessions are refused:\n{}",
        b.log()
    );
    let refused = b.log().matches("could not open the remote session").count();
    // Writes during the refusals and the pauses after them neither fail nor get lost.
    let mut first = first;
    for _ in 0..6 {
        let more = random_letters(1000);
        w.write_all(&more)
            .expect("a write while the sessions are refused");
        first.extend_from_slice(&more);
        std::thread::sleep(Duration::from_millis(250));
    }
    let later = b.log().matches("could not open the remote session").count();
    assert!(
        later - refused <= 3,
        "failed rounds are paced: {} in 1.5 s or more",
        later - refused
    );
    // The pipe appears (a reload); the next round delivers everything.
    std::fs::write(
        fx.path("a.toml"),
        fx.server_config(&format!("{other}{sink}")),
    )
    .expect("rewrite a.toml");
    let pid = rustix::process::Pid::from_raw(a.proc.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    a.proc
        .wait_until(Duration::from_secs(15), "the reload", |p| {
            p.stderr().contains("reloaded the config")
        });
    // Written once the first part has landed (a session is reading it then).
    assert!(
        eventually(Duration::from_secs(20), || std::fs::read(&dest)
            .ok()
            .is_some_and(|d| d == first)),
        "the first part arrives whole after the reload ({} bytes there); forward log:\n{}",
        std::fs::read(&dest).map(|d| d.len()).unwrap_or(0),
        b.log()
    );
    let second = random_letters(5_000);
    w.write_all(&second).expect("write the second part");
    drop(w);
    let want: Vec<u8> = [first.as_slice(), second.as_slice()].concat();
    assert!(
        eventually(Duration::from_secs(20), || std::fs::read(&dest)
            .ok()
            .is_some_and(|d| d == want)),
        "the remote file holds {} bytes, not the {} written in order; forward log:\n{}",
        std::fs::read(&dest).map(|d| d.len()).unwrap_or(0),
        want.len(),
        b.log()
    );
}

// === 5. exec one-way ===

#[test]
fn exec_in_writes_the_childs_stdin_and_exit_status_reaches_connect() {
    let fx = Fx::new();
    let dest = fx.path("outfile");
    let dest7 = fx.path("outfile7");
    let body = format!(
        "{}{}",
        pipe(
            "ein",
            "exec",
            &format!(
                "argv = [\"sh\", \"-c\", {}]\ndirection = \"in\"",
                q(&format!("cat > {}", dest.display()))
            )
        ),
        pipe(
            "ein7",
            "exec",
            &format!(
                "argv = [\"sh\", \"-c\", {}]\ndirection = \"in\"",
                q(&format!("cat > {}; exit 7", dest7.display()))
            )
        )
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let data = random_letters(200_000);
    let out = fx.connect(&gw.url("ein"), &[], &data);
    out.expect_code(0);
    assert!(
        out.stdout.is_empty(),
        "an in pipe sends nothing back: {:?}",
        out.out()
    );
    same(
        "exec in: file",
        &std::fs::read(&dest).expect("read outfile"),
        &data,
    );

    let out = fx.connect(&gw.url("ein7"), &[], b"seven");
    out.expect_code(7);
    assert_eq!(std::fs::read(&dest7).expect("read outfile7"), b"seven");
}

#[test]
fn exec_out_reads_the_childs_stdout_with_identity_and_signals() {
    let fx = Fx::new();
    let body = format!(
        "{}{}{}",
        pipe("eout", "exec:echo hi", "direction = \"out\""),
        pipe(
            "eout-env",
            "exec:sh -c 'echo \"$PIPEBRIDGE_IDENTITY $PIPEBRIDGE_PIPE\"'",
            "direction = \"out\""
        ),
        pipe(
            "eout-kill",
            "exec:sh -c 'echo child-stderr-line >&2; echo bye; kill -9 $$'",
            "direction = \"out\""
        )
    );
    let mut gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let out = fx.connect(&gw.url("eout"), &[], b"");
    out.expect_code(0);
    assert_eq!(out.out(), "hi\n");
    let out = fx.connect(&gw.url("eout-env"), &[], b"");
    out.expect_code(0);
    assert_eq!(out.out(), "alice eout-env\n");
    let out = fx.connect(&gw.url("eout-kill"), &[], b"");
    out.expect_code(128 + 9);
    assert_eq!(out.out(), "bye\n");
    assert!(
        !out.stderr.contains("child-stderr-line"),
        "the child's stderr is not sent to the client"
    );
    // The child's stderr goes to the gateway log, inside the session span.
    gw.proc.wait_until(
        Duration::from_secs(10),
        "the child's stderr in the log",
        |p| {
            p.stderr()
                .lines()
                .any(|l| l.contains("child-stderr-line") && l.contains("eout-kill"))
        },
    );
}

/// A child's stderr is read to its end whatever it writes: a line that is not UTF-8 is
/// logged (with replacement characters), and the child's next warning neither fails nor
/// kills it (the gateway had stopped reading, and the child died of SIGPIPE).
#[test]
fn exec_childs_stderr_that_is_not_utf8_is_logged_and_read_on() {
    let fx = Fx::new();
    let body = pipe(
        "warns",
        r#"exec:sh -c 'printf "bad \\377 byte\\n" >&2; sleep 0.3; echo later-warning >&2; echo out'"#,
        "direction = \"out\"",
    );
    let mut gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let out = fx.connect(&gw.url("warns"), &[], b"");
    out.expect_code(0);
    assert_eq!(out.out(), "out\n");
    gw.proc.wait_until(
        Duration::from_secs(10),
        "both stderr lines in the log",
        |p| {
            let log = p.stderr();
            log.contains("bad \u{fffd} byte") && log.contains("later-warning")
        },
    );
}

#[test]
fn exec_child_that_stops_reading_still_delivers_its_output_and_exit_status() {
    // Like `yes | head -c 5` in a shell: a child that stops reading its stdin is not a
    // failed endpoint; what it writes and its exit status must still reach the client.
    let fx = Fx::new();
    let body = format!(
        "{}{}{}",
        pipe(
            "closes-stdin",
            "exec:sh -c 'exec 0<&-; echo out; sleep 0.3; exit 4'",
            ""
        ),
        pipe("head", "exec:head -c 5", ""),
        pipe("early", "exec:sh -c 'exit 3'", "direction = \"in\"")
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let data = random_letters(4 << 20);
    let mut failures = Vec::new();
    // Deterministic: the child closes its stdin at once and exits later.
    let out = fx.connect(&gw.url("closes-stdin"), &[], &data);
    if out.code != Some(4) || out.out() != "out\n" {
        failures.push(format!(
            "closes-stdin: exit {:?} (want 4), stdout {:?} (want \"out\\n\"), stderr {:?}",
            out.code,
            out.out(),
            out.stderr.trim()
        ));
    }
    // Racy (child exit vs. the gateway's next write to its stdin): try a few times.
    for i in 0..6 {
        let out = fx.connect(&gw.url("head"), &[], &data);
        if out.code != Some(0) || out.stdout != data[..5] {
            failures.push(format!(
                "run {i}, head -c 5: exit {:?}, stdout {:?}, stderr {:?}",
                out.code,
                out.out(),
                out.stderr.trim()
            ));
        }
        let out = fx.connect(&gw.url("early"), &[], &data);
        if out.code != Some(3) {
            failures.push(format!(
                "run {i}, exit 3 (in): exit {:?}, stderr {:?}",
                out.code,
                out.stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "sessions lost the child's output or exit status:\n{}",
        failures.join("\n")
    );
}

#[test]
fn exec_directions_refused_with_409() {
    let fx = Fx::new();
    let dest = fx.path("never");
    let body = format!(
        "{}{}",
        pipe("eout", "exec:echo hi", "direction = \"out\""),
        pipe(
            "ein",
            "exec",
            &format!(
                "argv = [\"sh\", \"-c\", {}]\ndirection = \"in\"",
                q(&format!("cat > {}", dest.display()))
            )
        )
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    for (url, extra) in [
        (gw.url("eout"), vec!["--direction", "in"]),
        (gw.url("eout"), vec!["--direction", "duplex"]),
        (format!("{}?direction=in", gw.url("eout")), vec![]),
        (gw.url("ein"), vec!["--direction", "out"]),
    ] {
        let out = fx.connect(&url, &extra, b"x");
        out.expect_code(1);
        assert!(
            out.stderr.contains("refused: 409 unsupported"),
            "{url} {extra:?}: want a 409 unsupported refusal:\n{}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "no byte may flow: {:?}", out.out());
    }
    assert!(!dest.exists(), "a refused session must not start the child");
}

#[test]
fn modes_the_pipe_does_not_offer_are_refused_with_409() {
    let fx = Fx::new();
    let sock = fx.path("sp.sock");
    let _srv = SeqServer::transformer(&sock);
    let body = format!(
        "{}{}",
        pipe("sp", &format!("seqpacket:{}", sock.display()), ""),
        pipe("bytes", "exec:cat", "")
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    for (pipe, mode) in [("sp", "byte"), ("bytes", "message")] {
        let out = fx.connect(&gw.url(pipe), &["--mode", mode], b"x\n");
        out.expect_code(1);
        assert!(
            out.stderr.contains("refused: 409 unsupported"),
            "{pipe} --mode {mode}: want a 409 unsupported refusal:\n{}",
            out.stderr
        );
    }
}

#[test]
fn exec_per_request_direction_on_a_duplex_pipe() {
    let fx = Fx::new();
    let body = pipe("cat", "exec:sh -c 'echo start; cat'", "");
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    // Duplex: both ways.
    let out = fx.connect(&gw.url("cat"), &[], b"abc");
    out.expect_code(0);
    assert_eq!(out.out(), "start\nabc");
    // out only: the child's stdin is empty, our stdin is not sent.
    let out = fx.connect(&gw.url("cat"), &["--direction", "out"], b"ignored");
    out.expect_code(0);
    assert_eq!(out.out(), "start\n");
    // in only: nothing comes back.
    let out = fx.connect(&gw.url("cat"), &["--direction", "in"], b"abc");
    out.expect_code(0);
    assert_eq!(out.out(), "");
}

/// Opens a session with the library's client and returns it (a raw WebSocket we drive).
async fn raw_session(fx: &Fx, url: &str) -> pipebridge::client::Session {
    let uri = pipebridge::client::parse_pipe_url(url).expect("url");
    let creds = pipebridge::client::CredentialPaths {
        ca: Some(fx.s("pki/ca.pem")),
        cert: Some(fx.s("pki/alice.pem")),
        key: Some(fx.s("pki/alice.key")),
        ..Default::default()
    };
    let d = pipebridge::client::Dialer::new(&uri, &creds).expect("dialer");
    d.open(&pipebridge::client::path_and_query(&uri), 1 << 20)
        .await
        .expect("open the session")
}

/// Sends one binary message and returns (the text messages, the close code) that follow.
async fn send_data_expect_close(mut s: pipebridge::client::Session) -> (Vec<String>, Option<u16>) {
    use tokio_tungstenite::tungstenite::Message;
    s.ws.send(Message::Binary(bytes::Bytes::from_static(b"forbidden")))
        .await
        .expect("send");
    let mut texts = Vec::new();
    let code = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(m) = s.ws.next().await {
            match m {
                Ok(Message::Text(t)) => texts.push(t.as_str().to_string()),
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(e) => panic!("session failed before a Close frame: {e}; texts {texts:?}"),
            }
        }
        None
    })
    .await
    .expect("no Close within 15s");
    (texts, code)
}

/// When the gateway ends an `exec:` session (here: data on an `out` session, 1008), the
/// processes the child started go with it (its process group), not only the child: a
/// script's background job does not run on as the session's account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_exec_session_kills_the_childs_process_group() {
    let fx = Fx::new();
    let pidfile = fx.path("bg.pid");
    let body = pipe(
        "bg",
        &format!(
            "exec:sh -c 'sleep 60 & echo $! > {}; exec sleep 30'",
            pidfile.display()
        ),
        "direction = \"out\"",
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let s = raw_session(&fx, &gw.url("bg")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        if let Ok(pid) = text.trim().parse::<u32>() {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never started its job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(running(pid), "the background job runs");
    let _job = KillIfRunning(pid);
    let (_, code) = send_data_expect_close(s).await;
    assert_eq!(code, Some(1008));
    expect_gone(pid, &gw);
}

/// Whether `pid` runs (or sleeps): not a zombie, not gone.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            let state = st.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Kills a process a test's child started, by its pid, if it still runs when dropped
/// (once gone, its pid may be someone else's).
struct KillIfRunning(u32);

impl Drop for KillIfRunning {
    fn drop(&mut self) {
        if running(self.0) {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Waits (10 s at most) until an exec child's background job `pid` has ended.
fn expect_gone(pid: u32, gw: &Gw) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the child's background job {pid} outlived its session:\n{}",
            gw.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The jobs an exec child left behind when it exited on its own (its session ending
/// as it should) are killed with its process group before it is reaped: they do not run
/// on as the principal. (A job that keeps the child's stdout holds the session open
/// until it ends, as with `ssh host 'job &'`; this one writes elsewhere.)
#[test]
fn the_jobs_an_exec_child_leaves_when_it_exits_are_killed() {
    let fx = Fx::new();
    let pidfile = fx.path("bg.pid");
    let body = pipe(
        "bg",
        &format!(
            "exec:sh -c 'sleep 60 >/dev/null 2>&1 & echo $! > {}; exec cat'",
            pidfile.display()
        ),
        "",
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    let out = fx.connect(&gw.url("bg"), &[], b"hello\n");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the child wrote its job's pid")
        .trim()
        .parse()
        .expect("a pid");
    let _job = KillIfRunning(pid);
    out.expect_code(0);
    assert_eq!(out.out(), "hello\n");
    expect_gone(pid, &gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_an_out_session_closes_with_1008() {
    let fx = Fx::new();
    let body = format!(
        "{}{}",
        pipe("quiet", "exec:sleep 20", "direction = \"out\""),
        pipe("duplex", "exec:sleep 20", "")
    );
    let gw = fx.serve("gw.toml", &fx.server_config(&body), &[]);
    for url in [
        gw.url("quiet"),
        format!("{}?direction=out", gw.url("duplex")),
    ] {
        let s = raw_session(&fx, &url).await;
        assert_eq!(
            s.direction,
            Some(pipebridge::config::Direction::Out),
            "{url}"
        );
        let (texts, code) = send_data_expect_close(s).await;
        assert_eq!(code, Some(1008), "{url}: close code; texts {texts:?}");
        assert!(
            texts
                .iter()
                .any(|t| t.contains("\"error\"") && t.contains("forbidden_direction")),
            "{url}: want an error control message forbidden_direction before the close: {texts:?}"
        );
    }
}

// === 6. max_instances ===

#[test]
fn max_instances_busy_and_wait() {
    let fx = Fx::new();
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe("single", "exec:cat", "max_instances = 1")),
        &[],
    );
    let url = gw.url("single");
    // Hold the only instance (a session is live once its echo comes back).
    let mut holder = fx.spawn_connect(&url, &[]);
    holder.write_stdin(b"a\n");
    holder.wait_until(Duration::from_secs(15), "the holder's echo", |p| {
        p.stdout() == b"a\n"
    });

    let out = fx.connect(&url, &[], b"b");
    out.expect_code(1);
    assert!(
        out.stderr.contains("503") && out.stderr.contains("busy"),
        "want 503 busy:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(5),
        "without --wait a busy pipe fails at once"
    );

    // --wait gives up at its deadline while the pipe stays busy.
    let out = fx.connect(&url, &["--wait", "1s"], b"d");
    out.expect_code(1);
    assert!(
        out.stderr.contains("busy"),
        "want busy after --wait:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_secs(8),
        "--wait 1s took {:?}",
        out.elapsed
    );

    // --wait succeeds once the holder ends.
    let mut waiter = fx.spawn_connect(&url, &["--wait", "10s"]);
    waiter.feed(b"c-data".to_vec());
    thread::sleep(Duration::from_secs(1));
    assert!(
        waiter.running(),
        "the waiter must wait; stderr:\n{}",
        waiter.stderr()
    );
    holder.close_stdin();
    let h = holder.finish(CLIENT_TIMEOUT);
    h.expect_code(0);
    assert_eq!(h.out(), "a\n");
    let w = waiter.finish(CLIENT_TIMEOUT);
    w.expect_code(0);
    assert_eq!(w.out(), "c-data");
    assert!(w.elapsed >= Duration::from_secs(1));
}

// === 7. dotnet ===

#[test]
fn dotnet_hosted_socket_reaches_an_exported_unix_pipe_with_socket_modes() {
    let fx = Fx::new();
    let backend = fx.path("echo.sock");
    let _echo = EchoServer::start(&backend);
    let a = fx.serve(
        "a.toml",
        &fx.server_config(&pipe("echo", &format!("unix:{}", backend.display()), "")),
        &[],
    );
    let tmpdir = fx.path("dn");
    std::fs::create_dir(&tmpdir).expect("mkdir");
    let fwds = format!(
        "{}{}",
        fx.forward("dotnet:svc", &a.url("echo"), ""),
        fx.forward("dotnet:svc600", &a.url("echo"), "socket_mode = \"0600\"")
    );
    let _b = fx.serve(
        "b.toml",
        &fx.forward_config(&fwds),
        &[("TMPDIR", &fx.s("dn"))],
    );
    let sock = tmpdir.join("CoreFxPipe_svc");
    let sock600 = tmpdir.join("CoreFxPipe_svc600");
    for (p, mode) in [(&sock, 0o660), (&sock600, 0o600)] {
        let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            md.file_type().is_socket(),
            "{} is not a socket",
            p.display()
        );
        assert_eq!(mode_of(p), mode, "mode of {}", p.display());
    }
    let data = random_bytes(100_000);
    same("echo via dotnet:svc", &unix_request(&sock, &data), &data);
    same(
        "echo via dotnet:svc600",
        &unix_request(&sock600, b"six"),
        b"six",
    );
}

#[test]
fn dotnet_export_connects_to_corefxpipe_in_tmpdir() {
    let fx = Fx::new();
    let tmpdir = fx.path("dn");
    std::fs::create_dir(&tmpdir).expect("mkdir");
    let _echo = EchoServer::start(&tmpdir.join("CoreFxPipe_backend"));
    let gw = fx.serve(
        "gw.toml",
        &fx.server_config(&pipe("dn", "dotnet:backend", "")),
        &[("TMPDIR", &fx.s("dn"))],
    );
    let out = fx.connect(&gw.url("dn"), &[], b"through dotnet");
    out.expect_code(0);
    assert_eq!(out.out(), "through dotnet");
}

// === 8. socket_owner / socket_group ===

#[test]
fn hosted_socket_owner_and_group() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: socket_owner/socket_group need root (CAP_CHOWN) and the tests are not running as root");
        return;
    }
    let fx = Fx::new();
    let backend = fx.path("echo.sock");
    let _echo = EchoServer::start(&backend);
    let a = fx.serve(
        "a.toml",
        &fx.server_config(&pipe("echo", &format!("unix:{}", backend.display()), "")),
        &[],
    );
    let by_name = fx.path("by-name.sock");
    let by_id = fx.path("by-id.sock");
    let fifo = fx.path("owned.fifo");
    let group = if nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .is_some()
    {
        "nogroup"
    } else {
        "65534"
    };
    let fwds = format!(
        "{}{}{}",
        fx.forward(
            &format!("unix:{}", by_name.display()),
            &a.url("echo"),
            &format!("socket_owner = \"nobody\"\nsocket_group = \"{group}\"")
        ),
        fx.forward(
            &format!("unix:{}", by_id.display()),
            &a.url("echo"),
            "socket_owner = \"65534\"\nsocket_group = \"65534\"\nsocket_mode = \"0600\""
        ),
        fx.forward(
            &format!("fifo:{}", fifo.display()),
            &format!("{}?direction=out", a.url("echo")),
            "socket_owner = \"nobody\""
        )
    );
    let _b = fx.serve("b.toml", &fx.forward_config(&fwds), &[]);
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
        .unwrap_or(65534);
    for (p, uid, gid, mode) in [
        (&by_name, nobody, Some(65534), 0o660),
        (&by_id, 65534, Some(65534), 0o600),
        (&fifo, nobody, None, 0o660),
    ] {
        let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(md.uid(), uid, "owner of {}", p.display());
        if let Some(g) = gid {
            assert_eq!(md.gid(), g, "group of {}", p.display());
        }
        assert_eq!(mode_of(p), mode, "mode of {}", p.display());
    }
    // Root can still use it; the data goes through.
    same(
        "echo via the owned socket",
        &unix_request(&by_name, b"owned"),
        b"owned",
    );
}
