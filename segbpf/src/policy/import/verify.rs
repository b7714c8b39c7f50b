//! `--verify`: a differential test of each original ruleset against the
//! imported policy's reference evaluator ([`crate::policy::eval`]).
//!
//! For each host, a scratch namespace `H` gets one veth per interface the
//! rulesets or the policy name (`eth0` when none), whose peers are in a
//! second namespace `P`, and the ORIGINAL file loaded as the tools load it
//! (`nft -f`, `iptables-nft-restore`). An observer table
//! (`inet segbpf_probe`) with chains at the last priority of the `input` and
//! `output` hooks records, in a dynamic set, the source port of every
//! TCP/UDP packet that the original ruleset let through (a packet
//! accepted by every earlier base chain reaches it; a dropped one does not).
//! Each probe is a new connection (a TCP SYN or a UDP datagram) with its
//! own source port, sent as a raw IP packet: from `P` over the veth of an
//! interface for ingress, from `H` bound to the interface for egress. The
//! probes are every combination of the boundaries (first-1, first, last,
//! last+1) of every address range and port range in either the ruleset or
//! the policy, TCP and UDP, both directions, on each interface. Each
//! verdict is compared with [`crate::policy::eval::evaluate`] for the
//! host's role on that interface.
//!
//! This is the machinery the tests use to check `segbpf export nft`
//! (an nftables ruleset judged by real packets against the evaluator),
//! applied to any ruleset.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::Serialize;
use serde_json::Value;

use super::{
    ImportError, Warning,
    map::Scope,
    ruleset::{Ruleset, families},
    scratch::ScratchNs,
};
use crate::{
    host::packet::PacketSpec,
    policy::{AddrRange, Direction, Policy, PortRange, eval},
};

/// Whether the probe `d` is one of the packets of `scope`.
fn covers(scope: &Scope, d: &Difference) -> bool {
    if d.traffic == Traffic::Reply || scope.replies {
        return scope.replies && d.traffic == Traffic::Reply;
    }
    scope.direction == d.direction && scope.cond.matches(d.peer, d.proto, d.dport, &d.iface)
}

/// What a probe is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Traffic {
    /// A new connection: a TCP SYN or a UDP datagram.
    New,
    /// An ICMP or ICMPv6 echo request.
    Echo,
    /// The reply to a new connection that both let through (a TCP SYN-ACK
    /// or RST, a UDP datagram back): the established traffic.
    Reply,
}

/// A probe whose verdicts differ.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// What was probed: a new connection, an echo request, or the reply
    /// to a new connection (which `direction`, `peer` and `dport` describe).
    pub traffic: Traffic,
    /// The host's role.
    pub role: String,
    /// Its ruleset file.
    pub file: String,
    /// Direction.
    pub direction: Direction,
    /// Interface.
    pub iface: String,
    /// 6, 17, 1 or 58.
    pub proto: u8,
    /// The peer (source on ingress, destination on egress).
    pub peer: IpAddr,
    /// The host's address used.
    pub host: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// The original ruleset lets it through.
    pub original: bool,
    /// The imported policy lets it through.
    pub imported: bool,
    /// The warning that already reported it, if any (`FILE:LINE [kind]`).
    pub reported: Option<String>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |b: bool| if b { "accept" } else { "drop" };
        let p = match self.proto {
            6 => "tcp",
            17 => "udp",
            _ => "echo request",
        };
        let (src, dst) = match self.direction {
            Direction::Ingress => (self.peer, self.host),
            Direction::Egress => (self.host, self.peer),
        };
        let dst = if self.traffic == Traffic::Echo {
            dst.to_string()
        } else {
            sock(dst, self.dport)
        };
        let what = if self.traffic == Traffic::Reply {
            "the reply to "
        } else {
            ""
        };
        write!(
            f,
            "{} ({}) {} {}: {what}{p} {src} -> {dst}: original {}, imported {}",
            self.file,
            self.role,
            self.direction,
            self.iface,
            v(self.original),
            v(self.imported)
        )?;
        if let Some(r) = &self.reported {
            write!(f, " (reported: {r})")?;
        }
        Ok(())
    }
}

