//! The one place that moves session data: a WebSocket on one side, a [`Local`] endpoint
//! on the other. Both directions run at once with backpressure (no unbounded queues):
//! local reads become binary messages, local EOF becomes the `eof` control message,
//! a received `eof` half-closes the local writer, and the opposite direction keeps
//! flowing. When both directions are done (or on error) a Close frame ends the session.
//!
//! Memory per session is bounded: one local read buffer of [`READ_CHUNK_BYTES`] (framed
//! in place, [`crate::tunnel::ws`]), the WebSocket reader's buffer (one frame at most),
//! and at most one incoming message (the session's message limit) while the local
//! writer is slow.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::Instrument;

use crate::endpoint::message::MsgError;
use crate::endpoint::{Local, Reader, Writer};
use crate::tunnel::protocol::{self, Control, ErrorKind};
use crate::tunnel::ws::{ChunkRead, OwnedWrite, Transport, WebSocket, WsSink, WsSource, HEADROOM};

/// Largest local read (one binary message at most this big in byte mode): 128 KiB less
/// the largest WebSocket header (14 bytes, masked), so a full frame fills whole TLS
/// records instead of leaving a tiny record behind.
pub const READ_CHUNK_BYTES: usize = 128 * 1024 - 14;
/// First local read size; reads that fill the buffer double it up to
/// [`READ_CHUNK_BYTES`], so idle and chatty sessions keep small buffers. With the frame
/// header's room the buffer is 1 KiB: an idle session holds it while it waits, and an
/// allocation of this size stays in glibc's per-thread cache.
pub const FIRST_READ_BYTES: usize = 1024 - HEADROOM;
/// How long to wait for the peer's Close after sending ours.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Byte counters of a live session, readable while it runs (status, metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received from the network and written to the local endpoint.
    pub to_local: AtomicU64,
    /// Bytes read from the local endpoint and sent to the network.
    pub from_local: AtomicU64,
}

/// Per-session settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Close after this long without data moving (never while blocked on backpressure).
    pub idle_timeout: Option<Duration>,
    /// `(interval, timeout)`: ping a silent peer every `interval`; a peer silent for
    /// `timeout` while nothing of ours is pending is dead.
    pub keepalive: Option<(Duration, Duration)>,
    /// The peer sent its first binary message before it knew the session's direction
    /// (a forward's early data, [`crate::client::HEADER_EARLY`]): on a session that
    /// writes nothing locally it is dropped, not a `forbidden_direction` error.
    pub blind_first: bool,
}

/// Bound on sending one keepalive ping.
const PING_SEND_TIMEOUT: Duration = Duration::from_secs(1);

