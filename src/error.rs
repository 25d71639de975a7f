//! The wire vocabulary of refusals and session errors (DESIGN.md), shared by the server,
//! the client, metrics and logs. Peers get a kind and a message written for them, never
//! internal error text.

use std::fmt;

use hyper::StatusCode;

/// Why a session was refused before the WebSocket upgrade. Each maps to one HTTP status
/// and one `error` kind of DESIGN.md's refusal table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// 400: malformed pipe name or query, wrong or missing subprotocol.
    BadRequest,
    /// 404: a path that is neither `/pipes` nor `/pipes/{name}`.
    NotFound,
    /// 426: a plain GET on `/pipes/{name}` without a WebSocket upgrade.
    UpgradeRequired,
    /// 429: too many failed authentications from this source address.
    RateLimited,
    /// 401: no or bad credentials.
    Unauthenticated,
    /// 403: identity not allowed on this pipe, or no such pipe.
    Forbidden,
    /// 409: direction or mode the pipe does not offer.
    Unsupported,
    /// 503: pipe at `max_instances` or a session limit reached.
    Busy,
    /// 503: the gateway is draining.
    Draining,
    /// 502: the local endpoint could not be opened.
    EndpointUnavailable,
}

impl RefusalKind {
    /// Every kind, for metrics pre-registration and tests.
    pub const ALL: [RefusalKind; 10] = [
        RefusalKind::BadRequest,
        RefusalKind::NotFound,
        RefusalKind::UpgradeRequired,
        RefusalKind::RateLimited,
        RefusalKind::Unauthenticated,
        RefusalKind::Forbidden,
        RefusalKind::Unsupported,
        RefusalKind::Busy,
        RefusalKind::Draining,
        RefusalKind::EndpointUnavailable,
    ];

    /// The HTTP status of this refusal.
    pub fn status(self) -> StatusCode {
        match self {
            RefusalKind::BadRequest => StatusCode::BAD_REQUEST,
            RefusalKind::NotFound => StatusCode::NOT_FOUND,
            RefusalKind::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            RefusalKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            RefusalKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            RefusalKind::Forbidden => StatusCode::FORBIDDEN,
            RefusalKind::Unsupported => StatusCode::CONFLICT,
            RefusalKind::Busy | RefusalKind::Draining => StatusCode::SERVICE_UNAVAILABLE,
            RefusalKind::EndpointUnavailable => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `error` field of the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::BadRequest => "bad_request",
            RefusalKind::NotFound => "not_found",
            RefusalKind::UpgradeRequired => "upgrade_required",
            RefusalKind::RateLimited => "rate_limited",
            RefusalKind::Unauthenticated => "unauthenticated",
            RefusalKind::Forbidden => "forbidden",
            RefusalKind::Unsupported => "unsupported",
            RefusalKind::Busy => "busy",
            RefusalKind::Draining => "draining",
            RefusalKind::EndpointUnavailable => "endpoint_unavailable",
        }
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a kind plus a human message meant for the peer (no paths, no OS errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What went wrong, in the wire vocabulary.
    pub kind: RefusalKind,
    /// Text for the peer.
    pub message: String,
}

impl Refusal {
    /// A refusal of `kind` with `message`.
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    /// The JSON body sent with the refusal status.
    pub fn body(&self) -> String {
        serde_json::json!({"error": self.kind.as_str(), "message": self.message}).to_string()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Refusal {}
