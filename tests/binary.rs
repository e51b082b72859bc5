//! The real binary: exit codes, `check`, environment-only configuration,
//! and the SIGTERM drain.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn write_config(
    dir: &Path,
    alias_ip: std::net::IpAddr,
    port: u16,
    extra: &str,
) -> std::path::PathBuf {
    write_config_admin(dir, alias_ip, port, "127.0.0.1:0", extra)
}

/// [`write_config`] with the admin endpoint on `admin` ("" turns it off).
fn write_config_admin(
    dir: &Path,
    alias_ip: std::net::IpAddr,
    port: u16,
    admin: &str,
    extra: &str,
) -> std::path::PathBuf {
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("{alias_ip} cluster.test\n")).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nalias = \"cluster.test\"\nport = {port}\n\n[resolver]\nnameservers = [\"127.0.0.1:9\"]\nhosts_file = \"{}\"\n\n[log]\nformat = \"json\"\n\n[admin]\nlisten = \"{admin}\"\n{extra}",
            hosts.display()
        ),
    )
    .unwrap();
    path
}

/// A config in `dir` for one route to `cluster.test` on `port`, resolved
/// by the DNS server at `dns` alone (no hosts file), with `resolver`'s
/// extra keys; no active health, JSON logs, no admin endpoint.
fn write_dns_config(
    dir: &Path,
    dns: std::net::SocketAddr,
    port: u16,
    resolver: &str,
) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nalias = \"cluster.test\"\nport = {port}\n\n\
             [resolver]\nnameservers = [\"{dns}\"]\nhosts_file = \"\"\n{resolver}\n\n\
             [health]\ninterval = \"0s\"\n\n[log]\nformat = \"json\"\n\n[admin]\nlisten = \"\"\n"
        ),
    )
    .unwrap();
    path
}

/// The binary on a [`write_config`] config without active health, once it
/// listens: the process, the route's address and the admin endpoint's.
fn spawn_probeless(
    dir: &Path,
    alias_ip: std::net::IpAddr,
    port: u16,
) -> (Running, std::net::SocketAddr, std::net::SocketAddr) {
    let cfg = write_config(dir, alias_ip, port, "[health]\ninterval = \"0s\"\n");
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let admin = listen_addr(&p.wait_line("admin endpoint listening"));
    (p, addr, admin)
}

/// Adds `keys` to the route table of the config file at `cfg`, as written
/// by [`write_config`].
fn add_route_keys(cfg: &Path, keys: &str) {
    let text = std::fs::read_to_string(cfg).unwrap().replacen(
        "[resolver]",
        &format!("{keys}\n\n[resolver]"),
        1,
    );
    std::fs::write(cfg, text).unwrap();
}

