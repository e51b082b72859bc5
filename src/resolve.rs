//! Resolution of a cluster alias on every connection: the hosts file first,
//! then DNS, never a cache; the last good DNS answer only as a stale fallback
//! when DNS itself fails.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hickory_resolver::config::{
    NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig as DnsConfig, ResolverOpts,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    DnsUdpSocket, RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use tokio::io::Interest;

use crate::config::{Alias, Family, ResolverConfig};
use crate::lock;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hosts,
    Dns,
    /// The last good DNS answer, used because DNS failed.
    Stale,
    /// The alias is an IP address: nothing to resolve.
    Literal,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hosts => "hosts",
            Source::Dns => "dns",
            Source::Stale => "stale",
            Source::Literal => "literal",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub source: Source,
    /// In the order to try them: file order, or A then AAAA as the server
    /// gave them.
    pub addrs: Vec<IpAddr>,
    /// When this answer was obtained (for a stale answer: when DNS gave it).
    pub at: SystemTime,
}

impl Answer {
    pub fn socket_addrs(&self, port: u16) -> Vec<SocketAddr> {
        self.addrs
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect()
    }
}

/// Why an alias did not resolve. NXDOMAIN and an empty answer are answers:
/// they are never replaced by a stale one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("{alias} does not exist (nxdomain)")]
    NxDomain { alias: String },
    #[error("{alias} has no {family} address records")]
    NoRecords { alias: String, family: &'static str },
    #[error("resolving {alias} timed out after {after:?}")]
    Timeout { alias: String, after: Duration },
    #[error("dns server failure resolving {alias} (servfail)")]
    ServFail { alias: String },
    /// A server refused (its port closed: ICMP says so at once) or could
    /// not be reached (no route), and none answered; `servers` are those
    /// that refused or were not reached (hickory does not say which of the
    /// two).
    #[error("resolving {alias}: dns server refused or unreachable: {servers}")]
    Unreachable { alias: String, servers: String },
    #[error("resolving {alias} failed: {source}")]
    Other {
        alias: String,
        #[source]
        source: NetError,
    },
}

/// The `kind` label of `resolve_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveErrorKind {
    NxDomain,
    NoRecords,
    Timeout,
    ServFail,
    Other,
}

impl ResolveErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolveErrorKind::NxDomain => "nxdomain",
            ResolveErrorKind::NoRecords => "no_records",
            ResolveErrorKind::Timeout => "timeout",
            ResolveErrorKind::ServFail => "servfail",
            ResolveErrorKind::Other => "other",
        }
    }

    /// DNS could not be asked or did not answer: a stale answer may stand in.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            ResolveErrorKind::NxDomain | ResolveErrorKind::NoRecords
        )
    }
}

impl ResolveError {
    pub fn kind(&self) -> ResolveErrorKind {
        match self {
            ResolveError::NxDomain { .. } => ResolveErrorKind::NxDomain,
            ResolveError::NoRecords { .. } => ResolveErrorKind::NoRecords,
            ResolveError::Timeout { .. } => ResolveErrorKind::Timeout,
            ResolveError::ServFail { .. } => ResolveErrorKind::ServFail,
            ResolveError::Unreachable { .. } | ResolveError::Other { .. } => {
                ResolveErrorKind::Other
            }
        }
    }
}

