//! Swapping an attachment's policy without reloading or re-attaching its
//! programs: `segbpf reload`, `rollback`, `set`, the watcher of a running
//! `attach` and the guard's restore all come here.
//!
//! The new policy is parsed, validated and compiled first (a bad policy
//! changes nothing and says why). It is written into the policy slot not in
//! force, where no packet looks — only the entries that differ from what
//! that slot holds when it mirrors the policy in force (see
//! [`crate::attachment::delta`]), else the whole policy; then one atomic
//! u32 write (`SEG_ACTIVE`) switches every later packet to it whole — a
//! packet reads the slot once, so no packet is judged by a mix of old and
//! new rules. After a short grace period, connection-table entries of flows
//! the new policy does not allow are removed (the others survive), the old
//! slot is made the mirror of the new policy (the same delta), and counters
//! of rules that no longer exist are cleared (rules that still exist keep
//! their counter slots, so their counts carry over).
//!
//! Crash safety: the state of the new generation is written to
//! `IFACE.next.json` before the switch and renamed after it; a swap killed
//! at any point leaves the kernel on the old or the new policy, and the
//! next change reconciles the state file with the generation the kernel
//! runs ([`State::repair`], under the lock). Changes of one attachment are
//! serialised by its update lock.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use segbpf_common::{Counter, CtEntry, CtKey, IPPROTO_ICMP, IPPROTO_ICMPV6, MAP_RULE_STATS};
use serde::Serialize;

use crate::{
    attachment::delta::{self, Snapshot},
    attachment::guard::{self, GuardError},
    attachment::history,
    attachment::maps::{MapsError, PolicyMaps},
    attachment::pins::{Attachment, LockKind},
    attachment::setindex::{self, SetIndex},
    attachment::state::{State, StateError},
    attachment::trust::UntrustedFile,
    host::netif::{self, NetifError},
    host::phases::Phases,
    policy::compile::{self, Capacity, CompileError, Compiled},
    policy::{AddrRange, Direction, Policy, PolicyError, addr::parse_item, eval, roles},
};

/// Errors changing an attachment's policy. Every one of them leaves the
/// policy in force unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// Nothing to change.
    #[error("segbpf is not attached to {0}")]
    NotAttached(String),
    /// The update lock could not be taken.
    #[error("locking {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is unreadable.
    #[error("reading the attachment's state: {0}")]
    State(#[from] StateError),
    /// The policy file is writable or owned by someone other than root.
    #[error(transparent)]
    Untrusted(#[from] UntrustedFile),
    /// The policy does not parse or validate.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Live set edits that no longer parse.
    #[error("live set edit: set {set}: {member}: {reason}")]
    Override {
        /// Set.
        set: String,
        /// Member as stored.
        member: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The interface could not be asked for its addresses.
    #[error(transparent)]
    Interface(#[from] NetifError),
    /// The host's roles cannot be decided.
    #[error(transparent)]
    Roles(#[from] roles::RoleError),
    /// The policy does not fit the maps.
    #[error("{policy}: compiling for {iface}: {source}")]
    Compile {
        /// Policy file.
        policy: String,
        /// Interface.
        iface: String,
        /// Why.
        source: CompileError,
    },
    /// A map could not be read or written before the switch.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The next policy could not be written into the slot not in force
    /// (what was written was removed again).
    #[error(
        "{policy}: writing the next policy: {source}; nothing of it was left in the kernel, the policy in force is unchanged (a full map: see `--peer-entries` / `--port-entries` of `segbpf attach`, which need twice the entries of a policy)"
    )]
    Write {
        /// Policy file.
        policy: String,
        /// Why.
        source: Box<MapsError>,
    },
    /// The change was refused (a set edit that makes no sense, a pending
    /// confirmation, no earlier policy, ...).
    #[error("{0}")]
    Refused(String),
    /// The change would change nothing (no swap was made).
    #[error("{0}")]
    Unchanged(String),
    /// The lockout guard could not be armed.
    #[error(transparent)]
    Guard(#[from] Box<GuardError>),
}

/// Live set edits (set name → members as text), as the state keeps them.
pub type Overrides = BTreeMap<String, Vec<String>>;

/// The policy a swap applies.
#[derive(Clone, Debug)]
pub struct Choice {
    /// The file whose text is applied.
    pub text: PathBuf,
    /// The policy file the text stands for, when `text` is a copy (the
    /// history's, or the guard's): the state and the history name it, so
    /// `reload` and the watcher of `attach` go on with the operator's file.
    pub source: Option<PathBuf>,
    /// Live set edits applied over the file's sets.
    pub overrides: Overrides,
}

impl Choice {
    /// The text of `path`, standing for itself.
    pub fn file(path: PathBuf, overrides: Overrides) -> Self {
        Choice {
            text: path,
            source: None,
            overrides,
        }
    }

    /// The text of `copy`, standing for the policy file `source`.
    pub fn copy_of(copy: PathBuf, source: PathBuf, overrides: Overrides) -> Self {
        Choice {
            text: copy,
            source: Some(source),
            overrides,
        }
    }
}

/// What a reload should apply.
#[derive(Clone, Debug, Default)]
pub struct ReloadRequest {
    /// Policy file (default: the file in force).
    pub policy: Option<PathBuf>,
    /// Undo after SECS unless confirmed.
    pub confirm: Option<u64>,
    /// Supersede a change that waits for confirmation.
    pub force: bool,
    /// Work the roles out again from permanent addresses.
    pub redetect_roles: bool,
    /// Keep live set edits over the file's sets (default: the file wins).
    pub keep_set_edits: bool,
}

/// How an explicit change other than a reload (`set add|del`,
/// `rollback`) is let through: like `reload`, refused while a change waits
/// for confirmation or when it would cut the SSH session the command runs
/// in (the `ssh-session` lint), unless guarded or forced.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guarded {
    /// Undo after SECS unless confirmed.
    pub confirm: Option<u64>,
    /// Supersede a change that waits for confirmation, and apply a change
    /// that cuts the SSH session unguarded.
    pub force: bool,
}

impl Guarded {
    /// Runs the change `f` as `self` says: refused while another change
    /// waits for confirmation (unless forced), armed and its clock started
    /// when `--confirm`, the guard disarmed when it fails.
    pub fn run<T>(
        self,
        att: &Attachment,
        f: impl FnOnce() -> Result<T, SwapError>,
    ) -> Result<T, SwapError> {
        guard::refuse_while_pending(att, self.force).map_err(Box::new)?;
        if let Some(secs) = self.confirm {
            guard::arm_for_reload(att, secs).map_err(Box::new)?;
        }
        let out = f().inspect_err(|_| {
            if self.confirm.is_some() {
                guard::disarm(att);
            }
        })?;
        if self.force && self.confirm.is_none() {
            guard::after_forced(att);
        }
        if let Some(secs) = self.confirm {
            let generation = State::current(att)?.generation;
            guard::start_clock(att, generation, secs).map_err(Box::new)?;
        }
        Ok(out)
    }

    /// The lockout check of a change about to apply `choice` with `roles`:
    /// refused when it would cut the SSH session this process runs in
    /// ([`crate::attachment::trust::cuts_ssh_session`]), unless guarded or forced.
    /// A policy that does not load is left to the swap to report.
    pub fn refuse_lockout(
        self,
        att: &Attachment,
        choice: &Choice,
        roles: &[String],
        what: &str,
    ) -> Result<(), SwapError> {
        if self.force || self.confirm.is_some() {
            return Ok(());
        }
        // These changes keep the attachment's mode: in audit mode nothing
        // is enforced, so nothing can be cut.
        let audit = State::current(att).is_ok_and(|s| s.audit);
        self.refuse_lockout_in(att, choice, roles, what, audit)
    }

    /// [`Guarded::refuse_lockout`] for a caller that has read the state
    /// (`audit`: the attachment is in audit mode).
    pub fn refuse_lockout_in(
        self,
        att: &Attachment,
        choice: &Choice,
        roles: &[String],
        what: &str,
        audit: bool,
    ) -> Result<(), SwapError> {
        if self.force || self.confirm.is_some() || audit {
            return Ok(());
        }
        if !crate::attachment::trust::any_ssh_session() {
            // No SSH session, in the environment or in the kernel: nothing
            // to cut, nothing to parse.
            return Ok(());
        }
        let Ok(policy) = Policy::load_with_sets(&choice.text, &parse_overrides(&choice.overrides)?)
        else {
            return Ok(());
        };
        match crate::attachment::trust::cuts_ssh_session(&policy, roles, &att.iface) {
            Some(m) => Err(SwapError::Refused(format!(
                "{what}: refused: {m} [ssh-session]; nothing was changed (run it with --confirm SECS to apply it guarded, or --force)"
            ))),
            None => Ok(()),
        }
    }
}

/// What a swap applied: the policy now in force. Everything after the
/// switch that went wrong is in `warnings` (the change is in force anyway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Swapped {
    /// Interface.
    pub iface: String,
    /// The policy file applied, as given.
    pub policy: String,
    /// Generation now in force.
    pub generation: u64,
    /// The host's roles.
    pub roles: Vec<String>,
    /// Rules compiled for the host.
    pub rules: usize,
    /// Connection-table entries removed (flows the policy no longer allows).
    pub pruned: usize,
    /// Policy map entries written or deleted in the slot put in force: only
    /// those that change when the slots mirrored the policy in force,
    /// else the whole policy (see `crate::attachment::delta`).
    pub written: usize,
    /// What went wrong after the switch (state rename, history, prune,
    /// mirroring the new policy into the old slot, counters).
    pub warnings: Vec<String>,
}

impl fmt::Display for Swapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reloaded {} on {}: generation {} applied, roles {}, {} rules; {} connections no longer allowed were removed",
            self.policy,
            self.iface,
            self.generation,
            self.roles.join(","),
            self.rules,
            self.pruned
        )?;
        if !self.warnings.is_empty() {
            write!(f, " (warnings: {})", self.warnings.join("; "))?;
        }
        Ok(())
    }
}

