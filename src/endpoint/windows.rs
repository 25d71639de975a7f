//! `npipe:NAME` endpoints on Windows: `\\.\pipe\NAME`, exported (the gateway connects as
//! a pipe client) and hosted (the gateway is the pipe server of a forward).
//!
//! I/O uses the raw Win32 API on handles opened for overlapped I/O, one worker thread per
//! direction, because tokio's `NamedPipe` cannot keep "one pipe message = one WebSocket
//! message": it splits a message larger than its buffer and reads a zero-length message as
//! EOF. Here a message read is `ReadFile`, then, on `ERROR_MORE_DATA`, `PeekNamedPipe` for
//! the bytes left in this message and more reads until it is whole; a zero-length message
//! is delivered as one. Each direction has its own `OVERLAPPED` and event, so a pending
//! read never blocks a write on the same handle (on a synchronous handle it would, on
//! real Windows). The threads talk to the session through bounded channels (backpressure:
//! at most [`CHANNEL_DEPTH`] messages or chunks wait per direction). When the session
//! drops both halves, pending I/O is cancelled (`CancelIoEx`) and the threads end.
//!
//! Windows pipes have no half-close. What an `eof` from the network does is the pipe's
//! `npipe_eof`: `"none"` (default: noted, nothing written, the pipe stays open for the
//! reply) or `"zero_message"` (byte mode: a zero-length write, the close-write convention
//! of go-winio and npiperelay; a zero-length read from the pipe is then taken as the
//! local side's EOF). Exported opens ask for `SECURITY_IDENTIFICATION` only, so a pipe
//! server can identify but never impersonate the gateway's account.
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, PollSender};
use windows_sys::Win32::Foundation::{
    GetLastError, LocalFree, ERROR_ACCESS_DENIED, ERROR_BROKEN_PIPE, ERROR_FILE_NOT_FOUND,
    ERROR_IO_PENDING, ERROR_MORE_DATA, ERROR_NO_DATA, ERROR_OPERATION_ABORTED, ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED, ERROR_PIPE_NOT_CONNECTED, GENERIC_READ, GENERIC_WRITE, HANDLE,
    INVALID_HANDLE_VALUE, WAIT_OBJECT_0,
};
use windows_sys::Win32::Security::Authorization::ConvertStringSecurityDescriptorToSecurityDescriptorW;
use windows_sys::Win32::Security::{PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, ReadFile, WriteFile, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED,
    FILE_READ_ATTRIBUTES, FILE_WRITE_ATTRIBUTES, OPEN_EXISTING, PIPE_ACCESS_DUPLEX,
    PIPE_ACCESS_INBOUND, PIPE_ACCESS_OUTBOUND, SECURITY_IDENTIFICATION, SECURITY_SQOS_PRESENT,
};
use windows_sys::Win32::System::Pipes::{
    ConnectNamedPipe, CreateNamedPipeW, PeekNamedPipe, SetNamedPipeHandleState, WaitNamedPipeW,
    PIPE_READMODE_BYTE, PIPE_READMODE_MESSAGE, PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE,
    PIPE_TYPE_MESSAGE, PIPE_UNLIMITED_INSTANCES, PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{CreateEventW, WaitForSingleObject};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

use super::message::MsgError;
use super::{Local, OpenContext, OpenError, Reader, Writer};
use crate::config::{Direction, Mode, NpipeEof};

/// Chunks or messages that may wait in each direction's channel.
pub const CHANNEL_DEPTH: usize = 2;
/// Byte-mode read size.
const READ_CHUNK: usize = 64 * 1024;
/// First read of a message; larger messages are completed after `PeekNamedPipe`.
const FIRST_MESSAGE_READ: usize = 64 * 1024;
/// Pipe buffer sizes we ask for when hosting (advisory).
const HOSTED_BUFFER: u32 = 64 * 1024;
/// How often a blocked worker looks at its cancel flag.
const CANCEL_POLL_MS: u32 = 200;
/// How long one `WaitNamedPipeW` may wait before the deadline is looked at again.
const BUSY_WAIT_SLICE: Duration = Duration::from_millis(250);

/// How an `npipe:` session behaves: mode, the session's direction (remote client's
/// point of view), the largest message, and what the network's `eof` does.
#[derive(Debug, Clone, Copy)]
pub struct PipeOptions {
    /// Byte or message mode.
    pub mode: Mode,
    /// The session's direction.
    pub direction: Direction,
    /// Largest message read from the pipe (message mode).
    pub max_message: usize,
    /// The half-close convention.
    pub eof: NpipeEof,
}

/// `\\.\pipe\NAME`.
pub fn pipe_path(name: &str) -> String {
    format!(r"\\.\pipe\{name}")
}

/// A NUL-terminated UTF-16 copy of `s`.
pub fn wide(s: &str) -> Vec<u16> {
    OsStr::new(s).encode_wide().chain(Some(0)).collect()
}

fn owned(h: HANDLE) -> io::Result<OwnedHandle> {
    if h.is_null() || h == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `h` is a valid handle just returned to us by the OS and owned by no one else.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

fn last_error() -> u32 {
    // SAFETY: reads the calling thread's last-error value; no preconditions.
    unsafe { GetLastError() }
}

fn os_error(code: u32) -> io::Error {
    io::Error::from_raw_os_error(code as i32)
}

/// A pipe handle shared by the session's worker threads, with the flag that tells them
/// to stop.
pub struct Shared {
    handle: OwnedHandle,
    cancelled: AtomicBool,
    /// A hosted instance's share of its server's live count (see [`PipeServer`]).
    _instance: Option<Arc<()>>,
}

impl Shared {
    fn new(handle: OwnedHandle) -> Arc<Shared> {
        Self::with_instance(handle, None)
    }

    fn with_instance(handle: OwnedHandle, instance: Option<Arc<()>>) -> Arc<Shared> {
        Arc::new(Shared {
            handle,
            cancelled: AtomicBool::new(false),
            _instance: instance,
        })
    }

    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle()
    }

    /// Stops the workers: sets the flag and cancels pending I/O on the handle.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        // SAFETY: the handle is open for as long as `self` lives; a null OVERLAPPED
        // cancels every pending operation on it, from any thread.
        unsafe { CancelIoEx(self.raw(), std::ptr::null()) };
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// Cancels the workers when the last half of a session's local side is dropped.
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// One overlapped operation slot: an `OVERLAPPED` at a fixed address and its event.
struct Overlapped {
    ov: Box<OVERLAPPED>,
    _event: OwnedHandle,
}

// SAFETY: the OVERLAPPED is only used by the thread that owns this slot; the raw event
// handle inside it stays valid while `_event` lives.
unsafe impl Send for Overlapped {}

impl Overlapped {
    fn new() -> io::Result<Overlapped> {
        // SAFETY: plain call; a manual-reset, initially non-signalled, unnamed event.
        let ev = owned(unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) })?;
        // SAFETY: OVERLAPPED is plain data for which all-zero is the documented initial state.
        let mut ov: Box<OVERLAPPED> = Box::new(unsafe { std::mem::zeroed() });
        ov.hEvent = ev.as_raw_handle();
        Ok(Overlapped { ov, _event: ev })
    }

    /// Clears the slot for the next operation (the event is reset by the call that
    /// starts it).
    fn rearm(&mut self) -> *mut OVERLAPPED {
        let ev = self.ov.hEvent;
        // SAFETY: as in `new`.
        *self.ov = unsafe { std::mem::zeroed() };
        self.ov.hEvent = ev;
        &mut *self.ov
    }

    /// Waits for the operation just started (`started` is its BOOL result) and returns
    /// the bytes transferred and the error code (0: success). Cancelled when `sh` is.
    fn finish(&mut self, sh: &Shared, started: i32) -> (u32, u32) {
        if started == 0 {
            let e = last_error();
            // An immediate ERROR_MORE_DATA is a completed read that filled the buffer:
            // its byte count comes from GetOverlappedResult below, like any completion.
            if e != ERROR_IO_PENDING && e != ERROR_MORE_DATA {
                return (0, e);
            }
            if e == ERROR_IO_PENDING {
                self.wait_or_cancel(sh);
            }
        }
        self.result(sh)
    }

    /// Waits for the pending operation's event, cancelling it if `sh` is cancelled.
    fn wait_or_cancel(&mut self, sh: &Shared) {
        loop {
            // SAFETY: the event handle is valid while `self` lives.
            let w = unsafe { WaitForSingleObject(self.ov.hEvent, CANCEL_POLL_MS) };
            if w == WAIT_OBJECT_0 {
                break;
            }
            if sh.is_cancelled() {
                // SAFETY: cancels this very operation; the OVERLAPPED stays alive
                // until GetOverlappedResult below has waited for its completion.
                unsafe { CancelIoEx(sh.raw(), &*self.ov) };
                break;
            }
        }
    }

    /// The completed operation's byte count and error code (0: success).
    fn result(&mut self, sh: &Shared) -> (u32, u32) {
        let mut n = 0u32;
        // SAFETY: the operation was started on this handle with this OVERLAPPED; waiting
        // (bWait = TRUE) returns only once the kernel no longer uses either.
        let ok = unsafe { GetOverlappedResult(sh.raw(), &*self.ov, &mut n, 1) };
        if ok != 0 {
            (n, 0)
        } else {
            (n, last_error())
        }
    }
}

