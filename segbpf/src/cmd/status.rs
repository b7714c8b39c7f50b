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
#[command(
    after_help = "Times are shown both ways: \"attached 3m ago (2026-12-06T09:50:40Z)\"; JSON has RFC 3339 times (docs/json.md).\n\nExamples:\n  segbpf status\n  segbpf status eth0 -o json\n  segbpf status --all-netns"
)]
pub struct Args {
    /// Only this interface (default: every attached interface, and the
    /// services attachments).
    #[arg(conflicts_with = "all_netns")]
    pub iface: Option<String>,
    /// Every attachment on the machine, in every network namespace (not
    /// only this one's).
    #[arg(long)]
    pub all_netns: bool,
    /// Only the services attachment (docs/services.md).
    #[arg(long, conflicts_with_all = ["iface", "all_netns"])]
    pub services: bool,
    /// With --services: the cgroup root it is attached below (default: the
    /// cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The attachments of the other network namespaces: the namespaces whose
/// pin directories hold any, as `(namespace, attachments)`.
fn other_namespaces(
    roots: &Roots,
    ns: &Netns,
) -> Vec<(Netns, Vec<crate::attachment::pins::Attachment>)> {
    let mut inodes: Vec<u64> = std::fs::read_dir(roots.bpffs.join("net"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&i| i != ns.inode)
                .collect()
        })
        .unwrap_or_default();
    inodes.sort_unstable();
    inodes
        .into_iter()
        .filter_map(|inode| {
            let mut other = Netns {
                inode,
                cookie: 0,
                label: None,
            };
            let atts = roots.list(&other);
            if atts.is_empty() {
                return None;
            }
            // The name people know it by, as its attachments recorded it.
            other.label = atts
                .iter()
                .find_map(|a| crate::attachment::state::State::current(a).ok()?.netns);
            let atts = roots.list(&other);
            Some((other, atts))
        })
        .collect()
}

/// The reports of another namespace's attachments, made from a thread in
/// that namespace (the links' interfaces and the shared tables are looked
/// up where they are): entered by its `ip netns` name (the initial one by
/// PID 1's), and only when the kernel confirms it is that namespace.
/// Otherwise they are made from here, and may miss what only the
/// namespace sees.
fn reports_in(
    roots: &Roots,
    other: &Netns,
    atts: &[crate::attachment::pins::Attachment],
) -> anyhow::Result<Vec<Report>> {
    use std::os::fd::AsFd as _;
    let path = if other.is_initial() {
        Some("/proc/1/ns/net".to_string())
    } else {
        other.label.as_ref().map(|l| format!("/run/netns/{l}"))
    };
    let (inode, roots_in, ifaces) = (
        other.inode,
        roots.clone(),
        atts.iter().map(|a| a.iface.clone()).collect::<Vec<_>>(),
    );
    let inside = path.and_then(|path| {
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).ok()?;
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let here = Netns::current().ok()?;
            if here.inode != inode {
                return None;
            }
            Some(
                ifaces
                    .iter()
                    .map(|i| report::report(&roots_in.attachment(i, &here)))
                    .collect::<Result<Vec<_>, _>>(),
            )
        })
        .join()
        .ok()
        .flatten()
    });
    match inside {
        Some(r) => Ok(r?),
        None => Ok(atts
            .iter()
            .map(report::report)
            .collect::<Result<Vec<_>, _>>()?),
    }
}

/// Unix time `t` as RFC 3339 UTC.
fn rfc3339(t: u64) -> String {
    crate::host::clock::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
}

/// How long ago (or, for a time to come, in how long) unix time `t` is,
/// for people: `3m ago`, `in 45s`, `2h 5m ago`, `4d 2h ago`.
pub fn human_since(t: u64, now: u64) -> String {
    let (secs, future) = if t > now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let span = match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h {m}m"),
        },
        s => match (s / 86_400, s % 86_400 / 3600) {
            (d, 0) => format!("{d}d"),
            (d, h) => format!("{d}d {h}h"),
        },
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A time for people: `3m ago (2026-12-06T09:50:40Z)`.
fn when(t: u64) -> String {
    format!("{} ({})", human_since(t, unix_now()), rfc3339(t))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `enforcing`, `audit` (the program runs, nothing is enforced) or
/// `not-enforcing` (links gone or stale pins): what the status line and
/// the JSON `mode` say.
fn mode(r: &Report) -> &'static str {
    match (&r.state, r.attached) {
        (_, false) => "not-enforcing",
        (Some(s), true) if s.audit => "audit",
        _ => "enforcing",
    }
}

