//! `segbpf trace`: build a packet and run it through the program loaded on
//! an interface, changing nothing (see [`crate::observe::trace`]); with
//! `--services`, through a dry-run copy of the services programs, judged
//! as a chosen service (see [`crate::attachment::services_trace`]).

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    attachment::pins::Attachment,
    attachment::state::State,
    cmd::{Output, PacketArgs, UsageError, print_json, print_line},
    host::netns::Netns,
    host::packet::PacketSpec,
    observe::trace,
};

/// Arguments of `segbpf trace`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose loaded program judges the packet (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Judge the packet by the services attachment (docs/services.md), as
    /// a socket of the service --service sends (`--direction egress`) or
    /// receives (ingress) it; nothing of the attachment changes.
    #[arg(long, requires = "service", conflicts_with = "iface")]
    pub services: bool,
    /// With --services: the local service judged.
    #[arg(long, value_name = "NAME", requires = "services")]
    pub service: Option<String>,
    /// With --services, ingress: the sender is a socket of this host in
    /// service NAME (over loopback or the host's own addresses).
    #[arg(long, value_name = "NAME", requires = "services")]
    pub peer_service: Option<String>,
    /// With --services: the packet crosses the loopback device (local
    /// traffic, also to this host's own addresses); implied by a loopback
    /// address or --peer-service.
    #[arg(long, requires = "services")]
    pub loopback: bool,
    /// With --services: the cgroup root it is attached below (default:
    /// the cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// The packet (ingress runs the XDP program, egress the TC program).
    #[command(flatten)]
    pub packet: PacketArgs,
    /// Source port.
    #[arg(long, default_value_t = 40000)]
    pub sport: u16,
    /// TCP flags of the packet (default SYN, a new connection): letters
    /// (`S`, `SA`, `A`, `FA`, `R`), names (`SYN,ACK`) or a number.
    #[arg(long, value_name = "FLAGS", value_parser = crate::host::proto::parse_tcp_flags)]
    pub tcp_flags: Option<u8>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// What `trace -o json` prints (docs/json.md): the attachment, the
/// generation whose program judged, the packet, and the decision.
#[derive(serde::Serialize)]
struct TraceOut<'a> {
    #[serde(flatten)]
    target: crate::cmd::Target,
    /// Absent when the state file is unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    packet: PacketOut,
    #[serde(flatten)]
    traced: &'a trace::Traced,
}

/// The traced packet, with the field names of `explain`'s packet.
#[derive(serde::Serialize)]
struct PacketOut {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_flags: Option<Vec<&'static str>>,
}