fn is_eof(code: u32) -> bool {
    matches!(
        code,
        ERROR_BROKEN_PIPE | ERROR_PIPE_NOT_CONNECTED | ERROR_NO_DATA | ERROR_OPERATION_ABORTED
    )
}

/// One `ReadFile`: (bytes, error code).
fn read_once(sh: &Shared, slot: &mut Overlapped, buf: &mut [u8]) -> (u32, u32) {
    if sh.is_cancelled() {
        return (0, ERROR_OPERATION_ABORTED);
    }
    let ov = slot.rearm();
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    // SAFETY: `buf` outlives the operation: `finish` waits for its completion.
    let started = unsafe { ReadFile(sh.raw(), buf.as_mut_ptr(), len, std::ptr::null_mut(), ov) };
    slot.finish(sh, started)
}

/// Writes all of `data` (one call per message in message mode; an empty `data` writes a
/// zero-length message).
fn write_all(sh: &Shared, slot: &mut Overlapped, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    loop {
        if sh.is_cancelled() {
            return Err(os_error(ERROR_OPERATION_ABORTED));
        }
        let rest = &data[off..];
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let ov = slot.rearm();
        // SAFETY: `data` outlives the operation: `finish` waits for its completion.
        let started = unsafe { WriteFile(sh.raw(), rest.as_ptr(), len, std::ptr::null_mut(), ov) };
        let (n, e) = slot.finish(sh, started);
        if e != 0 {
            return Err(os_error(e));
        }
        off += n as usize;
        if off >= data.len() {
            return Ok(());
        }
    }
}

