//! WebSocket over one HTTP/2 stream (RFC 8441 extended CONNECT), read and written
//! straight from the session's task.
//!
//! hyper's upgraded HTTP/2 stream hands every write to a task of its own through a
//! channel (a copy and a wake-up per message, a task per session); this adapter writes
//! into the h2 stream directly, with h2's flow control as the backpressure: a write
//! takes only the capacity the peer's windows grant, so a stalled peer never makes a
//! session buffer more than the stream window ([`super::H2_STREAM_WINDOW_BYTES`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ws::{ChunkRead, OwnedWrite, Transport};

/// One HTTP/2 stream, the transport of a WebSocket ([`super::ws::Transport`]): its
/// halves are h2's own, so reading and writing share no lock.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    in_flight: Option<InFlight>,
}

impl H2Stream {
    /// The stream whose halves are `send` and `recv`, counted in `in_flight` (if given)
    /// as long as its writing half lives.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, in_flight: Option<InFlight>) -> H2Stream {
        H2Stream {
            send,
            recv,
            in_flight,
        }
    }
}

impl Transport for H2Stream {
    type Read = H2Recv;
    type Write = H2Send;
    fn into_halves(self) -> (H2Recv, H2Send) {
        (
            H2Recv {
                recv: self.recv,
                buf: Bytes::new(),
                spill: std::collections::VecDeque::new(),
                small: bytes::BytesMut::new(),
                ended: None,
            },
            H2Send {
                send: self.send,
                shut: false,
                _in_flight: self.in_flight,
            },
        )
    }
}

/// The reading half of an [`H2Stream`].
pub struct H2Recv {
    recv: RecvStream,
    /// The part of the last DATA frame not read yet.
    buf: Bytes,
    /// DATA frames taken out of h2 while the session could not read them (its local
    /// writer blocked, [`ChunkRead::poll_absorb`]), in order after `buf`, then `small`.
    /// Their window is given back only as they are read, so these hold at most the
    /// stream window. Frames under [`SMALL_FRAME`] bytes are copied together into
    /// `small` (h2 keeps about 256 bytes of bookkeeping per frame, one of 1 byte too,
    /// counted against the connection's [`super::H2_DATA_FRAME_BUDGET`]: a session
    /// stalled with its window full of tiny messages held up to 2 million of them
    /// there); bigger ones are kept as they are (no copy of bulk data).
    spill: std::collections::VecDeque<Bytes>,
    /// Small frames taken out of h2, merged: after `spill`.
    small: bytes::BytesMut,
    /// How the stream ended, met while taking frames into `spill`: after it.
    ended: Option<io::Result<()>>,
}

/// DATA frames under this size are copied together when taken out of h2 ([`H2Recv`]):
/// h2 counts 256 bytes less the payload against its budget for each frame under 256
/// bytes, and a frame kept as h2 read it pins h2's read buffer (8 KiB or more), so
/// frames of a few hundred bytes, each read into a buffer of its own, could pin far
/// more than their bytes. Bigger ones (bulk data) are kept as they are, not copied.
const SMALL_FRAME: usize = 16 * 1024;
/// Small frames are merged into pieces of about this size ([`H2Recv`]).
const SMALL_MERGED: usize = 64 * 1024;

/// The writing half of an [`H2Stream`].
pub struct H2Send {
    send: SendStream<Bytes>,
    /// END_STREAM sent.
    shut: bool,
    _in_flight: Option<InFlight>,
}

