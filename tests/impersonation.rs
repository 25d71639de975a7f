//! Identity mapping and impersonation (issue 4), end to end through the real binary:
//! the pipe server's SO_PEERCRED / SO_PEERGROUPS see each identity's principal, file
//! permissions of 0600 sockets and FIFOs apply to the principal, `exec:` children run
//! as the principal (or the gateway, or a fixed user), 400 concurrent sessions across
//! four identities never leak a credential and leave every gateway thread at root, a
//! gateway without CAP_SETUID/CAP_SETGID refuses an impersonating config, forwards
//! restrict local callers (`allow_local`) and pick credentials per caller (`{user}`),
//! and `tls.crl` revokes a client certificate.
//!
//! Tests that switch credentials need root. Without root they say why and pass, except
//! when `CI` is set: then they fail (CI runs as root, so a skip there hides a broken
//! environment). Mapped users are numeric (`uid = 12001` ...) or existing system users
//! (`nobody`, `daemon`); no user is created.
#![cfg(unix)] // Linux pipe kinds and credentials; the Windows tests are tests/windows.rs.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{q, run_command, scrub, Fixture, KillOnDrop, Output, Proc, UnixServer, BIN};
use futures_util::{SinkExt, StreamExt};
use pipebridge::pki::{self, CertsInit};
use tokio_tungstenite::tungstenite::Message;

/// `(identity / client cert name, uid, gid, supplementary gids)` of the numeric identities.
const NUMERIC: [(&str, u32, u32, &[u32]); 4] = [
    ("u1", 12001, 12001, &[12100, 12101]),
    ("u2", 12002, 12002, &[12200]),
    ("u3", 12003, 12003, &[12300]),
    ("u4", 12004, 12004, &[12400, 12401]),
];

/// Client certificates made for every test (CN = name).
const CLIENTS: [&str; 7] = ["u1", "u2", "u3", "u4", "nobody", "daemon", "noprin"];

/// The system python3 (the `python3` on PATH may be a pyenv shim under /root, which the
/// mapped users cannot reach); `python3` from PATH when there is none.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

// === environment ===

/// True when the test may switch credentials. Without root: prints why the test is
/// skipped and returns false, or fails when `CI` is set.
fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: needs root (CAP_SETUID, CAP_SETGID, CAP_KILL, chown) to impersonate; \
             CI is set, so this is a failure rather than a skip"
        );
    }
    eprintln!(
        "skipped {test}: needs root (CAP_SETUID, CAP_SETGID, CAP_KILL, chown) to impersonate \
         mapped users; run the tests as root (CI does)"
    );
    false
}

/// A temp dir (mode 0755, so mapped users can reach what is in it) with a PKI whose
/// clients are [`CLIENTS`].
fn fixture() -> Fixture {
    let tmp = tempfile::Builder::new()
        .prefix("pbimp")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    pki::init(&CertsInit {
        dir: tmp.path().join("pki"),
        server_names: vec!["localhost".into()],
        clients: CLIENTS.iter().map(|c| c.to_string()).collect(),
        force: false,
    })
    .expect("pki init");
    Fixture { tmp }
}

/// The `[[identity]]` entries: u1..u4 numeric, `nobody` and `daemon` through the user
/// database, `noprin` without a principal.
fn identities() -> String {
    let mut s = String::new();
    for (name, uid, gid, gids) in NUMERIC {
        let gids: Vec<String> = gids.iter().map(|g| g.to_string()).collect();
        s.push_str(&format!(
            "[[identity]]\nname = \"{name}\"\ncert_cn = \"{name}\"\ngroups = [\"numeric\"]\n\
             uid = {uid}\ngid = {gid}\ngids = [{}]\n\n",
            gids.join(", ")
        ));
    }
    for name in ["nobody", "daemon"] {
        s.push_str(&format!(
            "[[identity]]\nname = \"{name}\"\ncert_cn = \"{name}\"\nuser = \"{name}\"\n\n"
        ));
    }
    s.push_str("[[identity]]\nname = \"noprin\"\ncert_cn = \"noprin\"\ngroups = [\"bare\"]\n\n");
    s
}

/// A gateway config on 127.0.0.1:0 with this fixture's TLS (plus `tls_extra` lines in
/// `[tls]`), a generous handshake timeout, [`identities`] and then `pipes`.
fn config(fx: &Fixture, tls_extra: &str, pipes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{}{tls_extra}\n\
         [limits]\nhandshake_timeout = \"60s\"\n\n{}{pipes}",
        fx.tls_section(),
        identities()
    )
}

/// A `[[pipe]]` entry; `extra` holds more key lines (run_as, direction, ...).
fn pipe(name: &str, endpoint: &str, allow: &[&str], extra: &str) -> String {
    let allow: Vec<String> = allow.iter().map(|a| q(a)).collect();
    format!(
        "[[pipe]]\nname = \"{name}\"\nendpoint = {}\nallow = [{}]\n{extra}\n",
        q(endpoint),
        allow.join(", ")
    )
}

/// The audit lines (`session end`) of a log, ANSI colour codes removed, each cut to
/// the event's own fields (the part after "session end", not the span's).
fn audit_lines(log: &str) -> Vec<String> {
    strip_ansi(log)
        .lines()
        .filter_map(|l| l.split_once("session end").map(|(_, f)| f.to_string()))
        .collect()
}

/// A `key=value` field of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
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

/// The stdout of a `connect` that must succeed with output; on failure the panic shows
/// connect's stderr and the gateway's audit lines (bytes each way, close reason).
fn stdout_of(out: &Output, gw: &common::Gateway, what: &str) -> String {
    if out.code != Some(0) || out.stdout.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
        panic!(
            "{what}: expected exit 0 with output; got exit {:?}, stdout {:?}; connect stderr:\n{}\ngateway audit lines:\n{}",
            out.code,
            out.out(),
            out.stderr,
            audit_lines(&gw.log()).join("\n")
        );
    }
    out.out()
}

/// Asserts a refusal by `connect`: exit 1 and the one-line 502 `endpoint_unavailable`.
fn expect_502(out: &Output, what: &str) {
    assert_eq!(
        out.code,
        Some(1),
        "{what}: expected exit 1; stdout {:?}; stderr:\n{}",
        out.out(),
        out.stderr
    );
    assert!(
        out.stderr
            .contains("pipebridge: refused: 502 endpoint_unavailable:"),
        "{what}: expected the 502 endpoint_unavailable refusal line; stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: data flowed: {:?}",
        out.out()
    );
}

// === a pipe server that reports its peer's credentials ===

/// A Unix stream socket (mode 0666) served by a small python3 program that answers each
/// connection with `uid=U gid=G groups=A,B\n` from SO_PEERCRED and SO_PEERGROUPS (59),
/// half-closes, and reads to EOF. Killed (by pid) on drop.
struct PeerServer {
    _child: KillOnDrop,
}

const PEER_SERVER_PY: &str = r#"
import os, socket, struct, sys, threading
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o666)
srv.listen(4096)
print("ready", flush=True)
def handle(c):
    try:
        cred = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
        pid, uid, gid = struct.unpack("iII", cred)
        raw = c.getsockopt(socket.SOL_SOCKET, 59, 1024)  # SO_PEERGROUPS (python caps buflen at 1024)
        groups = struct.unpack("%dI" % (len(raw) // 4), raw)
        reply = "uid=%d gid=%d groups=%s\n" % (uid, gid, ",".join(str(g) for g in groups))
        c.sendall(reply.encode())
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    except Exception as e:
        sys.stderr.write("peer server: %r\n" % (e,))
    finally:
        c.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"#;

impl PeerServer {
    fn start(path: &Path) -> PeerServer {
        let mut child = KillOnDrop(
            Command::new(python())
                .args(["-I", "-u", "-c", PEER_SERVER_PY])
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start the python3 peer-credential server"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the peer server did not start");
        assert_eq!(line.trim(), "ready", "peer server start");
        PeerServer { _child: child }
    }
}

/// A reply of the peer server: (uid, gid, sorted groups).
fn parse_peer(reply: &str) -> (u32, u32, Vec<u32>) {
    let r = reply.trim();
    let num = |k: &str| -> u32 {
        field(r, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in peer reply {reply:?}"))
    };
    let mut groups: Vec<u32> = field(r, "groups")
        .unwrap_or_else(|| panic!("no groups in peer reply {reply:?}"))
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| g.parse().expect("group id"))
        .collect();
    groups.sort_unstable();
    (num("uid"), num("gid"), groups)
}

// === tests: peer credentials, permissions ===

#[test]
fn peer_server_sees_each_identity_as_its_principal() {
    if !root_or_skip("peer_server_sees_each_identity_as_its_principal") {
        return;
    }
    let fx = fixture();
    let sock = fx.path("peer.sock");
    let _srv = PeerServer::start(&sock);
    let mut gw = fx.serve(
        "gw.toml",
        &config(
            &fx,
            "",
            &pipe(
                "peer",
                &format!("unix:{}", sock.display()),
                &["u1", "u2"],
                "",
            ),
        ),
    );
    for (name, uid, gid, gids) in &NUMERIC[..2] {
        let out = fx.connect(&gw.url("peer"), name, b"");
        let (ru, rg, rgroups) = parse_peer(&stdout_of(&out, &gw, name));
        assert_eq!(
            (ru, rg, rgroups.as_slice()),
            (*uid, *gid, *gids),
            "{name}: SO_PEERCRED/SO_PEERGROUPS seen by the pipe server: {:?}",
            out.out()
        );
    }
    // One audit line per session, naming the principal.
    gw.proc.wait_until(Duration::from_secs(10), |log| {
        audit_lines(log).iter().any(|l| {
            field(l, "identity") == Some("u1")
                && field(l, "uid") == Some("12001")
                && field(l, "gid") == Some("12001")
                && field(l, "pipe") == Some("peer")
        }) && audit_lines(log)
            .iter()
            .any(|l| field(l, "identity") == Some("u2") && field(l, "uid") == Some("12002"))
    });
}

#[test]
fn socket_0600_of_another_uid_is_refused_and_works_for_its_owner() {
    if !root_or_skip("socket_0600_of_another_uid_is_refused_and_works_for_its_owner") {
        return;
    }
    let fx = fixture();
    let sock = fx.path("own.sock");
    let _srv = UnixServer::echo(&sock);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&sock, Some(12001), Some(12001)).expect("chown");
    let gw = fx.serve(
        "gw.toml",
        &config(
            &fx,
            "",
            &pipe(
                "own",
                &format!("unix:{}", sock.display()),
                &["u1", "u2"],
                "",
            ),
        ),
    );
    let out = fx.connect(&gw.url("own"), "u2", b"hello");
    expect_502(&out, "u2 (uid 12002) on a 0600 socket of uid 12001");
    let out = fx.connect(&gw.url("own"), "u1", b"hello");
    assert_eq!(
        stdout_of(&out, &gw, "u1 on its own socket"),
        "hello",
        "u1 (the owner) gets the echo"
    );
    // The refusal never fell back to the gateway's rights: the gateway logged it.
    assert!(
        strip_ansi(&gw.log()).contains("permission denied")
            || strip_ansi(&gw.log()).contains("Permission denied"),
        "the gateway log names the permission error:\n{}",
        gw.log()
    );
}

/// Opens `path` for writing without blocking a thread forever: retries "no reader"
/// until `timeout`.
fn open_fifo_writer(path: &Path, timeout: Duration) -> std::fs::File {
    use rustix::fs::{Mode, OFlags};
    let deadline = Instant::now() + timeout;
    loop {
        match rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let f = std::fs::File::from(fd);
                // Back to blocking writes.
                let flags = rustix::fs::fcntl_getfl(&f).expect("getfl");
                rustix::fs::fcntl_setfl(&f, flags.difference(OFlags::NONBLOCK)).expect("setfl");
                return f;
            }
            Err(e) if e == rustix::io::Errno::NXIO && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open {} for writing: {e}", path.display()),
        }
    }
}

