//! Local pipe endpoints: how a pipe is written in config (`kind:target`, [`EndpointSpec`]),
//! how an exported one is opened for a session ([`open`]), and the [`Local`] halves the
//! bridge drives. One file per kind.

#[cfg(unix)]
pub mod eager;
pub mod exec;
#[cfg(unix)]
pub mod fifo;
pub mod message;
#[cfg(unix)]
pub mod seqpacket;
#[cfg(unix)]
pub mod unix;
#[cfg(windows)]
pub mod windows;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{Direction, Mode, PipeConfig};

/// A boxed local reader (the pipe's output towards the network).
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// A boxed local writer (the network's data into the pipe). `poll_shutdown` half-closes.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// How a pipe is reached locally, parsed from `kind:target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointSpec {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A Unix SOCK_SEQPACKET socket (message mode).
    Seqpacket(PathBuf),
    /// A FIFO (one-way).
    Fifo(PathBuf),
    /// A child per session; its stdin/stdout are the pipe.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// The socket of a .NET `NamedPipeServerStream(NAME)` on Unix.
    Dotnet(String),
    /// A Windows named pipe `\\.\pipe\NAME`.
    Npipe(String),
    /// The process's own stdin/stdout (`connect` only).
    Stdio,
}

impl EndpointSpec {
    /// Parses the `endpoint` of a `[[pipe]]` (an exported endpoint); `argv` is the
    /// pipe's `argv` key, used with `endpoint = "exec"`.
    pub fn parse_export(s: &str, argv: Option<&[String]>) -> Result<EndpointSpec, String> {
        if s == "exec" {
            return match argv {
                Some(a) if !a.is_empty() && !a[0].is_empty() => {
                    Ok(EndpointSpec::Exec { argv: a.to_vec() })
                }
                _ => Err(
                    "endpoint = \"exec\" needs a non-empty argv = [\"program\", \"arg\", ...]"
                        .into(),
                ),
            };
        }
        let (kind, target) = s.split_once(':').ok_or_else(|| {
            format!("invalid endpoint {s:?}: expected kind:target, e.g. unix:/run/app.sock")
        })?;
        platform_has(kind)?;
        match kind {
            "unix" => Ok(EndpointSpec::Unix(abs_path(target)?)),
            "seqpacket" => Ok(EndpointSpec::Seqpacket(abs_path(target)?)),
            "fifo" => Ok(EndpointSpec::Fifo(abs_path(target)?)),
            "exec" => {
                if argv.is_some() {
                    return Err("give either exec:COMMAND LINE or endpoint = \"exec\" with argv, not both".into());
                }
                let argv = shell_words::split(target)
                    .map_err(|e| format!("invalid exec command line: {e}"))?;
                if argv.is_empty() {
                    return Err("exec: needs a command".into());
                }
                Ok(EndpointSpec::Exec { argv })
            }
            "dotnet" => Ok(EndpointSpec::Dotnet(dotnet_name(target)?)),
            "npipe" => Ok(EndpointSpec::Npipe(npipe_name(target)?)),
            "stdio" => Err("stdio is the endpoint of `pipebridge connect`, not of a pipe".into()),
            _ => Err(format!(
                "unknown endpoint kind {kind:?}: expected unix, seqpacket, fifo, exec, dotnet or npipe"
            )),
        }
    }

    /// Parses the `listen` of a forward (a hosted endpoint).
    pub fn parse_hosted(s: &str) -> Result<EndpointSpec, String> {
        let (kind, target) = s.split_once(':').ok_or_else(|| {
            format!("invalid endpoint {s:?}: expected unix:PATH, seqpacket:PATH, fifo:PATH, dotnet:NAME or npipe:NAME")
        })?;
        platform_has(kind)?;
        match kind {
            "unix" => Ok(EndpointSpec::Unix(abs_or_rel_path(target)?)),
            "dotnet" => Ok(EndpointSpec::Dotnet(dotnet_name(target)?)),
            "seqpacket" => Ok(EndpointSpec::Seqpacket(abs_or_rel_path(target)?)),
            "fifo" => Ok(EndpointSpec::Fifo(abs_or_rel_path(target)?)),
            "npipe" => Ok(EndpointSpec::Npipe(npipe_name(target)?)),
            _ => Err(format!(
                "a forward cannot host {kind:?} endpoints: expected unix:PATH, seqpacket:PATH, fifo:PATH, dotnet:NAME or npipe:NAME"
            )),
        }
    }

