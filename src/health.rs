//! Per-address health of one route, and the order in which a connection
//! tries the addresses of an answer.
//!
//! The table holds the addresses of the route's answers with what is known
//! of each: an address never seen failing is up. It is bounded: past
//! `MAX_ADDRS`, up addresses are forgotten first, then the one down longest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::config::{MAX_RETRY_DOWN_AFTER, Order};
use crate::lock;

#[derive(Debug, Clone)]
struct Down {
    /// When the next real try is due.
    retry_at: Instant,
    /// The wait that led to `retry_at`; doubled by each failed retry.
    backoff: Duration,
    /// A connection has taken the retry and not reported back yet, so
    /// concurrent connections do not all pile onto a dead server.
    retry_taken: bool,
    /// Orders the down addresses by when they went down (`Table::marked`).
    marked: u64,
}

#[derive(Debug, Clone)]
struct AddrState {
    down: Option<Down>,
    /// When the address entered its current state (or was first seen).
    since: SystemTime,
    last_error: Option<&'static str>,
    /// Consecutive active probe results, for `down_after` / `up_after`.
    probe_ok: u32,
    probe_failed: u32,
}

impl AddrState {
    fn new() -> AddrState {
        AddrState {
            down: None,
            since: SystemTime::now(),
            last_error: None,
            probe_ok: 0,
            probe_failed: 0,
        }
    }
}

/// One address as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrStatus {
    pub addr: SocketAddr,
    pub up: bool,
    pub since: SystemTime,
    pub last_error: Option<&'static str>,
}

/// A change of state, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
}

/// Addresses remembered beyond the current answer before old ones are
/// forgotten, so a churning DNS answer cannot grow the table without end.
const MAX_ADDRS: usize = 1024;

#[derive(Debug)]
pub struct Health {
    retry_base: Duration,
    addrs: Mutex<Table>,
    rotation: AtomicUsize,
}

#[derive(Debug, Default)]
struct Table {
    states: HashMap<SocketAddr, AddrState>,
    /// How many states are down: zero lets a connection skip reordering.
    down: usize,
    /// Bumped each time an address goes down.
    marked: u64,
}

impl Table {
    fn entry(&mut self, addr: SocketAddr) -> &mut AddrState {
        if self.states.len() >= MAX_ADDRS && !self.states.contains_key(&addr) {
            // Forget the up addresses: nothing is lost but their "since".
            self.states.retain(|_, s| s.down.is_some());
            if self.states.len() >= MAX_ADDRS {
                // All down, as when an answer churns through dead servers:
                // forget the one down longest, so the table stays bounded.
                let oldest = self
                    .states
                    .iter()
                    .filter_map(|(a, s)| Some((s.down.as_ref()?.marked, *a)))
                    .min();
                if let Some((_, a)) = oldest {
                    self.states.remove(&a);
                    self.down -= 1;
                }
            }
        }
        self.states.entry(addr).or_insert_with(AddrState::new)
    }
}

/// The addresses one connection will try, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub addrs: Vec<SocketAddr>,
    /// The preferred address before health reordering: a connection served
    /// by another one is a failover.
    pub first: Option<SocketAddr>,
    /// Down addresses placed at their listed place for their one retry.
    pub retries: Vec<SocketAddr>,
}

impl Health {
    pub fn new(retry_base: Duration) -> Health {
        Health {
            retry_base,
            addrs: Mutex::new(Table::default()),
            rotation: AtomicUsize::new(0),
        }
    }