fn mkfifo_owned(path: &Path, uid: u32) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

#[test]
fn fifo_0600_of_another_uid_is_refused_and_works_for_its_owner() {
    if !root_or_skip("fifo_0600_of_another_uid_is_refused_and_works_for_its_owner") {
        return;
    }
    let fx = fixture();
    let out_fifo = fx.path("out.fifo");
    let in_fifo = fx.path("in.fifo");
    mkfifo_owned(&out_fifo, 12001);
    mkfifo_owned(&in_fifo, 12001);
    let pipes = pipe(
        "fout",
        &format!("fifo:{}", out_fifo.display()),
        &["u1", "u2"],
        "direction = \"out\"",
    ) + &pipe(
        "fin",
        &format!("fifo:{}", in_fifo.display()),
        &["u1", "u2"],
        "direction = \"in\"",
    );
    let gw = fx.serve("gw.toml", &config(&fx, "", &pipes));

    // direction "out": the client reads what a local writer writes.
    let out = fx.connect(&gw.url("fout"), "u2", b"");
    expect_502(&out, "u2 reading a 0600 FIFO of uid 12001");
    let writer = {
        let p = out_fifo.clone();
        std::thread::spawn(move || {
            let mut f = open_fifo_writer(&p, Duration::from_secs(20));
            f.write_all(b"from-the-fifo\n").expect("write FIFO");
        })
    };
    let out = fx.connect(&gw.url("fout"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1 reading its FIFO"),
        "from-the-fifo\n",
        "u1 reads its own FIFO"
    );
    writer.join().expect("writer");

    // direction "in": the client writes into the FIFO; a local reader gets it.
    let out = fx.connect(&gw.url("fin"), "u2", b"nope");
    expect_502(&out, "u2 writing a 0600 FIFO of uid 12001");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let p = in_fifo.clone();
        std::thread::spawn(move || {
            // A blocking open counts as a reader at once, so the gateway's
            // non-blocking writer open finds it.
            let mut f = std::fs::File::open(&p).expect("open FIFO for reading");
            let mut v = Vec::new();
            let _ = f.read_to_end(&mut v);
            let _ = tx.send(v);
        });
    }
    let out = fx.connect(&gw.url("fin"), "u1", b"into-the-fifo");
    out.expect_code(0);
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the local FIFO reader got nothing");
    assert_eq!(got, b"into-the-fifo", "u1 writes into its own FIFO");
}

// === tests: exec children ===

#[test]
fn exec_children_run_as_the_principal() {
    if !root_or_skip("exec_children_run_as_the_principal") {
        return;
    }
    let fx = fixture();
    let pipes = pipe("idu", "exec:id -u", &["u1", "u2", "nobody"], "")
        + &pipe("idg", "exec:id -G", &["u1", "u2"], "")
        + &pipe("idgn", "exec:id -g", &["u1"], "")
        + &pipe(
            "homeuser",
            "exec:sh -c 'echo $HOME $USER'",
            &["nobody", "u1"],
            "",
        );
    let gw = fx.serve("gw.toml", &config(&fx, "", &pipes));
    for (name, uid, gid, gids) in &NUMERIC[..2] {
        let out = fx.connect(&gw.url("idu"), name, b"");
        assert_eq!(
            stdout_of(&out, &gw, name).trim(),
            uid.to_string(),
            "{name}: id -u"
        );
        let out = fx.connect(&gw.url("idg"), name, b"");
        let mut got: Vec<u32> = stdout_of(&out, &gw, name)
            .split_whitespace()
            .map(|g| g.parse().expect("gid"))
            .collect();
        got.sort_unstable();
        got.dedup();
        let mut want: Vec<u32> = gids.to_vec();
        want.push(*gid);
        want.sort_unstable();
        assert_eq!(got, want, "{name}: id -G (primary gid and gids)");
    }
    let out = fx.connect(&gw.url("idgn"), "u1", b"");
    assert_eq!(stdout_of(&out, &gw, "u1").trim(), "12001", "u1: id -g");

    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user db")
        .expect("the system has a nobody user");
    let out = fx.connect(&gw.url("idu"), "nobody", b"");
    assert_eq!(
        stdout_of(&out, &gw, "nobody").trim(),
        nobody.uid.to_string(),
        "nobody: id -u (user = \"nobody\" resolved through the user database)"
    );
    let out = fx.connect(&gw.url("homeuser"), "nobody", b"");
    assert_eq!(
        stdout_of(&out, &gw, "nobody").trim(),
        format!("{} nobody", nobody.dir.display()),
        "nobody: HOME and USER of the principal"
    );
    // A numeric uid with no user database entry: never the gateway's HOME/USER.
    let out = fx.connect(&gw.url("homeuser"), "u1", b"");
    assert!(
        !stdout_of(&out, &gw, "u1").contains("root"),
        "u1: HOME and USER must not be the gateway's: {:?}",
        out.out()
    );
}

/// The gateway binary, linked (or copied) into the fixture's dir, which every account
/// can reach: a build dir may sit under a home only root may enter.
fn reachable_bin(fx: &Fixture) -> std::path::PathBuf {
    let bin = fx.path("pipebridge-bin");
    if std::fs::hard_link(BIN, &bin).is_err() {
        std::fs::copy(BIN, &bin).expect("copy the gateway binary");
    }
    bin
}

/// The capability sets of an `exec:` child, as `grep ^Cap /proc/self/status` printed them.
fn caps_of(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A gateway run as a user that holds `CAP_SETUID`, `CAP_SETGID` and `CAP_KILL` as
/// ambient capabilities (systemd's `User=` with `AmbientCapabilities=`): its `exec:`
/// children, as a principal or as the gateway's own account, hold no capability. A
/// switch between two uids that are not root keeps the sets, and exec made the ambient
/// ones the child's: a child "as u1" could make itself root.
#[test]
fn exec_children_of_a_gateway_with_ambient_capabilities_hold_none() {
    if !root_or_skip("exec_children_of_a_gateway_with_ambient_capabilities_hold_none") {
        return;
    }
    let fx = fixture();
    // The gateway's own account reads its keys.
    let pki = fx.path("pki");
    let files = std::fs::read_dir(&pki)
        .expect("pki dir")
        .map(|e| e.expect("entry").path());
    for p in files.chain([pki.clone()]) {
        rustix::fs::chown(&p, Some(rustix::fs::Uid::from_raw(12050)), None).expect("chown");
    }
    // A working directory only root may enter: the principal cannot.
    let closed = fx.path("closed-cwd");
    std::fs::create_dir(&closed).expect("mkdir");
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let caps = "exec:grep ^Cap /proc/self/status";
    let pipes = pipe("caps", caps, &["u1"], "")
        + &pipe("gwcaps", caps, &["u1"], "run_as = \"gateway\"")
        + &pipe("idu", "exec:id -u", &["u1"], "")
        + &pipe(
            "closedcwd",
            "exec:pwd",
            &["u1"],
            &format!("cwd = {:?}", closed.display().to_string()),
        );
    let bin = reachable_bin(&fx);
    let gw = fx.serve_via_bin(
        "gw.toml",
        &config(&fx, "", &pipes),
        &[
            "setpriv",
            "--reuid=12050",
            "--regid=12050",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid,+kill,+dac_override",
            "--ambient-caps=+setuid,+setgid,+kill,+dac_override",
            "--",
        ],
        &bin,
        &[],
    );
    let out = fx.connect(&gw.url("idu"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1").trim(),
        "12001",
        "the switch works"
    );
    // The working directory is entered without the gateway's capabilities: with its
    // CAP_DAC_OVERRIDE, u1's child entered a directory u1 cannot (it used to print it).
    let out = fx.connect(&gw.url("closedcwd"), "u1", b"");
    assert_ne!(
        out.code,
        Some(0),
        "u1 entered {}: {out:?}",
        closed.display()
    );
    assert!(
        out.stderr.contains("502 endpoint_unavailable"),
        "not refused for its directory: {out:?}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("closed-cwd"),
        "{out:?}"
    );
    let no_caps = |gw: &common::Gateway, pipe: &str, what: &str| {
        let out = fx.connect(&gw.url(pipe), "u1", b"");
        let got = caps_of(&stdout_of(&out, gw, "u1"));
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                got.get(set).map(String::as_str),
                Some("0000000000000000"),
                "{what}, {pipe}: {set} of the child: {got:?}"
            );
        }
    };
    for pipe in ["caps", "gwcaps"] {
        no_caps(&gw, pipe, "ambient");
    }
    drop(gw);
    // A root gateway under NoNewPrivileges (the shipped units): its own child is root
    // without the capabilities the gateway holds to switch (exec gives none back).
    let root = fx.serve_via_bin(
        "root.toml",
        &config(&fx, "", &pipes),
        &["setpriv", "--no-new-privs", "--"],
        &bin,
        &[],
    );
    no_caps(&root, "gwcaps", "root, no_new_privs");
}

