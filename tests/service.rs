//! The real binary under a service manager's hand: SIGHUP reload,
//! sd_notify messages, and socket activation.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};

fn route(name: &str, listen: &str, alias: &str, port: u16) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nalias = \"{alias}\"\nport = {port}\n"
    )
}

fn tail(hosts: &Path) -> String {
    format!(
        "[resolver]\nnameservers = [\"127.0.0.1:9\"]\nhosts_file = \"{}\"\n[log]\nformat = \"json\"\n[admin]\nlisten = \"\"\n[health]\ninterval = \"0s\"\n",
        hosts.display()
    )
}

/// The bound address of route `name` from its "listening" log line.
fn listening(p: &Running, name: &str) -> SocketAddr {
    let needle = format!("\"route\":\"{name}\"");
    loop {
        let l = p.wait_line("\"listening\"");
        if l.contains(&needle) {
            return listen_addr(&l);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_routes_and_ignores_an_invalid_file() {
    let ba = backend(ip(84), "a").await;
    let bb = backend(ip(85), "b").await;
    let bc = backend(ip(86), "c").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.84 a.test\n127.0.0.85 b.test\n127.0.0.86 c.test\n",
    )
    .unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}{}",
            route("a", "127.0.0.81:0", "a.test", ba.addr.port()),
            route("c", "127.0.0.83:0", "c.test", bc.addr.port()),
            tail(&hosts)
        ),
    )
    .unwrap();
    let p = Running::spawn(&cfg);
    let a = listening(&p, "a");
    let c = listening(&p, "c");
    assert_eq!(id_via(a).await, "a");
    let (id, mut held) = within("held connection", served_by(c)).await.unwrap();
    assert_eq!(id, "c");

    // Remove a, add b, keep c (with a changed timeout).
    std::fs::write(
        &cfg,
        format!(
            "{}{}connect_timeout = \"3s\"\n{}",
            route("b", "127.0.0.82:0", "b.test", bb.addr.port()),
            route("c", "127.0.0.83:0", "c.test", bc.addr.port()),
            tail(&hosts)
        ),
    )
    .unwrap();
    p.signal("HUP");
    let b = listening(&p, "b");
    p.wait_line("configuration reloaded");
    assert_eq!(id_via(b).await, "b");
    assert_eq!(
        TcpStream::connect(a)
            .await
            .map(|_| ())
            .map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the removed route stops accepting"
    );
    assert_eq!(id_via(c).await, "c");
    // The connection opened before the reload is untouched.
    held.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo on the held connection", held.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"ping");

    // An invalid file is refused and everything keeps serving.
    std::fs::write(
        &cfg,
        "[[route]]\nlisten = \"127.0.0.82:0\"\nalias = \"bad_alias\"\nport = 1\n",
    )
    .unwrap();
    p.signal("HUP");
    p.wait_line("reload refused");
    assert_eq!(id_via(b).await, "b");
    assert_eq!(id_via(c).await, "c");
    held.write_all(b"pong").await.unwrap();
    within("echo after the refused reload", held.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_route_resolver_and_event_loop_count() {
    let c1 = backend(ip(33), "c1").await;
    let port = c1.addr.port();
    let _c2 = backend_on(SocketAddr::new(ip(34), port), "c2").await;
    let _c3 = backend_on(SocketAddr::new(ip(35), port), "c3").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.33 c.test\n127.0.0.34 c2.test\n").unwrap();
    let moved = dir.path().join("hosts2");
    std::fs::write(&moved, "127.0.0.35 c2.test\n").unwrap();
    let cfg = dir.path().join("proxy.toml");
    let write = |alias: &str, hosts: &Path, extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "{}{}{extra}",
                route("c", "127.0.0.36:0", alias, port),
                tail(hosts)
            ),
        )
        .unwrap();
    };
    write("c.test", &hosts, "");
    let p = Running::spawn(&cfg);
    let c = listening(&p, "c");
    assert_eq!(id_via(c).await, "c1");

    // The route's alias changes on the same listener.
    write("c2.test", &hosts, "");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        lines.iter().any(|l| l.contains("route changed")),
        "{lines:?}"
    );
    assert_eq!(id_via(c).await, "c2");

    // The resolver's hosts file changes.
    write("c2.test", &moved, "");
    p.signal("HUP");
    p.lines_until("configuration reloaded");
    assert_eq!(id_via(c).await, "c3");

    // One event loop more than the default of one per core: started, and
    // the route serves on.
    let loops = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
    write(
        "c2.test",
        &moved,
        &format!("[runtime]\nworker_threads = {loops}\n"),
    );
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        lines.iter().any(|l| l.contains("event loops changed")
            && l.contains(&format!("\"event_loops\":{loops}"))),
        "{lines:?}"
    );
    for _ in 0..loops {
        assert_eq!(id_via(c).await, "c3");
    }
}

