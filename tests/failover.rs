//! Resolution on every connection and ordered failover, against real
//! sockets on 127.0.0.x and a real DNS server.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn dns_change_is_seen_by_the_next_connection_despite_ttl() {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(11), "b1").await;
    let b2 = backend_on(std::net::SocketAddr::new(ip(12), b1.addr.port()), "b2").await;
    dns.records("cluster.test", &[ip(11)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        "",
        &resolver_toml(dns.addr, None),
    )));
    assert_eq!(id_via(proxy.addr()).await, "b1");
    // TTL 3600 on both answers: only the absence of any cache lets the
    // second connection see the change.
    dns.records("cluster.test", &[ip(12)]);
    assert_eq!(id_via(proxy.addr()).await, "b2");
    drop(b2);
}

#[tokio::test]
async fn hosts_file_edit_is_seen_by_the_next_connection() {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(13), "b1").await;
    let _b2 = backend_on(std::net::SocketAddr::new(ip(14), b1.addr.port()), "b2").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "# cluster\n127.0.0.13 cluster.test\n").unwrap();
    // DNS would answer differently: the hosts file must win.
    dns.records("cluster.test", &[ip(99)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        "",
        &resolver_toml(dns.addr, Some(&hosts)),
    )));
    assert_eq!(id_via(proxy.addr()).await, "b1");
    std::fs::write(&hosts, "127.0.0.14 cluster.test\n").unwrap();
    assert_eq!(id_via(proxy.addr()).await, "b2");
    // Several lines: file order, the first one serves.
    std::fs::write(&hosts, "127.0.0.13 cluster.test\n127.0.0.14 cluster.test\n").unwrap();
    assert_eq!(id_via(proxy.addr()).await, "b1");
    assert_eq!(
        dns.queries(),
        0,
        "dns must not be asked when the hosts file answers"
    );
}

#[tokio::test]
async fn refused_first_address_is_served_by_the_second_at_once() {
    let dns = DnsServer::start().await;
    let (_hold, dead) = refusing(ip(15));
    let _b = backend_on(std::net::SocketAddr::new(ip(16), dead.port()), "b2").await;
    dns.records("cluster.test", &[ip(15), ip(16)]);
    // A long attempt_delay: only the refusal itself can start the second
    // attempt early.
    let proxy = start(config(&route_toml(
        "cluster.test",
        dead.port(),
        "attempt_delay = \"5s\"\nconnect_timeout = \"10s\"",
        &resolver_toml(dns.addr, None),
    )));
    let t = Instant::now();
    assert_eq!(id_via(proxy.addr()).await, "b2");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refusal must start the next attempt at once, took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn black_holed_first_address_costs_one_attempt_delay_then_nothing() {
    let dns = DnsServer::start().await;
    let (_l, _filler, hole) = black_hole(ip(17)).await;
    let _b = backend_on(std::net::SocketAddr::new(ip(18), hole.port()), "b2").await;
    dns.records("cluster.test", &[ip(17), ip(18)]);
    let delay = Duration::from_millis(300);
    let proxy = start(config(&route_toml(
        "cluster.test",
        hole.port(),
        "attempt_delay = \"300ms\"\nconnect_timeout = \"20s\"",
        &resolver_toml(dns.addr, None),
    )));
    let t = Instant::now();
    assert_eq!(id_via(proxy.addr()).await, "b2");
    let first = t.elapsed();
    assert!(
        first >= delay,
        "second attempt started before attempt_delay: {first:?}"
    );
    assert!(
        first < Duration::from_secs(10),
        "served only after the connect timeout, not after attempt_delay: {first:?}"
    );
    // The abandoned address is now known down: the next connection goes
    // straight to the second address.
    let t = Instant::now();
    assert_eq!(id_via(proxy.addr()).await, "b2");
    assert!(
        t.elapsed() < delay,
        "second connection waited again: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn an_address_that_never_answers_is_given_up_after_connect_timeout() {
    let dns = DnsServer::start().await;
    let (_l, _filler, hole) = black_hole(ip(65)).await;
    dns.records("silent.test", &[ip(65)]);
    let timeout = Duration::from_millis(400);
    let cfg = config(&format!(
        "[[route]]\nname = \"silent\"\nlisten = \"127.0.0.1:0\"\nalias = \"silent.test\"\nport = {}\n\
         attempt_delay = \"100ms\"\nconnect_timeout = \"400ms\"\n[resolver]\n{}",
        hole.port(),
        resolver_toml(dns.addr, None)
    ));
    let proxy = start(cfg);
    let admin = proxy.admin.expect("admin endpoint");
    let t = Instant::now();
    assert_reset(proxy.addr()).await;
    let waited = t.elapsed();
    assert!(
        waited >= timeout,
        "given up before connect_timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "connect_timeout did not bound the attempt: {waited:?}"
    );
    // Counted as a timeout, which is what an operator's alert on silent
    // servers looks for, and the connection as failed to connect.
    let route = ("route", "silent");
    let addr = hole.to_string();
    eventually("the timed-out attempt counted", || async {
        let m = scrape(admin).await;
        sample(
            &m,
            "failover_proxy_upstream_connect_attempts_total",
            &[route, ("address", addr.as_str()), ("result", "timeout")],
        ) == Some(1.0)
    })
    .await;
    let m = scrape(admin).await;
    assert_eq!(
        sample(
            &m,
            "failover_proxy_connections_failed_total",
            &[route, ("reason", "connect")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn attempt_delay_zero_tries_one_address_at_a_time() {
    // `attempt_delay = "0s"` means no overlap: the second address is only
    // tried once the first has failed, here by its connect timeout.
    let dns = DnsServer::start().await;
    let (_l, _filler, hole) = black_hole(ip(97)).await;
    let _b = backend_on(std::net::SocketAddr::new(ip(98), hole.port()), "b98").await;
    dns.records("cluster.test", &[ip(97), ip(98)]);
    let timeout = Duration::from_millis(400);
    let proxy = start(config(&route_toml(
        "cluster.test",
        hole.port(),
        "attempt_delay = \"0s\"\nconnect_timeout = \"400ms\"",
        &resolver_toml(dns.addr, None),
    )));
    let t = Instant::now();
    assert_eq!(id_via(proxy.addr()).await, "b98");
    let waited = t.elapsed();
    assert!(
        waited >= timeout,
        "second address tried before the first timed out: {waited:?}"
    );
}

#[tokio::test]
async fn an_ipv6_answer_from_dns_is_dialled() {
    // The default family asks for A and AAAA records; an alias with only an
    // AAAA record is served over IPv6.
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: this host has no ::1 to test IPv6 with");
        return;
    };
    drop(probe);
    let dns = DnsServer::start().await;
    let b = backend_on("[::1]:0".parse().unwrap(), "v6").await;
    dns.records("v6.test", &["::1".parse().unwrap()]);
    let proxy = start(config(&route_toml(
        "v6.test",
        b.addr.port(),
        "",
        &resolver_toml(dns.addr, None),
    )));
    assert_eq!(id_via(proxy.addr()).await, "v6");
}

#[tokio::test]
async fn round_robin_rotates_over_every_address() {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(21), "b1").await;
    let port = b1.addr.port();
    let _b2 = backend_on(std::net::SocketAddr::new(ip(22), port), "b2").await;
    let _b3 = backend_on(std::net::SocketAddr::new(ip(23), port), "b3").await;
    dns.records("cluster.test", &[ip(21), ip(22), ip(23)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        port,
        "order = \"round-robin\"",
        &resolver_toml(dns.addr, None),
    )));
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(id_via(proxy.addr()).await);
    }
    assert_eq!(ids, ["b1", "b2", "b3", "b1", "b2", "b3"]);
}

#[tokio::test]
async fn random_order_spreads_over_every_address() {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(24), "b1").await;
    let port = b1.addr.port();
    let _b2 = backend_on(std::net::SocketAddr::new(ip(25), port), "b2").await;
    let _b3 = backend_on(std::net::SocketAddr::new(ip(26), port), "b3").await;
    dns.records("cluster.test", &[ip(24), ip(25), ip(26)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        port,
        "order = \"random\"",
        &resolver_toml(dns.addr, None),
    )));
    let mut counts = std::collections::HashMap::new();
    for _ in 0..60 {
        *counts.entry(id_via(proxy.addr()).await).or_insert(0) += 1;
    }
    // All three within 60 tries fails with probability about 3 * (2/3)^60.
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n < 60), "{counts:?}");
}

