//! Operating the proxy: Prometheus metrics, `/readyz`, `/status`, `/healthz`
//! and active health, through the admin endpoint of an in-process proxy.
//! The metrics recorder is process-wide, so each test uses its own route
//! names and asserts only on its own series.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_scrape_after_failover_shows_the_counters_with_their_labels() {
    let dns = DnsServer::start().await;
    let (_hold, dead) = refusing(ip(71));
    let port = dead.port();
    let _live = backend_on(SocketAddr::new(ip(72), port), "b72").await;
    let (_hold2, gone) = refusing(ip(73));
    dns.records("mf.test", &[ip(71), ip(72)]);
    dns.records("mf-dead.test", &[ip(73)]);
    let cfg = config(&format!(
        "[[route]]\nname = \"mf\"\nlisten = \"127.0.0.70:0\"\nalias = \"mf.test\"\nport = {port}\n\
         [[route]]\nname = \"mf-dead\"\nlisten = \"127.0.0.74:0\"\nalias = \"mf-dead.test\"\nport = {}\n\
         [[route]]\nname = \"mf-nx\"\nlisten = \"127.0.0.75:0\"\nalias = \"mf-nx.test\"\nport = 1\n\
         [health]\ninterval = \"0s\"\nretry_down_after = \"30s\"\n[resolver]\n{}",
        gone.port(),
        resolver_toml(dns.addr, None)
    ));
    let proxy = start(cfg);
    let admin = proxy.admin.expect("admin endpoint");
    for _ in 0..3 {
        assert_eq!(exchange(proxy.addrs[0], b"x").await.0, "b72");
    }
    assert_reset(proxy.addrs[1]).await;
    assert_reset(proxy.addrs[2]).await;
    // Byte counts are added when a connection ends; wait for all to end.
    for route in ["mf", "mf-dead", "mf-nx"] {
        no_connection_open(admin, route).await;
    }

    let s = scrape(admin).await;
    let a71 = format!("127.0.0.71:{port}");
    let a72 = format!("127.0.0.72:{port}");
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&s, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing in:\n{s}"))
    };
    assert_eq!(
        get(
            "failover_proxy_connections_accepted_total",
            &[("route", "mf")]
        ),
        3.0
    );
    assert_eq!(
        get("failover_proxy_failovers_total", &[("route", "mf")]),
        3.0
    );
    assert_eq!(
        get(
            "failover_proxy_upstream_connect_attempts_total",
            &[("route", "mf"), ("address", &a71), ("result", "refused")]
        ),
        1.0,
        "a down address is not tried again before retry_down_after"
    );
    assert_eq!(
        get(
            "failover_proxy_upstream_connect_attempts_total",
            &[("route", "mf"), ("address", &a72), ("result", "ok")]
        ),
        3.0
    );
    assert_eq!(
        get(
            "failover_proxy_backend_up",
            &[("route", "mf"), ("address", &a71)]
        ),
        0.0
    );
    assert_eq!(
        get(
            "failover_proxy_backend_up",
            &[("route", "mf"), ("address", &a72)]
        ),
        1.0
    );
    assert_eq!(
        get(
            "failover_proxy_bytes_total",
            &[("route", "mf"), ("direction", "to_upstream")]
        ),
        3.0
    );
    assert_eq!(
        get(
            "failover_proxy_bytes_total",
            &[("route", "mf"), ("direction", "to_client")]
        ),
        15.0
    );
    assert_eq!(
        get(
            "failover_proxy_upstream_connect_duration_seconds_count",
            &[("route", "mf")]
        ),
        3.0
    );
    assert!(
        get(
            "failover_proxy_upstream_connect_duration_seconds_bucket",
            &[("route", "mf"), ("le", "10")]
        ) >= 3.0
    );
    assert!(
        get(
            "failover_proxy_resolve_duration_seconds_count",
            &[("route", "mf"), ("source", "dns")]
        ) >= 3.0
    );
    assert_eq!(
        get(
            "failover_proxy_connection_duration_seconds_count",
            &[("route", "mf")]
        ),
        3.0
    );
    assert_eq!(
        get(
            "failover_proxy_connections_failed_total",
            &[("route", "mf-dead"), ("reason", "connect")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "failover_proxy_connections_failed_total",
            &[("route", "mf-nx"), ("reason", "resolve")]
        ),
        1.0
    );
    assert!(
        get(
            "failover_proxy_resolve_errors_total",
            &[("route", "mf-nx"), ("kind", "nxdomain")]
        ) >= 1.0
    );
    assert_eq!(
        get(
            "failover_proxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Every address label is one the answers held.
    for l in s.lines().filter(|l| l.contains("address=\"")) {
        let a = l
            .split("address=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        assert!(
            a.starts_with("127.0.0.71:")
                || a.starts_with("127.0.0.72:")
                || a.starts_with("127.0.0.73:")
                || !l.contains("route=\"mf"),
            "unexpected address label: {l}"
        );
    }

    // promtool, from Debian's prometheus package, lints the exposition.
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus; .ci/run does it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(s.as_bytes()).await.unwrap();
    drop(stdin);
    let out = within("promtool", child.wait_with_output()).await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn readyz_follows_active_health_and_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let server = std::net::TcpListener::bind(SocketAddr::new(ip(76), 0)).unwrap();
    let addr = server.local_addr().unwrap();
    std::fs::write(&hosts, format!("{} ready.test\n", ip(76))).unwrap();
    let dns = DnsServer::start().await;
    let proxy = start(config(&format!(
        "[[route]]\nname = \"rz\"\nlisten = \"127.0.0.77:0\"\nalias = \"ready.test\"\nport = {}\n\
         [health]\ninterval = \"100ms\"\ndown_after = 2\nup_after = 2\n[resolver]\n{}",
        addr.port(),
        resolver_toml(dns.addr, Some(&hosts))
    )));
    let admin = proxy.admin.expect("admin endpoint");
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    eventually("ready after the first resolution", || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;

    // The only server goes away: probes mark it down, the route is not ready.
    drop(server);
    eventually("503 once the address is down", || async {
        http_get(admin, "/readyz").await.0 == 503
    })
    .await;
    let (_, body) = http_get(admin, "/readyz").await;
    assert!(body.contains("rz"), "503 names the route: {body}");
    let (_, status) = http_get(admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let route = &v["routes"][0];
    assert_eq!(route["name"], "rz");
    assert_eq!(route["answer"]["source"], "hosts");
    assert_eq!(route["answer"]["addresses"][0], addr.to_string());
    assert_eq!(route["addresses"][0]["state"], "down");
    assert_eq!(route["addresses"][0]["last_error"], "refused");
    assert!(
        route["addresses"][0]["since"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    // It comes back: after up_after good probes the route is ready again.
    let _server = std::net::TcpListener::bind(addr).unwrap();
    eventually("200 once the address is up", || async {
        http_get(admin, "/readyz").await.0 == 200
    })
    .await;
    let (_, status) = http_get(admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["routes"][0]["addresses"][0]["state"], "up");
    let s = scrape(admin).await;
    let a = addr.to_string();
    assert!(
        sample(
            &s,
            "failover_proxy_health_probes_total",
            &[("route", "rz"), ("address", &a), ("result", "refused")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert!(
        sample(
            &s,
            "failover_proxy_health_probes_total",
            &[("route", "rz"), ("address", &a), ("result", "ok")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    // Probes are not connection attempts.
    assert_eq!(
        sample(
            &s,
            "failover_proxy_upstream_connect_attempts_total",
            &[("route", "rz"), ("address", &a), ("result", "ok")]
        ),
        None
    );

    // The hosts line changes: /status shows the new answer once a
    // resolution (here the probes') has seen it.
    let moved = SocketAddr::new(ip(68), addr.port());
    std::fs::write(&hosts, format!("{} ready.test\n", ip(68))).unwrap();
    eventually("/status shows the changed answer", || async {
        let (_, status) = http_get(admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        v["routes"][0]["answer"]["addresses"] == serde_json::json!([moved.to_string()])
    })
    .await;
}

#[tokio::test]
async fn the_admin_endpoint_answers_get_and_head_only() {
    let dns = DnsServer::start().await;
    let proxy = start(config(&format!(
        "[[route]]\nname = \"methods\"\nlisten = \"127.0.0.69:0\"\nalias = \"127.0.0.1\"\nport = 1\n[resolver]\n{}",
        resolver_toml(dns.addr, None)
    )));
    let admin = proxy.admin.unwrap();
    assert_eq!(http_request(admin, "GET", "/healthz").await.0, 200);
    assert_eq!(http_request(admin, "HEAD", "/healthz").await.0, 200);
    assert_eq!(http_request(admin, "HEAD", "/metrics").await.0, 200);
    for method in ["POST", "PUT", "DELETE"] {
        assert_eq!(
            http_request(admin, method, "/healthz").await.0,
            405,
            "{method}"
        );
    }
}

#[tokio::test]
async fn readyz_is_503_while_an_alias_does_not_resolve() {
    let dns = DnsServer::start().await;
    // NXDOMAIN is an answer with no address; SERVFAIL gives none at all.
    dns.set("failing.test", Behavior::ServFail);
    let proxy = start(config(&format!(
        "[[route]]\nname = \"nx\"\nlisten = \"127.0.0.78:0\"\nalias = \"missing.test\"\nport = 1\n\
         [[route]]\nname = \"sf\"\nlisten = \"127.0.0.118:0\"\nalias = \"failing.test\"\nport = 1\n\
         [resolver]\n{}",
        resolver_toml(dns.addr, None)
    )));
    let admin = proxy.admin.unwrap();
    eventually("startup resolution done", || async {
        let (code, body) = http_get(admin, "/readyz").await;
        code == 503
            && body.contains("nx: alias has no address")
            && body.contains("sf: alias not resolved yet")
    })
    .await;
}

#[tokio::test]
async fn status_keeps_the_last_answer_through_a_dns_failure_and_drops_it_on_nxdomain() {
    let dns = DnsServer::start().await;
    let b = backend(ip(93), "b93").await;
    dns.records("keep.test", &[ip(93)]);
    let proxy = start(config(&format!(
        "[[route]]\nname = \"keep\"\nlisten = \"127.0.0.94:0\"\nalias = \"keep.test\"\nport = {}\n[resolver]\n{}stale_on_error = \"0s\"\n",
        b.addr.port(),
        resolver_toml(dns.addr, None)
    )));
    let admin = proxy.admin.unwrap();
    let shown = || async {
        let (_, status) = http_get(admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        v["routes"][0]["answer"]["addresses"].clone()
    };
    assert_eq!(id_via(proxy.addr()).await, "b93");
    assert_eq!(shown().await, serde_json::json!([b.addr.to_string()]));
    // DNS failing says nothing about the name: the last answer stays shown
    // (and /readyz judges the route by it).
    dns.set("keep.test", Behavior::ServFail);
    assert_reset(proxy.addr()).await;
    assert_eq!(shown().await, serde_json::json!([b.addr.to_string()]));
    // NXDOMAIN is an answer: the name has no address now.
    dns.set("keep.test", Behavior::NxDomain);
    assert_reset(proxy.addr()).await;
    assert_eq!(shown().await, serde_json::json!([]));
}

#[tokio::test]
async fn malformed_and_mismatched_dns_answers_are_errors_not_panics() {
    let dns = DnsServer::start().await;
    let b = backend(ip(79), "b").await;
    let proxy = start(config(&format!(
        "[[route]]\nname = \"bad-dns\"\nlisten = \"127.0.0.80:0\"\nalias = \"bad.test\"\nport = {}\n[resolver]\n{}stale_on_error = \"0s\"\n",
        b.addr.port(),
        resolver_toml(dns.addr, None)
    )));
    let admin = proxy.admin.unwrap();
    for behavior in [Behavior::Garbage, Behavior::Mismatched] {
        dns.set("bad.test", behavior);
        assert_reset(proxy.addr()).await;
    }
    let s = scrape(admin).await;
    let errors: f64 = ["timeout", "other", "servfail"]
        .iter()
        .filter_map(|k| {
            sample(
                &s,
                "failover_proxy_resolve_errors_total",
                &[("route", "bad-dns"), ("kind", k)],
            )
        })
        .sum();
    assert!(
        errors >= 2.0,
        "each bad answer is counted as an error:\n{s}"
    );
    // The proxy is unharmed: a good answer serves at once.
    dns.records("bad.test", &[ip(79)]);
    assert_eq!(id_via(proxy.addr()).await, "b");
}

/// `backend_up` is what a dashboard and the shipped alert read to tell
/// whether a route can serve, so it must describe the route's answer as it
/// is now: an address only the probes have seen counts, and an address
/// gone from the answer (a server taken out of DNS) or from the
/// configuration (a route removed by a reload) is no longer shown.
#[tokio::test]
async fn backend_up_shows_every_address_of_the_last_answer_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let server = std::net::TcpListener::bind(SocketAddr::new(ip(111), 0)).unwrap();
    let up = server.local_addr().unwrap();
    let down = SocketAddr::new(ip(112), up.port());
    let _down = refusing_on(down);
    let moved = SocketAddr::new(ip(113), up.port());
    let _moved = std::net::TcpListener::bind(moved).unwrap();
    std::fs::write(
        &hosts,
        format!("{} bu.test\n{} bu.test\n", up.ip(), down.ip()),
    )
    .unwrap();
    let dns = DnsServer::start().await;
    let route = |name: &str, listen: &str, alias: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nalias = \"{alias}\"\nport = {}\n",
            up.port()
        )
    };
    let tail = format!(
        "[health]\ninterval = \"100ms\"\n[resolver]\n{}",
        resolver_toml(dns.addr, Some(&hosts))
    );
    let proxy = start(config(&format!(
        "{}{tail}",
        route("bu", "127.0.0.114:0", "bu.test")
    )));
    let admin = proxy.admin.expect("admin endpoint");
    // The series of one route, sorted by address.
    let shown = |route: &'static str| async move {
        let s = scrape(admin).await;
        let mut v: Vec<(String, String)> = s
            .lines()
            .filter_map(|l| l.strip_prefix("failover_proxy_backend_up{"))
            .filter_map(|l| l.strip_prefix(&format!("route=\"{route}\",address=\"")))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(a, v)| (a.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    };
    let series = |v: &[(SocketAddr, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<_> = v
            .iter()
            .map(|(a, x)| (a.to_string(), x.to_string()))
            .collect();
        v.sort();
        v
    };

    // No client has connected: the probes alone tell which address is up.
    let want = series(&[(up, "1"), (down, "0")]);
    eventually(
        "backend_up of both addresses, from the probes alone",
        || async { shown("bu").await == want },
    )
    .await;

    // Both servers leave the answer for a third: their series go, and the
    // new address is shown up.
    std::fs::write(&hosts, format!("{} bu.test\n", moved.ip())).unwrap();
    let want = series(&[(moved, "1")]);
    eventually("backend_up of the new answer only", || async {
        shown("bu").await == want
    })
    .await;

    // A reload replaces the route with another: the removed route's series
    // go with it.
    let next = config(&format!(
        "{}{tail}",
        route("bu2", "127.0.0.115:0", &moved.ip().to_string())
    ));
    proxy
        .control
        .send(failover_proxy::Control::Reload(Box::new(next)))
        .await
        .unwrap();
    let want = series(&[(moved, "1")]);
    eventually("backend_up of the new route only", || async {
        shown("bu").await.is_empty() && shown("bu2").await == want
    })
    .await;
    drop(server);
}

/// An alias whose answer churns through new addresses (servers replaced,
/// pods rescheduled) must not grow the process or the scrape without end:
/// a route counts attempts and probes for at most 1,024 addresses.
#[tokio::test]
async fn address_series_stay_bounded_while_the_answer_churns() {
    // Bound on every address and listening on none: each one refuses.
    let (_refusing, port) = {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = s.local_addr().unwrap().port();
        (s, port)
    };
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let addr = |b: usize, i: usize| {
        SocketAddr::new(
            std::net::Ipv4Addr::new(127, 2 + b as u8, (i / 250) as u8, (i % 250 + 1) as u8).into(),
            port,
        )
    };
    let write = |b: usize| {
        let text: String = (0..300)
            .map(|i| format!("{} churn.test\n", addr(b, i).ip()))
            .collect();
        let tmp = dir.path().join("hosts.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &hosts).unwrap();
    };
    write(0);
    let dns = DnsServer::start().await;
    let proxy = start(config(&format!(
        "[[route]]\nname = \"churn\"\nlisten = \"127.0.0.116:0\"\nalias = \"churn.test\"\nport = {port}\n\
         [health]\ninterval = \"100ms\"\n[resolver]\n{}",
        resolver_toml(dns.addr, Some(&hosts))
    )));
    let admin = proxy.admin.expect("admin endpoint");
    let probed = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with("failover_proxy_health_probes_total{route=\"churn\""))
            .map(|l| {
                l.split("address=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    // Five answers of 300 new addresses each: 1,500 addresses probed.
    for b in 0..5 {
        write(b);
        let last = addr(b, 299).to_string();
        eventually("the whole answer probed", || async {
            probed(&scrape(admin).await).contains(&last)
        })
        .await;
    }
    let s = scrape(admin).await;
    let series = probed(&s);
    assert_eq!(
        series.len(),
        1024,
        "one probe series per address, 1,024 at most"
    );
    assert!(
        series.contains(&addr(4, 299).to_string()),
        "the newest are kept"
    );
    assert!(
        !series.contains(&addr(0, 0).to_string()),
        "the oldest are dropped"
    );
    // backend_up shows the current answer only.
    let up = s
        .lines()
        .filter(|l| l.starts_with("failover_proxy_backend_up{route=\"churn\""))
        .count();
    assert_eq!(up, 300);
}

/// A client may hold one connection for days: the byte counters must show
/// its traffic while it flows, not when the connection ends.
#[tokio::test]
async fn bytes_are_counted_while_the_connection_is_open() {
    use tokio::io::AsyncReadExt;

    let b = backend(ip(137), "b137").await;
    let proxy = start(config(&format!(
        "[[route]]\nname = \"live-bytes\"\nlisten = \"127.0.0.138:0\"\nalias = \"{}\"\nport = {}\n",
        b.addr.ip(),
        b.addr.port()
    )));
    let admin = proxy.admin.expect("admin endpoint");
    let bytes = |dir: &'static str| async move {
        let s = scrape(admin).await;
        sample(
            &s,
            "failover_proxy_bytes_total",
            &[("route", "live-bytes"), ("direction", dir)],
        )
    };
    let (id, s) = within("served", served_by(proxy.addr()))
        .await
        .expect("served");
    assert_eq!(id, "b137");
    let (mut r, mut w) = s.into_split();
    // Small messages take the buffer path; a burst that fills the buffer
    // goes on through splice. Both must count as they go.
    let mut sent = 0usize;
    for len in [1_000usize, 300_000] {
        let payload = vec![b'x'; len];
        let writer = tokio::spawn(async move {
            w.write_all(&payload).await.unwrap();
            w
        });
        let mut echo = vec![0u8; len];
        within("the echo", r.read_exact(&mut echo)).await.unwrap();
        w = writer.await.unwrap();
        sent += len;
        let want = (Some(sent as f64), Some((sent + "b137\n".len()) as f64));
        eventually("the open connection's bytes counted", || async {
            (bytes("to_upstream").await, bytes("to_client").await) == want
        })
        .await;
    }
    // Its end adds nothing more: every byte was counted once.
    drop((r, w));
    no_connection_open(admin, "live-bytes").await;
    assert_eq!(bytes("to_upstream").await, Some(sent as f64));
    assert_eq!(bytes("to_client").await, Some((sent + 5) as f64));
}

/// A reload that changes only the resolver leaves the route as it was, and
/// its probes running: they must ask the new DNS servers, or `/status`,
/// `/readyz` and health follow a server the operator has replaced.
#[tokio::test]
async fn active_health_asks_the_dns_servers_of_the_last_reload() {
    let old_dns = DnsServer::start().await;
    let new_dns = DnsServer::start().await;
    let b1 = backend(ip(140), "b140").await;
    let _b2 = backend_on(SocketAddr::new(ip(142), b1.addr.port()), "b142").await;
    old_dns.records("probed.test", &[ip(140)]);
    new_dns.records("probed.test", &[ip(142)]);
    let cfg = |dns: SocketAddr| {
        config(&format!(
            "[[route]]\nname = \"probed\"\nlisten = \"127.0.0.141:0\"\nalias = \"probed.test\"\nport = {}\n\
             [health]\ninterval = \"100ms\"\n[resolver]\n{}",
            b1.addr.port(),
            resolver_toml(dns, None)
        ))
    };
    let proxy = start(cfg(old_dns.addr));
    let admin = proxy.admin.expect("admin endpoint");
    let shown = || async {
        let (_, status) = http_get(admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        v["routes"][0]["answer"]["addresses"].clone()
    };
    let want = |a: SocketAddr| serde_json::json!([a.to_string()]);
    eventually("the first answer, from the probes", || async {
        shown().await == want(b1.addr)
    })
    .await;
    // No client connects: only the probes can bring the new answer.
    proxy
        .control
        .send(failover_proxy::Control::Reload(Box::new(cfg(new_dns.addr))))
        .await
        .unwrap();
    let moved = SocketAddr::new(ip(142), b1.addr.port());
    eventually("the new DNS server's answer, from the probes", || async {
        shown().await == want(moved)
    })
    .await;
}

/// The start-up resolution's answer is what the first round of probes
/// probes: asking DNS again at once would double every route's queries at
/// each start and reload.
#[tokio::test]
async fn the_first_probes_use_the_start_up_answer() {
    let dns = DnsServer::start().await;
    let b = backend(ip(145), "b145").await;
    dns.records("first-probe.test", &[ip(145)]);
    let proxy = start(config(&format!(
        "[[route]]\nname = \"first-probe\"\nlisten = \"127.0.0.146:0\"\nalias = \"first-probe.test\"\nport = {}\n\
         [health]\ninterval = \"1h\"\n[resolver]\n{}family = \"ipv4\"\n",
        b.addr.port(),
        resolver_toml(dns.addr, None)
    )));
    let admin = proxy.admin.expect("admin endpoint");
    let address = b.addr.to_string();
    eventually("the first round's probe counted", || async {
        let s = scrape(admin).await;
        sample(
            &s,
            "failover_proxy_health_probes_total",
            &[
                ("route", "first-probe"),
                ("address", &address),
                ("result", "ok"),
            ],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        dns.queries(),
        1,
        "one query for the start-up and the first probes"
    );
}
