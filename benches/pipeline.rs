//! The pipeline benchmark (issue 8): pipebridge against socat, stunnel, OpenSSH (and
//! websocat when it is on PATH), each bridging one Unix socket over TLS on loopback.
//!
//! For every tool the bench starts the whole pipeline itself: a target Unix-socket
//! server (in-process threads: echo, sink and source, chosen by the first byte of a
//! connection), the tool's "server side" (exports the target over TLS on 127.0.0.1), the
//! tool's "client side" (hosts a local Unix socket forwarding to the server side) and the
//! load client (this process), which talks to the client side's socket. Rounds interleave
//! the tools (round 1 all tools, round 2 all tools, ...) and the table reports medians
//! over rounds and the ratios pipebridge / best competitor measured in the same run.
//! Beside rates, latencies and memory it reports each tool's CPU time per unit of work
//! (per GB of bulk data, per message at the larger concurrency, per new session), read
//! from /proc for the tool's processes: on a machine whose cores the load client and the
//! target share, that is the gateways' own efficiency, apart from the rest.
//!
//! ```text
//! cargo bench --bench pipeline -- [--rounds N] [--smoke] [--only pipebridge,socat,...]
//!     [--install-competitors] [--bulk-mib N] [--secs S] [--idle N] [--phases LIST]
//!     [--kind stream|seqpacket]
//! ```
//! `--smoke` runs one tiny round of pipebridge only (a few seconds) and exits non-zero
//! if the pipeline is broken. Every process started is ended by pid at the end (Drop
//! guards, also on panic); every loop is bounded in count and time; only loopback and
//! Unix sockets are used. Nothing is installed unless `--install-competitors` is given.
//!
//! A/B runs of a change: `PIPEBRIDGE_BASELINE_BIN=/path/to/old/pipebridge` adds the tool
//! `baseline` (that build, set up like `pipebridge`), interleaved with the others, so
//! both builds are measured under the same machine load.
//! `PIPEBRIDGE_BENCH_BUSY_POLL=200us` (and `PIPEBRIDGE_BASELINE_BUSY_POLL` for the
//! baseline) sets `[tuning] busy_poll` in both gateways' configs; with
//! `PIPEBRIDGE_BASELINE_BIN` pointing at the same build, one run compares polling
//! against none.
//! `--only ...,floor` adds the yardstick `floor` (`support/floor.rs`): two relays that do
//! the least any two-process bridge must (no TLS, no authentication, one warm TCP link,
//! one `read` and one `write` per hop), to show what the machine allows the figures
//! whose targets are ratios against other bridges (echo latency, new sessions).
//! `--kind seqpacket` runs the same figures over SOCK_SEQPACKET at both ends (the target
//! serves records; pipebridge exports a `seqpacket:` endpoint and hosts a `seqpacket:`
//! forward; bulk moves 64 KiB records; every record must arrive whole): pipebridge, its
//! baseline and `direct` only, since the other tools carry bytes and keep no record's
//! boundaries.
//! `PIPEBRIDGE_BENCH_RUN_AS=user:nobody` (and `PIPEBRIDGE_BASELINE_RUN_AS`) sets the
//! exported pipe's `run_as` (default `gateway`): with an account, every session's
//! connect to the target is made as that account (the session thread's switch),
//! and the target socket is opened to all (mode 0666 in a 0711 directory).
//! `PIPEBRIDGE_BENCH_ALLOW_LOCAL='"root"'` (and `PIPEBRIDGE_BASELINE_ALLOW_LOCAL`) sets
//! the forward's `allow_local` list (TOML items, comma-separated): a rule that names a
//! user or a group asks the user database for every caller.
//! `PIPEBRIDGE_BENCH_PER_USER=1` (and `PIPEBRIDGE_BASELINE_PER_USER`) names the forward's
//! certificate and key by `{user}` (copies of the bench's, named after the account the
//! bench runs as): each caller's user name is looked up for its credentials.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnix;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type R<T> = Result<T, String>;

#[path = "support/floor.rs"]
mod floor;

/// Size of one bulk write / read by the load client and the target.
const CHUNK: usize = 256 * 1024;
/// Pattern period of bulk data (a prime, so chunk boundaries never line up with it).
const PERIOD: usize = 251;
/// Size of one echo message.
const MSG: usize = 64;
/// Bound on any single blocking socket operation of the load client.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on starting one pipeline.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on opening the idle sessions of one tool.
const IDLE_OPEN_TIMEOUT: Duration = Duration::from_secs(180);
/// Connections opened at once when building up the concurrent and idle sets.
const OPEN_PARALLELISM: usize = 32;
/// Environment variables that would change a gateway's behaviour.
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
];

// === options ===

#[derive(Clone, Debug)]
struct Opts {
    rounds: usize,
    smoke: bool,
    only: Option<Vec<String>>,
    install: bool,
    bulk_bytes: u64,
    secs: f64,
    echo_msgs: usize,
    idle: usize,
    conc: [usize; 2],
    new_conc: usize,
    phases: Option<Vec<String>>,
    kind: Kind,
}

const USAGE: &str = "usage: cargo bench --bench pipeline -- [--rounds N] [--smoke] \
[--only pipebridge,baseline,socat,stunnel,ssh,websocat,direct,floor] [--install-competitors] [--bulk-mib N] \
[--secs S] [--idle N] [--phases bulk,echo,c64,c512,new,idle] [--kind stream|seqpacket]";

fn parse_opts() -> R<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut o = if smoke {
        Opts {
            rounds: 1,
            smoke,
            only: Some(vec!["pipebridge".into()]),
            install: false,
            bulk_bytes: 4 << 20,
            secs: 0.3,
            echo_msgs: 300,
            idle: 50,
            conc: [8, 32],
            new_conc: 4,
            phases: None,
            kind: Kind::Stream,
        }
    } else {
        Opts {
            rounds: 6,
            smoke,
            only: None,
            install: false,
            bulk_bytes: 512 << 20,
            secs: 2.0,
            echo_msgs: 20_000,
            idle: 5000,
            conc: [64, 512],
            new_conc: 16,
            phases: None,
            kind: Kind::Stream,
        }
    };
    let mut it = args.into_iter();
    let list = |v: String| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--smoke" => {}
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--install-competitors" => o.install = true,
            "--rounds" => {
                o.rounds = num(&val("--rounds")?, "--rounds")?;
                if o.rounds == 0 || o.rounds > 100 {
                    return Err("--rounds must be 1..=100".into());
                }
            }
            "--only" => o.only = Some(list(val("--only")?)),
            "--phases" => o.phases = Some(list(val("--phases")?)),
            "--bulk-mib" => o.bulk_bytes = num::<u64>(&val("--bulk-mib")?, "--bulk-mib")? << 20,
            "--idle" => o.idle = num(&val("--idle")?, "--idle")?,
            "--kind" => {
                o.kind = match val("--kind")?.as_str() {
                    "stream" => Kind::Stream,
                    "seqpacket" => Kind::Seqpacket,
                    k => return Err(format!("--kind: stream or seqpacket, not {k:?}")),
                }
            }
            "--secs" => {
                o.secs = num(&val("--secs")?, "--secs")?;
                if !(0.05..=60.0).contains(&o.secs) {
                    return Err("--secs must be 0.05..=60".into());
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if o.bulk_bytes == 0 {
        return Err("--bulk-mib must be at least 1".into());
    }
    Ok(o)
}

fn num<T: std::str::FromStr>(s: &str, name: &str) -> R<T> {
    s.parse()
        .map_err(|_| format!("{name}: not a number: {s:?}"))
}

impl Opts {
    fn phase(&self, p: &str) -> bool {
        self.phases
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == p))
    }
    fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }
}

// === socket kinds ===

/// What the pipelines carry: a byte stream (Unix stream sockets: every tool) or records
/// (SOCK_SEQPACKET at both ends: pipebridge, its baseline and `direct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stream,
    Seqpacket,
}

/// The run's kind, set once from `--kind` before any pipeline starts.
static KIND: OnceLock<Kind> = OnceLock::new();

fn kind() -> Kind {
    KIND.get().copied().unwrap_or(Kind::Stream)
}

/// The record size of seqpacket bulk transfers (each write and read one record).
const RECORD: usize = 64 * 1024;

