//! The accept loop of one route: connection limit, accept-error back-off,
//! and a clean stop on shutdown.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::loops::{Handoff, Held, Other, Spread};
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

/// A timer kept due within [`TIMER_ANCHOR`] while connections keep
/// arriving, and let go once a period passes without one.
pub(crate) struct Anchor {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    arrived: bool,
}

impl Anchor {
    pub(crate) fn new() -> Anchor {
        Anchor {
            sleep: Box::pin(tokio::time::sleep(TIMER_ANCHOR)),
            armed: false,
            arrived: false,
        }
    }

    /// Whether the timer is set: the condition of a `select!` branch on
    /// [`Anchor::fired`].
    pub(crate) fn armed(&self) -> bool {
        self.armed
    }

    /// Waits for the timer, then sets it for another period if a
    /// connection arrived in this one, else lets it go.
    pub(crate) async fn fired(&mut self) {
        self.sleep.as_mut().await;
        if self.arrived {
            self.arrived = false;
            self.sleep.as_mut().reset(Instant::now() + TIMER_ANCHOR);
        } else {
            self.armed = false;
        }
    }

    /// A connection arrived at `at`.
    pub(crate) fn arrived(&mut self, at: Instant) {
        self.arrived = true;
        if !self.armed {
            self.armed = true;
            self.sleep.as_mut().reset(at + TIMER_ANCHOR);
        }
    }
}

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
    if let Err(e) = socket.bind(addr) {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => ephemeral_hint(addr.port()),
            io::ErrorKind::PermissionDenied => privileged_hint(addr.port()),
            _ => None,
        };
        return Err(match hint {
            Some(hint) => io::Error::new(e.kind(), format!("{e}; {hint}")),
            None => e,
        });
    }
    socket.listen(LISTEN_BACKLOG)
}

/// Why binding a port may be refused: it is below the first port the
/// kernel lets any user bind. Legacy clients often have the port fixed
/// (443, 389), and the hardened unit grants no capability.
fn privileged_hint(port: u16) -> Option<String> {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").ok()?;
    privileged_hint_in(port, &start)
}

fn privileged_hint_in(port: u16, start: &str) -> Option<String> {
    let start: u32 = start.trim().parse().ok()?;
    (u32::from(port) < start).then(|| {
        format!(
            "ports below {start} need the CAP_NET_BIND_SERVICE capability: under systemd, \
             let the socket unit bind the port (systemd/failover-proxy.socket: the service \
             unit grants no capability); elsewhere, grant the process that capability"
        )
    })
}

/// Why a port may be in use with no server on it: it is in the range the
/// kernel draws outgoing connections' local ports from, and an outgoing
/// connection, or its TIME_WAIT after it closed, holds it. SO_REUSEADDR
/// does not help, since the other socket did not set it. Only ports the
/// operator reserved are never drawn.
fn ephemeral_hint(port: u16) -> Option<String> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    ephemeral_hint_in(port, &range, &reserved)
}

