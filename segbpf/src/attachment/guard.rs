//! The lockout guard, like `commit confirmed` on routers: `attach` or
//! `reload` with `--confirm SECS` arms a guard that restores the previous
//! policy (or detaches, if there was none) unless `segbpf confirm IFACE`
//! runs within SECS. The guard is a separate process in its own session,
//! started by the command that applied the change, so it acts even if that
//! command is killed. The pending confirmation is a file
//! (`IFACE.confirm.json`) naming the generation to confirm; `confirm`
//! removes it; a later policy change supersedes it.
//!
//! The SECS count from the moment the change is in force, not from when
//! the guard was armed: loading and verifying the programs of a first
//! attach can take seconds on a busy host. While the applying process is
//! alive and has not said the change is in force ([`start_clock`]), the
//! guard waits; once that process is gone, the clock runs from arming (a
//! killed attach is cleaned up after SECS).
//!
//! What comes back is the whole state that was in force when the guard
//! was armed, kept in the pending record: the policy text, its live set
//! edits, the roles and `--role` arguments exactly as they were (a change
//! made with `--redetect-roles`, or a fleet revision, may have renamed
//! them), audit mode, event burst and flow accounting. A restore that
//! fails is tried again, with a log line each time, after 1 s, 2 s, 4 s
//! ... up to every 30 s, until it succeeds or the change is confirmed or
//! superseded: the guard never leaves a change pending. How it goes (its
//! pid, attempts, last error) is in `IFACE.guard.json`, which `status`
//! reads; its log lines go to the journal under systemd, else to
//! `IFACE.guard.log` next to the state.
//!
//! Only a missing record means confirmed. A record that cannot be read
//! is never a confirmation: the guard waits for it to read again, and
//! past the deadline undoes the change from the copy it read before.
//!
//! The guard is a state machine over these files: armed, waiting for the
//! clock, undoing, done. To undo it asks an [`Undo`] handed in by its
//! caller (restore the previous policy, or remove segbpf); it never calls
//! the engines that arm it.

use std::{
    collections::BTreeMap,
    error::Error,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    attachment::history,
    attachment::pins::Attachment,
    attachment::state::{State, StateError},
};

/// Errors of the lockout guard.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// A file of the guard could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The guard process could not be started.
    #[error("starting the confirmation guard: {0}")]
    Spawn(std::io::Error),
    /// The policy in force has no history record to restore.
    #[error(
        "--confirm: the policy in force on {which} (generation {generation}) is not in the history ({dir}), so the guard could not restore it; apply without --confirm, or reload once without it to record the policy in force"
    )]
    NotInHistory {
        /// Interface and namespace.
        which: String,
        /// Generation in force.
        generation: u64,
        /// The history directory.
        dir: String,
    },
    /// A change waits for confirmation.
    #[error(
        "generation {generation} on {which} waits for `segbpf confirm {iface}` (undone in {left}s otherwise); confirm it or let it be undone first, or pass --force to supersede it (its guard then stands down)"
    )]
    Pending {
        /// Interface and namespace.
        which: String,
        /// Interface.
        iface: String,
        /// The generation waiting.
        generation: u64,
        /// Seconds left.
        left: u64,
    },
    /// Nothing to confirm.
    #[error("no change is waiting for confirmation on {0}")]
    NothingPending(String),
    /// The state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// Restoring the previous policy failed (the guard retries).
    #[error("restoring the previous policy: {0}")]
    Restore(Box<dyn Error + Send + Sync>),
    /// Removing a first attach failed.
    #[error("removing the unconfirmed attach: {0}")]
    Detach(Box<dyn Error + Send + Sync>),
    /// The pending record is there but cannot be read (the guard waits
    /// and tries again: only a missing record means confirmed; a change
    /// is refused unless forced; `confirm` refuses, and removing the file
    /// by hand keeps what is in force).
    #[error(
        "reading the pending confirmation {path}: {why} (a change may wait for confirmation: remove the file to keep what is in force, or pass --force to a change)"
    )]
    Record {
        /// The record.
        path: String,
        /// Why.
        why: String,
    },
    /// The generation in force could not be read while attached (the
    /// guard tries again rather than take the change as superseded).
    #[error("reading the generation in force: {0}")]
    Live(#[from] crate::attachment::maps::MapsError),
}