async fn keepalive_tick(ka: Option<(Duration, Duration)>) {
    match ka {
        Some((interval, _)) => {
            tokio::time::sleep((interval / 2).max(Duration::from_millis(100))).await
        }
        None => std::future::pending().await,
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The close code (sent or received; 1006 when the connection dropped).
    pub code: u16,
    /// A short reason for logs.
    pub reason: String,
    /// The `exit` control message received from the peer, if any.
    pub exit: Option<Control>,
    /// The `error` control message received from the peer, if any.
    pub peer_error: Option<(String, String)>,
    /// Both directions reached EOF and the close was orderly.
    pub clean: bool,
}

/// A way to end a live session from outside (drain, withdrawn access).
#[derive(Clone)]
pub struct StopHandle(watch::Sender<Option<(ErrorKind, String)>>);

/// The receiving end of a [`StopHandle`] (`None`: a signal that never fires).
pub struct StopSignal(Option<watch::Receiver<Option<(ErrorKind, String)>>>);

/// A new stop handle and its signal.
pub fn stop_pair() -> (StopHandle, StopSignal) {
    let (tx, rx) = watch::channel(None);
    (StopHandle(tx), StopSignal(Some(rx)))
}

impl StopHandle {
    /// Ends the session with `kind` (its close code) and `message`.
    pub fn stop(&self, kind: ErrorKind, message: impl Into<String>) {
        let _ = self.0.send(Some((kind, message.into())));
    }
}

impl StopSignal {
    /// A signal that never fires (no channel: a forgotten sender would leak one per
    /// session).
    pub fn never() -> StopSignal {
        StopSignal(None)
    }

    /// Why the session was stopped, if it was already.
    pub fn fired(&self) -> Option<(ErrorKind, String)> {
        self.0.as_ref().and_then(|rx| rx.borrow().clone())
    }

    async fn wait(&mut self) -> (ErrorKind, String) {
        let Some(rx) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let got = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
        match got {
            Ok(v) => v.unwrap_or((ErrorKind::Draining, String::new())),
            Err(_) => std::future::pending().await,
        }
    }
}

/// What ended one wait of a session's loop ([`run_in`]).
enum Event {
    Up(Result<bool, Failure>),
    Down(Failure),
    Eof,
    Stopped((ErrorKind, String)),
    Idle,
    Tick,
}

/// The upstream direction's wake-up ([`Woken`]).
const UP: u8 = 1;
/// The downstream direction's.
const DOWN: u8 = 2;
/// The rest: the stop signal, the timers and the peer's eof; rare, so polled together.
const REST: u8 = 4;

/// Which of a session's futures were woken since they were last polled, and the task
/// that polls them. `tokio::select!` polls every branch at every wake-up; at 512
/// sessions that was the other direction's readiness check, the stop signal's and two
/// timers' for each message.
struct Woken {
    bits: std::sync::atomic::AtomicU8,
    task: futures_util::task::AtomicWaker,
}

impl Default for Woken {
    fn default() -> Woken {
        Woken {
            bits: std::sync::atomic::AtomicU8::new(UP | DOWN | REST),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

/// The waker one group of futures is polled with: it marks the group and wakes the task.
struct Branch {
    woken: Arc<Woken>,
    bit: u8,
}

impl std::task::Wake for Branch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.bits.fetch_or(self.bit, Ordering::AcqRel);
        self.woken.task.wake();
    }
}

enum Failure {
    Local(String),
    Protocol(ErrorKind, String),
    PeerGone(String),
    PeerClosed(Option<CloseFrame>),
    /// The local side (a forward's caller) can read nothing more, and has sent all it
    /// will: the session ends in order.
    LocalLeft,
    Stopped(ErrorKind, String),
    Idle,
}

/// Session activity for the idle timeout: when data last moved, and how many operations
/// are blocked on backpressure right now (a blocked session is never idle).
struct Activity {
    start_ms: u64,
    last_ms: AtomicU64,
    last_rx_ms: AtomicU64,
    blocked: AtomicU32,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start_ms: clock_ms(),
            last_ms: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            blocked: AtomicU32::new(0),
        }
    }

    /// Milliseconds since the session started, by the coarse clock.
    fn elapsed_ms(&self) -> u64 {
        clock_ms().saturating_sub(self.start_ms)
    }

    fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// A frame arrived from the peer: it is alive; and, unless the frame was a Ping or
    /// Pong, the session is not idle (keepalive's own frames, every `interval`, would
    /// otherwise keep any `idle_timeout` longer than that from ever passing).
    fn received(&self, keepalive: bool) {
        let now = self.elapsed_ms();
        if !keepalive {
            self.last_ms.store(now, Ordering::Relaxed);
        }
        self.last_rx_ms.store(now, Ordering::Relaxed);
    }

    fn since_received(&self) -> Duration {
        let last = self.last_rx_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }

    /// Marks an operation that may block on backpressure, while the returned guard
    /// lives; when it ends (done or dropped), data moved. A guard rather than a wrapping
    /// future: that one moved the operation's future into itself and again into its
    /// await, two copies per message.
    fn blocking(&self) -> Blocked<'_> {
        self.blocked.fetch_add(1, Ordering::Relaxed);
        Blocked(self)
    }

    /// Completes once nothing moved for `timeout` while nothing was blocked.
    async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let since = Duration::from_millis(self.elapsed_ms().saturating_sub(last));
            if since >= timeout && self.blocked.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(timeout.saturating_sub(since).max(Duration::from_millis(50))).await;
        }
    }
}

/// A monotonic clock in milliseconds for [`Activity`], read once or twice per message:
/// the coarse clock on Linux (the last tick's time, 1-10 ms old, read without the
/// timestamp counter: a few instructions against `Instant::now`'s clock read and
/// timespec arithmetic). Idle and keepalive timeouts are seconds.
/// (Through glibc's vDSO call: rustix's own vDSO set-up faults under valgrind, which
/// `scripts/callgrind-ab.py` runs the gateways in.)
#[cfg(target_os = "linux")]
fn clock_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // A failed read of the coarse clock (never on Linux >= 2.6.32) falls back to the
    // fine one, which counts from the same start (boot). (Not a shared "last reading":
    // a store per read to one cache line would bounce between the shards' cores.)
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE)
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map_or(0, |t| {
            (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000
        })
}

/// A monotonic clock in milliseconds for [`Activity`] (since the first call).
#[cfg(not(target_os = "linux"))]
fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The session's WebSocket sink, shared by the upstream, which waits for it at each
/// send, and the Pong and keepalive Ping, which take it only when it is free and the
/// upstream is not waiting for it. futures' lock (one atomic operation each way when
/// free, where tokio's took its semaphore's inner lock at every release: 1.5% of a
/// message's instructions) is not fair: without the mark, a peer that kept sending
/// Pings while reading slowly could keep the upstream's data behind its Pongs.
///
/// A Ping that finds the sink busy is not dropped (RFC 6455 5.5.2: a Pong MUST answer
/// it): its payload is left here, and the upstream sends the Pong right after the send
/// that held the sink (for the latest Ping only, as 5.5.3 allows).
struct SharedSink<W> {
    lock: futures_util::lock::Mutex<WsSink<W>>,
    /// Sends waiting for the sink (the upstream's, one at a time).
    waiting: AtomicU32,
    /// A Pong left to the upstream: whether there is one, and its payload.
    pong_due: AtomicBool,
    pong: std::sync::Mutex<Option<bytes::Bytes>>,
}

