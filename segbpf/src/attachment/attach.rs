//! Attaching segbpf to an interface, and removing it again.
//!
//! [`apply`] validates and compiles the policy, loads the programs, fills
//! their maps, pins programs, maps and links under bpffs and attaches TC
//! egress then XDP ingress. Everything that can fail on bad input (policy,
//! interface, roles, capacity) is checked before the kernel is touched; a
//! failure after that removes whatever was pinned, so nothing is left
//! half-applied. The whole attach runs under the attachment's update lock:
//! of two attaches of one (namespace, interface) at once, exactly one
//! attaches and the other reports that it is attached.
//!
//! [`detach`] removes it the same way for `segbpf detach` and for the
//! guard undoing an unconfirmed first attach.

use std::{path::PathBuf, time::Duration};

use aya::{
    programs::{TcAttachType, XdpMode, links::FdLink, tc},
    util::KernelVersion,
};
use tracing::{info, warn};

use crate::{
    attachment::guard::{self, GuardError},
    attachment::history,
    attachment::loader,
    attachment::maps::{self, MapsError},
    attachment::pins::{self, Attachment, LockKind, PinsError},
    attachment::state::{State, StateError},
    attachment::swap,
    attachment::trust::{self, UntrustedFile},
    host::netif::{self, NetifError},
    host::netns::Netns,
    policy::compile::{self, Capacity, CompileError},
    policy::{Policy, PolicyError, roles},
};

