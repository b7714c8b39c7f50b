//! Where an attachment lives: its bpffs pin directory (program, link, maps)
//! and its state file (policy path, roles, rule table) under /run, with the
//! sidecar files next to it.
//!
//! An attachment is (network namespace, interface); the namespace is the
//! kernel's ([`crate::host::netns::Netns`]), keyed by its inode. Layout, with
//! `ROOT` = `$SEGBPF_BPFFS` (default `/sys/fs/bpf/segbpf`), `STATE` =
//! `$SEGBPF_STATE_DIR` (default `/run/segbpf`) and `NS` the namespace's inode:
//! - `ROOT/net/NS/IFACE/`: `prog_xdp`, `link_xdp`, `prog_tc`, `link_tc` and
//!   one file per map (`SEG_*`) except the connection tables;
//! - `ROOT/net/NS/conntrack:COOKIE/`: the connection tables
//!   (`segbpf_common::SHARED_MAPS`), shared by every attachment of the
//!   namespace whose `SO_NETNS_COOKIE` is `COOKIE` (so a namespace that
//!   reuses a dead one's inode never finds its tables; `:` is never in an
//!   interface name); removed with the namespace's last attachment;
//! - `STATE/net/NS/IFACE.json`, the state, and beside it
//!   `IFACE.update.lock` (one change at a time), `IFACE.reader.lock` (one
//!   event reader), `IFACE.next.json` (a swap in progress), `IFACE.maps`
//!   (what the policy slot in force holds, for incremental writes),
//!   `IFACE.confirm.json` and `IFACE.confirm.restore.toml` (the guard),
//!   `IFACE.guard.json` (how the guard's restore goes) and `IFACE.guard.log`
//!   (its log lines, outside systemd); `STATE/net/NS/conntrack.lock`
//!   serialises creating, joining and removing the namespace's shared tables.
//!
//! Every directory segbpf makes is private ([`private_dir`]: mode 0700,
//! owned by the user running segbpf, normally root) and `segbpf` runs with
//! umask 077, so its state, history, lock files and pins are 0600: no other
//! local user can read them or take their locks.
//!
//! This module is the owner of that layout: other modules ask an
//! [`Attachment`] for a path, or to remove its files, and never build one
//! themselves. It reads the state file only for the namespace cookie it
//! records ([`recorded_netns_cookie`]); what the state says is
//! [`crate::attachment::state`]'s.

use std::path::{Path, PathBuf};

use crate::{attachment::dirs::private_dir, host::netns::Netns};

/// Name prefix of a namespace's shared-tables directory (then its cookie).
const SHARED_PREFIX: &str = "conntrack:";

pub use crate::attachment::dirs::{DEFAULT_BPFFS, DEFAULT_STATE_DIR};

/// Errors about where pins live.
#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    /// The pin root is not on a bpffs, and mounting one here would not outlive this command.
    #[error(
        "{0} is not on a bpffs in this mount namespace, and a bpffs mounted here would vanish with it \
         (and the firewall with it); `ip netns exec` gives commands a private /sys. \
         Use `segbpf --netns NAME ...` or `nsenter --net=/run/netns/NAME segbpf ...`, \
         or set SEGBPF_BPFFS to a bpffs shared with the host"
    )]
    PrivateMountNamespace(PathBuf),
    /// Mounting or creating the pin root failed.
    #[error("preparing the pin root {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The two roots: bpffs directory for pins and directory for state files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roots {
    /// bpffs directory (`$SEGBPF_BPFFS`, default [`DEFAULT_BPFFS`]).
    pub bpffs: PathBuf,
    /// State directory (`$SEGBPF_STATE_DIR`, default [`DEFAULT_STATE_DIR`]).
    pub state: PathBuf,
}

impl Roots {
    /// Roots from the environment, or the defaults.
    pub fn from_env() -> Self {
        let [bpffs, state] = crate::attachment::dirs::roots_from_env();
        Roots { bpffs, state }
    }

    /// The attachment of `iface` in `netns`.
    pub fn attachment(&self, iface: &str, netns: &Netns) -> Attachment {
        let key = netns.key();
        Attachment {
            iface: iface.to_string(),
            netns: netns.clone(),
            dir: self.bpffs.join("net").join(&key).join(iface),
            state: self
                .state
                .join("net")
                .join(&key)
                .join(format!("{iface}.json")),
            bpffs_root: self.bpffs.clone(),
        }
    }

