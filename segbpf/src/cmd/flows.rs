//! `segbpf flows`: the tracked flows of an interface with their packet and
//! byte counters per direction, TCP flags and the rule that opened them,
//! like `conntrack -L` ([`crate::flows`]).

use serde::Serialize;

use crate::{
    cmd::{Output, Target, print_json, print_line},
    flows::{self, Flow},
    netns::Netns,
    pins::Attachment,
};

/// Arguments of `segbpf flows`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose flows to list.
    pub iface: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
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