fn sock(a: IpAddr, p: u16) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}:{p}"),
        IpAddr::V6(_) => format!("[{a}]:{p}"),
    }
}

/// The result of verifying one host.
#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    /// Role.
    pub role: String,
    /// File.
    pub file: String,
    /// New-connection probes sent.
    pub probes: usize,
    /// New-connection probes the original let through.
    pub original_accepts: usize,
    /// Echo-request probes sent.
    pub echo_probes: usize,
    /// Replies probed (to new connections both let through).
    pub reply_probes: usize,
    /// The differences.
    pub differences: Vec<Difference>,
}

struct Probe {
    traffic: Traffic,
    dir: Direction,
    iface: usize,
    proto: u8,
    peer: IpAddr,
    dport: u16,
}

/// Verifies every host of an import.
pub fn verify(imported: &super::Imported) -> Result<Vec<HostReport>, ImportError> {
    let mut out = Vec::new();
    for h in &imported.hosts {
        out.push(verify_host(
            &h.input.file,
            &h.ruleset,
            &imported.policy,
            &h.input.role,
            &imported.warnings,
        )?);
    }
    Ok(out)
}

/// Verifies one ruleset file (read as `rs`) against the policy for `role`.
pub fn verify_host(
    path: &Path,
    rs: &Ruleset,
    policy: &Policy,
    role: &str,
    warnings: &[Warning],
) -> Result<HostReport, ImportError> {
    let roles = vec![role.to_string()];
    // What to probe.
    let mut ranges: Vec<AddrRange> = Vec::new();
    collect_addrs(&rs.json, &mut ranges);
    for s in &policy.sets {
        ranges.extend(s.ranges.iter().copied());
    }
    for r in &policy.rules {
        ranges.extend(r.peers.iter().copied());
    }
    let fams = families(rs);
    let own = super::role_addresses(policy, role);
    // A host address: the first of each family in the role's `hosts` (past
    // a network's first address when it has more than one).
    let pick = |r: &AddrRange| match *r {
        AddrRange::V4 { start, end } if end > start => IpAddr::V4(Ipv4Addr::from(start + 1)),
        AddrRange::V6 { start, end } if end > start => IpAddr::V6(Ipv6Addr::from(start + 1)),
        _ => r.first(),
    };
    let host4 = own
        .iter()
        .map(pick)
        .find(|a| a.is_ipv4() && usable(*a))
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(198, 19, 255, 254)));
    let host6 = own
        .iter()
        .map(pick)
        .find(|a| a.is_ipv6() && usable(*a))
        .unwrap_or(IpAddr::V6(Ipv6Addr::new(
            0xfd00, 0xffff, 0, 0, 0, 0, 0, 0xfffe,
        )));
    let mut peers: BTreeSet<IpAddr> = BTreeSet::new();
    for r in &ranges {
        for a in boundaries(r) {
            peers.insert(a);
        }
    }
    peers.insert(IpAddr::V4(Ipv4Addr::new(198, 19, 254, 1)));
    peers.insert(IpAddr::V6(Ipv6Addr::new(0xfd00, 0xfffe, 0, 0, 0, 0, 0, 1)));
    peers.retain(|a| usable(*a) && *a != host4 && *a != host6 && fams.contains(&a.is_ipv6()));
    let mut ports_mentioned: BTreeSet<u16> = BTreeSet::new();
    let mut port_ranges: Vec<PortRange> = Vec::new();
    collect_ports(&rs.json, &mut port_ranges);
    for r in &policy.rules {
        port_ranges.extend(r.tcp.iter().chain(&r.udp).copied());
    }
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    for p in &port_ranges {
        if *p == PortRange::ALL {
            continue;
        }
        for x in [
            p.lo.checked_sub(1),
            Some(p.lo),
            Some(p.hi),
            p.hi.checked_add(1),
        ]
        .into_iter()
        .flatten()
        {
            if x != 0 {
                ports.insert(x);
            }
        }
        ports_mentioned.insert(p.lo);
        ports_mentioned.insert(p.hi);
    }
    ports.insert(9);
    let mut ifaces: Vec<String> = Vec::new();
    collect_ifaces(&rs.json, &mut ifaces);
    for r in &policy.rules {
        for i in r.interfaces.iter().flatten() {
            if !ifaces.contains(i) {
                ifaces.push(i.clone());
            }
        }
    }
    if ifaces.is_empty() {
        ifaces.push("eth0".to_string());
    }
    let mut probes = Vec::new();
    for dir in Direction::ALL {
        for i in 0..ifaces.len() {
            for proto in [6u8, 17] {
                for peer in &peers {
                    for dport in &ports {
                        probes.push(Probe {
                            traffic: Traffic::New,
                            dir,
                            iface: i,
                            proto,
                            peer: *peer,
                            dport: *dport,
                        });
                    }
                }
            }
        }
    }
    // An echo request from (to) each peer on each interface.
    for dir in Direction::ALL {
        for i in 0..ifaces.len() {
            for peer in &peers {
                probes.push(Probe {
                    traffic: Traffic::Echo,
                    dir,
                    iface: i,
                    proto: if peer.is_ipv4() { 1 } else { 58 },
                    peer: *peer,
                    dport: 0,
                });
            }
        }
    }
    // Source ports (and echo ids) that identify probes: none that a rule
    // or probe names.
    let excluded = |p: u16| {
        ports.contains(&p)
            || port_ranges
                .iter()
                .any(|r| r.contains(p) && *r != PortRange::ALL)
    };
    let ids: Vec<u16> = (20000..=65535)
        .chain(1024..20000)
        .filter(|p| !excluded(*p))
        .collect();
    if ids.len() < 100 {
        return Err(ImportError::Scratch(
            "the rulesets name almost every port: no source ports left to tell probes apart"
                .to_string(),
        ));
    }

    // The lab.
    let h = ScratchNs::new("h")?;
    let p = ScratchNs::new("p")?;
    let mut macs = Vec::new();
    for (i, name) in ifaces.iter().enumerate() {
        let peer = format!("p{i}");
        p.ip(&[
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            h.name(),
        ])?;
        p.ip(&["link", "set", &peer, "up"])?;
        h.ip(&["link", "set", name, "up"])?;
        let js = h.ip(&["-j", "link", "show", name])?;
        let v: Value = serde_json::from_str(&js)
            .map_err(|e| ImportError::Scratch(format!("ip -j link: {e}")))?;
        macs.push(v[0]["address"].as_str().unwrap_or("").to_string());
    }
    let mut sysctl = vec![
        "-q".to_string(),
        "-w".to_string(),
        "net.ipv4.conf.all.rp_filter=0".to_string(),
        "-w".to_string(),
        "net.ipv4.conf.default.rp_filter=0".to_string(),
    ];
    for name in &ifaces {
        sysctl.push("-w".to_string());
        sysctl.push(format!("net.ipv4.conf.{name}.rp_filter=0"));
    }
    let sargs: Vec<&str> = sysctl.iter().map(String::as_str).collect();
    let out = h.exec("sysctl", &sargs)?;
    if !out.status.success() {
        return Err(ImportError::Scratch(format!(
            "sysctl: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )));
    }
    let (h4, h6) = (host4.to_string(), host6.to_string());
    h.ip(&["addr", "add", &format!("{h4}/32"), "dev", "lo"])?;
    h.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{h6}/128"),
        "dev",
        "lo",
        "nodad",
    ])?;
    for (i, name) in ifaces.iter().enumerate() {
        let metric = (i + 1).to_string();
        let peer = format!("p{i}");
        h.ip(&["route", "add", "default", "dev", name, "metric", &metric])?;
        h.ip(&[
            "-6", "route", "add", "default", "dev", name, "metric", &metric,
        ])?;
        p.ip(&[
            "route",
            "add",
            &format!("{h4}/32"),
            "dev",
            &peer,
            "metric",
            &metric,
        ])?;
        p.ip(&[
            "-6",
            "route",
            "add",
            &format!("{h6}/128"),
            "dev",
            &peer,
            "metric",
            &metric,
        ])?;
        for a in [&h4, &h6] {
            p.ip(&[
                "neigh",
                "replace",
                a,
                "lladdr",
                &macs[i],
                "dev",
                &peer,
                "nud",
                "permanent",
            ])?;
        }
    }
    load_original(&h, rs, path)?;
    h.nft_load_str(OBSERVER)?;

    let mut got = vec![false; probes.len()];
    for dir in Direction::ALL {
        let idx: Vec<usize> = (0..probes.len())
            .filter(|i| probes[*i].dir == dir)
            .collect();
        for chunk in idx.chunks(ids.len().min(20000)) {
            for attempt in 0..2 {
                let todo: Vec<usize> = chunk
                    .iter()
                    .copied()
                    .filter(|i| attempt == 0 || !got[*i])
                    .collect();
                if todo.is_empty() {
                    break;
                }
                flush_observer(&h)?;
                let packets: Vec<(usize, IpAddr, Vec<u8>)> = todo
                    .iter()
                    .enumerate()
                    .map(|(k, i)| {
                        let pr = &probes[*i];
                        let host = if pr.peer.is_ipv4() { host4 } else { host6 };
                        let (src, dst) = match dir {
                            Direction::Ingress => (pr.peer, host),
                            Direction::Egress => (host, pr.peer),
                        };
                        let spec = match pr.proto {
                            6 => PacketSpec::tcp(src, dst, ids[k], pr.dport),
                            17 => PacketSpec::udp(src, dst, ids[k], pr.dport),
                            _ => PacketSpec {
                                sport: ids[k], // the echo id
                                ..PacketSpec::echo(src, dst)
                            },
                        };
                        let mut bytes = spec.build().ip_packet().to_vec();
                        fill_l4_checksum(&mut bytes, src, dst, pr.proto);
                        (pr.iface, dst, bytes)
                    })
                    .collect();
                let (ns, names): (&ScratchNs, Vec<String>) = match dir {
                    Direction::Ingress => {
                        (&p, (0..ifaces.len()).map(|i| format!("p{i}")).collect())
                    }
                    Direction::Egress => (&h, ifaces.clone()),
                };
                send(ns.name(), &names, &packets)?;
                std::thread::sleep(std::time::Duration::from_millis(50));
                let seen = seen_ports(&h, "seen")?;
                let echo = seen_ports(&h, "echo")?;
                for (k, i) in todo.iter().enumerate() {
                    let set = if probes[*i].traffic == Traffic::Echo {
                        &echo
                    } else {
                        &seen
                    };
                    if set.contains(&ids[k]) {
                        got[*i] = true;
                    }
                }
            }
        }
    }
    let host_of = |a: IpAddr| if a.is_ipv4() { host4 } else { host6 };
    let wants: Vec<bool> = probes
        .iter()
        .map(|pr| {
            let host = host_of(pr.peer);
            let (src, dst) = match pr.dir {
                Direction::Ingress => (pr.peer, host),
                Direction::Egress => (host, pr.peer),
            };
            let pkt = eval::Packet {
                src,
                dst,
                proto: pr.proto,
                dport: pr.dport,
                icmp_type: match (pr.traffic, pr.proto) {
                    (Traffic::Echo, 1) => 8,
                    (Traffic::Echo, _) => 128,
                    _ => 0,
                },
                hop_limit: 64,
            };
            eval::evaluate(policy, &roles, Some(&ifaces[pr.iface]), pr.dir, &pkt).passes()
        })
        .collect();

    // Established traffic: new connections both let through, a few of each
    // direction, interface, protocol and family, again; then their replies
    // (the host's own RST to a SYN it has no socket for is one too).
    let mut picked: std::collections::BTreeMap<(Direction, usize, u8, bool), usize> =
        std::collections::BTreeMap::new();
    let chosen: Vec<usize> = (0..probes.len())
        .filter(|i| probes[*i].traffic == Traffic::New && got[*i] && wants[*i])
        .filter(|i| {
            let pr = &probes[*i];
            let n = picked
                .entry((pr.dir, pr.iface, pr.proto, pr.peer.is_ipv6()))
                .or_insert(0);
            *n += 1;
            *n <= REPLIES_PER_KIND
        })
        .collect();
    let mut replied = vec![false; chosen.len()];
    let mut reply_ids = vec![0u16; chosen.len()];
    for dir in Direction::ALL {
        let todo: Vec<usize> = (0..chosen.len())
            .filter(|c| probes[chosen[*c]].dir == dir)
            .collect();
        if todo.is_empty() {
            continue;
        }
        flush_observer(&h)?;
        let mut first = Vec::new();
        let mut back = Vec::new();
        for (k, c) in todo.iter().enumerate() {
            let pr = &probes[chosen[*c]];
            let host = host_of(pr.peer);
            let (src, dst) = match dir {
                Direction::Ingress => (pr.peer, host),
                Direction::Egress => (host, pr.peer),
            };
            let id = ids[k];
            let (out, reply) = if pr.proto == 6 {
                (
                    PacketSpec::tcp(src, dst, id, pr.dport),
                    PacketSpec {
                        tcp_flags: crate::host::packet::TCP_SYN | crate::host::packet::TCP_ACK,
                        tcp_seq: 1000,
                        tcp_ack: 2,
                        ..PacketSpec::tcp(dst, src, pr.dport, id)
                    },
                )
            } else {
                (
                    PacketSpec::udp(src, dst, id, pr.dport),
                    PacketSpec::udp(dst, src, pr.dport, id),
                )
            };
            let mut b = out.build().ip_packet().to_vec();
            fill_l4_checksum(&mut b, src, dst, pr.proto);
            first.push((pr.iface, dst, b));
            let mut b = reply.build().ip_packet().to_vec();
            fill_l4_checksum(&mut b, dst, src, pr.proto);
            back.push((pr.iface, src, b));
            reply_ids[*c] = id;
        }
        let (there, back_ns, there_names, back_names) = match dir {
            Direction::Ingress => (&p, &h, p_names(ifaces.len()), ifaces.clone()),
            Direction::Egress => (&h, &p, ifaces.clone(), p_names(ifaces.len())),
        };
        send(there.name(), &there_names, &first)?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        send(back_ns.name(), &back_names, &back)?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let rep = seen_ports(&h, "rep")?;
        for (k, c) in todo.iter().enumerate() {
            replied[*c] = rep.contains(&ids[k]);
        }
    }
    drop(h);
    drop(p);

    let count = |t: Traffic| probes.iter().filter(|p| p.traffic == t).count();
    let mut report = HostReport {
        role: role.to_string(),
        file: path.display().to_string(),
        probes: count(Traffic::New),
        original_accepts: (0..probes.len())
            .filter(|i| got[*i] && probes[*i].traffic == Traffic::New)
            .count(),
        echo_probes: count(Traffic::Echo),
        reply_probes: chosen.len(),
        differences: Vec::new(),
    };
    // A reply passes the imported policy when it tracks connections, or
    // when its rules let the reply in as if it were new.
    let reply_wanted = |pr: &Probe, id: u16| {
        let host = host_of(pr.peer);
        let (src, dst) = match pr.dir {
            Direction::Ingress => (host, pr.peer),
            Direction::Egress => (pr.peer, host),
        };
        let back = match pr.dir {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        };
        let pkt = eval::Packet {
            src,
            dst,
            proto: pr.proto,
            dport: id,
            icmp_type: 0,
            hop_limit: 64,
        };
        policy.defaults.established
            || eval::evaluate(policy, &roles, Some(&ifaces[pr.iface]), back, &pkt).passes()
    };
    let outcomes = (0..probes.len())
        .map(|i| (i, probes[i].traffic, got[i], wants[i]))
        .chain((0..chosen.len()).map(|c| {
            let i = chosen[c];
            (
                i,
                Traffic::Reply,
                replied[c],
                reply_wanted(&probes[i], reply_ids[c]),
            )
        }))
        .collect::<Vec<_>>();
    for (i, traffic, got_i, want) in outcomes {
        let pr = &probes[i];
        let host = host_of(pr.peer);
        if want != got_i {
            let mut d = Difference {
                traffic,
                role: role.to_string(),
                file: path.display().to_string(),
                direction: pr.dir,
                iface: ifaces[pr.iface].clone(),
                proto: pr.proto,
                peer: pr.peer,
                host,
                dport: pr.dport,
                original: got_i,
                imported: want,
                reported: None,
            };
            d.reported = warnings
                .iter()
                .filter(|w| w.roles.iter().any(|r| r == role))
                .find(|w| w.scope.as_ref().is_some_and(|s| covers(s, &d)))
                .map(|w| format!("{} [{}]", w.origin, w.kind.as_str()));
            report.differences.push(d);
        }
    }
    Ok(report)
}

