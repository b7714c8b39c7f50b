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
//! Each entry's live set edits are kept in `GENERATION.sets.json`, named
//! with the hash of its bytes by the compact `index.json`; an entry whose
//! file is missing or changed is withdrawn with every older one.

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

/// Where an entry's live set edits are kept: a file beside the index
/// (`GENERATION.sets.json`) and the hash of its bytes. The index then
/// holds no members, so recording a set edit writes the new members once
/// instead of rewriting every kept generation's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SetsFile {
    /// The file's name in the history directory.
    name: String,
    /// The hash of its contents: [`crate::attachment::setindex::hash_policy`]
    /// when `fast`, else (entries of earlier versions)
    /// [`crate::attachment::setindex::hash_bytes`].
    hash: u64,
    /// Which hash `hash` is (SipHash of 1,000,000 members took about 25 ms
    /// of a set edit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fast: bool,
    /// The file is the state's live set edits file (its text-lines form,
    /// `crate::attachment::state::parse_live`), linked, not JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lines: bool,
}

/// An entry as the index stores it: its set edits inline (entries of
/// earlier versions) or in a [`SetsFile`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    entry: Entry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sets_file: Option<SetsFile>,
}

/// The index as stored (set edits in their files not read).
fn read_index(d: &Path) -> Vec<Stored> {
    std::fs::read(d.join("index.json"))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

fn write_index(d: &Path, entries: &[Stored]) -> Result<(), HistoryError> {
    let tmp = d.join("index.json.tmp");
    let text = serde_json::to_vec(entries).map_err(std::io::Error::from);
    text.and_then(|t| std::fs::write(&tmp, t))
        .map_err(failed("writing", &tmp))?;
    let index = d.join("index.json");
    std::fs::rename(&tmp, &index).map_err(failed("writing", &index))
}

/// The set edits of a stored entry; None when its file is missing, not
/// the file recorded (hash) or not readable.
fn load_sets(d: &Path, s: &Stored) -> Option<BTreeMap<String, Vec<String>>> {
    let Some(f) = &s.sets_file else {
        return Some(s.entry.set_overrides.clone());
    };
    if f.name.contains('/') {
        return None;
    }
    let bytes = std::fs::read(d.join(&f.name)).ok()?;
    let hash = if f.fast {
        crate::attachment::setindex::hash_policy(&bytes)
    } else {
        crate::attachment::setindex::hash_bytes(&bytes)
    };
    if hash != f.hash {
        return None;
    }
    if f.lines {
        return crate::attachment::state::parse_live(&bytes);
    }
    serde_json::from_slice(&bytes).ok()
}

/// The entries of the index in `d`, oldest first. An entry whose set
/// edits cannot be read back exactly (file missing or changed) is not
/// offered, nor is anything older: a rollback to it, or past it to an
/// older one, could not restore what was in force.
fn entries_in(d: &Path) -> Vec<Entry> {
    let stored = read_index(d);
    let mut out = Vec::with_capacity(stored.len());
    for s in &stored {
        if let Some(sets) = load_sets(d, s) {
            out.push(Entry {
                set_overrides: sets,
                ..s.entry.clone()
            });
        } else {
            tracing::warn!(
                "history of generation {} in {}: its set edits are missing or changed; \
                 it and older generations cannot be restored",
                s.entry.generation,
                d.display()
            );
            out.clear();
        }
    }
    out
}

/// The attachment's history, oldest first.
pub fn list(att: &Attachment) -> Vec<Entry> {
    entries_in(&dir(att))
}

/// The entry of generation `generation`, if the history keeps it.
pub fn at(att: &Attachment, generation: u64) -> Option<Entry> {
    list(att).into_iter().find(|e| e.generation == generation)
}

/// Records that generation `generation` (with `overrides` and `roles`) is in force:
/// the text of `text`, which stands for the policy file `source` (the same
/// file, or a copy of an earlier version of it). Drops the oldest entries
/// beyond the limit. `live`: the state's live set edits file holding
/// `overrides` and its hash (`crate::attachment::state::LiveRef`), linked
/// (or copied) instead of writing the members again.
pub fn record(
    att: &Attachment,
    generation: u64,
    text: &Path,
    source: &Path,
    overrides: &BTreeMap<String, Vec<String>>,
    live: Option<(PathBuf, u64)>,
    roles: Roles,
) -> Result<(), HistoryError> {
    let d = dir(att);
    crate::attachment::dirs::private_dir(&d).map_err(failed("creating", &d))?;
    let copy = d.join(format!("{generation}.toml"));
    std::fs::copy(text, &copy).map_err(failed("saving", &copy))?;
    let sets_file = if overrides.is_empty() {
        None
    } else if let Some((file, hash)) = live {
        let name = format!("{generation}.live");
        let path = d.join(&name);
        let _ = std::fs::remove_file(&path);
        std::fs::hard_link(&file, &path)
            .or_else(|_| std::fs::copy(&file, &path).map(|_| ()))
            .map_err(failed("saving", &path))?;
        Some(SetsFile {
            name,
            hash,
            fast: true,
            lines: true,
        })
    } else {
        let name = format!("{generation}.sets.json");
        let path = d.join(&name);
        let tmp = d.join(format!("{name}.tmp"));
        let bytes = serde_json::to_vec(overrides).map_err(std::io::Error::from);
        bytes
            .and_then(|b| std::fs::write(&tmp, &b).map(|()| b))
            .and_then(|b| std::fs::rename(&tmp, &path).map(|()| b))
            .map(|b| SetsFile {
                name,
                hash: crate::attachment::setindex::hash_policy(&b),
                fast: true,
                lines: false,
            })
            .map(Some)
            .map_err(failed("saving", &path))?
    };
    let mut entries = read_index(&d);
    entries.retain(|e| e.entry.generation != generation);
    entries.push(Stored {
        entry: Entry {
            generation,
            source: source.display().to_string(),
            copy,
            set_overrides: BTreeMap::new(),
            restored: None,
            roles: Some(roles),
        },
        sets_file,
    });
    while entries.len() > keep() {
        let old = entries.remove(0);
        let _ = std::fs::remove_file(old.entry.copy);
        if let Some(f) = old.sets_file.filter(|f| !f.name.contains('/')) {
            let _ = std::fs::remove_file(d.join(f.name));
        }
    }
    write_index(&d, &entries)
}

/// Notes that generation `generation` restored the policy of generation
/// `restored` (see [`Entry::restored`]).
pub fn mark_restored(att: &Attachment, generation: u64, restored: u64) -> Result<(), HistoryError> {
    let d = dir(att);
    let mut entries = read_index(&d);
    let Some(e) = entries
        .iter_mut()
        .find(|e| e.entry.generation == generation)
    else {
        return Ok(());
    };
    e.entry.restored = Some(restored);
    write_index(&d, &entries)
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
    if entries.is_empty() {
        return Err(format!(
            "there is no history: no policy was kept, so there is nothing to roll back to (generation {current} stays in force)"
        ));
    }
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
    fn a_rollback_without_history_says_there_is_none() {
        for to in [None, Some(1)] {
            let e = rollback_target(&[], 2, to).unwrap_err();
            assert!(e.contains("there is no history"), "{e}");
            assert!(!e.contains("kept: )"), "{e}");
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

    /// Set edits are kept beside the index and read back exactly; a
    /// missing or changed file withdraws its generation and older ones
    /// (a rollback to them could not restore what was in force), and an
    /// index of the earlier form (members inline) still reads.
    #[test]
    fn set_edits_beside_the_index_read_back_or_withdraw_the_entry() {
        let root = std::env::temp_dir().join(format!("segbpf-history-test-{}", std::process::id()));
        let ns = crate::host::netns::Netns::current().unwrap();
        let roots = crate::attachment::pins::Roots {
            bpffs: PathBuf::from("/sys/fs/bpf/x"),
            state: root.clone(),
        };
        let att = roots.attachment("eth9", &ns);
        let d = dir(&att);
        // `$SEGBPF_HISTORY_DIR` would move the history out of the root.
        if !d.starts_with(&root) {
            return;
        }
        let policy = root.join("p.toml");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(&policy, "version = 1\n").unwrap();
        let roles = || Roles {
            roles: vec!["r".into()],
            role_args: Vec::new(),
        };
        let sets = |n: usize| {
            BTreeMap::from([(
                "peers".to_string(),
                (0..n).map(|i| format!("10.0.0.{i}")).collect::<Vec<_>>(),
            )])
        };
        for g in 1..=3u64 {
            let o = if g == 1 {
                BTreeMap::new()
            } else {
                sets(g as usize)
            };
            record(&att, g, &policy, &policy, &o, None, roles()).unwrap();
        }
        let got = list(&att);
        assert_eq!(
            got.iter().map(|e| e.generation).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(got[0].set_overrides.is_empty());
        assert_eq!(got[1].set_overrides, sets(2));
        assert_eq!(got[2].set_overrides, sets(3));
        let index = std::fs::read_to_string(d.join("index.json")).unwrap();
        assert!(
            !index.contains("10.0.0.1"),
            "members not in the index: {index}"
        );
        // Changed: generation 2 and the older 1 are withdrawn.
        std::fs::write(
            d.join("2.sets.json"),
            r#"{"peers":["10.0.0.0","10.0.0.9"]}"#,
        )
        .unwrap();
        assert_eq!(
            list(&att).iter().map(|e| e.generation).collect::<Vec<_>>(),
            [3]
        );
        assert!(rollback_target(&list(&att), 3, None).is_err());
        // Missing: nothing is offered.
        std::fs::remove_file(d.join("3.sets.json")).unwrap();
        assert!(list(&att).is_empty());
        // A later record keeps working, and the mark of a rollback too.
        record(&att, 4, &policy, &policy, &sets(4), None, roles()).unwrap();
        mark_restored(&att, 4, 1).unwrap();
        let got = list(&att);
        assert_eq!(
            got.last().map(|e| (e.generation, e.restored)),
            Some((4, Some(1)))
        );
        assert_eq!(got.last().unwrap().set_overrides, sets(4));
        // The earlier form: members inline in the index.
        let inline = vec![Entry {
            set_overrides: sets(5),
            ..entry(5, None)
        }];
        std::fs::write(d.join("index.json"), serde_json::to_vec(&inline).unwrap()).unwrap();
        assert_eq!(list(&att), inline);
        // The form before the fast hash: a sets file named by its SipHash
        // (no `fast`) still reads; altered, it is withdrawn.
        let bytes = serde_json::to_vec(&sets(6)).unwrap();
        std::fs::write(d.join("6.sets.json"), &bytes).unwrap();
        let sip = crate::attachment::setindex::hash_bytes(&bytes);
        let mut e6 = serde_json::to_value(entry(6, None)).unwrap();
        e6["sets_file"] = serde_json::json!({"name": "6.sets.json", "hash": sip});
        std::fs::write(d.join("index.json"), serde_json::to_vec(&[&e6]).unwrap()).unwrap();
        assert_eq!(
            list(&att).last().map(|e| e.set_overrides.clone()),
            Some(sets(6))
        );
        e6["sets_file"]["hash"] = serde_json::json!(sip ^ 1);
        std::fs::write(d.join("index.json"), serde_json::to_vec(&[&e6]).unwrap()).unwrap();
        assert!(list(&att).is_empty());
        // The state's live file, linked: read back; altered, withdrawn.
        let bytes = crate::attachment::state::live_bytes(&sets(7)).unwrap();
        let live = root.join("eth9.live.x");
        std::fs::write(&live, &bytes).unwrap();
        let hash = crate::attachment::setindex::hash_policy(&bytes);
        record(
            &att,
            7,
            &policy,
            &policy,
            &sets(7),
            Some((live.clone(), hash)),
            roles(),
        )
        .unwrap();
        assert_eq!(
            list(&att).last().map(|e| e.set_overrides.clone()),
            Some(sets(7))
        );
        std::fs::remove_file(&live).unwrap();
        assert_eq!(
            list(&att).last().map(|e| e.generation),
            Some(7),
            "a link, not the name"
        );
        std::fs::write(d.join("7.live"), b"SEGLIVE1\n").unwrap();
        assert!(list(&att).is_empty());
        let _ = std::fs::remove_dir_all(&root);
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
