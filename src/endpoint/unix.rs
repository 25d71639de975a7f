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
            .then(|| super::Writer::Bytes(Box::new(super::eager::EagerWrite::new(w)))),
        child: None,
        hangup: None,
    })
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
    let fd = connect_plain_fd(rustix::net::SocketType::STREAM, path, deadline).await?;
    UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
        .map_err(|e| connect_error(path, &e))
}

/// Connects a non-blocking Unix socket of type `ty` at `path` as the gateway, retrying
/// a full listen backlog (`EAGAIN`: not connected) until `deadline`.
pub(super) async fn connect_plain_fd(
    ty: rustix::net::SocketType,
    path: &Path,
    deadline: std::time::Instant,
) -> Result<std::os::fd::OwnedFd, OpenError> {
    let addr =
        rustix::net::SocketAddrUnix::new(path).map_err(|e| connect_error(path, &e.into()))?;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match crate::identity::unix::connect_now(ty, &addr) {
            Ok(fd) => return Ok(fd),
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