    /// The mode this kind forces, if any.
    pub fn natural_mode(&self) -> Option<Mode> {
        match self {
            EndpointSpec::Seqpacket(_) => Some(Mode::Message),
            EndpointSpec::Npipe(_) => None,
            _ => Some(Mode::Byte),
        }
    }

    /// The kind's name (`unix`, `exec`, ...), for listings and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EndpointSpec::Unix(_) => "unix",
            EndpointSpec::Seqpacket(_) => "seqpacket",
            EndpointSpec::Fifo(_) => "fifo",
            EndpointSpec::Exec { .. } => "exec",
            EndpointSpec::Dotnet(_) => "dotnet",
            EndpointSpec::Npipe(_) => "npipe",
            EndpointSpec::Stdio => "stdio",
        }
    }

    /// The socket path of a Unix-socket kind (`unix:`, `dotnet:`).
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            EndpointSpec::Unix(p) | EndpointSpec::Seqpacket(p) => Some(p.clone()),
            EndpointSpec::Dotnet(n) => Some(dotnet_path(n)),
            _ => None,
        }
    }

    /// The file a hosted endpoint of this kind lives at: its socket path, or a FIFO's
    /// path (`None` for a named pipe and the kinds that cannot be hosted).
    pub fn hosted_file(&self) -> Option<PathBuf> {
        match self {
            EndpointSpec::Fifo(p) => Some(p.clone()),
            other => other.socket_path(),
        }
    }
}

/// Refuses an endpoint kind this platform lacks (DESIGN.md: a config error there).
fn platform_has(kind: &str) -> Result<(), String> {
    let unix_only = ["unix", "seqpacket", "fifo", "dotnet"];
    if cfg!(windows) && unix_only.contains(&kind) {
        return Err(format!(
            "{kind}: endpoints exist on Unix builds only; on Windows use npipe:NAME"
        ));
    }
    if cfg!(unix) && kind == "npipe" {
        return Err("npipe: endpoints exist on Windows builds only".into());
    }
    Ok(())
}

