//! The reference evaluator: the verdict of (policy, host roles, interface,
//! direction, packet) computed directly from the policy's semantics, with
//! no kernel and no compiled maps. It is stateless: it gives the verdict of
//! a packet that opens a flow (or belongs to none); replies of tracked
//! connections, ICMP errors about them and later fragments depend on the
//! datapath's state and are tested as sequences against the kernel. It is the oracle the kernel program is
//! tested against, and what `segbpf explain` prints.

use std::net::IpAddr;

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, reason};
use serde::Serialize;

use super::{Action, Direction, Policy, Rule};

/// The fields of a well-formed packet that the policy looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port (TCP/UDP; ignored otherwise).
    pub dport: u16,
    /// ICMP/ICMPv6 type (ignored otherwise).
    pub icmp_type: u8,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
}

/// A verdict and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Reason code from `segbpf_common::reason`.
    pub reason: u8,
    /// The lowest-id rule that allows the packet, if a rule does.
    pub rule: Option<u32>,
}

impl Verdict {
    /// Whether the packet passes.
    pub fn passes(&self) -> bool {
        reason::passes(self.reason)
    }
}

/// Whether `rule` allows protocol/port of `pkt`.
pub fn rule_allows_service(rule: &Rule, pkt: &Packet) -> bool {
    if rule.any_proto {
        return true;
    }
    match pkt.proto {
        IPPROTO_TCP => rule.tcp.iter().any(|p| p.contains(pkt.dport)),
        IPPROTO_UDP => rule.udp.iter().any(|p| p.contains(pkt.dport)),
        IPPROTO_ICMP => rule.icmp,
        IPPROTO_ICMPV6 => rule.icmpv6,
        _ => false,
    }
}

/// Evaluates a packet travelling in `dir` on a host with `roles`, on
/// interface `iface` (None: rules limited to interfaces never apply).
pub fn evaluate(
    policy: &Policy,
    roles: &[String],
    iface: Option<&str>,
    dir: Direction,
    pkt: &Packet,
) -> Verdict {
    let v6 = pkt.src.is_ipv6();
    // Always allowed: IPv6 neighbour discovery (hop limit 255) and MLD (hop limit 1).
    if v6 && pkt.proto == IPPROTO_ICMPV6 {
        let nd = match pkt.icmp_type {
            133..=136 => pkt.hop_limit == 255,
            130..=132 | 143 => pkt.hop_limit == 1,
            _ => false,
        };
        if nd {
            return Verdict {
                reason: reason::PASS_ND,
                rule: None,
            };
        }
    }
    let peer = match dir {
        Direction::Ingress => pkt.src,
        Direction::Egress => pkt.dst,
    };
    let rule = policy
        .rules_for(roles, iface, dir)
        .filter(|r| r.peers.iter().any(|a| a.contains(peer)))
        .filter(|r| rule_allows_service(r, pkt))
        .map(|r| r.id)
        .min();
    if let Some(id) = rule {
        return Verdict {
            reason: reason::PASS_RULE,
            rule: Some(id),
        };
    }
    if policy.defaults.icmp && is_default_icmp(v6, policy.defaults.established, pkt) {
        return Verdict {
            reason: reason::PASS_ICMP,
            rule: None,
        };
    }
    let reason = match policy.defaults.action(dir) {
        Action::Allow => reason::PASS_DEFAULT,
        Action::Drop => reason::DROP_DEFAULT,
    };
    Verdict { reason, rule: None }
}

/// Evaluates a packet of a socket of service `service` travelling in
/// `dir` (ingress: the service receives it), as the services programs
/// judge a packet that opens a flow: the service's rules (an address rule
/// matches the peer's address; a `from_services`/`to_services` rule the
/// local peer's service `peer_service`, a socket of the same host over
/// loopback or the host's own addresses), then ICMP echo requests
/// (`defaults.icmp`), then the service's default. None: no such service.
///
/// Egress as the live program judges it: an address rule first; else,
/// towards a local peer (`peer_service` given, or a loopback destination),
/// the first `to_services` rule whose ports match, whoever the receiver
/// is: the packet leaves, and the receiver's ingress then drops it unless
/// the receiver is one of the services the rule names (judge the
/// receiver's ingress for that; `explain` says so). The rule id indexes
/// `policy.service_rules`.
pub fn evaluate_service(
    policy: &Policy,
    service: &str,
    peer_service: Option<&str>,
    dir: Direction,
    pkt: &Packet,
) -> Option<Verdict> {
    let svc = policy.service(service)?;
    let peer = match dir {
        Direction::Ingress => pkt.src,
        Direction::Egress => pkt.dst,
    };
    let own = || {
        policy.service_rules.iter().filter(|r| {
            r.direction == dir
                && matches!(&r.owner, super::Owner::Service(n) if *n == svc.name)
                && rule_allows_service(r, pkt)
        })
    };
    let by_addr = own()
        .filter(|r| r.peers.iter().any(|a| a.contains(peer)))
        .map(|r| r.id)
        .min();
    let rule = match dir {
        Direction::Ingress => {
            let by_service = own()
                .filter(|r| peer_service.is_some_and(|p| r.peer_services.iter().any(|n| n == p)))
                .map(|r| r.id)
                .min();
            by_addr.into_iter().chain(by_service).min()
        }
        Direction::Egress => by_addr.or_else(|| {
            let local = peer_service.is_some() || is_loopback(peer);
            own()
                .filter(|r| local && !r.peer_services.is_empty())
                .map(|r| r.id)
                .min()
        }),
    };
    if let Some(id) = rule {
        return Some(Verdict {
            reason: reason::PASS_RULE,
            rule: Some(id),
        });
    }
    if policy.defaults.icmp && is_default_icmp(pkt.src.is_ipv6(), policy.defaults.established, pkt)
    {
        return Some(Verdict {
            reason: reason::PASS_ICMP,
            rule: None,
        });
    }
    let reason = match svc.default_action(&policy.defaults, dir) {
        Action::Allow => reason::PASS_DEFAULT,
        Action::Drop => reason::DROP_DEFAULT,
    };
    Some(Verdict { reason, rule: None })
}

