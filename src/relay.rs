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
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

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

#[derive(Debug, Default)]
pub struct Counts {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
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
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Option<Duration>,
    counts: &Counts,
    mode: Mode,
) -> (End, Option<io::Error>) {
    let outcome = {
        let (mut client_r, mut client_w) = client.split();
        let (mut upstream_r, mut upstream_w) = upstream.split();
        both_ways(
            &mut client_r,
            &mut client_w,
            &mut upstream_r,
            &mut upstream_w,
            idle,
            counts,
            mode,
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

async fn both_ways(
    client_r: &mut ReadHalf<'_>,
    client_w: &mut WriteHalf<'_>,
    upstream_r: &mut ReadHalf<'_>,
    upstream_w: &mut WriteHalf<'_>,
    idle: Option<Duration>,
    counts: &Counts,
    mode: Mode,
) -> Result<End, DirError> {
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved; shared by both
    // directions so that traffic either way keeps the connection alive.
    let last = AtomicU64::new(0);
    let up = pump(
        client_r,
        upstream_w,
        Side::Client,
        &counts.to_upstream,
        &last,
        started,
        mode,
    );
    let down = pump(
        upstream_r,
        client_w,
        Side::Upstream,
        &counts.to_client,
        &last,
        started,
        mode,
    );
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    let idle_sleep = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
    tokio::pin!(idle_sleep);

    loop {
        enum Ev {
            Up(Result<(), DirError>),
            Down(Result<(), DirError>),
            IdleCheck,
        }
        let ev = poll_fn(|cx| {
            if !up_done && let Poll::Ready(r) = up.as_mut().poll(cx) {
                return Poll::Ready(Ev::Up(r));
            }
            if !down_done && let Poll::Ready(r) = down.as_mut().poll(cx) {
                return Poll::Ready(Ev::Down(r));
            }
            if idle.is_some() && idle_sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::IdleCheck);
            }
            Poll::Pending
        })
        .await;
        match ev {
            Ev::Up(r) => {
                r?;
                up_done = true;
            }
            Ev::Down(r) => {
                r?;
                down_done = true;
            }
            Ev::IdleCheck => {
                let Some(idle) = idle else { continue };
                let last_ms = last.load(Ordering::Relaxed);
                let deadline = started + Duration::from_millis(last_ms) + idle;
                if Instant::now() >= deadline {
                    return Ok(End::Idle);
                }
                idle_sleep.as_mut().reset(deadline);
            }
        }
        if up_done && down_done {
            return Ok(End::Closed);
        }
    }
}

/// Reads what `src` has now into `buf`: `None` when nothing is waiting
/// (tokio then clears the readiness, so the next wait parks).
fn read_now(src: &ReadHalf<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match src.as_ref().try_read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// One direction: `src` to `dst`, passing a FIN on as a write shutdown.
async fn pump(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    src_side: Side,
    count: &AtomicU64,
    last: &AtomicU64,
    started: Instant,
    mode: Mode,
) -> Result<(), DirError> {
    let dst_side = match src_side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let on_src = |error| DirError {
        side: src_side,
        error,
    };
    let on_dst = |error| DirError {
        side: dst_side,
        error,
    };
    let moved = |n: usize| {
        count.fetch_add(n as u64, Ordering::Relaxed);
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    };
    loop {
        // Wait with no buffer or pipe: an idle connection holds none.
        src.as_ref().readable().await.map_err(on_src)?;
        // A pipe that cannot be had (descriptors exhausted) falls back to a
        // plain copy for this burst.
        if mode == Mode::Splice
            && let Ok(pipe) = splice::Pipe::take()
        {
            match splice::splice_burst(src.as_ref(), dst.as_ref(), &pipe, moved).await {
                Ok(Some(())) => {
                    pipe.give_back();
                    continue;
                }
                Ok(None) => {
                    pipe.give_back();
                    return match dst.shutdown().await {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                        Err(e) => Err(on_dst(e)),
                    };
                }
                // A pipe with data left in it is dropped, not pooled.
                Err(splice::Failed::Src(e)) => return Err(on_src(e)),
                Err(splice::Failed::Dst(e)) => return Err(on_dst(e)),
            }
        }
        let mut buf = pool::take();
        loop {
            match read_now(src, &mut buf) {
                Ok(None) => break,
                Ok(Some(0)) => {
                    return match dst.shutdown().await {
                        Ok(()) => Ok(()),
                        // The peer is already gone: its own direction reports it.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                        Err(e) => Err(on_dst(e)),
                    };
                }
                Ok(Some(n)) => {
                    dst.write_all(&buf[..n]).await.map_err(on_dst)?;
                    moved(n);
                    if n < buf.len() {
                        // Most likely drained: give the buffer back before
                        // waiting again (a wait that finds data still there
                        // returns at once).
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(on_src(e)),
            }
        }
    }
}

/// Relay buffers, reused per thread instead of allocated (and zeroed) per
/// burst of data. A connection holds one only while data is in flight.
mod pool {
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
