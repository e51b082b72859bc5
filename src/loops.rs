//! Event loops besides the main one. With `runtime.worker_threads` above 1
//! each core gets a single-threaded event loop of its own, with its own
//! epoll, and the accept loops (on the main loop) hand each new connection
//! to the loop serving the fewest connections; it then lives there to its
//! end. A reload that changes `runtime.worker_threads` starts loops or
//! retires them: a retired loop keeps its connections to their end and
//! takes no new ones.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

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
    /// This loop's count; unset on a thread that is no event loop.
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
#[derive(Clone)]
pub(crate) struct Other {
    pub load: Arc<Load>,
    /// Connections handed to it.
    pub conns: mpsc::UnboundedSender<Handoff>,
    /// Asks whether it still runs: each sender is answered.
    pings: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

/// How many event loops `runtime.worker_threads` asks for: `0` is one per
/// core.
pub fn event_loops(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The event loops connections are spread over, replaced whole when a
/// reload changes `runtime.worker_threads`.
pub struct Spread(RwLock<Arc<Loops>>);

impl Spread {
    /// The main loop alone. Called on the main loop's thread: connections
    /// served there are counted there.
    pub fn main_only() -> Spread {
        let main = LOAD.with(|l| l.get_or_init(Arc::default).clone());
        Spread(RwLock::new(Arc::new(Loops {
            main,
            others: Vec::new(),
            active: 0,
            start: AtomicUsize::new(0),
        })))
    }

    /// The loops as they are now.
    pub fn current(&self) -> Arc<Loops> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Spreads the connections accepted from now on over `loops`.
    pub fn set(&self, loops: Loops) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loops);
    }
}

/// The event loops, and how busy each one is.
pub struct Loops {
    /// The main loop's count, then each other loop's with its queue.
    main: Arc<Load>,
    /// Every loop started so far. A loop a reload retires stays, with the
    /// connections it serves, and takes no new ones; a later reload that
    /// asks for more loops takes it back first. Idle, it is never woken.
    others: Vec<Other>,
    /// How many of `others`, from the first, take new connections.
    active: usize,
    /// Where the search for the least busy loop starts, moved on each time:
    /// among equally busy loops, connections go round.
    start: AtomicUsize,
}

impl Loops {
    /// How many loops take new connections, the main one included.
    pub fn count(&self) -> usize {
        self.active + 1
    }

    /// These loops resized to `total`, the main one included: loops this
    /// set has already are taken first, and the others are started, each
    /// on a thread of its own (`loop-1`, ...), running once this returns.
    /// Loops past `total` stay, retired: they serve the connections they
    /// have and take no new ones.
    pub fn resized(&self, total: usize) -> io::Result<Loops> {
        let active = total.max(1) - 1;
        let mut others = self.others.clone();
        for k in others.len() + 1..=active {
            others.push(start_loop(k)?);
        }
        Ok(Loops {
            main: self.main.clone(),
            others,
            active,
            start: AtomicUsize::new(0),
        })
    }

    /// The loop to take a new connection, counted in from now: the one
    /// serving the fewest. The main loop also accepts every connection, so
    /// under a stream of short ones it falls behind, keeps more open, and
    /// gets fewer; turning connections out in strict turn left it the
    /// bottleneck and the other cores idle. `None` is the main loop,
    /// which serves the connection where it was accepted.
    pub(crate) fn pick(&self) -> (Option<&Other>, Serving) {
        let n = self.active + 1;
        if n == 1 {
            // Counted all the same: a reload may add loops while this
            // connection is open, and its end is taken off the count.
            self.main.0.fetch_add(1, Ordering::Relaxed);
            return (None, Serving);
        }
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

    /// Whether every other loop, retired ones included (they may still
    /// serve connections), answers within `wait`: the systemd watchdog is
    /// pinged only then, so that a loop stuck in a task (its connections
    /// with it) gets the service restarted, as a stuck main loop does.
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

/// Starts loop `k` on a thread of its own (`loop-k`), running once this
/// returns.
fn start_loop(k: usize) -> io::Result<Other> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (ping, pinged) = mpsc::unbounded_channel();
    // Returned once the loop's thread runs (and bears its name).
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
    Ok(Other {
        load,
        conns: tx,
        pings: ping,
    })
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
                // No set of loops holds this one any more: it was started
                // for a reload that was then refused, and never had a
                // connection. (A reload keeps every loop that ran.)
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
            active: 2,
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
            active: 2,
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
    fn a_reload_starts_loops_retires_them_and_takes_them_back_first() {
        // On a thread of its own: the main loop's count is the thread's.
        std::thread::spawn(|| {
            let spread = Spread::main_only();
            let one = spread.current();
            assert_eq!(one.count(), 1);
            // One loop counts its connections too, so that loops a reload
            // adds meanwhile find it as busy as it is.
            let (to, serving) = one.pick();
            assert!(to.is_none());
            assert_eq!(counts(&one), [1]);

            let three = one.resized(3).expect("two loops started");
            assert_eq!((three.count(), three.others.len()), (3, 2));
            spread.set(three);
            let three = spread.current();
            assert_eq!(counts(&three), [1, 0, 0], "the count goes on");
            drop(serving);
            assert_eq!(counts(&three), [0, 0, 0]);

            let two = three.resized(2).expect("nothing to start");
            assert_eq!(
                (two.count(), two.others.len()),
                (2, 2),
                "the retired loop stays for the connections it serves"
            );
            for _ in 0..6 {
                let (to, serving) = two.pick();
                // Counted where it went; this thread is only the main loop's.
                std::mem::forget(serving);
                assert_ne!(which(&two, to), 2, "a retired loop takes no connection");
            }
            assert_eq!(counts(&two), [3, 3, 0]);

            let back = two.resized(3).expect("nothing to start");
            assert!(
                back.others[1].conns.same_channel(&three.others[1].conns),
                "the retired loop is taken back, not started anew"
            );
            assert_eq!(which(&back, back.pick().0), 2, "and is the least busy");
        })
        .join()
        .expect("the test's thread");
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