#[tokio::test]
async fn listed_order_always_prefers_the_first_address() {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(27), "b1").await;
    let _b2 = backend_on(std::net::SocketAddr::new(ip(28), b1.addr.port()), "b2").await;
    dns.records("cluster.test", &[ip(27), ip(28)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        "",
        &resolver_toml(dns.addr, None),
    )));
    for _ in 0..5 {
        assert_eq!(id_via(proxy.addr()).await, "b1");
    }
}

#[tokio::test]
async fn every_address_down_resets_the_client_at_once() {
    let dns = DnsServer::start().await;
    let (_h1, a1) = refusing(ip(29));
    let h2 = refusing_on(std::net::SocketAddr::new(ip(30), a1.port()));
    dns.records("cluster.test", &[ip(29), ip(30)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        a1.port(),
        "attempt_delay = \"5s\"\nconnect_timeout = \"10s\"",
        &resolver_toml(dns.addr, None),
    )));
    let t = Instant::now();
    assert_reset(proxy.addr()).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "reset took {:?}",
        t.elapsed()
    );
    // All down: every address is still tried, so a server that comes back
    // serves the very next connection.
    let l = h2.listen(16).unwrap();
    let _b = serve_backend(l, "b2");
    assert_eq!(id_via(proxy.addr()).await, "b2");
}

/// How long the retry tests' proxies keep an address down.
const RETRY: Duration = Duration::from_millis(400);

/// A proxy whose alias lists a refusing address at 127.0.0.`first`, then
/// backend `id` at 127.0.0.`second`, with `RETRY` as retry_down_after, no
/// active probes and `order` (route TOML) for the order. The returned
/// socket holds the refusing address: listening on it brings that server
/// back.
async fn refusing_then_live(
    first: u8,
    second: u8,
    id: &str,
    order: &str,
) -> (DnsServer, tokio::net::TcpSocket, Backend, Proxy) {
    let dns = DnsServer::start().await;
    let (hold, dead) = refusing(ip(first));
    let live = backend_on(std::net::SocketAddr::new(ip(second), dead.port()), id).await;
    dns.records("cluster.test", &[ip(first), ip(second)]);
    let proxy = start(config(&format!(
        "{}\n[health]\nretry_down_after = \"{}ms\"\ninterval = \"0s\"\n",
        route_toml(
            "cluster.test",
            dead.port(),
            order,
            &resolver_toml(dns.addr, None)
        ),
        RETRY.as_millis()
    )));
    (dns, hold, live, proxy)
}

/// Waits until the retry of an address marked down at `marked` is due,
/// having checked the test saw the down state before then. The proxy's
/// own deadline is the event: nothing else signals it.
async fn retry_due(marked: Instant) {
    assert!(
        marked.elapsed() < RETRY,
        "test too slow to observe the down state"
    );
    tokio::time::sleep_until((marked + RETRY).into()).await;
}

#[tokio::test]
async fn a_down_first_address_regains_its_place_after_retry_down_after() {
    let (_dns, hold, _b2, proxy) = refusing_then_live(31, 32, "b2", "").await;
    assert_eq!(id_via(proxy.addr()).await, "b2");
    let marked = Instant::now();
    // The first server comes back at once, but it is known down: until its
    // retry time the second keeps serving, without a new attempt on it.
    let _b1 = serve_backend(hold.listen(16).unwrap(), "b1");
    assert_eq!(id_via(proxy.addr()).await, "b2");
    retry_due(marked).await;
    assert_eq!(id_via(proxy.addr()).await, "b1");
    assert_eq!(id_via(proxy.addr()).await, "b1");
}

