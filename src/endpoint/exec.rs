//! `exec:` endpoints: one child per session whose stdin/stdout are anonymous pipes. The
//! environment is scrubbed (DESIGN.md), stderr goes to the gateway log inside the session
//! span, and the child is killed when the session ends ([`kill`], with its process group
//! on Unix; kill-on-drop otherwise; tokio reaps it). A child that exits on its own has
//! what is left of its process group killed before it is reaped ([`wait`], Linux).
//!
//! On Unix the switch to the principal, dropping capabilities and the working directory
//! happen in the forked child, in that order, so the directory is entered with the
//! principal's rights only (a home only its owner may enter works; one the principal
//! cannot enter falls back to `/`; the gateway's own child enters its directory before
//! the drop, with the gateway's rights), and the child is started on a blocking thread, since the
//! fork returns only once the child has entered its directory (an automounted or hung
//! network home must not stall the shard's other sessions).

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::Instrument;

use super::{BoxRead, BoxWrite, Local, OpenContext, OpenError, Reader, Writer};
use crate::config::PipeConfig;

/// The gateway's own account (name, home), looked up once.
fn gateway_user() -> (String, PathBuf) {
    static USER: std::sync::OnceLock<(String, PathBuf)> = std::sync::OnceLock::new();
    USER.get_or_init(crate::platform::current_user).clone()
}

/// Spawns the child of an `exec:` pipe for one session.
pub async fn spawn(
    argv: &[String],
    pipe: &PipeConfig,
    ctx: &OpenContext,
) -> Result<Local, OpenError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(OpenError::new(
            "the local endpoint could not be opened",
            "exec: empty argv",
        ));
    };
    let (user, home) = match &ctx.principal {
        Some(p) => (p.name.clone(), p.home.clone()),
        None => gateway_user(),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(crate::platform::child_base_env())
        .env("HOME", &home)
        .env("USER", &user)
        .envs(&pipe.env)
        .env("PIPEBRIDGE_IDENTITY", &ctx.identity)
        .env("PIPEBRIDGE_PIPE", &pipe.name)
        .stdin(if ctx.direction.client_writes() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if ctx.direction.client_reads() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A process group of its own, which [`kill`] ends with it: a shell pipeline's or a
    // script's other processes do not run on, as the principal, after the session.
    #[cfg(unix)]
    cmd.process_group(0);
    if let Some(p) = &ctx.principal {
        crate::identity::exec_as(&mut cmd, p)?;
    }
    // After the switch (closures run in the order they were added): the drop and the
    // working directory. A principal's child enters it after the drop, with its own
    // rights only (a gateway holding CAP_DAC_OVERRIDE would otherwise let it enter one
    // it cannot); the gateway's own child, before, with the gateway's.
    #[cfg(unix)]
    {
        let principal = ctx.principal.as_ref().map(|p| p.uid);
        if principal.is_none() {
            enter_dir(&mut cmd, pipe.cwd.as_deref(), &home)?;
        }
        crate::identity::unix::exec_drops_capabilities(&mut cmd, principal);
        if principal.is_some() {
            enter_dir(&mut cmd, pipe.cwd.as_deref(), &home)?;
        }
    }
    #[cfg(not(unix))]
    cmd.current_dir(
        pipe.cwd
            .clone()
            .or_else(|| Some(home).filter(|h| h.is_dir()))
            .unwrap_or_else(|| PathBuf::from("/")),
    );
    // The fork returns once the child has entered its directory, which may hang (a
    // network home): the open's own limit bounds the wait (a child started later is
    // killed with its group when dropped), and at most SPAWNS_AT_ONCE forks hold a
    // blocking thread, so hung ones cannot take the whole blocking pool.
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    let late = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the child did not start in time",
        )
    };
    let started = match tokio::time::timeout_at(deadline, spawn_slots().acquire_owned()).await {
        Ok(Ok(slot)) => {
            let started = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                cmd.spawn().map(ExecChild)
            });
            match tokio::time::timeout_at(deadline, started).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(_) => Err(late()),
            }
        }
        _ => Err(late()),
    };
    let mut child = started.map_err(|e| {
        OpenError::new(
            "the local endpoint could not be started",
            format!("exec {program:?}: {e}"),
        )
    })?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_stderr(stderr).in_current_span());
    }
    let reader = child
        .stdout
        .take()
        .map(|s| Reader::Bytes(Box::new(s) as BoxRead));
    let writer = child.stdin.take().map(|s| {
        // At once, not after the event loop's next turn (unix: `eager`).
        #[cfg(unix)]
        let s = super::eager::EagerWrite::new(s);
        Writer::Bytes(Box::new(s) as BoxWrite)
    });
    Ok(Local {
        reader,
        writer,
        child: Some(child),
        hangup: None,
    })
}

