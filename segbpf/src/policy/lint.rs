//! Policy lint (`segbpf check`): automated checks the cloud guides
//! recommend, as warnings with the file, line and field
//! (`--deny-warnings` makes them errors).
//!
//! * `any-to-sensitive`: a rule lets anyone reach SSH or a database port, or
//!   every port;
//! * `shadowed`: a rule allows nothing that another rule applying at least
//!   as widely does not already allow;
//! * `unused-set`: a set no rule or role uses;
//! * `role-without-hosts`: a role no host takes unless named with `--role`;
//! * `overlapping-roles`: the `hosts` of two roles overlap, so such hosts
//!   take both roles' rules;
//! * `no-ssh-path`: no ingress rule allows SSH (tcp/22) from a specific set,
//!   so a lockout needs console access;
//! * `asymmetric-defaults`: ingress and egress defaults differ (a note);
//! * `ssh-session` ([`ssh_session`]): the policy would cut the SSH session
//!   the command runs in (`SSH_CONNECTION`); `reload`, `attach` and the
//!   policy file watcher refuse such a policy.

use std::fmt;

use serde::Serialize;

use super::{Action, AddrRange, Direction, Loc, Owner, Policy, PortRange, Rule};

/// Ports that should never be open to `any`.
pub const SENSITIVE_PORTS: &[(u16, &str)] = &[
    (22, "ssh"),
    (23, "telnet"),
    (1433, "mssql"),
    (1521, "oracle"),
    (3306, "mysql"),
    (5432, "postgresql"),
    (6379, "redis"),
    (9200, "elasticsearch"),
    (11211, "memcached"),
    (27017, "mongodb"),
];

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Stable lint name.
    pub lint: &'static str,
    /// Where (None: the whole file).
    pub loc: Option<Loc>,
    /// Field path, e.g. `roles.web.ingress[0]` (empty: the whole file).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// `line:column: field: message [lint]`, without the file (`segbpf
/// check` prints `FILE:LINE:COLUMN: warning: field: message [lint]`).
impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.loc {
            write!(f, "{l}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{} [{}]", self.message, self.lint)
    }
}

fn is_any(peers: &[AddrRange]) -> bool {
    peers.contains(&AddrRange::any_v4()) || peers.contains(&AddrRange::any_v6())
}

/// Whether the union of `outer` covers every address of `inner`.
fn covers(outer: &[AddrRange], inner: &[AddrRange]) -> bool {
    inner.iter().all(|r| {
        let (v4, start, end) = match *r {
            AddrRange::V4 { start, end } => (true, u128::from(start), u128::from(end)),
            AddrRange::V6 { start, end } => (false, start, end),
        };
        let mut segs: Vec<(u128, u128)> = outer
            .iter()
            .filter_map(|o| match (*o, v4) {
                (AddrRange::V4 { start, end }, true) => Some((u128::from(start), u128::from(end))),
                (AddrRange::V6 { start, end }, false) => Some((start, end)),
                _ => None,
            })
            .collect();
        segs.sort_unstable();
        let mut next = start;
        for (s, e) in segs {
            if s > next {
                break;
            }
            if e >= next {
                if e >= end {
                    return true;
                }
                next = e + 1;
            }
        }
        false
    })
}

fn ports_cover(outer: &[PortRange], inner: &[PortRange]) -> bool {
    let as_ranges = |v: &[PortRange]| -> Vec<AddrRange> {
        v.iter()
            .map(|p| AddrRange::V4 {
                start: u32::from(p.lo),
                end: u32::from(p.hi),
            })
            .collect()
    };
    covers(&as_ranges(outer), &as_ranges(inner))
}

/// Whether `a` allows everything `b` allows (peers, services, interfaces).
fn rule_covers(a: &Rule, b: &Rule) -> bool {
    if a.direction != b.direction || !covers(&a.peers, &b.peers) {
        return false;
    }
    if !b.peer_services.iter().all(|x| a.peer_services.contains(x)) {
        return false;
    }
    let ifaces_ok = match (&a.interfaces, &b.interfaces) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => y.iter().all(|i| x.contains(i)),
    };
    if !ifaces_ok {
        return false;
    }
    if a.any_proto {
        return true;
    }
    !b.any_proto
        && ports_cover(&a.tcp, &b.tcp)
        && ports_cover(&a.udp, &b.udp)
        && (a.icmp || !b.icmp)
        && (a.icmpv6 || !b.icmpv6)
}

