//! Configuration: layers, validation, and errors that name the key and the
//! file or variable they came from. `figment::Jail` isolates files and
//! environment; the process environment is never changed directly.

// figment::Jail closures return figment::Error, which is large.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use failover_proxy::config::{self, Alias, ConfigError, ConfigPath, Family, Order};
use figment::Jail;

fn load_file(jail: &Jail, name: &str) -> Result<failover_proxy::Config, ConfigError> {
    let path = jail.directory().join(name);
    config::load(&ConfigPath::Named(path, "--config".into()))
}

fn problems(e: &ConfigError) -> Vec<(String, String, String)> {
    e.problems
        .iter()
        .map(|p| (p.key.clone(), p.source.clone(), p.message.clone()))
        .collect()
}

const ROUTE: &str = r#"
[[route]]
listen = "127.0.0.1:41000"
alias = "my-cluster.example"
port = 41000
"#;

#[test]
fn example_file_in_config_dir_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/failover-proxy.toml");
    Jail::expect_with(|_| {
        let c = config::load(&ConfigPath::Named(path.clone(), "--config".into()))
            .map_err(|e| e.to_string())?;
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].alias, Alias::Host("localhost".into()));
        Ok(())
    });
}

#[test]
fn defaults_follow_spec() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", ROUTE)?;
        let c = load_file(jail, "c.toml").map_err(|e| e.to_string())?;
        let r = &c.routes[0];
        assert_eq!(r.name, "my-cluster.example");
        assert_eq!(r.order, Order::Listed);
        assert_eq!(r.connect_timeout, Duration::from_secs(2));
        assert_eq!(r.attempt_delay, Duration::from_millis(250));
        assert_eq!(r.max_connections.get(), 10_000);
        assert_eq!(r.idle_timeout, None);
        assert_eq!(c.resolver.hosts_file, Some(PathBuf::from("/etc/hosts")));
        assert_eq!(c.resolver.family, Family::Any);
        assert_eq!(c.resolver.timeout, Duration::from_secs(2));
        assert_eq!(c.resolver.stale_on_error, Some(Duration::from_secs(300)));
        assert_eq!(c.health.retry_down_after, Duration::from_secs(1));
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.runtime.worker_threads, 0);
        Ok(())
    });
}

#[test]
fn worker_threads_past_the_limit_is_refused_not_started() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "ok.toml",
            &format!("{ROUTE}\n[runtime]\nworker_threads = 1024\n"),
        )?;
        let c = load_file(jail, "ok.toml").map_err(|e| e.to_string())?;
        assert_eq!(c.runtime.worker_threads, 1024);
        // One zero too many: refused at load, before any thread starts.
        jail.create_file(
            "typo.toml",
            &format!("{ROUTE}\n[runtime]\nworker_threads = 1025\n"),
        )?;
        let e = load_file(jail, "typo.toml").expect_err("must fail");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "runtime.worker_threads");
        assert!(p[0].2.contains("1025") && p[0].2.contains("1024"), "{p:?}");
        Ok(())
    });
}

#[test]
fn unknown_key_is_named_with_its_file() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", &format!("{ROUTE}\n[resolver]\ntimout = \"2s\"\n"))?;
        let e = load_file(jail, "c.toml").expect_err("unknown key must fail");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "resolver.timout");
        assert!(
            p[0].1.contains("c.toml"),
            "source must name the file: {p:?}"
        );
        assert!(p[0].2.contains("unknown key"), "{p:?}");
        Ok(())
    });
}

#[test]
fn every_problem_is_reported_at_once() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            r#"
[[route]]
listen = "0.0.0.0:41000"
alias = "bad_name.example"
port = 41000
connect_timeout = 5
attempt_delay = "soon"
colour = "blue"

[resolver]
timeout = "2 fortnights"
family = "ipv5"
"#,
        )?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let keys: Vec<String> = e.problems.iter().map(|p| p.key.clone()).collect();
        for want in [
            "route[0].listen",
            "route[0].alias",
            "route[0].connect_timeout",
            "route[0].attempt_delay",
            "route[0].colour",
            "resolver.timeout",
            "resolver.family",
        ] {
            assert!(
                keys.iter().any(|k| k == want),
                "{want} not reported in {keys:?}"
            );
        }
        assert!(
            e.problems.iter().all(|p| p.source.contains("c.toml")),
            "{e}"
        );
        let text = e.to_string();
        assert_eq!(
            text.lines().count(),
            e.problems.len(),
            "one line per problem"
        );
        assert!(text.contains("not a loopback address"), "{text}");
        assert!(text.contains("is not a duration"), "{text}");
        Ok(())
    });
}