/// Forks of `exec:` children in flight at once ([`spawn`]).
const SPAWNS_AT_ONCE: usize = 64;

fn spawn_slots() -> std::sync::Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(SPAWNS_AT_ONCE)))
        .clone()
}

/// Has `cmd`'s child enter its working directory once it runs as the principal: the
/// pipe's `cwd` (failing the spawn when it cannot), else `home`, else `/` (DESIGN.md).
#[cfg(unix)]
fn enter_dir(
    cmd: &mut Command,
    cwd: Option<&std::path::Path>,
    home: &std::path::Path,
) -> Result<(), OpenError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            OpenError::new(
                "the local endpoint could not be started",
                format!("exec: working directory {} holds a NUL byte", p.display()),
            )
        })
    };
    let dirs = match cwd {
        Some(d) => vec![c(d)?],
        None => vec![c(home)?, c(std::path::Path::new("/"))?],
    };
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec and makes only chdir
    // system calls through rustix on C strings allocated before the fork; it allocates
    // nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let mut last = rustix::io::Errno::NOENT;
            for d in &dirs {
                match rustix::process::chdir(d.as_c_str()) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            Err(last.into())
        });
    }
    Ok(())
}

/// Waits for an `exec:` child to exit and reaps it. On Linux the process group it led
/// (jobs it left behind, which would run on as the principal) is killed first, while the
/// child is a zombie, so its pid and group id cannot have been given to anyone else.
/// Cancel-safe: dropped before the end, nothing is reaped.
pub async fn wait(child: &mut tokio::process::Child) -> std::io::Result<std::process::ExitStatus> {
    #[cfg(target_os = "linux")]
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let exited = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .ok()
            .and_then(|fd| {
                #[allow(unsafe_code)]
                // SAFETY: the AsyncFd owns the pidfd, which stays open and the same until
                // the AsyncFd is dropped; nothing else closes or replaces it.
                unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        fd,
                        tokio::io::Interest::READABLE,
                    )
                }
                .ok()
            });
        if let Some(fd) = exited {
            // Readable once the process has exited (not reaped).
            let _ = fd.readable().await;
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
    child.wait().await
}

/// A session's `exec:` child: dropped while it has not been reaped (a session that
/// ended before its bridge ran, say, or whose task was dropped), it is killed with its
/// process group ([`kill`]), not only the child (`kill_on_drop`).
pub struct ExecChild(tokio::process::Child);

impl std::ops::Deref for ExecChild {
    type Target = tokio::process::Child;
    fn deref(&self) -> &tokio::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ExecChild {
    fn deref_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.0
    }
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        if self.0.id().is_some() {
            kill(&mut self.0);
        }
    }
}

/// Kills an `exec:` child the session ends, and on Unix the process group it leads (the
/// processes it started that stayed in it). Only while the child is not yet reaped: its
/// pid, and so its group's id, cannot have been given to anyone else by then.
pub fn kill(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
}

/// Longest stderr line logged as one; a longer one is logged in pieces this long.
const STDERR_LINE_MAX: usize = 4096;