/// Whether `a` applies on every host `b` applies on (base covers all).
fn scope_covers(a: &Rule, b: &Rule) -> bool {
    match (&a.owner, &b.owner) {
        (Owner::Service(x), Owner::Service(y)) | (Owner::Role(x), Owner::Role(y)) => x == y,
        (_, Owner::Service(_)) => false,
        (Owner::Base, _) => true,
        _ => false,
    }
}

fn mentions(text: &str, name: &str) -> bool {
    text.trim_matches(['[', ']'])
        .split(',')
        .any(|part| part.trim().trim_matches('"') == name)
}

/// Runs every lint.
pub fn lint(policy: &Policy) -> Vec<Warning> {
    let mut out = Vec::new();
    // Service rules are linted like role rules (their own scope: a rule
    // covers another only within one service).
    let all_rules = || policy.rules.iter().chain(&policy.service_rules);
    for r in all_rules() {
        if r.direction != Direction::Ingress || !is_any(&r.peers) {
            continue;
        }
        let open_all = r.any_proto || r.tcp.iter().any(|p| p.lo == 0 && p.hi == 65535);
        if open_all {
            out.push(Warning {
                lint: "any-to-sensitive",
                loc: Some(r.loc),
                field: r.label(),
                message: "allows every port from any address; name the peers or the ports".into(),
            });
            continue;
        }
        for (port, what) in SENSITIVE_PORTS {
            if r.tcp.iter().any(|p| p.contains(*port)) {
                out.push(Warning {
                    lint: "any-to-sensitive",
                    loc: Some(r.loc),
                    field: r.label(),
                    message: format!("allows {what} (tcp/{port}) from any address; allow it from a set (an admin or app network) instead"),
                });
            }
        }
    }
    for b in all_rules() {
        if let Some(a) = all_rules().find(|a| {
            !std::ptr::eq(*a, b)
                && scope_covers(a, b)
                && rule_covers(a, b)
                && !(rule_covers(b, a) && scope_covers(b, a) && a.id > b.id)
        }) {
            out.push(Warning {
                lint: "shadowed",
                loc: Some(b.loc),
                field: b.label(),
                message: format!(
                    "allows nothing that {} (line {}) does not already allow; remove one of them",
                    a.label(),
                    a.loc.line
                ),
            });
        }
    }
    for s in &policy.sets {
        let used = all_rules().any(|r| mentions(&r.peer_text, &s.name))
            || policy.roles.iter().any(|r| {
                r.hosts_text
                    .as_deref()
                    .is_some_and(|h| mentions(h, &s.name))
            });
        if !used {
            out.push(Warning {
                lint: "unused-set",
                loc: Some(s.loc),
                field: format!("sets.{}", s.name),
                message: format!("set `{}` is used by no rule and no role", s.name),
            });
        }
    }
    for r in &policy.roles {
        if r.hosts.is_empty() {
            out.push(Warning {
                lint: "role-without-hosts",
                loc: Some(r.loc),
                field: format!("roles.{}", r.name),
                message: format!(
                    "no host takes role `{}` from its addresses (no `hosts`); only `--role {}` applies it",
                    r.name, r.name
                ),
            });
        }
    }
    for (i, a) in policy.roles.iter().enumerate() {
        for b in &policy.roles[i + 1..] {
            let overlap = a.hosts.iter().any(|x| {
                b.hosts.iter().any(|y| match (*x, *y) {
                    (
                        AddrRange::V4 { start: s1, end: e1 },
                        AddrRange::V4 { start: s2, end: e2 },
                    ) => s1 <= e2 && s2 <= e1,
                    (
                        AddrRange::V6 { start: s1, end: e1 },
                        AddrRange::V6 { start: s2, end: e2 },
                    ) => s1 <= e2 && s2 <= e1,
                    _ => false,
                })
            });
            if overlap {
                out.push(Warning {
                    lint: "overlapping-roles",
                    loc: Some(b.loc),
                    field: format!("roles.{}.hosts", b.name),
                    message: format!(
                        "hosts of roles `{}` and `{}` overlap: such hosts take both roles' rules",
                        a.name, b.name
                    ),
                });
            }
        }
    }
    let ssh_from_set = policy.rules.iter().any(|r| {
        r.direction == Direction::Ingress
            && !is_any(&r.peers)
            && (r.any_proto || r.tcp.iter().any(|p| p.contains(22)))
    });
    // A policy of services only is never attached to an interface: no
    // SSH path to lose.
    let interfaces =
        !policy.rules.is_empty() || !policy.roles.is_empty() || policy.services.is_empty();
    if !ssh_from_set && policy.defaults.ingress == Action::Drop && interfaces {
        out.push(Warning {
            lint: "no-ssh-path",
            loc: None,
            field: String::new(),
            message: "no ingress rule allows SSH (tcp/22) from a specific set of admin addresses: a mistake needs console access to recover".into(),
        });
    }
    if policy.defaults.ingress != policy.defaults.egress {
        out.push(Warning {
            lint: "asymmetric-defaults",
            loc: None,
            field: "defaults".into(),
            // Whether written or left out, say what happens: calling a
            // value the file sets explicitly a "default" misleads.
            message: format!(
                "note: what no rule matches is {} on ingress and {} on egress",
                verb(policy.defaults.ingress),
                verb(policy.defaults.egress)
            ),
        });
    }
    out
}

