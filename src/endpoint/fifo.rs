//! `fifo:` endpoints: Linux named pipes, one-way. Opens never block a thread: readers open
//! with O_NONBLOCK and wait for data by readiness; writers retry ENXIO ("no reader") on a
//! timer, since nothing signals a reader's arrival.
//!
//! Exported `out` (the client reads) behaves like `cat FIFO`: the session waits for a
//! local writer, streams what writers write, and ends at EOF when the last writer closes.
//! Exported `in` (the client writes) behaves like `cat > FIFO`: the open waits (bounded)
//! for a local reader, else 502 "no reader"; the client's `eof` closes the write end.
//! Several sessions on one FIFO share it as local processes would: concurrent `out`
//! sessions each get part of the data (every byte goes to exactly one reader), concurrent
//! `in` sessions interleave (writes up to PIPE_BUF = 4096 bytes stay whole). Use
//! `max_instances = 1` for a single consumer or producer.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::unix::pipe;

use super::{BoxRead, BoxWrite, Local, OpenContext, OpenError, Reader, Writer};

/// How often a writer retries an open that found no reader.
pub const NO_READER_RETRY: Duration = Duration::from_millis(20);

fn check_fifo(path: &Path) -> Result<(), OpenError> {
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_fifo() => Ok(()),
        Ok(_) => Err(OpenError::new(
            "the local endpoint could not be opened",
            format!("{} is not a FIFO", path.display()),
        )),
        Err(e) => Err(super::unix::connect_error(path, &e)),
    }
}

/// Opens the read end (never blocks; reads wait for a writer).
pub fn open_reader(path: &Path) -> io::Result<pipe::Receiver> {
    pipe::OpenOptions::new().open_receiver(path)
}

/// Opens the write end, retrying "no reader" until `deadline`.
pub async fn open_writer(path: &Path, deadline: Instant) -> io::Result<pipe::Sender> {
    loop {
        match pipe::OpenOptions::new().open_sender(path) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
                if Instant::now() + NO_READER_RETRY > deadline {
                    return Err(e);
                }
                tokio::time::sleep(NO_READER_RETRY).await;
            }
            r => return r,
        }
    }
}

/// Opens an exported FIFO for one session (as the session's principal when it has one).
pub async fn open(path: &Path, ctx: &OpenContext) -> Result<Local, OpenError> {
    // As the gateway, before the open. With a principal the opened descriptor is checked
    // instead: this lookup, on the session's thread, could block where the principal's
    // open goes to the impersonation threads (a FUSE or network mount).
    if ctx.principal.is_none() {
        check_fifo(path)?;
    }
    let failed = |e: io::Error| {
        if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) {
            OpenError::new(
                "no reader on the local FIFO",
                format!("open {}: no reader", path.display()),
            )
        } else {
            super::unix::connect_error(path, &e)
        }
    };
    let write = !ctx.direction.client_reads();
    let (rx, tx) = match (&ctx.principal, write) {
        (Some(p), w) => {
            let fd = crate::identity::unix::open_fifo(p, path, w, ctx.deadline())
                .await
                .map_err(failed)?;
            let st = rustix::fs::fstat(&fd).map_err(|e| failed(e.into()))?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Fifo {
                return Err(OpenError::new(
                    "the local endpoint could not be opened",
                    format!("{} is not a FIFO", path.display()),
                ));
            }
            if w {
                (None, Some(pipe::Sender::from_owned_fd(fd).map_err(failed)?))
            } else {
                (
                    Some(pipe::Receiver::from_owned_fd(fd).map_err(failed)?),
                    None,
                )
            }
        }
        (None, false) => (Some(open_reader(path).map_err(failed)?), None),
        (None, true) => (
            None,
            Some(open_writer(path, ctx.deadline()).await.map_err(failed)?),
        ),
    };
    Ok(Local {
        reader: rx.map(|r| Reader::Bytes(Box::new(r) as BoxRead)),
        writer: tx.map(|w| Writer::Bytes(Box::new(super::eager::EagerWrite::new(w)) as BoxWrite)),
        child: None,
        hangup: None,
    })
}

/// The write end of a hosted FIFO whose half-close waits until local readers drained
/// what was written, so the close is seen as EOF right after the last byte (a writer
/// that closed with data still buffered could be followed by the next round's writer
/// before the reader got to EOF).
pub struct DrainingSender {
    inner: super::eager::EagerWrite<pipe::Sender>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl DrainingSender {
    /// Wraps a FIFO write end.
    pub fn new(inner: pipe::Sender) -> Self {
        DrainingSender {
            inner: super::eager::EagerWrite::new(inner),
            wait: None,
        }
    }
}

impl tokio::io::AsyncWrite for DrainingSender {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        loop {
            if let Some(w) = self.wait.as_mut() {
                if w.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            match rustix::io::ioctl_fionread(self.inner.get_ref()) {
                Ok(0) | Err(_) => return Poll::Ready(Ok(())),
                Ok(_) => {
                    self.wait = Some(Box::pin(tokio::time::sleep(DRAIN_POLL)));
                }
            }
        }
    }
}

use std::future::Future;

/// How often a draining writer checks whether readers consumed the pipe.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Creates a hosted FIFO at `path` with `mode` (an existing FIFO is reused; any other
/// file is refused).
pub fn create(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_fifo() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a FIFO; refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                use std::os::unix::fs::DirBuilderExt;
                // Explicit mode: never world-writable, whatever the umask.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
            }
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode))
                .map_err(io::Error::from)?;
        }
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