/// Logs what a child writes to stderr, line by line, until its end: a line that is not
/// UTF-8 is logged with replacement characters, one longer than [`STDERR_LINE_MAX`] (a
/// progress bar redrawn with `\r`, say) in pieces, so the gateway holds at most that
/// much of it. It reads on to the end whatever the child writes: a child whose stderr
/// closed would die of `SIGPIPE` at its next warning.
async fn log_stderr(mut stderr: impl AsyncRead + Unpin) {
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; STDERR_LINE_MAX];
    let log = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes.strip_suffix(b"\r").unwrap_or(bytes));
        tracing::info!(target: "pipebridge::exec", stderr = %text);
    };
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            let end = rest.iter().position(|&b| b == b'\n');
            let text = end.unwrap_or(rest.len());
            let room = STDERR_LINE_MAX - line.len();
            if text > room {
                // A piece of a long line (more of it follows in `rest`), cut before a
                // UTF-8 character's continuation bytes (at most three back), so that
                // characters stay whole; the cut-off bytes start the next piece.
                line.extend_from_slice(&rest[..room]);
                rest = &rest[room..];
                let at = |i: usize| if i < line.len() { line[i] } else { rest[0] };
                let mut cut = line.len();
                while cut > 0 && line.len() - cut < 3 && at(cut) & 0xC0 == 0x80 {
                    cut -= 1;
                }
                if cut == 0 {
                    cut = line.len();
                }
                log(&line[..cut]);
                line.drain(..cut);
            } else if end.is_some() {
                line.extend_from_slice(&rest[..text]);
                log(&line);
                line.clear();
                rest = &rest[text + 1..];
            } else {
                line.extend_from_slice(rest);
                rest = &[];
            }
        }
    }
    if !line.is_empty() {
        log(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines [`log_stderr`] logs for `input` written in `pieces`.
    async fn logged(input: &[u8], pieces: usize) -> Vec<String> {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sub = {
            let lines = lines.clone();
            tracing_subscriber::fmt()
                .with_writer(move || Capture(lines.clone()))
                .without_time()
                .with_level(false)
                .with_target(false)
                .with_ansi(false)
                .finish()
        };
        let _g = tracing::subscriber::set_default(sub);
        let reading = log_stderr(r);
        let writing = async {
            use tokio::io::AsyncWriteExt;
            for c in input.chunks(input.len().div_ceil(pieces).max(1)) {
                w.write_all(c).await.unwrap();
            }
            drop(w);
        };
        tokio::join!(reading, writing);
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| l.trim_start_matches("stderr=").to_string())
            .collect()
    }

    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stderr_is_logged_by_line_whatever_the_child_writes() {
        for pieces in [1, 3, 1000] {
            // Lines, a \r\n ending, bytes that are not UTF-8, and a last line unended.
            let got = logged(b"one\ntwo\r\nbad \xff\xfe byte\nlast", pieces).await;
            assert_eq!(
                got,
                ["one", "two", "bad \u{fffd}\u{fffd} byte", "last"],
                "{pieces}"
            );
            // A line longer than the most held at once goes in pieces; one exactly that
            // long is one line.
            let mut long = vec![b'a'; STDERR_LINE_MAX * 2 + 10];
            long.push(b'\n');
            long.extend(vec![b'b'; STDERR_LINE_MAX]);
            long.push(b'\n');
            let got = logged(&long, pieces).await;
            let lens: Vec<usize> = got.iter().map(|l| l.len()).collect();
            assert_eq!(
                lens,
                [STDERR_LINE_MAX, STDERR_LINE_MAX, 10, STDERR_LINE_MAX],
                "{pieces}"
            );
            // Pieces keep UTF-8 characters whole (3-byte ones: 4096 is not a multiple).
            let euros = "€".repeat(3000);
            let got = logged(format!("{euros}\n").as_bytes(), pieces).await;
            assert!(got.len() > 1, "{pieces}: one piece");
            assert_eq!(got.concat(), euros, "{pieces}: characters split");
        }
    }
}