/// A resolution outcome with what `resolve_*` metrics and logs need.
#[derive(Debug)]
pub struct Resolution {
    pub result: Result<Answer, ResolveError>,
    /// What was asked: the hosts file, DNS, or nothing (a literal).
    pub via: Source,
    /// The DNS (or hosts) failure that a stale answer stands in for.
    pub stale_because: Option<ResolveError>,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read {}, the dns configuration used while resolver.nameservers is empty", path.display())]
    ReadSystemConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot use {}, the dns configuration used while resolver.nameservers is empty", path.display())]
    SystemConf {
        path: PathBuf,
        #[source]
        source: NetError,
    },
    #[error("cannot build the dns resolver")]
    Build(#[source] NetError),
}

impl BuildError {
    fn read(path: &Path, source: io::Error) -> BuildError {
        BuildError::ReadSystemConf {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub struct Resolver {
    hosts: Option<HostsFile>,
    dns: Nameservers,
    family: Family,
    timeout: Duration,
    stale_limit: Option<Duration>,
    stale: Mutex<HashMap<String, LastGood>>,
    /// DNS queries in flight, by name, for connections that arrive together
    /// to share (see `query_shared`).
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// A family's query was given up after the other's answer: said once
    /// at WARN, since a server that drops AAAA queries drops every one.
    family_dropped_logged: AtomicBool,
}

type DnsResult = Result<Vec<IpAddr>, ResolveError>;

/// One DNS query that several resolutions wait for. The sender stays with
/// the resolution that asks: if its connection is dropped mid-query, the
/// others see the channel close and ask themselves.
struct Flight {
    /// When the query was started: only a resolution asked for at or before
    /// this instant may use its answer.
    started: Instant,
    result: tokio::sync::watch::Receiver<Option<DnsResult>>,
}

/// The last good DNS answer of one alias.
struct LastGood {
    addrs: Vec<IpAddr>,
    /// Monotonic, for the age limit.
    when: Instant,
    /// Wall clock, for `/status` and logs.
    at: SystemTime,
    /// Why the last query for the alias failed, until one answers again.
    failing: Option<ResolveError>,
    /// A query is out in the background while DNS fails.
    asking: bool,
}

impl LastGood {
    /// This answer as a stale one, if it is at most `limit` old.
    fn answer(&self, limit: Duration) -> Option<Answer> {
        (self.when.elapsed() <= limit).then(|| Answer {
            source: Source::Stale,
            addrs: self.addrs.clone(),
            at: self.at,
        })
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("hosts", &self.hosts.as_ref().map(|h| &h.path))
            .field("family", &self.family)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver once; every lookup then goes to the network (or
    /// the hosts file), since the DNS cache is off.
    pub fn new(cfg: &ResolverConfig) -> Result<Resolver, BuildError> {
        Resolver::with_system_conf(cfg, Path::new(RESOLV_CONF), 53)
    }

    /// As `new`, with the system's DNS configuration read from `path` and
    /// its nameservers asked on `port`: tests can neither edit the host's
    /// resolv.conf nor serve on port 53.
    pub fn with_system_conf(
        cfg: &ResolverConfig,
        path: &Path,
        port: u16,
    ) -> Result<Resolver, BuildError> {
        let dns = if cfg.nameservers.is_empty() {
            Nameservers::System(Box::new(SystemConf::read(path, port, cfg.timeout)?))
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|a| on_port(NameServerConfig::udp_and_tcp(a.ip()), a.port()))
                .collect();
            let listed = DnsConfig::from_parts(None, Vec::new(), servers);
            Nameservers::Listed(build(&listed, ResolverOpts::default(), cfg.timeout)?)
        };
        Ok(Resolver {
            hosts: cfg.hosts_file.as_deref().map(HostsFile::new),
            dns,
            family: cfg.family,
            timeout: cfg.timeout,
            stale_limit: cfg.stale_on_error,
            stale: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            family_dropped_logged: AtomicBool::new(false),
        })
    }

    /// Takes over `old`'s last good answers (those this resolver's family
    /// admits), with their age and whether DNS was failing for them: a
    /// resolver built by a reload serves them as the old one would have.
    pub fn keep_last_good_of(&self, old: &Resolver) {
        let old = lock(&old.stale);
        let mut stale = lock(&self.stale);
        for (name, last) in old.iter() {
            let addrs: Vec<IpAddr> = last
                .addrs
                .iter()
                .copied()
                .filter(|ip| self.family.admits(*ip))
                .collect();
            if addrs.is_empty() {
                continue;
            }
            stale.insert(
                name.clone(),
                LastGood {
                    addrs,
                    when: last.when,
                    at: last.at,
                    failing: last.failing.clone(),
                    // The old resolver's query in the background answers
                    // the old one: this one asks for itself.
                    asking: false,
                },
            );
        }
    }

    /// Resolves `alias` now: hosts file, then DNS, then (on a DNS failure
    /// only) the last good answer if it is recent enough.
    pub async fn resolve(self: &Arc<Self>, alias: &Alias) -> Resolution {
        self.resolve_for(alias, Instant::now()).await
    }

    /// [`Resolver::resolve`] for a connection that arrived at `arrived`: it
    /// may share a DNS query started since then (by another connection that
    /// arrived with it), never one started before, so every answer it gets
    /// was asked for after it arrived; but for the last good answer while
    /// DNS fails, which is given at once (see `stale_while_failing`).
    pub async fn resolve_for(self: &Arc<Self>, alias: &Alias, arrived: Instant) -> Resolution {
        let started = Instant::now();
        let name = match alias {
            Alias::Ip(ip) => {
                let addrs = if self.family.admits(*ip) {
                    vec![*ip]
                } else {
                    Vec::new()
                };
                let result = if addrs.is_empty() {
                    Err(ResolveError::NoRecords {
                        alias: ip.to_string(),
                        family: family_name(self.family),
                    })
                } else {
                    Ok(Answer {
                        source: Source::Literal,
                        addrs,
                        at: SystemTime::now(),
                    })
                };
                return Resolution {
                    result,
                    via: Source::Literal,
                    stale_because: None,
                    elapsed: started.elapsed(),
                };
            }
            Alias::Host(h) => h.as_str(),
        };

        // Hosts-file names have no trailing dot; DNS is given the alias as
        // written.
        if let Some(hosts) = &self.hosts
            && let Some(ips) = hosts.lookup(name.strip_suffix('.').unwrap_or(name))
        {
            let addrs: Vec<IpAddr> = ips
                .into_iter()
                .filter(|ip| self.family.admits(*ip))
                .collect();
            let result = if addrs.is_empty() {
                Err(ResolveError::NoRecords {
                    alias: name.into(),
                    family: family_name(self.family),
                })
            } else {
                Ok(Answer {
                    source: Source::Hosts,
                    addrs,
                    at: SystemTime::now(),
                })
            };
            return Resolution {
                result,
                via: Source::Hosts,
                stale_because: None,
                elapsed: started.elapsed(),
            };
        }

        if let Some((answer, why)) = self.stale_while_failing(name) {
            return Resolution {
                result: Ok(answer),
                via: Source::Dns,
                stale_because: Some(why),
                elapsed: started.elapsed(),
            };
        }
        let result = self.query_shared(name, arrived).await;
        let elapsed = started.elapsed();
        let at = SystemTime::now();
        self.settle(name, &result, at);
        match result {
            Ok(addrs) => Resolution {
                result: Ok(Answer {
                    source: Source::Dns,
                    addrs,
                    at,
                }),
                via: Source::Dns,
                stale_because: None,
                elapsed,
            },
            // After NXDOMAIN or no records there is no last good answer any
            // more: `settle` has dropped it.
            Err(e) => match self.stale_answer(name) {
                Some(answer) => Resolution {
                    result: Ok(answer),
                    via: Source::Dns,
                    stale_because: Some(e),
                    elapsed,
                },
                None => Resolution {
                    result: Err(e),
                    via: Source::Dns,
                    stale_because: None,
                    elapsed,
                },
            },
        }
    }

    /// Keeps what the result of a query for `name` tells the connections
    /// after it, when stale answers are on: a good answer, for a DNS
    /// failure to come; that DNS fails; or that the alias is gone (NXDOMAIN
    /// or no records: changed on purpose, so the old answer must not be
    /// used any more).
    fn settle(&self, name: &str, result: &DnsResult, at: SystemTime) {
        if self.stale_limit.is_none() {
            return;
        }
        let mut stale = lock(&self.stale);
        match result {
            Ok(addrs) => {
                let entry = LastGood {
                    addrs: addrs.clone(),
                    when: Instant::now(),
                    at,
                    failing: None,
                    asking: false,
                };
                match stale.get_mut(name) {
                    Some(old) => *old = entry,
                    None => {
                        stale.insert(name.into(), entry);
                    }
                }
            }
            Err(e) if e.kind().is_failure() => {
                if let Some(last) = stale.get_mut(name) {
                    last.failing = Some(e.clone());
                    last.asking = false;
                }
            }
            Err(_) => {
                stale.remove(name);
            }
        }
    }

    fn stale_answer(&self, name: &str) -> Option<Answer> {
        let limit = self.stale_limit?;
        lock(&self.stale).get(name)?.answer(limit)
    }

    /// While DNS fails for `name`, the last good answer (if young enough)
    /// at once, and why it is used; one query at a time goes on asking in
    /// the background, and the first that answers ends this. Otherwise
    /// every connection of an outage would wait for a query of its own
    /// (`resolver.timeout` when the server is silent), and for the one in
    /// flight before it.
    fn stale_while_failing(self: &Arc<Self>, name: &str) -> Option<(Answer, ResolveError)> {
        let limit = self.stale_limit?;
        let (answer, why, ask) = {
            let mut stale = lock(&self.stale);
            let last = stale.get_mut(name)?;
            let why = last.failing.clone()?;
            let answer = last.answer(limit)?;
            (answer, why, !std::mem::replace(&mut last.asking, true))
        };
        if ask {
            let (this, name) = (Arc::clone(self), name.to_string());
            tokio::spawn(async move {
                let result = this.query_shared(&name, Instant::now()).await;
                this.settle(&name, &result, SystemTime::now());
            });
        }
        Some((answer, why))
    }

    /// The DNS answer for `name`, from a query started at or after
    /// `arrived`, within `timeout`.
    ///
    /// At most one query per name is in flight. A resolution that arrives
    /// while one is joins it if the query started after it arrived (other
    /// connections accepted in the same batch), and otherwise waits for it
    /// to end and then asks anew, so no answer predates the connection.
    /// The wait matters: hickory shares an identical query in flight with
    /// any later asker, which would hand out an answer asked for before the
    /// connection came. Under load this turns one query per connection into
    /// one per round trip to the DNS server.
    async fn query_shared(&self, name: &str, arrived: Instant) -> DnsResult {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = || ResolveError::Timeout {
            alias: name.into(),
            after: self.timeout,
        };
        let (tx, flight) = loop {
            let flight = {
                let mut flights = lock(&self.flights);
                match flights.get(name) {
                    Some(f) => f.clone(),
                    None => {
                        // Looked up and taken under one lock: two askers
                        // cannot both start a query.
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        let flight = Arc::new(Flight {
                            started: Instant::now(),
                            result: rx,
                        });
                        flights.insert(name.to_string(), flight.clone());
                        break (tx, flight);
                    }
                }
            };
            let mut rx = flight.result.clone();
            match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(r)) if flight.started >= arrived => {
                    if let Some(r) = r.as_ref() {
                        return r.clone();
                    }
                }
                Ok(Ok(_)) => {}
                // Its resolution was dropped mid-query (its connection
                // went away): clear it, then look again.
                Ok(Err(_)) => self.forget_flight(name, &flight),
            }
        };
        // Boxed: the query's state is over a kilobyte. Unboxed, it would be
        // part of every connection's task for the connection's whole life,
        // and of every connection waiting on this query meanwhile. It ends
        // each of its queries by the deadline itself: a timeout around it
        // would race theirs and could throw away the answer one of them has
        // when the other times out.
        let result = Box::pin(self.query_dns(name, deadline)).await;
        // Out of the map before the answer is out: whoever the answer
        // wakes and cannot use then finds no query in flight and asks.
        self.forget_flight(name, &flight);
        tx.send_replace(Some(result.clone()));
        result
    }

    /// Says once, at WARN, that one type's query went unanswered and the
    /// connection went on with the other's addresses: a server that drops
    /// AAAA (or A) queries drops every one, and `family` spares the wait.
    fn family_given_up(&self, name: &str, dropped: Dropped) {
        let (rtype, waited, family) = match dropped {
            Dropped::Aaaa => (
                "AAAA",
                format!("{} ms after the A answer", RESOLUTION_DELAY.as_millis()),
                "ipv4",
            ),
            Dropped::A => ("A", "within resolver.timeout".to_string(), "ipv6"),
        };
        if self.family_dropped_logged.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                alias = name,
                rtype,
                "DNS query unanswered: went on without it"
            );
        } else {
            tracing::warn!(
                alias = name,
                rtype,
                "DNS query unanswered {waited}: the connection went on without it (logged once; if the DNS servers drop {rtype} queries, set resolver.family = \"{family}\" to spare each connection the wait)"
            );
        }
    }