impl H2Send {
    /// The error for a write the peer's reset (or a dead connection) refused.
    fn write_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => to_io(e),
        })
    }

    /// Sends up to `want` bytes that `take` cuts off its input once h2 grants
    /// capacity: the peer's windows are the backpressure. Returns how many went.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
        take: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(want);
        loop {
            let granted = self.send.capacity();
            if granted > 0 {
                let n = granted.min(want);
                return match self.send.send_data(take(n), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => self.write_error(cx).map(Err),
                };
            }
            // No capacity yet (windows full, or granted to other streams first): wait.
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return self.write_error(cx).map(Err),
            }
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl H2Recv {
    /// Fills `buf` with the bytes taken aside, else the next DATA frame, if it is
    /// empty; `false` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.buf.is_empty() {
            if let Some(b) = self.spill.pop_front() {
                if self.spill.is_empty() {
                    // Its capacity goes too (a stall's thousands of entries).
                    self.spill = std::collections::VecDeque::new();
                }
                self.buf = b;
                continue;
            }
            if !self.small.is_empty() {
                // The allocation goes with the bytes (a split would keep it here for
                // the session's life).
                self.buf = std::mem::take(&mut self.small).freeze();
                break;
            }
            if let Some(end) = self.ended.take() {
                return Poll::Ready(end.map(|()| false));
            }
            match ready!(self.poll_frame(cx))? {
                Some(b) => self.buf = b,
                None => return Poll::Ready(Ok(false)),
            }
        }
        Poll::Ready(Ok(true))
    }

    /// The next DATA frame from h2; `None` at the end of the stream.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        Poll::Ready(match ready!(self.recv.poll_data(cx)) {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => match e.reason() {
                Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(None),
                Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
                _ => Err(to_io(e)),
            },
        })
    }

    /// Gives the window back as data is consumed (h2 sends WINDOW_UPDATE in bulk).
    fn consumed(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        this.consumed(n);
        Poll::Ready(Ok(()))
    }
}

/// DATA frames go on as they are: no copy.
impl ChunkRead for H2Recv {
    fn has_chunks(&self) -> bool {
        true
    }

    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let this = self.get_mut();
        if !ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(None));
        }
        // At most a frame's worth at once: bytes taken aside while the writer waited
        // are handed on (and their window given back) as they are read, not all at once.
        let n = this.buf.len().min(super::H2_MAX_FRAME_BYTES as usize);
        let b = this.buf.split_to(n);
        this.consumed(b.len());
        Poll::Ready(Ok(Some(b)))
    }

    fn poll_absorb(self: Pin<&mut Self>, cx: &mut Context<'_>) {
        let this = self.get_mut();
        while this.ended.is_none() {
            match this.poll_frame(cx) {
                Poll::Pending => return,
                Poll::Ready(Ok(Some(b))) if b.len() < SMALL_FRAME => {
                    this.small.extend_from_slice(&b);
                    if this.small.len() >= SMALL_MERGED {
                        // In pieces of about this size: a buffer grown by doubling to a
                        // whole window would waste up to half of it, and one piece held
                        // by a stalled write keeps only itself.
                        let merged = std::mem::take(&mut this.small).freeze();
                        this.spill.push_back(merged);
                    }
                }
                Poll::Ready(Ok(Some(b))) => {
                    if !this.small.is_empty() {
                        let merged = this.small.split().freeze();
                        this.spill.push_back(merged);
                    }
                    this.spill.push_back(b);
                }
                Poll::Ready(Ok(None)) => this.ended = Some(Ok(())),
                Poll::Ready(Err(e)) => this.ended = Some(Err(e)),
            }
        }
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.get_mut()
            .poll_send(cx, data.len(), |n| Bytes::copy_from_slice(&data[..n]))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out as soon as it runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.shut = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => self.write_error(cx).map(Err),
        }
    }
}

/// Buffers go into DATA frames as they are: no copy.
impl OwnedWrite for H2Send {
    fn poll_write_owned(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !data.is_empty() {
            ready!(this.poll_send(cx, data.len(), |n| data.split_to(n)))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Counts one request or session as in flight on its HTTP/2 connection while alive.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// One more in flight on `count`.
    pub fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Drives an HTTP/2 connection's future so that, while at least two sessions are in
/// flight on it (`in_flight`), each wake-up first lets the worker's other ready tasks
/// run (a self-wake puts the task at the back of the run queue): sessions woken in the
/// same round queue their frames first, and the connection writes them out together,
/// one TLS write instead of one per frame. With one session there is nothing to batch
/// and the wake-up is served at once (latency).
pub async fn batched<F: std::future::Future>(fut: F, in_flight: Arc<AtomicUsize>) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut deferred = false;
    std::future::poll_fn(|cx| {
        if !deferred && in_flight.load(Ordering::Relaxed) >= 2 {
            deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        deferred = false;
        fut.as_mut().poll(cx)
    })
    .await
}

/// HTTP/2 keepalive: pings the peer every `interval`; completes when a ping went
/// unanswered for `timeout` (the connection is dead). Never completes without pings.
pub async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}
