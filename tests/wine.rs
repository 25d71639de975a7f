//! Linux ↔ Windows end to end (issue 5): the real `pipebridge.exe` runs under Wine next to
//! the Windows test program `npipe-echo.exe` (examples/npipe-echo.rs, raw Win32 pipes),
//! and the Linux `pipebridge` talks to it over TLS + WebSocket on 127.0.0.1:
//! - `connect` → Windows gateway → a message-mode pipe: boundaries, zero-length and
//!   1 MiB messages, and the pipe's close arriving as EOF (`connect` exits 0);
//! - a Linux forward → Windows gateway → a byte-mode pipe with `npipe_eof =
//!   "zero_message"`: 2 MiB both ways and half-close carried into the pipe and back;
//! - a pipe *hosted* by the Windows gateway (`[[forward]] listen = "npipe:..."`) reaching
//!   a Linux export, driven by a Windows pipe client;
//! - `allow_local` on a hosted pipe, from the caller's process token;
//! - an `exec:` export on Windows (anonymous pipes to a child: bytes, EOF, exit code) and
//!   the Windows `connect` (stdio) reaching a Linux export;
//! - `run_as = "client"` on Windows failing closed (502) when no access token can be had;
//! - Unix-only endpoint kinds being config errors on Windows.
//!
//! Needs `PIPEBRIDGE_WINE_EXE` and `PIPEBRIDGE_WINE_ECHO` (the cross-built .exe files) and
//! a Wine prefix in `WINEPREFIX` with the bcryptprimitives shim: scripts/windows-ci.sh sets
//! all of it up and runs this suite. Without them the tests say so and skip, except under
//! CI (`CI` set), where a skip is a failure.
#![cfg(unix)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

struct WineBins {
    gateway: PathBuf,
    echo: PathBuf,
}

fn wine_bins() -> Option<WineBins> {
    let get = |k: &str| {
        std::env::var_os(k)
            .map(PathBuf::from)
            .filter(|p| p.exists())
    };
    match (get("PIPEBRIDGE_WINE_EXE"), get("PIPEBRIDGE_WINE_ECHO")) {
        (Some(gateway), Some(echo)) => Some(WineBins { gateway, echo }),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the Wine tests: run them through scripts/windows-ci.sh, which sets PIPEBRIDGE_WINE_EXE and PIPEBRIDGE_WINE_ECHO"
            );
            eprintln!("skipping: PIPEBRIDGE_WINE_EXE / PIPEBRIDGE_WINE_ECHO not set (scripts/windows-ci.sh runs these tests)");
            None
        }
    }
}

fn wine(exe: &PathBuf) -> Command {
    let mut c = Command::new("wine");
    c.arg(exe).env("WINEDEBUG", "-all").env_remove("DISPLAY");
    c
}

/// `npipe-echo.exe serve NAME MODE [COUNT]`, ready once it said so.
fn echo_server(fx: &Fixture, bins: &WineBins, name: &str, mode: &str, count: Option<u32>) -> Proc {
    let mut cmd = wine(&bins.echo);
    cmd.args(["serve", name, mode]);
    if let Some(c) = count {
        cmd.arg(c.to_string());
    }
    let mut p = Proc::spawn(cmd, fx.dir(), false);
    p.wait_until(START_TIMEOUT, |log| log.contains("ready"));
    p
}

/// `pipebridge.exe serve` under Wine with config `text`.
fn windows_gateway(fx: &Fixture, bins: &WineBins, file: &str, text: &str) -> Gateway {
    let cfg = fx.write(file, text);
    let mut cmd = wine(&bins.gateway);
    cmd.arg("serve").arg("--config").arg(&cfg);
    scrub(&mut cmd);
    let mut gw = Gateway {
        proc: Proc::spawn(cmd, fx.dir(), false),
        port: 0,
    };
    if text.contains("[server]") {
        let line = gw
            .proc
            .wait_for_line("pipebridge: listening on ", START_TIMEOUT);
        gw.port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    }
    if text.contains("[[forward]]") {
        gw.proc
            .wait_until(START_TIMEOUT, |log| log.contains("pipebridge: forwarding "));
    }
    gw
}