impl<W> SharedSink<W> {
    fn new(sink: WsSink<W>) -> SharedSink<W> {
        SharedSink {
            lock: futures_util::lock::Mutex::new(sink),
            waiting: AtomicU32::new(0),
            pong_due: AtomicBool::new(false),
            pong: std::sync::Mutex::new(None),
        }
    }

    /// The sink, for the upstream: waits for it, marked as waiting meanwhile.
    async fn lock(&self) -> futures_util::lock::MutexGuard<'_, WsSink<W>> {
        if let Some(g) = self.lock.try_lock() {
            return g;
        }
        /// Ends the mark however the wait ends (done or dropped).
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        self.lock.lock().await
    }

    /// The sink, for a Pong or keepalive Ping: only if it is free and the upstream is
    /// not waiting for it (a busy sink is sending data, which tells the peer as much).
    fn try_lock_spare(&self) -> Option<futures_util::lock::MutexGuard<'_, WsSink<W>>> {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            return None;
        }
        self.lock.try_lock()
    }

    /// Leaves the Pong for `payload` to the upstream (replacing one left before).
    fn defer_pong(&self, payload: bytes::Bytes) {
        let mut slot = self
            .pong
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(payload);
        self.pong_due.store(true, Ordering::Relaxed);
    }

    /// The Pong left to the upstream, if any (taken: sent once).
    fn take_pong(&self) -> Option<bytes::Bytes> {
        // A load first: the upstream asks after every send, and there rarely is one.
        if !self.pong_due.load(Ordering::Relaxed) || !self.pong_due.swap(false, Ordering::Relaxed) {
            return None;
        }
        self.pong
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl<W: OwnedWrite> SharedSink<W> {
    /// The upstream's send of `msg` (waiting for the sink), then of a Pong left to it.
    async fn send(&self, msg: Message) -> Result<(), tungstenite::Error> {
        let mut g = self.lock().await;
        g.send(msg).await?;
        self.send_left_pong(&mut g).await;
        Ok(())
    }

    /// The upstream's send of a framed binary message ([`WsSink::send_framed`]), then
    /// of a Pong left to it.
    async fn send_framed(&self, buf: &mut BytesMut) -> Result<(), tungstenite::Error> {
        let mut g = self.lock().await;
        g.send_framed(buf).await?;
        self.send_left_pong(&mut g).await;
        Ok(())
    }

    /// Sends the Pongs left to the upstream while it holds the sink: again if a Ping
    /// came while one was being sent (which found the sink held, so left its own),
    /// so that none is left behind once the guard goes (up to 8 in a row: a peer
    /// flooding Pings has its next one answered on the next send). A failed Pong is
    /// not the data's failure: a broken sink fails the next send or the close.
    async fn send_left_pong(&self, g: &mut WsSink<W>) {
        for _ in 0..8 {
            let Some(p) = self.take_pong() else { return };
            if g.send(Message::Pong(p)).await.is_err() {
                return;
            }
        }
    }
}

/// An operation blocked on backpressure ([`Activity::blocking`]).
struct Blocked<'a>(&'a Activity);

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.blocked.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Whether sessions enter their span at every poll ([`enter_spans`]).
static ENTER_SPANS: AtomicBool = AtomicBool::new(false);

/// Makes sessions enter their span at every poll, as a log filter that selects events
/// by the spans they are in (EnvFilter's `[span]` directives) needs; set once at start.
pub fn enter_spans(on: bool) {
    ENTER_SPANS.store(on, Ordering::Relaxed);
}

/// Runs a session until both directions are done or it fails; returns how it ended.
///
/// It logs its few lines in `span` (entered for each). The span is entered at every poll
/// only if [`enter_spans`] asked for it: that is a registry lookup and a reference count
/// at each enter and exit, and a session logs a line or two in its life.
pub async fn run<S: Transport>(
    ws: WebSocket<S>,
    local: Local,
    counters: &Counters,
    stop: StopSignal,
    opts: Options,
    span: &tracing::Span,
) -> Outcome {
    let entered = if ENTER_SPANS.load(Ordering::Relaxed) {
        span.clone()
    } else {
        tracing::Span::none()
    };
    run_in(ws, local, counters, stop, opts, span)
        .instrument(entered)
        .await
}