/// A pipe name for `\\.\pipe\NAME`: given bare or with that prefix; no NUL, at most
/// 246 characters (256 for the whole path).
fn npipe_name(n: &str) -> Result<String, String> {
    let n = n.strip_prefix(r"\\.\pipe\").unwrap_or(n);
    // Win32 folds `\\.\pipe\..\X` into `\\.\X` (a device): no `.`/`..` components.
    if n.split(['\\', '/']).any(|c| c == "." || c == "..") {
        return Err("an npipe: name has no . or .. components".into());
    }
    if n.is_empty() || n.contains('\0') || n.chars().count() > 246 {
        return Err(
            "npipe: needs a pipe name (without \\\\.\\pipe\\, at most 246 characters)".into(),
        );
    }
    Ok(n.to_string())
}

fn abs_path(p: &str) -> Result<PathBuf, String> {
    if p.is_empty() {
        return Err("the endpoint needs a path".into());
    }
    if p.contains('\0') {
        return Err("the path contains NUL".into());
    }
    Ok(PathBuf::from(p))
}

fn abs_or_rel_path(p: &str) -> Result<PathBuf, String> {
    abs_path(p)
}

fn dotnet_name(n: &str) -> Result<String, String> {
    if n.is_empty() || n.contains('\0') {
        return Err("dotnet: needs a pipe name".into());
    }
    if !n.starts_with('/') && n.contains('/') {
        return Err("a dotnet: pipe name is a plain name or an absolute path".into());
    }
    Ok(n.to_string())
}

/// Where .NET on Unix puts `NamedPipeServerStream(name)`: `$TMPDIR/CoreFxPipe_NAME`
/// (`/tmp` when TMPDIR is unset), or the name itself when it is an absolute path.
pub fn dotnet_path(name: &str) -> PathBuf {
    if name.starts_with('/') {
        return PathBuf::from(name);
    }
    let tmp = std::env::var_os("TMPDIR")
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tmp.join(format!("CoreFxPipe_{name}"))
}

/// The pipe's output: a byte stream or whole messages.
pub enum Reader {
    /// Byte mode.
    Bytes(BoxRead),
    /// Message mode.
    Messages(message::MsgReader),
}

/// The pipe's input: a byte stream or whole messages.
pub enum Writer {
    /// Byte mode.
    Bytes(BoxWrite),
    /// Message mode.
    Messages(message::MsgWriter),
}

/// The local side of a session, as the bridge drives it.
pub struct Local {
    /// Data from the pipe towards the network (`None`: this session sends nothing).
    pub reader: Option<Reader>,
    /// Data from the network into the pipe (`None`: data from the peer is refused).
    pub writer: Option<Writer>,
    /// An `exec:` child: awaited after `reader` ends, its status sent as `exit`.
    /// Dropping it kills the child.
    pub child: Option<exec::ExecChild>,
    /// Set for a forward's caller socket, and marks this side as a caller: at the end
    /// of `reader`'s data it tells whether the caller is gone entirely (closed) rather
    /// than only done sending (a half-close), and then the session ends at once, as
    /// nothing more could reach the caller. A caller's read reset (`ECONNRESET`) counts
    /// as its end too, and a write into it that fails (`EPIPE`, `ECONNRESET`) discards
    /// what is left for it, or ends the session in order if its own data has ended.
    /// (Not set for exported targets: a target that closes while its caller still sends
    /// must look like a failed write to that caller, as on a direct socket.)
    pub hangup: Option<Hangup>,
}

/// A local socket whose peer may close it entirely: asked only while the [`Local`]'s
/// reader, which holds the socket open, is alive.
#[derive(Clone, Copy, Debug)]
pub struct Hangup {
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
}

impl Hangup {
    /// The socket `s`; its [`Local`] must hold it open for as long as this is asked.
    #[cfg(unix)]
    pub fn of(s: &impl std::os::fd::AsRawFd) -> Hangup {
        Hangup { fd: s.as_raw_fd() }
    }

    /// Whether the peer closed the socket (or shut it down both ways), so nothing more
    /// written to it can be read: then the session need not wait for the far side's end.
    /// Our own shutdown for writing plus the peer's reads as hung up too, so this is
    /// asked only while our write side is open.
    pub fn peer_gone(&self) -> bool {
        // Linux's AF_UNIX poll reports POLLHUP only once both directions are shut down;
        // elsewhere the answer is not that exact, so no.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        return crate::platform::hung_up(self.fd);
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        false
    }
}

/// Who is opening a pipe, for `exec:` environments and logs.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The authenticated identity's name.
    pub identity: String,
    /// The session's direction.
    pub direction: Direction,
    /// Bound on waits inside the open (connect, FIFO open).
    pub timeout: Duration,
    /// Largest message (message mode).
    pub max_message: usize,
    /// Open as this account (`None`: the gateway's own rights, `run_as = "gateway"`).
    pub principal: Option<crate::identity::Principal>,
    /// The session's mode (`npipe:` pipes choose per session).
    pub mode: Mode,
}

impl Local {
    /// For a session that carries nothing from the caller (direction `out`): the
    /// caller's bytes are read and dropped, so that its end or reset is still seen but
    /// nothing it types reaches the peer (which would end the session with 1008): bytes,
    /// or whole messages (a seqpacket caller's records).
    pub fn discard_input(mut self) -> Local {
        self.reader = match self.reader {
            Some(Reader::Bytes(r)) => Some(Reader::Bytes(Box::new(Discard(r)))),
            Some(Reader::Messages(m)) => {
                Some(Reader::Messages(message::MsgReader::Discard(Box::new(m))))
            }
            None => None,
        };
        self
    }

