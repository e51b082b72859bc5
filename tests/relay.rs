//! The data path: half-close, reset propagation, idle timeout and the
//! connection limit, through the proxy on real loopback sockets.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A proxy whose alias is an IP literal pointing at `backend`.
fn proxy_to(backend: SocketAddr, extra: &str) -> Proxy {
    // The DNS server address is never used: the alias is a literal.
    start(config(&format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nalias = \"{}\"\nport = {}\n{extra}\n[resolver]\nnameservers = [\"127.0.0.1:9\"]\nhosts_file = \"\"\n",
        backend.ip(),
        backend.port()
    )))
}

/// Accepts connections and hands each to the test.
async fn raw_backend(at: std::net::IpAddr) -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let l = TcpListener::bind(SocketAddr::new(at, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// A proxy to a fresh raw backend at `at`, and the two ends of one
/// connection through it: the client's and the server's.
async fn relayed(at: std::net::IpAddr, extra: &str) -> (Proxy, TcpStream, TcpStream) {
    let (addr, mut accepted) = raw_backend(at).await;
    let proxy = proxy_to(addr, extra);
    let client = TcpStream::connect(proxy.addr()).await.unwrap();
    let server = within("backend accept", accepted.recv()).await.unwrap();
    (proxy, client, server)
}

#[tokio::test]
async fn half_close_client_still_gets_the_reply() {
    let (addr, mut accepted) = raw_backend(ip(41)).await;
    let proxy = proxy_to(addr, "");
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"request body").await.unwrap();
    client.shutdown().await.unwrap();

    let mut server = within("backend accept", accepted.recv()).await.unwrap();
    let mut got = Vec::new();
    // The server sees end-of-stream only because the client's FIN was
    // passed on as a write shutdown.
    within(
        "request and FIN at the server",
        server.read_to_end(&mut got),
    )
    .await
    .unwrap();
    assert_eq!(got, b"request body");
    // The other direction still flows after the FIN.
    server.write_all(b"reply after half-close").await.unwrap();
    server.shutdown().await.unwrap();

    let mut reply = Vec::new();
    within("reply at the client", client.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"reply after half-close");
}

#[tokio::test]
async fn server_half_close_keeps_client_direction_open() {
    let (_proxy, mut client, mut server) = relayed(ip(42), "").await;
    server.write_all(b"banner").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("banner and FIN", client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"banner");
    client.write_all(b"late data").await.unwrap();
    client.shutdown().await.unwrap();
    let mut late = Vec::new();
    within("late data", server.read_to_end(&mut late))
        .await
        .unwrap();
    assert_eq!(late, b"late data");
}

#[tokio::test]
async fn server_reset_resets_the_client() {
    let (_proxy, mut client, server) = relayed(ip(43), "").await;
    server.set_zero_linger().unwrap();
    drop(server);
    let mut buf = [0u8; 16];
    let r = within("client sees the reset", client.read(&mut buf)).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "a server reset must reach the client as a reset, not a clean end"
    );
}

#[tokio::test]
async fn client_reset_resets_the_server() {
    let (_proxy, client, mut server) = relayed(ip(44), "").await;
    client.set_zero_linger().unwrap();
    drop(client);
    let mut buf = [0u8; 16];
    let r = within("server sees the reset", server.read(&mut buf)).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
}

/// Waits for the proxy's idle-timeout close at `client`: a FIN, not a
/// reset, and not before `idle` has passed since `opened`.
async fn assert_idle_close(client: &mut TcpStream, opened: Instant, idle: Duration) {
    let mut rest = Vec::new();
    let n = within("idle close at the client", client.read_to_end(&mut rest))
        .await
        .expect("idle timeout ends with FIN, not a reset");
    assert_eq!(n, 0);
    assert!(
        opened.elapsed() >= idle,
        "closed before idle_timeout: {:?}",
        opened.elapsed()
    );
}

#[tokio::test]
async fn idle_connection_is_closed_with_fin_after_idle_timeout() {
    let (_proxy, mut client, mut server) = relayed(ip(45), "idle_timeout = \"300ms\"").await;
    let opened = Instant::now();
    // Traffic keeps it open.
    client.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within("ping", server.read_exact(&mut b)).await.unwrap();

    assert_idle_close(&mut client, opened, Duration::from_millis(300)).await;
    let mut rest = Vec::new();
    within("idle close at the server", server.read_to_end(&mut rest))
        .await
        .expect("server gets FIN");
}

