//! One route's shared state and the path of one client connection through
//! it: resolve the alias, order the answer, connect, relay, log.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{HealthConfig, RouteConfig};
use crate::connect::{Attempt, AttemptResult, AttemptsDisplay, connect_staggered};
use crate::health::{AddrStatus, Health, Transition};
use crate::lock;
use crate::metrics::{FailReason, RouteMetrics};
use crate::relay::{Counts, End, relay};
use crate::resolve::{Answer, ResolveError, Resolver, Source};

/// The address of the client side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Addresses the proxy itself listens on, so an answer that points back at
/// one of them is never dialled (SPEC: loop guard).
#[derive(Debug, Clone, Default)]
pub struct OwnListeners(pub Vec<SocketAddr>);

impl OwnListeners {
    /// Whether a connection to `addr` would reach one of our listeners.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        // Where the kernel sends a connect: a v4-mapped address goes to the
        // IPv4 one, and the unspecified address to loopback.
        let ip = match addr.ip().to_canonical() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        self.0.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == ip
                    // A listener on the unspecified address answers on every
                    // address of this host, and one on `::` on IPv4 ones
                    // too (it is not set IPv6-only). A server elsewhere that
                    // uses the same port is not us.
                    || (l.ip().is_unspecified()
                        && (l.is_ipv6() || ip.is_ipv4())
                        && is_local(ip)))
        })
    }
}

/// Whether `ip` is one of this host's addresses. Asked only for an answer
/// on the port of a listener on the unspecified address, so a connection's
/// usual path never pays for it.
///
/// The kernel's route to a local address leaves from that address (all of
/// 127.0.0.0/8 is local, though it leaves from 127.0.0.1). Whether the
/// address can be bound is no test: with `net.ipv4.ip_nonlocal_bind = 1`
/// (hosts running keepalived or a load balancer's floating addresses) any
/// address can, and every server on the listener's port would be skipped
/// as a loop.
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let any = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    // A UDP connect only looks the route up: nothing is sent.
    std::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| {
            s.connect(SocketAddr::new(ip, 9))?;
            s.local_addr()
        })
        .is_ok_and(|from| from.ip() == ip)
}

/// What a route knows that outlives a reload of an unchanged route: health,
/// metrics handles, the open connection count and the last answer.
#[derive(Debug)]
pub struct RouteState {
    pub health: Health,
    pub metrics: RouteMetrics,
    pub active: AtomicUsize,
    /// The last answer: `Some` with no address after NXDOMAIN or an empty
    /// answer; unchanged by a DNS failure.
    pub answer: Mutex<Option<Answer>>,
    /// Stale answers given (while DNS fails they are given at once).
    stale_log: Summed,
    /// Connections reset because the alias did not resolve.
    unresolved_log: Summed,
    /// Connections reset because no address connected.
    unreachable_log: Summed,
    /// Answer addresses found to be this proxy's own listeners, each
    /// logged once: a configuration's fault, there for good until it is
    /// changed, so a line per connection would say nothing new.
    loops_logged: Mutex<Vec<SocketAddr>>,
}

/// Events that can come once per connection are logged summed: a client
/// that reconnects at once after each reset, through an outage of the
/// whole cluster, would otherwise write a WARN line per connection,
/// thousands a second (11,040 in 2 s, measured), which fills disks and
/// trips journald's rate limit, which then drops the lines that matter.
/// The first event of an episode is logged at once, then one line a second
/// at most with the count since the last: the count of a second that saw
/// events is logged when the second is over, whether or not more come
/// (clients that give up would otherwise leave it unsaid until the
/// episode ends), and one more line when the episode ends, with those not
/// logged yet.
#[derive(Debug, Default)]
struct Summed(Arc<SummedInner>);

#[derive(Debug, Default)]
struct SummedInner {
    state: Mutex<SummedState>,
    /// An episode is open: the usual path checks this, not the lock.
    open: AtomicBool,
}

#[derive(Debug, Default)]
struct SummedState {
    /// Events since the last line.
    unlogged: u64,
    /// tokio's clock, so that tests can run it paused.
    last_line: Option<tokio::time::Instant>,
    /// A line for the events held back is due at the end of the second.
    flush_due: bool,
    /// Counts the episodes ended, so that a line due for one is not made
    /// for the next.
    episode: u64,
}

