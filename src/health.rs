//! Per-address health of one route, and the order in which a connection
//! tries the addresses of an answer.
//!
//! Only addresses known to be down are stored: an address never seen failing
//! is up, so the table stays as small as the set of broken servers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::config::{MAX_RETRY_DOWN_AFTER, Order};

#[derive(Debug, Clone)]
struct Down {
    /// When the next real try is due.
    retry_at: Instant,
    /// The wait that led to `retry_at`; doubled by each failed retry.
    backoff: Duration,
    /// A connection has taken the retry and not reported back yet, so
    /// concurrent connections do not all pile onto a dead server.
    retry_taken: bool,
    since: SystemTime,
}

#[derive(Debug)]
pub struct Health {
    retry_base: Duration,
    down: Mutex<HashMap<SocketAddr, Down>>,
    rotation: AtomicUsize,
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
            down: Mutex::new(HashMap::new()),
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
        let mut down = lock(&self.down);
        if down.is_empty() {
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
            match down.get_mut(&a) {
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

    pub fn mark_up(&self, addr: SocketAddr) -> bool {
        lock(&self.down).remove(&addr).is_some()
    }

    /// Marks `addr` down after a failed attempt. Returns true when it was up.
    pub fn mark_down(&self, addr: SocketAddr, now: Instant) -> bool {
        let mut down = lock(&self.down);
        match down.get_mut(&addr) {
            Some(d) => {
                d.backoff = (d.backoff * 2).clamp(Duration::from_millis(1), MAX_RETRY_DOWN_AFTER);
                d.retry_at = now + d.backoff;
                d.retry_taken = false;
                false
            }
            None => {
                down.insert(
                    addr,
                    Down {
                        retry_at: now + self.retry_base,
                        backoff: self.retry_base,
                        retry_taken: false,
                        since: SystemTime::now(),
                    },
                );
                true
            }
        }
    }

    /// Gives back a retry that the connection never made (an earlier
    /// address connected first), so the next connection takes it.
    pub fn release_retry(&self, addr: SocketAddr) {
        if let Some(d) = lock(&self.down).get_mut(&addr) {
            d.retry_taken = false;
        }
    }

    pub fn is_down(&self, addr: SocketAddr) -> bool {
        lock(&self.down).contains_key(&addr)
    }

    /// Down addresses with the time they went down.
    pub fn down_since(&self) -> Vec<(SocketAddr, SystemTime)> {
        lock(&self.down)
            .iter()
            .map(|(a, d)| (*a, d.since))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
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
        assert!(h.mark_down(a[0], Instant::now()));
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
        assert!(!h.mark_down(a[0], Instant::now()));
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
        h.mark_down(a[0], Instant::now());
        h.mark_down(a[0], Instant::now());
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
        h.mark_down(a[0], Instant::now());
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
            h.mark_down(*x, Instant::now());
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