#[tokio::test]
async fn a_retry_a_connection_did_not_need_passes_to_the_next_one() {
    // Round-robin puts the down address second on every other connection.
    // A connection that claims its retry there is served by the first
    // address and never makes it: the retry must go to the next connection,
    // or the recovered server is never tried again.
    let (_dns, hold, _a, proxy) = refusing_then_live(95, 96, "a", "order = \"round-robin\"").await;
    // Connection 0 tries the first address, which refuses: marked down.
    assert_eq!(id_via(proxy.addr()).await, "a");
    let marked = Instant::now();
    let _b = serve_backend(hold.listen(16).unwrap(), "b");
    // Connections 1 and 2, before the retry is due: the down address is
    // moved to the back.
    assert_eq!(id_via(proxy.addr()).await, "a");
    assert_eq!(id_via(proxy.addr()).await, "a");
    retry_due(marked).await;
    // Connection 3 lists the down address second and claims its retry, but
    // the first address serves it.
    assert_eq!(id_via(proxy.addr()).await, "a");
    // Connection 4 lists it first and makes the retry: it is back.
    assert_eq!(id_via(proxy.addr()).await, "b");
}

/// `cluster.test` answered by a test DNS server with one backend on
/// 127.0.0.`last`, behind a proxy with `stale_on_error`, served once.
async fn served_once(last: u8, stale_on_error: &str) -> (DnsServer, Backend, Proxy) {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(last), "b1").await;
    dns.records("cluster.test", &[ip(last)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        "",
        &format!(
            "{}stale_on_error = \"{stale_on_error}\"\n",
            resolver_toml(dns.addr, None)
        ),
    )));
    assert_eq!(id_via(proxy.addr()).await, "b1");
    (dns, b1, proxy)
}

#[tokio::test]
async fn stale_answer_is_used_while_dns_is_down() {
    let (dns, _b1, proxy) = served_once(33, "5m").await;
    dns.set("cluster.test", Behavior::Silent);
    assert_eq!(
        id_via(proxy.addr()).await,
        "b1",
        "timeout: the stale answer serves"
    );
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(
        id_via(proxy.addr()).await,
        "b1",
        "servfail: the stale answer serves"
    );
    dns.stop();
    assert_eq!(
        id_via(proxy.addr()).await,
        "b1",
        "server gone: the stale answer serves"
    );
}

/// A route `name` to `cluster.test`, answered by DNS with 127.0.0.`first`
/// ("b1"); "b2" waits on the next address, same port. Stale answers for
/// 5 minutes, DNS `timeout`, no active health (its resolutions would
/// count too). Served once from DNS.
async fn stale_behind_dns(
    first: u8,
    name: &str,
    timeout: &str,
) -> (DnsServer, [Backend; 2], Proxy) {
    let dns = DnsServer::start().await;
    let b1 = backend(ip(first), "b1").await;
    let b2 = backend_on(
        std::net::SocketAddr::new(ip(first + 1), b1.addr.port()),
        "b2",
    )
    .await;
    dns.records("cluster.test", &[ip(first)]);
    let proxy = start(config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        &format!("name = \"{name}\"\n"),
        &format!(
            "nameservers = [\"{}\"]\nhosts_file = \"\"\nfamily = \"ipv4\"\ntimeout = \"{timeout}\"\n\
             stale_on_error = \"5m\"\n[health]\ninterval = \"0s\"\n",
            dns.addr
        ),
    )));
    assert_eq!(id_via(proxy.addr()).await, "b1");
    (dns, [b1, b2], proxy)
}

#[tokio::test]
async fn while_dns_fails_connections_get_the_last_good_answer_without_waiting() {
    // A timeout longer than HANG: a connection that waited for a silent
    // server's timeout stops the test instead of passing late.
    let (dns, _b, proxy) =
        stale_behind_dns(121, "stale-at-once", &format!("{}s", HANG.as_secs() * 2)).await;
    let addr = proxy.addr();
    // DNS fails: the stale answer serves, and the failure is remembered.
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(id_via(addr).await, "b1");
    // Then it stops answering. The next connections are served the last
    // good answer at once, while one query at a time asks in the
    // background: not a query (and its whole timeout) per connection.
    dns.set("cluster.test", Behavior::Silent);
    let asked = dns.queries();
    for _ in 0..5 {
        assert_eq!(id_via(addr).await, "b1");
    }
    eventually("the background query sent", || async {
        dns.queries() > asked
    })
    .await;
    assert_eq!(dns.queries(), asked + 1, "one query for five connections");
    let m = scrape(proxy.admin.unwrap()).await;
    let route = ("route", "stale-at-once");
    assert_eq!(
        sample(&m, "failover_proxy_resolve_stale_total", &[route]),
        Some(6.0)
    );
}

#[tokio::test]
async fn a_dns_server_back_after_failing_is_heard_by_the_connection_after_next() {
    let (dns, _b, proxy) = stale_behind_dns(123, "heard-again", "500ms").await;
    let addr = proxy.addr();
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(id_via(addr).await, "b1");
    // Back, with a changed answer. The next connection is served the last
    // good answer and sends the query that hears it...
    dns.records("cluster.test", &[ip(124)]);
    let asked = dns.queries();
    assert_eq!(id_via(addr).await, "b1");
    eventually("the background query answered", || async {
        dns.queries() > asked
    })
    .await;
    // ...and once it has answered, connections resolve afresh again.
    eventually("the new answer used", || async {
        id_via(addr).await == "b2"
    })
    .await;
    // Gone (NXDOMAIN) while failing: reset, and no stale answer after it.
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(id_via(addr).await, "b2");
    dns.set("cluster.test", Behavior::NxDomain);
    assert_eq!(id_via(addr).await, "b2");
    eventually("the alias gone", || async {
        matches!(
            served_by(addr).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset
        )
    })
    .await;
    dns.set("cluster.test", Behavior::ServFail);
    assert_reset(addr).await;
}

