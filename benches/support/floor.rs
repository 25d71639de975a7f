//! The `floor` tool: the least work any two-process bridge has to do, run as two processes
//! of this bench binary (`--floor-relay dial|export`). Not a product and not a competitor:
//! a yardstick for the figures whose targets are ratios against other bridges.
//!
//! - No TLS, no authentication, no HTTP: a 9-byte header (`id`, `len`, a flag) per frame
//!   over one TCP connection on loopback (TCP_NODELAY) that is opened once at start, as a
//!   warm pool or an HTTP/2 connection would be.
//! - One thread per process and one `epoll` set; a readable socket is read once and what
//!   was read is written at once (blocking writes, so no buffering and no write
//!   readiness): per hop, one `epoll_wait`, one `read` and one `write`.
//! - A session is opened by its first bytes (the dialling side waits for the caller's
//!   first bytes and sends them with the open, as pipebridge's forwards do; the
//!   exporting side connects to the target and writes them), so a new session costs the
//!   same hand-offs as one echo.
//!
//! What it is for: latency and new sessions, the figures where hand-offs, not work,
//! set the time. It is no throughput yardstick (one frame per read, no coalescing of
//! sessions' frames, no write vectoring), it serves only targets that speak first, and
//! a caller's EOF closes the session both ways (no half-close): all the bench needs.
//!
//! Blocking writes mean both directions at once could deadlock when both sockets fill;
//! the bench never moves bulk data both ways at once. Ids are never reused; a session's
//! first frame carries the open flag, and frames for a session that is not open (it has
//! ended on the other side) are dropped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Frame header: id (u32 LE), length (u32 LE), flag (DATA, CLOSE or OPEN).
const HEADER: usize = 9;
const DATA: u8 = 0;
const CLOSE: u8 = 1;
/// A session's first frame: open it, then take the data.
const OPEN: u8 = 2;
/// Largest single read (and so frame payload).
const READ_MAX: usize = 256 * 1024;
const LISTENER: u64 = 0;
const LINK: u64 = 1;

