//! The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::listener::Current;
use crate::lock;
use crate::route::{OwnListeners, Route};

/// What the endpoint reads: the metrics handle and the routes serving now.
pub struct AdminState {
    pub metrics: PrometheusHandle,
    pub routes: RwLock<Vec<Arc<Current>>>,
}

impl AdminState {
    /// The routes serving now, and the listeners they are: what the loop
    /// guard of each route's connections skips, here without asking the
    /// server for it.
    fn routes(&self) -> (Vec<Arc<Route>>, OwnListeners) {
        let routes: Vec<Arc<Route>> = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.get())
            .collect();
        let own = OwnListeners(routes.iter().map(|r| r.cfg.listen).collect());
        (routes, own)
    }
}

/// Bounds on the endpoint's own connections. The endpoint shares the
/// process's descriptors with the proxied connections, so a stuck or
/// hostile local client must not be able to hold them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once. At the cap a new connection closes the
    /// oldest: were the new one closed instead, a client holding the cap's
    /// worth of silent connections (reopening each as the idle timer ends
    /// it) would shut out every scrape and probe, and a liveness probe that
    /// fails gets the proxy restarted, its clients cut.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head this long after
    /// it opened, or after its last response, is closed.
    pub idle: Duration,
}

impl Default for Limits {
    /// Prometheus holds one connection per scrape target; 64 leave room for
    /// probes and people. 30 s outlasts any client that is still sending.
    fn default() -> Self {
        Limits {
            max_connections: 64,
            idle: Duration::from_secs(30),
        }
    }
}

/// Serves until `shutdown` turns true. Errors on one connection are logged
/// at debug and never stop the endpoint.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(Mutex::new(Open::default()));
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
        let (id, evict) = lock(&open).admit(limits.max_connections);
        let state = state.clone();
        let open = open.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.idle)
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = evict => {
                    tracing::debug!(
                        max = limits.max_connections,
                        "admin: at the connection cap; closing the oldest"
                    );
                    Ok(())
                }
                // The endpoint stops (it moved, or the proxy is stopping): a
                // kept-alive connection must not go on answering at the old
                // address. A request under way is answered first.
                () = crate::listener::stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin: connection error");
            }
            lock(&open).remove(id);
        });
    }
}