#[tokio::test]
async fn while_dns_fails_the_last_good_answer_serves_only_until_stale_on_error() {
    let (dns, _b1, proxy) = served_once(125, "1s").await;
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(id_via(proxy.addr()).await, "b1");
    // DNS known to fail, so connections are given the stale answer at
    // once: until it is older than the limit, then they are reset.
    eventually("the stale answer given up", || async {
        match served_by(proxy.addr()).await {
            Ok((id, _)) => {
                assert_eq!(id, "b1");
                false
            }
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    })
    .await;
    assert_reset(proxy.addr()).await;
}

/// Sends `cfg` as a reload, then waits until `/status` names `route`: a
/// reload that renames the route is then applied (or, with a reload before
/// it in the channel, that one too).
async fn reload_until_named(proxy: &Proxy, cfg: failover_proxy::Config, route: &str) {
    proxy
        .control
        .send(failover_proxy::Control::Reload(Box::new(cfg)))
        .await
        .unwrap();
    let admin = proxy.admin.expect("admin endpoint");
    eventually("the reload applied", || async {
        let (_, status) = http_get(admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        v["routes"][0]["name"] == route
    })
    .await;
}

#[tokio::test]
async fn a_reload_during_a_dns_outage_keeps_the_last_good_answer() {
    // The natural move during a long outage: lengthen stale_on_error (or
    // add a DNS server) and reload. The new resolver must not start with
    // no answer at all, or every connection would be reset from then on.
    let (dns, b1, proxy) = served_once(132, "5m").await;
    dns.set("cluster.test", Behavior::ServFail);
    assert_eq!(id_via(proxy.addr()).await, "b1");
    let next = config(&route_toml(
        "cluster.test",
        b1.addr.port(),
        "name = \"longer-stale\"\n",
        &format!("{}stale_on_error = \"1h\"\n", resolver_toml(dns.addr, None)),
    ));
    reload_until_named(&proxy, next, "longer-stale").await;
    for _ in 0..3 {
        assert_eq!(id_via(proxy.addr()).await, "b1");
    }
    // Once DNS answers again, the new resolver hears it.
    let _b2 = backend_on(std::net::SocketAddr::new(ip(133), b1.addr.port()), "b2").await;
    dns.records("cluster.test", &[ip(133)]);
    eventually("the new answer used", || async {
        id_via(proxy.addr()).await == "b2"
    })
    .await;
}

#[tokio::test]
async fn a_refused_reload_leaves_the_resolver_as_it_was() {
    // The reload changes the DNS server and adds a route whose address is
    // taken: it is refused as a whole, resolver included.
    let (dns, b1, proxy) = served_once(134, "5m").await;
    let other = DnsServer::start().await;
    let _b2 = backend_on(std::net::SocketAddr::new(ip(135), b1.addr.port()), "b2").await;
    other.records("cluster.test", &[ip(135)]);
    let taken = std::net::TcpListener::bind(std::net::SocketAddr::new(ip(136), 0)).unwrap();
    let route = |name: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nalias = \"cluster.test\"\nport = {}\n",
            b1.addr.port()
        )
    };
    let refused = config(&format!(
        "{}[[route]]\nlisten = \"{}\"\nalias = \"cluster.test\"\nport = 1\n[resolver]\n{}stale_on_error = \"5m\"\n",
        route("refused"),
        taken.local_addr().unwrap(),
        resolver_toml(other.addr, None)
    ));
    proxy
        .control
        .send(failover_proxy::Control::Reload(Box::new(refused)))
        .await
        .unwrap();
    // A reload after it, with the first configuration's resolver and a new
    // route name: once it shows, the refused one was handled before it.
    let same = config(&format!(
        "{}[resolver]\n{}stale_on_error = \"5m\"\n",
        route("kept"),
        resolver_toml(dns.addr, None)
    ));
    reload_until_named(&proxy, same, "kept").await;
    assert_eq!(
        id_via(proxy.addr()).await,
        "b1",
        "asked the refused reload's DNS server"
    );
}

#[tokio::test]
async fn without_stale_on_error_a_dns_failure_resets() {
    let (dns, _b1, proxy) = served_once(34, "0s").await;
    dns.set("cluster.test", Behavior::Silent);
    assert_reset(proxy.addr()).await;
}

#[tokio::test]
async fn nxdomain_is_an_answer_and_is_never_masked_by_a_stale_one() {
    let (dns, _b1, proxy) = served_once(35, "5m").await;
    dns.set("cluster.test", Behavior::NxDomain);
    assert_reset(proxy.addr()).await;
    // An empty answer is an answer too.
    dns.records("cluster.test", &[]);
    assert_reset(proxy.addr()).await;
    // And after the alias is gone, a DNS failure has no stale answer left.
    dns.set("cluster.test", Behavior::ServFail);
    assert_reset(proxy.addr()).await;
}

#[tokio::test]
async fn an_answer_pointing_at_the_proxy_itself_is_never_dialled() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let dns = DnsServer::start().await;
    // Bind first to learn the port, then make the alias point at it. On an
    // address of this test's own: clients' connections come from 127.0.0.1,
    // so none can take the port between the probe and the proxy's bind.
    let probe = std::net::TcpListener::bind(std::net::SocketAddr::new(ip(64), 0)).unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    std::fs::write(&hosts, "127.0.0.64 self.test\n").unwrap();
    let cfg = config(&format!(
        "[[route]]\nname = \"selfdial\"\nlisten = \"127.0.0.64:{port}\"\nalias = \"self.test\"\nport = {port}\n[resolver]\n{}",
        resolver_toml(dns.addr, Some(&hosts))
    ));
    let proxy = start(cfg);
    let admin = proxy.admin.expect("admin endpoint");
    assert_reset(proxy.addr()).await;
    // A proxy that dialled itself would also be reset in the end, once the
    // loop of connections to itself had run out of something: it is the
    // counts that tell the two apart.
    let own = format!("127.0.0.64:{port}");
    let route = ("route", "selfdial");
    eventually("the loop attempt counted", || async {
        let m = scrape(admin).await;
        sample(
            &m,
            "failover_proxy_upstream_connect_attempts_total",
            &[route, ("address", own.as_str()), ("result", "loop")],
        ) == Some(1.0)
    })
    .await;
    let m = scrape(admin).await;
    assert_eq!(
        sample(&m, "failover_proxy_connections_accepted_total", &[route]),
        Some(1.0),
        "only the client's connection was accepted"
    );
    // Every connection fails, so the route is not ready and the operator is
    // told why; the address is shown down with error `loop`.
    let up =
        |m: &str, addr: &str| sample(m, "failover_proxy_backend_up", &[route, ("address", addr)]);
    assert_eq!(up(&m, &own), Some(0.0));
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("selfdial: every address is this proxy's own listener"),
        "{body}"
    );
    let (_, status) = http_get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let a = &status["routes"][0]["addresses"][0];
    assert_eq!(
        (
            a["address"].as_str(),
            a["state"].as_str(),
            a["last_error"].as_str()
        ),
        (Some(own.as_str()), Some("down"), Some("loop")),
        "{status}"
    );
    // With a server beside it the route serves and is ready, and the loop
    // is still shown as what it is.
    let b = backend_on(std::net::SocketAddr::new(ip(117), port), "b").await;
    std::fs::write(&hosts, "127.0.0.64 self.test\n127.0.0.117 self.test\n").unwrap();
    assert_eq!(id_via(proxy.addr()).await, "b");
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let m = scrape(admin).await;
    assert_eq!(up(&m, &own), Some(0.0));
    assert_eq!(up(&m, &b.addr.to_string()), Some(1.0));
}

