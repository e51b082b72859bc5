//! failover-proxy: a localhost TCP sidecar for clients that accept one host.
//!
//! For each client connection it resolves a cluster alias afresh (hosts file,
//! then DNS, no cache), connects to the first healthy address, and copies
//! bytes both ways until both sides are done.
//!
//! # Layout
//!
//! The data path, in the order a connection meets it:
//!
//! - [`listener`]: accept loop per route, connection limit, accept back-off.
//! - [`route`]: one connection's way through: resolve, order, connect, relay, log.
//! - [`resolve`]: hosts file then DNS, no cache, stale answer on DNS failure.
//! - [`health`]: which addresses are down, and the order a connection tries.
//! - [`connect`]: staggered attempts, each bounded by the connect timeout.
//! - [`relay`]: both directions, half-close, reset propagation, idle timeout.
//!
//! Around it: [`config`] (figment layers to a validated [`Config`]),
//! [`check`] (the `check` command), [`logging`].
//!
//! [`Server::bind`] takes a validated configuration and binds every listener;
//! [`Server::run`] serves until a shutdown future completes and then drains.
//! Tests bind `127.0.0.1:0` and run it in-process.

pub mod check;
pub mod config;
pub mod connect;
pub mod health;
pub mod listener;
pub mod logging;
pub mod relay;
pub mod resolve;
pub mod route;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use config::Config;
use resolve::Resolver;
use route::{OwnListeners, Route, Shared};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (route {route})")]
    Bind {
        route: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Resolver(#[from] resolve::BuildError),
}

/// A proxy with every listener bound, not yet accepting.
pub struct Server {
    config: Config,
    listeners: Vec<(Arc<Route>, TcpListener)>,
    shared: Shared,
}

impl Server {
    /// Builds the resolver and binds every route's listener. Nothing is
    /// accepted until [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let resolver = Arc::new(Resolver::new(&config.resolver)?);
        let mut listeners = Vec::with_capacity(config.routes.len());
        let mut own = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            let listener = listener::bind(rc.listen).map_err(|source| StartError::Bind {
                route: rc.name.clone(),
                addr: rc.listen,
                source,
            })?;
            let bound = listener.local_addr().map_err(|source| StartError::Bind {
                route: rc.name.clone(),
                addr: rc.listen,
                source,
            })?;
            own.push(bound);
            let mut rc = rc.clone();
            rc.listen = bound;
            listeners.push((
                Arc::new(Route::new(rc, config.health.retry_down_after)),
                listener,
            ));
        }
        Ok(Server {
            shared: Shared {
                resolver,
                own: Arc::new(OwnListeners(own)),
            },
            config,
            listeners,
        })
    }

    /// The bound address of each route, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(r, _)| r.cfg.listen).collect()
    }

    /// Serves until `shutdown` completes, then stops accepting at once and
    /// waits at most `shutdown.drain_timeout` for open connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        let mut loops = Vec::with_capacity(self.listeners.len());
        for (route, listener) in self.listeners {
            tracing::info!(
                route = %route.cfg.name,
                listen = %route.cfg.listen,
                alias = %route.cfg.alias,
                port = route.cfg.port,
                "listening"
            );
            // Each route resolves once at start, so a broken alias shows in
            // the log before the first client needs it.
            let (r, shared) = (route.clone(), self.shared.clone());
            tokio::spawn(async move {
                let res = shared.resolver.resolve(&r.cfg.alias).await;
                match res.result {
                    Ok(a) => {
                        tracing::info!(route = %r.cfg.name, alias = %r.cfg.alias, source = a.source.as_str(), addrs = ?a.addrs, "alias resolved")
                    }
                    Err(e) => {
                        tracing::warn!(route = %r.cfg.name, alias = %r.cfg.alias, error = %e, "alias does not resolve yet")
                    }
                }
            });
            loops.push(tokio::spawn(listener::accept_loop(
                listener,
                route,
                self.shared.clone(),
                stop_rx.clone(),
                drain_tx.clone(),
            )));
        }
        drop(drain_tx);
        shutdown.await;
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        let drain = self.config.shutdown.drain_timeout;
        tracing::info!(drain_timeout = ?drain, "stopped accepting; draining open connections");
        match tokio::time::timeout(drain, drain_rx.recv()).await {
            Ok(_) => tracing::info!("all connections finished"),
            Err(_) => {
                tracing::warn!(drain_timeout = ?drain, "drain timeout: closing the remaining connections")
            }
        }
    }
}

/// SIGTERM and SIGINT handlers, installed up front so that a signal
/// arriving during start-up is not lost (nor the process killed by the
/// default action).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = self.int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    }
}
