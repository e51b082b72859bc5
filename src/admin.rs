//! The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::listener::Current;

/// What the endpoint reads: the metrics handle and the routes serving now.
pub struct AdminState {
    pub metrics: PrometheusHandle,
    pub routes: RwLock<Vec<Arc<Current>>>,
}

impl AdminState {
    fn routes(&self) -> Vec<Arc<crate::route::Route>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.get())
            .collect()
    }
}

/// Serves until `shutdown` turns true. Errors on one connection are logged
/// at debug and never stop the endpoint.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = crate::listener::stopped(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    // Same reasoning as the proxy's accept loop: back off
                    // rather than spin on EMFILE.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin: connection error");
            }
        });
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET\n",
            "text/plain; charset=utf-8",
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            state.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain; charset=utf-8"),
        "/readyz" => {
            let failing: Vec<String> = state
                .routes()
                .iter()
                .filter_map(|r| r.ready().err().map(|why| format!("{}: {why}", r.cfg.name)))
                .collect();
            if failing.is_empty() {
                text(StatusCode::OK, "ready\n", "text/plain; charset=utf-8")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready\n{}\n", failing.join("\n")),
                    "text/plain; charset=utf-8",
                )
            }
        }
        "/status" => text(
            StatusCode::OK,
            status_json(state).to_string(),
            "application/json",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found\n",
            "text/plain; charset=utf-8",
        ),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn status_json(state: &AdminState) -> serde_json::Value {
    let routes: Vec<serde_json::Value> = state
        .routes()
        .iter()
        .map(|r| {
            let answer = r
                .state
                .answer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let addrs = answer
                .as_ref()
                .map(|a| a.socket_addrs(r.cfg.port))
                .unwrap_or_default();
            let addresses: Vec<serde_json::Value> = r
                .state
                .health
                .status(&addrs)
                .into_iter()
                .map(|s| {
                    json!({
                        "address": s.addr.to_string(),
                        "state": if s.up { "up" } else { "down" },
                        "since": rfc3339(s.since),
                        "last_error": s.last_error,
                    })
                })
                .collect();
            json!({
                "name": r.cfg.name,
                "listen": r.cfg.listen.to_string(),
                "alias": r.cfg.alias.to_string(),
                "port": r.cfg.port,
                "active_connections": r.state.active.load(std::sync::atomic::Ordering::Relaxed),
                "ready": r.ready().is_ok(),
                "answer": answer.as_ref().map(|a| json!({
                    "source": a.source.as_str(),
                    "addresses": addrs.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
                    "at": rfc3339(a.at),
                })),
                "addresses": addresses,
            })
        })
        .collect();
    json!({ "version": crate::VERSION, "routes": routes })
}
