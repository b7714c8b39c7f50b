//! Policy history: a copy of every policy an attachment put in force (the
//! file's text and any live set edits), newest last, so `segbpf rollback`
//! and the `--confirm` guard can restore the previous one even after the
//! original file was edited. Kept under `$SEGBPF_HISTORY_DIR` in
//! `net/NS/IFACE/`, keyed like every other file by the network namespace's
//! inode; the last `$SEGBPF_HISTORY` entries (default 10) per attachment.
//! Without `$SEGBPF_HISTORY_DIR` the history is [`DEFAULT_DIR`] (it
//! survives reboots, and the systemd service and commands typed by hand
//! share it), or the state directory's `history/` for attachments whose
//! state is elsewhere (`$SEGBPF_STATE_DIR`, private roots in tests).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::attachment::pins::Attachment;

/// A history entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct HistoryError {
    /// What was being done.
    what: &'static str,
    /// The file or directory.
    path: PathBuf,
    /// Why it failed.
    source: std::io::Error,
}

fn failed(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError {
    let path = path.to_path_buf();
    move |source| HistoryError { what, path, source }
}

/// Default number of policies kept per attachment.
pub const DEFAULT_KEEP: usize = 10;

/// One applied policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Generation it was applied as.
    pub generation: u64,
    /// The file it came from.
    pub source: String,
    /// The copy of the file's text kept in the history.
    pub copy: PathBuf,
    /// Live set edits in force with it.
    pub set_overrides: BTreeMap<String, Vec<String>>,
    /// The generation whose policy a rollback restored as this one (its
    /// original, when that was itself restored): a second rollback goes on
    /// from there, further back, rather than undoing the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<u64>,
    /// The host's roles and `--role` arguments in force with it, which a
    /// rollback puts back (a later `reload --redetect-roles` may have
    /// renamed them). None in entries of versions that did not record
    /// them: a rollback then keeps the roles in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Roles>,
}

/// The roles recorded with a history entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// The host's roles.
    pub roles: Vec<String>,
    /// The `--role` arguments they were decided from (empty: from the
    /// interface's addresses).
    pub role_args: Vec<String>,
}

impl Entry {
    /// When the entry was recorded (its copy's modification time).
    pub fn recorded_at(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.copy)
            .and_then(|m| m.modified())
            .ok()
    }
}

/// Where histories are kept by default (see the module's documentation).
pub const DEFAULT_DIR: &str = "/var/lib/segbpf/history";

/// The history root: `$SEGBPF_HISTORY_DIR` (`history_dir`), else
/// [`DEFAULT_DIR`] for attachments under the default state directory, else
/// that state directory's `history/` (private roots keep their history
/// with them).
fn root(history_dir: Option<PathBuf>, state_root: &Path) -> PathBuf {
    history_dir.unwrap_or_else(|| {
        if state_root == Path::new(crate::attachment::pins::DEFAULT_STATE_DIR) {
            PathBuf::from(DEFAULT_DIR)
        } else {
            state_root.join("history")
        }
    })
}

/// The state directory `att` lives under (its state file is
/// `STATE/net/NS/IFACE.json`).
fn state_root(att: &Attachment) -> &Path {
    att.state.ancestors().nth(3).unwrap_or(Path::new("/"))
}

fn dir(att: &Attachment) -> PathBuf {
    let base = root(
        std::env::var_os("SEGBPF_HISTORY_DIR").map(PathBuf::from),
        state_root(att),
    );
    base.join("net").join(att.netns.key()).join(&att.iface)
}

/// Where `att`'s history is kept (for messages).
pub fn dir_of(att: &Attachment) -> PathBuf {
    dir(att)
}

fn keep() -> usize {
    std::env::var("SEGBPF_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 2)
        .unwrap_or(DEFAULT_KEEP)
}

/// The attachment's history, oldest first.
pub fn list(att: &Attachment) -> Vec<Entry> {
    let index = dir(att).join("index.json");
    std::fs::read_to_string(index)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// The entry of generation `generation`, if the history keeps it.
pub fn at(att: &Attachment, generation: u64) -> Option<Entry> {
    list(att).into_iter().find(|e| e.generation == generation)
}

/// Records that generation `generation` (with `overrides` and `roles`) is in force:
/// the text of `text`, which stands for the policy file `source` (the same
/// file, or a copy of an earlier version of it). Drops the oldest entries
/// beyond the limit.
pub fn record(
    att: &Attachment,
    generation: u64,
    text: &Path,
    source: &Path,
    overrides: &BTreeMap<String, Vec<String>>,
    roles: Roles,
) -> Result<(), HistoryError> {
    let d = dir(att);
    crate::attachment::dirs::private_dir(&d).map_err(failed("creating", &d))?;
    let copy = d.join(format!("{generation}.toml"));
    std::fs::copy(text, &copy).map_err(failed("saving", &copy))?;
    let mut entries = list(att);
    entries.retain(|e| e.generation != generation);
    entries.push(Entry {
        generation,
        source: source.display().to_string(),
        copy,
        set_overrides: overrides.clone(),
        restored: None,
        roles: Some(roles),
    });
    while entries.len() > keep() {
        let old = entries.remove(0);
        let _ = std::fs::remove_file(old.copy);
    }
    let tmp = d.join("index.json.tmp");
    let text = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::from);
    text.and_then(|t| std::fs::write(&tmp, t))
        .map_err(failed("writing", &tmp))?;
    let index = d.join("index.json");
    std::fs::rename(&tmp, &index).map_err(failed("writing", &index))
}

/// Notes that generation `generation` restored the policy of generation
/// `restored` (see [`Entry::restored`]).
pub fn mark_restored(att: &Attachment, generation: u64, restored: u64) -> Result<(), HistoryError> {
    let d = dir(att);
    let mut entries = list(att);
    let Some(e) = entries.iter_mut().find(|e| e.generation == generation) else {
        return Ok(());
    };
    e.restored = Some(restored);
    let tmp = d.join("index.json.tmp");
    let text = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::from);
    text.and_then(|t| std::fs::write(&tmp, t))
        .map_err(failed("writing", &tmp))?;
    let index = d.join("index.json");
    std::fs::rename(&tmp, &index).map_err(failed("writing", &index))
}

