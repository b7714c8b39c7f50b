//! `segbpf flows`: the tracked flows of an interface with their packet and
//! byte counters per direction, TCP flags and the rule that opened them,
//! like `conntrack -L` ([`crate::observe::flows`]).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    cmd::{Output, Target, print_json, print_line},
    host::netns::Netns,
    observe::flowlog::{FlowLog, FlowLogError, Line, Options},
    observe::flows::{self, Flow},
};

/// The filters of `flows` and `monitor` (like `hubble observe`'s): a
/// record is shown when it matches every filter given; a filter given
/// more than once matches any of its values.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// Only flows with this port at either end (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Only flows with an address at either end in ADDR (an address, CIDR
    /// or range; repeatable).
    #[arg(long = "peer", value_name = "ADDR", value_parser = parse_peer)]
    pub peers: Vec<crate::policy::AddrRange>,
    /// Only this verdict: allow, drop, or audit (what audit mode let
    /// through although the policy drops it).
    #[arg(long, value_enum, value_name = "VERDICT")]
    pub verdict: Option<flows::FilterVerdict>,
    /// Only flows a rule let through, by its name, label
    /// (`roles.web.ingress[0]`) or id (repeatable).
    #[arg(long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,
}

fn parse_peer(s: &str) -> Result<crate::policy::AddrRange, String> {
    crate::policy::addr::parse_item(s).map_err(|e| e.to_string())
}

impl FilterArgs {
    /// The library's filter.
    pub fn filter(&self) -> flows::Filter {
        flows::Filter {
            ports: self.ports.clone(),
            peers: self.peers.clone(),
            verdict: self.verdict,
            rules: self.rules.clone(),
        }
    }
}

/// Arguments of `segbpf flows`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose flows to list.
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// The flows of the services attachment (docs/services.md): each
    /// socket's view of an allowed flow, with its `service`.
    #[arg(long, conflicts_with_all = ["iface", "follow", "start", "denied_secs"])]
    pub services: bool,
    /// With --services: the cgroup root it is attached below (default: the
    /// cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Output format (with --follow, `json` is JSON Lines).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Stream flow records instead of one snapshot: `end` when a flow
    /// closes (FIN/RST) or leaves the table, `active` while it lives,
    /// `denied` aggregates of what the policy dropped.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: seconds between `active` records of a live flow.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub active_secs: u64,
    /// With --follow: also a `start` record when a flow is first seen.
    #[arg(long)]
    pub start: bool,
    /// With --follow: seconds between `denied` aggregates (at most 10;
    /// default 10). Only the process that drains the denied tables sets
    /// it: while `segbpf attach` drains them, records come at its pace.
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=10))]
    pub denied_secs: Option<u64>,
    /// Which flows and records to show.
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Serialize)]
struct FlowsOut {
    #[serde(flatten)]
    target: Target,
    flows: Vec<Flow>,
}

/// Runs `segbpf flows`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let Some(iface) = args.iface.clone() else {
        return services(&args);
    };
    let att = Attachment::new(&iface, ns);
    if args.follow {
        return follow(&args, &att);
    }
    let filter = args.filter.filter();
    let flows: Vec<Flow> = flows::snapshot(&att)?
        .into_iter()
        .filter(|f| filter.flow(f))
        .collect();
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
                        format!(" flags {}", f.tcp_flags.join(","))
                    },
                    f.rule
                        .as_ref()
                        .map(|r| format!(" rule {}", r.display_name()))
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