/// Receives one sd_notify datagram; the timeout only stops a hang.
async fn notified(sock: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within("an sd_notify message", sock.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_says_ready_reloading_and_stopping_at_the_right_moments() {
    let bk = backend(ip(87), "n").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.87 n.test\n").unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            route("n", "127.0.0.88:0", "n.test", bk.addr.port()),
            tail(&hosts)
        ),
    )
    .unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();

    let mut p = Running::spawn_with(bin().arg("-c").arg(&cfg).env("NOTIFY_SOCKET", &sock_path));
    let ready = notified(&sock).await;
    assert_eq!(ready.trim(), "READY=1");
    // READY=1 comes once the listener is bound: it serves now.
    let addr = listening(&p, "n");
    assert_eq!(id_via(addr).await, "n");

    p.signal("HUP");
    let reloading = notified(&sock).await;
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(
        reloading.contains("MONOTONIC_USEC="),
        "systemd 253+ needs it: {reloading}"
    );
    assert_eq!(notified(&sock).await.trim(), "READY=1");

    let (_, open) = within("open connection", served_by(addr)).await.unwrap();
    p.signal("TERM");
    // With the drain (30 s by default) and 5 s for the exit: systemd
    // waits that long even if its TimeoutStopSec= is shorter.
    assert_eq!(
        notified(&sock).await.trim(),
        "STOPPING=1\nEXTEND_TIMEOUT_USEC=35000000"
    );
    drop(open);
    assert_eq!(p.wait_exit(), 0);
}

/// The binary run by systemd-socket-activate on a free port of each of
/// `ips`, started by a first connection to the first, whose backend
/// answers `first_id`; `config(addrs)` is the config for the chosen
/// addresses, written to `dir/proxy.toml`. With `holder`, a second process
/// keeps copies of the sockets for as long as the proxy runs, as systemd
/// does: closing the proxy's copy then does not close a socket. Other
/// ports are tried when the tool cannot bind the chosen ones (another
/// process took one between the probe and the bind).
async fn activated(
    ips: &[u8],
    holder: bool,
    first_id: &str,
    dir: &Path,
    config: impl Fn(&[SocketAddr]) -> String,
) -> (Running, Vec<SocketAddr>) {
    for _ in 0..5 {
        if let Some(started) = activate_once(ips, holder, first_id, dir, &config).await {
            return started;
        }
    }
    panic!("could not start systemd-socket-activate on free ports");
}