/// A loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104): a local
/// peer whatever the host's addresses.
fn is_loopback(a: std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v) => v.is_loopback(),
        std::net::IpAddr::V6(v) => {
            v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback())
        }
    }
}

/// ICMP echo that `defaults.icmp = true` lets through from anyone:
/// requests, and replies only when nothing is tracked (`established =
/// false`); with tracking, a reply passes only as the reply of a tracked
/// request, which is state. (ICMP errors pass only when they quote a
/// tracked connection: state too, which this stateless evaluator does not
/// model.)
fn is_default_icmp(v6: bool, tracking: bool, pkt: &Packet) -> bool {
    if !v6 && pkt.proto == IPPROTO_ICMP {
        pkt.icmp_type == 8 || (pkt.icmp_type == 0 && !tracking)
    } else if v6 && pkt.proto == IPPROTO_ICMPV6 {
        pkt.icmp_type == 128 || (pkt.icmp_type == 129 && !tracking)
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_packet_is_judged_by_its_service_rules_then_its_default() {
        let p = Policy::from_str(
            r#"version = 1
[sets]
nodes = ["10.0.0.0/24"]
[services.app]
cgroup = "app"
defaults = { egress = "drop" }
[services.db]
cgroup = "db"
defaults = { ingress = "drop" }
[[services.db.ingress]]
name = "from-app"
from_services = ["app"]
tcp = [3306]
[[services.db.ingress]]
from = "nodes"
tcp = [3306]
[[services.app.egress]]
to = ["127.0.0.1"]
tcp = [3306]
"#,
            "t.toml",
        )
        .expect("parses");
        let pkt = tcp;
        let lo = pkt("127.0.0.1", "127.0.0.1", 3306);
        let from_app = evaluate_service(&p, "db", Some("app"), Direction::Ingress, &lo);
        let rule = from_app.and_then(|v| v.rule).expect("a rule");
        assert_eq!(
            p.service_rules[rule as usize].name.as_deref(),
            Some("from-app")
        );
        let from_other = evaluate_service(&p, "db", Some("other"), Direction::Ingress, &lo);
        assert_eq!(from_other.map(|v| v.reason), Some(reason::DROP_DEFAULT));
        let remote = pkt("10.0.0.5", "10.0.0.1", 3306);
        assert!(
            evaluate_service(&p, "db", None, Direction::Ingress, &remote)
                .is_some_and(|v| v.passes())
        );
        let wrong_port = pkt("10.0.0.5", "10.0.0.1", 3307);
        assert!(
            !evaluate_service(&p, "db", None, Direction::Ingress, &wrong_port)
                .is_some_and(|v| v.passes())
        );
        // app's egress is an allow-list; its ingress keeps `[defaults]`.
        assert!(
            evaluate_service(&p, "app", None, Direction::Egress, &lo).is_some_and(|v| v.passes())
        );
        let out = pkt("127.0.0.1", "10.0.0.9", 3306);
        assert_eq!(
            evaluate_service(&p, "app", None, Direction::Egress, &out).map(|v| v.reason),
            Some(reason::DROP_DEFAULT)
        );
        assert_eq!(
            evaluate_service(&p, "app", None, Direction::Ingress, &out).map(|v| v.passes()),
            Some(p.defaults.ingress == Action::Allow)
        );
        assert!(evaluate_service(&p, "nosuch", None, Direction::Ingress, &lo).is_none());
    }

    #[test]
    fn egress_to_services_leaves_and_the_receiver_decides() {
        // As the live egress program: a `to_services` rule lets a packet
        // towards a local peer leave whoever the receiver is (its ingress
        // checks the receiver); an address rule comes first.
        let p = Policy::from_str(
            concat!(
                include_str!("../../../tests/fixtures/services_app_db_other.toml"),
                r#"[[services.app.egress]]
to = ["127.0.0.9"]
tcp = [5000]
[[services.app.egress]]
name = "to-db"
to_services = ["db"]
tcp = [5000]
"#
            ),
            "t.toml",
        )
        .expect("parses");
        let tcp = |dst: &str, dport| tcp("127.0.0.1", dst, dport);
        let name = |v: Option<Verdict>| {
            v.and_then(|v| v.rule)
                .and_then(|r| p.service_rules[r as usize].name.clone())
        };
        for peer in [None, Some("db"), Some("other")] {
            let v = evaluate_service(&p, "app", peer, Direction::Egress, &tcp("127.0.0.1", 5000));
            assert_eq!(name(v), Some("to-db".into()), "{peer:?}");
        }
        let v = evaluate_service(&p, "app", None, Direction::Egress, &tcp("::1", 5000));
        assert_eq!(name(v), Some("to-db".into()));
        // The address rule, not the service rule, for its address.
        let v = evaluate_service(&p, "app", None, Direction::Egress, &tcp("127.0.0.9", 5000));
        assert_eq!(v.and_then(|v| v.rule), Some(0));
        // Not a local peer, another port: the default.
        for pkt in [tcp("10.0.0.9", 5000), tcp("127.0.0.1", 5001)] {
            let v = evaluate_service(&p, "app", None, Direction::Egress, &pkt);
            assert_eq!(v.map(|v| v.reason), Some(reason::DROP_DEFAULT));
        }
    }

    fn example() -> Policy {
        let text = include_str!("../../../examples/roles.toml");
        Policy::from_str(text, "examples/roles.toml").expect("example parses")
    }

    fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: IPPROTO_TCP,
            dport,
            icmp_type: 0,
            hop_limit: 64,
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn three_tier_ingress_matrix() {
        let p = example();
        let db = roles(&["db"]);
        let v = evaluate(
            &p,
            &db,
            None,
            Direction::Ingress,
            &tcp("10.10.1.25", "10.10.1.30", 5432),
        );
        assert!(v.passes());
        assert_eq!(
            p.rules[v.rule.unwrap() as usize].label(),
            "roles.db.ingress[0]"
        );
        let v = evaluate(
            &p,
            &db,
            None,
            Direction::Ingress,
            &tcp("10.10.1.15", "10.10.1.30", 5432),
        );
        assert_eq!(
            v,
            Verdict {
                reason: reason::DROP_DEFAULT,
                rule: None
            }
        );
        // SSH from admin_net only.
        let v = evaluate(
            &p,
            &db,
            None,
            Direction::Ingress,
            &tcp("10.10.0.5", "10.10.1.30", 22),
        );
        assert_eq!(p.rules[v.rule.unwrap() as usize].label(), "base.ingress[0]");
        let v = evaluate(
            &p,
            &db,
            None,
            Direction::Ingress,
            &tcp("10.10.0.64", "10.10.1.30", 22),
        );
        assert!(!v.passes());
        // web takes 80 from anywhere, v6 too.
        let web = roles(&["web"]);
        let v = evaluate(
            &p,
            &web,
            None,
            Direction::Ingress,
            &tcp("fd00::99", "fd00::1", 443),
        );
        assert!(v.passes());
    }

    #[test]
    fn egress_backup_port_range_and_defaults() {
        let p = example();
        let app = roles(&["app"]);
        for (port, ok) in [(2499, false), (2500, true), (3300, true), (3301, false)] {
            let v = evaluate(
                &p,
                &app,
                None,
                Direction::Egress,
                &tcp("10.10.1.20", "10.10.2.50", port),
            );
            assert_eq!(v.passes(), ok, "port {port}");
        }
        let ping = Packet {
            proto: IPPROTO_ICMP,
            icmp_type: 8,
            ..tcp("192.0.2.1", "10.10.1.20", 0)
        };
        let v = evaluate(&p, &app, None, Direction::Ingress, &ping);
        assert_eq!(v.reason, reason::PASS_ICMP);
        let redirect = Packet {
            icmp_type: 5,
            ..ping
        };
        assert!(!evaluate(&p, &app, None, Direction::Ingress, &redirect).passes());
        // An unsolicited echo reply meets the default while flows are
        // tracked (a real reply passes as part of its tracked request);
        // with nothing tracked, the ICMP default passes it.
        let reply = Packet {
            icmp_type: 0,
            ..ping
        };
        assert_eq!(
            evaluate(&p, &app, None, Direction::Ingress, &reply).reason,
            reason::DROP_DEFAULT
        );
        let mut stateless = p.clone();
        stateless.defaults.established = false;
        assert_eq!(
            evaluate(&stateless, &app, None, Direction::Ingress, &reply).reason,
            reason::PASS_ICMP
        );
    }

    #[test]
    fn neighbour_discovery_needs_hop_limit_255() {
        let p = example();
        let ns = Packet {
            proto: IPPROTO_ICMPV6,
            icmp_type: 135,
            hop_limit: 255,
            ..tcp("fe80::1", "ff02::1:ff00:1", 0)
        };
        assert_eq!(
            evaluate(&p, &[], None, Direction::Ingress, &ns).reason,
            reason::PASS_ND
        );
        let forged = Packet {
            hop_limit: 64,
            ..ns
        };
        assert_ne!(
            evaluate(&p, &[], None, Direction::Ingress, &forged).reason,
            reason::PASS_ND
        );
    }
}
