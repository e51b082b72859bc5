//! One route's shared state and the path of one client connection through
//! it: resolve the alias, order the answer, connect, relay, log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::RouteConfig;
use crate::connect::{Attempt, AttemptResult, AttemptsDisplay, connect_staggered};
use crate::health::Health;
use crate::relay::{Counts, End, relay};
use crate::resolve::{Resolution, Resolver};

/// The address of the client side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Addresses the proxy itself listens on, so an answer that points back at
/// one of them is never dialled (SPEC: loop guard).
#[derive(Debug, Clone, Default)]
pub struct OwnListeners(pub Vec<SocketAddr>);

impl OwnListeners {
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip()
                    || (l.ip().is_unspecified() && l.is_ipv4() == addr.is_ipv4()))
        })
    }
}

#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    pub health: Health,
}

impl Route {
    pub fn new(cfg: RouteConfig, retry_down_after: Duration) -> Route {
        Route {
            cfg,
            health: Health::new(retry_down_after),
        }
    }
}

/// Everything one connection needs, cheap to clone per connection.
#[derive(Clone, Debug)]
pub struct Shared {
    pub resolver: Arc<Resolver>,
    pub own: Arc<OwnListeners>,
}

/// How a connection ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Relayed(End),
    ResolveFailed,
    NoUpstream,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed(e) => e.as_str(),
            Outcome::ResolveFailed => "resolve_failed",
            Outcome::NoUpstream => "no_upstream",
        }
    }
}

/// Serves one client connection to its end. Errors here are logged and
/// never bubble up: one connection cannot affect the accept loop.
pub async fn serve(route: Arc<Route>, shared: Shared, client: TcpStream, peer: ClientAddr) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let cfg = &route.cfg;

    let Resolution {
        result,
        stale_because,
        elapsed: resolve_elapsed,
    } = shared.resolver.resolve(&cfg.alias).await;
    let answer = match result {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(
                route = %cfg.name,
                client.addr = %peer.0,
                alias = %cfg.alias,
                error = %e,
                error.kind = e.kind().as_str(),
                "connection reset: alias did not resolve"
            );
            reset(client);
            log_end(
                &route,
                peer,
                None,
                &[],
                &Counts::default(),
                started,
                Outcome::ResolveFailed,
            );
            return;
        }
    };
    if let Some(e) = &stale_because {
        tracing::warn!(
            route = %cfg.name,
            alias = %cfg.alias,
            error = %e,
            answer.at = ?answer.at,
            "dns failed; using the last good answer"
        );
    }
    tracing::debug!(
        route = %cfg.name,
        source = answer.source.as_str(),
        addrs = ?answer.addrs,
        elapsed_ms = resolve_elapsed.as_secs_f64() * 1000.0,
        "resolved"
    );

    let plan = route
        .health
        .plan(answer.socket_addrs(cfg.port), cfg.order, Instant::now());
    let mut attempts: Vec<Attempt> = Vec::with_capacity(plan.addrs.len());
    let connected = connect_staggered(
        &plan.addrs,
        |a| shared.own.contains(a),
        cfg.attempt_delay,
        cfg.connect_timeout,
        &mut attempts,
    )
    .await;

    let now = Instant::now();
    for a in &attempts {
        if a.result == AttemptResult::Ok {
            route.health.mark_up(a.addr);
        } else if a.result.marks_down() && route.health.mark_down(a.addr, now) {
            tracing::info!(route = %cfg.name, upstream.addr = %a.addr, result = a.result.as_str(), "address marked down");
        }
    }
    for r in &plan.retries {
        if !attempts.iter().any(|a| a.addr == *r) {
            route.health.release_retry(*r);
        }
    }

    let Some((upstream, addr)) = connected else {
        tracing::warn!(
            route = %cfg.name,
            client.addr = %peer.0,
            attempts = %AttemptsDisplay(&attempts),
            "connection reset: no server reachable"
        );
        reset(client);
        log_end(
            &route,
            peer,
            None,
            &attempts,
            &Counts::default(),
            started,
            Outcome::NoUpstream,
        );
        return;
    };
    if plan.first.is_some_and(|f| f != addr) {
        tracing::warn!(
            route = %cfg.name,
            client.addr = %peer.0,
            upstream.addr = %addr,
            first = ?plan.first,
            attempts = %AttemptsDisplay(&attempts),
            "failover: served by other than the first address"
        );
    }

    let counts = Counts::default();
    let (end, error) = relay(&client, &upstream, cfg.idle_timeout, &counts).await;
    if let Some(e) = error {
        tracing::debug!(route = %cfg.name, client.addr = %peer.0, error = %e, "relay ended by an error");
    }
    log_end(
        &route,
        peer,
        Some(addr),
        &attempts,
        &counts,
        started,
        Outcome::Relayed(end),
    );
}

/// Closes with RST so the client sees a refused-like failure at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn log_end(
    route: &Route,
    peer: ClientAddr,
    upstream: Option<SocketAddr>,
    attempts: &[Attempt],
    counts: &Counts,
    started: Instant,
    outcome: Outcome,
) {
    tracing::info!(
        route = %route.cfg.name,
        client.addr = %peer.0,
        upstream.addr = upstream.map(tracing::field::display),
        attempts = %AttemptsDisplay(attempts),
        bytes.to_upstream = counts.to_upstream.load(Ordering::Relaxed),
        bytes.to_client = counts.to_client.load(Ordering::Relaxed),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        end = outcome.as_str(),
        "connection closed"
    );
}