/// Polls every second and prints the lines due, until the attachment
/// goes away (or a signal ends the process).
fn follow(args: &Args, att: &Attachment) -> anyhow::Result<()> {
    let mut log = FlowLog::open(
        att,
        Options {
            flows: true,
            start: args.start,
            active_every: std::time::Duration::from_secs(args.active_secs),
            denied_every: std::time::Duration::from_secs(
                args.denied_secs
                    .unwrap_or(crate::observe::flowlog::DENIED_EVERY.as_secs()),
            ),
        },
    )?;
    if !log.is_primary() {
        if let Some(secs) = args.denied_secs {
            tracing::warn!(
                "--denied-secs {secs} is ignored: another process (`segbpf attach`) drains the denied tables of {} and writes the aggregates at its own pace (every {} s at most); this command reads them from its store as they are written",
                att.describe(),
                crate::observe::flowlog::DENIED_EVERY.as_secs()
            );
        } else {
            tracing::info!(
                "another process drains the denied tables of {}: denied records come from its store",
                att.describe()
            );
        }
    }
    let filter = args.filter.filter();
    let stop = on_stop_signals()?;
    let print = |lines: &[Line]| -> anyhow::Result<()> {
        for l in lines {
            if let Line::Record(r) = l
                && !filter.record(r)
            {
                continue;
            }
            match args.output {
                Output::Json => print_line(crate::cmd::json_line(l)?)?,
                Output::Text => print_line(text_line(l))?,
            }
        }
        Ok(())
    };
    loop {
        let lines = match log.step() {
            Ok(lines) => lines,
            Err(FlowLogError::Flows(flows::FlowsError::NotAttached(which))) => {
                tracing::info!("segbpf was detached from {which}; stopping");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        print(&lines)?;
        for _ in 0..10 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                // What waits in the denied tables is drained and printed
                // before leaving: a drained aggregate is never dropped.
                return print(&log.finish()?);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop_handler(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT and SIGTERM set a flag (async-signal-safe) instead of ending
/// the process at once.
fn on_stop_signals() -> anyhow::Result<&'static std::sync::atomic::AtomicBool> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { signal(sig, SigHandler::Handler(stop_handler)) }?;
    }
    Ok(&STOP)
}

/// A flow-log line as one line of text.
pub fn text_line(l: &Line) -> String {
    let r = match l {
        Line::Lost(lost) => {
            return format!(
                "{} LOST {} {} {} packets not attributed ({} bucket shared, {} flood not sampled)",
                lost.time, lost.iface, lost.packets, lost.what, lost.shared, lost.unsampled
            );
        }
        Line::Record(r) => r,
    };
    let side = |a: Option<std::net::IpAddr>, p: Option<u16>| {
        let a = a.map_or_else(
            || "?".to_string(),
            |a| match a {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 @ std::net::IpAddr::V4(_) => v4.to_string(),
            },
        );
        p.map_or(a.clone(), |p| format!("{a}:{p}"))
    };
    let mut t = format!(
        "{} {} {} {} {} -> {} {} orig {} pkts {} B",
        r.time,
        r.state.to_uppercase(),
        r.iface,
        r.proto,
        side(r.src, r.sport),
        side(r.dst, Some(r.dport)),
        r.action_word(),
        r.packets_orig,
        r.bytes_orig,
    );
    if r.state != "denied" {
        let _ = write!(t, " reply {} pkts {} B", r.packets_reply, r.bytes_reply);
    }
    let rule = r
        .rule
        .as_ref()
        .map(crate::policy::compile::RuleJson::display_name);
    for (k, v) in [
        ("rule", &rule),
        ("reason", &r.reason),
        ("peer", &r.peer_set),
        ("role", &r.role),
    ] {
        if let Some(v) = v {
            let _ = write!(t, " {k} {v}");
        }
    }
    if r.new_pair {
        t.push_str(" NEW");
    }
    t
}

/// `segbpf flows --services`: a snapshot of the services' flow table.
fn services(args: &Args) -> anyhow::Result<()> {
    let f = &args.filter;
    if !f.peers.is_empty() || !f.rules.is_empty() || f.verdict.is_some() {
        return Err(crate::cmd::UsageError(
            "--peer, --rule and --verdict do not apply to flows --services (--port does)".into(),
        )
        .into());
    }
    let root = crate::attachment::services_level::open_root(args.cgroup_root.as_deref())?;
    let paths = crate::attachment::services::SvcPaths::new(
        &crate::attachment::pins::Roots::from_env(),
        root,
    );
    let flows: Vec<_> = crate::observe::services::flows(&paths)?
        .into_iter()
        .filter(|r| f.ports.is_empty() || f.ports.contains(&r.dport) || f.ports.contains(&r.sport))
        .collect();
    match args.output {
        Output::Json => print_json(&serde_json::json!({
            "services": true,
            "cgroup_root": paths.root.dir,
            "flows": flows,
        }))?,
        Output::Text => {
            for r in &flows {
                let side = |a: std::net::IpAddr, p: u16| match a {
                    std::net::IpAddr::V6(v6) => format!("[{v6}]:{p}"),
                    v4 @ std::net::IpAddr::V4(_) => format!("{v4}:{p}"),
                };
                print_line(format_args!(
                    "service={}{} {} {} -> {} opened by {} last {}{}{}",
                    r.service.as_deref().unwrap_or("-"),
                    r.peer_service
                        .as_deref()
                        .map_or_else(String::new, |p| format!(" peer-service={p}")),
                    r.proto,
                    side(r.src, r.sport),
                    side(r.dst, r.dport),
                    r.opened_by,
                    r.last_seen,
                    match &r.rule {
                        None => " (default)".to_string(),
                        Some(Some(x)) => format!(" rule {}", x.name.as_deref().unwrap_or(&x.label)),
                        Some(None) =>
                            format!(" rule of generation {} (not kept)", r.judged_by_generation),
                    },
                    if r.audit {
                        " (audit: the policy refuses it)"
                    } else {
                        ""
                    }
                ))?;
            }
        }
    }
    Ok(())
}
