//! Copies bytes both ways until both directions are finished.
//!
//! Each direction runs on its own: a FIN read from one side becomes a write
//! shutdown on the other while the other direction keeps flowing
//! (half-close). An error on either side (a reset, a broken pipe) resets
//! both, so neither peer waits on a connection that is gone. No buffer is
//! held while a direction waits for data: one is taken only once the socket
//! is readable and dropped when it has drained.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use metrics::Counter;
use rustix::net::{SendFlags, send};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

use crate::connect::{KEEPALIVE_ARM_AFTER, arm_keepalive};
use crate::splice;

/// How bytes are moved: `splice(2)` through a pooled pipe, or read and
/// write through a pooled buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Copy,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished with FIN.
    Closed,
    /// The client side failed or reset; the upstream was reset.
    ClientReset,
    /// The upstream side failed or reset; the client was reset.
    UpstreamReset,
    /// Nothing moved for `idle_timeout`: both sides were sent FIN.
    Idle,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientReset => "client_reset",
            End::UpstreamReset => "upstream_reset",
            End::Idle => "idle_timeout",
        }
    }
}

/// The bytes one connection has moved each way, for its log line, and the
/// route's counters, which each transfer adds to as it happens: a scrape
/// shows the traffic of connections that are still open (a client may hold
/// one for days), not only of those that have ended.
#[derive(Debug)]
pub struct Counts<'a> {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
    meters: &'a [Counter; 2],
}

impl<'a> Counts<'a> {
    /// `meters`: the route's to-upstream and to-client byte counters.
    pub fn new(meters: &'a [Counter; 2]) -> Counts<'a> {
        Counts {
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            meters,
        }
    }

    fn add(&self, to_upstream: bool, n: u64) {
        let (count, meter) = if to_upstream {
            (&self.to_upstream, 0)
        } else {
            (&self.to_client, 1)
        };
        count.fetch_add(n, Ordering::Relaxed);
        self.meters[meter].increment(n);
    }
}

/// The side an I/O error happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

struct DirError {
    side: Side,
    error: io::Error,
}

/// Relays until both directions finish, an error resets both, or the
/// connection is idle for `idle`. Byte counts are in `counts` whatever the
/// outcome.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn relay<'a>(
    client: &'a mut TcpStream,
    upstream: &'a mut TcpStream,
    idle: Option<Duration>,
    counts: &'a Counts<'a>,
    mode: Mode,
) -> impl Future<Output = (End, Option<io::Error>)> + Send + 'a {
    async move {
        let outcome = {
            let (client_r, client_w) = client.split();
            let (upstream_r, upstream_w) = upstream.split();
            both_ways(
                client_r, client_w, upstream_r, upstream_w, idle, counts, mode,
            )
            .await
        };
        match outcome {
            Ok(end) => {
                if end == End::Idle {
                    let _ = SockRef::from(&*client).shutdown(Shutdown::Write);
                    let _ = SockRef::from(&*upstream).shutdown(Shutdown::Write);
                }
                (end, None)
            }
            Err(e) => {
                // Zero linger makes the close that follows send RST, so the
                // peer sees the failure instead of a clean end of stream.
                let _ = client.set_zero_linger();
                let _ = upstream.set_zero_linger();
                let end = match e.side {
                    Side::Client => End::ClientReset,
                    Side::Upstream => End::UpstreamReset,
                };
                (end, Some(e.error))
            }
        }
    }
}