async fn run_in<S: Transport>(
    ws: WebSocket<S>,
    local: Local,
    counters: &Counters,
    mut stop: StopSignal,
    opts: Options,
    span: &tracing::Span,
) -> Outcome {
    let (sink, mut stream) = ws.split();
    // Shared by the upstream and keepalive pings; the upstream holds it only per send.
    let sink = SharedSink::new(sink);
    let Local {
        reader,
        mut writer,
        mut child,
        hangup,
    } = local;
    let eof_seen = AtomicBool::new(false);
    let activity = Activity::new();
    // An exec child that stops reading its stdin (`head`) is not a failure: its output
    // and exit status still matter, so further input is discarded instead.
    let discard_on_epipe = child.is_some();
    let eof_notify = Notify::new();
    let mut exit: Option<Control> = None;
    let mut peer_error = None;
    // The peer's Close came after its eof (both directions done, or its local side
    // left): answered, not waited for.
    let mut peer_closed = false;
    // The peer's local side left (its eof, then a Close, before our direction was done).
    let mut peer_left = false;
    // Ours did (its socket closed entirely before the peer's eof came). Only before
    // that eof: it shuts our write side down, and a caller's half-close alone would
    // then read as hung up.
    let mut we_left = false;
    // A write into the caller found it gone (set by the downstream), and the upstream
    // has ended (set here, so the downstream then ends the session instead of
    // discarding what is left for the caller for ever).
    let local_gone = AtomicBool::new(false);
    let up_finished = AtomicBool::new(false);

    let failure = {
        let up = upstream(
            reader,
            hangup,
            child.as_deref_mut(),
            &sink,
            counters,
            &activity,
            span,
        );
        let down = downstream(
            &mut stream,
            &sink,
            &mut writer,
            counters,
            &eof_seen,
            &eof_notify,
            &mut exit,
            &mut peer_error,
            &activity,
            discard_on_epipe,
            opts.blind_first,
            hangup.is_some().then_some((&local_gone, &up_finished)),
            span,
        );
        tokio::pin!(up, down);
        let mut up_done = false;
        // Each wake-up polls only what woke: one message moves one direction, and the
        // other direction, the stop signal and the timers stay as they are.
        let woken = Arc::new(Woken::default());
        let [up_waker, down_waker, rest_waker] = [UP, DOWN, REST].map(|bit| {
            Waker::from(Arc::new(Branch {
                woken: woken.clone(),
                bit,
            }))
        });
        // A session stopped before it began (a reload that withdrew its access while
        // the response went out) moves nothing: the stop comes before the first poll of
        // either direction, which would move what is already there.
        let mut stopped_already = stop.fired();
        loop {
            if let Some((kind, message)) = stopped_already.take() {
                break Some(Failure::Stopped(kind, message));
            }
            if up_done && eof_seen.load(Ordering::Acquire) {
                break None;
            }
            // Made anew at each turn of the loop (the timers restart), so polled first.
            let stopped = stop.wait();
            let idle = activity.idle(opts.idle_timeout);
            let tick = keepalive_tick(opts.keepalive);
            let notified = eof_notify.notified();
            tokio::pin!(stopped, idle, tick, notified);
            woken.bits.fetch_or(REST, Ordering::AcqRel);
            let event = std::future::poll_fn(|cx| {
                woken.task.register(cx.waker());
                let bits = woken.bits.swap(0, Ordering::AcqRel);
                if bits & UP != 0 && !up_done {
                    if let Poll::Ready(r) = up.as_mut().poll(&mut Context::from_waker(&up_waker)) {
                        // DOWN and REST were not polled: they stay due.
                        woken.bits.fetch_or(bits & (DOWN | REST), Ordering::AcqRel);
                        return Poll::Ready(Event::Up(r));
                    }
                }
                if bits & DOWN != 0 {
                    if let Poll::Ready(f) =
                        down.as_mut().poll(&mut Context::from_waker(&down_waker))
                    {
                        woken.bits.fetch_or(bits & REST, Ordering::AcqRel);
                        return Poll::Ready(Event::Down(f));
                    }
                }
                if bits & REST != 0 {
                    let cx = &mut Context::from_waker(&rest_waker);
                    // Only once our direction is done does the peer's eof end the loop
                    // (notify_one keeps a permit, so an eof seen earlier is not missed).
                    if up_done && notified.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Eof);
                    }
                    if let Poll::Ready(s) = stopped.as_mut().poll(cx) {
                        return Poll::Ready(Event::Stopped(s));
                    }
                    if idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Idle);
                    }
                    if tick.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Tick);
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Up(Ok(gone)) => {
                    up_done = true;
                    up_finished.store(true, Ordering::Release);
                    // An exec child's upstream ends once the child has exited (and its
                    // `exit` is out): its stdin is read by no one any more, as with a
                    // caller gone.
                    let gone = gone || local_gone.load(Ordering::Acquire) || discard_on_epipe;
                    // Our local peer closed its socket: nothing more it could be sent
                    // can be delivered, so the session ends without waiting for the far
                    // side's data (our `eof` is out; the Close follows it).
                    if gone && !eof_seen.load(Ordering::Acquire) {
                        we_left = true;
                        break None;
                    }
                }
                Event::Up(Err(f)) => break Some(f),
                Event::Down(Failure::LocalLeft) => {
                    we_left = true;
                    break None;
                }
                Event::Down(f) => {
                    // Both directions done and then the peer's Close: orderly.
                    let eof = eof_seen.load(Ordering::Acquire);
                    // Or: the peer's eof, then a normal Close before our direction was
                    // done: the peer's local side is gone (see the `gone` above), and
                    // what ours would still send could go nowhere. Orderly too.
                    let left = eof
                        && matches!(&f, Failure::PeerClosed(Some(c)) if c.code == CloseCode::Normal);
                    if (up_done && eof && matches!(f, Failure::PeerClosed(_))) || left {
                        peer_left = !up_done;
                        peer_closed = true;
                        break None;
                    }
                    break Some(f);
                }
                Event::Eof => {}
                Event::Stopped(s) => break Some(Failure::Stopped(s.0, s.1)),
                Event::Idle => break Some(Failure::Idle),
                Event::Tick => {
                    if let Some((interval, timeout)) = opts.keepalive {
                        let silent = activity.since_received();
                        let blocked = activity.blocked.load(Ordering::Relaxed) > 0;
                        if silent >= timeout && !blocked {
                            break Some(Failure::PeerGone(format!(
                                "no frame from the peer for {}s (keepalive)",
                                silent.as_secs()
                            )));
                        }
                        if silent >= interval {
                            // Skipped while a send is in progress: then the peer is
                            // merely slow to read, and pending data says so.
                            if let Some(mut g) = sink.try_lock_spare() {
                                // Boxed, as it is rare (see `finish` below).
                                let _ = Box::pin(tokio::time::timeout(
                                    PING_SEND_TIMEOUT,
                                    g.send(Message::Ping(bytes::Bytes::new())),
                                ))
                                .await;
                            }
                        }
                    }
                }
            }
        }
    };
    // Whatever was written locally reaches its destination, even on failure.
    match writer.as_mut() {
        Some(Writer::Bytes(w)) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, w.flush()).await;
        }
        Some(Writer::Messages(m)) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, m.flush()).await;
        }
        None => {}
    }
    // An exec child whose peer left has had its stdin end, and its stdout closed with
    // the reader: as `data | child` whose reader went away, it runs on to its own end
    // (awaited below, once the Close is answered). Any other child is killed (and
    // reaped by tokio) when dropped.
    let linger = peer_left && child.is_some();
    if !linger {
        if let Some(c) = child.as_mut() {
            crate::endpoint::exec::kill(c);
        }
    }
    // Boxed: it runs once, at the end, and inline it would make every session's state
    // (idle ones too) as big as this last step's.
    let mut out = Box::pin(finish(
        sink.lock.into_inner(),
        stream,
        failure,
        peer_closed,
        exit,
        peer_error,
    ))
    .await;
    if we_left {
        out.reason = "the local side closed".into();
    } else if peer_left {
        out.reason = "the peer's local side closed".into();
    }
    if let (true, Some(c)) = (linger, child.as_mut()) {
        Box::pin(outlive_peer(c, &mut stop, opts.idle_timeout, span)).await;
    }
    out
}

