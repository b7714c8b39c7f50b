//! `segbpf explain`: the verdict for a packet from the policy alone, by the
//! reference evaluator (no kernel involved). The evaluator is stateless: it
//! judges a packet that opens a flow, and says whether the flow's replies
//! will pass by connection tracking. `segbpf trace` shows live state (a
//! packet that matches a tracked connection).

use std::path::PathBuf;

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, reason};
use serde::Serialize;

use crate::{
    cmd::{Output, PacketArgs, UsageError, print_json, print_line},
    policy::{
        Direction, Policy,
        eval::{self, Packet},
        roles,
    },
    proto::proto_name,
};

/// Arguments of `segbpf explain`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (roles.toml).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: PathBuf,
    /// The host's role (repeatable).
    #[arg(long, value_name = "ROLE", required = true)]
    pub role: Vec<String>,
    /// The packet, and its direction relative to the host.
    #[command(flatten)]
    pub packet: PacketArgs,
    /// Interface the packet crosses (for rules with `interfaces`).
    #[arg(long)]
    pub iface: Option<String>,
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
    roles: Vec<String>,
    /// Whether, once this packet passes, the flow's replies pass by
    /// connection tracking (`defaults.established` and a tracked protocol).
    replies_tracked: bool,
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
    let policy = Policy::load(&args.policy)?;
    let roles = roles::resolve(&policy, &args.role, "-", &[])?;
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
    let dir: Direction = args.packet.direction.into();
    let v = eval::evaluate(&policy, &roles, args.iface.as_deref(), dir, &pkt);
    let rule = v.rule.map(|id| {
        let r = &policy.rules[id as usize];
        RuleOut {
            id,
            label: r.label(),
            name: r.name.clone(),
            line: r.loc.line,
            peer: r.peer_text.clone(),
            services: r.services(),
        }
    });
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
    };
    match args.output {
        Output::Json => print_json(&out)?,
        Output::Text => {
            print_line(format_args!(
                "{} {} {} -> {} {}/{}: {} ({})",
                out.direction,
                out.roles.join("+"),
                pkt.src,
                pkt.dst,
                proto_name(pkt.proto),
                pkt.dport,
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
                None if !v.passes() => print_line(format_args!(
                    "  no rule matches; defaults.{} = drop",
                    out.direction
                ))?,
                None => {}
            }
            if out.replies_tracked {
                print_line("  replies pass by connection tracking (defaults.established = true)")?;
            }
        }
    }
    Ok(())
}
