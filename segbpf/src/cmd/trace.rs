//! `segbpf trace`: build a packet and run it through the program loaded on
//! an interface, changing nothing (see [`crate::observe::trace`]).

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
    /// Interface whose loaded program judges the packet.
    pub iface: String,
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
    let att = Attachment::new(&args.iface, netns);
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
        Output::Json => print_json(&traced)?,
        Output::Text => {
            print_line(format_args!(
                "{} {} {} -> {} {}: {} ({})",
                args.iface,
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
                    r["id"],
                    r["name"]
                        .as_str()
                        .or_else(|| r["label"].as_str())
                        .unwrap_or("?"),
                    r["line"]
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