/// Writes the TCP or UDP checksum of an IP packet without extension
/// headers (the kernel's stack checks it on input).
fn fill_l4_checksum(bytes: &mut [u8], src: IpAddr, dst: IpAddr, proto: u8) {
    let hl = if src.is_ipv4() { 20 } else { 40 };
    let off = hl
        + match proto {
            6 => 16,
            17 => 6,
            _ => 2,
        };
    if proto == 1 {
        // ICMP: over the message only, no pseudo header.
        if bytes.len() < off + 2 {
            return;
        }
        bytes[off] = 0;
        bytes[off + 1] = 0;
        let c = crate::host::packet::checksum(&bytes[hl..]);
        bytes[off..off + 2].copy_from_slice(&c.to_be_bytes());
        return;
    }
    if bytes.len() < off + 2 {
        return;
    }
    let len = bytes.len() - hl;
    let mut pseudo = Vec::with_capacity(40 + len);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => return,
    }
    bytes[off] = 0;
    bytes[off + 1] = 0;
    pseudo.extend_from_slice(&bytes[hl..]);
    let mut c = crate::host::packet::checksum(&pseudo);
    if c == 0 && proto == 17 {
        c = 0xffff;
    }
    bytes[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Replies probed per direction, interface, protocol and family.
const REPLIES_PER_KIND: usize = 3;

/// The observer: at the last priority of `input` and `output`, the source
/// ports of TCP/UDP packets (`seen`), their destination ports (`rep`: the
/// replies, whose destination is a probe's source port) and the ids of
/// echo requests (`echo`) that the original ruleset let through.
const OBSERVER: &str = "table inet segbpf_probe {
  set seen { type inet_service; flags dynamic; size 65536; }
  set rep { type inet_service; flags dynamic; size 65536; }
  set echo { typeof icmp id; flags dynamic; size 65536; }
  chain in { type filter hook input priority 2147483647; policy accept; meta l4proto { tcp, udp } add @seen { th sport } add @rep { th dport }; icmp type echo-request add @echo { icmp id }; icmpv6 type echo-request add @echo { icmpv6 id }; }
  chain out { type filter hook output priority 2147483647; policy accept; meta l4proto { tcp, udp } add @seen { th sport } add @rep { th dport }; icmp type echo-request add @echo { icmp id }; icmpv6 type echo-request add @echo { icmpv6 id }; }
}
";

