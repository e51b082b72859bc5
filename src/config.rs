//! Configuration: figment layers (file, then `FAILOVER_PROXY_*` variables)
//! read key by key into a validated [`Config`].
//!
//! Keys are read one at a time from the merged tree rather than through one
//! big `#[derive(Deserialize)]`, so that every problem in a file is reported in
//! the same run, each with the key and the file or variable it came from.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Metadata, Source};
use serde::de::DeserializeOwned;

/// Prefix of every environment variable that configures the proxy.
pub const ENV_PREFIX: &str = "FAILOVER_PROXY_";
/// The variable naming the config file; not itself a config key.
pub const CONFIG_PATH_VAR: &str = "FAILOVER_PROXY_CONFIG";
/// `runtime.worker_threads` above this is taken for a typo.
pub const MAX_WORKER_THREADS: usize = 1024;
/// Where the config file is looked for when nothing names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/failover-proxy/failover-proxy.toml";

/// Every key a `[[route]]` table may have.
pub const ROUTE_KEYS: &[&str] = &[
    "name",
    "listen",
    "alias",
    "port",
    "order",
    "connect_timeout",
    "attempt_delay",
    "max_connections",
    "idle_timeout",
    "allow_non_loopback",
];

/// The relay's default way of moving bytes; see README (Speed) for the
/// measurement behind it.
pub const DEFAULT_RELAY: crate::relay::Mode = crate::relay::Mode::Splice;

/// Shortest active probe interval other than 0s (off). Every client host
/// runs its own sidecar, each probing every server of the cluster: a typo
/// such as `1ms` for `1m` would have each of them open a thousand probe
/// connections a second to every server, and nothing on the client side
/// would show it.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Upper bound of the passive retry back-off (SPEC: "doubling, at most 30 s").
pub const MAX_RETRY_DOWN_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub routes: Vec<RouteConfig>,
    pub resolver: ResolverConfig,
    pub health: HealthConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub alias: Alias,
    pub port: u16,
    pub order: Order,
    pub connect_timeout: Duration,
    /// Zero means one attempt at a time.
    pub attempt_delay: Duration,
    pub max_connections: NonZeroU32,
    /// `None` means never.
    pub idle_timeout: Option<Duration>,
    pub allow_non_loopback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Listed,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn admits(self, ip: IpAddr) -> bool {
        match self {
            Family::Any => true,
            Family::Ipv4 => ip.is_ipv4(),
            Family::Ipv6 => ip.is_ipv6(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    /// Empty: use the nameservers of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// `None`: hosts file lookups are off.
    pub hosts_file: Option<PathBuf>,
    pub family: Family,
    pub timeout: Duration,
    /// `None`: never use a stale answer.
    pub stale_on_error: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// `None`: passive health only.
    pub interval: Option<Duration>,
    pub down_after: NonZeroU32,
    pub up_after: NonZeroU32,
    pub retry_down_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `None`: no admin endpoint.
    pub listen: Option<SocketAddr>,
    pub allow_non_loopback: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// Its value in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// 0: one per CPU core.
    pub worker_threads: usize,
    /// How the relay moves bytes.
    pub relay: crate::relay::Mode,
}

/// A cluster alias: an IP literal or a hostname as RFC 1123 defines it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Alias {
    Ip(IpAddr),
    /// Lowercase, with its trailing dot if it was written with one.
    Host(String),
}

impl Alias {
    pub fn parse(s: &str) -> Result<Alias, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Alias::Ip(ip));
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        if name.is_empty() {
            return Err("is empty; expected a hostname or an IP address".into());
        }
        if name.len() > 253 {
            return Err(format!(
                "{s:?} is {} characters long; a hostname has at most 253",
                name.len()
            ));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(format!("{s:?} has an empty label"));
            }
            if label.len() > 63 {
                return Err(format!(
                    "{s:?} has a label of {} characters; at most 63 are allowed",
                    label.len()
                ));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return Err(format!(
                    "{s:?} contains {c:?}; a hostname has only ASCII letters, digits, hyphens and dots"
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!(
                    "{s:?} has a label that starts or ends with a hyphen"
                ));
            }
        }
        // The trailing dot, if written, stays: it tells the DNS resolver the
        // name is complete, so resolv.conf's search list is not tried on it,
        // as the system resolver does.
        Ok(Alias::Host(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alias::Ip(ip) => ip.fmt(f),
            Alias::Host(h) => f.write_str(h),
        }
    }
}

