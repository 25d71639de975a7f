//! Prometheus metrics (prometheus-client), every series named `pipebridge_*`. Label sets
//! are bounded: pipe and identity names come from the config, refusal reasons and
//! results from fixed vocabularies; never peer addresses.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::RefusalKind;

/// Labels of per-session series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// Pipe name.
    pub pipe: String,
    /// Identity name.
    pub identity: String,
}

/// Labels of byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Pipe name.
    pub pipe: String,
    /// `in` (network → pipe) or `out` (pipe → network).
    pub direction: String,
}

/// A single label naming a reason or a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason.
    pub reason: String,
}

/// A single label naming a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of the session-duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipeLabels {
    /// Pipe name.
    pub pipe: String,
}

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    /// Live sessions.
    pub sessions_active: Family<SessionLabels, Gauge>,
    /// Sessions started.
    pub sessions: Family<SessionLabels, Counter>,
    /// Bytes moved, by pipe and direction.
    pub bytes: Family<BytesLabels, Counter>,
    /// Session durations.
    pub session_duration: Family<PipeLabels, Histogram>,
    /// Accept to upgraded WebSocket.
    pub handshake: Histogram,
    /// Refusals by DESIGN.md error kind.
    pub refusals: Family<ReasonLabels, Counter>,
    /// Failed impersonations.
    pub impersonation_failures: Counter,
    /// Config reloads by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// Forward dials by result.
    pub forward_dials: Family<ResultLabels, Counter>,
    /// `forward_dials`' two series, `ok` and `error` (counted per forwarded session).
    forward_dial_results: [Counter; 2],
}

/// One pipe and identity's session metrics, looked up in their families once and kept
/// ([`Metrics::session_metrics`]): a session then counts itself without building label
/// sets (strings) or hashing them, and without the families' shared locks.
pub struct SessionMetrics {
    /// `sessions_active`.
    pub active: Gauge,
    /// `sessions`.
    pub started: Counter,
    /// `bytes`, direction `in`.
    pub bytes_in: Counter,
    /// `bytes`, direction `out`.
    pub bytes_out: Counter,
    /// `session_duration_seconds` (by pipe).
    pub duration: Histogram,
}

impl Metrics {
    /// The handles of `pipe` and `identity`'s session metrics (the same metrics as the
    /// families export: a handle shares its value with the family's entry).
    pub fn session_metrics(&self, pipe: &str, identity: &str) -> SessionMetrics {
        let labels = SessionLabels {
            pipe: pipe.to_string(),
            identity: identity.to_string(),
        };
        let bytes = |direction: &str| {
            self.bytes
                .get_or_create(&BytesLabels {
                    pipe: pipe.to_string(),
                    direction: direction.to_string(),
                })
                .clone()
        };
        SessionMetrics {
            active: self.sessions_active.get_or_create(&labels).clone(),
            started: self.sessions.get_or_create(&labels).clone(),
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            duration: self
                .session_duration
                .get_or_create(&PipeLabels {
                    pipe: pipe.to_string(),
                })
                .clone(),
        }
    }

    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pipebridge");
        let sessions_active = Family::<SessionLabels, Gauge>::default();
        registry.register("sessions_active", "Live sessions", sessions_active.clone());
        let sessions = Family::<SessionLabels, Counter>::default();
        registry.register("sessions", "Sessions started", sessions.clone());
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Bytes moved by ended sessions (in: network to pipe, out: pipe to network)",
            bytes.clone(),
        );
        let session_duration = Family::<PipeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 12))
        });
        registry.register(
            "session_duration_seconds",
            "Session durations",
            session_duration.clone(),
        );
        let handshake = Histogram::new(exponential_buckets(0.0001, 3.0, 12));
        registry.register(
            "handshake_seconds",
            "TCP accept to upgraded WebSocket",
            handshake.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refusals",
            "Refused session requests by error kind",
            refusals.clone(),
        );
        for k in RefusalKind::ALL {
            let _ = refusals.get_or_create(&ReasonLabels {
                reason: k.as_str().to_string(),
            });
        }
        let impersonation_failures = Counter::default();
        registry.register(
            "impersonation_failures",
            "Sessions refused because the credential switch failed",
            impersonation_failures.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Config reloads by result", reloads.clone());
        let forward_dials = Family::<ResultLabels, Counter>::default();
        registry.register(
            "forward_dials",
            "Sessions dialled by forwards, by result",
            forward_dials.clone(),
        );
        let forward_dial_results = ["ok", "error"].map(|r| {
            let l = ResultLabels { result: r.into() };
            let _ = reloads.get_or_create(&l);
            forward_dials.get_or_create(&l).clone()
        });
        Metrics {
            registry,
            sessions_active,
            sessions,
            bytes,
            session_duration,
            handshake,
            refusals,
            impersonation_failures,
            reloads,
            forward_dials,
            forward_dial_results,
        }
    }

    /// Counts a forward's dial (a session it opened, or failed to).
    pub fn forward_dialed(&self, ok: bool) {
        self.forward_dial_results[usize::from(!ok)].inc();
    }

    /// Counts a refusal.
    pub fn refused(&self, kind: RefusalKind) {
        self.refusals
            .get_or_create(&ReasonLabels {
                reason: kind.as_str().to_string(),
            })
            .inc();
    }

    /// Counts a result (`ok`/`error`) in `family`.
    pub fn result(family: &Family<ResultLabels, Counter>, ok: bool) {
        family
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