    /// Every attachment of `netns` that has a pin directory.
    pub fn list(&self, netns: &Netns) -> Vec<Attachment> {
        let parent = self.bpffs.join("net").join(netns.key());
        let mut names: Vec<String> = std::fs::read_dir(&parent)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    // Interface names never hold `:`; the shared tables' directory does.
                    .filter(|n| !n.contains(':'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|n| self.attachment(n, netns)).collect()
    }

    /// Pin directories left by segbpf versions that keyed attachments by
    /// name (`ROOT/ifaces`, `ROOT/netns`): detach them with that version.
    pub fn legacy_layout(&self) -> Vec<PathBuf> {
        ["ifaces", "netns"]
            .iter()
            .map(|d| self.bpffs.join(d))
            .filter(|p| p.is_dir())
            .collect()
    }

    /// Makes sure a bpffs is mounted at `/sys/fs/bpf` when the pin root is
    /// under it, and creates the pin root. Outside the initial mount
    /// namespace (`ip netns exec`, containers) a missing bpffs is an error,
    /// not a mount: a bpffs mounted there would be released, and with it
    /// every pinned link, when that namespace goes away.
    pub fn ensure_bpffs(&self) -> Result<(), PinsError> {
        self.ensure_bpffs_mounted()?;
        private_dir(&self.bpffs).map_err(|source| PinsError::Io {
            path: self.bpffs.clone(),
            source,
        })
    }

    /// [`Self::ensure_bpffs`] without making the pin root: for a command
    /// that makes it only once it is sure to change something (a refused
    /// command leaves nothing behind).
    pub fn ensure_bpffs_mounted(&self) -> Result<(), PinsError> {
        let base = Path::new("/sys/fs/bpf");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PinsError::Io { path, source }
        };
        if self.bpffs.starts_with(base) && !is_bpffs(base) {
            if !crate::host::netns::in_initial_mount_namespace() {
                return Err(PinsError::PrivateMountNamespace(self.bpffs.clone()));
            }
            nix::mount::mount(
                Some("bpf"),
                base,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(std::io::Error::from)
            .map_err(io(base))?;
        }
        Ok(())
    }

    /// Whether this command can see the pins: false only where a missing
    /// bpffs would be private to this mount namespace ([`Self::ensure_bpffs`]).
    pub fn check_visible(&self) -> Result<(), PinsError> {
        let base = Path::new("/sys/fs/bpf");
        if self.bpffs.starts_with(base)
            && !is_bpffs(base)
            && !crate::host::netns::in_initial_mount_namespace()
        {
            return Err(PinsError::PrivateMountNamespace(self.bpffs.clone()));
        }
        Ok(())
    }
}

/// The paths of one attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Interface name.
    pub iface: String,
    /// The network namespace it lives in.
    pub netns: Netns,
    /// Pin directory.
    pub dir: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// The bpffs root (empty parent directories are removed up to and including it).
    pub bpffs_root: PathBuf,
}

/// Which of an attachment's exclusive locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// One change at a time: attach, reload, set, rollback, the guard's restore, detach.
    Update,
    /// One reader of the event ring at a time.
    Reader,
    /// One drainer of the denied tables (and writer of the observed
    /// store and the pairs file) at a time: the flow log's primary.
    FlowLog,
}

impl Attachment {
    /// The attachment of `iface` in `netns` under the roots from the environment.
    pub fn new(iface: &str, netns: &Netns) -> Self {
        Roots::from_env().attachment(iface, netns)
    }

    /// How messages name it: `eth1` or `eth1 (netns NAME)`.
    pub fn describe(&self) -> String {
        if self.netns.is_initial() {
            self.iface.clone()
        } else {
            format!("{} ({})", self.iface, self.netns.describe())
        }
    }

    /// Pin path of a map: in the attachment's directory, or in its
    /// namespace's shared directory for the connection tables.
    pub fn map(&self, name: &str) -> PathBuf {
        if segbpf_common::SHARED_MAPS.contains(&name)
            || segbpf_common::LEGACY_SHARED_MAPS.contains(&name)
        {
            self.shared_dir().join(name)
        } else {
            self.dir.join(name)
        }
    }

    /// The directory of the namespace's shared connection tables
    /// (`ROOT/net/NS/conntrack:COOKIE`).
    pub fn shared_dir(&self) -> PathBuf {
        self.ns_dir()
            .join(format!("{SHARED_PREFIX}{}", self.netns.cookie))
    }

    /// The namespace's pin directory (`ROOT/net/NS`).
    fn ns_dir(&self) -> PathBuf {
        self.dir
            .parent()
            .map_or_else(|| self.dir.clone(), Path::to_path_buf)
    }