/// One problem with the configuration: which key, where it came from, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `resolver.timeout`, `route[0].listen`; empty for the file as a whole.
    pub key: String,
    /// `file /path/to.toml`, `environment variable FAILOVER_PROXY_X`, ...
    pub source: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{} ({}): {}", self.key, self.source, self.message)
        }
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "invalid config: {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(key: &str, source: String, message: String) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.into(),
                source,
                message,
            }],
        }
    }
}

/// Which file to read, from the command line or the environment.
pub fn config_path(cli: Option<&Path>, env_value: Option<std::ffi::OsString>) -> ConfigPath {
    match (cli, env_value) {
        (Some(p), _) => ConfigPath::Named(p.to_path_buf(), "--config".into()),
        (None, Some(v)) if !v.is_empty() => ConfigPath::Named(v.into(), CONFIG_PATH_VAR.into()),
        _ => ConfigPath::Default(PathBuf::from(DEFAULT_CONFIG_PATH)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// Named by the user (the second field says how): it must exist.
    Named(PathBuf, String),
    /// The default location: read when present, else environment alone.
    Default(PathBuf),
}

/// The layers SPEC fixes: the file, then `FAILOVER_PROXY_*` variables.
/// Built-in defaults are applied key by key in [`from_figment`].
pub fn figment(path: &ConfigPath) -> Result<Figment, ConfigError> {
    let mut fig = Figment::new();
    match path {
        ConfigPath::Named(p, how) => {
            let source = format!("config file {} (named by {how})", p.display());
            match std::fs::metadata(p) {
                Ok(m) if m.is_file() => {}
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(unreadable(source, &e));
                }
                _ => {
                    return Err(ConfigError::one(
                        "",
                        source,
                        "does not exist or is not a file".into(),
                    ));
                }
            }
            if let Err(e) = std::fs::File::open(p) {
                return Err(unreadable(source, &e));
            }
            fig = fig.merge(Toml::file_exact(p));
        }
        ConfigPath::Default(p) => {
            let source = format!("config file {} (the default)", p.display());
            // A default file that is there but cannot be read is an error,
            // not a file to pass over: its routes would be missing.
            match std::fs::metadata(p).and_then(|_| std::fs::File::open(p)) {
                Ok(_) => fig = fig.merge(Toml::file_exact(p)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(unreadable(source, &e)),
            }
        }
    }
    Ok(fig.merge(env_provider()))
}

/// A config file that is there but cannot be read. Under the systemd unit
/// the proxy runs as a dynamic user, and a file installed with mode 600
/// said only "Permission denied": the message names the user to grant.
fn unreadable(source: String, e: &std::io::Error) -> ConfigError {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "; this process runs as uid {}, which must be able to read the file and its \
             directories (the systemd unit runs it as a dynamic user: mode 644 on the file)",
            rustix::process::getuid().as_raw()
        )
    } else {
        String::new()
    };
    ConfigError::one("", source, format!("cannot be read: {e}{hint}"))
}

pub fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"])
}

/// Loads the configuration from a file path (or the default) and the
/// process environment.
pub fn load(path: &ConfigPath) -> Result<Config, ConfigError> {
    from_figment(&figment(path)?)
}