/// A resolver asking `dns`, after `hosts` if given, for `family` answers.
fn resolver(
    dns: std::net::SocketAddr,
    hosts: Option<&std::path::Path>,
    family: failover_proxy::config::Family,
) -> std::sync::Arc<failover_proxy::resolve::Resolver> {
    std::sync::Arc::new(
        failover_proxy::resolve::Resolver::new(&failover_proxy::config::ResolverConfig {
            hosts_file: hosts.map(std::path::Path::to_path_buf),
            ..resolver_config(vec![dns], family)
        })
        .expect("resolver"),
    )
}

/// DNS only, from `nameservers` (empty: resolv.conf's), a 2 s timeout, no
/// stale answers.
fn resolver_config(
    nameservers: Vec<std::net::SocketAddr>,
    family: failover_proxy::config::Family,
) -> failover_proxy::config::ResolverConfig {
    failover_proxy::config::ResolverConfig {
        nameservers,
        hosts_file: None,
        family,
        timeout: Duration::from_secs(2),
        stale_on_error: None,
    }
}

fn dns_only_resolver(
    dns: std::net::SocketAddr,
) -> std::sync::Arc<failover_proxy::resolve::Resolver> {
    resolver(dns, None, failover_proxy::config::Family::Ipv4)
}

/// A DNS-only resolver asking `nameservers` with `timeout` for the whole
/// resolution.
fn resolver_with_timeout(
    nameservers: Vec<std::net::SocketAddr>,
    family: failover_proxy::config::Family,
    timeout: Duration,
) -> std::sync::Arc<failover_proxy::resolve::Resolver> {
    std::sync::Arc::new(
        failover_proxy::resolve::Resolver::new(&failover_proxy::config::ResolverConfig {
            timeout,
            ..resolver_config(nameservers, family)
        })
        .expect("resolver"),
    )
}

/// `name` resolved once through [`resolver_with_timeout`]; the test stops
/// at HANG, so a `timeout` beyond it makes an outcome that waited it out
/// fail instead of passing late.
async fn resolve_once(
    nameservers: Vec<std::net::SocketAddr>,
    family: failover_proxy::config::Family,
    timeout: Duration,
    name: &str,
) -> Result<failover_proxy::resolve::Answer, failover_proxy::resolve::ResolveError> {
    let r = resolver_with_timeout(nameservers, family, timeout);
    within(
        name,
        r.resolve(&failover_proxy::config::Alias::parse(name).unwrap()),
    )
    .await
    .result
}

#[tokio::test]
async fn connections_that_arrive_together_share_one_dns_query() {
    let dns = DnsServer::start().await;
    dns.records("cluster.test", &[ip(100)]);
    let resolver = dns_only_resolver(dns.addr);
    let alias = failover_proxy::config::Alias::parse("cluster.test").unwrap();
    // Four connections accepted in one batch: all arrived before any query.
    let arrived = Instant::now();
    let (a, b, c, d) = within("four resolutions", async {
        tokio::join!(
            resolver.resolve_for(&alias, arrived),
            resolver.resolve_for(&alias, arrived),
            resolver.resolve_for(&alias, arrived),
            resolver.resolve_for(&alias, arrived),
        )
    })
    .await;
    for r in [a, b, c, d] {
        assert_eq!(r.result.expect("resolved").addrs, vec![ip(100)]);
    }
    assert_eq!(dns.queries(), 1, "one query for the batch");
    // A connection arriving now asks again, and sees a changed record.
    dns.records("cluster.test", &[ip(101)]);
    let r = within("a later resolution", resolver.resolve(&alias)).await;
    assert_eq!(r.result.expect("resolved").addrs, vec![ip(101)]);
    assert_eq!(dns.queries(), 2);
}

#[tokio::test]
async fn a_connection_never_takes_the_answer_of_a_query_asked_before_it_arrived() {
    let dns = DnsServer::start().await;
    // The first query goes unanswered; every later one gets its own address.
    dns.set("cluster.test", Behavior::Numbered(100));
    let resolver = dns_only_resolver(dns.addr);
    let alias = failover_proxy::config::Alias::parse("cluster.test").unwrap();
    let first = {
        let (resolver, alias) = (resolver.clone(), alias.clone());
        tokio::spawn(async move { resolver.resolve(&alias).await })
    };
    eventually("the first query at the server", || async {
        dns.queries() >= 1
    })
    .await;
    // Arrives while that query is unanswered: it must ask on its own, not
    // wait for the older query's answer.
    let later = within("the later resolution", resolver.resolve(&alias)).await;
    let later = later.result.expect("resolved").addrs;
    // The first resolution ends with an answer to its own retransmission
    // or with a timeout; either way not the later one's.
    let first = within("the first resolution", first).await.unwrap();
    if let Ok(a) = &first.result {
        assert_ne!(a.addrs, later, "both got the answer of one query");
    }
    assert_ne!(later, vec![ip(101)], "the ignored first query was answered");
}

