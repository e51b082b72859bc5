//! Every metric name and label in one place (SPEC: Metrics).
//!
//! Per-route handles are registered once when a route starts, so the
//! per-connection path increments atomics instead of hashing label sets.
//! The address-labelled series are not in the recorder: each route counts
//! attempts and probes in a bounded table of its own, and `backend_up` is
//! read from its last answer, both written out at each scrape. Their
//! address values only ever come from an answer.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_value, write_help_line, write_type_line,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::connect::AttemptResult;
use crate::health::AddrStatus;
use crate::resolve::{ResolveErrorKind, Source};

pub const CONNECTIONS_ACCEPTED: &str = "failover_proxy_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "failover_proxy_connections_active";
pub const CONNECTIONS_FAILED: &str = "failover_proxy_connections_failed_total";
pub const UPSTREAM_ATTEMPTS: &str = "failover_proxy_upstream_connect_attempts_total";
pub const HEALTH_PROBES: &str = "failover_proxy_health_probes_total";
pub const FAILOVERS: &str = "failover_proxy_failovers_total";
pub const UPSTREAM_CONNECT_DURATION: &str = "failover_proxy_upstream_connect_duration_seconds";
pub const RESOLVE_DURATION: &str = "failover_proxy_resolve_duration_seconds";
pub const RESOLVE_ERRORS: &str = "failover_proxy_resolve_errors_total";
pub const RESOLVE_STALE: &str = "failover_proxy_resolve_stale_total";
pub const BYTES: &str = "failover_proxy_bytes_total";
pub const CONNECTION_DURATION: &str = "failover_proxy_connection_duration_seconds";
pub const BACKEND_UP: &str = "failover_proxy_backend_up";
pub const BUILD_INFO: &str = "failover_proxy_build_info";
pub const LOG_LINES_DROPPED: &str = "failover_proxy_log_lines_dropped_total";

/// Connect and resolve times: 100 µs to 10 s.
const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Connection lifetimes: 1 ms to an hour.
const LIFETIME_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

/// Histogram samples a thread records before it has them folded into
/// their buckets: the recorder keeps each sample (tens of bytes) until a
/// fold or a scrape, so this bounds that memory to a few hundred KiB a
/// thread, whether or not anything scrapes.
pub const FOLD_AFTER: u32 = 4096;

thread_local! {
    /// Samples this thread recorded since it last asked for a fold.
    static UNFOLDED: Cell<u32> = const { Cell::new(0) };
}

/// Asks [`fold_samples`] for a fold. Counted, not timed: a timer folding
/// every few seconds woke an idle proxy for nothing.
static FOLD: Notify = Notify::const_new();

/// A histogram whose samples count towards the next fold.
#[derive(Debug)]
pub struct Sampled(Histogram);

impl Sampled {
    pub fn record(&self, value: f64) {
        self.0.record(value);
        // A thread-local count: a shared one would be a contended atomic
        // on every connection. (`try_with`: a thread being torn down
        // skips the count rather than panic.)
        let _ = UNFOLDED.try_with(|n| {
            let count = n.get() + 1;
            if count >= FOLD_AFTER {
                n.set(0);
                FOLD.notify_one();
            } else {
                n.set(count);
            }
        });
    }
}

/// Folds the recorded histogram samples into their buckets each time a
/// thread has recorded [`FOLD_AFTER`]; asleep otherwise.
pub async fn fold_samples(handle: PrometheusHandle) {
    loop {
        FOLD.notified().await;
        handle.run_upkeep();
    }
}

/// The process's own figures (CPU, memory, open descriptors against the
/// limit, threads, start time), as every Prometheus client library gives
/// them, named with this proxy's prefix as the contract wants all names:
/// `failover_proxy_process_open_fds`, and so on. metrics-process reads
/// them; the gauges go through the recorder.
const PROCESS_PREFIX: &str = "failover_proxy_";
const PROCESS_CPU: &str = "failover_proxy_process_cpu_seconds_total";