    /// Removes `flight` from the map, unless a newer one has taken its place.
    fn forget_flight(&self, name: &str, flight: &Arc<Flight>) {
        let mut flights = lock(&self.flights);
        if flights.get(name).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(name);
        }
    }

    /// The A and AAAA answers for `name`, each query ending by `deadline`
    /// at the latest (a timeout of one leaves the other's answer usable).
    async fn query_dns(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        let (servers, family) = match &self.dns {
            Nameservers::Listed(s) => (s.clone(), self.family),
            Nameservers::System(conf) => {
                let (servers, no_aaaa) = conf.current(name);
                // glibc's `options no-aaaa` (2.36): no AAAA query, as for
                // every other program on the host.
                match self.family {
                    Family::Any if no_aaaa => (servers, Family::Ipv4),
                    f => (servers, f),
                }
            }
        };
        let unreached = Mutex::new(Vec::new());
        let ask = |rtype| {
            let (servers, unreached) = (&servers, &unreached);
            async move {
                tokio::time::timeout_at(deadline, lookup(servers, name, rtype, unreached))
                    .await
                    .unwrap_or(Err(NetError::Timeout))
            }
        };
        let (a, aaaa) = match family {
            Family::Ipv4 => (Some(ask(RecordType::A).await), None),
            Family::Ipv6 => (None, Some(ask(RecordType::AAAA).await)),
            Family::Any => {
                let (a, aaaa) = either_family(ask(RecordType::A), ask(RecordType::AAAA)).await;
                match &aaaa {
                    None => self.family_given_up(name, Dropped::Aaaa),
                    Some(r6) if has_addresses(r6) && matches!(a, Err(NetError::Timeout)) => {
                        self.family_given_up(name, Dropped::A)
                    }
                    Some(_) => {}
                }
                (Some(a), aaaa)
            }
        };
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        for r in [a, aaaa].into_iter().flatten() {
            match r {
                Ok(lookup) => addrs.extend(addresses(&lookup)),
                Err(e) => errors.push(e),
            }
        }
        if !addrs.is_empty() {
            return Ok(addrs);
        }
        // Nothing usable: an NXDOMAIN on either query settles it; a failure
        // of either (timeout, servfail) beats "no records" from the other,
        // since the failed one might have had the records.
        let alias = || name.to_string();
        if errors.iter().any(|e| e.is_nx_domain()) {
            return Err(ResolveError::NxDomain { alias: alias() });
        }
        match errors.into_iter().find(|e| !e.is_no_records_found()) {
            None => Err(ResolveError::NoRecords {
                alias: alias(),
                family: family_name(self.family),
            }),
            Some(NetError::Timeout) => Err(ResolveError::Timeout {
                alias: alias(),
                after: self.timeout,
            }),
            Some(NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))) => {
                Err(ResolveError::ServFail { alias: alias() })
            }
            Some(e) if unreached_server(&e) => Err(ResolveError::Unreachable {
                alias: alias(),
                servers: lock(&unreached)
                    .iter()
                    .map(SocketAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Some(source) => Err(ResolveError::Other {
                alias: alias(),
                source,
            }),
        }
    }
}

/// How long the AAAA query may still take once the A query has brought
/// addresses: RFC 8305's Resolution Delay, for the family that comes second.
/// Some DNS servers and firewalls drop AAAA queries; waiting for the dropped
/// one would hold every connection for the whole timeout.
const RESOLUTION_DELAY: Duration = Duration::from_millis(50);

/// Which query of a `family = "any"` resolution went unanswered while the
/// other's addresses served.
#[derive(Debug, Clone, Copy)]
enum Dropped {
    A,
    Aaaa,
}

/// The A and AAAA queries at once, as the system resolver asks them. A is
/// waited for, since IPv4 addresses come first in the order connections
/// try them: an AAAA answer that comes first (its record cached, the A
/// record not) must not make the connection skip the IPv4 servers. Once A
/// has brought addresses, AAAA gets `RESOLUTION_DELAY` more, and is `None`
/// if it has not answered by then.
async fn either_family<F>(a: F, aaaa: F) -> (F::Output, Option<F::Output>)
where
    F: Future<Output = Result<Lookup, NetError>>,
{
    let (mut a, mut aaaa) = (std::pin::pin!(a), std::pin::pin!(aaaa));
    tokio::select! {
        r4 = &mut a => {
            let r6 = if has_addresses(&r4) {
                tokio::time::timeout(RESOLUTION_DELAY, aaaa).await.ok()
            } else {
                Some(aaaa.await)
            };
            (r4, r6)
        }
        r6 = &mut aaaa => (a.await, Some(r6)),
    }
}

fn has_addresses(r: &Result<Lookup, NetError>) -> bool {
    r.as_ref().is_ok_and(|l| addresses(l).next().is_some())
}

/// The A and AAAA records of an answer (a CNAME chain's other records are
/// left out).
fn addresses(lookup: &Lookup) -> impl Iterator<Item = IpAddr> + '_ {
    lookup.answers().iter().filter_map(|rec| match &rec.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    })
}

/// Asks every nameserver at once. The first answer decides: records,
/// NXDOMAIN or no records. A failure (no reply, SERVFAIL, REFUSED) decides
/// only once every server has failed, as the system resolver moves on to
/// the next server after one.
///
/// Servers that refused or could not be reached are added to `unreached`,
/// for the error: hickory's error does not say which server it was.
async fn lookup(
    servers: &[DnsResolver],
    name: &str,
    rtype: RecordType,
    unreached: &Mutex<Vec<SocketAddr>>,
) -> Result<Lookup, NetError> {
    if let [one] = servers {
        return ask_one(one, name, rtype, unreached).await;
    }
    let mut asks: FuturesUnordered<_> = servers
        .iter()
        .map(|r| ask_one(r, name, rtype, unreached))
        .collect();
    let mut failure = None;
    while let Some(r) = asks.next().await {
        match r {
            // The first failure to come in is the one reported.
            Err(e) if !e.is_no_records_found() => {
                failure.get_or_insert(e);
            }
            answer => return answer,
        }
    }
    Err(failure.unwrap_or(NetError::NoConnections))
}

/// One server's answer, noting the server in `unreached` when it refused
/// or could not be reached.
async fn ask_one(
    server: &DnsResolver,
    name: &str,
    rtype: RecordType,
    unreached: &Mutex<Vec<SocketAddr>>,
) -> Result<Lookup, NetError> {
    let r = server.resolver.lookup(name, rtype).await;
    if let Err(e) = &r
        && unreached_server(e)
    {
        let mut u = lock(unreached);
        if !u.contains(&server.at) {
            u.push(server.at);
        }
    }
    r
}