const SUMMED_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl Summed {
    /// Counts one event, and makes the line for it when one is due: now,
    /// for this event and those since the last line, or, when the line is
    /// held back, at the end of the second with the count by then, unless
    /// the episode has ended (its end line says them). `line` is asked for
    /// only then: at most twice a second, not per event.
    fn count<F>(&self, line: impl FnOnce() -> F)
    where
        F: FnOnce(u64) + Send + 'static,
    {
        let mut st = lock(&self.0.state);
        st.unlogged += 1;
        if let Some(t) = st.last_line
            && t.elapsed() < SUMMED_LOG_INTERVAL
        {
            if !st.flush_due {
                st.flush_due = true;
                let (inner, episode, line) = (self.0.clone(), st.episode, line());
                tokio::spawn(async move {
                    tokio::time::sleep_until(t + SUMMED_LOG_INTERVAL).await;
                    if let Some(n) = inner.flush(episode) {
                        line(n);
                    }
                });
            }
            return;
        }
        self.0.open.store(true, Ordering::Relaxed);
        st.last_line = Some(tokio::time::Instant::now());
        let n = std::mem::take(&mut st.unlogged);
        drop(st);
        line()(n);
    }

    /// Ends an episode: `Some(n)` when one was open, `n` events not logged
    /// yet.
    fn end(&self) -> Option<u64> {
        if !self.0.open.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = lock(&self.0.state);
        if !self.0.open.swap(false, Ordering::Relaxed) {
            return None;
        }
        let n = st.unlogged;
        *st = SummedState {
            episode: st.episode.wrapping_add(1),
            ..SummedState::default()
        };
        Some(n)
    }
}

impl SummedInner {
    /// The events held back, when the line for them is due and still
    /// theirs to make.
    fn flush(&self, episode: u64) -> Option<u64> {
        let mut st = lock(&self.state);
        if st.episode != episode || !st.flush_due {
            return None;
        }
        st.flush_due = false;
        if st.unlogged == 0 {
            return None;
        }
        st.last_line = Some(tokio::time::Instant::now());
        Some(std::mem::take(&mut st.unlogged))
    }
}

#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    pub health_cfg: HealthConfig,
    pub state: Arc<RouteState>,
    /// Permits for `max_connections`. A reload that changes the limit makes
    /// a new semaphore: connections already open keep their old permits.
    pub limit: Arc<Semaphore>,
}

impl Route {
    /// A route for `cfg`, keeping `previous`'s state when it serves the same
    /// alias and port under the same name (a reload that changed only
    /// timeouts or limits must not forget which servers are down).
    pub fn new(cfg: RouteConfig, health_cfg: HealthConfig, previous: Option<&Route>) -> Route {
        let state = match previous {
            Some(p)
                if p.cfg.name == cfg.name
                    && p.cfg.alias == cfg.alias
                    && p.cfg.port == cfg.port
                    && p.health_cfg.retry_down_after == health_cfg.retry_down_after =>
            {
                p.state.clone()
            }
            _ => Arc::new(RouteState {
                health: Health::new(health_cfg.retry_down_after),
                metrics: RouteMetrics::new(&cfg.name),
                active: AtomicUsize::new(0),
                answer: Mutex::new(None),
                stale_log: Summed::default(),
                unresolved_log: Summed::default(),
                unreachable_log: Summed::default(),
                loops_logged: Mutex::new(Vec::new()),
            }),
        };
        let limit = match previous {
            Some(p) if p.cfg.max_connections == cfg.max_connections => p.limit.clone(),
            _ => Arc::new(Semaphore::new(cfg.max_connections.get() as usize)),
        };
        Route {
            cfg,
            health_cfg,
            state,
            limit,
        }
    }