/// What `rollback` restored: the history entry and the swap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RolledBack {
    /// Generation of the history entry restored.
    pub restored_generation: u64,
    /// The policy file that entry stands for.
    pub source: String,
    /// The swap that restored it (a new generation).
    #[serde(flatten)]
    pub swap: Swapped,
}

impl fmt::Display for RolledBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rolled back to the policy of generation {} ({}): {}",
            self.restored_generation, self.source, self.swap
        )
    }
}

/// `segbpf reload`: applies `req` (guarded when `req.confirm`). Refused
/// while a change waits for confirmation, unless `req.force`.
pub fn reload(att: &Attachment, req: &ReloadRequest) -> Result<Swapped, SwapError> {
    let guarded = Guarded {
        confirm: req.confirm,
        force: req.force,
    };
    guarded.run(att, || {
        swap_with(att, req.redetect_roles, |old| {
            let path = req
                .policy
                .clone()
                .unwrap_or_else(|| PathBuf::from(&old.policy));
            let overrides = if req.keep_set_edits {
                old.set_overrides.clone()
            } else {
                BTreeMap::new()
            };
            Ok(Choice::file(path, overrides))
        })
    })
}

/// `segbpf rollback`: the history entry before the one in force.
pub fn rollback(att: &Attachment) -> Result<RolledBack, SwapError> {
    let state = State::current(att)?;
    let Some(prev) = history::previous(att, state.generation) else {
        return Err(SwapError::Refused(format!(
            "no earlier policy in the history of {} (generation {} is the oldest kept)",
            att.describe(),
            state.generation
        )));
    };
    let swapped = swap(att, |_| {
        Ok(Choice::copy_of(
            prev.copy.clone(),
            PathBuf::from(&prev.source),
            prev.set_overrides.clone(),
        ))
    })?;
    Ok(RolledBack {
        restored_generation: prev.generation,
        source: prev.source,
        swap: swapped,
    })
}

/// Members in force of every set: the file's, with live edits applied.
pub fn sets_in_force(state: &State) -> Result<Overrides, SwapError> {
    let policy = Policy::load_with_sets(
        &PathBuf::from(&state.policy),
        &parse_overrides(&state.set_overrides)?,
    )?;
    Ok(policy
        .sets
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.ranges.iter().map(ToString::to_string).collect(),
            )
        })
        .collect())
}

/// A set edit worked out on the member list (pure: the interface and the
/// services attachments both use it and word the outcome themselves).
pub enum MemberEdit {
    /// The members after the edit and how many changed (at least one).
    Next(Vec<String>, usize),
    /// A member to remove is not in the set.
    NotMember(String),
    /// Nothing changes: the members, as written.
    Unchanged(String),
}

/// A set edit worked out on the member list without changing it: the
/// members named (as text), those an add appends, how many change.
pub struct MemberPlan {
    added: Vec<String>,
    changed: usize,
    /// The texts, for lookups (FxHash: 1,000,000 lookups with SipHash
    /// took about 15 ms).
    named: std::collections::HashSet<
        String,
        std::hash::BuildHasherDefault<crate::policy::compile::FastHasher>,
    >,
}