/// Bytes left in the message being read.
fn left_this_message(sh: &Shared) -> io::Result<usize> {
    let mut left = 0u32;
    // SAFETY: only the counters are written; no buffer is passed.
    let ok = unsafe {
        PeekNamedPipe(
            sh.raw(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut left,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(left as usize)
}

/// One whole message (`Ok(None)`: the pipe closed).
fn read_message(sh: &Shared, slot: &mut Overlapped, max: usize) -> Result<Option<Bytes>, MsgError> {
    let mut buf = BytesMut::zeroed(FIRST_MESSAGE_READ.min(max.saturating_add(1)).max(1));
    let (n, e) = read_once(sh, slot, &mut buf);
    let mut have = n as usize;
    match e {
        0 => {
            if have > max {
                return Err(MsgError::TooBig { size: have, max });
            }
            buf.truncate(have);
            return Ok(Some(buf.freeze()));
        }
        ERROR_MORE_DATA => {}
        e if is_eof(e) => return Ok(None),
        e => return Err(MsgError::Io(os_error(e))),
    }
    loop {
        let total = have + left_this_message(sh)?;
        if total > max {
            return Err(MsgError::TooBig { size: total, max });
        }
        buf.resize(total.max(have + 1), 0);
        let (n, e) = read_once(sh, slot, &mut buf[have..]);
        have += n as usize;
        if have > max {
            return Err(MsgError::TooBig { size: have, max });
        }
        match e {
            0 => {
                buf.truncate(have);
                return Ok(Some(buf.freeze()));
            }
            ERROR_MORE_DATA => continue,
            e if is_eof(e) => return Ok(None),
            e => return Err(MsgError::Io(os_error(e))),
        }
    }
}

/// One chunk of a byte-mode pipe (`Ok(None)`: the pipe closed; an empty chunk is a
/// zero-length write by the other end).
fn read_chunk(sh: &Shared, slot: &mut Overlapped) -> io::Result<Option<Bytes>> {
    let mut buf = BytesMut::zeroed(READ_CHUNK);
    let (n, e) = read_once(sh, slot, &mut buf);
    match e {
        0 | ERROR_MORE_DATA => {
            buf.truncate(n as usize);
            Ok(Some(buf.freeze()))
        }
        e if is_eof(e) => Ok(None),
        e => Err(os_error(e)),
    }
}

/// What the writer thread is asked to do, in order. The acks of `Flush` and `Eof` fire
/// once every earlier write is in the pipe (dropped unanswered if a write failed).
enum WriteOp {
    Data(Bytes),
    Flush(oneshot::Sender<()>),
    Eof(oneshot::Sender<()>),
}

fn spawn_reader(
    sh: Arc<Shared>,
    opts: PipeOptions,
) -> io::Result<mpsc::Receiver<Result<Bytes, MsgError>>> {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let mut slot = Overlapped::new()?;
    std::thread::Builder::new()
        .name("npipe-read".into())
        .spawn(move || loop {
            let item = match opts.mode {
                Mode::Message => read_message(&sh, &mut slot, opts.max_message),
                Mode::Byte => match read_chunk(&sh, &mut slot) {
                    Ok(Some(b)) if b.is_empty() => {
                        if opts.eof == NpipeEof::ZeroMessage {
                            Ok(None)
                        } else {
                            continue;
                        }
                    }
                    r => r.map_err(MsgError::Io),
                },
            };
            match item {
                Ok(Some(b)) => {
                    if tx.blocking_send(Ok(b)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        })?;
    Ok(rx)
}

fn spawn_writer(sh: Arc<Shared>, opts: PipeOptions) -> io::Result<mpsc::Sender<WriteOp>> {
    let (tx, mut rx) = mpsc::channel::<WriteOp>(CHANNEL_DEPTH);
    let mut slot = Overlapped::new()?;
    std::thread::Builder::new()
        .name("npipe-write".into())
        .spawn(move || {
            while let Some(op) = rx.blocking_recv() {
                match op {
                    WriteOp::Data(b) => {
                        if opts.mode == Mode::Byte && b.is_empty() {
                            continue;
                        }
                        if let Err(e) = write_all(&sh, &mut slot, &b) {
                            tracing::debug!(error = %e, "named pipe write failed");
                            return;
                        }
                    }
                    WriteOp::Flush(ack) => {
                        let _ = ack.send(());
                    }
                    WriteOp::Eof(ack) => {
                        if opts.mode == Mode::Byte
                            && opts.eof == NpipeEof::ZeroMessage
                            && write_all(&sh, &mut slot, &[]).is_err()
                        {
                            return;
                        }
                        let _ = ack.send(());
                        return;
                    }
                }
            }
        })?;
    Ok(tx)
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the named pipe closed")
}

/// Byte-mode reading half.
struct ByteReader {
    rx: mpsc::Receiver<Result<Bytes, MsgError>>,
    pending: Bytes,
    _guard: Arc<CancelOnDrop>,
}

impl AsyncRead for ByteReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => self.pending = b,
                Some(Err(MsgError::Io(e))) => return Poll::Ready(Err(e)),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e.to_string()))),
            }
        }
    }
}

