//! Hosts' ordered rulesets -> one allow-only policy.
//!
//! Each base chain of type `filter` on the `input` (ingress) or `output`
//! (egress) hook is walked in order, jumps and gotos inlined. Accept rules
//! become policy rules; `ct state established,related accept` becomes
//! `established = true`; rate-limited log rules give `log_rate`; rules on
//! `lo` are left out (segbpf never filters loopback). What an allow-only,
//! order-free policy cannot say gets a [`Warning`] naming the rule's file and
//! line, and what segbpf does instead (see docs/import.md).
//!
//! Chain policies: the policy language has one default per direction for
//! the whole fleet. When every host's chain accepts by default the
//! direction's default is `allow`; otherwise it is `drop`, and each role
//! whose host accepts by default gets an explicit allow-any rule
//! (`proto = "any"` from/to `"any"`), commented as such.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

use super::{
    Host, HostsArg, HostsValue, ImportError, Origin, Warning, WarningKind,
    ruleset::{Chain, Family, Ruleset, addr_elem, port_elem},
};
use crate::policy::{AddrRange, Direction, PortRange};

/// The packets a warning is about.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Direction.
    pub direction: Direction,
    /// What the warned rule matches.
    pub cond: Cond,
    /// The warning is about the replies of allowed connections (any
    /// direction and connection), not about what `cond` matches.
    pub replies: bool,
}

impl Scope {
    /// The packets `cond` matches in `direction` (new connections, echo requests).
    pub fn of(direction: Direction, cond: Cond) -> Self {
        Scope {
            direction,
            cond,
            replies: false,
        }
    }

    /// Every reply of an allowed connection.
    pub fn replies() -> Self {
        Scope {
            direction: Direction::Ingress,
            cond: Cond::default(),
            replies: true,
        }
    }
}

/// An item of a rule's peer: a named set of the ruleset, or a literal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerItem {
    /// A named set: (table family, table, set name).
    Set(Family, String, String),
    /// A literal address, CIDR or range.
    Lit(String),
}

/// The packets a rule matches, as far as segbpf can say it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cond {
    /// Only IPv4 (`Some(false)`) or only IPv6 (`Some(true)`).
    pub v6: Option<bool>,
    /// The peer addresses (None: any).
    pub peers: Option<Vec<AddrRange>>,
    /// The same as written.
    pub peer_items: Vec<PeerItem>,
    /// IP protocol numbers (None: any).
    pub protos: Option<Vec<u8>>,
    /// Destination ports (None: any).
    pub dports: Option<Vec<PortRange>>,
    /// Interfaces (None: any).
    pub ifaces: Option<Vec<String>>,
}

impl Cond {
    /// Whether a packet of family `v6`, peer, protocol, port and interface matches.
    pub fn matches(&self, peer: std::net::IpAddr, proto: u8, dport: u16, iface: &str) -> bool {
        self.v6.is_none_or(|v| v == peer.is_ipv6())
            && self
                .peers
                .as_ref()
                .is_none_or(|p| p.iter().any(|r| r.contains(peer)))
            && self.protos.as_ref().is_none_or(|p| p.contains(&proto))
            && (!matches!(proto, 6 | 17)
                || self
                    .dports
                    .as_ref()
                    .is_none_or(|p| p.iter().any(|r| r.contains(dport))))
            && self
                .ifaces
                .as_ref()
                .is_none_or(|i| i.iter().any(|x| x == iface))
    }

    /// Whether some packet matches both.
    fn overlaps(&self, o: &Cond) -> bool {
        let fam = match (self.v6, o.v6) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let peers = match (&self.peers, &o.peers) {
            (Some(a), Some(b)) => a.iter().any(|x| b.iter().any(|y| ranges_meet(x, y))),
            _ => true,
        };
        let fam_peers = |c: &Cond, v6: bool| {
            c.peers
                .as_ref()
                .is_none_or(|p| p.iter().any(|r| r.family_is_v4() != v6))
        };
        let peers = peers
            && match (self.v6.or(o.v6), &self.peers, &o.peers) {
                (Some(v6), _, _) => fam_peers(self, v6) && fam_peers(o, v6),
                _ => true,
            };
        let protos: Option<Vec<u8>> = match (&self.protos, &o.protos) {
            (Some(a), Some(b)) => Some(a.iter().filter(|x| b.contains(x)).copied().collect()),
            (Some(a), None) | (None, Some(a)) => Some(a.clone()),
            (None, None) => None,
        };
        let proto_ok = protos.as_ref().is_none_or(|p| !p.is_empty());
        let port_proto = protos
            .as_ref()
            .is_none_or(|p| p.iter().any(|x| matches!(x, 6 | 17)));
        let ports = match (&self.dports, &o.dports) {
            (Some(a), Some(b)) => {
                port_proto
                    && a.iter()
                        .any(|x| b.iter().any(|y| x.lo <= y.hi && y.lo <= x.hi))
            }
            (Some(_), None) | (None, Some(_)) => port_proto,
            (None, None) => true,
        };
        let ifaces = match (&self.ifaces, &o.ifaces) {
            (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
            _ => true,
        };
        fam && peers && proto_ok && ports && ifaces
    }

    /// Both conditions (a jump's and the target chain's rule's).
    fn and(&self, o: &Cond) -> Cond {
        let peers = match (&self.peers, &o.peers) {
            (Some(a), Some(b)) => Some(intersect(a, b)),
            (Some(a), None) | (None, Some(a)) => Some(a.clone()),
            (None, None) => None,
        };
        let peer_items = match (&self.peers, &o.peers) {
            (Some(_), Some(_)) => peers
                .iter()
                .flatten()
                .map(|r| PeerItem::Lit(r.to_string()))
                .collect(),
            (Some(_), None) => self.peer_items.clone(),
            _ => o.peer_items.clone(),
        };
        Cond {
            v6: self.v6.or(o.v6),
            peers,
            peer_items,
            protos: match (&self.protos, &o.protos) {
                (Some(a), Some(b)) => Some(a.iter().filter(|x| b.contains(x)).copied().collect()),
                (Some(a), None) | (None, Some(a)) => Some(a.clone()),
                (None, None) => None,
            },
            dports: match (&self.dports, &o.dports) {
                (Some(a), Some(b)) => Some(
                    a.iter()
                        .flat_map(|x| {
                            b.iter()
                                .filter_map(move |y| PortRange::new(x.lo.max(y.lo), x.hi.min(y.hi)))
                        })
                        .collect(),
                ),
                (Some(a), None) | (None, Some(a)) => Some(a.clone()),
                (None, None) => None,
            },
            ifaces: match (&self.ifaces, &o.ifaces) {
                (Some(a), Some(b)) => Some(a.iter().filter(|x| b.contains(x)).cloned().collect()),
                (Some(a), None) | (None, Some(a)) => Some(a.clone()),
                (None, None) => None,
            },
        }
    }
}

fn ranges_meet(a: &AddrRange, b: &AddrRange) -> bool {
    match (*a, *b) {
        (AddrRange::V4 { start: s1, end: e1 }, AddrRange::V4 { start: s2, end: e2 }) => {
            s1 <= e2 && s2 <= e1
        }
        (AddrRange::V6 { start: s1, end: e1 }, AddrRange::V6 { start: s2, end: e2 }) => {
            s1 <= e2 && s2 <= e1
        }
        _ => false,
    }
}

fn intersect(a: &[AddrRange], b: &[AddrRange]) -> Vec<AddrRange> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            match (*x, *y) {
                (AddrRange::V4 { start: s1, end: e1 }, AddrRange::V4 { start: s2, end: e2 })
                    if s1.max(s2) <= e1.min(e2) =>
                {
                    out.push(AddrRange::V4 {
                        start: s1.max(s2),
                        end: e1.min(e2),
                    });
                }
                (AddrRange::V6 { start: s1, end: e1 }, AddrRange::V6 { start: s2, end: e2 })
                    if s1.max(s2) <= e1.min(e2) =>
                {
                    out.push(AddrRange::V6 {
                        start: s1.max(s2),
                        end: e1.min(e2),
                    });
                }
                _ => {}
            }
        }
    }
    out
}

