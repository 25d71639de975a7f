//! Shared helpers of the integration tests: a per-test PKI and temp dir, the real
//! `pipebridge` binary run as a gateway or as a client (always killed and reaped at
//! the end), small Unix-socket servers, and a raw HTTP/1.1-over-TLS client that sends
//! bytes exactly as given.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pipebridge::pki::{self, CertsInit};
use sha2::{Digest, Sha256};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pipebridge");

/// How long a gateway may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one short client run may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables that would change a client's or gateway's behaviour if the
/// developer running the tests happens to have them set.
const SCRUBBED_ENV: &[&str] = &[
    "PIPEBRIDGE_TOKEN",
    "PIPEBRIDGE_LOG",
    "PIPEBRIDGE_LOG_FORMAT",
    "PIPEBRIDGE_CONFIG",
    "PIPEBRIDGE_SHARDS",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "RUST_LOG",
];

/// A temp dir holding a freshly made PKI (CA, server cert for localhost, clients
/// alice, bob and carol); the working directory of every process a test starts.
pub struct Fixture {
    /// The temp dir (removed on drop).
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    /// A new temp dir with a PKI under `pki/`.
    pub fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("pbt")
            .tempdir()
            .expect("tempdir");
        pki::init(&CertsInit {
            dir: tmp.path().join("pki"),
            server_names: vec!["localhost".into()],
            clients: vec!["alice".into(), "bob".into(), "carol".into()],
            force: false,
        })
        .expect("pki init");
        Fixture { tmp }
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A path inside the temp dir, as a string.
    pub fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// The CA certificate.
    pub fn ca(&self) -> String {
        self.p("pki/ca.pem")
    }

    /// A client's certificate.
    pub fn cert(&self, client: &str) -> String {
        self.p(&format!("pki/{client}.pem"))
    }

    /// A client's key.
    pub fn key(&self, client: &str) -> String {
        self.p(&format!("pki/{client}.key"))
    }

    /// `--ca CA --cert C --key K` for `client`.
    pub fn cert_args(&self, client: &str) -> Vec<String> {
        vec![
            "--ca".into(),
            self.ca(),
            "--cert".into(),
            self.cert(client),
            "--key".into(),
            self.key(client),
        ]
    }

    /// The `[tls]` section of a gateway using this PKI.
    pub fn tls_section(&self) -> String {
        format!(
            "[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n",
            q(&self.p("pki/server.pem")),
            q(&self.p("pki/server.key")),
            q(&self.ca())
        )
    }