/// A report as docs/json.md has it: times as RFC 3339 strings, and the
/// mode.
fn report_json(r: &Report) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    v["mode"] = mode(r).into();
    crate::cmd::times_as_rfc3339(&mut v, &["attached_at", "deadline"]);
    // A generation, not a time: the one that changed the roles last, null
    // when they never changed (the state file's 0).
    if let Some(state) = v.get_mut("state").and_then(|s| s.as_object_mut())
        && state
            .get("roles_changed_at")
            .and_then(serde_json::Value::as_u64)
            == Some(0)
    {
        state.insert("roles_changed_at".to_string(), serde_json::Value::Null);
    }
    Ok(v)
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
    if args.services {
        return crate::cmd::services::status(args.cgroup_root, args.output);
    }
    let services = if args.iface.is_none() {
        crate::cmd::services::reports(None, true)
    } else {
        Vec::new()
    };
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
    let others = if args.iface.is_none() {
        other_namespaces(&roots, ns)
    } else {
        Vec::new()
    };
    let mut reports = atts
        .iter()
        .map(report::report)
        .collect::<Result<Vec<_>, _>>()?;
    if args.all_netns {
        for (other, atts) in &others {
            reports.extend(reports_in(&roots, other, atts)?);
        }
    }
    match args.output {
        Output::Json => {
            let attachments = reports
                .iter()
                .map(report_json)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut doc = serde_json::json!({ "attachments": attachments });
            if !args.all_netns && args.iface.is_none() {
                doc["other_netns"] = others
                    .iter()
                    .map(|(n, atts)| {
                        serde_json::json!({
                            "netns": n.label,
                            "netns_inode": n.inode,
                            "ifaces": atts.iter().map(|a| a.iface.clone()).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
            }
            if !services.is_empty() {
                doc["services"] = serde_json::json!(services);
            }
            print_json(&doc)?;
        }
        Output::Text => {
            let mut o = std::io::stdout().lock();
            if reports.is_empty() {
                writeln!(o, "segbpf is not attached to any interface")?;
            }
            for r in &reports {
                print_text(&mut o, r)?;
            }
            if !args.all_netns && !others.is_empty() {
                let list: Vec<String> = others
                    .iter()
                    .map(|(n, atts)| {
                        format!(
                            "{}: {}",
                            n.describe(),
                            atts.iter()
                                .map(|a| a.iface.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                    .collect();
                writeln!(
                    o,
                    "other network namespaces have attachments ({}); `segbpf status --all-netns` shows them",
                    list.join("; ")
                )?;
            }
            crate::cmd::services::print_text(&mut o, &services)?;
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
        if mode(r) == "audit" {
            "AUDIT (nothing enforced)".to_string()
        } else {
            "enforcing".to_string()
        }
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
            if s.attached_at > 0 {
                writeln!(o, "  attached:  {}", when(s.attached_at))?;
            }
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
            if let Some(e) = &r.pending_unreadable {
                writeln!(
                    o,
                    "  PENDING:   UNREADABLE RECORD: {e}; the change in force may be unconfirmed, and its guard waits for the record to read again"
                )?;
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
        "  events:    {} emitted, {} suppressed by the rate limit, {} lost (ring full); {} denied packets not attributed (bucket shared, or a flood aggregated on a sample)",
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
            "  PENDING:   generation {} is undone {} unless confirmed (`segbpf confirm {iface}`)",
            p.generation,
            when(p.deadline)
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
        "  PENDING:   generation {} is still in force past its deadline ({}): {why}",
        p.generation,
        when(p.deadline)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::report::Awaiting;

    #[test]
    fn times_for_people() {
        assert_eq!(human_since(1000, 1000), "0s ago");
        assert_eq!(human_since(1000, 1059), "59s ago");
        assert_eq!(human_since(1000, 1000 + 180), "3m ago");
        assert_eq!(human_since(0, 2 * 3600 + 5 * 60), "2h 5m ago");
        assert_eq!(human_since(0, 3600), "1h ago");
        assert_eq!(human_since(0, 4 * 86_400 + 2 * 3600 + 7), "4d 2h ago");
        assert_eq!(human_since(1045, 1000), "in 45s");
    }

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
        assert!(
            line(&p).contains(" ago (1970-01-01T00:01:40") && line(&p).contains("is undone "),
            "{}",
            line(&p)
        );
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