/// Waits for an exec child that outlives its session's peer, unless the gateway stops
/// the session first (drain, reload, withdrawn access) or the idle timeout passes (as it
/// would have for the session): then it is killed.
async fn outlive_peer(
    child: &mut tokio::process::Child,
    stop: &mut StopSignal,
    idle: Option<Duration>,
    span: &tracing::Span,
) {
    let idle = async {
        match idle {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        status = crate::endpoint::exec::wait(child) => match status {
            Ok(status) => span.in_scope(|| {
                tracing::info!(status = %status, "exec child exited after the peer left")
            }),
            Err(e) => span.in_scope(|| tracing::warn!(error = %e, "wait for child")),
        },
        _ = stop.wait() => {
            crate::endpoint::exec::kill(child);
        }
        () = idle => {
            span.in_scope(|| tracing::info!("exec child killed: idle after the peer left"));
            crate::endpoint::exec::kill(child);
        }
    }
}

async fn finish<W: OwnedWrite, R: ChunkRead>(
    mut sink: WsSink<W>,
    mut stream: WsSource<R>,
    failure: Option<Failure>,
    peer_closed: bool,
    exit: Option<Control>,
    peer_error: Option<(String, String)>,
) -> Outcome {
    let mut out = Outcome {
        code: protocol::CLOSE_NORMAL,
        reason: "done".into(),
        exit,
        peer_error,
        clean: false,
    };
    let (send_close, error_msg) = match failure {
        // (`LocalLeft` ends the loop as `None`, in `run_in`.)
        None | Some(Failure::LocalLeft) => {
            out.clean = true;
            (Some((protocol::CLOSE_NORMAL, String::new())), None)
        }
        Some(Failure::Local(m)) => {
            out.code = protocol::CLOSE_ENDPOINT_FAILED;
            out.reason = format!("local endpoint failed: {m}");
            (
                Some((
                    protocol::CLOSE_ENDPOINT_FAILED,
                    "local endpoint failed".to_string(),
                )),
                Some(Control::error(
                    ErrorKind::EndpointFailed,
                    "the local endpoint failed",
                )),
            )
        }
        Some(Failure::Protocol(kind, m)) => {
            out.code = kind.close_code();
            out.reason = m.clone();
            (
                Some((kind.close_code(), kind.as_str().to_string())),
                Some(Control::error(kind, m)),
            )
        }
        Some(Failure::Stopped(kind, m)) => {
            out.code = kind.close_code();
            out.reason = format!("{}: {m}", kind.as_str());
            (
                Some((kind.close_code(), kind.as_str().to_string())),
                Some(Control::error(kind, m)),
            )
        }
        Some(Failure::Idle) => {
            out.code = protocol::CLOSE_GOING_AWAY;
            out.reason = "idle timeout".into();
            (
                Some((protocol::CLOSE_GOING_AWAY, "idle timeout".to_string())),
                None,
            )
        }
        Some(Failure::PeerGone(m)) => {
            out.code = 1006;
            out.reason = format!("peer connection lost: {m}");
            (None, None)
        }
        Some(Failure::PeerClosed(frame)) => {
            match &frame {
                Some(f) => {
                    out.code = u16::from(f.code);
                    out.reason = format!(
                        "peer closed early: {} {}",
                        out.code,
                        protocol::clean(&f.reason)
                    );
                }
                None => {
                    out.code = 1005;
                    out.reason = "peer closed early".into();
                }
            }
            // Answer the peer's Close with its own code (RFC 6455 5.5.1).
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(frame))).await;
            (None, None)
        }
    };
    let mut shut = false;
    if let Some((code, reason)) = send_close {
        let sent = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if let Some(e) = error_msg {
                sink.send(Message::text(e.encode())).await?;
            }
            sink.send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            })))
            .await
        })
        .await;
        if matches!(sent, Ok(Ok(()))) {
            // Nothing follows a Close: end the sending side at once (END_STREAM goes out
            // with the Close, TLS close_notify right after it), so the peer can answer
            // with its Close and its own end together: one round trip, not two.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.shutdown()).await;
            shut = true;
            if !peer_closed {
                // Wait (bounded) for the peer's Close so the last bytes are not cut off.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    while let Some(Ok(m)) = stream.next().await {
                        if let Message::Close(_) = m {
                            break;
                        }
                    }
                })
                .await;
            }
        }
    }
    // End the transport properly now that the WebSocket is closed: TLS close_notify on a
    // connection of its own, END_STREAM on an HTTP/2 stream; then wait (bounded) for the
    // peer's end, so an HTTP/2 stream is closed cleanly rather than reset (resets are
    // rate-limited per connection by peers).
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if !shut {
            sink.shutdown().await?;
        }
        stream.drain().await
    })
    .await;
    out
}