/// Brings the process gauges and the count of dropped log lines up to
/// date (called at each scrape, the one place either is written) and
/// returns the CPU seconds for [`render_process_cpu`]. The recorder's
/// counters hold whole numbers: through it, a sidecar's CPU time, mostly
/// fractions of a second between scrapes, read 0 after 0.28 s of work.
pub fn collect_process() -> Option<f64> {
    counter!(LOG_LINES_DROPPED).absolute(crate::logging::dropped_lines());
    let m = metrics_process::collector::collect();
    for (name, v) in [
        ("failover_proxy_process_open_fds", m.open_fds),
        ("failover_proxy_process_max_fds", m.max_fds),
        (
            "failover_proxy_process_virtual_memory_bytes",
            m.virtual_memory_bytes,
        ),
        (
            "failover_proxy_process_virtual_memory_max_bytes",
            m.virtual_memory_max_bytes,
        ),
        (
            "failover_proxy_process_resident_memory_bytes",
            m.resident_memory_bytes,
        ),
        (
            "failover_proxy_process_start_time_seconds",
            m.start_time_seconds,
        ),
        ("failover_proxy_process_threads", m.threads),
    ] {
        if let Some(v) = v {
            gauge!(name).set(v as f64);
        }
    }
    m.cpu_seconds_total
}

/// Appends the process's CPU seconds, as a counter with its fraction.
pub fn render_process_cpu(out: &mut String, seconds: Option<f64>) {
    let Some(seconds) = seconds else { return };
    family(
        out,
        PROCESS_CPU,
        "counter",
        "Total user and system CPU time spent in seconds.",
        &format!("{PROCESS_CPU} {seconds}\n"),
    );
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot build the prometheus recorder: {0}")]
    Build(String),
    #[error("another metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

/// Installs the process-wide Prometheus recorder once and returns its
/// handle; later calls (more servers in one test process) share it. Calls
/// racing the first one wait for it, so none gets a handle that renders
/// nothing.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    HANDLE.get_or_init(build_and_install).clone()
}

fn build_and_install() -> Result<PrometheusHandle, MetricsError> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(UPSTREAM_CONNECT_DURATION.into()),
            FAST_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(RESOLVE_DURATION.into()), FAST_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(CONNECTION_DURATION.into()), LIFETIME_BUCKETS)
        })
        .map_err(|e| MetricsError::Build(e.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
    describe();
    // The gauges' help texts; the CPU counter, which the recorder never
    // holds, has its own in render_process_cpu.
    metrics_process::Collector::new(PROCESS_PREFIX).describe();
    // The collector computes the start from the boot time in /proc/stat,
    // which the unit's ProcSubset=pid hides; the recorder's install, at
    // start, stands in for it there (the collector's value wins elsewhere).
    if let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        gauge!("failover_proxy_process_start_time_seconds").set(since.as_secs() as f64);
    }
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS_ACCEPTED, "Client connections accepted.");
    describe_gauge!(CONNECTIONS_ACTIVE, "Client connections open now.");
    describe_counter!(
        CONNECTIONS_FAILED,
        "Client connections reset: the alias did not resolve, no address connected, or the route was at max_connections."
    );
    describe_counter!(
        FAILOVERS,
        "Connections served by other than the first listed address."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_DURATION,
        Unit::Seconds,
        "From accept to upstream connected."
    );
    describe_histogram!(
        RESOLVE_DURATION,
        Unit::Seconds,
        "Alias resolution time, by source."
    );
    describe_counter!(RESOLVE_ERRORS, "Failed or negative resolutions, by kind.");
    describe_counter!(
        RESOLVE_STALE,
        "Resolutions answered with the last good answer because DNS failed."
    );
    describe_counter!(BYTES, "Bytes relayed, by direction.");
    describe_histogram!(
        CONNECTION_DURATION,
        Unit::Seconds,
        "Client connection lifetime."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because stderr was not read fast enough."
    );
}

/// Why a client connection was reset: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    Resolve,
    Connect,
    Limit,
}

/// One route's series.
#[derive(Debug)]
pub struct RouteMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    failed: [Counter; 3],
    pub failovers: Counter,
    pub connect_duration: Sampled,
    resolve_dns: Sampled,
    resolve_hosts: Sampled,
    resolve_errors: [Counter; 5],
    pub stale: Counter,
    /// Bytes to the upstream, then to the client.
    pub bytes: [Counter; 2],
    pub connection_duration: Sampled,
    counted: Mutex<Counted>,
}

