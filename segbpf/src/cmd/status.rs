//! `segbpf status`: attachments of this network namespace, their policy,
//! the connection table's fill level, counters per direction and reason,
//! and per-rule counters with the rule's line in roles.toml (like
//! `nft -a list`), as text or JSON ([`crate::observe::report`]).

use std::io::Write;

use anyhow::bail;

use crate::{
    attachment::pins::Roots,
    cmd::{Output, print_json},
    host::netns::Netns,
    observe::report::{self, Report},
};

/// Arguments of `segbpf status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this interface (default: every attached interface).
    pub iface: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Runs `segbpf status`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let roots = Roots::from_env();
    roots.check_visible()?;
    for old in roots.legacy_layout() {
        tracing::warn!(
            "{} holds pins of an older segbpf that named attachments by interface; detach them with that version",
            old.display()
        );
    }
    let atts = match &args.iface {
        Some(i) => {
            let att = roots.attachment(i, ns);
            if !att.dir.exists() {
                bail!("segbpf is not attached to {}", att.describe());
            }
            vec![att]
        }
        None => roots.list(ns),
    };
    let reports = atts
        .iter()
        .map(report::report)
        .collect::<Result<Vec<_>, _>>()?;
    match args.output {
        Output::Json => print_json(&serde_json::json!({ "attachments": reports }))?,
        Output::Text => {
            let mut o = std::io::stdout().lock();
            if reports.is_empty() {
                writeln!(o, "segbpf is not attached to any interface")?;
            }
            for r in &reports {
                print_text(&mut o, r)?;
            }
        }
    }
    Ok(())
}

fn print_text(o: &mut impl Write, r: &Report) -> std::io::Result<()> {
    let ns = match &r.netns {
        _ if r.netns_inode == crate::host::netns::INIT_NET_INODE => String::new(),
        Some(l) => format!(" (netns {l})"),
        None => format!(" (netns net:[{}])", r.netns_inode),
    };
    let dead: Vec<String> = r
        .links
        .iter()
        .filter(|h| !h.live)
        .map(|h| format!("{}: {}", h.hook, h.problem.as_deref().unwrap_or("not live")))
        .collect();
    let link = if r.attached {
        "enforcing".to_string()
    } else if !dead.is_empty() && r.links.iter().any(|h| h.link_id != 0) {
        format!(
            "NOT ENFORCING ({}; `segbpf attach` attaches it again)",
            dead.join("; ")
        )
    } else {
        "NOT ATTACHED (stale pins)".to_string()
    };
    match &r.state {
        Some(s) => {
            writeln!(
                o,
                "{}{ns}: {link}, ingress xdp {} (prog {}), egress tc {} (prog {}), generation {}",
                r.iface, s.mode, s.prog_id, s.tc_mode, s.tc_prog_id, s.generation
            )?;
            writeln!(o, "  policy:    {}", s.policy)?;
            writeln!(o, "  roles:     {}", s.roles.join(", "))?;
            if s.roles_changed_at > 0 {
                writeln!(
                    o,
                    "  ROLES CHANGED at generation {} (were: {})",
                    s.roles_changed_at,
                    s.previous_roles.join(", ")
                )?;
            }
            if let Some(p) = &r.pending {
                print_pending(o, p, &r.iface)?;
            }
            if !s.set_overrides.is_empty() {
                writeln!(
                    o,
                    "  DRIFT:     sets edited live: {} (`segbpf reload {}` restores the file's)",
                    s.set_overrides
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.iface
                )?;
            }
            writeln!(
                o,
                "  compiled:  {} rules, {} classes, {} IPv4 / {} IPv6 / {} port prefixes",
                s.rules.len(),
                s.classes,
                s.entries[0],
                s.entries[1],
                s.entries[2]
            )?;
        }
        None => writeln!(o, "{}{ns}: {link} (state file missing)", r.iface)?,
    }
    writeln!(
        o,
        "  conntrack: {} of {} entries assured, {} of {} half-open; fragments: {} + {} of {} each",
        r.conntrack.entries,
        r.conntrack.size,
        r.conntrack.half_open_entries,
        r.conntrack.half_open_size,
        r.fragments.assured_entries,
        r.fragments.other_entries,
        r.fragments.size
    )?;
    if r.conntrack.shared_by > 1 {
        writeln!(
            o,
            "             tables shared by {} attachments of the namespace: {} assured, {} half-open in all",
            r.conntrack.shared_by, r.conntrack.table_entries, r.conntrack.table_half_open_entries
        )?;
    }
    writeln!(
        o,
        "  memory:    {} in the kernel (programs and maps), + {} of connection tables shared by {} attachment(s) of the namespace",
        crate::attachment::memory::human(r.memory.attachment_bytes),
        crate::attachment::memory::human(r.memory.shared_bytes),
        r.memory.shared_by
    )?;
    if let Some(s) = &r.state {
        writeln!(
            o,
            "  mode:      {}; events {}/s, burst {}; flow accounting {}",
            if s.audit {
                "AUDIT (nothing enforced)"
            } else if r.attached {
                "enforcing"
            } else {
                "NOT ENFORCING (see above)"
            },
            s.log_rate,
            s.log_burst,
            if s.flow_acct { "on" } else { "off" }
        )?;
    }
    writeln!(
        o,
        "  events:    {} emitted, {} suppressed by the rate limit, {} lost (ring full); {} denied packets not aggregated (table full)",
        r.events.emitted, r.events.suppressed, r.events.lost, r.denied_lost
    )?;
    writeln!(o, "  passed:    {} packets", r.passed)?;
    writeln!(o, "  dropped:   {} packets", r.dropped)?;
    if !r.rules.is_empty() {
        writeln!(o, "  rules (connection openers each rule allowed):")?;
        writeln!(
            o,
            "    {:>4}  {:<24} {:>5}  {:<40} {:>10} {:>12}",
            "id", "rule", "line", "match", "packets", "bytes"
        )?;
        for rule in &r.rules {
            let what = format!("{} {} {}", rule.direction, rule.peer, rule.services);
            let name = rule.name.as_deref().unwrap_or(&rule.label);
            writeln!(
                o,
                "    {:>4}  {:<24} {:>5}  {:<40} {:>10} {:>12}",
                rule.id, name, rule.line, what, rule.packets, rule.bytes
            )?;
        }
    }
    for (dir, by_reason) in &r.directions {
        let nonzero: Vec<String> = by_reason
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(name, c)| format!("{name} {} ({} B)", c.packets, c.bytes))
            .collect();
        if !nonzero.is_empty() {
            writeln!(o, "  {dir:<8} {}", nonzero.join(", "))?;
        }
    }
    Ok(())
}

