//! `segbpf status`: attachments, their policy, and counters per verdict
//! and drop reason (summed over CPUs), as text or JSON.

use anyhow::bail;
use segbpf_common::reason;
use serde::Serialize;

use crate::{cmd::Output, maps, pins::Attachment, state::State};

/// Arguments of `segbpf status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this interface (default: every attached interface).
    pub iface: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// One attachment as `status` reports it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Interface.
    pub iface: String,
    /// Network namespace, if any.
    pub netns: Option<String>,
    /// Whether the link is pinned (enforcing).
    pub attached: bool,
    /// What was applied (None if the state file is missing).
    pub state: Option<State>,
    /// Packets per reason name.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Connection table: capacity and entries in use.
    pub conntrack: Conntrack,
}

/// Connection-table size and fill level.
#[derive(Debug, Serialize)]
pub struct Conntrack {
    /// Capacity (entries).
    pub size: u32,
    /// Entries in use.
    pub entries: u64,
}

/// Builds the report of one attachment.
pub fn report(att: &Attachment) -> anyhow::Result<Report> {
    let stats = maps::pinned_stats(att)?;
    let mut counters = std::collections::BTreeMap::new();
    let (mut passed, mut dropped) = (0, 0);
    for code in reason::ALL {
        let n = stats.get(code as usize).copied().unwrap_or(0);
        counters.insert(reason::name(code).to_string(), n);
        if reason::passes(code) {
            passed += n;
        } else {
            dropped += n;
        }
    }
    let state = State::read(&att.state).ok();
    let conntrack = Conntrack {
        size: state.as_ref().map(|s| s.ct_size).unwrap_or(0),
        entries: maps::pinned_ct_fill(att).unwrap_or(0),
    };
    Ok(Report {
        iface: att.iface.clone(),
        netns: att.netns.clone(),
        attached: att.is_attached(),
        state,
        counters,
        passed,
        dropped,
        conntrack,
    })
}

/// Runs `segbpf status`.
pub fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    let atts = match &args.iface {
        Some(i) => {
            let att = Attachment::new(i, netns);
            if !att.dir.exists() {
                bail!("segbpf is not attached to {i}");
            }
            vec![att]
        }
        None => crate::pins::Roots::from_env().list(netns),
    };
    let reports = atts
        .iter()
        .map(report)
        .collect::<anyhow::Result<Vec<_>>>()?;
    match args.output {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "attachments": reports }))?
            );
        }
        Output::Text => {
            if reports.is_empty() {
                println!("segbpf is not attached to any interface");
            }
            for r in &reports {
                print_text(r);
            }
        }
    }
    Ok(())
}

fn print_text(r: &Report) {
    let ns = r
        .netns
        .as_deref()
        .map(|n| format!(" (netns {n})"))
        .unwrap_or_default();
    let link = if r.attached {
        "enforcing"
    } else {
        "NOT ATTACHED (stale pins)"
    };
    match &r.state {
        Some(s) => {
            println!(
                "{}{ns}: {link}, ingress xdp {} (prog {}), egress tc {} (prog {}), generation {}",
                r.iface, s.mode, s.prog_id, s.tc_mode, s.tc_prog_id, s.generation
            );
            println!("  policy:   {}", s.policy);
            println!("  roles:    {}", s.roles.join(", "));
            println!(
                "  compiled: {} rules, {} classes, {} IPv4 / {} IPv6 / {} port prefixes",
                s.rules.len(),
                s.classes,
                s.entries[0],
                s.entries[1],
                s.entries[2]
            );
        }
        None => println!("{}{ns}: {link} (state file missing)", r.iface),
    }
    println!(
        "  conntrack: {} of {} entries",
        r.conntrack.entries, r.conntrack.size
    );
    println!("  passed:   {}", r.passed);
    println!("  dropped:  {}", r.dropped);
    for (name, n) in &r.counters {
        if *n > 0 {
            println!("    {name:<24} {n}");
        }
    }
}