#[tokio::test]
async fn family_narrows_each_source_and_never_reorders_it() {
    use failover_proxy::config::{Alias, Family};
    use failover_proxy::resolve::ResolveError;
    use std::net::IpAddr;

    let dns = DnsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.3 fam.test\n::1 fam.test\n127.0.0.2 fam.test\n127.0.0.3 only4.test\n",
    )
    .unwrap();
    let v6: IpAddr = "::1".parse().unwrap();
    // DNS has other answers for the hosts-file names: any address from them
    // would show DNS was asked.
    dns.records("fam.test", &[ip(4)]);
    dns.records("only4.test", &[v6]);
    dns.records("mixed.test", &[ip(3), v6, ip(2)]);
    let addrs = |family, alias: &str| {
        let resolver = resolver(dns.addr, Some(&hosts), family);
        let alias = Alias::parse(alias).unwrap();
        async move { resolver.resolve(&alias).await.result }
    };

    let cases: [(Family, &str, Vec<IpAddr>); 10] = [
        // Hosts lines: file order, v4 and v6 interleaved as written.
        (Family::Any, "fam.test", vec![ip(3), v6, ip(2)]),
        (Family::Any, "fam.test.", vec![ip(3), v6, ip(2)]),
        (Family::Ipv4, "fam.test", vec![ip(3), ip(2)]),
        (Family::Ipv6, "fam.test", vec![v6]),
        // DNS: A answers first, then AAAA.
        (Family::Any, "mixed.test", vec![ip(3), ip(2), v6]),
        (Family::Ipv4, "mixed.test", vec![ip(3), ip(2)]),
        (Family::Ipv6, "mixed.test", vec![v6]),
        // IP literals.
        (Family::Any, "::1", vec![v6]),
        (Family::Ipv6, "::1", vec![v6]),
        (Family::Ipv4, "127.0.0.3", vec![ip(3)]),
    ];
    for (family, alias, want) in cases {
        let got = addrs(family, alias).await;
        assert_eq!(got.expect(alias).addrs, want, "{alias} with {family:?}");
    }

    // Filtered to nothing: no records, and the hosts file still decides
    // (DNS's AAAA answer for only4.test is not used).
    let queries = dns.queries();
    for (family, alias) in [
        (Family::Ipv6, "only4.test"),
        (Family::Ipv4, "::1"),
        (Family::Ipv6, "127.0.0.3"),
    ] {
        match addrs(family, alias).await {
            Err(ResolveError::NoRecords { .. }) => {}
            other => panic!("{alias} with {family:?}: {other:?}"),
        }
    }
    assert_eq!(dns.queries(), queries, "DNS asked for a hosts-file name");
}

#[tokio::test]
async fn a_family_whose_query_goes_unanswered_does_not_hold_back_the_other() {
    use failover_proxy::config::{Alias, Family};
    use std::net::IpAddr;

    // Some DNS servers and firewalls drop AAAA queries, and a few drop A.
    // With the default family both are asked.
    let dns = DnsServer::start().await;
    let v6: IpAddr = "::1".parse().unwrap();
    dns.set("v4.test", Behavior::DropsOtherType(vec![ip(5), ip(6)]));
    dns.set("v6.test", Behavior::DropsOtherType(vec![v6]));
    let resolver = |timeout| resolver_with_timeout(vec![dns.addr], Family::Any, timeout);
    // AAAA dropped: the A answer serves without waiting out the timeout.
    let timeout = Duration::from_secs(10);
    let r = resolver(timeout);
    let started = Instant::now();
    let got = within("v4.test", r.resolve(&Alias::parse("v4.test").unwrap())).await;
    assert_eq!(got.result.expect("v4.test").addrs, vec![ip(5), ip(6)]);
    let took = started.elapsed();
    assert!(took < timeout / 4, "took {took:?}");
    // A dropped: A is waited for (IPv4 comes first), but its timeout keeps
    // the AAAA answer instead of failing the whole resolution, every time.
    let r = resolver(Duration::from_millis(300));
    for _ in 0..3 {
        let got = within("v6.test", r.resolve(&Alias::parse("v6.test").unwrap())).await;
        assert_eq!(got.result.expect("v6.test").addrs, vec![v6]);
    }
}

/// What a resolver for either family gives for `name` when the server
/// answers its `late` query 200 ms after the other, with `addrs`.
async fn resolved_with_one_family_late(
    name: &str,
    late: hickory_proto::rr::RecordType,
    addrs: Vec<std::net::IpAddr>,
) -> Vec<std::net::IpAddr> {
    use failover_proxy::config::{Alias, Family};
    let dns = DnsServer::start().await;
    dns.set(
        name,
        Behavior::Slow(late, Duration::from_millis(200), addrs),
    );
    let r = resolver(dns.addr, None, Family::Any);
    let got = within(name, r.resolve(&Alias::parse(name).unwrap())).await;
    got.result.expect(name).addrs
}

#[tokio::test]
async fn a_slow_a_answer_is_waited_for_since_ipv4_comes_first() {
    // The AAAA record cached at the recursive server, the A record not:
    // AAAA answers first. The connection must still get the IPv4 servers,
    // first, or a host without IPv6 routes would fail every attempt.
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    let got = resolved_with_one_family_late(
        "slow-a.test",
        hickory_proto::rr::RecordType::A,
        vec![ip(7), v6],
    )
    .await;
    assert_eq!(got, vec![ip(7), v6]);
}

#[tokio::test]
async fn a_slow_aaaa_answer_is_waited_for_when_the_a_answer_has_no_address() {
    // Servers on IPv6 alone, the AAAA record not in the recursive server's
    // cache: A says "no records" at once, AAAA answers later. Only an A
    // answer with addresses cuts the wait for AAAA short.
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    let got = resolved_with_one_family_late(
        "slow-aaaa.test",
        hickory_proto::rr::RecordType::AAAA,
        vec![v6],
    )
    .await;
    assert_eq!(got, vec![v6]);
}

#[tokio::test]
async fn an_alias_that_is_a_cname_gives_its_targets_addresses_afresh() {
    use failover_proxy::config::{Alias, Family};
    use std::net::IpAddr;

    let dns = DnsServer::start().await;
    let v6: IpAddr = "::1".parse().unwrap();
    dns.records("servers.test", &[ip(21), v6, ip(22)]);
    // The vendor's alias is often a CNAME to the name that holds the
    // servers' records: from a recursive resolver the chain and the
    // records come in one answer; from an authoritative server for another
    // zone, the CNAME comes alone and the target has to be asked for.
    let resolver = resolver(dns.addr, None, Family::Any);
    for (alias, chased) in [("chased.test", true), ("bare.test", false)] {
        dns.cname(alias, "servers.test", chased);
        let parsed = Alias::parse(alias).unwrap();
        let got = resolver.resolve(&parsed).await.result;
        assert_eq!(got.expect(alias).addrs, vec![ip(21), ip(22), v6], "{alias}");
        // No cache along the chain: a changed target is seen at once.
        dns.records("servers.test", &[ip(23)]);
        let got = resolver.resolve(&parsed).await.result;
        assert_eq!(got.expect(alias).addrs, vec![ip(23)], "{alias}, changed");
        dns.records("servers.test", &[ip(21), v6, ip(22)]);
    }
    // A CNAME to a name that does not exist is an NXDOMAIN: the
    // connection is refused, and no stale answer stands in for it.
    for (alias, chased) in [("dangling.test", true), ("dangling-bare.test", false)] {
        dns.cname(alias, "gone.test", chased);
        match resolver.resolve(&Alias::parse(alias).unwrap()).await.result {
            Err(failover_proxy::resolve::ResolveError::NxDomain { .. }) => {}
            other => panic!("{alias}: {other:?}"),
        }
    }
}