/// Works out adding (`add`) or removing `members` from `current` (one
/// pass over `current` that looks each member up among the few being
/// edited; no copy of the set's member strings: at 1,000,000 members a
/// hash set of copies took about 250 ms of a one-member edit). Err: the
/// edit is refused or changes nothing ([`MemberEdit`] says which).
pub fn plan_members(
    current: &[String],
    members: &[AddrRange],
    add: bool,
) -> Result<MemberPlan, MemberEdit> {
    use std::collections::HashSet;
    let texts: Vec<String> = members.iter().map(ToString::to_string).collect();
    // Each text being edited: is it in `current`?
    let mut present: crate::policy::compile::FastMap<&str, bool> =
        texts.iter().map(|t| (t.as_str(), false)).collect();
    for m in current {
        if let Some(p) = present.get_mut(m.as_str()) {
            *p = true;
        }
    }
    let mut changed = 0;
    let mut seen: HashSet<&str> = HashSet::with_capacity(texts.len());
    let mut added = Vec::new();
    for text in &texts {
        let first = seen.insert(text.as_str());
        let there = present.get(text.as_str()).copied().unwrap_or(false);
        if add {
            if first && !there {
                added.push(text.clone());
                changed += 1;
            }
        } else if first && there {
            changed += 1;
        } else {
            // Not in the set, or named twice (the first took it out).
            return Err(MemberEdit::NotMember(text.clone()));
        }
    }
    if changed == 0 {
        return Err(MemberEdit::Unchanged(texts.join(", ")));
    }
    let named = texts.into_iter().collect();
    Ok(MemberPlan {
        added,
        changed,
        named,
    })
}

impl MemberPlan {
    /// How many members change.
    pub fn changed(&self) -> usize {
        self.changed
    }

    /// Whether `member` (as listed) is one this removal takes out.
    pub fn removes(&self, member: &str) -> bool {
        self.named.contains(member)
    }

    /// The members after the edit (`current`: the list it was planned on).
    pub fn apply(self, mut current: Vec<String>, add: bool) -> Vec<String> {
        if add {
            current.extend(self.added);
        } else {
            current.retain(|m| !self.named.contains(m.as_str()));
        }
        current
    }
}

/// The members after adding (`add`) or removing `members` from `current`
/// ([`plan_members`], then [`MemberPlan::apply`]).
pub fn edit_members(current: Vec<String>, members: &[AddrRange], add: bool) -> MemberEdit {
    match plan_members(&current, members, add) {
        Ok(plan) => {
            let changed = plan.changed;
            MemberEdit::Next(plan.apply(current, add), changed)
        }
        Err(e) => e,
    }
}

/// The members of `set` after adding (`add`) or removing `members` from
/// `current`, and how many changed; refused when a member to remove is
/// not in the set, `Unchanged` when nothing changes.
fn next_members(
    att: &Attachment,
    state: &State,
    set: &str,
    current: Vec<String>,
    members: &[AddrRange],
    add: bool,
) -> Result<(Vec<String>, usize), SwapError> {
    match edit_members(current, members, add) {
        MemberEdit::Next(next, changed) => Ok((next, changed)),
        other => Err(member_refusal(att, state, set, other)),
    }
}

/// The error of a set edit that is refused or changes nothing.
fn member_refusal(att: &Attachment, state: &State, set: &str, e: MemberEdit) -> SwapError {
    match e {
        MemberEdit::NotMember(text) => SwapError::Refused(format!(
            "{text} is not a member of `{set}` (see `segbpf set list {} {set}`)",
            att.iface
        )),
        // Nothing to swap: no new generation for an edit that changes nothing.
        MemberEdit::Unchanged(listed) => SwapError::Unchanged(format!(
            "set `{set}` already has {listed}: nothing changed, generation {} stays in force",
            state.generation
        )),
        MemberEdit::Next(..) => SwapError::Refused(format!("set `{set}`: nothing to refuse")),
    }
}

/// `segbpf set add|del`: adds or removes `members` of `set` in force, as
/// one swap. Returns how many members changed and what the swap applied.
///
/// The edit is computed from the attachment's compact compiled form
/// ([`SetIndex`]) when it can be trusted and suffices (no parse, no
/// compile); else, and on any doubt, by parsing and compiling the policy
/// with the edit (the full path). Both write only the entries that change.
pub fn edit_set(
    att: &Attachment,
    set: &str,
    members: &[AddrRange],
    add: bool,
    guarded: Guarded,
) -> Result<(usize, Swapped), SwapError> {
    guarded.run(att, || {
        if !att.is_attached() {
            return Err(SwapError::NotAttached(att.describe()));
        }
        let mut phases = Phases::start("swap");
        let _lock = att
            .lock(LockKind::Update)
            .map_err(|source| SwapError::Lock {
                path: att.lock_path(LockKind::Update),
                source,
            })?;
        phases.mark("lock");
        let mut old = State::repair_head(att)?;
        phases.mark("read-state");
        let out = match fast_set_edit(att, &mut old, set, members, add, guarded, &mut phases) {
            Ok(Some(done)) => Ok(done),
            Ok(None) => full_set_edit(att, &old, set, members, add, guarded, &mut phases),
            Err(e) => Err(e),
        };
        phases.log();
        out
    })
}