fn ephemeral_hint_in(port: u16, range: &str, reserved: &str) -> Option<String> {
    let mut bounds = range.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (first, last) = (bounds.next()??, bounds.next()??);
    let is_reserved = reserved.trim().split(',').any(|r| match r.split_once('-') {
        Some((a, b)) => {
            a.parse().is_ok_and(|a: u16| a <= port) && b.parse().is_ok_and(|b: u16| port <= b)
        }
        None => r.parse() == Ok(port),
    });
    ((first..=last).contains(&port) && !is_reserved).then(|| {
        format!(
            "if no server listens there, an outgoing connection (or its TIME_WAIT) holds \
             the port: {port} is in the kernel's range for their local ports ({first}-{last}); \
             reserve it (sysctl net.ipv4.ip_local_reserved_ports={port}) or listen outside the range"
        )
    })
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
    spread: Arc<Spread>,
) {
    let mut backoff = Backoff::new();
    let mut rejected: u64 = 0;
    let mut last_limit_log: Option<Instant> = None;
    let listen = current.get().cfg.listen;
    let mut anchor = Anchor::new();
    // Rejections over the limit are logged when this is due, summed: so a
    // flood cannot flood the log, and the end of a burst is logged when it
    // ends, not with the next rejection, hours on.
    let limit_flush = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(limit_flush);
    loop {
        // The shutdown branch comes first so that a flood of connections
        // cannot keep the loop from stopping.
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            () = anchor.fired(), if anchor.armed() => continue,
            () = limit_flush.as_mut(), if rejected > 0 => {
                log_rejected(&current.get(), &mut rejected);
                last_limit_log = Some(Instant::now());
                continue;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let arrived = Instant::now();
                backoff.reset();
                anchor.arrived(arrived);
                let route = current.get();
                route.state.metrics.accepted.increment(1);
                match route.limit.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
                        let loops = spread.current();
                        let (to, serving) = loops.pick();
                        let held = (permit, drain.clone(), serving);
                        match to {
                            // Spawned as is, not wrapped in another async
                            // block, which would keep a second copy of serve's
                            // arguments for the connection's whole life. The
                            // permit and the drain guard go with it and are
                            // dropped as it ends.
                            None => {
                                tokio::spawn(serve(
                                    route,
                                    shared,
                                    stream,
                                    ClientAddr(peer),
                                    arrived,
                                    held,
                                ));
                            }
                            Some(other) => {
                                hand_off(other, stream, peer, arrived, route, shared, held)
                            }
                        }
                    }
                    Err(_) => {
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        route
                            .state
                            .metrics
                            .failed(crate::metrics::FailReason::Limit);
                        rejected += 1;
                        if rejected == 1 {
                            // Due now after a quiet interval, else when it
                            // is over: one line a second at most.
                            let due = last_limit_log
                                .map_or(arrived, |t| (t + LIMIT_LOG_INTERVAL).max(arrived));
                            limit_flush.as_mut().reset(due);
                        }
                    }
                }
            }
            Err(e) => {
                if !backoff.after(&e, listen, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    if rejected > 0 {
        log_rejected(&current.get(), &mut rejected);
    }
    tracing::info!(listen = %listen, "listener closed");
}

/// Sends a connection to another event loop, out of this one's.
fn hand_off(
    to: &Other,
    stream: TcpStream,
    peer: SocketAddr,
    arrived: Instant,
    route: Arc<Route>,
    shared: Shared,
    held: Held,
) {
    let (route, held, why) = match stream.into_std() {
        Ok(stream) => match to.conns.send(Handoff {
            stream,
            peer,
            arrived,
            route,
            shared,
            held,
        }) {
            Ok(()) => return,
            // Only a panic there ends a loop's thread.
            Err(mpsc::error::SendError(h)) => {
                (h.route, h.held, "its event loop has stopped".to_string())
            }
        },
        Err(e) => (
            route,
            held,
            format!("cannot take it out of the event loop: {e}"),
        ),
    };
    let (_permit, _drain, serving) = held;
    // Counted on the loop it was meant for, not on this one, where it
    // would be taken off when dropped here.
    std::mem::forget(serving);
    to.load.undo();
    tracing::error!(route = %route.cfg.name, client.addr = %peer, "connection closed: {why}");
}

/// Resets every connection to `listener` (bound to `listen`) until `stop`
/// turns true: for a socket systemd passed that no route serves. systemd
/// holds its own copy of the socket, so the kernel would complete each
/// client's handshake and the client would then wait for an answer that
/// never comes; a reset is what a port with no server gives.
pub async fn park(listener: TcpListener, listen: SocketAddr, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let _ = stream.set_zero_linger();
                tracing::debug!(listen = %listen, client.addr = %peer, "connection reset: no route listens here");
            }
            Err(e) => {
                if !backoff.after(&e, listen, &mut stop).await {
                    break;
                }
            }
        }
    }
}

/// What an accept loop does after a failed accept.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(ACCEPT_BACKOFF_MIN)
    }

    /// An accept succeeded: the next failure waits the least again.
    fn reset(&mut self) {
        self.0 = ACCEPT_BACKOFF_MIN;
    }

    /// After `e`: a connection gone before it was accepted is passed over;
    /// any other error (EMFILE and the like) clears only when other
    /// connections close, so retrying at once would spin: it is logged and
    /// waited out, 10 ms doubling to 1 s. False when `stop` came meanwhile.
    async fn after(
        &mut self,
        e: &io::Error,
        listen: SocketAddr,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        if is_per_connection(e) {
            tracing::debug!(listen = %listen, error = %e, "accept: connection gone before accept");
            return true;
        }
        tracing::warn!(
            listen = %listen,
            error = %e,
            backoff_ms = self.0.as_millis() as u64,
            "accept failed; backing off"
        );
        tokio::select! {
            _ = stopped(stop) => return false,
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(ACCEPT_BACKOFF_MAX);
        true
    }
}

