//! The lockout guard of the services attachment: `attach --services
//! --confirm SECS` on a cgroup root where nothing is attached yet arms a
//! guard that removes the attachment again (exactly as `detach
//! --services`) unless `segbpf confirm --services` runs within SECS. The
//! guard is a separate process in its own session (`segbpf guard
//! --services`), so it acts even if the attach is killed. The pending
//! confirmation is a file next to the state (`services:ID.confirm.json`)
//! naming the generation to confirm; `confirm` removes it.
//!
//! The SECS count from when the programs are enforcing: the guard is armed
//! after the attach has put them in force. An attachment that is already
//! there (a reload) is not guarded (refused by the command): there is no
//! recorded copy of the previous policy to put back yet.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::attachment::services::{self, ServicesError, SvcPaths};

/// A pending confirmation of the services attachment.
#[derive(Debug, Serialize, Deserialize)]
pub struct SvcPending {
    /// Generation applied with `--confirm`.
    pub generation: u64,
    /// Unix time after which the attachment is removed.
    pub deadline: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServicesError {
    let what = what.into();
    move |source| ServicesError::Io { what, source }
}

/// The pending record's file ([`SvcPaths::pending_file`]).
fn pending_file(paths: &SvcPaths) -> PathBuf {
    paths.pending_file()
}

/// The pending confirmation, if any (an unreadable record reads as none
/// here; the guard reads it with [`read_pending`]).
pub fn pending(paths: &SvcPaths) -> Option<SvcPending> {
    read_pending(paths).ok().flatten()
}

/// The pending confirmation: `None` only when there is no record; a
/// record that cannot be read or parsed is an error (why), which the
/// guard never takes for a confirmation.
fn read_pending(paths: &SvcPaths) -> Result<Option<SvcPending>, String> {
    let file = pending_file(paths);
    crate::attachment::guard::read_record(&file)
        .map_err(|e| format!("reading {}: {e}", file.display()))
}

/// Records that `generation` must be confirmed within `secs` (from now).
pub fn arm(paths: &SvcPaths, generation: u64, secs: u64) -> Result<SvcPending, ServicesError> {
    let p = SvcPending {
        generation,
        deadline: now() + secs,
    };
    let file = pending_file(paths);
    let tmp = file.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(&p).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &file).map_err(io(format!("writing {}", file.display())))?;
    Ok(p)
}

/// Keeps the attachment: removes the pending record. Returns the
/// generation confirmed, or None when nothing was pending.
pub fn confirm(paths: &SvcPaths) -> Result<Option<u64>, ServicesError> {
    // A record that cannot be read is not "nothing pending".
    let p = match read_pending(paths) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(None),
        Err(why) => {
            return Err(ServicesError::Io {
                what: format!("{why} (remove the file to keep the attachment)"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
    };
    let file = pending_file(paths);
    std::fs::remove_file(&file).map_err(io(format!("removing {}", file.display())))?;
    Ok(Some(p.generation))
}

/// What the guard did.
#[derive(Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// Confirmed in time (or the record is gone).
    Confirmed,
    /// Another generation is in force or pending: stood down.
    Superseded,
    /// The attachment was removed at the deadline.
    Removed,
}

/// Runs the guard of `generation`: waits for the deadline, then removes
/// the attachment unless it was confirmed or superseded. A removal that
/// fails is tried again every second (never leaves a change pending).
pub fn run_guard(paths: &SvcPaths, generation: u64) -> GuardOutcome {
    let mut last_error = None;
    loop {
        let p = match read_pending(paths) {
            Ok(Some(p)) => p,
            Ok(None) => return GuardOutcome::Confirmed,
            // Unreadable: never a confirmation; wait for it to read again.
            Err(why) => {
                if last_error.as_ref() != Some(&why) {
                    tracing::warn!("{why}; waiting for it to read again");
                    last_error = Some(why);
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if p.generation != generation {
            return GuardOutcome::Superseded;
        }
        if now() < p.deadline {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        // The pins made since by another state directory (this one's
        // attachment was detached from there): not this guard's to remove.
        if paths.owner() == services::Owner::Other {
            let _ = std::fs::remove_file(pending_file(paths));
            return GuardOutcome::Superseded;
        }
        match services::detach(paths) {
            Ok(_) => {
                let _ = std::fs::remove_file(pending_file(paths));
                tracing::warn!(
                    "generation {generation} of the services below {} was not confirmed in time: removed (as `segbpf detach --services`)",
                    paths.root.dir.display()
                );
                return GuardOutcome::Removed;
            }
            Err(e) => {
                tracing::error!("removing the unconfirmed services attachment: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