/// Reads and validates every key of `fig`, reporting all problems at once.
pub fn from_figment(fig: &Figment) -> Result<Config, ConfigError> {
    let root = match fig.extract::<Value>() {
        Ok(v) => v,
        Err(e) => {
            // A syntax error in the file (or an unreadable file) stops
            // everything: there is no tree to read keys from.
            let problems = e
                .into_iter()
                .map(|e| Problem {
                    key: e.path.join("."),
                    source: e
                        .metadata
                        .as_ref()
                        .map(|m| describe_source(m, &e.path))
                        .unwrap_or_else(|| "configuration".into()),
                    message: one_line(&e.kind.to_string()),
                })
                .collect();
            return Err(ConfigError { problems });
        }
    };
    let mut r = Reader {
        fig,
        problems: Vec::new(),
    };
    let empty = Dict::new();
    let top = match &root {
        Value::Dict(_, d) => d,
        _ => &empty,
    };
    r.unknown_keys(
        top,
        "",
        &[
            "route", "resolver", "health", "admin", "log", "shutdown", "runtime",
        ],
    );

    let resolver = {
        let d = r.section(top, "resolver");
        r.unknown_keys(
            d,
            "resolver",
            &[
                "nameservers",
                "hosts_file",
                "family",
                "timeout",
                "stale_on_error",
            ],
        );
        let nameservers: Vec<String> = r.get(d, "resolver", "nameservers").unwrap_or_default();
        let mut parsed = Vec::new();
        for (i, ns) in nameservers.iter().enumerate() {
            match parse_nameserver(ns) {
                Ok(a) => parsed.push(a),
                Err(m) => r.problem(d, "resolver", "nameservers", Some(i), m),
            }
        }
        let hosts_file: String = r
            .get(d, "resolver", "hosts_file")
            .unwrap_or_else(|| "/etc/hosts".into());
        let family = r
            .choice(
                d,
                "resolver",
                "family",
                &[
                    ("any", Family::Any),
                    ("ipv4", Family::Ipv4),
                    ("ipv6", Family::Ipv6),
                ],
            )
            .unwrap_or(Family::Any);
        let timeout = r.duration(d, "resolver", "timeout", secs(2));
        if timeout.is_zero() {
            r.problem(
                d,
                "resolver",
                "timeout",
                None,
                "must be more than 0s".into(),
            );
        }
        let stale = r.duration(d, "resolver", "stale_on_error", secs(300));
        ResolverConfig {
            nameservers: parsed,
            hosts_file: (!hosts_file.is_empty()).then(|| PathBuf::from(hosts_file)),
            family,
            timeout,
            stale_on_error: nonzero(stale),
        }
    };

    let health = {
        let d = r.section(top, "health");
        r.unknown_keys(
            d,
            "health",
            &["interval", "down_after", "up_after", "retry_down_after"],
        );
        let interval = r.duration(d, "health", "interval", secs(5));
        if !interval.is_zero() && interval < MIN_PROBE_INTERVAL {
            r.problem(
                d,
                "health",
                "interval",
                None,
                format!(
                    "must be 0s (no probes) or at least 100ms: {} would probe every server {:.0} times a second",
                    humantime::format_duration(interval),
                    1.0 / interval.as_secs_f64()
                ),
            );
        }
        let down_after = r.count(d, "health", "down_after", 1);
        let up_after = r.count(d, "health", "up_after", 1);
        let retry = r.duration(d, "health", "retry_down_after", secs(1));
        if retry > MAX_RETRY_DOWN_AFTER {
            r.problem(
                d,
                "health",
                "retry_down_after",
                None,
                "must be at most 30s (the back-off ceiling)".into(),
            );
        }
        HealthConfig {
            interval: nonzero(interval),
            down_after,
            up_after,
            retry_down_after: retry,
        }
    };

    let admin = {
        let d = r.section(top, "admin");
        r.unknown_keys(d, "admin", &["listen", "allow_non_loopback"]);
        let listen: String = r
            .get(d, "admin", "listen")
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let allow: bool = r.get(d, "admin", "allow_non_loopback").unwrap_or(false);
        let listen = if listen.is_empty() {
            None
        } else {
            match listen.parse::<SocketAddr>() {
                Ok(a) => {
                    if !allow && !a.ip().is_loopback() {
                        r.problem(d, "admin", "listen", None, non_loopback(a));
                    }
                    Some(a)
                }
                Err(e) => {
                    r.problem(
                        d,
                        "admin",
                        "listen",
                        None,
                        format!("{listen:?} is not an ip:port address: {e}"),
                    );
                    None
                }
            }
        };
        AdminConfig {
            listen,
            allow_non_loopback: allow,
        }
    };

    let log = {
        let d = r.section(top, "log");
        r.unknown_keys(d, "log", &["level", "format"]);
        let level: String = r.get(d, "log", "level").unwrap_or_else(|| "info".into());
        if let Err(e) = level.parse::<tracing_subscriber::EnvFilter>() {
            r.problem(
                d,
                "log",
                "level",
                None,
                format!("{level:?} is not a log filter: {e}"),
            );
        } else if level.trim().is_empty() {
            // An empty filter logs errors only, which nobody asks for by
            // leaving a variable empty.
            r.problem(
                d,
                "log",
                "level",
                None,
                "is empty; expected a level (trace, debug, info, warn, error, off)".into(),
            );
        } else if let Some(word) = bare_target(&level) {
            // A filter takes a bare word as a target name, so a misspelt
            // level ("wran") would silence every line the proxy writes.
            let word = if word == level.trim() {
                format!("{word:?}")
            } else {
                format!("{word:?} in {level:?}")
            };
            r.problem(
                d,
                "log",
                "level",
                None,
                format!(
                    "{word} is not a level (trace, debug, info, warn, error, off); \
                     to filter by target, write target=level"
                ),
            );
        }
        let format = r
            .choice(
                d,
                "log",
                "format",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )
            .unwrap_or(LogFormat::Text);
        LogConfig { level, format }
    };

    let shutdown = {
        let d = r.section(top, "shutdown");
        r.unknown_keys(d, "shutdown", &["drain_timeout"]);
        ShutdownConfig {
            drain_timeout: r.duration(d, "shutdown", "drain_timeout", secs(30)),
        }
    };

    let runtime = {
        let d = r.section(top, "runtime");
        r.unknown_keys(d, "runtime", &["worker_threads", "relay"]);
        // Bounded: the runtime starts every worker before it binds, so a
        // typo such as 100000 would spend minutes and gigabytes starting
        // threads.
        let worker_threads = r
            .whole(
                d,
                "runtime",
                "worker_threads",
                (0, MAX_WORKER_THREADS as i64),
                &format!("0 (one per CPU core) to {MAX_WORKER_THREADS}"),
            )
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        RuntimeConfig {
            worker_threads,
            relay: r
                .choice(
                    d,
                    "runtime",
                    "relay",
                    &[
                        ("splice", crate::relay::Mode::Splice),
                        ("copy", crate::relay::Mode::Copy),
                    ],
                )
                .unwrap_or(DEFAULT_RELAY),
        }
    };

    let (routes, listens) = r.routes(top);
    // One address cannot be both: under socket activation each would take
    // the socket systemd passed for it, and share its connections. Checked
    // against every route's listen, even a route wrong elsewhere, so that
    // one run names every problem.
    if let Some(a) = admin.listen.filter(|a| a.port() != 0)
        && let Some((_, route)) = listens.iter().find(|(l, _)| *l == a)
    {
        let d = r.section(top, "admin");
        r.problem(
            d,
            "admin",
            "listen",
            None,
            format!("{a} is the listen of {route}"),
        );
    }

    if r.problems.is_empty() {
        Ok(Config {
            routes,
            resolver,
            health,
            admin,
            log,
            shutdown,
            runtime,
        })
    } else {
        Err(ConfigError {
            problems: r.problems,
        })
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn non_loopback(a: SocketAddr) -> String {
    format!(
        "{a} is not a loopback address; set allow_non_loopback = true to listen on it (clients on other hosts could then use this proxy)"
    )
}

fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => s
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, 53))
            .map_err(|_| {
                format!(
                    "{s:?} is not \"ip\" or \"ip:port\" (an IPv6 address with a port in \
                 brackets: \"[::1]:5353\")"
                )
            })?,
    };
    // Queries to port 0 go nowhere: every one would wait out the timeout.
    if addr.port() == 0 {
        return Err(format!(
            "{s:?} has port 0; a DNS server's port is 1 to 65535"
        ));
    }
    Ok(addr)
}

