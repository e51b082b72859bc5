//! Property tests: no input makes the config or hosts-file parsers panic,
//! and every rejection names its key or line.

use failover_proxy::config;
use failover_proxy::resolve::{parse_hosts, parse_hosts_checked};
use figment::Figment;
use figment::providers::{Format, Toml};
use proptest::prelude::*;

/// Every route key, and one that is not.
fn keys() -> Vec<&'static str> {
    let mut k = config::ROUTE_KEYS.to_vec();
    k.push("bogus");
    k
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9._:-]{0,20}".prop_map(|s| format!("{s:?}")),
        "[0-9]{1,4}(ms|s|m|h|x)?".prop_map(|s| format!("{s:?}")),
        Just("\"127.0.0.1:41000\"".to_string()),
        Just("\"0.0.0.0:1\"".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn hosts_parser_never_panics_and_names_skipped_lines(text in "(?s).{0,400}") {
        let (table, skipped) = parse_hosts_checked(&text);
        for s in &skipped {
            prop_assert!(s.line >= 1 && s.line <= text.lines().count());
        }
        prop_assert_eq!(table, parse_hosts(&text));
    }

    #[test]
    fn hosts_lines_keep_file_order(ips in proptest::collection::vec(any::<[u8; 4]>(), 1..20)) {
        let text: String = ips.iter().map(|o| format!("{}.{}.{}.{} alias.test\n", o[0], o[1], o[2], o[3])).collect();
        let table = parse_hosts(&text);
        let mut want: Vec<std::net::IpAddr> = Vec::new();
        for o in &ips {
            let ip = std::net::IpAddr::from(*o);
            if !want.contains(&ip) {
                want.push(ip);
            }
        }
        prop_assert_eq!(table.get("alias.test"), Some(&want));
    }

    #[test]
    fn config_never_panics_and_every_problem_names_a_key(
        entries in proptest::collection::vec((proptest::sample::select(keys()), value()), 0..12),
        resolver_timeout in value(),
    ) {
        let mut toml = String::from("[[route]]\n");
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &entries {
            if seen.insert(*k) {
                toml.push_str(&format!("{k} = {v}\n"));
            }
        }
        toml.push_str(&format!("[resolver]\ntimeout = {resolver_timeout}\n"));
        match config::from_figment(&Figment::from(Toml::string(&toml))) {
            Ok(c) => prop_assert_eq!(c.routes.len(), 1),
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                for p in &e.problems {
                    prop_assert!(!p.key.is_empty() || !p.source.is_empty(), "{:?}", p);
                    prop_assert!(!p.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn arbitrary_toml_text_never_panics(text in "(?s).{0,300}") {
        let _ = config::from_figment(&Figment::from(Toml::string(&text)));
    }
}
