//! The cgroup tree: where cgroup v2 is mounted, cgroup ids (the kernel's
//! id of a cgroup is its directory's inode number on cgroupfs), absolute
//! levels, and the classification of the cgroups the programs must know:
//!
//! * a *guard* is the cgroup root or a proper ancestor of a service's
//!   cgroup; its children without an entry are held by the programs until
//!   classified (so a service's re-created cgroup is never "no service");
//! * every child of a guard gets an entry: the service whose cgroup it is
//!   or lies in, else none;
//! * a cgroup below an entry inherits it (no entry needed).
//!
//! A [`Watcher`] reports changes below the guards (inotify), so the
//! attachment reclassifies within milliseconds of a `mkdir`.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Errors about the cgroup tree.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem in this mount namespace.
    #[error(
        "no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/self/mountinfo); mount one or name it with --cgroup-root"
    )]
    NoCgroup2,
    /// The cgroup root is not a directory on a cgroup2 filesystem.
    #[error("{} is not a cgroup v2 directory: {reason}", path.display())]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The absolute level of this cgroup namespace's root could not be
    /// found (inside a cgroup namespace the paths seen start at its root,
    /// not at the hierarchy's; the level comes from the kernel's probe,
    /// `attachment::services_level`).
    #[error(
        "the absolute cgroup level of this cgroup namespace's root is unknown ({reason}): the services attachments cannot be read or changed from here; run the command on the host, or where cgroup2 is mounted at this cgroup namespace's root"
    )]
    NsLevel {
        /// Why.
        reason: String,
    },
    /// Reading the tree failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 mount: its mount point and the hierarchy path it shows
/// (`/` outside a cgroup namespace).
pub fn cgroup2_mount() -> Result<(PathBuf, String), CgroupError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        if f.len() >= 5 {
            return Ok((PathBuf::from(unescape(f[4])), unescape(f[3])));
        }
    }
    Err(CgroupError::NoCgroup2)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, a
/// constant of the kernel's).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Whether this process runs in the initial cgroup namespace (asked of
/// the kernel: `/proc/self/ns/cgroup`), where every cgroup path starts at
/// the hierarchy's root.
pub fn in_initial_cgroup_ns() -> Result<bool, CgroupError> {
    let ns = std::fs::metadata("/proc/self/ns/cgroup").map_err(|source| CgroupError::Io {
        path: "/proc/self/ns/cgroup".into(),
        source,
    })?;
    Ok(ns.ino() == INIT_CGROUP_NS_INO)
}

/// This process's cgroup v2 path as its cgroup namespace shows it (the
/// `0::PATH` line of `/proc/self/cgroup`).
pub fn own_cgroup() -> Result<String, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| CgroupError::Io {
        path: "/proc/self/cgroup".into(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| CgroupError::NsLevel {
            reason: "no `0::` line in /proc/self/cgroup".into(),
        })
}

/// The number of components of a cgroup path (`/` has none).
pub fn depth(path: &str) -> u32 {
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// The kernel's id of the cgroup at `dir`.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// The directory the services are enforced below, with its id and level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoot {
    /// The directory (on cgroup2).
    pub dir: PathBuf,
    /// Its cgroup id.
    pub id: u64,
    /// Its absolute level in the hierarchy (0: the hierarchy's root).
    pub level: u32,
}

impl CgroupRoot {
    /// `dir`, or the cgroup v2 mount when `None`, in the initial cgroup
    /// namespace only (elsewhere the levels seen are not absolute: see
    /// `attachment::services_level::open_root`, which asks the kernel).
    pub fn open(dir: Option<&Path>) -> Result<Self, CgroupError> {
        if !in_initial_cgroup_ns()? {
            return Err(CgroupError::NsLevel {
                reason: "this process runs in a cgroup namespace other than the host's".into(),
            });
        }
        Self::open_at(dir, 0)
    }

