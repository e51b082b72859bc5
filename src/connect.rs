//! Staggered connection attempts (RFC 8305 style): the next address starts
//! when the current one refuses, fails, or has not answered within
//! `attempt_delay`; earlier attempts keep running; the first to connect wins.

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use rustix::io::Errno;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Keepalive on upstream sockets, so a server that vanishes (power loss,
/// partition) is noticed within about 25 s even on an idle connection.
///
/// Set only once a relayed connection has lived `KEEPALIVE_ARM_AFTER`:
/// these are four system calls, on top of the eighteen or so a short
/// connection costs (strace under load), and one that ends sooner never
/// needs them. The first probe then comes at most this much later.
pub const KEEPALIVE_ARM_AFTER: Duration = Duration::from_secs(1);
const KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unacknowledged data (or unanswered keepalive probes) for this long means
/// the server is gone; keepalive alone does not fire while data is in
/// flight. It also bounds the probe count, so TCP_KEEPCNT is not set: one
/// system call less per connection.
const USER_TIMEOUT: Duration = Duration::from_secs(25);

/// The `result` label of `upstream_connect_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptResult {
    Ok,
    Refused,
    Timeout,
    /// Still pending when another address connected first.
    Abandoned,
    /// The address is one of our own listeners: never dialled.
    Loop,
    Error,
}

impl AttemptResult {
    /// Every result, in the order of their discriminants.
    pub const ALL: [AttemptResult; 6] = [
        AttemptResult::Ok,
        AttemptResult::Refused,
        AttemptResult::Timeout,
        AttemptResult::Abandoned,
        AttemptResult::Loop,
        AttemptResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Refused => "refused",
            AttemptResult::Timeout => "timeout",
            AttemptResult::Abandoned => "abandoned",
            AttemptResult::Loop => "loop",
            AttemptResult::Error => "error",
        }
    }

    /// Whether this attempt says the address is not serving. A loop is our
    /// own configuration, not the server's health.
    pub fn marks_down(self) -> bool {
        matches!(
            self,
            AttemptResult::Refused
                | AttemptResult::Timeout
                | AttemptResult::Abandoned
                | AttemptResult::Error
        )
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub result: AttemptResult,
    /// From the start of this attempt to its result.
    pub elapsed: Duration,
    pub error: Option<io::ErrorKind>,
}

/// Attempts formatted for the one log line per connection.
pub struct AttemptsDisplay<'a>(pub &'a [Attempt]);

impl fmt::Display for AttemptsDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{} {} {:.1}ms",
                a.addr,
                a.result.as_str(),
                a.elapsed.as_secs_f64() * 1000.0
            )?;
        }
        Ok(())
    }
}

/// Maps a connect error to an attempt result by its kind, never its text.
pub fn classify(e: &io::Error) -> AttemptResult {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => AttemptResult::Refused,
        io::ErrorKind::TimedOut => AttemptResult::Timeout,
        _ => AttemptResult::Error,
    }
}

/// One TCP connect bounded by `timeout`, with TCP_NODELAY set on the socket
/// before the handshake. Keepalive comes later (`arm_keepalive`).
pub async fn connect_one(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connect_nodelay(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {addr} within {timeout:?}"),
        )),
    }
}

/// A non-blocking connect that asks the socket for its error only when
/// readiness reports one. tokio's `TcpSocket::connect` always does
/// (`getsockopt(SO_ERROR)`): one system call per connection that a
/// successful handshake does not need, since epoll reports EPOLLOUT without
/// EPOLLERR only once the socket is established.
async fn connect_nodelay(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Keepalive and TCP_USER_TIMEOUT on an upstream socket.
pub fn arm_keepalive(stream: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL),
    )?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

type Pending = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Tries `addrs` in order with staggered starts. Every attempt, including
/// the abandoned ones and skipped loops, is appended to `attempts`.
pub async fn connect_staggered(
    addrs: &[SocketAddr],
    is_own: impl Fn(SocketAddr) -> bool,
    attempt_delay: Duration,
    connect_timeout: Duration,
    attempts: &mut Vec<Attempt>,
) -> Option<(TcpStream, SocketAddr)> {
    let mut inflight: Vec<(SocketAddr, Instant, Pending)> = Vec::new();
    let mut next = 0;
    // No stagger timer when there is nothing to stagger to: with one
    // address (the common single-server alias) it would only cost a timer
    // registration per connection.
    let stagger = !attempt_delay.is_zero() && addrs.len() > 1;
    let delay = tokio::time::sleep(attempt_delay);
    tokio::pin!(delay);

    // Starts the next dialable address; loops are recorded and skipped.
    let start_next = |next: &mut usize,
                      inflight: &mut Vec<(SocketAddr, Instant, Pending)>,
                      attempts: &mut Vec<Attempt>,
                      delay: Pin<&mut tokio::time::Sleep>| {
        while *next < addrs.len() {
            let addr = addrs[*next];
            *next += 1;
            if is_own(addr) {
                attempts.push(Attempt {
                    addr,
                    result: AttemptResult::Loop,
                    elapsed: Duration::ZERO,
                    error: None,
                });
                continue;
            }
            let now = Instant::now();
            inflight.push((addr, now, Box::pin(connect_one(addr, connect_timeout))));
            if stagger {
                delay.reset(now + attempt_delay);
            }
            return true;
        }
        false
    };

    loop {
        if inflight.is_empty() && !start_next(&mut next, &mut inflight, attempts, delay.as_mut()) {
            return None;
        }
        let more = next < addrs.len();
        let event = poll_fn(|cx| {
            for (i, (_, _, fut)) in inflight.iter_mut().enumerate() {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Some((i, r)));
                }
            }
            if stagger && more && delay.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match event {
            None => {
                start_next(&mut next, &mut inflight, attempts, delay.as_mut());
            }
            Some((i, Ok(stream))) => {
                let (addr, started, _) = inflight.swap_remove(i);
                let now = Instant::now();
                for (other, other_started, _) in inflight.drain(..) {
                    attempts.push(Attempt {
                        addr: other,
                        result: AttemptResult::Abandoned,
                        elapsed: now - other_started,
                        error: None,
                    });
                }
                attempts.push(Attempt {
                    addr,
                    result: AttemptResult::Ok,
                    elapsed: now - started,
                    error: None,
                });
                return Some((stream, addr));
            }
            Some((i, Err(e))) => {
                let (addr, started, _) = inflight.swap_remove(i);
                attempts.push(Attempt {
                    addr,
                    result: classify(&e),
                    elapsed: started.elapsed(),
                    error: Some(e.kind()),
                });
                // A failure starts the next attempt at once, whatever the
                // stagger timer says.
                start_next(&mut next, &mut inflight, attempts, delay.as_mut());
            }
        }
    }
}