/// The addresses of one family not in `ranges`.
fn complement(ranges: &[AddrRange], v6: bool) -> Vec<AddrRange> {
    let mut iv: Vec<(u128, u128)> = ranges
        .iter()
        .filter(|r| r.family_is_v4() != v6)
        .map(|r| match *r {
            AddrRange::V4 { start, end } => (u128::from(start), u128::from(end)),
            AddrRange::V6 { start, end } => (start, end),
        })
        .collect();
    iv.sort_unstable();
    let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mut out = Vec::new();
    let mut next: Option<u128> = Some(0);
    for (s, e) in iv {
        if let Some(n) = next {
            if s > n {
                out.push((n, s - 1));
            }
            if e >= n {
                next = e.checked_add(1).filter(|x| *x <= max);
            }
        }
    }
    if let Some(n) = next {
        out.push((n, max));
    }
    out.into_iter()
        .filter_map(|(s, e)| {
            if v6 {
                Some(AddrRange::V6 { start: s, end: e })
            } else {
                Some(AddrRange::V4 {
                    start: u32::try_from(s).ok()?,
                    end: u32::try_from(e).ok()?,
                })
            }
        })
        .collect()
}

/// What a rule does.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Jump(String),
    Return,
    None,
}

/// One rule of a chain after parsing (a jump's conditions folded in).
#[derive(Clone, Debug)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts about one rule, each checked on its own"
)]
struct Flat {
    origin: Origin,
    comment: Option<String>,
    cond: Cond,
    verdict: Verdict,
    sport: bool,
    lo: bool,
    own_addr: bool,
    ct: Option<Vec<String>>,
    icmp_types: Option<Vec<String>>,
    /// (rate, per) of a `limit`.
    limit: Option<(u64, String)>,
    log: bool,
    /// (kind, what) segbpf cannot express.
    issues: Vec<(WarningKind, String)>,
}

fn proto_num(v: &Value) -> Option<u8> {
    if let Some(n) = v.as_u64() {
        return u8::try_from(n).ok();
    }
    match v.as_str()? {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmpv6" | "ipv6-icmp" => Some(58),
        "sctp" => Some(132),
        "gre" => Some(47),
        "esp" => Some(50),
        "ah" => Some(51),
        _ => None,
    }
}

fn list(v: &Value) -> Vec<Value> {
    match v.get("set").and_then(Value::as_array) {
        Some(a) => a.clone(),
        None => match v.as_array() {
            Some(a) => a.clone(),
            None => vec![v.clone()],
        },
    }
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}...", &s[..77])
    } else {
        s
    }
}

/// Parses one rule of a chain in table (`family`, `table`) of `rs`.
fn parse_rule(rs: &Ruleset, chain: &Chain, r: &super::ruleset::RawRule, dir: Direction) -> Flat {
    let mut f = Flat {
        origin: r.origin.clone(),
        comment: r.comment.clone(),
        cond: Cond {
            v6: match chain.family {
                Family::Ip => Some(false),
                Family::Ip6 => Some(true),
                _ => None,
            },
            ..Cond::default()
        },
        verdict: Verdict::None,
        sport: false,
        lo: false,
        own_addr: false,
        ct: None,
        icmp_types: None,
        limit: None,
        log: false,
        issues: Vec::new(),
    };
    for e in &r.expr {
        let Some((k, v)) = e.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        match k.as_str() {
            "match" => parse_match(&mut f, v, dir, rs, chain),
            "counter" | "comment" => {}
            "log" => f.log = true,
            "limit" => {
                f.limit = Some((
                    v["rate"].as_u64().unwrap_or(0),
                    v["per"].as_str().unwrap_or("second").to_string(),
                ));
            }
            "accept" => f.verdict = Verdict::Accept,
            "drop" | "reject" => f.verdict = Verdict::Drop,
            "jump" | "goto" => {
                f.verdict = Verdict::Jump(v["target"].as_str().unwrap_or("").to_string());
            }
            "return" => f.verdict = Verdict::Return,
            "snat" | "dnat" | "masquerade" | "redirect" => f
                .issues
                .push((WarningKind::Nat, format!("{k} (address translation)"))),
            "mangle" => {
                let key = &v["key"];
                if key["meta"]["key"] == "mark" || key["ct"]["key"] == "mark" {
                    f.issues
                        .push((WarningKind::Mark, "sets a mark".to_string()));
                } else if key["ct"]["key"] == "helper" {
                    f.issues
                        .push((WarningKind::Helper, "sets a conntrack helper".to_string()));
                } else {
                    f.issues.push((
                        WarningKind::Unsupported,
                        format!("changes the packet ({})", describe(key)),
                    ));
                }
            }
            "ct helper" => f
                .issues
                .push((WarningKind::Helper, "sets a conntrack helper".to_string())),
            "xt" => f.issues.push((
                WarningKind::Unsupported,
                format!(
                    "iptables extension {} `{}` that nftables cannot translate",
                    v["type"].as_str().unwrap_or("match"),
                    v["name"].as_str().unwrap_or("?")
                ),
            )),
            other => f
                .issues
                .push((WarningKind::Unsupported, format!("statement `{other}`"))),
        }
    }
    f
}

