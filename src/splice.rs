//! Zero-copy relay of one direction with `splice(2)`: socket to pipe to
//! socket, the bytes never entering user space.
//!
//! Pipes come from a per-thread pool and are held only while data is in
//! flight, so an idle connection still holds just its two sockets. A pipe is
//! filled only when empty, so `EAGAIN` from the fill always means "socket
//! drained", never "pipe full" (which would wrongly clear the socket's
//! readiness).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per fill; the pipe is sized to hold them.
const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept per thread: at most 2 × KEEP descriptors per worker
/// thread stay open once a load has passed.
pub const KEEP: usize = 16;

/// Below this a pipe moves less per pair of calls than the copy path's
/// buffer does per read and write, and the copy path is the faster.
const PIPE_MIN: usize = crate::relay::pool::BUF_SIZE;
/// After the kernel gave a small pipe, bursts stay on the copy path this
/// long before a pipe is asked for again.
const SMALL_RETRY: Duration = Duration::from_secs(1);

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static SMALL_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The small-pipe WARN is logged once per process.
static SMALL_LOGGED: AtomicBool = AtomicBool::new(false);

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        if SMALL_UNTIL.get().is_some_and(|t| Instant::now() < t) {
            return Err(io::Error::other("pipes are small for now"));
        }
        let (r, w) =
            pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).map_err(io::Error::from)?;
        // A larger pipe moves more per pair of calls. The kernel refuses
        // past /proc/sys/fs/pipe-max-size, and for a user that is not root
        // once its pipes hold fs.pipe-user-pages-soft pages (64 MiB by
        // default, shared by every process of that user): new pipes then
        // get two pages.
        let cap = match rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE) {
            Ok(cap) => cap,
            Err(_) => rustix::pipe::fcntl_getpipe_size(&w).map_err(io::Error::from)?,
        };
        if cap < PIPE_MIN {
            // Measured: 7.5 Gbit/s through two-page pipes against 14 on
            // the copy path and 17 through full pipes.
            SMALL_UNTIL.set(Some(Instant::now() + SMALL_RETRY));
            if !SMALL_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    pipe_bytes = cap,
                    "the kernel gives only small pipes (this user's pipes reached \
                     fs.pipe-user-pages-soft, or fs.pipe-max-size is low): bulk transfers \
                     use the copy path, which is faster then; raise the sysctl, or run as a \
                     user of its own"
                );
            }
            return Err(io::Error::other(format!("pipe of {cap} bytes")));
        }
        Ok(Pipe { r, w, cap })
    }

    /// An empty pipe from the pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        match FREE.with(|f| f.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to the pool. Only call with nothing in it.
    pub fn give_back(self) {
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(self);
            }
        });
    }
}

/// Where a failure happened, for the caller's reset logic.
pub enum Failed {
    Src(io::Error),
    Dst(io::Error),
}

/// Moves what `src` has now through `pipe` to `dst`, until `src` has
/// nothing more (Ok(Some(moved))) or reaches end of stream (Ok(None) after
/// moving the rest). The pipe is empty whenever this returns Ok.
pub async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    mut on_moved: impl FnMut(usize),
) -> Result<Option<()>, Failed> {
    loop {
        // try_io and readiness waits do not count against tokio's
        // cooperative budget: without this, a connection that always has
        // data would never let others on its thread run.
        tokio::task::coop::consume_budget().await;
        let filled = src.try_io(Interest::READABLE, || {
            splice(
                src.as_fd(),
                None,
                pipe.w.as_fd(),
                None,
                pipe.cap,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )
            .map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::Src(e)),
        };
        while in_pipe > 0 {
            crate::relay::write_ready(dst).await.map_err(Failed::Dst)?;
            let sent = dst.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.r.as_fd(),
                    None,
                    dst.as_fd(),
                    None,
                    in_pipe,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => {
                    in_pipe -= n;
                    on_moved(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Failed::Dst(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Both ends of one loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn bursts_move_every_byte_and_then_report_the_end_of_stream() {
        let (mut writer, src) = pair().await;
        let (dst, mut reader) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let write = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        });
        let pipe = Pipe::take().unwrap();
        let mut moved = 0;
        let relay = async {
            loop {
                src.readable().await.unwrap();
                match splice_burst(&src, &dst, &pipe, |n| moved += n).await {
                    Ok(Some(())) => {}
                    Ok(None) => break,
                    Err(Failed::Src(e) | Failed::Dst(e)) => panic!("splice failed: {e}"),
                }
                // A burst that returns without reading would leave the
                // socket readable and this loop never waiting: yield, so
                // the timeout below can end it.
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), relay)
            .await
            .expect("the end of stream reported");
        drop(dst);
        write.await.unwrap();
        let got = read.await.unwrap();
        assert_eq!(moved, data.len());
        assert!(got == data, "{} bytes arrived of {}", got.len(), data.len());
    }
}