/// What the guard asks for when a change is not confirmed in time. The
/// lifecycle engines implement it and hand it to [`run_guard`]; the guard
/// only decides when, and what to put back.
pub trait Undo {
    /// Puts the policy of `restore` back in force on `att`.
    fn restore(
        &self,
        att: &Attachment,
        restore: Restore,
    ) -> Result<(), Box<dyn Error + Send + Sync>>;
    /// Removes segbpf from `att` exactly as `segbpf detach` does (the
    /// change was a first attach).
    fn remove(&self, att: &Attachment) -> Result<(), Box<dyn Error + Send + Sync>>;
}

/// The policy that an unconfirmed change is undone to.
#[derive(Debug)]
pub struct Restore {
    /// A copy of the policy text that was in force.
    pub copy: PathBuf,
    /// The file that text was read from.
    pub source: PathBuf,
    /// Its live set edits.
    pub set_overrides: BTreeMap<String, Vec<String>>,
    /// The whole state that was in force before the change, when the
    /// guard recorded it (a guard armed by an older version did not).
    pub previous: Option<State>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuardError {
    let what = what.into();
    move |source| GuardError::Io { what, source }
}

/// A pending confirmation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    /// Generation applied with `--confirm`.
    pub generation: u64,
    /// Unix time after which it is undone.
    pub deadline: u64,
    /// What to restore (None: detach).
    pub restore: Option<history::Entry>,
    /// The text of the policy to restore, copied from the history when
    /// the guard was armed: the guard restores it whatever the history
    /// holds by the deadline.
    #[serde(default)]
    pub restore_text: Option<String>,
    /// PID of the process applying the change.
    #[serde(default)]
    pub applier: Option<u32>,
    /// The change is in force and `deadline` counts from then.
    #[serde(default)]
    pub started: bool,
    /// The whole state in force when the guard was armed: its roles,
    /// `--role` arguments and settings come back with the policy text.
    #[serde(default)]
    pub previous: Option<Box<State>>,
}

/// How the guard's work on a pending change goes (`IFACE.guard.json`,
/// written by the guard only): `status` reads it to say why a change is
/// still pending past its deadline.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The generation the guard is undoing.
    pub generation: u64,
    /// PID of the guard process.
    pub pid: u32,
    /// Failed restore attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix time of the next attempt.
    #[serde(default)]
    pub next_attempt: u64,
}

impl Progress {
    /// The guard's record for `att`, if one is there.
    pub fn read(att: &Attachment) -> Option<Progress> {
        let text = std::fs::read_to_string(att.guard_record()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether the guard that wrote it still runs.
    pub fn running(&self) -> bool {
        self.pid != 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None).is_ok()
    }

    fn write(&self, att: &Attachment) {
        let target = att.guard_record();
        let tmp = target.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::from)
            .and_then(|t| std::fs::write(&tmp, t))
            .and_then(|()| std::fs::rename(&tmp, &target));
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}", target.display());
        }
    }
}

impl Pending {
    /// Whether the change is still being applied by a live process (the
    /// guard then waits, whatever the deadline).
    fn applying(&self) -> bool {
        !self.started
            && self.applier.is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
            })
    }
}