fn parse_match(f: &mut Flat, m: &Value, dir: Direction, rs: &Ruleset, chain: &Chain) {
    let op = m["op"].as_str().unwrap_or("==");
    let neg = op == "!=";
    let left = &m["left"];
    let right = &m["right"];
    let unsupported = |f: &mut Flat, what: String| f.issues.push((WarningKind::Unsupported, what));
    let set_of = |name: &str| rs.set(chain.family, &chain.table, name);
    if let Some(p) = left.get("payload") {
        let proto = p["protocol"].as_str().unwrap_or("");
        let field = p["field"].as_str().unwrap_or("");
        match (proto, field) {
            ("ip" | "ip6", "saddr" | "daddr") => {
                let v6 = proto == "ip6";
                f.cond.v6 = Some(v6);
                let peer_field = match dir {
                    Direction::Ingress => "saddr",
                    Direction::Egress => "daddr",
                };
                if field != peer_field {
                    f.own_addr = true;
                    return;
                }
                let (ranges, items) = match right.as_str().and_then(|s| s.strip_prefix('@')) {
                    Some(name) => {
                        if let Some(a) = set_of(name).and_then(|s| s.addrs.clone()) {
                            (
                                a,
                                vec![PeerItem::Set(
                                    chain.family,
                                    chain.table.clone(),
                                    name.to_string(),
                                )],
                            )
                        } else {
                            unsupported(
                                f,
                                format!("address set @{name} of a type segbpf cannot read"),
                            );
                            return;
                        }
                    }
                    None => {
                        if let Some(a) = addr_elem(right) {
                            let items = a.iter().map(|r| PeerItem::Lit(r.to_string())).collect();
                            (a, items)
                        } else {
                            unsupported(f, format!("address match {}", describe(right)));
                            return;
                        }
                    }
                };
                if neg {
                    let c = complement(&ranges, v6);
                    f.cond.peer_items = c.iter().map(|r| PeerItem::Lit(r.to_string())).collect();
                    f.cond.peers = Some(c);
                } else if op == "==" || op == "in" {
                    f.cond.peers = Some(ranges);
                    f.cond.peer_items = items;
                } else {
                    unsupported(f, format!("address comparison `{op}`"));
                }
            }
            ("tcp" | "udp" | "th" | "sctp", "dport" | "sport") => {
                if proto != "th" {
                    let n = proto_num(&Value::String(proto.to_string())).unwrap_or(0);
                    f.cond.protos = Some(match &f.cond.protos {
                        Some(p) if p.contains(&n) => vec![n],
                        Some(_) => vec![],
                        None => vec![n],
                    });
                }
                if field == "sport" {
                    f.sport = true;
                    return;
                }
                let ports: Option<Vec<PortRange>> =
                    match right.as_str().and_then(|s| s.strip_prefix('@')) {
                        Some(name) => set_of(name).and_then(|s| s.ports.clone()),
                        None => list(right).iter().map(port_elem).collect(),
                    };
                match ports {
                    Some(p) if !neg && (op == "==" || op == "in") => f.cond.dports = Some(p),
                    Some(p) if neg => {
                        let mut out = Vec::new();
                        let mut next = Some(0u16);
                        let mut p = p;
                        p.sort();
                        for r in p {
                            if let Some(n) = next {
                                if r.lo > n {
                                    out.extend(PortRange::new(n, r.lo - 1));
                                }
                                if r.hi >= n {
                                    next = r.hi.checked_add(1);
                                }
                            }
                        }
                        if let Some(n) = next {
                            out.extend(PortRange::new(n, u16::MAX));
                        }
                        f.cond.dports = Some(out);
                    }
                    _ => unsupported(f, format!("port match {op} {}", describe(right))),
                }
            }
            ("icmp" | "icmpv6", "type") => {
                f.cond.protos = Some(vec![if proto == "icmp" { 1 } else { 58 }]);
                f.icmp_types = Some(
                    list(right)
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                        .collect(),
                );
                if neg {
                    unsupported(f, "negated ICMP type match".to_string());
                }
            }
            ("ip", "protocol") | ("ip6", "nexthdr") => {
                f.cond.v6 = Some(proto == "ip6");
                set_protos(f, right, neg);
            }
            _ => unsupported(f, format!("match on {proto} {field}")),
        }
    } else if let Some(meta) = left.get("meta") {
        match meta["key"].as_str().unwrap_or("") {
            "l4proto" => set_protos(f, right, neg),
            "nfproto" | "protocol" => match right.as_str() {
                Some("ipv4" | "ip") if !neg => f.cond.v6 = Some(false),
                Some("ipv6" | "ip6") if !neg => f.cond.v6 = Some(true),
                _ => unsupported(f, format!("meta protocol {}", describe(right))),
            },
            key @ ("iif" | "iifname" | "oif" | "oifname") => {
                let names: Vec<String> = list(right)
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect();
                if names.iter().any(|n| n == "lo") {
                    if neg {
                        // `iifname != lo`: the packets of the interfaces segbpf judges.
                        return;
                    }
                    f.lo = true;
                    return;
                }
                if neg || names.is_empty() || names.iter().any(|n| n.contains('*')) {
                    unsupported(f, format!("interface match {key} {op} {}", describe(right)));
                    return;
                }
                f.cond.ifaces = Some(names);
            }
            "mark" => f
                .issues
                .push((WarningKind::Mark, "matches a mark".to_string())),
            key => unsupported(f, format!("match on meta {key}")),
        }
    } else if let Some(ct) = left.get("ct") {
        match ct["key"].as_str().unwrap_or("") {
            "state" => {
                let states: Vec<String> = list(right)
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect();
                if neg {
                    unsupported(f, format!("ct state != {}", states.join(",")));
                } else {
                    f.ct = Some(states);
                }
            }
            "mark" => f
                .issues
                .push((WarningKind::Mark, "matches a conntrack mark".to_string())),
            "helper" => f.issues.push((
                WarningKind::Helper,
                "matches a conntrack helper".to_string(),
            )),
            key => unsupported(f, format!("match on ct {key}")),
        }
    } else {
        unsupported(f, format!("match {}", describe(left)));
    }
}

fn set_protos(f: &mut Flat, right: &Value, neg: bool) {
    let ps: Option<Vec<u8>> = list(right).iter().map(proto_num).collect();
    match ps {
        Some(p) if !neg => {
            f.cond.protos = Some(match &f.cond.protos {
                Some(old) => old.iter().filter(|x| p.contains(x)).copied().collect(),
                None => p,
            });
        }
        _ => f.issues.push((
            WarningKind::Unsupported,
            format!("protocol match {}", describe(right)),
        )),
    }
}

/// The rules of a base chain in order, jumps inlined.
fn walk(
    rs: &Ruleset,
    chain: &Chain,
    dir: Direction,
    inherited: Option<&Flat>,
    depth: u32,
    out: &mut Vec<Flat>,
) {
    for r in &chain.rules {
        let mut f = parse_rule(rs, chain, r, dir);
        if let Some(p) = inherited {
            f.cond = p.cond.and(&f.cond);
            f.sport |= p.sport;
            f.lo |= p.lo;
            f.own_addr |= p.own_addr;
            if f.ct.is_none() {
                f.ct.clone_from(&p.ct);
            }
            f.issues.extend(p.issues.iter().cloned());
            if f.limit.is_none() {
                f.limit.clone_from(&p.limit);
            }
        }
        match &f.verdict {
            Verdict::Jump(target) => match rs.chain(chain.family, &chain.table, target) {
                Some(c) if depth < 16 => walk(rs, c, dir, Some(&f), depth + 1, out),
                _ => {
                    f.issues.push((
                        WarningKind::Unsupported,
                        format!("jump to {target} (not found or too deep)"),
                    ));
                    out.push(f);
                }
            },
            Verdict::Return => {
                if f.cond != Cond::default() || f.ct.is_some() {
                    f.issues
                        .push((WarningKind::Unsupported, "a conditional return".to_string()));
                    out.push(f);
                }
                return;
            }
            _ => out.push(f),
        }
    }
}