#[test]
fn alias_must_be_a_hostname_or_ip() {
    for good in [
        "localhost",
        "db-1.example.com",
        "db.example.com.",
        "10.0.0.1",
        "::1",
        "a",
    ] {
        assert!(Alias::parse(good).is_ok(), "{good} should be accepted");
    }
    // RFC 1035's limits: 63 characters a label, 253 a name (without the
    // trailing dot), each allowed exactly and refused one above.
    let label_63 = format!("{}.example", "a".repeat(63));
    let three_labels = vec!["a".repeat(63); 3].join(".");
    let name_253 = format!("{three_labels}.{}", "b".repeat(61));
    let name_254 = format!("{three_labels}.{}", "b".repeat(62));
    assert_eq!(name_253.len(), 253);
    for good in [&label_63, &name_253, &format!("{name_253}.")] {
        assert!(Alias::parse(good).is_ok(), "{good} should be accepted");
    }
    let long_label = format!("{}.example", "a".repeat(64));
    for bad in [
        "",
        "under_score.example",
        "-lead.example",
        "trail-.example",
        "double..dot",
        "space name",
        "ünïcode.example",
        long_label.as_str(),
        name_254.as_str(),
    ] {
        assert!(Alias::parse(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn non_loopback_listen_needs_allow_non_loopback() {
    Jail::expect_with(|jail| {
        let route = ROUTE.replace("127.0.0.1:41000", "0.0.0.0:41000");
        jail.create_file("no.toml", &route)?;
        let e = load_file(jail, "no.toml").expect_err("must be refused");
        assert_eq!(e.problems[0].key, "route[0].listen");
        jail.create_file("yes.toml", &format!("{route}allow_non_loopback = true\n"))?;
        let c = load_file(jail, "yes.toml").map_err(|e| e.to_string())?;
        assert_eq!(
            c.routes[0].listen,
            "0.0.0.0:41000".parse::<SocketAddr>().unwrap()
        );
        Ok(())
    });
    // The admin endpoint has its own switch: a pod's Prometheus scrapes it
    // from outside, while the routes stay on loopback.
    Jail::expect_with(|jail| {
        let admin = "[admin]\nlisten = \"0.0.0.0:9464\"\n";
        jail.create_file("no.toml", &format!("{ROUTE}{admin}"))?;
        let e = load_file(jail, "no.toml").expect_err("must be refused");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "admin.listen");
        assert!(p[0].2.contains("allow_non_loopback"), "{p:?}");
        jail.create_file(
            "yes.toml",
            &format!("{ROUTE}{admin}allow_non_loopback = true\n"),
        )?;
        let c = load_file(jail, "yes.toml").map_err(|e| e.to_string())?;
        assert_eq!(c.admin.listen, Some("0.0.0.0:9464".parse().unwrap()));
        Ok(())
    });
}

#[test]
fn the_admin_endpoint_cannot_listen_where_a_route_does() {
    // Under socket activation each would take the socket systemd passed
    // for that address, and they would share its connections unnoticed.
    Jail::expect_with(|jail| {
        let named = ROUTE.replace("[[route]]", "[[route]]\nname = \"mgmt\"");
        jail.create_file("c.toml", &named)?;
        jail.set_env("FAILOVER_PROXY_ADMIN__LISTEN", "127.0.0.1:41000");
        let e = load_file(jail, "c.toml").expect_err("must be refused");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "admin.listen");
        assert!(p[0].1.contains("FAILOVER_PROXY_ADMIN__LISTEN"), "{p:?}");
        assert!(
            p[0].2
                .contains("127.0.0.1:41000 is the listen of route mgmt"),
            "{p:?}"
        );
        // A route wrong elsewhere still clashes: one run names both.
        jail.create_file(
            "both.toml",
            &named.replace("port = 41000", "port = 41000\nconnect_timeout = \"0s\""),
        )?;
        let e = load_file(jail, "both.toml").expect_err("must be refused");
        let mut keys: Vec<String> = problems(&e).into_iter().map(|p| p.0).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["admin.listen", "route[0].connect_timeout"], "{e}");
        assert!(
            e.to_string()
                .contains("127.0.0.1:41000 is the listen of route mgmt"),
            "{e}"
        );
        // Another port, or port 0 on both (each draws its own), is fine.
        jail.set_env("FAILOVER_PROXY_ADMIN__LISTEN", "127.0.0.1:41001");
        load_file(jail, "c.toml").map_err(|e| e.to_string())?;
        jail.create_file("zero.toml", &named.replace(":41000\"", ":0\""))?;
        jail.set_env("FAILOVER_PROXY_ADMIN__LISTEN", "127.0.0.1:0");
        load_file(jail, "zero.toml").map_err(|e| e.to_string())?;
        Ok(())
    });
}

#[test]
fn an_empty_route_name_is_refused_and_not_taken_for_a_duplicate() {
    Jail::expect_with(|jail| {
        let unnamed = |port: u16| {
            format!(
                "[[route]]\nname = \"\"\nlisten = \"127.0.0.1:{port}\"\nalias = \"a{port}.example\"\nport = 1\n"
            )
        };
        jail.create_file("c.toml", &format!("{}{}", unnamed(41000), unnamed(41001)))?;
        let e = load_file(jail, "c.toml").expect_err("an empty name");
        let p = problems(&e);
        let keys: Vec<&str> = p.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(keys, ["route[0].name", "route[1].name"], "{e}");
        assert!(p.iter().all(|p| p.2 == "must not be empty"), "{e}");
        Ok(())
    });
}

#[test]
fn the_config_file_comes_from_the_flag_then_the_variable_then_the_default() {
    use std::path::Path;
    let named = |p: &str, how: &str| ConfigPath::Named(PathBuf::from(p), how.into());
    assert_eq!(
        config::config_path(Some(Path::new("/a.toml")), Some("/b.toml".into())),
        named("/a.toml", "--config")
    );
    assert_eq!(
        config::config_path(None, Some("/b.toml".into())),
        named("/b.toml", "FAILOVER_PROXY_CONFIG")
    );
    // Set but empty, as `FAILOVER_PROXY_CONFIG=` in a unit file: unset.
    for unset in [None, Some("".into())] {
        assert_eq!(
            config::config_path(None, unset),
            ConfigPath::Default(PathBuf::from("/etc/failover-proxy/failover-proxy.toml"))
        );
    }
}

#[test]
fn environment_alone_configures_a_container() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "FAILOVER_PROXY_ROUTE",
            r#"[{listen="127.0.0.1:41000", alias="my-cluster", port=41000, order="round-robin"}]"#,
        );
        jail.set_env("FAILOVER_PROXY_RESOLVER__TIMEOUT", "3s");
        jail.set_env(
            "FAILOVER_PROXY_RESOLVER__NAMESERVERS",
            r#"["127.0.0.1:5353"]"#,
        );
        jail.set_env("FAILOVER_PROXY_LOG__FORMAT", "json");
        // The config path variable is not a config key.
        jail.set_env("FAILOVER_PROXY_CONFIG", "");
        let missing = jail.directory().join("absent.toml");
        let c = config::load(&ConfigPath::Default(missing)).map_err(|e| e.to_string())?;
        assert_eq!(c.routes[0].alias, Alias::Host("my-cluster".into()));
        assert_eq!(c.routes[0].order, Order::RoundRobin);
        assert_eq!(c.resolver.timeout, Duration::from_secs(3));
        assert_eq!(
            c.resolver.nameservers,
            vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.log.format, config::LogFormat::Json);
        Ok(())
    });
}

