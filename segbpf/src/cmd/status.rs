//! `segbpf status`: attachments, their policy, the connection table's fill
//! level, counters per direction and reason, and per-rule counters with the
//! rule's line in roles.toml (like `nft -a list`), as text or JSON.

use std::collections::BTreeMap;

use anyhow::bail;
use segbpf_common::{Counter, reason};
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

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl From<Counter> for Count {
    fn from(c: Counter) -> Self {
        Count {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

/// What one rule allowed.
#[derive(Debug, Serialize)]
pub struct RuleCount {
    /// Rule id.
    pub id: u32,
    /// Label such as `roles.db.ingress[0]`.
    pub label: String,
    /// Direction.
    pub direction: String,
    /// Line in the policy file.
    pub line: u32,
    /// Peer as written.
    pub peer: String,
    /// Services.
    pub services: String,
    /// Packets and bytes the rule allowed (connection openers; later
    /// packets of the connection count as `established`).
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
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
    /// Packets per reason name, both directions together.
    pub counters: BTreeMap<String, u64>,
    /// Packets and bytes per direction and reason name.
    pub directions: BTreeMap<String, BTreeMap<String, Count>>,
    /// Per-rule counters, by rule id.
    pub rules: Vec<RuleCount>,
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Connection table: capacity and entries in use.
    pub conntrack: Conntrack,
    /// Fragment tables.
    pub fragments: Fragments,
    /// Drop events: emitted, suppressed by the rate limit, lost to a full ring.
    pub events: crate::telemetry::EventStats,
    /// Sets edited live, differing from the policy file (`reload` resolves it).
    pub drift: Vec<String>,
}

/// Connection-table sizes and fill levels: the assured table (flows where
/// both sides spoke) and the half-open table (openers without a reply yet;
/// a flood evicts only these).
#[derive(Debug, Serialize)]
pub struct Conntrack {
    /// Capacity of the assured table (entries).
    pub size: u32,
    /// Entries in use in the assured table.
    pub entries: u64,
    /// Capacity of the half-open table.
    pub half_open_size: u32,
    /// Entries in use in the half-open table.
    pub half_open_entries: u64,
}

/// Fragment-table size and fill levels (datagrams whose first fragment
/// passed, on an assured flow or otherwise).
#[derive(Debug, Serialize)]
pub struct Fragments {
    /// Capacity of each table.
    pub size: u32,
    /// Entries of datagrams on assured flows.
    pub assured_entries: u64,
    /// Entries of other datagrams.
    pub other_entries: u64,
}

/// Builds the report of one attachment.
pub fn report(att: &Attachment) -> anyhow::Result<Report> {
    let stats = maps::pinned_stats(att)?;
    let mut counters = BTreeMap::new();
    let mut directions = BTreeMap::new();
    let (mut passed, mut dropped) = (0, 0);
    for (dir, per_reason) in ["ingress", "egress"].iter().zip(stats.iter()) {
        let mut by_reason = BTreeMap::new();
        for code in reason::ALL {
            let c: Count = per_reason
                .get(code as usize)
                .copied()
                .unwrap_or_default()
                .into();
            by_reason.insert(reason::name(code).to_string(), c);
            *counters.entry(reason::name(code).to_string()).or_insert(0) += c.packets;
            if reason::passes(code) {
                passed += c.packets;
            } else {
                dropped += c.packets;
            }
        }
        directions.insert(dir.to_string(), by_reason);
    }
    let state = State::current(att).ok();
    let state_sets: Vec<String> = state
        .iter()
        .flat_map(|s| s.set_overrides.keys().cloned())
        .collect();
    let rule_stats = maps::pinned_rule_stats(att).unwrap_or_default();
    let rules = state
        .iter()
        .flat_map(|s| s.rules.iter())
        .map(|r| {
            let c = rule_stats
                .get(r.counter as usize)
                .copied()
                .unwrap_or_default();
            RuleCount {
                id: r.id,
                label: r.label.clone(),
                direction: r.direction.clone(),
                line: r.line,
                peer: r.peer.clone(),
                services: r.services.clone(),
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .collect();
    let ct_size = state.as_ref().map(|s| s.ct_size).unwrap_or(0);
    let (entries, half_open_entries) = maps::pinned_ct_fill(att).unwrap_or((0, 0));
    let conntrack = Conntrack {
        size: ct_size,
        entries,
        half_open_size: if ct_size == 0 {
            0
        } else {
            segbpf_common::ct_new_entries(ct_size)
        },
        half_open_entries,
    };
    let (assured_entries, other_entries) = maps::pinned_frag_fill(att).unwrap_or((0, 0));
    let fragments = Fragments {
        size: segbpf_common::DEFAULT_FRAG_ENTRIES,
        assured_entries,
        other_entries,
    };
    Ok(Report {
        iface: att.iface.clone(),
        netns: att.netns.clone(),
        attached: att.is_attached(),
        state,
        counters,
        directions,
        rules,
        passed,
        dropped,
        conntrack,
        fragments,
        events: crate::telemetry::pinned_event_stats(att).unwrap_or_default(),
        drift: state_sets,
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
            println!("  policy:    {}", s.policy);
            println!("  roles:     {}", s.roles.join(", "));
            if s.roles_changed_at > 0 {
                println!(
                    "  ROLES CHANGED at generation {} (were: {})",
                    s.roles_changed_at,
                    s.previous_roles.join(", ")
                );
            }
            if let Some(p) =
                crate::cmd::confirm::pending(&Attachment::new(&r.iface, r.netns.as_deref()))
            {
                println!(
                    "  PENDING:   generation {} is undone at unix time {} unless confirmed (`segbpf confirm {}`)",
                    p.generation, p.deadline, r.iface
                );
            }
            if !s.set_overrides.is_empty() {
                println!(
                    "  DRIFT:     sets edited live: {} (`segbpf reload {}` restores the file's)",
                    s.set_overrides
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.iface
                );
            }
            println!(
                "  compiled:  {} rules, {} classes, {} IPv4 / {} IPv6 / {} port prefixes",
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
        "  conntrack: {} of {} entries assured, {} of {} half-open; fragments: {} + {} of {} each",
        r.conntrack.entries,
        r.conntrack.size,
        r.conntrack.half_open_entries,
        r.conntrack.half_open_size,
        r.fragments.assured_entries,
        r.fragments.other_entries,
        r.fragments.size
    );
    if let Some(s) = &r.state {
        println!(
            "  mode:      {}; events {}/s, burst {}",
            if s.audit {
                "AUDIT (nothing enforced)"
            } else {
                "enforcing"
            },
            s.log_rate,
            s.log_burst
        );
    }
    println!(
        "  events:    {} emitted, {} suppressed by the rate limit, {} lost (ring full)",
        r.events.emitted, r.events.suppressed, r.events.lost
    );
    println!("  passed:    {} packets", r.passed);
    println!("  dropped:   {} packets", r.dropped);
    if !r.rules.is_empty() {
        println!("  rules (connection openers each rule allowed):");
        println!(
            "    {:>4}  {:<24} {:>5}  {:<40} {:>10} {:>12}",
            "id", "rule", "line", "match", "packets", "bytes"
        );
        for rule in &r.rules {
            let what = format!("{} {} {}", rule.direction, rule.peer, rule.services);
            println!(
                "    {:>4}  {:<24} {:>5}  {:<40} {:>10} {:>12}",
                rule.id, rule.label, rule.line, what, rule.packets, rule.bytes
            );
        }
    }
    for (dir, by_reason) in &r.directions {
        let nonzero: Vec<String> = by_reason
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(name, c)| format!("{name} {} ({} B)", c.packets, c.bytes))
            .collect();
        if !nonzero.is_empty() {
            println!("  {dir:<8} {}", nonzero.join(", "));
        }
    }
}