/// A Linux gateway exporting `cat` (`exec:cat`) to alice, its config written to `file`.
fn linux_cat(fx: &Fixture, file: &str) -> Gateway {
    fx.serve(
        file,
        &fx.server_config(
            "[[pipe]]\nname = \"cat\"\nendpoint = \"exec:cat\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n",
        ),
    )
}

/// A `[[forward]]` hosting `npipe:PIPE` towards `url` with alice's certificate, plus
/// `extra` lines.
fn npipe_forward(fx: &Fixture, pipe: &str, url: &str, extra: &str) -> String {
    format!(
        "[[forward]]\nlisten = \"npipe:{pipe}\"\nto = \"{url}\"\nca = {}\ncert = {}\nkey = {}\n{extra}\n",
        q(&fx.ca()),
        q(&fx.cert("alice")),
        q(&fx.key("alice"))
    )
}

/// Runs `npipe-echo.exe client PIPE MODE SIZES` under Wine.
fn npipe_client(fx: &Fixture, bins: &WineBins, pipe: &str, mode: &str, sizes: &str) -> Output {
    let mut client = wine(&bins.echo);
    client.args(["client", pipe, mode, sizes]);
    run_command(client, fx.dir(), b"", Duration::from_secs(60))
}

/// A `[[pipe]]` NAME exporting `npipe:PIPE` to `allow`, plus `extra` lines.
fn npipe_export(name: &str, pipe: &str, allow: &str, extra: &str) -> String {
    format!("[[pipe]]\nname = \"{name}\"\nendpoint = \"npipe:{pipe}\"\nallow = [\"{allow}\"]\n{extra}\n")
}

fn unique(tag: &str) -> String {
    format!("pbwine-{tag}-{}", std::process::id())
}

fn u32be(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

#[test]
fn connect_reaches_a_message_pipe_served_under_wine() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let pipe = unique("msg");
    let sizes = [0usize, 1, 300, 0, 70_000, 1 << 20, 5];
    let _echo = echo_server(&fx, &bins, &pipe, "message", Some(sizes.len() as u32));
    let gw = windows_gateway(
        &fx,
        &bins,
        "win.toml",
        &fx.server_config(&npipe_export(
            "msg",
            &pipe,
            "alice",
            "run_as = \"gateway\"\nmode = \"message\"",
        )),
    );
    let messages: Vec<Vec<u8>> = sizes.iter().map(|&n| random_bytes(n)).collect();
    let stdin = u32be(&messages);
    let mut args = vec![
        "connect".to_string(),
        gw.url("msg"),
        "--mode".into(),
        "message".into(),
        "--framing".into(),
        "u32be".into(),
    ];
    args.extend(fx.cert_args("alice"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fx.run_env(&a, &[], &stdin, Duration::from_secs(60));
    out.expect_code(0);
    assert!(
        out.stdout == stdin,
        "the echoed messages differ: got {} bytes, sent {}; gateway log:\n{}",
        out.stdout.len(),
        stdin.len(),
        gw.log()
    );
}

#[test]
fn linux_forward_reaches_a_byte_pipe_under_wine_and_half_close_travels() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let pipe = unique("bytes");
    let _echo = echo_server(&fx, &bins, &pipe, "byte", None);
    let gw = windows_gateway(
        &fx,
        &bins,
        "win.toml",
        &fx.server_config(&npipe_export(
            "bytes",
            &pipe,
            "alice",
            "run_as = \"gateway\"\nnpipe_eof = \"zero_message\"",
        )),
    );
    let sock = fx.path("fwd.sock");
    let mut fwd = fx.spawn_forward(&sock, &gw.url("bytes"), "alice");
    fwd.wait_until(START_TIMEOUT, |log| log.contains("forwarding"));
    let data = random_bytes(2 << 20);
    // Writes everything, half-closes, reads to EOF: the EOF can only come back if the
    // half-close reached the pipe as a zero-length message and the server then closed.
    let reply = unix_request(&sock, &data, Duration::from_secs(60));
    assert_eq!(reply.len(), data.len(), "gateway log:\n{}", gw.log());
    assert!(reply == data, "bytes differ");
}

#[test]
fn a_pipe_hosted_by_the_windows_gateway_reaches_a_linux_export() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let linux = linux_cat(&fx, "linux.toml");
    let pipe = unique("hosted");
    let _win = windows_gateway(
        &fx,
        &bins,
        "win-fwd.toml",
        &npipe_forward(&fx, &pipe, &linux.url("cat"), "max_instances = 4"),
    );
    let out = npipe_client(&fx, &bins, &pipe, "byte", "1,1000,70000,300000");
    out.expect_code(0);
    assert_eq!(out.out().trim(), "ok 4", "{}", out.stderr);
}

