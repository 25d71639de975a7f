//! Unix stream sockets: connect to an exported socket (`unix:`, `dotnet:`), and host a
//! socket file for a forward (parent directory created, stale file from a crash
//! replaced, a live one never stolen, mode/owner applied, removed on drop).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixStream;

use super::{Local, OpenContext, OpenError};

/// Connects to the socket at `path` within `ctx.timeout`, as the session's principal
/// when it has one (so the file's permissions and the server's SO_PEERCRED see that user).
pub async fn connect(path: &Path, ctx: &OpenContext) -> Result<Local, OpenError> {
    let stream = if let Some(p) = &ctx.principal {
        let fd = crate::identity::unix::connect(
            p,
            rustix::net::SocketType::STREAM,
            path,
            ctx.deadline(),
        )
        .await
        .map_err(|e| connect_error(path, &e))?;
        UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
            .map_err(|e| connect_error(path, &e))?
    } else {
        connect_plain(path, ctx.deadline()).await?
    };
    let (r, w) = stream.into_split();
    Ok(Local {
        reader: ctx
            .direction
            .client_reads()
            .then(|| super::Reader::Bytes(Box::new(r))),
        writer: ctx
            .direction
            .client_writes()
            .then(|| super::Writer::Bytes(Box::new(EagerWrite::new(w)))),
        child: None,
    })
}

/// The write half of a just-connected Unix stream, whose writes go straight to the
/// socket until one would block.
///
/// tokio learns a newly registered socket's writability only from the next turn of the
/// event loop, so a session's first bytes for the target (the caller's request, which
/// came with the stream's open) waited for that turn, and the gateway's response to the
/// open was encrypted and sent first. A non-blocking `send` is correct whatever tokio
/// knows; once one would block, tokio takes over for good (its readiness is current
/// after its own first attempt), so a session pays at most two extra system calls for it.
pub struct EagerWrite {
    inner: tokio::net::unix::OwnedWriteHalf,
    /// Writes still bypass tokio's readiness.
    direct: bool,
}

impl EagerWrite {
    /// Wraps the write half of a stream connected just now.
    pub fn new(inner: tokio::net::unix::OwnedWriteHalf) -> EagerWrite {
        EagerWrite {
            inner,
            direct: true,
        }
    }
}

impl tokio::io::AsyncWrite for EagerWrite {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.direct {
            let sock: &UnixStream = this.inner.as_ref();
            match rustix::net::send(sock, buf, rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => return std::task::Poll::Ready(Ok(n)),
                Err(rustix::io::Errno::AGAIN) => this.direct = false,
                Err(e) => return std::task::Poll::Ready(Err(e.into())),
            }
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How often a connect to a socket with a full backlog (EAGAIN) is retried.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(5);

/// Connects with the gateway's own rights; a full listen backlog (EAGAIN: the server is
/// slow to accept a burst) is retried until `deadline`.
///
/// A Unix stream socket's non-blocking `connect` completes or fails at once (there is no
/// `EINPROGRESS` for `AF_UNIX`), so the socket is registered with the reactor already
/// connected: tokio's `UnixStream::connect` would wait one turn of the event loop for
/// writability and then ask for `SO_ERROR`, before the session's first bytes could go.
async fn connect_plain(path: &Path, deadline: std::time::Instant) -> Result<UnixStream, OpenError> {
    let addr =
        rustix::net::SocketAddrUnix::new(path).map_err(|e| connect_error(path, &e.into()))?;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match crate::identity::unix::connect_now(rustix::net::SocketType::STREAM, &addr) {
            Ok(fd) => {
                return UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
                    .map_err(|e| connect_error(path, &e))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && left > BUSY_RETRY => {
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Err(e) => return Err(connect_error(path, &e)),
        }
    }
}

/// Maps a connect error to a peer message without internals.
pub fn connect_error(path: &Path, e: &io::Error) -> OpenError {
    let public = match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            "nothing is listening on the local endpoint"
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied on the local endpoint for this account"
        }
        // A listen backlog still full at the open's deadline (every connect retries it
        // until then).
        io::ErrorKind::WouldBlock => "the local endpoint did not accept in time",
        _ => "the local endpoint could not be opened",
    };
    OpenError::new(public, format!("connect {}: {e}", path.display()))
}

/// A file this gateway created (socket or FIFO); removed when dropped.
pub struct HostedFile {
    path: PathBuf,
}

impl HostedFile {
    /// Takes ownership of `path` for removal.
    pub fn new(path: &Path) -> HostedFile {
        HostedFile {
            path: path.to_path_buf(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes `path` ready for a new socket: creates the parent directory (0755) if missing,
/// removes a stale socket file (nothing accepts on it), refuses a live one or a
/// non-socket file.
pub async fn prepare_socket_path(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            // Only a refused connect (no listener: left over from a crash) or a file gone
            // in between says that nobody serves it. Anything else is someone's: a
            // listener of another socket type (EPROTOTYPE), one whose backlog is full
            // (EAGAIN), one we may not connect to (EACCES).
            let live = match UnixStream::connect(path).await {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ),
            };
            if live {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by a live server; refusing to take it over",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies `mode` to a hosted file.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use tokio::io::{AsyncWrite, AsyncWriteExt};

    fn pair() -> (std::os::unix::net::UnixStream, UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, UnixStream::from_std(b).unwrap())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn first_write_goes_out_before_the_event_loop_turns() {
        let cx = &mut Context::from_waker(Waker::noop());
        // tokio's own write half of a just-registered socket waits for a turn...
        let (_peer, s) = pair();
        let (_r, mut w) = s.into_split();
        assert!(Pin::new(&mut w).poll_write(cx, b"x").is_pending());
        // ...the eager one sends at once.
        let (mut peer, s) = pair();
        let (_r, w) = s.into_split();
        let mut w = EagerWrite::new(w);
        match Pin::new(&mut w).poll_write(cx, b"request") {
            Poll::Ready(Ok(7)) => {}
            other => panic!("expected 7 bytes written at once, got {other:?}"),
        }
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"request");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_socket_hands_over_to_tokio_and_loses_nothing() {
        let (mut peer, s) = pair();
        let (_r, w) = s.into_split();
        let mut w = EagerWrite::new(w);
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        // Written directly until the socket is full (nobody reads yet)...
        let cx = &mut Context::from_waker(Waker::noop());
        let mut at = 0;
        for _ in 0..10_000 {
            match Pin::new(&mut w).poll_write(cx, &data[at..]) {
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(e)) => panic!("write: {e}"),
                Poll::Pending => break,
            }
        }
        assert!(
            at < data.len() && !w.direct,
            "a full socket hands over to tokio"
        );
        // ...then tokio finishes once the peer reads.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        w.write_all(&data[at..]).await.unwrap();
        w.write_all(b"tail").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), data.len() + 4);
        assert!(got[..data.len()] == data[..] && &got[data.len()..] == b"tail");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_peer_is_a_broken_pipe() {
        let (peer, s) = pair();
        let (_r, w) = s.into_split();
        let mut w = EagerWrite::new(w);
        drop(peer);
        let e = w.write_all(b"late").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
