//! The `pipebridge.v1` frames of DESIGN.md: binary WebSocket messages carry data, text
//! messages carry small JSON control objects (`eof`, `exit`, `error`), and sessions end
//! with a Close frame whose code says why. Decoding never panics on peer input.

use serde_json::{json, Value};

/// The WebSocket subprotocol that names this protocol version.
pub const SUBPROTOCOL: &str = "pipebridge.v1";
/// Largest control (text) message accepted from a peer.
pub const MAX_CONTROL_LEN: usize = 4096;

/// Close code: both directions reached EOF.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: the gateway drained (grace period over).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: policy violation (forbidden direction, bad control frame, access withdrawn).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: message too big.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the local endpoint failed.
pub const CLOSE_ENDPOINT_FAILED: u16 = 1011;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The sender will send no more data.
    Eof,
    /// An `exec:` child ended with an exit code.
    ExitCode(i32),
    /// An `exec:` child was killed by a signal.
    ExitSignal(i32),
    /// An error, sent before closing.
    Error {
        /// One of [`ErrorKind`]'s wire names (or an unknown one from a newer peer).
        kind: String,
        /// Human text.
        message: String,
    },
    /// A control type this version does not know; ignored.
    Unknown(String),
}

/// Session error kinds carried in `error` control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The local endpoint failed mid-session.
    EndpointFailed,
    /// A message exceeded the pipe's `max_message_size`.
    MessageTooBig,
    /// Data arrived in a direction the session does not allow.
    ForbiddenDirection,
    /// The peer broke the protocol.
    ProtocolError,
    /// A reload withdrew this identity's access.
    AccessWithdrawn,
    /// The gateway drained.
    Draining,
}

impl ErrorKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::EndpointFailed => "endpoint_failed",
            ErrorKind::MessageTooBig => "message_too_big",
            ErrorKind::ForbiddenDirection => "forbidden_direction",
            ErrorKind::ProtocolError => "protocol_error",
            ErrorKind::AccessWithdrawn => "access_withdrawn",
            ErrorKind::Draining => "draining",
        }
    }

    /// The Close code that follows this error.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorKind::EndpointFailed => CLOSE_ENDPOINT_FAILED,
            ErrorKind::MessageTooBig => CLOSE_TOO_BIG,
            ErrorKind::ForbiddenDirection
            | ErrorKind::ProtocolError
            | ErrorKind::AccessWithdrawn => CLOSE_POLICY,
            ErrorKind::Draining => CLOSE_GOING_AWAY,
        }
    }
}

/// A control message that could not be decoded (the session closes with 1008).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed control message: {0}")]
pub struct MalformedControl(pub &'static str);

impl Control {
    /// Decodes a text message.
    pub fn decode(text: &str) -> Result<Control, MalformedControl> {
        if text.len() > MAX_CONTROL_LEN {
            return Err(MalformedControl("too long"));
        }
        let v: Value = serde_json::from_str(text).map_err(|_| MalformedControl("not JSON"))?;
        let obj = v.as_object().ok_or(MalformedControl("not a JSON object"))?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or(MalformedControl("no string \"type\""))?;
        Ok(match ty {
            "eof" => Control::Eof,
            "exit" => {
                let int = |k: &str| -> Result<Option<i32>, MalformedControl> {
                    match obj.get(k) {
                        None | Some(Value::Null) => Ok(None),
                        Some(v) => v
                            .as_i64()
                            .and_then(|n| i32::try_from(n).ok())
                            .map(Some)
                            .ok_or(MalformedControl("exit code/signal is not a 32-bit integer")),
                    }
                };
                match (int("code")?, int("signal")?) {
                    (Some(c), None) => Control::ExitCode(c),
                    (None, Some(s)) => Control::ExitSignal(s),
                    _ => return Err(MalformedControl("exit needs exactly one of code or signal")),
                }
            }
            "error" => Control::Error {
                kind: obj
                    .get("kind")
                    .and_then(Value::as_str)
                    .ok_or(MalformedControl("error without kind"))?
                    .to_string(),
                message: obj
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            },
            other => Control::Unknown(other.chars().take(64).collect()),
        })
    }

    /// Encodes as the JSON text of a text message.
    pub fn encode(&self) -> String {
        match self {
            Control::Eof => r#"{"type":"eof"}"#.to_string(),
            Control::ExitCode(c) => json!({"type": "exit", "code": c}).to_string(),
            Control::ExitSignal(s) => json!({"type": "exit", "signal": s}).to_string(),
            Control::Error { kind, message } => {
                json!({"type": "error", "kind": kind, "message": message}).to_string()
            }
            Control::Unknown(t) => json!({ "type": t }).to_string(),
        }
    }

    /// An `error` control message of `kind`.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Control {
        Control::Error {
            kind: kind.as_str().to_string(),
            message: message.into(),
        }
    }
}