/// A rule of the output.
#[derive(Clone, Debug)]
struct OutRule {
    dir: Direction,
    cond: Cond,
    any_proto: bool,
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
    icmp: bool,
    icmpv6: bool,
    origins: Vec<Origin>,
    note: Option<String>,
    description: Option<String>,
}

impl OutRule {
    /// The rule's body, without comments (identity for merging).
    fn key(&self, sets: &SetNames) -> String {
        let mut s = String::new();
        let peer_key = if self.dir == Direction::Ingress {
            "from"
        } else {
            "to"
        };
        let _ = writeln!(s, "{peer_key} = {}", peer_text(&self.cond, sets));
        if self.any_proto {
            let _ = writeln!(s, "proto = \"any\"");
        }
        let ports = |v: &[PortRange]| {
            v.iter()
                .map(|p| {
                    if p.lo == p.hi {
                        p.lo.to_string()
                    } else {
                        format!("\"{p}\"")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.tcp.is_empty() {
            let _ = writeln!(s, "tcp = [{}]", ports(&self.tcp));
        }
        if !self.udp.is_empty() {
            let _ = writeln!(s, "udp = [{}]", ports(&self.udp));
        }
        if self.icmp {
            let _ = writeln!(s, "icmp = true");
        }
        if self.icmpv6 {
            let _ = writeln!(s, "icmpv6 = true");
        }
        if let Some(i) = &self.cond.ifaces {
            let _ = writeln!(
                s,
                "interfaces = [{}]",
                i.iter().map(|x| q(x)).collect::<Vec<_>>().join(", ")
            );
        }
        s
    }
}

fn q(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(o, "\\u{:04x}", u32::from(c));
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Set names in the output, by (host index, family, table, name).
type SetNames = BTreeMap<(usize, Family, String, String), String>;

thread_local! {
    static HOST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn peer_text(c: &Cond, sets: &SetNames) -> String {
    let host = HOST.with(std::cell::Cell::get);
    let items: Vec<String> = match &c.peers {
        None => match c.v6 {
            None => vec!["any".to_string()],
            Some(false) => vec!["0.0.0.0/0".to_string()],
            Some(true) => vec!["::/0".to_string()],
        },
        Some(_) => c
            .peer_items
            .iter()
            .map(|i| match i {
                PeerItem::Set(f, t, n) => sets
                    .get(&(host, *f, t.clone(), n.clone()))
                    .cloned()
                    .unwrap_or_else(|| n.clone()),
                PeerItem::Lit(l) => l.clone(),
            })
            .collect(),
    };
    if items.len() == 1 {
        q(&items[0])
    } else {
        format!(
            "[{}]",
            items.iter().map(|x| q(x)).collect::<Vec<_>>().join(", ")
        )
    }
}

/// What one host's ruleset gives.
#[derive(Debug, Default)]
struct HostResult {
    rules: Vec<OutRule>,
    /// Default verdict per direction: true = accept.
    accept: [bool; 2],
    established: bool,
    log_rate: Option<u32>,
    /// Ingress accepts ICMP echo from any peer (or its policy accepts).
    echo_any: bool,
    /// Echo requests accepted from (to) anyone, by direction and family
    /// (`[direction][0]` IPv4, `[direction][1]` IPv6).
    echo: [[bool; 2]; 2],
    sport_rules: bool,
    warnings: Vec<Warning>,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn warn(
    host: &Host,
    origin: &Origin,
    kind: WarningKind,
    message: String,
    instead: &str,
    scope: Option<Scope>,
) -> Warning {
    Warning {
        origin: origin.clone(),
        roles: vec![host.input.role.clone()],
        kind,
        message,
        instead: instead.to_string(),
        scope,
    }
}

fn per_second(rate: u64, per: &str) -> u32 {
    let div = match per {
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        "week" => 604_800,
        _ => 1,
    };
    u32::try_from(rate.div_ceil(div).clamp(1, 1_000_000)).unwrap_or(1_000_000)
}

fn analyse(host: &Host) -> HostResult {
    let rs = &host.ruleset;
    let mut res = HostResult {
        accept: [true, true],
        ..HostResult::default()
    };
    let file_origin = Origin {
        file: host.file.clone(),
        line: None,
        text: "ruleset".to_string(),
    };
    for o in &rs.objects {
        res.warnings.push(warn(
            host,
            &file_origin,
            if o.starts_with("ct helper") {
                WarningKind::Helper
            } else {
                WarningKind::Unsupported
            },
            format!("defines {o}"),
            "not imported",
            None,
        ));
    }
    let mut families_by_dir: [Vec<Family>; 2] = [Vec::new(), Vec::new()];
    for chain in &rs.chains {
        let Some(hook) = chain.hook.as_deref() else {
            continue;
        };
        let kind = chain.kind.as_deref().unwrap_or("filter");
        let dir = match (kind, hook) {
            ("filter", "input") if chain.family != Family::Other => Direction::Ingress,
            ("filter", "output") if chain.family != Family::Other => Direction::Egress,
            _ => {
                // NAT, marks and other hooks: every rule that does something is warned about.
                let mut flats = Vec::new();
                walk(rs, chain, Direction::Ingress, None, 0, &mut flats);
                for f in &flats {
                    let nat = f.issues.iter().find(|(k, _)| *k == WarningKind::Nat);
                    let mark = f.issues.iter().find(|(k, _)| *k == WarningKind::Mark);
                    let (k, msg, instead) = if let Some((_, m)) = nat {
                        (
                            WarningKind::Nat,
                            m.clone(),
                            "no address translation (segbpf filters, it does not rewrite)",
                        )
                    } else if let Some((_, m)) = mark {
                        (WarningKind::Mark, m.clone(), "no marks")
                    } else if let Some((k, m)) = f.issues.first() {
                        (*k, m.clone(), "not imported")
                    } else if f.verdict == Verdict::Drop
                        || (f.verdict == Verdict::Accept && chain.policy.as_deref() == Some("drop"))
                    {
                        (
                            WarningKind::Ignored,
                            format!(
                                "{} in a {kind} chain on hook {hook} of table {} {}",
                                if f.verdict == Verdict::Drop {
                                    "drops"
                                } else {
                                    "accepts"
                                },
                                chain.family_name,
                                chain.table
                            ),
                            "not imported (segbpf judges the host's own traffic on its input and output)",
                        )
                    } else {
                        continue;
                    };
                    res.warnings
                        .push(warn(host, &f.origin, k, msg, instead, None));
                }
                continue;
            }
        };
        families_by_dir[dir_index(dir)].push(chain.family);
        let policy_accept = chain.policy.as_deref() != Some("drop");
        if !policy_accept {
            res.accept[dir_index(dir)] = false;
        }
        let mut flats = Vec::new();
        walk(rs, chain, dir, None, 0, &mut flats);
        chain_rules(host, &flats, dir, policy_accept, &mut res);
    }
    // A host with IPv4-only (or IPv6-only) tables does not filter the other family.
    for dir in Direction::ALL {
        let fams = &families_by_dir[dir_index(dir)];
        if res.accept[dir_index(dir)] || fams.is_empty() || fams.contains(&Family::Inet) {
            continue;
        }
        let (has4, has6) = (fams.contains(&Family::Ip), fams.contains(&Family::Ip6));
        if has4 != has6 {
            res.warnings.push(warn(
                host,
                &file_origin,
                WarningKind::Approximation,
                format!(
                    "filters only {} on {dir}: {} passes unfiltered",
                    if has4 { "IPv4" } else { "IPv6" },
                    if has4 { "IPv6" } else { "IPv4" }
                ),
                "the same rules and defaults apply to both families",
                None,
            ));
        }
    }
    res
}

/// Whether a `ct state` match admits new connections and otherwise only
/// packets of connections (`new`, or `new,established[,related]`, the
/// common idiom for opening a port): the rule is an allow rule, and
/// segbpf's own tracking takes care of the rest of the flow.
fn opens_new(states: &[String]) -> bool {
    states.iter().any(|s| s == "new")
        && states
            .iter()
            .all(|s| matches!(s.as_str(), "new" | "established" | "related"))
}

fn chain_rules(
    host: &Host,
    flats: &[Flat],
    dir: Direction,
    policy_accept: bool,
    res: &mut HostResult,
) {
    // First pass: which accepts become rules.
    let emitted: Vec<bool> = flats
        .iter()
        .map(|f| {
            f.verdict == Verdict::Accept
                && !policy_accept
                && !f.lo
                && !f.sport
                && f.issues.is_empty()
                && f.ct.as_ref().is_none_or(|s| opens_new(s))
        })
        .collect();
    for (i, f) in flats.iter().enumerate() {
        let scope = Some(Scope::of(dir, f.cond.clone()));
        if f.lo {
            continue;
        }
        if let Some(states) = &f.ct {
            let est = states.iter().all(|s| s == "established" || s == "related");
            if est && f.verdict == Verdict::Accept {
                res.established = true;
                continue;
            }
            if states.iter().all(|s| s == "invalid") && f.verdict == Verdict::Drop {
                continue;
            }
            if !opens_new(states) && f.verdict != Verdict::None {
                res.warnings.push(warn(
                    host,
                    &f.origin,
                    WarningKind::Unsupported,
                    format!("matches ct state {}", states.join(",")),
                    "not imported: segbpf's own connection tracking decides (established = true)",
                    scope,
                ));
                continue;
            }
        }
        if f.verdict == Verdict::None {
            if f.log {
                let rate = if let Some((r, per)) = &f.limit {
                    per_second(*r, per)
                } else {
                    res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::Approximation,
                        "logs without a rate limit".to_string(),
                        "drop events at log_rate = 10 per second",
                        None,
                    ));
                    10
                };
                res.log_rate = Some(res.log_rate.unwrap_or(0).max(rate));
            }
            for (k, m) in &f.issues {
                let instead = match k {
                    WarningKind::Nat => {
                        "no address translation (segbpf filters, it does not rewrite)"
                    }
                    WarningKind::Mark => "no marks",
                    _ => "not imported",
                };
                res.warnings
                    .push(warn(host, &f.origin, *k, m.clone(), instead, None));
            }
            continue;
        }
        if !f.issues.is_empty() {
            let accept = f.verdict == Verdict::Accept;
            for (k, m) in &f.issues {
                let instead = match (k, accept) {
                    (WarningKind::Nat, _) => {
                        "no address translation (segbpf filters, it does not rewrite)"
                    }
                    (_, true) => {
                        "the rule is left out: what it accepts gets the other rules and the default"
                    }
                    (_, false) => {
                        "the rule is left out: what it drops gets the other rules and the default"
                    }
                };
                res.warnings
                    .push(warn(host, &f.origin, *k, m.clone(), instead, scope.clone()));
            }
            continue;
        }
        if f.own_addr {
            res.warnings.push(warn(
                host,
                &f.origin,
                WarningKind::Approximation,
                "matches the host's own address".to_string(),
                "that match is left out (the rule applies to every address of the host)",
                scope.clone(),
            ));
        }
        match f.verdict {
            Verdict::Accept => {
                if f.sport {
                    res.sport_rules = true;
                    res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::SourcePort,
                        "accepts by source port (the stateless reply idiom); it also lets in new connections from that port".to_string(),
                        "left out: connection tracking (established = true) lets replies pass",
                        // `--verify` probes come from source ports no rule
                        // names, so this rule explains no difference.
                        None,
                    ));
                    continue;
                }
                if policy_accept {
                    continue;
                }
                if let Some((r, per)) = &f.limit {
                    res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::RateLimit,
                        format!("accepts at most {r}/{per}"),
                        "allowed without a rate limit",
                        scope.clone(),
                    ));
                }
                if let Some(o) = to_out(host, f, dir, res) {
                    res.rules.push(o);
                }
            }
            Verdict::Drop => {
                if policy_accept {
                    res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::Deny,
                        "drops in a chain whose policy accepts (a deny rule)".to_string(),
                        "allowed: segbpf has no deny rules",
                        scope,
                    ));
                    continue;
                }
                let later = flats
                    .iter()
                    .enumerate()
                    .skip(i + 1)
                    .find(|(j, a)| emitted[*j] && a.cond.overlaps(&f.cond));
                if let Some((_, a)) = later {
                    res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::DropBeforeAccept,
                        format!(
                            "drops packets that the later rule at {} ({}) accepts (an exception)",
                            a.origin, a.origin.text
                        ),
                        "allowed: rules only allow, so the exception is lost",
                        scope,
                    ));
                }
            }
            _ => {}
        }
    }
}