/// Whether hickory's error means a server refused (its port closed) or
/// could not be reached: the servers that did so are named in
/// [`ResolveError::Unreachable`], which these errors become.
fn unreached_server(e: &NetError) -> bool {
    matches!(e, NetError::NoConnections | NetError::Io(_))
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `ns` asked on `port`, over UDP and TCP alike.
fn on_port(mut ns: NameServerConfig, port: u16) -> NameServerConfig {
    for c in &mut ns.connections {
        c.port = port;
    }
    ns
}

/// The DNS servers a resolver asks.
enum Nameservers {
    /// `resolver.nameservers`: fixed for the resolver's life.
    Listed(Arc<[DnsResolver]>),
    /// Those of resolv.conf, followed when the file changes.
    System(Box<SystemConf>),
}

/// One DNS server: a hickory resolver on [`ConnectedUdp`] that asks it
/// alone, and its address, for errors.
struct DnsResolver {
    at: SocketAddr,
    resolver: hickory_resolver::Resolver<ConnectedUdp>,
}

/// Tokio's provider, with each UDP query's socket connected to its server.
/// On an unconnected socket (hickory's default) the ICMP "port
/// unreachable" of a server whose port is closed (a local dnsmasq or
/// systemd-resolved stopped, a wrong port in `nameservers`) is never seen:
/// every connection waited the whole `resolver.timeout` for it, then got
/// "timed out". glibc connects its socket, and so fails at once with
/// "connection refused"; so does this. hickory makes a socket per query and
/// sends only to that server, so the connection changes nothing else.
#[derive(Clone, Default)]
struct ConnectedUdp(TokioRuntimeProvider);

impl RuntimeProvider for ConnectedUdp {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = ConnectedSocket;
    type Tcp = AsyncIoTokioAsStd<tokio::net::TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.0.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        self.0.connect_tcp(server_addr, bind_addr, timeout)
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        Box::pin(async move {
            let socket = tokio::net::UdpSocket::bind(local_addr).await?;
            socket.connect(server_addr).await?;
            Ok(ConnectedSocket {
                socket: Arc::new(socket),
                waiting: Mutex::new(None),
            })
        })
    }
}

type Readiness = Pin<Box<dyn Future<Output = io::Result<tokio::io::Ready>> + Send>>;

/// A connected UDP socket whose receive also wakes for a socket error.
/// The kernel reports an ICMP error on a UDP socket as EPOLLERR alone,
/// which tokio's receive, waiting for readability, never wakes for.
struct ConnectedSocket {
    socket: Arc<tokio::net::UdpSocket>,
    /// The wait for an answer or an error, kept across polls.
    waiting: Mutex<Option<Readiness>>,
}

impl DnsUdpSocket for ConnectedSocket {
    type Time = TokioTime;

    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut waiting = lock(&self.waiting);
        loop {
            match self.socket.try_recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    *waiting = None;
                    return Poll::Ready(done);
                }
            }
            let ready = waiting.get_or_insert_with(|| {
                let socket = self.socket.clone();
                Box::pin(async move { socket.ready(Interest::READABLE | Interest::ERROR).await })
            });
            let ready = match ready.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r,
            };
            *waiting = None;
            if ready?.is_error() {
                // tokio's receive tries the socket only once it is
                // readable, so the error is taken here.
                if let Some(e) = self.socket.take_error()? {
                    return Poll::Ready(Err(e));
                }
                // None left to report: clear the readiness, or the wait
                // would end at once again.
                let _ = self.socket.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        self.socket.poll_send_to(cx, buf, target)
    }
}

/// One hickory resolver per nameserver, in the given order, with no cache.
///
/// One per nameserver because hickory's pool of several gives up on the
/// first SERVFAIL or REFUSED, and asks at most two servers within the
/// timeout, so a third is never asked when the first two are silent.
/// `lookup` asks them all itself.
fn build(
    dns_cfg: &DnsConfig,
    mut opts: ResolverOpts,
    timeout: Duration,
) -> Result<Arc<[DnsResolver]>, BuildError> {
    // No cache at all: a changed record must be seen by the next
    // connection whatever its TTL (SPEC: Resolution 1).
    opts.cache_size = 0;
    // We read the hosts file ourselves: hickory reads it once at build
    // time and mixes its per-type answers with DNS.
    opts.use_hosts_file = ResolveHosts::Never;
    // Our own timeout bounds the whole resolution; one try per server
    // within it.
    opts.timeout = timeout;
    opts.attempts = 0;
    dns_cfg
        .name_servers()
        .iter()
        .map(|ns| {
            let one = DnsConfig::from_parts(
                dns_cfg.domain().cloned(),
                dns_cfg.search().to_vec(),
                vec![ns.clone()],
            );
            let port = ns.connections.first().map_or(53, |c| c.port);
            let mut builder =
                hickory_resolver::Resolver::builder_with_config(one, ConnectedUdp::default());
            *builder.options_mut() = opts.clone();
            Ok(DnsResolver {
                at: SocketAddr::new(ns.ip, port),
                resolver: builder.build().map_err(BuildError::Build)?,
            })
        })
        .collect()
}

/// resolv.conf, re-read when it changes, as the system resolver does
/// (glibc since 2.26). Otherwise a host whose DNS servers change (DHCP, a
/// VPN coming up) would keep asking the old ones until a restart: a SIGHUP
/// would not do, since the proxy's configuration itself is unchanged.
struct SystemConf {
    path: PathBuf,
    /// `LOCALDOMAIN` and `RES_OPTIONS` as resolv.conf lines (`env_lines`).
    env: Vec<u8>,
    port: u16,
    timeout: Duration,
    state: Mutex<SystemState>,
}

struct SystemState {
    /// `None` after a failed look, so the next query looks again.
    stamp: Option<FileStamp>,
    /// The text the servers were built from: a rewrite with the same text
    /// keeps them.
    text: Vec<u8>,
    /// What that text gave.
    conf: Parsed,
    /// Names said to go through the search domains first, each said once.
    searched_logged: Vec<String>,
    /// The last problem logged, so that it is logged once, not per query.
    last_error: Option<String>,
}

impl SystemState {
    /// Says once per name when a name with a dot, not written complete,
    /// has fewer dots than `ndots`: the resolver then asks for it under
    /// each search domain before asking for it as it is, as glibc does. In
    /// a Kubernetes pod (`ndots:5`, three search domains) that is 8
    /// queries a connection instead of 2, for a name such as
    /// `cluster.example.com` that was meant whole.
    fn note_searched(&mut self, name: &str) {
        let dots = name.matches('.').count();
        let Parsed {
            ndots, searches, ..
        } = self.conf;
        if name.ends_with('.')
            || dots == 0
            || dots >= ndots
            || searches == 0
            || self.searched_logged.iter().any(|n| n == name)
        {
            return;
        }
        self.searched_logged.push(name.to_string());
        tracing::info!(
            alias = name,
            ndots,
            search_domains = searches,
            "the alias has fewer dots than resolv.conf's ndots: each resolution asks for it \
             under every search domain first; if the name is complete, write it with a \
             trailing dot"
        );
    }
}

/// glibc's environment overrides of resolv.conf, as lines that follow the
/// file's: `LOCALDOMAIN` replaces its search list, `RES_OPTIONS` adds to
/// its options (a later option wins). glibc reads them once, at start.
fn env_lines(localdomain: Option<&str>, res_options: Option<&str>) -> Vec<u8> {
    let mut lines = String::new();
    if let Some(d) = localdomain.map(str::trim).filter(|d| !d.is_empty()) {
        lines.push_str(&format!("\nsearch {d}\n"));
    }
    if let Some(o) = res_options.map(str::trim).filter(|o| !o.is_empty()) {
        lines.push_str(&format!("\noptions {o}\n"));
    }
    lines.into_bytes()
}

impl SystemConf {
    /// resolv.conf at `path`, with the process's `LOCALDOMAIN` and
    /// `RES_OPTIONS` over it.
    fn read(path: &Path, port: u16, timeout: Duration) -> Result<SystemConf, BuildError> {
        let var = |name| std::env::var(name).ok();
        let (localdomain, res_options) = (var("LOCALDOMAIN"), var("RES_OPTIONS"));
        let env = env_lines(localdomain.as_deref(), res_options.as_deref());
        if !env.is_empty() {
            tracing::info!(
                localdomain = localdomain.as_deref().unwrap_or(""),
                res_options = res_options.as_deref().unwrap_or(""),
                "resolv.conf is read with the environment's LOCALDOMAIN and RES_OPTIONS over it, as glibc reads it"
            );
        }
        SystemConf::read_with(path, port, timeout, env)
    }

