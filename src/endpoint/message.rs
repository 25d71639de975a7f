//! Message-mode local I/O: a reader yields whole messages, a writer takes whole messages.
//! Kinds: a SOCK_SEQPACKET socket (one record = one message) and stdio framed as lines
//! or as 4-byte big-endian length prefixes (`connect --mode message --framing ...`).

use std::io;
#[cfg(unix)]
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
#[cfg(unix)]
use tokio_seqpacket::UnixSeqpacket;

use super::{BoxRead, BoxWrite};

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MsgError {
    /// A message exceeded the limit; nothing of it is delivered.
    #[error("a message of {size} bytes exceeds the limit of {max} bytes")]
    TooBig {
        /// Its size (at least this big).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// I/O failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads whole messages from a local endpoint.
pub enum MsgReader {
    /// A Windows named pipe in message mode (zero-length messages included).
    #[cfg(windows)]
    Npipe(super::windows::MsgIn),
    /// SOCK_SEQPACKET: a zero-length record reads like EOF on Linux and is taken as EOF.
    #[cfg(unix)]
    Seqpacket {
        /// The socket (shared with the writer half).
        sock: Arc<UnixSeqpacket>,
        /// Largest message accepted.
        max: usize,
    },
    /// One message per line (the newline is not part of the message).
    Lines {
        /// Buffered input.
        input: BufReader<BoxRead>,
        /// Largest message accepted.
        max: usize,
    },
    /// A 4-byte big-endian length, then that many bytes.
    U32be {
        /// Input.
        input: BoxRead,
        /// Largest message accepted.
        max: usize,
    },
    /// A message already taken from the endpoint (a forward's caller's first, read early),
    /// then the endpoint's own.
    Prepended {
        /// The message still to deliver first.
        first: Option<Bytes>,
        /// The endpoint.
        rest: Box<MsgReader>,
    },
    /// Messages read and dropped, for a session that carries nothing from this side
    /// ([`super::Local::discard_input`]): ends when its source does.
    Discard(Box<MsgReader>),
}

impl MsgReader {
    /// The next message, or `None` at EOF.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, MsgError> {
        // A prepended message is delivered once; the endpoint's own reader then takes
        // this one's place (a placeholder that allocates nothing fills the gap).
        while let MsgReader::Prepended { first, rest } = self {
            let first = first.take();
            let placeholder = MsgReader::U32be {
                input: Box::new(tokio::io::empty()),
                max: 0,
            };
            let inner = std::mem::replace(&mut **rest, placeholder);
            *self = inner;
            if let Some(m) = first {
                return Ok(Some(m));
            }
        }
        match self {
            // Unwrapped above.
            MsgReader::Prepended { .. } => Ok(None),
            MsgReader::Discard(inner) => discard(inner).await,
            #[cfg(windows)]
            MsgReader::Npipe(p) => p.recv().await,
            #[cfg(unix)]
            MsgReader::Seqpacket { sock, max } => {
                let len = peek_len(sock).await?;
                if len == 0 {
                    // Consume it: EOF and an empty record look the same here.
                    let _ = sock.recv(&mut [0u8; 1]).await?;
                    return Ok(None);
                }
                if len > *max {
                    return Err(MsgError::TooBig {
                        size: len,
                        max: *max,
                    });
                }
                let mut buf = BytesMut::zeroed(len);
                let info = sock.recv(&mut buf).await?;
                if info.truncated() {
                    return Err(MsgError::TooBig {
                        size: len + 1,
                        max: *max,
                    });
                }
                buf.truncate(info.bytes_read());
                Ok(Some(buf.freeze()))
            }
            MsgReader::Lines { input, max } => {
                let mut line = Vec::new();
                let n = (&mut *input)
                    .take(*max as u64 + 2)
                    .read_until(b'\n', &mut line)
                    .await?;
                if n == 0 {
                    return Ok(None);
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                } else if line.len() > *max {
                    return Err(MsgError::TooBig {
                        size: line.len(),
                        max: *max,
                    });
                }
                if line.len() > *max {
                    return Err(MsgError::TooBig {
                        size: line.len(),
                        max: *max,
                    });
                }
                Ok(Some(Bytes::from(line)))
            }
            MsgReader::U32be { input, max } => {
                let mut hdr = [0u8; 4];
                let mut got = 0;
                while got < 4 {
                    let n = input.read(&mut hdr[got..]).await?;
                    if n == 0 {
                        if got == 0 {
                            return Ok(None);
                        }
                        return Err(MsgError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "input ended inside a length prefix",
                        )));
                    }
                    got += n;
                }
                let len = u32::from_be_bytes(hdr) as usize;
                if len > *max {
                    return Err(MsgError::TooBig {
                        size: len,
                        max: *max,
                    });
                }
                let mut buf = BytesMut::zeroed(len);
                input.read_exact(&mut buf).await?;
                Ok(Some(buf.freeze()))
            }
        }
    }
}