#[test]
fn run_as_client_on_windows_fails_closed_without_a_token() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let pipe = unique("imp");
    let _echo = echo_server(&fx, &bins, &pipe, "byte", None);
    let gw = windows_gateway(
        &fx,
        &bins,
        "win.toml",
        &fx.server_config(&format!(
            "[[identity]]\nname = \"carol\"\ncert_cn = \"carol\"\nuser = \"carol\"\n\n{}",
            npipe_export("imp", &pipe, "carol", "run_as = \"client\"")
        )),
    );
    let out = fx.connect(&gw.url("imp"), "carol", b"hello");
    out.expect_code(1);
    assert!(
        out.stderr.contains("502") && out.stderr.contains("endpoint_unavailable"),
        "{}",
        out.stderr
    );
    // (The log line may reach the test's reader of the gateway's stderr after the
    // refusal reached the client: waited for, bounded.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut log = gw.log();
    while !log.contains("no Windows access token for \"carol\"")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        log = gw.log();
    }
    assert!(
        log.contains("no Windows access token for \"carol\""),
        "the gateway must say why it refused:\n{log}"
    );
}

#[test]
fn unix_endpoint_kinds_are_config_errors_on_windows() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let cfg = fx.write(
        "bad.toml",
        &fx.server_config(
            "[[pipe]]\nname = \"s\"\nendpoint = \"unix:/run/x.sock\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n\n\
             [[pipe]]\nname = \"e\"\nendpoint = \"exec:cmd /c echo hi\"\nallow = [\"alice\"]\n",
        ),
    );
    let mut cmd = wine(&bins.gateway);
    cmd.arg("check-config").arg("--config").arg(&cfg);
    let out = run_command(cmd, fx.dir(), b"", Duration::from_secs(60));
    out.expect_code(2);
    assert!(
        out.stderr.contains("pipe \"s\".endpoint")
            && out
                .stderr
                .contains("unix: endpoints exist on Unix builds only"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("pipe \"e\".run_as") && out.stderr.contains("run_as = \"gateway\""),
        "{}",
        out.stderr
    );
}

/// `text` without ANSI colour sequences (Wine presents the test's pipe as a console).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The account Wine runs programs as, as the gateway reads it from a caller's token.
fn wine_account(fx: &Fixture, bins: &WineBins) -> String {
    let linux = linux_cat(fx, "linux-acct.toml");
    let pipe = unique("acct");
    let mut win = windows_gateway(
        fx,
        bins,
        "win-acct.toml",
        &npipe_forward(fx, &pipe, &linux.url("cat"), ""),
    );
    npipe_client(fx, bins, &pipe, "byte", "10").expect_code(0);
    // The session span names the caller: `local_caller="pid N (DOMAIN\\NAME)"`.
    win.proc
        .wait_until(START_TIMEOUT, |log| log.contains("forward session end"));
    let log = strip_ansi(&win.log());
    let start = log
        .find("local_caller=")
        .unwrap_or_else(|| panic!("no local_caller in the log:\n{log}"));
    let rest = &log[start..];
    let open = rest.find('(').expect("(") + 1;
    let close = rest.find(')').expect(")");
    rest[open..close].to_string()
}

#[test]
fn allow_local_admits_the_callers_account_and_refuses_others() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let account = wine_account(&fx, &bins);
    let bare = account.rsplit('\\').next().unwrap().to_string();
    assert!(!bare.is_empty(), "{account:?}");
    let linux = linux_cat(&fx, "linux.toml");
    let ok_pipe = unique("allowed");
    let no_pipe = unique("denied");
    let fwd = |pipe: &str, rule: &str| {
        npipe_forward(
            &fx,
            pipe,
            &linux.url("cat"),
            &format!("allow_local = [{}]", q(rule)),
        )
    };
    let cfg = format!(
        "{}{}",
        fwd(&ok_pipe, &bare.to_uppercase()),
        fwd(&no_pipe, "somebody-else")
    );
    let win = windows_gateway(&fx, &bins, "win-allow.toml", &cfg);
    npipe_client(&fx, &bins, &ok_pipe, "byte", "1,5000").expect_code(0);
    npipe_client(&fx, &bins, &no_pipe, "byte", "1,5000").expect_code(1);
    assert!(
        win.log().contains("local caller not in allow_local"),
        "{}",
        win.log()
    );
}