/// The SSH session this process runs in, from `SSH_CONNECTION`: client
/// address, client port, server address, server port. IPv4-mapped IPv6
/// forms (`::ffff:a.b.c.d`) are taken as the IPv4 address they stand for.
pub fn ssh_connection() -> Option<(std::net::IpAddr, u16, std::net::IpAddr, u16)> {
    let conn = std::env::var("SSH_CONNECTION").ok()?;
    parse_ssh_connection(&conn)
}

/// Parses `SSH_CONNECTION` ("client-ip client-port server-ip server-port").
fn parse_ssh_connection(conn: &str) -> Option<(std::net::IpAddr, u16, std::net::IpAddr, u16)> {
    let parts: Vec<&str> = conn.split_whitespace().collect();
    let addr = |i: usize| {
        parts
            .get(i)?
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|a| a.to_canonical())
    };
    let port = |i: usize| parts.get(i)?.parse::<u16>().ok();
    Some((addr(0)?, port(1)?, addr(2)?, port(3)?))
}

/// The `ssh-session` lint: a message when `policy` would block the SSH
/// session this process runs in (`SSH_CONNECTION` is "client-ip
/// client-port server-ip server-port"), for a host with `roles` (empty:
/// the roles whose `hosts` contain the server address) on `iface` (None:
/// any interface). Both directions are checked: the client's packets to
/// the server port (ingress), and the server's replies (egress), which
/// pass as replies of an allowed flow when `established = true` and
/// otherwise only if an egress rule or the egress default allows them.
/// None when there is no session or it passes.
pub fn ssh_session(policy: &Policy, roles: &[String], iface: Option<&str>) -> Option<String> {
    let (client, cport, server, port) = ssh_connection()?;
    ssh_session_of(policy, roles, iface, (client, cport, server, port))
}

/// The sessions of `sessions` that the policy would cut: (client
/// address, server address, message), each judged by [`ssh_session_of`].
pub fn ssh_sessions_cut(
    policy: &Policy,
    roles: &[String],
    iface: &str,
    sessions: Vec<(std::net::IpAddr, u16, std::net::IpAddr, u16)>,
) -> Vec<(std::net::IpAddr, std::net::IpAddr, String)> {
    sessions
        .into_iter()
        .filter_map(|conn| {
            let (client, _, server, _) = conn;
            ssh_session_of(policy, roles, Some(iface), conn).map(|m| (client, server, m))
        })
        .collect()
}

