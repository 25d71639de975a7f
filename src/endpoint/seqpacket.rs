//! `seqpacket:` endpoints: Unix SOCK_SEQPACKET sockets, message mode. The kernel caps one
//! record by the sender's send buffer, so every socket the gateway sends on gets a send
//! buffer that fits the pipe's `max_message_size`. `auto` is the largest record the kernel
//! accepts without privileges (probed once: twice `net.core.wmem_max`, less overhead);
//! larger explicit limits need SO_SNDBUFFORCE (CAP_NET_ADMIN), checked at start.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokio_seqpacket::UnixSeqpacket;

use super::message::{MsgReader, MsgWriter};
use super::{Local, OpenContext, OpenError, Reader, Writer};

/// Slack added to send buffers beyond the message size (skb overhead).
const SNDBUF_SLACK_BYTES: usize = 4096;

/// The largest record an unprivileged socket can send (probed once).
pub fn auto_max_message() -> usize {
    static AUTO: OnceLock<usize> = OnceLock::new();
    *AUTO.get_or_init(|| probe().unwrap_or(212_960))
}

fn probe() -> io::Result<usize> {
    use rustix::net::{sockopt, AddressFamily, SendFlags, SocketFlags, SocketType};
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let wmem_max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(212_992);
    sockopt::set_socket_send_buffer_size(&a, wmem_max)?;
    let cap = sockopt::socket_send_buffer_size(&a)?;
    let buf = vec![0u8; cap];
    let mut sink = vec![0u8; cap];
    let (mut lo, mut hi) = (1usize, cap);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match rustix::net::send(&a, &buf[..mid], SendFlags::DONTWAIT) {
            Ok(_) => {
                let _ = rustix::net::recv(&b, &mut sink[..], rustix::net::RecvFlags::DONTWAIT);
                lo = mid;
            }
            Err(_) => hi = mid - 1,
        }
    }
    Ok(lo)
}

/// Checks at start that messages of `max` bytes can be sent (SO_SNDBUFFORCE beyond `auto`).
pub fn check_limit(max: usize) -> Result<(), String> {
    if max <= auto_max_message() {
        return Ok(());
    }
    let (a, _b) = UnixSeqpacket::pair().map_err(|e| e.to_string())?;
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&a, max + SNDBUF_SLACK_BYTES)
        .is_err()
    {
        return Err(format!(
            "max_message_size {max} exceeds {} bytes, the largest seqpacket record this kernel allows without CAP_NET_ADMIN; raise the sysctl net.core.wmem_max to at least {} or lower max_message_size",
            auto_max_message(),
            max / 2 + SNDBUF_SLACK_BYTES
        ));
    }
    Ok(())
}

/// Sizes `sock`'s send buffer so that records of `max` bytes fit.
pub fn size_send_buffer(sock: &UnixSeqpacket, max: usize) -> io::Result<()> {
    use rustix::net::sockopt;
    let want = max + SNDBUF_SLACK_BYTES;
    if max > auto_max_message() {
        sockopt::set_socket_send_buffer_size_force(sock, want)?;
    } else {
        // The kernel doubles the value and caps it at 2 * wmem_max.
        sockopt::set_socket_send_buffer_size(sock, want)?;
    }
    Ok(())
}

/// Wraps a connected seqpacket socket as a message-mode [`Local`].
pub fn local(sock: UnixSeqpacket, max: usize, reads: bool, writes: bool) -> io::Result<Local> {
    size_send_buffer(&sock, max)?;
    let sock = Arc::new(sock);
    Ok(Local {
        reader: reads.then(|| {
            Reader::Messages(MsgReader::Seqpacket {
                sock: sock.clone(),
                max,
            })
        }),
        writer: writes.then(|| {
            Writer::Messages(MsgWriter::Seqpacket {
                sock: sock.clone(),
                direct: true,
            })
        }),
        child: None,
        hangup: None,
    })
}

/// Connects to the seqpacket socket at `path` for an exported pipe (as the session's
/// principal when it has one).
pub async fn connect(path: &Path, max: usize, ctx: &OpenContext) -> Result<Local, OpenError> {
    // A full backlog (`EAGAIN`) leaves the socket unconnected: both ways retry it until
    // the open's deadline (tokio_seqpacket's own connect took it for "in progress").
    let ty = rustix::net::SocketType::SEQPACKET;
    let fd = if let Some(p) = &ctx.principal {
        crate::identity::unix::connect(p, ty, path, ctx.deadline())
            .await
            .map_err(|e| super::unix::connect_error(path, &e))?
    } else {
        super::unix::connect_plain_fd(ty, path, ctx.deadline()).await?
    };
    let sock = UnixSeqpacket::try_from(fd).map_err(|e| super::unix::connect_error(path, &e))?;
    local(
        sock,
        max,
        ctx.direction.client_reads(),
        ctx.direction.client_writes(),
    )
    .map_err(|e| {
        OpenError::new(
            "the local endpoint could not be opened",
            format!("{}: {e}", path.display()),
        )
    })
}