    /// `dir`, or the cgroup v2 mount when `None`, with `ns_root_level`
    /// the absolute level of this process's cgroup namespace's root (0 in
    /// the initial namespace).
    pub fn open_at(dir: Option<&Path>, ns_root_level: u32) -> Result<Self, CgroupError> {
        let (mount, mount_root) = cgroup2_mount()?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => mount.clone(),
        };
        let bad = |reason: String| CgroupError::NotCgroup2 {
            path: dir.clone(),
            reason,
        };
        let st = nix::sys::statfs::statfs(&dir).map_err(|e| bad(e.to_string()))?;
        if st.filesystem_type().0 as i64 != CGROUP2_MAGIC {
            return Err(bad("not on a cgroup2 filesystem".into()));
        }
        let canon = dir.canonicalize().map_err(|e| bad(e.to_string()))?;
        let mount_c = mount.canonicalize().map_err(|e| bad(e.to_string()))?;
        let rel = canon
            .strip_prefix(&mount_c)
            .map_err(|_| bad(format!("not below the cgroup v2 mount {}", mount.display())))?;
        let level = ns_root_level + depth(&mount_root) + rel.components().count() as u32;
        let id = cgroup_id(&canon).map_err(|e| bad(e.to_string()))?;
        Ok(CgroupRoot {
            dir: canon,
            id,
            level,
        })
    }
}

/// One cgroup the programs know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path below the root ("" for the root).
    pub rel: String,
    /// Service id, 0 for none.
    pub svc: u8,
    /// An ancestor of a service's cgroup (or the root).
    pub guard: bool,
}

/// The classified tree: cgroup id -> entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classification {
    /// Entries by cgroup id.
    pub entries: BTreeMap<u64, Entry>,
    /// Guard directories that exist (to watch).
    pub guards: Vec<PathBuf>,
    /// Deepest absolute level of a service's cgroup.
    pub max_level: u32,
}

/// Whether the programs read the cgroup `rel` below `root` when they look
/// for a socket's service: its absolute level is at most
/// `segbpf_common::SVC_MAX_LEVEL` (they walk a socket's ancestors from the
/// hierarchy's root down to that level).
pub fn reachable(root: &CgroupRoot, rel: &str) -> bool {
    root.level + rel.split('/').filter(|c| !c.is_empty()).count() as u32
        <= segbpf_common::SVC_MAX_LEVEL
}

/// Whether `rel` is `prefix` or lies below it.
fn within(rel: &str, prefix: &str) -> bool {
    rel == prefix || rel.starts_with(&format!("{prefix}/"))
}

/// Classifies the tree below `root` for `services` (id, path below the root).
///
/// A service whose cgroup lies deeper than the programs read
/// ([`reachable`]) is left out: it is never classified, so nothing calls
/// its cgroup a service's (attach and reload refuse such a policy).
pub fn classify(root: &CgroupRoot, services: &[(u8, String)]) -> Classification {
    let services: Vec<(u8, String)> = services
        .iter()
        .filter(|(_, rel)| reachable(root, rel))
        .cloned()
        .collect();
    let services = services.as_slice();
    let mut guards: BTreeSet<String> = BTreeSet::new();
    guards.insert(String::new());
    let mut max_level = root.level;
    for (_, rel) in services {
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            guards.insert(parts[..i].join("/"));
        }
        max_level = max_level.max(root.level + parts.len() as u32);
    }
    let svc_of = |rel: &str| {
        services
            .iter()
            .filter(|(_, s)| !rel.is_empty() && within(rel, s))
            .max_by_key(|(_, s)| s.len())
            .map_or(0, |(id, _)| *id)
    };
    let mut out = Classification {
        max_level,
        ..Classification::default()
    };
    for g in &guards {
        let dir = if g.is_empty() {
            root.dir.clone()
        } else {
            root.dir.join(g)
        };
        let Ok(id) = cgroup_id(&dir) else {
            continue;
        };
        out.guards.push(dir.clone());
        out.entries.insert(
            id,
            Entry {
                rel: g.clone(),
                svc: svc_of(g),
                guard: true,
            },
        );
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let rel = if g.is_empty() {
                name
            } else {
                format!("{g}/{name}")
            };
            let Ok(cid) = cgroup_id(&e.path()) else {
                continue;
            };
            out.entries.insert(
                cid,
                Entry {
                    svc: svc_of(&rel),
                    guard: guards.contains(&rel),
                    rel,
                },
            );
        }
    }
    out
}