/// Runs a relay when the bench was started as one (`--floor-relay ...`); never returns.
pub fn main_if_relay(args: &[String]) {
    if args.first().map(String::as_str) != Some("--floor-relay") {
        return;
    }
    let r = match (args.get(1).map(String::as_str), args.get(2), args.get(3)) {
        (Some("dial"), Some(sock), Some(port)) => dial(Path::new(sock), port),
        (Some("export"), Some(port), Some(target)) => export(port, Path::new(target)),
        _ => Err("usage: --floor-relay dial SOCK PORT | export PORT TARGET".into()),
    };
    if let Err(e) = r {
        eprintln!("floor relay: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

type R<T> = Result<T, String>;

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

struct Epoll(RawFd);

impl Epoll {
    fn new() -> R<Epoll> {
        #[allow(unsafe_code)]
        // SAFETY: a plain system call with a flag; the fd it returns is owned by Epoll.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Epoll(fd))
    }
    fn add(&self, fd: RawFd, token: u64) -> R<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        #[allow(unsafe_code)]
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let r = unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
    /// Waits for events; returns the tokens of the ready sockets.
    fn wait(&self, evs: &mut [libc::epoll_event], ready: &mut Vec<u64>) -> R<()> {
        ready.clear();
        #[allow(unsafe_code)]
        // SAFETY: the kernel writes at most `evs.len()` entries into `evs`.
        let n = unsafe { libc::epoll_wait(self.0, evs.as_mut_ptr(), evs.len() as i32, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(format!("epoll_wait: {e}"));
        }
        ready.extend(evs[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: the fd is owned by this value and closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// Frames going out on the link, written whole with one `write_all`; frames coming in,
/// `inb[..filled]`.
struct Link {
    s: TcpStream,
    out: Vec<u8>,
    inb: Vec<u8>,
    filled: usize,
}

impl Link {
    fn new(s: TcpStream) -> R<Link> {
        s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        Ok(Link {
            s,
            out: Vec::with_capacity(HEADER + READ_MAX),
            inb: vec![0; 2 * (HEADER + READ_MAX)],
            filled: 0,
        })
    }
    fn send(&mut self, id: u32, data: &[u8], flag: u8) -> R<()> {
        self.out.clear();
        self.out.extend_from_slice(&id.to_le_bytes());
        self.out
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.out.push(flag);
        self.out.extend_from_slice(data);
        self.s.write_all(&self.out).map_err(io("link write"))
    }
    /// Reads once (the link is readable) and hands each whole frame to `f`; false at EOF.
    fn recv(&mut self, mut f: impl FnMut(u32, &[u8], u8) -> R<()>) -> R<bool> {
        // Room for one whole frame after what a cut one left (at most one frame).
        let n = self
            .s
            .read(&mut self.inb[self.filled..])
            .map_err(io("link read"))?;
        if n == 0 {
            return Ok(false);
        }
        self.filled += n;
        let mut at = 0;
        while self.filled - at >= HEADER {
            let h = &self.inb[at..at + HEADER];
            let id = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let flag = h[8];
            if self.filled - at < HEADER + len {
                break;
            }
            f(id, &self.inb[at + HEADER..at + HEADER + len], flag)?;
            at += HEADER + len;
        }
        self.inb.copy_within(at..self.filled, 0);
        self.filled -= at;
        Ok(true)
    }
}

/// Reads what a socket holds without waiting (`MSG_DONTWAIT`; the socket blocks).
fn recv_now(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    #[allow(unsafe_code)]
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads once from a readable session socket: Some(n) bytes, or None at EOF or error.
fn read_once(s: &mut UnixStream, buf: &mut [u8]) -> Option<usize> {
    match s.read(buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// The dialling side: hosts `sock`, one link to the exporting side on 127.0.0.1:`port`.
fn dial(sock: &Path, port: &str) -> R<()> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let _ = std::fs::remove_file(sock);
    let lis = UnixListener::bind(sock).map_err(io("bind"))?;
    lis.set_nonblocking(true).map_err(io("listener"))?;
    let end = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => return Err(format!("connect link: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut link = Link::new(s)?;
    let ep = Epoll::new()?;
    ep.add(lis.as_raw_fd(), LISTENER)?;
    ep.add(link.s.as_raw_fd(), LINK)?;
    eprintln!("floor relay: dial ready");
    // Each session: its socket and whether its open has been sent.
    let mut conns: HashMap<u32, (UnixStream, bool)> = HashMap::new();
    let mut next_id: u32 = 1;
    let mut buf = vec![0u8; READ_MAX];
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready = Vec::with_capacity(256);
    loop {
        ep.wait(&mut evs, &mut ready)?;
        for &t in &ready {
            match t {
                // Until none is left (WouldBlock), or a caller is lost (ECONNABORTED,
                // EMFILE): the relay goes on either way.
                LISTENER => {
                    while let Ok((c, _)) = lis.accept() {
                        let id = next_id;
                        next_id += 1;
                        ep.add(c.as_raw_fd(), id as u64 + 2)?;
                        // A caller's first bytes are often there already: sent at
                        // once, not after another turn of the loop.
                        match recv_now(&c, &mut buf) {
                            Ok(n) if n > 0 => {
                                link.send(id, &buf[..n], OPEN)?;
                                conns.insert(id, (c, true));
                            }
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                conns.insert(id, (c, false));
                            }
                            Err(_) => {}
                        }
                    }
                }
                LINK => {
                    let mut failed = Vec::new();
                    let open = link.recv(|id, data, flag| {
                        if flag == CLOSE {
                            conns.remove(&id);
                        } else if let Some((c, _)) = conns.get_mut(&id) {
                            if c.write_all(data).is_err() {
                                conns.remove(&id);
                                failed.push(id);
                            }
                        }
                        Ok(())
                    })?;
                    if !open {
                        return Err("the exporting side closed the link".into());
                    }
                    for id in failed {
                        link.send(id, &[], CLOSE)?;
                    }
                }
                t => {
                    let id = (t - 2) as u32;
                    let Some((c, opened)) = conns.get_mut(&id) else {
                        continue;
                    };
                    match read_once(c, &mut buf) {
                        Some(n) => {
                            let flag = if *opened { DATA } else { OPEN };
                            *opened = true;
                            link.send(id, &buf[..n], flag)?;
                        }
                        None => {
                            let opened = *opened;
                            conns.remove(&id);
                            if opened {
                                link.send(id, &[], CLOSE)?;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The exporting side: listens on 127.0.0.1:`port` for the one link, connects to
/// `target` for each session.
fn export(port: &str, target: &Path) -> R<()> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let lis = TcpListener::bind(("127.0.0.1", port)).map_err(io("bind"))?;
    eprintln!("floor relay: export listening");
    let (s, _) = lis.accept().map_err(io("accept link"))?;
    drop(lis);
    let mut link = Link::new(s)?;
    let ep = Epoll::new()?;
    ep.add(link.s.as_raw_fd(), LINK)?;
    let mut conns: HashMap<u32, UnixStream> = HashMap::new();
    let mut closed: Vec<u32> = Vec::new();
    let mut buf = vec![0u8; READ_MAX];
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready = Vec::with_capacity(256);
    loop {
        ep.wait(&mut evs, &mut ready)?;
        for &t in &ready {
            if t == LINK {
                let open = link.recv(|id, data, flag| {
                    if flag == CLOSE {
                        conns.remove(&id);
                        return Ok(());
                    }
                    if flag == OPEN {
                        match UnixStream::connect(target) {
                            Ok(c) => {
                                ep.add(c.as_raw_fd(), id as u64 + 2)?;
                                conns.insert(id, c);
                            }
                            Err(_) => {
                                closed.push(id);
                                return Ok(());
                            }
                        }
                    }
                    if let Some(c) = conns.get_mut(&id) {
                        if c.write_all(data).is_err() {
                            conns.remove(&id);
                            closed.push(id);
                        }
                    }
                    Ok(())
                })?;
                if !open {
                    return Ok(());
                }
            } else {
                let id = (t - 2) as u32;
                let Some(c) = conns.get_mut(&id) else {
                    continue;
                };
                match read_once(c, &mut buf) {
                    Some(n) => link.send(id, &buf[..n], DATA)?,
                    None => {
                        conns.remove(&id);
                        closed.push(id);
                    }
                }
            }
        }
        for id in closed.drain(..) {
            link.send(id, &[], CLOSE)?;
        }
    }
}