/// Byte-mode writing half: `poll_flush` waits until the pipe took every byte written
/// so far; `poll_shutdown` applies `npipe_eof`.
struct ByteWriter {
    tx: PollSender<WriteOp>,
    /// A pending acknowledgement, and whether it is the `Eof`'s.
    ack: Option<(bool, oneshot::Receiver<()>)>,
    shut: bool,
    _guard: Arc<CancelOnDrop>,
}

impl ByteWriter {
    /// Sends `Flush` (or `Eof`) unless one is pending, then waits for its ack.
    fn poll_ack(&mut self, cx: &mut Context<'_>, eof: bool) -> Poll<io::Result<bool>> {
        if self.ack.is_none() {
            ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
            let (a, r) = oneshot::channel();
            let op = if eof {
                WriteOp::Eof(a)
            } else {
                WriteOp::Flush(a)
            };
            self.tx.send_item(op).map_err(|_| broken())?;
            self.ack = Some((eof, r));
        }
        let (was_eof, rx) = self.ack.as_mut().expect("set above");
        let was_eof = *was_eof;
        let r = ready!(Pin::new(rx).poll(cx));
        self.ack = None;
        r.map_err(|_| broken())?;
        Poll::Ready(Ok(was_eof))
    }
}

impl AsyncWrite for ByteWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| broken())?;
        self.tx
            .send_item(WriteOp::Data(Bytes::copy_from_slice(data)))
            .map_err(|_| broken())?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        // The ack awaited may be a pending shutdown's Eof: then the writer is shut.
        if ready!(self.poll_ack(cx, false))? {
            self.shut = true;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.shut {
            // A pending flush is awaited first; then the Eof itself.
            if ready!(self.poll_ack(cx, true))? {
                self.shut = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Message-mode reading half.
pub struct MsgIn {
    rx: mpsc::Receiver<Result<Bytes, MsgError>>,
    _guard: Arc<CancelOnDrop>,
}

impl MsgIn {
    /// The next message, or `None` when the pipe closed.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, MsgError> {
        self.rx.recv().await.transpose()
    }
}

/// Message-mode writing half.
pub struct MsgOut {
    tx: mpsc::Sender<WriteOp>,
    _guard: Arc<CancelOnDrop>,
}

impl MsgOut {
    /// Writes one message (a zero-length one too).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.tx
            .send(WriteOp::Data(Bytes::copy_from_slice(data)))
            .await
            .map_err(|_| broken())
    }

    async fn ack(&mut self, op: impl FnOnce(oneshot::Sender<()>) -> WriteOp) -> io::Result<()> {
        let (a, r) = oneshot::channel();
        self.tx.send(op(a)).await.map_err(|_| broken())?;
        r.await.map_err(|_| broken())
    }

    /// Waits until every message sent so far is in the pipe.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.ack(WriteOp::Flush).await
    }

    /// No more messages: `npipe_eof` says what, if anything, the pipe sees.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.ack(WriteOp::Eof).await
    }
}