/// [`ssh_session`] for the session `conn` (client, client port, server,
/// server port).
pub fn ssh_session_of(
    policy: &Policy,
    roles: &[String],
    iface: Option<&str>,
    conn: (std::net::IpAddr, u16, std::net::IpAddr, u16),
) -> Option<String> {
    let (client, cport, server, port) = conn;
    let roles = if roles.is_empty() {
        policy
            .roles
            .iter()
            .filter(|r| r.hosts.iter().any(|h| h.contains(server)))
            .map(|r| r.name.clone())
            .collect()
    } else {
        roles.to_vec()
    };
    let tcp = |src, dst, dport| super::eval::Packet {
        src,
        dst,
        proto: segbpf_common::IPPROTO_TCP,
        dport,
        icmp_type: 0,
        hop_limit: 64,
    };
    let ingress = super::eval::evaluate(
        policy,
        &roles,
        iface,
        Direction::Ingress,
        &tcp(client, server, port),
    );
    let what = if !ingress.passes() {
        "your SSH session's packets"
    } else if !policy.defaults.established
        && !super::eval::evaluate(
            policy,
            &roles,
            iface,
            Direction::Egress,
            &tcp(server, client, cport),
        )
        .passes()
    {
        // Without connection tracking the replies are judged on their own.
        "the replies of your SSH session (established = false, and no egress rule allows them)"
    } else {
        return None;
    };
    Some(format!(
        "this policy would block {what} from {client} to {server}:{port} on this host (roles: {}); add a rule before attaching, or attach with --confirm SECS",
        if roles.is_empty() {
            "none".to_string()
        } else {
            roles.join(", ")
        }
    ))
}