    /// Resolves the alias now, recording metrics and the last answer. Used
    /// by connections and active probes alike. `arrived` is when the
    /// connection was accepted (see [`Resolver::resolve_for`]).
    pub async fn resolve(
        &self,
        resolver: &Arc<Resolver>,
        arrived: std::time::Instant,
    ) -> Result<Answer, ResolveError> {
        let r = resolver.resolve_for(&self.cfg.alias, arrived).await;
        let m = &self.state.metrics;
        let error = r.stale_because.as_ref().map(|e| e.kind()).or(r
            .result
            .as_ref()
            .err()
            .map(|e| e.kind()));
        m.resolved(r.via, r.elapsed, error);
        if let Some(e) = &r.stale_because {
            m.stale.increment(1);
            self.state.stale_log.count(|| {
                let (name, alias, error) =
                    (self.cfg.name.clone(), self.cfg.alias.clone(), e.to_string());
                move |n: u64| {
                    tracing::warn!(
                        route = %name,
                        alias = %alias,
                        error = %error,
                        stale_answers = n,
                        "dns failed; using the last good answer"
                    );
                }
            });
        } else if r.via == Source::Dns
            && !matches!(&r.result, Err(e) if e.kind().is_failure())
            && let Some(n) = self.state.stale_log.end()
        {
            tracing::info!(
                route = %self.cfg.name,
                alias = %self.cfg.alias,
                stale_answers = n,
                "dns answers again"
            );
        }
        match &r.result {
            Ok(a) => {
                // Every connection passes here: the usual unchanged answer
                // only updates its time instead of being copied again.
                let mut last = lock(&self.state.answer);
                match last.as_mut() {
                    Some(l) if l.source == a.source && l.addrs == a.addrs => l.at = a.at,
                    _ => *last = Some(a.clone()),
                }
            }
            Err(e) if !e.kind().is_failure() => {
                *lock(&self.state.answer) = Some(Answer {
                    source: r.via,
                    addrs: Vec::new(),
                    at: std::time::SystemTime::now(),
                });
            }
            Err(_) => {}
        }
        r.result
    }

    /// Applies attempt results to health and metrics.
    pub fn record_attempts(&self, attempts: &[Attempt]) {
        let now = Instant::now();
        let st = &self.state;
        for a in attempts {
            st.metrics.attempt(a.addr, a.result);
            if a.result == AttemptResult::Ok {
                if st.health.mark_up(a.addr) {
                    self.transition(a.addr, Transition::CameUp, "connected");
                }
            } else if a.result.marks_down() && st.health.mark_down(a.addr, now, a.result.as_str()) {
                self.transition(a.addr, Transition::WentDown, a.result.as_str());
            } else if a.result == AttemptResult::Loop {
                let mut logged = lock(&st.loops_logged);
                if !logged.contains(&a.addr) {
                    logged.push(a.addr);
                    tracing::warn!(
                        route = %self.cfg.name,
                        alias = %self.cfg.alias,
                        upstream.addr = %a.addr,
                        "the alias answers with this proxy's own listener: that address is never \
                         dialled (loop guard); connections that skip it log no more warnings"
                    );
                }
            }
        }
    }

    pub fn transition(&self, addr: SocketAddr, t: Transition, why: &str) {
        match t {
            Transition::CameUp => {
                tracing::info!(route = %self.cfg.name, upstream.addr = %addr, why, "address up");
            }
            Transition::WentDown => {
                tracing::warn!(route = %self.cfg.name, upstream.addr = %addr, why, "address marked down");
            }
        }
    }

    /// The last answer and the state of each of its addresses, in its
    /// order: what `/status`, `/readyz` and the `backend_up` gauge show.
    /// An address in `own` shows as down with error `loop`: the loop guard never dials
    /// it, so it serves no client, though health leaves it alone (the loop
    /// is the configuration's fault, not a server's).
    pub fn answer_states(&self, own: &OwnListeners) -> (Option<Answer>, Vec<AddrStatus>) {
        let answer = lock(&self.state.answer).clone();
        let Some(a) = &answer else {
            return (None, Vec::new());
        };
        let addrs = a.socket_addrs(self.cfg.port);
        let mut states = self.state.health.status(&addrs);
        for s in states.iter_mut().filter(|s| own.contains(s.addr)) {
            *s = AddrStatus {
                addr: s.addr,
                up: false,
                since: a.at,
                last_error: Some(AttemptResult::Loop.as_str()),
            };
        }
        (answer, states)
    }

    /// Whether the route can serve: resolved at least once, and one address
    /// of the last answer is neither known to be down nor one of `own`.
    /// `Err` says why not.
    pub fn ready(&self, own: &OwnListeners) -> Result<(), String> {
        let (answer, states) = self.answer_states(own);
        readiness(answer.as_ref(), &states)
    }
}