/// Bytes per bulk write: [`CHUNK`] of a stream, one [`RECORD`].
fn chunk() -> usize {
    match kind() {
        Kind::Stream => CHUNK,
        Kind::Seqpacket => RECORD,
    }
}

/// The endpoint scheme of the run's kind in pipebridge's config.
fn scheme() -> &'static str {
    match kind() {
        Kind::Stream => "unix",
        Kind::Seqpacket => "seqpacket",
    }
}

/// Ok when a send of record `b` sent all `n` of its bytes.
fn whole_record(n: usize, b: &[u8]) -> std::io::Result<()> {
    if n == b.len() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "sent {n} of a {}-byte record",
            b.len()
        )))
    }
}

/// A blocking load-client connection: a stream, or a seqpacket socket whose every send is
/// one record and every read one whole record.
enum BConn {
    Stream(StdUnix),
    Seq(OwnedFd),
}

impl BConn {
    fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            BConn::Stream(s) => s.write_all(b),
            BConn::Seq(fd) => whole_record(
                rustix::net::send(&*fd, b, rustix::net::SendFlags::NOSIGNAL)?,
                b,
            ),
        }
    }

    /// Up to `b.len()` bytes of the stream, or one whole record (longer: an error).
    fn recv(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BConn::Stream(s) => s.read(b),
            BConn::Seq(fd) => {
                let (n, len) = rustix::net::recv(&*fd, b, rustix::net::RecvFlags::TRUNC)?;
                if len > n {
                    return Err(std::io::Error::other(format!(
                        "a {len}-byte record is longer than {n}"
                    )));
                }
                Ok(n)
            }
        }
    }

    /// Exactly `b.len()` bytes of the stream, or one record of exactly that length.
    fn recv_exact(&mut self, b: &mut [u8]) -> std::io::Result<()> {
        match self {
            BConn::Stream(s) => s.read_exact(b),
            BConn::Seq(_) => {
                let mut rec = [0u8; MSG + 9];
                let n = self.recv(&mut rec)?;
                if n != b.len() {
                    return Err(std::io::Error::other(format!(
                        "a {n}-byte record where {} were expected",
                        b.len()
                    )));
                }
                b.copy_from_slice(&rec[..n]);
                Ok(())
            }
        }
    }
}

/// An async load-client connection of either kind (as [`BConn`]).
enum AConn {
    Stream(UnixStream),
    Seq(tokio_seqpacket::UnixSeqpacket),
}

impl AConn {
    async fn connect(sock: &Path) -> std::io::Result<AConn> {
        Ok(match kind() {
            Kind::Stream => AConn::Stream(UnixStream::connect(sock).await?),
            Kind::Seqpacket => AConn::Seq(tokio_seqpacket::UnixSeqpacket::connect(sock).await?),
        })
    }

    async fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            AConn::Stream(s) => s.write_all(b).await,
            AConn::Seq(s) => whole_record(s.send(b).await?, b),
        }
    }

    /// Exactly `b.len()` bytes of the stream, or one record of that length.
    async fn recv_exact(&mut self, b: &mut [u8]) -> std::io::Result<()> {
        match self {
            AConn::Stream(s) => s.read_exact(b).await.map(drop),
            AConn::Seq(s) => {
                let m = s.recv(b).await?;
                if m.truncated() || m.bytes_read() != b.len() {
                    return Err(std::io::Error::other(format!(
                        "a record of {} bytes{} where {} were expected",
                        m.bytes_read(),
                        if m.truncated() { " or more" } else { "" },
                        b.len()
                    )));
                }
                Ok(())
            }
        }
    }
}

// === tools ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Tool {
    Direct,
    Pipebridge,
    Socat,
    Stunnel,
    Ssh,
    Websocat,
    /// Another pipebridge build (`PIPEBRIDGE_BASELINE_BIN`), for A/B runs of a change.
    Baseline,
    /// The least work any two-process bridge does (`support/floor.rs`): no TLS, no
    /// authentication, one warm link. A yardstick, not a competitor; only with `--only`.
    Floor,
}

const ALL_TOOLS: [Tool; 8] = [
    Tool::Direct,
    Tool::Floor,
    Tool::Pipebridge,
    Tool::Baseline,
    Tool::Socat,
    Tool::Stunnel,
    Tool::Ssh,
    Tool::Websocat,
];

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Direct => "direct",
            Tool::Pipebridge => "pipebridge",
            Tool::Socat => "socat",
            Tool::Stunnel => "stunnel",
            Tool::Ssh => "ssh",
            Tool::Websocat => "websocat",
            Tool::Baseline => "baseline",
            Tool::Floor => "floor",
        }
    }
    /// Whether the tool keeps records whole (`--kind seqpacket`).
    fn carries_records(self) -> bool {
        matches!(self, Tool::Direct | Tool::Pipebridge | Tool::Baseline)
    }
    fn competitor(self) -> bool {
        !matches!(
            self,
            Tool::Direct | Tool::Pipebridge | Tool::Baseline | Tool::Floor
        )
    }
    /// Idle sessions held for this tool at most (socat forks two processes per session).
    fn idle_cap(self) -> usize {
        match self {
            Tool::Socat => 1000,
            _ => usize::MAX,
        }
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Path::new(prog).is_file().then(|| PathBuf::from(prog));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn available(t: Tool) -> bool {
    match t {
        Tool::Direct | Tool::Pipebridge | Tool::Floor => true,
        Tool::Baseline => baseline_bin().is_some(),
        Tool::Socat => which("socat").is_some(),
        Tool::Stunnel => which("stunnel4").or_else(|| which("stunnel")).is_some(),
        Tool::Ssh => {
            which("sshd").is_some() && which("ssh").is_some() && which("ssh-keygen").is_some()
        }
        Tool::Websocat => which("websocat").is_some() && which("openssl").is_some(),
    }
}

fn install_competitors() -> R<()> {
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "socat",
                "stunnel4",
                "openssh-server",
                "openssh-client",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Keep stdout for the table.
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| format!("apt-get: {e}"))
    };
    eprintln!("bench: apt-get install -y socat stunnel4 openssh-server openssh-client");
    if install()?.success() {
        return Ok(());
    }
    eprintln!("bench: install failed; apt-get update and one retry");
    let _ = Command::new("apt-get")
        .arg("update")
        .stdout(std::io::stderr())
        .status();
    if install()?.success() {
        Ok(())
    } else {
        Err("apt-get install failed".into())
    }
}

// === processes ===

/// Has the kernel kill `cmd`'s process when the thread that started it (this bench's
/// main thread) ends, however it ends: a bench stopped by a signal, which runs no `Drop`,
/// leaves no gateway or competitor behind either.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and makes one system call
    // (prctl), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// A process this bench started; it and every descendant are killed by pid on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, cwd: &Path, log: PathBuf) -> R<Proc> {
        let f = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        for v in SCRUBBED_ENV {
            cmd.env_remove(v);
        }
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2));
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&mut self) -> R<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!(
                "{} exited ({st}); its log:\n{}",
                self.name,
                tail(&self.log_text(), 2000)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// Waits until the log holds `needle`; returns the line holding it.
    fn wait_log(&mut self, needle: &str, timeout: Duration) -> R<String> {
        let end = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            self.check_alive()?;
            if Instant::now() > end {
                return Err(format!(
                    "{}: no {needle:?} within {timeout:?}; log:\n{}",
                    self.name,
                    tail(&text, 2000)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let root = self.pid();
        let descendants: Vec<u32> = process_tree(&[root])
            .into_iter()
            .filter(|&p| p != root)
            .collect();
        let _ = self.child.kill();
        for p in descendants {
            if let Some(pid) = rustix::process::Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The fields of /proc/PID/stat after "pid (comm)" (comm may hold spaces and
/// parentheses): state is `[0]`, ppid `[1]`, utime..cstime `[11..15]`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// pid → parent pid of every process.
fn parents() -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return m;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            m.insert(pid, ppid);
        }
    }
    m
}

/// `roots` and all their descendants.
fn process_tree(roots: &[u32]) -> Vec<u32> {
    let par = parents();
    let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&p, &pp) in &par {
        kids.entry(pp).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        if out.contains(&p) || out.len() > 100_000 {
            continue;
        }
        out.push(p);
        if let Some(k) = kids.get(&p) {
            stack.extend(k);
        }
    }
    out
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Proportional set size in KiB (shared pages divided among their users).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system, of live threads and of reaped children) of `roots` and
/// their descendants: what the tool's processes spent, apart from the load client and
/// the target, which share the same cores.
fn cpu_secs(roots: &[u32]) -> f64 {
    // Linux reports these in USER_HZ, which is 100 on every architecture it runs on.
    const USER_HZ: f64 = 100.0;
    let ticks: u64 = process_tree(roots)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            (11..15)
                .filter_map(|i| f.get(i)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    ticks as f64 / USER_HZ
}

/// CPU µs per unit of work: `spent` CPU seconds over `wall` at `rate` units per second.
fn cpu_us_per_unit(spent: f64, rate: f64, wall: Duration) -> R<f64> {
    let units = rate * wall.as_secs_f64();
    if units <= 0.0 {
        Err("no work done".into())
    } else if spent <= 0.0 {
        // Seen with socat (a process per connection): not a figure to compare.
        Err("no CPU time measured".into())
    } else {
        Ok(spent * 1e6 / units)
    }
}

/// Resets VmHWM to the current RSS (clear_refs 5).
fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let want = 200_000u64;
    let cur = getrlimit(Resource::Nofile);
    let ok = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: Some(want.max(cur.maximum.unwrap_or(want))),
        },
    );
    if ok.is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: cur.maximum,
                maximum: cur.maximum,
            },
        );
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One line naming the machine and how busy it was.
fn machine(load_at_start: String) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "Machine: {cores} cores, {cpu}, Linux {}; load average {load_at_start} at start, {} at end.",
        kernel.trim(),
        loadavg()
    )
}