async fn activate_once(
    ips: &[u8],
    holder: bool,
    first_id: &str,
    dir: &Path,
    config: &impl Fn(&[SocketAddr]) -> String,
) -> Option<(Running, Vec<SocketAddr>)> {
    let addrs: Vec<SocketAddr> = ips
        .iter()
        .map(|&i| {
            std::net::TcpListener::bind((ip(i), 0))
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let cfg = dir.join("proxy.toml");
    std::fs::write(&cfg, config(&addrs)).unwrap();
    let mut cmd = std::process::Command::new("systemd-socket-activate");
    for a in &addrs {
        cmd.arg("-l").arg(a.to_string());
    }
    if holder {
        // `tail --pid` ends with the proxy (exec keeps the shell's pid,
        // which LISTEN_PID names), and holds the passed descriptors till
        // then.
        cmd.args([
            "sh",
            "-c",
            "tail --pid=$$ -f /dev/null </dev/null >/dev/null 2>&1 & exec \"$0\" -c \"$1\"",
        ]);
    }
    cmd.arg(BIN);
    if !holder {
        cmd.arg("-c");
    }
    cmd.arg(&cfg);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FAILOVER_PROXY_") {
            cmd.env_remove(k);
        }
    }
    let p = Running::spawn_with(&mut cmd);
    for _ in &addrs {
        // "Listening on ADDR as FD." or "Failed to listen on ADDR: ...".
        if !p.wait_line("isten").starts_with("Listening on") {
            return None;
        }
    }
    // The proxy starts on the first connection, and must take that very
    // socket: binding its own would fail with "address in use".
    let (id, _) = within("the first connection", served_by(addrs[0]))
        .await
        .expect("served");
    assert_eq!(id, first_id);
    Some((p, addrs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_passed_by_systemd_are_taken_by_address_and_one_no_route_serves_refuses() {
    let bk = backend(ip(147), "pa").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.147 pa.test\n").unwrap();
    let config = |a: &[SocketAddr]| {
        let admin = format!("[admin]\nlisten = \"{}\"", a[2]);
        format!(
            "{}{}",
            route("pa", &a[0].to_string(), "pa.test", bk.addr.port()),
            tail(&hosts).replace("[admin]\nlisten = \"\"", &admin)
        )
    };
    let (mut p, addrs) = activated(&[148, 149, 150], true, "pa", dir.path(), config).await;
    // The admin endpoint takes its socket too: binding its own would fail.
    assert_eq!(http_get(addrs[2], "/healthz").await.0, 200);
    // systemd keeps listening on the second address whatever the proxy
    // does: a client there must be refused, not left waiting for good.
    let warned = p.wait_line("no route listens on");
    assert!(warned.contains(&addrs[1].to_string()), "{warned}");
    assert_reset(addrs[1]).await;
    assert_eq!(id_via(addrs[0]).await, "pa");

    // At shutdown that socket is let go with the routes' own: a client
    // then waits in its queue for the next instance instead of a reset.
    let (_, mut held) = within("a held connection", served_by(addrs[0]))
        .await
        .unwrap();
    p.signal("TERM");
    p.wait_line("draining open connections");
    let waiting = TcpStream::connect(addrs[1])
        .await
        .expect("queued during the drain, not reset");
    // A round trip through the draining proxy: its event loop has run
    // since that connection arrived, so anything still accepting on its
    // socket would have reset it by now.
    held.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    within("the echo", held.read_exact(&mut echo))
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    match waiting.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("answered during the drain: {other:?}"),
    }
    drop(held);
    assert_eq!(p.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_on_a_socket_from_systemd_refuses_once_removed_and_can_come_back() {
    let bk = backend(ip(151), "rb").await;
    let other = backend(ip(152), "other").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.151 rb.test\n127.0.0.152 other.test\n").unwrap();
    let with = |a: SocketAddr| {
        format!(
            "{}{}",
            route("rb", &a.to_string(), "rb.test", bk.addr.port()),
            tail(&hosts)
        )
    };
    let (p, addrs) = activated(&[153], true, "rb", dir.path(), |a| with(a[0])).await;
    let a = addrs[0];
    let cfg = dir.path().join("proxy.toml");

    // Removed: systemd still listens there, so a client must be refused
    // rather than handed a connection that nothing answers.
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            route("other", "127.0.0.154:0", "other.test", other.addr.port()),
            tail(&hosts)
        ),
    )
    .unwrap();
    p.signal("HUP");
    p.wait_line("configuration reloaded");
    assert_reset(a).await;

    // Added back: the route takes systemd's socket again, where binding
    // the address itself would fail, since systemd's socket holds it.
    std::fs::write(&cfg, with(a)).unwrap();
    p.signal("HUP");
    let reload = p.lines_until("configuration reloaded");
    assert!(
        !reload.iter().any(|l| l.contains("keeping the running")),
        "{reload:?}"
    );
    assert_eq!(id_via(a).await, "rb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_inherited_socket() {
    let bk = backend(ip(89), "sa").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.89 sa.test\n").unwrap();
    let config = |a: &[SocketAddr]| {
        format!(
            "{}{}",
            route("sa", &a[0].to_string(), "sa.test", bk.addr.port()),
            tail(&hosts)
        )
    };
    let (p, addrs) = activated(&[90], false, "sa", dir.path(), config).await;
    p.wait_line("using the socket passed by systemd");
    assert_eq!(id_via(addrs[0]).await, "sa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_is_pinged_when_systemd_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.91 w.test\n").unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            route("w", "127.0.0.92:0", "w.test", 9),
            tail(&hosts)
        ),
    )
    .unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let _p = Running::spawn_with(
        bin()
            .arg("-c")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "1000000"),
    );
    let mut seen = Vec::new();
    let mut pings = Vec::new();
    while pings.len() < 3 {
        let m = notified(&sock).await;
        if m.trim() == "WATCHDOG=1" {
            pings.push(Instant::now());
        }
        seen.push(m);
    }
    assert!(seen.iter().any(|m| m.trim() == "READY=1"), "{seen:?}");
    // systemd kills the service when a whole period passes without a ping;
    // pinging at half the period leaves the other half as margin.
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap < Duration::from_secs(1),
            "a period without a ping: {gap:?}"
        );
    }
}