/// The pending-confirmation line: before the deadline, when it is undone;
/// past it, why it is still in force (the restore failing and why, or no
/// guard running).
fn print_pending(
    o: &mut impl Write,
    p: &crate::observe::report::Awaiting,
    iface: &str,
) -> std::io::Result<()> {
    if !p.overdue {
        return writeln!(
            o,
            "  PENDING:   generation {} is undone at unix time {} unless confirmed (`segbpf confirm {iface}`)",
            p.generation, p.deadline
        );
    }
    let last = p
        .restore_error
        .as_ref()
        .map_or_else(String::new, |e| format!(" (its last restore failed: {e})"));
    let why = match (&p.restore_error, p.guard_running) {
        (_, Some(false)) => format!(
            "NO GUARD RUNNING to undo it{last}; `segbpf attach {iface} ...` starts it again"
        ),
        (Some(e), _) => format!(
            "RESTORE FAILING ({} attempts, the guard keeps trying): {e}",
            p.restore_attempts
        ),
        (None, Some(true)) => "the guard is undoing it now".to_string(),
        (None, None) => {
            format!("no guard has reported on it; `segbpf attach {iface} ...` starts one again")
        }
    };
    writeln!(
        o,
        "  PENDING:   generation {} is still in force past its deadline (unix time {}): {why}",
        p.generation, p.deadline
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::report::Awaiting;

    fn line(p: &Awaiting) -> String {
        let mut out = Vec::new();
        print_pending(&mut out, p, "eth1").unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pending_past_its_deadline_says_why() {
        let mut p = Awaiting {
            generation: 4,
            deadline: 100,
            overdue: false,
            guard_running: None,
            restore_attempts: 0,
            restore_error: None,
        };
        assert!(line(&p).contains("is undone at unix time 100 unless confirmed"));
        p.overdue = true;
        assert!(line(&p).contains("no guard has reported"), "{}", line(&p));
        p.guard_running = Some(true);
        assert!(line(&p).contains("the guard is undoing it now"));
        p.restore_attempts = 3;
        p.restore_error = Some("roles.toml: unknown role".into());
        let l = line(&p);
        assert!(
            l.contains("still in force past its deadline")
                && l.contains("RESTORE FAILING (3 attempts")
                && l.contains("unknown role"),
            "{l}"
        );
        p.guard_running = Some(false);
        let l = line(&p);
        assert!(
            l.contains("NO GUARD RUNNING") && l.contains("its last restore failed: roles.toml"),
            "{l}"
        );
    }
}