/// Writes a copy of the system's `/etc/passwd` with `extra` lines added, for a gateway
/// started in a mount namespace with it bound over `/etc/passwd` ([`with_passwd`]).
fn passwd_with(fx: &Fixture, extra: &str) -> String {
    let mut text = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(extra);
    let path = fx.path("passwd");
    std::fs::write(&path, text).expect("write passwd");
    path.display().to_string()
}

/// A gateway lacking `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH` (the shipped units'
/// bounding set) enters an `exec:` child's working directory as the principal: a home
/// only its owner may enter is entered, and one the principal cannot enter falls back
/// to `/` (DESIGN.md: "else the principal's home, else /"). It used to `chdir` with the
/// gateway's rights, before the switch: the first was refused (502), the second entered.
#[test]
fn an_exec_childs_home_is_entered_as_the_principal() {
    if !root_or_skip("an_exec_childs_home_is_entered_as_the_principal") {
        return;
    }
    let fx = fixture();
    let own = fx.path("own-home");
    let closed = fx.path("closed-home");
    for (dir, uid) in [(&own, 12077), (&closed, 0)] {
        std::fs::create_dir(dir).expect("mkdir");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let id = rustix::fs::Uid::from_raw(uid);
        rustix::fs::chown(dir, Some(id), Some(rustix::fs::Gid::from_raw(uid))).expect("chown");
    }
    let passwd = passwd_with(
        &fx,
        &format!(
            "pbhome:x:12077:12077::{}:/bin/sh\npbclosed:x:12078:12078::{}:/bin/sh\n",
            own.display(),
            closed.display()
        ),
    );
    let pipes = pipe("pwd", "exec:pwd", &["u1"], "run_as = \"user:pbhome\"")
        + &pipe("pwd2", "exec:pwd", &["u1"], "run_as = \"user:pbclosed\"");
    let gw = fx.serve_via(
        "gw.toml",
        &config(&fx, "", &pipes),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/passwd && exec \"$@\"",
            &passwd,
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search",
            "--",
        ],
        &[],
    );
    let out = fx.connect(&gw.url("pwd"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1").trim(),
        own.display().to_string(),
        "the principal's own 0700 home"
    );
    let out = fx.connect(&gw.url("pwd2"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1").trim(),
        "/",
        "a home the principal cannot enter: /"
    );
}

#[test]
fn run_as_gateway_and_run_as_fixed_user() {
    if !root_or_skip("run_as_gateway_and_run_as_fixed_user") {
        return;
    }
    let fx = fixture();
    let daemon = nix::unistd::User::from_name("daemon")
        .expect("user db")
        .expect("the system has a daemon user");
    let pipes = pipe(
        "gwid",
        "exec:id -u",
        &["u1", "noprin"],
        "run_as = \"gateway\"",
    ) + &pipe(
        "daemonid",
        "exec:id -u",
        &["u1", "noprin"],
        "run_as = \"user:daemon\"",
    ) + &pipe(
        "daemonenv",
        "exec:sh -c 'echo $USER $(id -g)'",
        &["u2"],
        "run_as = \"user:daemon\"",
    );
    // A root gateway's own child keeps root's rights for its working directory: one
    // only its owner (u1) may enter.
    let private = fx.path("u1-only");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    rustix::fs::chown(
        &private,
        Some(rustix::fs::Uid::from_raw(12001)),
        Some(rustix::fs::Gid::from_raw(12001)),
    )
    .expect("chown");
    let pipes = pipes
        + &pipe(
            "gwcwd",
            "exec:pwd",
            &["u1"],
            &format!(
                "run_as = \"gateway\"\ncwd = {}",
                q(&private.display().to_string())
            ),
        );
    let gw = fx.serve("gw.toml", &config(&fx, "", &pipes));
    let out = fx.connect(&gw.url("gwcwd"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1").trim(),
        private.display().to_string(),
        "run_as = \"gateway\" (root) enters a cwd only its owner may"
    );
    for who in ["u1", "noprin"] {
        let out = fx.connect(&gw.url("gwid"), who, b"");
        assert_eq!(
            stdout_of(&out, &gw, who).trim(),
            "0",
            "{who}: run_as = \"gateway\" runs as root"
        );
        let out = fx.connect(&gw.url("daemonid"), who, b"");
        assert_eq!(
            stdout_of(&out, &gw, who).trim(),
            daemon.uid.to_string(),
            "{who}: run_as = \"user:daemon\""
        );
    }
    let out = fx.connect(&gw.url("daemonenv"), "u2", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u2").trim(),
        format!("daemon {}", daemon.gid),
        "user:daemon: USER and primary group"
    );
}

// === test: stress ===

/// One thread's credentials from /proc/PID/task/TID/status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ThreadCreds {
    name: String,
    uid: String,
    gid: String,
    groups: String,
    cap_eff: String,
}

fn read_status(path: &Path) -> Option<ThreadCreds> {
    let text = std::fs::read_to_string(path).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Some(ThreadCreds {
        name: get("Name:"),
        uid: get("Uid:"),
        gid: get("Gid:"),
        groups: get("Groups:"),
        cap_eff: get("CapEff:"),
    })
}

/// Every thread of process `pid` (threads that exit while being read are skipped).
fn threads(pid: u32) -> BTreeMap<String, ThreadCreds> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task") {
        let e = e.expect("task entry");
        if let Some(c) = read_status(&e.path().join("status")) {
            out.insert(e.file_name().to_string_lossy().into_owned(), c);
        }
    }
    out
}

/// Asserts every thread of `pid` has root's ids and the original groups and effective
/// capabilities (`main`, read before any session): the shard threads, which switch for
/// opens whose lookup only root controls, and the impersonation pool's for the others.
fn assert_threads_restored(pid: u32, main: &ThreadCreds, when: &str) {
    let all = threads(pid);
    for name in ["pb-shard", "pb-impersonate"] {
        assert!(
            all.values().any(|c| c.name.starts_with(name)),
            "{when}: {name} threads exist: {all:#?}"
        );
    }
    let bad: Vec<_> = all
        .iter()
        .filter(|(_, c)| {
            c.uid.split_whitespace().any(|x| x != "0")
                || c.gid.split_whitespace().any(|x| x != "0")
                || c.groups != main.groups
                || c.cap_eff != main.cap_eff
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{when}: {} of {} gateway threads are not back at uid/gid 0 with groups {:?} and CapEff {}: {bad:#?}",
        bad.len(),
        all.len(),
        main.groups,
        main.cap_eff
    );
}

/// A client TLS config presenting `client`'s certificate.
fn client_tls(fx: &Fixture, client: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(fx.ca()).expect("read CA") {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(fx.cert(client))
        .expect("read cert")
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(fx.key(client)).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Ws = tokio_tungstenite::WebSocketStream<common::TlsStream>;

/// Opens a `pipebridge.v1` session on `pipe` with `tls`'s client certificate: the
/// HTTP/1.1 upgrade is done here and checked as RFC 6455 §4.1 says (status 101,
/// `Upgrade: websocket`, a `Connection` token `Upgrade`, the accept key, our
/// subprotocol). Returns the stream and the 101's `Connection` value.
async fn ws_open(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    pipe: &str,
) -> Result<(Ws, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let key = generate_key();
    let req = format!(
        "GET /pipes/{pipe} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Protocol: pipebridge.v1\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send upgrade: {e}"))?;
    stream.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read 101: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before the response head: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        return Err(format!("not upgraded: {head:?}"));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let connection = get("connection");
    let ok = get("upgrade").eq_ignore_ascii_case("websocket")
        && connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && get("sec-websocket-accept") == derive_accept_key(key.as_bytes())
        && get("sec-websocket-protocol") == "pipebridge.v1";
    if !ok {
        return Err(format!("bad 101: {head:?}"));
    }
    let ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        stream,
        buf[head_end..].to_vec(),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    Ok((ws, connection))
}

/// Reads binary messages until the text control `{"type":"eof"}`.
async fn ws_read_to_eof(ws: &mut Ws) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => data.extend_from_slice(&b),
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("control {t:?}: {e}"))?;
                match v["type"].as_str() {
                    Some("eof") => return Ok(data),
                    Some("error") => return Err(format!("error control: {t}")),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(c))) => return Err(format!("closed before eof: {c:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("websocket: {e}")),
            None => return Err("stream ended before eof".into()),
        }
    }
}

/// Sends our `eof` and waits for the gateway's Close 1000 (both directions done) and
/// the end of the connection. Returns whether the TLS connection ended with a
/// close_notify (the WebSocket close handshake is what counts; see the report).
async fn ws_finish(ws: &mut Ws) -> Result<bool, String> {
    ws.send(Message::text(r#"{"type":"eof"}"#))
        .await
        .map_err(|e| format!("send eof: {e}"))?;
    let mut closed = false;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(c))) => {
                let code = c.map(|c| u16::from(c.code));
                if code != Some(1000) {
                    return Err(format!("close code {code:?}"));
                }
                closed = true;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) if closed => {
                // After the Close handshake the gateway drops TCP; rustls reports a
                // missing close_notify as an error.
                let _ = e;
                return Ok(false);
            }
            Some(Err(e)) => return Err(format!("websocket after eof: {e}")),
            None if closed => return Ok(true),
            None => return Err("connection ended without a Close frame".into()),
        }
    }
}

