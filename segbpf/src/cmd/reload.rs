//! `segbpf reload`: swap an attachment's policy without reloading or
//! re-attaching its programs.
//!
//! The new policy is parsed, validated and compiled first (a bad policy
//! changes nothing and says why). It is written into the policy slot not in
//! force, where no packet looks; then one atomic u32 write (`SEG_ACTIVE`)
//! switches every later packet to it whole — a packet reads the slot once,
//! so no packet is judged by a mix of old and new rules. After a short
//! grace period the old slot is emptied, connection-table entries of flows
//! the new policy does not allow are removed (the others survive), and
//! counters of rules that no longer exist are cleared (rules that still
//! exist keep their counter slots, so their counts carry over).
//!
//! Crash safety: the state of the new generation is written to
//! `IFACE.next.json` before the switch and renamed after it; a reload
//! killed at any point leaves the kernel on the old or the new policy, and
//! the next command reconciles the state file with the generation the
//! kernel runs. Reloads of one attachment are serialised by a lock file.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use segbpf_common::{
    Counter, CtEntry, CtKey, IPPROTO_ICMP, IPPROTO_ICMPV6, MAP_CT, MAP_CT_NEW, MAP_RULE_STATS,
};

use crate::{
    compile::{self, Capacity},
    history,
    maps::PolicyMaps,
    netif,
    pins::Attachment,
    policy::{AddrRange, Direction, Policy, addr::parse_item, eval, roles},
    state::{self, State},
};

/// Arguments of `segbpf reload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose policy to replace.
    pub iface: String,
    /// Policy file (default: the file the attachment was last given).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Undo the change after SECS seconds unless `segbpf confirm IFACE` runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Apply even though an earlier change waits for `segbpf confirm`
    /// (that change's guard then stands down).
    #[arg(long)]
    pub force: bool,
    /// Work the host's roles out again (roles are otherwise kept from
    /// attach): from the interface's permanent addresses only, never from
    /// SLAAC, temporary or DHCP-dynamic ones; `--role` names given to
    /// attach stay.
    #[arg(long)]
    pub redetect_roles: bool,
}

/// Arguments of `segbpf rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Interface whose previous policy to restore.
    pub iface: String,
}

/// Runs `segbpf reload`.
pub fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, netns);
    crate::cmd::confirm::refuse_while_pending(&att, args.force)?;
    if let Some(secs) = args.confirm {
        // Armed before the change: the guard undoes generation `next`
        // (restoring the current one) unless confirmed.
        let current = State::current(&att)?.generation;
        let live = crate::maps::pinned_config(&att)
            .map(|c| c.generation)
            .unwrap_or(0);
        let next = current.max(live) + 1;
        // The guard restores the policy in force, copied from the history
        // now; without a record of it the change cannot be guarded, and is
        // refused rather than applied unguarded (or undone by detaching).
        let Some(restore) = history::list(&att)
            .into_iter()
            .find(|e| e.generation == current)
        else {
            bail!(
                "--confirm: the policy in force on {} (generation {current}) is not in the history ({}), so the guard could not restore it; apply without --confirm, or reload once without it to record the policy in force",
                att.iface,
                history::dir_of(&att).display()
            );
        };
        crate::cmd::confirm::arm(&att, next, secs, Some(restore))?;
    }
    let out = reload_with(&att, args.policy.as_deref(), args.redetect_roles).inspect_err(|_| {
        if args.confirm.is_some() {
            crate::cmd::confirm::disarm(&att);
        }
    })?;
    if let Some(secs) = args.confirm {
        // In force now: the confirmation time starts.
        let generation = State::current(&att)?.generation;
        crate::cmd::confirm::start_clock(&att, generation, secs)?;
    }
    println!("{out}");
    Ok(())
}

/// Runs `segbpf rollback`: the history entry before the one in force.
pub fn rollback(args: RollbackArgs, netns: Option<&str>) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, netns);
    let state = State::current(&att)?;
    let Some(prev) = history::previous(&att, state.generation) else {
        bail!(
            "no earlier policy in the history of {} (generation {} is the oldest kept)",
            args.iface,
            state.generation
        );
    };
    let msg = swap(&att, |_| {
        Ok((prev.copy.clone(), prev.set_overrides.clone()))
    })?;
    println!(
        "rolled back to the policy of generation {} ({}): {msg}",
        prev.generation, prev.source
    );
    Ok(())
}

/// Time given to packets that read the old slot before the switch to
/// finish their lookups (programs run for microseconds).
const GRACE: Duration = Duration::from_millis(5);

/// Replaces the policy of `att` with the one in `policy` (default: the
/// attachment's current file), dropping live set edits (the file wins).
/// Returns a one-line summary.
pub fn reload(att: &Attachment, policy: Option<&Path>) -> anyhow::Result<String> {
    reload_with(att, policy, false)
}