    fn read_with(
        path: &Path,
        port: u16,
        timeout: Duration,
        env: Vec<u8>,
    ) -> Result<SystemConf, BuildError> {
        let stamp = FileStamp::of(path).map_err(|e| BuildError::read(path, e))?;
        let text = std::fs::read(path).map_err(|e| BuildError::read(path, e))?;
        let conf = SystemConf::parse(path, &text, &env, port, timeout)?;
        Ok(SystemConf {
            path: path.to_path_buf(),
            env,
            port,
            timeout,
            state: Mutex::new(SystemState {
                stamp: Some(stamp),
                text,
                conf,
                searched_logged: Vec::new(),
                last_error: None,
            }),
        })
    }

    /// The file's `text`, with `env` (`env_lines`) after it.
    fn parse(
        path: &Path,
        text: &[u8],
        env: &[u8],
        port: u16,
        timeout: Duration,
    ) -> Result<Parsed, BuildError> {
        let text = &[text, env].concat();
        let (mut dns_cfg, opts) =
            hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|source| {
                BuildError::SystemConf {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let options = Options::of(text);
        let (ndots, searches) = (opts.ndots, dns_cfg.search().len());
        // hickory refuses a file that names no server: no check here.
        let ips = dns_cfg.name_servers().iter().map(|ns| ns.ip).collect();
        let servers = dns_cfg
            .name_servers()
            .iter()
            .cloned()
            .map(|mut ns| {
                // `options use-vc`: TCP only, as glibc then asks (hickory
                // reads the option but would ask over UDP first). For a
                // network that drops DNS over UDP.
                if options.use_vc {
                    ns.connections
                        .retain(|c| matches!(c.protocol, ProtocolConfig::Tcp));
                }
                on_port(ns, port)
            })
            .collect();
        dns_cfg = DnsConfig::from_parts(
            dns_cfg.domain().cloned(),
            dns_cfg.search().to_vec(),
            servers,
        );
        Ok(Parsed {
            servers: build(&dns_cfg, opts, timeout)?,
            ips,
            options,
            ndots,
            searches,
        })
    }

    /// The servers to ask now: those of the file as it is, or, when it
    /// cannot be read or names no server, the last ones it named.
    ///
    /// The stat, and the read after a change, are blocking calls on a
    /// small local file, made once per DNS query (not per connection: the
    /// hosts file may answer first, and connections share queries).
    fn current(&self, name: &str) -> (Arc<[DnsResolver]>, bool) {
        let mut st = lock(&self.state);
        match self.refresh(&mut st) {
            Ok(()) => st.last_error = None,
            Err(e) => {
                let problem = crate::error_chain(&e);
                if st.last_error.as_ref() != Some(&problem) {
                    tracing::warn!(error = %problem, "keeping the nameservers resolv.conf named before");
                    st.last_error = Some(problem);
                }
                st.stamp = None;
            }
        }
        st.note_searched(name);
        (st.conf.servers.clone(), st.conf.options.no_aaaa)
    }

    fn refresh(&self, st: &mut SystemState) -> Result<(), BuildError> {
        let read = |e| BuildError::read(&self.path, e);
        let stamp = FileStamp::of(&self.path).map_err(read)?;
        if stamp.proves_unchanged_since(st.stamp, SystemTime::now()) {
            return Ok(());
        }
        // Stamped before the read: a write during it changes the stamp
        // again, and the next query reads the file anew.
        let text = std::fs::read(&self.path).map_err(read)?;
        if text != st.text {
            let conf = SystemConf::parse(&self.path, &text, &self.env, self.port, self.timeout)?;
            let Parsed { ips, options, .. } = &conf;
            tracing::info!(path = %self.path.display(), nameservers = ?ips, use_vc = options.use_vc, no_aaaa = options.no_aaaa, "resolv.conf changed; asking the nameservers it names now");
            st.conf = conf;
            st.text = text;
        }
        st.stamp = Some(stamp);
        Ok(())
    }
}

/// What one reading of resolv.conf gives: the servers built, their
/// addresses (for the log), and the options the queries follow
/// (`ndots`, and how many search domains the file names, for the log).
struct Parsed {
    servers: Arc<[DnsResolver]>,
    ips: Vec<IpAddr>,
    options: Options,
    ndots: usize,
    searches: usize,
}

/// The options of resolv.conf that change where or how the proxy asks,
/// which hickory does not apply itself (it applies `ndots` and `edns0`;
/// `timeout` and `attempts` give way to `resolver.timeout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Options {
    use_vc: bool,
    no_aaaa: bool,
}

impl Options {
    /// From the `options` lines, as glibc reads them: a later line adds to
    /// an earlier one.
    fn of(text: &[u8]) -> Options {
        let mut o = Options::default();
        for line in String::from_utf8_lossy(text).lines() {
            let mut words = line.split_ascii_whitespace();
            if words.next() != Some("options") {
                continue;
            }
            for w in words {
                match w {
                    "use-vc" => o.use_vc = true,
                    "no-aaaa" => o.no_aaaa = true,
                    _ => {}
                }
            }
        }
        o
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Any => "ipv4 or ipv6",
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

/// The configured hosts file, re-parsed only when its metadata changes.
struct HostsFile {
    path: PathBuf,
    cache: Mutex<HostsCache>,
}

#[derive(Default)]
struct HostsCache {
    stamp: Option<FileStamp>,
    /// Every name looked up (lowercase, no trailing dot): the file's lines
    /// for other names are not kept, so that a hosts file of a blocking
    /// list's hundreds of thousands of lines costs a scan when it changes,
    /// not tens of MiB. A name looked up for the first time has the file
    /// read again.
    wanted: Vec<String>,
    /// A name was added to `wanted` since the file was last read.
    new_name: bool,
    table: Arc<HostsTable>,
    /// The last read error logged, so a missing file is reported once, not
    /// once per connection.
    last_error: Option<io::ErrorKind>,
    /// The last look found the file changing during every read, and said
    /// so: said once until a read settles.
    unsettled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long after its last change a file with sub-second timestamps is
/// still read again on every lookup. Such timestamps move in steps of the
/// kernel's clock tick (10 ms at the coarsest HZ), so a second write of the
/// same length within one tick can leave the stamp unchanged; this covers
/// several ticks.
const RACY_FINE: Duration = Duration::from_millis(50);
/// The same for a filesystem with whole-second timestamps (FAT's are two
/// seconds apart), recognised by their zero nanoseconds.
const RACY_COARSE: Duration = Duration::from_secs(3);
/// How long a file found empty just after a change is taken for one being
/// rewritten in place, and the previous table kept: the time a writer may
/// take between truncating and writing.
const EMPTY_REWRITE: Duration = Duration::from_secs(2);

impl FileStamp {
    /// Whether this stamp, taken now, proves the file unchanged since it
    /// was read with the `cached` stamp: the same, and old enough to trust.
    fn proves_unchanged_since(&self, cached: Option<FileStamp>, now: SystemTime) -> bool {
        cached == Some(*self) && !self.is_recent_at(now)
    }

    /// Whether the file changed too recently for its stamp to prove that it
    /// has not changed since (git's "racy" rule for its index). Such a file
    /// is read again; only a stamp older than the timestamp granularity is
    /// trusted.
    fn is_recent_at(&self, now: SystemTime) -> bool {
        let window = if self.mtime.1 == 0 && self.ctime.1 == 0 {
            RACY_COARSE
        } else {
            RACY_FINE
        };
        self.changed_within(now, window)
    }

    /// Whether the last change (mtime or ctime) is at most `window` before
    /// `now`. A change time in the future (the clock was set back) counts
    /// as recent: it proves nothing either.
    fn changed_within(&self, now: SystemTime, window: Duration) -> bool {
        let latest = self.mtime.max(self.ctime);
        let Ok(secs) = u64::try_from(latest.0) else {
            return false;
        };
        let nanos = u32::try_from(latest.1).unwrap_or(0);
        let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        now.duration_since(changed).is_ok_and(|age| age <= window) || changed > now
    }

    /// Whether the file was not written between the two stamps. Its ctime
    /// alone may differ: a file renamed over or unlinked while it was read
    /// has its ctime moved, and its content is whole.
    fn same_content_as(&self, other: &FileStamp) -> bool {
        (self.dev, self.ino, self.len, self.mtime) == (other.dev, other.ino, other.len, other.mtime)
    }

    fn of(path: &Path) -> io::Result<FileStamp> {
        Ok(FileStamp::from(&std::fs::metadata(path)?))
    }

    fn of_file(file: &File) -> io::Result<FileStamp> {
        Ok(FileStamp::from(&file.metadata()?))
    }
}

impl From<&std::fs::Metadata> for FileStamp {
    fn from(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl HostsFile {
    fn new(path: &Path) -> HostsFile {
        HostsFile {
            path: path.to_path_buf(),
            cache: Mutex::new(HostsCache::default()),
        }
    }

    /// The addresses of `name` in file order, or `None` when the file has
    /// no line for it (or cannot be read: DNS is then asked, as the system
    /// resolver would).
    ///
    /// The stat and the rare re-read are blocking calls on a local file;
    /// handing them to a blocking thread would cost more than they do on
    /// every connection. A re-read scans the file once (about 15 ms for
    /// 300,000 lines, 13 MB, here).
    fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.lookup_reading(name, read_hosts)
    }

    /// [`HostsFile::lookup`], reading the file with `read`.
    fn lookup_reading(
        &self,
        name: &str,
        read: impl FnMut(&File, &[String]) -> HostsRead,
    ) -> Option<Vec<IpAddr>> {
        let table = {
            let mut cache = lock(&self.cache);
            if !cache.wanted.iter().any(|w| w.eq_ignore_ascii_case(name)) {
                cache.wanted.push(name.to_ascii_lowercase());
                cache.new_name = true;
            }
            match self.refresh(&mut cache, read) {
                Ok(Refreshed::Read) => {
                    cache.last_error = None;
                    cache.unsettled = false;
                }
                Ok(Refreshed::Unsettled) => {
                    // Its table and stamp stay (so an empty file met next is
                    // still taken for one being rewritten); the file's stamp
                    // now differs from it, so the next lookup reads again.
                    if !cache.unsettled {
                        tracing::warn!(
                            path = %self.path.display(),
                            kept = if cache.stamp.is_some() { "the last version read" } else { "nothing (none read yet): dns only" },
                            "hosts file kept changing while being read; it is read again at the next lookup"
                        );
                        cache.unsettled = true;
                    }
                }
                Err(e) => {
                    if cache.last_error != Some(e.kind()) {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot read hosts file; using dns only");
                        cache.last_error = Some(e.kind());
                    }
                    cache.stamp = None;
                    cache.table = Arc::default();
                }
            }
            cache.table.clone()
        };
        table.get(name).cloned()
    }

    /// Reads the file again unless its stamp proves it unchanged, with
    /// `read` (`read_hosts`; a test's reader can change the file as it
    /// reads).
    fn refresh(
        &self,
        cache: &mut HostsCache,
        mut read: impl FnMut(&File, &[String]) -> HostsRead,
    ) -> io::Result<Refreshed> {
        let stamp = FileStamp::of(&self.path)?;
        // After a look that found the file changing, its stamp is not the
        // cached one (that of the last version read whole): read again.
        if !cache.new_name && stamp.proves_unchanged_since(cache.stamp, SystemTime::now()) {
            return Ok(Refreshed::Read);
        }
        // The stamps are the open file's, not the path's: a file replaced
        // by rename while it is read was still read whole, and the next
        // lookup finds the path's stamp changed and reads the new one. A
        // file rewritten in place can change while it is read: read until
        // its stamp is the same before and after, so a half-written list
        // is never used.
        for _ in 0..5 {
            let file = File::open(&self.path)?;
            let before = FileStamp::of_file(&file)?;
            let (table, skipped, bytes) = read(&file, &cache.wanted)?;
            let after = FileStamp::of_file(&file)?;
            // An empty file written moments ago is most likely one being
            // rewritten in place (truncated, not yet written): keep serving
            // the previous table and look again on the next connection.
            if bytes == 0
                && after.changed_within(SystemTime::now(), EMPTY_REWRITE)
                && cache.stamp.is_some()
            {
                return Ok(Refreshed::Read);
            }
            if after.same_content_as(&before) {
                let changed = cache.stamp != Some(before) || cache.new_name;
                // Logged once per change of the file or of the names asked
                // for, not per connection.
                if changed {
                    for s in &skipped {
                        tracing::warn!(path = %self.path.display(), line = s.line, reason = s.reason, "hosts file line skipped");
                    }
                }
                cache.table = Arc::new(table);
                cache.stamp = Some(before);
                cache.new_name = false;
                return Ok(Refreshed::Read);
            }
        }
        Ok(Refreshed::Unsettled)
    }
}

/// One reading of the hosts file: the table of the names asked for, the
/// lines skipped, and the bytes read.
type HostsRead = io::Result<(HostsTable, Vec<Skipped>, u64)>;

/// What a look at the hosts file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refreshed {
    /// The table is the file's (or the previous one, while the file is
    /// being rewritten in place and is empty for a moment).
    Read,
    /// The file changed during each of several reads: the previous table
    /// stays.
    Unsettled,
}

/// Name (lowercase, no trailing dot) to addresses in file order.
pub type HostsTable = HashMap<String, Vec<IpAddr>>;

/// A hosts-file line that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number.
    pub line: usize,
    pub reason: &'static str,
}

/// Parses hosts-file text as the system resolver does: `IP name [alias...]`,
/// `#` starts a comment, lines whose first field is not an IP are skipped.
/// Every line naming a host counts, in file order.
pub fn parse_hosts(text: &str) -> HostsTable {
    parse_hosts_checked(text).0
}

/// [`parse_hosts`], also saying which lines were skipped.
pub fn parse_hosts_checked(text: &str) -> (HostsTable, Vec<Skipped>) {
    let mut parser = HostsParser::new(None);
    for (n, line) in text.lines().enumerate() {
        parser.line(n + 1, line);
    }
    (parser.table, parser.skipped)
}

/// Hosts-file lines into a table, one line at a time, so that a large file
/// is never held whole.
struct HostsParser<'w> {
    /// The names to keep (lowercase, no trailing dot), or every name. Lines
    /// that name none of them are passed over without a look at their
    /// address, and are not reported when unusable: the proxy never uses
    /// them.
    wanted: Option<&'w [String]>,
    table: HostsTable,
    skipped: Vec<Skipped>,
}

impl<'w> HostsParser<'w> {
    fn new(wanted: Option<&'w [String]>) -> Self {
        HostsParser {
            wanted,
            table: HashMap::new(),
            skipped: Vec::new(),
        }
    }

