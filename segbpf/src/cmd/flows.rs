//! `segbpf flows`: the tracked flows of an interface with their packet and
//! byte counters per direction, TCP flags and the rule that opened them,
//! like `conntrack -L` ([`crate::flows`]).

use serde::Serialize;

use crate::{
    cmd::{Output, Target, print_json, print_line},
    flows::{self, Flow, FollowOptions, Follower},
    netns::Netns,
    pins::Attachment,
};

/// Arguments of `segbpf flows`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose flows to list.
    pub iface: String,
    /// Output format (with --follow, `json` is JSON Lines).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Stream flow records instead of one snapshot: `end` when a flow
    /// closes (FIN/RST) or leaves the table, `active` while it lives.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: seconds between `active` records of a live flow.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub active_secs: u64,
    /// With --follow: also a `start` record when a flow is first seen.
    #[arg(long)]
    pub start: bool,
}

#[derive(Serialize)]
struct FlowsOut {
    #[serde(flatten)]
    target: Target,
    flows: Vec<Flow>,
}

/// Runs `segbpf flows`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    if args.follow {
        return follow(&args, &att);
    }
    let flows = flows::snapshot(&att)?;
    match args.output {
        Output::Json => print_json(&FlowsOut {
            target: Target::of(&att),
            flows,
        })?,
        Output::Text => {
            for f in &flows {
                let side = |a: std::net::IpAddr, p: u16| match a {
                    std::net::IpAddr::V6(v6) => format!("[{v6}]:{p}"),
                    v4 @ std::net::IpAddr::V4(_) => format!("{v4}:{p}"),
                };
                print_line(format_args!(
                    "{} {} -> {} {} {} {} orig {} pkts {} B reply {} pkts {} B{}{} first {} last {}",
                    f.proto,
                    side(f.src, f.sport),
                    side(f.dst, f.dport),
                    f.opened_by,
                    f.state,
                    f.table,
                    f.packets_orig,
                    f.bytes_orig,
                    f.packets_reply,
                    f.bytes_reply,
                    if f.tcp_flags.is_empty() {
                        String::new()
                    } else {
                        format!(" flags {}", f.tcp_flags)
                    },
                    f.rule
                        .as_ref()
                        .map(|r| format!(" rule {r}"))
                        .unwrap_or_default(),
                    f.first_seen,
                    f.last_seen
                ))?;
            }
            if flows.is_empty() {
                print_line(format_args!("no tracked flows on {}", att.describe()))?;
            }
        }
    }
    Ok(())
}

/// Polls the connection tables every second and prints the records due,
/// until the attachment goes away (or a signal ends the process).
fn follow(args: &Args, att: &Attachment) -> anyhow::Result<()> {
    let mut follower = Follower::new(
        att,
        FollowOptions {
            start: args.start,
            active_every: std::time::Duration::from_secs(args.active_secs),
        },
    );
    loop {
        let now = match flows::snapshot_keyed(att) {
            Ok(now) => now,
            Err(flows::FlowsError::NotAttached(which)) => {
                tracing::info!("segbpf was detached from {which}; stopping");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for r in follower.step(now) {
            match args.output {
                Output::Json => print_line(serde_json::to_string(&r)?)?,
                Output::Text => print_line(format_args!(
                    "{} {} {} {} {}:{} -> {}:{} orig {} pkts {} B reply {} pkts {} B{}",
                    r.time,
                    r.state.to_uppercase(),
                    r.iface,
                    r.flow.proto,
                    r.flow.src,
                    r.flow.sport,
                    r.flow.dst,
                    r.flow.dport,
                    r.flow.packets_orig,
                    r.flow.bytes_orig,
                    r.flow.packets_reply,
                    r.flow.bytes_reply,
                    r.flow
                        .rule
                        .as_ref()
                        .map(|x| format!(" rule {x}"))
                        .unwrap_or_default()
                ))?,
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