fn flush_observer(h: &ScratchNs) -> Result<(), ImportError> {
    for set in ["seen", "rep", "echo"] {
        h.exec("nft", &["flush", "set", "inet", "segbpf_probe", set])?;
    }
    Ok(())
}

/// The names of the peer ends of the veths in `P`.
fn p_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("p{i}")).collect()
}

/// Loads the original ruleset into `ns` with the tool that reads it: the
/// bytes that were imported (`rs.text`, read once), never the file again.
fn load_original(ns: &ScratchNs, rs: &Ruleset, path: &Path) -> Result<(), ImportError> {
    let file = path.display().to_string();
    let out = if rs.iptables {
        let tool = if super::ruleset::is_ip6tables(&rs.text) {
            "ip6tables-nft-restore"
        } else {
            "iptables-nft-restore"
        };
        ns.exec_input(tool, &[], rs.text.as_bytes())?
    } else {
        let dir = super::ruleset::include_dir(path);
        let mut args = vec!["-I", dir.as_str()];
        if rs.text.trim_start().starts_with('{') {
            args.push("-j");
        }
        args.extend(["-f", "-"]);
        ns.exec_input("nft", &args, rs.text.as_bytes())?
    };
    if out.status.success() {
        Ok(())
    } else {
        Err(ImportError::Refused {
            file: file.clone(),
            tool: "the firewall tool".to_string(),
            message: super::ruleset::stdin_named(&file, &String::from_utf8_lossy(&out.stderr)),
        })
    }
}

