//! `segbpf explain`: the verdict for a packet from the policy alone, by the
//! reference evaluator (no kernel involved). The evaluator is stateless: it
//! judges a packet that opens a flow, and says whether the flow's replies
//! will pass by connection tracking. `segbpf trace` shows live state (a
//! packet that matches a tracked connection).
//!
//! Without `--role` the host's roles are inferred from the addresses as
//! `attach` infers them from an interface's: the roles whose `hosts`
//! contain the host's address. Without `--direction` the host is the
//! address a role's `hosts` contain: the destination (ingress) when it is,
//! else the source (egress). A packet between two hosts with roles is
//! judged where it arrives, on the destination; `--direction egress` judges
//! it where it leaves.
//!
//! With `--service NAME` (and `--services`) the packet is judged as the
//! services programs judge it for a socket of that service
//! ([`eval::evaluate_service`]; `--direction` default ingress, the
//! service receives), `--peer-service` naming a local peer's service. On
//! egress a `to_services` rule lets a packet towards a local peer leave
//! whoever the receiver is, as the live program does; the output says
//! that the receiver's ingress decides (`receiver_must_be`).

use std::path::PathBuf;

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, reason};
use serde::Serialize;

use crate::{
    cmd::{Output, PacketArgs, UsageError, print_json, print_line},
    host::proto::proto_name,
    policy::{
        Direction, Policy,
        eval::{self, Packet},
        roles,
    },
};

/// Arguments of `segbpf explain`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  segbpf explain roles.toml --src 10.10.1.25 --dst 10.10.1.30 --proto tcp --dport 5432\n  segbpf explain roles.toml --role db --src 10.10.1.30 --dst 10.10.2.50 --proto tcp --dport 873 --direction egress\n  segbpf explain roles.toml --src 10.10.0.5 --dst 10.10.1.30 --proto icmp --icmp-type 13\n  segbpf explain roles.toml --services --service db --peer-service app --src 127.0.0.1 --dst 127.0.0.1 --proto tcp --dport 3306"
)]
pub struct Args {
    /// Policy file (roles.toml); the same as --policy.
    #[arg(
        value_name = "FILE",
        required_unless_present = "policy",
        conflicts_with = "policy"
    )]
    pub file: Option<PathBuf>,
    /// Policy file (roles.toml).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The host's role (repeatable); default: the roles whose `hosts`
    /// contain the host's address (the destination for ingress, the source
    /// for egress).
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<String>,
    /// The packet, and its direction relative to the host.
    #[command(flatten)]
    pub packet: PacketArgs,
    /// Interface the packet crosses (for rules with `interfaces`).
    #[arg(long)]
    pub iface: Option<String>,
    /// Judge the packet as the services programs do (docs/services.md):
    /// for a socket of the service --service.
    #[arg(long, requires = "service", conflicts_with_all = ["role", "iface"])]
    pub services: bool,
    /// The local service whose socket sends (`--direction egress`) or
    /// receives (ingress, the default) the packet.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["role", "iface"])]
    pub service: Option<String>,
    /// With --service: the peer is a socket of this host in service NAME
    /// (over loopback or the host's own addresses), for
    /// `from_services`/`to_services` rules (on egress a `to_services` rule
    /// lets the packet leave towards any local peer, a loopback
    /// destination without this option too; the receiver decides).
    #[arg(long, value_name = "NAME", requires = "service")]
    pub peer_service: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Serialize)]
struct Explained {
    verdict: &'static str,
    reason: &'static str,
    /// The rule that allows the packet (none: a default or a built-in reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<RuleOut>,
    packet: PacketOut,
    direction: Direction,
    /// The host's roles (not with --service).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
    /// With --service: the local service judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    /// With --peer-service: the local peer's service.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_service: Option<String>,
    /// Whether, once this packet passes, the flow's replies pass by
    /// connection tracking (`defaults.established` and a tracked protocol).
    replies_tracked: bool,
    /// Egress by a `to_services` rule: the packet leaves, and the
    /// receiver's ingress drops it unless the receiver is one of these
    /// services.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    receiver_must_be: Vec<String>,
}

/// The packet judged, with only the fields that apply to its protocol.
#[derive(Serialize)]
struct PacketOut {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the number ([`proto_name`]).
    proto: String,
    /// TCP and UDP only.
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<u16>,
    /// ICMP and ICMPv6 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    icmp_type: Option<u8>,
    hop_limit: u8,
}