/// [`reload`], working the roles out again when `redetect` (see [`swap_with`]).
pub fn reload_with(
    att: &Attachment,
    policy: Option<&Path>,
    redetect: bool,
) -> anyhow::Result<String> {
    swap_with(att, redetect, |old| {
        let path = policy
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&old.policy));
        Ok((path, BTreeMap::new()))
    })
}

/// Reloads `att`'s current file keeping its live set edits (the automatic
/// reloads of a running `attach`: a file change must not silently undo a
/// `segbpf set`). Edits of sets the file no longer has fail the reload.
pub fn reload_keeping_sets(att: &Attachment) -> anyhow::Result<String> {
    swap(att, |old| {
        if !old.set_overrides.is_empty() {
            tracing::warn!(
                "keeping the live edits of set(s) {} over the file; `segbpf reload {}` goes back to the file",
                old.set_overrides
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                att.iface
            );
        }
        Ok((PathBuf::from(&old.policy), old.set_overrides.clone()))
    })
}

/// Live set overrides as the state file stores them (text) and as the
/// parser takes them (ranges).
pub fn parse_overrides(
    text: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<BTreeMap<String, Vec<AddrRange>>> {
    text.iter()
        .map(|(set, members)| {
            let ranges = members
                .iter()
                .map(|m| parse_item(m).map_err(|e| anyhow::anyhow!("set {set}: {m}: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((set.clone(), ranges))
        })
        .collect()
}

/// Swaps in the policy that `choose` picks from the current state: a file
/// and live set overrides. Under the attachment's update lock.
pub fn swap(
    att: &Attachment,
    choose: impl FnOnce(&State) -> anyhow::Result<(PathBuf, BTreeMap<String, Vec<String>>)>,
) -> anyhow::Result<String> {
    swap_with(att, false, choose)
}

/// Like [`swap`]. The host keeps the roles decided at attach (so an
/// address that appears later, for example from a router advertisement,
/// cannot add a role's rules); with `redetect`, roles given with `--role`
/// at attach stay, and auto-detected ones are worked out again from the
/// interface's permanent addresses only. A change of roles is logged as a
/// warning and kept in the state (`status` shows it).
pub fn swap_with(
    att: &Attachment,
    redetect: bool,
    choose: impl FnOnce(&State) -> anyhow::Result<(PathBuf, BTreeMap<String, Vec<String>>)>,
) -> anyhow::Result<String> {
    if !att.is_attached() {
        bail!("segbpf is not attached to {}", att.iface);
    }
    let _lock = Lock::take(att)?;
    let old = State::repair(att).context("reading the attachment's state")?;
    let (path, overrides) = choose(&old)?;

    // Everything that depends on input first: nothing in the kernel yet.
    if !old.insecure_policy {
        crate::trust::check_policy_file(&path)?;
    }
    let policy = Policy::load_with_sets(&path, &parse_overrides(&overrides)?)?;
    let roles = if redetect && old.role_args.is_empty() {
        let addrs = netif::permanent_addresses(&att.iface)?;
        roles::resolve(&policy, &[], &att.iface, &addrs)?
    } else if redetect {
        roles::resolve(&policy, &old.role_args, &att.iface, &[])?
    } else {
        roles::resolve(&policy, &old.roles, &att.iface, &[])?
    };
    let roles_changed = roles != old.roles;
    if roles_changed {
        tracing::warn!(
            "roles of {} change from {} to {}",
            att.iface,
            old.roles.join(","),
            roles.join(",")
        );
    }
    let mut maps = PolicyMaps::from_pins(att)?;
    let current = maps.active_slot()?;
    let next = 1 - current;
    let generation = maps.config(current)?.generation.max(old.generation) + 1;
    let mut capacity = Capacity {
        ct: old.ct_size,
        rule_stats: old.rule_slots,
        ..Capacity::default()
    };
    if old.peer_entries > 0 {
        capacity.peer_v4 = old.peer_entries;
        capacity.peer_v6 = old.peer_entries;
    }
    if old.port_entries > 0 {
        capacity.ports = old.port_entries;
    }
    let mut c = compile::compile(
        &policy,
        &roles,
        Some(&att.iface),
        next,
        generation,
        capacity,
    )
    .with_context(|| format!("{}: compiling for {}", policy.source, att.iface))?;
    c.config.audit = old.audit as u8;
    c.config.log_burst = old.log_burst.max(1);
    let freed = compile::carry_counters(&mut c, &old.rules, old.rule_slots)?;

    // Fill the slot no packet looks at (emptying leftovers of a reload that
    // was killed), record the new state as pending, then switch.
    maps.clear_slot(next)?;
    maps.write_slot(&c)?;
    let new = State {
        policy: std::fs::canonicalize(&path)
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string(),
        roles: roles.clone(),
        generation,
        entries: [c.peers_v4.len(), c.peers_v6.len(), c.ports.len()],
        classes: c.classes,
        rules: c.rules.clone(),
        set_overrides: overrides,
        previous_roles: if roles_changed {
            old.roles.clone()
        } else {
            old.previous_roles.clone()
        },
        roles_changed_at: if roles_changed {
            generation
        } else {
            old.roles_changed_at
        },
        ..old.clone()
    };
    new.write(&state::next_path(&att.state))?;
    maps.activate(next)?;

    // The new policy is in force: nothing after this point is a failure
    // (the caller would undo a guard or report a change that happened).
    // What goes wrong is a warning in the result.
    let mut warnings = Vec::new();
    let mut warn = |what: &str, e: anyhow::Error| {
        tracing::warn!("{what}: {e:#}");
        warnings.push(format!("{what}: {e:#}"));
    };
    if let Err(e) = std::fs::rename(state::next_path(&att.state), &att.state) {
        // State::current still finds the pending file (its generation is live).
        warn(
            &format!("renaming the state to {}", att.state.display()),
            e.into(),
        );
    }
    if let Err(e) = history::record(att, generation, Path::new(&new.policy), &new.set_overrides) {
        warn("policy history not updated", e);
    }
    // Let packets that read the old slot finish, prune the connections the
    // new policy would not open (including any opened in that window), and
    // only then empty the old slot.
    std::thread::sleep(GRACE);
    let pruned = prune_conntrack(att, &policy, &roles).unwrap_or_else(|e| {
        warn("pruning the connection table", e);
        0
    });
    if let Err(e) = maps.clear_slot(current) {
        warn("emptying the previous policy slot", e.into());
    }
    if let Err(e) = clear_counters(att, &freed) {
        warn("zeroing unused rule counters", e);
    }
    let mut out = format!(
        "reloaded {} on {}: generation {generation} applied, roles {}, {} rules; {} connections no longer allowed were removed",
        policy.source,
        att.iface,
        roles.join(","),
        c.rules.len(),
        pruned
    );
    if !warnings.is_empty() {
        out.push_str(&format!(" (warnings: {})", warnings.join("; ")));
    }
    Ok(out)
}

/// Zeroes the per-rule counters of slots no rule uses any more.
fn clear_counters(att: &Attachment, slots: &[u32]) -> anyhow::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let data = MapData::from_pin(att.map(MAP_RULE_STATS))?;
    let mut arr: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for &slot in slots {
        arr.set(
            slot,
            PerCpuValues::try_from(vec![Counter::default(); cpus])?,
            0,
        )?;
    }
    Ok(())
}

/// The packet that opened a tracked flow, for the reference evaluator.
fn opener(k: &CtKey, e: &CtEntry) -> (Direction, eval::Packet) {
    let addr = |b: [u8; 16]| -> IpAddr {
        if k.family == 4 {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(b))
        }
    };
    let (local, remote) = (addr(k.local), addr(k.remote));
    let ingress = e.origin == segbpf_common::DIR_INGRESS;
    let icmp_type = match k.proto {
        IPPROTO_ICMP => 8,
        IPPROTO_ICMPV6 => 128,
        _ => 0,
    };
    let (src, dst, dport) = if ingress {
        (remote, local, k.local_port)
    } else {
        (local, remote, k.remote_port)
    };
    let dir = if ingress {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    (
        dir,
        eval::Packet {
            src,
            dst,
            proto: k.proto,
            dport,
            icmp_type,
            hop_limit: 64,
        },
    )
}

/// Removes the connection-table entries (assured and half-open) of flows
/// the new policy would not let open; returns how many.
fn prune_conntrack(att: &Attachment, policy: &Policy, roles: &[String]) -> anyhow::Result<usize> {
    let mut pruned = 0;
    for name in [MAP_CT, MAP_CT_NEW] {
        let data = MapData::from_pin(att.map(name))?;
        let mut ct: BpfHashMap<MapData, CtKey, CtEntry> =
            BpfHashMap::try_from(Map::LruHashMap(data))?;
        let gone: Vec<CtKey> = ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, e)| {
                let (dir, pkt) = opener(k, e);
                !eval::evaluate(policy, roles, Some(&att.iface), dir, &pkt).passes()
            })
            .map(|(k, _)| k)
            .collect();
        for k in &gone {
            let _ = ct.remove(k); // may have expired, moved or been evicted meanwhile
        }
        pruned += gone.len();
    }
    Ok(pruned)
}

/// The attachment's update lock (one policy change at a time); held while
/// the file stays open.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(att: &Attachment) -> anyhow::Result<Lock> {
        let path = att.state.with_extension("update.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when it is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the attachment");
        }
        Ok(Lock { _file: f })
    }
}
