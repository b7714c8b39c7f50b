//! `segbpf trace`: build a packet and run it through the program loaded on
//! an interface with BPF_PROG_TEST_RUN. The run uses a dry-run instance of
//! the program that shares the live maps but writes no counters and no
//! connection or fragment state, so tracing changes nothing. It reports
//! whether the packet matched a tracked connection.

use std::net::IpAddr;

use anyhow::{Context as _, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NO_RULE, reason};
use serde::Serialize;

use crate::{
    cmd::{Output, UsageError, explain::DirArg, parse_proto, proto_name},
    loader, maps,
    packet::PacketSpec,
    pins::Attachment,
    policy::Direction,
    state::State,
};

/// Arguments of `segbpf trace`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose loaded program judges the packet.
    pub iface: String,
    /// Source address.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination address.
    #[arg(long)]
    pub dst: IpAddr,
    /// Protocol: tcp, udp, icmp (icmpv6 for IPv6 echo) or a number.
    #[arg(long, value_parser = parse_proto)]
    pub proto: u8,
    /// Source port.
    #[arg(long, default_value_t = 40000)]
    pub sport: u16,
    /// Destination port (required for tcp and udp).
    #[arg(long)]
    pub dport: Option<u16>,
    /// ICMP type (default: echo request).
    #[arg(long)]
    pub icmp_type: Option<u8>,
    /// Direction: ingress runs the XDP program, egress the TC program.
    #[arg(long, value_enum, default_value_t = DirArg::Ingress)]
    pub direction: DirArg,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// What the program decided for the traced packet.
#[derive(Debug, Serialize)]
pub struct Traced {
    /// `allow` or `drop`.
    pub verdict: &'static str,
    /// Reason name.
    pub reason: &'static str,
    /// Direction judged.
    pub direction: Direction,
    /// The program's return code (XDP action, or TC action for egress).
    pub action: u32,
    /// Whether the packet matched a tracked connection.
    pub ct_hit: bool,
    /// Rule id, label and line, if a rule allowed the packet.
    pub rule: Option<serde_json::Value>,
    /// Address class of the peer, if the peer is in any rule's peers.
    pub class: Option<u32>,
}

/// Runs `segbpf trace`.
pub fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        return Err(UsageError("--src and --dst must be the same address family".into()).into());
    }
    let spec = match args.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(dport) = args.dport else {
                return Err(UsageError("--dport is required for tcp and udp".into()).into());
            };
            if args.proto == IPPROTO_TCP {
                PacketSpec::tcp(args.src, args.dst, args.sport, dport)
            } else {
                PacketSpec::udp(args.src, args.dst, args.sport, dport)
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // The protocol asked for, whatever the family (ICMP in IPv6 is
            // judged as protocol 1, as `explain` does).
            let mut s = PacketSpec::echo(args.src, args.dst);
            s.proto = args.proto;
            s.icmp_type =
                args.icmp_type
                    .unwrap_or(if args.proto == IPPROTO_ICMP { 8 } else { 128 });
            s
        }
        p => PacketSpec::new(args.src, args.dst, p),
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
    let traced = trace_packet(&att, args.direction.into(), frame)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&traced)?),
        Output::Text => {
            println!(
                "{} {} {} -> {} {}/{}: {} ({})",
                args.iface,
                traced.direction,
                args.src,
                args.dst,
                proto_name(args.proto),
                args.dport.unwrap_or(0),
                traced.verdict.to_uppercase(),
                traced.reason
            );
            if traced.ct_hit {
                println!("  part of a tracked connection (established)");
            }
            if let Some(r) = &traced.rule {
                println!(
                    "  rule #{} {} (line {})",
                    r["id"],
                    r["label"].as_str().unwrap_or("?"),
                    r["line"]
                );
            }
            if let Some(s) = state {
                println!("  policy {} generation {}", s.policy, s.generation);
            }
        }
    }
    Ok(())
}

/// Runs `frame` through a dry-run instance sharing `att`'s maps: the XDP
/// program for ingress, the TC program for egress.
pub fn trace_packet(att: &Attachment, dir: Direction, frame: &[u8]) -> anyhow::Result<Traced> {
    let mut ebpf = dry_run_instance(att)?;
    trace_with(&mut ebpf, att, dir, frame)
}

/// Loads the dry-run instance `trace_packet` uses for `att` (verifying the
/// programs takes a second or two; [`trace_with`] reuses one instance for
/// many packets).
pub fn dry_run_instance(att: &Attachment) -> anyhow::Result<aya::Ebpf> {
    if !att.is_attached() {
        bail!("segbpf is not attached to {}", att.iface);
    }
    for m in segbpf_common::PINNED_MAPS {
        if !att.map(m).exists() {
            bail!(
                "{} is missing: the attachment is incomplete; detach and attach again",
                att.map(m).display()
            );
        }
    }
    loader::load_dry_run(att).context("loading a dry-run instance")
}

/// Runs `frame` through `ebpf`, a [`dry_run_instance`] of `att`.
pub fn trace_with(
    ebpf: &mut aya::Ebpf,
    att: &Attachment,
    dir: Direction,
    frame: &[u8],
) -> anyhow::Result<Traced> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    let result = match dir {
        Direction::Ingress => loader::xdp(ebpf)?.test_run(opts),
        Direction::Egress => loader::tc(ebpf)?.test_run(opts),
    }
    .context("BPF_PROG_TEST_RUN")?;
    let t = maps::take_trace(ebpf)?;
    if t.valid == 0 {
        bail!("the program did not record a decision");
    }
    let state = State::current(att).ok();
    let rule = (t.rule_id != NO_RULE).then(|| {
        let info = state.as_ref().and_then(|s| s.rule(t.rule_id));
        serde_json::json!({
            "id": info.map_or(t.rule_id, |i| i.id),
            "label": info.map(|i| i.label.clone()),
            "line": info.map(|i| i.line),
            "peer": info.map(|i| i.peer.clone()),
            "services": info.map(|i| i.services.clone()),
        })
    });
    Ok(Traced {
        verdict: if reason::passes(t.reason) {
            "allow"
        } else {
            "drop"
        },
        reason: reason::name(t.reason),
        direction: dir,
        action: result.return_value,
        ct_hit: t.reason == reason::PASS_CT,
        rule,
        class: (t.class_id != u32::MAX).then_some(t.class_id),
    })
}