    /// A gateway config: `[server]` on port 0, `[tls]`, identities alice (group ops) and
    /// bob (no groups), then `extra` (more identities, pipes, limits).
    pub fn server_config(&self, extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{}\n\
             [[identity]]\nname = \"alice\"\ncert_cn = \"alice\"\ngroups = [\"ops\"]\n\n\
             [[identity]]\nname = \"bob\"\ncert_cn = \"bob\"\n\n{extra}",
            self.tls_section()
        )
    }

    /// Writes `text` to `name` in the temp dir and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    /// Starts `pipebridge serve` with config `text` (written to `name`).
    pub fn serve(&self, name: &str, text: &str) -> Gateway {
        self.serve_env(name, text, &[])
    }

    /// Like [`Fixture::serve`], with extra environment variables for the gateway.
    pub fn serve_env(&self, name: &str, text: &str, env: &[(&str, &str)]) -> Gateway {
        self.serve_via(name, text, &[], env)
    }

    /// Like [`Fixture::serve_env`], started by way of `via`: a program and its arguments
    /// that end by running the rest of the command line in their own process, as
    /// `unshare` and `sh -c '... exec "$@"'` do (so the process is still the gateway's).
    pub fn serve_via(&self, name: &str, text: &str, via: &[&str], env: &[(&str, &str)]) -> Gateway {
        self.serve_via_bin(name, text, via, Path::new(BIN), env)
    }

    /// [`Fixture::serve_via`] with the gateway binary at `bin`.
    pub fn serve_via_bin(
        &self,
        name: &str,
        text: &str,
        via: &[&str],
        bin: &Path,
        env: &[(&str, &str)],
    ) -> Gateway {
        let cfg = self.write(name, text);
        let mut cmd = match via.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("serve").arg("--config").arg(&cfg);
        scrub(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(cmd, self.dir(), false);
        let mut gw = Gateway { proc, port: 0 };
        if text.contains("[server]") {
            let line = gw
                .proc
                .wait_for_line("pipebridge: listening on ", START_TIMEOUT);
            let addr = line.trim_start_matches("pipebridge: listening on ").trim();
            gw.port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("cannot parse the listening line {line:?}"));
        }
        let forwards = text.matches("[[forward]]").count();
        if forwards > 0 {
            gw.proc.wait_until(START_TIMEOUT, |log| {
                log.matches("pipebridge: forwarding ").count() >= forwards
            });
        }
        gw
    }

    /// Runs the binary with `args` in the temp dir, feeding `stdin`, bounded by
    /// [`CLIENT_TIMEOUT`].
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_env(args, &[], stdin, CLIENT_TIMEOUT)
    }

    /// Runs the binary with `args` and extra `env` in the temp dir, feeding `stdin`.
    pub fn run_env(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: &[u8],
        timeout: Duration,
    ) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        scrub(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_command(cmd, self.dir(), stdin, timeout)
    }

    /// `pipebridge connect URL` with `client`'s certificate, feeding `stdin`.
    pub fn connect(&self, url: &str, client: &str, stdin: &[u8]) -> Output {
        let mut args = vec!["connect".to_string(), url.to_string()];
        args.extend(self.cert_args(client));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&a, stdin)
    }

    /// Starts `pipebridge forward --listen unix:SOCK --to URL` with `client`'s
    /// certificate; does not wait for it to be ready.
    pub fn spawn_forward(&self, sock: &Path, url: &str, client: &str) -> Proc {
        self.spawn_forward_with(sock, url, &self.cert_args(client), &[])
    }

    /// [`Fixture::spawn_forward`] with credential flags `creds` and extra `env`.
    pub fn spawn_forward_with(
        &self,
        sock: &Path,
        url: &str,
        creds: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.arg("forward")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--to")
            .arg(url)
            .args(creds);
        scrub(&mut cmd);
        cmd.envs(env.iter().copied());
        Proc::spawn(cmd, self.dir(), false)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// A TOML basic string holding `s`.
pub fn q(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

/// Removes environment variables that would change the behaviour under test.
pub fn scrub(cmd: &mut Command) {
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
}

/// A child process whose stderr is drained into a buffer by a background thread; killed
/// (SIGKILL) and reaped on drop unless it already exited.
pub struct Proc {
    /// The child.
    pub child: Child,
    log: Arc<Mutex<String>>,
    drain: Option<thread::JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` in `cwd` with stderr drained; stdin is piped when `piped_stdin`,
    /// else null; stdout is null.
    pub fn spawn(mut cmd: Command, cwd: &Path, piped_stdin: bool) -> Proc {
        cmd.current_dir(cwd)
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pipebridge");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        let drain = thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => log2
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&line)),
                }
            }
        });
        Proc {
            child,
            log,
            drain: Some(drain),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `pred(stderr so far)` holds; panics (with the log) on timeout or if
    /// the process exits first.
    pub fn wait_until(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.log()) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Give the drain thread a moment to collect the last lines.
                thread::sleep(Duration::from_millis(100));
                if pred(&self.log()) {
                    return;
                }
                panic!(
                    "pipebridge exited ({st}) before it was ready; stderr:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for pipebridge; stderr:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a stderr line starting with `prefix` and returns it.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.wait_until(timeout, |log| log.lines().any(|l| l.starts_with(prefix)));
        self.log()
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
            .unwrap_or_default()
    }

    /// Waits (bounded) for the process to exit; `None` on timeout (it is then still
    /// running and will be killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                if let Some(d) = self.drain.take() {
                    let _ = d.join();
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to this process (by pid).
    pub fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill -TERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

/// A running `pipebridge serve`.
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// Its TLS port (0 for a forwards-only gateway).
    pub port: u16,
}

impl Gateway {
    /// `wss://localhost:PORT/pipes/NAME`.
    pub fn url(&self, pipe: &str) -> String {
        format!("wss://localhost:{}/pipes/{pipe}", self.port)
    }

    /// `wss://localhost:PORT`.
    pub fn base(&self) -> String {
        format!("wss://localhost:{}", self.port)
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// What a finished client run produced.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Stdout bytes.
    pub stdout: Vec<u8>,
    /// Stderr text.
    pub stderr: String,
}

impl Output {
    /// Stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with the whole output unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}; stdout: {:?}; stderr:\n{}",
            self.out(),
            self.stderr
        );
        self
    }
}

/// Runs `cmd` in `cwd` with `stdin` (then closed), capturing stdout and stderr; kills
/// and reaps it and panics if it runs longer than `timeout`.
pub fn run_command(mut cmd: Command, cwd: &Path, stdin: &[u8], timeout: Duration) -> Output {
    cmd.current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(cmd.spawn().expect("spawn"));
    let mut sin = child.0.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = sin.write_all(&input);
        // Dropping `sin` closes the pipe: the child sees EOF.
    });
    let mut sout = child.0.stdout.take().expect("stdout");
    let mut serr = child.0.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = sout.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = serr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
            let _ = writer.join();
            let out = out_t.join().unwrap_or_default();
            let err = err_t.join().unwrap_or_default();
            panic!(
                "{cmd:?} timed out after {timeout:?}; stdout: {:?}; stderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Output {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// A child that is killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

// === local servers ===

/// A Unix-socket server run by background threads; its accept loop ends when dropped.
pub struct UnixServer {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl UnixServer {
    /// Serves `path` calling `handler` on a new thread per connection.
    pub fn start(path: &Path, handler: fn(UnixStream)) -> UnixServer {
        let listener = UnixListener::bind(path).expect("bind test server");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(s) => {
                        thread::spawn(move || handler(s));
                    }
                    Err(_) => break,
                }
            }
        });
        UnixServer {
            path: path.to_path_buf(),
            stop,
        }
    }

    /// An echo server: copies what it reads back, half-closes on EOF.
    pub fn echo(path: &Path) -> UnixServer {
        UnixServer::start(path, echo_conn)
    }

    /// Reads to EOF, then replies with the SHA-256 hex of what it read and closes.
    pub fn sha_reply(path: &Path) -> UnixServer {
        UnixServer::start(path, sha_conn)
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
    }
}