/// The local side of a session on an open pipe handle.
pub fn local(handle: OwnedHandle, opts: PipeOptions) -> io::Result<Local> {
    local_shared(Shared::new(handle), opts)
}

/// The local side of a session on a connected hosted instance.
pub fn local_instance(inst: Instance, opts: PipeOptions) -> io::Result<Local> {
    local_shared(Shared::with_instance(inst.handle, Some(inst.live)), opts)
}

fn local_shared(sh: Arc<Shared>, opts: PipeOptions) -> io::Result<Local> {
    let guard = Arc::new(CancelOnDrop(sh.clone()));
    let reader = if opts.direction.client_reads() {
        let rx = spawn_reader(sh.clone(), opts)?;
        Some(match opts.mode {
            Mode::Byte => Reader::Bytes(Box::new(ByteReader {
                rx,
                pending: Bytes::new(),
                _guard: guard.clone(),
            })),
            Mode::Message => Reader::Messages(super::message::MsgReader::Npipe(MsgIn {
                rx,
                _guard: guard.clone(),
            })),
        })
    } else {
        None
    };
    let writer = if opts.direction.client_writes() {
        let tx = spawn_writer(sh, opts)?;
        Some(match opts.mode {
            Mode::Byte => Writer::Bytes(Box::new(ByteWriter {
                tx: PollSender::new(tx),
                ack: None,
                shut: false,
                _guard: guard.clone(),
            })),
            Mode::Message => Writer::Messages(super::message::MsgWriter::Npipe(MsgOut {
                tx,
                _guard: guard.clone(),
            })),
        })
    } else {
        None
    };
    Ok(Local {
        reader,
        writer,
        child: None,
        hangup: None,
    })
}

// === exported pipes: the gateway is the pipe client ===

