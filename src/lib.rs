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
//! [`Server::serve`] serves, applying [`Control`] messages (reload,
//! shutdown) as they come, and drains on shutdown.
//! Tests bind `127.0.0.1:0` and run it in-process.

pub mod admin;
pub mod check;
pub mod config;
pub mod connect;
pub mod health;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod loops;
pub mod metrics;
pub mod relay;
pub mod resolve;
pub mod route;
pub mod service;
pub mod splice;

/// Helpers shared by the unit tests of several modules.
#[cfg(test)]
mod test_util {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    /// Whether `n` has been notified, polled once without waiting.
    pub fn notified_now(n: Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        matches!(
            std::future::Future::poll(n, &mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }
}

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::Config;
use listener::Current;
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
    #[error("cannot listen on {addr} (admin.listen)")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Resolver(#[from] resolve::BuildError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// What the running server is asked to do.
#[derive(Debug)]
pub enum Control {
    /// Apply a new, already validated configuration (SIGHUP).
    Reload(Box<Config>),
    /// Stop accepting, drain, return (SIGTERM, SIGINT); while draining,
    /// stop waiting for open connections (a second signal).
    Shutdown,
}

/// One route's listener and the tasks serving it.
struct Slot {
    current: Arc<Current>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    /// The start-up resolution, then active probes; replaced on reload.
    probes: JoinHandle<()>,
}

/// The admin endpoint's accept loop, and what stops it.
struct AdminServer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Where it is bound.
    addr: Option<SocketAddr>,
}

/// Where a reload moves the admin endpoint.
enum AdminMove {
    Bound(SocketAddr, TcpListener),
    /// The running endpoint holds the port (the same port on another form
    /// of the address: `127.0.0.1:9464` to `0.0.0.0:9464`): bound once it
    /// stops; `was` is where it is bound.
    AfterStop {
        addr: SocketAddr,
        was: SocketAddr,
    },
}

/// A proxy with every listener bound, not yet accepting.
pub struct Server {
    config: Config,
    pending: Vec<(Arc<Route>, TcpListener)>,
    shared: Arc<RwLock<Shared>>,
    admin_listener: Option<TcpListener>,
    /// What the admin endpoint serves: kept whether or not it is on, since
    /// a reload may turn it on.
    admin: Arc<admin::AdminState>,
    /// The metrics recorder's handle, for folding histogram samples
    /// whether or not the admin endpoint serves them.
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    passed: Passed,
    /// The event loops that connections are spread over, this one first.
    loops: Arc<loops::Spread>,
}

/// The listening sockets systemd passed (socket activation).
///
/// systemd keeps its own copy of each for as long as the socket unit runs,
/// so closing the proxy's does not close the socket: the kernel goes on
/// completing clients' handshakes, and with nothing accepting, each client
/// would wait for an answer that never comes. So a copy of each is kept
/// here for the process's life (a route removed by one reload and added
/// back by another takes it again, where binding the address would fail
/// with "address in use"), and a socket that no route serves is parked:
/// its connections are reset at once, as a port with no server refuses.
struct Passed {
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
    parked: HashMap<SocketAddr, (watch::Sender<bool>, JoinHandle<()>)>,
}

impl Passed {
    /// Whether systemd passed a socket for `addr`.
    fn holds(&self, addr: SocketAddr) -> bool {
        self.sockets.iter().any(|(a, _)| *a == addr)
    }

