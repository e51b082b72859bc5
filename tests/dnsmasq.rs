//! End to end against a real DNS server: dnsmasq from Debian serving the
//! alias from an addn-hosts file with a one-hour TTL, directly and through
//! a CNAME.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;

use common::*;

/// /usr/sbin is not on every user's PATH.
fn dnsmasq_path() -> &'static str {
    if Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

/// The first port of the kernel's ephemeral range, which connect() and
/// port 0 draw from.
fn ephemeral_start() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read /proc/sys/net/ipv4/ip_local_port_range");
    let first = range.split_whitespace().next().and_then(|p| p.parse().ok());
    first
        .filter(|&p| p > 10_000)
        .unwrap_or_else(|| panic!("ephemeral ports start too low for this test: {range:?}"))
}

struct Dnsmasq {
    child: Child,
    lines: std_mpsc::Receiver<String>,
    port: u16,
}

impl Dnsmasq {
    fn start(dir: &Path, hosts: &Path) -> Dnsmasq {
        // dnsmasq may drop root privileges before re-reading the file on
        // SIGHUP, so let any user read the test's folder.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // dnsmasq binds TCP and UDP on its port. A port below the ephemeral
        // range: in it, the TIME_WAIT sockets that binary.rs's churn leaves
        // on 127.0.0.1 (28,000 of them) made 42 % of picks fail for TCP.
        // Another test taking the same port is retried below.
        let below = ephemeral_start();
        for _ in 0..20 {
            let port = rand::random_range(10_000..below);
            let mut child = Command::new(dnsmasq_path())
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--log-facility=-",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--local-ttl=3600",
                    // Names under .test are answered here alone: an unknown
                    // one is NXDOMAIN, not REFUSED for want of an upstream.
                    "--local=/test/",
                    // The vendor's alias as a CNAME to the name that holds
                    // the servers' records.
                    "--cname=vendor.test,cluster.test",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq is installed (apt-get install dnsmasq-base; .ci/run does it)");
            let stderr = child.stderr.take().unwrap();
            let (tx, lines) = std_mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            let d = Dnsmasq { child, lines, port };
            match d.wait_line(&format!("read {}", hosts.display())) {
                Ok(()) => return d,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("dnsmasq did not start: {log}"),
            }
        }
        panic!("no free port for dnsmasq after 20 tries");
    }

    /// Waits for a line containing `needle`; the timeout only stops a hang.
    fn wait_line(&self, needle: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + HANG;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(l) => {
                    seen.push_str(&l);
                    seen.push('\n');
                }
                Err(_) => return Err(seen),
            }
        }
    }

    fn reload(&self, hosts: &Path) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -HUP {}", self.child.id()))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        self.wait_line(&format!("read {}", hosts.display()))
            .unwrap_or_else(|log| panic!("dnsmasq did not reload: {log}"));
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_answers_are_followed_and_refused_addresses_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("cluster.hosts");
    let (_hold, dead) = refusing(ip(61));
    let live = backend_on(std::net::SocketAddr::new(ip(62), dead.port()), "b62").await;
    let _other = backend_on(std::net::SocketAddr::new(ip(63), dead.port()), "b63").await;
    std::fs::write(&zone, "127.0.0.61 cluster.test\n127.0.0.62 cluster.test\n").unwrap();
    std::fs::set_permissions(&zone, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dns = Dnsmasq::start(dir.path(), &zone);

    let proxy_for = |alias: &str| {
        start(config(&route_toml(
            alias,
            live.addr.port(),
            "attempt_delay = \"5s\"",
            &format!(
                "nameservers = [\"127.0.0.1:{}\"]\nhosts_file = \"\"\nfamily = \"ipv4\"\n",
                dns.port
            ),
        )))
    };
    let proxy = proxy_for("cluster.test");
    let via_cname = proxy_for("vendor.test");
    // Two A records, one refusing: whatever order dnsmasq gives them in,
    // every connection is served by the live one.
    for _ in 0..3 {
        assert_eq!(id_via(proxy.addr()).await, "b62");
        assert_eq!(id_via(via_cname.addr()).await, "b62");
    }
    // The record changes (TTL 3600): the next connection follows it, also
    // through the CNAME.
    std::fs::write(&zone, "127.0.0.63 cluster.test\n").unwrap();
    dns.reload(&zone);
    assert_eq!(id_via(proxy.addr()).await, "b63");
    assert_eq!(id_via(via_cname.addr()).await, "b63");
    // The alias removed: NXDOMAIN reaches the client as a reset.
    std::fs::write(&zone, "127.0.0.63 other.test\n").unwrap();
    dns.reload(&zone);
    assert_reset(proxy.addr()).await;
}
