//! The carrier: TLS configs ([`tls`]), the `pipebridge.v1` frames ([`protocol`]) and
//! the WebSocket settings both sides use.

pub mod h2io;
pub mod protocol;
pub mod tls;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// tungstenite's read buffer (one TLS record).
pub const READ_BUFFER_BYTES: usize = 4 * 1024;

/// WebSocket settings for a session whose incoming messages may be `max_message` bytes.
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // tungstenite zero-fills its read buffer before each read: keep it one TLS
        // record big (the 128 KiB default cost 30% CPU on small messages and 128 KiB
        // of memory per idle session).
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .write_buffer_size(0)
}

/// HTTP/2: per-stream flow-control window (bounds what one stalled session buffers).
pub const H2_STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// HTTP/2: connection flow-control window.
pub const H2_CONN_WINDOW_BYTES: u32 = 16 << 20;
/// HTTP/2: largest DATA frame.
pub const H2_MAX_FRAME_BYTES: u32 = 256 << 10;
/// HTTP/2: sessions at once on one connection.
pub const H2_MAX_STREAMS: u32 = 4096;