fn write(att: &Attachment, p: &Pending) -> Result<(), GuardError> {
    let target = att.confirm_record();
    let tmp = target.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(p).map_err(std::io::Error::from);
    text.and_then(|t| std::fs::write(&tmp, t))
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &target).map_err(io(format!("writing {}", target.display())))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The pending confirmation of `att`, if any (an unreadable record reads
/// as none here: see [`read_pending`] for the guard's reading).
pub fn pending(att: &Attachment) -> Option<Pending> {
    read_pending(att).ok().flatten()
}

/// Whether a change may wait for confirmation on `att`: a record that
/// reads, or one that is there but cannot be read (automatic changes
/// wait for either).
pub fn may_be_pending(att: &Attachment) -> bool {
    !matches!(read_pending(att), Ok(None))
}

/// The pending confirmation of `att`: `None` only when there is no record
/// (confirmed or never armed); a record that cannot be read or parsed is
/// an error, which the guard never takes for a confirmation (and `status`
/// reports).
pub fn read_pending(att: &Attachment) -> Result<Option<Pending>, GuardError> {
    let path = att.confirm_record();
    read_record(&path).map_err(|why| GuardError::Record {
        path: path.display().to_string(),
        why,
    })
}

/// A guard's pending record at `path`, strictly: `None` only when the
/// file is missing; a file that cannot be read or parsed is an error
/// (why). Shared with the services guard.
pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<Option<T>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Arms the guard for `generation`: unless confirmed within `secs`, the
/// policy before it (`restore`) comes back, or segbpf detaches.
pub fn arm(
    att: &Attachment,
    generation: u64,
    secs: u64,
    restore: Option<history::Entry>,
) -> Result<(), GuardError> {
    arm_with(att, generation, secs, restore, None)
}

fn arm_with(
    att: &Attachment,
    generation: u64,
    secs: u64,
    restore: Option<history::Entry>,
    previous: Option<State>,
) -> Result<(), GuardError> {
    let restore_text = match &restore {
        Some(entry) => Some(std::fs::read_to_string(&entry.copy).map_err(io(format!(
            "reading the policy in force from the history ({}); without it the change cannot be guarded",
            entry.copy.display()
        )))?),
        None => None,
    };
    let p = Pending {
        generation,
        deadline: now() + secs,
        restore,
        restore_text,
        applier: Some(std::process::id()),
        started: false,
        previous: previous.map(Box::new),
    };
    if let Some(dir) = att.confirm_record().parent() {
        crate::attachment::dirs::private_dir(dir)
            .map_err(io(format!("creating {}", dir.display())))?;
    }
    write(att, &p)?;
    if let Err(e) = spawn(att, generation) {
        disarm(att);
        return Err(e);
    }
    tracing::warn!(
        "the change to generation {generation} on {} is undone in {secs}s unless you run: segbpf{} confirm {}",
        att.describe(),
        att.netns.cli_option(),
        att.iface
    );
    Ok(())
}

/// Starts a guard process for `generation` of `att`, in its own session.
fn spawn(att: &Attachment, generation: u64) -> Result<(), GuardError> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().map_err(GuardError::Spawn)?;
    // The guard inherits this process's network namespace, so it finds
    // the same attachment however this command got there.
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["guard", &att.iface, "--generation", &generation.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_stream(att));
    // SAFETY: setsid() is async-signal-safe; the child leaves our session
    // and process group, so signals to the applying command miss it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map(drop).map_err(GuardError::Spawn)
}

/// Where the guard's log lines go: the journal when this command's stderr
/// is systemd's journal stream, else `IFACE.guard.log` (appended; a
/// terminal or pipe would keep the applying command's caller waiting, or
/// be gone when the guard speaks).
fn log_stream(att: &Attachment) -> std::process::Stdio {
    use std::os::unix::fs::OpenOptionsExt as _;
    if crate::host::logging::is_journal_stream(std::io::stderr()) {
        return std::process::Stdio::inherit();
    }
    let path = att.guard_log();
    // Started afresh when it has grown large: only the last change matters.
    let big = std::fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20);
    std::fs::OpenOptions::new()
        .create(true)
        .append(!big)
        .write(true)
        .truncate(big)
        .mode(0o600)
        .open(&path)
        .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from)
}

/// Starts the guard of a pending change again (an `attach` adopting the
/// attachment after a restart: the guard may have died with the previous
/// process's service). Two guards of one change are harmless: the first
/// to act settles it, the other then finds nothing to do.
pub fn respawn(att: &Attachment, generation: u64) -> Result<(), GuardError> {
    spawn(att, generation)
}

/// Says that the change armed for `generation` is in force: its `secs`
/// start now. A no-op when nothing (or another generation) is pending.
pub fn start_clock(att: &Attachment, generation: u64, secs: u64) -> Result<(), GuardError> {
    match read_pending(att)? {
        Some(mut p) if p.generation == generation => {
            p.deadline = now() + secs;
            p.started = true;
            write(att, &p)
        }
        _ => Ok(()),
    }
}

