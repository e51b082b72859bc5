//! Every metric name and label in one place (SPEC: Metrics).
//!
//! Per-route handles are registered once when a route starts, so the
//! per-connection path increments atomics instead of hashing label sets.
//! Only the address-labelled series are looked up per event, and their
//! address values only ever come from an answer.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

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
        UPSTREAM_ATTEMPTS,
        "Connection attempts to servers, by result."
    );
    describe_counter!(HEALTH_PROBES, "Active health probes, by result.");
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
    route: String,
    pub accepted: Counter,
    pub active: Gauge,
    failed: [Counter; 3],
    pub failovers: Counter,
    pub connect_duration: Histogram,
    resolve_dns: Histogram,
    resolve_hosts: Histogram,
    resolve_errors: [Counter; 5],
    pub stale: Counter,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    pub connection_duration: Histogram,
    attempts: Mutex<HashMap<(SocketAddr, AttemptResult), Counter>>,
}

/// Attempt counters cached per route.
const MAX_CACHED_SERIES: usize = 1024;

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
            connect_duration: histogram!(UPSTREAM_CONNECT_DURATION, "route" => r.clone()),
            resolve_dns: histogram!(RESOLVE_DURATION, "route" => r.clone(), "source" => "dns"),
            resolve_hosts: histogram!(RESOLVE_DURATION, "route" => r.clone(), "source" => "hosts"),
            resolve_errors: [
                rerr(ResolveErrorKind::NxDomain),
                rerr(ResolveErrorKind::NoRecords),
                rerr(ResolveErrorKind::Timeout),
                rerr(ResolveErrorKind::ServFail),
                rerr(ResolveErrorKind::Other),
            ],
            stale: counter!(RESOLVE_STALE, "route" => r.clone()),
            bytes_to_upstream: counter!(BYTES, "route" => r.clone(), "direction" => "to_upstream"),
            bytes_to_client: counter!(BYTES, "route" => r.clone(), "direction" => "to_client"),
            connection_duration: histogram!(CONNECTION_DURATION, "route" => r.clone()),
            attempts: Mutex::new(HashMap::new()),
            route: r,
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

    /// Counted per connection: the handle is looked up once per address
    /// and result, not built (two strings, a label hash) every time.
    pub fn attempt(&self, addr: SocketAddr, result: AttemptResult) {
        let mut cache = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_SERIES && !cache.contains_key(&(addr, result)) {
            // A churning answer must not grow this without end; the series
            // themselves live on in the recorder.
            cache.clear();
        }
        cache
            .entry((addr, result))
            .or_insert_with(|| {
                counter!(UPSTREAM_ATTEMPTS, "route" => self.route.clone(), "address" => addr.to_string(), "result" => result.as_str())
            })
            .increment(1);
    }

    pub fn probe(&self, addr: SocketAddr, result: AttemptResult) {
        counter!(HEALTH_PROBES, "route" => self.route.clone(), "address" => addr.to_string(), "result" => result.as_str())
            .increment(1);
    }
}

/// Appends the `backend_up` gauge to a scrape: one series per address of
/// each route's last answer, as `/status` shows them, 1 up and 0 known
/// down. It is rendered from the routes at each scrape rather than kept in
/// the recorder, because the recorder never forgets a series: an address
/// taken out of DNS, or a route removed by a reload, would stay at its last
/// value, and an up address only the probes had seen would be missing.
pub fn render_backend_up<'a>(
    out: &mut String,
    routes: impl IntoIterator<Item = (&'a str, &'a [AddrStatus])>,
) {
    let mut header = false;
    for (route, states) in routes {
        let route = sanitize_label_value(route);
        for s in states {
            if !header {
                write_help_line(
                    out,
                    BACKEND_UP,
                    None,
                    None,
                    "1 when an address of the route's last answer is up, 0 when it is known down.",
                );
                write_type_line(out, BACKEND_UP, None, None, "gauge");
                header = true;
            }
            let _ = writeln!(
                out,
                "{BACKEND_UP}{{route=\"{route}\",address=\"{}\"}} {}",
                s.addr,
                u8::from(s.up)
            );
        }
    }
    if header {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn state(addr: &str, up: bool) -> AddrStatus {
        AddrStatus {
            addr: addr.parse().unwrap(),
            up,
            since: SystemTime::now(),
            last_error: None,
        }
    }

    #[test]
    fn the_attempt_handle_cache_is_bounded_and_kept_while_it_has_room() {
        let m = RouteMetrics::new("cache");
        let addr = |i: usize| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80));
        let cached = || m.attempts.lock().unwrap().len();
        for i in 0..MAX_CACHED_SERIES {
            m.attempt(addr(i), AttemptResult::Ok);
            assert_eq!(
                cached(),
                i + 1,
                "every new series is cached while there is room"
            );
        }
        m.attempt(addr(0), AttemptResult::Ok);
        assert_eq!(cached(), MAX_CACHED_SERIES, "a known series clears nothing");
        m.attempt(addr(MAX_CACHED_SERIES), AttemptResult::Ok);
        assert_eq!(cached(), 1, "a new series on a full cache starts it afresh");
    }

    #[test]
    fn backend_up_is_one_family_with_escaped_route_names() {
        let a = [state("10.0.0.1:80", true), state("[::1]:80", false)];
        let b = [state("10.0.0.2:80", false)];
        let mut out = String::from("# earlier families\n\n");
        render_backend_up(&mut out, [("a", &a[..]), ("", &[][..]), ("q\"\\b", &b[..])]);
        assert_eq!(
            out,
            "# earlier families\n\n\
             # HELP failover_proxy_backend_up 1 when an address of the route's last answer is up, 0 when it is known down.\n\
             # TYPE failover_proxy_backend_up gauge\n\
             failover_proxy_backend_up{route=\"a\",address=\"10.0.0.1:80\"} 1\n\
             failover_proxy_backend_up{route=\"a\",address=\"[::1]:80\"} 0\n\
             failover_proxy_backend_up{route=\"q\\\"\\\\b\",address=\"10.0.0.2:80\"} 0\n\n"
        );
        // No address anywhere: no family, not an empty one.
        let mut none = String::new();
        render_backend_up(&mut none, [("a", &[][..])]);
        assert_eq!(none, "");
    }
}