    fn wants(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.wanted
            .is_none_or(|w| w.iter().any(|x| x.eq_ignore_ascii_case(name)))
    }

    /// Takes line `n` (1-based).
    fn line(&mut self, n: usize, line: &str) {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_ascii_whitespace();
        let Some(ip) = fields.next() else { return };
        if self.wanted.is_some() && !fields.clone().any(|name| self.wants(name)) {
            return;
        }
        // A zone index (fe80::1%eth0) cannot be dialled without its scope;
        // such lines are skipped like other unusable ones.
        let Ok(ip) = ip.parse::<IpAddr>() else {
            self.skipped.push(Skipped {
                line: n,
                reason: "the first field is not an IP address",
            });
            return;
        };
        let mut named = false;
        for name in fields {
            named = true;
            if !self.wants(name) {
                continue;
            }
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            let ips = self.table.entry(name).or_default();
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        if !named {
            self.skipped.push(Skipped {
                line: n,
                reason: "an address with no name",
            });
        }
    }
}

/// Reads the hosts file at `path` line by line, keeping the `wanted` names.
/// Returns the table, the skipped lines and the number of bytes read.
fn read_hosts(file: &File, wanted: &[String]) -> HostsRead {
    use std::io::BufRead;
    let mut reader = io::BufReader::new(file);
    let mut parser = HostsParser::new(Some(wanted));
    let mut buf = Vec::new();
    let mut bytes = 0;
    for n in 1.. {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf)?;
        if read == 0 {
            break;
        }
        bytes += read as u64;
        parser.line(
            n,
            String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']),
        );
    }
    Ok((parser.table, parser.skipped, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rebuilt_resolver_keeps_the_last_good_answers_its_family_admits() {
        let cfg = |family| ResolverConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            hosts_file: None,
            family,
            timeout: Duration::from_secs(1),
            stale_on_error: Some(Duration::from_secs(300)),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let old = Resolver::new(&cfg(Family::Any)).unwrap();
        let when = Instant::now() - Duration::from_secs(60);
        let failing = ResolveError::ServFail {
            alias: "mixed.example".into(),
        };
        for (name, addrs) in [
            ("mixed.example", vec![ip("10.0.0.1"), ip("::1")]),
            ("v4.example", vec![ip("10.0.0.2")]),
        ] {
            lock(&old.stale).insert(
                name.into(),
                LastGood {
                    addrs,
                    when,
                    at: SystemTime::now(),
                    failing: Some(failing.clone()),
                    asking: true,
                },
            );
        }
        let new = Resolver::new(&cfg(Family::Ipv6)).unwrap();
        new.keep_last_good_of(&old);
        let stale = lock(&new.stale);
        let kept = stale.get("mixed.example").expect("kept");
        assert_eq!(kept.addrs, vec![ip("::1")]);
        assert_eq!(kept.when, when, "its age goes on");
        assert!(kept.failing.is_some(), "DNS is still known to fail");
        assert!(!kept.asking, "the old resolver's query answers the old one");
        assert!(!stale.contains_key("v4.example"), "nothing left to serve");
    }

    #[test]
    fn hosts_keeps_every_line_in_file_order() {
        let t = parse_hosts(
            "# cluster\n10.0.0.2 db.example db\n10.0.0.1\tDB.example. # second\n\n::1 db.example\nbogus db.example\n10.0.0.2 db.example\n",
        );
        let want: Vec<IpAddr> = vec![
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
        ];
        assert_eq!(t.get("db.example"), Some(&want));
        assert_eq!(t.get("db").map(Vec::len), Some(1));
        assert!(!t.contains_key("bogus"));
        assert!(!t.contains_key("second"));
    }

    #[test]
    fn a_large_hosts_file_keeps_only_the_names_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        let mut text = String::from("10.0.0.1 db.example\n");
        for i in 0..50_000 {
            text.push_str(&format!("0.0.0.0 ads{i}.example\n"));
        }
        text.push_str("10.0.0.2 other.example DB.example.\nbogus ads1.example\n");
        std::fs::write(&path, &text).unwrap();
        let h = HostsFile::new(&path);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let logged = warnings(|| {
            assert_eq!(
                h.lookup("db.example"),
                Some(vec![ip("10.0.0.1"), ip("10.0.0.2")])
            );
        });
        assert_eq!(lock(&h.cache).table.len(), 1);
        // A line unusable only for a name nobody asks for is not reported.
        assert!(!logged.contains("skipped"), "{logged}");
        // A name first asked for after the read is found, the file unchanged.
        assert_eq!(h.lookup("ads49999.example"), Some(vec![ip("0.0.0.0")]));
        assert_eq!(h.lookup("other.example"), Some(vec![ip("10.0.0.2")]));
        assert_eq!(h.lookup("db.example").map(|v| v.len()), Some(2));
        assert_eq!(lock(&h.cache).table.len(), 3);
    }

    proptest::proptest! {
        #[test]
        fn a_name_gets_from_a_file_read_for_it_what_the_whole_table_gives(
            text in r"(?s)((10\.0\.0\.[12]|::1|bogus|1\.2\.3)[ \t]+([ab.A]{1,3}[ \t#]{0,2}){0,3}\r?\n){1,4}.{0,20}",
            lines in 1usize..6,
        ) {
            let text = text.repeat(lines);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("hosts");
            std::fs::write(&path, &text).unwrap();
            let whole = parse_hosts(&text);
            for name in ["a", "b", "a.b", "ab"] {
                let (table, _, bytes) = read_hosts(&File::open(&path).unwrap(), &[name.to_string()]).unwrap();
                proptest::prop_assert_eq!(bytes, text.len() as u64);
                proptest::prop_assert_eq!(table.get(name), whole.get(name), "{:?}", name);
                proptest::prop_assert!(table.len() <= 1);
            }
        }
    }

    /// A hosts file of `text` in a directory of its own (kept while the
    /// test runs), its path, and the reader of it.
    fn hosts_file(text: &str) -> (tempfile::TempDir, PathBuf, HostsFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, text).unwrap();
        let h = HostsFile::new(&path);
        (dir, path, h)
    }