/// A parser's message on one line, as every problem is: the TOML parser
/// draws the offending line with a caret under it, over several lines.
fn one_line(message: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in message.lines() {
        let drawn = line
            .split_once('|')
            .filter(|(gutter, _)| gutter.trim().chars().all(|c| c.is_ascii_digit()));
        match drawn {
            // The drawn source line, "18 | garbage[", is shown quoted; the
            // caret and blank gutter lines say nothing the line and column
            // do not.
            Some((gutter, code)) if !gutter.trim().is_empty() => {
                parts.push(format!("in {:?}", code.trim()));
            }
            Some(_) => {}
            None if line.trim().is_empty() => {}
            None => parts.push(line.trim().to_string()),
        }
    }
    parts.join(": ")
}

/// Describes where a value came from: a file path, or the real name of the
/// environment variable (figment only says "`FAILOVER_PROXY_` environment
/// variable(s)").
fn describe_source(meta: &Metadata, path: &[String]) -> String {
    match &meta.source {
        Some(Source::File(p)) => format!("file {}", p.display()),
        Some(Source::Custom(s)) => s.clone(),
        Some(Source::Code(_)) => "built-in default".into(),
        Some(other) => other.to_string(),
        None if meta.name.contains("environment") => {
            format!("environment variable {}", env_var_name(path))
        }
        None => meta.name.to_string(),
    }
}

