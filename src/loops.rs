//! Event loops besides the main one. With `runtime.worker_threads` above 1
//! each core gets a single-threaded event loop of its own, with its own
//! epoll, and the accept loops (on the main loop) hand each new connection
//! to the loop serving the fewest connections; it then lives there to its
//! end.
//!
//! Chosen by measurement over tokio's multi-threaded runtime, whose workers
//! share one I/O driver: whichever worker holds it collects every ready
//! connection, and the other steals or sleeps. On two cores shared with wrk
//! and nginx, loops of their own served 23 % more keep-alive requests a
//! second under 128 connections, 7 % more under 32, at less CPU per
//! request and a lower p99; new connections 7 % more under 128 and 5 to
//! 7 % fewer under 32, where the hand-off's wakeup is on each connection's
//! path (README, Speed). One loop per core on a shared
//! listening socket, measured before, woke every idle loop for each
//! connection that one of them then took; a hand-off wakes only the loop
//! that takes it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::listener::Anchor;
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
pub(crate) type Held = (OwnedSemaphorePermit, mpsc::Sender<()>, Serving);

/// A connection counted in the [`Load`] of the loop it runs on, until it
/// ends there. Of no size: it finds the count through the loop's thread,
/// since a connection's task stays on the loop it was spawned on. (A
/// pointer to the count, 8 bytes more in each connection's task, took the
/// task over a 128-byte boundary, which tokio aligns tasks to: 128 bytes
/// more per idle connection.)
pub(crate) struct Serving;