/// Parsed `?mode=&direction=` of a session request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionQuery {
    /// Requested mode.
    pub mode: Option<crate::config::Mode>,
    /// Requested direction.
    pub direction: Option<crate::config::Direction>,
}

impl SessionQuery {
    /// Parses a raw query string; unknown keys, repeated keys and bad values are errors.
    pub fn parse(q: Option<&str>) -> Result<SessionQuery, String> {
        let mut out = SessionQuery::default();
        let Some(q) = q else { return Ok(out) };
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "mode" => {
                    if out.mode.is_some() {
                        return Err("mode given twice".into());
                    }
                    out.mode = Some(
                        crate::config::Mode::parse(v)
                            .ok_or_else(|| "mode must be byte or message".to_string())?,
                    );
                }
                "direction" => {
                    if out.direction.is_some() {
                        return Err("direction given twice".into());
                    }
                    out.direction = Some(
                        crate::config::Direction::parse(v)
                            .ok_or_else(|| "direction must be duplex, in or out".to_string())?,
                    );
                }
                _ => return Err("unknown query parameter (expected mode or direction)".into()),
            }
        }
        Ok(out)
    }
}

/// Text a peer chose (a Close frame's reason, an `error` message, a refusal's JSON),
/// made safe to log or print: control characters (a newline that would start a forged
/// log line, a terminal escape), line and paragraph separators and bidirectional
/// overrides (which reorder what a terminal shows) are written as escapes (`\n`,
/// `\u{1b}`, `\u{202e}`); the rest is kept as it is.
pub fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_cleaned_of_control_characters() {
        assert!(matches!(
            clean("plain ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            clean("a\nb\r\x1b[2J\u{9b}c\td"),
            "a\\nb\\r\\u{1b}[2J\\u{9b}c\\td"
        );
        assert_eq!(clean("x\u{202e}y\u{2028}z"), "x\\u{202e}y\\u{2028}z");
    }
    use crate::config::{Direction, Mode};

    #[test]
    fn roundtrip() {
        for c in [
            Control::Eof,
            Control::ExitCode(3),
            Control::ExitSignal(9),
            Control::error(ErrorKind::MessageTooBig, "x"),
        ] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn unknown_and_malformed() {
        assert_eq!(
            Control::decode(r#"{"type":"hello","x":1}"#).unwrap(),
            Control::Unknown("hello".into())
        );
        assert!(Control::decode("nope").is_err());
        assert!(Control::decode("[1]").is_err());
        assert!(Control::decode(r#"{"type":1}"#).is_err());
        assert!(Control::decode(r#"{"type":"exit"}"#).is_err());
        assert!(Control::decode(r#"{"type":"exit","code":1e40}"#).is_err());
        assert!(Control::decode(&"x".repeat(MAX_CONTROL_LEN + 1)).is_err());
    }

    #[test]
    fn query() {
        assert_eq!(SessionQuery::parse(None).unwrap(), SessionQuery::default());
        let q = SessionQuery::parse(Some("mode=message&direction=out")).unwrap();
        assert_eq!(q.mode, Some(Mode::Message));
        assert_eq!(q.direction, Some(Direction::Out));
        assert!(SessionQuery::parse(Some("mode=x")).is_err());
        assert!(SessionQuery::parse(Some("path=/etc")).is_err());
        assert!(SessionQuery::parse(Some("mode=byte&mode=byte")).is_err());
    }
}