/// The variable that set `path`: the longest `FAILOVER_PROXY_A__B` that is
/// set, since a whole section may come from one variable holding a table
/// (`FAILOVER_PROXY_ROUTE='[{...}]'`).
fn env_var_name(path: &[String]) -> String {
    let keys: Vec<&String> = path
        .iter()
        .take_while(|k| !k.chars().all(|c| c.is_ascii_digit()))
        .collect();
    let name = |n: usize| {
        let joined: Vec<String> = keys[..n].iter().map(|k| k.to_ascii_uppercase()).collect();
        format!("{ENV_PREFIX}{}", joined.join("__"))
    };
    for n in (1..=keys.len()).rev() {
        let candidate = name(n);
        if std::env::var_os(&candidate).is_some() {
            return candidate;
        }
    }
    name(keys.len())
}

struct Reader<'a> {
    fig: &'a Figment,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn source_of(&self, value: Option<&Value>, path: &[String]) -> String {
        value
            .and_then(|v| self.fig.get_metadata(v.tag()))
            .map(|m| describe_source(m, path))
            .unwrap_or_else(|| "configuration".into())
    }

    fn push(
        &mut self,
        value: Option<&Value>,
        display_key: String,
        path: Vec<String>,
        message: String,
    ) {
        let source = self.source_of(value, &path);
        self.problems.push(Problem {
            key: display_key,
            source,
            message,
        });
    }

    /// Records a problem with `prefix.key` (element `index` of it, if given).
    fn problem(
        &mut self,
        d: &Dict,
        prefix: &str,
        key: &str,
        index: Option<usize>,
        message: String,
    ) {
        let value = d.get(key);
        let value = match (value, index) {
            (Some(Value::Array(_, a)), Some(i)) => a.get(i).or(value),
            _ => value,
        };
        let mut display = join(prefix, key);
        if let Some(i) = index {
            display = format!("{display}[{i}]");
        }
        self.push(value, display, path_of(prefix, key), message);
    }

    fn section<'d>(&mut self, top: &'d Dict, name: &str) -> &'d Dict {
        static EMPTY: std::sync::LazyLock<Dict> = std::sync::LazyLock::new(Dict::new);
        match top.get(name) {
            None => &EMPTY,
            Some(Value::Dict(_, d)) => d,
            Some(other) => {
                self.push(
                    Some(other),
                    name.into(),
                    vec![name.into()],
                    format!("expected a table, found {}", other.to_actual()),
                );
                &EMPTY
            }
        }
    }

    fn unknown_keys(&mut self, d: &Dict, prefix: &str, known: &[&str]) {
        for (k, v) in d {
            if !known.contains(&k.as_str()) {
                let mut expected = known.to_vec();
                expected.sort_unstable();
                self.push(
                    Some(v),
                    join(prefix, k),
                    path_of(prefix, k),
                    format!("unknown key; expected one of: {}", expected.join(", ")),
                );
            }
        }
    }

    fn get<T: DeserializeOwned>(&mut self, d: &Dict, prefix: &str, key: &str) -> Option<T> {
        let v = d.get(key)?;
        match v.deserialize::<T>() {
            Ok(t) => Some(t),
            Err(e) => {
                self.push(
                    Some(v),
                    join(prefix, key),
                    path_of(prefix, key),
                    e.kind.to_string(),
                );
                None
            }
        }
    }

    fn duration(&mut self, d: &Dict, prefix: &str, key: &str, default: Duration) -> Duration {
        #[derive(serde::Deserialize)]
        #[serde(transparent)]
        struct Human(#[serde(with = "humantime_serde")] Duration);
        let Some(v) = d.get(key) else {
            return default;
        };
        match v.deserialize::<Human>() {
            Ok(h) => h.0,
            Err(e) => {
                let shown = match v {
                    Value::String(_, s) => format!("{s:?}"),
                    other => other.to_actual().to_string(),
                };
                self.push(
                    Some(v),
                    join(prefix, key),
                    path_of(prefix, key),
                    format!(
                        "{shown} is not a duration: expected a string with a unit such as \"250ms\", \"2s\" or \"5m\" ({})",
                        e.kind
                    ),
                );
                default
            }
        }
    }

    /// A whole number from `min` to `max`. One message for every way out of
    /// the range (0, -1 and 70,000 for a port alike), rather than the
    /// deserializer's "expected u16".
    fn whole(
        &mut self,
        d: &Dict,
        prefix: &str,
        key: &str,
        (min, max): (i64, i64),
        range: &str,
    ) -> Option<i64> {
        let v = d.get(key)?;
        // TOML gives signed numbers, environment variables unsigned ones.
        let Some(n) = v
            .to_i128()
            .or_else(|| v.to_u128().and_then(|u| i128::try_from(u).ok()))
        else {
            self.push(
                Some(v),
                join(prefix, key),
                path_of(prefix, key),
                format!("expected a whole number, found {}", v.to_actual()),
            );
            return None;
        };
        match i64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(d, prefix, key, None, format!("must be {range}, not {n}"));
                None
            }
        }
    }

    fn count(&mut self, d: &Dict, prefix: &str, key: &str, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        self.whole(
            d,
            prefix,
            key,
            (1, i64::from(u32::MAX)),
            &format!("1 to {}", u32::MAX),
        )
        .and_then(|n| u32::try_from(n).ok())
        .and_then(NonZeroU32::new)
        .unwrap_or(fallback)
    }

    fn choice<T: Copy>(
        &mut self,
        d: &Dict,
        prefix: &str,
        key: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s: String = self.get(d, prefix, key)?;
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => Some(*t),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.problem(
                    d,
                    prefix,
                    key,
                    None,
                    format!("{s:?} is not one of: {}", names.join(", ")),
                );
                None
            }
        }
    }

    /// The valid routes, and every listen address read, with the route it
    /// belongs to ("route NAME", or "route[i]" when it has no name).
    fn routes(&mut self, top: &Dict) -> (Vec<RouteConfig>, Vec<(SocketAddr, String)>) {
        let items: &[Value] = match top.get("route") {
            None => &[],
            Some(Value::Array(_, a)) => a,
            Some(other) => {
                self.push(
                    Some(other),
                    "route".into(),
                    vec!["route".into()],
                    format!(
                        "expected an array of tables ([[route]] in a file, or '[{{listen=..., alias=..., port=...}}]' in a variable), found {}",
                        other.to_actual()
                    ),
                );
                return (Vec::new(), Vec::new());
            }
        };
        // An empty array too: a sidecar that serves nothing would start,
        // report ready, and refuse every client.
        if items.is_empty() {
            self.push(
                top.get("route"),
                "route".into(),
                vec!["route".into()],
                format!(
                    "no route is configured; add a [[route]] table to the file or set {ENV_PREFIX}ROUTE"
                ),
            );
        }
        let mut routes = Vec::new();
        let mut read: Vec<(SocketAddr, String)> = Vec::new();
        let mut names = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("route[{i}]");
            let d = match item {
                Value::Dict(_, d) => d,
                other => {
                    self.push(
                        Some(other),
                        prefix,
                        vec!["route".into()],
                        format!("expected a table, found {}", other.to_actual()),
                    );
                    continue;
                }
            };
            // A clash is reported even when another key of either route is
            // wrong, so that one run names every problem.
            let parsed = self.route(item, d, &prefix);
            if let Some(listen) = parsed.listen {
                // Routes are matched by `listen` on reload, so even two
                // port-0 listeners on one IP would be ambiguous.
                if read.iter().any(|(l, _)| *l == listen) {
                    self.problem(
                        d,
                        &prefix,
                        "listen",
                        None,
                        format!("{listen} is used by an earlier route"),
                    );
                }
                let route = match &parsed.name {
                    Some(name) => format!("route {name}"),
                    None => prefix.clone(),
                };
                read.push((listen, route));
            }
            if let Some(name) = parsed.name
                && !names.insert(name.clone())
            {
                // A name left out is the alias: where that came from is
                // where to look.
                let (value, given) = match d.get("name") {
                    Some(v) => (Some(v), ""),
                    None => (
                        d.get("alias").or(Some(item)),
                        " (its alias, as no name is set)",
                    ),
                };
                self.push(
                    value,
                    join(&prefix, "name"),
                    path_of(&prefix, "name"),
                    format!(
                        "{name:?}{given} is the name of an earlier route; names label metrics and must be unique"
                    ),
                );
            }
            routes.extend(parsed.config);
        }
        (routes, read)
    }

    fn route(&mut self, item: &Value, d: &Dict, p: &str) -> ParsedRoute {
        self.unknown_keys(d, p, ROUTE_KEYS);
        let before = self.problems.len();
        let allow: bool = self.get(d, p, "allow_non_loopback").unwrap_or(false);
        let listen = match self.get::<String>(d, p, "listen") {
            None if !d.contains_key("listen") => {
                self.missing(
                    item,
                    p,
                    "listen",
                    "an ip:port to listen on, such as \"127.0.0.1:41000\"",
                );
                None
            }
            None => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) if !allow && !a.ip().is_loopback() => {
                    self.problem(d, p, "listen", None, non_loopback(a));
                    None
                }
                Ok(a) => Some(a),
                Err(e) => {
                    self.problem(
                        d,
                        p,
                        "listen",
                        None,
                        format!("{s:?} is not an ip:port address: {e}"),
                    );
                    None
                }
            },
        };
        let alias = match self.get::<String>(d, p, "alias") {
            None if !d.contains_key("alias") => {
                self.missing(item, p, "alias", "the cluster's hostname or an IP address");
                None
            }
            None => None,
            Some(s) => match Alias::parse(&s) {
                Ok(a) => Some(a),
                Err(m) => {
                    self.problem(d, p, "alias", None, m);
                    None
                }
            },
        };
        let port = match self.whole(d, p, "port", (1, 65535), "1 to 65535") {
            None if !d.contains_key("port") => {
                self.missing(item, p, "port", "the servers' port, 1 to 65535");
                None
            }
            n => n.and_then(|n| u16::try_from(n).ok()),
        };
        let order = self
            .choice(
                d,
                p,
                "order",
                &[
                    ("listed", Order::Listed),
                    ("round-robin", Order::RoundRobin),
                    ("random", Order::Random),
                ],
            )
            .unwrap_or(Order::Listed);
        let connect_timeout = self.duration(d, p, "connect_timeout", secs(2));
        if connect_timeout.is_zero() {
            self.problem(d, p, "connect_timeout", None, "must be more than 0s".into());
        }
        let attempt_delay = self.duration(d, p, "attempt_delay", Duration::from_millis(250));
        let max_connections = self.count(d, p, "max_connections", 10_000);
        let idle_timeout = self.duration(d, p, "idle_timeout", Duration::ZERO);
        let name: Option<String> = self.get(d, p, "name");
        if name.as_deref() == Some("") {
            self.problem(d, p, "name", None, "must not be empty".into());
        }
        let name = match (name, &alias) {
            (Some(n), _) if !n.is_empty() => Some(n),
            (Some(_), _) => None,
            (None, a) => a.as_ref().map(ToString::to_string),
        };
        let config = match (listen, alias, port, &name) {
            (Some(listen), Some(alias), Some(port), Some(name))
                if self.problems.len() == before =>
            {
                Some(RouteConfig {
                    name: name.clone(),
                    listen,
                    alias,
                    port,
                    order,
                    connect_timeout,
                    attempt_delay,
                    max_connections,
                    idle_timeout: nonzero(idle_timeout),
                    allow_non_loopback: allow,
                })
            }
            _ => None,
        };
        ParsedRoute {
            listen,
            name,
            config,
        }
    }

    /// A required key is absent: the source named is that of its table.
    fn missing(&mut self, table: &Value, prefix: &str, key: &str, what: &str) {
        let source = self.source_of(Some(table), &path_of(prefix, key));
        self.problems.push(Problem {
            key: join(prefix, key),
            source,
            message: format!("is required: {what}"),
        });
    }
}