/// [`Route::ready`] from what [`Route::answer_states`] gave, for a caller
/// that has them already.
pub fn readiness(answer: Option<&Answer>, states: &[AddrStatus]) -> Result<(), String> {
    match answer {
        None => Err("alias not resolved yet".into()),
        Some(_) if states.is_empty() => Err("alias has no address".into()),
        Some(_) if states.iter().all(|s| !s.up) => {
            let looped = |s: &AddrStatus| s.last_error == Some(AttemptResult::Loop.as_str());
            Err(if states.iter().all(looped) {
                "every address is this proxy's own listener".into()
            } else {
                "every address is down".into()
            })
        }
        _ => Ok(()),
    }
}

/// Everything one connection needs, cheap to clone per connection.
#[derive(Clone, Debug)]
pub struct Shared {
    pub resolver: Arc<Resolver>,
    pub own: Arc<OwnListeners>,
    pub relay: crate::relay::Mode,
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

/// Counts a connection as active for as long as it lives.
struct Active<'a>(&'a RouteState);

impl<'a> Active<'a> {
    fn new(st: &'a RouteState) -> Active<'a> {
        st.active.fetch_add(1, Ordering::Relaxed);
        st.metrics.active.increment(1.0);
        Active(st)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.decrement(1.0);
    }
}

/// Serves one client connection to its end. Errors here are logged and
/// never bubble up: one connection cannot affect the accept loop. `held`
/// is dropped when the connection ends.
///
/// This future is the connection's task, and for an idle connection it is
/// nearly all the memory the connection holds. So it is an `async move`
/// block (an `async fn` keeps a second copy of its arguments), and
/// resolving and connecting run in a future of their own, whose state
/// shares room with the relay's instead of adding to it.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn serve(
    route: Arc<Route>,
    shared: Shared,
    mut client: TcpStream,
    peer: ClientAddr,
    arrived: Instant,
    held: impl Send + 'static,
) -> impl Future<Output = ()> + Send {
    async move {
        // Whatever the caller needs kept until the connection ends (its
        // max_connections permit, its drain guard) goes when this does:
        // naming it moves it in, and a binding would be a second copy.
        let _ = &held;
        // Timed from the accept (`arrived`): the connection's time in the
        // run queue is part of what its client waits.
        let _active = Active::new(&route.state);
        let Some((mut upstream, addr, attempts)) =
            resolve_and_connect(&route, &shared, peer, arrived).await
        else {
            reset(client);
            return;
        };
        // TCP_NODELAY comes from the listener (listener::bind).
        let counts = Counts::new(&route.state.metrics.bytes);
        let (end, error) = relay(
            &mut client,
            &mut upstream,
            route.cfg.idle_timeout,
            &counts,
            shared.relay,
        )
        .await;
        if let Some(e) = error {
            tracing::debug!(route = %route.cfg.name, client.addr = %peer.0, error = %e, "relay ended by an error");
        }
        log_end(
            &route,
            peer,
            Some(addr),
            &attempts,
            Some(&counts),
            arrived,
            Outcome::Relayed(end),
        );
    }
}