/// The endpoint's open connections, oldest first, each with the sender
/// that closes it.
#[derive(Default)]
struct Open {
    next: u64,
    conns: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Open {
    /// Takes a new connection in, closing the oldest when `max` are open:
    /// its id, and what tells its task to close it.
    fn admit(&mut self, max: usize) -> (u64, oneshot::Receiver<()>) {
        while self.conns.len() >= max.max(1) {
            if let Some((_, close)) = self.conns.pop_front() {
                let _ = close.send(());
            }
        }
        let id = self.next;
        self.next += 1;
        let (close, closed) = oneshot::channel();
        self.conns.push_back((id, close));
        (id, closed)
    }

    fn remove(&mut self, id: u64) {
        self.conns.retain(|(i, _)| *i != id);
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
        "/metrics" => {
            let cpu = crate::metrics::collect_process();
            let mut body = state.metrics.render();
            let (routes, own) = state.routes();
            let series: Vec<_> = routes
                .iter()
                .map(|r| crate::metrics::RouteSeries {
                    name: &r.cfg.name,
                    metrics: &r.state.metrics,
                    backends: r.answer_states(&own).1,
                })
                .collect();
            crate::metrics::render_routes(&mut body, &series);
            crate::metrics::render_process_cpu(&mut body, cpu);
            text(
                StatusCode::OK,
                body,
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain; charset=utf-8"),
        "/readyz" => {
            let (routes, own) = state.routes();
            let failing: Vec<String> = routes
                .iter()
                .filter_map(|r| {
                    r.ready(&own)
                        .err()
                        .map(|why| format!("{}: {why}", r.cfg.name))
                })
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
    let (routes, own) = state.routes();
    let routes: Vec<serde_json::Value> = routes
        .iter()
        .map(|r| {
            let (answer, states) = r.answer_states(&own);
            let addresses: Vec<serde_json::Value> = states
                .iter()
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
                "ready": crate::route::readiness(answer.as_ref(), &states).is_ok(),
                "answer": answer.as_ref().map(|a| json!({
                    "source": a.source.as_str(),
                    "addresses": states.iter().map(|x| x.addr.to_string()).collect::<Vec<_>>(),
                    "at": rfc3339(a.at),
                })),
                "addresses": addresses,
            })
        })
        .collect();
    json!({ "version": crate::VERSION, "routes": routes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Stops a hang only.
    const HANG: Duration = Duration::from_secs(20);

    async fn endpoint(limits: Limits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AdminState {
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            routes: RwLock::new(Vec::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve(listener, state, limits, stop_rx));
        (addr, stop)
    }

    /// One keep-alive request; the status line's code.
    async fn healthz(s: &mut TcpStream) -> Option<u16> {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(HANG, s.read(&mut buf))
            .await
            .expect("a reply or a close")
            .ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .get(9..12)?
            .parse()
            .ok()
    }

    /// Everything the endpoint sends on `s` until it closes it.
    async fn reply_until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut reply = Vec::new();
        tokio::time::timeout(HANG, s.read_to_end(&mut reply))
            .await
            .expect("a reply and a close")
            .unwrap();
        reply
    }

    /// Waits for the endpoint to close `s`; how long since `from` that was.
    async fn closed(s: &mut TcpStream, from: tokio::time::Instant) -> Duration {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(HANG, s.read(&mut buf))
            .await
            .expect("the endpoint kept the connection open");
        assert!(matches!(n, Ok(0) | Err(_)), "unexpected bytes: {n:?}");
        from.elapsed()
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_limit_is_closed_before_and_between_requests() {
        let idle = Duration::from_millis(300);
        let (addr, _stop) = endpoint(Limits {
            max_connections: 8,
            idle,
        })
        .await;
        // The timer, not an immediate close: neither goes before `idle`
        // (less a margin for the two clocks' rounding).
        let least = idle - Duration::from_millis(50);
        let opened = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut silent, opened).await >= least);
        // Idle after a response: the timer starts again.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut kept).await, Some(200));
        let answered = tokio::time::Instant::now();
        assert!(closed(&mut kept, answered).await >= least);
    }

    #[tokio::test]
    async fn a_stop_closes_kept_connections_and_answers_a_request_under_way_first() {
        let (addr, stop) = endpoint(Limits {
            max_connections: 8,
            idle: Duration::from_secs(600),
        })
        .await;
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut kept).await, Some(200));
        // Half a request head: it has begun, and must still be answered.
        let mut begun = TcpStream::connect(addr).await.unwrap();
        begun
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        // Served once before the stop: the endpoint has taken `begun` in.
        let mut other = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut other).await, Some(200));
        stop.send(true).unwrap();
        closed(&mut kept, tokio::time::Instant::now()).await;
        closed(&mut other, tokio::time::Instant::now()).await;
        begun.write_all(b"\r\n").await.unwrap();
        let reply = reply_until_closed(&mut begun).await;
        assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_closes_the_oldest_and_is_served() {
        let (addr, _stop) = endpoint(Limits {
            max_connections: 2,
            idle: Duration::from_secs(600),
        })
        .await;
        // Two silent connections hold the cap, as a stuck or hostile
        // client's would: a probe must still be served.
        let mut one = TcpStream::connect(addr).await.unwrap();
        let mut two = TcpStream::connect(addr).await.unwrap();
        let mut probe = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut probe).await, Some(200));
        // The oldest gave way; the next oldest still serves, until another
        // comes.
        closed(&mut one, tokio::time::Instant::now()).await;
        assert_eq!(healthz(&mut two).await, Some(200));
        let mut another = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut another).await, Some(200));
        closed(&mut two, tokio::time::Instant::now()).await;
        assert_eq!(healthz(&mut probe).await, Some(200));
    }

    #[tokio::test]
    async fn a_connection_that_ended_leaves_the_cap() {
        let (addr, _stop) = endpoint(Limits {
            max_connections: 2,
            idle: Duration::from_secs(600),
        })
        .await;
        // A scraper's kept connection, then probes that each close theirs:
        // were the ended ones still counted, they would push it out.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert_eq!(healthz(&mut kept).await, Some(200));
        for _ in 0..5 {
            let mut probe = TcpStream::connect(addr).await.unwrap();
            probe
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            // One thread runs the test and the endpoint: by the time the
            // close is read here, the connection's task has ended.
            let reply = reply_until_closed(&mut probe).await;
            assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
        }
        assert_eq!(healthz(&mut kept).await, Some(200));
    }
}