/// Reads `inner`'s messages and drops them, until its end ([`MsgReader::Discard`]).
async fn discard(inner: &mut MsgReader) -> Result<Option<Bytes>, MsgError> {
    loop {
        // A record is consumed whole whatever its size (the kernel drops what does not
        // fit), so one over the limit is dropped too, not left in place.
        #[cfg(unix)]
        if let MsgReader::Seqpacket { sock, .. } = inner {
            if sock.recv(&mut [0u8; 1]).await?.bytes_read() == 0 {
                return Ok(None);
            }
            continue;
        }
        match Box::pin(inner.recv()).await {
            Ok(None) => return Ok(None),
            Ok(Some(_)) | Err(MsgError::TooBig { .. }) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The size of the next seqpacket record without consuming it (MSG_PEEK|MSG_TRUNC).
#[cfg(unix)]
async fn peek_len(sock: &UnixSeqpacket) -> io::Result<usize> {
    use rustix::net::RecvFlags;
    loop {
        let mut guard = sock.as_async_fd().readable().await?;
        let r = guard.try_io(|fd| {
            rustix::net::recv(
                fd,
                &mut [0u8; 0][..],
                RecvFlags::PEEK | RecvFlags::TRUNC | RecvFlags::DONTWAIT,
            )
            .map(|(_, len)| len)
            .map_err(io::Error::from)
        });
        match r {
            Ok(res) => return res,
            Err(_would_block) => continue,
        }
    }
}

/// Writes whole messages to a local endpoint.
pub enum MsgWriter {
    /// A Windows named pipe in message mode.
    #[cfg(windows)]
    Npipe(super::windows::MsgOut),
    /// SOCK_SEQPACKET. Zero-length messages are dropped: the reader would take them for EOF.
    #[cfg(unix)]
    Seqpacket {
        /// The socket (shared with the reader).
        sock: Arc<UnixSeqpacket>,
        /// Sends still go straight to the socket: until one would block
        /// ([`super::eager::send_record`]).
        direct: bool,
    },
    /// One message per line.
    Lines(BoxWrite),
    /// 4-byte big-endian length prefix.
    U32be(BoxWrite),
}

impl MsgWriter {
    /// Writes one message.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            #[cfg(windows)]
            MsgWriter::Npipe(p) => p.send(data).await,
            #[cfg(unix)]
            MsgWriter::Seqpacket { sock, direct } => {
                if data.is_empty() {
                    tracing::debug!(
                        "dropping a zero-length message: a seqpacket reader would see EOF"
                    );
                    return Ok(());
                }
                let n = super::eager::send_record(sock, direct, data).await?;
                if n != data.len() {
                    return Err(io::Error::other("seqpacket record was cut short"));
                }
                Ok(())
            }
            MsgWriter::Lines(w) => {
                w.write_all(data).await?;
                w.write_all(b"\n").await
            }
            MsgWriter::U32be(w) => {
                let len = u32::try_from(data.len())
                    .map_err(|_| io::Error::other("message too long for u32be framing"))?;
                w.write_all(&len.to_be_bytes()).await?;
                w.write_all(data).await
            }
        }
    }

    /// Half-closes (no more messages).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            #[cfg(windows)]
            MsgWriter::Npipe(p) => p.shutdown().await,
            #[cfg(unix)]
            MsgWriter::Seqpacket { sock, .. } => match sock.shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                r => r,
            },
            MsgWriter::Lines(w) | MsgWriter::U32be(w) => {
                w.flush().await?;
                w.shutdown().await
            }
        }
    }

    /// Flushes buffered output.
    pub async fn flush(&mut self) -> io::Result<()> {
        match self {
            #[cfg(windows)]
            MsgWriter::Npipe(p) => p.flush().await,
            #[cfg(unix)]
            MsgWriter::Seqpacket { .. } => Ok(()),
            MsgWriter::Lines(w) | MsgWriter::U32be(w) => w.flush().await,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn reader(sock: UnixSeqpacket, max: usize) -> MsgReader {
        MsgReader::Seqpacket {
            sock: Arc::new(sock),
            max,
        }
    }

    #[tokio::test]
    async fn records_come_whole_in_order_at_their_own_size() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let sizes = [1usize, 100, 4096, 65_536, 150_000, 7];
        let mut r = reader(b, 150_000);
        for (i, &n) in sizes.iter().enumerate() {
            let rec: Vec<u8> = (0..n).map(|k| (k * 31 + i) as u8).collect();
            assert_eq!(a.send(&rec).await.unwrap(), n);
            let got = r.recv().await.unwrap().expect("a record");
            assert_eq!(got.len(), n, "record {i}");
            assert_eq!(&got[..], &rec[..], "record {i}");
        }
        drop(a);
        assert!(r.recv().await.unwrap().is_none(), "EOF");
    }

    #[tokio::test]
    async fn a_record_over_the_limit_is_refused_with_its_size() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let mut r = reader(b, 1000);
        a.send(&[7u8; 1000]).await.unwrap();
        a.send(&[8u8; 1001]).await.unwrap();
        assert_eq!(r.recv().await.unwrap().unwrap().len(), 1000, "at the limit");
        match r.recv().await {
            Err(MsgError::TooBig { size, max }) => assert_eq!((size, max), (1001, 1000)),
            other => panic!("expected TooBig, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_empty_record_reads_as_eof() {
        let (a, b) = UnixSeqpacket::pair().unwrap();
        let mut r = reader(b, 1000);
        a.send(b"x").await.unwrap();
        a.send(b"").await.unwrap();
        assert_eq!(&r.recv().await.unwrap().unwrap()[..], b"x");
        assert!(r.recv().await.unwrap().is_none(), "an empty record is EOF");
    }
}