/// Both directions and the connection's one timer. The halves are moved
/// in and the future is an `async move` block: an `async fn` would keep a
/// second copy of its arguments for the connection's whole life.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
fn both_ways<'a>(
    mut client_r: ReadHalf<'a>,
    mut client_w: WriteHalf<'a>,
    mut upstream_r: ReadHalf<'a>,
    mut upstream_w: WriteHalf<'a>,
    idle: Option<Duration>,
    counts: &'a Counts<'a>,
    mode: Mode,
) -> impl Future<Output = Result<End, DirError>> + Send + 'a {
    async move {
        let started = Instant::now();
        // Milliseconds since `started` of the last byte moved; shared by both
        // directions so that traffic either way keeps the connection alive.
        let last = AtomicU64::new(0);
        let up_finished = AtomicBool::new(false);
        let down_finished = AtomicBool::new(false);
        let keepalive_due = AtomicBool::new(false);
        let up_dir = Dir {
            src_side: Side::Client,
            counts,
            last: &last,
            other_finished: &down_finished,
            started,
            keepalive_due: None,
            mode,
        };
        let down_dir = Dir {
            src_side: Side::Upstream,
            counts,
            last: &last,
            other_finished: &up_finished,
            started,
            keepalive_due: Some(&keepalive_due),
            mode,
        };
        let mut up = std::pin::pin!(pump(&mut client_r, &mut upstream_w, &up_dir));
        let mut down = std::pin::pin!(pump(&mut upstream_r, &mut client_w, &down_dir));
        // One timer per connection, for both of its deadlines: arming keepalive
        // on the upstream socket and the idle check. A timer in each direction
        // would make every connection's task 112 bytes larger per timer.
        let keepalive_at = started + KEEPALIVE_ARM_AFTER;
        let first = idle.map_or(keepalive_at, |i| keepalive_at.min(started + i));
        let mut timer = std::pin::pin!(tokio::time::sleep_until(first));
        let mut timer_set = true;

        loop {
            enum Ev {
                Up(Result<(), DirError>),
                Down(Result<(), DirError>),
                Timer,
            }
            let ev = poll_fn(|cx| {
                if !up_finished.load(Ordering::Relaxed)
                    && let Poll::Ready(r) = up.as_mut().poll(cx)
                {
                    return Poll::Ready(Ev::Up(r));
                }
                if !down_finished.load(Ordering::Relaxed)
                    && let Poll::Ready(r) = down.as_mut().poll(cx)
                {
                    return Poll::Ready(Ev::Down(r));
                }
                if timer_set && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ev::Timer);
                }
                Poll::Pending
            })
            .await;
            match ev {
                Ev::Up(r) => {
                    r?;
                    up_finished.store(true, Ordering::Relaxed);
                }
                Ev::Down(r) => {
                    r?;
                    down_finished.store(true, Ordering::Relaxed);
                }
                Ev::Timer => {
                    let now = Instant::now();
                    if now >= keepalive_at {
                        // The upstream direction arms it when next polled,
                        // which the next turn of this loop does.
                        keepalive_due.store(true, Ordering::Relaxed);
                    }
                    let idle_deadline = idle
                        .map(|i| started + Duration::from_millis(last.load(Ordering::Relaxed)) + i);
                    if idle_deadline.is_some_and(|d| now >= d) {
                        return Ok(End::Idle);
                    }
                    // Keepalive's deadline counts until it is due.
                    let keepalive =
                        (!keepalive_due.load(Ordering::Relaxed)).then_some(keepalive_at);
                    match keepalive.into_iter().chain(idle_deadline).min() {
                        Some(t) => timer.as_mut().reset(t),
                        None => timer_set = false,
                    }
                }
            }
            if up_finished.load(Ordering::Relaxed) && down_finished.load(Ordering::Relaxed) {
                return Ok(End::Closed);
            }
        }
    }
}

/// Reads what `src` has now into `buf`: `None` when nothing is waiting.
///
/// Through `poll_read` rather than `try_read`: tokio then treats a short
/// read as proof that the socket is drained and clears its readiness, so
/// the next wait parks at once instead of costing a `recv` that would
/// block: one system call less per message.
async fn read_now(src: &mut ReadHalf<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(rb.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Ready(Ok(None)),
        }
    })
    .await
}