/// Resolves the route's alias and connects to the first address that
/// answers. `None` when the connection cannot be served: that is logged
/// and counted here, and the caller resets the client.
async fn resolve_and_connect(
    route: &Route,
    shared: &Shared,
    peer: ClientAddr,
    started: Instant,
) -> Option<(TcpStream, SocketAddr, Vec<Attempt>)> {
    let cfg = &route.cfg;
    let st = &route.state;
    let answer = match route.resolve(&shared.resolver, started.into_std()).await {
        Ok(a) => {
            if let Some(n) = st.unresolved_log.end() {
                tracing::info!(route = %cfg.name, alias = %cfg.alias, resets = n, "alias resolves again");
            }
            a
        }
        Err(e) => {
            st.unresolved_log.count(|| {
                let (name, alias, error, kind) = (
                    cfg.name.clone(),
                    cfg.alias.clone(),
                    e.to_string(),
                    e.kind().as_str(),
                );
                move |n: u64| {
                    tracing::warn!(
                        route = %name,
                        client.addr = %peer.0,
                        alias = %alias,
                        error = %error,
                        error.kind = kind,
                        resets = n,
                        "connection reset: alias did not resolve"
                    );
                }
            });
            st.metrics.failed(FailReason::Resolve);
            log_end(
                route,
                peer,
                None,
                &[],
                None,
                started,
                Outcome::ResolveFailed,
            );
            return None;
        }
    };

    let plan = st
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
    route.record_attempts(&attempts);
    for r in &plan.retries {
        if !attempts.iter().any(|a| a.addr == *r) {
            st.health.release_retry(*r);
        }
    }

    let Some((upstream, addr)) = connected else {
        st.unreachable_log.count(|| {
            let (name, tried) = (cfg.name.clone(), AttemptsDisplay(&attempts).to_string());
            move |n: u64| {
                tracing::warn!(
                    route = %name,
                    client.addr = %peer.0,
                    attempts = %tried,
                    resets = n,
                    "connection reset: no server reachable"
                );
            }
        });
        st.metrics.failed(FailReason::Connect);
        log_end(
            route,
            peer,
            None,
            &attempts,
            None,
            started,
            Outcome::NoUpstream,
        );
        return None;
    };
    if let Some(n) = st.unreachable_log.end() {
        tracing::info!(route = %cfg.name, upstream.addr = %addr, resets = n, "a server is reachable again");
    }
    st.metrics
        .connect_duration
        .record(started.elapsed().as_secs_f64());
    if let Some(first) = plan.first
        && first != addr
    {
        st.metrics.failovers.increment(1);
        // Only a failover this connection went through is worth a WARN:
        // one that merely skipped an address already known down, or one of
        // this proxy's own listeners, would log a line per connection for
        // as long as that lasts, after the one line that said so.
        if attempts
            .iter()
            .any(|a| !matches!(a.result, AttemptResult::Ok | AttemptResult::Loop))
        {
            tracing::warn!(
                route = %cfg.name,
                client.addr = %peer.0,
                upstream.addr = %addr,
                first = %first,
                attempts = %AttemptsDisplay(&attempts),
                "failover: served by other than the first address"
            );
        }
    }
    Some((upstream, addr, attempts))
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
    counts: Option<&Counts<'_>>,
    started: Instant,
    outcome: Outcome,
) {
    let elapsed = started.elapsed();
    route
        .state
        .metrics
        .connection_duration
        .record(elapsed.as_secs_f64());
    tracing::info!(
        route = %route.cfg.name,
        client.addr = %peer.0,
        upstream.addr = upstream.map(tracing::field::display),
        attempts = %AttemptsDisplay(attempts),
        bytes.to_upstream = counts.map_or(0, |c| c.to_upstream.load(Ordering::Relaxed)),
        bytes.to_client = counts.map_or(0, |c| c.to_client.load(Ordering::Relaxed)),
        // Whole microseconds over 1000 print as written (`0.098437`);
        // seconds times 1000 carry binary noise (`0.09843700000000001`).
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        end = outcome.as_str(),
        "connection closed"
    );
}