#[test]
fn environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            &format!("{ROUTE}\n[resolver]\ntimeout = \"2s\"\n"),
        )?;
        jail.set_env("FAILOVER_PROXY_RESOLVER__TIMEOUT", "7s");
        let c = load_file(jail, "c.toml").map_err(|e| e.to_string())?;
        assert_eq!(c.resolver.timeout, Duration::from_secs(7));
        Ok(())
    });
}

#[test]
fn environment_errors_name_the_real_variable() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", ROUTE)?;
        jail.set_env("FAILOVER_PROXY_RESOLVER__TIMEOUT", "5");
        jail.set_env("FAILOVER_PROXY_SHUTDOWN__DRAIN_TIMEOUT", "later");
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let p = problems(&e);
        assert!(
            p.iter().any(|(k, s, _)| k == "resolver.timeout"
                && s == "environment variable FAILOVER_PROXY_RESOLVER__TIMEOUT"),
            "{p:?}"
        );
        assert!(
            p.iter().any(|(k, s, _)| k == "shutdown.drain_timeout"
                && s == "environment variable FAILOVER_PROXY_SHUTDOWN__DRAIN_TIMEOUT"),
            "{p:?}"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env(
            "FAILOVER_PROXY_ROUTE",
            r#"[{listen="127.0.0.1:41000", alias="no_underscores", port=41000}]"#,
        );
        let e = config::load(&ConfigPath::Default(jail.directory().join("absent.toml")))
            .expect_err("must fail");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "route[0].alias");
        assert_eq!(p[0].1, "environment variable FAILOVER_PROXY_ROUTE");
        Ok(())
    });
}

