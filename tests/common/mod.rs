//! Test fixtures: an in-process DNS server whose answers a test can change,
//! backends on 127.0.0.x port 0, and the proxy run in-process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failover_proxy::{Config, Control, Server, config};
use figment::Figment;
use figment::providers::{Format, Toml};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Only stops a hung test; never what a test waits for.
pub const HANG: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// What the test DNS server does for one name.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Answer with these addresses (A for IPv4, AAAA for IPv6), in order.
    Records(Vec<IpAddr>, u32),
    NxDomain,
    ServFail,
    Refused,
    /// Never answer.
    Silent,
    /// Answer the queries of these addresses' type (A for IPv4, AAAA for
    /// IPv6) and never the other type's: a server or firewall that drops
    /// AAAA (or A) queries.
    DropsOtherType(Vec<IpAddr>),
    /// Answer with these addresses, but the queries of this type only
    /// after this long: a record a recursive server has to look up while
    /// the other type's is in its cache.
    Slow(RecordType, Duration, Vec<IpAddr>),
    /// Answer with bytes that are not a DNS message.
    Garbage,
    /// Answer with a well-formed message for another query id and name.
    Mismatched,
    /// Answer with a CNAME to the target name. With `chased`, the target's
    /// own records follow in the same answer, as a recursive resolver gives
    /// them; without, the answer is the CNAME alone, as an authoritative
    /// server gives it for a target outside its zone.
    Cname {
        target: String,
        chased: bool,
    },
    /// Ignore the first query; answer the n-th (n from 2, counting every
    /// query the server got) with 127.0.0.(base + n), so that each answer
    /// tells which query it was for.
    Numbered(u8),
}

/// A DNS server on 127.0.0.1 (UDP), built on hickory-proto, whose answers
/// the test changes between connections.
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Behavior>>>,
    queries: Arc<Mutex<u64>>,
    task: JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        DnsServer::start_on("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind dns")
    }

    /// A server on `addr`, which may be taken.
    pub async fn start_on(addr: SocketAddr) -> io::Result<DnsServer> {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let addr = socket.local_addr()?;
        let zone: Arc<Mutex<HashMap<String, Behavior>>> = Arc::default();
        let queries: Arc<Mutex<u64>> = Arc::default();
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                *q.lock().unwrap() += 1;
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = req.queries.first().cloned() else {
                    continue;
                };
                let name = query
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let zone = z.lock().unwrap().clone();
                let behavior = zone.get(&name).cloned().unwrap_or(Behavior::NxDomain);
                let mut resp = reply_to(&req, &query);
                resp.metadata.authoritative = true;
                let behavior = match behavior {
                    Behavior::Slow(rtype, by, ips) => {
                        add_addresses(&mut resp, query.name(), query.query_type(), &ips, 60);
                        let delay = if query.query_type() == rtype {
                            by
                        } else {
                            Duration::ZERO
                        };
                        let socket = socket.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            if let Ok(bytes) = resp.to_vec() {
                                let _ = socket.send_to(&bytes, from).await;
                            }
                        });
                        continue;
                    }
                    Behavior::DropsOtherType(ips) => {
                        let answered = ips.iter().any(|a| match query.query_type() {
                            RecordType::A => a.is_ipv4(),
                            RecordType::AAAA => a.is_ipv6(),
                            _ => false,
                        });
                        if !answered {
                            continue;
                        }
                        Behavior::Records(ips, 60)
                    }
                    Behavior::Numbered(base) => {
                        let n = *q.lock().unwrap();
                        if n == 1 {
                            continue;
                        }
                        let last = base.wrapping_add(u8::try_from(n).unwrap_or(u8::MAX));
                        Behavior::Records(vec![ip(last)], 60)
                    }
                    b => b,
                };
                match behavior {
                    Behavior::Silent
                    | Behavior::Numbered(_)
                    | Behavior::DropsOtherType(_)
                    | Behavior::Slow(..) => {
                        continue;
                    }
                    Behavior::Garbage => {
                        let mut junk = buf[..n].to_vec();
                        junk.truncate(5);
                        junk.extend_from_slice(&[0xff; 40]);
                        let _ = socket.send_to(&junk, from).await;
                        continue;
                    }
                    Behavior::Mismatched => {
                        resp.metadata.id = req.metadata.id.wrapping_add(1);
                        resp.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::A(A(std::net::Ipv4Addr::new(127, 0, 0, 99))),
                        ));
                    }
                    Behavior::NxDomain => resp.metadata.response_code = ResponseCode::NXDomain,
                    Behavior::ServFail => resp.metadata.response_code = ResponseCode::ServFail,
                    Behavior::Refused => resp.metadata.response_code = ResponseCode::Refused,
                    Behavior::Records(ips, ttl) => {
                        add_addresses(&mut resp, query.name(), query.query_type(), &ips, ttl);
                    }
                    Behavior::Cname { target, chased } => {
                        let Ok(to) = Name::from_ascii(format!("{target}.")) else {
                            continue;
                        };
                        resp.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::CNAME(CNAME(to.clone())),
                        ));
                        match zone.get(&target) {
                            Some(Behavior::Records(ips, ttl)) if chased => {
                                add_addresses(&mut resp, &to, query.query_type(), ips, *ttl);
                            }
                            None if chased => {
                                resp.metadata.response_code = ResponseCode::NXDomain;
                            }
                            _ => {}
                        }
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Ok(DnsServer {
            addr,
            zone,
            queries,
            task,
        })
    }

    pub fn set(&self, name: &str, b: Behavior) {
        self.zone
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), b);
    }

    pub fn cname(&self, name: &str, target: &str, chased: bool) {
        let target = target.to_string();
        self.set(name, Behavior::Cname { target, chased });
    }

    pub fn records(&self, name: &str, ips: &[IpAddr]) {
        self.set(name, Behavior::Records(ips.to_vec(), 3600));
    }

    pub fn queries(&self) -> u64 {
        *self.queries.lock().unwrap()
    }

    /// Stops answering and closes the socket: the port is gone.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// A response to `req` with its question copied back and no answer yet.
