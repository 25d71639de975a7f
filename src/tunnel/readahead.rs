//! Reads under TLS in big chunks while data streams in.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs four
//! or five `recv` calls: in a bulk transfer the receiving gateway made about seven
//! `recvfrom` per `sendto` (`strace -c`, BENCHMARKS.md). [`ReadAhead`] sits between
//! rustls and the TCP socket: while reads keep filling what was asked for (so more is
//! waiting in the socket), it reads up to [`READ_AHEAD_BYTES`] at once into a buffer of
//! its own and serves rustls from it; once a read comes back short or has to wait (the
//! reader caught up with the peer) it drops the buffer and reads straight into the
//! caller's buffer again, so a connection waiting for data holds no buffer. Writes pass
//! through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes from the socket while data streams in (also the buffer's size,
/// held only while it does).
pub const READ_AHEAD_BYTES: usize = 64 << 10;

/// An I/O object whose reads are batched while data streams in (module docs).
pub struct ReadAhead<T> {
    io: T,
    /// Bytes read from the socket and not yet handed out; no allocation while reads go
    /// straight to the caller.
    buf: BytesMut,
    /// Whether the last direct read filled the caller's buffer: read ahead next time.
    ahead: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps `io`; no buffer is held until data streams in.
    pub fn new(io: T) -> ReadAhead<T> {
        ReadAhead {
            io,
            buf: BytesMut::new(),
            ahead: false,
        }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Back to direct reads, holding no buffer (nothing is buffered when this is called).
    fn quiet(&mut self) {
        self.buf = BytesMut::new();
        self.ahead = false;
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ReadAhead<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("io", &self.io)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let r = self.read_into(cx, out);
        if out.filled().len() > before {
            crate::shard::note_traffic();
        }
        r
    }
}

impl<T: AsyncRead + Unpin> ReadAhead<T> {
    /// [`AsyncRead::poll_read`], batched (module docs).
    fn read_into(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() && out.remaining() > 0 {
            let wanted = out.remaining();
            if !self.ahead {
                // Straight into the caller's buffer; a read that fills it says more is
                // probably waiting, so the next one goes through a buffer of our own.
                let before = out.filled().len();
                let r = Pin::new(&mut self.io).poll_read(cx, out);
                if let Poll::Ready(Ok(())) = r {
                    self.ahead = out.filled().len() - before == wanted && wanted < READ_AHEAD_BYTES;
                }
                return r;
            }
            // Reserving on an empty buffer reuses its allocation once nothing else holds it.
            self.buf.reserve(READ_AHEAD_BYTES);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Ready(Ok(n)) if n > wanted => crate::shard::note_streaming(),
                Poll::Ready(Ok(_)) => {
                    // No more than a direct read would have got (or the end of the
                    // stream): the stream has gone quiet.
                    out.put_slice(&self.buf);
                    self.quiet();
                    return Poll::Ready(Ok(()));
                }
                // Caught up with the socket: hold no buffer while waiting (it may be a
                // long wait), but read ahead again when data comes: it is likely the rest
                // of a stream, and a small message then ends read-ahead (above).
                Poll::Pending => {
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    self.quiet();
                    return Poll::Ready(Err(e));
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads everything from `r` in `chunk`-byte reads, counting how many bytes each got.
    async fn drain<R: AsyncRead + Unpin>(r: &mut R, chunk: usize) -> (Vec<u8>, Vec<usize>) {
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        let mut b = vec![0u8; chunk];
        for _ in 0..100_000 {
            let n = r.read(&mut b).await.unwrap();
            if n == 0 {
                return (all, sizes);
            }
            sizes.push(n);
            all.extend_from_slice(&b[..n]);
        }
        panic!("no end of stream after 100,000 reads");
    }

    #[tokio::test]
    async fn streams_every_byte_in_order_and_batches_only_while_data_is_waiting() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // All of it waits in the pipe before the first read, then the writer closes.
        tx.write_all(&data).await.unwrap();
        drop(tx);
        let mut r = ReadAhead::new(rx);
        let (got, sizes) = drain(&mut r, 4096).await;
        assert_eq!(got, data, "bytes lost or reordered");
        // Every read is served whole, and the buffer was used (the duplex has it all).
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n == 4096),
            "{sizes:?}"
        );
        assert!(
            r.buf.capacity() == 0 && !r.ahead,
            "the end of the stream drops the buffer"
        );
    }

    #[tokio::test]
    async fn a_quiet_stream_gives_its_buffer_back() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(rx);
        let mut b = vec![0u8; 4096];
        // A burst that fills the first read: the next read goes through the buffer.
        tx.write_all(&[1u8; 10_000]).await.unwrap();
        assert_eq!(r.read(&mut b).await.unwrap(), 4096);
        assert!(r.ahead, "a full read switches to read-ahead");
        assert_eq!(r.read(&mut b).await.unwrap(), 4096);
        assert_eq!(
            r.buf.len(),
            10_000 - 8192,
            "the rest was read ahead at once"
        );
        assert_eq!(r.read(&mut b).await.unwrap(), 10_000 - 8192);
        // The burst is used up and nothing more is waiting: the read is pending, and the
        // connection holds no buffer while it waits.
        let mut rb = ReadBuf::new(&mut b);
        let waker = std::task::Waker::noop();
        let pending = Pin::new(&mut r).poll_read(&mut Context::from_waker(waker), &mut rb);
        assert!(pending.is_pending());
        assert_eq!(r.buf.capacity(), 0, "a waiting read drops the buffer");
        // A small message then comes in alone: read-ahead ends.
        tx.write_all(b"ping").await.unwrap();
        assert_eq!(r.read(&mut b).await.unwrap(), 4);
        assert_eq!(&b[..4], b"ping");
        assert!(r.buf.capacity() == 0 && !r.ahead);
        // A burst after a full direct read, cut short: the short read drops it too.
        tx.write_all(&[2u8; 4096 + 100]).await.unwrap();
        assert_eq!(r.read(&mut b).await.unwrap(), 4096);
        assert_eq!(r.read(&mut b).await.unwrap(), 100);
        assert!(
            r.buf.capacity() == 0 && !r.ahead,
            "a short read drops the buffer"
        );
        // And writes pass through.
        let (mut a, b2) = tokio::io::duplex(64);
        let mut w = ReadAhead::new(b2);
        w.write_all(b"out").await.unwrap();
        let mut three = [0u8; 3];
        a.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"out");
        drop(tx);
        assert_eq!(
            r.read(&mut b).await.unwrap(),
            0,
            "end of stream after the data"
        );
    }
}