/// Opens `\\.\pipe\NAME` as a client, waiting out `ERROR_PIPE_BUSY` (all instances
/// taken) until `deadline`, and sets message read mode when asked. Blocking.
pub fn open_client(
    name: &str,
    mode: Mode,
    direction: Direction,
    deadline: Instant,
) -> io::Result<OwnedHandle> {
    let path = wide(&pipe_path(name));
    let access = match direction {
        Direction::Duplex => GENERIC_READ | GENERIC_WRITE,
        // The remote client reads: we read. Setting the read mode needs write attributes.
        Direction::Out => GENERIC_READ | FILE_WRITE_ATTRIBUTES,
        Direction::In => GENERIC_WRITE | FILE_READ_ATTRIBUTES,
    };
    let mut seen_busy = false;
    let handle = loop {
        // SAFETY: `path` is NUL-terminated and outlives the call.
        let h = unsafe {
            CreateFileW(
                path.as_ptr(),
                access,
                0,
                std::ptr::null(),
                OPEN_EXISTING,
                FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                std::ptr::null_mut(),
            )
        };
        if h != INVALID_HANDLE_VALUE {
            break owned(h)?;
        }
        let e = last_error();
        // A busy pipe's server may close its last instance and create the next one:
        // in between the name is gone. Once busy was seen, that is waited out too.
        if e == ERROR_PIPE_BUSY {
            seen_busy = true;
        } else if !(e == ERROR_FILE_NOT_FOUND && seen_busy) {
            return Err(os_error(e));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(os_error(ERROR_PIPE_BUSY));
        }
        let slice = left.min(BUSY_WAIT_SLICE);
        if e == ERROR_FILE_NOT_FOUND {
            std::thread::sleep(slice.min(Duration::from_millis(20)));
        } else {
            // SAFETY: as above. A timeout or a vanished pipe is seen by the next CreateFileW.
            unsafe { WaitNamedPipeW(path.as_ptr(), slice.as_millis().max(1) as u32) };
        }
    };
    if mode == Mode::Message {
        let m = PIPE_READMODE_MESSAGE;
        // SAFETY: the handle is open; only the mode is set.
        let ok = unsafe {
            SetNamedPipeHandleState(
                handle.as_raw_handle(),
                &m,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if ok == 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot read it in message mode (is it a byte-type pipe?): {e}"),
            ));
        }
    }
    Ok(handle)
}

fn open_error(name: &str, e: &io::Error) -> OpenError {
    let why = match e.raw_os_error().map(|c| c as u32) {
        Some(ERROR_FILE_NOT_FOUND) => "no server is listening on it".to_string(),
        Some(ERROR_PIPE_BUSY) => "all its instances stayed busy until the deadline".to_string(),
        Some(ERROR_ACCESS_DENIED) => "access denied".to_string(),
        _ => e.to_string(),
    };
    OpenError::new(
        "the local endpoint could not be opened",
        format!("npipe {}: {why}", pipe_path(name)),
    )
}

/// Opens an exported `npipe:` pipe for one session, as the session's principal when it
/// has one (an S4U logon token; fails closed when none can be had).
pub async fn connect(name: &str, opts: PipeOptions, ctx: &OpenContext) -> Result<Local, OpenError> {
    let deadline = ctx.deadline();
    let principal = ctx.principal.clone();
    let owned_name = name.to_string();
    let r = tokio::task::spawn_blocking(move || match &principal {
        None => open_client(&owned_name, opts.mode, opts.direction, deadline),
        Some(p) => crate::identity::windows::as_principal(p, || {
            open_client(&owned_name, opts.mode, opts.direction, deadline)
        }),
    })
    .await
    .map_err(|e| OpenError::new("the local endpoint could not be opened", e.to_string()))?;
    let handle = r.map_err(|e| open_error(name, &e))?;
    local(handle, opts).map_err(|e| open_error(name, &e))
}

// === hosted pipes: the gateway is the pipe server ===

/// How a forward hosts `\\.\pipe\NAME`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Byte or message type (and read mode).
    pub mode: Mode,
    /// The session's direction from the remote client's point of view (`in`: local
    /// callers write; `out`: they read).
    pub direction: Direction,
    /// `nMaxInstances` (1–255; 255 = unlimited).
    pub max_instances: u32,
    /// The pipe's security descriptor in SDDL.
    pub security_descriptor: String,
    /// The half-close convention.
    pub eof: NpipeEof,
}