/// Errors attaching or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The policy file is writable or owned by someone other than root.
    #[error(transparent)]
    Untrusted(#[from] UntrustedFile),
    /// The policy does not parse or validate.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The interface is missing or of a type segbpf cannot parse.
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
    /// The pin root cannot be used from here.
    #[error(transparent)]
    Pins(#[from] PinsError),
    /// The programs could not be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// A map could not be written or pinned.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The kernel refused a program, link or pin.
    #[error("{what}: {source}")]
    Kernel {
        /// What was attempted.
        what: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file could not be written or removed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The lockout guard could not be armed.
    #[error(transparent)]
    Guard(#[from] Box<GuardError>),
    /// Adopting a live attachment: its policy could not be swapped (the
    /// policy in force is unchanged).
    #[error(transparent)]
    Swap(#[from] swap::SwapError),
}

fn kernel<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> AttachError {
    let what = what.into();
    move |e| AttachError::Kernel {
        what,
        source: Box::new(e),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AttachError {
    let what = what.into();
    move |source| AttachError::Io { what, source }
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Native (driver) mode when the driver supports it, else generic (skb).
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
}

/// What to attach, and how.
#[derive(Clone, Debug)]
pub struct Request {
    /// Interface to protect.
    pub iface: String,
    /// Policy file.
    pub policy: PathBuf,
    /// Roles given explicitly (empty: from the interface's addresses).
    pub roles: Vec<String>,
    /// XDP attach mode.
    pub mode: Mode,
    /// Connection-table capacity.
    pub ct_size: u32,
    /// Audit mode: nothing enforced, would-be drops reported.
    pub audit: bool,
    /// Event burst (default: the policy's `log_rate`).
    pub log_burst: Option<u32>,
    /// Seconds after which an unconfirmed attach is undone.
    pub confirm: Option<u64>,
    /// Capacity of each peer trie.
    pub peer_entries: u32,
    /// Capacity of the port trie.
    pub port_entries: u32,
    /// Accept a policy file others can write.
    pub insecure_policy: bool,
    /// Flow accounting in the connection table (`--flow-log on|off`).
    pub flow_acct: bool,
}

/// An attach that happened.
#[derive(Debug)]
pub struct Applied {
    /// The attachment.
    pub att: Attachment,
    /// One line for people.
    pub summary: String,
}

/// Attaches segbpf to `req.iface` in the namespace `ns` (the caller's).
pub fn apply(req: &Request, ns: &Netns) -> Result<Applied, AttachError> {
    let mut phases = crate::host::phases::Phases::start("attach");
    let out = apply_timed(req, ns, &mut phases);
    phases.log();
    out
}

fn apply_timed(
    req: &Request,
    ns: &Netns,
    phases: &mut crate::host::phases::Phases,
) -> Result<Applied, AttachError> {
    // 1. Everything that depends only on input: no kernel change yet.
    if !req.insecure_policy {
        crate::attachment::trust::check_policy_file(&req.policy)?;
    }
    // The text is read once: its hash names what was compiled (the
    // compact form for set edits, `crate::attachment::setindex`).
    let text = std::fs::read_to_string(&req.policy).map_err(|e| PolicyError::io(&req.policy, e))?;
    let policy_hash = crate::attachment::setindex::hash_policy(text.as_bytes());
    let policy = crate::policy::parse::parse_str(&text, &req.policy.display().to_string())?;
    drop(text);
    phases.mark("parse");
    // Identify: the kernel is asked once; the steps below use this value.
    // The device type decides where packets start; refuse what we cannot parse.
    let id = netif::identify(&req.iface)?;
    let (ifindex, link) = (id.ifindex, id.link);
    // The IPv4 connection tables hold 24 bits of the index: refused here,
    // before anything changes.
    loader::check_ifindex(&req.iface, ifindex)?;

    // 2. One attach (or change) of this attachment at a time. A live
    //    attachment is adopted: restarting `attach` (a crash, `kill -9`, a
    //    service restart) never leaves a moment without enforcement.
    let roots = pins::Roots::from_env();
    roots.check_visible()?;
    crate::attachment::gone::prune(&roots, ns);
    let att = roots.attachment(&req.iface, ns);
    let _lock = take_update_lock(&att).map_err(io(format!(
        "locking {}",
        att.lock_path(LockKind::Update).display()
    )))?;
    if att.is_attached() {
        match State::repair(&att) {
            Ok(old) if old.ifindex == ifindex => {
                // Pins say nothing about the kernel: a link detached by
                // another tool is attached again before anything else.
                let relinked = relink_dead(&att, &old)?;
                let mut applied = adopt(req, &att, &old, &policy)?;
                if !relinked.is_empty() {
                    applied.summary = format!("{}; {}", relinked.join("; "), applied.summary);
                }
                return Ok(applied);
            }
            Ok(old) => warn!(
                "{} was re-created (interface index {} is now {ifindex}): its old attachment enforces nothing; attaching again",
                att.describe(),
                old.ifindex
            ),
            Err(e) => warn!(
                "{}: the attachment's state is unreadable ({e}); attaching again",
                att.describe()
            ),
        }
    }

    phases.mark("lock+prune");
    // 3. A new attachment: roles, compile, then the kernel.
    let roles = roles::resolve(&policy, &req.roles, &req.iface, &id.addresses)?;
    let generation = 1;
    let capacity = Capacity {
        ct: req.ct_size,
        peer_v4: req.peer_entries,
        peer_v6: req.peer_entries,
        ports: req.port_entries,
        ..Capacity::for_policy(&policy)
    };
    let mut compiled = compile::compile(&policy, &roles, Some(&req.iface), 0, generation, capacity)
        .map_err(|source| AttachError::Compile {
            policy: policy.source.clone(),
            iface: req.iface.clone(),
            source,
        })?;
    compiled.config.audit = u8::from(req.audit);
    compiled.config.flow_acct = u8::from(req.flow_acct);
    compiled.config.log_burst = req.log_burst.unwrap_or(policy.defaults.log_rate.max(1));

    // Kernel: load, fill, pin, attach. Undo on any failure.
    roots.ensure_bpffs()?;
    if att.dir.exists() || att.state.exists() {
        warn!(
            "removing stale segbpf files of {} ({}; left by a crash, or by a network namespace that is gone)",
            att.describe(),
            att.dir.display()
        );
        att.remove()
            .map_err(io(format!("removing {}", att.dir.display())))?;
    }
    // The guard starts before the kernel changes, so no moment exists
    // where the change is in force without its guard.
    if let Some(secs) = req.confirm {
        guard::arm(&att, generation, secs, None).map_err(Box::new)?;
    }
    // The namespace's connection tables are made, or joined, under its
    // lock: a detach of its last other attachment cannot remove them
    // meanwhile.
    let shared = att.lock_shared().map_err(io(format!(
        "locking the connection tables of {}",
        ns.describe()
    )))?;
    phases.mark("roles+compile");
    let loaded = load_and_attach(&att, &compiled, capacity, link.link, ifindex, req.mode);
    phases.mark("load+write+pin+attach");
    let ct_size = loader::shared_ct_size(&att).unwrap_or(capacity.ct);
    drop(shared);
    let attached = match loaded {
        Ok(v) => v,
        Err(e) => {
            guard::disarm(&att);
            undo(&att);
            return Err(e);
        }
    };
    if ct_size != capacity.ct {
        warn!(
            "--ct-size {}: the connection tables of {} already hold {ct_size} entries and are shared by its attachments: kept (they are made again with the new size once every attachment of the namespace is detached)",
            capacity.ct,
            ns.describe()
        );
    }
    let state = State {
        iface: req.iface.clone(),
        netns: ns.label.clone(),
        netns_inode: ns.inode,
        netns_cookie: ns.cookie,
        ifindex,
        policy: std::fs::canonicalize(&req.policy)
            .unwrap_or_else(|_| req.policy.clone())
            .display()
            .to_string(),
        roles: roles.clone(),
        role_args: req.roles.clone(),
        previous_roles: Vec::new(),
        roles_changed_at: 0,
        set_overrides: std::collections::BTreeMap::default(),
        rule_slots: capacity.rule_stats,
        peer_entries: capacity.peer_v4,
        port_entries: capacity.ports,
        mode: attached.xdp_mode.to_string(),
        link_type: link.arphrd,
        raw_ip: link.is_raw_ip(),
        insecure_policy: req.insecure_policy,
        flow_acct: req.flow_acct,
        tc_mode: attached.tc_mode.to_string(),
        tc_prog_id: attached.tc_prog_id,
        ct_size,
        audit: req.audit,
        log_rate: compiled.config.log_rate,
        log_burst: compiled.config.log_burst,
        generation,
        prog_id: attached.xdp_prog_id,
        attached_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        entries: [
            compiled.peers_v4.len(),
            compiled.peers_v6.len(),
            compiled.ports.len(),
        ],
        classes: compiled.classes,
        rules: compiled.rules.clone(),
        rules_file: None,
        live_file: None,
    };
    let mut state = state;
    if let Err(e) = state.write(&att.state) {
        guard::disarm(&att);
        undo(&att);
        return Err(e.into());
    }
    crate::attachment::state::prune_rules(&att.state, state.rules_file);
    crate::attachment::state::prune_live(&att.state, state.live_file);
    phases.mark("state");
    // The policy is in force. The slot no packet looks at becomes its
    // mirror (its `SEG_CONFIG` record, carrying the generation in force,
    // written last), and the snapshot records what the slot in force
    // holds: the first change then writes only what it changes (see
    // `crate::attachment::delta`). Whatever fails here leaves no mirror
    // (a slot whose record is not the generation in force): the first
    // change empties that slot and writes the policy whole.
    if let Err(e) = maps::PolicyMaps::from_pins(&att).and_then(|mut m| {
        let other = 1 - compiled.config.active_slot;
        m.write_slot(&crate::attachment::delta::moved(&compiled, other))?;
        crate::attachment::delta::Snapshot::of(&compiled, m.map_id())
            .write(&att.snapshot())
            .map_err(|e| maps::MapsError::Snapshot(e.to_string()))?;
        crate::attachment::setindex::SetIndex::build(
            &policy,
            &state.policy,
            policy_hash,
            &state.set_overrides,
            &state.roles,
            &compiled,
            m.map_id(),
        )
        .write(&att.set_index())
        .map_err(|e| maps::MapsError::Snapshot(e.to_string()))
    }) {
        warn!("mirroring the policy slot: {e} (the first change writes the policy whole)");
    }
    phases.mark("mirror+snapshot");
    if let Some(secs) = req.confirm {
        // In force now: the confirmation time starts.
        guard::start_clock(&att, generation, secs).map_err(Box::new)?;
    }
    let canonical = PathBuf::from(&state.policy);
    if let Err(e) = history::record(
        &att,
        generation,
        &canonical,
        &canonical,
        &state.set_overrides,
        state.live_file.map(|r| {
            (
                crate::attachment::pins::live_path(&att.state, r.hash),
                r.hash,
            )
        }),
        history::Roles {
            roles: state.roles.clone(),
            role_args: state.role_args.clone(),
        },
    ) {
        warn!("policy history not updated: {e}");
    }
    phases.mark("history");

    let summary = format!(
        "attached segbpf to {} (xdp {} prog {}, tc {} prog {}){}: policy {}, roles {}, {} rules, {} classes",
        att.describe(),
        attached.xdp_mode,
        attached.xdp_prog_id,
        attached.tc_mode,
        attached.tc_prog_id,
        if req.audit { " in AUDIT mode" } else { "" },
        policy.source,
        roles.join(","),
        compiled.rules.len(),
        compiled.classes
    );
    Ok(Applied { att, summary })
}

/// Takes over a live attachment (the caller holds its update lock): the
/// programs, maps, connections and counters stay; the requested policy is
/// swapped in atomically, or kept when it is the one in force. While a
/// change waits for confirmation, the policy in force stays (as automatic
/// reloads wait) and its guard is started again.
fn adopt(
    req: &Request,
    att: &Attachment,
    old: &State,
    policy: &Policy,
) -> Result<Applied, AttachError> {
    let fixed = [
        ("--ct-size", u64::from(req.ct_size), u64::from(old.ct_size)),
        (
            "--peer-entries",
            u64::from(req.peer_entries),
            u64::from(old.peer_entries),
        ),
        (
            "--port-entries",
            u64::from(req.port_entries),
            u64::from(old.port_entries),
        ),
    ];
    for (flag, asked, kept) in fixed {
        if asked != kept && kept != 0 {
            warn!(
                "{flag} {asked} differs from the live attachment's {kept}: kept (map sizes change only with `segbpf detach` and a new attach)"
            );
        }
    }
    let mode_asked = match req.mode {
        Mode::Auto => None,
        Mode::Native => Some("native"),
        Mode::Skb => Some("skb"),
    };
    if mode_asked.is_some_and(|m| m != old.mode) {
        warn!(
            "--mode differs from the live attachment's XDP mode {}: kept",
            old.mode
        );
    }
    let which = att.describe();
    // A record that cannot be read: refused (it may hold a change whose
    // guard must run), never adopted as if nothing were pending.
    if let Some(p) = guard::read_pending(att).map_err(Box::new)? {
        warn!(
            "{which}: generation {} waits for `segbpf confirm {}`; the policy in force stays until it is confirmed or undone",
            p.generation, att.iface
        );
        guard::respawn(att, p.generation).map_err(Box::new)?;
        return Ok(Applied {
            att: att.clone(),
            summary: format!(
                "adopted segbpf on {which} (generation {}, awaiting confirmation): policy {} kept",
                old.generation, old.policy
            ),
        });
    }
    let canonical = std::fs::canonicalize(&req.policy).unwrap_or_else(|_| req.policy.clone());
    let same_roles = req.roles.is_empty() || req.roles == old.role_args;
    let log_burst = req.log_burst.unwrap_or(policy.defaults.log_rate.max(1));
    let unchanged = canonical.display().to_string() == old.policy
        && same_roles
        && req.audit == old.audit
        && req.flow_acct == old.flow_acct
        && log_burst == old.log_burst
        && history::list(att)
            .iter()
            .find(|e| e.generation == old.generation)
            .and_then(|e| std::fs::read(&e.copy).ok())
            .is_some_and(|text| std::fs::read(&canonical).is_ok_and(|now| now == text));
    if unchanged {
        return Ok(Applied {
            att: att.clone(),
            summary: format!(
                "adopted segbpf on {which} (xdp {} prog {}, generation {}): policy {} unchanged, roles {}",
                old.mode,
                old.prog_id,
                old.generation,
                old.policy,
                old.roles.join(",")
            ),
        });
    }
    if let Some(secs) = req.confirm {
        guard::arm_for_reload(att, secs).map_err(Box::new)?;
    }
    let settings = swap::Settings {
        roles: (!same_roles).then(|| req.roles.clone()),
        audit: Some(req.audit),
        log_burst: Some(log_burst),
        flow_acct: Some(req.flow_acct),
        ..swap::Settings::default()
    };
    // Live set edits stay, as the watcher of a running attach keeps them.
    let choice = swap::Choice::file(canonical, old.set_overrides.clone());
    let msg = swap::swap_locked(att, old, &settings, choice).inspect_err(|_| {
        if req.confirm.is_some() {
            guard::disarm(att);
        }
    })?;
    if let Some(secs) = req.confirm {
        let generation = State::current(att)?.generation;
        guard::start_clock(att, generation, secs).map_err(Box::new)?;
    }
    Ok(Applied {
        att: att.clone(),
        summary: format!("adopted segbpf on {which}: {msg}"),
    })
}

/// Re-attaches the hooks of `att` that the kernel no longer runs (a link
/// detached by another tool), logging each; the caller holds the update
/// lock. Returns one line per hook re-attached.
fn relink_dead(att: &Attachment, state: &State) -> Result<Vec<String>, AttachError> {
    let hooks = crate::attachment::liveness::check(att, Some(state));
    for h in hooks.iter().filter(|h| !h.live) {
        warn!(
            "{}: {} is not enforcing: {}; attaching it again",
            att.describe(),
            h.hook,
            h.problem.as_deref().unwrap_or("not live")
        );
    }
    if crate::attachment::liveness::all_live(&hooks) {
        return Ok(Vec::new());
    }
    let done = crate::attachment::liveness::relink(att, state).map_err(io(format!(
        "re-attaching the detached programs of {}",
        att.describe()
    )))?;
    for line in &done {
        warn!("{}: {line}", att.describe());
    }
    Ok(done)
}

/// Watches that the kernel still runs the attachment's programs (checked
/// every 2 seconds, [`crate::attachment::liveness`]): a link detached by another tool
/// is attached again at once, logged as a warning, and the service status
/// says so; a failure is logged as an error (once while it lasts) and
/// tried again at the next check. A `segbpf detach` (pins removed) is
/// left alone. Never returns.
pub async fn watch_links(att: &Attachment) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // The same failure is logged once, not every 2 seconds.
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        if !att.is_attached() {
            continue;
        }
        let hooks = crate::attachment::liveness::check(att, State::current(att).ok().as_ref());
        if crate::attachment::liveness::all_live(&hooks) {
            continue;
        }
        let result = att
            .lock(LockKind::Update)
            .map_err(io(format!(
                "locking {}",
                att.lock_path(LockKind::Update).display()
            )))
            .and_then(|_lock| {
                // Under the lock: a `segbpf detach` may have removed it meanwhile.
                if !att.is_attached() {
                    return Ok(Vec::new());
                }
                let state = State::repair(att)?;
                relink_dead(att, &state)
            });
        match result {
            Ok(done) if !done.is_empty() => {
                failing = None;
                crate::host::service::ready(&format!("enforcing again: {}", done.join("; ")));
            }
            Ok(_) => {}
            Err(e) => {
                let e = e.to_string();
                if failing.as_ref() != Some(&e) {
                    tracing::error!(
                        "{} is NOT ENFORCING: {e} (tried again every 2 s)",
                        att.describe()
                    );
                    crate::host::service::ready(&format!("NOT ENFORCING: {e}"));
                }
                failing = Some(e);
            }
        }
    }
}

/// Takes the update lock, saying so when another command holds it.
fn take_update_lock(att: &Attachment) -> std::io::Result<std::fs::File> {
    let f = att.lock_file(LockKind::Update)?;
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    info!(
        "another segbpf command is changing {}; waiting for it",
        att.describe()
    );
    f.lock()?;
    Ok(f)
}

/// Removes what a failed attach left (the caller holds the update lock).
fn undo(att: &Attachment) {
    if let Err(e) = remove_attachment(att) {
        warn!("cleaning up {}: {e}", att.dir.display());
    }
}

/// Removes segbpf from `att` under its update lock: see [`remove_attachment`].
/// Returns whether it was attached (not only stale files).
pub fn detach(att: &Attachment) -> Result<bool, AttachError> {
    let _lock = att.lock(LockKind::Update).map_err(io(format!(
        "locking {}",
        att.lock_path(LockKind::Update).display()
    )))?;
    remove_attachment(att)
}

/// How the lockout guard undoes an unconfirmed change: a restore is a
/// swap to the policy (and, when recorded, the whole state) that was in
/// force; a first attach is removed as `segbpf detach` does.
#[derive(Debug)]
pub struct GuardUndo;

impl guard::Undo for GuardUndo {
    fn restore(
        &self,
        att: &Attachment,
        r: guard::Restore,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let choice = swap::Choice::copy_of(r.copy, r.source, r.set_overrides);
        match &r.previous {
            Some(prev) => swap::restore(att, choice, prev)?,
            None => swap::swap(att, |_| Ok(choice))?,
        };
        Ok(())
    }

    fn remove(&self, att: &Attachment) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        detach(att)?;
        Ok(())
    }
}

/// Removes segbpf from `att`: the clsact egress filter when TCX was not
/// available (not a pinned link: removed by name), the history, a pending
/// confirmation, then every pin and the state. Returns whether it was
/// attached. The caller holds the update lock.
fn remove_attachment(att: &Attachment) -> Result<bool, AttachError> {
    let was_attached = att.is_attached();
    if let Ok(state) = State::read(&att.state)
        && state.tc_mode == "clsact"
        && !att.is_stale()
        && let Err(e) = tc::qdisc_detach_program(
            &att.iface,
            TcAttachType::Egress,
            segbpf_common::PROG_TC_EGRESS,
        )
    {
        warn!("removing the TC egress filter of {}: {e}", att.describe());
    }
    keep_observed(att);
    history::remove(att);
    att.remove()
        .map_err(io(format!("removing {}", att.dir.display())))?;
    // The namespace's connection tables go with its last attachment.
    match att.lock_shared() {
        Ok(_lock) => {
            if let Err(e) = att.release_shared() {
                warn!("removing the connection tables of {}: {e}", att.describe());
            }
        }
        Err(e) => warn!("locking the connection tables of {}: {e}", att.describe()),
    }
    Ok(was_attached)
}

/// Keeps the state and policy in force with the observed store, which
/// outlives the attachment until it expires (`suggest` after `detach`).
fn keep_observed(att: &Attachment) {
    let dir = att.observed_dir();
    if !dir.exists() || att.is_stale() {
        return;
    }
    let Ok(mut state) = State::current(att) else {
        return;
    };
    // The copy holds its rules and live set edits inline (the rules and
    // live files go with the attachment).
    state.rules_file = None;
    state.live_file = None;
    let path = history::at(att, state.generation)
        .map_or_else(|| std::path::PathBuf::from(&state.policy), |e| e.copy);
    let (Ok(text), Ok(json)) = (std::fs::read_to_string(&path), serde_json::to_vec(&state)) else {
        return;
    };
    if let Err(e) = crate::attachment::observed::keep_policy(&dir, &json, &text) {
        warn!(
            "keeping the policy with the observed store {}: {e}",
            dir.display()
        );
    }
}

/// What was attached.
struct Attached {
    xdp_prog_id: u32,
    xdp_mode: &'static str,
    tc_prog_id: u32,
    tc_mode: &'static str,
}

fn load_and_attach(
    att: &Attachment,
    compiled: &compile::Compiled,
    capacity: Capacity,
    link: u8,
    ifindex: u32,
    mode: Mode,
) -> Result<Attached, AttachError> {
    let mut phases = crate::host::phases::Phases::start("attach kernel");
    let mut ebpf = loader::load_attachment(att, capacity, link, ifindex)?;
    phases.mark("load");
    maps::write_policy(&mut ebpf, compiled)?;
    phases.mark("write-policy");
    crate::attachment::dirs::private_dir(&att.dir)
        .map_err(io(format!("creating {}", att.dir.display())))?;
    maps::pin_all(&mut ebpf, att)?;
    phases.mark("pin-maps");

    // Egress first: replies to what the host sends must be tracked before
    // ingress starts dropping what is not.
    let prog = loader::tc(&mut ebpf)?;
    prog.pin(att.prog_tc()).map_err(kernel(format!(
        "pinning program at {}",
        att.prog_tc().display()
    )))?;
    let tc_prog_id = prog.info().map_or(0, |i| i.id());
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // Older kernels: a netlink filter under the clsact qdisc.
        let _ = tc::qdisc_add_clsact(&att.iface);
    }
    let link_id = prog
        .attach(&att.iface, TcAttachType::Egress)
        .map_err(kernel(format!("attaching TC egress to {}", att.iface)))?;
    let link = prog
        .take_link(link_id)
        .map_err(kernel("taking the TC link"))?;
    let tc_mode = match FdLink::try_from(link) {
        Ok(fd_link) => {
            fd_link.pin(att.link_tc()).map_err(kernel(format!(
                "pinning link at {}",
                att.link_tc().display()
            )))?;
            "tcx"
        }
        Err(e) => {
            // A netlink filter is not an fd-based link and cannot be pinned;
            // it stays in the kernel until `detach` removes it by name.
            tracing::debug!("TC link is not pinnable ({e}); kept as a clsact filter");
            "clsact"
        }
    };

    let prog = loader::xdp(&mut ebpf)?;
    prog.pin(att.prog_xdp()).map_err(kernel(format!(
        "pinning program at {}",
        att.prog_xdp().display()
    )))?;
    let xdp_prog_id = prog.info().map_or(0, |i| i.id());
    let attempts: &[(XdpMode, &'static str)] = match mode {
        Mode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
        Mode::Native => &[(XdpMode::Driver, "native")],
        Mode::Skb => &[(XdpMode::Skb, "skb")],
    };
    let mut last_err = None;
    for (xdp_mode, name) in attempts {
        match prog.attach(&att.iface, *xdp_mode) {
            Ok(link_id) => {
                let link = prog
                    .take_link(link_id)
                    .map_err(kernel("taking the XDP link"))?;
                let fd_link = FdLink::try_from(link).map_err(kernel(
                    "the kernel attached XDP without a bpf_link, which cannot be pinned (kernel >= 5.9 needed)",
                ))?;
                fd_link.pin(att.link_xdp()).map_err(kernel(format!(
                    "pinning link at {}",
                    att.link_xdp().display()
                )))?;
                phases.mark("attach-tc+xdp");
                phases.log();
                return Ok(Attached {
                    xdp_prog_id,
                    xdp_mode: name,
                    tc_prog_id,
                    tc_mode,
                });
            }
            Err(e) => {
                tracing::debug!("xdp {name} attach on {} failed: {e}", att.iface);
                last_err = Some((name, e));
            }
        }
    }
    if tc_mode == "clsact" {
        let _ = tc::qdisc_detach_program(
            &att.iface,
            TcAttachType::Egress,
            segbpf_common::PROG_TC_EGRESS,
        );
    }
    Err(match last_err {
        Some((name, e)) => kernel(format!("attaching XDP ({name} mode) to {}", att.iface))(e),
        None => AttachError::Kernel {
            what: "attaching XDP".into(),
            source: "no XDP mode to try".into(),
        },
    })
}

/// How a running `attach` follows its policy file (`--watch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Watch {
    /// Reload when the file changes (inotify, see [`crate::host::watch`]) or on
    /// SIGHUP.
    #[default]
    On,
    /// Reload on SIGHUP only.
    Off,
    /// As `On`, each automatic reload guarded like `reload --confirm SECS`:
    /// undone unless `segbpf confirm IFACE` runs within SECS seconds.
    Confirm(u64),
}

/// Why an automatic reload must not apply what the file now says, or None.
/// The same checks as an explicit `reload`: the text is what is in force
/// already (a reload would only make a new generation), or the policy
/// would cut the SSH session `attach` runs in (the `ssh-session` lint),
/// which only a guarded reload may apply.
fn refuse_automatic(att: &Attachment, guarded: bool) -> Option<String> {
    let state = State::current(att).ok()?;
    let path = PathBuf::from(&state.policy);
    let text = std::fs::read_to_string(&path).ok()?;
    if let Some(e) = history::at(att, state.generation)
        && std::fs::read_to_string(&e.copy).is_ok_and(|t| t == text)
        && e.set_overrides == state.set_overrides
    {
        return Some(format!(
            "{} is what generation {} applied already: nothing to reload",
            path.display(),
            state.generation
        ));
    }
    if guarded || state.audit {
        // Guarded, or in audit mode (kept by the reload): nothing to cut.
        return None;
    }
    let overrides = swap::parse_overrides(&state.set_overrides).ok()?;
    let policy = Policy::load_with_sets(&path, &overrides).ok()?;
    trust::cuts_ssh_session(&policy, &state.roles, &att.iface).map(|m| {
        format!(
            "{}: {m} [ssh-session]; an automatic reload never applies it: run `segbpf reload {} --confirm SECS` (or --force)",
            path.display(),
            att.iface
        )
    })
}

/// Reloads the policy on SIGHUP, or (unless `watch` is [`Watch::Off`])
/// when the policy file changes (inotify: written and closed, or renamed
/// over, see [`crate::host::watch`]; polled every 2 s where inotify fails), keeping live
/// set edits. An automatic reload never applies what an explicit `reload`
/// would refuse ([`refuse_automatic`]: a policy that cuts the SSH session
/// attach runs in, unless guarded by `Watch::Confirm`), and makes no new
/// generation for a file whose text is already in force; a policy that
/// fails validation changes nothing. Each refusal is logged and the
/// previous policy stays. While a change waits for `segbpf confirm`,
/// automatic reloads wait too (logged once): they would supersede the
/// unconfirmed change and its guard would stand down. Never returns.
pub async fn watch_policy(att: &Attachment, mut hup: tokio::signal::unix::Signal, watch: Watch) {
    // What the policy's path resolves to: (device, inode, modification
    // time). inotify watches the file's directory, so it cannot see a
    // directory higher up the path being swapped; the 2 s tick catches that
    // by the inode (a file replaced whole is safe to read). Only without
    // inotify does the tick also compare the modification time (a file
    // may still be half written when its time changes).
    let mtime = |att: &Attachment| {
        use std::os::unix::fs::MetadataExt;
        State::current(att)
            .ok()
            .and_then(|s| std::fs::metadata(&s.policy).ok())
            .map(|m| (m.dev(), m.ino(), m.modified().ok()))
    };
    let same = |a: &Option<(u64, u64, Option<std::time::SystemTime>)>,
                b: &Option<(u64, u64, Option<std::time::SystemTime>)>,
                inotify: bool| match (a, b) {
        (Some(a), Some(b)) if inotify => (a.0, a.1) == (b.0, b.1),
        _ => a == b,
    };
    let policy_file = |att: &Attachment| State::current(att).ok().map(|s| PathBuf::from(s.policy));
    // The file is followed with inotify ([`crate::host::watch`]); only where that
    // cannot be set up is its modification time polled every 2 seconds.
    let mut watcher = match (watch, policy_file(att)) {
        (Watch::Off, _) | (_, None) => None,
        (_, Some(file)) => crate::host::watch::FileWatch::new(&file)
            .inspect_err(|e| {
                warn!(
                    "watching {} with inotify: {e}; checking it every 2 s instead",
                    file.display()
                );
            })
            .ok(),
    };
    let mut seen = mtime(att);
    let mut deferred: Option<&'static str> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            changed = async {
                match watcher.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = changed {
                    warn!("watching the policy file with inotify: {e}; checking it every 2 s instead");
                    watcher = None;
                    continue;
                }
                "the policy file changed"
            }
            _ = tick.tick() => {
                let now = mtime(att);
                match deferred {
                    Some(why) if !guard::may_be_pending(att) => why,
                    _ if watch == Watch::Off
                        || same(&now, &seen, watcher.is_some())
                        || now.is_none() => continue,
                    _ => {
                        // Replaced from above its directory: watch the
                        // directory the path leads to now.
                        if let (Some(_), Some(file)) = (watcher.as_ref(), policy_file(att)) {
                            watcher = crate::host::watch::FileWatch::new(&file)
                                .inspect_err(|e| {
                                    warn!(
                                        "watching {} with inotify: {e}; checking it every 2 s instead",
                                        file.display()
                                    );
                                })
                                .ok();
                        }
                        "the policy file changed"
                    }
                }
            }
        };
        // A reload may have named another file: follow it.
        if let (Some(w), Some(file)) = (watcher.as_mut(), policy_file(att))
            && w.file() != file
            && let Err(e) = w.retarget(&file)
        {
            warn!(
                "watching {} with inotify: {e}; checking it every 2 s instead",
                file.display()
            );
            watcher = None;
        }
        // A change waits (or a record that cannot be read may hold one).
        let waiting = guard::read_pending(att);
        if !matches!(waiting, Ok(None)) {
            if deferred.is_none() {
                match waiting {
                    Ok(Some(p)) => warn!(
                        "{why}: generation {} waits for `segbpf confirm {}`; the automatic reload waits until it is confirmed or undone",
                        p.generation, att.iface
                    ),
                    Err(e) => {
                        warn!(
                            "{why}: {e}; the automatic reload waits until it reads or is removed"
                        );
                    }
                    Ok(None) => {}
                }
            }
            deferred = Some(why);
            seen = mtime(att);
            continue;
        }
        deferred = None;
        let confirm = match watch {
            Watch::Confirm(secs) => Some(secs),
            _ => None,
        };
        seen = mtime(att);
        if let Some(m) = refuse_automatic(att, confirm.is_some()) {
            if m.contains("[ssh-session]") {
                tracing::error!("{why}: reload refused, the policy in force is unchanged: {m}");
            } else {
                info!("{why}: {m}");
            }
            // A reload asked for (`systemctl reload`) gets its answer.
            crate::host::service::reloading(why);
            crate::host::service::ready(&m);
            continue;
        }
        crate::host::service::reloading(why);
        let result = match confirm {
            None => crate::attachment::swap::reload_keeping_sets(att),
            Some(secs) => crate::attachment::swap::reload(
                att,
                &crate::attachment::swap::ReloadRequest {
                    confirm: Some(secs),
                    keep_set_edits: true,
                    ..crate::attachment::swap::ReloadRequest::default()
                },
            ),
        };
        match result {
            Ok(msg) => {
                info!("{why}: {msg}");
                if let Some(secs) = confirm {
                    warn!(
                        "{why}: undone in {secs} s unless `segbpf confirm {}` runs",
                        att.iface
                    );
                }
                crate::host::service::ready(&msg.to_string());
            }
            Err(e) => {
                tracing::error!("{why}: reload refused, the policy in force is unchanged: {e}");
                crate::host::service::ready(&format!(
                    "reload refused, the policy in force is unchanged: {e}"
                ));
            }
        }
        seen = mtime(att);
    }
}