/// Runs `segbpf trace`.
pub fn run(args: Args, netns: &Netns) -> anyhow::Result<()> {
    if args.packet.src.is_ipv4() != args.packet.dst.is_ipv4() {
        return Err(UsageError("--src and --dst must be the same address family".into()).into());
    }
    if args.tcp_flags.is_some() && args.packet.proto != IPPROTO_TCP {
        return Err(UsageError("--tcp-flags needs --proto tcp".into()).into());
    }
    let spec = match args.packet.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(dport) = args.packet.dport else {
                return Err(UsageError("--dport is required for tcp and udp".into()).into());
            };
            if args.packet.proto == IPPROTO_TCP {
                let mut s = PacketSpec::tcp(args.packet.src, args.packet.dst, args.sport, dport);
                if let Some(f) = args.tcp_flags {
                    s.tcp_flags = f;
                }
                s
            } else {
                PacketSpec::udp(args.packet.src, args.packet.dst, args.sport, dport)
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // The protocol asked for, whatever the family (ICMP in IPv6 is
            // judged as protocol 1, as `explain` does).
            let mut s = PacketSpec::echo(args.packet.src, args.packet.dst);
            s.proto = args.packet.proto;
            s.icmp_type = args
                .packet
                .icmp_type
                .unwrap_or(if args.packet.proto == IPPROTO_ICMP {
                    8
                } else {
                    128
                });
            s
        }
        p => PacketSpec::new(args.packet.src, args.packet.dst, p),
    };
    let Some(iface) = args.iface.clone() else {
        return services(&args, &spec);
    };
    let att = Attachment::new(&iface, netns);
    let state = State::current(&att).ok();
    let built = spec.build();
    // A device without a link layer sees the packet from its IP header on.
    let frame = if state.as_ref().is_some_and(|s| s.raw_ip) {
        &built.bytes[built.l3..]
    } else {
        &built.bytes[..]
    };
    let traced = trace::trace_packet(
        &att,
        args.packet.direction.unwrap_or_default().into(),
        frame,
    )?;
    match args.output {
        Output::Json => print_json(&TraceOut {
            target: crate::cmd::Target::of(&att),
            generation: state.as_ref().map(|s| s.generation),
            packet: PacketOut {
                src: args.packet.src,
                dst: args.packet.dst,
                proto: crate::host::proto::proto_name(spec.proto),
                sport: matches!(spec.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(args.sport),
                dport: matches!(spec.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(spec.dport),
                icmp_type: matches!(spec.proto, IPPROTO_ICMP | IPPROTO_ICMPV6)
                    .then_some(spec.icmp_type),
                tcp_flags: (spec.proto == IPPROTO_TCP)
                    .then(|| crate::host::proto::tcp_flag_names(spec.tcp_flags)),
            },
            traced: &traced,
        })?,
        Output::Text => {
            print_line(format_args!(
                "{} {} {} -> {} {}: {} ({})",
                iface,
                traced.direction,
                args.packet.src,
                args.packet.dst,
                crate::cmd::explain::describe(
                    spec.proto,
                    spec.dport,
                    spec.icmp_type,
                    Some(spec.tcp_flags)
                ),
                traced.verdict.to_uppercase(),
                traced.reason
            ))?;
            if traced.ct_hit {
                print_line("  part of a tracked connection (established)")?;
            }
            if let Some(r) = &traced.rule {
                print_line(format_args!(
                    "  rule #{} {} (line {})",
                    r.id,
                    r.display_name(),
                    r.line.map_or_else(|| "?".to_string(), |l| l.to_string())
                ))?;
            }
            if let Some(s) = state {
                print_line(format_args!(
                    "  policy {} generation {}",
                    s.policy, s.generation
                ))?;
            }
        }
    }
    Ok(())
}

/// What `trace --services -o json` prints (docs/json.md).
#[derive(serde::Serialize)]
struct SvcTraceOut {
    services: bool,
    cgroup_root: std::path::PathBuf,
    generation: u64,
    service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_service: Option<String>,
    direction: &'static str,
    loopback: bool,
    packet: PacketOut,
    verdict: &'static str,
    audit: bool,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<crate::policy::compile::RuleJson>,
}

/// `segbpf trace --services`.
fn services(args: &Args, spec: &PacketSpec) -> anyhow::Result<()> {
    use crate::attachment::services_trace::{SvcTraceAs, trace};
    let Some(service) = args.service.as_deref() else {
        return Err(UsageError("--services needs --service NAME".into()).into());
    };
    let ingress = matches!(
        args.packet.direction.unwrap_or_default(),
        crate::cmd::DirArg::Ingress
    );
    if args.peer_service.is_some() && !ingress {
        return Err(UsageError(
            "--peer-service applies to ingress (egress is judged by address and `to_services`)"
                .into(),
        )
        .into());
    }
    // Local traffic (loopback, or the host's own addresses with a local
    // peer) crosses the loopback device, where service identities count.
    let loopback = args.loopback
        || args.peer_service.is_some()
        || args.packet.src.is_loopback()
        || args.packet.dst.is_loopback();
    let root = crate::attachment::services_level::open_root(args.cgroup_root.as_deref())?;
    let paths = crate::attachment::services::SvcPaths::new(
        &crate::attachment::pins::Roots::from_env(),
        root,
    );
    let built = spec.build();
    let t = trace(
        &paths,
        &SvcTraceAs {
            service,
            peer_service: args.peer_service.as_deref(),
            loopback,
            ingress,
        },
        &built.bytes,
    )?;
    let verdict = if t.allowed { "allow" } else { "drop" };
    let direction = if ingress { "ingress" } else { "egress" };
    let rule = t.rule.map(|id| {
        crate::policy::compile::RuleJson::new(id, t.state.rules.iter().find(|r| r.id == id))
    });
    match args.output {
        Output::Json => print_json(&SvcTraceOut {
            services: true,
            cgroup_root: paths.root.dir.clone(),
            generation: t.state.generation,
            service: service.to_string(),
            peer_service: args.peer_service.clone(),
            direction,
            loopback,
            packet: PacketOut {
                src: args.packet.src,
                dst: args.packet.dst,
                proto: crate::host::proto::proto_name(spec.proto),
                sport: matches!(spec.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(args.sport),
                dport: matches!(spec.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(spec.dport),
                icmp_type: matches!(spec.proto, IPPROTO_ICMP | IPPROTO_ICMPV6)
                    .then_some(spec.icmp_type),
                tcp_flags: (spec.proto == IPPROTO_TCP)
                    .then(|| crate::host::proto::tcp_flag_names(spec.tcp_flags)),
            },
            verdict,
            audit: t.audit,
            reason: t.reason,
            rule,
        })?,
        Output::Text => {
            print_line(format_args!(
                "service={service}{} {direction} {} -> {} {}: {} ({}{})",
                args.peer_service
                    .as_deref()
                    .map_or_else(String::new, |p| format!(" peer={p}")),
                args.packet.src,
                args.packet.dst,
                crate::cmd::explain::describe(spec.proto, spec.dport, spec.icmp_type, None),
                verdict.to_uppercase(),
                t.reason,
                if t.audit && !t.allowed {
                    ", audit: passes"
                } else {
                    ""
                }
            ))?;
            if let Some(r) = &rule {
                print_line(format_args!(
                    "  rule #{} {} (line {})",
                    r.id,
                    r.display_name(),
                    r.line.map_or_else(|| "?".to_string(), |l| l.to_string())
                ))?;
            }
            print_line(format_args!(
                "  policy {} generation {} (a new flow: the flow table is not consulted)",
                t.state.policy.display(),
                t.state.generation
            ))?;
        }
    }
    Ok(())
}