pub fn reply_to(req: &Message, query: &Query) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(query.clone());
    resp
}

/// Adds the records of `ips` that answer a query of type `qtype`, as `owner`.
pub fn add_addresses(
    resp: &mut Message,
    owner: &Name,
    qtype: RecordType,
    ips: &[IpAddr],
    ttl: u32,
) {
    for ip in ips {
        let rdata = match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        resp.add_answer(Record::from_rdata(owner.clone(), ttl, rdata));
    }
}

pub fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A backend that writes `id` and a newline to every client, then echoes
/// until the client finishes, then closes. Connections served are counted
/// on the returned channel.
pub struct Backend {
    pub addr: SocketAddr,
    pub served: mpsc::UnboundedReceiver<SocketAddr>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn backend(at: IpAddr, id: &str) -> Backend {
    backend_on(SocketAddr::new(at, 0), id).await
}

pub async fn backend_on(addr: SocketAddr, id: &str) -> Backend {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    serve_backend(listener, id)
}

pub fn serve_backend(listener: TcpListener, id: &str) -> Backend {
    let addr = listener.local_addr().expect("backend addr");
    let (tx, served) = mpsc::unbounded_channel();
    let id = format!("{id}\n");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else {
                return;
            };
            let _ = tx.send(peer);
            let id = id.clone();
            tokio::spawn(async move {
                if s.write_all(id.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Backend { addr, served, task }
}

/// A port that refuses connections: bound, not listening, so no other test
/// can take it. `listen()` on it later brings the "server" back.
pub fn refusing(at: IpAddr) -> (TcpSocket, SocketAddr) {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(at, 0)).expect("bind refusing");
    let addr = s.local_addr().expect("addr");
    (s, addr)
}

pub fn refusing_on(addr: SocketAddr) -> TcpSocket {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(addr).expect("bind refusing");
    s
}

/// A listener whose accept queue is full, so further SYNs are dropped: a
/// black hole on loopback. The returned stream holds the queue's one slot.
pub async fn black_hole(at: IpAddr) -> (socket2::Socket, TcpStream, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(at, 0).into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(addr)
        .await
        .expect("fill the accept queue");
    (s, filler, addr)
}

/// Builds a validated config from TOML text (no environment involved).
/// Unless the text has an `[admin]` table, the admin endpoint goes on
/// port 0, so that parallel tests never share a port; unless it has a
/// `[health]` table, active probes are off, so that only the test's own
/// connections change what is known down.
pub fn config(toml: &str) -> Config {
    let mut toml = toml.to_string();
    if !toml.contains("[admin]") {
        toml.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !toml.contains("[health]") {
        toml.push_str("\n[health]\ninterval = \"0s\"\n");
    }
    config::from_figment(&Figment::from(Toml::string(&toml))).unwrap_or_else(|e| panic!("{e}"))
}

/// The TOML of one route on 127.0.0.1:0 plus a resolver section naming the
/// test DNS server and no hosts file unless given.
pub fn route_toml(alias: &str, port: u16, extra_route: &str, resolver: &str) -> String {
    format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nalias = \"{alias}\"\nport = {port}\n{extra_route}\n[resolver]\n{resolver}\n"
    )
}

pub fn resolver_toml(dns: SocketAddr, hosts: Option<&std::path::Path>) -> String {
    format!(
        "nameservers = [\"{dns}\"]\nhosts_file = \"{}\"\ntimeout = \"500ms\"\n",
        hosts.map(|p| p.display().to_string()).unwrap_or_default()
    )
}

/// The proxy running in-process.
pub struct Proxy {
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub control: mpsc::Sender<Control>,
    pub task: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub async fn shutdown(mut self) {
        let _ = self.control.send(Control::Shutdown).await;
        if let Some(t) = self.task.take() {
            within("proxy shutdown", t).await.expect("proxy task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub fn start(cfg: Config) -> Proxy {
    let server = Server::bind(cfg).expect("bind proxy");
    let addrs = server.local_addrs();
    let admin = server.admin_addr();
    let (control, rx) = mpsc::channel(1);
    let task = tokio::spawn(server.serve(rx));
    Proxy {
        addrs,
        admin,
        control,
        task: Some(task),
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// `method path` with an empty body; returns the status code and the body.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    within("http response", async {
        let mut s = TcpStream::connect(addr).await.expect("connect admin");
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        (code, body.to_string())
    })
    .await
}

/// One full exchange through the proxy: read the id line, send `payload`
/// and read its echo, close, and wait for the end. Returns the id and the
/// client's own address.
pub async fn exchange(proxy: SocketAddr, payload: &[u8]) -> (String, SocketAddr) {
    let (id, mut s) = within("served", served_by(proxy)).await.expect("served");
    let client = s.local_addr().expect("client address");
    s.write_all(payload).await.unwrap();
    let mut echo = vec![0u8; payload.len()];
    within("echo", s.read_exact(&mut echo)).await.unwrap();
    assert_eq!(echo, payload, "echo");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("close", s.read_to_end(&mut rest)).await.unwrap();
    (id, client)
}

/// `len` bytes through the proxy at `addr` to an echoing backend and back,
/// written and read at once, checked byte for byte.
pub async fn echo_bulk(addr: SocketAddr, len: u32) {
    let (_, s) = within("served", served_by(addr)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    within("echo", r.read_to_end(&mut back)).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

/// The value of one series in a Prometheus text scrape.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let got: Vec<(&str, &str)> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            (got.len() == labels.len() && labels.iter().all(|l| got.contains(l)))
                .then(|| value.parse().ok())?
        })
}

pub async fn scrape(admin: SocketAddr) -> String {
    let (code, body) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    body
}

/// Polls `check` until it holds: for conditions that become true through
/// the proxy's own timers or background tasks. The deadline only stops a
/// hang.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `route` has no open connection, as the admin endpoint at
/// `admin` counts them: a connection's log line and byte counts are made
/// before its gauge goes down.
pub async fn no_connection_open(admin: SocketAddr, route: &str) {
    eventually("no open connection", || async {
        sample(
            &scrape(admin).await,
            "failover_proxy_connections_active",
            &[("route", route)],
        ) == Some(0.0)
    })
    .await;
}

/// Connects through the proxy and reads the backend's id line.
pub async fn served_by(proxy: SocketAddr) -> io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the id line",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), s))
}

pub async fn id_via(proxy: SocketAddr) -> String {
    within("a served connection", served_by(proxy))
        .await
        .map(|(id, _)| id)
        .expect("connection through the proxy")
}

/// Asserts the proxy resets the connection (a refused-like failure).
pub async fn assert_reset(proxy: SocketAddr) {
    let r = within("the reset", served_by(proxy)).await;
    match r {
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "expected a reset, got {e}"
        ),
        Ok((id, _)) => panic!("expected a reset, was served by {id}"),
    }
}

// The real binary, run as a child process.

pub const BIN: &str = env!("CARGO_BIN_EXE_failover-proxy");

/// A command for the binary with none of this process's FAILOVER_PROXY_*
/// or RUST_LOG variables leaking in.
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FAILOVER_PROXY_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c.stdin(Stdio::null());
    c
}

/// [`bin`] run through `wrapper` (prlimit, setpriv), which execs it in its
/// place after `args`, with the same variables kept out of its environment.
pub fn bin_via(wrapper: &str, args: &[&str]) -> Command {
    let proxy = bin();
    let mut c = Command::new(wrapper);
    c.args(args).arg(proxy.get_program()).stdin(Stdio::null());
    for (k, _) in proxy.get_envs() {
        c.env_remove(k);
    }
    c
}

pub struct Running {
    pub child: Child,
    pub lines: std_mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(config: &Path) -> Running {
        Running::spawn_with(bin().arg("--config").arg(config))
    }