/// The first directive of a log filter that is a bare target name.
fn bare_target(filter: &str) -> Option<&str> {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains(['=', '[']))
        .find(|d| {
            d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        })
}

/// What one `[[route]]` table gave: the keys that identify it, when valid,
/// and the whole route when every key is.
struct ParsedRoute {
    listen: Option<SocketAddr>,
    name: Option<String>,
    config: Option<RouteConfig>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.into()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The figment path of `prefix.key`, with `route[3]` read as `route.3`.
fn path_of(prefix: &str, key: &str) -> Vec<String> {
    let mut path: Vec<String> = Vec::new();
    for part in prefix.split('.').filter(|s| !s.is_empty()) {
        match part.split_once('[') {
            Some((name, rest)) => {
                path.push(name.into());
                path.push(rest.trim_end_matches(']').into());
            }
            None => path.push(part.into()),
        }
    }
    path.push(key.into());
    path
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_parser_message_becomes_one_line_without_its_drawing_or_blank_lines() {
        let drawn = "TOML parse error at line 6, column 1\n  |\n6 | port = 2\n  | ^\n\nduplicate key `port`\n";
        assert_eq!(
            one_line(drawn),
            r#"TOML parse error at line 6, column 1: in "port = 2": duplicate key `port`"#
        );
    }
}