#[test]
fn missing_named_file_and_missing_routes_are_errors() {
    Jail::expect_with(|jail| {
        let e = load_file(jail, "nope.toml").expect_err("named file must exist");
        assert!(e.to_string().contains("nope.toml"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A directory is there and opens, but is no configuration.
        let dir = jail.directory().join("conf.d");
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        let e = config::load(&ConfigPath::Named(dir, "--config".into()))
            .expect_err("a directory is not a config file");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].1.contains("conf.d (named by --config)"), "{p:?}");
        assert_eq!(p[0].2, "does not exist or is not a file");
        let e = config::load(&ConfigPath::Default(jail.directory().join("absent.toml")))
            .expect_err("no route at all");
        assert_eq!(e.problems[0].key, "route");
        // An empty array is no route either, whoever set it.
        jail.create_file("empty.toml", "route = []\n")?;
        let e = load_file(jail, "empty.toml").expect_err("an empty route array");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "route");
        assert!(p[0].1.contains("empty.toml"), "{p:?}");
        jail.set_env("FAILOVER_PROXY_ROUTE", "[]");
        let e = config::load(&ConfigPath::Default(jail.directory().join("absent.toml")))
            .expect_err("an empty route variable");
        let p = problems(&e);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].1, "environment variable FAILOVER_PROXY_ROUTE");
        Ok(())
    });
}