    /// Takes the namespace's lock on its shared tables (creating, joining
    /// and removing them), waiting for it; released when dropped.
    pub fn lock_shared(&self) -> std::io::Result<std::fs::File> {
        let dir = self.state.parent().unwrap_or(Path::new("/"));
        private_dir(dir)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("conntrack.lock"))?;
        f.lock()?;
        Ok(f)
    }

    /// The live attachments of the namespace that use its shared tables.
    pub fn sharing(&self) -> Vec<Attachment> {
        Roots {
            bpffs: self.bpffs_root.clone(),
            state: self
                .state
                .ancestors()
                .nth(3)
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
        }
        .list(&self.netns)
        .into_iter()
        .filter(Attachment::is_attached)
        .collect()
    }

    /// Removes the namespace's shared tables once no live attachment of
    /// the namespace uses them, and any left by a dead namespace that had
    /// the same inode. The caller holds [`Self::lock_shared`]. Returns
    /// whether this namespace's tables were removed.
    pub fn release_shared(&self) -> std::io::Result<bool> {
        let mine = self.shared_dir();
        let mut removed = false;
        let entries = match std::fs::read_dir(self.ns_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let in_use = !self.sharing().is_empty();
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            let name = e.file_name();
            if !name.to_string_lossy().starts_with(SHARED_PREFIX) {
                continue;
            }
            if path == mine && in_use {
                continue;
            }
            remove_dir_if_exists(&path)?;
            removed |= path == mine;
        }
        tidy_parents(&mine, &self.bpffs_root, true);
        Ok(removed)
    }

    /// Pin path of the XDP program.
    pub fn prog_xdp(&self) -> PathBuf {
        self.dir.join("prog_xdp")
    }

    /// Pin path of the XDP link.
    pub fn link_xdp(&self) -> PathBuf {
        self.dir.join("link_xdp")
    }

    /// Pin path of the TC egress program.
    pub fn prog_tc(&self) -> PathBuf {
        self.dir.join("prog_tc")
    }

    /// Pin path of the TC egress (TCX) link.
    pub fn link_tc(&self) -> PathBuf {
        self.dir.join("link_tc")
    }

    /// A sidecar file next to the state file (`IFACE.EXT`).
    fn sidecar(&self, ext: &str) -> PathBuf {
        self.state.with_extension(ext)
    }

    /// The state written by a swap in progress (`IFACE.next.json`).
    pub fn next_state(&self) -> PathBuf {
        self.sidecar("next.json")
    }

    /// What the policy slot in force holds (`IFACE.maps`, see
    /// [`crate::attachment::delta::Snapshot`]).
    pub fn snapshot(&self) -> PathBuf {
        self.sidecar("maps")
    }

    /// The compact compiled form for fast set edits (`IFACE.sets`, see
    /// [`crate::attachment::setindex::SetIndex`]).
    pub fn set_index(&self) -> PathBuf {
        self.sidecar("sets")
    }

    /// The outcome of the last policy change (for the metrics).
    pub fn last_change(&self) -> PathBuf {
        self.sidecar("reload.json")
    }

    /// The guard's record of a change awaiting confirmation.
    pub fn confirm_record(&self) -> PathBuf {
        self.sidecar("confirm.json")
    }

    /// The policy text the guard restores.
    pub fn confirm_restore(&self) -> PathBuf {
        self.sidecar("confirm.restore.toml")
    }

    /// How the guard's restore goes (its pid, attempts, last error), for `status`.
    pub fn guard_record(&self) -> PathBuf {
        self.sidecar("guard.json")
    }

    /// The guard's log lines when it has no journal to write to.
    pub fn guard_log(&self) -> PathBuf {
        self.sidecar("guard.log")
    }

    /// The observed store: hourly files of denied and audit records
    /// (`IFACE.observed/`), for `segbpf suggest`.
    pub fn observed_dir(&self) -> PathBuf {
        self.sidecar("observed")
    }

    /// The (peer, protocol, port) pairs the flow log has seen, for its
    /// `new_pair` field.
    pub fn pairs_file(&self) -> PathBuf {
        self.sidecar("pairs.json")
    }

    /// Path of one of the attachment's lock files.
    pub fn lock_path(&self, kind: LockKind) -> PathBuf {
        self.sidecar(match kind {
            LockKind::Update => "update.lock",
            LockKind::Reader => "reader.lock",
            LockKind::FlowLog => "flowlog.lock",
        })
    }

    /// Opens (creating it and its private directory) one of the
    /// attachment's lock files, unlocked.
    pub fn lock_file(&self, kind: LockKind) -> std::io::Result<std::fs::File> {
        if let Some(dir) = self.state.parent() {
            private_dir(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.lock_path(kind))
    }

    /// Takes one of the attachment's locks, waiting for it; released when
    /// the returned file is dropped (or the process dies).
    pub fn lock(&self, kind: LockKind) -> std::io::Result<std::fs::File> {
        let f = self.lock_file(kind)?;
        f.lock()?;
        Ok(f)
    }

    /// Whether the attachment exists: its link is pinned, and its state
    /// (if any) belongs to this namespace, not to a dead one that had the
    /// same inode.
    pub fn is_attached(&self) -> bool {
        self.link_xdp().exists() && !self.is_stale()
    }

    /// Whether the files belong to a namespace that is gone: the state
    /// records another namespace cookie.
    pub fn is_stale(&self) -> bool {
        recorded_netns_cookie(&self.state).is_some_and(|c| c != self.netns.cookie)
    }

    /// Removes the pin directory, state file and sidecars (detaching the
    /// program when no process holds the link), but not the observed store
    /// before it expires. Missing files are not an error.
    pub fn remove(&self) -> std::io::Result<()> {
        // Files of a namespace that is gone: its store goes too (a new
        // namespace with the same inode must not inherit what it observed).
        let stale = self.is_stale();
        remove_dir_if_exists(&self.dir)?;
        match std::fs::remove_file(&self.state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for path in [
            self.next_state(),
            self.snapshot(),
            self.set_index(),
            self.last_change(),
            self.lock_path(LockKind::Reader),
            self.lock_path(LockKind::FlowLog),
            self.pairs_file(),
            self.confirm_record(),
            self.confirm_restore(),
            self.guard_record(),
            self.guard_log(),
        ]
        .into_iter()
        .chain(rules_files(&self.state))
        .chain(live_files(&self.state))
        {
            let _ = std::fs::remove_file(path);
        }
        // The observed store stays until it expires (`suggest` after a
        // detach); what has expired goes now.
        if stale {
            remove_dir_if_exists(&self.observed_dir())?;
        } else {
            crate::attachment::observed::expire(&self.observed_dir())?;
        }
        // The update lock stays: a command waiting on it must find the
        // same file, or two could hold "the" lock at once.
        // Tidy empty parents up to the roots; remove_dir fails on non-empty ones.
        tidy_parents(&self.dir, &self.bpffs_root, true);
        if let Some(root) = self
            .state
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            tidy_parents(&self.state, root, false);
        }
        Ok(())
    }
}