#[tokio::test]
async fn max_connections_resets_the_excess_and_frees_the_slot() {
    let b = backend(ip(46), "b").await;
    let proxy = proxy_to(b.addr, "max_connections = 1");
    let (id, mut first) = within("first", served_by(proxy.addr())).await.unwrap();
    assert_eq!(id, "b");
    assert_reset(proxy.addr()).await;

    // Close the first connection cleanly and wait for its end at the client.
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("first ends", first.read_to_end(&mut rest))
        .await
        .unwrap();
    drop(first);
    // The slot is released when the proxy's connection task ends, just
    // after it passed the FIN on: poll for that event, bounded by HANG.
    let deadline = Instant::now() + HANG;
    loop {
        match served_by(proxy.addr()).await {
            Ok((id, _)) => {
                assert_eq!(id, "b");
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[tokio::test]
async fn bulk_data_arrives_intact_both_ways() {
    let b = backend(ip(47), "b").await;
    let proxy = proxy_to(b.addr, "");
    echo_bulk(proxy.addr(), 4_000_000).await;
}

#[tokio::test]
async fn one_way_upload_of_many_buffers_is_relayed_whole() {
    // A sink that only reads, then answers with the byte count: the relay
    // must keep reading full buffers without ever waiting on the other way.
    let (addr, mut accepted) = raw_backend(ip(48)).await;
    let proxy = proxy_to(addr, "");
    let sink = tokio::spawn(async move {
        let mut s = within("sink accept", accepted.recv()).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total: u64 = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_all(total.to_string().as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let chunk = vec![7u8; 1 << 20];
    let want: u64 = 64 << 20;
    within("upload", async {
        for _ in 0..64 {
            client.write_all(&chunk).await.unwrap();
        }
        client.shutdown().await.unwrap();
    })
    .await;
    let mut reply = String::new();
    within("count", client.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, want.to_string());
    sink.await.unwrap();
}

/// When the keepalive timer of the TCP socket `local` → `remote` fires, if
/// it runs: from `ss` (iproute2), which asks the kernel through netlink for
/// that one socket. Reading /proc/net/tcp instead took up to 190 ms with the
/// earlier tests' TIME_WAIT sockets listed, and stalled the runtime the
/// proxy shares with the test. Only an established socket is asked for, so
/// `Some` also says the connection is still open.
async fn keepalive_timer(local: SocketAddr, remote: SocketAddr) -> Option<Duration> {
    let out = tokio::process::Command::new("ss")
        .args(["-tnoH", "state", "established", "src"])
        .arg(local.to_string())
        .arg("dst")
        .arg(remote.to_string())
        .output()
        .await
        .expect("ss, from iproute2, is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // `timer:(keepalive,9.992sec,0)`; the time is in ms, sec or min.
    let (_, rest) = text.split_once("timer:(keepalive,")?;
    let when = rest.split(',').next()?;
    let split = when.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = when.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "sec" => n,
        "min" => n * 60.0,
        _ => panic!("unexpected time in ss output: {text:?}"),
    };
    Some(Duration::from_secs_f64(secs))
}

/// When the keepalive timer of the proxy's end of the upstream connection
/// that `server` accepted fires, if it runs.
async fn upstream_keepalive(server: &TcpStream) -> Option<Duration> {
    keepalive_timer(server.peer_addr().unwrap(), server.local_addr().unwrap()).await
}

#[tokio::test]
async fn a_silent_upstream_connection_gets_keepalive() {
    let (_proxy, _client, server) = relayed(ip(49), "").await;
    // Nothing is sent either way: keepalive is what would notice a server
    // that vanished. It is set once the connection has lived a moment.
    eventually("keepalive timer on the upstream socket", || async {
        upstream_keepalive(&server).await.is_some()
    })
    .await;
    let due = upstream_keepalive(&server)
        .await
        .expect("keepalive still set");
    // First probe within the 10 s keepalive time.
    assert!(due <= Duration::from_secs(10), "keepalive due in {due:?}");
}

#[tokio::test]
async fn a_connection_with_an_idle_timeout_gets_keepalive_before_it_ends() {
    // One timer serves both deadlines: keepalive (due first here) must not
    // be lost to the idle check, nor the idle check to keepalive.
    let (_proxy, mut client, server) = relayed(ip(57), "idle_timeout = \"2s\"").await;
    let opened = Instant::now();
    // Seen while the connection is still open.
    eventually("keepalive timer on the upstream socket", || async {
        upstream_keepalive(&server).await.is_some()
    })
    .await;
    assert_idle_close(&mut client, opened, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn traffic_that_holds_off_the_idle_timeout_still_gets_keepalive() {
    // The idle deadline (800 ms) comes before keepalive's (1 s) and moves
    // with every byte: keepalive must still be set once it is due. A ping
    // every 100 ms leaves the test 700 ms of scheduling delay on a loaded
    // machine before the proxy would rightly see the connection as idle.
    let (_proxy, mut client, mut server) = relayed(ip(58), "idle_timeout = \"800ms\"").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Paces the traffic, not a synchronisation: each ping is awaited.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    loop {
        pace.tick().await;
        client.write_all(b"p").await.unwrap();
        let mut b = [0u8; 1];
        within("ping", server.read_exact(&mut b))
            .await
            .expect("connection open while traffic flows");
        if upstream_keepalive(&server).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no keepalive while traffic held off the idle timeout"
        );
    }
}

/// Segments the client socket connected to `remote` has received, from
/// `ss -ti` (iproute2): the kernel's count, which no timing can blur.
fn segments_received_from(remote: SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "dst", &remote.to_string()])
        .output()
        .expect("ss, from iproute2, is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("segs_in:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segs_in for the socket to {remote} in: {text}"))
}

#[tokio::test]
async fn a_reply_and_the_servers_fin_reach_the_client_in_one_segment() {
    let (proxy, mut client, server) = relayed(ip(56), "").await;
    // The server answers and closes, its reply and FIN in one segment (as
    // from a server whose close follows its last write closely): the proxy
    // sees both at once.
    let server = server.into_std().unwrap();
    socket2::SockRef::from(&server).set_tcp_cork(true).unwrap();
    io::Write::write_all(&mut &server, b"reply, then close").unwrap();
    server.shutdown(std::net::Shutdown::Write).unwrap();

    let mut got = Vec::new();
    within("reply and FIN", client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"reply, then close");
    // The SYN-ACK, then the reply with the FIN: a reply sent on its own and
    // a separate FIN would be three segments, and the client would send one
    // ACK more.
    assert_eq!(segments_received_from(proxy.addr()), 2);
}