/// What one direction needs besides its two sockets.
struct Dir<'a> {
    src_side: Side,
    counts: &'a Counts<'a>,
    last: &'a AtomicU64,
    /// The other direction has passed its FIN on: a FIN read here needs no
    /// write shutdown, since the close that follows sends it.
    other_finished: &'a AtomicBool,
    started: Instant,
    /// Set when keepalive is due on `src` (the upstream socket); `None` for
    /// the client direction.
    keepalive_due: Option<&'a AtomicBool>,
    mode: Mode,
}

/// One direction: `src` to `dst`, passing a FIN on as a write shutdown.
///
/// `d` is borrowed, not moved in, and everything that only a burst of data
/// needs lives in a shorter future: this future waits for as long as the
/// connection lives, so its size is what an idle connection costs.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    d: &Dir<'_>,
) -> Result<(), DirError> {
    let dst_side = match d.src_side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let on_src = |error| DirError {
        side: d.src_side,
        error,
    };
    let on_dst = |error| DirError {
        side: dst_side,
        error,
    };
    let moved = |n: usize| {
        d.counts.add(d.src_side == Side::Client, n as u64);
        let ms = u64::try_from(d.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        d.last.store(ms, Ordering::Relaxed);
    };
    let pass_fin = |r: io::Result<()>| match r {
        Ok(()) => Ok(()),
        // The peer is already gone: its own direction reports it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(on_dst(e)),
    };
    let mode = d.mode;
    let other_finished = d.other_finished;
    let mut armed = false;
    loop {
        // Wait with no buffer or pipe: an idle connection holds none.
        // Keepalive is checked on every wait, so a server that keeps the
        // socket readable still gets it once it is due.
        poll_fn(|cx| {
            if !armed && d.keepalive_due.is_some_and(|k| k.load(Ordering::Relaxed)) {
                armed = true;
                if let Err(e) = arm_keepalive(src.as_ref()) {
                    tracing::debug!(error = %e, "cannot set keepalive on the upstream socket");
                }
            }
            src.as_ref().poll_read_ready(cx)
        })
        .await
        .map_err(on_src)?;
        // Every burst starts with a copy through a pooled buffer: for the
        // small messages of request/response traffic that is one recv and
        // one send. Only a burst that fills the buffer is bulk, and moves
        // on through a pipe with splice (in Mode::Splice).
        let mut bulk = false;
        {
            let mut buf = pool::take();
            loop {
                match read_now(src, &mut buf).await {
                    Ok(None) => {
                        // poll_read is also Pending when this task's
                        // cooperative budget is spent, with the socket still
                        // readable; the readiness wait does not check the
                        // budget, so without this the task would spin.
                        tokio::task::coop::consume_budget().await;
                        break;
                    }
                    Ok(Some(0)) => return pass_fin(pass_eof(dst, other_finished).await),
                    Ok(Some(n)) => {
                        let mut len = n;
                        // Drained, and the socket is ready again at once:
                        // most often the peer's FIN came with these bytes
                        // (a server that answers and closes). Then the bytes
                        // and the FIN go on in one segment.
                        if n < buf.len()
                            && !other_finished.load(Ordering::Relaxed)
                            && ready_again(src).await
                        {
                            match read_now(src, &mut buf[n..]).await {
                                Ok(Some(0)) => {
                                    write_all_more(dst, &buf[..n]).await.map_err(on_dst)?;
                                    moved(n);
                                    return pass_fin(pass_eof(dst, other_finished).await);
                                }
                                Ok(Some(m)) => len += m,
                                Ok(None) => {}
                                Err(e) => {
                                    // What was read still goes on before the
                                    // error ends the connection.
                                    let _ = dst.write_all(&buf[..n]).await;
                                    return Err(on_src(e));
                                }
                            }
                        }
                        dst.write_all(&buf[..len]).await.map_err(on_dst)?;
                        moved(len);
                        if len < buf.len() {
                            // Drained (tokio cleared the readiness): give the
                            // buffer back before waiting again.
                            break;
                        }
                        if mode == Mode::Splice {
                            bulk = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(on_src(e)),
                }
            }
        }
        // A pipe that cannot be had (descriptors exhausted, or the kernel
        // giving only small pipes) leaves the rest of the burst to the copy
        // path above.
        if bulk && let Ok(pipe) = splice::Pipe::take() {
            // Boxed: a bulk burst is rare and long, and its state would
            // otherwise be in every connection's task for all its life.
            match Box::pin(splice::splice_burst(
                src.as_ref(),
                dst.as_ref(),
                &pipe,
                moved,
            ))
            .await
            {
                Ok(Some(())) => pipe.give_back(),
                Ok(None) => {
                    pipe.give_back();
                    return pass_fin(pass_eof(dst, other_finished).await);
                }
                // A pipe with data left in it is dropped, not pooled.
                Err(splice::Failed::Src(e)) => return Err(on_src(e)),
                Err(splice::Failed::Dst(e)) => return Err(on_dst(e)),
            }
        }
    }
}

/// Waits until `sock` is writable. Unlike `TcpStream::writable`, whose
/// future carries its own 152-byte waiter, this keeps the waker in the
/// socket's own slot: each wait is part of the connection's task, and an
/// idle connection's memory is that task. Only this connection's task waits
/// on its sockets, so one slot per direction is enough.
pub(crate) async fn write_ready(sock: &TcpStream) -> io::Result<()> {
    poll_fn(|cx| sock.poll_write_ready(cx)).await
}

/// Whether `src` is ready again right after a read that drained it. tokio
/// clears the readable flag on a short read but keeps read-closed, so this
/// is true when the peer's FIN is waiting (or, rarely, when new data came
/// meanwhile), and costs no system call.
async fn ready_again(src: &ReadHalf<'_>) -> bool {
    poll_fn(|cx| Poll::Ready(src.as_ref().poll_read_ready(cx).is_ready())).await
}

/// Writes all of `data` with MSG_MORE: the kernel holds it back until the
/// write shutdown that the caller makes next, which sends the bytes and the
/// FIN in one segment (one segment and one ACK fewer per connection than a
/// send and a separate FIN).
async fn write_all_more(dst: &WriteHalf<'_>, mut data: &[u8]) -> io::Result<()> {
    let sock = dst.as_ref();
    while !data.is_empty() {
        write_ready(sock).await?;
        match sock.try_io(Interest::WRITABLE, || {
            send(sock, data, SendFlags::MORE | SendFlags::NOSIGNAL).map_err(io::Error::from)
        }) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes a FIN read on one side to the other: a write shutdown, unless the
/// other direction is finished too, when the close that ends the relay
/// sends the FIN and the shutdown would be one system call more.
async fn pass_eof(dst: &mut WriteHalf<'_>, other_finished: &AtomicBool) -> io::Result<()> {
    if other_finished.load(Ordering::Relaxed) {
        return Ok(());
    }
    dst.shutdown().await
}

/// Relay buffers, reused per thread instead of allocated (and zeroed) per
/// burst of data. A connection holds one only while data is in flight.
pub(crate) mod pool {
    use std::cell::RefCell;
    use std::ops::{Deref, DerefMut};

    pub const BUF_SIZE: usize = 64 * 1024;
    /// Buffers kept per thread when returned; more are freed.
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub struct Buf(Option<Box<[u8]>>);

    pub fn take() -> Buf {
        let b = FREE
            .with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        Buf(Some(b))
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            if let Some(b) = self.0.take() {
                // A task can move between threads while it holds a buffer:
                // it then lands in another thread's list, which is fine.
                let _ = FREE.try_with(|f| {
                    let mut f = f.borrow_mut();
                    if f.len() < KEEP {
                        f.push(b);
                    }
                });
            }
        }
    }

    impl Deref for Buf {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            self.0.as_deref().unwrap_or(&[])
        }
    }

    impl DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [u8] {
            self.0.as_deref_mut().unwrap_or(&mut [])
        }
    }
}
