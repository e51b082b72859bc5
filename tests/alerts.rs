//! The shipped Prometheus alert rules (`config/prometheus-alerts.yml`),
//! evaluated by promtool over what the real binary exports: a renamed
//! metric or label value, or a rule that cannot fire on the proxy's own
//! series, fails here, not silently in an operator's Prometheus.

mod common;

use std::fmt::Write as _;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;

use common::*;

/// The series of a scrape as promtool's `input_series`, as if the scrape
/// had been taken by a job `failover-proxy` every minute for `minutes`
/// minutes with the same traffic each minute: counters (and histograms)
/// grow by their scraped value per minute, gauges keep theirs.
fn as_input_series(scrape: &str, minutes: u32) -> String {
    let mut monotonic = std::collections::HashSet::new();
    let mut out = String::new();
    for line in scrape.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("# TYPE name kind");
            if matches!(kind, "counter" | "histogram" | "summary") {
                monotonic.insert(name.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let Ok(value) = value.parse::<f64>() else {
            panic!("a sample value that is not a number: {line}");
        };
        if !value.is_finite() {
            continue; // promtool's series notation has no NaN or infinities
        }
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, format!(",{rest}")),
            None => (series, "}".to_string()),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| monotonic.contains(*f))
            .unwrap_or(name);
        // Rust's Display of f64 never uses an exponent, which promtool's
        // series notation would read as a `+`/`-` step.
        let values = if monotonic.contains(family) {
            format!("0+{value}x{minutes}")
        } else {
            format!("{value}x{minutes}")
        };
        writeln!(
            out,
            "      - series: '{name}{{instance=\"proxy\",job=\"failover-proxy\"{labels}'\n        values: '{values}'"
        )
        .unwrap();
    }
    writeln!(
        out,
        "      - series: 'up{{instance=\"proxy\",job=\"failover-proxy\"}}'\n        values: '1x{minutes}'"
    )
    .unwrap();
    out
}