const STRESS_SESSIONS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_400_concurrent_sessions_never_leak_credentials() {
    if !root_or_skip("stress_400_concurrent_sessions_never_leak_credentials") {
        return;
    }
    let started = Instant::now();
    let fx = fixture();
    // The target in a directory only root controls (not under /tmp, which is
    // world-writable): the sessions' own threads switch for these opens, after the first
    // (the other tests' targets, under /tmp, go to the impersonation threads).
    let run_dir = tempfile::Builder::new()
        .prefix("pbimp")
        .tempdir_in("/run")
        .expect("tempdir in /run");
    std::fs::set_permissions(run_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let sock = run_dir.path().join("peer.sock");
    let _srv = PeerServer::start(&sock);
    let names: Vec<&str> = NUMERIC.iter().map(|n| n.0).collect();
    let mut gw = fx.serve(
        "gw.toml",
        &config(
            &fx,
            "",
            &pipe(
                "peer",
                &format!("unix:{}", sock.display()),
                &names,
                "max_instances = 1000",
            ),
        ),
    );
    let pid = gw.proc.pid();
    let main = read_status(Path::new(&format!("/proc/{pid}/status"))).expect("gateway status");
    assert!(
        main.uid.split_whitespace().all(|x| x == "0"),
        "the gateway runs as root: {main:?}"
    );
    let tls: Vec<_> = NUMERIC.iter().map(|n| client_tls(&fx, n.0)).collect();
    let port = gw.port;

    // All sessions connect at once; each holds its session open (reply read, our own
    // direction still open) until every session has its reply, so 400 are live together.
    let start = Arc::new(tokio::sync::Barrier::new(STRESS_SESSIONS));
    let all_replied = Arc::new(tokio::sync::Barrier::new(STRESS_SESSIONS + 1));
    let release = Arc::new(tokio::sync::Barrier::new(STRESS_SESSIONS + 1));
    let mut tasks = Vec::new();
    for i in 0..STRESS_SESSIONS {
        let k = i % NUMERIC.len();
        let tls = tls[k].clone();
        let (start, all_replied, release) = (start.clone(), all_replied.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let phase1 = tokio::time::timeout(Duration::from_secs(150), async {
                let (mut ws, connection) = ws_open(port, tls, "peer").await?;
                let reply = ws_read_to_eof(&mut ws).await?;
                Ok::<_, String>((ws, String::from_utf8_lossy(&reply).into_owned(), connection))
            })
            .await
            .unwrap_or_else(|_| Err("timed out opening/reading".into()));
            // Always reach the barriers, even after a failure, so nobody waits forever.
            all_replied.wait().await;
            release.wait().await;
            let (mut ws, reply, connection) = phase1?;
            tokio::time::timeout(Duration::from_secs(60), ws_finish(&mut ws))
                .await
                .unwrap_or_else(|_| Err("timed out closing".into()))
                .map(|clean_tls| (k, reply, clean_tls, connection))
        }));
    }
    all_replied.wait().await;
    let replied_after = started.elapsed();
    // Every open is done and 400 sessions are live: no thread may hold borrowed rights.
    assert_threads_restored(pid, &main, "with 400 sessions live");
    let live = threads(pid).len();
    release.wait().await;

    let mut failures = Vec::new();
    let mut ok = 0;
    let mut no_close_notify = 0;
    let mut connection_headers: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        match t.await.expect("session task") {
            Ok((k, reply, clean_tls, connection)) => {
                if !clean_tls {
                    no_close_notify += 1;
                }
                *connection_headers.entry(connection).or_insert(0) += 1;
                let (name, uid, gid, gids) = NUMERIC[k];
                let got = parse_peer(&reply);
                if got != (uid, gid, gids.to_vec()) {
                    failures.push(format!(
                        "{name}: expected uid {uid} gid {gid} groups {gids:?}, the pipe server saw {reply:?}"
                    ));
                } else {
                    ok += 1;
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STRESS_SESSIONS} sessions failed or saw wrong credentials; first: {:#?}\ngateway log tail:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        strip_ansi(&gw.log()).lines().rev().take(10).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(ok, STRESS_SESSIONS);

    // Every session's audit line names its identity's principal.
    gw.proc.wait_until(Duration::from_secs(30), |log| {
        audit_lines(log).len() >= STRESS_SESSIONS
    });
    let audits = audit_lines(&gw.log());
    for l in &audits {
        let ident = field(l, "identity").unwrap_or_default();
        let (_, uid, gid, _) = NUMERIC
            .iter()
            .find(|n| n.0 == ident)
            .unwrap_or_else(|| panic!("audit line with an unknown identity: {l}"));
        assert_eq!(
            (field(l, "uid"), field(l, "gid")),
            (
                Some(uid.to_string().as_str()),
                Some(gid.to_string().as_str())
            ),
            "audit line: {l}"
        );
        assert_eq!(field(l, "close_code"), Some("1000"), "audit line: {l}");
    }
    assert_eq!(audits.len(), STRESS_SESSIONS, "one audit line per session");

    // And afterwards, every gateway thread is back at root.
    assert_threads_restored(pid, &main, "after 400 sessions");
    eprintln!(
        "stress: {STRESS_SESSIONS} sessions live together after {replied_after:?} \
         (gateway had {live} threads); all done after {:?}; {no_close_notify} TLS \
         connections ended without close_notify after the WebSocket Close; \
         101 Connection headers: {connection_headers:?}",
        started.elapsed()
    );
}

// === tests: capabilities and config ===

#[test]
fn gateway_without_setuid_setgid_refuses_an_impersonating_config() {
    let fx = fixture();
    let pipes = pipe("guarded", "unix:/nonexistent/guarded.sock", &["u1"], "")
        + &pipe("fixed", "exec:id -u", &["u1"], "run_as = \"gateway\"");
    let cfg = fx.write("client.toml", &config(&fx, "", &pipes));
    let gateway_only = fx.write(
        "gateway-only.toml",
        &config(
            &fx,
            "",
            &pipe("fixed", "exec:id -u", &["u1"], "run_as = \"gateway\""),
        ),
    );
    let fixed_user = fx.write(
        "fixed-user.toml",
        &config(
            &fx,
            "",
            &pipe(
                "daemonpipe",
                "exec:id -u",
                &["noprin"],
                "run_as = \"user:daemon\"",
            ),
        ),
    );
    // Root gets every capability at exec unless the bounding and inheritable sets drop
    // them; a non-root user simply lacks them.
    let wrap = |cfg: &Path| -> Command {
        let mut cmd = if rustix::process::geteuid().is_root() {
            if which("setpriv") {
                let mut c = Command::new("setpriv");
                c.args([
                    "--bounding-set=-setuid,-setgid",
                    "--inh-caps=-setuid,-setgid",
                    "--",
                    BIN,
                ]);
                c
            } else if which("capsh") {
                let mut c = Command::new("capsh");
                c.args(["--drop=cap_setuid,cap_setgid", "--", "-c"]);
                c.arg(format!("exec {BIN} \"$@\""));
                c.arg("pipebridge");
                c
            } else {
                panic!("neither setpriv (util-linux) nor capsh is installed: cannot start a gateway without CAP_SETUID");
            }
        } else {
            Command::new(BIN)
        };
        cmd.arg("serve").arg("--config").arg(cfg);
        scrub(&mut cmd);
        cmd
    };
    let out = run_command(wrap(&cfg), fx.dir(), b"", Duration::from_secs(30));
    assert_eq!(
        out.code,
        Some(2),
        "a run_as = \"client\" config without CAP_SETUID must exit 2; stderr:\n{}",
        out.stderr
    );
    for needle in ["CAP_SETUID", "CAP_SETGID", "\"guarded\""] {
        assert!(
            out.stderr.contains(needle),
            "the refusal names {needle}; stderr:\n{}",
            out.stderr
        );
    }
    assert!(
        !out.stderr.contains("listening on"),
        "it must not start listening first:\n{}",
        out.stderr
    );
    let out = run_command(wrap(&fixed_user), fx.dir(), b"", Duration::from_secs(30));
    assert_eq!(
        out.code,
        Some(2),
        "run_as = \"user:daemon\"; stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("CAP_SETUID") && out.stderr.contains("\"daemonpipe\""),
        "user:NAME refusal names the capability and the pipe; stderr:\n{}",
        out.stderr
    );
    // The same restricted gateway runs a config that needs no impersonation.
    let mut p = Proc::spawn(wrap(&gateway_only), fx.dir(), false);
    p.wait_for_line("pipebridge: listening on ", Duration::from_secs(30));
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

#[test]
fn check_config_rejects_a_client_pipe_for_an_identity_without_principal() {
    let fx = fixture();
    for (file, allow) in [("direct.toml", "noprin"), ("group.toml", "@bare")] {
        let cfg = fx.write(
            file,
            &config(
                &fx,
                "",
                &pipe("needsuser", "unix:/nonexistent.sock", &["u1", allow], ""),
            ),
        );
        let cfg = cfg.to_string_lossy().into_owned();
        let out = fx.run(&["check-config", "--config", &cfg], b"");
        assert_eq!(out.code, Some(2), "{file}: exit 2; stderr:\n{}", out.stderr);
        assert!(
            out.stderr.contains("noprin") && out.stderr.contains("needsuser"),
            "{file}: the error names the identity and the pipe; stderr:\n{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("identity u1 ") && !out.stderr.contains("u1, "),
            "{file}: identities with a principal are not blamed; stderr:\n{}",
            out.stderr
        );
    }
    // With run_as = "gateway" or a fixed user the same allow list is fine.
    for run_as in ["gateway", "user:nobody"] {
        let cfg = fx.write(
            "ok.toml",
            &config(
                &fx,
                "",
                &pipe(
                    "needsuser",
                    "unix:/nonexistent.sock",
                    &["u1", "noprin"],
                    &format!("run_as = \"{run_as}\""),
                ),
            ),
        );
        let cfg = cfg.to_string_lossy().into_owned();
        fx.run(&["check-config", "--config", &cfg], b"")
            .expect_code(0);
    }
}

// === tests: forward side ===

/// A python3 program run as another user: connects to the socket argv[1], sends
/// argv[2], half-closes, reads to EOF; prints JSON {uid, data, error}.
const LOCAL_CALLER_PY: &str = r#"
import json, os, socket, sys
res = {"uid": os.getuid(), "data": "", "error": None}
kind = socket.SOCK_SEQPACKET if sys.argv[3:] == ["seqpacket"] else socket.SOCK_STREAM
try:
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(20)
    s.connect(sys.argv[1])
    try:
        s.sendall(sys.argv[2].encode())
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        res["error"] = "send: %s" % e
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    res["data"] = data.decode()
except OSError as e:
    res["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(res))
"#;

/// Runs [`LOCAL_CALLER_PY`] as `uid`/`gid` (no supplementary groups) through setpriv.
fn call_as(fx: &Fixture, uid: u32, gid: u32, sock: &Path, data: &str) -> serde_json::Value {
    call_as_kind(fx, uid, gid, sock, data, "stream")
}

/// [`call_as`] on a socket of `kind` (`stream` or `seqpacket`: one record, its echoes).
fn call_as_kind(
    fx: &Fixture,
    uid: u32,
    gid: u32,
    sock: &Path,
    data: &str,
    kind: &str,
) -> serde_json::Value {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(python())
        .args(["-I", "-c", LOCAL_CALLER_PY])
        .arg(sock)
        .arg(data)
        .arg(kind);
    let out = run_command(cmd, fx.dir(), b"", Duration::from_secs(40));
    out.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(out.out().trim())
        .unwrap_or_else(|e| panic!("caller output {:?}: {e}; stderr {}", out.out(), out.stderr));
    assert_eq!(v["uid"], uid, "the caller ran as uid {uid}: {v}");
    v
}

fn forward(listen: &Path, to: &str, ca: &str, cert: &str, key: &str, extra: &str) -> String {
    format!(
        "[[forward]]\nlisten = {}\nto = {}\nca = {}\ncert = {}\nkey = {}\nsocket_mode = \"0666\"\n{extra}\n",
        q(&format!("unix:{}", listen.display())),
        q(to),
        q(ca),
        q(cert),
        q(key)
    )
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn forward_allow_local_admits_only_the_listed_uid() {
    if !root_or_skip("forward_allow_local_admits_only_the_listed_uid") {
        return;
    }
    let fx = fixture();
    let echo = fx.path("echo.sock");
    let _srv = UnixServer::echo(&echo);
    std::fs::set_permissions(&echo, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut a = fx.serve(
        "a.toml",
        &config(
            &fx,
            "",
            &pipe("echo", &format!("unix:{}", echo.display()), &["u1"], ""),
        ),
    );
    let hosted = fx.path("fwd-uid.sock");
    let b = fx.serve(
        "b.toml",
        &forward(
            &hosted,
            &a.url("echo"),
            &fx.ca(),
            &fx.cert("u1"),
            &fx.key("u1"),
            "allow_local = [\"uid:12001\"]",
        ),
    );
    wait_for_socket(&hosted);
    let mode = std::fs::metadata(&hosted)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666, "socket_mode applied");

    only_uid_12001_gets_through(&fx, &mut a, &b, &hosted, "stream");
}

/// With `allow_local = ["uid:12001"]` on the forward at `hosted` (a socket of `kind`) to
/// an echo pipe on `a`: uid 12001's data comes back; uid 12002 is closed without data,
/// nothing of it reaches `a` (one audit line there), and the forward `b` logs why.
fn only_uid_12001_gets_through(
    fx: &Fixture,
    a: &mut common::Gateway,
    b: &common::Gateway,
    hosted: &Path,
    kind: &str,
) {
    let v = call_as_kind(fx, 12001, 12001, hosted, "ping-12001", kind);
    assert_eq!(
        v["data"], "ping-12001",
        "uid 12001 reaches the echo pipe through the {kind} forward: {v}"
    );
    let v = call_as_kind(fx, 12002, 12002, hosted, "ping-12002", kind);
    assert_eq!(v["data"], "", "uid 12002 is closed without data: {v}");
    // Nothing of the refused caller reached the exporting gateway: one audit line only.
    a.proc
        .wait_until(Duration::from_secs(10), |log| !audit_lines(log).is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let sessions = audit_lines(&a.log());
    assert_eq!(
        sessions.len(),
        1,
        "only the admitted caller opened a session: {sessions:#?}\nforward log:\n{}",
        b.log()
    );
    assert!(
        strip_ansi(&b.log()).contains("allow_local"),
        "the forward logs the refusal:\n{}",
        b.log()
    );
}

/// A seqpacket echo target on background threads, for as long as the test runs.
fn seqpacket_echo(path: &Path) {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType};
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)
        .expect("seqpacket socket");
    rustix::net::bind(&fd, &SocketAddrUnix::new(path).expect("addr")).expect("bind");
    rustix::net::listen(&fd, 16).expect("listen");
    std::thread::spawn(move || {
        while let Ok(c) = rustix::net::accept(&fd) {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = rustix::net::recv(&c, &mut buf[..], RecvFlags::empty()) {
                    if n == 0 || rustix::net::send(&c, &buf[..n], SendFlags::NOSIGNAL).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn seqpacket_forward_allow_local_admits_only_the_listed_uid() {
    if !root_or_skip("seqpacket_forward_allow_local_admits_only_the_listed_uid") {
        return;
    }
    let fx = fixture();
    let target = fx.path("seq.sock");
    seqpacket_echo(&target);
    let mut a = fx.serve(
        "a.toml",
        &config(
            &fx,
            "",
            &pipe(
                "seq",
                &format!("seqpacket:{}", target.display()),
                &["u1"],
                "run_as = \"gateway\"",
            ),
        ),
    );
    let hosted = fx.path("fwd-seq.sock");
    let text = forward(
        &hosted,
        &a.url("seq"),
        &fx.ca(),
        &fx.cert("u1"),
        &fx.key("u1"),
        "allow_local = [\"uid:12001\"]",
    )
    .replacen("listen = \"unix:", "listen = \"seqpacket:", 1);
    let b = fx.serve("b.toml", &text);
    wait_for_socket(&hosted);

    only_uid_12001_gets_through(&fx, &mut a, &b, &hosted, "seqpacket");
}

/// An NSS module whose `getpwuid_r` and `getgrnam_r` find nothing (so the next source,
/// `files`, answers), each noted in `$SLOW_NSS_MARK.asked` (`pw UID` or `gr NAME`, a line
/// per call); `getpwuid_r` after a wait: for uid 12003 until `$SLOW_NSS_MARK.release`
/// exists (at most 30 s), marking `.entered` and `.left` around it; for uid 12004, 30 s
/// (a hung source). For uid 12006 it fails (`EIO`, unavailable: with `[UNAVAIL=return]`
/// the lookup fails).
const SLOW_NSS_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <nss.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void mark(const char *what) {
    const char *base = getenv("SLOW_NSS_MARK");
    char path[4096];
    if (base == NULL) return;
    snprintf(path, sizeof path, "%s.%s", base, what);
    int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) close(fd);
}

static void asked(const char *kind, const char *what) {
    const char *base = getenv("SLOW_NSS_MARK");
    char path[4096], line[512];
    if (base == NULL) return;
    snprintf(path, sizeof path, "%s.asked", base);
    int fd = open(path, O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    int n = snprintf(line, sizeof line, "%s %s\n", kind, what);
    if (n > 0 && write(fd, line, (size_t)n) < 0) {}
    close(fd);
}

enum nss_status _nss_slow_getgrnam_r(const char *name, struct group *gr, char *buf, size_t len,
                                     int *errnop) {
    (void)gr; (void)buf; (void)len; (void)errnop;
    asked("gr", name);
    return NSS_STATUS_NOTFOUND;
}

enum nss_status _nss_slow_getpwuid_r(uid_t uid, struct passwd *pw, char *buf, size_t len,
                                     int *errnop) {
    (void)pw; (void)buf; (void)len; (void)errnop;
    char id[32];
    snprintf(id, sizeof id, "%u", (unsigned)uid);
    asked("pw", id);
    if (uid == 12003) {
        const char *base = getenv("SLOW_NSS_MARK");
        char release[4096];
        snprintf(release, sizeof release, "%s.release", base ? base : "");
        mark("entered");
        for (int i = 0; i < 3000 && access(release, F_OK) != 0; i++) usleep(10000);
        mark("left");
    } else if (uid == 12004) {
        sleep(30);
    } else if (uid == 12006) {
        *errnop = EIO;
        return NSS_STATUS_UNAVAIL;
    }
    return NSS_STATUS_NOTFOUND;
}
"#;

/// An echo server open to all, exported as pipe `echo` to identity `u1` by gateway `a`.
fn echo_for_u1(fx: &Fixture) -> (UnixServer, common::Gateway) {
    let echo = fx.path("echo.sock");
    let srv = UnixServer::echo(&echo);
    std::fs::set_permissions(&echo, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let a = fx.serve(
        "a.toml",
        &config(
            fx,
            "",
            &pipe("echo", &format!("unix:{}", echo.display()), &["u1"], ""),
        ),
    );
    (srv, a)
}

/// Serves `text` as `name` with [`SLOW_NSS_C`] built as the NSS source `slow`, in a mount
/// namespace of the gateway's own whose `/etc/nsswitch.conf` has the `passwd:` and
/// `group:` lines `passwd` and `group`, on one shard, with `env` added to its
/// environment. Its marks go to `fx.path("nss")`.
fn serve_with_slow_nss(
    fx: &Fixture,
    name: &str,
    text: &str,
    passwd: &str,
    group: &str,
    env: &[(&str, &str)],
) -> common::Gateway {
    let src = fx.path("slow.c");
    std::fs::write(&src, SLOW_NSS_C).expect("write slow.c");
    let lib = fx.path("libnss_slow.so.2");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("run gcc (the NSS module for this test)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nsswitch = fx.path("nsswitch.conf");
    std::fs::write(
        &nsswitch,
        format!("passwd: {passwd}\ngroup: {group}\nshadow: files\nhosts: files\n"),
    )
    .expect("write nsswitch.conf");
    fx.serve_via(
        name,
        text,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/nsswitch.conf && exec \"$@\"",
            &nsswitch.display().to_string(),
        ],
        &[
            ("PIPEBRIDGE_SHARDS", "1"),
            ("LD_LIBRARY_PATH", &fx.dir().display().to_string()),
            ("SLOW_NSS_MARK", &fx.path("nss").display().to_string()),
        ]
        .into_iter()
        .chain(env.iter().copied())
        .collect::<Vec<_>>(),
    )
}

/// A forward at `fwd.sock` to [`echo_for_u1`]'s pipe whose `allow_local` is `allow` (a
/// TOML list), served by [`serve_with_slow_nss`] with the `passwd:` and `group:` lines
/// and `env`, and listening: the echo server, the exporting and forwarding gateways, and
/// the forward's socket.
fn slow_nss_forward(
    fx: &Fixture,
    allow: &str,
    passwd: &str,
    group: &str,
    env: &[(&str, &str)],
) -> (
    UnixServer,
    common::Gateway,
    std::path::PathBuf,
    common::Gateway,
) {
    let (srv, a) = echo_for_u1(fx);
    let hosted = fx.path("fwd.sock");
    let text = forward(
        &hosted,
        &a.url("echo"),
        &fx.ca(),
        &fx.cert("u1"),
        &fx.key("u1"),
        &format!("allow_local = {allow}"),
    );
    let b = serve_with_slow_nss(fx, "b.toml", &text, passwd, group, env);
    wait_for_socket(&hosted);
    (srv, a, hosted, b)
}

/// A forward keeps the user database's answers about its callers for a while (10 s)
/// and forgets them at a reload: `allow_local` names a user and a group, and the
/// database ([`SLOW_NSS_C`], which notes each question) is asked once for three
/// sessions of one caller (whose name admits it: the group, named first, is not asked), once for
/// two refused sessions of a uid without a user (and the group once), at every session
/// of a uid whose lookup fails, and again after SIGHUP. The answers still judge right:
/// nobody is admitted each time, the others refused.
#[test]
fn a_forwards_user_database_answers_are_kept_until_a_reload() {
    if !root_or_skip("a_forwards_user_database_answers_are_kept_until_a_reload") {
        return;
    }
    let fx = fixture();
    let (_srv, _a, hosted, b) = slow_nss_forward(
        &fx,
        r#"["@pb-no-such-group", "nobody"]"#,
        "slow [UNAVAIL=return] files",
        "slow files",
        &[],
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user db")
        .expect("the system has a nobody user");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let first = Instant::now();
    // How often the database was asked `what`, while no answer can have aged out.
    let asked = |what: &str| {
        assert!(
            first.elapsed() < Duration::from_secs(10),
            "the test took {:?}, past the answers' 10 s: it cannot tell kept answers from new",
            first.elapsed()
        );
        std::fs::read_to_string(fx.path("nss.asked"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == what)
            .count()
    };
    let pw_nobody = format!("pw {uid}");
    let gr = "gr pb-no-such-group";
    for i in 0..3 {
        let v = call_as(&fx, uid, gid, &hosted, &format!("ping-{i}"));
        assert_eq!(v["data"], format!("ping-{i}"), "nobody is admitted: {v}");
    }
    assert_eq!(
        asked(&pw_nobody),
        1,
        "one question for three sessions:\n{}",
        b.log()
    );
    assert_eq!(
        asked(gr),
        0,
        "a name that admits needs no group:\n{}",
        b.log()
    );
    for i in 0..2 {
        let v = call_as(&fx, 12005, 12005, &hosted, &format!("nameless-{i}"));
        assert_eq!(v["data"], "", "a uid without a user is refused: {v}");
    }
    assert_eq!(
        asked("pw 12005"),
        1,
        "\"no such user\" is kept too:\n{}",
        b.log()
    );
    assert_eq!(asked(gr), 1, "and \"no such group\":\n{}", b.log());
    for i in 0..2 {
        let v = call_as(&fx, 12006, 12006, &hosted, &format!("failed-{i}"));
        assert_eq!(v["data"], "", "a uid whose lookup fails is refused: {v}");
    }
    assert_eq!(
        asked("pw 12006"),
        2,
        "a failed lookup is not kept:\n{}",
        b.log()
    );
    sighup(&b);
    wait_log(&b.proc, "reloaded the config");
    let v = call_as(&fx, uid, gid, &hosted, "after-reload");
    assert_eq!(v["data"], "after-reload", "nobody is admitted: {v}");
    assert_eq!(
        asked(&pw_nobody),
        2,
        "a reload forgets the answers:\n{}",
        b.log()
    );
}

/// Callers of one user that come together ask the user database once: while the first
/// one's lookup waits (uid 12003 in [`SLOW_NSS_C`]), the others wait for its answer (a
/// debug line each says so), and when it comes all are judged by it (refused: 12003 is
/// not `nobody`), with one question in all.
#[test]
fn callers_of_one_user_that_come_together_ask_the_user_database_once() {
    if !root_or_skip("callers_of_one_user_that_come_together_ask_the_user_database_once") {
        return;
    }
    let fx = fixture();
    let (_srv, _a, hosted, b) = slow_nss_forward(
        &fx,
        r#"["nobody"]"#,
        "slow files",
        "files",
        &[("PIPEBRIDGE_LOG", "info,pipebridge::client::hosted=debug")],
    );
    const CALLERS: usize = 4;
    let waiting = "waiting for the user database's answer another session asked for";
    let replies = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..CALLERS)
            .map(|i| {
                let (fx, hosted) = (&fx, &hosted);
                scope.spawn(move || call_as(fx, 12003, 12003, hosted, &format!("together-{i}")))
            })
            .collect();
        // Released once every other caller waits for the first one's answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while strip_ansi(&b.log()).matches(waiting).count() < CALLERS - 1 {
            assert!(
                Instant::now() < deadline,
                "the other callers did not wait for the first one's lookup; nss asked:\n{}\nforward log:\n{}",
                std::fs::read_to_string(fx.path("nss.asked")).unwrap_or_default(),
                b.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(fx.path("nss.release"), b"").expect("release the slow lookup");
        callers
            .into_iter()
            .map(|c| c.join().expect("caller"))
            .collect::<Vec<_>>()
    });
    for v in &replies {
        assert_eq!(v["data"], "", "uid 12003 is not nobody and is refused: {v}");
    }
    let asked = std::fs::read_to_string(fx.path("nss.asked")).unwrap_or_default();
    assert_eq!(
        asked.lines().filter(|l| *l == "pw 12003").count(),
        1,
        "one question for {CALLERS} callers:\n{asked}\nforward log:\n{}",
        b.log()
    );
}

/// A forward's `allow_local` lookups of a caller's name run off the thread that runs the
/// forward's other sessions: while the user database holds one caller's answer (an NSS
/// module that waits, loaded in the forwarding gateway's own mount namespace), another
/// forward's session on the same single shard opens, echoes and ends. Then the slow
/// caller is refused (uid 12003 is not `nobody`); a caller whose lookup never answers
/// is refused after the lookup timeout (10 s); and `nobody` is admitted.
#[test]
fn a_slow_user_database_holds_only_the_session_that_asks_it() {
    if !root_or_skip("a_slow_user_database_holds_only_the_session_that_asks_it") {
        return;
    }
    let fx = fixture();
    let (_srv, a) = echo_for_u1(&fx);
    let (slow, quick) = (fx.path("fwd-named.sock"), fx.path("fwd-open.sock"));
    let fwd = |listen: &Path, extra: &str| {
        forward(
            listen,
            &a.url("echo"),
            &fx.ca(),
            &fx.cert("u1"),
            &fx.key("u1"),
            extra,
        )
    };
    let text = fwd(&slow, "allow_local = [\"nobody\"]") + &fwd(&quick, "");
    let (entered, left, release) = (
        fx.path("nss.entered"),
        fx.path("nss.left"),
        fx.path("nss.release"),
    );
    let b = serve_with_slow_nss(&fx, "b.toml", &text, "slow files", "files", &[]);
    wait_for_socket(&slow);
    wait_for_socket(&quick);

    let slow_call = std::thread::scope(|scope| {
        let caller = scope.spawn(|| call_as(&fx, 12003, 12003, &slow, "ping-12003"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !entered.exists() {
            assert!(
                Instant::now() < deadline,
                "the forward never asked the slow user database:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut s = std::os::unix::net::UnixStream::connect(&quick).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.write_all(b"ping-quick").expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap_or_else(|e| {
            panic!(
                "the other forward's session waited for the slow lookup ({e}); forward log:\n{}",
                b.log()
            )
        });
        assert_eq!(
            back,
            b"ping-quick",
            "the other forward's session echoes; forward log:\n{}",
            b.log()
        );
        assert!(!left.exists(), "the slow lookup is still waiting");
        std::fs::write(&release, b"").expect("release the slow lookup");
        caller.join().expect("slow caller")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(left.exists(), "the slow lookup ran to its end");
    assert_eq!(
        slow_call["data"], "",
        "uid 12003 is not nobody and is closed without data: {slow_call}"
    );
    let hung = call_as(&fx, 12004, 12004, &slow, "ping-12004");
    assert_eq!(
        hung["data"], "",
        "a caller whose lookup never answers is closed without data: {hung}"
    );
    let why = "the user database did not answer within 10 s";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !strip_ansi(&b.log()).contains(why) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        strip_ansi(&b.log()).contains(why),
        "the forward logs why:\n{}",
        b.log()
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user db")
        .expect("the system has a nobody user");
    let v = call_as(
        &fx,
        nobody.uid.as_raw(),
        nobody.gid.as_raw(),
        &slow,
        "ping-nobody",
    );
    assert_eq!(v["data"], "ping-nobody", "nobody is admitted: {v}");
    assert!(
        strip_ansi(&b.log()).contains("allow_local"),
        "the forward logs the refusal:\n{}",
        b.log()
    );
}

#[test]
fn forward_picks_credentials_per_local_caller() {
    if !root_or_skip("forward_picks_credentials_per_local_caller") {
        return;
    }
    let fx = fixture();
    let mut a = fx.serve(
        "a.toml",
        &config(
            &fx,
            "",
            &pipe(
                "whoami",
                "exec:sh -c 'echo $PIPEBRIDGE_IDENTITY $(id -u)'",
                &["nobody", "daemon"],
                "",
            ),
        ),
    );
    let hosted = fx.path("fwd-user.sock");
    let pki = fx.p("pki");
    let user = |name: &str| {
        nix::unistd::User::from_name(name)
            .expect("user db")
            .unwrap_or_else(|| panic!("the system has a {name} user"))
    };
    let (nobody, daemon, bin) = (user("nobody"), user("daemon"), user("bin"));
    let chown = |p: &Path, u: &nix::unistd::User| {
        let ids = (
            rustix::fs::Uid::from_raw(u.uid.as_raw()),
            rustix::fs::Gid::from_raw(u.gid.as_raw()),
        );
        rustix::fs::chown(p, Some(ids.0), Some(ids.1)).expect("chown");
    };
    // Each user's {user} files are the user's own.
    for u in [&nobody, &daemon] {
        for ext in ["pem", "key"] {
            chown(&fx.path(&format!("pki/{}.{ext}", u.name)), u);
        }
    }
    // Credentials in each user's own dir: nobody's are nobody's files; daemon's are
    // symlinks to nobody's, bin's to root-owned copies of them: files the gateway can
    // read and the caller cannot.
    let own = fx.path("users");
    for ext in ["pem", "key"] {
        std::fs::copy(
            fx.path(&format!("pki/nobody.{ext}")),
            fx.path(&format!("root-nobody.{ext}")),
        )
        .expect("copy");
    }
    for (u, target) in [
        (&nobody, ""),
        (&daemon, "../nobody/client"),
        (&bin, "../../root-nobody"),
    ] {
        let dir = own.join(&u.name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for ext in ["pem", "key"] {
            let file = dir.join(format!("client.{ext}"));
            if target.is_empty() {
                std::fs::copy(fx.path(&format!("pki/nobody.{ext}")), &file).expect("copy");
                chown(&file, u);
            } else {
                std::os::unix::fs::symlink(format!("{target}.{ext}"), &file).expect("symlink");
            }
        }
        chown(&dir, u);
    }
    let hosted_own = fx.path("fwd-own.sock");
    let mut b = fx.serve(
        "b.toml",
        &(forward(
            &hosted,
            &a.url("whoami"),
            &fx.ca(),
            &format!("{pki}/{{user}}.pem"),
            &format!("{pki}/{{user}}.key"),
            "",
        ) + &forward(
            &hosted_own,
            &a.url("whoami"),
            &fx.ca(),
            &format!("{}/{{user}}/client.pem", own.display()),
            &format!("{}/{{user}}/client.key", own.display()),
            "",
        )),
    );
    wait_for_socket(&hosted);
    wait_for_socket(&hosted_own);
    let v = call_as(
        &fx,
        nobody.uid.as_raw(),
        nobody.gid.as_raw(),
        &hosted_own,
        "",
    );
    assert_eq!(
        v["data"].as_str().map(str::trim),
        Some(format!("nobody {}", nobody.uid).as_str()),
        "nobody's own files: {v}"
    );
    let v = call_as(
        &fx,
        daemon.uid.as_raw(),
        daemon.gid.as_raw(),
        &hosted_own,
        "",
    );
    assert_eq!(
        v["data"].as_str(),
        Some(""),
        "daemon's links to nobody's files must not make it nobody: {v}"
    );
    let refusal = format!(
        "belongs to uid {}, not to the local caller (uid {})",
        nobody.uid, daemon.uid
    );
    b.proc
        .wait_until(Duration::from_secs(10), |log| log.contains(&refusal));
    let v = call_as(&fx, bin.uid.as_raw(), bin.gid.as_raw(), &hosted_own, "");
    assert_eq!(
        v["data"].as_str(),
        Some(""),
        "bin's links to root-owned copies of nobody's files must not make it nobody: {v}"
    );
    let refusal = format!(
        "belongs to uid 0, not to the local caller (uid {})",
        bin.uid
    );
    b.proc
        .wait_until(Duration::from_secs(10), |log| log.contains(&refusal));
    for name in ["nobody", "daemon"] {
        let u = user(name);
        let v = call_as(&fx, u.uid.as_raw(), u.gid.as_raw(), &hosted, "");
        assert_eq!(
            v["data"].as_str().map(str::trim),
            Some(format!("{name} {}", u.uid).as_str()),
            "local caller {name} reaches the exporting gateway as identity {name} (and runs as it there): {v}\nforward log:\n{}",
            b.log()
        );
    }
    // The audit line is written when the session ends, which may be just after the
    // caller saw EOF.
    a.proc.wait_until(Duration::from_secs(10), |log| {
        ["nobody", "daemon"].iter().all(|name| {
            audit_lines(log)
                .iter()
                .any(|l| field(l, "identity") == Some(name))
        })
    });
}

// === test: revocation ===

/// Writes a CRL signed by the fixture's CA that revokes `client`'s certificate.
fn write_crl(fx: &Fixture, client: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let leaf_der = CertificateDer::from_pem_file(fx.cert(client)).expect("client PEM");
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der.as_ref()).expect("parse client");
    let serial = leaf.tbs_certificate.raw_serial().to_vec();
    let (params, key) = ca_params(fx);
    let issuer = rcgen::Issuer::new(params, &key);
    let crl = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2020, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: rcgen::date_time_ymd(2020, 1, 1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .expect("sign CRL");
    let path = fx.write("clients.crl", &crl.pem().expect("CRL PEM"));
    path.to_string_lossy().into_owned()
}

/// The fixture CA's parameters (its subject, for issuing) and key.
fn ca_params(fx: &Fixture) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca_der = CertificateDer::from_pem_file(fx.ca()).expect("CA PEM");
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der.as_ref()).expect("parse CA");
    let cn = ca
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .expect("CA CN")
        .to_string();
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(fx.p("pki/ca.key")).expect("ca.key"))
            .expect("CA key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    (params, key)
}

/// A certificate and key for `client` from the fixture CA that expire `secs` seconds
/// from now (paths `pki/{client}-short.pem` and `.key`), and that expiry in seconds
/// since the Unix epoch.
fn short_lived_cert(fx: &Fixture, client: &str, secs: u64) -> (String, String, u64) {
    let (params, key) = ca_params(fx);
    let issuer = rcgen::Issuer::new(params, &key);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, client);
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = epoch + Duration::from_secs(now - 3600);
    leaf.not_after = epoch + Duration::from_secs(now + secs);
    let cert = leaf.signed_by(&leaf_key, &issuer).expect("sign leaf");
    let pem = fx.write(&format!("pki/{client}-short.pem"), &cert.pem());
    let key = fx.write(
        &format!("pki/{client}-short.key"),
        &leaf_key.serialize_pem(),
    );
    (
        pem.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
        now + secs,
    )
}

/// What a local socket answers `data` (written, then half-closed) until it closes;
/// what came before an error, if one ends it (a refused session's forward may close
/// the socket before the write's end is read).
fn request(path: &Path, data: &[u8]) -> Vec<u8> {
    let mut s = common::unix_connect(path);
    let t = Some(Duration::from_secs(20));
    s.set_read_timeout(t).expect("timeout");
    s.set_write_timeout(t).expect("timeout");
    if s.write_all(data).is_err() || s.shutdown(std::net::Shutdown::Write).is_err() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// A CRL brought in by a reload ends the revoked certificate's live session and asks
/// its connection to close; the same certificate's new sessions on another warm
/// HTTP/2 connection, opened before the reload (which no handshake checks again), are
/// refused with 401. Another certificate's sessions go on. A reload that swaps the
/// client CA refuses that one's new sessions the same way, while its live session goes
/// on (a reload drops no session but a revoked one).
#[test]
fn a_reloaded_crl_ends_and_refuses_the_revoked_certificate_on_its_warm_connection() {
    let fx = fixture();
    let (_echo, text) = echo_export(&fx, &["u1", "u2"]);
    let gw = fx.serve("gw.toml", &text(""));
    let forward =
        |name: &str, client: &str| warm_forward(&fx, name, &gw.url("echo"), &fx.cert_args(client));
    // For u1 and u2 each: a forward that will hold a live session, and one that only
    // keeps its connection warm.
    let (s1, _f1) = forward("u1-live", "u1");
    let (s1w, f1w) = forward("u1-warm", "u1");
    let (s2, _f2) = forward("u2-live", "u2");
    let (s2w, f2w) = forward("u2-warm", "u2");
    let t = Duration::from_secs(20);
    for (sock, msg) in [(&s1w, &b"one"[..]), (&s2w, b"two")] {
        for _ in 0..2 {
            assert_eq!(common::unix_request(sock, msg, t), msg);
        }
    }
    let live = |sock: &Path, msg: &[u8]| {
        let mut s = common::unix_connect(sock);
        s.set_read_timeout(Some(t)).expect("timeout");
        live_echo(&mut s, msg);
        s
    };
    let mut live2 = live(&s2, b"u2 live");
    let mut live1 = live(&s1, b"u1 live");
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("refused") && l.contains("status=401"))
            .count()
    };
    let reload = |text: String| {
        std::fs::write(fx.path("gw.toml"), text).expect("rewrite");
        sighup(&gw);
    };

    // A CRL revokes u2.
    let crl = write_crl(&fx, "u2");
    let with_crl = text(&format!("crl = [{}]\n", q(&crl)));
    reload(with_crl.clone());
    // Its live session ends (its caller reads the end of the stream), and that
    // session's connection is asked to close.
    assert_session_ended(&mut live2, &gw, "the revoked certificate's");
    wait_log(&gw.proc, "the client certificate was revoked");
    wait_log(
        &gw.proc,
        "client certificate is no longer trusted (its live",
    );
    // Its new session on its other warm connection: refused over HTTP with 401 (a new
    // TLS handshake would have failed before any HTTP).
    let refused = request(&s2w, b"three");
    assert!(
        refused.is_empty(),
        "a revoked certificate opened a session: {refused:?}"
    );
    wait_log(&f2w, "401");
    wait_log_until(&gw.proc, "the gateway's refusal over HTTP", |l| {
        refusals(l) >= 1
    });
    // That connection is asked to close too; the next try cannot do better.
    assert!(request(&s2w, b"again").is_empty());
    // u1's live session and new sessions go on.
    live_echo(&mut live1, b"u1 still live");
    assert_eq!(common::unix_request(&s1w, b"four", t), b"four");
    let before = refusals(&gw.log());

    // A new client CA: u1's certificate no longer chains to it.
    let other = fx.path("pki2");
    pki::init(&CertsInit {
        dir: other.clone(),
        server_names: vec!["localhost".into()],
        clients: Vec::new(),
        force: false,
    })
    .expect("second PKI");
    let reloads = |log: &str| log.matches("reloaded the config").count();
    let reloaded = reloads(&gw.log());
    reload(with_crl.replace(
        &q(&fx.ca()),
        &q(&other.join("ca.pem").display().to_string()),
    ));
    // Once the reload is done (no u1 session in flight through it), u1's next session
    // on a warm connection is refused over HTTP.
    let deadline = Instant::now() + Duration::from_secs(15);
    while reloads(&gw.log()) == reloaded {
        assert!(Instant::now() < deadline, "no reload:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = request(&s1w, b"five");
    assert!(
        got.is_empty(),
        "u1 opened a session after its CA was removed"
    );
    wait_log_until(
        &gw.proc,
        "u1's refusal over HTTP (on its warm connection)",
        |l| refusals(l) > before,
    );
    wait_log(&f1w, "no longer trusted");
    // Its live session goes on: a CA rotation is not a revocation.
    live_echo(&mut live1, b"u1 live after the CA swap");
}

/// A client certificate that expires while its forward keeps an HTTP/2 connection warm:
/// the handshake checked it at the start, so each later request checks its dates. Once
/// it has expired, the next session on that connection is refused with 401 (and the
/// connection asked to close), while the session opened before goes on. So are the
/// sessions on connections that resume the forward's TLS session; a fresh handshake
/// rejects the certificate. A CRL reloaded later, which revokes it, ends that session.
#[test]
fn an_expired_certificate_opens_no_session_on_its_warm_connection() {
    let fx = fixture();
    let (_echo, text) = echo_export(&fx, &["u1"]);
    let gw = fx.serve("gw.toml", &text(""));
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let t = Duration::from_secs(20);
    // The certificate must outlive the start of the forward and the sessions before its
    // expiry; on a machine too loaded for 8 s, once more with 30 s.
    let mut ready = None;
    for life in [8, 30] {
        let (cert, key, expires) = short_lived_cert(&fx, "u1", life);
        let creds = [
            "--ca".into(),
            fx.ca(),
            "--cert".into(),
            cert,
            "--key".into(),
            key,
        ];
        let (sock, fwd) = warm_forward(&fx, &format!("fwd-{life}"), &gw.url("echo"), &creds);
        // Fill the forward's pool (two connections without shards), and keep a session.
        for msg in [&b"one"[..], b"two"] {
            assert_eq!(common::unix_request(&sock, msg, t), msg);
        }
        let mut live = common::unix_connect(&sock);
        live.set_read_timeout(Some(t)).expect("timeout");
        live_echo(&mut live, b"live");
        if unix_now() < expires {
            ready = Some((sock, fwd, live, expires));
            break;
        }
    }
    let (sock, mut fwd, mut live, expires) =
        ready.expect("the sessions before the expiry took longer than the certificate's 30 s");
    // Past notAfter (checked in whole seconds: strictly after it).
    while unix_now() <= expires {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = request(&sock, b"late");
    assert!(
        got.is_empty(),
        "an expired certificate opened a session: {got:?}"
    );
    wait_log(&fwd, "no longer trusted (expired");
    wait_log(&gw.proc, "status=401");
    // The session opened before the expiry goes on.
    live_echo(&mut live, b"still live");
    // Later sessions are refused the same way: on the other warm connection, and on
    // new connections, which resume the forward's TLS session (a resumed handshake does
    // not check the certificate again; the request on it does).
    for _ in 0..3 {
        assert!(request(&sock, b"again").is_empty());
    }
    // (The forward's log is read as it comes: its last line may follow the request.)
    fwd.wait_until(Duration::from_secs(15), |log| {
        log.matches("no longer trusted (expired").count() >= 4
    });
    // A client without a session to resume: its handshake rejects the certificate.
    let out = fx.connect(&gw.url("echo"), "u1-short", b"x");
    assert_eq!(out.code, Some(3), "stderr:\n{}", out.stderr);
    assert!(
        out.stderr.contains("the server rejected our certificate"),
        "stderr:\n{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
    // A reload brings in a CRL that revokes it: its live session ends, as a revoked
    // certificate's do (its chain is checked as of its expiry).
    let crl = write_crl(&fx, "u1-short");
    std::fs::write(fx.path("gw.toml"), text(&format!("crl = [{}]\n", q(&crl)))).expect("rewrite");
    sighup(&gw);
    assert_session_ended(&mut live, &gw, "the revoked, expired certificate's");
    wait_log(&gw.proc, "the client certificate was revoked");
}

/// A client may present certificates its verified path does not need, and one of them
/// may have expired (an old cross-signed intermediate): the handshake accepts it, and so
/// do the requests after it, which verify the chain again instead of reading the
/// expired one as the client's.
#[test]
fn an_expired_certificate_the_path_does_not_need_refuses_nothing() {
    let fx = fixture();
    let gw = fx.serve(
        "gw.toml",
        &config(
            &fx,
            "",
            &pipe("hello", "exec:echo ok", &["u1"], "run_as = \"gateway\""),
        ),
    );
    // u1's certificate followed by an unrelated one that expired in 2021.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut old = rcgen::CertificateParams::new(vec!["old.example".into()]).expect("params");
    old.not_before = rcgen::date_time_ymd(2020, 1, 1);
    old.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let old = old.self_signed(&key).expect("old certificate");
    let leaf = std::fs::read_to_string(fx.cert("u1")).expect("u1.pem");
    let both = fx.write("pki/u1-extra.pem", &format!("{leaf}{}", old.pem()));
    let both = both.to_string_lossy().into_owned();
    let (ca, key) = (fx.ca(), fx.key("u1"));
    let args = [
        "connect",
        &gw.url("hello"),
        "--ca",
        &ca,
        "--cert",
        &both,
        "--key",
        &key,
    ];
    let out = fx.run(&args, b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1 with an extra expired certificate"),
        "ok\n"
    );
}

/// An echo server in the fixture, and the gateway config (given its extra `[tls]`
/// lines) that exports it as pipe `echo` to `allow`.
fn echo_export<'a>(
    fx: &'a Fixture,
    allow: &'a [&'a str],
) -> (UnixServer, impl Fn(&str) -> String + 'a) {
    let target = fx.path("echo.sock");
    let echo = UnixServer::echo(&target);
    let endpoint = format!("unix:{}", target.display());
    let text = move |tls: &str| {
        config(
            fx,
            tls,
            &pipe("echo", &endpoint, allow, "run_as = \"gateway\""),
        )
    };
    (echo, text)
}

/// Starts `pipebridge forward` from `{name}.sock` to `url` with credential flags `creds`,
/// without shards; returns its socket once it is ready. Such a forward keeps a pool of
/// two warm connections: its first sessions fill it, later ones take from it.
fn warm_forward(
    fx: &Fixture,
    name: &str,
    url: &str,
    creds: &[String],
) -> (std::path::PathBuf, Proc) {
    let sock = fx.path(&format!("{name}.sock"));
    let mut p = fx.spawn_forward_with(&sock, url, creds, &[("PIPEBRIDGE_SHARDS", "1")]);
    p.wait_for_line("pipebridge: forwarding ", common::START_TIMEOUT);
    (sock, p)
}

/// Writes `msg` on a live session and reads the same bytes back.
fn live_echo(s: &mut std::os::unix::net::UnixStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).expect("live echo");
    assert_eq!(buf, msg);
}

/// Asserts that a live session's caller reads the end of its stream (`whose` session,
/// for the message).
fn assert_session_ended(
    live: &mut std::os::unix::net::UnixStream,
    gw: &common::Gateway,
    whose: &str,
) {
    let mut rest = Vec::new();
    let ended = live.read_to_end(&mut rest);
    assert!(
        matches!(ended, Ok(0)),
        "{whose} live session went on: {ended:?}; gateway log:\n{}",
        gw.log()
    );
}

/// Sends SIGHUP to the gateway (a reload).
fn sighup(gw: &common::Gateway) {
    let hup = Command::new("kill")
        .args(["-HUP", &gw.proc.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
}

/// Waits (at most 15 s) until `p`'s log holds `needle`.
fn wait_log(p: &Proc, needle: &str) {
    wait_log_until(p, &format!("{needle:?}"), |l| l.contains(needle));
}

/// Waits (at most 15 s) until `p`'s log satisfies `pred` (`what` names it). A process's
/// log is read as it comes, so a line may arrive after what it caused.
fn wait_log_until(p: &Proc, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pred(&p.log()) {
        assert!(
            Instant::now() < deadline,
            "no {what} in the log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn revoked_client_certificate_is_rejected() {
    let fx = fixture();
    let crl = write_crl(&fx, "u2");
    let gw = fx.serve(
        "gw.toml",
        &config(
            &fx,
            &format!("crl = [{}]\n", q(&crl)),
            &pipe(
                "hello",
                "exec:echo ok",
                &["u1", "u2"],
                "run_as = \"gateway\"",
            ),
        ),
    );
    let out = fx.connect(&gw.url("hello"), "u2", b"");
    assert_eq!(
        out.code,
        Some(3),
        "a revoked certificate: exit 3; stdout {:?}; stderr:\n{}",
        out.out(),
        out.stderr
    );
    assert!(
        out.stderr.contains("the server rejected our certificate"),
        "stderr:\n{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "no data for a revoked client");
    let out = fx.connect(&gw.url("hello"), "u1", b"");
    assert_eq!(
        stdout_of(&out, &gw, "u1"),
        "ok\n",
        "a certificate not on the CRL works"
    );
}
