//! The carrier: TLS configs ([`tls`]), the `pipebridge.v1` control messages
//! ([`protocol`]), the WebSocket data path ([`ws`]), HTTP/2 streams as its transport
//! ([`h2io`]), batched TLS reads ([`readahead`]) and the HTTP/2 settings both sides use.

pub mod h2io;
pub mod protocol;
pub mod readahead;
pub mod tls;
pub mod ws;

/// HTTP/2: per-stream flow-control window (bounds what one stalled session buffers).
pub const H2_STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// HTTP/2: connection flow-control window, the largest the protocol allows (2^31 - 1),
/// so that only a stream's own window holds its session back: with less, a few
/// sessions whose readers stalled would take all of it and stop every other session on
/// the connection. What one connection buffers is bounded by its sessions' stream
/// windows.
pub const H2_CONN_WINDOW_BYTES: u32 = (1 << 31) - 1;
/// HTTP/2: how much bookkeeping the small DATA frames a connection holds unread may
/// cost (h2 counts 256 bytes less the payload for each frame under 256 bytes), past
/// which the peer is cut off (GOAWAY `ENHANCE_YOUR_CALM`). h2's default is half the
/// connection window: with [`H2_CONN_WINDOW_BYTES`] about 1 GiB, so a peer that filled
/// a stalled session's window with 1-byte frames made the gateway hold hundreds of MiB
/// per session. 32 MiB is about 130,000 tiny frames held in h2 on one connection;
/// sessions take their frames out of h2 even while their local writes wait
/// ([`h2io::H2Recv`]), so only frames that arrive faster than the sessions' tasks run
/// count.
pub const H2_DATA_FRAME_BUDGET: usize = 32 << 20;
/// HTTP/2: largest DATA frame.
pub const H2_MAX_FRAME_BYTES: u32 = 256 << 10;
/// HTTP/2: sessions at once on one connection.
pub const H2_MAX_STREAMS: u32 = 4096;