    /// Orders an answer for one connection: the route's `order` first, then
    /// addresses known to be down to the back (in their order), except a
    /// down address whose retry is due, which keeps its place.
    pub fn plan(&self, mut addrs: Vec<SocketAddr>, order: Order, now: Instant) -> Plan {
        match order {
            Order::Listed => {}
            Order::RoundRobin => {
                if !addrs.is_empty() {
                    let start = self.rotation.fetch_add(1, Ordering::Relaxed) % addrs.len();
                    addrs.rotate_left(start);
                }
            }
            Order::Random => addrs.shuffle(&mut rand::rng()),
        }
        let first = addrs.first().copied();
        let mut table = lock(&self.addrs);
        // Known from now on, so that /status says since when.
        for a in &addrs {
            table.entry(*a);
        }
        if table.down == 0 {
            return Plan {
                addrs,
                first,
                retries: Vec::new(),
            };
        }
        let mut front = Vec::with_capacity(addrs.len());
        let mut back = Vec::new();
        let mut retries = Vec::new();
        for a in addrs {
            match table.states.get_mut(&a).and_then(|s| s.down.as_mut()) {
                None => front.push(a),
                Some(d) if !d.retry_taken && now >= d.retry_at => {
                    d.retry_taken = true;
                    retries.push(a);
                    front.push(a);
                }
                Some(_) => back.push(a),
            }
        }
        front.extend(back);
        Plan {
            addrs: front,
            first,
            retries,
        }
    }

    /// A connection to `addr` succeeded. Returns true when it was down.
    pub fn mark_up(&self, addr: SocketAddr) -> bool {
        let mut table = lock(&self.addrs);
        let Some(s) = table.states.get_mut(&addr) else {
            return false;
        };
        if s.down.take().is_some() {
            s.since = SystemTime::now();
            table.down -= 1;
            true
        } else {
            false
        }
    }

    /// Marks `addr` down after a failed attempt. Returns true when it was up.
    pub fn mark_down(&self, addr: SocketAddr, now: Instant, error: &'static str) -> bool {
        let mut table = lock(&self.addrs);
        let base = self.retry_base;
        // A sequence: the gaps left by addresses already down do no harm.
        table.marked += 1;
        let marked = table.marked;
        let s = table.entry(addr);
        s.last_error = Some(error);
        match &mut s.down {
            Some(d) => {
                d.backoff = (d.backoff * 2).clamp(Duration::from_millis(1), MAX_RETRY_DOWN_AFTER);
                d.retry_at = now + d.backoff;
                d.retry_taken = false;
                false
            }
            None => {
                s.down = Some(Down {
                    retry_at: now + base,
                    backoff: base,
                    retry_taken: false,
                    marked,
                });
                s.since = SystemTime::now();
                table.down += 1;
                true
            }
        }
    }

    /// Gives back a retry that the connection never made (an earlier
    /// address connected first), so the next connection takes it.
    pub fn release_retry(&self, addr: SocketAddr) {
        let mut table = lock(&self.addrs);
        if let Some(d) = table.states.get_mut(&addr).and_then(|s| s.down.as_mut()) {
            d.retry_taken = false;
        }
    }

    /// Records an active probe; `down_after` consecutive failures mark the
    /// address down, `up_after` consecutive successes mark it up.
    pub fn probed(
        &self,
        addr: SocketAddr,
        error: Option<&'static str>,
        down_after: u32,
        up_after: u32,
        now: Instant,
    ) -> Option<Transition> {
        let flip = {
            let mut table = lock(&self.addrs);
            let s = table.entry(addr);
            match error {
                None => {
                    s.probe_ok = s.probe_ok.saturating_add(1);
                    s.probe_failed = 0;
                    (s.down.is_some() && s.probe_ok >= up_after).then_some(Transition::CameUp)
                }
                Some(e) => {
                    s.last_error = Some(e);
                    s.probe_ok = 0;
                    s.probe_failed = s.probe_failed.saturating_add(1);
                    (s.down.is_none() && s.probe_failed >= down_after)
                        .then_some(Transition::WentDown)
                }
            }
        };
        match flip {
            Some(Transition::CameUp) => self.mark_up(addr).then_some(Transition::CameUp),
            Some(Transition::WentDown) => self
                .mark_down(addr, now, error.unwrap_or("error"))
                .then_some(Transition::WentDown),
            _ => None,
        }
    }

    #[cfg(test)]
    fn is_down(&self, addr: SocketAddr) -> bool {
        lock(&self.addrs)
            .states
            .get(&addr)
            .is_some_and(|s| s.down.is_some())
    }