/// inotify on the guard directories: reports that a cgroup was made or
/// removed below one of them.
pub struct Watcher {
    fd: std::os::fd::OwnedFd,
    watched: BTreeSet<PathBuf>,
}

impl Watcher {
    /// A watcher with nothing watched yet.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Watcher {
            fd,
            watched: BTreeSet::new(),
        })
    }

    /// Watches every directory of `dirs` (again: a directory re-created
    /// at the same path is a new inode and needs a new watch; adding a
    /// watch twice is harmless).
    pub fn watch(&mut self, dirs: &[PathBuf]) {
        use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
        for d in dirs {
            let Ok(c) = std::ffi::CString::new(d.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a valid descriptor and NUL-terminated path.
            let wd = unsafe {
                libc::inotify_add_watch(
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR,
                )
            };
            if wd >= 0 {
                self.watched.insert(d.clone());
            }
        }
    }

    /// Waits up to `timeout` for a change; true if there was one (the
    /// queue is drained).
    pub fn wait(&mut self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n <= 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a buffer we own, of its length.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                break;
            }
            any = true;
        }
        self.watched.retain(|d| d.exists());
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/sys/fs/cgroup/unified"), "/sys/fs/cgroup/unified");
    }

    #[test]
    fn guards_their_children_and_services_classify() {
        // Any directory tree has inode numbers: the logic needs no cgroupfs.
        let base = std::env::temp_dir().join(format!("segbpf-cls-{}", std::process::id()));
        for d in [
            "system.slice/app.service/sub",
            "system.slice/other.service",
            "user.slice/user-0.slice",
        ] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let root = CgroupRoot {
            dir: base.clone(),
            id: cgroup_id(&base).unwrap(),
            level: 0,
        };
        let c = classify(&root, &[(3, "system.slice/app.service".into())]);
        let get = |rel: &str| c.entries.get(&cgroup_id(&base.join(rel)).unwrap()).cloned();
        let e = |rel: &str, svc: u8, guard: bool| Entry {
            rel: rel.to_string(),
            svc,
            guard,
        };
        assert_eq!(get(""), Some(e("", 0, true)));
        assert_eq!(get("system.slice"), Some(e("system.slice", 0, true)));
        assert_eq!(
            get("system.slice/app.service"),
            Some(e("system.slice/app.service", 3, false))
        );
        assert_eq!(
            get("system.slice/other.service"),
            Some(e("system.slice/other.service", 0, false))
        );
        assert_eq!(get("user.slice"), Some(e("user.slice", 0, false)));
        // Below a classified cgroup that is no guard: inherited, no entry.
        assert_eq!(get("system.slice/app.service/sub"), None);
        assert_eq!(get("user.slice/user-0.slice"), None);
        assert_eq!(c.max_level, 2);
        assert_eq!(c.guards, vec![base.clone(), base.join("system.slice")]);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_service_deeper_than_the_programs_read_is_never_classified() {
        let base = std::env::temp_dir().join(format!("segbpf-deep-{}", std::process::id()));
        let deep: Vec<String> = (1..=16).map(|i| format!("d{i}")).collect();
        let deep = deep.join("/");
        std::fs::create_dir_all(base.join(&deep)).unwrap();
        // A root at level 1: 15 levels below it are the deepest read.
        let root = CgroupRoot {
            dir: base.clone(),
            id: cgroup_id(&base).unwrap(),
            level: 1,
        };
        assert!(!reachable(&root, &deep));
        let c = classify(&root, &[(5, deep.clone())]);
        assert!(c.entries.values().all(|e| e.svc == 0), "{c:?}");
        assert_eq!(c.guards, vec![base.clone()]);
        let shallower = deep.rsplit_once('/').unwrap().0.to_string();
        assert!(reachable(&root, &shallower));
        let c = classify(&root, &[(5, shallower.clone())]);
        let id = cgroup_id(&base.join(&shallower)).unwrap();
        assert_eq!(c.entries.get(&id).map(|e| e.svc), Some(5));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn within_is_by_component() {
        assert!(within("system.slice/app.service", "system.slice"));
        assert!(within("a/b", "a/b"));
        assert!(!within("a/bc", "a/b"));
    }
}
