//! Unit tests of the roles.toml parser: the example file, every accepted
//! form, and the position, field and kind of every error.

use std::net::IpAddr;

use super::*;
use crate::policy::{Action, Defaults, Loc, PolicyErrorKind, PortRange};

fn parse(text: &str) -> Policy {
    match parse_str(text, "t.toml") {
        Ok(p) => p,
        Err(e) => panic!("unexpected error: {e}\n{text}"),
    }
}

fn err(text: &str) -> PolicyError {
    match parse_str(text, "t.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error's line:column, field and kind.
#[track_caller]
fn check(text: &str, line: u32, col: u32, field: &str, kind: PolicyErrorKind) {
    let e = err(text);
    assert_eq!(
        (e.line_col(), e.field.as_str(), &e.kind),
        (Some((line, col)), field, &kind),
        "got: {e}"
    );
    assert_eq!(e.source, "t.toml");
}

/// Like [`check`] for kinds that carry a message: matches the variant
/// and asserts the message contains `needle`.
#[track_caller]
fn check_msg(text: &str, line: u32, col: u32, field: &str, needle: &str) -> PolicyError {
    let e = err(text);
    assert_eq!(
        (e.line_col(), e.field.as_str()),
        (Some((line, col)), field),
        "got: {e}"
    );
    assert!(e.to_string().contains(needle), "`{e}` lacks `{needle}`");
    e
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

// ----- the example ---------------------------------------------------

const EXAMPLE: &str = include_str!("../../../../examples/roles.toml");

#[test]
fn example_parses() {
    let p = parse(EXAMPLE);
    assert_eq!(p.version, 1);
    assert_eq!(p.source, "t.toml");
    let sets: Vec<_> = p
        .sets
        .iter()
        .map(|s| (s.name.as_str(), s.loc.line))
        .collect();
    assert_eq!(
        sets,
        [
            ("admin_net", 4),
            ("web_nodes", 5),
            ("app_nodes", 6),
            ("db_nodes", 7),
            ("lb", 8),
            ("backup", 9)
        ]
    );
    assert_eq!(p.sets[3].ranges.len(), 2);
    assert!(!p.sets[3].ranges[1].family_is_v4());
    assert_eq!(
        p.defaults,
        Defaults {
            ingress: Action::Drop,
            egress: Action::Drop,
            established: true,
            icmp: true,
            log_rate: 10,
            link_local: true,
        }
    );
    let roles: Vec<_> = p
        .roles
        .iter()
        .map(|r| (r.name.as_str(), r.hosts_text.as_deref(), r.loc))
        .collect();
    assert_eq!(
        roles,
        [
            (
                "web",
                Some("web_nodes"),
                Loc {
                    line: 30,
                    column: 1
                }
            ),
            (
                "app",
                Some("app_nodes"),
                Loc {
                    line: 41,
                    column: 1
                }
            ),
            (
                "db",
                Some("db_nodes"),
                Loc {
                    line: 56,
                    column: 1
                }
            ),
        ]
    );
    assert_eq!(p.rules.len(), 9);
    let rules: Vec<_> = p
        .rules
        .iter()
        .map(|r| {
            (
                r.id,
                r.label(),
                r.loc.line,
                r.peer_text.as_str(),
                r.services(),
            )
        })
        .collect();
    let want = [
        (0, "base.ingress[0]", 18, "admin_net", "tcp/22"),
        (1, "base.egress[0]", 22, "any", "udp/53,123"),
        (2, "base.egress[1]", 26, "any", "tcp/80,443"),
        (3, "roles.web.ingress[0]", 33, "any", "tcp/80,443"),
        (4, "roles.web.egress[0]", 37, "app_nodes", "tcp/8080"),
        (5, "roles.app.ingress[0]", 44, "web_nodes", "tcp/8080"),
        (6, "roles.app.egress[0]", 48, "db_nodes", "tcp/5432,3306"),
        (7, "roles.app.egress[1]", 52, "[backup]", "tcp/2500-3300"),
        (8, "roles.db.ingress[0]", 59, "app_nodes", "tcp/5432,3306"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|&(id, l, line, peer, svc)| (id, l.to_string(), line, peer, svc.to_string()))
        .collect();
    assert_eq!(rules, want);
    for (i, r) in p.rules.iter().enumerate() {
        assert_eq!(r.id as usize, i);
        assert_eq!(r.loc.column, 1);
        assert_eq!(r.interfaces, None);
    }
    // Resolution: `any` is both families, sets are copied, literals parsed.
    assert_eq!(p.rules[1].peers, [AddrRange::any_v4(), AddrRange::any_v6()]);
    assert_eq!(p.rules[6].peers, p.sets[3].ranges);
    assert_eq!(p.rules[7].tcp, [PortRange { lo: 2500, hi: 3300 }]);
    assert!(p.rules[0].peers[0].contains(ip("10.10.0.63")));
    assert!(!p.rules[0].peers[0].contains(ip("10.10.0.64")));
    assert_eq!(p.role("db").map(|r| r.hosts.len()), Some(2));
}

#[test]
fn example_on_disk_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/roles.toml");
    let p = Policy::load(&path).expect("examples/roles.toml loads");
    assert_eq!(p.rules.len(), 9);
    assert!(p.source.ends_with("roles.toml"));
}

// ----- accepted forms ------------------------------------------------

#[test]
fn defaults_when_omitted() {
    let p = parse("version = 1\n[roles.r]\nhosts = \"any\"\n");
    assert_eq!(p.defaults, Defaults::default());
    assert_eq!(p.defaults.egress, Action::Allow);
    assert_eq!(p.defaults.log_rate, 10);
    assert!(p.sets.is_empty() && p.rules.is_empty());
    assert_eq!(p.roles[0].hosts, [AddrRange::any_v4(), AddrRange::any_v6()]);
    let p = parse("version = 1\n[defaults]\negress = \"drop\"\nlog_rate = 0\n");
    assert_eq!(p.defaults.ingress, Action::Drop);
    assert_eq!(p.defaults.egress, Action::Drop);
    assert_eq!(p.defaults.log_rate, 0);
    let p = parse(
        "version = 1\n[defaults]\ningress = \"allow\"\nestablished = false\nicmp = false\nlog_rate = 1_000_000\nlink_local = false\n",
    );
    assert_eq!(
        p.defaults,
        Defaults {
            ingress: Action::Allow,
            egress: Action::Allow,
            established: false,
            icmp: false,
            log_rate: 1_000_000,
            link_local: false,
        }
    );
    assert!(parse("version = 1\n").rules.is_empty());
}

#[test]
fn peer_forms() {
    let p = parse(
        "version = 1
[sets]
backup = \"10.10.2.50\"
[[base.egress]]
to = [\"backup\", \"10.0.0.1\", \"fd00::/64\", \"10.0.1.1-10.0.1.5\"]
udp = [\"53\"]
[[base.ingress]]
from = \"192.0.2.0/24\"
icmp = true
",
    );
    let r = &p.rules[0];
    assert_eq!(
        r.peer_text,
        "[backup, 10.0.0.1, fd00::/64, 10.0.1.1-10.0.1.5]"
    );
    assert_eq!(r.peers.len(), 4);
    assert_eq!(r.peers[0], p.sets[0].ranges[0]);
    assert!(r.peers[2].contains(ip("fd00::ffff")));
    assert!(r.peers[3].contains(ip("10.0.1.5")));
    assert_eq!(r.udp, [PortRange::single(53)]);
    let r = &p.rules[1];
    assert_eq!(r.peer_text, "192.0.2.0/24");
    assert!(r.icmp && !r.icmpv6 && r.tcp.is_empty());
}

#[test]
fn protocol_forms() {
    let p = parse(
        "version = 1
[[base.ingress]]
from = \"any\"
proto = \"any\"
interfaces = [\"eth1\", \"bond0.100\"]
[[base.ingress]]
from = \"any\"
icmpv6 = true
icmp = false
[[base.ingress]]
from = \"any\"
tcp = [0, 65535, \"1024-2047\"]
udp = 5353
[[base.ingress]]
from = \"any\"
tcp = \"8000-8099\"
",
    );
    assert!(p.rules[0].any_proto);
    assert_eq!(
        p.rules[0].interfaces.as_deref(),
        Some(&["eth1".to_string(), "bond0.100".to_string()][..])
    );
    assert!(p.rules[1].icmpv6 && !p.rules[1].icmp);
    assert_eq!(
        p.rules[2].tcp,
        [
            PortRange::single(0),
            PortRange::single(65535),
            PortRange { lo: 1024, hi: 2047 }
        ]
    );
    assert_eq!(p.rules[2].udp, [PortRange::single(5353)]);
    assert_eq!(p.rules[3].tcp, [PortRange { lo: 8000, hi: 8099 }]);
}

#[test]
fn rule_ids_follow_file_order() {
    let p = parse(
        "version = 1
[[roles.b.ingress]]
from = \"any\"
tcp = [1]

[[base.egress]]
to = \"any\"
tcp = [2]

[roles.a]
hosts = \"10.0.0.1\"
egress = [{ to = \"any\", tcp = [3] }, { to = \"any\", tcp = [4] }]

[[roles.b.ingress]]
from = \"any\"
tcp = [5]

[[base.ingress]]
from = \"any\"
tcp = [6]
",
    );
    let got: Vec<_> = p
        .rules
        .iter()
        .map(|r| (r.id, r.tcp[0].lo, r.label(), r.loc))
        .collect();
    let l = |line, column| Loc { line, column };
    assert_eq!(
        got,
        [
            (0, 1, "roles.b.ingress[0]".to_string(), l(2, 1)),
            (1, 2, "base.egress[0]".to_string(), l(6, 1)),
            (2, 3, "roles.a.egress[0]".to_string(), l(12, 11)),
            (3, 4, "roles.a.egress[1]".to_string(), l(12, 38)),
            (4, 5, "roles.b.ingress[1]".to_string(), l(14, 1)),
            (5, 6, "base.ingress[0]".to_string(), l(18, 1)),
        ]
    );
    // Roles in file order; a role with rules but no hosts is fine.
    let roles: Vec<_> = p.roles.iter().map(|r| (r.name.as_str(), r.loc)).collect();
    assert_eq!(roles, [("b", l(2, 9)), ("a", l(10, 1))]);
    assert_eq!(p.roles[0].hosts_text, None);
    assert!(p.roles[0].hosts.is_empty());
}

#[test]
fn columns_count_characters() {
    // `é` is two bytes; the column is in characters.
    check_msg(
        "version = 1\n[sets]\na = [\"é\", \"10.0.0.300\"]\n",
        3,
        6,
        "sets.a[0]",
        "not an IPv4 or IPv6 address",
    );
    check_msg(
        "version = 1\n[sets]\na = [\"1.1.1.1\", \"é\", \"10.0.0.300\"]\n",
        3,
        17,
        "sets.a[1]",
        "`é`",
    );
    check(
        "version = 1\n[sets] # é\nb = \"any\"\nc = [\"10.0.0.1\", \"10.0.0.9-10.0.0.1\"]\n",
        3,
        5,
        "sets.b",
        PolicyErrorKind::BadAddress(
            "`any` is not an address; sets hold addresses, CIDRs and ranges, not set names".into(),
        ),
    );
    check(
        "version = 1\n[sets]\nc = [\"é\", \"10.0.0.9-10.0.0.1\"]\n",
        3,
        6,
        "sets.c[0]",
        PolicyErrorKind::BadAddress("`é` is not an IPv4 or IPv6 address".into()),
    );
    check(
        "version = 1\n[sets]\nc = [\"10.0.0.1\", \"10.0.0.9-10.0.0.1\"] # é\n",
        3,
        18,
        "sets.c[1]",
        PolicyErrorKind::ReversedRange,
    );
    check(
        "version = 1\r\n[sets]\r\n\"é\" = [\"10.0.0.9-10.0.0.1\"]\r\n",
        3,
        1,
        "sets.\"é\"",
        PolicyErrorKind::BadValue(
            "invalid set name `é`: use a letter or `_` first, then letters, digits, `_` or `-`"
                .into(),
        ),
    );
}

// ----- every error kind ----------------------------------------------

#[test]
fn io_error() {
    let e = Policy::load(std::path::Path::new("/nonexistent/segbpf/roles.toml"))
        .expect_err("missing file");
    assert!(matches!(e.kind, PolicyErrorKind::Io(_)));
    assert_eq!(e.line_col(), None);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/segbpf/roles.toml: cannot read the policy file: "),
        "{e}"
    );
}

#[test]
fn toml_syntax_errors() {
    let e = err("version = 1\n[sets\n");
    assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
    assert_eq!(e.line_col(), Some((2, 6)));
    assert_eq!(e.field, "");
    assert!(
        e.to_string().starts_with("t.toml:2:6: invalid TOML: "),
        "{e}"
    );
    let e = err("version = 1\nfoo = \n");
    assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
    assert_eq!(e.line_col(), Some((2, 7)));
    let e = err("version = 1\n[sets]\na = [\"10.0.0.1\"\n");
    assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
    assert_eq!(e.line_col().map(|(l, _)| l), Some(3));
    // A key repeated inside a rule is TOML's duplicate key, with the path.
    let e = err("version = 1\n[[base.ingress]]\nfrom = \"any\"\ntcp = [1]\ntcp = [2]\n");
    assert_eq!(
        (e.line_col(), e.field.as_str(), &e.kind),
        (
            Some((5, 1)),
            "base.ingress.tcp",
            &PolicyErrorKind::Toml("duplicate key `tcp`".into())
        )
    );
    // `[sets]` twice.
    let e = err("version = 1\n[sets]\na = \"10.0.0.1\"\n[sets]\nb = \"10.0.0.2\"\n");
    assert_eq!(e.line_col(), Some((4, 2)));
    assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
}

#[test]
fn version_errors() {
    check(
        "[sets]\na = \"10.0.0.1\"\n",
        1,
        1,
        "version",
        PolicyErrorKind::VersionMissing,
    );
    check("", 1, 1, "version", PolicyErrorKind::VersionMissing);
    check(
        "version = 2\n",
        1,
        11,
        "version",
        PolicyErrorKind::UnsupportedVersion(2),
    );
    check(
        "# policy\n  version = -1\n",
        2,
        13,
        "version",
        PolicyErrorKind::UnsupportedVersion(-1),
    );
    check_msg(
        "version = \"1\"\n",
        1,
        11,
        "version",
        "`version` must be the integer 1, found string \"1\"",
    );
    check_msg("version = 1.0\n", 1, 11, "version", "found float 1.0");
    assert_eq!(parse("version = 0x1\n").version, 1);
}

#[test]
fn unknown_keys() {
    check(
        "version = 1\nrole = {}\n",
        2,
        1,
        "role",
        PolicyErrorKind::UnknownKey("role".into()),
    );
    check(
        "version = 1\n[defaults]\nforward = \"drop\"\n",
        3,
        1,
        "defaults.forward",
        PolicyErrorKind::UnknownKey("forward".into()),
    );
    check(
        "version = 1\n[[base.forward]]\nfrom = \"any\"\n",
        2,
        8,
        "base.forward",
        PolicyErrorKind::UnknownKey("forward".into()),
    );
    check(
        "version = 1\n[roles.web]\nhost = \"any\"\n",
        3,
        1,
        "roles.web.host",
        PolicyErrorKind::UnknownKey("host".into()),
    );
    check(
        "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\ntcp = [80]\nports = [1]\n",
        5,
        1,
        "roles.web.ingress[0].ports",
        PolicyErrorKind::UnknownKey("ports".into()),
    );
}

#[test]
fn wrong_peer_key_has_a_hint() {
    let e = err("version = 1\n[[base.ingress]]\nto = \"any\"\ntcp = [22]\n");
    assert_eq!(
        (e.line_col(), e.field.as_str(), &e.kind),
        (
            Some((3, 1)),
            "base.ingress[0].to",
            &PolicyErrorKind::UnknownKey("to".into())
        )
    );
    assert_eq!(
        e.to_string(),
        "t.toml:3:1: base.ingress[0].to: unknown key `to`; ingress rules name the peer with `from`, egress rules with `to`"
    );
    check(
        "version = 1\n[[roles.app.egress]]\ntcp = [22]\n  from = \"any\"\n",
        4,
        3,
        "roles.app.egress[0].from",
        PolicyErrorKind::UnknownKey("from".into()),
    );
}

#[test]
fn unknown_sets() {
    check(
        "version = 1\n[sets]\nbackup = \"10.0.0.1\"\n[[roles.app.egress]]\nto = [\"backup\", \"bakup\"]\ntcp = [1]\n",
        5,
        17,
        "roles.app.egress[0].to[1]",
        PolicyErrorKind::UnknownSet("bakup".into()),
    );
    check(
        "version = 1\n[roles.web]\nhosts = \"web_nodes\"\n",
        3,
        9,
        "roles.web.hosts",
        PolicyErrorKind::UnknownSet("web_nodes".into()),
    );
}

#[test]
fn bad_addresses() {
    check(
        "version = 1\n[sets]\nnet = [\"10.0.0.0/8\", \"10.0.0.1/24\"]\n",
        3,
        22,
        "sets.net[1]",
        PolicyErrorKind::BadAddress(
            "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?".into(),
        ),
    );
    check_msg(
        "version = 1\n[[base.ingress]]\nfrom = \"10.0.0.300\"\ntcp = [1]\n",
        3,
        8,
        "base.ingress[0].from",
        "bad address: `10.0.0.300` is not an IPv4 or IPv6 address",
    );
    check_msg(
        "version = 1\n[sets]\nx = [\"10.0.0.1-fd00::1\"]\n",
        3,
        6,
        "sets.x[0]",
        "cannot mix IPv4 and IPv6",
    );
    check_msg(
        "version = 1\n[sets]\nx = [\"10.0.0.0/40\"]\n",
        3,
        6,
        "sets.x[0]",
        "too long for IPv4",
    );
    check_msg(
        "version = 1\n[sets]\nx = [10]\n",
        3,
        6,
        "sets.x[0]",
        "expected an address, CIDR or range string, found integer 10",
    );
    check_msg(
        "version = 1\n[roles.r]\nhosts = [\"10.0.0.1\", 5]\n",
        3,
        22,
        "roles.r.hosts[1]",
        "found integer 5",
    );
}

#[test]
fn address_ranges() {
    check(
        "version = 1\n[sets]\nx = [\"10.0.0.5-\"]\n",
        3,
        6,
        "sets.x[0]",
        PolicyErrorKind::EmptyRange,
    );
    check(
        "version = 1\n[[base.egress]]\nto = \"10.10.1.19-10.10.1.10\"\nudp = [1]\n",
        3,
        6,
        "base.egress[0].to",
        PolicyErrorKind::ReversedRange,
    );
    check(
        "version = 1\n[sets]\nx = \"fd00::9-fd00::1\"\n",
        3,
        5,
        "sets.x",
        PolicyErrorKind::ReversedRange,
    );
}

#[test]
fn port_errors() {
    let rule =
        |ports: &str| format!("version = 1\n[[roles.app.egress]]\nto = \"any\"\ntcp = {ports}\n");
    check(
        &rule("[80, 65536]"),
        4,
        12,
        "roles.app.egress[0].tcp[1]",
        PolicyErrorKind::PortOutOfRange,
    );
    check(
        &rule("[-1]"),
        4,
        8,
        "roles.app.egress[0].tcp[0]",
        PolicyErrorKind::PortOutOfRange,
    );
    check(
        &rule("[\"1-70000\"]"),
        4,
        8,
        "roles.app.egress[0].tcp[0]",
        PolicyErrorKind::PortOutOfRange,
    );
    check(
        &rule("[22, \"3300-2500\"]"),
        4,
        12,
        "roles.app.egress[0].tcp[1]",
        PolicyErrorKind::ReversedPortRange,
    );
    check(
        &rule("[\"8000-\"]"),
        4,
        8,
        "roles.app.egress[0].tcp[0]",
        PolicyErrorKind::EmptyRange,
    );
    check(
        &rule("[\"http\"]"),
        4,
        8,
        "roles.app.egress[0].tcp[0]",
        PolicyErrorKind::BadPort("`http` is not a port number or a \"lo-hi\" port range".into()),
    );
    check(
        &rule("[1.5]"),
        4,
        8,
        "roles.app.egress[0].tcp[0]",
        PolicyErrorKind::BadPort(
            "expected a port number or a \"lo-hi\" string, found float 1.5".into(),
        ),
    );
    check_msg(
        &rule("true"),
        4,
        7,
        "roles.app.egress[0].tcp",
        "expected a list of ports",
    );
}

#[test]
fn duplicates() {
    check(
        "version = 1\n[sets]\na = [\"10.0.0.1\"]\na = [\"10.0.0.2\"]\n",
        4,
        1,
        "sets.a",
        PolicyErrorKind::DuplicateSet("a".into()),
    );
    check(
        "version = 1\n[roles.web]\nhosts = \"any\"\n\n[roles.web]\nhosts = \"any\"\n",
        5,
        8,
        "roles.web",
        PolicyErrorKind::DuplicateRole("web".into()),
    );
    check(
        "version = 1\n[roles.web]\nhosts = \"any\"\n[roles]\nweb = { hosts = \"any\" }\n",
        5,
        1,
        "roles.web",
        PolicyErrorKind::DuplicateRole("web".into()),
    );
    check(
        "version = 1\n[roles]\ndb = { hosts = \"any\" }\n[ roles . \"db\" ]\n",
        4,
        11,
        "roles.db",
        PolicyErrorKind::DuplicateRole("db".into()),
    );
    // A rule table after a role's own table is not a duplicate.
    parse(
        "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\ntcp = [1]\n[roles.web]\nhosts = \"any\"\n",
    );
}

#[test]
fn empty_roles() {
    check(
        "version = 1\n[roles.web]\n",
        2,
        1,
        "roles.web",
        PolicyErrorKind::RoleEmpty("web".into()),
    );
    check(
        "version = 1\n[roles.ok]\nhosts = \"any\"\n[roles.web]\ningress = []\negress = []\n",
        4,
        1,
        "roles.web",
        PolicyErrorKind::RoleEmpty("web".into()),
    );
    check(
        "version = 1\n[roles]\nweb = {}\n",
        3,
        7,
        "roles.web",
        PolicyErrorKind::RoleEmpty("web".into()),
    );
}

#[test]
fn rules_need_a_protocol() {
    check(
        "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\n",
        2,
        1,
        "roles.web.ingress[0]",
        PolicyErrorKind::NoProtocol,
    );
    check(
        "version = 1\n[roles.web]\nhosts = \"any\"\n[[roles.web.egress]]\nto = \"any\"\ntcp = [1]\n[[roles.web.egress]]\nto = \"any\"\nicmp = false\nicmpv6 = false\n",
        7,
        1,
        "roles.web.egress[1]",
        PolicyErrorKind::NoProtocol,
    );
    check(
        "version = 1\n[base]\ningress = [ { from = \"any\" } ]\n",
        3,
        13,
        "base.ingress[0]",
        PolicyErrorKind::NoProtocol,
    );
}

#[test]
fn bad_values() {
    check_msg(
        "version = 1\n[defaults]\ningress = \"deny\"\n",
        3,
        11,
        "defaults.ingress",
        "`ingress` must be \"drop\" or \"allow\", found string \"deny\"",
    );
    check_msg(
        "version = 1\n[defaults]\nestablished = \"yes\"\n",
        3,
        15,
        "defaults.established",
        "must be true or false",
    );
    check_msg(
        "version = 1\n[defaults]\nlog_rate = 1000001\n",
        3,
        12,
        "defaults.log_rate",
        "from 0 to 1000000",
    );
    check_msg(
        "version = 1\n[defaults]\nlog_rate = -1\n",
        3,
        12,
        "defaults.log_rate",
        "from 0 to 1000000",
    );
    check_msg(
        "version = 1\ndefaults = 3\n",
        2,
        12,
        "defaults",
        "must be a table",
    );
    check_msg(
        "version = 1\n[[base.ingress]]\ntcp = [22]\n",
        2,
        1,
        "base.ingress[0]",
        "missing `from`",
    );
    check_msg(
        "version = 1\n[[roles.x.egress]]\ntcp = [22]\n",
        2,
        1,
        "roles.x.egress[0]",
        "missing `to`",
    );
    check_msg(
        "version = 1\n[[base.egress]]\nto = \"any\"\nproto = \"tcp\"\n",
        4,
        9,
        "base.egress[0].proto",
        "`proto` only accepts \"any\"",
    );
    check_msg(
        "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = 1\n",
        4,
        8,
        "base.egress[0].icmp",
        "`icmp` must be true or false, found integer 1",
    );
    check_msg(
        "version = 1\n[[base.egress]]\nto = 5\nicmp = true\n",
        3,
        6,
        "base.egress[0].to",
        "expected \"any\", a set name",
    );
    check_msg(
        "version = 1\n[roles.web.ingress]\nfrom = \"any\"\ntcp = [1]\n",
        2,
        1,
        "roles.web.ingress",
        "write [[roles.web.ingress]]",
    );
    check_msg(
        "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = true\ninterfaces = [\"eth0\", \"\"]\n",
        5,
        23,
        "base.egress[0].interfaces[1]",
        "cannot be empty",
    );
    check_msg(
        "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = true\ninterfaces = [\"averyveryverylongname\"]\n",
        5,
        15,
        "base.egress[0].interfaces[0]",
        "longer than 15 bytes",
    );
}

#[test]
fn set_and_role_names() {
    check_msg(
        "version = 1\n[sets]\nany = [\"10.0.0.1\"]\n",
        3,
        1,
        "sets.any",
        "`any` is reserved",
    );
    check_msg(
        "version = 1\n[sets]\n1net = [\"10.0.0.1\"]\n",
        3,
        1,
        "sets.1net",
        "invalid set name `1net`",
    );
    check_msg(
        "version = 1\n[roles.\"web app\"]\nhosts = \"any\"\n",
        2,
        8,
        "roles.\"web app\"",
        "invalid role name `web app`",
    );
    check_msg(
        "version = 1\nsets = [1]\n",
        2,
        8,
        "sets",
        "`sets` must be a table",
    );
    let p = parse("version = 1\n[sets]\n_a-1 = \"::1\"\n[roles.web-1]\nhosts = \"_a-1\"\n");
    assert_eq!(p.roles[0].hosts, p.sets[0].ranges);
}

#[test]
fn empty_lists() {
    check(
        "version = 1\n[sets]\nweb = []\n",
        3,
        7,
        "sets.web",
        PolicyErrorKind::EmptyList,
    );
    check(
        "version = 1\n[[base.ingress]]\nfrom = []\ntcp = [1]\n",
        3,
        8,
        "base.ingress[0].from",
        PolicyErrorKind::EmptyList,
    );
    check(
        "version = 1\n[[base.ingress]]\nfrom = \"any\"\ntcp = []\n",
        4,
        7,
        "base.ingress[0].tcp",
        PolicyErrorKind::EmptyList,
    );
    check(
        "version = 1\n[[base.ingress]]\nfrom = \"any\"\nudp = [1]\ninterfaces = []\n",
        5,
        14,
        "base.ingress[0].interfaces",
        PolicyErrorKind::EmptyList,
    );
    check(
        "version = 1\n[roles.r]\nhosts = []\n",
        3,
        9,
        "roles.r.hosts",
        PolicyErrorKind::EmptyList,
    );
}

#[test]
fn error_display_format() {
    let e = err("version = 1\n[defaults]\ningress = \"deny\"\n");
    assert_eq!(
        e.to_string(),
        "t.toml:3:11: defaults.ingress: `ingress` must be \"drop\" or \"allow\", found string \"deny\""
    );
    let e = err("version = 1\n[sets]\nweb_nodes = [\"10.10.1.19-10.10.1.10\"]\n");
    assert_eq!(
        e.to_string(),
        "t.toml:3:14: sets.web_nodes[0]: reversed range: the first address is above the last"
    );
}

// ----- rule names ----------------------------------------------------

#[test]
fn rules_may_have_a_unique_name_and_a_description() {
    let p = parse(
        r#"version = 1
[[base.ingress]]
name = "ssh-from-admin"
description = "SSH, admins only"
from = "10.0.0.0/8"
tcp = [22]
[[base.ingress]]
from = "any"
tcp = [80]
"#,
    );
    assert_eq!(p.rules[0].name.as_deref(), Some("ssh-from-admin"));
    assert_eq!(p.rules[0].description.as_deref(), Some("SSH, admins only"));
    assert_eq!(p.rules[0].display_name(), "ssh-from-admin");
    assert_eq!(p.rules[1].name, None);
    assert_eq!(p.rules[1].display_name(), "base.ingress[1]");
}

#[test]
fn a_rule_name_used_twice_names_both_lines() {
    check(
        r#"version = 1
[[base.ingress]]
name = "web"
from = "any"
tcp = [80]
[roles.web]
hosts = "any"
[[roles.web.ingress]]
name = "web"
from = "any"
tcp = [443]
"#,
        9,
        8,
        "roles.web.ingress[0].name",
        PolicyErrorKind::DuplicateRuleName("web".into(), 2),
    );
}

#[test]
fn bad_rule_names_and_descriptions_are_refused() {
    let rule =
        |kv: &str| format!("version = 1\n[[base.ingress]]\n{kv}\nfrom = \"any\"\ntcp = [80]\n");
    check_msg(
        &rule("name = \"has space\""),
        3,
        8,
        "base.ingress[0].name",
        "letters, digits",
    );
    check_msg(
        &rule("name = \"9lives\""),
        3,
        8,
        "base.ingress[0].name",
        "starting with a letter",
    );
    check_msg(
        &rule("name = 7"),
        3,
        8,
        "base.ingress[0].name",
        "found integer 7",
    );
    check_msg(
        &rule(&format!("name = \"{}\"", "x".repeat(65))),
        3,
        8,
        "base.ingress[0].name",
        "at most 64",
    );
    check_msg(
        &rule("description = [\"a\"]"),
        3,
        15,
        "base.ingress[0].description",
        "expected a string",
    );
}

#[test]
fn every_error_is_collected_in_file_order() {
    let text = "version = 1\n[sets]\nadmins = [\"10.0.0.0/24\"]\nbad = [\"10.0.0.1\", \"x-y\", 5]\n[defaults]\ningres = \"drop\"\negress = \"maybe\"\n[[base.ingress]]\nfrom = \"admin\"\ntcp = [70000, \"ssh\"]\n[[base.ingress]]\nfrom = \"bad\"\n";
    let errors = super::parse_str_all(text, "t.toml").unwrap_err();
    let got: Vec<(u32, &str)> = errors
        .iter()
        .map(|e| (e.loc.map_or(0, |l| l.line), e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (4, "sets.bad[1]"),
            (4, "sets.bad[2]"),
            (6, "defaults.ingres"),
            (7, "defaults.egress"),
            (9, "base.ingress[0].from"),
            (10, "base.ingress[0].tcp[0]"),
            (10, "base.ingress[0].tcp[1]"),
            (11, "base.ingress[1]"),
        ]
    );
    // parse_str reports the first of them.
    let first = parse_str(text, "t.toml").unwrap_err();
    assert_eq!(first, errors[0]);
    // Hints: a close key, a close set, a service name.
    let hints: Vec<Option<&str>> = errors.iter().map(|e| e.hint.as_deref()).collect();
    assert_eq!(hints[2], Some("did you mean `ingress`?"));
    assert_eq!(hints[4], Some("did you mean `admins`?"));
    assert_eq!(
        hints[6],
        Some("`ssh` is a service name; write its port number: 22")
    );
}