/// What a rollback from generation `current` restores: generation `to`
/// when given, else the entry before the one `current` stands for (a
/// generation made by a rollback stands for the one it restored, so
/// rolling back twice goes two steps back). Errors say why not.
pub fn rollback_target(entries: &[Entry], current: u64, to: Option<u64>) -> Result<Entry, String> {
    let kept = || {
        entries
            .iter()
            .map(|e| e.generation.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(to) = to {
        if to == current {
            return Err(format!("generation {to} is already in force"));
        }
        return entries
            .iter()
            .find(|e| e.generation == to)
            .cloned()
            .ok_or_else(|| format!("generation {to} is not in the history (kept: {})", kept()));
    }
    let stands_for = entries
        .iter()
        .find(|e| e.generation == current)
        .map_or(current, |e| e.restored.unwrap_or(current));
    let pos = entries
        .iter()
        .position(|e| e.generation == stands_for)
        .ok_or_else(|| {
            format!(
                "generation {stands_for} is not in the history (kept: {})",
                kept()
            )
        })?;
    match pos.checked_sub(1) {
        Some(p) => Ok(entries[p].clone()),
        None => Err(format!(
            "no earlier policy in the history (generation {stands_for} is the oldest kept)"
        )),
    }
}

/// The entry before the one of `generation` (what a rollback restores).
pub fn previous(att: &Attachment, generation: u64) -> Option<Entry> {
    let entries = list(att);
    let pos = entries.iter().position(|e| e.generation == generation)?;
    pos.checked_sub(1).map(|p| entries[p].clone())
}

/// Removes an attachment's history.
pub fn remove(att: &Attachment) {
    let d = dir(att);
    let _ = std::fs::remove_dir_all(&d);
    // `net/NS/` and `net/` go too when nothing else is kept there.
    for parent in d.ancestors().skip(1).take(2) {
        if std::fs::remove_dir(parent).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64, restored: Option<u64>) -> Entry {
        Entry {
            generation,
            source: "p.toml".into(),
            copy: PathBuf::from(format!("{generation}.toml")),
            set_overrides: BTreeMap::new(),
            restored,
            roles: None,
        }
    }

    #[test]
    fn a_second_rollback_goes_further_back() {
        // 1, 2, 3 applied; a rollback from 3 restored 2 as 4.
        let mut h = vec![entry(1, None), entry(2, None), entry(3, None)];
        assert_eq!(rollback_target(&h, 3, None).unwrap().generation, 2);
        h.push(entry(4, Some(2)));
        assert_eq!(rollback_target(&h, 4, None).unwrap().generation, 1);
        h.push(entry(5, Some(1)));
        assert!(
            rollback_target(&h, 5, None)
                .unwrap_err()
                .contains("oldest kept")
        );
        // --to picks any kept generation, not the one in force.
        assert_eq!(rollback_target(&h, 5, Some(3)).unwrap().generation, 3);
        assert!(
            rollback_target(&h, 5, Some(9))
                .unwrap_err()
                .contains("kept: 1, 2, 3, 4, 5")
        );
        assert!(rollback_target(&h, 5, Some(5)).is_err());
    }

    #[test]
    fn history_root_follows_the_environment_and_the_state_root() {
        let p = PathBuf::from;
        let run = Path::new("/run/segbpf");
        assert_eq!(root(None, run), p("/var/lib/segbpf/history"));
        assert_eq!(root(None, Path::new("/tmp/s")), p("/tmp/s/history"));
        assert_eq!(root(Some(p("/h")), Path::new("/tmp/s")), p("/h"));
        assert_eq!(root(Some(p("/h")), run), p("/h"));
    }

    #[test]
    fn the_state_root_is_found_from_the_attachment() {
        let ns = crate::host::netns::Netns::current().unwrap();
        for state in ["/tmp/private-state", "/run/segbpf"] {
            let roots = crate::attachment::pins::Roots {
                bpffs: PathBuf::from("/sys/fs/bpf/x"),
                state: PathBuf::from(state),
            };
            assert_eq!(state_root(&roots.attachment("eth9", &ns)), Path::new(state));
        }
    }
}