/// The binary with a 5-minute `drain_timeout`, serving one connection
/// (held open) to a backend on 127.0.0.`last`; the directory holds its
/// config, which SIGHUP reads again.
async fn serving_one_with_a_long_drain(
    last: u8,
) -> (
    Running,
    std::net::SocketAddr,
    TcpStream,
    Backend,
    tempfile::TempDir,
) {
    let b = backend(ip(last), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        ip(last),
        b.addr.port(),
        "[shutdown]\ndrain_timeout = \"5m\"\n",
    );
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let (id, open) = within("first connection", served_by(addr)).await.unwrap();
    assert_eq!(id, "b");
    (p, addr, open, b, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_open_connections() {
    let (mut p, addr, mut open, _b, _dir) = serving_one_with_a_long_drain(51).await;
    p.signal("TERM");
    p.wait_line("stopped accepting");

    let refused = TcpStream::connect(addr).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "new connections must be refused once SIGTERM is received"
    );
    // The open connection keeps working during the drain.
    open.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    within("echo during drain", open.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"still here");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("end of the drained connection", open.read_to_end(&mut rest))
        .await
        .unwrap();
    // drain_timeout is 5 minutes: exiting within HANG means the proxy
    // noticed the last connection finish.
    assert_eq!(p.wait_exit(), 0);
    p.wait_line("all connections finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_waiting_for_open_connections() {
    let (mut p, _, mut open, _b, _dir) = serving_one_with_a_long_drain(120).await;
    p.signal("INT");
    p.wait_line("stopped accepting");
    // Still draining: a reload asked for now changes nothing.
    p.signal("HUP");
    open.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 1];
    within("echo during drain", open.read_exact(&mut echo))
        .await
        .unwrap();
    // The open connection would hold the proxy for 5 minutes: a second
    // signal ends the wait, and the connection with it.
    p.signal("TERM");
    let (level, f) = log_fields(&p.wait_line("second signal"));
    assert_eq!((level.as_str(), &f["signal"]), ("WARN", &"SIGTERM".into()));
    assert_eq!(p.wait_exit(), 0);
    let mut rest = Vec::new();
    let end = within("the connection closed", open.read_to_end(&mut rest)).await;
    assert!(end.is_err() || rest.is_empty(), "{end:?} {rest:?}");
    let lines = p.lines_until("stopped waiting");
    assert!(
        !lines.iter().any(|l| l.contains("all connections finished")),
        "{lines:?}"
    );
}

/// The level and the fields of a JSON log line (flattened: the event's
/// fields sit beside `level` and `message`).
fn log_fields(line: &str) -> (String, serde_json::Value) {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let level = v["level"].as_str().expect("level").to_string();
    (level, v)
}

/// The lines of `lines` that contain `needle`, parsed as by [`log_fields`].
fn logged(lines: &[String], needle: &str) -> Vec<(String, serde_json::Value)> {
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .map(|l| log_fields(l))
        .collect()
}

/// Stops `p` with SIGTERM, adds its last lines to `lines`, and checks that
/// it exits 0.
fn stop_cleanly(p: &mut Running, lines: &mut Vec<String>) {
    p.signal("TERM");
    lines.extend(p.lines_until("\"stopped\""));
    assert_eq!(p.wait_exit(), 0);
}

/// `ADDR RESULT 1.2ms, ...` from a log line's `attempts` field, as
/// (address, result) pairs, each time checked to be a number of ms.
fn attempts_of(fields: &serde_json::Value) -> Vec<(String, String)> {
    let text = fields["attempts"].as_str().expect("attempts field");
    text.split(", ")
        .map(|a| {
            let parts: Vec<&str> = a.split(' ').collect();
            let [addr, result, ms] = parts[..] else {
                panic!("attempt is not `address result time`: {a:?} in {text:?}")
            };
            let ms = ms.strip_suffix("ms").expect("time in ms");
            assert!(ms.parse::<f64>().is_ok(), "time {ms:?} in {text:?}");
            (addr.to_string(), result.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_logged_with_their_attempts_and_failovers_warn() {
    let (_hold, dead) = refusing(ip(66));
    let port = dead.port();
    let live = std::net::SocketAddr::new(ip(67), port);
    let _b = backend_on(live, "b67").await;
    let dir = tempfile::tempdir().unwrap();
    // No active health: the refusal is the connection's own attempt. The
    // refused address is not tried again during the test.
    let cfg = write_config(
        dir.path(),
        ip(66),
        port,
        "[health]\ninterval = \"0s\"\nretry_down_after = \"30s\"\n",
    );
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.66 cluster.test\n127.0.0.67 cluster.test\n").unwrap();
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));

    // Served by the second address: the first is marked down, then a WARN
    // for the failover, then the connection's line.
    let (id, client) = exchange(addr, b"abc").await;
    assert_eq!(id, "b67");
    let tried = vec![
        (dead.to_string(), "refused".to_string()),
        (live.to_string(), "ok".to_string()),
    ];
    let (level, f) = log_fields(&p.wait_line("address marked down"));
    assert_eq!(level, "WARN");
    assert_eq!(f["upstream.addr"], dead.to_string());
    assert_eq!(f["why"], "refused");
    let (level, f) = log_fields(&p.wait_line("served by other than the first address"));
    assert_eq!(level, "WARN");
    assert_eq!(f["route"], "cluster.test");
    assert_eq!(f["upstream.addr"], live.to_string());
    assert_eq!(f["first"], dead.to_string());
    assert_eq!(attempts_of(&f), tried);
    let (level, f) = log_fields(&p.wait_line("connection closed"));
    assert_eq!(level, "INFO");
    assert_eq!(f["route"], "cluster.test");
    assert_eq!(f["client.addr"], client.to_string());
    assert_eq!(f["upstream.addr"], live.to_string());
    assert_eq!(attempts_of(&f), tried);
    assert_eq!(f["bytes.to_upstream"], 3);
    assert_eq!(f["bytes.to_client"], "b67\n".len() + 3);
    assert_eq!(f["end"], "closed");
    assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{f}");
    // Milliseconds to the microsecond, as a person reads them: no binary
    // noise such as 0.09843700000000001.
    let ms = f["duration_ms"].to_string();
    assert!(
        ms.split_once('.').is_none_or(|(_, frac)| frac.len() <= 3),
        "{ms}"
    );

    // The next connection skips the address known down: served by the
    // second at once, with no WARN of its own. A server down for hours is
    // not a WARN per connection.
    let (id, client) = exchange(addr, b"abc").await;
    assert_eq!(id, "b67");
    let lines = p.lines_until(&client.to_string());
    assert!(lines.iter().all(|l| !l.contains("WARN")), "{lines:#?}");
    let (level, f) = log_fields(lines.last().unwrap());
    assert_eq!(
        (level.as_str(), &f["message"]),
        ("INFO", &"connection closed".into())
    );
    assert_eq!(attempts_of(&f), [(live.to_string(), "ok".to_string())]);

    // Only the refusing address left: the client is reset, with a WARN.
    std::fs::write(&hosts, "127.0.0.66 cluster.test\n").unwrap();
    assert_reset(addr).await;
    let (level, f) = log_fields(&p.wait_line("no server reachable"));
    assert_eq!(level, "WARN");
    assert_eq!(attempts_of(&f), [(dead.to_string(), "refused".to_string())]);
}

/// Pipes the process `pid` holds open.
fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the proxy's descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_copy_moves_bulk_data_without_pipes_and_splice_with_them_and_a_reload_switches() {
    let b = backend(ip(37), "b").await;
    for (relay, piped) in [("copy", false), ("splice", true)] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            ip(37),
            b.addr.port(),
            &format!("[runtime]\nrelay = \"{relay}\"\n"),
        );
        let p = Running::spawn(&cfg);
        let addr = listen_addr(&p.wait_line("\"listening\""));
        // Its standard streams may be pipes already (stderr is, here).
        let before = pipes_of(p.child.id());
        echo_bulk(addr, 4 << 20).await;
        // The splice path keeps its emptied pipes pooled for the next burst.
        let after = pipes_of(p.child.id());
        assert_eq!(
            after > before,
            piped,
            "relay = {relay}: {before} pipes, then {after}"
        );
        if relay == "copy" {
            // A reload applies the relay to the next connections.
            let text = std::fs::read_to_string(&cfg).unwrap();
            std::fs::write(&cfg, text.replace("\"copy\"", "\"splice\"")).unwrap();
            p.signal("HUP");
            p.wait_line("configuration reloaded");
            echo_bulk(addr, 4 << 20).await;
            let reloaded = pipes_of(p.child.id());
            assert!(
                reloaded > after,
                "after a reload to splice: {after} pipes, then {reloaded}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait_for_open_connections() {
    let b = backend(ip(52), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        ip(52),
        b.addr.port(),
        "[shutdown]\ndrain_timeout = \"200ms\"\n",
    );
    let mut p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let (_, mut open) = within("connection", served_by(addr)).await.unwrap();
    p.signal("INT");
    p.wait_line("drain timeout");
    assert_eq!(p.wait_exit(), 0);
    // The held connection was closed with the process.
    let mut rest = Vec::new();
    let _ = within("closed connection", open.read_to_end(&mut rest)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_wins_over_log_level_when_set_and_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_admin(dir.path(), ip(37), 1, "", "");
    for (level, rust_log) in [
        // log.level = "error" hides the INFO "listening" line unless
        // RUST_LOG lets it through.
        ("error", "info"),
        // Set but empty, as `Environment=RUST_LOG=` leaves it: log.level
        // rules.
        ("info", ""),
    ] {
        let p = Running::spawn_with(
            bin()
                .arg("-c")
                .arg(&cfg)
                .env("FAILOVER_PROXY_LOG__LEVEL", level)
                .env("RUST_LOG", rust_log),
        );
        p.wait_line("\"listening\"");
    }
    // A filter that does not parse is a configuration error, named.
    let out = bin()
        .arg("-c")
        .arg(&cfg)
        .env("RUST_LOG", "info,=[")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RUST_LOG"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_in_use_exits_1_naming_it() {
    // Held by a server, and by an outgoing connection: its local port comes
    // from the kernel's ephemeral range, as port 0 does, and SO_REUSEADDR
    // does not get past it. The error says what to do about the second.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let outgoing = std::net::TcpStream::connect(taken.local_addr().unwrap()).unwrap();
    for addr in [taken.local_addr().unwrap(), outgoing.local_addr().unwrap()] {
        // Said once whatever the log's format and filter: a second copy
        // doubles the journal, and a plain line amid JSON breaks parsing.
        for (format, rust_log) in [("text", None), ("json", None), ("text", Some("off"))] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = dir.path().join("c.toml");
            std::fs::write(
                &cfg,
                format!("[[route]]\nlisten = \"{addr}\"\nalias = \"127.0.0.1\"\nport = 1\n[resolver]\nnameservers = [\"127.0.0.1:9\"]\n[admin]\nlisten = \"\"\n[log]\nformat = \"{format}\"\n"),
            )
            .unwrap();
            let mut cmd = bin();
            cmd.arg("-c").arg(&cfg).env_remove("RUST_LOG");
            if let Some(v) = rust_log {
                cmd.env("RUST_LOG", v);
            }
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            let what = format!("cannot listen on {addr} (route 127.0.0.1): ");
            assert_eq!(
                err.matches(&what).count(),
                1,
                "{format} {rust_log:?}: {err}"
            );
            assert!(
                err.contains(&format!("net.ipv4.ip_local_reserved_ports={}", addr.port())),
                "{err}"
            );
            if format == "json" {
                for line in err.lines() {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    if line.contains(&what) {
                        assert_eq!(v["level"], "ERROR", "{line}");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_exits_2_with_one_line_per_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[route]]\nlisten = \"10.1.2.3:41000\"\nalias = \"bad_alias\"\nport = 41000\nattempt_delay = \"soon\"\n[nonsense]\n",
    )
    .unwrap();
    for cmd in [None, Some("check")] {
        let mut c = bin();
        if let Some(cmd) = cmd {
            c.arg(cmd);
        }
        let out = c.arg("-c").arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 4, "{err}");
        for key in [
            "route[0].listen",
            "route[0].alias",
            "route[0].attempt_delay",
            "nonsense",
        ] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(key) && l.contains(&*cfg.to_string_lossy())),
                "{key} with its file in: {err}"
            );
        }
    }
    let out = bin()
        .arg("-c")
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Named by the variable instead: the same, and the error says who named it.
    let absent = dir.path().join("absent-too.toml");
    let out = bin()
        .env("FAILOVER_PROXY_CONFIG", &absent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*absent.to_string_lossy()) && err.contains("named by FAILOVER_PROXY_CONFIG"),
        "{err}"
    );
    let out = bin().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_config_file_the_process_cannot_read_names_its_uid() {
    // Installed with mode 600 by root, the file was unreadable to the
    // systemd unit's dynamic user, and the error said only "Permission
    // denied". Mode 000 here; root reads anything unless it loses
    // CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which setpriv takes away.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("secret.toml");
    std::fs::write(
        &cfg,
        "[[route]]\nlisten = \"127.0.0.1:41000\"\nalias = \"a.test\"\nport = 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = bin_without("-dac_override,-dac_read_search");
    let out = cmd.arg("-c").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&*cfg.to_string_lossy())
            && err.contains("cannot be read: Permission denied")
            && err.contains("this process runs as uid ")
            && err.contains("mode 644"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exit_codes_and_table() {
    let b = backend(ip(53), "b").await;
    let (_hold, dead) = refusing(ip(54));
    let dns = DnsServer::start().await;
    dns.records("cluster.test", &[ip(54), ip(53)]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let route = |name: &str, alias: &str, port: u16, listen: u16| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{listen}\"\nalias = \"{alias}\"\nport = {port}\nconnect_timeout = \"2s\"\n"
        )
    };
    let resolver = format!(
        "[resolver]\nnameservers = [\"{}\"]\nhosts_file = \"\"\n",
        dns.addr
    );

    // The DNS answer has a refusing address then a live one: reachable.
    std::fs::write(
        &cfg,
        format!(
            "{}{resolver}",
            route("good", "cluster.test", b.addr.port(), 41001)
        ),
    )
    .unwrap();
    let out = bin().arg("check").arg("-c").arg(&cfg).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    let header = table.lines().next().unwrap();
    for col in ["route", "address", "source", "result", "time_ms"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        table.lines().any(|l| l.contains("good")
            && l.contains(&format!("{}:{}", ip(53), b.addr.port()))
            && l.contains("dns")
            && l.contains(" ok ")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&format!("{}:{}", ip(54), b.addr.port())) && l.contains("refused")),
        "{table}"
    );

    // Add a route whose only address refuses: exit 1, the route named.
    std::fs::write(
        &cfg,
        format!(
            "{}{}{resolver}",
            route("good", "cluster.test", b.addr.port(), 41001),
            route("dead", &ip(54).to_string(), dead.port(), 41002)
        ),
    )
    .unwrap();
    let out = bin().arg("check").arg("-c").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dead"));

    // An alias that does not exist: exit 1 too.
    std::fs::write(
        &cfg,
        format!("{}{resolver}", route("gone", "gone.test", 80, 41001)),
    )
    .unwrap();
    let out = bin().arg("check").arg("-c").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nxdomain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_only_configuration_runs_check() {
    let b = backend(ip(55), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.55 cluster.test\n").unwrap();
    let out = bin()
        .arg("check")
        .env(
            "FAILOVER_PROXY_ROUTE",
            format!(
                r#"[{{listen="127.0.0.1:41000", alias="cluster.test", port={}}}]"#,
                b.addr.port()
            ),
        )
        .env("FAILOVER_PROXY_RESOLVER__HOSTS_FILE", &hosts)
        .env("FAILOVER_PROXY_RESOLVER__NAMESERVERS", r#"["127.0.0.1:9"]"#)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("hosts") && table.contains(" ok "), "{table}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Opens and closes connections through `addr` from 8 tasks for `span`;
/// returns how many were served.
async fn churn(addr: std::net::SocketAddr, span: std::time::Duration) -> u64 {
    let until = tokio::time::Instant::now() + span;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while tokio::time::Instant::now() < until {
                    let (id, _conn) = served_by(addr).await.expect("served");
                    assert_eq!(id, "b");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("churn task");
    }
    total
}

/// Every connection records histogram samples, which stay in memory until
/// a fold puts them into their buckets. With the admin endpoint off
/// nothing scrapes them, so folds must run anyway, or each connection
/// leaves about 66 bytes behind for good (8 MB per 127,000 connections
/// before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_levels_off_under_churn_with_the_admin_endpoint_off() {
    let b = backend(ip(59), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_admin(dir.path(), ip(59), b.addr.port(), "", "");
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let pid = p.child.id();
    // Each round records many times FOLD_AFTER samples a thread: from the
    // second round on, samples are folded as fast as they come and memory
    // stays level.
    let span = std::time::Duration::from_secs(2);
    churn(addr, span).await;
    let before = rss_kib(pid);
    let mut served = 0;
    for _ in 0..2 {
        served += churn(addr, span).await;
    }
    let grown = rss_kib(pid).saturating_sub(before);
    let leak_kib = served * 66 / 1024;
    eprintln!(
        "figure: churn {served} connections, rss grew {grown} KiB (a leak would be {leak_kib})"
    );
    assert!(
        grown * 4 < leak_kib,
        "rss grew {grown} KiB over {served} connections: memory is not levelling off"
    );
}

/// The threads of `pid`, as their `/proc` folders.
fn tasks(pid: u32) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read tasks")
        .filter_map(|t| Some(t.ok()?.path()))
}

/// Times the thread at `task` was switched out (voluntarily or not): each
/// wakeup ends in one. 0 for a thread gone meanwhile.
fn task_switches(task: &Path) -> u64 {
    std::fs::read_to_string(task.join("status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Times the threads of `pid` were switched out.
fn context_switches(pid: u32) -> u64 {
    tasks(pid).map(|t| task_switches(&t)).sum()
}

/// An idle sidecar sleeps: nothing in it ticks while no client connects,
/// no probe is due and nothing scrapes, so a host running many of them
/// pays nothing for the idle ones. Before, a reporter of dropped log lines
/// ticked each second and the histogram upkeep every 5 s: about 2.7
/// wakeups a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_is_not_woken() {
    let b = backend(ip(191), "b").await;
    let dir = tempfile::tempdir().unwrap();
    // Active health off: probes wake the proxy by design.
    let (p, addr, admin) = spawn_probeless(dir.path(), ip(191), b.addr.port());
    // A client and a scrape first: whatever they set going must end too.
    assert_eq!(id_via(addr).await, "b");
    assert_eq!(http_get(admin, "/metrics").await.0, 200);
    let pid = p.child.id();
    // Windows of 3 s until one passes with at most one wakeup: the first
    // may still hold the timers the connection armed (the longest is a
    // second). The sleep is the window measured, not a wait for an event;
    // anything that ticks at least every 3 s never leaves one quiet.
    let deadline = std::time::Instant::now() + HANG;
    loop {
        let before = context_switches(pid);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let woken = context_switches(pid) - before;
        eprintln!("figure: idle proxy woken {woken} times in 3 s");
        if woken <= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an idle proxy was woken {woken} times in each 3 s for {HANG:?}"
        );
    }
}

/// A proxy whose route takes one connection at a time, served by a backend
/// on `at`, with that one connection held: every other is reset.
struct AtLimit {
    _b: Backend,
    _dir: tempfile::TempDir,
    p: Running,
    addr: std::net::SocketAddr,
    _held: Vec<TcpStream>,
}

impl AtLimit {
    async fn start(at: u8) -> AtLimit {
        let b = backend(ip(at), "b").await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), ip(at), b.addr.port(), "");
        add_route_keys(&cfg, "max_connections = 1");
        let p = Running::spawn(&cfg);
        let addr = listen_addr(&p.wait_line("\"listening\""));
        let held = hold(addr, 1).await;
        AtLimit {
            _b: b,
            _dir: dir,
            p,
            addr,
            _held: held,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_over_the_limit_are_summed_and_a_burst_is_logged_when_it_ends() {
    let AtLimit { p, addr, .. } = &AtLimit::start(119).await;

    // A burst: the first rejection is logged, then those after it are
    // summed into at most one line a second. The last line comes when its
    // second is over: no later rejection is needed to carry it.
    let burst = std::time::Instant::now();
    for _ in 0..20 {
        assert_reset(*addr).await;
    }
    let took = burst.elapsed();
    let (mut logged, mut lines) = (0, 0);
    while logged < 20 {
        let (level, f) = log_fields(&p.wait_line("connection limit reached"));
        assert_eq!(level, "WARN");
        assert_eq!(f["max_connections"], 1);
        logged += f["rejected"].as_u64().expect("rejected count");
        lines += 1;
    }
    assert_eq!(logged, 20);
    assert!(
        lines <= took.as_secs() + 2,
        "{lines} lines for a burst of {took:?}"
    );
    // Every rejection logged: the shutdown adds no line.
    p.signal("TERM");
    let rest = p.lines_until("listener closed");
    assert!(
        !rest.iter().any(|l| l.contains("connection limit reached")),
        "{rest:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_not_yet_logged_when_the_listener_closes_are_logged_then() {
    let AtLimit { p, addr, .. } = &AtLimit::start(207).await;
    for _ in 0..5 {
        assert_reset(*addr).await;
    }
    // The first rejection is logged at once; the other four wait for the
    // end of its second, and the shutdown comes first. (Should the second
    // pass first, they are logged then: the sum is the same.)
    p.signal("TERM");
    let lines = p.lines_until("listener closed");
    let logged: u64 = lines
        .iter()
        .filter(|l| l.contains("connection limit reached"))
        .map(|l| {
            log_fields(l).1["rejected"]
                .as_u64()
                .expect("rejected count")
        })
        .sum();
    assert_eq!(logged, 5, "{lines:#?}");
}

/// The soft limit on open files of process `pid`, from `/proc`.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or_else(|| panic!("no soft open-file limit in {limits}"))
}

/// The soft limit on open files of process `pid`, set with prlimit
/// (util-linux): lowering it needs no privilege, nor raising it back up to
/// the hard limit.
fn set_soft_nofile(pid: u32, soft: u64) {
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("run prlimit")
        .success();
    assert!(ok, "prlimit --pid={pid} --nofile={soft}: failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_listener_backs_off_and_serves_once_they_are_free() {
    let b = backend(ip(208), "b").await;
    let dir = tempfile::tempdir().unwrap();
    // No probes and no admin endpoint: nothing opens or closes a
    // descriptor while the limit is down.
    let cfg = write_config_admin(
        dir.path(),
        ip(208),
        b.addr.port(),
        "",
        "\n[health]\ninterval = \"0s\"\n",
    );
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    p.wait_line("alias resolved");
    let pid = p.child.id();
    let soft = soft_nofile(pid);
    // The lowest free descriptor as the limit: the next accept fails with
    // EMFILE, as when connections have used every descriptor.
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    set_soft_nofile(pid, lowest_free);
    let waiting = tokio::spawn(served_by(addr));
    let (level, f) = log_fields(&p.wait_line("accept failed; backing off"));
    assert_eq!(level, "WARN");
    assert!(
        f["error"].as_str().unwrap().contains("Too many open files"),
        "{f}"
    );
    // The listener stays, and the connection waiting in its queue is
    // served once descriptors are free again.
    set_soft_nofile(pid, soft);
    let (id, _s) = within("the waiting connection", waiting)
        .await
        .unwrap()
        .expect("served, not reset");
    assert_eq!(id, "b");
    assert_eq!(id_via(addr).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_answers_are_logged_summed_and_the_end_of_the_dns_failure_once() {
    let dns = DnsServer::start().await;
    let b = backend(ip(126), "b").await;
    let _b2 = backend_on(std::net::SocketAddr::new(ip(127), b.addr.port()), "b2").await;
    dns.records("cluster.test", &[ip(126)]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_dns_config(dir.path(), dns.addr, b.addr.port(), "family = \"ipv4\"");
    let p = Running::spawn(&cfg);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    // The start-up resolution runs in a task of its own: done before DNS
    // fails, or it would be one more stale answer than the connections'.
    p.wait_line("alias resolved");
    assert_eq!(id_via(addr).await, "b");

    // DNS fails: every connection is served from the last good answer.
    dns.set("cluster.test", Behavior::ServFail);
    let failing = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(id_via(addr).await, "b");
    }
    // Back, with a new address: served by the old one (stale) until the
    // query in the background has heard the new answer.
    dns.records("cluster.test", &[ip(127)]);
    let mut stale = 10;
    let deadline = std::time::Instant::now() + HANG;
    loop {
        match id_via(addr).await.as_str() {
            "b2" => break,
            "b" => stale += 1,
            other => panic!("served by {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dns never heard again"
        );
    }
    let took = failing.elapsed();
    // The log sums them: a WARN a second at most while DNS fails, then one
    // INFO when it answers again, with those since the last WARN.
    let lines = p.lines_until("dns answers again");
    let mut logged = 0;
    let mut warns = 0;
    for l in lines.iter().filter(|l| l.contains("last good answer")) {
        let (level, f) = log_fields(l);
        assert_eq!(level, "WARN");
        assert!(f["error"].as_str().is_some_and(|e| !e.is_empty()), "{f}");
        logged += f["stale_answers"].as_u64().expect("stale_answers");
        warns += 1;
    }
    let (level, f) = log_fields(lines.last().expect("the line"));
    assert_eq!(level, "INFO");
    logged += f["stale_answers"].as_u64().expect("stale_answers");
    assert_eq!(logged, stale, "every stale answer counted once");
    assert!(
        (1..=took.as_secs() + 1).contains(&warns),
        "{warns} WARN lines in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_drops_aaaa_queries_is_named_once_and_costs_no_timeout() {
    // The default family asks for A and AAAA; this server never answers
    // one of them (AAAA, as some do, or A). Each connection must be served
    // by the other's answer: with AAAA dropped, well before the resolver's
    // timeout; with A dropped (A comes first, so it is waited for), once it
    // times out. The log must say so once, with the family setting that
    // avoids the wait.
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    for (at, dropped, family, timeout) in
        [(ip(131), "AAAA", "ipv4", "10s"), (v6, "A", "ipv6", "300ms")]
    {
        let dns = DnsServer::start().await;
        let b = backend(at, "b").await;
        dns.set("cluster.test", Behavior::DropsOtherType(vec![at]));
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_dns_config(
            dir.path(),
            dns.addr,
            b.addr.port(),
            &format!("timeout = \"{timeout}\""),
        );
        let mut p = Running::spawn(&cfg);
        let mut lines = p.lines_until("\"listening\"");
        let addr = listen_addr(lines.last().expect("the line"));
        // The start-up resolution first: with A dropped it takes the whole
        // timeout, and a connection arriving meanwhile would wait for it and
        // then ask with what is left of its own (see the README).
        lines.extend(p.lines_until("alias resolved"));
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(id_via(addr).await, "b", "{dropped} dropped");
        }
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(5),
            "{dropped} dropped: 3 connections took {took:?}"
        );
        stop_cleanly(&mut p, &mut lines);
        let warned = logged(&lines, "DNS query unanswered");
        assert_eq!(warned.len(), 1, "{lines:#?}");
        let (level, f) = &warned[0];
        assert_eq!(level, "WARN");
        assert_eq!(f["rtype"], dropped, "{f}");
        assert_eq!(f["alias"], "cluster.test", "{f}");
        let message = f["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("resolver.family = \"{family}\"")),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_answers_both_families_is_not_said_to_drop_one() {
    // Both queries answered, with addresses: no WARN telling the operator
    // to change resolver.family.
    let dns = DnsServer::start().await;
    let b = backend(ip(210), "b").await;
    dns.records("cluster.test", &[ip(210), "::1".parse().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_dns_config(dir.path(), dns.addr, b.addr.port(), "");
    let mut p = Running::spawn(&cfg);
    let mut lines = p.lines_until("\"listening\"");
    let addr = listen_addr(lines.last().expect("the line"));
    for _ in 0..3 {
        assert_eq!(id_via(addr).await, "b");
    }
    stop_cleanly(&mut p, &mut lines);
    assert_eq!(logged(&lines, "connection closed").len(), 3, "{lines:#?}");
    assert!(
        logged(&lines, "DNS query unanswered").is_empty(),
        "{lines:#?}"
    );
}

/// The route's address and the admin endpoint's, read from the log lines
/// of a proxy started by [`Running::spawn_unread`] with one route.
fn route_and_admin(
    out: &mut impl std::io::BufRead,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (mut addr, mut admin) = (None, None);
    let mut line = String::new();
    while addr.is_none() || admin.is_none() {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "output closed");
        if line.contains("\"listening\"") {
            addr = Some(listen_addr(&line));
        } else if line.contains("admin endpoint listening") {
            admin = Some(listen_addr(&line));
        }
    }
    (addr.unwrap(), admin.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_stops_no_connection() {
    use std::io::BufRead;
    let b = backend(ip(128), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ip(128), b.addr.port(), "");
    // Running kills the process if the test fails; its lines are read here.
    let (mut p, mut stderr) = Running::spawn_unread(bin().arg("--config").arg(&cfg));
    let (addr, admin) = route_and_admin(&mut stderr);

    // Nobody reads stderr from here on: a pipe holds a few hundred lines,
    // the proxy's queue some thousands, and each connection logs one.
    let connections = 8_000;
    for _ in 0..connections {
        assert_eq!(id_via(addr).await, "b");
    }
    assert_eq!(http_get(admin, "/healthz").await.0, 200);

    // Read again: the dropped lines are reported once a second has passed
    // without a drop, and every other line arrives.
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // (connection lines, dropped lines reported)
    let mut seen = (0u64, 0u64);
    let count = |seen: &mut (u64, u64), line: &str| {
        if line.contains("\"connection closed\"") {
            seen.0 += 1;
        } else if line.contains("log lines dropped") {
            let (level, f) = log_fields(line);
            assert_eq!(level, "WARN");
            let dropped = f["dropped"].as_u64().expect("dropped count");
            assert!(dropped > 0, "{line}");
            seen.1 += dropped;
        }
    };
    while seen.1 == 0 {
        let line = lines.recv_timeout(HANG).expect("a report of dropped lines");
        count(&mut seen, &line);
    }
    let reported = seen.1;
    let counted = sample(
        &scrape(admin).await,
        "failover_proxy_log_lines_dropped_total",
        &[],
    );
    assert_eq!(
        counted,
        Some(reported as f64),
        "the counter and the report agree"
    );
    p.signal("TERM");
    while let Ok(line) = lines.recv_timeout(HANG) {
        count(&mut seen, &line);
    }
    reader.join().unwrap();
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(seen.1, reported, "one report for the one stall");
    assert_eq!(
        seen.0 + seen.1,
        connections,
        "each connection's line arrived or was counted"
    );
}

/// A log reader that stopped for good (a hung journald) does not hold the
/// exit: queued lines get 2 s, then the proxy exits. The logging library's
/// own exit path complains on stdout or stderr, which under systemd are the
/// same stalled stream, and would block there for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stopped_for_good_does_not_hold_the_exit() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let b = backend(ip(209), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ip(209), b.addr.port(), "");
    // stdout and stderr on one pipe, as journald's stream is; Running
    // kills the process if the test fails.
    let (mut p, mut out) = Running::spawn_unread(bin().arg("--config").arg(&cfg));
    let (addr, admin) = route_and_admin(&mut out);

    // Nobody reads from here on, and the pipe stays open: connections until
    // lines are dropped, so that the pipe and the proxy's queue are full.
    let dropped =
        |scrape: &str| sample(scrape, "failover_proxy_log_lines_dropped_total", &[]).unwrap_or(0.0);
    while dropped(&scrape(admin).await) == 0.0 {
        for _ in 0..1000 {
            assert_eq!(id_via(addr).await, "b");
        }
    }
    // The proxy's writer is blocked now, but a short line may still fit in
    // the pipe's last page: the pipe is filled to its last byte, through a
    // non-blocking opening of its own (O_NONBLOCK on the proxy's would
    // reach the proxy too), as a journald that stopped reading leaves it.
    let fill = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", out.get_ref().as_raw_fd()))
        .expect("a second opening of the pipe");
    rustix::io::ioctl_fionbio(&fill, true).unwrap();
    for chunk in [&[0u8; 4096][..], &[0u8; 1][..]] {
        loop {
            match (&fill).write(chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    p.signal("TERM");
    assert_eq!(p.wait_exit(), 0);
    drop(out);
}

#[test]
fn lines_carry_their_priority_when_stderr_is_the_journal() {
    use std::io::BufRead;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    for (journal, format) in [(true, "text"), (true, "json"), (false, "text")] {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 refuses: the first probe logs a WARN.
        let cfg = write_config_admin(dir.path(), ip(129), 1, "", "[health]\ninterval = \"1s\"\n");
        let (reader, writer) = std::io::pipe().unwrap();
        let stream = std::fs::File::from(writer.as_fd().try_clone_to_owned().unwrap())
            .metadata()
            .unwrap();
        // Another stream's name, as a child whose stderr was redirected
        // inherits it.
        let ino = if journal {
            stream.ino()
        } else {
            stream.ino() + 1
        };
        let child = bin()
            .arg("--config")
            .arg(&cfg)
            .env("JOURNAL_STREAM", format!("{}:{ino}", stream.dev()))
            .env("FAILOVER_PROXY_LOG__FORMAT", format)
            .stdout(std::process::Stdio::null())
            .stderr(writer)
            .spawn()
            .expect("spawn failover-proxy");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(reader)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let p = Running { child, lines };
        let mut seen = p.lines_until("address marked down");
        // A reload of a broken file logs an ERROR.
        std::fs::write(&cfg, "[[route]\n").unwrap();
        p.signal("HUP");
        seen.extend(p.lines_until("reload refused"));
        for line in &seen {
            let level = ["ERROR", "WARN", "INFO", "DEBUG"]
                .into_iter()
                .find(|l| {
                    line.contains(&format!("\"level\":\"{l}\"")) || line.contains(&format!(" {l} "))
                })
                .unwrap_or_else(|| panic!("no level in {line}"));
            let prefix = match level {
                "ERROR" => "<3>",
                "WARN" => "<4>",
                "INFO" => "<6>",
                _ => "<7>",
            };
            assert_eq!(line.starts_with(prefix), journal, "{format}: {line}");
            assert_eq!(line.starts_with('<'), journal, "{format}: {line}");
        }
        for level in ["ERROR", "WARN", "INFO"] {
            assert!(
                seen.iter().any(|l| l.contains(level)),
                "no {level} in {seen:#?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_open_file_limit_is_raised_and_one_too_low_is_named() {
    let b = backend(ip(130), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ip(130), b.addr.port(), "");
    add_route_keys(&cfg, "max_connections = 1000");
    // prlimit (util-linux) sets the limits, then runs the proxy in its place.
    let with_limit = |limit: &str| {
        Running::spawn_with(
            bin_via("prlimit", &[&format!("--nofile={limit}")])
                .arg("--config")
                .arg(&cfg),
        )
    };

    // A soft limit of 256 under a hard one of 4,096: raised, and enough for
    // 1,000 connections, so 400 held at once all get through.
    let p = with_limit("256:4096");
    let lines = p.lines_until("\"listening\"");
    let addr = listen_addr(lines.last().unwrap());
    let raised = lines
        .iter()
        .find(|l| l.contains("raised the soft open-file limit"))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    let (_, f) = log_fields(raised);
    assert_eq!(
        (f["before"].as_u64(), f["after"].as_u64()),
        (Some(256), Some(4096))
    );
    assert!(
        !lines.iter().any(|l| l.contains("open-file limit is below")),
        "{lines:#?}"
    );
    assert_eq!(soft_nofile(p.child.id()), 4096);
    let mut held = Vec::new();
    for _ in 0..400 {
        let (id, s) = within("a held connection", served_by(addr)).await.unwrap();
        assert_eq!(id, "b");
        held.push(s);
    }
    drop(held);
    drop(p);

    // A hard limit of 1,024 cannot hold 1,000 connections: said at start,
    // with about how many it can.
    let p = with_limit("256:1024");
    let lines = p.lines_until("\"listening\"");
    let short = lines
        .iter()
        .find(|l| l.contains("open-file limit is below"))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    let (level, f) = log_fields(short);
    assert_eq!(level, "WARN");
    assert_eq!(f["limit"], 1024);
    assert_eq!(f["needed"], 2 * 1000 + failover_proxy::limits::SPARE);
    assert_eq!(f["connections"], (1024 - failover_proxy::limits::SPARE) / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_below_the_unprivileged_start_is_refused_with_the_way_out() {
    // Legacy clients often have their port fixed (443, 389); the hardened
    // unit grants no capability, so the error must say what to do.
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if start == 0 {
        eprintln!("every port may be bound here: nothing to refuse");
        return;
    }
    let port = u16::try_from(start - 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[route]]\nlisten = \"127.0.0.144:{port}\"\nalias = \"127.0.0.1\"\nport = 1\n\
             [resolver]\nnameservers = [\"127.0.0.1:9\"]\n[admin]\nlisten = \"\"\n"
        ),
    )
    .unwrap();
    // Root binds any port: run it without the capability.
    let mut cmd = bin_without("-net_bind_service");
    let out = cmd.arg("-c").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.144:{port}"))
            && err.contains("Permission denied")
            && err.contains(&format!(
                "ports below {start} need the CAP_NET_BIND_SERVICE capability"
            ))
            && err.contains("systemd/failover-proxy.socket"),
        "{err}"
    );
}

/// The binary during an outage of its whole cluster: `cluster.test` is
/// NXDOMAIN at `dns` until a test gives it `at`, a port on 127.0.0.`last`
/// that refuses until a test listens on `server`. Its start-up lines are
/// in `lines`.
struct Outage {
    dns: DnsServer,
    server: tokio::net::TcpSocket,
    at: std::net::SocketAddr,
    addr: std::net::SocketAddr,
    p: Running,
    lines: Vec<String>,
    _dir: tempfile::TempDir,
}

async fn outage(last: u8) -> Outage {
    let dns = DnsServer::start().await;
    dns.set("cluster.test", Behavior::NxDomain);
    let (server, at) = refusing(ip(last));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_dns_config(dir.path(), dns.addr, at.port(), "");
    let p = Running::spawn(&cfg);
    let mut lines = p.lines_until("\"listening\"");
    let addr = listen_addr(lines.last().expect("the line"));
    lines.extend(p.lines_until("alias does not resolve yet"));
    Outage {
        dns,
        server,
        at,
        addr,
        p,
        lines,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_through_an_outage_are_logged_summed_and_each_counted() {
    // A client that reconnects at once after each reset, through an outage
    // of the whole cluster, would get a WARN line per connection. They are
    // summed instead: at most one line a second per kind, each with the
    // resets since the last, and one line when the outage ends with the
    // rest, so that every reset is counted once.
    const N: u64 = 40;
    let o = outage(155).await;
    let (dns, at, addr, mut p, mut lines) = (&o.dns, o.at, o.addr, o.p, o.lines);

    let started = std::time::Instant::now();
    for _ in 0..N {
        assert_reset(addr).await;
    }
    dns.set("cluster.test", Behavior::Records(vec![at.ip()], 0));
    for _ in 0..N {
        assert_reset(addr).await;
    }
    let secs = started.elapsed().as_secs_f64().ceil() as usize;
    let b = serve_backend(o.server.listen(16).unwrap(), "back");
    assert_eq!(id_via(addr).await, "back");
    stop_cleanly(&mut p, &mut lines);
    drop(b);

    for (warn, end) in [
        (
            "connection reset: alias did not resolve",
            "alias resolves again",
        ),
        (
            "connection reset: no server reachable",
            "a server is reachable again",
        ),
    ] {
        let resets = |needle: &str, level: &str| -> Vec<u64> {
            logged(&lines, needle)
                .into_iter()
                .inspect(|(lv, _)| assert_eq!(lv, level, "{needle}"))
                .map(|(_, f)| f["resets"].as_u64().expect("resets field"))
                .collect()
        };
        let warned = resets(warn, "WARN");
        let ended = resets(end, "INFO");
        assert!(
            !warned.is_empty() && warned.len() <= secs + 1,
            "{} {warn:?} lines for {N} resets in {secs} s",
            warned.len()
        );
        assert_eq!(warned[0], 1, "the first reset is logged at once");
        assert_eq!(ended.len(), 1, "{end:?}: {lines:#?}");
        assert_eq!(
            warned.iter().sum::<u64>() + ended[0],
            N,
            "{warn:?} {warned:?}, {end:?} {ended:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_that_answers_with_the_proxy_itself_is_named_once_not_per_connection() {
    // The alias's first address is the proxy's own listener (its IP and
    // port): the loop guard skips it and the next address serves. That is
    // the configuration's fault and lasts until it changes, so it is
    // logged once, and the connections that skip it are no failovers
    // worth a WARN each.
    let port = std::net::TcpListener::bind((ip(156), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let own = std::net::SocketAddr::new(ip(156), port);
    let b = backend_on(std::net::SocketAddr::new(ip(157), port), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ip(157), port, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:0\"\nalias", &format!("{own}\"\nalias"));
    std::fs::write(&cfg, text).unwrap();
    std::fs::write(
        dir.path().join("hosts"),
        format!("{} cluster.test\n{} cluster.test\n", own.ip(), b.addr.ip()),
    )
    .unwrap();
    let mut p = Running::spawn(&cfg);
    let mut lines = p.lines_until("\"listening\"");
    assert_eq!(listen_addr(lines.last().expect("the line")), own);
    for _ in 0..10 {
        assert_eq!(id_via(own).await, "b");
    }
    stop_cleanly(&mut p, &mut lines);
    let named = logged(&lines, "own listener");
    assert_eq!(named.len(), 1, "{lines:#?}");
    assert_eq!(named[0].0, "WARN");
    assert_eq!(named[0].1["upstream.addr"], own.to_string());
    assert!(!lines.iter().any(|l| l.contains("failover:")), "{lines:#?}");
}

/// Sets `log.level` in a config written by [`write_config`].
fn set_log_level(cfg: &Path, level: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with("level = ")) {
        out.push_str(line);
        out.push('\n');
        if line == "[log]" {
            out.push_str(&format!("level = {level:?}\n"));
        }
    }
    std::fs::write(cfg, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_log_level_unless_rust_log_is_set() {
    let b = backend(ip(167), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        ip(167),
        b.addr.port(),
        "[health]\ninterval = \"0s\"\n",
    );
    // The start-up lines, without the connections' own.
    let quiet = "warn,failover_proxy=info,failover_proxy::route=warn";
    set_log_level(&cfg, quiet);
    for rust_log in [None, Some(quiet)] {
        let mut cmd = bin();
        cmd.arg("-c").arg(&cfg);
        if let Some(v) = rust_log {
            cmd.env("RUST_LOG", v);
        }
        let mut p = Running::spawn_with(&mut cmd);
        let addr = listen_addr(&p.wait_line("\"listening\""));
        let admin = listen_addr(&p.wait_line("admin endpoint listening"));
        exchange(addr, b"quiet").await;
        no_connection_open(admin, "cluster.test").await;

        set_log_level(&cfg, "info");
        p.signal("HUP");
        let mut lines = p.lines_until("configuration reloaded");

        let (_, client) = exchange(addr, b"loud").await;
        no_connection_open(admin, "cluster.test").await;
        stop_cleanly(&mut p, &mut lines);
        let closed = logged(&lines, "connection closed");
        if rust_log.is_none() {
            let changed = logged(&lines, "log level changed");
            assert_eq!(changed.len(), 1, "{lines:?}");
            assert_eq!(changed[0].0, "INFO");
            assert_eq!(changed[0].1["log_level"], "info");
            // Only the connection made after the reload is logged.
            assert_eq!(closed.len(), 1, "{lines:?}");
            assert_eq!(closed[0].1["client.addr"], client.to_string());
        } else {
            let kept = logged(&lines, "RUST_LOG is set and wins");
            assert_eq!(kept.len(), 1, "{lines:?}");
            assert_eq!(kept[0].0, "WARN");
            assert!(closed.is_empty(), "{lines:?}");
        }
        // Back to the start for the next round.
        set_log_level(&cfg, quiet);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_figures_are_scraped_with_the_proxy_prefix() {
    let b = backend(ip(169), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let (p, addr, admin) = spawn_probeless(dir.path(), ip(169), b.addr.port());
    let figure = |text: &str, name: &str| {
        sample(text, &format!("failover_proxy_process_{name}"), &[])
            .unwrap_or_else(|| panic!("no failover_proxy_process_{name} in {text}"))
    };
    let before = scrape(admin).await;
    let open = figure(&before, "open_fds");
    assert!(open > 0.0 && figure(&before, "max_fds") >= open, "{before}");
    assert!(figure(&before, "resident_memory_bytes") > 1e6, "{before}");
    assert!(figure(&before, "threads") >= 1.0, "{before}");
    assert!(figure(&before, "start_time_seconds") > 1.7e9, "{before}");
    figure(&before, "cpu_seconds_total");
    // Ten connections held: two descriptors each, client and upstream.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(within("served", served_by(addr)).await.unwrap());
    }
    let during = scrape(admin).await;
    // At least: the first scrape's admin connection may not be closed yet.
    let now = figure(&during, "open_fds");
    assert!(
        (open + 20.0..=open + 21.0).contains(&now),
        "{open} then {now}"
    );
    // The CPU seconds are the kernel's count, fraction included: a
    // sidecar's CPU time is mostly fractions of a second, and a whole-number
    // counter read 0 through them. Scrapes cost CPU, so the count reaches a
    // tick; it must then lie between the counts read either side of a scrape.
    let pid = p.child.id();
    let ticks = within("a tick of CPU time", async {
        loop {
            let t = cpu_ticks(pid);
            if t > 0 {
                return t;
            }
            scrape(admin).await;
        }
    })
    .await;
    let seconds = figure(&scrape(admin).await, "cpu_seconds_total");
    let after = cpu_ticks(pid);
    assert!(
        (ticks as f64 / 100.0..=after as f64 / 100.0).contains(&seconds),
        "{seconds} s, not within {ticks} to {after} ticks"
    );
}

/// The binary without `caps` (setpriv's form, "-net_bind_service") when
/// this test runs as root, which reads any file and binds any port unless
/// setpriv (util-linux) takes the capability out of the bounding set for
/// the exec; other users have none of them to lose.
fn bin_without(caps: &str) -> std::process::Command {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if root {
        bin_via("setpriv", &["--bounding-set", caps])
    } else {
        bin()
    }
}

/// User plus system time of `pid`, in the clock ticks of `/proc` (USER_HZ,
/// 100 a second on Linux whatever the kernel's own rate).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name, in parentheses and free to hold spaces:
    // state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_held_back_are_logged_when_their_second_is_over_though_none_follow() {
    // Clients that give up during an outage: the resets after the first
    // line are not left unsaid until the outage ends, hours on, maybe.
    const N: u64 = 30;
    let o = outage(170).await;
    let (dns, at, addr, p) = (&o.dns, o.at, o.addr, &o.p);
    for (kind, ends) in [
        ("connection reset: alias did not resolve", false),
        ("connection reset: no server reachable", true),
    ] {
        for _ in 0..N {
            assert_reset(addr).await;
        }
        // No more connections, no recovery: the WARN lines alone come to
        // every reset (the first at once, the rest a second on).
        let mut counted = 0;
        while counted < N {
            let line = p.wait_line(kind);
            let (level, f) = log_fields(&line);
            assert_eq!(level, "WARN", "{line}");
            counted += f["resets"].as_u64().expect("resets field");
        }
        assert_eq!(counted, N, "{kind}");
        if !ends {
            // The alias resolves again, to a refusing server.
            dns.set("cluster.test", Behavior::Records(vec![at.ip()], 0));
        }
    }
}

/// Context switches of the thread of `pid` named `name`, if there is one.
fn thread_switches(pid: u32, name: &str) -> Option<u64> {
    tasks(pid).find_map(|t| {
        let comm = std::fs::read_to_string(t.join("comm")).ok()?;
        (comm.trim() == name).then(|| task_switches(&t))
    })
}

/// With `worker_threads = 3` the proxy runs three event loops, and the
/// connections it accepts are served on all three: each extra loop wakes
/// for the traffic of the connections handed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_an_event_loop_per_worker_thread() {
    let b = backend(ip(203), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        ip(203),
        b.addr.port(),
        "[health]\ninterval = \"0s\"\n[runtime]\nworker_threads = 3\n",
    );
    let p = Running::spawn(&cfg);
    let (_, started) = log_fields(&p.wait_line("failover-proxy started"));
    assert_eq!(started["event_loops"], 3);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let pid = p.child.id();
    assert!(thread_switches(pid, "loop-2").is_some());
    assert!(
        thread_switches(pid, "loop-3").is_none(),
        "one loop too many"
    );

    // Six held connections: the least busy loop takes each, so two each.
    let mut held = hold(addr, 6).await;
    let woken = woken_during(pid, &["loop-1", "loop-2"], round_trips(&mut held, 20)).await;
    for (n, w) in ["loop-1", "loop-2"].iter().zip(woken) {
        // 40 round trips for its two connections; its own timer wakes it
        // a few times at most.
        assert!(w >= 20, "{n} woke {w} times: it serves none of them");
    }
}

/// `n` connections through the proxy at `addr`, each served by backend
/// "b", held open.
async fn hold(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let (id, s) = within("served", served_by(addr)).await.expect("served");
        assert_eq!(id, "b");
        held.push(s);
    }
    held
}

/// Round trips of one byte, one connection at a time, so that a loop
/// serving one of them sleeps between them and wakes for each.
async fn round_trips(held: &mut [TcpStream], rounds: u8) {
    for round in 0..rounds {
        for s in held.iter_mut() {
            s.write_all(&[round]).await.unwrap();
            let mut echo = [0u8; 1];
            within("echo", s.read_exact(&mut echo)).await.unwrap();
            assert_eq!(echo, [round]);
        }
    }
}

/// How often each of `names` woke while `f` ran.
async fn woken_during<F: Future<Output = ()>>(pid: u32, names: &[&str], f: F) -> Vec<u64> {
    let before: Vec<u64> = names
        .iter()
        .map(|n| thread_switches(pid, n).expect("the loop's thread"))
        .collect();
    f.await;
    names
        .iter()
        .zip(before)
        .map(|(n, was)| thread_switches(pid, n).expect("the loop's thread") - was)
        .collect()
}

/// A reload that changes `runtime.worker_threads` starts event loops for
/// the next connections; one that lowers it retires loops, which go on
/// serving the connections they have and take no new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_starts_event_loops_and_retires_them_with_their_connections() {
    let b = backend(ip(204), "b").await;
    let dir = tempfile::tempdir().unwrap();
    let threads = |n: u8| format!("[health]\ninterval = \"0s\"\n[runtime]\nworker_threads = {n}\n");
    let cfg = write_config(dir.path(), ip(204), b.addr.port(), &threads(1));
    let reload_to = |n: u8| write_config(dir.path(), ip(204), b.addr.port(), &threads(n));
    let p = Running::spawn(&cfg);
    let (_, started) = log_fields(&p.wait_line("failover-proxy started"));
    assert_eq!(started["event_loops"], 1);
    let addr = listen_addr(&p.wait_line("\"listening\""));
    let pid = p.child.id();
    assert!(thread_switches(pid, "loop-1").is_none(), "one loop only");
    // Two on the main loop, then three loops: the two new ones are the
    // least busy, and take the next connections.
    let mut first = hold(addr, 2).await;
    reload_to(3);
    p.signal("HUP");
    let (_, changed) = log_fields(&p.wait_line("event loops changed"));
    assert_eq!(changed["event_loops"], 3);
    p.wait_line("configuration reloaded");
    let mut second = hold(addr, 6).await;
    let woken = woken_during(pid, &["loop-1", "loop-2"], round_trips(&mut second, 20)).await;
    for (n, w) in ["loop-1", "loop-2"].iter().zip(woken) {
        assert!(w >= 20, "{n} woke {w} times: it serves none of them");
    }

    // Back to two: loop-2 is retired. Its connections go on there, and
    // it takes none of the new ones.
    reload_to(2);
    p.signal("HUP");
    let (_, changed) = log_fields(&p.wait_line("event loops changed"));
    assert_eq!(changed["event_loops"], 2);
    p.wait_line("configuration reloaded");
    let woken = woken_during(pid, &["loop-2"], round_trips(&mut second, 20)).await;
    assert!(
        woken[0] >= 20,
        "loop-2 woke {} times: its connections went",
        woken[0]
    );
    let mut third = hold(addr, 4).await;
    let woken = woken_during(pid, &["loop-1", "loop-2"], round_trips(&mut third, 40)).await;
    assert!(
        woken[0] >= 20,
        "loop-1 woke {} times: it took none of the new connections",
        woken[0]
    );
    // Its own connections' timers (keepalive armed after a second) wake
    // it a few times at most; 160 round trips would wake it 40 times.
    assert!(
        woken[1] < 10,
        "loop-2 woke {} times: it took new connections",
        woken[1]
    );
    // Every connection, whichever loop serves it, still carries bytes.
    round_trips(&mut first, 2).await;
    round_trips(&mut second, 2).await;
    round_trips(&mut third, 2).await;
}