fn free_port() -> R<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn q(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

// === data ===

fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect())
}

/// The expected bytes at stream offset `off`, `n` of them (n ≤ CHUNK).
fn expected(off: u64, n: usize) -> &'static [u8] {
    let p = (off % PERIOD as u64) as usize;
    &pattern()[p..p + n]
}

fn echo_msg(conn: u64, seq: u64) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    m[..8].copy_from_slice(&conn.to_le_bytes());
    m[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in m[16..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8);
    }
    m
}

// === target server (in-process) ===

/// The runtime the in-process target runs on: one worker thread of its own.
fn target_runtime() -> R<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("target")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Serves `path` on its own runtime thread until the runtime is dropped. The first byte
/// of a connection picks the mode: `E` echo until EOF; `S` + u64 LE length: sink that many
/// bytes (checked against the pattern) and answer the u64 count (u64::MAX on a mismatch);
/// `O` + u64 LE length: source that many pattern bytes.
fn start_target(path: &Path) -> R<tokio::runtime::Runtime> {
    let rt = target_runtime()?;
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?
    };
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(async move {
                        let _ = target_conn(s).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(rt)
}

async fn target_conn(mut s: UnixStream) -> std::io::Result<()> {
    let mode = s.read_u8().await?;
    match mode {
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        b'S' => {
            let len = s.read_u64_le().await?;
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            let mut ok = true;
            while got < len {
                let want = ((len - got) as usize).min(CHUNK);
                let n = s.read(&mut buf[..want]).await?;
                if n == 0 {
                    break;
                }
                ok &= buf[..n] == *expected(got, n);
                got += n as u64;
            }
            s.write_u64_le(if ok { got } else { u64::MAX }).await?;
            s.flush().await
        }
        b'O' => {
            let len = s.read_u64_le().await?;
            let mut sent = 0u64;
            while sent < len {
                let n = ((len - sent) as usize).min(CHUNK);
                s.write_all(expected(sent, n)).await?;
                sent += n as u64;
            }
            s.flush().await?;
            // Wait for the client's close so the last bytes are not cut off by a reset.
            let mut b = [0u8; 64];
            while s.read(&mut b).await? > 0 {}
            Ok(())
        }
        _ => Ok(()),
    }
}

/// [`start_target`] over SOCK_SEQPACKET: the first record's first byte picks the mode and
/// the rest of it is the first echo (`E`) or the u64 LE length (`S`, `O`); data moves in
/// records of at most [`RECORD`] bytes, and the sink's answer is one 8-byte record.
fn start_seq_target(path: &Path) -> R<tokio::runtime::Runtime> {
    let rt = target_runtime()?;
    let mut listener = {
        let _g = rt.enter();
        tokio_seqpacket::UnixSeqpacketListener::bind(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
    };
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok(s) => {
                    tokio::spawn(async move {
                        let _ = seq_target_conn(s).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(rt)
}

async fn seq_target_conn(s: tokio_seqpacket::UnixSeqpacket) -> std::io::Result<()> {
    let mut buf = vec![0u8; RECORD];
    let n = s.recv(&mut buf).await?.bytes_read();
    let len = |b: &[u8]| <[u8; 8]>::try_from(&b[1..]).map(u64::from_le_bytes).ok();
    match (buf.first(), n) {
        (Some(b'E'), 1..) => {
            // The first record's rest is the first echo, if any; then every record back
            // until EOF (or an empty record, which reads alike).
            if n > 1 {
                s.send(&buf[1..n]).await?;
            }
            loop {
                let n = s.recv(&mut buf).await?.bytes_read();
                if n == 0 {
                    return Ok(());
                }
                s.send(&buf[..n]).await?;
            }
        }
        (Some(b'S'), 9) => {
            let want = len(&buf[..9]).unwrap_or(0);
            let (mut got, mut ok) = (0u64, true);
            while got < want && ok {
                let m = s.recv(&mut buf).await?;
                let n = m.bytes_read();
                if n == 0 {
                    break;
                }
                // Each record whole: as long as the client sent it, and its bytes.
                let whole = ((want - got) as usize).min(RECORD);
                ok = !m.truncated() && n == whole && buf[..n] == *expected(got, n);
                got += n as u64;
            }
            let answer = if ok { got } else { u64::MAX };
            s.send(&answer.to_le_bytes()).await.map(drop)
        }
        (Some(b'O'), 9) => {
            let want = len(&buf[..9]).unwrap_or(0);
            let mut sent = 0u64;
            while sent < want {
                let n = ((want - sent) as usize).min(RECORD);
                s.send(expected(sent, n)).await?;
                sent += n as u64;
            }
            // Wait for the client's close, as the stream target does.
            while s.recv(&mut buf).await?.bytes_read() > 0 {}
            Ok(())
        }
        _ => Ok(()),
    }
}

// === pipelines ===

struct Env {
    dir: PathBuf,
    target: PathBuf,
    pki: PathBuf,
    bin: PathBuf,
}

struct Pipeline {
    tool: Tool,
    /// The socket the load client talks to.
    sock: PathBuf,
    procs: Vec<Proc>,
}

impl Pipeline {
    fn roots(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
    fn check_alive(&mut self) -> R<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }
}

fn pipebridge_bin() -> R<PathBuf> {
    if let Some(p) = std::env::var_os("PIPEBRIDGE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_pipebridge") {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    // target/<profile>/deps/pipeline-HASH → target/<profile>/pipebridge
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if let Some(p) = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("pipebridge"))
        .filter(|p| p.is_file())
    {
        return Ok(p);
    }
    Err("cannot find the pipebridge binary: run scripts/bench.sh (cargo build --release), or set PIPEBRIDGE_BIN".into())
}

/// The other pipebridge build an A/B run compares against.
fn baseline_bin() -> Option<PathBuf> {
    std::env::var_os("PIPEBRIDGE_BASELINE_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

fn start(tool: Tool, env: &Env) -> R<Pipeline> {
    let p = match tool {
        Tool::Direct => Pipeline {
            tool,
            sock: env.target.clone(),
            procs: vec![],
        },
        Tool::Pipebridge => start_pipebridge(env, tool, &env.bin)?,
        Tool::Baseline => start_pipebridge(
            env,
            tool,
            &baseline_bin().ok_or("PIPEBRIDGE_BASELINE_BIN is not set")?,
        )?,
        Tool::Socat => start_socat(env)?,
        Tool::Stunnel => start_stunnel(env)?,
        Tool::Ssh => start_ssh(env)?,
        Tool::Websocat => start_websocat(env)?,
        Tool::Floor => start_floor(env)?,
    };
    // Ready means one echo goes through end to end.
    let end = Instant::now() + START_TIMEOUT;
    let mut last = String::new();
    let mut p = p;
    while Instant::now() < end {
        match session_blocking(&p.sock, 0, Duration::from_secs(5)) {
            Ok(()) => return Ok(p),
            Err(e) => last = e,
        }
        p.check_alive()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{}: pipeline not ready within {START_TIMEOUT:?}: {last}",
        tool.name()
    ))
}

fn start_pipebridge(env: &Env, tool: Tool, bin: &Path) -> R<Pipeline> {
    let pki = &env.pki;
    let name = tool.name();
    // `[tuning] busy_poll` for both gateways of this build, only when asked (a baseline
    // build may predate the key): PIPEBRIDGE_BENCH_BUSY_POLL for `pipebridge`,
    // PIPEBRIDGE_BASELINE_BUSY_POLL for `baseline`.
    let setting = |what: &str| {
        let who = if tool == Tool::Baseline {
            "BASELINE"
        } else {
            "BENCH"
        };
        std::env::var(format!("PIPEBRIDGE_{who}_{what}")).ok()
    };
    let tuning = setting("BUSY_POLL")
        .map(|v| format!("[tuning]\nbusy_poll = {}\n\n", q(Path::new(&v))))
        .unwrap_or_default();
    let run_as = setting("RUN_AS").unwrap_or_else(|| "gateway".into());
    let allow_local = setting("ALLOW_LOCAL")
        .map(|v| format!("allow_local = [{v}]\n"))
        .unwrap_or_default();
    let srv = format!(
        "{tuning}[server]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = {}\nkey = {}\nclient_ca = {}\n\n\
         [limits]\nmax_sessions = 100000\nmax_sessions_per_identity = 100000\n\n\
         [[identity]]\nname = \"bench\"\ncert_cn = \"bench\"\n\n\
         [[pipe]]\nname = \"target\"\nendpoint = {}\nallow = [\"bench\"]\nrun_as = {}\n\
         max_instances = 100000\n",
        q(&pki.join("server.pem")),
        q(&pki.join("server.key")),
        q(&pki.join("ca.pem")),
        q(Path::new(&format!("{}:{}", scheme(), env.target.display()))),
        q(Path::new(&run_as)),
    );
    let srv_cfg = env.dir.join(format!("{name}-server.toml"));
    std::fs::write(&srv_cfg, srv).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--config").arg(&srv_cfg);
    let mut server = Proc::spawn(
        &format!("{name} server"),
        cmd,
        &env.dir,
        env.dir.join(format!("{name}-server.log")),
    )?;
    let line = server.wait_log("pipebridge: listening on ", START_TIMEOUT)?;
    let addr = line
        .rsplit("listening on ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("cannot parse {line:?}"))?;
    let sock = env.dir.join(format!("{name}.sock"));
    // PIPEBRIDGE_BENCH_HTTP2=0 measures forwards on dedicated HTTP/1.1 connections.
    let http2 = std::env::var("PIPEBRIDGE_BENCH_HTTP2").map_or(true, |v| v != "0");
    let per_user = setting("PER_USER").is_some_and(|v| v == "1");
    let (cert, key) = if per_user {
        // `{user}` is the caller's user name: the load client runs as this process.
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .map_err(|e| e.to_string())?
            .ok_or("the bench's own uid has no user name")?
            .name;
        let dir = pki.join("per-user");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for ext in ["pem", "key"] {
            std::fs::copy(
                pki.join(format!("bench.{ext}")),
                dir.join(format!("{me}.{ext}")),
            )
            .map_err(|e| e.to_string())?;
        }
        (dir.join("{user}.pem"), dir.join("{user}.key"))
    } else {
        (pki.join("bench.pem"), pki.join("bench.key"))
    };
    let cli = format!(
        "{tuning}[[forward]]\nlisten = {}\nto = \"wss://127.0.0.1:{port}/pipes/target\"\nca = {}\ncert = {}\nkey = {}\nhttp2 = {http2}\n{allow_local}",
        q(Path::new(&format!("{}:{}", scheme(), sock.display()))),
        q(&pki.join("ca.pem")),
        q(&cert),
        q(&key),
    );
    let cli_cfg = env.dir.join(format!("{name}-client.toml"));
    std::fs::write(&cli_cfg, cli).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--config").arg(&cli_cfg);
    let mut client = Proc::spawn(
        &format!("{name} client"),
        cmd,
        &env.dir,
        env.dir.join(format!("{name}-client.log")),
    )?;
    client.wait_log("pipebridge: forwarding ", START_TIMEOUT)?;
    eprintln!(
        "bench: {name} ({}) server pid {} (port {port}), client pid {} ({})",
        bin.display(),
        server.pid(),
        client.pid(),
        sock.display()
    );
    Ok(Pipeline {
        tool,
        sock,
        procs: vec![server, client],
    })
}

fn start_socat(env: &Env) -> R<Pipeline> {
    let pki = env.pki.display();
    let port = free_port()?;
    let mut s = Command::new("socat");
    s.arg(format!(
        "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog=1024,\
         cert={pki}/server.pem,key={pki}/server.key,cafile={pki}/ca.pem,verify=1"
    ))
    .arg(format!("UNIX-CONNECT:{}", env.target.display()));
    let server = Proc::spawn(
        "socat server",
        s,
        &env.dir,
        env.dir.join("socat-server.log"),
    )?;
    wait_tcp(port)?;
    let sock = env.dir.join("socat.sock");
    let mut c = Command::new("socat");
    c.arg(format!(
        "UNIX-LISTEN:{},fork,unlink-early,backlog=1024",
        sock.display()
    ))
    .arg(format!(
        "OPENSSL:127.0.0.1:{port},nodelay,cert={pki}/bench.pem,key={pki}/bench.key,\
         cafile={pki}/ca.pem,verify=1,commonname=localhost"
    ));
    let client = Proc::spawn(
        "socat client",
        c,
        &env.dir,
        env.dir.join("socat-client.log"),
    )?;
    Ok(Pipeline {
        tool: Tool::Socat,
        sock,
        procs: vec![server, client],
    })
}

fn start_stunnel(env: &Env) -> R<Pipeline> {
    let bin = which("stunnel4")
        .or_else(|| which("stunnel"))
        .ok_or("stunnel not found")?;
    let pki = env.pki.display();
    let port = free_port()?;
    // stunnel 5 accepts a Unix socket path for `accept` and `connect`: no adapter needed.
    let srv = format!(
        "foreground = yes\npid =\ndebug = 3\n\n[srv]\naccept = 127.0.0.1:{port}\nconnect = {}\n\
         cert = {pki}/server.pem\nkey = {pki}/server.key\nCAfile = {pki}/ca.pem\n\
         verifyChain = yes\nsocket = a:SO_REUSEADDR=1\nsocket = r:TCP_NODELAY=1\nsocket = l:TCP_NODELAY=1\n",
        env.target.display()
    );
    let srv_cfg = env.dir.join("stunnel-server.conf");
    std::fs::write(&srv_cfg, srv).map_err(|e| e.to_string())?;
    let mut s = Command::new(&bin);
    s.arg(&srv_cfg);
    let server = Proc::spawn(
        "stunnel server",
        s,
        &env.dir,
        env.dir.join("stunnel-server.log"),
    )?;
    wait_tcp(port)?;
    let sock = env.dir.join("stunnel.sock");
    let cli = format!(
        "foreground = yes\npid =\ndebug = 3\n\n[cli]\nclient = yes\naccept = {}\n\
         connect = 127.0.0.1:{port}\ncert = {pki}/bench.pem\nkey = {pki}/bench.key\n\
         CAfile = {pki}/ca.pem\nverifyChain = yes\ncheckHost = localhost\nsocket = r:TCP_NODELAY=1\n",
        sock.display()
    );
    let cli_cfg = env.dir.join("stunnel-client.conf");
    std::fs::write(&cli_cfg, cli).map_err(|e| e.to_string())?;
    let mut c = Command::new(&bin);
    c.arg(&cli_cfg);
    let client = Proc::spawn(
        "stunnel client",
        c,
        &env.dir,
        env.dir.join("stunnel-client.log"),
    )?;
    Ok(Pipeline {
        tool: Tool::Stunnel,
        sock,
        procs: vec![server, client],
    })
}

fn start_ssh(env: &Env) -> R<Pipeline> {
    let sshd = which("sshd").ok_or("sshd not found")?;
    let d = env.dir.join("ssh");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    // sshd's privilege separation directory (what the Debian service creates at start).
    let _ = std::fs::create_dir_all("/run/sshd");
    let keygen = |path: &Path| -> R<()> {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("ssh-keygen: {e}"))?;
        st.success()
            .then_some(())
            .ok_or_else(|| "ssh-keygen failed".to_string())
    };
    keygen(&d.join("host_key"))?;
    keygen(&d.join("id"))?;
    std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\nAuthorizedKeysFile {ak}\n\
         PermitRootLogin yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowStreamLocalForwarding yes\n\
         AllowTcpForwarding yes\nCiphers aes128-gcm@openssh.com\nMaxStartups 1000\nMaxSessions 100\n\
         LogLevel ERROR\n",
        hk = d.join("host_key").display(),
        ak = d.join("authorized_keys").display(),
    );
    let cfg_path = d.join("sshd_config");
    std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
    let mut s = Command::new(&sshd);
    s.arg("-D").arg("-e").arg("-f").arg(&cfg_path);
    let server = Proc::spawn("sshd", s, &env.dir, env.dir.join("sshd.log"))?;
    wait_tcp(port)?;
    let sock = env.dir.join("ssh.sock");
    let mut c = Command::new("ssh");
    c.args(["-N", "-F", "/dev/null", "-i"])
        .arg(d.join("id"))
        .args(["-p", &port.to_string()])
        .args([
            "-c",
            "aes128-gcm@openssh.com",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "-o",
            "Compression=no",
            "-o",
            "LogLevel=ERROR",
            "-L",
        ])
        .arg(format!("{}:{}", sock.display(), env.target.display()))
        .arg("root@127.0.0.1");
    let client = Proc::spawn("ssh", c, &env.dir, env.dir.join("ssh.log"))?;
    Ok(Pipeline {
        tool: Tool::Ssh,
        sock,
        procs: vec![server, client],
    })
}

/// websocat (only when on PATH; not installable from Debian): wss-listen with a PKCS#12
/// server identity → unix target; unix-listen → wss client. Untested where absent.
fn start_websocat(env: &Env) -> R<Pipeline> {
    let p12 = env.dir.join("server.p12");
    let st = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:bench", "-inkey"])
        .arg(env.pki.join("server.key"))
        .arg("-in")
        .arg(env.pki.join("server.pem"))
        .arg("-out")
        .arg(&p12)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("openssl: {e}"))?;
    if !st.success() {
        return Err("openssl pkcs12 failed".into());
    }
    let port = free_port()?;
    let mut s = Command::new("websocat");
    s.args(["-b", "-E", "--pkcs12-passwd", "bench", "--pkcs12-der"])
        .arg(&p12)
        .arg(format!("wss-listen:127.0.0.1:{port}"))
        .arg(format!("unix:{}", env.target.display()));
    let server = Proc::spawn(
        "websocat server",
        s,
        &env.dir,
        env.dir.join("websocat-server.log"),
    )?;
    wait_tcp(port)?;
    let sock = env.dir.join("websocat.sock");
    let mut c = Command::new("websocat");
    c.args(["-b", "-E", "-k"])
        .arg(format!("unix-listen:{}", sock.display()))
        .arg(format!("wss://127.0.0.1:{port}/"));
    let client = Proc::spawn(
        "websocat client",
        c,
        &env.dir,
        env.dir.join("websocat-client.log"),
    )?;
    Ok(Pipeline {
        tool: Tool::Websocat,
        sock,
        procs: vec![server, client],
    })
}

/// The floor's two relays, both this bench binary (`--floor-relay`).
fn start_floor(env: &Env) -> R<Pipeline> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let mut s = Command::new(&exe);
    s.args(["--floor-relay", "export", &port.to_string()])
        .arg(&env.target);
    let mut server = Proc::spawn(
        "floor export",
        s,
        &env.dir,
        env.dir.join("floor-export.log"),
    )?;
    server.wait_log("export listening", START_TIMEOUT)?;
    let sock = env.dir.join("floor.sock");
    let mut c = Command::new(&exe);
    c.args(["--floor-relay", "dial"])
        .arg(&sock)
        .arg(port.to_string());
    let mut client = Proc::spawn("floor dial", c, &env.dir, env.dir.join("floor-dial.log"))?;
    client.wait_log("dial ready", START_TIMEOUT)?;
    Ok(Pipeline {
        tool: Tool::Floor,
        sock,
        procs: vec![server, client],
    })
}

fn wait_tcp(port: u16) -> R<()> {
    let end = Instant::now() + START_TIMEOUT;
    while Instant::now() < end {
        if std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )
        .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    Err(format!("nothing listens on 127.0.0.1:{port}"))
}

// === load: blocking figures ===

fn connect_blocking(sock: &Path, timeout: Duration) -> R<BConn> {
    let failed = |e: std::io::Error| format!("connect {}: {e}", sock.display());
    match kind() {
        Kind::Stream => {
            let s = StdUnix::connect(sock).map_err(failed)?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            Ok(BConn::Stream(s))
        }
        Kind::Seqpacket => {
            use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
            let io = |e: rustix::io::Errno| failed(e.into());
            let fd = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .map_err(io)?;
            rustix::net::connect(&fd, &SocketAddrUnix::new(sock).map_err(io)?).map_err(io)?;
            for t in [sockopt::Timeout::Recv, sockopt::Timeout::Send] {
                sockopt::set_socket_timeout(&fd, t, Some(timeout)).map_err(io)?;
            }
            Ok(BConn::Seq(fd))
        }
    }
}

/// Connect, one 64-byte echo, close.
fn session_blocking(sock: &Path, seq: u64, timeout: Duration) -> R<()> {
    let mut s = connect_blocking(sock, timeout)?;
    let msg = echo_msg(u64::MAX, seq);
    let mut first = [0u8; MSG + 1];
    first[0] = b'E';
    first[1..].copy_from_slice(&msg);
    s.send(&first).map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; MSG];
    s.recv_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err("echo mismatch on a new session".into());
    }
    Ok(())
}

fn bulk_up(sock: &Path, len: u64) -> R<f64> {
    let mut s = connect_blocking(sock, IO_TIMEOUT)?;
    let t = Instant::now();
    let mut hdr = [0u8; 9];
    hdr[0] = b'S';
    hdr[1..].copy_from_slice(&len.to_le_bytes());
    s.send(&hdr).map_err(|e| format!("write: {e}"))?;
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(chunk());
        s.send(expected(off, n))
            .map_err(|e| format!("write at {off}: {e}"))?;
        off += n as u64;
    }
    let mut ack = [0u8; 8];
    s.recv_exact(&mut ack)
        .map_err(|e| format!("read ack: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    match u64::from_le_bytes(ack) {
        n if n == len => Ok(len as f64 / secs / 1e6),
        u64::MAX => Err("upload: the sink saw corrupted data".into()),
        n => Err(format!("upload: the sink got {n} of {len} bytes")),
    }
}

fn bulk_down(sock: &Path, len: u64) -> R<f64> {
    let mut s = connect_blocking(sock, IO_TIMEOUT)?;
    let t = Instant::now();
    let mut hdr = [0u8; 9];
    hdr[0] = b'O';
    hdr[1..].copy_from_slice(&len.to_le_bytes());
    s.send(&hdr).map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < len {
        let want = ((len - got) as usize).min(chunk());
        let n = s
            .recv(&mut buf[..want])
            .map_err(|e| format!("read at {got}: {e}"))?;
        if n == 0 {
            return Err(format!("download: EOF after {got} of {len} bytes"));
        }
        // A longer record is an error already (`BConn::recv`); a shorter one too.
        if kind() == Kind::Seqpacket && n != want {
            return Err(format!(
                "download: a record of {n} bytes at {got}, where the target sent {want}"
            ));
        }
        if buf[..n] != *expected(got, n) {
            return Err(format!("download: corrupted data at offset {got}"));
        }
        got += n as u64;
    }
    Ok(len as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// One connection, closed-loop 64-byte echoes: (p50, p99) in µs.
fn echo_latency(sock: &Path, max_msgs: usize, dur: Duration) -> R<(f64, f64)> {
    let mut s = connect_blocking(sock, IO_TIMEOUT)?;
    s.send(b"E").map_err(|e| e.to_string())?;
    let warmup = (max_msgs / 20).clamp(10, 500);
    let mut lat = Vec::with_capacity(max_msgs);
    let mut back = [0u8; MSG];
    let start = Instant::now();
    for seq in 0..(warmup + max_msgs) as u64 {
        if seq as usize >= warmup && start.elapsed() > dur + Duration::from_millis(200) {
            break;
        }
        let msg = echo_msg(0, seq);
        let t = Instant::now();
        s.send(&msg).map_err(|e| format!("write: {e}"))?;
        s.recv_exact(&mut back).map_err(|e| format!("read: {e}"))?;
        let ns = t.elapsed().as_nanos() as u64;
        if back != msg {
            return Err(format!("echo mismatch at message {seq}"));
        }
        if seq as usize >= warmup {
            lat.push(ns);
        }
    }
    if lat.is_empty() {
        return Err("no echo completed".into());
    }
    lat.sort_unstable();
    Ok((pct(&lat, 50.0) / 1e3, pct(&lat, 99.0) / 1e3))
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

// === load: concurrent figures (tokio) ===

async fn timed<T>(what: &str, f: impl std::future::Future<Output = std::io::Result<T>>) -> R<T> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

/// Connect, mode byte and a first 64-byte echo (the session is up end to end).
async fn open_echo(sock: Arc<PathBuf>, conn: u64) -> R<AConn> {
    let mut s = timed("connect", AConn::connect(sock.as_path())).await?;
    let msg = echo_msg(conn, 0);
    let mut first = [0u8; MSG + 1];
    first[0] = b'E';
    first[1..].copy_from_slice(&msg);
    timed("write", s.send(&first)).await?;
    let mut back = [0u8; MSG];
    timed("read", s.recv_exact(&mut back)).await?;
    if back != msg {
        return Err("echo mismatch on the first message".into());
    }
    Ok(s)
}

/// Opens `n` echo sessions, [`OPEN_PARALLELISM`] at a time, within `limit`.
async fn open_many(sock: &Path, n: usize, limit: Duration) -> R<Vec<AConn>> {
    let sock = Arc::new(sock.to_path_buf());
    let sem = Arc::new(tokio::sync::Semaphore::new(OPEN_PARALLELISM));
    let end = Instant::now() + limit;
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let too_slow = || format!("opened fewer than {n} sessions within {limit:?}");
    for i in 0..n {
        let permit = tokio::time::timeout_at(end.into(), sem.clone().acquire_owned())
            .await
            .map_err(|_| too_slow())?
            .map_err(|e| e.to_string())?;
        // Collect finished ones as we go, so a failure surfaces early.
        while let Some(r) = set.try_join_next() {
            out.push(r.map_err(|e| e.to_string())??);
        }
        let sock = sock.clone();
        set.spawn(async move {
            let r = open_echo(sock, i as u64 + 1).await;
            drop(permit);
            r
        });
    }
    while let Some(r) = tokio::time::timeout_at(end.into(), set.join_next())
        .await
        .map_err(|_| too_slow())?
    {
        out.push(r.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// Closed-loop echo on every stream for `dur`: (msgs/s, p99 µs) and the streams back.
async fn conc_echo(streams: Vec<AConn>, dur: Duration) -> R<(f64, f64, Vec<AConn>)> {
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        set.spawn(async move {
            let mut lat: Vec<u64> = Vec::with_capacity(4096);
            let mut back = [0u8; MSG];
            let mut seq = 1u64;
            while Instant::now() < deadline && lat.len() < 10_000_000 {
                let msg = echo_msg(i as u64 + 1, seq);
                let t = Instant::now();
                timed("write", s.send(&msg)).await?;
                timed("read", s.recv_exact(&mut back)).await?;
                lat.push(t.elapsed().as_nanos() as u64);
                if back != msg {
                    return Err(format!("echo mismatch on connection {i}"));
                }
                seq += 1;
            }
            Ok::<_, String>((s, lat, Instant::now()))
        });
    }
    let mut all = Vec::new();
    let mut streams = Vec::new();
    let mut end = start;
    let mut err = None;
    while let Some(r) = set.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((s, lat, t)) => {
                streams.push(s);
                all.extend(lat);
                end = end.max(t);
            }
            Err(e) => err = err.or(Some(e)),
        }
    }
    if let Some(e) = err {
        return Err(e);
    }
    if all.is_empty() {
        return Err("no echo completed".into());
    }
    let rate = all.len() as f64 / (end - start).as_secs_f64();
    all.sort_unstable();
    Ok((rate, pct(&all, 99.0) / 1e3, streams))
}

/// New sessions per second: `workers` loops of connect + first echo + close, for `dur`.
async fn new_sessions(sock: &Path, workers: usize, dur: Duration) -> R<f64> {
    let sock = Arc::new(sock.to_path_buf());
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let sock = sock.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline && n < 1_000_000 {
                let s = open_echo(sock.clone(), (w as u64) << 32 | n).await?;
                drop(s);
                n += 1;
            }
            Ok::<_, String>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn new_sessions_seq(sock: &Path, dur: Duration) -> R<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur && n < 1_000_000 {
        session_blocking(sock, n, IO_TIMEOUT)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

// === results ===

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Metric {
    Up,
    Down,
    EchoP50,
    EchoP99,
    C1Rate,
    C1P99,
    C2Rate,
    C2P99,
    NewSeq,
    NewConc,
    CpuBulk,
    CpuMsg,
    CpuNew,
    PeakRss,
    PssOpen,
    IdleKib,
    IdleRssKib,
}

const METRICS: [Metric; 17] = [
    Metric::Up,
    Metric::Down,
    Metric::EchoP50,
    Metric::EchoP99,
    Metric::C1Rate,
    Metric::C1P99,
    Metric::C2Rate,
    Metric::C2P99,
    Metric::NewSeq,
    Metric::NewConc,
    Metric::CpuBulk,
    Metric::CpuMsg,
    Metric::CpuNew,
    Metric::PeakRss,
    Metric::PssOpen,
    Metric::IdleKib,
    Metric::IdleRssKib,
];

impl Metric {
    fn label(self, o: &Opts) -> String {
        match self {
            Metric::Up => "bulk upload, MB/s".into(),
            Metric::Down => "bulk download, MB/s".into(),
            Metric::EchoP50 => "echo RTT p50, µs (1 conn)".into(),
            Metric::EchoP99 => "echo RTT p99, µs (1 conn)".into(),
            Metric::C1Rate => format!("{} conns, msgs/s", o.conc[0]),
            Metric::C1P99 => format!("{} conns, p99 µs", o.conc[0]),
            Metric::C2Rate => format!("{} conns, msgs/s", o.conc[1]),
            Metric::C2P99 => format!("{} conns, p99 µs", o.conc[1]),
            Metric::NewSeq => "new sessions/s, sequential".into(),
            Metric::NewConc => format!("new sessions/s, {} at once", o.new_conc),
            Metric::CpuBulk => "gateway CPU s per GB (bulk, both ways)".into(),
            Metric::CpuMsg => format!("gateway CPU µs per msg ({} conns)", o.conc[1]),
            Metric::CpuNew => format!("gateway CPU µs per new session ({} at once)", o.new_conc),
            Metric::PeakRss => format!("gateway peak RSS, MiB ({} conns)", o.conc[1]),
            Metric::PssOpen => format!("gateway PSS, MiB ({} conns open)", o.conc[1]),
            Metric::IdleKib => "KiB per idle session (PSS)".into(),
            Metric::IdleRssKib => "KiB per idle session (RSS)".into(),
        }
    }
    fn higher_better(self) -> bool {
        matches!(
            self,
            Metric::Up
                | Metric::Down
                | Metric::C1Rate
                | Metric::C2Rate
                | Metric::NewSeq
                | Metric::NewConc
        )
    }
    /// (the target as text, the check on the ratio or the value).
    fn target(self) -> Option<(&'static str, Check)> {
        Some(match self {
            Metric::Up | Metric::Down | Metric::C1Rate | Metric::C2Rate => {
                ("≥ 1.5× best", Check::RatioAtLeast(1.5))
            }
            Metric::EchoP50 | Metric::EchoP99 => ("≤ 0.8× best", Check::RatioAtMost(0.8)),
            Metric::C1P99 | Metric::C2P99 | Metric::PeakRss => {
                ("≤ 1.0× best", Check::RatioAtMost(1.0))
            }
            Metric::NewSeq | Metric::NewConc => ("≥ 2× ssh", Check::SshAtLeast(2.0)),
            Metric::IdleRssKib => ("≤ 32 KiB", Check::ValueAtMost(32.0)),
            Metric::IdleKib
            | Metric::PssOpen
            | Metric::CpuBulk
            | Metric::CpuMsg
            | Metric::CpuNew => return None,
        })
    }
    fn fmt(self, v: f64) -> String {
        match self {
            Metric::PeakRss | Metric::PssOpen => format!("{v:.1}"),
            Metric::IdleKib | Metric::IdleRssKib | Metric::CpuMsg | Metric::CpuNew => {
                format!("{v:.1}")
            }
            Metric::CpuBulk => format!("{v:.2}"),
            _ if v >= 1000.0 => group(v.round() as u64),
            _ => format!("{v:.0}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Check {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    SshAtLeast(f64),
    ValueAtMost(f64),
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

#[derive(Default)]
struct Results {
    values: BTreeMap<(Tool, Metric), Vec<f64>>,
    errors: Vec<(Tool, String)>,
}

impl Results {
    fn add(&mut self, t: Tool, m: Metric, v: f64) {
        self.values.entry((t, m)).or_default().push(v);
    }
    fn err(&mut self, t: Tool, what: &str, e: String) {
        eprintln!("bench: {} {what}: ERROR {e}", t.name());
        self.errors.push((t, format!("{what}: {e}")));
    }
    fn med(&self, t: Tool, m: Metric) -> Option<f64> {
        self.values.get(&(t, m)).and_then(|v| median(v))
    }
}

// === running ===

fn run_round(p: &mut Pipeline, o: &Opts, rt: &tokio::runtime::Runtime, res: &mut Results) {
    let t = p.tool;
    let sock = p.sock.clone();
    let rec = |res: &mut Results, m: Metric, r: R<f64>| match r {
        Ok(v) => {
            eprintln!("bench:   {:<10} {:<36} {}", t.name(), m.label(o), m.fmt(v));
            res.add(t, m, v);
        }
        Err(e) => res.err(t, &m.label(o), e),
    };
    if o.phase("bulk") {
        let roots = p.roots();
        let cpu0 = cpu_secs(&roots);
        let (up, down) = (bulk_up(&sock, o.bulk_bytes), bulk_down(&sock, o.bulk_bytes));
        if up.is_ok() && down.is_ok() && !roots.is_empty() {
            let gb = 2.0 * o.bulk_bytes as f64 / 1e9;
            rec(res, Metric::CpuBulk, Ok((cpu_secs(&roots) - cpu0) / gb));
        }
        rec(res, Metric::Up, up);
        rec(res, Metric::Down, down);
    }
    if o.phase("echo") {
        match echo_latency(&sock, o.echo_msgs, o.dur()) {
            Ok((p50, p99)) => {
                rec(res, Metric::EchoP50, Ok(p50));
                rec(res, Metric::EchoP99, Ok(p99));
            }
            Err(e) => res.err(t, "echo", e),
        }
    }
    for (i, n) in o.conc.iter().copied().enumerate() {
        let (mrate, mp99) = if i == 0 {
            if !o.phase("c64") {
                continue;
            }
            (Metric::C1Rate, Metric::C1P99)
        } else {
            if !o.phase("c512") {
                continue;
            }
            (Metric::C2Rate, Metric::C2P99)
        };
        let roots = p.roots();
        let measure_rss = i == 1 && !roots.is_empty();
        if measure_rss {
            for pid in process_tree(&roots) {
                reset_hwm(pid);
            }
        }
        // The gateways' CPU is measured over the echo exchange only, not the opening,
        // and at the larger concurrency only.
        let measure_cpu = i == 1 && !roots.is_empty();
        let mut cpu = (0.0, Instant::now());
        let r = rt.block_on(async {
            let streams = open_many(&sock, n, IO_TIMEOUT).await?;
            if measure_cpu {
                cpu = (cpu_secs(&roots), Instant::now());
            }
            conc_echo(streams, o.dur()).await
        });
        match r {
            Ok((rate, p99, streams)) => {
                if measure_cpu {
                    let spent = cpu_secs(&roots) - cpu.0;
                    rec(
                        res,
                        Metric::CpuMsg,
                        cpu_us_per_unit(spent, rate, cpu.1.elapsed()),
                    );
                }
                rec(res, mrate, Ok(rate));
                rec(res, mp99, Ok(p99));
                if measure_rss {
                    // VmHWM of every gateway process (reset before the connections were
                    // opened), and PSS (shared pages divided among their users: fair to
                    // tools that fork a process per connection), read while they are open.
                    let tree = process_tree(&roots);
                    let hwm: u64 = tree.iter().map(|&p| status_kib(p, "VmHWM:")).sum();
                    let pss: u64 = tree.iter().map(|&p| pss_kib(p)).sum();
                    rec(res, Metric::PeakRss, Ok(hwm as f64 / 1024.0));
                    rec(res, Metric::PssOpen, Ok(pss as f64 / 1024.0));
                }
                drop(streams);
            }
            Err(e) => res.err(t, &format!("{n} connections"), e),
        }
    }
    if o.phase("new") {
        rec(res, Metric::NewSeq, new_sessions_seq(&sock, o.dur()));
        let roots = p.roots();
        let (cpu0, t0) = (cpu_secs(&roots), Instant::now());
        let r = rt.block_on(new_sessions(&sock, o.new_conc, o.dur()));
        let (spent, wall) = (cpu_secs(&roots) - cpu0, t0.elapsed());
        if let (Ok(rate), false) = (r.as_ref().copied(), roots.is_empty()) {
            rec(res, Metric::CpuNew, cpu_us_per_unit(spent, rate, wall));
        }
        rec(res, Metric::NewConc, r);
    }
    if let Err(e) = p.check_alive() {
        res.err(t, "liveness", e);
    }
}

fn run_idle(p: &mut Pipeline, o: &Opts, rt: &tokio::runtime::Runtime, res: &mut Results) {
    let roots = p.roots();
    if roots.is_empty() || o.idle == 0 {
        return;
    }
    let t = p.tool;
    let n = o.idle.min(t.idle_cap());
    // Let the previous figures' sessions wind down first.
    std::thread::sleep(Duration::from_millis(500));
    let sum = |f: fn(u32) -> u64| -> u64 { process_tree(&roots).into_iter().map(f).sum() };
    let (pss0, rss0) = (sum(pss_kib), sum(|p| status_kib(p, "VmRSS:")));
    let started = Instant::now();
    let r = rt.block_on(open_many(&p.sock, n, IDLE_OPEN_TIMEOUT));
    match r {
        Ok(streams) => {
            std::thread::sleep(Duration::from_secs(1));
            let (pss1, rss1) = (sum(pss_kib), sum(|p| status_kib(p, "VmRSS:")));
            let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
            eprintln!(
                "bench:   {:<10} {n} idle sessions opened in {:.1}s; PSS {pss0}→{pss1} KiB, RSS {rss0}→{rss1} KiB",
                t.name(),
                started.elapsed().as_secs_f64()
            );
            res.add(t, Metric::IdleKib, per(pss0, pss1));
            res.add(t, Metric::IdleRssKib, per(rss0, rss1));
            drop(streams);
        }
        Err(e) => res.err(t, &format!("{n} idle sessions"), e),
    }
    if let Err(e) = p.check_alive() {
        res.err(t, "liveness", e);
    }
}

fn report(o: &Opts, tools: &[Tool], res: &Results, idle_n: &BTreeMap<Tool, usize>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let comps: Vec<Tool> = tools.iter().copied().filter(|t| t.competitor()).collect();
    let _ = write!(s, "| figure (median of {} rounds) |", o.rounds);
    for t in tools {
        let _ = write!(s, " {} |", t.name());
    }
    let _ = writeln!(s, " best competitor | pipebridge ÷ best | target | met |");
    let _ = write!(s, "|---|");
    for _ in tools {
        let _ = write!(s, "---:|");
    }
    let _ = writeln!(s, "---|---:|---|---|");
    for m in METRICS {
        if !tools.iter().any(|&t| res.med(t, m).is_some()) {
            continue;
        }
        let _ = write!(s, "| {} |", m.label(o));
        for &t in tools {
            let cell = match res.med(t, m) {
                Some(v) => m.fmt(v),
                None => "–".into(),
            };
            let _ = write!(s, " {cell} |");
        }
        let best = comps
            .iter()
            .filter_map(|&t| res.med(t, m).map(|v| (t, v)))
            .reduce(|a, b| {
                let better = if m.higher_better() {
                    b.1 > a.1
                } else {
                    b.1 < a.1
                };
                if better {
                    b
                } else {
                    a
                }
            });
        let pb = res.med(Tool::Pipebridge, m);
        let (best_s, ratio) = match best {
            Some((bt, bv)) => (format!("{} ({})", m.fmt(bv), bt.name()), pb.map(|v| v / bv)),
            None => ("–".into(), None),
        };
        let ratio_s = ratio.map(|r| format!("{r:.2}")).unwrap_or("–".into());
        let (target_s, met) = match m.target() {
            None => ("", "".to_string()),
            Some((txt, check)) => {
                let ok = match check {
                    Check::RatioAtLeast(x) => ratio.map(|r| r >= x),
                    Check::RatioAtMost(x) => ratio.map(|r| r <= x),
                    Check::SshAtLeast(x) => pb
                        .zip(res.med(Tool::Ssh, m).or(best.map(|b| b.1)))
                        .map(|(v, b)| v / b >= x),
                    Check::ValueAtMost(x) => pb.map(|v| v <= x),
                };
                (
                    txt,
                    match ok {
                        Some(true) => "yes".into(),
                        Some(false) => "**no**".into(),
                        None => "–".into(),
                    },
                )
            }
        };
        let _ = writeln!(s, " {best_s} | {ratio_s} | {target_s} | {met} |");
    }
    if !idle_n.is_empty() {
        let list: Vec<String> = idle_n
            .iter()
            .map(|(t, n)| format!("{} {n}", t.name()))
            .collect();
        let _ = writeln!(
            s,
            "\nIdle sessions held (measured once, after the rounds): {}.",
            list.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\nPer-round values (run order forwards, then backwards, then rotated by one):"
    );
    for m in METRICS {
        for &t in tools {
            if let Some(v) = res.values.get(&(t, m)) {
                if v.len() > 1 {
                    let vals: Vec<String> = v.iter().map(|x| m.fmt(*x)).collect();
                    let _ = writeln!(s, "- {} / {}: {}", m.label(o), t.name(), vals.join(", "));
                }
            }
        }
    }
    // Two builds of pipebridge side by side: the per-round ratios, whose median moves
    // less than the ratio of the two medians on a noisy host (both builds of a round ran
    // next to each other, under the same load).
    if tools.contains(&Tool::Baseline) {
        let mut head = false;
        for m in METRICS {
            let (Some(a), Some(b)) = (
                res.values.get(&(Tool::Pipebridge, m)),
                res.values.get(&(Tool::Baseline, m)),
            ) else {
                continue;
            };
            if a.len() != b.len() || a.len() < 2 {
                continue;
            }
            let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let Some(med) = median(&r) else { continue };
            if !head {
                let _ = writeln!(
                    s,
                    "\nPaired, pipebridge ÷ baseline per round (median, then each round):"
                );
                head = true;
            }
            let each: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
            let _ = writeln!(s, "- {}: {med:.3} [{}]", m.label(o), each.join(", "));
        }
    }
    if !res.errors.is_empty() {
        let _ = writeln!(s, "\nErrors:");
        for (t, e) in &res.errors {
            let _ = writeln!(s, "- {}: {}", t.name(), e.lines().next().unwrap_or(""));
        }
    }
    s
}

fn main() {
    floor::main_if_relay(&std::env::args().skip(1).collect::<Vec<_>>());
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let code = match run(&o) {
        Ok(ok) => {
            if ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("bench: {e}");
            1
        }
    };
    eprintln!(
        "bench: finished in {:.1}s (exit {code})",
        started.elapsed().as_secs_f64()
    );
    std::process::exit(code);
}

/// Runs everything; Ok(false) if a pipebridge (or direct) figure failed.
fn run(o: &Opts) -> R<bool> {
    if o.install {
        install_competitors()?;
    }
    raise_nofile();
    KIND.set(o.kind).map_err(|_| "the kind is set twice")?;
    let load_at_start = loadavg();
    let wanted: Vec<Tool> = ALL_TOOLS
        .iter()
        .copied()
        .filter(|t| {
            o.only
                .as_ref()
                .map_or(*t != Tool::Floor, |l| l.iter().any(|n| n == t.name()))
        })
        .collect();
    if let Some(l) = &o.only {
        for n in l {
            if !ALL_TOOLS.iter().any(|t| t.name() == n) {
                return Err(format!("--only: unknown tool {n:?}"));
            }
        }
    }
    let mut tools = Vec::new();
    for t in wanted {
        if o.kind == Kind::Seqpacket && !t.carries_records() {
            eprintln!(
                "bench: {} carries bytes, not records; skipped with --kind seqpacket",
                t.name()
            );
        } else if available(t) {
            tools.push(t);
        } else {
            eprintln!(
                "bench: {} is not installed; skipped (--install-competitors installs socat, stunnel4, openssh)",
                t.name()
            );
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("pbb")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let env = Env {
        dir: tmp.path().to_path_buf(),
        target: tmp.path().join("target.sock"),
        pki: tmp.path().join("pki"),
        bin: pipebridge_bin()?,
    };
    eprintln!("bench: pipebridge binary {}", env.bin.display());
    pipebridge::pki::init(&pipebridge::pki::CertsInit {
        dir: env.pki.clone(),
        server_names: vec!["localhost".into()],
        clients: vec!["bench".into()],
        force: false,
    })
    .map_err(|e| format!("pki init: {e}"))?;
    let target_rt = match o.kind {
        Kind::Stream => start_target(&env.target)?,
        Kind::Seqpacket => start_seq_target(&env.target)?,
    };
    if ["PIPEBRIDGE_BENCH_RUN_AS", "PIPEBRIDGE_BASELINE_RUN_AS"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| v != "gateway"))
    {
        // Sessions connect to the target as another account.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&env.dir, 0o711).map_err(|e| e.to_string())?;
        mode(&env.target, 0o666).map_err(|e| e.to_string())?;
    }
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("load")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let mut res = Results::default();
    let mut pipes: Vec<Pipeline> = Vec::new();
    for &t in &tools {
        match start(t, &env) {
            Ok(p) => pipes.push(p),
            Err(e) => res.err(t, "start", e),
        }
    }
    let active: Vec<Tool> = pipes.iter().map(|p| p.tool).collect();
    for r in 0..o.rounds {
        eprintln!("bench: round {}/{}", r + 1, o.rounds);
        // The order runs forwards, then the same rotation backwards, then rotates by one:
        // over 2 x tools rounds each tool runs once in each place each way, so that no
        // tool always follows the same one (a tool's round can leave work behind, such
        // as connections still closing, that the next one pays for) and none runs first
        // more often than another (rotating each round and reversing every other one,
        // as before, put the first tool first in 4 of 6 rounds, and its bulk and echo
        // figures were its worst).
        let k = pipes.len().max(1);
        let s = r / 2;
        for j in 0..pipes.len() {
            let i = if r % 2 == 0 { s + j } else { s + k - 1 - j };
            run_round(&mut pipes[i % k], o, &load_rt, &mut res);
        }
    }
    let mut idle_n = BTreeMap::new();
    if o.phase("idle") && o.idle > 0 {
        eprintln!("bench: idle sessions");
        for p in &mut pipes {
            if !p.procs.is_empty() {
                idle_n.insert(p.tool, o.idle.min(p.tool.idle_cap()));
                run_idle(p, o, &load_rt, &mut res);
            }
        }
    }
    let table = report(o, &active, &res, &idle_n);
    println!("{}\n", machine(load_at_start));
    if o.kind == Kind::Seqpacket {
        println!(
            "Kind: SOCK_SEQPACKET at both ends (echo messages are records; bulk moves {} KiB records).\n",
            RECORD / 1024
        );
    }
    println!("{table}");
    // End every gateway (Drop kills by pid), then the in-process servers.
    drop(pipes);
    load_rt.shutdown_timeout(Duration::from_secs(2));
    target_rt.shutdown_timeout(Duration::from_secs(2));
    let failed = res
        .errors
        .iter()
        .any(|(t, _)| matches!(t, Tool::Pipebridge | Tool::Direct) || o.smoke);
    if o.smoke && !res.values.keys().any(|(t, _)| *t == Tool::Pipebridge) {
        return Err("smoke: no pipebridge figure was measured".into());
    }
    Ok(!failed)
}
