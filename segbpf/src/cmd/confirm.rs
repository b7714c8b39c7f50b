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

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{history, pins::Attachment};

/// Arguments of `segbpf confirm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose pending change to keep.
    pub iface: String,
}

/// Arguments of the hidden `segbpf guard` (started by `--confirm`).
#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// Interface.
    pub iface: String,
    /// Generation that must be confirmed.
    #[arg(long)]
    pub generation: u64,
}

/// A pending confirmation.
#[derive(Debug, Serialize, Deserialize)]
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

fn write(att: &Attachment, p: &Pending) -> anyhow::Result<()> {
    let target = path(att);
    let tmp = target.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(p)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("writing {}", target.display()))
}

fn path(att: &Attachment) -> PathBuf {
    att.state.with_extension("confirm.json")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The pending confirmation of `att`, if any.
pub fn pending(att: &Attachment) -> Option<Pending> {
    let text = std::fs::read_to_string(path(att)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Arms the guard for `generation`: unless confirmed within `secs`, the
/// policy before it (`restore`) comes back, or segbpf detaches.
pub fn arm(
    att: &Attachment,
    generation: u64,
    secs: u64,
    restore: Option<history::Entry>,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let restore_text = match &restore {
        Some(entry) => Some(std::fs::read_to_string(&entry.copy).with_context(|| {
            format!(
                "reading the policy in force from the history ({}); without it the change cannot be guarded",
                entry.copy.display()
            )
        })?),
        None => None,
    };
    let p = Pending {
        generation,
        deadline: now() + secs,
        restore,
        restore_text,
        applier: Some(std::process::id()),
        started: false,
    };
    if let Some(dir) = path(att).parent() {
        crate::pins::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write(att, &p)?;
    let exe = std::env::current_exe().context("locating the segbpf binary")?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(ns) = &att.netns {
        cmd.args(["--netns", ns]);
    }
    cmd.args(["guard", &att.iface, "--generation", &generation.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid() is async-signal-safe; the child leaves our session
    // and process group, so signals to the applying command miss it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("starting the confirmation guard")?;
    tracing::warn!(
        "the change to generation {generation} on {} is undone in {secs}s unless you run: segbpf{} confirm {}",
        att.iface,
        att.netns
            .as_deref()
            .map(|n| format!(" --netns {n}"))
            .unwrap_or_default(),
        att.iface
    );
    Ok(())
}

/// Says that the change armed for `generation` is in force: its `secs`
/// start now. A no-op when nothing (or another generation) is pending.
pub fn start_clock(att: &Attachment, generation: u64, secs: u64) -> anyhow::Result<()> {
    match pending(att) {
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
pub fn refuse_while_pending(att: &Attachment, force: bool) -> anyhow::Result<()> {
    if let Some(p) = pending(att) {
        if force {
            tracing::warn!(
                "generation {} on {} was waiting for confirmation; --force: this change supersedes it and its guard stands down",
                p.generation,
                att.iface
            );
            return Ok(());
        }
        bail!(
            "generation {} on {} waits for `segbpf confirm {}` (undone in {}s otherwise); confirm it or let it be undone first, or pass --force to supersede it (its guard then stands down)",
            p.generation,
            att.iface,
            att.iface,
            p.deadline.saturating_sub(now())
        );
    }
    Ok(())
}

/// Cancels a guard armed for a change that then failed.
pub fn disarm(att: &Attachment) {
    let _ = std::fs::remove_file(path(att));
}

/// Runs `segbpf confirm`.
pub fn run(args: Args, netns: Option<&str>) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, netns);
    let Some(p) = pending(&att) else {
        bail!("no change is waiting for confirmation on {}", args.iface);
    };
    std::fs::remove_file(path(&att)).context("removing the pending confirmation")?;
    println!("confirmed generation {} on {}", p.generation, args.iface);
    Ok(())
}

/// Runs the guard: waits for the deadline, then undoes the change unless it
/// was confirmed or superseded.
pub fn guard(args: GuardArgs, netns: Option<&str>) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, netns);
    loop {
        let Some(p) = pending(&att) else {
            return Ok(()); // confirmed
        };
        if p.generation != args.generation {
            return Ok(()); // superseded by another --confirm change
        }
        let left = p.deadline.saturating_sub(now());
        if left == 0 && !p.applying() {
            break;
        }
        std::thread::sleep(Duration::from_millis((left * 1000).clamp(100, 500)));
    }
    let Some(p) = pending(&att) else {
        return Ok(());
    };
    let live = if att.is_attached() {
        crate::maps::pinned_config(&att).map(|c| c.generation).ok()
    } else {
        None
    };
    // A first attach that was killed half-way leaves pins but no link:
    // remove them too. Otherwise undo only the generation armed for (a
    // failed reload never reached the kernel; a later change supersedes).
    let half_applied = p.restore.is_none() && att.dir.exists() && !att.is_attached();
    if live != Some(p.generation) && !half_applied {
        let _ = std::fs::remove_file(path(&att));
        return Ok(());
    }
    match (p.restore, p.restore_text) {
        (Some(entry), Some(text)) => {
            // What the guard recorded when armed, not what the history
            // holds now (it may have been pruned, moved or removed).
            let copy = att.state.with_extension("confirm.restore.toml");
            std::fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))?;
            crate::cmd::reload::swap(&att, |_| Ok((copy.clone(), entry.set_overrides.clone())))?;
        }
        (Some(entry), None) => {
            // Armed by an older version: only the history copy is known.
            crate::cmd::reload::swap(&att, |_| {
                Ok((entry.copy.clone(), entry.set_overrides.clone()))
            })?;
        }
        (None, _) => {
            // A first attach: remove segbpf exactly as `segbpf detach` does.
            crate::cmd::detach::remove(&att)?;
        }
    }
    let _ = std::fs::remove_file(path(&att));
    Ok(())
}