/// One summary line for the connections reset over the limit since the
/// last one.
fn log_rejected(route: &Route, rejected: &mut u64) {
    tracing::warn!(
        route = %route.cfg.name,
        max_connections = route.cfg.max_connections.get(),
        rejected = *rejected,
        "connection limit reached: new connections are reset"
    );
    *rejected = 0;
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::{
        Anchor, Backoff, Duration, Instant, TIMER_ANCHOR, ephemeral_hint_in, privileged_hint_in,
    };
    use std::io;
    use tokio::sync::watch;

    /// An accept that fails for want of descriptors fails again until
    /// connections close: each failure waits, doubling from 10 ms to a
    /// second, and the first wait after a success is short again.
    #[tokio::test(start_paused = true)]
    async fn accept_failures_back_off_doubling_to_a_second_and_a_success_starts_over() {
        let (stop, mut stopping) = watch::channel(false);
        let emfile = io::Error::from_raw_os_error(24);
        let listen = "127.0.0.1:1".parse().unwrap();
        let mut b = Backoff::new();
        let mut waits = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            assert!(b.after(&emfile, listen, &mut stopping).await);
            waits.push(t.elapsed().as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        let t = Instant::now();
        assert!(b.after(&emfile, listen, &mut stopping).await);
        assert_eq!(t.elapsed(), Duration::from_millis(10));
        // A connection gone before it was accepted is passed over at once.
        let t = Instant::now();
        let gone = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert!(b.after(&gone, listen, &mut stopping).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
        // A stop ends the wait: the accept loop ends.
        stop.send(true).unwrap();
        assert!(!b.after(&emfile, listen, &mut stopping).await);
    }

    /// When the anchor is due is all it does: one period after a
    /// connection arrives, again after each period in which one arrived,
    /// and not at all once a period passes without one, so that an idle
    /// proxy is never woken by it.
    #[tokio::test(start_paused = true)]
    async fn the_timer_anchor_stays_due_while_connections_arrive_and_then_lets_go() {
        let mut a = Anchor::new();
        assert!(!a.armed(), "nothing arrived yet");
        let t0 = Instant::now();
        a.arrived(t0);
        assert!(a.armed());
        assert_eq!(a.sleep.deadline(), t0 + TIMER_ANCHOR);
        // A second arrival within the period keeps the deadline.
        tokio::time::advance(TIMER_ANCHOR / 2).await;
        a.arrived(Instant::now());
        assert_eq!(a.sleep.deadline(), t0 + TIMER_ANCHOR);

        a.fired().await;
        assert_eq!(Instant::now(), t0 + TIMER_ANCHOR);
        assert!(a.armed(), "connections arrived in the period: due again");
        assert_eq!(a.sleep.deadline(), t0 + 2 * TIMER_ANCHOR);
        a.fired().await;
        assert_eq!(Instant::now(), t0 + 2 * TIMER_ANCHOR);
        assert!(!a.armed(), "a quiet period: let go");

        // The next arrival, however much later, sets it anew.
        tokio::time::advance(Duration::from_secs(5)).await;
        let t1 = Instant::now();
        a.arrived(t1);
        assert!(a.armed());
        assert_eq!(a.sleep.deadline(), t1 + TIMER_ANCHOR);
    }

    #[test]
    fn a_refused_port_gets_a_hint_only_below_the_unprivileged_start() {
        let hint = privileged_hint_in(443, "1024\n").expect("below the start");
        assert!(
            hint.starts_with("ports below 1024 need the CAP_NET_BIND_SERVICE capability")
                && hint.contains("failover-proxy.socket"),
            "{hint}"
        );
        assert!(privileged_hint_in(1023, "1024").is_some());
        // At or above the start, or where any port is allowed, the refusal
        // has another cause (a security module, say): no hint.
        assert_eq!(privileged_hint_in(1024, "1024"), None);
        assert_eq!(privileged_hint_in(80, "0"), None);
        assert_eq!(privileged_hint_in(80, ""), None);
    }

    #[test]
    fn a_port_in_use_gets_a_hint_only_when_outgoing_connections_can_take_it() {
        let range = "32768\t60999\n";
        let hint = ephemeral_hint_in(41000, range, "\n").expect("in the range");
        assert!(
            hint.contains(": 41000 is in the kernel's range") && hint.contains("(32768-60999)"),
            "{hint}"
        );
        // Both ends of the range are in it.
        assert!(ephemeral_hint_in(32768, range, "").is_some());
        assert!(ephemeral_hint_in(60999, range, "").is_some());
        // Outside it, or reserved (alone or in a span): no outgoing
        // connection takes it, so the hint would mislead.
        for (port, reserved) in [
            (32767, ""),
            (61000, ""),
            (41000, "41000\n"),
            (41000, "8080,40000-42000\n"),
            (42000, "40000-42000"),
        ] {
            assert_eq!(
                ephemeral_hint_in(port, range, reserved),
                None,
                "{port} {reserved:?}"
            );
        }
        assert!(ephemeral_hint_in(42001, range, "40000-42000").is_some());
        // An unreadable range gives no hint rather than a wrong one.
        assert_eq!(ephemeral_hint_in(41000, "", ""), None);
    }
}
