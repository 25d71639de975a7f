//! The carrier: TLS configs ([`tls`]), the `pipebridge.v1` frames ([`protocol`]) and
//! the WebSocket settings both sides use.

pub mod protocol;
pub mod tls;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// WebSocket settings for a session whose incoming messages may be `max_message` bytes.
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .write_buffer_size(0)
}
