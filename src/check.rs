//! `failover-proxy check`: resolve every route's alias now, try every
//! address once, print a table.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::config::{Config, RouteConfig};
use crate::connect::{AttemptResult, classify, connect_one};
use crate::resolve::{BuildError, Resolver};
use crate::route::OwnListeners;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub route: String,
    pub address: String,
    pub source: String,
    pub result: String,
    pub time: Duration,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Routes with no address that connected.
    pub unreachable: Vec<String>,
}

impl Report {
    pub fn all_reachable(&self) -> bool {
        self.unreachable.is_empty()
    }

    pub fn table(&self) -> String {
        let header = ["route", "address", "source", "result", "time_ms"];
        let cells: Vec<[String; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.route.clone(),
                    r.address.clone(),
                    r.source.clone(),
                    r.result.clone(),
                    format!("{:.1}", r.time.as_secs_f64() * 1000.0),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = String::new();
        let mut line = |cols: [&str; 5]| {
            let mut l = String::new();
            for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
                if i + 1 == cols.len() {
                    let _ = write!(l, "{c:>w$}");
                } else {
                    let _ = write!(l, "{c:<w$}  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(header);
        for row in &cells {
            line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
        }
        for r in self.rows.iter().filter(|r| r.detail.is_some()) {
            let _ = writeln!(out, "# {}: {}", r.route, r.detail.as_deref().unwrap_or(""));
        }
        out
    }
}

/// Resolves and probes every route, all routes and addresses concurrently.
pub async fn run(config: &Config) -> Result<Report, BuildError> {
    let resolver = Arc::new(Resolver::new(&config.resolver)?);
    let own = Arc::new(OwnListeners(
        config.routes.iter().map(|r| r.listen).collect(),
    ));
    let mut routes = JoinSet::new();
    for (i, route) in config.routes.iter().cloned().enumerate() {
        let (resolver, own) = (resolver.clone(), own.clone());
        routes.spawn(async move { (i, check_route(route, &resolver, own).await) });
    }
    let mut per_route: Vec<(usize, Vec<Row>)> = routes.join_all().await;
    per_route.sort_by_key(|(i, _)| *i);

    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    for (route, (_, route_rows)) in config.routes.iter().zip(per_route) {
        if !route_rows
            .iter()
            .any(|r| r.result == AttemptResult::Ok.as_str())
        {
            unreachable.push(route.name.clone());
        }
        rows.extend(route_rows);
    }
    Ok(Report { rows, unreachable })
}

async fn check_route(
    route: RouteConfig,
    resolver: &Arc<Resolver>,
    own: Arc<OwnListeners>,
) -> Vec<Row> {
    let res = resolver.resolve(&route.alias).await;
    let answer = match res.result {
        Ok(a) => a,
        Err(e) => {
            return vec![Row {
                route: route.name.clone(),
                address: "-".into(),
                source: "dns".into(),
                result: AttemptResult::Error.as_str().into(),
                time: res.elapsed,
                detail: Some(format!("{e} ({})", e.kind().as_str())),
            }];
        }
    };
    let source = answer.source.as_str();
    let mut probes = JoinSet::new();
    for (i, addr) in answer.socket_addrs(route.port).into_iter().enumerate() {
        let own = own.clone();
        let timeout = route.connect_timeout;
        probes.spawn(async move {
            if own.contains(addr) {
                let detail = format!("{addr} is this proxy's own listener");
                return (i, addr, AttemptResult::Loop, Duration::ZERO, Some(detail));
            }
            let started = Instant::now();
            let r = connect_one(addr, timeout).await;
            let time = started.elapsed();
            match r {
                Ok(_) => (i, addr, AttemptResult::Ok, time, None),
                Err(e) => (i, addr, classify(&e), time, Some(format!("{addr}: {e}"))),
            }
        });
    }
    let mut results = probes.join_all().await;
    results.sort_by_key(|r| r.0);
    results
        .into_iter()
        .map(|(_, addr, result, time, detail)| Row {
            route: route.name.clone(),
            address: addr.to_string(),
            source: source.into(),
            result: result.as_str().into(),
            time,
            detail,
        })
        .collect()
}