    /// A descriptor of the socket systemd passed for `addr`, if it did,
    /// ready for tokio (systemd passes blocking sockets).
    fn take(&self, addr: SocketAddr) -> Option<io::Result<std::net::TcpListener>> {
        let (_, l) = self.sockets.iter().find(|(a, _)| *a == addr)?;
        Some(l.try_clone().and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }))
    }

    /// Starts resetting the connections to `addr`'s socket, if systemd
    /// passed one: no route serves it now.
    fn park(&mut self, addr: SocketAddr) {
        if self.parked.contains_key(&addr) {
            return;
        }
        let Some(l) = self.take(addr) else { return };
        match l.and_then(TcpListener::from_std) {
            Ok(l) => {
                tracing::warn!(
                    listen = %addr,
                    "systemd passed a socket that no route listens on: its connections are \
                     reset; add a route with this listen, or remove its ListenStream= from \
                     the socket unit"
                );
                let (stop, stop_rx) = watch::channel(false);
                let task = tokio::spawn(listener::park(l, addr, stop_rx));
                self.parked.insert(addr, (stop, task));
            }
            Err(e) => {
                tracing::error!(listen = %addr, error = %e, "cannot park the socket systemd passed; its clients wait unanswered");
            }
        }
    }

    /// Stops resetting `addr`'s connections: a route serves it again. Once
    /// this returns, nothing else accepts on it.
    async fn unpark(&mut self, addr: SocketAddr) {
        if let Some((stop, task)) = self.parked.remove(&addr) {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Stops every parked socket, at shutdown: their clients then wait in
    /// the queue for the next instance, as a route's do.
    async fn unpark_all(&mut self) {
        let addrs: Vec<SocketAddr> = self.parked.keys().copied().collect();
        for addr in addrs {
            self.unpark(addr).await;
        }
    }
}

/// Why `listen` may be in use: systemd passed a socket on another address
/// with its port (`ListenStream=41000`, say, which binds `[::]:41000`),
/// and that socket holds the port. The ephemeral-port hint would mislead.
fn passed_hint(
    e: io::Error,
    listen: SocketAddr,
    passed: &[(SocketAddr, std::net::TcpListener)],
) -> io::Error {
    let holds = |a: &SocketAddr| {
        a.port() == listen.port() && (a.ip().is_unspecified() || listen.ip().is_unspecified())
    };
    match passed.iter().find(|(a, _)| holds(a)) {
        Some((a, _)) if e.kind() == io::ErrorKind::AddrInUse => io::Error::new(
            e.kind(),
            format!(
                "address in use: systemd passed a socket on {a} (the socket unit's \
                 ListenStream=), which holds the port; make the two addresses the same \
                 (ListenStream={listen})"
            ),
        ),
        _ => e,
    }
}

/// A route's listener (taken from systemd's when the address matches) and
/// the address it is bound to (the real port when `listen` asked for 0).
fn bind_route(
    rc: &config::RouteConfig,
    passed: &Passed,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind {
        route: rc.name.clone(),
        addr: rc.listen,
        source,
    };
    let listener = match passed.take(rc.listen) {
        Some(l) => {
            let l = l.map_err(err)?;
            // Inherited by every accepted socket (see listener::bind).
            socket2::SockRef::from(&l)
                .set_tcp_nodelay(true)
                .map_err(err)?;
            tracing::info!(route = %rc.name, listen = %rc.listen, "using the socket passed by systemd");
            TcpListener::from_std(l).map_err(err)?
        }
        None => listener::bind(rc.listen)
            .map_err(|e| passed_hint(e, rc.listen, &passed.sockets))
            .map_err(err)?,
    };
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// The admin endpoint's listener on `addr`: systemd's socket for it if it
/// passed one, else a new one.
fn bind_admin(addr: SocketAddr, passed: &Passed) -> Result<TcpListener, StartError> {
    match passed.take(addr) {
        Some(l) => l.and_then(TcpListener::from_std),
        None => listener::bind(addr),
    }
    .map_err(|source| StartError::AdminBind { addr, source })
}

impl Server {
    /// Builds the resolver, installs the metrics recorder, and binds every
    /// route's listener and the admin endpoint (taking sockets passed by
    /// systemd where their address matches). Nothing is accepted until
    /// [`Server::serve`].
    pub fn bind(config: Config) -> Result<Server, StartError> {
        limits::warn_if_short(&config.routes);
        let handle = metrics::install()?;
        let resolver = Arc::new(Resolver::new(&config.resolver)?);
        let passed = Passed {
            sockets: service::inherited_listeners(),
            parked: HashMap::new(),
        };
        let mut pending = Vec::with_capacity(config.routes.len());
        let mut own = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            let (listener, bound) = bind_route(rc, &passed)?;
            own.push(bound);
            let mut rc = rc.clone();
            rc.listen = bound;
            pending.push((
                Arc::new(Route::new(rc, config.health.clone(), None)),
                listener,
            ));
        }
        let admin_listener = match config.admin.listen {
            None => None,
            Some(addr) => Some(bind_admin(addr, &passed)?),
        };
        let admin = Arc::new(admin::AdminState {
            metrics: handle.clone(),
            routes: RwLock::new(Vec::new()),
        });
        Ok(Server {
            shared: Arc::new(RwLock::new(Shared {
                resolver,
                own: Arc::new(OwnListeners(own)),
                relay: config.runtime.relay,
            })),
            config,
            pending,
            admin_listener,
            admin,
            metrics: handle,
            passed,
            loops: Arc::new(loops::Spread::main_only()),
        })
    }

    /// Spreads the connections accepted from now on over `total` event
    /// loops, this one included: each goes to the one serving the fewest.
    /// Starts the loops it needs; true when the count changed.
    pub fn spread_over(&self, total: usize) -> std::io::Result<bool> {
        let current = self.loops.current();
        if total.max(1) == current.count() {
            return Ok(false);
        }
        self.loops.set(current.resized(total)?);
        Ok(true)
    }

    /// The bound address of each route, in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.pending.iter().map(|(r, _)| r.cfg.listen).collect()
    }

    /// The bound admin address, if the endpoint is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves, applying each [`Control`] as it comes; on `Shutdown` (or
    /// when every sender is gone) stops accepting at once and waits at most
    /// `shutdown.drain_timeout` for open connections.
    pub async fn serve(mut self, mut control: mpsc::Receiver<Control>) {
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        // Histogram samples are kept until a fold (or a scrape) puts them
        // in their buckets: without folds, every connection would leave
        // about 66 bytes behind for good. So they run whether or not the
        // admin endpoint is on.
        let folds = tokio::spawn(crate::metrics::fold_samples(self.metrics.clone()));
        let mut slots: HashMap<SocketAddr, Slot> = HashMap::new();
        let mut order: Vec<SocketAddr> = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for ((route, listener), rc) in pending.into_iter().zip(self.config.routes.clone()) {
            order.push(rc.listen);
            slots.insert(rc.listen, self.start_slot(route, listener, &drain_tx));
        }
        self.publish_routes(&slots, &order);
        let mut admin = self.admin_listener.take().map(|l| self.start_admin(l));
        let served: Vec<SocketAddr> = order
            .iter()
            .copied()
            .chain(self.config.admin.listen)
            .collect();
        let idle: Vec<SocketAddr> = self
            .passed
            .sockets
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| !served.contains(a))
            .collect();
        for addr in idle {
            self.passed.park(addr);
        }
        service::ready();
        let watchdog = service::spawn_watchdog(self.loops.clone());

        // Shutdown, or every sender gone, ends the loop.
        while let Some(Control::Reload(new)) = control.recv().await {
            service::reloading();
            self.reload(*new, &mut slots, &mut order, &mut admin, &drain_tx)
                .await;
            service::ready();
        }

        service::stopping(self.config.shutdown.drain_timeout);
        for slot in slots.values() {
            let _ = slot.stop.send(true);
            slot.probes.abort();
        }
        for (_, slot) in slots {
            let _ = slot.accept.await;
        }
        self.passed.unpark_all().await;
        if let Some(a) = admin {
            let _ = a.stop.send(true);
        }
        if let Some(w) = watchdog {
            w.abort();
        }
        folds.abort();
        drop(drain_tx);
        let drain = self.config.shutdown.drain_timeout;
        tracing::info!(drain_timeout = ?drain, "stopped accepting; draining open connections");
        // A second Shutdown (a second signal) ends the wait at once; a
        // reload asked for now is ignored, and a closed channel changes
        // nothing.
        let stop_now = async {
            while let Some(c) = control.recv().await {
                if matches!(c, Control::Shutdown) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = tokio::time::timeout(drain, drain_rx.recv()) => match r {
                Ok(_) => tracing::info!("all connections finished"),
                Err(_) => {
                    tracing::warn!(drain_timeout = ?drain, "drain timeout: closing the remaining connections")
                }
            },
            () = stop_now => {
                tracing::warn!("stopped waiting: closing the remaining connections")
            }
        }
    }

    /// Shows the admin endpoint the routes serving now, in config order.
    fn publish_routes(&self, slots: &HashMap<SocketAddr, Slot>, order: &[SocketAddr]) {
        *self.admin.routes.write().unwrap_or_else(|p| p.into_inner()) = order
            .iter()
            .filter_map(|k| slots.get(k))
            .map(|s| s.current.clone())
            .collect();
    }

    /// Where the running admin endpoint is bound, if that is why binding
    /// `addr` failed: it holds the port. Not for a socket systemd passed:
    /// systemd keeps its own copy, which stopping the endpoint leaves bound.
    fn held_by(
        &self,
        running: Option<&AdminServer>,
        addr: SocketAddr,
        e: &StartError,
    ) -> Option<SocketAddr> {
        let StartError::AdminBind { source, .. } = e else {
            return None;
        };
        let at = running.and_then(|a| a.addr)?;
        (source.kind() == io::ErrorKind::AddrInUse
            && at.port() == addr.port()
            && !self.passed.holds(at))
        .then_some(at)
    }

    /// Starts serving the admin endpoint on `l`.
    fn start_admin(&self, l: TcpListener) -> AdminServer {
        let addr = l.local_addr().ok();
        if let Some(a) = addr {
            tracing::info!(listen = %a, "admin endpoint listening");
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(admin::serve(
            l,
            self.admin.clone(),
            admin::Limits::default(),
            stop_rx,
        ));
        AdminServer { stop, task, addr }
    }

    fn start_slot(
        &self,
        route: Arc<Route>,
        listener: TcpListener,
        drain: &mpsc::Sender<()>,
    ) -> Slot {
        tracing::info!(
            route = %route.cfg.name,
            listen = %route.cfg.listen,
            alias = %route.cfg.alias,
            port = route.cfg.port,
            "listening"
        );
        let (stop, stop_rx) = watch::channel(false);
        let current = Arc::new(Current::new(route.clone()));
        let accept = tokio::spawn(listener::accept_loop(
            listener,
            current.clone(),
            self.shared.clone(),
            stop_rx,
            drain.clone(),
            self.loops.clone(),
        ));
        let probes = self.start_health(&route);
        Slot {
            current,
            stop,
            accept,
            probes,
        }
    }

    /// Resolves once at start (so `/readyz` and the log know at once), then
    /// runs active probes when `health.interval` is set.
    fn start_health(&self, route: &Arc<Route>) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let interval = route.health_cfg.interval;
        let route = route.clone();
        tokio::spawn(async move {
            let resolver = shared
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .resolver
                .clone();
            let first = match route.resolve(&resolver, std::time::Instant::now()).await {
                Ok(a) => {
                    tracing::info!(route = %route.cfg.name, alias = %route.cfg.alias, source = a.source.as_str(), addrs = ?a.addrs, "alias resolved");
                    route.state.health.track(&a.socket_addrs(route.cfg.port));
                    Some(a)
                }
                Err(e) => {
                    tracing::warn!(route = %route.cfg.name, alias = %route.cfg.alias, error = %e, "alias does not resolve yet");
                    None
                }
            };
            if let Some(interval) = interval {
                route::probe_loop(route, shared, interval, first).await;
            }
        })
    }

    /// Applies a new configuration: routes are matched by `listen`; new ones
    /// start, removed ones stop accepting (their connections drain), changed
    /// ones apply to new connections; a moved admin endpoint moves; a new
    /// number of event loops applies to new connections.
    async fn reload(
        &mut self,
        mut new: Config,
        slots: &mut HashMap<SocketAddr, Slot>,
        order: &mut Vec<SocketAddr>,
        admin: &mut Option<AdminServer>,
        drain: &mpsc::Sender<()>,
    ) {
        let old = &self.config;
        // Built now, installed once every new listener is bound: a failure
        // of either leaves all as it was.
        let resolver = if new.resolver == old.resolver {
            None
        } else {
            match Resolver::new(&new.resolver) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "reload: cannot build the new resolver; keeping the running configuration");
                    return;
                }
            }
        };
        let mut fresh = Vec::new();
        for rc in new
            .routes
            .iter()
            .filter(|rc| !slots.contains_key(&rc.listen))
        {
            match bind_route(rc, &self.passed) {
                Ok((l, bound)) => fresh.push((rc.clone(), l, bound)),
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "reload: keeping the running configuration");
                    return;
                }
            }
        }
        // Bound before anything changes, as a new route's listener is: a
        // port in use leaves the endpoint where it was, unless the endpoint
        // itself holds it.
        let admin_moved = new.admin.listen != old.admin.listen;
        let new_admin = match new.admin.listen.filter(|_| admin_moved) {
            Some(addr) => match bind_admin(addr, &self.passed) {
                Ok(l) => Some(AdminMove::Bound(addr, l)),
                Err(e) => match self.held_by(admin.as_ref(), addr, &e) {
                    Some(was) => Some(AdminMove::AfterStop { addr, was }),
                    None => {
                        tracing::error!(error = %error_chain(&e), "reload: keeping the running configuration");
                        return;
                    }
                },
            },
            None => None,
        };
        // The last step that can fail: a loop started for a reload then
        // refused would hold nothing, but would be a thread.
        if new.runtime.worker_threads != old.runtime.worker_threads {
            let total = loops::event_loops(new.runtime.worker_threads);
            match self.spread_over(total) {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    event_loops = total,
                    "reload: event loops changed; new connections are spread over them"
                ),
                Err(e) => {
                    tracing::error!(
                        runtime.worker_threads = new.runtime.worker_threads,
                        error = %e,
                        "reload: cannot start more event loops; keeping the running configuration"
                    );
                    return;
                }
            }
        }
        if let Some(r) = resolver {
            let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
            // The last good answers go on: a reload made during a DNS
            // outage (to add a server, or to lengthen stale_on_error) must
            // not leave the next connections with no answer at all.
            r.keep_last_good_of(&shared.resolver);
            shared.resolver = Arc::new(r);
        }
        let keep: Vec<SocketAddr> = new.routes.iter().map(|r| r.listen).collect();
        let mut removed = Vec::new();
        for addr in order.iter().filter(|a| !keep.contains(a)) {
            if let Some(slot) = slots.remove(addr) {
                tracing::info!(listen = %addr, "reload: route removed; its open connections drain");
                let _ = slot.stop.send(true);
                slot.probes.abort();
                removed.push((*addr, slot.accept));
            }
        }
        // The listener closes when its accept loop ends: wait for that, so
        // a completed reload (and the READY=1 after it) means the removed
        // routes refuse connections.
        for (addr, accept) in removed {
            let _ = accept.await;
            self.passed.park(addr);
        }
        let mut own: Vec<SocketAddr> = Vec::new();
        for rc in &new.routes {
            if let Some(slot) = slots.get_mut(&rc.listen) {
                let prev = slot.current.get();
                let mut rc = rc.clone();
                rc.listen = prev.cfg.listen;
                own.push(rc.listen);
                if prev.cfg == rc && prev.health_cfg == new.health {
                    continue;
                }
                let route = Arc::new(Route::new(rc, new.health.clone(), Some(&prev)));
                tracing::info!(route = %route.cfg.name, listen = %route.cfg.listen, "reload: route changed; new connections use it");
                slot.current.set(route.clone());
                slot.probes.abort();
                slot.probes = self.start_health(&route);
            }
        }
        for (mut rc, l, bound) in fresh {
            let configured = rc.listen;
            self.passed.unpark(configured).await;
            rc.listen = bound;
            own.push(bound);
            let route = Arc::new(Route::new(rc, new.health.clone(), None));
            slots.insert(configured, self.start_slot(route, l, drain));
        }
        {
            let mut shared = self.shared.write().unwrap_or_else(|p| p.into_inner());
            shared.own = Arc::new(OwnListeners(own));
            shared.relay = new.runtime.relay;
        }
        *order = keep;
        self.publish_routes(slots, order);
        if admin_moved {
            // The old endpoint's open connections (a Prometheus server
            // keeps its scrape connection) are closed once their request is
            // answered: the old address must stop answering.
            if let Some(a) = admin.take() {
                let _ = a.stop.send(true);
                let _ = a.task.await;
            }
            if let Some(was) = old.admin.listen {
                self.passed.park(was);
            }
            match new_admin {
                Some(AdminMove::Bound(addr, l)) => {
                    self.passed.unpark(addr).await;
                    *admin = Some(self.start_admin(l));
                }
                Some(AdminMove::AfterStop { addr, was }) => {
                    let (running, l) = match bind_admin(addr, &self.passed) {
                        Ok(l) => (new.admin.listen, Ok(l)),
                        // Someone else holds it: back where it was, if
                        // that can still be bound.
                        Err(e) => {
                            tracing::error!(error = %error_chain(&e), "reload: admin endpoint not moved; back on its old address");
                            (old.admin.listen, bind_admin(was, &self.passed))
                        }
                    };
                    match l {
                        Ok(l) => *admin = Some(self.start_admin(l)),
                        Err(e) => {
                            tracing::error!(error = %error_chain(&e), "reload: admin endpoint off")
                        }
                    }
                    // What runs, for the next reload to compare against.
                    new.admin.listen = admin.as_ref().and(running);
                }
                None => tracing::info!("reload: admin endpoint off"),
            }
        }
        if new.log.level != old.log.level {
            match logging::set_level(&new.log.level) {
                Ok(logging::LevelChange::Applied) => {
                    tracing::info!(log_level = %new.log.level, "reload: log level changed");
                }
                Ok(logging::LevelChange::EnvWins) => {
                    tracing::warn!(log_level = %new.log.level, "reload: log.level not applied: RUST_LOG is set and wins");
                }
                Err(e) => tracing::error!(error = %e, "reload: log level not changed"),
            }
        }
        if new.log.format != old.log.format {
            logging::set_format(new.log.format);
            tracing::info!(
                log_format = new.log.format.as_str(),
                "reload: log format changed"
            );
        }
        tracing::info!(routes = order.len(), "configuration reloaded");
        limits::warn_if_short(&new.routes);
        self.config = new;
    }
}

