//! The accept loop of one route: connection limit, accept-error back-off,
//! and a clean stop on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::route::{ClientAddr, Route, Shared, serve};

const LISTEN_BACKLOG: u32 = 4096;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Rejections over the limit are summed into one log line per interval, so
/// a flood cannot flood the log too.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// While connections keep arriving, the accept loop keeps a timer due within
/// this long. tokio wakes its I/O driver (an eventfd write, one system call)
/// whenever a new timer is due before every pending one; each new connection
/// sets timers (connect timeout, keepalive arming, stagger), so without an
/// earlier one already pending, every connection would pay for that wake.
/// Shorter than the default `attempt_delay`; costs ten wakeups a second
/// while connections arrive, and none once a period passes without one.
const TIMER_ANCHOR: Duration = Duration::from_millis(100);

/// Completes once `rx` says stop. The guard `wait_for` returns is dropped
/// here, so callers can hold this future across awaits in `Send` tasks.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Binds a listener the way a long-running server wants it: address reuse
/// (a restart does not wait out TIME_WAIT) and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: set
    // once here instead of once per connection.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The route a listener serves now; a reload swaps it for new connections
/// while open ones keep the one they started with.
#[derive(Debug)]
pub struct Current(RwLock<Arc<Route>>);

impl Current {
    pub fn new(route: Arc<Route>) -> Current {
        Current(RwLock::new(route))
    }

    pub fn get(&self) -> Arc<Route> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, route: Arc<Route>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = route;
    }
}

/// Accepts until `shutdown` turns true. Each accepted connection runs in its
/// own task holding a clone of `drain`, so the caller can wait for all of
/// them to finish by waiting for every sender to be dropped.
pub async fn accept_loop(
    listener: TcpListener,
    current: Arc<Current>,
    shared: Arc<RwLock<Shared>>,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut rejected: u64 = 0;
    let mut last_limit_log: Option<Instant> = None;
    let listen = current.get().cfg.listen;
    let anchor = tokio::time::sleep(TIMER_ANCHOR);
    tokio::pin!(anchor);
    let mut anchored = false;
    let mut arrived_since_anchor = false;
    loop {
        // The shutdown branch comes first so that a flood of connections
        // cannot keep the loop from stopping.
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            () = anchor.as_mut(), if anchored => {
                if arrived_since_anchor {
                    arrived_since_anchor = false;
                    anchor.as_mut().reset(Instant::now() + TIMER_ANCHOR);
                } else {
                    anchored = false;
                }
                continue;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let arrived = Instant::now();
                backoff = ACCEPT_BACKOFF_MIN;
                arrived_since_anchor = true;
                if !anchored {
                    anchored = true;
                    anchor.as_mut().reset(arrived + TIMER_ANCHOR);
                }
                let route = current.get();
                route.state.metrics.accepted.increment(1);
                match route.limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
                        let drain = drain.clone();
                        // Spawned as is, not wrapped in another async block,
                        // which would keep a second copy of serve's arguments
                        // for the connection's whole life. The permit and the
                        // drain guard go with it and are dropped as it ends.
                        tokio::spawn(serve(
                            route,
                            shared,
                            stream,
                            ClientAddr(peer),
                            arrived,
                            (permit, drain),
                        ));
                    }
                    Err(_) => {
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        route
                            .state
                            .metrics
                            .failed(crate::metrics::FailReason::Limit);
                        rejected += 1;
                        if last_limit_log.is_none_or(|t| t.elapsed() >= LIMIT_LOG_INTERVAL) {
                            tracing::warn!(
                                route = %route.cfg.name,
                                max_connections = route.cfg.max_connections.get(),
                                rejected,
                                "connection limit reached: new connections are reset"
                            );
                            rejected = 0;
                            last_limit_log = Some(Instant::now());
                        }
                    }
                }
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(listen = %listen, error = %e, "accept: connection gone before accept");
            }
            Err(e) => {
                // EMFILE and the like: the condition clears only when other
                // connections close, so retrying at once would spin.
                tracing::warn!(
                    listen = %listen,
                    error = %e,
                    backoff_ms = backoff.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::info!(listen = %listen, "listener closed");
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