#[test]
fn a_config_file_that_is_there_but_cannot_be_read_is_an_error_not_skipped() {
    Jail::expect_with(|jail| {
        // A symbolic link to itself: there, and never readable, even by
        // root. The default file in that state used to be passed over, and
        // its routes went missing without a word about the file.
        let looped = jail.directory().join("looped.toml");
        std::os::unix::fs::symlink(&looped, &looped).map_err(|e| e.to_string())?;
        for (path, how) in [
            (ConfigPath::Default(looped.clone()), "(the default)"),
            (
                ConfigPath::Named(looped.clone(), "--config".into()),
                "(named by --config)",
            ),
        ] {
            let e = config::load(&path).expect_err("an unreadable file");
            let p = problems(&e);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(
                p[0].1.contains("looped.toml") && p[0].1.contains(how),
                "{p:?}"
            );
            assert!(
                p[0].2.starts_with("cannot be read: ") && p[0].2.contains("symbolic links"),
                "{p:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_route_without_a_required_key_is_refused_naming_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[[route]]\nname = \"empty\"\n\n[[route]]\nlisten = \"127.0.0.1:41001\"\nalias = \"b.example\"\n\n[[route]]\nlisten = 41002\nalias = 7\nport = \"https\"\n",
        )?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let p = problems(&e);
        let keys: Vec<&str> = p.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "route[0].listen",
                "route[0].alias",
                "route[0].port",
                "route[1].port",
                "route[2].listen",
                "route[2].alias",
                "route[2].port"
            ],
            "{p:?}"
        );
        for (key, source, message) in &p {
            assert!(source.contains("c.toml"), "{key}: {source}");
            // A key that is there with a wrong value is not "required".
            let required = !key.starts_with("route[2]");
            assert_eq!(
                message.starts_with("is required"),
                required,
                "{key}: {message}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_whole_number_out_of_range_gets_its_range_whichever_way_it_is_out() {
    // The deserializer's own words ("expected u16") name a Rust type, not
    // what the key takes.
    let cases = [
        ("port", "0", "must be 1 to 65535, not 0"),
        ("port", "70000", "must be 1 to 65535, not 70000"),
        ("port", "-1", "must be 1 to 65535, not -1"),
        (
            "port",
            "\"8080\"",
            "expected a whole number, found string \"8080\"",
        ),
        ("port", "1.5", "expected a whole number, found float `1.5`"),
        ("max_connections", "0", "must be 1 to 4294967295, not 0"),
        (
            "max_connections",
            "5000000000",
            "must be 1 to 4294967295, not 5000000000",
        ),
    ];
    for (key, value, message) in cases {
        Jail::expect_with(|jail| {
            let port = if key == "port" { "" } else { "port = 1\n" };
            jail.create_file(
                "c.toml",
                &format!("[[route]]\nlisten = \"127.0.0.1:41000\"\nalias = \"a\"\n{port}{key} = {value}\n"),
            )?;
            let e = load_file(jail, "c.toml").expect_err("must fail");
            let p = problems(&e);
            assert_eq!(p.len(), 1, "{key} = {value}: {p:?}");
            assert_eq!(p[0].0, format!("route[0].{key}"));
            assert_eq!(p[0].2, message, "{key} = {value}");
            Ok(())
        });
    }
}

#[test]
fn duplicate_listen_and_names_are_refused() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", &format!("{ROUTE}{ROUTE}"))?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"route[1].listen"), "{keys:?}");
        assert!(keys.contains(&"route[1].name"), "{keys:?}");
        // Each names the file, the name too, though it is the alias by
        // default and written nowhere.
        let file = format!("file {}", jail.directory().join("c.toml").display());
        for p in &e.problems {
            assert_eq!(p.source, file, "{p}");
        }
        let name = e
            .problems
            .iter()
            .find(|p| p.key == "route[1].name")
            .unwrap();
        assert!(
            name.message.contains("its alias, as no name is set"),
            "{name}"
        );
        Ok(())
    });
}

#[test]
fn a_clash_is_reported_beside_the_other_problems_of_its_route() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            r#"
[[route]]
name = "x"
listen = "127.0.0.1:41000"
alias = "a..b"
port = 41000

[[route]]
name = "x"
listen = "127.0.0.1:41000"
alias = "b"
port = 0

[[route]]
listen = "127.0.0.1:41001"
alias = "c"
port = 41000

[[route]]
listen = "127.0.0.1:41002"
alias = "c"
order = "sideways"
port = 41000
"#,
        )?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let mut keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "route[0].alias",
                "route[1].listen",
                "route[1].name",
                "route[1].port",
                "route[3].name",
                "route[3].order",
            ],
            "{e}"
        );
        Ok(())
    });
}