/// Runs `promtool test rules` on the shipped rules with `input` and the
/// alerts expected to be firing at the end (name, severity, and route for a
/// route's alert; a process-wide one keeps the job label instead); panics
/// with promtool's report when they differ.
async fn promtool_expects(
    dir: &Path,
    input: &str,
    minutes: u32,
    firing: &[(&str, &str, Option<&str>)],
) {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus-alerts.yml");
    let mut expected = String::new();
    for (alert, severity, route) in firing {
        let which = match route {
            Some(r) => format!("route=\"{r}\""),
            None => "job=\"failover-proxy\"".to_string(),
        };
        writeln!(
            expected,
            "          - labels: 'ALERTS{{alertname=\"{alert}\",alertstate=\"firing\",instance=\"proxy\",{which},severity=\"{severity}\"}}'\n            value: 1"
        )
        .unwrap();
    }
    let file = dir.join("alerts-test.yml");
    std::fs::write(
        &file,
        format!(
            "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}    promql_expr_test:\n      - expr: ALERTS{{alertstate=\"firing\"}}\n        eval_time: {}m\n        exp_samples:\n{expected}",
            rules.display(),
            minutes - 1
        ),
    )
    .unwrap();
    // promtool, from Debian's prometheus package (.ci/run installs it).
    let out = within(
        "promtool",
        tokio::process::Command::new("promtool")
            .arg("test")
            .arg("rules")
            .arg(&file)
            .output(),
    )
    .await
    .expect("promtool is installed (apt-get install prometheus; .ci/run does it)");
    assert!(
        out.status.success(),
        "promtool test rules {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_fire_on_the_proxys_own_series_and_only_where_they_should() {
    let dns = DnsServer::start().await;
    let live = backend(ip(187), "live").await;
    let port = live.addr.port();
    let refusing: Vec<_> = [188, 189, 190]
        .iter()
        .map(|&last| refusing_on(SocketAddr::new(ip(last), port)))
        .collect();
    dns.records("ok.alerts.test", &[ip(187)]);
    dns.records("flaky.alerts.test", &[ip(188), ip(187)]);
    dns.records("down.alerts.test", &[ip(189), ip(190)]);
    dns.set("broken.alerts.test", Behavior::ServFail);
    dns.records("stale.alerts.test", &[ip(187)]);
    dns.records("full.alerts.test", &[ip(187)]);
    // missing.alerts.test: the server's NXDOMAIN.
    let routes = ["ok", "flaky", "down", "missing", "broken", "stale", "full"];
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::new();
    for (i, name) in routes.iter().enumerate() {
        let limit = if *name == "full" { 1 } else { 1000 };
        writeln!(
            toml,
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.{}:0\"\nalias = \"{name}.alerts.test\"\n\
             port = {port}\nmax_connections = {limit}\n",
            180 + i
        )
        .unwrap();
    }
    write!(
        toml,
        "[resolver]\nnameservers = [\"{}\"]\nhosts_file = \"\"\nstale_on_error = \"5m\"\n\n\
         [health]\ninterval = \"0s\"\n\n[log]\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        dns.addr
    )
    .unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, toml).unwrap();
    // An open-file limit low enough for the test to bring the proxy near
    // it (prlimit, from util-linux, runs the proxy in its place).
    const NOFILE: f64 = 128.0;
    // Its lines are read here, and only until it listens: nobody reads them
    // after, so that lines are dropped.
    let (_p, mut stderr) = Running::spawn_unread(
        bin_via("prlimit", &[&format!("--nofile={NOFILE}:{NOFILE}")])
            .arg("--config")
            .arg(&cfg),
    );
    let mut at = std::collections::HashMap::new();
    let mut admin = None;
    let mut line = String::new();
    while at.len() < routes.len() || admin.is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "stderr closed");
        if line.contains("admin endpoint listening") {
            admin = Some(listen_addr(&line));
        } else if line.contains("\"listening\"") {
            let route = routes
                .iter()
                .find(|r| line.contains(&format!("\"route\":\"{r}\"")))
                .unwrap_or_else(|| panic!("a route of the config in {line}"));
            at.insert(*route, listen_addr(&line));
        }
    }
    let admin = admin.unwrap();

    // A good answer for "stale" first, then its DNS fails: the last one
    // stands in.
    assert_eq!(id_via(at["stale"]).await, "live");
    dns.set("stale.alerts.test", Behavior::ServFail);
    let (_, holds_full) = within("a served connection", served_by(at["full"]))
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(id_via(at["ok"]).await, "live");
        assert_eq!(id_via(at["flaky"]).await, "live");
        assert_eq!(id_via(at["stale"]).await, "live");
        for route in ["down", "missing", "broken", "full"] {
            assert_reset(at[route]).await;
        }
    }
    drop(holds_full);
    for route in routes {
        no_connection_open(admin, route).await;
    }
    drop(refusing);

    // Log lines dropped: a pipe holds a few hundred lines, the proxy's
    // queue some thousands, and each connection logs one at `info`.
    let dropped =
        |scrape: &str| sample(scrape, "failover_proxy_log_lines_dropped_total", &[]).unwrap_or(0.0);
    within("log lines dropped", async {
        while dropped(&scrape(admin).await) == 0.0 {
            for _ in 0..1000 {
                assert_eq!(id_via(at["ok"]).await, "live");
            }
        }
    })
    .await;

    // Then past 80 % of the open-file limit: two descriptors a connection.
    let fds = |scrape: &str| sample(scrape, "failover_proxy_process_open_fds", &[]).unwrap();
    let open = fds(&scrape(admin).await);
    let mut held = Vec::new();
    while (open + 2.0 * held.len() as f64) / NOFILE <= 0.85 {
        held.push(id_via_held(at["ok"]).await);
    }
    let scraped = scrape(admin).await;
    assert!(fds(&scraped) / NOFILE > 0.8, "{scraped}");

    const MINUTES: u32 = 30;
    let input = as_input_series(&scraped, MINUTES);
    // Sorted as promtool sorts its samples: by alert name, then labels.
    promtool_expects(
        dir.path(),
        &input,
        MINUTES,
        &[
            ("FailoverProxyAliasMissing", "warning", Some("missing")),
            (
                "FailoverProxyConnectionLimitReached",
                "warning",
                Some("full"),
            ),
            ("FailoverProxyDescriptorsNearLimit", "warning", None),
            ("FailoverProxyDnsFailing", "warning", Some("broken")),
            ("FailoverProxyDnsFailing", "warning", Some("stale")),
            ("FailoverProxyFailoverRateHigh", "warning", Some("flaky")),
            ("FailoverProxyLogLinesDropped", "warning", None),
            ("FailoverProxyRouteUnreachable", "critical", Some("down")),
            ("FailoverProxyServingStale", "warning", Some("stale")),
        ],
    )
    .await;
}

/// A connection through `proxy`, served and held open.
async fn id_via_held(proxy: SocketAddr) -> tokio::net::TcpStream {
    let (id, s) = within("a served connection", served_by(proxy))
        .await
        .expect("connection through the proxy");
    assert_eq!(id, "live");
    s
}
