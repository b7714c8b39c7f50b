//! The status report of an attachment: what was applied, the counters per
//! direction and reason, per rule (with the rule's line in roles.toml, like
//! `nft -a list`), the connection and fragment tables' fill, the kernel
//! memory held and the event counters. `segbpf status` prints it; the metrics endpoint serves it.

use std::collections::BTreeMap;

use segbpf_common::{Counter, reason};
use serde::Serialize;

use crate::{
    attachment::maps::{self, MapsError},
    attachment::pins::Attachment,
    attachment::state::State,
};

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
    /// The rule's `name`, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule's `description`, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
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
    /// The network namespace's label (`ip netns` name, `host`), if known.
    pub netns: Option<String>,
    /// The network namespace's inode.
    pub netns_inode: u64,
    /// Whether segbpf enforces: its links are pinned and the kernel runs
    /// them on this interface ([`crate::attachment::liveness`]).
    pub attached: bool,
    /// Each hook as the kernel has it (empty when nothing is pinned).
    pub links: Vec<crate::attachment::liveness::Hook>,
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
    /// Kernel memory held (programs and maps, the shared tables apart).
    pub memory: crate::attachment::memory::Memory,
    /// Drop events: emitted, suppressed by the rate limit, lost to a full ring.
    pub events: crate::observe::telemetry::EventStats,
    /// Denied packets the kernel did not attribute to an aggregate for the
    /// flow log (their bucket belonged to another aggregate: a flood of
    /// distinct aggregates), since attach.
    pub denied_lost: u64,
    /// Sets edited live, differing from the policy file (`reload` resolves it).
    pub drift: Vec<String>,
    /// A change waiting for `segbpf confirm`.
    pub pending: Option<Awaiting>,
    /// Why the record of a pending change cannot be read, when it is
    /// there but unreadable: a change may wait for confirmation, and its
    /// guard waits for the record to read again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_unreadable: Option<String>,
    /// The outcome of the last policy change (for the metrics; `status`
    /// does not print it).
    #[serde(skip)]
    pub last_change: Option<crate::attachment::swap::LastChange>,
}

/// A change applied with `--confirm` that is not confirmed yet.
#[derive(Debug, Serialize)]
pub struct Awaiting {
    /// Its generation.
    pub generation: u64,
    /// Unix time at which the guard undoes it.
    pub deadline: u64,
    /// The deadline has passed and the change is still in force.
    pub overdue: bool,
    /// Whether a guard process for it runs (checked by its pid; unknown
    /// before the deadline, when the guard has not written its record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_running: Option<bool>,
    /// Failed restore attempts so far.
    pub restore_attempts: u32,
    /// Why the last restore attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_error: Option<String>,
}

impl Awaiting {
    fn of(att: &Attachment, p: &crate::attachment::guard::Pending) -> Awaiting {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let progress =
            crate::attachment::guard::Progress::read(att).filter(|g| g.generation == p.generation);
        Awaiting {
            generation: p.generation,
            deadline: p.deadline,
            overdue: now > p.deadline,
            guard_running: progress
                .as_ref()
                .map(crate::attachment::guard::Progress::running),
            restore_attempts: progress.as_ref().map_or(0, |g| g.attempts),
            restore_error: progress.and_then(|g| g.last_error),
        }
    }
}