/// Addresses whose attempts and probes a route counts. Past this, the
/// address counted least recently is dropped with its series: a churning
/// answer must not grow the process and every scrape without end.
const MAX_COUNTED_ADDRS: usize = 1024;

/// The address-labelled counters of one route. They are kept here and
/// rendered at each scrape (`render_routes`), not in the recorder, which
/// cannot drop a series.
#[derive(Debug, Default)]
struct Counted {
    by_addr: HashMap<SocketAddr, AddrCounts>,
    /// Bumped by every count; orders the addresses by their last one.
    tick: u64,
}

#[derive(Debug, Default)]
struct AddrCounts {
    /// Indexed by `AttemptResult as usize`.
    attempts: [u64; AttemptResult::ALL.len()],
    probes: [u64; AttemptResult::ALL.len()],
    last: u64,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let r = route.to_string();
        let failed = |reason: &'static str| counter!(CONNECTIONS_FAILED, "route" => r.clone(), "reason" => reason);
        let rerr = |kind: ResolveErrorKind| counter!(RESOLVE_ERRORS, "route" => r.clone(), "kind" => kind.as_str());
        RouteMetrics {
            accepted: counter!(CONNECTIONS_ACCEPTED, "route" => r.clone()),
            active: gauge!(CONNECTIONS_ACTIVE, "route" => r.clone()),
            failed: [failed("resolve"), failed("connect"), failed("limit")],
            failovers: counter!(FAILOVERS, "route" => r.clone()),
            connect_duration: Sampled(histogram!(UPSTREAM_CONNECT_DURATION, "route" => r.clone())),
            resolve_dns: Sampled(
                histogram!(RESOLVE_DURATION, "route" => r.clone(), "source" => "dns"),
            ),
            resolve_hosts: Sampled(
                histogram!(RESOLVE_DURATION, "route" => r.clone(), "source" => "hosts"),
            ),
            resolve_errors: [
                rerr(ResolveErrorKind::NxDomain),
                rerr(ResolveErrorKind::NoRecords),
                rerr(ResolveErrorKind::Timeout),
                rerr(ResolveErrorKind::ServFail),
                rerr(ResolveErrorKind::Other),
            ],
            stale: counter!(RESOLVE_STALE, "route" => r.clone()),
            bytes: [
                counter!(BYTES, "route" => r.clone(), "direction" => "to_upstream"),
                counter!(BYTES, "route" => r.clone(), "direction" => "to_client"),
            ],
            connection_duration: Sampled(histogram!(CONNECTION_DURATION, "route" => r.clone())),
            counted: Mutex::new(Counted::default()),
        }
    }

    pub fn failed(&self, reason: FailReason) {
        self.failed[reason as usize].increment(1);
    }

    /// Records one resolution: its time by source, and its error kind.
    pub fn resolved(&self, via: Source, elapsed: Duration, error: Option<ResolveErrorKind>) {
        match via {
            Source::Hosts => self.resolve_hosts.record(elapsed.as_secs_f64()),
            Source::Dns | Source::Stale => self.resolve_dns.record(elapsed.as_secs_f64()),
            Source::Literal => {}
        }
        if let Some(kind) = error {
            self.resolve_errors[kind as usize].increment(1);
        }
    }

    pub fn attempt(&self, addr: SocketAddr, result: AttemptResult) {
        self.count(addr, |c| c.attempts[result as usize] += 1);
    }

    pub fn probe(&self, addr: SocketAddr, result: AttemptResult) {
        self.count(addr, |c| c.probes[result as usize] += 1);
    }

    fn count(&self, addr: SocketAddr, add: impl FnOnce(&mut AddrCounts)) {
        let mut c = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        if c.by_addr.len() >= MAX_COUNTED_ADDRS && !c.by_addr.contains_key(&addr) {
            // Only a full table pays for this scan, once per new address.
            let stalest = c
                .by_addr
                .iter()
                .min_by_key(|(_, v)| v.last)
                .map(|(a, _)| *a);
            if let Some(a) = stalest {
                c.by_addr.remove(&a);
            }
        }
        let e = c.by_addr.entry(addr).or_default();
        e.last = tick;
        add(e);
    }
}