/// The rules file with hash `hash` of the attachment whose state file is
/// `state` (`IFACE.json`): `IFACE.rules.HASH` beside it.
pub fn rules_path(state: &Path, hash: u64) -> PathBuf {
    state.with_extension(format!("rules.{hash:016x}"))
}

/// The live set edits file with hash `hash` of the attachment whose state
/// file is `state` (`IFACE.json`): `IFACE.live.HASH` beside it.
pub fn live_path(state: &Path, hash: u64) -> PathBuf {
    state.with_extension(format!("live.{hash:016x}"))
}

/// The live set edits files beside the state file `state` (any
/// generation's).
pub fn live_files(state: &Path) -> Vec<PathBuf> {
    hashed_files(state, "live")
}

/// The rules files beside the state file `state` (any generation's).
pub fn rules_files(state: &Path) -> Vec<PathBuf> {
    hashed_files(state, "rules")
}

/// The files `STEM.KIND.HASH` beside the state file `state`.
fn hashed_files(state: &Path, kind: &str) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (state.parent(), state.file_stem().and_then(|s| s.to_str()))
    else {
        return Vec::new();
    };
    let prefix = format!("{stem}.{kind}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            })
        })
        .map(|e| e.path())
        .collect()
}

/// Removes the empty parents of `path` that lie under `root` (and `root`
/// itself when `inclusive`); stops at the first one that is not empty.
fn tidy_parents(path: &Path, root: &Path, inclusive: bool) {
    let mut parent = path.parent();
    while let Some(p) = parent {
        let inside = p.starts_with(root) && (inclusive || p != root);
        if !inside || std::fs::remove_dir(p).is_err() {
            break;
        }
        parent = p.parent();
    }
}

/// The namespace cookie recorded in a state file, if it has one: files
/// whose cookie is not their namespace's own were left by a namespace that
/// is gone.
pub fn recorded_netns_cookie(state_file: &Path) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        netns_cookie: u64,
    }
    let text = std::fs::read_to_string(state_file).ok()?;
    let head: Head = serde_json::from_str(&text).ok()?;
    (head.netns_cookie != 0).then_some(head.netns_cookie)
}

fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    #[allow(
        clippy::unnecessary_cast,
        reason = "the field's integer type differs between architectures"
    )]
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}
