//! The WebSocket data path of a session (RFC 6455 framing after the upgrade).
//!
//! tungstenite does the HTTP/1.1 handshake's key derivation and supplies the frame header
//! parser/formatter and the message types; this module moves the frames. It exists
//! because the generic async wrapper cost more than the crypto on small messages (a
//! lock per half, a proxy waker per poll, a zero-filled read buffer per read, a copy of
//! every outgoing payload into a write buffer): here the reader reserves a whole frame
//! once its header is known and hands the payload on without copying, and the writer
//! frames local data in place ([`WsSink::send_framed`]).
//!
//! Validation follows tungstenite's (the previous data path): reserved bits, opcodes,
//! masking by role, control-frame size and fragmentation, continuation order, UTF-8 of
//! text and close reasons, close codes, and the message limit (checked on the declared
//! length, before any payload is buffered).

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{FrameHeader, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::either::Either;

/// Room a buffer passed to [`WsSink::send_framed`] keeps in front of its payload for the
/// frame header (the longest header: 64-bit length and a mask).
pub const HEADROOM: usize = 14;
/// Smallest read from the transport (an idle session holds this much while it waits).
const MIN_READ: usize = 2 * 1024;
/// Largest single buffer reservation while a big frame arrives.
const MAX_RESERVE: usize = 1 << 20;
/// Outgoing buffers above this are freed after use rather than kept per session.
const KEEP_OUT_BYTES: usize = 16 * 1024;
/// Frames from this size on are handed to the transport by value ([`OwnedWrite`]);
/// smaller ones are copied (cheaper than a fresh buffer per message).
const OWNED_WRITE_MIN: usize = 16 * 1024;

type Result<T> = std::result::Result<T, Error>;

/// A session's transport as a reading and a writing half that share no lock.
pub trait Transport {
    /// The reading half.
    type Read: ChunkRead;
    /// The writing half.
    type Write: OwnedWrite;
    /// Splits the transport.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

/// A writer that can take an outgoing buffer by value: a transport that queues buffers
/// (an HTTP/2 stream's DATA frames) keeps it instead of copying it.
pub trait OwnedWrite: AsyncWrite + Unpin {
    /// Writes all of `data`, consuming it; the default copies it through `poll_write`.
    fn poll_write_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let n = ready!(self.as_mut().poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            data.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> OwnedWrite for WriteHalf<T> {}

/// A reader that can also hand over what it received by value: a transport that
/// receives into buffers of its own (HTTP/2 DATA frames) gives them on without a copy.
pub trait ChunkRead: AsyncRead + Unpin {
    /// Whether [`ChunkRead::poll_chunk`] works (the default: no, use `poll_read`).
    fn has_chunks(&self) -> bool {
        false
    }

    /// The next received buffer; `None` at the end of the stream.
    fn poll_chunk(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        Poll::Ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// While the session cannot read (its local writer is blocked): takes what has
    /// arrived out of the transport's own per-frame buffers into a buffer of bytes, to
    /// be read later in order, without giving any window back (the default: nothing).
    fn poll_absorb(self: Pin<&mut Self>, _cx: &mut Context<'_>) {}
}

impl<T: AsyncRead> ChunkRead for ReadHalf<T> {}

/// An upgraded HTTP/1.1 connection (one session per TLS connection).
impl Transport for TokioIo<hyper::upgrade::Upgraded> {
    type Read = ReadHalf<Self>;
    type Write = WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// In-memory pipes (tests).
impl Transport for tokio::io::DuplexStream {
    type Read = ReadHalf<Self>;
    type Write = WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<A: Transport, B: Transport> Transport for Either<A, B> {
    type Read = Either<A::Read, B::Read>;
    type Write = Either<A::Write, B::Write>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        match self {
            Either::Left(a) => {
                let (r, w) = a.into_halves();
                (Either::Left(r), Either::Left(w))
            }
            Either::Right(b) => {
                let (r, w) = b.into_halves();
                (Either::Right(r), Either::Right(w))
            }
        }
    }
}

impl<A: ChunkRead, B: ChunkRead> ChunkRead for Either<A, B> {
    fn has_chunks(&self) -> bool {
        match self {
            Either::Left(a) => a.has_chunks(),
            Either::Right(b) => b.has_chunks(),
        }
    }

    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        match self.get_mut() {
            Either::Left(a) => Pin::new(a).poll_chunk(cx),
            Either::Right(b) => Pin::new(b).poll_chunk(cx),
        }
    }

    fn poll_absorb(self: Pin<&mut Self>, cx: &mut Context<'_>) {
        match self.get_mut() {
            Either::Left(a) => Pin::new(a).poll_absorb(cx),
            Either::Right(b) => Pin::new(b).poll_absorb(cx),
        }
    }
}

impl<A: OwnedWrite, B: OwnedWrite> OwnedWrite for Either<A, B> {
    fn poll_write_owned(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(a) => Pin::new(a).poll_write_owned(cx, data),
            Either::Right(b) => Pin::new(b).poll_write_owned(cx, data),
        }
    }
}

/// A WebSocket over the transport `S`, after the handshake.
pub struct WebSocket<S: Transport> {
    sink: WsSink<S::Write>,
    source: WsSource<S::Read>,
}

impl<S: Transport> WebSocket<S> {
    /// `io` as a WebSocket speaking as `role`, accepting messages of at most
    /// `max_message` bytes.
    pub fn new(io: S, role: Role, max_message: usize) -> WebSocket<S> {
        let (r, w) = io.into_halves();
        WebSocket {
            sink: WsSink {
                io: w,
                role,
                out: BytesMut::new(),
                owned: Bytes::new(),
                sent_close: false,
            },
            source: WsSource {
                io: r,
                role,
                max: max_message,
                buf: BytesMut::new(),
                want: 0,
                chunk: Bytes::new(),
                frag: None,
                got_close: false,
            },
        }
    }

    /// The writing and the reading half.
    pub fn split(self) -> (WsSink<S::Write>, WsSource<S::Read>) {
        (self.sink, self.source)
    }

    /// Sends one message (see [`WsSink::send`]).
    pub async fn send(&mut self, msg: Message) -> Result<()> {
        self.sink.send(msg).await
    }

    /// The next message (see [`WsSource::next`]).
    pub async fn next(&mut self) -> Option<Result<Message>> {
        self.source.next().await
    }
}

/// The sending half.
///
/// A send may be cut off mid-frame (its future dropped: a time bound ran out, or the
/// session ended while the transport was full). What the transport has not taken of
/// that frame stays here, in `out` or `owned`, and the next send, or the end of the
/// stream, writes it first: frames stay whole on the wire, so the peer never reads the
/// next frame (an error report, a Close) as the rest of a cut-off one.
pub struct WsSink<W> {
    io: W,
    role: Role,
    out: BytesMut,
    /// The rest of a big frame handed to the transport by value.
    owned: Bytes,
    sent_close: bool,
}

/// The receiving half.
pub struct WsSource<R> {
    io: R,
    role: Role,
    max: usize,
    buf: BytesMut,
    /// Bytes still missing for the frame at the front of `buf`.
    want: usize,
    /// A received chunk whose frames are parsed in place (`buf` is empty meanwhile).
    chunk: Bytes,
    /// A fragmented message being assembled: text or not, and its data so far.
    frag: Option<(bool, BytesMut)>,
    got_close: bool,
}

/// Applies (or removes) a WebSocket mask to a payload that starts at `buf[0]`.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// `payload` as one whole binary frame of `role` (masked for a client), for a message
/// sent before the session's [`WebSocket`] exists (a forward's early data).
pub fn binary_frame(role: Role, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADROOM + payload.len());
    encode(&mut out, role, OpCode::Data(Data::Binary), payload);
    out.freeze()
}

/// Appends `payload` to `out` as one whole frame of `role` (masked for a client).
fn encode(out: &mut BytesMut, role: Role, opcode: OpCode, payload: &[u8]) {
    let header = header_for(role, opcode);
    let len = payload.len() as u64;
    let mut head = [0u8; HEADROOM];
    let hlen = header.len(len);
    // Cannot fail: the header's longest form fits HEADROOM.
    let _ = header.format(len, &mut &mut head[..]);
    out.extend_from_slice(&head[..hlen]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = header.mask {
        apply_mask(&mut out[start..], m);
    }
}

fn header_for(role: Role, opcode: OpCode) -> FrameHeader {
    FrameHeader {
        is_final: true,
        opcode,
        mask: match role {
            // RFC 6455 5.3: a client masks every frame, with a fresh unpredictable key.
            Role::Client => Some(rand::random()),
            Role::Server => None,
        },
        ..FrameHeader::default()
    }
}

impl<W: OwnedWrite> WsSink<W> {
    /// Sends one message (a whole frame) and flushes it.
    pub async fn send(&mut self, msg: Message) -> Result<()> {
        let (opcode, payload) = match msg {
            Message::Binary(b) => (OpCode::Data(Data::Binary), b),
            Message::Text(t) => (OpCode::Data(Data::Text), Bytes::from(t)),
            Message::Ping(p) => (OpCode::Control(Control::Ping), p),
            Message::Pong(p) => (OpCode::Control(Control::Pong), p),
            Message::Close(c) => {
                let mut p = Vec::new();
                if let Some(CloseFrame { code, reason }) = c {
                    p.extend_from_slice(&u16::from(code).to_be_bytes());
                    p.extend_from_slice(reason.as_bytes());
                }
                (OpCode::Control(Control::Close), Bytes::from(p))
            }
            Message::Frame(_) => return Ok(()),
        };
        let closing = opcode == OpCode::Control(Control::Close);
        if self.sent_close {
            return Err(Error::Protocol(ProtocolError::SendAfterClosing));
        }
        self.write_pending().await?;
        self.sent_close = closing;
        self.out.clear();
        encode(&mut self.out, self.role, opcode, &payload);
        let r = if self.out.len() >= OWNED_WRITE_MIN {
            let frame = self.out.split().freeze();
            self.write_owned(frame).await
        } else {
            // From `out`, so that a send cut off here leaves the rest of its frame.
            match self.write_pending().await {
                Ok(()) => self.io.flush().await.map_err(Error::Io),
                Err(e) => Err(e),
            }
        };
        if self.out.is_empty() && self.out.capacity() > KEEP_OUT_BYTES {
            self.out = BytesMut::new();
        }
        r
    }

    /// Writes what a send cut off mid-frame left (in `owned` or `out`), so that frames
    /// stay whole on the wire: the next send, or the end of the stream, writes the rest
    /// first.
    async fn write_pending(&mut self) -> Result<()> {
        if !self.owned.is_empty() {
            let (io, owned) = (&mut self.io, &mut self.owned);
            std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write_owned(cx, owned)).await?;
        }
        while !self.out.is_empty() {
            let n = self.io.write(&self.out).await?;
            if n == 0 {
                return Err(Error::Io(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Ok(())
    }

    /// Sends `buf[HEADROOM..]` as one binary message, writing the frame header into the
    /// headroom and masking in place: no copy of the payload. `buf` is left empty for the
    /// next read (a big frame's buffer goes to the transport by value).
    pub async fn send_framed(&mut self, buf: &mut BytesMut) -> Result<()> {
        if self.sent_close {
            return Err(Error::Protocol(ProtocolError::SendAfterClosing));
        }
        self.write_pending().await?;
        let len = buf.len() - HEADROOM;
        let header = header_for(self.role, OpCode::Data(Data::Binary));
        let hlen = header.len(len as u64);
        let start = HEADROOM - hlen;
        let mut head = [0u8; HEADROOM];
        header.format(len as u64, &mut &mut head[..])?;
        buf[start..HEADROOM].copy_from_slice(&head[..hlen]);
        if let Some(m) = header.mask {
            apply_mask(&mut buf[HEADROOM..], m);
        }
        if buf.len() - start >= OWNED_WRITE_MIN {
            // Big frames go by value; the buffer's next reservation reclaims the
            // allocation once the transport is done with it, or starts a fresh one.
            buf.advance(start);
            return self.write_owned(buf.split().freeze()).await;
        }
        // As much as the transport takes now, straight from `buf`; the rest (if any)
        // into `out` before anything waits, so that a cut-off send leaves it here.
        let (io, out) = (&mut self.io, &mut self.out);
        let mut rest = &buf[start..];
        let now = std::future::poll_fn(|cx| {
            while !rest.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => rest = &rest[n..],
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
                    Poll::Pending => {
                        out.extend_from_slice(rest);
                        rest = &[];
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
        .await;
        buf.clear();
        now?;
        self.write_pending().await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes a whole frame by value and flushes; a cut-off write leaves the rest in
    /// `owned`.
    async fn write_owned(&mut self, frame: Bytes) -> Result<()> {
        self.owned = frame;
        self.write_pending().await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Flushes the transport.
    pub async fn flush(&mut self) -> Result<()> {
        self.io.flush().await.map_err(Error::Io)
    }

    /// Ends the transport's sending side (TLS close_notify, or END_STREAM on an HTTP/2
    /// stream).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.write_pending().await.map_err(|e| match e {
            Error::Io(e) => e,
            e => io::Error::other(e),
        })?;
        self.io.shutdown().await
    }
}

impl<R: ChunkRead> WsSource<R> {
    /// [`ChunkRead::poll_absorb`] on the transport.
    pub fn poll_absorb(&mut self, cx: &mut Context<'_>) {
        Pin::new(&mut self.io).poll_absorb(cx);
    }

    /// The next message; `None` once the peer's Close was received, or when the transport
    /// ended after it.
    pub async fn next(&mut self) -> Option<Result<Message>> {
        if self.got_close {
            return None;
        }
        // Unmasked frames (a client's input) that arrive whole in one of the transport's
        // own buffers go on as slices of it; masked ones need a copy to unmask anyway.
        let chunks = self.role == Role::Client && self.io.has_chunks();
        loop {
            let from_chunk = if self.buf.is_empty() {
                self.parse_chunk()
            } else {
                Ok(None)
            };
            let parsed = match from_chunk {
                Ok(None) => self.parse(),
                other => other,
            };
            match parsed {
                Ok(Some(m)) => return Some(Ok(m)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if chunks {
                match std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_chunk(cx)).await {
                    Ok(Some(c)) if self.buf.is_empty() => self.chunk = c,
                    Ok(Some(c)) => {
                        self.buf.reserve(self.want.min(MAX_RESERVE));
                        self.buf.extend_from_slice(&c);
                    }
                    Ok(None) => {
                        return Some(Err(Error::Protocol(
                            ProtocolError::ResetWithoutClosingHandshake,
                        )))
                    }
                    Err(e) => return Some(Err(Error::Io(e))),
                }
                continue;
            }
            if self.want > 0 {
                let room = self.buf.capacity() - self.buf.len();
                if room < self.want.min(MAX_RESERVE) {
                    self.buf.reserve(self.want.clamp(MIN_READ, MAX_RESERVE));
                }
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Some(Err(Error::Protocol(
                        ProtocolError::ResetWithoutClosingHandshake,
                    )))
                }
                Ok(_) => {}
                Err(e) => return Some(Err(Error::Io(e))),
            }
        }
    }

    /// One complete frame from the received chunk turned into a message, if there is
    /// one; a frame the chunk holds only the start of moves to `buf`. Used in the client
    /// role only, where [`WsSource::check`] refuses masked frames: payloads are slices.
    fn parse_chunk(&mut self) -> Result<Option<Message>> {
        while let Some((header, hlen, end)) = self.frame_head(&self.chunk)? {
            if self.chunk.len() < end {
                break;
            }
            let mut payload = self.chunk.split_to(end);
            payload.advance(hlen);
            if let Some(m) = self.message(header, payload)? {
                return Ok(Some(m));
            }
        }
        self.buf.extend_from_slice(&self.chunk);
        self.chunk.clear();
        Ok(None)
    }

    /// The checked header of the frame at the start of `data` (once `data` holds all of
    /// the header), the header's length and where the frame ends.
    fn frame_head(&self, data: &[u8]) -> Result<Option<(FrameHeader, usize, usize)>> {
        let mut cur = Cursor::new(data);
        let Some((header, len)) = FrameHeader::parse(&mut cur)? else {
            return Ok(None);
        };
        let hlen = cur.position() as usize;
        self.check(&header, len)?;
        Ok(Some((header, hlen, hlen + len as usize)))
    }

    /// Reads the transport to its end, discarding what arrives.
    pub async fn drain(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 1024];
        while self.io.read(&mut scratch).await? > 0 {}
        Ok(())
    }

    /// One complete frame from the buffer turned into a message, if there is one.
    fn parse(&mut self) -> Result<Option<Message>> {
        loop {
            let Some((header, hlen, end)) = self.frame_head(&self.buf)? else {
                self.want = MIN_READ;
                return Ok(None);
            };
            if self.buf.len() < end {
                self.want = end - self.buf.len();
                return Ok(None);
            }
            self.want = 0;
            let mut payload = self.buf.split_to(end);
            payload.advance(hlen);
            if let Some(m) = header.mask {
                apply_mask(&mut payload, m);
            }
            if let Some(m) = self.message(header, payload.freeze())? {
                return Ok(Some(m));
            }
        }
    }

    /// Rejects a frame header before its payload is buffered.
    fn check(&self, h: &FrameHeader, len: u64) -> Result<()> {
        if h.rsv1 || h.rsv2 || h.rsv3 {
            return Err(Error::Protocol(ProtocolError::NonZeroReservedBits));
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => {
                return Err(Error::Protocol(ProtocolError::UnmaskedFrameFromClient))
            }
            (Role::Client, true) => {
                return Err(Error::Protocol(ProtocolError::MaskedFrameFromServer))
            }
            _ => {}
        }
        match h.opcode {
            OpCode::Control(_) => {
                if !h.is_final {
                    return Err(Error::Protocol(ProtocolError::FragmentedControlFrame));
                }
                if len > 125 {
                    return Err(Error::Protocol(ProtocolError::ControlFrameTooBig));
                }
            }
            OpCode::Data(_) => {
                let so_far = self.frag.as_ref().map_or(0, |(_, b)| b.len()) as u64;
                let size = so_far.saturating_add(len);
                if size > self.max as u64 {
                    return Err(Error::Capacity(CapacityError::MessageTooLong {
                        size: usize::try_from(size).unwrap_or(usize::MAX),
                        max_size: self.max,
                    }));
                }
            }
        }
        Ok(())
    }

    fn message(&mut self, h: FrameHeader, payload: Bytes) -> Result<Option<Message>> {
        match h.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Message::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(Some(Message::Pong(payload))),
            OpCode::Control(Control::Close) => {
                let frame = match payload.len() {
                    0 => None,
                    1 => return Err(Error::Protocol(ProtocolError::InvalidCloseSequence)),
                    _ => {
                        let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
                        let reason = utf8(payload.slice(2..))?;
                        Some(if code.is_allowed() {
                            CloseFrame { code, reason }
                        } else {
                            CloseFrame {
                                code: CloseCode::Protocol,
                                reason: Utf8Bytes::from_static("Protocol violation"),
                            }
                        })
                    }
                };
                self.got_close = true;
                Ok(Some(Message::Close(frame)))
            }
            OpCode::Control(Control::Reserved(i)) => {
                Err(Error::Protocol(ProtocolError::UnknownControlFrameType(i)))
            }
            OpCode::Data(d) => {
                let text = match (d, self.frag.as_mut()) {
                    (Data::Continue, None) => {
                        return Err(Error::Protocol(ProtocolError::UnexpectedContinueFrame))
                    }
                    (Data::Continue, Some((_, so_far))) => {
                        so_far.extend_from_slice(&payload);
                        if !h.is_final {
                            return Ok(None);
                        }
                        let (text, data) = self.frag.take().unwrap_or_default();
                        return whole(text, data.freeze()).map(Some);
                    }
                    (_, Some(_)) => {
                        return Err(Error::Protocol(ProtocolError::ExpectedFragment(d)))
                    }
                    (Data::Text, None) => true,
                    (Data::Binary, None) => false,
                    (Data::Reserved(i), None) => {
                        return Err(Error::Protocol(ProtocolError::UnknownDataFrameType(i)))
                    }
                };
                if h.is_final {
                    whole(text, payload).map(Some)
                } else {
                    self.frag = Some((text, BytesMut::from(payload)));
                    Ok(None)
                }
            }
        }
    }
}

fn utf8(b: Bytes) -> Result<Utf8Bytes> {
    Utf8Bytes::try_from(b).map_err(|e| Error::Utf8(e.to_string()))
}

fn whole(text: bool, data: Bytes) -> Result<Message> {
    Ok(if text {
        Message::Text(utf8(data)?)
    } else {
        Message::Binary(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that counts [`ChunkRead::poll_absorb`] calls.
    struct Absorbing(usize);

    impl tokio::io::AsyncRead for Absorbing {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl ChunkRead for Absorbing {
        fn poll_absorb(self: Pin<&mut Self>, _cx: &mut Context<'_>) {
            self.get_mut().0 += 1;
        }
    }

    /// A forward's transport is an `Either` (HTTP/1.1 or HTTP/2): it passes the absorb
    /// on (it ran the empty default, so a forward's sessions never took their frames
    /// out of h2).
    #[test]
    fn either_passes_absorb_on() {
        let waker = futures_util::task::noop_waker();
        let cx = &mut Context::from_waker(&waker);
        for mut e in [Either::Left(Absorbing(0)), Either::Right(Absorbing(0))] {
            Pin::new(&mut e).poll_absorb(cx);
            let (Either::Left(Absorbing(n)) | Either::Right(Absorbing(n))) = e;
            assert_eq!(n, 1);
        }
    }

    async fn pair(
        max: usize,
    ) -> (
        WebSocket<tokio::io::DuplexStream>,
        WebSocket<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            WebSocket::new(a, Role::Client, max),
            WebSocket::new(b, Role::Server, max),
        )
    }

    /// A Pong cut off mid-frame (its time bound ran out while the transport was full)
    /// is finished before the next message: the reader gets both whole.
    #[tokio::test]
    async fn a_send_cut_off_mid_frame_is_finished_before_the_next() {
        let (a, b) = tokio::io::duplex(64);
        let (mut sink, _source) = WebSocket::new(a, Role::Server, 1 << 20).split();
        let mut reader = WebSocket::new(b, Role::Client, 1 << 20);
        let pong = Bytes::from(vec![7u8; 125]);
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            sink.send(Message::Pong(pong.clone())),
        )
        .await;
        assert!(cut.is_err(), "the 127-byte frame fit a 64-byte pipe");
        let read = tokio::spawn(async move {
            let first = reader.next().await;
            let second = reader.next().await;
            (first, second)
        });
        sink.send(Message::Binary(Bytes::from_static(b"after")))
            .await
            .expect("send");
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("read in time")
            .expect("reader");
        assert_eq!(
            first.expect("a message").expect("whole"),
            Message::Pong(pong)
        );
        assert_eq!(
            second.expect("a message").expect("whole"),
            Message::Binary(Bytes::from_static(b"after"))
        );
    }

    /// A binary message cut off mid-frame (the session ended while the transport was
    /// full), big (handed over by value) or small (written from the caller's buffer), is
    /// finished before the Close that follows it: the reader gets the message whole, then
    /// the Close, never the Close's bytes as the rest of the message.
    #[tokio::test]
    async fn a_binary_message_cut_off_mid_frame_is_finished_before_the_close() {
        for len in [40_000usize, 1_000] {
            let (a, b) = tokio::io::duplex(64);
            let (mut sink, _source) = WebSocket::new(a, Role::Server, 1 << 20).split();
            let mut reader = WebSocket::new(b, Role::Client, 1 << 20);
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = BytesMut::zeroed(HEADROOM);
            buf.extend_from_slice(&payload);
            let cut = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                sink.send_framed(&mut buf),
            )
            .await;
            assert!(cut.is_err(), "{len} bytes fit a 64-byte pipe");
            let read = tokio::spawn(async move {
                let first = reader.next().await;
                let second = reader.next().await;
                (first, second)
            });
            let close = Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "draining".into(),
            }));
            sink.send(close.clone()).await.expect("send the Close");
            let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(10), read)
                .await
                .expect("read in time")
                .expect("reader");
            match first.expect("a message").expect("whole") {
                Message::Binary(b) => assert!(b[..] == payload[..], "{len}: the message differs"),
                other => panic!("{len}: {other:?}"),
            }
            assert_eq!(second.expect("a message").expect("whole"), close);
        }
    }

    #[test]
    fn mask_matches_the_bytewise_definition() {
        for len in [0usize, 1, 3, 7, 8, 9, 64, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut fast = data.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[tokio::test]
    async fn messages_cross_both_ways_intact() {
        let (c, s) = pair(1 << 20).await;
        let (mut cs, mut cr) = c.split();
        let (mut ss, mut sr) = s.split();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // A small frame (copied into the transport) and a big one (handed over by value).
        let mut framed = BytesMut::new();
        for part in [&big[..100], &big[..70_000]] {
            framed.resize(HEADROOM, 0);
            framed.extend_from_slice(part);
            cs.send_framed(&mut framed).await.expect("send framed");
            assert!(framed.is_empty());
        }
        cs.send(Message::Binary(Bytes::new())).await.expect("empty");
        cs.send(Message::text("{\"type\":\"eof\"}"))
            .await
            .expect("text");
        ss.send(Message::Binary(Bytes::from(big[..300_000].to_vec())))
            .await
            .expect("big");
        for want in [&big[..100], &big[..70_000]] {
            match sr.next().await {
                Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], want),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(sr.next().await, Some(Ok(Message::Binary(b))) if b.is_empty()));
        assert!(
            matches!(sr.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "{\"type\":\"eof\"}")
        );
        match cr.next().await {
            Some(Ok(Message::Binary(b))) => assert!(b[..] == big[..]),
            other => panic!("{other:?}"),
        }
        ss.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        })))
        .await
        .expect("close");
        assert!(
            ss.send(Message::Ping(Bytes::new())).await.is_err(),
            "send after close"
        );
        match cr.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Normal);
                assert_eq!(f.reason.as_str(), "done");
            }
            other => panic!("{other:?}"),
        }
        assert!(cr.next().await.is_none(), "nothing after Close");
        // Ending the transport: each side's shutdown is the other's end of input.
        cs.shutdown().await.expect("client shutdown");
        ss.shutdown().await.expect("server shutdown");
        cr.drain().await.expect("client drain");
        sr.drain().await.expect("server drain");
    }

    /// Raw frames against a server-side source: each must fail the way tungstenite did.
    async fn server_reads(raw: &[u8], max: usize) -> Option<Result<Message>> {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(raw).await.expect("write");
        drop(a);
        let (_, mut r) = WebSocket::new(b, Role::Server, max).split();
        r.next().await
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut v = vec![first];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask);
        v.extend_from_slice(&p);
        v
    }

    #[tokio::test]
    async fn bad_frames_are_protocol_errors() {
        use ProtocolError as P;
        type Check = fn(&Error) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (vec![0x82, 0x01, b'x'], |e| {
                matches!(e, Error::Protocol(P::UnmaskedFrameFromClient))
            }),
            (masked(0xC2, b"x"), |e| {
                matches!(e, Error::Protocol(P::NonZeroReservedBits))
            }),
            (masked(0x83, b"x"), |e| {
                matches!(e, Error::Protocol(P::InvalidOpcode(3)))
            }),
            (masked(0x8B, b"x"), |e| {
                matches!(e, Error::Protocol(P::InvalidOpcode(11)))
            }),
            (masked(0x80, b"x"), |e| {
                matches!(e, Error::Protocol(P::UnexpectedContinueFrame))
            }),
            (masked(0x09, b"x"), |e| {
                matches!(e, Error::Protocol(P::FragmentedControlFrame))
            }),
            (masked(0x89, &[0u8; 126]), |e| {
                matches!(e, Error::Protocol(P::ControlFrameTooBig))
            }),
            (masked(0x88, b"x"), |e| {
                matches!(e, Error::Protocol(P::InvalidCloseSequence))
            }),
            (masked(0x81, &[0xff, 0xfe]), |e| matches!(e, Error::Utf8(_))),
            (masked(0x82, &[7u8; 200]), |e| {
                matches!(
                    e,
                    Error::Capacity(CapacityError::MessageTooLong {
                        size: 200,
                        max_size: 100
                    })
                )
            }),
            (
                [masked(0x02, &[1u8; 60]), masked(0x80, &[2u8; 60])].concat(),
                |e| {
                    matches!(
                        e,
                        Error::Capacity(CapacityError::MessageTooLong {
                            size: 120,
                            max_size: 100
                        })
                    )
                },
            ),
            ([masked(0x02, b"ab"), masked(0x82, b"cd")].concat(), |e| {
                matches!(e, Error::Protocol(P::ExpectedFragment(Data::Binary)))
            }),
            (masked(0x82, b"abc")[..5].to_vec(), |e| {
                matches!(e, Error::Protocol(P::ResetWithoutClosingHandshake))
            }),
        ];
        for (i, (raw, ok)) in cases.iter().enumerate() {
            match server_reads(raw, 100).await {
                Some(Err(e)) => assert!(ok(&e), "case {i}: {e:?}"),
                other => panic!("case {i}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn fragments_interleaved_with_control_frames_assemble() {
        let raw = [
            masked(0x01, "héllo ".as_bytes()),
            masked(0x89, b"p"),
            masked(0x80, "wörld".as_bytes()),
        ]
        .concat();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&raw).await.expect("write");
        let (_, mut r) = WebSocket::new(b, Role::Server, 100).split();
        assert!(matches!(r.next().await, Some(Ok(Message::Ping(p))) if &p[..] == b"p"));
        assert!(
            matches!(r.next().await, Some(Ok(Message::Text(t))) if t.as_str() == "héllo wörld")
        );
        // A close code nobody may send becomes 1002, as tungstenite reported it.
        a.write_all(&masked(0x88, &1005u16.to_be_bytes()))
            .await
            .expect("write");
        assert!(matches!(
            r.next().await,
            Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::Protocol
        ));
    }

    #[tokio::test]
    async fn a_client_rejects_masked_frames() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&masked(0x82, b"x")).await.expect("write");
        let (_, mut r) = WebSocket::new(b, Role::Client, 100).split();
        assert!(matches!(
            r.next().await,
            Some(Err(Error::Protocol(ProtocolError::MaskedFrameFromServer)))
        ));
    }

    /// A transport that receives in buffers of its own (like an HTTP/2 stream), cut
    /// where the test says.
    struct Chunked(std::collections::VecDeque<Bytes>);

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(front) = self.0.front_mut() {
                let n = front.len().min(out.remaining());
                out.put_slice(&front.split_to(n));
                if front.is_empty() {
                    self.0.pop_front();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl ChunkRead for Chunked {
        fn has_chunks(&self) -> bool {
            true
        }
        fn poll_chunk(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<io::Result<Option<Bytes>>> {
            Poll::Ready(Ok(self.0.pop_front()))
        }
    }

    impl OwnedWrite for tokio::io::Sink {}

    impl Transport for Chunked {
        type Read = Chunked;
        type Write = tokio::io::Sink;
        fn into_halves(self) -> (Chunked, tokio::io::Sink) {
            (self, tokio::io::sink())
        }
    }

    fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![first];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 0xffff => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    /// A client's source taking the transport's own buffers: frames whole in a buffer,
    /// frames cut anywhere across buffers, and several frames in one buffer all come
    /// out intact and in order.
    #[tokio::test]
    async fn frames_from_received_buffers_come_out_intact_however_they_are_cut() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let frames = [
            unmasked(0x82, b"first"),
            unmasked(0x81, b"{\"type\":\"eof\"}"),
            unmasked(0x82, &big),
            unmasked(0x02, b"frag-"),
            unmasked(0x89, b"ping"),
            unmasked(0x80, b"ment"),
            unmasked(0x82, b""),
            unmasked(0x88, &1000u16.to_be_bytes()),
        ];
        let raw = frames.concat();
        let cuts: [&[usize]; 5] = [
            &[],
            &[1],
            &[frames[0].len(), frames[0].len() + frames[1].len() + 3],
            &[2, 9, 100, 40_000, 70_030, 70_045, 70_046],
            &[raw.len() - 1],
        ];
        for cut in cuts {
            let mut chunks = std::collections::VecDeque::new();
            let mut at = 0;
            for &c in cut.iter().chain(std::iter::once(&raw.len())) {
                chunks.push_back(Bytes::copy_from_slice(&raw[at..c]));
                at = c;
            }
            let (_, mut r) = WebSocket::new(Chunked(chunks), Role::Client, 1 << 20).split();
            let mut got = Vec::new();
            while let Some(m) = r.next().await {
                got.push(m.unwrap_or_else(|e| panic!("cut {cut:?}: {e}")));
            }
            let want = vec![
                Message::Binary(Bytes::from_static(b"first")),
                Message::text("{\"type\":\"eof\"}"),
                Message::Binary(Bytes::from(big.clone())),
                Message::Ping(Bytes::from_static(b"ping")),
                Message::Binary(Bytes::from_static(b"frag-ment")),
                Message::Binary(Bytes::new()),
                Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })),
            ];
            assert_eq!(got, want, "cut {cut:?}");
        }
        // A masked frame from the server is refused on this path too, and a stream that
        // ends inside a frame is a reset.
        let chunks = [Bytes::from(masked(0x82, b"x"))].into();
        let (_, mut r) = WebSocket::new(Chunked(chunks), Role::Client, 100).split();
        assert!(matches!(
            r.next().await,
            Some(Err(Error::Protocol(ProtocolError::MaskedFrameFromServer)))
        ));
        let chunks = [Bytes::copy_from_slice(&unmasked(0x82, b"cut short")[..5])].into();
        let (_, mut r) = WebSocket::new(Chunked(chunks), Role::Client, 100).split();
        assert!(matches!(
            r.next().await,
            Some(Err(Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )))
        ));
    }
}
