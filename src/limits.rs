//! The limit on open descriptors.
//!
//! A proxied connection holds two descriptors (its client and upstream
//! sockets), so the routes' `max_connections` need about twice their sum.
//! Service managers and container runtimes often start a process with a soft
//! limit of 1,024 under a far higher hard one (systemd without
//! `LimitNOFILE`, containerd 2 and the Docker releases on it): the low soft
//! limit only protects programs that use `select(2)`, which this one does
//! not. So the soft limit is raised to the hard one at start, as Go's
//! runtime does, and a limit that still cannot hold every route at its
//! `max_connections` is logged, with what to change.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::config::RouteConfig;

/// Descriptors beyond the connections' own: listeners, the admin endpoint's
/// (at most 64 connections), DNS sockets, pooled pipes, and the runtime's.
pub const SPARE: u64 = 256;

/// The soft limit before and after [`raise`]; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: Option<u64>,
    pub after: Option<u64>,
}

/// Raises the soft limit on open descriptors to the hard limit. A failure
/// leaves the limit as it was: [`warn_if_short`] then says so.
pub fn raise() -> Raised {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return Raised {
            before,
            after: before,
        };
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let after = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => before,
    };
    Raised { before, after }
}

/// The descriptors `routes` need with every route at its `max_connections`.
pub fn needed(routes: &[RouteConfig]) -> u64 {
    routes
        .iter()
        .map(|r| 2 * u64::from(r.max_connections.get()))
        .sum::<u64>()
        + SPARE
}

/// Logs a WARN when the soft limit on open descriptors cannot hold every
/// route at its `max_connections`: past about the connections it names,
/// accepts fail with EMFILE (logged, backed off) and clients wait in the
/// listen queue.
pub fn warn_if_short(routes: &[RouteConfig]) {
    let needed = needed(routes);
    if let Some(limit) = short(getrlimit(Resource::Nofile).current, needed) {
        tracing::warn!(
            limit,
            needed,
            connections = limit.saturating_sub(SPARE) / 2,
            "the open-file limit is below what max_connections needs: connections past about \
             the number given will wait; raise LimitNOFILE (systemd) or the nofile ulimit \
             (containers: --ulimit nofile=N:N), or lower max_connections"
        );
    }
}

/// The soft limit `limit` when it is below `needed`; `None` is unlimited.
fn short(limit: Option<u64>, needed: u64) -> Option<u64> {
    limit.filter(|&l| l < needed)
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn a_limit_is_short_only_below_what_is_needed() {
        assert_eq!(short(Some(1023), 1024), Some(1023));
        // Exactly enough holds every route at its max_connections.
        assert_eq!(short(Some(1024), 1024), None);
        assert_eq!(short(None, u64::MAX), None);
    }
}