/// Connection-table sizes and fill levels: the assured table (flows where
/// both sides spoke and the originator acknowledged the reply, not
/// closing) and the half-open table (openers without an acknowledged reply
/// yet, and closing flows; a flood evicts only these). The tables are
/// shared by every attachment of the network namespace: `entries` are this
/// interface's, the `table_*` fields count every interface's against the
/// capacity. Entries count as the datapath judges them
/// ([`segbpf_common::ct_entry_live`]): live flows per table, and apart
/// the expired entries that wait in their table to be reused.
#[derive(Debug, Serialize)]
pub struct Conntrack {
    /// Assured flows the tables were made to hold (`--ct-size`, per IP
    /// family: each family's table holds its assured and half-open flows
    /// in one, with room for both sizes).
    pub size: u32,
    /// Live flows of this interface in the assured table.
    pub entries: u64,
    /// Half-open flows the tables were made to hold (per IP family, as
    /// `size`).
    pub half_open_size: u32,
    /// Live flows of this interface in the half-open table.
    pub half_open_entries: u64,
    /// Entries of this interface in either table whose timeout has passed
    /// (or audit entries with audit mode off): not flows, counted in
    /// neither field above, held until a new flow reuses their slot.
    pub expired_entries: u64,
    /// Live flows of every attachment of the namespace in the assured table.
    pub table_entries: u64,
    /// Live flows of every attachment of the namespace in the half-open table.
    pub table_half_open_entries: u64,
    /// Expired entries of every attachment of the namespace, both tables.
    pub table_expired_entries: u64,
    /// Live attachments of the namespace that share the tables.
    pub shared_by: usize,
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

/// Builds the report of one attachment, counting the connection and
/// fragment tables' entries (a walk of each table).
pub fn report(att: &Attachment) -> Result<Report, MapsError> {
    build(att, true)
}

/// The fill levels of an attachment's connection and fragment tables:
/// the live assured and half-open flows of the interface of its state
/// (0 when the state is unreadable, see
/// [`crate::attachment::cttables::pinned_fill`]), fragments on assured
/// flows, other fragments. Each is a walk of the table.
pub fn table_fill(att: &Attachment) -> (u64, u64, u64, u64) {
    let [ct, _] = State::current(att)
        .ok()
        .and_then(|s| crate::attachment::cttables::pinned_fill(att, s.ifindex).ok())
        .unwrap_or_default();
    let (frag_assured, frag_other) = maps::pinned_frag_fill(att).unwrap_or((0, 0));
    (ct.assured, ct.half_open, frag_assured, frag_other)
}

/// Builds the report; the table fill levels are left at 0 unless `fill`
/// (the metrics endpoint samples them apart, see [`table_fill`]).
pub fn build(att: &Attachment, fill: bool) -> Result<Report, MapsError> {
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
    // The pending confirmation is read before the state: the guard
    // writes the restored state first and removes the record last, so a
    // report that finds no record reads the state after the restore. Read
    // the other way round, a restore between the two reads showed the
    // unconfirmed change in force with nothing pending.
    let (pending, pending_unreadable) = match crate::attachment::guard::read_pending(att) {
        Ok(p) => (p.map(|p| Awaiting::of(att, &p)), None),
        Err(e) => (None, Some(e.to_string())),
    };
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
                name: r.name.clone(),
                description: r.description.clone(),
                direction: r.direction.clone(),
                line: r.line,
                peer: r.peer.clone(),
                services: r.services.clone(),
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .collect();
    // The sizes the kernel made the shared tables with (the state's
    // --ct-size may be an older request).
    let info = |m: &str| aya::maps::MapInfo::from_pin(att.map(m)).ok();
    let [mine, all] = match &state {
        // The state read above gives the interface index (read once).
        Some(s) if fill => {
            crate::attachment::cttables::pinned_fill(att, s.ifindex).unwrap_or_default()
        }
        _ => Default::default(),
    };
    let (assured_entries, other_entries) = if fill {
        maps::pinned_frag_fill(att).unwrap_or((0, 0))
    } else {
        (0, 0)
    };
    let memory = crate::attachment::memory::of(att);
    // The tables' room, as `--ct-size` gives it (each family's table has
    // room for as many assured and half-open flows).
    let ct = crate::attachment::loader::shared_ct_size(att).unwrap_or(0);
    let conntrack = Conntrack {
        size: ct,
        entries: mine.assured,
        half_open_size: if ct == 0 {
            0
        } else {
            segbpf_common::ct_new_entries(ct)
        },
        half_open_entries: mine.half_open,
        expired_entries: mine.expired,
        table_entries: all.assured,
        table_half_open_entries: all.half_open,
        table_expired_entries: all.expired,
        shared_by: memory.shared_by,
    };
    let fragments = Fragments {
        size: info(segbpf_common::MAP_FRAG)
            .map_or(segbpf_common::DEFAULT_FRAG_ENTRIES, |i| i.max_entries()),
        assured_entries,
        other_entries,
    };
    let links = if att.is_attached() {
        crate::attachment::liveness::check(att, state.as_ref())
    } else {
        Vec::new()
    };
    // The rest of what the attachment's files say, then what the
    // observers (events, denied aggregates) count.
    let last_change = crate::attachment::swap::LastChange::read(att);
    Ok(Report {
        iface: att.iface.clone(),
        netns: att.netns.label.clone(),
        netns_inode: att.netns.inode,
        attached: att.is_attached() && crate::attachment::liveness::all_live(&links),
        links,
        state,
        counters,
        directions,
        rules,
        passed,
        dropped,
        conntrack,
        fragments,
        memory,
        events: maps::pinned_event_stats(att).unwrap_or_default(),
        denied_lost: maps::pinned_denied_lost(att).unwrap_or(0),
        drift: state_sets,
        pending,
        pending_unreadable,
        last_change,
    })
}