#[test]
fn exec_pipes_and_connect_work_on_windows() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    // As a Windows path (Wine's Z: is /): the child's working directory is on C:.
    let echo = format!("Z:{}", bins.echo.to_string_lossy().replace('/', "\\"));
    let gw = windows_gateway(
        &fx,
        &bins,
        "win.toml",
        &fx.server_config(&format!(
            "[[pipe]]\nname = \"cat\"\nendpoint = \"exec\"\nargv = [{e}, \"cat\"]\nallow = [\"alice\"]\nrun_as = \"gateway\"\n\n\
             [[pipe]]\nname = \"seven\"\nendpoint = \"exec\"\nargv = [{e}, \"exit\", \"7\"]\nallow = [\"alice\"]\nrun_as = \"gateway\"\n",
            e = q(&echo)
        )),
    );
    // Linux connect → exec: child on Windows: all bytes back, EOF, exit status 0.
    let data = random_bytes(1 << 20);
    let out = fx.run_env(
        &[
            &["connect", &gw.url("cat")][..],
            &fx.cert_args("alice")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()[..],
        ]
        .concat(),
        &[],
        &data,
        Duration::from_secs(60),
    );
    out.expect_code(0);
    assert!(out.stdout == data, "got {} bytes back", out.stdout.len());
    // The child's exit code comes back as connect's.
    fx.connect(&gw.url("seven"), "alice", b"").expect_code(7);

    // The Windows connect (stdio) → a Linux export.
    let linux = fx.serve(
        "linux.toml",
        &fx.server_config(
            "[[pipe]]\nname = \"wc\"\nendpoint = \"exec:wc -c\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n",
        ),
    );
    let mut c = wine(&bins.gateway);
    c.arg("connect")
        .arg(linux.url("wc"))
        .args(fx.cert_args("alice"));
    scrub(&mut c);
    let out = run_command(c, fx.dir(), &vec![b'x'; 100_000], Duration::from_secs(60));
    out.expect_code(0);
    assert_eq!(out.out().trim(), "100000", "{}", out.stderr);
}

/// A SOCK_SEQPACKET echo server at `path` (threads; they end with the test process).
fn seqpacket_echo(path: &std::path::Path) {
    use rustix::net::{
        accept, bind, listen, recv, send, socket, AddressFamily, RecvFlags, SendFlags,
        SocketAddrUnix, SocketType,
    };
    let fd = socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).expect("socket");
    bind(&fd, &SocketAddrUnix::new(path).expect("addr")).expect("bind");
    listen(&fd, 16).expect("listen");
    std::thread::spawn(move || {
        while let Ok(c) = accept(&fd) {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok((n, _)) = recv(&c, &mut buf[..], RecvFlags::empty()) {
                    if n == 0 || send(&c, &buf[..n], SendFlags::empty()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn a_message_pipe_hosted_by_the_windows_gateway_keeps_boundaries_to_a_linux_seqpacket() {
    let Some(bins) = wine_bins() else { return };
    let fx = Fixture::new();
    let sock = fx.path("echo.seq");
    seqpacket_echo(&sock);
    let linux = fx.serve(
        "linux.toml",
        &fx.server_config(&format!(
            "[[pipe]]\nname = \"seq\"\nendpoint = \"seqpacket:{}\"\nallow = [\"alice\"]\nrun_as = \"gateway\"\n",
            sock.display()
        )),
    );
    let pipe = unique("hostedmsg");
    let _win = windows_gateway(
        &fx,
        &bins,
        "win-fwd.toml",
        &npipe_forward(
            &fx,
            &pipe,
            &format!("{}?mode=message", linux.url("seq")),
            "",
        ),
    );
    let out = npipe_client(&fx, &bins, &pipe, "message", "1,100,3,70000,100000,2");
    out.expect_code(0);
    assert_eq!(out.out().trim(), "ok 6", "{}", out.stderr);
}