/// A mutex's data even if a thread panicked while holding it: every lock in
/// the crate guards plain data that a panic leaves consistent enough to
/// serve from, and one panicked connection must not stop the others.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// "what failed: why: deeper why", the whole cause chain on one line.
/// Some libraries put their cause in their own message too (a `RUST_LOG`
/// parse error did); a cause the line already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// SIGTERM, SIGINT and SIGHUP handlers, installed up front so that a
/// signal arriving during start-up is not lost (nor the process killed by
/// the default action).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Turns signals into [`Control`]s: SIGHUP re-reads the configuration
    /// from `path` (an invalid one is logged and ignored), SIGTERM or SIGINT
    /// asks for shutdown, and a second one while connections drain asks to
    /// stop waiting for them (an operator's second Ctrl-C).
    pub async fn forward(mut self, path: config::ConfigPath, tx: mpsc::Sender<Control>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!(signal = "SIGTERM", "shutting down");
                    break;
                }
                _ = self.int.recv() => {
                    tracing::info!(signal = "SIGINT", "shutting down");
                    break;
                }
                _ = self.hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "reloading the configuration");
                    match config::load(&path) {
                        Ok(c) => {
                            if tx.send(Control::Reload(Box::new(c))).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            for p in &e.problems {
                                tracing::error!(problem = %p, "reload refused: invalid configuration; the running one stays");
                            }
                        }
                    }
                }
            }
        }
        if tx.send(Control::Shutdown).await.is_err() {
            return;
        }
        let signal = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::warn!(signal, "second signal: not waiting for open connections");
        let _ = tx.send(Control::Shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{error_chain, passed_hint};
    use std::io;
    use std::net::SocketAddr;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |source, &text| {
                Some(Layer {
                    text,
                    source: source.map(Box::new),
                })
            })
            .expect("one layer at least")
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        assert_eq!(
            error_chain(&layers(&[
                "cannot listen on 127.0.0.1:1",
                "permission denied"
            ])),
            "cannot listen on 127.0.0.1:1: permission denied"
        );
        // A message that ends with its cause's text: said once.
        assert_eq!(
            error_chain(&layers(&[
                "RUST_LOG=\"x=y\" is not a log filter",
                "invalid level: expected info",
                "expected info",
                "expected info",
            ])),
            "RUST_LOG=\"x=y\" is not a log filter: invalid level: expected info"
        );
    }

    #[test]
    fn a_port_held_by_a_socket_systemd_passed_on_another_address_is_named() {
        // A passed socket bound on the unspecified address (what
        // `ListenStream=PORT` gives) holds the port on every address.
        let held = std::net::TcpListener::bind("127.0.0.164:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let any: SocketAddr = format!("[::]:{port}").parse().unwrap();
        let passed = vec![(any, held)];
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let in_use = || io::Error::new(io::ErrorKind::AddrInUse, "Address in use (os error 98)");
        let e = passed_hint(in_use(), listen, &passed);
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let text = e.to_string();
        assert!(
            text.contains(&format!("systemd passed a socket on [::]:{port}"))
                && text.ends_with(&format!("(ListenStream=127.0.0.1:{port})")),
            "{text}"
        );
        // Another cause, or another port, or two specific addresses (which
        // do not clash): the error as it was.
        let other = io::Error::new(io::ErrorKind::PermissionDenied, "denied");
        assert_eq!(passed_hint(other, listen, &passed).to_string(), "denied");
        let elsewhere: SocketAddr = format!("127.0.0.1:{}", port.wrapping_add(1))
            .parse()
            .unwrap();
        assert!(
            !passed_hint(in_use(), elsewhere, &passed)
                .to_string()
                .contains("systemd")
        );
        let specific = std::net::TcpListener::bind("127.0.0.165:0").unwrap();
        let at = specific.local_addr().unwrap();
        let passed = vec![(at, specific)];
        let beside: SocketAddr = format!("127.0.0.166:{}", at.port()).parse().unwrap();
        assert!(
            !passed_hint(in_use(), beside, &passed)
                .to_string()
                .contains("systemd")
        );
    }
}