    /// A lookup's answer of the one address `s`.
    fn one(s: &str) -> Option<Vec<IpAddr>> {
        Some(vec![s.parse().unwrap()])
    }

    #[test]
    fn hosts_file_edit_is_seen_at_once() {
        let (_dir, path, h) = hosts_file("127.0.0.1 a.test\n");
        assert_eq!(h.lookup("a.test"), one("127.0.0.1"));
        // Same length, same second: only the nanoseconds or inode differ.
        std::fs::write(&path, "127.0.0.2 a.test\n").unwrap();
        assert_eq!(h.lookup("a.test"), one("127.0.0.2"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(h.lookup("a.test"), None);
    }

    #[test]
    fn a_hosts_file_replaced_by_rename_while_it_is_read_is_used_whole() {
        let (dir, path, h) = hosts_file("127.0.0.1 a.test\n");
        // Each read is overtaken by a new version renamed into place, as a
        // tool that writes a copy and renames it does, again and again.
        let mut version = 1;
        let renaming = |file: &File, wanted: &[String]| {
            let read = read_hosts(file, wanted);
            version += 1;
            let next = dir.path().join("hosts.new");
            std::fs::write(&next, format!("127.0.0.{version} a.test\n")).unwrap();
            std::fs::rename(&next, &path).unwrap();
            read
        };
        let logged =
            warnings(|| assert_eq!(h.lookup_reading("a.test", renaming), one("127.0.0.1")));
        assert_eq!(logged, "");
        // The next lookup finds the path's file changed and reads it.
        assert_eq!(h.lookup("a.test"), one("127.0.0.2"));
    }

    #[test]
    fn a_hosts_file_changing_during_every_read_keeps_the_last_table_read() {
        let (_dir, path, h) = hosts_file("127.0.0.1 a.test\n");
        assert_eq!(h.lookup("a.test"), one("127.0.0.1"));
        // Rewritten in place during each read, each time longer, so that
        // its stamp changes whatever the timestamps' granularity.
        let mut comment = String::new();
        let mut in_place = |file: &File, wanted: &[String]| {
            let read = read_hosts(file, wanted);
            comment.push('#');
            std::fs::write(&path, format!("{comment}\n127.0.0.9 a.test\n")).unwrap();
            read
        };
        let logged = warnings(|| {
            for _ in 0..3 {
                assert_eq!(h.lookup_reading("a.test", &mut in_place), one("127.0.0.1"));
            }
        });
        assert_eq!(
            logged
                .matches("hosts file kept changing while being read")
                .count(),
            1,
            "{logged}"
        );
        assert!(logged.contains("the last version read"), "{logged}");
        // Found empty next, just truncated: still a file being rewritten.
        std::fs::write(&path, "").unwrap();
        assert_eq!(h.lookup("a.test"), one("127.0.0.1"));
        // Once it settles, the next lookup reads it.
        std::fs::write(&path, "127.0.0.9 a.test\n").unwrap();
        assert_eq!(h.lookup("a.test"), one("127.0.0.9"));
    }

    fn stamp_at(secs: i64, nanos: i64) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: 1,
            len: 10,
            mtime: (secs, nanos),
            ctime: (secs, nanos),
        }
    }