/// `tail(hosts)` with the admin endpoint on `admin` ("" = off).
fn tail_admin(hosts: &Path, admin: &str) -> String {
    tail(hosts).replace(
        "[admin]\nlisten = \"\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    )
}

/// The admin address a reload bound, from its log lines: the last such
/// line, since the lines may begin with the start-up's own.
fn admin_moved_to(lines: &[String]) -> SocketAddr {
    let l = lines
        .iter()
        .rev()
        .find(|l| l.contains("admin endpoint listening"))
        .unwrap_or_else(|| panic!("no admin endpoint line in {lines:?}"));
    listen_addr(l)
}

/// A route `name` on `127.0.0.{listen}:0` to a backend on `127.0.0.{at}`
/// (`name.test` in its hosts file), for tests that move the admin
/// endpoint: [`AdminCase::write`] puts it where they ask.
struct AdminCase {
    _backend: Backend,
    dir: tempfile::TempDir,
    route: String,
    /// Keys added to the `[admin]` table.
    admin_keys: &'static str,
}

impl AdminCase {
    async fn new(at: u8, listen: u8, name: &str, admin_keys: &'static str) -> AdminCase {
        let backend = backend(ip(at), name).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hosts"),
            format!("127.0.0.{at} {name}.test\n"),
        )
        .unwrap();
        let route = route(
            name,
            &format!("127.0.0.{listen}:0"),
            &format!("{name}.test"),
            backend.addr.port(),
        );
        AdminCase {
            _backend: backend,
            dir,
            route,
            admin_keys,
        }
    }

    fn cfg(&self) -> std::path::PathBuf {
        self.dir.path().join("proxy.toml")
    }

    /// Writes the config with the admin endpoint on `admin` ("" = off).
    fn write(&self, admin: &str) {
        let tail = tail_admin(&self.dir.path().join("hosts"), admin)
            .replace("[admin]\n", &format!("[admin]\n{}", self.admin_keys));
        std::fs::write(self.cfg(), format!("{}{tail}", self.route)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_turns_the_admin_endpoint_on_moves_it_and_turns_it_off() {
    let case = AdminCase::new(192, 193, "am", "").await;
    let write = |admin: &str| case.write(admin);
    write("");
    let p = Running::spawn(&case.cfg());
    let r = listening(&p, "am");

    // Turned on by a reload: it serves the routes that were already
    // running.
    write("127.0.0.194:0");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    let first = admin_moved_to(&lines);
    let (code, status) = http_get(first, "/status").await;
    assert_eq!(code, 200);
    assert!(status.contains("\"name\":\"am\""), "{status}");

    // A scraper's kept-alive connection, one request answered.
    let mut kept = TcpStream::connect(first).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    within("the kept connection's answer", kept.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // An address that cannot be bound: the reload is refused and the
    // endpoint stays where it is.
    let taken = std::net::TcpListener::bind((ip(195), 0)).unwrap();
    write(&taken.local_addr().unwrap().to_string());
    p.signal("HUP");
    let refused = p.wait_line("keeping the running configuration");
    assert!(refused.contains("admin.listen"), "{refused}");
    assert_eq!(http_get(first, "/healthz").await.0, 200);
    drop(taken);

    // Moved: the new address serves, the old one refuses, and the kept
    // connection is closed rather than left answering at the old address.
    write("127.0.0.196:0");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    let second = admin_moved_to(&lines);
    assert_eq!(second.ip(), ip(196));
    assert_eq!(http_get(second, "/healthz").await.0, 200);
    let mut rest = Vec::new();
    within("the kept connection's close", kept.read_to_end(&mut rest))
        .await
        .expect("closed with a FIN");
    let e = TcpStream::connect(first)
        .await
        .expect_err("the old address");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // Turned off.
    write("");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        lines.iter().any(|l| l.contains("admin endpoint off")),
        "{lines:?}"
    );
    let e = TcpStream::connect(second).await.expect_err("no endpoint");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(id_via(r).await, "am");
}

/// Moving the endpoint to another form of its own address on the same
/// port (`127.0.0.1:9464` to `0.0.0.0:9464`, here to the IPv4-mapped IPv6
/// form, which conflicts the same way but stays on loopback): the running
/// endpoint holds the port, so it stops first. Where someone else holds
/// the port, the endpoint goes back where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_moves_to_another_form_of_its_address_on_the_same_port() {
    let case = AdminCase::new(205, 205, "af", "allow_non_loopback = true\n").await;
    let write = |admin: &str| case.write(admin);
    write("127.0.0.205:0");
    let p = Running::spawn(&case.cfg());
    let r = listening(&p, "af");
    let first = listen_addr(&p.wait_line("admin endpoint listening"));
    let port = first.port();

    let mapped = format!("[::ffff:127.0.0.205]:{port}");
    write(&mapped);
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("keeping the running configuration")),
        "{lines:?}"
    );
    assert_eq!(admin_moved_to(&lines).to_string(), mapped);
    assert_eq!(http_get(first, "/healthz").await.0, 200);

    // Someone else holds the port on the next address: the endpoint is
    // back on the mapped one, and says so.
    let taken = std::net::TcpListener::bind((ip(206), port)).unwrap();
    write(&format!("127.0.0.206:{port}"));
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        lines.iter().any(|l| l.contains("admin endpoint not moved")),
        "{lines:?}"
    );
    assert_eq!(admin_moved_to(&lines).to_string(), mapped);
    assert_eq!(http_get(first, "/healthz").await.0, 200);
    drop(taken);
    assert_eq!(id_via(r).await, "af");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_endpoint_on_a_socket_from_systemd_refuses_once_moved_and_can_come_back() {
    let bk = backend(ip(197), "ab").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.197 ab.test\n").unwrap();
    let with = |r: SocketAddr, admin: &str| {
        format!(
            "{}{}",
            route("ab", &r.to_string(), "ab.test", bk.addr.port()),
            tail_admin(&hosts, admin)
        )
    };
    let (p, addrs) = activated(&[198, 199], true, "ab", dir.path(), |a| {
        with(a[0], &a[1].to_string())
    })
    .await;
    let (r, passed) = (addrs[0], addrs[1]);
    assert_eq!(http_get(passed, "/healthz").await.0, 200);
    let cfg = dir.path().join("proxy.toml");
    // The IPv4-mapped form of an address is not loopback to the check.
    let mapped_form =
        |admin: &str| with(r, admin).replace("[admin]\n", "[admin]\nallow_non_loopback = true\n");

    // Moved off: systemd still listens there, so a client must be refused
    // rather than left waiting for an answer.
    std::fs::write(&cfg, with(r, "127.0.0.200:0")).unwrap();
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    let moved = admin_moved_to(&lines);
    assert_eq!(moved.ip(), ip(200));
    assert_eq!(http_get(moved, "/healthz").await.0, 200);
    assert_reset(passed).await;

    // On an address of its own it moves to another form of that address
    // on the same port, as without systemd: only a socket systemd passed
    // stays bound once the endpoint stops.
    let mapped = format!("[::ffff:127.0.0.200]:{}", moved.port());
    std::fs::write(&cfg, mapped_form(&mapped)).unwrap();
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert_eq!(admin_moved_to(&lines).to_string(), mapped);
    assert_eq!(http_get(moved, "/healthz").await.0, 200);

    // Moved back: it takes systemd's socket again, where binding the
    // address itself would fail.
    std::fs::write(&cfg, with(r, &passed.to_string())).unwrap();
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    assert!(
        !lines.iter().any(|l| l.contains("keeping the running")),
        "{lines:?}"
    );
    assert_eq!(admin_moved_to(&lines), passed);
    assert_eq!(http_get(passed, "/healthz").await.0, 200);

    // To another form of its address on the same port (the mapped IPv6
    // one conflicts as 0.0.0.0 would): systemd keeps its socket bound, so
    // stopping the endpoint would not free the port. The reload is
    // refused, and the endpoint stays, with no gap.
    let mapped = format!("[::ffff:127.0.0.199]:{}", passed.port());
    std::fs::write(&cfg, mapped_form(&mapped)).unwrap();
    p.signal("HUP");
    let lines = p.lines_until("keeping the running configuration");
    assert!(
        !lines.iter().any(|l| l.contains("admin endpoint")),
        "{lines:?}"
    );
    assert_eq!(http_get(passed, "/healthz").await.0, 200);
    assert_eq!(id_via(r).await, "ab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_switches_the_log_format_for_the_lines_that_follow() {
    let bk = backend(ip(201), "lf").await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.201 lf.test\n").unwrap();
    let cfg = dir.path().join("proxy.toml");
    let write = |format: &str| {
        std::fs::write(
            &cfg,
            format!(
                "{}{}",
                route("lf", "127.0.0.202:0", "lf.test", bk.addr.port()),
                tail(&hosts).replace("format = \"json\"", &format!("format = \"{format}\""))
            ),
        )
        .unwrap();
    };
    write("json");
    let p = Running::spawn(&cfg);
    let r = listening(&p, "lf");
    let is_json = |l: &str| serde_json::from_str::<serde_json::Value>(l).is_ok();

    write("text");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    let last = lines.last().unwrap();
    assert!(!is_json(last) && last.contains("INFO"), "{last}");
    let changed = lines
        .iter()
        .find(|l| l.contains("reload: log format changed"));
    assert!(
        changed.is_some_and(|l| l.contains(r#"log_format="text""#)),
        "{lines:?}"
    );
    // A connection's own line, in the new format.
    assert_eq!(id_via(r).await, "lf");
    let served = p.wait_line("connection closed");
    assert!(!is_json(&served), "{served}");

    write("json");
    p.signal("HUP");
    let lines = p.lines_until("configuration reloaded");
    let last = lines.last().unwrap();
    assert!(is_json(last), "{last}");
    let changed = lines
        .iter()
        .find(|l| l.contains("reload: log format changed"));
    assert!(
        changed.is_some_and(|l| l.contains(r#""log_format":"json""#)),
        "{lines:?}"
    );
    assert_eq!(id_via(r).await, "lf");
    let served = p.wait_line("connection closed");
    assert!(is_json(&served), "{served}");
}