/// Local → network: read chunks, send binary messages; then the child's `exit`, then `eof`.
/// Returns whether the local side is a caller that is gone entirely (see
/// [`crate::endpoint::Local::hangup`]), so the session need not wait for the peer's end.
async fn upstream<W: OwnedWrite>(
    reader: Option<Reader>,
    hangup: Option<crate::endpoint::Hangup>,
    child: Option<&mut tokio::process::Child>,
    sink: &SharedSink<W>,
    counters: &Counters,
    activity: &Activity,
    span: &tracing::Span,
) -> Result<bool, Failure> {
    let mut gone = false;
    // A Unix socket whose peer closed with data of ours unread fails one read with
    // ECONNRESET, and on a seqpacket socket that comes before the records the peer sent
    // last, still queued. So they are read on, and only then does the reset count: as the
    // end of a caller that closed (`gone`), or as the local endpoint's failure.
    let mut reset = false;
    match reader {
        Some(Reader::Bytes(mut r)) => {
            // Reads land behind room for the frame header, so the sink frames them in
            // place; the buffer is reused for every read.
            let mut want = FIRST_READ_BYTES;
            let mut buf = BytesMut::new();
            loop {
                // One reservation for header room and read (after a big frame went to
                // the transport by value, `buf` is empty and reclaims or reallocates).
                buf.reserve(HEADROOM + want);
                buf.resize(HEADROOM, 0);
                let n = match r.read_buf(&mut bytes::BufMut::limit(&mut buf, want)).await {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !reset => {
                        reset = true;
                        continue;
                    }
                    Err(e) => return Err(Failure::Local(format!("read: {e}"))),
                };
                if n == 0 {
                    gone = hangup.is_some_and(|h| h.peer_gone());
                    break;
                }
                crate::shard::note_traffic();
                if n == want {
                    if want < READ_CHUNK_BYTES {
                        want = (want * 2).min(READ_CHUNK_BYTES);
                    } else {
                        crate::shard::note_streaming();
                    }
                }
                // Data moved: the guard's end says so (one clock read per message).
                let sent = {
                    let _blocked = activity.blocking();
                    sink.send_framed(&mut buf).await
                };
                sent.map_err(|e| ws_failure(e, span))?;
                counters.from_local.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Some(Reader::Messages(mut m)) => loop {
            match m.recv().await {
                Ok(Some(data)) => {
                    crate::shard::note_traffic();
                    let n = data.len() as u64;
                    let sent = {
                        let _blocked = activity.blocking();
                        sink.send(Message::Binary(data)).await
                    };
                    sent.map_err(|e| ws_failure(e, span))?;
                    counters.from_local.fetch_add(n, Ordering::Relaxed);
                }
                Ok(None) => {
                    gone = hangup.is_some_and(|h| h.peer_gone());
                    break;
                }
                Err(MsgError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionReset && !reset =>
                {
                    reset = true;
                }
                Err(e @ MsgError::TooBig { .. }) => {
                    span.in_scope(|| tracing::warn!(error = %e, "local message too big; closing the session with 1009"));
                    return Err(Failure::Protocol(ErrorKind::MessageTooBig, e.to_string()));
                }
                Err(MsgError::Io(e)) => return Err(Failure::Local(format!("read: {e}"))),
            }
        },
        None => {}
    }
    // A caller's reset is its end too (it closed), on any system.
    gone |= reset && hangup.is_some();
    if reset && !gone {
        return Err(Failure::Local(
            "read: the local peer closed with data unread (connection reset)".into(),
        ));
    }
    if let Some(child) = child {
        let status = crate::endpoint::exec::wait(child)
            .await
            .map_err(|e| Failure::Local(format!("wait for child: {e}")))?;
        let ctl = exit_control(status);
        span.in_scope(|| tracing::info!(status = %status, "exec child exited"));
        sink.send(Message::text(ctl.encode()))
            .await
            .map_err(|e| ws_failure(e, span))?;
    }
    sink.send(Message::text(Control::Eof.encode()))
        .await
        .map_err(|e| ws_failure(e, span))?;
    Ok(gone)
}

fn exit_control(status: std::process::ExitStatus) -> Control {
    match (status.code(), crate::platform::exit_signal(&status)) {
        (Some(c), _) => Control::ExitCode(c),
        (None, Some(s)) => Control::ExitSignal(s),
        (None, None) => Control::ExitCode(-1),
    }
}

/// Network → local. Returns only on failure or the peer's Close; signals `eof` through
/// `eof_seen`/`eof_notify` and keeps reading (so a Close or error after it is seen).
#[allow(clippy::too_many_arguments)]
async fn downstream<W: OwnedWrite, R: ChunkRead>(
    stream: &mut WsSource<R>,
    sink: &SharedSink<W>,
    writer: &mut Option<Writer>,
    counters: &Counters,
    eof_seen: &AtomicBool,
    eof_notify: &Notify,
    exit: &mut Option<Control>,
    peer_error: &mut Option<(String, String)>,
    activity: &Activity,
    discard_on_epipe: bool,
    mut blind_first: bool,
    caller: Option<(&AtomicBool, &AtomicBool)>,
    span: &tracing::Span,
) -> Failure {
    let mut discarding = false;
    loop {
        let msg = match stream.next().await {
            None => return Failure::PeerGone("connection closed without a Close frame".into()),
            Some(Err(e)) => return ws_failure(e, span),
            Some(Ok(m)) => m,
        };
        activity.received(matches!(msg, Message::Ping(_) | Message::Pong(_)));
        match msg {
            Message::Binary(data) => {
                if eof_seen.load(Ordering::Relaxed) {
                    return Failure::Protocol(ErrorKind::ProtocolError, "data after eof".into());
                }
                if discarding {
                    continue;
                }
                let Some(w) = writer.as_mut() else {
                    // A session that writes nothing locally had none from its start
                    // (its writer goes only after eof, or while discarding, both seen
                    // above): the first message here is the peer's first.
                    if std::mem::take(&mut blind_first) {
                        continue;
                    }
                    return Failure::Protocol(
                        ErrorKind::ForbiddenDirection,
                        "data sent in a direction this session does not allow".into(),
                    );
                };
                let r = {
                    let _blocked = activity.blocking();
                    let write = async {
                        match w {
                            // Flush each message: a buffered writer (stdout) must not
                            // hold back a reply a request/response protocol waits for.
                            Writer::Bytes(w) => match w.write_all(&data).await {
                                Ok(()) => w.flush().await,
                                Err(e) => Err(e),
                            },
                            Writer::Messages(m) => match m.send(&data).await {
                                Ok(()) => m.flush().await,
                                Err(e) => Err(e),
                            },
                        }
                    };
                    let mut write = std::pin::pin!(write);
                    // While the write waits, what the peer sends meanwhile is taken out
                    // of HTTP/2's per-frame buffers (within the stream's window).
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = write.as_mut().poll(cx) {
                            return Poll::Ready(r);
                        }
                        stream.poll_absorb(cx);
                        Poll::Pending
                    })
                    .await
                };
                if let Err(e) = r {
                    // A forward's caller that can read no more (on a Unix socket, EPIPE
                    // or ECONNRESET say so): what is left for it goes nowhere, as for a
                    // child that closed its stdin. Its end comes through the upstream
                    // and ends the session in order; if that end already came (it had
                    // shut down for writing first), the session ends now.
                    let broken = matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    );
                    if let (true, Some((gone, up_finished))) = (broken, caller) {
                        gone.store(true, Ordering::Release);
                        if up_finished.load(Ordering::Acquire) {
                            return Failure::LocalLeft;
                        }
                    }
                    if (broken && caller.is_some())
                        || (discard_on_epipe && e.kind() == std::io::ErrorKind::BrokenPipe)
                    {
                        span.in_scope(|| {
                            tracing::debug!(
                                "the local side stopped reading; discarding further input"
                            )
                        });
                        *writer = None;
                        discarding = true;
                        continue;
                    }
                    return Failure::Local(format!("write: {e}"));
                }
                counters
                    .to_local
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Message::Text(t) => match Control::decode(t.as_str()) {
                Ok(Control::Eof) => {
                    if eof_seen.load(Ordering::Acquire) {
                        return Failure::Protocol(
                            ErrorKind::ProtocolError,
                            "eof sent twice".into(),
                        );
                    }
                    if let Some(mut w) = writer.take() {
                        // Half-close: the local side sees EOF, the other direction goes on.
                        let r = match &mut w {
                            // Flush first: some writers (tokio's stdout) do not flush on shutdown.
                            Writer::Bytes(w) => match w.flush().await {
                                Ok(()) => w.shutdown().await,
                                Err(e) => Err(e),
                            },
                            Writer::Messages(m) => m.shutdown().await,
                        };
                        if let Err(e) = r {
                            if e.kind() != std::io::ErrorKind::NotConnected {
                                return Failure::Local(format!("shutdown: {e}"));
                            }
                        }
                    }
                    // Only now is this direction done: the session may end once both
                    // are, and must not cut the half-close (flush, shutdown) short.
                    eof_seen.store(true, Ordering::Release);
                    eof_notify.notify_one();
                }
                Ok(c @ (Control::ExitCode(_) | Control::ExitSignal(_))) => *exit = Some(c),
                Ok(Control::Error { kind, message }) => {
                    // The peer's text, kept only as it can be logged and printed.
                    let (kind, message) = (
                        protocol::clean(&kind).into_owned(),
                        protocol::clean(&message).into_owned(),
                    );
                    span.in_scope(|| tracing::debug!(%kind, %message, "peer reported an error"));
                    *peer_error = Some((kind, message));
                }
                Ok(Control::Unknown(t)) => span.in_scope(|| {
                    tracing::debug!(control = %protocol::clean(&t), "ignoring unknown control message")
                }),
                Err(e) => {
                    let e = protocol::clean(&e.to_string()).into_owned();
                    return Failure::Protocol(ErrorKind::ProtocolError, e);
                }
            },
            Message::Close(frame) => return Failure::PeerClosed(frame),
            Message::Ping(p) => {
                // Answered at once when the sink is free; else by the upstream right
                // after the send that holds it (the latest Ping's payload).
                match sink.try_lock_spare() {
                    Some(mut g) => {
                        // This answer is the latest: one left before is answered by it.
                        sink.take_pong();
                        let _ =
                            tokio::time::timeout(PING_SEND_TIMEOUT, g.send(Message::Pong(p))).await;
                    }
                    None => sink.defer_pong(p),
                }
            }
            Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

fn ws_failure(e: tungstenite::Error, span: &tracing::Span) -> Failure {
    use tungstenite::error::{CapacityError, Error as E};
    match e {
        E::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            span.in_scope(|| {
                tracing::warn!(
                    size,
                    max_size,
                    "peer sent a message over the limit; closing the session with 1009"
                )
            });
            Failure::Protocol(
                ErrorKind::MessageTooBig,
                format!("a message of {size} bytes exceeds the limit of {max_size} bytes"),
            )
        }
        E::Capacity(c) => Failure::Protocol(ErrorKind::MessageTooBig, c.to_string()),
        E::Protocol(p) => Failure::Protocol(ErrorKind::ProtocolError, p.to_string()),
        E::Utf8(_) => {
            Failure::Protocol(ErrorKind::ProtocolError, "text message is not UTF-8".into())
        }
        E::ConnectionClosed | E::AlreadyClosed => Failure::PeerGone("connection closed".into()),
        other => Failure::PeerGone(other.to_string()),
    }
}

/// Shared counters for one session.
pub type SharedCounters = Arc<Counters>;