    /// This side with `first` read ahead of its byte stream (or, for a side that reads
    /// messages, as one whole message): the session sends it first. Empty `first`, or a
    /// side that reads nothing, stays as it is.
    pub fn prepend(mut self, first: bytes::Bytes) -> Local {
        use tokio::io::AsyncReadExt;
        self.reader = match self.reader {
            Some(Reader::Bytes(r)) if !first.is_empty() => Some(Reader::Bytes(Box::new(
                std::io::Cursor::new(first).chain(r),
            ))),
            // One message, whole (a seqpacket caller's first record).
            Some(Reader::Messages(m)) if !first.is_empty() => {
                Some(Reader::Messages(message::MsgReader::Prepended {
                    first: Some(first),
                    rest: Box::new(m),
                }))
            }
            other => other,
        };
        self
    }
}

/// A reader whose bytes are read and dropped: it ends when its source does
/// ([`Local::discard_input`]).
struct Discard(BoxRead);

impl AsyncRead for Discard {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let mut scratch = [0u8; 4096];
        // A bounded number of reads per poll: a caller that writes without end does not
        // hold the thread.
        for _ in 0..16 {
            let mut rb = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut self.0).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                other => return other,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl OpenContext {
    /// The deadline of waits inside the open.
    pub fn deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.timeout
    }
}

/// Why an endpoint could not be opened: a message for the peer and one for the log.
#[derive(Debug, thiserror::Error)]
#[error("{log}")]
pub struct OpenError {
    /// Text for the peer (no paths, no OS errors).
    pub public: String,
    /// Text for the log.
    pub log: String,
}

impl OpenError {
    /// An error with a public and a log message.
    pub fn new(public: impl Into<String>, log: impl Into<String>) -> Self {
        OpenError {
            public: public.into(),
            log: log.into(),
        }
    }
}

/// Opens the local endpoint of an exported pipe for one session.
pub async fn open(pipe: &PipeConfig, ctx: &OpenContext) -> Result<Local, OpenError> {
    match &pipe.endpoint {
        #[cfg(unix)]
        EndpointSpec::Unix(p) => unix::connect(p, ctx).await,
        #[cfg(unix)]
        EndpointSpec::Dotnet(n) => unix::connect(&dotnet_path(n), ctx).await,
        EndpointSpec::Exec { argv } => exec::spawn(argv, pipe, ctx).await,
        #[cfg(unix)]
        EndpointSpec::Seqpacket(p) => seqpacket::connect(p, ctx.max_message, ctx).await,
        #[cfg(unix)]
        EndpointSpec::Fifo(p) => fifo::open(p, ctx).await,
        #[cfg(windows)]
        EndpointSpec::Npipe(n) => {
            let opts = windows::PipeOptions {
                mode: ctx.mode,
                direction: ctx.direction,
                max_message: ctx.max_message,
                eof: pipe.npipe_eof,
            };
            windows::connect(n, opts, ctx).await
        }
        other => Err(OpenError::new(
            "this endpoint kind is not available",
            format!(
                "endpoint kind {} cannot be opened on this platform",
                other.kind()
            ),
        )),
    }
}

/// The largest message of a message-mode pipe whose `max_message_size` is `"auto"`.
pub fn auto_max_message() -> usize {
    #[cfg(unix)]
    return seqpacket::auto_max_message();
    #[cfg(windows)]
    return AUTO_MAX_NPIPE_MESSAGE;
}