fn echo_conn(mut s: UnixStream) {
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
}

fn sha_conn(mut s: UnixStream) {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return,
        }
    }
    let _ = s.write_all(hex(&h.finalize()).as_bytes());
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 hex of `data`.
pub fn sha_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("getrandom");
    v
}

/// Connects to `path`, retrying briefly (a forward may still be starting).
pub fn unix_connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Writes `data` to a local socket, half-closes, and reads the reply to EOF (bounded).
pub fn unix_request(path: &Path, data: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = unix_connect(path);
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.set_write_timeout(Some(timeout)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let data = data.to_vec();
    let writer = thread::spawn(move || {
        w.write_all(&data).expect("write to the forward");
        w.shutdown(std::net::Shutdown::Write)
            .expect("shutdown write");
    });
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read the reply");
    writer.join().expect("writer");
    reply
}

// === raw HTTP/1.1 over TLS ===

/// Client credentials of a raw request.
#[derive(Clone, Copy)]
pub enum Creds<'a> {
    /// No client certificate.
    None,
    /// This client's certificate from the fixture PKI.
    Cert(&'a str),
    /// An explicit certificate and key.
    Files(&'a str, &'a str),
}

/// A parsed HTTP response head and body.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers (names lowercased).
    pub headers: Vec<(String, String)>,
    /// Body (Content-Length bytes; empty for 101).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status and a `{"error": kind, "message": ...}` body; returns the message.
    pub fn expect_refusal(&self, status: u16, kind: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "status; body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["error"], kind, "error kind in {v}");
        let msg = v["message"]
            .as_str()
            .expect("message is a string")
            .to_string();
        assert!(!msg.is_empty(), "empty message in {v}");
        msg
    }
}

/// A TLS stream to the gateway.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn tls_config(fx: &Fixture, creds: Creds<'_>) -> Arc<rustls::ClientConfig> {
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
    let (cert, key) = match creds {
        Creds::None => (None, None),
        Creds::Cert(c) => (Some(fx.cert(c)), Some(fx.key(c))),
        Creds::Files(c, k) => (Some(c.to_string()), Some(k.to_string())),
    };
    let mut cfg = match (cert, key) {
        (Some(c), Some(k)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(&c)
                .expect("read cert")
                .map(|c| c.expect("cert PEM"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(&k).expect("read key");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
        _ => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Opens a TLS connection to the gateway on `port` as `creds`.
pub async fn tls_connect(fx: &Fixture, port: u16, creds: Creds<'_>) -> TlsStream {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp connect");
    let connector = tokio_rustls::TlsConnector::from(tls_config(fx, creds));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake")
}

/// Sends `request` exactly as given on a new connection and reads one response. The
/// stream is returned so a 101 session can be held open.
pub async fn raw_exchange(
    fx: &Fixture,
    port: u16,
    creds: Creds<'_>,
    request: &[u8],
) -> (RawResponse, TlsStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(fx, port, creds).await;
    let resp = tokio::time::timeout(Duration::from_secs(15), async {
        s.write_all(request).await.expect("send request");
        s.flush().await.expect("flush");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        if status != 101 {
            while body.len() < len {
                let n = s.read(&mut chunk).await.expect("read body");
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        RawResponse {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("timed out waiting for the response");
    (resp, s)
}

/// Like [`raw_exchange`], dropping the connection.
pub async fn raw_request(fx: &Fixture, port: u16, creds: Creds<'_>, request: &[u8]) -> RawResponse {
    raw_exchange(fx, port, creds, request).await.0
}

/// A WebSocket upgrade request for `path` (raw, unmodified) with `extra` header lines
/// (each ending in CRLF) and the given subprotocol header value.
pub fn upgrade_request(port: u16, path: &str, subprotocol: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {subprotocol}\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// A plain GET for `path` with `extra` header lines.
pub fn get_request(port: u16, path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}\r\n").into_bytes()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// VmRSS of `pid` in KiB (the process must be alive).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read /proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}

/// Makes a FIFO at `path` (mode 0600).
pub fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}