fn seen_ports(h: &ScratchNs, set: &str) -> Result<BTreeSet<u16>, ImportError> {
    let out = h.exec("nft", &["-j", "list", "set", "inet", "segbpf_probe", set])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ImportError::Scratch(format!("nft list set: {e}")))?;
    let mut s = BTreeSet::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            let n = e.as_u64().or_else(|| e["elem"]["val"].as_u64());
            if let Some(n) = n.and_then(|n| u16::try_from(n).ok()) {
                s.insert(n);
            }
        }
    }
    Ok(s)
}

/// Sends raw IP packets from namespace `ns`, each bound to interface
/// `names[iface]` (the kernel's IP stack routes them, so the namespace's
/// output hook sees them).
fn send(
    ns: &str,
    names: &[String],
    packets: &[(usize, IpAddr, Vec<u8>)],
) -> Result<(), ImportError> {
    let ns = ns.to_string();
    let names = names.to_vec();
    let packets = packets.to_vec();
    std::thread::spawn(move || -> Result<(), ImportError> {
        crate::host::netns::enter(&ns).map_err(|e| ImportError::Scratch(e.to_string()))?;
        let mut socks: Vec<[std::os::fd::OwnedFd; 2]> = Vec::new();
        for n in &names {
            socks.push([raw_socket(false, n)?, raw_socket(true, n)?]);
        }
        for (k, (iface, dst, bytes)) in packets.iter().enumerate() {
            let fd = &socks[*iface][usize::from(dst.is_ipv6())];
            send_one(fd, *dst, bytes)?;
            if k % 256 == 255 {
                // Let the receiving side's backlog drain.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| ImportError::Scratch("the sending thread panicked".to_string()))?
}

fn raw_socket(v6: bool, iface: &str) -> Result<std::os::fd::OwnedFd, ImportError> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(fam, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if raw < 0 {
        return Err(ImportError::Scratch(format!(
            "raw socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    if v6 {
        let one: libc::c_int = 1;
        // SAFETY: valid descriptor, option value and length.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_HDRINCL,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    // SAFETY: valid descriptor; the name buffer outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            libc::socklen_t::try_from(iface.len()).unwrap_or(0),
        )
    };
    if rc != 0 {
        return Err(ImportError::Scratch(format!(
            "binding a raw socket to {iface}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

fn send_one(fd: &std::os::fd::OwnedFd, dst: IpAddr, bytes: &[u8]) -> Result<(), ImportError> {
    use std::os::fd::AsRawFd as _;
    let n = match dst {
        IpAddr::V4(a) => {
            // SAFETY: zeroed sockaddr_in is valid; fields set below.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(a).to_be();
            // SAFETY: buffer and address valid for the call.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(a) => {
            // SAFETY: zeroed sockaddr_in6 is valid; fields set below.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_addr.s6_addr = a.octets();
            // SAFETY: buffer and address valid for the call.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if n >= 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // A ruleset that drops the packet in the output hook makes sendto fail
    // with EPERM: that is a verdict, not an error.
    if e.raw_os_error() == Some(libc::EPERM) {
        return Ok(());
    }
    Err(ImportError::Scratch(format!(
        "sending a probe to {dst}: {e}"
    )))
}

/// Whether an address can be a probe's peer or host (not unspecified,
/// loopback, multicast, broadcast or link-local).
fn usable(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => {
            let o = v.octets();
            !(o[0] == 0 || o[0] == 127 || o[0] >= 224 || (o[0] == 169 && o[1] == 254))
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            !(v.is_unspecified()
                || v.is_loopback()
                || s[0] & 0xff00 == 0xff00
                || s[0] & 0xffc0 == 0xfe80
                || v.to_ipv4_mapped().is_some())
        }
    }
}

fn boundaries(r: &AddrRange) -> Vec<IpAddr> {
    match *r {
        AddrRange::V4 { start, end } => [
            start.checked_sub(1),
            Some(start),
            Some(end),
            end.checked_add(1),
        ]
        .into_iter()
        .flatten()
        .map(|x| IpAddr::V4(Ipv4Addr::from(x)))
        .collect(),
        AddrRange::V6 { start, end } => [
            start.checked_sub(1),
            Some(start),
            Some(end),
            end.checked_add(1),
        ]
        .into_iter()
        .flatten()
        .map(|x| IpAddr::V6(Ipv6Addr::from(x)))
        .collect(),
    }
}

/// Calls `visit` on every value of the JSON, depth first; `visit`
/// returns whether to look inside the value.
fn walk(v: &Value, visit: &mut impl FnMut(&Value) -> bool) {
    if !visit(v) {
        return;
    }
    match v {
        Value::Object(o) => o.values().for_each(|x| walk(x, visit)),
        Value::Array(a) => a.iter().for_each(|x| walk(x, visit)),
        _ => {}
    }
}

/// The right-hand side of a match: the elements of its set, or itself.
fn set_or_one(right: &Value) -> Vec<Value> {
    match right.get("set").and_then(Value::as_array) {
        Some(a) => a.clone(),
        None => vec![right.clone()],
    }
}

/// Every address, prefix or range in the JSON.
fn collect_addrs(v: &Value, out: &mut Vec<AddrRange>) {
    walk(v, &mut |n| match n {
        Value::String(s) => {
            if s.contains(['.', ':'])
                && let Ok(a) = s.parse::<IpAddr>()
            {
                out.push(AddrRange::single(a));
            }
            false
        }
        Value::Object(o) if o.contains_key("prefix") || o.contains_key("range") => {
            match super::ruleset::addr_elem(n) {
                Some(r) => {
                    out.extend(r);
                    false
                }
                None => true,
            }
        }
        _ => true,
    });
}

/// Every port or port range in port matches and port sets of the JSON.
fn collect_ports(v: &Value, out: &mut Vec<PortRange>) {
    walk(v, &mut |n| {
        if let Some(m) = n.get("match") {
            let field = m["left"]["payload"]["field"].as_str().unwrap_or("");
            if matches!(field, "dport" | "sport") {
                out.extend(
                    set_or_one(&m["right"])
                        .iter()
                        .filter_map(super::ruleset::port_elem),
                );
            }
        }
        if let Some(s) = n.get("set")
            && s["type"] == "inet_service"
        {
            for e in s["elem"].as_array().into_iter().flatten() {
                out.extend(super::ruleset::port_elem(e));
            }
        }
        true
    });
}

/// Interface names in `iif`/`iifname`/`oif`/`oifname` matches.
fn collect_ifaces(v: &Value, out: &mut Vec<String>) {
    walk(v, &mut |n| {
        if let Some(m) = n.get("match") {
            let key = m["left"]["meta"]["key"].as_str().unwrap_or("");
            if matches!(key, "iif" | "iifname" | "oif" | "oifname") {
                for item in set_or_one(&m["right"]) {
                    if let Some(i) = item.as_str()
                        && i != "lo"
                        && !i.contains('*')
                        && i.len() <= 15
                        && !out.iter().any(|x| x == i)
                    {
                        out.push(i.to_string());
                    }
                }
            }
        }
        true
    });
}
