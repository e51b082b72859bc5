//! The accept loop of one route: connection limit, accept-error back-off,
//! and a clean stop on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::route::{ClientAddr, Route, Shared, serve};

const LISTEN_BACKLOG: u32 = 4096;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Rejections over the limit are summed into one log line per interval, so
/// a flood cannot flood the log too.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Binds a listener the way a long-running server wants it: address reuse
/// (a restart does not wait out TIME_WAIT) and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts until `shutdown` turns true. Each accepted connection runs in its
/// own task holding a clone of `drain`, so the caller can wait for all of
/// them to finish by waiting for every sender to be dropped.
pub async fn accept_loop(
    listener: TcpListener,
    route: Arc<Route>,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let limit = Arc::new(Semaphore::new(route.cfg.max_connections.get() as usize));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let rejected = AtomicU64::new(0);
    let mut last_limit_log: Option<Instant> = None;
    loop {
        // The shutdown branch comes first so that a flood of connections
        // cannot keep the loop from stopping.
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                match limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let route = route.clone();
                        let shared = shared.clone();
                        let drain = drain.clone();
                        tokio::spawn(async move {
                            serve(route, shared, stream, ClientAddr(peer)).await;
                            drop(permit);
                            drop(drain);
                        });
                    }
                    Err(_) => {
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        let n = rejected.fetch_add(1, Ordering::Relaxed) + 1;
                        if last_limit_log.is_none_or(|t| t.elapsed() >= LIMIT_LOG_INTERVAL) {
                            tracing::warn!(
                                route = %route.cfg.name,
                                max_connections = route.cfg.max_connections.get(),
                                rejected = n,
                                "connection limit reached: new connections are reset"
                            );
                            rejected.store(0, Ordering::Relaxed);
                            last_limit_log = Some(Instant::now());
                        }
                    }
                }
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(route = %route.cfg.name, error = %e, "accept: connection gone before accept");
            }
            Err(e) => {
                // EMFILE and the like: the condition clears only when other
                // connections close, so retrying at once would spin.
                tracing::warn!(
                    route = %route.cfg.name,
                    listen = %route.cfg.listen,
                    error = %e,
                    backoff_ms = backoff.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::info!(route = %route.cfg.name, listen = %route.cfg.listen, "listener closed");
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