/// A DNS server whose UDP answers are all truncated (TC set, no records),
/// and which gives the whole answer over TCP on the same port: what a
/// server does when the answer is larger than a UDP reply may be.
async fn truncating_dns(ips: Vec<std::net::IpAddr>) -> std::net::SocketAddr {
    split_dns(None, ips).await
}

/// A DNS server on 127.0.0.1 that answers every name with `udp`'s
/// addresses over UDP (or, with `None`, a truncated answer) and `tcp`'s
/// over TCP, on one port: which addresses come says how it was asked.
async fn split_dns(
    udp_ips: Option<Vec<std::net::IpAddr>>,
    ips: Vec<std::net::IpAddr>,
) -> std::net::SocketAddr {
    use hickory_proto::op::Message;
    use hickory_proto::rr::Name;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn answer(req: &Message, ips: Option<&[std::net::IpAddr]>) -> Option<Vec<u8>> {
        let query = req.queries.first()?;
        let mut resp = reply_to(req, query);
        match ips {
            Some(ips) => {
                let owner: &Name = query.name();
                add_addresses(&mut resp, owner, query.query_type(), ips, 60);
            }
            None => resp.metadata.truncation = true,
        }
        resp.to_vec().ok()
    }

    // The port is picked for UDP; another test may hold it for TCP.
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Some(bytes) = Message::from_vec(&buf[..n])
                .ok()
                .and_then(|req| answer(&req, udp_ips.as_deref()))
            {
                let _ = udp.send_to(&bytes, from).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = tcp.accept().await {
            let ips = ips.clone();
            tokio::spawn(async move {
                // Two-byte length, then the message, each way (RFC 1035 4.2.2).
                while let Ok(len) = conn.read_u16().await {
                    let mut msg = vec![0u8; usize::from(len)];
                    if conn.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    let Some(bytes) = Message::from_vec(&msg)
                        .ok()
                        .and_then(|req| answer(&req, Some(&ips)))
                    else {
                        return;
                    };
                    let len = u16::try_from(bytes.len()).unwrap();
                    if conn.write_u16(len).await.is_err() || conn.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_truncated_dns_answer_is_asked_again_over_tcp() {
    use failover_proxy::config::{Alias, Family};

    // 200 servers under one alias: 3.2 KB of A records, more than a UDP
    // reply carries (1,232 bytes with EDNS, 512 without).
    let ips: Vec<std::net::IpAddr> = (1..=200)
        .map(|n| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 1, 0, n)))
        .collect();
    let dns = truncating_dns(ips.clone()).await;
    let resolver = resolver(dns, None, Family::Ipv4);
    let got = within(
        "resolution over tcp",
        resolver.resolve(&Alias::parse("big.test").unwrap()),
    )
    .await;
    assert_eq!(got.result.expect("resolved over tcp").addrs, ips);
}

#[tokio::test]
async fn every_nameserver_is_asked_until_one_answers() {
    use failover_proxy::config::Family;
    use failover_proxy::resolve::ResolveError;

    let server = |b: Behavior| async move {
        let dns = DnsServer::start().await;
        dns.set("cluster.test", b);
        dns
    };
    let silent = server(Behavior::Silent).await;
    let silent2 = server(Behavior::Silent).await;
    let servfail = server(Behavior::ServFail).await;
    let refused = server(Behavior::Refused).await;
    let nxdomain = server(Behavior::NxDomain).await;
    let good = server(Behavior::Records(vec![ip(31)], 60)).await;
    // Longer than HANG: an outcome that waited for a silent server's
    // timeout stops the test instead of passing late.
    let resolve = |nameservers| resolve_once(nameservers, Family::Ipv4, HANG * 2, "cluster.test");

    // The system resolver moves on to the next server after a SERVFAIL, a
    // REFUSED or no reply; so does the proxy, for every server listed.
    for (why, nameservers) in [
        ("servfail first", vec![servfail.addr, good.addr]),
        ("refused first", vec![refused.addr, good.addr]),
        (
            "two silent first",
            vec![silent.addr, silent2.addr, good.addr],
        ),
    ] {
        let got = resolve(nameservers).await;
        assert_eq!(got.expect(why).addrs, vec![ip(31)], "{why}");
    }
    // NXDOMAIN is an answer: it decides without waiting for a silent server.
    match resolve(vec![silent.addr, nxdomain.addr]).await {
        Err(ResolveError::NxDomain { .. }) => {}
        other => panic!("nxdomain behind a silent server: {other:?}"),
    }
    // A refusal comes from a server that was reached: not "unreachable".
    match resolve(vec![refused.addr]).await {
        Err(ResolveError::Other { .. }) => {}
        other => panic!("refused: {other:?}"),
    }
    // Every server failed: the failure is reported as soon as the last one
    // is in, without waiting out the timeout.
    match resolve(vec![servfail.addr, refused.addr]).await {
        Err(ResolveError::ServFail { .. } | ResolveError::Other { .. }) => {}
        other => panic!("servfail and refused: {other:?}"),
    }
}

#[tokio::test]
async fn a_changed_resolv_conf_is_followed_by_the_next_query() {
    use failover_proxy::config::{Alias, Family};
    use std::net::SocketAddr;

    // resolv.conf names servers without a port: two servers on one port,
    // which the resolver is told to use in place of 53.
    let (one, two) = loop {
        let one = DnsServer::start_on("127.0.0.41:0".parse().unwrap())
            .await
            .unwrap();
        let port = one.addr.port();
        if let Ok(two) = DnsServer::start_on(SocketAddr::new(ip(42), port)).await {
            break (one, two);
        }
    };
    one.records("cluster.test", &[ip(51)]);
    two.records("cluster.test", &[ip(52)]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, "nameserver 127.0.0.41\nsearch test\n").unwrap();
    let resolver = from_resolv_conf(&conf, Family::Ipv4, one.addr.port());
    let resolve = |alias: &str| {
        let alias = Alias::parse(alias).unwrap();
        let resolver = &resolver;
        async move {
            let r = within("resolution", resolver.resolve(&alias)).await;
            r.result.map(|a| a.addrs)
        }
    };

    assert_eq!(resolve("cluster.test").await.unwrap(), vec![ip(51)]);
    // The file's search list applies to a short name, and not to one
    // written complete, with a trailing dot.
    assert_eq!(resolve("cluster").await.unwrap(), vec![ip(51)]);
    assert_eq!(resolve("cluster.test.").await.unwrap(), vec![ip(51)]);
    match resolve("cluster.").await {
        Err(failover_proxy::resolve::ResolveError::NxDomain { .. }) => {}
        other => panic!("cluster. was searched: {other:?}"),
    }
    // Rewritten at once, with the same length: the next query asks the new
    // server.
    std::fs::write(&conf, "nameserver 127.0.0.42\nsearch test\n").unwrap();
    assert_eq!(resolve("cluster.test").await.unwrap(), vec![ip(52)]);
    // Gone, or naming no server (as when it is being rewritten): the last
    // servers it named are kept.
    std::fs::remove_file(&conf).unwrap();
    assert_eq!(resolve("cluster.test").await.unwrap(), vec![ip(52)]);
    std::fs::write(&conf, "# being rewritten\n").unwrap();
    assert_eq!(resolve("cluster.test").await.unwrap(), vec![ip(52)]);
    std::fs::write(&conf, "nameserver 127.0.0.41\n").unwrap();
    assert_eq!(resolve("cluster.test").await.unwrap(), vec![ip(51)]);
}

/// A resolver with no nameservers of its own, so following the resolv.conf
/// at `conf`, whose servers it asks on `port`.
fn from_resolv_conf(
    conf: &std::path::Path,
    family: failover_proxy::config::Family,
    port: u16,
) -> std::sync::Arc<failover_proxy::resolve::Resolver> {
    std::sync::Arc::new(
        failover_proxy::resolve::Resolver::with_system_conf(
            &resolver_config(vec![], family),
            conf,
            port,
        )
        .expect("resolver from resolv.conf"),
    )
}

#[tokio::test]
async fn resolv_conf_options_use_vc_and_no_aaaa_are_followed() {
    use failover_proxy::config::{Alias, Family};

    // glibc's `use-vc` asks over TCP only (a network that drops DNS over
    // UDP), and `no-aaaa` asks no AAAA query; the proxy, following
    // resolv.conf, must do as every other program on the host does. This
    // server gives one address over UDP and another over TCP.
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    let dns = split_dns(Some(vec![ip(161), v6]), vec![ip(162), v6]).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, "nameserver 127.0.0.1\noptions no-aaaa\n").unwrap();
    let resolver = from_resolv_conf(&conf, Family::Any, dns.port());
    let alias = Alias::parse("cluster.test").unwrap();
    let resolve = || async {
        let r = within("resolution", resolver.resolve(&alias)).await;
        r.result.expect("an answer").addrs
    };
    assert_eq!(resolve().await, vec![ip(161)]);
    // Followed as the file changes, like its nameservers.
    for (text, want) in [
        ("nameserver 127.0.0.1\n", vec![ip(161), v6]),
        ("nameserver 127.0.0.1\noptions use-vc\n", vec![ip(162), v6]),
        (
            "options edns0\nnameserver 127.0.0.1\noptions use-vc no-aaaa\n",
            vec![ip(162)],
        ),
    ] {
        std::fs::write(&conf, text).unwrap();
        assert_eq!(resolve().await, want, "{text:?}");
    }
}

#[test]
fn resolv_conf_problems_at_start_name_the_file() {
    use failover_proxy::config::Family;

    let cfg = resolver_config(vec![], Family::Any);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    let problem = |path: &std::path::Path| {
        let e = failover_proxy::resolve::Resolver::with_system_conf(&cfg, path, 53)
            .expect_err("no usable resolv.conf");
        failover_proxy::error_chain(&e)
    };
    let missing = problem(&conf);
    assert!(
        missing.starts_with(&format!("cannot read {}, ", conf.display()))
            && missing.contains("resolver.nameservers is empty")
            && missing.ends_with("No such file or directory (os error 2)"),
        "{missing}"
    );
    std::fs::write(&conf, "search test\n").unwrap();
    let none = problem(&conf);
    assert!(
        none.starts_with(&format!("cannot use {}, ", conf.display()))
            && none.ends_with("no nameservers found in config"),
        "{none}"
    );
}

#[tokio::test]
async fn a_dns_server_whose_port_is_closed_fails_the_resolution_at_once_naming_it() {
    use failover_proxy::config::Family;
    use failover_proxy::resolve::ResolveErrorKind;

    // A local resolver that is stopped: its port answers with ICMP port
    // unreachable, as glibc sees at once. Waiting for a reply that cannot
    // come held every connection for the whole timeout, longer than HANG.
    let closed_port = |last| {
        let closed = std::net::UdpSocket::bind((ip(last), 0)).unwrap();
        closed.local_addr().unwrap()
    };
    // closed.test asked of `servers`, with a timeout no test waits out.
    let resolve = |servers, family| resolve_once(servers, family, HANG * 3, "closed.test");
    let dns = closed_port(168);
    let e = resolve(vec![dns], Family::Any)
        .await
        .expect_err("no server to answer");
    assert_eq!(e.kind(), ResolveErrorKind::Other);
    assert_eq!(
        e.to_string(),
        format!("resolving closed.test: dns server refused or unreachable: {dns}")
    );
    // Two, both closed: each is named, once.
    let dns2 = closed_port(171);
    let text = resolve(vec![dns, dns2], Family::Any)
        .await
        .expect_err("no server to answer")
        .to_string();
    let named = text.rsplit(": ").next().unwrap();
    let mut named: Vec<&str> = named.split(", ").collect();
    named.sort_unstable();
    let mut want = vec![dns.to_string(), dns2.to_string()];
    want.sort_unstable();
    assert_eq!(named, want, "{text}");
    // One server closed, another answering: the answer.
    let live = DnsServer::start().await;
    live.records("closed.test", &[ip(168)]);
    assert_eq!(
        resolve(vec![dns, live.addr], Family::Ipv4)
            .await
            .expect("the live server's answer")
            .addrs,
        vec![ip(168)]
    );
}