/// Refuses an explicit change of `att` while a change waits for
/// confirmation (unless `force`): the guard would otherwise give up on the
/// unconfirmed change, superseded, and leave it in force.
pub fn refuse_while_pending(att: &Attachment, force: bool) -> Result<(), GuardError> {
    // A record that cannot be read may be a change waiting: refused as
    // one (with --force it goes, and its guard stands down).
    let pending = match read_pending(att) {
        Ok(p) => p,
        // Removed only once the forced change is in force
        // ([`after_forced`]): a forced change that fails leaves it.
        Err(e) if force => {
            tracing::warn!("{e}; --force: this change supersedes whatever it held");
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(p) = pending {
        if force {
            tracing::warn!(
                "generation {} on {} was waiting for confirmation; --force: this change supersedes it and its guard stands down",
                p.generation,
                att.iface
            );
            return Ok(());
        }
        return Err(GuardError::Pending {
            which: att.describe(),
            iface: att.iface.clone(),
            generation: p.generation,
            left: p.deadline.saturating_sub(now()),
        });
    }
    Ok(())
}

/// After a forced change is in force: a pending record that still cannot
/// be read goes (what it held is superseded; its guard, finding no record,
/// exits). A readable one stays: its guard finds another generation in
/// force and stands down itself.
pub fn after_forced(att: &Attachment) {
    if read_pending(att).is_err() {
        disarm(att);
    }
}

/// Cancels a guard armed for a change that then failed.
pub fn disarm(att: &Attachment) {
    let _ = std::fs::remove_file(att.confirm_record());
}

/// `segbpf confirm`: keeps the pending change; returns its generation.
pub fn confirm(att: &Attachment) -> Result<u64, GuardError> {
    let Some(p) = read_pending(att)? else {
        return Err(GuardError::NothingPending(att.describe()));
    };
    std::fs::remove_file(att.confirm_record()).map_err(io("removing the pending confirmation"))?;
    Ok(p.generation)
}

/// Arms the guard for the next generation of a reload: it restores the
/// policy in force, copied from the history now. Without a record of it
/// the change cannot be guarded, and is refused rather than applied
/// unguarded (or undone by detaching).
pub fn arm_for_reload(att: &Attachment, secs: u64) -> Result<(), GuardError> {
    let previous = State::current(att)?;
    let current = previous.generation;
    let live = crate::attachment::maps::pinned_config(att).map_or(0, |c| c.generation);
    let next = current.max(live) + 1;
    let Some(restore) = history::list(att)
        .into_iter()
        .find(|e| e.generation == current)
    else {
        return Err(GuardError::NotInHistory {
            which: att.describe(),
            generation: current,
            dir: history::dir_of(att).display().to_string(),
        });
    };
    arm_with(att, next, secs, Some(restore), Some(previous))
}

/// Shortest and longest wait between restore attempts.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The guard process: waits for the deadline, then undoes the change to
/// `generation` unless it was confirmed or superseded. A failed restore is
/// tried again (1 s, 2 s, ... every 30 s at most), with a log line and the
/// reason in `IFACE.guard.json` each time, until it succeeds or the change
/// is confirmed or superseded: it returns only when nothing is pending.
pub fn run_guard(att: &Attachment, generation: u64, how: &dyn Undo) -> Result<(), GuardError> {
    let mut progress = Progress {
        generation,
        pid: std::process::id(),
        ..Progress::default()
    };
    if pending(att).is_some_and(|p| p.generation == generation) {
        progress.write(att);
    }
    // The record as this guard last read it: if it stops reading, the
    // guard acts on this copy at its deadline (an unreadable record is
    // never a confirmation, and never leaves the change in force).
    let mut last_good: Option<Pending> = None;
    loop {
        let p = match read_pending(att) {
            Ok(Some(p)) => {
                if progress.attempts == 0 && progress.last_error.take().is_some() {
                    progress.write(att); // the record reads again
                }
                last_good = Some(p.clone());
                p
            }
            Ok(None) => {
                forget(att, generation);
                return Ok(()); // confirmed
            }
            // Unreadable: never taken for a confirmation. Until the
            // deadline of the last good copy the guard waits for it to
            // read again, and says why (once per reason, in its log and
            // in `status`); then it undoes the change from that copy.
            Err(e) => {
                let why = e.to_string();
                if progress.last_error.as_ref() != Some(&why) {
                    tracing::warn!("{why}; waiting for it to read again");
                    progress.last_error = Some(why);
                    progress.write(att);
                }
                match &last_good {
                    Some(g)
                        if g.generation == generation && now() >= g.deadline && !g.applying() =>
                    {
                        tracing::warn!(
                            "the pending record of generation {generation} still cannot be read past its deadline: undoing the change from the copy read before"
                        );
                        break;
                    }
                    _ => {
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
        };
        if p.generation != generation {
            forget(att, generation);
            return Ok(()); // superseded by another --confirm change
        }
        let left = p.deadline.saturating_sub(now());
        if left == 0 && !p.applying() {
            break;
        }
        std::thread::sleep(Duration::from_millis((left * 1000).clamp(100, 500)));
    }
    let mut delay = RETRY_FIRST;
    loop {
        match undo(att, generation, how, last_good.as_ref()) {
            Ok(()) => {
                forget(att, generation);
                return Ok(());
            }
            Err(e) => {
                progress.attempts += 1;
                progress.last_error = Some(e.to_string());
                progress.next_attempt = now() + delay.as_secs();
                progress.write(att);
                tracing::error!(
                    "undoing the unconfirmed generation {generation} on {} failed (attempt {}), trying again in {}s: {e}",
                    att.describe(),
                    progress.attempts,
                    delay.as_secs()
                );
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Removes the guard's record of `generation` (not a newer guard's).
fn forget(att: &Attachment, generation: u64) {
    if Progress::read(att).is_some_and(|g| g.generation == generation) {
        let _ = std::fs::remove_file(att.guard_record());
    }
}

/// One attempt to undo the change to `generation`: Ok once nothing is
/// pending for it any more (undone now, or confirmed, superseded or
/// removed meanwhile). A record that cannot be read is undone from
/// `fallback`, the copy the guard read before (without one: an error,
/// tried again).
fn undo(
    att: &Attachment,
    generation: u64,
    how: &dyn Undo,
    fallback: Option<&Pending>,
) -> Result<(), GuardError> {
    let p = match read_pending(att) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(()),
        Err(e) => fallback.cloned().ok_or(e)?,
    };
    if p.generation != generation {
        return Ok(());
    }
    // While attached, a configuration that cannot be read is an error to
    // retry: taken for "another generation", it would end the guard with
    // the unconfirmed change in force.
    let live = if att.is_attached() {
        Some(crate::attachment::maps::pinned_config(att)?.generation)
    } else {
        None
    };
    // A first attach that was killed half-way leaves pins but no link:
    // remove them too. Otherwise undo only the generation armed for (a
    // failed reload never reached the kernel; a later change supersedes).
    let half_applied = p.restore.is_none() && att.dir.exists() && !att.is_attached();
    if live != Some(p.generation) && !half_applied {
        let _ = std::fs::remove_file(att.confirm_record());
        return Ok(());
    }
    let restore = match (p.restore, p.restore_text, p.previous) {
        // What the guard recorded when armed, not what the history holds
        // now (it may have been pruned, moved or removed); with the whole
        // state in force before the change, or (armed by an older
        // version) the policy only.
        (Some(entry), Some(text), previous) => {
            let copy = att.confirm_restore();
            std::fs::write(&copy, text).map_err(io(format!("writing {}", copy.display())))?;
            let set_overrides = match &previous {
                Some(prev) => prev.set_overrides.clone(),
                None => entry.set_overrides,
            };
            Some(Restore {
                copy,
                source: PathBuf::from(&entry.source),
                set_overrides,
                previous: previous.map(|p| *p),
            })
        }
        // Armed by an older version: only the history copy is known.
        (Some(entry), None, _) => Some(Restore {
            copy: entry.copy,
            source: PathBuf::from(&entry.source),
            set_overrides: entry.set_overrides,
            previous: None,
        }),
        // A first attach: nothing to restore.
        (None, _, _) => None,
    };
    match restore {
        Some(r) => how.restore(att, r).map_err(GuardError::Restore)?,
        None => how.remove(att).map_err(GuardError::Detach)?,
    }
    let _ = std::fs::remove_file(att.confirm_record());
    Ok(())
}