    #[test]
    fn a_stamp_is_trusted_once_older_than_its_timestamp_granularity() {
        let t = 1_700_000_000;
        let at = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        // Sub-second timestamps: a few clock ticks.
        let fine = stamp_at(t, 250_000_000);
        assert!(fine.is_recent_at(at(t as u64, 260)));
        assert!(fine.is_recent_at(at(t as u64, 300)));
        assert!(!fine.is_recent_at(at(t as u64, 301)));
        // Whole-second timestamps (zero nanoseconds): seconds.
        let coarse = stamp_at(t, 0);
        assert!(coarse.is_recent_at(at(t as u64 + 2, 900)));
        assert!(!coarse.is_recent_at(at(t as u64 + 3, 1)));
        // A change time ahead of the clock proves nothing.
        assert!(fine.is_recent_at(at(t as u64 - 60, 0)));
        // One time with zero nanoseconds is chance, not a coarse filesystem.
        let mixed = FileStamp {
            ctime: (t, 0),
            ..fine
        };
        assert!(!mixed.is_recent_at(at(t as u64, 301)));
    }

    #[test]
    fn only_the_same_old_stamp_proves_a_file_unchanged() {
        let t = 1_700_000_000;
        let stamp = stamp_at(t, 250_000_000);
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64 + 10);
        let soon =
            SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64) + Duration::from_millis(260);
        assert!(stamp.proves_unchanged_since(Some(stamp), later));
        // Too recent to trust, changed, or never read: read it.
        assert!(!stamp.proves_unchanged_since(Some(stamp), soon));
        assert!(!stamp.proves_unchanged_since(Some(stamp_at(t, 1)), later));
        assert!(!stamp.proves_unchanged_since(None, later));
    }

    /// What `f` logs at WARN, one line per event.
    fn warnings(f: impl FnOnce()) -> String {
        logs(tracing::Level::WARN, f)
    }

    /// What `f` logs at `level` and above, one line per event.
    fn logs(level: tracing::Level, f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8_lossy(&lock(&sink.0)).into_owned()
    }

    fn assert_logged_once(logged: &str, what: &str) {
        assert_eq!(logged.matches(what).count(), 1, "{what}: {logged}");
    }

    #[tokio::test]
    async fn a_name_asked_under_the_search_domains_first_is_said_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        // A Kubernetes pod's file.
        std::fs::write(
            &path,
            "nameserver 127.0.0.1\nsearch ns.svc.cluster.local svc.cluster.local \
             cluster.local\noptions ndots:5\n",
        )
        .unwrap();
        let conf = SystemConf::read(&path, 53, Duration::from_secs(1)).unwrap();
        let logged = logs(tracing::Level::INFO, || {
            for _ in 0..3 {
                conf.current("mgmt.example.com");
            }
            // Written complete; meant for the search list (no dot); as
            // many dots as ndots: asked as it is first, nothing to say.
            for name in ["mgmt.example.com.", "mgmt", "a.b.c.d.e.f"] {
                conf.current(name);
            }
        });
        let what = "fewer dots than resolv.conf's ndots";
        assert_logged_once(&logged, what);
        assert!(
            logged.contains("alias=\"mgmt.example.com\"")
                && logged.contains("ndots=5")
                && logged.contains("search_domains=3"),
            "{logged}"
        );
        // No search list: every name is asked as it is.
        std::fs::write(&path, "nameserver 127.0.0.1\noptions ndots:5\n").unwrap();
        let conf = SystemConf::read(&path, 53, Duration::from_secs(1)).unwrap();
        let logged = logs(tracing::Level::INFO, || {
            conf.current("mgmt.example.com");
        });
        assert!(!logged.contains(what), "{logged}");
    }

    #[tokio::test]
    async fn localdomain_and_res_options_apply_over_the_file_as_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "nameserver 127.0.0.1\nsearch a.example b.example\noptions ndots:2\n",
        )
        .unwrap();
        let env = env_lines(Some("c.example"), Some(" ndots:5 use-vc "));
        let conf = SystemConf::read_with(&path, 53, Duration::from_secs(1), env).unwrap();
        let seen = |conf: &SystemConf| {
            let st = lock(&conf.state);
            (
                st.conf.ndots,
                st.conf.searches,
                st.conf.options.use_vc,
                st.conf.options.no_aaaa,
            )
        };
        assert_eq!(seen(&conf), (5, 1, true, false));
        // The file changes: the environment still applies over it.
        std::fs::write(&path, "nameserver 127.0.0.2\noptions ndots:1 no-aaaa\n").unwrap();
        assert_eq!(conf.current("x.").0.len(), 1);
        assert_eq!(seen(&conf), (5, 1, true, true));
        // Unset or empty: the file alone.
        assert!(env_lines(None, Some("  ")).is_empty());
        let conf = SystemConf::read_with(&path, 53, Duration::from_secs(1), Vec::new()).unwrap();
        assert_eq!(seen(&conf), (1, 0, false, true));
    }

    #[tokio::test]
    async fn a_resolv_conf_problem_is_logged_once_and_the_last_servers_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 127.0.0.1\n").unwrap();
        let conf = SystemConf::read(&path, 53, Duration::from_secs(1)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let conf = &conf;
        let gone = |kept: usize| {
            move || {
                for _ in 0..3 {
                    assert_eq!(conf.current("x.").0.len(), kept);
                }
            }
        };
        let logged = warnings(gone(1));
        assert_logged_once(&logged, "keeping the nameservers");
        // Back, naming other servers: the change is logged with it.
        std::fs::write(&path, "nameserver 127.0.0.2\nnameserver ::1\n").unwrap();
        let logged = logs(tracing::Level::INFO, || {
            assert_eq!(conf.current("x.").0.len(), 2)
        });
        assert!(
            logged.contains("INFO") && logged.contains("nameservers=[127.0.0.2, ::1]"),
            "{logged}"
        );
        assert!(!logged.contains("WARN"), "{logged}");
        // Gone again: a new problem, logged again, and the new servers kept.
        std::fs::remove_file(&path).unwrap();
        let logged = warnings(gone(2));
        assert_logged_once(&logged, "keeping the nameservers");
    }

    #[test]
    fn a_missing_hosts_file_is_logged_once() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = HostsFile::new(&dir.path().join("hosts"));
        let logged = warnings(|| {
            for _ in 0..3 {
                assert_eq!(hosts.lookup("db.example"), None);
            }
        });
        assert_logged_once(&logged, "cannot read hosts file");
    }

    #[test]
    fn a_skipped_hosts_line_is_logged_once_per_change_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "bogus db.example\n10.0.0.1 db.example\n").unwrap();
        let hosts = HostsFile::new(&path);
        let want: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        // Read again on every lookup while the change is recent, and logged
        // once all the same.
        let logged = warnings(|| {
            for _ in 0..3 {
                assert_eq!(hosts.lookup("db.example"), Some(want.clone()));
            }
        });
        assert_logged_once(&logged, "hosts file line skipped");
        std::fs::write(&path, "10.0.0.1 db.example\nbogus db.example\n").unwrap();
        let logged = warnings(|| {
            assert_eq!(hosts.lookup("db.example"), Some(want.clone()));
        });
        assert!(logged.contains("line=2"), "{logged}");
    }
}
