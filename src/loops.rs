//! Event loops besides the main one. With `runtime.worker_threads` above 1
//! each core gets a single-threaded event loop of its own, with its own
//! epoll, and the accept loops (on the main loop) hand each new connection
//! to the loop serving the fewest connections; it then lives there to its
//! end.
//!
//! Chosen by measurement over tokio's multi-threaded runtime, whose workers
//! share one I/O driver: whichever worker holds it collects every ready
//! connection, and the other steals or sleeps. On two cores shared with wrk
//! and nginx, loops of their own served 21 % more keep-alive requests a
//! second under 128 connections, 8 % more under 32, at less CPU per
//! request and a lower p99 (README, Speed). One loop per core on a shared
//! listening socket, measured before, woke every idle loop for each
//! connection that one of them then took; a hand-off wakes only the loop
//! that takes it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use crate::listener::TIMER_ANCHOR;
use crate::route::{ClientAddr, Route, Shared, serve};

/// What a connection needs to be served on another loop. The socket goes
/// as a std one: a tokio socket belongs to the loop that registered it.
pub(crate) struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub arrived: Instant,
    pub route: Arc<Route>,
    pub shared: Shared,
    /// The connection's `max_connections` permit, drain guard and place
    /// in its loop's count.
    pub held: Held,
}

/// What a connection holds until it ends.
pub(crate) type Held = (OwnedSemaphorePermit, mpsc::Sender<()>, Option<Serving>);

/// One connection counted in its loop's [`Load`] until it ends.
pub(crate) struct Serving(Arc<Load>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many connections a loop serves now.
#[derive(Default)]
pub(crate) struct Load(AtomicUsize);

/// The loops besides the main one, and how busy each loop is.
pub struct Loops {
    /// The main loop's count, then each other loop's with its queue.
    main: Arc<Load>,
    others: Vec<(Arc<Load>, mpsc::UnboundedSender<Handoff>)>,
    /// Where the search for the least busy loop starts, moved on each time:
    /// among equally busy loops, connections go round.
    start: AtomicUsize,
}

impl Loops {
    /// Starts `others` loops, each on a thread of its own (`loop-1`, ...),
    /// running once this returns. They run until the process exits.
    pub fn start(others: usize) -> io::Result<Arc<Loops>> {
        let mut senders = Vec::with_capacity(others);
        for k in 1..=others {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = mpsc::unbounded_channel();
            // Returned once every loop's thread runs (and bears its name).
            let (up, is_up) = std::sync::mpsc::sync_channel(0);
            std::thread::Builder::new()
                .name(format!("loop-{k}"))
                .spawn(move || {
                    let _ = up.send(());
                    rt.block_on(receive(rx));
                })?;
            is_up
                .recv()
                .map_err(|_| io::Error::other(format!("event loop {k} ended at its start")))?;
            senders.push((Arc::default(), tx));
        }
        Ok(Arc::new(Loops {
            main: Arc::default(),
            others: senders,
            start: AtomicUsize::new(0),
        }))
    }

    /// The loop to take a new connection, counted in from now: the one
    /// serving the fewest. The main loop also accepts every connection, so
    /// under a stream of short ones it falls behind, keeps more open, and
    /// gets fewer; turning connections out in strict turn left it the
    /// bottleneck and the other cores idle. `None` is the main loop,
    /// which serves the connection where it was accepted.
    pub(crate) fn pick(&self) -> (Option<&mpsc::UnboundedSender<Handoff>>, Serving) {
        let n = self.others.len() + 1;
        let first = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let load = |k: usize| match k {
            0 => &self.main,
            k => &self.others[k - 1].0,
        };
        let best = (0..n)
            .map(|i| (first + i) % n)
            .min_by_key(|&k| load(k).0.load(Ordering::Relaxed))
            .unwrap_or(0);
        let chosen = load(best).clone();
        chosen.0.fetch_add(1, Ordering::Relaxed);
        let to = best.checked_sub(1).map(|k| &self.others[k].1);
        (to, Serving(chosen))
    }
}

/// Serves the connections handed to this loop. Keeps a timer due while
/// they keep coming, as the accept loop does (see [`TIMER_ANCHOR`]): each
/// connection's timers would otherwise each cost a wake of this loop's
/// driver.
async fn receive(mut rx: mpsc::UnboundedReceiver<Handoff>) {
    let anchor = tokio::time::sleep(TIMER_ANCHOR);
    tokio::pin!(anchor);
    let mut anchored = false;
    let mut arrived_since_anchor = false;
    loop {
        let h = tokio::select! {
            biased;
            () = anchor.as_mut(), if anchored => {
                if arrived_since_anchor {
                    arrived_since_anchor = false;
                    anchor.as_mut().reset(Instant::now() + TIMER_ANCHOR);
                } else {
                    anchored = false;
                }
                continue;
            }
            h = rx.recv() => match h {
                Some(h) => h,
                None => return,
            },
        };
        arrived_since_anchor = true;
        if !anchored {
            anchored = true;
            anchor.as_mut().reset(Instant::now() + TIMER_ANCHOR);
        }
        match TcpStream::from_std(h.stream) {
            Ok(stream) => {
                tokio::spawn(serve(
                    h.route,
                    h.shared,
                    stream,
                    ClientAddr(h.peer),
                    h.arrived,
                    h.held,
                ));
            }
            // The socket is closed, and its permit and drain guard go.
            Err(e) => tracing::warn!(
                route = %h.route.cfg.name,
                client.addr = %h.peer,
                error = %e,
                "connection closed: cannot add it to an event loop"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which loop `to` is: 0 for the main one, else its number.
    fn which(loops: &Loops, to: Option<&mpsc::UnboundedSender<Handoff>>) -> usize {
        match to {
            None => 0,
            Some(t) => {
                1 + loops
                    .others
                    .iter()
                    .position(|(_, o)| o.same_channel(t))
                    .expect("one of the loops")
            }
        }
    }

    #[test]
    fn a_connection_goes_to_the_least_busy_loop_and_equally_busy_ones_take_turns() {
        let (a, _ra) = mpsc::unbounded_channel();
        let (b, _rb) = mpsc::unbounded_channel();
        let loops = Loops {
            main: Arc::default(),
            others: vec![(Arc::default(), a), (Arc::default(), b)],
            start: AtomicUsize::new(0),
        };
        let pick = || {
            let (to, serving) = loops.pick();
            (which(&loops, to), serving)
        };
        // Three idle loops: one connection each.
        let mut first: Vec<(usize, Serving)> = (0..3).map(|_| pick()).collect();
        let mut got: Vec<usize> = first.iter().map(|(k, _)| *k).collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        // Loop 1's connection ends: loop 1 is now the least busy, and takes
        // the next one however the turns stand.
        let ended = first
            .iter()
            .position(|(k, _)| *k == 1)
            .expect("loop 1 had one");
        drop(first.remove(ended));
        let (k, again) = pick();
        assert_eq!(k, 1);
        // A loop holding more than the others gets none until they catch up.
        let (k2, extra) = pick();
        let (k3, _more) = pick();
        assert_ne!(k2, k3, "equally busy loops take turns");
        drop(extra);
        drop(again);
        for (_, s) in first {
            drop(s);
        }
        assert_eq!(
            loops.main.0.load(Ordering::Relaxed)
                + loops
                    .others
                    .iter()
                    .map(|(l, _)| l.0.load(Ordering::Relaxed))
                    .sum::<usize>(),
            1,
            "each ended connection leaves its count"
        );
    }
}