    pub fn spawn_with(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn failover-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// Spawns `cmd` with its stdout and stderr on one pipe, as journald's
    /// stream is, given to the caller, who reads it by hand (or stops
    /// reading it) instead of a thread: the returned `Running` only kills
    /// the process when dropped, and its `lines` get nothing.
    pub fn spawn_unread(cmd: &mut Command) -> (Running, BufReader<io::PipeReader>) {
        let (out, writer) = io::pipe().expect("a pipe");
        let child = cmd
            .stdout(writer.try_clone().expect("a second write end"))
            .stderr(writer)
            .spawn()
            .expect("spawn failover-proxy");
        // The command's copies of the write end: closed, so that only the
        // process holds it.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let lines = std_mpsc::channel().1;
        (Running { child, lines }, BufReader::new(out))
    }

    /// Waits for a log line containing `needle`; the timeout only stops a hang.
    pub fn wait_line(&self, needle: &str) -> String {
        self.lines_until(needle).pop().expect("the matching line")
    }

    /// The log lines up to and including the first containing `needle`.
    pub fn lines_until(&self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + HANG;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l.contains(needle);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no log line containing {needle:?} after {seen:?}"),
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        // The shell's built-in kill: no procps package needed.
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{sig} {}", self.child.id()))
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + HANG;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.code().expect("exited by a signal, not cleanly");
            }
            assert!(std::time::Instant::now() < deadline, "proxy did not exit");
            // Exit is only observable by polling the child.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `"listen":"127.0.0.1:PORT"` from a JSON log line.
pub fn listen_addr(line: &str) -> SocketAddr {
    let start = line.find("\"listen\":\"").expect("listen field") + 10;
    let end = start + line[start..].find('"').expect("end quote");
    line[start..end].parse().expect("listen address")
}