impl From<&Packet> for PacketOut {
    fn from(p: &Packet) -> Self {
        PacketOut {
            src: p.src,
            dst: p.dst,
            proto: proto_name(p.proto),
            dport: matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(p.dport),
            icmp_type: matches!(p.proto, IPPROTO_ICMP | IPPROTO_ICMPV6).then_some(p.icmp_type),
            hop_limit: p.hop_limit,
        }
    }
}

/// The direction and the host's roles: as given, or inferred from the
/// addresses (see the module's documentation).
fn host_view(policy: &Policy, args: &Args) -> anyhow::Result<(Direction, Vec<String>)> {
    let (src, dst) = (args.packet.src, args.packet.dst);
    let holding = |a: std::net::IpAddr| -> Vec<String> {
        policy
            .roles
            .iter()
            .filter(|r| r.hosts.iter().any(|h| h.contains(a)))
            .map(|r| r.name.clone())
            .collect()
    };
    let given: Option<Direction> = args.packet.direction.map(Into::into);
    if !args.role.is_empty() {
        let roles = roles::resolve(policy, &args.role, "-", &[])?;
        let dir = given.unwrap_or_else(|| {
            // The given roles' hosts say which end the host is.
            let is_host = |a| holding(a).iter().any(|r| roles.contains(r));
            if !is_host(dst) && is_host(src) {
                Direction::Egress
            } else {
                Direction::Ingress
            }
        });
        return Ok((dir, roles));
    }
    let dir = given.unwrap_or_else(|| {
        if holding(dst).is_empty() && !holding(src).is_empty() {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    });
    let host = match dir {
        Direction::Ingress => dst,
        Direction::Egress => src,
    };
    let roles = holding(host);
    if roles.is_empty() {
        return Err(UsageError(format!(
            "no role's `hosts` in {} contains {src} or {dst}; pass --role NAME",
            policy.source
        ))
        .into());
    }
    Ok((dir, roles))
}

/// What a packet is, for text output: `tcp/22 [S]`, `udp/53`, `icmp type
/// 8`, or the protocol.
pub fn describe(proto: u8, dport: u16, icmp_type: u8, tcp_flags: Option<u8>) -> String {
    match proto {
        IPPROTO_TCP => match tcp_flags {
            Some(f) => format!("tcp/{dport} [{}]", crate::host::proto::tcp_flag_letters(f)),
            None => format!("tcp/{dport}"),
        },
        IPPROTO_UDP => format!("udp/{dport}"),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => format!("{} type {icmp_type}", proto_name(proto)),
        p => proto_name(p),
    }
}

#[derive(Serialize)]
struct RuleOut {
    id: u32,
    label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    line: u32,
    peer: String,
    services: String,
}

/// Runs `segbpf explain`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.packet.src.is_ipv4() != args.packet.dst.is_ipv4() {
        return Err(UsageError("--src and --dst must be the same address family".into()).into());
    }
    if args.packet.dport.is_none() && matches!(args.packet.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return Err(UsageError("--dport is required for tcp and udp".into()).into());
    }
    let proto = proto_name(args.packet.proto);
    if args.packet.dport.is_some() && !matches!(args.packet.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return Err(UsageError(format!(
            "--dport: {proto} has no ports (ports are for tcp and udp; --icmp-type for icmp)"
        ))
        .into());
    }
    if args.packet.icmp_type.is_some()
        && !matches!(args.packet.proto, IPPROTO_ICMP | IPPROTO_ICMPV6)
    {
        return Err(UsageError(format!(
            "--icmp-type: {proto} has no ICMP type (--icmp-type is for icmp and icmpv6)"
        ))
        .into());
    }
    let path = args.file.as_ref().or(args.policy.as_ref());
    let path = path.ok_or_else(|| UsageError("give the policy file".into()))?;
    let policy = Policy::load(path)?;
    let (dir, roles) = match &args.service {
        Some(name) => {
            for n in std::iter::once(name).chain(args.peer_service.as_ref()) {
                if policy.service(n).is_none() {
                    return Err(UsageError(format!(
                        "{}: no service named `{n}` (services: {})",
                        policy.source,
                        policy
                            .services
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                    .into());
                }
            }
            (
                args.packet.direction.map_or(Direction::Ingress, Into::into),
                Vec::new(),
            )
        }
        None => host_view(&policy, &args)?,
    };
    if let Some(peer) = &args.peer_service {
        // A peer's service is known only over loopback: both addresses
        // local to the host the services are on.
        let not_local: Vec<String> = [args.packet.src, args.packet.dst]
            .into_iter()
            .filter(|a| !crate::host::netif::is_local_address(*a).unwrap_or(true))
            .map(|a| a.to_string())
            .collect();
        if !not_local.is_empty() {
            eprintln!(
                "warning: --peer-service {peer}: from_services/to_services match only over loopback (both addresses local to the host); {} is not a local address here, so the programs would see no peer service for this packet",
                not_local.join(" and ")
            );
        }
    }
    let default_icmp_type = if args.packet.proto == IPPROTO_ICMP {
        8
    } else {
        128
    };
    let pkt = Packet {
        src: args.packet.src,
        dst: args.packet.dst,
        proto: args.packet.proto,
        dport: args.packet.dport.unwrap_or(0),
        icmp_type: args.packet.icmp_type.unwrap_or(default_icmp_type),
        hop_limit: 64,
    };
    let v = match &args.service {
        Some(name) => {
            eval::evaluate_service(&policy, name, args.peer_service.as_deref(), dir, &pkt)
                .ok_or_else(|| UsageError(format!("no service named `{name}`")))?
        }
        None => eval::evaluate(&policy, &roles, args.iface.as_deref(), dir, &pkt),
    };
    let rule = v.rule.map(|id| {
        let r = if args.service.is_some() {
            &policy.service_rules[id as usize]
        } else {
            &policy.rules[id as usize]
        };
        RuleOut {
            id,
            label: r.label(),
            name: r.name.clone(),
            line: r.loc.line,
            peer: r.peer_text.clone(),
            services: r.services(),
        }
    });
    // A `to_services` egress rule: the receiver decides at its ingress.
    let receiver_must_be: Vec<String> = match (&args.service, v.rule, dir) {
        (Some(_), Some(id), Direction::Egress) => {
            let r = &policy.service_rules[id as usize];
            let by_addr = r.peers.iter().any(|a| a.contains(pkt.dst));
            if by_addr {
                Vec::new()
            } else {
                r.peer_services.clone()
            }
        }
        _ => Vec::new(),
    };
    let tracked_proto = matches!(pkt.proto, IPPROTO_TCP | IPPROTO_UDP)
        || (pkt.proto == IPPROTO_ICMP && pkt.icmp_type == 8)
        || (pkt.proto == IPPROTO_ICMPV6 && pkt.icmp_type == 128);
    let out = Explained {
        replies_tracked: v.passes() && policy.defaults.established && tracked_proto,
        verdict: if v.passes() { "allow" } else { "drop" },
        reason: reason::name(v.reason),
        rule,
        packet: (&pkt).into(),
        direction: dir,
        roles,
        service: args.service.clone(),
        peer_service: args.peer_service.clone(),
        receiver_must_be,
    };
    match args.output {
        Output::Json => print_json(&out)?,
        Output::Text => {
            print_line(format_args!(
                "{} {} {} -> {} {}: {} ({})",
                out.direction,
                match &out.service {
                    Some(s) => format!(
                        "service={s}{}",
                        out.peer_service
                            .as_deref()
                            .map_or_else(String::new, |p| format!(" peer-service={p}"))
                    ),
                    None => out.roles.join("+"),
                },
                pkt.src,
                pkt.dst,
                describe(pkt.proto, pkt.dport, pkt.icmp_type, None),
                out.verdict.to_uppercase(),
                out.reason
            ))?;
            match &out.rule {
                Some(r) => print_line(format_args!(
                    "  rule #{} {} ({}:{}): {} {}",
                    r.id,
                    r.name.as_deref().unwrap_or(&r.label),
                    policy.source,
                    r.line,
                    r.peer,
                    r.services
                ))?,
                None if !v.passes() => match &out.service {
                    Some(s) => print_line(format_args!(
                        "  no rule of service {s} matches; its {} default is drop",
                        out.direction
                    ))?,
                    None => print_line(format_args!(
                        "  no rule matches; defaults.{} = drop",
                        out.direction
                    ))?,
                },
                None => {}
            }
            if !out.receiver_must_be.is_empty() {
                let names = out.receiver_must_be.join(", ");
                print_line(format_args!(
                    "  to_services: the packet leaves; the receiver's ingress drops it unless the receiver is service {names}{}",
                    match out.peer_service.as_deref() {
                        Some(p) if out.receiver_must_be.iter().any(|n| n == p) =>
                            format!(" ({p} is: it may pass there, judge its ingress)"),
                        Some(p) => format!(" ({p} is not: dropped there)"),
                        None => " (add --peer-service NAME, or judge the receiver's ingress)"
                            .to_string(),
                    }
                ))?;
            }
            if out.replies_tracked {
                print_line("  replies pass by connection tracking (defaults.established = true)")?;
            }
        }
    }
    Ok(())
}