fn to_out(host: &Host, f: &Flat, dir: Direction, res: &mut HostResult) -> Option<OutRule> {
    let mut o = OutRule {
        dir,
        cond: f.cond.clone(),
        any_proto: false,
        tcp: Vec::new(),
        udp: Vec::new(),
        icmp: false,
        icmpv6: false,
        origins: vec![f.origin.clone()],
        note: None,
        description: f.comment.clone(),
    };
    if f.cond.peers.as_ref().is_some_and(Vec::is_empty) {
        return None;
    }
    let ports = f
        .cond
        .dports
        .clone()
        .unwrap_or_else(|| vec![PortRange::ALL]);
    match &f.cond.protos {
        None if f.cond.dports.is_none() => o.any_proto = true,
        None => {
            o.tcp.clone_from(&ports);
            o.udp = ports;
        }
        Some(ps) => {
            for p in ps {
                match p {
                    6 => o.tcp.clone_from(&ports),
                    17 => o.udp.clone_from(&ports),
                    1 => o.icmp = true,
                    58 => o.icmpv6 = true,
                    other => res.warnings.push(warn(
                        host,
                        &f.origin,
                        WarningKind::Unsupported,
                        format!("accepts IP protocol {other}"),
                        "left out: a rule allows tcp, udp, icmp, icmpv6 or every protocol",
                        Some(Scope::of(dir, f.cond.clone())),
                    )),
                }
            }
        }
    }
    if o.icmp || o.icmpv6 {
        if let Some(types) = &f.icmp_types {
            let nd = [
                "nd-router-solicit",
                "nd-router-advert",
                "nd-neighbor-solicit",
                "nd-neighbor-advert",
                "mld-listener-query",
                "mld-listener-report",
                "mld-listener-done",
                "mld2-listener-report",
            ];
            if o.icmpv6 && types.iter().all(|t| nd.contains(&t.as_str())) {
                // Neighbour discovery and MLD: segbpf always allows them.
                return None;
            }
            let echo_only = types
                .iter()
                .all(|t| matches!(t.as_str(), "echo-request" | "echo-reply"));
            if echo_only {
                o.note = Some("echo".to_string());
            } else {
                res.warnings.push(warn(
                    host,
                    &f.origin,
                    WarningKind::Approximation,
                    format!("accepts ICMP types {}", types.join(",")),
                    "every ICMP type is allowed from these peers",
                    None,
                ));
            }
        }
        if dir == Direction::Ingress && f.cond.peers.is_none() && f.cond.ifaces.is_none() {
            res.echo_any = true;
        }
    }
    // Echo requests from (to) anyone, per family.
    let echo = f
        .icmp_types
        .as_ref()
        .is_none_or(|t| t.iter().any(|x| x == "echo-request"));
    if f.cond.peers.is_none() && f.cond.ifaces.is_none() {
        let d = dir_index(dir);
        res.echo[d][0] |= o.any_proto || (o.icmp && echo);
        res.echo[d][1] |= o.any_proto || (o.icmpv6 && echo);
    }
    if !(o.any_proto || o.icmp || o.icmpv6 || !o.tcp.is_empty() || !o.udp.is_empty()) {
        return None;
    }
    Some(o)
}

fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, '_');
    }
    if s == "any" {
        s = "any_".to_string();
    }
    s
}

/// Maps the hosts to roles.toml text and the warnings.
pub fn map(hosts: &[Host], hosts_args: &[HostsArg]) -> Result<(String, Vec<Warning>), ImportError> {
    let results: Vec<HostResult> = hosts.iter().map(analyse).collect();
    let mut warnings: Vec<Warning> = Vec::new();

    // Sets: keep names; identical sets of several hosts are one.
    let mut sets: SetNames = BTreeMap::new();
    let mut contents: BTreeMap<String, Vec<AddrRange>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut wanted: Vec<(usize, Family, String, String)> = Vec::new();
    for (hi, r) in results.iter().enumerate() {
        for rule in &r.rules {
            for item in &rule.cond.peer_items {
                if let PeerItem::Set(f, t, n) = item {
                    wanted.push((hi, *f, t.clone(), n.clone()));
                }
            }
        }
    }
    for a in hosts_args {
        if let HostsValue::Set(name) = &a.value {
            let found = hosts.iter().enumerate().find_map(|(hi, h)| {
                h.ruleset
                    .sets
                    .iter()
                    .find(|s| s.name == *name && s.addrs.is_some())
                    .map(|s| (hi, s.family, s.table.clone(), s.name.clone()))
            });
            match found {
                Some(w) => wanted.push(w),
                None => {
                    return Err(ImportError::Argument(format!(
                        "--hosts {}={name}: no address set `{name}` in the rulesets",
                        a.role
                    )));
                }
            }
        }
    }
    for (hi, f, t, n) in wanted {
        let key = (hi, f, t.clone(), n.clone());
        if sets.contains_key(&key) {
            continue;
        }
        let Some(elems) = hosts[hi]
            .ruleset
            .set(f, &t, &n)
            .and_then(|s| s.addrs.clone())
        else {
            continue;
        };
        let mut elems_sorted = elems.clone();
        elems_sorted.sort();
        let base = sanitize(&n);
        let mut name = base.clone();
        let mut k = 1;
        loop {
            match contents.get(&name) {
                None => {
                    contents.insert(name.clone(), elems_sorted.clone());
                    order.push(name.clone());
                    break;
                }
                Some(c) if *c == elems_sorted => break,
                Some(_) => {
                    name = if k == 1 {
                        format!("{base}_{}", sanitize(&hosts[hi].input.role))
                    } else {
                        format!("{base}_{}_{k}", sanitize(&hosts[hi].input.role))
                    };
                    k += 1;
                }
            }
        }
        if name != base {
            warnings.push(Warning {
                origin: Origin {
                    file: hosts[hi].file.clone(),
                    line: None,
                    text: format!("set {n}"),
                },
                roles: vec![hosts[hi].input.role.clone()],
                kind: WarningKind::Approximation,
                message: format!("set `{n}` differs from the set of that name in another file"),
                instead: format!("imported as `{name}`"),
                scope: None,
            });
        }
        sets.insert(key, name);
    }

    // Defaults.
    let all_accept = |d: usize| results.iter().all(|r| r.accept[d]);
    let ingress_allow = all_accept(0);
    let egress_allow = all_accept(1);
    let established = results.iter().any(|r| r.established || r.sport_rules);
    let icmp = results.iter().all(|r| r.echo_any || r.accept[0]);
    let log_rate = results.iter().filter_map(|r| r.log_rate).max().unwrap_or(0);
    for (h, r) in hosts.iter().zip(&results) {
        warnings.extend(r.warnings.iter().cloned());
        // `icmp = true` passes echo requests both ways, in both families.
        let fams = super::ruleset::families(&h.ruleset);
        for (d, dir) in Direction::ALL.into_iter().enumerate() {
            for (f, v6) in [false, true].into_iter().enumerate() {
                if !icmp || r.accept[d] || r.echo[d][f] || !fams.contains(&v6) {
                    continue;
                }
                let (name, proto) = if v6 { ("ICMPv6", 58) } else { ("ICMP", 1) };
                warnings.push(Warning {
                    origin: Origin {
                        file: h.file.clone(),
                        line: None,
                        text: "ruleset".to_string(),
                    },
                    roles: vec![h.input.role.clone()],
                    kind: WarningKind::Approximation,
                    message: format!("does not accept {name} echo requests on {dir}"),
                    instead: "icmp = true: echo requests pass in both directions and families"
                        .to_string(),
                    scope: Some(Scope::of(
                        dir,
                        Cond {
                            protos: Some(vec![proto]),
                            v6: Some(v6),
                            ..Cond::default()
                        },
                    )),
                });
            }
        }
        if established && !r.established && !(r.accept[0] && r.accept[1]) {
            warnings.push(Warning {
                origin: Origin {
                    file: h.file.clone(),
                    line: None,
                    text: "ruleset".to_string(),
                },
                roles: vec![h.input.role.clone()],
                kind: WarningKind::Approximation,
                message: "has no `ct state established,related accept`".to_string(),
                instead: "established = true for every host: replies to allowed flows pass"
                    .to_string(),
                scope: Some(Scope::replies()),
            });
        }
    }

    // One warning per rule and message, with every role it concerns.
    let mut merged: Vec<Warning> = Vec::new();
    for w in warnings {
        match merged
            .iter_mut()
            .find(|m| m.origin == w.origin && m.kind == w.kind && m.message == w.message)
        {
            Some(m) => {
                for r in w.roles {
                    if !m.roles.contains(&r) {
                        m.roles.push(r);
                    }
                }
            }
            None => merged.push(w),
        }
    }
    let warnings = merged;

    // Roles, in first-seen order, with their rules merged.
    let mut roles: Vec<String> = Vec::new();
    for h in hosts {
        if !roles.contains(&h.input.role) {
            roles.push(h.input.role.clone());
        }
    }
    let mut by_role: BTreeMap<String, Vec<(String, OutRule)>> = BTreeMap::new();
    for (hi, (h, r)) in hosts.iter().zip(&results).enumerate() {
        HOST.with(|c| c.set(hi));
        let entry = by_role.entry(h.input.role.clone()).or_default();
        for d in Direction::ALL {
            let allow_default = if d == Direction::Ingress {
                ingress_allow
            } else {
                egress_allow
            };
            if r.accept[dir_index(d)] && !allow_default {
                let o = OutRule {
                    dir: d,
                    cond: Cond::default(),
                    any_proto: true,
                    tcp: Vec::new(),
                    udp: Vec::new(),
                    icmp: false,
                    icmpv6: false,
                    origins: vec![Origin {
                        file: h.file.clone(),
                        line: None,
                        text: format!("{d} chain policy accept"),
                    }],
                    note: Some(format!(
                        "{}: the {d} chain's policy accepts (other hosts drop by default)",
                        h.file
                    )),
                    description: None,
                };
                let k = o.key(&sets);
                if let Some(e) = entry.iter_mut().find(|(kk, x)| *kk == k && x.dir == d) {
                    e.1.origins.extend(o.origins);
                } else {
                    entry.push((k, o));
                }
            }
        }
        for o in &r.rules {
            if icmp
                && o.note.as_deref() == Some("echo")
                && o.cond.peers.is_none()
                && o.cond.ifaces.is_none()
            {
                continue; // defaults.icmp = true passes echo from anyone
            }
            if r.accept[dir_index(o.dir)] {
                continue;
            }
            let k = o.key(&sets);
            if let Some(e) = entry.iter_mut().find(|(kk, x)| *kk == k && x.dir == o.dir) {
                e.1.origins.extend(o.origins.iter().cloned());
            } else {
                entry.push((k, o.clone()));
            }
        }
    }
    // Rules every role has are base rules.
    let mut base: Vec<(String, OutRule)> = Vec::new();
    if roles.len() > 1 {
        let first = by_role.get(&roles[0]).cloned().unwrap_or_default();
        for (k, o) in first {
            let everywhere = roles.iter().all(|r| {
                by_role
                    .get(r)
                    .is_some_and(|v| v.iter().any(|(kk, x)| *kk == k && x.dir == o.dir))
            });
            if everywhere {
                let mut merged = o.clone();
                merged.origins.clear();
                for r in &roles {
                    if let Some(v) = by_role.get_mut(r)
                        && let Some(pos) = v.iter().position(|(kk, x)| *kk == k && x.dir == o.dir)
                    {
                        let (_, x) = v.remove(pos);
                        merged.origins.extend(x.origins);
                    }
                }
                base.push((k, merged));
            }
        }
    }

    // The text.
    let mut t = String::new();
    let _ = writeln!(t, "# Imported by segbpf import from:");
    for h in hosts {
        let _ = writeln!(t, "#   role {} <- {}", h.input.role, h.file);
    }
    let _ = writeln!(
        t,
        "# Chain policies: a direction defaults to \"allow\" only when every host's chain accepts by\n# default; otherwise to \"drop\", and roles whose chain accepts get an allow-any rule."
    );
    if !warnings.is_empty() {
        let _ = writeln!(
            t,
            "#\n# What could not be imported exactly ({} warnings; segbpf's behaviour after `->`):",
            warnings.len()
        );
        for w in &warnings {
            let _ = writeln!(
                t,
                "#   {}: {}: {} -> {} [{}]",
                w.origin,
                w.origin.text.replace('\n', " "),
                w.message,
                w.instead,
                w.kind.as_str()
            );
        }
    }
    let _ = writeln!(t, "\nversion = 1");
    if !order.is_empty() {
        let _ = writeln!(t, "\n[sets]");
        for n in &order {
            let items: Vec<String> = contents[n].iter().map(|r| q(&r.to_string())).collect();
            let _ = writeln!(t, "{n} = [{}]", items.join(", "));
        }
    }
    let _ = writeln!(t, "\n[defaults]");
    let _ = writeln!(
        t,
        "ingress = \"{}\"",
        if ingress_allow { "allow" } else { "drop" }
    );
    let _ = writeln!(
        t,
        "egress = \"{}\"",
        if egress_allow { "allow" } else { "drop" }
    );
    let _ = writeln!(t, "established = {established}");
    let _ = writeln!(t, "icmp = {icmp}");
    let _ = writeln!(t, "log_rate = {log_rate}");
    let write_rule = |t: &mut String, header: &str, o: &OutRule, key: &str| {
        let _ = writeln!(t, "\n[[{header}.{}]]", o.dir);
        let mut from: Vec<String> = Vec::new();
        for x in &o.origins {
            let x = x.to_string();
            if !from.contains(&x) {
                from.push(x);
            }
        }
        let text = o.origins[0].text.replace('\n', " ");
        let _ = writeln!(t, "# {}: {text}", from.join(", "));
        if let Some(n) = o.note.as_deref().filter(|n| *n != "echo") {
            let _ = writeln!(t, "# {n}");
        }
        t.push_str(key);
        if let Some(d) = &o.description {
            let _ = writeln!(t, "description = {}", q(d));
        }
    };
    for (k, o) in &base {
        write_rule(&mut t, "base", o, k);
    }
    for role in &roles {
        let rules = by_role.get(role).cloned().unwrap_or_default();
        let hosts_line =
            hosts_args
                .iter()
                .rev()
                .find(|a| a.role == *role)
                .map(|a| match &a.value {
                    HostsValue::Set(n) => {
                        let name = sets
                            .iter()
                            .find(|((_, _, _, orig), _)| orig == n)
                            .map_or_else(|| n.clone(), |(_, v)| v.clone());
                        q(&name)
                    }
                    HostsValue::Addresses(v) => format!(
                        "[{}]",
                        v.iter().map(|x| q(x)).collect::<Vec<_>>().join(", ")
                    ),
                });
        if hosts_line.is_none() && rules.is_empty() {
            let _ = writeln!(
                t,
                "\n# role {role}: no rules of its own and no --hosts: its hosts get the base rules"
            );
            continue;
        }
        let _ = writeln!(t, "\n[roles.{role}]");
        match hosts_line {
            Some(h) => {
                let _ = writeln!(t, "hosts = {h}");
            }
            None => {
                let _ = writeln!(
                    t,
                    "# no --hosts {role}=...: choose this role with `segbpf attach --role {role}`"
                );
            }
        }
        for (k, o) in &rules {
            write_rule(&mut t, &format!("roles.{role}"), o, k);
        }
    }
    Ok((t, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(role: &str, json: &str) -> Host {
        let v: Value = serde_json::from_str(json).unwrap();
        let file = format!("{role}.json");
        let mut ruleset =
            super::super::ruleset::parse_json(&file, &v, &super::super::source::Lines::new())
                .unwrap();
        ruleset.json = v;
        Host {
            input: super::super::HostFile {
                role: role.to_string(),
                file: file.clone().into(),
            },
            file,
            ruleset,
        }
    }

    fn rule(chain: &str, expr: &str) -> String {
        format!(
            r#"{{"rule": {{"family": "inet", "table": "f", "chain": "{chain}", "expr": {expr}}}}}"#
        )
    }

    fn ruleset(input_policy: &str, output_policy: &str, rules: &[String], extra: &str) -> String {
        format!(
            r#"{{"nftables": [{{"table": {{"family": "inet", "name": "f"}}}},
{{"chain": {{"family": "inet", "table": "f", "name": "in", "type": "filter", "hook": "input", "prio": 0, "policy": "{input_policy}"}}}},
{{"chain": {{"family": "inet", "table": "f", "name": "out", "type": "filter", "hook": "output", "prio": 0, "policy": "{output_policy}"}}}},
{}{extra}]}}"#,
            rules.join(",\n")
        )
    }

    const EST: &str = r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]"#;
    const SSH_NET: &str = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "198.18.0.0", "len": 24}}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]"#;

    #[test]
    fn hosts_map_to_defaults_base_rules_and_warnings() {
        let a = host(
            "a",
            &ruleset(
                "drop",
                "accept",
                &[
                    rule("in", EST),
                    rule(
                        "in",
                        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "198.18.0.66"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"drop": null}]"#,
                    ),
                    rule("in", SSH_NET),
                    rule(
                        "in",
                        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 53}}, {"accept": null}]"#,
                    ),
                    rule(
                        "in",
                        r#"[{"limit": {"rate": 6, "per": "minute"}}, {"log": {"prefix": "x"}}]"#,
                    ),
                ],
                "",
            ),
        );
        let b = host(
            "b",
            &ruleset(
                "drop",
                "drop",
                &[
                    rule("in", EST),
                    rule("in", SSH_NET),
                    rule(
                        "in",
                        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"limit": {"rate": 10, "per": "second"}}, {"accept": null}]"#,
                    ),
                    rule(
                        "out",
                        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": {"set": [53, {"range": [5000, 5010]}]}}}, {"accept": null}]"#,
                    ),
                ],
                r#",
{"chain": {"family": "inet", "table": "f", "name": "pre", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
{"rule": {"family": "inet", "table": "f", "chain": "pre", "expr": [{"dnat": {"addr": "198.18.0.5"}}]}}"#,
            ),
        );
        let (text, warnings) = map(&[a, b], &[]).unwrap();
        let p = crate::policy::Policy::from_str(&text, "t.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(p.defaults.ingress, crate::policy::Action::Drop);
        assert_eq!(p.defaults.egress, crate::policy::Action::Drop, "{text}");
        assert!(p.defaults.established);
        assert_eq!(p.defaults.log_rate, 1, "6/minute rounds up to 1/s");
        let labels: Vec<String> = p
            .rules
            .iter()
            .map(|r| format!("{} {}", r.label(), r.services()))
            .collect();
        assert!(
            labels.contains(&"base.ingress[0] tcp/22".to_string()),
            "{labels:?}\n{text}"
        );
        assert!(
            labels.contains(&"roles.a.egress[0] any".to_string()),
            "{labels:?}"
        );
        assert!(
            labels.contains(&"roles.b.ingress[0] tcp/80".to_string()),
            "{labels:?}"
        );
        assert!(
            labels.contains(&"roles.b.egress[0] udp/53,5000-5010".to_string()),
            "{labels:?}"
        );
        assert_eq!(p.rules.len(), 4, "{text}");
        let kinds: Vec<(&str, WarningKind)> = warnings
            .iter()
            .map(|w| (w.roles[0].as_str(), w.kind))
            .collect();
        for k in [
            ("a", WarningKind::DropBeforeAccept),
            ("a", WarningKind::SourcePort),
            ("b", WarningKind::RateLimit),
            ("b", WarningKind::Nat),
        ] {
            assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
        }
        // Each is a comment in the output.
        for k in ["drop-before-accept", "source-port", "rate-limit", "nat"] {
            assert!(text.contains(&format!("[{k}]")), "{k}\n{text}");
        }
    }

    #[test]
    fn new_established_accept_is_the_allow_rule_it_is() {
        let ct = |states: &str, port: u16| {
            rule(
                "in",
                &format!(
                    r#"[{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "tcp", "field": "dport"}}}}, "right": {port}}}}}, {{"match": {{"op": "in", "left": {{"ct": {{"key": "state"}}}}, "right": [{states}]}}}}, {{"accept": null}}]"#
                ),
            )
        };
        let a = host(
            "a",
            &ruleset(
                "drop",
                "accept",
                &[
                    rule("in", EST),
                    ct(r#""new", "established""#, 80),
                    ct(r#""established", "new", "related""#, 443),
                    ct(r#""new", "invalid""#, 8080),
                ],
                "",
            ),
        );
        let (text, warnings) = map(&[a], &[]).unwrap();
        let p = crate::policy::Policy::from_str(&text, "t.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let services: Vec<String> = p.rules.iter().map(crate::policy::Rule::services).collect();
        assert!(
            services.contains(&"tcp/80".to_string()),
            "{services:?}\n{text}"
        );
        assert!(
            services.contains(&"tcp/443".to_string()),
            "{services:?}\n{text}"
        );
        assert!(!services.iter().any(|s| s.contains("8080")), "{services:?}");
        // Only the `new,invalid` rule is left out, and said so.
        let unsupported: Vec<&Warning> = warnings
            .iter()
            .filter(|w| w.kind == WarningKind::Unsupported)
            .collect();
        assert_eq!(unsupported.len(), 1, "{warnings:?}");
        assert!(
            unsupported[0].message.contains("new,invalid"),
            "{warnings:?}"
        );
    }

    #[test]
    fn complement_of_one_address_and_of_nothing() {
        let one = crate::policy::addr::parse_item("198.18.0.1").unwrap();
        let c = complement(&[one], false);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].to_string(), "0.0.0.0-198.18.0.0");
        assert_eq!(c[1].to_string(), "198.18.0.2-255.255.255.255");
        assert_eq!(complement(&[], true), vec![AddrRange::any_v6()]);
        assert!(complement(&[AddrRange::any_v4()], false).is_empty());
    }

    #[test]
    fn overlap_needs_peer_proto_and_port_in_common() {
        let a = Cond {
            peers: Some(vec![
                crate::policy::addr::parse_item("198.18.0.0/24").unwrap(),
            ]),
            protos: Some(vec![6]),
            dports: Some(vec![PortRange::single(22)]),
            ..Cond::default()
        };
        let mut b = a.clone();
        b.peers = Some(vec![crate::policy::addr::parse_item("198.18.0.7").unwrap()]);
        assert!(a.overlaps(&b));
        b.dports = Some(vec![PortRange::single(80)]);
        assert!(!a.overlaps(&b));
        b.dports = None;
        b.protos = Some(vec![17]);
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&Cond::default()));
    }
}