/// The default DACL of a hosted pipe: full access for SYSTEM, Administrators and the
/// pipe's owner (the gateway's account); no one else (Windows' own default would give
/// Everyone read access).
pub const DEFAULT_SDDL: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;OW)";

/// A security descriptor parsed from SDDL (freed with `LocalFree`).
struct SecurityDescriptor(PSECURITY_DESCRIPTOR);

impl SecurityDescriptor {
    fn parse(sddl: &str) -> io::Result<SecurityDescriptor> {
        let w = wide(sddl);
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `w` is NUL-terminated; on success `sd` is a LocalAlloc'ed descriptor
        // we own and free in Drop.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                w.as_ptr(),
                1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SecurityDescriptor(sd))
    }
}

impl Drop for SecurityDescriptor {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW.
        unsafe { LocalFree(self.0) };
    }
}

/// Checks an SDDL string (for check-config).
pub fn check_sddl(sddl: &str) -> Result<(), String> {
    SecurityDescriptor::parse(sddl)
        .map(drop)
        .map_err(|e| format!("invalid SDDL security descriptor: {e}"))
}

/// The server side of a hosted pipe: keeps one unconnected instance ready.
///
/// Whenever it creates an instance while it holds no other (the first, and again after
/// every instance was closed, e.g. with `max_instances = 1` between sessions), it asks for
/// `FILE_FLAG_FIRST_PIPE_INSTANCE`: if another process took the name in the gap, creation
/// fails instead of joining that process's pipe (pipe squatting). `live` counts the
/// instances handed out to sessions.
pub struct PipeServer {
    name: String,
    opts: ServerOptions,
    next: Option<OwnedHandle>,
    live: Arc<()>,
}

/// A connected hosted instance (keeps its server's live count while it exists).
pub struct Instance {
    handle: OwnedHandle,
    live: Arc<()>,
}

impl Instance {
    /// The pipe handle.
    pub fn handle(&self) -> &OwnedHandle {
        &self.handle
    }
}

/// Pause before creating an instance again when all `max_instances` are in use.
const INSTANCE_RETRY: Duration = Duration::from_millis(100);

impl PipeServer {
    /// Creates the first instance (with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so a squatter
    /// that created the name first makes this fail instead of sharing it).
    pub fn bind(name: &str, opts: ServerOptions) -> io::Result<PipeServer> {
        let mut s = PipeServer {
            name: name.to_string(),
            opts,
            next: None,
            live: Arc::new(()),
        };
        s.next = Some(s.create(true)?);
        Ok(s)
    }

    /// `\\.\pipe\NAME`.
    pub fn path(&self) -> String {
        pipe_path(&self.name)
    }

