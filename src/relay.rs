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
use tokio::net::TcpStream;
use tokio::time::Instant;

const BUF_SIZE: usize = 16 * 1024;

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
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Option<Duration>,
    counts: &Counts,
) -> (End, Option<io::Error>) {
    let started = Instant::now();
    // Milliseconds since `started` of the last byte moved; shared by both
    // directions so that traffic either way keeps the connection alive.
    let last = AtomicU64::new(0);
    let up = pump(
        client,
        upstream,
        Side::Client,
        &counts.to_upstream,
        &last,
        started,
    );
    let down = pump(
        upstream,
        client,
        Side::Upstream,
        &counts.to_client,
        &last,
        started,
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
            Ev::Up(Ok(())) => up_done = true,
            Ev::Down(Ok(())) => down_done = true,
            Ev::Up(Err(e)) | Ev::Down(Err(e)) => {
                // Zero linger makes the close below send RST, so the peer
                // sees the failure instead of a clean end of stream.
                let _ = client.set_zero_linger();
                let _ = upstream.set_zero_linger();
                let end = match e.side {
                    Side::Client => End::ClientReset,
                    Side::Upstream => End::UpstreamReset,
                };
                return (end, Some(e.error));
            }
            Ev::IdleCheck => {
                let Some(idle) = idle else { continue };
                let last_ms = last.load(Ordering::Relaxed);
                let deadline = started + Duration::from_millis(last_ms) + idle;
                if Instant::now() >= deadline {
                    let _ = SockRef::from(client).shutdown(Shutdown::Write);
                    let _ = SockRef::from(upstream).shutdown(Shutdown::Write);
                    return (End::Idle, None);
                }
                idle_sleep.as_mut().reset(deadline);
            }
        }
        if up_done && down_done {
            return (End::Closed, None);
        }
    }
}

/// One direction: `src` to `dst`, passing a FIN on as a write shutdown.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    count: &AtomicU64,
    last: &AtomicU64,
    started: Instant,
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
    loop {
        src.readable().await.map_err(on_src)?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            match src.try_read(&mut buf) {
                Ok(0) => {
                    return match SockRef::from(dst).shutdown(Shutdown::Write) {
                        Ok(()) => Ok(()),
                        // The peer is already gone: its own direction reports it.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                        Err(e) => Err(on_dst(e)),
                    };
                }
                Ok(n) => {
                    write_all(dst, &buf[..n]).await.map_err(on_dst)?;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    last.store(ms, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(on_src(e)),
            }
        }
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