/// Active health: every `interval`, resolve the alias the way connections
/// do and probe each address with a TCP connect, spreading the probes over
/// the interval so a large answer is not hit all at once.
///
/// `shared` is read afresh each round: a reload replaces the resolver and
/// the list of the proxy's own listeners without restarting the probes of
/// a route it leaves unchanged. `first` is an answer just had (the route's
/// start-up resolution), which the first round probes instead of asking
/// again.
pub async fn probe_loop(
    route: Arc<Route>,
    shared: Arc<RwLock<Shared>>,
    interval: Duration,
    mut first: Option<Answer>,
) {
    let cfg = &route.cfg;
    loop {
        let round = Instant::now();
        let shared = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
        let answer = match first.take() {
            Some(a) => Ok(a),
            None => {
                route
                    .resolve(&shared.resolver, std::time::Instant::now())
                    .await
            }
        };
        match answer {
            Ok(answer) => {
                let addrs = answer.socket_addrs(cfg.port);
                route.state.health.track(&addrs);
                let n = addrs.len().max(1) as u32;
                for (i, addr) in addrs.into_iter().enumerate() {
                    // Never probe ourselves: the loop guard applies here too.
                    if shared.own.contains(addr) {
                        continue;
                    }
                    tokio::time::sleep_until(round + interval * i as u32 / n).await;
                    let route = route.clone();
                    tokio::spawn(async move {
                        let result = match crate::connect::connect_one(
                            addr,
                            route.cfg.connect_timeout,
                        )
                        .await
                        {
                            // Closed at once: a probe never holds a connection.
                            Ok(stream) => {
                                drop(stream);
                                AttemptResult::Ok
                            }
                            Err(e) => crate::connect::classify(&e),
                        };
                        route.state.metrics.probe(addr, result);
                        let hc = &route.health_cfg;
                        let error = (result != AttemptResult::Ok).then_some(result.as_str());
                        if let Some(t) = route.state.health.probed(
                            addr,
                            error,
                            hc.down_after.get(),
                            hc.up_after.get(),
                            Instant::now(),
                        ) {
                            route.transition(
                                addr,
                                t,
                                if error.is_some() {
                                    "probe failed"
                                } else {
                                    "probe succeeded"
                                },
                            );
                        }
                    });
                }
            }
            Err(e) => {
                tracing::debug!(route = %cfg.name, error = %e, "health: alias did not resolve");
            }
        }
        tokio::time::sleep_until(round + interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{OwnListeners, Summed};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A `count` whose lines are recorded in `lines`: `Some(n)` when it
    /// made one at once, for `n` events.
    fn count(s: &Summed, lines: &Arc<Mutex<Vec<u64>>>) -> Option<u64> {
        let before = lines.lock().unwrap().len();
        s.count(|| {
            let lines = lines.clone();
            move |n| lines.lock().unwrap().push(n)
        });
        // A held-back line is made by a task, never during the call.
        let mut made = lines.lock().unwrap();
        (made.len() > before).then(|| made.pop()).flatten()
    }

    /// Lets the flush tasks due by now run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_back_count_is_said_when_its_second_is_over_and_only_in_its_episode() {
        let s = Summed::default();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let taken = || std::mem::take(&mut *lines.lock().unwrap());
        // The first at once; the next three held back, said a second on.
        assert_eq!(count(&s, &lines), Some(1));
        for _ in 0..3 {
            assert_eq!(count(&s, &lines), None);
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        settle().await;
        assert!(taken().is_empty(), "not before the second is over");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(taken(), vec![3]);
        // That line starts the next second: one held back, said then.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(count(&s, &lines), None);
        tokio::time::advance(Duration::from_millis(500)).await;
        settle().await;
        assert_eq!(taken(), vec![1]);

        // An episode that ends first says the count in its end line; the
        // line due for it is not made, in this episode or the next.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(count(&s, &lines), Some(1));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(count(&s, &lines), None);
        assert_eq!(s.end(), Some(1));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(count(&s, &lines), Some(1), "a new episode: at once");
        assert_eq!(count(&s, &lines), None);
        // The ended episode's line would have been due now.
        tokio::time::advance(Duration::from_millis(800)).await;
        settle().await;
        assert!(taken().is_empty(), "the ended episode's line made");
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert_eq!(taken(), vec![1]);
        assert_eq!(s.end(), Some(0));
    }

    #[test]
    fn own_listeners_match_by_port_and_address_or_a_local_address() {
        let own = OwnListeners(vec![
            "127.0.0.1:41000".parse().unwrap(),
            "0.0.0.0:41001".parse().unwrap(),
            "[::]:41002".parse().unwrap(),
        ]);
        let is_own = |a: &str| own.contains(a.parse().unwrap());
        // The listener itself, and the addresses a connect takes to it.
        assert!(is_own("127.0.0.1:41000"));
        assert!(is_own("0.0.0.0:41000"));
        assert!(is_own("[::ffff:127.0.0.1]:41000"));
        // The example config's case: a server on the listener's address but
        // another port must be dialled.
        assert!(!is_own("127.0.0.1:8000"));
        // Another address on the listener's port is someone else.
        assert!(!is_own("127.0.0.2:41000"));
        // A listener on 0.0.0.0 answers on every IPv4 address of this host...
        assert!(is_own("127.0.0.9:41001"));
        assert!(!is_own("127.0.0.9:41003"));
        // ...but a server elsewhere on the same port is not us (192.0.2.1,
        // TEST-NET-1, is never a host's address; nothing is sent to it)...
        assert!(!is_own("192.0.2.1:41001"));
        // ...nor is anything on IPv6.
        assert!(!is_own("[::1]:41001"));
        // A listener on `::` takes IPv4 connections too.
        assert!(is_own("127.0.0.9:41002"));
        assert!(!is_own("192.0.2.1:41002"));
    }
}