/// `dropped` / `allowed`.
fn verb(a: Action) -> &'static str {
    match a {
        Action::Drop => "dropped",
        Action::Allow => "allowed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lints(text: &str) -> Vec<&'static str> {
        let p = Policy::from_str(text, "t.toml").expect("valid policy");
        lint(&p).into_iter().map(|w| w.lint).collect()
    }

    const HEAD: &str = "version = 1\n[sets]\nadmin = [\"10.0.0.0/24\"]\napp = [\"10.1.0.0/24\"]\n[defaults]\ningress = \"drop\"\negress = \"drop\"\n[[base.ingress]]\nfrom = \"admin\"\ntcp = [22]\n";

    #[test]
    fn clean_policy_has_no_warnings() {
        let t = format!(
            "{HEAD}[roles.db]\nhosts = \"10.2.0.0/24\"\n[[roles.db.ingress]]\nfrom = \"app\"\ntcp = [5432]\n"
        );
        assert_eq!(lints(&t), Vec::<&str>::new());
    }

    #[test]
    fn any_to_sensitive() {
        let bad = format!(
            "{HEAD}[roles.db]\nhosts = \"app\"\n[[roles.db.ingress]]\nfrom = \"any\"\ntcp = [5432]\n"
        );
        assert!(lints(&bad).contains(&"any-to-sensitive"));
        let all = format!(
            "{HEAD}[roles.db]\nhosts = \"app\"\n[[roles.db.ingress]]\nfrom = \"any\"\nproto = \"any\"\n"
        );
        assert!(lints(&all).contains(&"any-to-sensitive"));
        let ok = format!(
            "{HEAD}[roles.web]\nhosts = \"app\"\n[[roles.web.ingress]]\nfrom = \"any\"\ntcp = [80, 443]\n"
        );
        assert!(!lints(&ok).contains(&"any-to-sensitive"));
    }

    #[test]
    fn shadowed() {
        let bad = format!(
            "{HEAD}[roles.db]\nhosts = \"app\"\n[[roles.db.ingress]]\nfrom = \"10.0.0.5\"\ntcp = [22]\n"
        );
        assert!(
            lints(&bad).contains(&"shadowed"),
            "base admin ssh covers it"
        );
        let ok = format!(
            "{HEAD}[roles.db]\nhosts = \"app\"\n[[roles.db.ingress]]\nfrom = \"10.0.0.5\"\ntcp = [23]\n"
        );
        assert!(!lints(&ok).contains(&"shadowed"));
    }

    #[test]
    fn unused_set() {
        assert!(lints(HEAD).contains(&"unused-set"), "app is unused");
        let ok = format!(
            "{HEAD}[roles.r]\nhosts = \"app\"\n[[roles.r.ingress]]\nfrom = \"app\"\ntcp = [80]\n"
        );
        assert!(!lints(&ok).contains(&"unused-set"));
    }

    #[test]
    fn role_without_hosts() {
        let bad = format!("{HEAD}[roles.r]\n[[roles.r.ingress]]\nfrom = \"app\"\ntcp = [80]\n");
        assert!(lints(&bad).contains(&"role-without-hosts"));
        let ok = format!(
            "{HEAD}[roles.r]\nhosts = \"app\"\n[[roles.r.ingress]]\nfrom = \"app\"\ntcp = [80]\n"
        );
        assert!(!lints(&ok).contains(&"role-without-hosts"));
    }

    #[test]
    fn overlapping_roles() {
        let bad = format!(
            "{HEAD}[roles.a]\nhosts = \"10.1.0.0/24\"\n[[roles.a.ingress]]\nfrom = \"app\"\ntcp = [80]\n[roles.b]\nhosts = \"10.1.0.128/25\"\n[[roles.b.ingress]]\nfrom = \"app\"\ntcp = [81]\n"
        );
        assert!(lints(&bad).contains(&"overlapping-roles"));
        let ok = bad.replace("10.1.0.128/25", "10.9.0.0/24");
        assert!(!lints(&ok).contains(&"overlapping-roles"));
    }

    #[test]
    fn no_ssh_path() {
        let bad = "version = 1\n[sets]\napp = [\"10.1.0.0/24\"]\n[roles.r]\nhosts = \"app\"\n[[roles.r.ingress]]\nfrom = \"app\"\ntcp = [80]\n";
        assert!(lints(bad).contains(&"no-ssh-path"));
        let t = format!(
            "{HEAD}[roles.r]\nhosts = \"app\"\n[[roles.r.ingress]]\nfrom = \"app\"\ntcp = [80]\n"
        );
        assert!(!lints(&t).contains(&"no-ssh-path"));
    }

    #[test]
    fn ssh_session_checks_both_directions() {
        let conn =
            parse_ssh_connection("::ffff:10.0.0.5 50000 ::ffff:10.1.0.1 22").expect("parses");
        assert_eq!(
            conn.0,
            "10.0.0.5".parse::<std::net::IpAddr>().expect("addr")
        );
        let p = |t: &str| Policy::from_str(t, "t.toml").expect("valid policy");
        // Tracked: the reply of an allowed flow passes whatever egress says.
        assert_eq!(ssh_session_of(&p(HEAD), &[], None, conn), None);
        // Untracked: the reply is judged by the egress rules and default.
        let untracked = HEAD.replace(
            "egress = \"drop\"\n",
            "egress = \"drop\"\nestablished = false\n",
        );
        let m = ssh_session_of(&p(&untracked), &[], None, conn).expect("replies cut");
        assert!(m.contains("replies"), "{m}");
        let with_egress = format!("{untracked}[[base.egress]]\nto = \"admin\"\nproto = \"any\"\n");
        assert_eq!(ssh_session_of(&p(&with_egress), &[], None, conn), None);
        // No ingress rule: the session's own packets are cut.
        let closed = HEAD.replace("tcp = [22]", "tcp = [23]");
        assert!(ssh_session_of(&p(&closed), &[], None, conn).is_some());
    }

    #[test]
    fn asymmetric_defaults() {
        let bad = HEAD.replace("egress = \"drop\"", "egress = \"allow\"");
        assert!(lints(&bad).contains(&"asymmetric-defaults"));
        assert!(!lints(HEAD).contains(&"asymmetric-defaults"));
        // Both set explicitly: the note does not call them defaults.
        let p = Policy::from_str(&bad, "t.toml").expect("valid policy");
        let w = lint(&p)
            .into_iter()
            .find(|w| w.lint == "asymmetric-defaults")
            .expect("the note");
        assert!(!w.message.contains("default"), "{}", w.message);
        assert!(
            w.message
                .contains("dropped on ingress and allowed on egress"),
            "{}",
            w.message
        );
    }
}