    /// The state of each of `addrs`, in their order.
    pub fn status(&self, addrs: &[SocketAddr]) -> Vec<AddrStatus> {
        let table = lock(&self.addrs);
        addrs
            .iter()
            .map(|a| match table.states.get(a) {
                Some(s) => AddrStatus {
                    addr: *a,
                    up: s.down.is_none(),
                    since: s.since,
                    last_error: s.last_error,
                },
                None => AddrStatus {
                    addr: *a,
                    up: true,
                    since: SystemTime::now(),
                    last_error: None,
                },
            })
            .collect()
    }

    /// Follows a new answer: forgets the addresses that are neither in it
    /// nor down, and knows its new ones from now on, so that `/status` says
    /// since when before any connection or probe has tried them.
    pub fn track(&self, answer: &[SocketAddr]) {
        let mut table = lock(&self.addrs);
        table
            .states
            .retain(|a, s| s.down.is_some() || answer.contains(a));
        for a in answer {
            table.entry(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn track_forgets_up_addresses_gone_from_the_answer() {
        let h = Health::new(Duration::from_secs(1));
        let now = Instant::now();
        let [kept, gone, down] = [1, 2, 3].map(|i| SocketAddr::from(([127, 0, 0, i], 80)));
        for a in [kept, gone] {
            assert_eq!(h.probed(a, Some("timeout"), 5, 1, now), None);
        }
        h.mark_down(down, now, "refused");
        h.track(&[kept]);
        assert_eq!(h.status(&[kept])[0].last_error, Some("timeout"));
        // Back in a later answer, a forgotten address starts afresh.
        assert_eq!(h.status(&[gone])[0].last_error, None);
        // A down address is kept: its retry back-off must survive an answer
        // that drops it for a while.
        assert!(h.is_down(down));
    }

    #[test]
    fn an_address_is_up_since_the_answer_that_brought_it() {
        let h = Health::new(Duration::from_secs(1));
        let a = SocketAddr::from(([127, 0, 0, 1], 80));
        h.track(&[a]);
        let tracked = SystemTime::now();
        let s = &h.status(&[a])[0];
        assert!(s.up);
        assert!(s.since <= tracked, "since is the answer's, not the read's");
        // Unchanged by the next answer that still holds it.
        h.track(&[a]);
        assert_eq!(h.status(&[a])[0].since, s.since);
    }

    #[test]
    fn the_table_forgets_up_addresses_only_once_it_is_full() {
        let h = Health::new(Duration::from_secs(1));
        let now = Instant::now();
        let addr = |i: usize| SocketAddr::from(([127, 1, (i / 256) as u8, (i % 256) as u8], 80));
        let last_error = |a| h.status(&[a])[0].last_error;
        let down = addr(0);
        h.mark_down(down, now, "refused");
        // An up address with something to remember: one failed probe of
        // the five that would mark it down.
        let up = addr(1);
        assert_eq!(h.probed(up, Some("timeout"), 5, 1, now), None);
        for i in 2..MAX_ADDRS {
            h.plan(vec![addr(i)], Order::Listed, now);
        }
        assert_eq!(
            last_error(up),
            Some("timeout"),
            "forgotten while there was room"
        );
        // A known address on a full table adds nothing and forgets nothing.
        h.plan(vec![addr(5)], Order::Listed, now);
        assert_eq!(last_error(up), Some("timeout"));
        // A new one on a full table: the up addresses go, the down one stays.
        h.plan(vec![addr(MAX_ADDRS)], Order::Listed, now);
        assert_eq!(last_error(up), None);
        assert!(h.is_down(down));
    }

    #[test]
    fn a_table_full_of_down_addresses_forgets_the_one_down_longest() {
        let h = Health::new(Duration::from_secs(1));
        let now = Instant::now();
        let addr = |i: usize| SocketAddr::from(([127, 1, (i / 256) as u8, (i % 256) as u8], 80));
        // Down in descending order of address, so that the order they went
        // down in is not the order of the addresses.
        let first = MAX_ADDRS - 1;
        for i in (0..MAX_ADDRS).rev() {
            h.mark_down(addr(i), now, "refused");
        }
        // Failing again does not make an address newer: it went down first.
        h.mark_down(addr(first), now, "refused");
        h.mark_down(addr(MAX_ADDRS), now, "refused");
        let table = lock(&h.addrs);
        assert_eq!(table.states.len(), MAX_ADDRS, "bounded");
        assert_eq!(table.down, MAX_ADDRS, "the down count follows");
        assert!(!table.states.contains_key(&addr(first)));
        assert!(table.states.contains_key(&addr(0)));
        assert!(table.states.contains_key(&addr(first - 1)));
        assert!(table.states.contains_key(&addr(MAX_ADDRS)));
    }

    #[tokio::test(start_paused = true)]
    async fn probes_flip_after_consecutive_results() {
        let h = Health::new(Duration::from_secs(1));
        let a = SocketAddr::from(([127, 0, 0, 1], 80));
        let now = Instant::now();
        assert_eq!(h.probed(a, Some("refused"), 2, 3, now), None);
        assert_eq!(
            h.probed(a, None, 2, 3, now),
            None,
            "a success resets the failure count"
        );
        assert_eq!(h.probed(a, Some("refused"), 2, 3, now), None);
        assert_eq!(
            h.probed(a, Some("refused"), 2, 3, now),
            Some(Transition::WentDown)
        );
        assert!(h.is_down(a));
        assert_eq!(h.probed(a, None, 2, 3, now), None);
        assert_eq!(h.probed(a, None, 2, 3, now), None);
        assert_eq!(h.probed(a, None, 2, 3, now), Some(Transition::CameUp));
        assert!(!h.is_down(a));
        let st = h.status(&[a]);
        assert!(st[0].up);
        assert_eq!(st[0].last_error, Some("refused"));
    }

    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn down_goes_back_then_retries_at_its_place_with_doubling() {
        let h = Health::new(Duration::from_secs(1));
        let a = addrs(3);
        assert!(h.mark_down(a[0], Instant::now(), "refused"));
        let p = h.plan(a.clone(), Order::Listed, Instant::now());
        assert_eq!(p.addrs, vec![a[1], a[2], a[0]]);
        assert_eq!(p.first, Some(a[0]));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).addrs[0],
            a[1]
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let p = h.plan(a.clone(), Order::Listed, Instant::now());
        assert_eq!(p.addrs, a, "retry due: back at its listed place");
        assert_eq!(p.retries, vec![a[0]]);
        // Only one connection gets the retry.
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).addrs[0],
            a[1]
        );

        // The retry fails: the wait doubles to 2 s.
        assert!(!h.mark_down(a[0], Instant::now(), "refused"));
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).addrs[0],
            a[1]
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).addrs[0],
            a[0]
        );
        assert!(h.mark_up(a[0]));
        assert_eq!(h.plan(a.clone(), Order::Listed, Instant::now()).addrs, a);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_stops_at_thirty_seconds() {
        let h = Health::new(Duration::from_secs(20));
        let a = addrs(2);
        h.mark_down(a[0], Instant::now(), "refused");
        h.mark_down(a[0], Instant::now(), "refused");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).retries,
            vec![a[0]]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn released_retry_is_offered_again() {
        let h = Health::new(Duration::ZERO);
        let a = addrs(2);
        h.mark_down(a[0], Instant::now(), "refused");
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).retries,
            vec![a[0]]
        );
        assert!(
            h.plan(a.clone(), Order::Listed, Instant::now())
                .retries
                .is_empty()
        );
        h.release_retry(a[0]);
        assert_eq!(
            h.plan(a.clone(), Order::Listed, Instant::now()).retries,
            vec![a[0]]
        );
    }

    #[test]
    fn all_down_are_all_still_tried_in_order() {
        let h = Health::new(Duration::from_secs(5));
        let a = addrs(3);
        for x in &a {
            h.mark_down(*x, Instant::now(), "refused");
        }
        assert_eq!(h.plan(a.clone(), Order::Listed, Instant::now()).addrs, a);
    }

    #[test]
    fn round_robin_rotates_the_start() {
        let h = Health::new(Duration::from_secs(1));
        let a = addrs(3);
        let starts: Vec<SocketAddr> = (0..6)
            .map(|_| h.plan(a.clone(), Order::RoundRobin, Instant::now()).addrs[0])
            .collect();
        assert_eq!(starts, vec![a[0], a[1], a[2], a[0], a[1], a[2]]);
    }
}
