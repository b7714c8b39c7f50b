//! `segbpf explain`: the verdict for a packet from the policy alone, by the
//! reference evaluator (no kernel involved). The evaluator is stateless: it
//! judges a packet that opens a flow, and says whether the flow's replies
//! will pass by connection tracking. `segbpf trace` shows live state (a
//! packet that matches a tracked connection).

use std::path::PathBuf;

use segbpf_common::reason;
use serde::Serialize;

use crate::{
    cmd::{Output, PacketArgs, UsageError},
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
    rule: Option<RuleOut>,
    packet: Packet,
    direction: Direction,
    roles: Vec<String>,
    /// Whether, once this packet passes, the flow's replies pass by
    /// connection tracking (`defaults.established` and a tracked protocol).
    replies_tracked: bool,
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
    if args.packet.dport.is_none() && matches!(args.packet.proto, 6 | 17) {
        return Err(UsageError("--dport is required for tcp and udp".into()).into());
    }
    let policy = Policy::load(&args.policy)?;
    let roles = roles::resolve(&policy, &args.role, "-", &[])?;
    let default_icmp_type = if args.packet.proto == segbpf_common::IPPROTO_ICMP {
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
    let tracked_proto = matches!(pkt.proto, 6 | 17)
        || (pkt.proto == 1 && pkt.icmp_type == 8)
        || (pkt.proto == 58 && pkt.icmp_type == 128);
    let out = Explained {
        replies_tracked: v.passes() && policy.defaults.established && tracked_proto,
        verdict: if v.passes() { "allow" } else { "drop" },
        reason: reason::name(v.reason),
        rule,
        packet: pkt,
        direction: dir,
        roles,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        Output::Text => {
            println!(
                "{} {} {} -> {} {}/{}: {} ({})",
                out.direction,
                out.roles.join("+"),
                pkt.src,
                pkt.dst,
                proto_name(pkt.proto),
                pkt.dport,
                out.verdict.to_uppercase(),
                out.reason
            );
            match &out.rule {
                Some(r) => println!(
                    "  rule #{} {} ({}:{}): {} {}",
                    r.id,
                    r.name.as_deref().unwrap_or(&r.label),
                    policy.source,
                    r.line,
                    r.peer,
                    r.services
                ),
                None if !v.passes() => {
                    println!("  no rule matches; defaults.{} = drop", out.direction);
                }
                None => {}
            }
            if out.replies_tracked {
                println!("  replies pass by connection tracking (defaults.established = true)");
            }
        }
    }
    Ok(())
}