thread_local! {
    /// This loop's count; unset on a proxy with one loop, which counts
    /// nothing.
    static LOAD: std::cell::OnceCell<Arc<Load>> = const { std::cell::OnceCell::new() };
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = LOAD.try_with(|l| {
            if let Some(l) = l.get() {
                l.0.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

/// How many connections a loop serves now.
#[derive(Default)]
pub(crate) struct Load(AtomicUsize);

impl Load {
    /// Takes back a count made for a connection that never reached its
    /// loop.
    pub(crate) fn undo(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A loop besides the main one.
pub(crate) struct Other {
    pub load: Arc<Load>,
    /// Connections handed to it.
    pub conns: mpsc::UnboundedSender<Handoff>,
    /// Asks whether it still runs: each sender is answered.
    pings: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

/// The loops besides the main one, and how busy each loop is.
pub struct Loops {
    /// The main loop's count, then each other loop's with its queue.
    main: Arc<Load>,
    others: Vec<Other>,
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
            let (ping, pinged) = mpsc::unbounded_channel();
            // Returned once every loop's thread runs (and bears its name).
            let (up, is_up) = std::sync::mpsc::sync_channel(0);
            let load: Arc<Load> = Arc::default();
            let counted = load.clone();
            std::thread::Builder::new()
                .name(format!("loop-{k}"))
                .spawn(move || {
                    LOAD.with(|l| l.set(counted)).ok();
                    let _ = up.send(());
                    rt.block_on(receive(rx, pinged));
                })?;
            is_up
                .recv()
                .map_err(|_| io::Error::other(format!("event loop {k} ended at its start")))?;
            senders.push(Other {
                load,
                conns: tx,
                pings: ping,
            });
        }
        // Called on the main loop's thread, which serves its share.
        let main: Arc<Load> = Arc::default();
        LOAD.with(|l| l.set(main.clone())).ok();
        Ok(Arc::new(Loops {
            main,
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
    pub(crate) fn pick(&self) -> (Option<&Other>, Serving) {
        let n = self.others.len() + 1;
        let first = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let load = |k: usize| match k {
            0 => &self.main,
            k => &self.others[k - 1].load,
        };
        let best = (0..n)
            .map(|i| (first + i) % n)
            .min_by_key(|&k| load(k).0.load(Ordering::Relaxed))
            .unwrap_or(0);
        load(best).0.fetch_add(1, Ordering::Relaxed);
        (best.checked_sub(1).map(|k| &self.others[k]), Serving)
    }

    /// Whether every other loop answers within `wait`: the systemd
    /// watchdog is pinged only then, so that a loop stuck in a task (its
    /// connections with it) gets the service restarted, as a stuck main
    /// loop does.
    pub async fn all_answer(&self, wait: std::time::Duration) -> bool {
        let mut answers = Vec::with_capacity(self.others.len());
        for o in &self.others {
            let (tx, rx) = oneshot::channel();
            if o.pings.send(tx).is_err() {
                return false;
            }
            answers.push(rx);
        }
        tokio::time::timeout(wait, async {
            for a in answers {
                if a.await.is_err() {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false)
    }
}

/// Serves the connections handed to this loop. Keeps a timer due while
/// they keep coming, as the accept loop does (see [`Anchor`]): each
/// connection's timers would otherwise each cost a wake of this loop's
/// driver.
async fn receive(
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    mut pings: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    let mut anchor = Anchor::new();
    loop {
        let h = tokio::select! {
            biased;
            () = anchor.fired(), if anchor.armed() => continue,
            Some(ping) = pings.recv() => {
                let _ = ping.send(());
                continue;
            }
            h = rx.recv() => match h {
                Some(h) => h,
                None => return,
            },
        };
        anchor.arrived(Instant::now());
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
    fn which(loops: &Loops, to: Option<&Other>) -> usize {
        match to {
            None => 0,
            Some(t) => {
                1 + loops
                    .others
                    .iter()
                    .position(|o| o.conns.same_channel(&t.conns))
                    .expect("one of the loops")
            }
        }
    }

    fn other(
        conns: mpsc::UnboundedSender<Handoff>,
        pings: mpsc::UnboundedSender<oneshot::Sender<()>>,
    ) -> Other {
        Other {
            load: Arc::default(),
            conns,
            pings,
        }
    }

    // Paused time: the wait for a loop that never answers passes at once.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_hears_from_every_loop_or_is_not_pinged() {
        let (a, ra) = mpsc::unbounded_channel();
        let (pa, pinged_a) = mpsc::unbounded_channel();
        let (b, _rb) = mpsc::unbounded_channel();
        let (pb, mut pinged_b) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let loops = Loops {
            main: Arc::default(),
            others: vec![other(a, pa), other(b, pb)],
            start: AtomicUsize::new(0),
        };
        // Loop a runs; loop b is stuck: it holds its pings unanswered.
        tokio::spawn(receive(ra, pinged_a));
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Some(p) = pinged_b.recv().await {
                kept.push(p);
            }
        });
        let wait = std::time::Duration::from_millis(200);
        assert!(!loops.all_answer(wait).await);
        held.abort();
        let _ = held.await;
        // b's thread gone: no answer either.
        assert!(!loops.all_answer(wait).await);
        // Both running.
        let (b, rb) = mpsc::unbounded_channel();
        let (pb, pinged_b) = mpsc::unbounded_channel();
        let loops = Loops {
            others: vec![
                other(loops.others[0].conns.clone(), loops.others[0].pings.clone()),
                other(b, pb),
            ],
            ..loops
        };
        tokio::spawn(receive(rb, pinged_b));
        assert!(loops.all_answer(wait).await);
    }

    fn counts(loops: &Loops) -> Vec<usize> {
        std::iter::once(&loops.main)
            .chain(loops.others.iter().map(|o| &o.load))
            .map(|l| l.0.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn a_connection_goes_to_the_least_busy_loop_and_equally_busy_ones_take_turns() {
        let (a, _ra) = mpsc::unbounded_channel();
        let (b, _rb) = mpsc::unbounded_channel();
        let (pa, _pa) = mpsc::unbounded_channel();
        let (pb, _pb) = mpsc::unbounded_channel();
        let loops = Loops {
            main: Arc::default(),
            others: vec![other(a, pa), other(b, pb)],
            start: AtomicUsize::new(0),
        };
        let pick = || which(&loops, loops.pick().0);
        // Three idle loops: one connection each.
        let mut first: Vec<usize> = (0..3).map(|_| pick()).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(counts(&loops), [1, 1, 1]);
        // Loop 1's connection ends: loop 1 is now the least busy, and takes
        // the next one however the turns stand.
        loops.others[0].load.undo();
        assert_eq!(pick(), 1);
        // A loop holding more than the others gets none until they catch up.
        let k2 = pick();
        let k3 = pick();
        assert_ne!(k2, k3, "equally busy loops take turns");
        assert_eq!(counts(&loops).iter().sum::<usize>(), 5);
    }

    #[test]
    fn a_connection_leaves_the_count_of_the_loop_it_ends_on() {
        let load: Arc<Load> = Arc::default();
        load.0.store(2, Ordering::Relaxed);
        let counted = load.clone();
        std::thread::spawn(move || {
            LOAD.with(|l| l.set(counted)).ok();
            drop(Serving);
        })
        .join()
        .unwrap();
        assert_eq!(load.0.load(Ordering::Relaxed), 1);
        // A thread that is no loop of a proxy with several counts nothing.
        drop(Serving);
        assert_eq!(load.0.load(Ordering::Relaxed), 1);
    }
}