/// What a scrape shows of one route beyond the recorder's series.
pub struct RouteSeries<'a> {
    pub name: &'a str,
    pub metrics: &'a RouteMetrics,
    /// The last answer's addresses and their health, as `/status` has them.
    pub backends: Vec<AddrStatus>,
}

/// Appends the address-labelled families to a scrape. The two counters
/// hold the addresses each route has counted (at most
/// `MAX_COUNTED_ADDRS`). The `backend_up` gauge has one series per address
/// of each route's last answer, 1 up and 0 known down: the recorder would
/// keep an address taken out of DNS, or a route removed by a reload, at its
/// last value, and miss an up address that only the probes had seen.
pub fn render_routes(out: &mut String, routes: &[RouteSeries<'_>]) {
    let mut lines = String::new();
    counters(&mut lines, routes, UPSTREAM_ATTEMPTS, |c| &c.attempts);
    family(
        out,
        UPSTREAM_ATTEMPTS,
        "counter",
        "Connection attempts to servers, by result.",
        &lines,
    );
    lines.clear();
    counters(&mut lines, routes, HEALTH_PROBES, |c| &c.probes);
    family(
        out,
        HEALTH_PROBES,
        "counter",
        "Active health probes, by result.",
        &lines,
    );
    lines.clear();
    for r in routes {
        let route = sanitize_label_value(r.name);
        for s in &r.backends {
            let _ = writeln!(
                lines,
                "{BACKEND_UP}{{route=\"{route}\",address=\"{}\"}} {}",
                s.addr,
                u8::from(s.up)
            );
        }
    }
    family(
        out,
        BACKEND_UP,
        "gauge",
        "1 when an address of the route's last answer is up, 0 when it is known down.",
        &lines,
    );
}

/// The series of one address-labelled counter, every route's addresses in
/// order, a result only once it has counted something (as the recorder
/// shows a series only once it exists).
fn counters(
    lines: &mut String,
    routes: &[RouteSeries<'_>],
    name: &str,
    pick: impl Fn(&AddrCounts) -> &[u64; AttemptResult::ALL.len()],
) {
    for r in routes {
        let route = sanitize_label_value(r.name);
        let c = r.metrics.counted.lock().unwrap_or_else(|p| p.into_inner());
        let mut addrs: Vec<_> = c.by_addr.iter().collect();
        addrs.sort_by_key(|(a, _)| **a);
        for (a, counts) in addrs {
            for (result, n) in AttemptResult::ALL.iter().zip(pick(counts)) {
                if *n > 0 {
                    let _ = writeln!(
                        lines,
                        "{name}{{route=\"{route}\",address=\"{a}\",result=\"{}\"}} {n}",
                        result.as_str()
                    );
                }
            }
        }
    }
}

/// One metric family as the recorder writes them: help, type, the series,
/// a blank line; nothing at all without a series.
fn family(out: &mut String, name: &str, kind: &str, help: &str, lines: &str) {
    if lines.is_empty() {
        return;
    }
    write_help_line(out, name, None, None, help);
    write_type_line(out, name, None, None, kind);
    out.push_str(lines);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::notified_now as ready;
    use std::time::SystemTime;

    #[test]
    fn a_fold_is_asked_for_after_each_fold_after_samples_a_thread_records() {
        // What is under test is the count; no recorder need be installed.
        let h = Sampled(histogram!("fold_count_test"));
        UNFOLDED.with(|n| n.set(0));
        let mut asked = std::pin::pin!(FOLD.notified());
        asked.as_mut().enable();
        for round in 0..2 {
            for _ in 1..FOLD_AFTER {
                h.record(1.0);
            }
            assert!(!ready(asked.as_mut()), "round {round}: asked too soon");
            h.record(1.0);
            assert!(ready(asked.as_mut()), "round {round}: not asked");
            asked.set(FOLD.notified());
            asked.as_mut().enable();
        }
    }

    fn state(addr: &str, up: bool) -> AddrStatus {
        AddrStatus {
            addr: addr.parse().unwrap(),
            up,
            since: SystemTime::now(),
            last_error: None,
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80))
    }

    fn counted(m: &RouteMetrics) -> Vec<SocketAddr> {
        let mut v: Vec<_> = m.counted.lock().unwrap().by_addr.keys().copied().collect();
        v.sort();
        v
    }

    #[test]
    fn a_full_table_drops_the_address_counted_least_recently() {
        let m = RouteMetrics::new("churn");
        for i in 0..MAX_COUNTED_ADDRS {
            m.attempt(addr(i), AttemptResult::Ok);
        }
        assert_eq!(counted(&m).len(), MAX_COUNTED_ADDRS);
        // Counting a known address again drops nothing and makes it the
        // most recent, so the next newcomer replaces address 1, not 0.
        m.probe(addr(0), AttemptResult::Refused);
        assert_eq!(counted(&m).len(), MAX_COUNTED_ADDRS);
        m.attempt(addr(MAX_COUNTED_ADDRS), AttemptResult::Timeout);
        let now = counted(&m);
        assert_eq!(now.len(), MAX_COUNTED_ADDRS);
        assert!(now.contains(&addr(0)) && now.contains(&addr(MAX_COUNTED_ADDRS)));
        assert!(!now.contains(&addr(1)), "the least recently counted goes");
        m.attempt(addr(MAX_COUNTED_ADDRS + 1), AttemptResult::Ok);
        assert!(!counted(&m).contains(&addr(2)));
    }

    #[test]
    fn route_series_are_whole_families_with_escaped_route_names() {
        let a = RouteMetrics::new("a");
        a.attempt(addr(2), AttemptResult::Refused);
        a.attempt(addr(2), AttemptResult::Refused);
        a.attempt(addr(1), AttemptResult::Ok);
        a.probe(addr(1), AttemptResult::Timeout);
        let quoted = RouteMetrics::new("q\"\\b");
        quoted.attempt(addr(3), AttemptResult::Loop);
        let up = [state("10.0.0.1:80", true), state("[::1]:80", false)];
        let down = [state("10.0.0.3:80", false)];
        let mut out = String::from("# earlier families\n\n");
        render_routes(
            &mut out,
            &[
                RouteSeries {
                    name: "a",
                    metrics: &a,
                    backends: up.to_vec(),
                },
                RouteSeries {
                    name: "empty",
                    metrics: &RouteMetrics::new("empty"),
                    backends: Vec::new(),
                },
                RouteSeries {
                    name: "q\"\\b",
                    metrics: &quoted,
                    backends: down.to_vec(),
                },
            ],
        );
        assert_eq!(
            out,
            "# earlier families\n\n\
             # HELP failover_proxy_upstream_connect_attempts_total Connection attempts to servers, by result.\n\
             # TYPE failover_proxy_upstream_connect_attempts_total counter\n\
             failover_proxy_upstream_connect_attempts_total{route=\"a\",address=\"10.0.0.1:80\",result=\"ok\"} 1\n\
             failover_proxy_upstream_connect_attempts_total{route=\"a\",address=\"10.0.0.2:80\",result=\"refused\"} 2\n\
             failover_proxy_upstream_connect_attempts_total{route=\"q\\\"\\\\b\",address=\"10.0.0.3:80\",result=\"loop\"} 1\n\n\
             # HELP failover_proxy_health_probes_total Active health probes, by result.\n\
             # TYPE failover_proxy_health_probes_total counter\n\
             failover_proxy_health_probes_total{route=\"a\",address=\"10.0.0.1:80\",result=\"timeout\"} 1\n\n\
             # HELP failover_proxy_backend_up 1 when an address of the route's last answer is up, 0 when it is known down.\n\
             # TYPE failover_proxy_backend_up gauge\n\
             failover_proxy_backend_up{route=\"a\",address=\"10.0.0.1:80\"} 1\n\
             failover_proxy_backend_up{route=\"a\",address=\"[::1]:80\"} 0\n\
             failover_proxy_backend_up{route=\"q\\\"\\\\b\",address=\"10.0.0.3:80\"} 0\n\n"
        );
        // Nothing counted and no answer: no family at all, not empty ones.
        let mut none = String::new();
        render_routes(
            &mut none,
            &[RouteSeries {
                name: "a",
                metrics: &RouteMetrics::new("a"),
                backends: Vec::new(),
            }],
        );
        assert_eq!(none, "");
    }
}