/// A set edit by parsing and compiling the edited policy.
fn full_set_edit(
    att: &Attachment,
    state: &State,
    set: &str,
    members: &[AddrRange],
    add: bool,
    guarded: Guarded,
    phases: &mut Phases,
) -> Result<(usize, Swapped), SwapError> {
    // A set edited live before: its members in force are the state's (no
    // need to parse the file for them; the swap parses it once and fails
    // if the file no longer has the set).
    let current = if let Some(members) = state.set_overrides.get(set) {
        members.clone()
    } else {
        let mut sets = sets_in_force(state)?;
        let Some(current) = sets.remove(set) else {
            return Err(SwapError::Refused(format!(
                "{}: no set named `{set}` (sets: {})",
                state.policy,
                sets.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        current
    };
    let (next, changed) = next_members(att, state, set, current, members, add)?;
    let mut overrides = state.set_overrides.clone();
    overrides.insert(set.to_string(), next);
    let choice = Choice::file(PathBuf::from(&state.policy), overrides);
    guarded.refuse_lockout(att, &choice, &state.roles, &edit_what(att, set, add))?;
    phases.mark("choose");
    let swapped = swap_recorded(att, state, &Settings::default(), choice, phases)?;
    Ok((changed, swapped))
}

fn edit_what(att: &Attachment, set: &str, add: bool) -> String {
    format!(
        "set {} {set} on {}",
        if add { "add" } else { "del" },
        att.describe()
    )
}

/// A set edit from the compact compiled form: `Ok(None)` when it cannot be
/// used (nothing was changed; the caller takes the full path).
fn fast_set_edit(
    att: &Attachment,
    old: &mut State,
    set: &str,
    members: &[AddrRange],
    add: bool,
    guarded: Guarded,
    phases: &mut Phases,
) -> Result<Option<(usize, Swapped)>, SwapError> {
    let fallback = |why: &str| {
        tracing::debug!("set edit: the full path: {why}");
        Ok(None)
    };
    let path = PathBuf::from(&old.policy);
    if !old.insecure_policy {
        crate::attachment::trust::check_policy_file(&path)?;
    }
    phases.mark("trust");
    let Some(idx) = SetIndex::read(&att.set_index()) else {
        return fallback("no whole index");
    };
    phases.mark("read-index");
    if idx.generation != old.generation
        || idx.policy != old.policy
        || idx.roles != old.roles
        || idx.overrides_hash != old.overrides_hash()
    {
        return fallback("the index is not of the state in force");
    }
    match std::fs::read(&path) {
        Ok(text) if setindex::hash_policy(&text) == idx.policy_hash => {}
        _ => return fallback("the policy file changed since it was compiled"),
    }
    phases.mark("hash-policy");
    let maps = PolicyMaps::from_pins(att)?;
    let current = maps.active_slot()?;
    let next = 1 - current;
    let cfg = maps.config(current)?;
    phases.mark("open-maps");
    let Some(snap) = Snapshot::read(&att.snapshot()) else {
        return fallback("no snapshot");
    };
    phases.mark("read-snapshot");
    if cfg.generation != old.generation
        || snap.generation != old.generation
        || snap.map_id != maps.map_id()
        || idx.map_id != maps.map_id()
        || maps
            .config(next)
            .map_or(true, |c| c.generation != old.generation)
    {
        return fallback("the kernel's slots are not the snapshot's generation");
    }
    // The set's members in force: the state's when edited live (the index
    // does not keep those), else the index's.
    let mut idx = idx;
    let from_index = idx.sets.remove(set);
    let Some(current_members) = old.set_overrides.get(set).or(from_index.as_ref()) else {
        return fallback("no such set in the index");
    };
    let current_members: &[String] = current_members;
    let plan = plan_members(current_members, members, add)
        .map_err(|e| member_refusal(att, old, set, e))?;
    let changed = plan.changed();
    phases.mark("members");
    // The addresses whose rules change: an add's members as given; a
    // removal's less what the members left cover (one pass over them).
    let region = setindex::edit_region_of(
        members,
        (!add).then(|| {
            (current_members.iter().map(String::as_str), |m: &str| {
                plan.removes(m)
            })
        }),
    );
    phases.mark("region");
    // Adding members only allows more: it cannot cut a session, and
    // prunes no connection (no policy to check them against). A removal's
    // lockout check needs the members after the edit; it runs below.
    let live_others: Overrides = old
        .set_overrides
        .iter()
        .filter(|(name, _)| name.as_str() != set)
        .map(|(name, m)| (name.clone(), m.clone()))
        .collect();
    let by_region = match region.and_then(|r| idx.edit_region(&live_others, &snap, set, r, add)) {
        Ok(e) => e,
        Err(why) => return fallback(&why),
    };
    let edited = if let Some(e) = by_region {
        e
    } else {
        // The maps are not in the form the region edit needs: the
        // intervals of the whole maps.
        phases.mark("region-declined");
        let old_ranges = parse_members(set, current_members)?;
        let next_text = plan_members(current_members, members, add)
            .map_err(|e| member_refusal(att, old, set, e))?
            .apply(current_members.to_vec(), add);
        let next_ranges = parse_members(set, &next_text)?;
        match idx.edit(&live_others, &snap, set, &old_ranges, &next_ranges) {
            Ok(e) => e,
            Err(why) => return fallback(&why),
        }
    };
    phases.mark("edit-classes");
    // Past the last fallback: the list is moved out of the state read
    // (not copied), and the rest of that state is the new one's base.
    let current_owned = match old.set_overrides.get_mut(set) {
        Some(m) => std::mem::take(m),
        None => from_index.unwrap_or_default(),
    };
    let mut old_rest = old.clone();
    let next_text = plan.apply(current_owned, add);
    let mut overrides = live_others;
    overrides.insert(set.to_string(), next_text);
    phases.mark("members-next");
    if !add {
        // The check borrows the members for a moment (not a copy of
        // 1,000,000 of them); the prune takes them from the new state.
        let choice = Choice::file(path.clone(), overrides);
        guarded.refuse_lockout_in(
            att,
            &choice,
            &old.roles,
            &edit_what(att, set, add),
            old.audit,
        )?;
        overrides = choice.overrides;
    }
    phases.mark("choose");
    let generation = cfg.generation.max(old.generation) + 1;
    let c = delta::into_slot(
        Compiled {
            peers_v4: edited.peers_v4,
            peers_v6: edited.peers_v6,
            ports: edited.ports,
            config: segbpf_common::Config { generation, ..cfg },
            // The kernel writes need no rule descriptions (the state
            // keeps them): 10,000 of them are not copied for nothing.
            rules: Vec::new(),
            classes: edited.classes.len() as u32,
            class_rules: edited.classes,
        },
        next,
    );
    compile::check_capacity(&c, capacity_of(old)).map_err(|source| SwapError::Compile {
        policy: old.policy.clone(),
        iface: att.iface.clone(),
        source,
    })?;
    let mut index = idx;
    index.generation = generation;
    // (`overrides_hash`: set by the commit, from the state it writes.)
    index.classes.clone_from(&c.class_rules);
    old_rest.generation = generation;
    old_rest.entries = [c.peers_v4.len(), c.peers_v6.len(), c.ports.len()];
    old_rest.classes = c.classes;
    old_rest.set_overrides = overrides;
    let new = old_rest;
    // A removal's prune judges by the file with the new state's live set
    // edits: moved into its `Choice` by the commit once the state is
    // written (`prune_sets_of_new`), not copied.
    let prune = if add {
        Prune::Skip
    } else {
        Prune::Region(edited.region, Choice::file(path.clone(), BTreeMap::new()))
    };
    let result = commit(
        att,
        old,
        Commit {
            maps,
            current,
            c,
            in_force: Some(snap),
            new,
            index: Some(index),
            path: &path,
            policy_name: old.policy.clone(),
            prune,
            prune_sets_of_new: true,
            freed: Vec::new(),
        },
        phases,
    );
    record_outcome(att, result.as_ref().map(|_| ()));
    result.map(|s| Some((changed, s)))
}

/// Time given to packets that read the old slot before the switch to
/// finish their lookups (programs run for microseconds).
const GRACE: Duration = Duration::from_millis(5);

/// Replaces the policy of `att` with the one in `policy` (default: the
/// attachment's current file), dropping live set edits (the file wins),
/// and works the roles out again when `redetect` (see [`swap_with`]).
/// Returns what was applied (its `Display` is a one-line summary).
pub fn reload_with(
    att: &Attachment,
    policy: Option<&Path>,
    redetect: bool,
) -> Result<Swapped, SwapError> {
    swap_with(att, redetect, |old| {
        let path = policy.map_or_else(|| PathBuf::from(&old.policy), Path::to_path_buf);
        Ok(Choice::file(path, BTreeMap::new()))
    })
}

/// Reloads `att`'s current file keeping its live set edits (the automatic
/// reloads of a running `attach`: a file change must not silently undo a
/// `segbpf set`). Edits of sets the file no longer has fail the reload.
pub fn reload_keeping_sets(att: &Attachment) -> Result<Swapped, SwapError> {
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
        Ok(Choice::file(
            PathBuf::from(&old.policy),
            old.set_overrides.clone(),
        ))
    })
}

/// Live set overrides as the state file stores them (text) and as the
/// parser takes them (ranges).
pub fn parse_overrides(text: &Overrides) -> Result<BTreeMap<String, Vec<AddrRange>>, SwapError> {
    text.iter()
        .map(|(set, members)| Ok((set.clone(), parse_members(set, members)?)))
        .collect()
}

/// The members of one set as written (live set edits), parsed.
fn parse_members(set: &str, members: &[String]) -> Result<Vec<AddrRange>, SwapError> {
    members
        .iter()
        .map(|m| {
            parse_item(m).map_err(|e| SwapError::Override {
                set: set.to_string(),
                member: m.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Swaps in the policy that `choose` picks from the current state: a file
/// (or a copy standing for one) and live set overrides. Under the attachment's update lock.
pub fn swap(
    att: &Attachment,
    choose: impl FnOnce(&State) -> Result<Choice, SwapError>,
) -> Result<Swapped, SwapError> {
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
    choose: impl FnOnce(&State) -> Result<Choice, SwapError>,
) -> Result<Swapped, SwapError> {
    swap_choosing(att, |old| {
        Ok((
            choose(old)?,
            Settings {
                redetect,
                ..Settings::default()
            },
        ))
    })
}

/// Like [`swap`], with the [`Settings`] chosen from the state too (a
/// rollback puts back the roles of the generation it restores).
pub fn swap_choosing(
    att: &Attachment,
    choose: impl FnOnce(&State) -> Result<(Choice, Settings), SwapError>,
) -> Result<Swapped, SwapError> {
    if !att.is_attached() {
        return Err(SwapError::NotAttached(att.describe()));
    }
    let mut phases = Phases::start("swap");
    let _lock = att
        .lock(LockKind::Update)
        .map_err(|source| SwapError::Lock {
            path: att.lock_path(LockKind::Update),
            source,
        })?;
    phases.mark("lock");
    let old = State::repair_head(att)?;
    phases.mark("read-state");
    let (choice, settings) = choose(&old)?;
    phases.mark("choose");
    let out = swap_recorded(att, &old, &settings, choice, &mut phases);
    phases.log();
    out
}

/// What a swap may change besides the policy (the defaults keep
/// everything as it is).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Work the auto-detected roles out again from permanent addresses.
    pub redetect: bool,
    /// New `--role` arguments (`None`: keep the roles in force).
    pub roles: Option<Vec<String>>,
    /// Audit mode (`None`: keep).
    pub audit: Option<bool>,
    /// Event burst (`None`: keep).
    pub log_burst: Option<u32>,
    /// Flow accounting (`None`: keep).
    pub flow_acct: Option<bool>,
    /// Roles and `--role` arguments put back as they were (the guard's
    /// restore): the roles are checked against the policy, never worked
    /// out again (`None`: as `redetect` and `roles` say).
    pub exact_roles: Option<(Vec<String>, Vec<String>)>,
}

/// Puts back the whole state `prev` that was in force before a guarded
/// change: the policy text in `choice`, its live set edits, the roles and
/// `--role` arguments exactly as they were (not the roles of the change,
/// which the old policy may not know), audit mode, event burst and flow
/// accounting. Under the attachment's update lock.
pub fn restore(att: &Attachment, choice: Choice, prev: &State) -> Result<Swapped, SwapError> {
    let settings = Settings {
        exact_roles: Some((prev.roles.clone(), prev.role_args.clone())),
        audit: Some(prev.audit),
        log_burst: Some(prev.log_burst),
        flow_acct: Some(prev.flow_acct),
        ..Settings::default()
    };
    swap_choosing(att, |_| Ok((choice, settings)))
}

/// The outcome of the last policy change, kept next to the state
/// (`IFACE.reload.json`) for the metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LastChange {
    /// Unix time of the attempt.
    pub at: u64,
    /// Whether it was applied.
    pub ok: bool,
    /// Why not, if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LastChange {
    /// The attachment's last change, if any was recorded.
    pub fn read(att: &Attachment) -> Option<LastChange> {
        let text = std::fs::read_to_string(att.last_change()).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The swap itself, for a caller that holds the update lock and has read
/// (and repaired) the state `old`. Its outcome is recorded for the metrics.
pub fn swap_locked(
    att: &Attachment,
    old: &State,
    settings: &Settings,
    choice: Choice,
) -> Result<Swapped, SwapError> {
    let mut phases = Phases::start("swap");
    let out = swap_recorded(att, old, settings, choice, &mut phases);
    phases.log();
    out
}

fn swap_recorded(
    att: &Attachment,
    old: &State,
    settings: &Settings,
    choice: Choice,
    phases: &mut Phases,
) -> Result<Swapped, SwapError> {
    let result = swap_in_force(att, old, settings, choice, phases);
    record_outcome(att, result.as_ref().map(|_| ()));
    phases.mark("record-outcome");
    result
}

/// Records the outcome of a change for the metrics (`IFACE.reload.json`).
fn record_outcome(att: &Attachment, result: Result<(), &SwapError>) {
    let record = LastChange {
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ok: result.is_ok(),
        error: result.err().map(ToString::to_string),
    };
    let path = att.last_change();
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec(&record)
        .map_err(std::io::Error::from)
        .and_then(|t| std::fs::write(&tmp, t))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::debug!("recording the outcome in {}: {e}", path.display());
    }
}

/// The map capacities of the attachment `old` describes.
fn capacity_of(old: &State) -> Capacity {
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
    capacity
}

fn swap_in_force(
    att: &Attachment,
    old: &State,
    settings: &Settings,
    choice: Choice,
    phases: &mut Phases,
) -> Result<Swapped, SwapError> {
    // The rules in force (for their counters) are read from their file on
    // a second thread while this one parses and compiles: both are about
    // allocation-bound CPU, and a reload's wall time is their sum on one.
    std::thread::scope(|scope| {
        let previous = scope.spawn(|| previous_rules(att, old));
        compile_in_force(att, old, settings, choice, phases, move || {
            previous
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// The state in force with its rules read from their file, and whether
/// they could be (see `compile_in_force`).
fn previous_rules(att: &Attachment, old: &State) -> (State, bool) {
    let mut previous = old.clone();
    match previous.load_rules(&att.state) {
        Ok(()) => (previous, true),
        Err(e) => {
            tracing::warn!("{e}: the rule counters start again from zero");
            previous.rules.clear();
            (previous, false)
        }
    }
}

fn compile_in_force(
    att: &Attachment,
    old: &State,
    settings: &Settings,
    choice: Choice,
    phases: &mut Phases,
    previous_rules: impl FnOnce() -> (State, bool),
) -> Result<Swapped, SwapError> {
    let redetect = settings.redetect;
    let Choice {
        text: path,
        source,
        overrides,
    } = choice;

    // Everything that depends on input first: nothing in the kernel yet.
    if !old.insecure_policy {
        crate::attachment::trust::check_policy_file(&path)?;
    }
    phases.mark("trust");
    let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
    let policy_hash = setindex::hash_policy(text.as_bytes());
    let policy = crate::policy::parse::parse_str_with_sets(
        &text,
        &path.display().to_string(),
        &parse_overrides(&overrides)?,
    )?;
    drop(text);
    phases.mark("parse");
    let role_args = match &settings.exact_roles {
        Some((_, args)) => args.clone(),
        None => settings
            .roles
            .clone()
            .unwrap_or_else(|| old.role_args.clone()),
    };
    // The role names given (this change's, or those in force), or none:
    // then the roles follow the interface's permanent addresses again.
    let (names, detect): (&[String], bool) = if let Some((exact, _)) = &settings.exact_roles {
        (exact, false)
    } else if let Some(explicit) = settings.roles.as_ref().filter(|r| !r.is_empty()) {
        (explicit, false)
    } else if settings.roles.is_some() || (redetect && old.role_args.is_empty()) {
        (&[], true)
    } else if redetect {
        (&old.role_args, false)
    } else {
        (&old.roles, false)
    };
    let addrs = if detect {
        netif::permanent_addresses(&att.iface)?
    } else {
        Vec::new()
    };
    let roles = roles::resolve(&policy, names, &att.iface, &addrs)?;
    let roles_changed = roles != old.roles;
    if roles_changed {
        tracing::warn!(
            "roles of {} change from {} to {}",
            att.iface,
            old.roles.join(","),
            roles.join(",")
        );
    }
    phases.mark("roles");
    let maps = PolicyMaps::from_pins(att)?;
    let current = maps.active_slot()?;
    phases.mark("open-maps");
    let next = 1 - current;
    let generation = maps.config(current)?.generation.max(old.generation) + 1;
    let capacity = capacity_of(old);
    let mut c = compile::compile(
        &policy,
        &roles,
        Some(&att.iface),
        next,
        generation,
        capacity,
    )
    .map_err(|source| SwapError::Compile {
        policy: policy.source.clone(),
        iface: att.iface.clone(),
        source,
    })?;
    let audit = settings.audit.unwrap_or(old.audit);
    let log_burst = settings.log_burst.unwrap_or(old.log_burst).max(1);
    c.config.audit = u8::from(audit);
    let flow_acct = settings.flow_acct.unwrap_or(old.flow_acct);
    c.config.flow_acct = u8::from(flow_acct);
    c.config.log_burst = log_burst;
    phases.mark("compile");
    // The rules in force, for their counters: read from their file only
    // here (a set edit without compile needs none). A rules file that does
    // not match its state names no rule: every rule then takes a fresh
    // slot and every slot is zeroed once the new policy is in force, so no
    // rule inherits counts it did not make.
    let (previous, known) = previous_rules();
    let mut freed =
        compile::carry_counters(&mut c, &previous.rules, old.rule_slots).map_err(|source| {
            SwapError::Compile {
                policy: policy.source.clone(),
                iface: att.iface.clone(),
                source,
            }
        })?;
    if !known {
        freed = (0..old.rule_slots).collect();
    }

    phases.mark("carry-counters");
    let new = State {
        policy: source.as_ref().map_or_else(
            || {
                std::fs::canonicalize(&path)
                    .unwrap_or_else(|_| path.clone())
                    .display()
                    .to_string()
            },
            |s| s.display().to_string(),
        ),
        roles: roles.clone(),
        generation,
        entries: [c.peers_v4.len(), c.peers_v6.len(), c.ports.len()],
        classes: c.classes,
        rules: c.rules.clone(),
        rules_file: None,
        set_overrides: overrides.clone(),
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
        role_args,
        audit,
        flow_acct,
        log_rate: c.config.log_rate,
        log_burst,
        ..old.clone()
    };
    let index = SetIndex::build(
        &policy,
        &new.policy,
        policy_hash,
        &overrides,
        &roles,
        &c,
        maps.map_id(),
    );
    let in_force = Snapshot::read(&att.snapshot());
    commit(
        att,
        old,
        Commit {
            maps,
            current,
            c,
            in_force,
            new,
            index: Some(index),
            path: &path,
            policy_name: policy.source.clone(),
            prune: Prune::All(&policy),
            prune_sets_of_new: false,
            freed,
        },
        phases,
    )
}

/// Where the old policy's connections are judged after a swap.
enum Prune<'a> {
    /// Every connection of the interface, by this policy.
    All(&'a Policy),
    /// None: the change only allows more (a set grows).
    Skip,
    /// Connections whose peer is in these ranges (IPv4, IPv6; the only
    /// addresses whose rules changed), by the policy `Choice` (parsed only
    /// when there are such connections).
    Region([Vec<(u128, u128)>; 2], Choice),
}

/// A compiled policy ready to be put in force.
struct Commit<'a> {
    maps: PolicyMaps,
    /// The slot in force.
    current: u8,
    /// The next policy, keys in the other slot.
    c: Compiled,
    /// What the slot in force holds, if known (trusted only when the
    /// kernel agrees).
    in_force: Option<Snapshot>,
    /// The state of the next generation.
    new: State,
    /// The compact compiled form of the next generation.
    index: Option<SetIndex>,
    /// The policy text applied (for the history).
    path: &'a Path,
    /// The policy as errors and the result name it.
    policy_name: String,
    prune: Prune<'a>,
    /// The prune's `Choice` takes the live set edits of `new` (see
    /// [`fast_set_edit`]).
    prune_sets_of_new: bool,
    /// Counter slots to zero once in force.
    freed: Vec<u32>,
}

/// Writes `k.c` into the slot not in force (its delta from the mirror, or
/// whole), records the pending state, flips, then prunes, mirrors and
/// clears counters.
fn commit(
    att: &Attachment,
    old: &State,
    k: Commit<'_>,
    phases: &mut Phases,
) -> Result<Swapped, SwapError> {
    let Commit {
        mut maps,
        current,
        c,
        in_force,
        mut new,
        index,
        path,
        policy_name,
        prune,
        prune_sets_of_new,
        freed,
    } = k;
    let next = 1 - current;
    let generation = new.generation;
    let roles = new.roles.clone();
    // Fill the slot no packet looks at, record the new state as pending,
    // then switch. When the slots mirror the policy in force (see
    // `crate::attachment::delta`), only the entries that change are written; else the
    // slot is emptied (leftovers of a swap that was killed) and written whole.
    let in_force = in_force.filter(|s| {
        s.generation != 0
            && s.map_id == maps.map_id()
            && maps
                .config(current)
                .is_ok_and(|cfg| cfg.generation == s.generation)
    });
    let mirrored = in_force.as_ref().is_some_and(|s| {
        maps.config(next)
            .is_ok_and(|cfg| cfg.generation == s.generation)
    });
    let delta = in_force.as_ref().map(|s| delta::diff(s, &c));
    phases.mark("diff");
    let written = maps.invalidate(next).and_then(|()| match &delta {
        Some(d) if mirrored => {
            let n = maps.apply_delta(next, d, &c.ports)?;
            maps.set_config(next, c.config)?;
            Ok(n)
        }
        _ => {
            maps.clear_slot(next)?;
            maps.write_slot(&c)?;
            Ok(c.peers_v4.len() + c.peers_v6.len() + c.ports.len())
        }
    });
    let written = match written {
        Ok(n) => n,
        Err(e) => {
            // A map refused an entry (full: a policy in force from a version
            // that did not keep room for both slots, or a kernel that ran
            // out of memory). Leave no half-written slot behind: the policy
            // in force stays whole in the kernel (the emptied slot is no
            // mirror: the next swap writes it whole).
            if let Err(undo) = maps.clear_slot(next) {
                tracing::warn!("emptying the partly written policy slot: {undo}");
            }
            return Err(SwapError::Write {
                policy: policy_name.clone(),
                source: Box::new(e),
            });
        }
    };
    phases.mark(if mirrored && delta.is_some() {
        "write-delta"
    } else {
        "write-whole"
    });
    // The pending state and, on a second thread, what the slot about to
    // be in force holds (both written whole: at 1,000,000 members about
    // 20 ms each). A snapshot that never comes into force (a failed
    // switch, a pending state that could not be written) names a
    // generation the kernel does not run, and is ignored.
    let map_id = maps.map_id();
    let (pending, snapshot) = std::thread::scope(|s| {
        let snapshot =
            s.spawn(|| delta::write_bytes(&att.snapshot(), &delta::snapshot_bytes(&c, map_id)));
        let pending = new.write(&att.next_state());
        (pending, snapshot.join())
    });
    match snapshot {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            "recording the policy slot in {}: {e} (the next change writes the policy whole)",
            att.snapshot().display()
        ),
        Err(_) => tracing::warn!(
            "recording the policy slot in {} failed (the next change writes the policy whole)",
            att.snapshot().display()
        ),
    }
    pending?;
    let mut index = index;
    if let Some(index) = &mut index {
        // The live set edits compiled in, by the hash their file was
        // named with (or of the inline ones): what the next edit checks.
        index.overrides_hash = new.overrides_hash();
    }
    phases.mark("write-pending-state+snapshot");
    if let Some(index) = &index
        && let Err(e) = index.write(&att.set_index())
    {
        tracing::warn!(
            "recording the compact policy in {}: {e} (the next set edit compiles the policy)",
            att.set_index().display()
        );
    }
    phases.mark("write-index");
    maps.activate(next)?;
    let flipped = std::time::Instant::now();
    phases.mark("flip");

    // The new policy is in force: nothing after this point is a failure
    // (the caller would undo a guard or report a change that happened).
    // What goes wrong is a warning in the result.
    let mut warnings = Vec::new();
    let mut warn = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!("{what}: {e}");
        warnings.push(format!("{what}: {e}"));
    };
    if let Err(e) = std::fs::rename(att.next_state(), &att.state) {
        // State::current still finds the pending file (its generation is live).
        warn(
            &format!("renaming the state to {}", att.state.display()),
            &e,
        );
    } else {
        // The rules files of earlier generations (and of changes killed
        // before their switch) go; the state in force names its own.
        crate::attachment::state::prune_rules(&att.state, new.rules_file);
        crate::attachment::state::prune_live(&att.state, new.live_file);
    }
    if let Err(e) = history::record(
        att,
        generation,
        path,
        Path::new(&new.policy),
        &new.set_overrides,
        new.live_file.map(|r| {
            (
                crate::attachment::pins::live_path(&att.state, r.hash),
                r.hash,
            )
        }),
        history::Roles {
            roles: new.roles.clone(),
            role_args: new.role_args.clone(),
        },
    ) {
        warn("policy history not updated", &e);
    }
    phases.mark("rename-state+history");
    // Let packets that read the old slot finish, prune the connections the
    // new policy would not open (including any opened in that window), and
    // only then touch the old slot. The grace period runs from the flip:
    // the state rename and the history above already took part of it.
    std::thread::sleep(GRACE.saturating_sub(flipped.elapsed()));
    phases.mark("grace");
    let prune = match prune {
        Prune::Region(region, mut choice) if prune_sets_of_new => {
            choice.overrides = std::mem::take(&mut new.set_overrides);
            Prune::Region(region, choice)
        }
        other => other,
    };
    let pruned = prune_conntrack(att, old.ifindex, prune, &roles).unwrap_or_else(|e| {
        warn("pruning the connection table", &e);
        0
    });
    phases.mark("prune-ct");
    // The old slot becomes the mirror of the new policy: the same delta
    // when it held the snapshot's policy, else emptied and written whole.
    let mirror = maps.invalidate(current).and_then(|()| {
        if let Some(d) = &delta {
            maps.apply_delta(current, d, &c.ports)?;
            maps.set_config(
                current,
                segbpf_common::Config {
                    active_slot: current,
                    ..c.config
                },
            )
        } else {
            maps.clear_slot(current)?;
            maps.write_slot(&delta::moved(&c, current))
        }
    });
    if let Err(e) = mirror {
        warn("mirroring the policy into the previous slot", &e);
        if let Err(e) = maps.clear_slot(current) {
            warn("emptying the previous policy slot", &e);
        }
    }
    phases.mark("mirror-old-slot");
    if let Err(e) = clear_counters(att, &freed) {
        warn("zeroing unused rule counters", &e);
    }
    phases.mark("clear-counters");
    Ok(Swapped {
        iface: att.iface.clone(),
        policy: policy_name,
        generation,
        roles,
        rules: new.rule_count(),
        pruned,
        written,
        warnings,
    })
}

/// Zeroes the per-rule counters of slots no rule uses any more.
fn clear_counters(att: &Attachment, slots: &[u32]) -> Result<(), MapsError> {
    if slots.is_empty() {
        return Ok(());
    }
    let err = |source| MapsError::Map {
        map: MAP_RULE_STATS,
        source,
    };
    let data = MapData::from_pin(att.map(MAP_RULE_STATS)).map_err(err)?;
    let mut arr: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(err)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
        err(aya::maps::MapError::from(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        }))
    })?;
    for &slot in slots {
        let zero = PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(|e| {
            err(aya::maps::MapError::from(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            }))
        })?;
        arr.set(slot, zero, 0).map_err(err)?;
    }
    Ok(())
}

/// The packet that opened a tracked flow, for the reference evaluator.
fn opener(k: &CtKey, e: &CtEntry) -> (Direction, eval::Packet) {
    let addr = |b| crate::host::proto::ip_from(k.family, b);
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

/// Removes the connection-table entries (assured and half-open) of the
/// interface `ifindex` whose flows the new policy would not let open
/// (the tables are shared with the namespace's other attachments, whose
/// entries this policy does not judge); returns how many. `prune` says
/// which entries can have changed and by what policy they are judged.
fn prune_conntrack(
    att: &Attachment,
    ifindex: u32,
    prune: Prune<'_>,
    roles: &[String],
) -> Result<usize, MapsError> {
    let (region, choice, mut policy) = match prune {
        Prune::Skip => return Ok(0),
        Prune::All(p) => (None, None, Some(std::borrow::Cow::Borrowed(p))),
        Prune::Region(r, c) => (Some(r), Some(c), None),
    };
    let in_region = |k: &CtKey| {
        let Some(region) = &region else {
            return true;
        };
        let (ranges, addr) = if k.family == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&k.remote[..4]);
            (&region[0], u128::from(u32::from_be_bytes(b)))
        } else {
            (&region[1], u128::from_be_bytes(k.remote))
        };
        ranges.iter().any(|&(s, e)| s <= addr && addr <= e)
    };
    let mut pruned = 0;
    // Both families' tables (`crate::attachment::cttables`).
    for (t, entries) in crate::attachment::cttables::read_all_pinned(att)? {
        let judged: Vec<(CtKey, CtEntry)> = entries
            .into_iter()
            .filter(|(k, _)| k.ifindex == ifindex && in_region(k))
            .collect();
        if judged.is_empty() {
            continue;
        }
        if policy.is_none() {
            // Connections whose rules changed: judged by the whole policy.
            let Some(choice) = &choice else { continue };
            let overrides =
                parse_overrides(&choice.overrides).map_err(|e| MapsError::Judge(e.to_string()))?;
            let p = Policy::load_with_sets(&choice.text, &overrides)
                .map_err(|e| MapsError::Judge(e.to_string()))?;
            policy = Some(std::borrow::Cow::Owned(p));
        }
        let Some(policy) = policy.as_deref() else {
            continue;
        };
        let gone: Vec<CtKey> = judged
            .into_iter()
            .filter(|(k, e)| {
                let (dir, pkt) = opener(k, e);
                !eval::evaluate(policy, roles, Some(&att.iface), dir, &pkt).passes()
            })
            .map(|(k, _)| k)
            .collect();
        // An entry may have expired, moved or been evicted meanwhile.
        crate::attachment::cttables::remove_pinned(att, t, &gone)?;
        pruned += gone.len();
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The member edit as it was written before (a hash set of copies of
    /// every member): the reference for [`edit_members`].
    fn edit_members_reference(
        current: Vec<String>,
        members: &[AddrRange],
        add: bool,
    ) -> MemberEdit {
        let mut changed = 0;
        let mut next = current;
        let mut present: std::collections::HashSet<String> = next.iter().cloned().collect();
        let mut removed = std::collections::HashSet::new();
        for m in members {
            let text = m.to_string();
            if add {
                if present.insert(text.clone()) {
                    next.push(text);
                    changed += 1;
                }
            } else if present.remove(&text) {
                removed.insert(text);
                changed += 1;
            } else {
                return MemberEdit::NotMember(text);
            }
        }
        if changed == 0 {
            let all: Vec<String> = members.iter().map(ToString::to_string).collect();
            return MemberEdit::Unchanged(all.join(", "));
        }
        next.retain(|m| !removed.contains(m));
        MemberEdit::Next(next, changed)
    }

    fn edit_outcome(e: MemberEdit) -> (u8, Vec<String>, usize) {
        match e {
            MemberEdit::Next(next, n) => (0, next, n),
            MemberEdit::NotMember(t) => (1, vec![t], 0),
            MemberEdit::Unchanged(t) => (2, vec![t], 0),
        }
    }

    #[test]
    fn member_edits_equal_the_reference_with_duplicates_and_misses() {
        // A small address space, so that edits hit members, miss them and
        // name one address twice; a fixed-seed generator (xorshift).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let addr = |i: u64| format!("198.18.7.{i}");
        let (mut nexts, mut misses, mut unchanged) = (0, 0, 0);
        for _ in 0..2000 {
            let current: Vec<String> = (0..rnd(12)).map(|_| addr(rnd(16))).collect();
            let members: Vec<AddrRange> = (0..=rnd(4))
                .map(|_| parse_item(&addr(rnd(16))).expect("an address"))
                .collect();
            for add in [true, false] {
                let want = edit_outcome(edit_members_reference(current.clone(), &members, add));
                let got = edit_outcome(edit_members(current.clone(), &members, add));
                assert_eq!(
                    got, want,
                    "current {current:?} members {members:?} add {add}"
                );
                match want.0 {
                    0 => nexts += 1,
                    1 => misses += 1,
                    _ => unchanged += 1,
                }
            }
        }
        assert!(
            nexts > 100 && misses > 100 && unchanged > 100,
            "{nexts} {misses} {unchanged}"
        );
    }

    #[test]
    fn summaries_read_as_before() {
        let mut s = Swapped {
            iface: "eth1".into(),
            policy: "/etc/segbpf/roles.toml".into(),
            generation: 3,
            roles: vec!["db".into(), "web".into()],
            rules: 9,
            pruned: 2,
            written: 4,
            warnings: Vec::new(),
        };
        assert_eq!(
            s.to_string(),
            "reloaded /etc/segbpf/roles.toml on eth1: generation 3 applied, roles db,web, 9 rules; 2 connections no longer allowed were removed"
        );
        s.warnings = vec!["a: x".into(), "b: y".into()];
        assert!(
            s.to_string()
                .ends_with("were removed (warnings: a: x; b: y)")
        );
        let r = RolledBack {
            restored_generation: 2,
            source: "/etc/segbpf/roles.toml".into(),
            swap: s,
        };
        assert!(r.to_string().starts_with(
            "rolled back to the policy of generation 2 (/etc/segbpf/roles.toml): reloaded "
        ));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["restored_generation"], 2);
        assert_eq!(v["generation"], 3);
        assert_eq!(v["warnings"][1], "b: y");
    }
}