#[test]
fn a_log_level_that_would_silence_the_proxy_is_refused() {
    // `None`: accepted; else how the refusal starts.
    for (level, refused) in [
        ("info", None),
        ("WARN", None),
        ("warn,failover_proxy=debug", None),
        ("failover_proxy[conn]=debug", None),
        ("off", None),
        ("wran", Some(r#""wran" is not a level (trace,"#)),
        // Within a longer filter, the word is named with where it is.
        (
            "info,hyper",
            Some(r#""hyper" in "info,hyper" is not a level"#),
        ),
        ("", Some("is empty; expected a level")),
        (
            "failover_proxy=wran",
            Some(r#""failover_proxy=wran" is not a log filter: "#),
        ),
    ] {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", &format!("{ROUTE}\n[log]\nlevel = {level:?}\n"))?;
            match load_file(jail, "c.toml") {
                Ok(c) => {
                    assert!(refused.is_none(), "{level:?} was accepted");
                    assert_eq!(c.log.level, level);
                }
                Err(e) => {
                    let want = refused.unwrap_or_else(|| panic!("{level:?} was refused: {e}"));
                    let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
                    assert_eq!(keys, ["log.level"], "{e}");
                    assert!(e.problems[0].message.starts_with(want), "{e}");
                }
            }
            Ok(())
        });
    }
}

#[test]
fn nameservers_are_addresses_with_a_real_port() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            &format!(
                "{ROUTE}[resolver]\nnameservers = [\"10.0.0.1\", \"10.0.0.2:5353\", \"::1\", \"[::1]:5353\"]\n"
            ),
        )?;
        let c = load_file(jail, "c.toml").map_err(|e| e.to_string())?;
        let want: Vec<SocketAddr> = ["10.0.0.1:53", "10.0.0.2:5353", "[::1]:53", "[::1]:5353"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(c.resolver.nameservers, want);
        // A name, a port without an address, and port 0 (every query would
        // wait out the timeout): each named with its index and file.
        jail.create_file(
            "d.toml",
            &format!(
                "{ROUTE}[resolver]\nnameservers = [\"dns.example:53\", \":53\", \"127.0.0.1:0\", \"10.0.0.1\"]\n"
            ),
        )?;
        let e = load_file(jail, "d.toml").expect_err("must fail");
        let text = e.to_string();
        assert_eq!(e.problems.len(), 3, "{text}");
        for (i, want) in [
            (0, "\"dns.example:53\" is not \"ip\" or \"ip:port\""),
            (1, "\":53\" is not"),
            (2, "\"127.0.0.1:0\" has port 0"),
        ] {
            let p = &e.problems[i];
            assert_eq!(p.key, format!("resolver.nameservers[{i}]"), "{text}");
            assert!(p.source.contains("d.toml"), "{text}");
            assert!(p.message.contains(want), "{want} not in {text}");
        }
        Ok(())
    });
}

#[test]
fn durations_outside_their_range_are_refused_naming_the_key() {
    Jail::expect_with(|jail| {
        // The bounds themselves are accepted, and 0s turns probes off.
        for (name, interval) in [("a.toml", "100ms"), ("b.toml", "0s")] {
            jail.create_file(
                name,
                &format!(
                    "{ROUTE}[health]\ninterval = \"{interval}\"\nretry_down_after = \"30s\"\n"
                ),
            )?;
            load_file(jail, name).map_err(|e| e.to_string())?;
        }
        jail.create_file(
            "c.toml",
            &format!(
                "{ROUTE}connect_timeout = \"0s\"\n[health]\ninterval = \"1ms\"\nretry_down_after = \"31s\"\n[resolver]\ntimeout = \"0s\"\n"
            ),
        )?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        let text = e.to_string();
        let got: Vec<(String, String, String)> = problems(&e);
        for (key, want) in [
            ("route[0].connect_timeout", "must be more than 0s"),
            // A typo for 1m: every client host's sidecar would probe every
            // server a thousand times a second.
            (
                "health.interval",
                "must be 0s (no probes) or at least 100ms: 1ms would probe every server 1000 times a second",
            ),
            ("health.retry_down_after", "must be at most 30s"),
            ("resolver.timeout", "must be more than 0s"),
        ] {
            assert!(
                got.iter().any(|(k, source, m)| k == key
                    && source.contains("c.toml")
                    && m.contains(want)),
                "{key}: {want:?} not in {text}"
            );
        }
        assert_eq!(got.len(), 4, "{text}");
        Ok(())
    });
}

#[test]
fn toml_syntax_error_names_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[[route]\nlisten = ")?;
        let e = load_file(jail, "c.toml").expect_err("must fail");
        assert!(e.to_string().contains("c.toml"), "{e}");
        // One problem, one line: the reload log and the start-up error
        // stay one line each, with the place and the offending text.
        jail.create_file("d.toml", &format!("{ROUTE}port = 2\n"))?;
        let e = load_file(jail, "d.toml").expect_err("must fail");
        let text = e.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        for want in ["d.toml", "line 6", "\"port = 2\"", "duplicate key `port`"] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        // Neither the caret line nor the blank ones of the drawing.
        let message = &e.problems[0].message;
        assert!(
            message.split(": ").all(|part| !part.trim().is_empty()),
            "{message}"
        );
        assert!(!message.contains('^'), "{message}");
        Ok(())
    });
}
