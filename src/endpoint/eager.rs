//! Writes to a just-opened local endpoint that go out at once.
//!
//! tokio learns a newly registered descriptor's writability only from the next turn of
//! the event loop, so a session's first bytes for its target (the caller's request,
//! which came with the stream's open) waited for that turn, and the gateway's response
//! to the open was encrypted and sent first. A non-blocking write is correct whatever
//! tokio knows; once one would block, tokio takes over for good (its readiness is current
//! after its own first attempt), so a session pays at most two extra system calls for
//! it. Every descriptor here is non-blocking: the sockets are created so
//! (`SOCK_NONBLOCK`: this crate's connects and accepts, and tokio-seqpacket's), and tokio
//! sets `O_NONBLOCK` on the pipes it takes (a child's stdin, a FIFO opened by path or
//! from a descriptor).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// A writer that can also write straight to its descriptor without waiting.
pub trait WriteNow: AsyncWrite + Unpin {
    /// One non-blocking write (`EAGAIN` when the descriptor is full).
    fn write_now(&self, buf: &[u8]) -> rustix::io::Result<usize>;
}

impl WriteNow for tokio::net::unix::OwnedWriteHalf {
    fn write_now(&self, buf: &[u8]) -> rustix::io::Result<usize> {
        let sock: &tokio::net::UnixStream = self.as_ref();
        rustix::net::send(sock, buf, rustix::net::SendFlags::NOSIGNAL)
    }
}

impl WriteNow for tokio::net::unix::pipe::Sender {
    fn write_now(&self, buf: &[u8]) -> rustix::io::Result<usize> {
        rustix::io::write(self, buf)
    }
}

impl WriteNow for tokio::process::ChildStdin {
    fn write_now(&self, buf: &[u8]) -> rustix::io::Result<usize> {
        rustix::io::write(self, buf)
    }
}

/// The write half of a just-opened endpoint, whose writes go straight to the descriptor
/// until one would block.
pub struct EagerWrite<W> {
    inner: W,
    /// Writes still bypass tokio's readiness.
    direct: bool,
}

impl<W: WriteNow> EagerWrite<W> {
    /// Wraps a writer opened just now.
    pub fn new(inner: W) -> EagerWrite<W> {
        EagerWrite {
            inner,
            direct: true,
        }
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: WriteNow> AsyncWrite for EagerWrite<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let inner = &this.inner;
        if let Some(r) = direct_write(&mut this.direct, || inner.write_now(buf)) {
            return Poll::Ready(r);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// While `direct`, one `write` straight to the descriptor: its result, or `None` (and
/// `direct` cleared for good) when it would block, for tokio to take over.
fn direct_write(
    direct: &mut bool,
    write: impl FnOnce() -> rustix::io::Result<usize>,
) -> Option<io::Result<usize>> {
    if !*direct {
        return None;
    }
    match write() {
        Err(rustix::io::Errno::AGAIN) => {
            *direct = false;
            None
        }
        r => Some(r.map_err(io::Error::from)),
    }
}

/// Sends one seqpacket message: straight to the socket while `direct` (cleared by the
/// first send that would block), else through tokio's readiness.
pub async fn send_record(
    sock: &tokio_seqpacket::UnixSeqpacket,
    direct: &mut bool,
    data: &[u8],
) -> io::Result<usize> {
    use rustix::net::SendFlags;
    // As tokio-seqpacket's own send: each send one record.
    let now = || rustix::net::send(sock, data, SendFlags::NOSIGNAL | SendFlags::EOR);
    match direct_write(direct, now) {
        Some(r) => r,
        None => sock.send(data).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::io::Read;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    fn pair() -> (std::os::unix::net::UnixStream, UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, UnixStream::from_std(b).unwrap())
    }

    /// A pipe's ends: a blocking std reader and a tokio sender.
    fn pipe() -> (std::fs::File, tokio::net::unix::pipe::Sender) {
        let (r, w) = rustix::pipe::pipe().unwrap();
        (
            std::fs::File::from(r),
            tokio::net::unix::pipe::Sender::from_owned_fd(w).unwrap(),
        )
    }

    /// Polls one write of `data` without a turn of the event loop; expects all of it.
    fn write_at_once<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) {
        let cx = &mut Context::from_waker(Waker::noop());
        match Pin::new(w).poll_write(cx, data) {
            Poll::Ready(Ok(n)) if n == data.len() => {}
            other => panic!(
                "expected {} bytes written at once, got {other:?}",
                data.len()
            ),
        }
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
        write_at_once(&mut w, b"request");
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"request");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pipes_and_a_childs_stdin_take_the_first_write_at_once() {
        let cx = &mut Context::from_waker(Waker::noop());
        // A pipe (a FIFO's write end is one): tokio's own sender waits for a turn.
        let (_r, mut tx) = pipe();
        assert!(Pin::new(&mut tx).poll_write(cx, b"x").is_pending());
        let (mut rx, tx) = pipe();
        let mut w = EagerWrite::new(tx);
        write_at_once(&mut w, b"to the fifo");
        let mut got = [0u8; 11];
        rx.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the fifo");
        // A child's stdin, read back from its stdout.
        let mut child = tokio::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut w = EagerWrite::new(child.stdin.take().unwrap());
        write_at_once(&mut w, b"to the child");
        w.shutdown().await.unwrap();
        drop(w);
        let out =
            tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
                .await
                .expect("cat ends")
                .unwrap();
        assert_eq!(out.stdout, b"to the child");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_seqpacket_record_goes_out_at_once_then_through_tokio_when_full() {
        // tokio-seqpacket's own send waits for a turn of the event loop...
        let (a, _b) = tokio_seqpacket::UnixSeqpacket::pair().unwrap();
        let own = std::pin::pin!(a.send(b"x")).poll(&mut Context::from_waker(Waker::noop()));
        assert!(own.is_pending(), "{own:?}");
        // ...a record sent here goes out at once.
        let (a, b) = tokio_seqpacket::UnixSeqpacket::pair().unwrap();
        let mut direct = true;
        let sent = {
            let fut = std::pin::pin!(send_record(&a, &mut direct, b"first"));
            fut.poll(&mut Context::from_waker(Waker::noop()))
        };
        assert!(matches!(sent, Poll::Ready(Ok(5))), "{sent:?}");
        // Fill the socket until a send would block: the hand-over to tokio.
        let record = vec![7u8; 4096];
        let mut queued = 0;
        for _ in 0..100_000 {
            let fut = std::pin::pin!(send_record(&a, &mut direct, &record));
            match fut.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(4096)) => queued += 1,
                Poll::Ready(other) => panic!("send: {other:?}"),
                Poll::Pending => break,
            }
        }
        assert!(!direct, "a full socket hands over to tokio");
        // A reader takes every record, boundaries kept, and the last goes through tokio.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let n = b.recv(&mut buf).await.unwrap().bytes_read();
            assert_eq!(&buf[..n], b"first");
            for _ in 0..queued {
                assert_eq!(b.recv(&mut buf).await.unwrap().bytes_read(), 4096);
            }
            let n = b.recv(&mut buf).await.unwrap().bytes_read();
            buf[..n].to_vec()
        });
        let n = send_record(&a, &mut direct, b"last").await.unwrap();
        assert_eq!(n, 4);
        assert_eq!(reader.await.unwrap(), b"last");
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
        // And a pipe whose reader is gone.
        let (rx, tx) = pipe();
        let mut w = EagerWrite::new(tx);
        drop(rx);
        let e = w.write_all(b"late").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
}