/// `max_message_size = "auto"` for named pipes: Windows sets no limit of its own.
#[cfg(windows)]
pub const AUTO_MAX_NPIPE_MESSAGE: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_prepended_comes_first_whole_then_the_endpoints_own() {
        let mut framed = Vec::new();
        for m in [&b"second"[..], b"", b"third"] {
            framed.extend_from_slice(&(m.len() as u32).to_be_bytes());
            framed.extend_from_slice(m);
        }
        let local = Local {
            reader: Some(Reader::Messages(message::MsgReader::U32be {
                input: Box::new(std::io::Cursor::new(framed)),
                max: 64,
            })),
            writer: None,
            child: None,
            hangup: None,
        }
        .prepend(bytes::Bytes::from_static(b"first"));
        let Some(Reader::Messages(mut r)) = local.reader else {
            panic!("a message reader stays one");
        };
        let mut got = Vec::new();
        for _ in 0..10 {
            match r.recv().await.unwrap() {
                Some(m) => got.push(m),
                None => break,
            }
        }
        assert_eq!(got, [&b"first"[..], b"second", b"", b"third"]);
        assert!(
            !matches!(r, message::MsgReader::Prepended { .. }),
            "the endpoint's reader takes the wrapper's place"
        );
    }

    #[test]
    #[cfg(windows)]
    fn windows_kinds() {
        assert_eq!(
            EndpointSpec::parse_export(r"npipe:\\.\pipe\docker_engine", None).unwrap(),
            EndpointSpec::Npipe("docker_engine".into())
        );
        assert_eq!(
            EndpointSpec::parse_hosted("npipe:svc").unwrap(),
            EndpointSpec::Npipe("svc".into())
        );
        for unix in ["unix:/x", "seqpacket:/x", "fifo:/x", "dotnet:svc"] {
            let e = EndpointSpec::parse_export(unix, None).unwrap_err();
            assert!(e.contains("Unix builds only"), "{e}");
        }
        assert!(EndpointSpec::parse_export("npipe:", None).is_err());
        assert!(EndpointSpec::parse_export(r"npipe:..\C:", None).is_err());
        assert!(EndpointSpec::parse_export(r"npipe:a\..\b", None).is_err());
        assert_eq!(
            EndpointSpec::parse_export(r"npipe:MSSQL$X\sql\query", None).unwrap(),
            EndpointSpec::Npipe(r"MSSQL$X\sql\query".into())
        );
    }

    #[test]
    #[cfg(unix)]
    fn npipe_is_windows_only() {
        let e = EndpointSpec::parse_export("npipe:svc", None).unwrap_err();
        assert!(e.contains("Windows builds only"), "{e}");
    }

    #[test]
    #[cfg(unix)]
    fn parse_kinds() {
        assert_eq!(
            EndpointSpec::parse_export("unix:/run/a.sock", None).unwrap(),
            EndpointSpec::Unix("/run/a.sock".into())
        );
        assert_eq!(
            EndpointSpec::parse_export("exec:sh -c 'echo \"a b\"'", None).unwrap(),
            EndpointSpec::Exec {
                argv: vec!["sh".into(), "-c".into(), "echo \"a b\"".into()]
            }
        );
        assert_eq!(
            EndpointSpec::parse_export("exec:echo $HOME a\\ b", None).unwrap(),
            EndpointSpec::Exec {
                argv: vec!["echo".into(), "$HOME".into(), "a b".into()]
            }
        );
        let argv = vec!["wc".to_string(), "-c".to_string()];
        assert_eq!(
            EndpointSpec::parse_export("exec", Some(&argv)).unwrap(),
            EndpointSpec::Exec { argv }
        );
        assert!(EndpointSpec::parse_export("exec", None).is_err());
        assert!(EndpointSpec::parse_export("exec:'unterminated", None).is_err());
        assert!(EndpointSpec::parse_export("tcp:1.2.3.4:5", None).is_err());
        assert!(EndpointSpec::parse_export("nocolon", None).is_err());
    }

    #[test]
    #[cfg(unix)]
    fn dotnet_paths() {
        assert_eq!(dotnet_path("/abs/x"), PathBuf::from("/abs/x"));
        let p = dotnet_path("svc");
        assert!(p.to_string_lossy().ends_with("/CoreFxPipe_svc"), "{p:?}");
    }
}