    fn create(&self, first: bool) -> io::Result<OwnedHandle> {
        let sd = SecurityDescriptor::parse(&self.opts.security_descriptor)?;
        let sa = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: sd.0,
            bInheritHandle: 0,
        };
        let access = match self.opts.direction {
            Direction::Duplex => PIPE_ACCESS_DUPLEX,
            Direction::In => PIPE_ACCESS_INBOUND,
            Direction::Out => PIPE_ACCESS_OUTBOUND,
        };
        let open_mode = access
            | FILE_FLAG_OVERLAPPED
            | if first {
                FILE_FLAG_FIRST_PIPE_INSTANCE
            } else {
                0
            };
        // Byte mode with the zero-message convention needs a message-type pipe read as
        // bytes (as go-winio does) so that a zero-length write reaches the other end.
        let kind = match (self.opts.mode, self.opts.eof) {
            (Mode::Message, _) => PIPE_TYPE_MESSAGE | PIPE_READMODE_MESSAGE,
            (Mode::Byte, NpipeEof::ZeroMessage) => PIPE_TYPE_MESSAGE | PIPE_READMODE_BYTE,
            (Mode::Byte, NpipeEof::None) => PIPE_TYPE_BYTE | PIPE_READMODE_BYTE,
        };
        let path = wide(&self.path());
        let max = self.opts.max_instances.clamp(1, PIPE_UNLIMITED_INSTANCES);
        // SAFETY: `path` is NUL-terminated; `sa` and the descriptor it points to outlive
        // the call.
        let h = unsafe {
            CreateNamedPipeW(
                path.as_ptr(),
                open_mode,
                kind | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                max,
                HOSTED_BUFFER,
                HOSTED_BUFFER,
                0,
                &sa,
            )
        };
        owned(h)
    }

    /// Waits for the next local caller; returns its connected instance after the next
    /// instance was created (so callers arriving meanwhile find one). Ends with `None`
    /// on `shutdown`.
    pub async fn accept(&mut self, shutdown: &CancellationToken) -> Option<io::Result<Instance>> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let handle = match self.next.take() {
                Some(h) => h,
                None => match self.create(Arc::strong_count(&self.live) == 1) {
                    Ok(h) => h,
                    Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => {
                        // All instances are connected: wait for a session to end.
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(INSTANCE_RETRY) => continue,
                        }
                    }
                    Err(e) => return Some(Err(e)),
                },
            };
            let sh = Shared::new(handle);
            let waiter = sh.clone();
            // If this future is dropped while the wait runs, the wait is cancelled (a
            // blocking thread left waiting would also hold up runtime shutdown).
            let mut guard = AcceptGuard(Some(sh.clone()));
            let mut task = tokio::task::spawn_blocking(move || connect_wait(&waiter));
            let r = tokio::select! {
                r = &mut task => r,
                _ = shutdown.cancelled() => {
                    sh.cancel();
                    let _ = task.await;
                    return None;
                }
            };
            let connected = match r {
                Ok(Ok(true)) => true,
                Ok(Ok(false)) => false, // the caller came and went: use a fresh instance
                Ok(Err(e)) => return Some(Err(e)),
                Err(e) => return Some(Err(io::Error::other(e))),
            };
            guard.0 = None;
            if !connected {
                continue;
            }
            match self.create(false) {
                Ok(h) => self.next = Some(h),
                Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => {}
                Err(e) => {
                    tracing::warn!(error = %e, pipe = %self.path(), "cannot create the next pipe instance")
                }
            }
            let Ok(sh) = Arc::try_unwrap(sh) else {
                return Some(Err(io::Error::other("pipe instance still in use")));
            };
            return Some(Ok(Instance {
                handle: sh.handle,
                live: self.live.clone(),
            }));
        }
    }
}

/// Cancels a pending `ConnectNamedPipe` when dropped armed.
struct AcceptGuard(Option<Arc<Shared>>);

impl Drop for AcceptGuard {
    fn drop(&mut self) {
        if let Some(sh) = self.0.take() {
            sh.cancel();
        }
    }
}

/// `ConnectNamedPipe` on an overlapped instance: `Ok(true)` connected, `Ok(false)` the
/// client already left.
fn connect_wait(sh: &Shared) -> io::Result<bool> {
    let mut slot = Overlapped::new()?;
    let ov = slot.rearm();
    // SAFETY: the OVERLAPPED lives in `slot` until `finish` has waited for completion.
    let started = unsafe { ConnectNamedPipe(sh.raw(), ov) };
    if started == 0 {
        match last_error() {
            ERROR_PIPE_CONNECTED => return Ok(true),
            ERROR_NO_DATA => return Ok(false),
            ERROR_IO_PENDING => {}
            e => return Err(os_error(e)),
        }
        // `finish` reads the last error again: set it back to pending.
        let (_, e) = finish_pending(&mut slot, sh);
        return match e {
            0 => Ok(true),
            ERROR_NO_DATA => Ok(false),
            e => Err(os_error(e)),
        };
    }
    Ok(true)
}

fn finish_pending(slot: &mut Overlapped, sh: &Shared) -> (u32, u32) {
    // SAFETY: sets the calling thread's last-error value only.
    unsafe { windows_sys::Win32::Foundation::SetLastError(ERROR_IO_PENDING) };
    slot.finish(sh, 0)
}

/// The connected client's process id.
pub fn client_process_id(h: &OwnedHandle) -> Option<u32> {
    let mut pid = 0u32;
    // SAFETY: the handle is a connected server instance; only `pid` is written.
    let ok = unsafe {
        windows_sys::Win32::System::Pipes::GetNamedPipeClientProcessId(h.as_raw_handle(), &mut pid)
    };
    (ok != 0).then_some(pid)
}
