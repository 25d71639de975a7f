//! The admin listener (plain HTTP on `admin.listen`): `/healthz` (process alive),
//! `/readyz` (listeners up, certificates loaded, not draining), `/metrics` (Prometheus
//! text), `/sessions` (JSON for `pipebridge status`). It exposes no pipe and no secret.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Gateway;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The exporting gateway, if this process has a `[server]`.
    pub gateway: Option<Arc<Gateway>>,
    /// Listeners bound and certificates loaded.
    pub ready: AtomicBool,
}

fn respond(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The JSON of `/sessions`.
pub fn sessions_json(gw: Option<&Gateway>) -> String {
    let list: Vec<_> = gw
        .map(|g| g.registry.snapshot())
        .unwrap_or_default()
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "identity": s.identity,
                "pipe": s.pipe,
                "direction": s.direction.as_str(),
                "age_seconds": s.started.elapsed().as_secs_f64(),
                "bytes_in": s.counters.to_local.load(Ordering::Relaxed),
                "bytes_out": s.counters.from_local.load(Ordering::Relaxed),
            })
        })
        .collect();
    serde_json::json!({ "sessions": list }).to_string()
}

fn handle(req: &Request<hyper::body::Incoming>, st: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let draining = st.gateway.as_ref().is_some_and(|g| g.is_draining());
            if st.ready.load(Ordering::SeqCst) && !draining {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else if draining {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::get().encode(),
        ),
        "/sessions" => respond(
            StatusCode::OK,
            "application/json",
            sessions_json(st.gateway.as_deref()),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn run(listener: TcpListener, st: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let st = st.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(&req, &st)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// GETs `path` from the admin listener at `addr` (for `pipebridge status`).
pub async fn fetch(addr: &str, path: &str) -> Result<(StatusCode, Bytes), String> {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the admin endpoint {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
