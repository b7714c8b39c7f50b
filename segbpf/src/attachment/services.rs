//! The services attachment: load the cgroup_skb programs, fill their maps
//! (the policy slot and the cgroup table), attach them once at the cgroup
//! root as bpf_links (which the kernel attaches with `BPF_F_ALLOW_MULTI`,
//! beside systemd's own programs), pin
//! links and maps, follow the cgroup tree, reload, detach.
//!
//! Layout, with `ROOT` the pin root and `STATE` the state directory of
//! [`crate::attachment::pins::Roots`] and `ID` the cgroup root's id: `ROOT/services:ID/`
//! holds `link_svc_ingress`, `link_svc_egress` and the `SEG_SVC_*` maps
//! (`:` is never in an interface name, so it cannot collide with an
//! interface's directory); `STATE/services:ID.json` is the state.
//!
//! Order: the maps are complete (policy slot, cgroup entries) before the
//! programs are attached, and a reload fills the slot not in force and
//! flips `SEG_SVC_ACT` once, so no packet is judged by half a policy.

use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};
use segbpf_common::{
    Counter, DEFAULT_SVC_CT_ENTRIES, MAP_SVC_ACT, MAP_SVC_CFG, MAP_SVC_CG, MAP_SVC_CT,
    MAP_SVC_PEER, MAP_SVC_PORTS, MAP_SVC_STATS, MAP_SVC_V4, MAP_SVC_V6, PROG_SVC_EGRESS,
    PROG_SVC_INGRESS, PeerKeyV4, PeerKeyV6, PortKey, SVC_CFG_ENTRIES, SVC_PINNED_MAPS,
    SVC_SLOT_STRIDE, SvcCgroup, SvcClass, SvcConfig, SvcPeerKey, SvcRule,
};
use serde::{Deserialize, Serialize};

use crate::{
    attachment::{dirs::private_dir, pins::Roots},
    host::cgroups::{CgroupError, CgroupRoot, Classification, classify},
    policy::{
        Policy,
        compile::{CompileError, RuleInfo},
        services::{ServiceInfo, SvcCompiled, compile_services},
    },
};

/// Errors of the services attachment.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// The cgroup tree.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The policy does not compile.
    #[error("{0}")]
    Compile(#[from] CompileError),
    /// A service's cgroup lies below the programs' reach.
    #[error(transparent)]
    TooDeep(#[from] Box<crate::policy::services::TooDeep>),
    /// Another live services attachment's root is an ancestor or a
    /// descendant of this one's (or the same cgroup, from other pins).
    #[error(transparent)]
    Nested(#[from] crate::attachment::services_nest::NestError),
    /// The policy defines no service.
    #[error("{0}: the policy defines no [services.NAME]; nothing to enforce")]
    NoServices(String),
    /// Nothing is attached below this cgroup root (the message names the
    /// roots that have an attachment, [`SvcPaths::not_attached`]).
    #[error("{0}")]
    NotAttached(String),
    /// A kernel or aya operation failed.
    #[error("{what}: {source}")]
    Kernel {
        /// What was done.
        what: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The change was refused (an unknown set, a member not in it, no
    /// earlier policy, a policy that does not load): nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The change would change nothing (no new generation was made).
    #[error("{0}")]
    Unchanged(String),
    /// The pins of this root belong to another state directory (or to an
    /// attach that died before recording its state): nothing changed.
    #[error("{0}")]
    Foreign(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn kernel<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> ServicesError {
    let what = what.into();
    move |e| ServicesError::Kernel {
        what,
        source: Box::new(e),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServicesError {
    let what = what.into();
    move |source| ServicesError::Io { what, source }
}

/// Where the services attachment of one cgroup root lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPaths {
    /// The cgroup root.
    pub root: CgroupRoot,
    /// Pin directory.
    pub dir: PathBuf,
    /// State file.
    pub state: PathBuf,
}

/// The directory name prefix of a services attachment under the pin root.
pub const PIN_PREFIX: &str = "services:";

impl SvcPaths {
    /// The file of a first attach's pending confirmation (its guard:
    /// `crate::attachment::services_guard`).
    pub fn pending_file(&self) -> PathBuf {
        self.state.with_extension("confirm.json")
    }

    /// The attachment of `root` under `roots`.
    pub fn new(roots: &Roots, root: CgroupRoot) -> Self {
        SvcPaths {
            dir: roots.bpffs.join(format!("{PIN_PREFIX}{}", root.id)),
            state: roots.state.join(format!("{PIN_PREFIX}{}.json", root.id)),
            root,
        }
    }

    /// Pin of the ingress link.
    pub fn link_ingress(&self) -> PathBuf {
        self.dir.join("link_svc_ingress")
    }

    /// Pin of the egress link.
    pub fn link_egress(&self) -> PathBuf {
        self.dir.join("link_svc_egress")
    }

    /// Whether the programs are attached (their links are pinned).
    pub fn is_attached(&self) -> bool {
        self.link_ingress().exists() && self.link_egress().exists()
    }

    /// The error for "nothing attached below this root", naming the
    /// cgroup roots that have a services attachment (their state names
    /// the root; the pin directory of that root's id exists), so a
    /// missing or wrong `--cgroup-root` gets the hint `status` gives.
    pub fn not_attached(&self) -> ServicesError {
        let roots = Roots {
            bpffs: self.dir.parent().map(Path::to_path_buf).unwrap_or_default(),
            state: self
                .state
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let elsewhere: Vec<String> = list(&roots)
            .into_iter()
            .filter(|id| *id != self.root.id)
            .filter_map(|id| {
                let file = roots.state.join(format!("{PIN_PREFIX}{id}.json"));
                let st: SvcState =
                    serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
                let r = crate::attachment::services_level::open_root(Some(&st.cgroup_root)).ok()?;
                (r.id == id).then(|| r.dir.display().to_string())
            })
            .collect();
        if let Some(hint) = self.absent_hint() {
            ServicesError::NotAttached(format!(
                "no services attachment below {} seen from here: {hint}",
                self.root.dir.display()
            ))
        } else if elsewhere.is_empty() {
            ServicesError::NotAttached(format!(
                "no services attachment below {}",
                self.root.dir.display()
            ))
        } else {
            ServicesError::NotAttached(format!(
                "no services attachment below {}; attached below: {} (add `--cgroup-root DIR`)",
                self.root.dir.display(),
                elsewhere.join(", ")
            ))
        }
    }

    /// Why no attachment is seen at these paths although one may be
    /// there: this process cannot read the state directory or the pin
    /// root (not root); the state here names pins under another pin root
    /// ([`pins_elsewhere`]); or the state here remains while its pins and
    /// programs are gone (detached from another state directory that
    /// shares the pin root).
    pub fn absent_hint(&self) -> Option<String> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            let state_dir = self.state.parent().map(Path::to_path_buf);
            let pin_root = self.dir.parent().map(Path::to_path_buf);
            for d in [state_dir, pin_root].into_iter().flatten() {
                if std::fs::read_dir(&d)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
                {
                    return Some(format!(
                        "{} cannot be read by uid {uid} (permission denied): the services commands need root",
                        d.display()
                    ));
                }
            }
        }
        if let Some(hint) = pins_elsewhere(self) {
            return Some(hint);
        }
        let programs = crate::attachment::services_nest::services_at(&self.root.dir);
        if self.state.exists()
            && !self.dir.exists()
            && !self.next_dir().exists()
            && programs.is_ok_and(|p| !p)
        {
            return Some(format!(
                "the state {} remains, but its pins {} and its programs are gone (detached from another state directory that shares the pin root, or removed by hand): nothing of it enforces; `segbpf detach --services --cgroup-root {}` here removes the state, `segbpf attach --services` attaches again",
                self.state.display(),
                self.dir.display(),
                self.root.dir.display()
            ));
        }
        None
    }

    /// Whose the pins of this root are, seen from this state directory:
    /// the state's owner token must name a mark in the pin directory (an
    /// older state without a token: no mark there). Another
    /// `SEGBPF_STATE_DIR` that shares the pin root never adopts, reloads
    /// or rescans an attachment it did not make. Pins with no mark at all
    /// but a link on the root, while this state directory has a state for
    /// the root, are this state's half-removed attachment: every attach
    /// marks its pin directory before it pins anything, and only a detach
    /// (killed half-way) takes the mark away, so such pins are whatever
    /// the detach left, and this state directory may finish it (detach)
    /// or replace it (attach). (A markless directory without a link may
    /// be an attach of another state directory just starting: not ours.)
    pub fn owner(&self) -> Owner {
        if !self.dir.exists() {
            return Owner::Nobody;
        }
        let marks = owner_marks(&self.dir);
        match self.read_state().map(|s| s.owner) {
            Some(Some(t)) if marks.iter().any(|(m, _, _)| *m == t) => Owner::Mine,
            Some(None) if marks.is_empty() => Owner::Mine,
            Some(Some(_)) if marks.is_empty() && !self.linked_programs().is_empty() => Owner::Mine,
            _ => Owner::Other,
        }
    }

    /// The state directory that made the attachment at these pins, when
    /// its owner mark names one.
    pub fn owner_state_dir(&self) -> Option<String> {
        owner_marks(&self.dir).into_iter().find_map(|(_, s, _)| s)
    }

    /// The identity of this state directory as the kernel gives it
    /// (`st_dev`, `st_ino`): the same path in another mount namespace (a
    /// container's `/run/segbpf`) is another directory.
    pub fn state_dir_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(self.state.parent()?).ok()?;
        Some((m.dev(), m.ino()))
    }

    /// Whether the pins here are the leftovers of an attach from THIS
    /// state directory that died before recording its state: no state
    /// here, and every owner mark names this directory by its
    /// `st_dev:st_ino`. Only meaningful under the pin root's attach lock
    /// (no attach of any state directory is then under way). Marks of
    /// older versions (no identity) never count.
    pub fn crashed_here(&self) -> bool {
        if !self.dir.exists() || self.state.exists() {
            return false;
        }
        let Some(id) = self.state_dir_id() else {
            return false;
        };
        let marks = owner_marks(&self.dir);
        !marks.is_empty() && marks.iter().all(|(_, _, d)| *d == Some(id))
    }

    /// The side directory a re-attach over an enforcing leftover makes
    /// its pins in before it swaps them in (`ROOT/services-next:ID`; not
    /// an attachment of its own: [`list`] does not see it).
    pub fn next_dir(&self) -> PathBuf {
        let name = format!(
            "services-next:{}",
            self.dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(PIN_PREFIX))
                .unwrap_or_default()
        );
        self.dir.with_file_name(name)
    }

    /// Whether the side directory ([`Self::next_dir`]) is this state
    /// directory's: every owner mark in it names this directory by its
    /// `st_dev:st_ino` (or it has none: killed before its mark).
    fn side_is_ours(&self) -> bool {
        let id = self.state_dir_id();
        owner_marks(&self.next_dir())
            .iter()
            .all(|(_, _, d)| id.is_some() && *d == id)
    }

    /// The kernel ids of the programs whose pinned links here are
    /// attached, in the kernel, to this cgroup root.
    pub fn linked_programs(&self) -> std::collections::BTreeSet<u32> {
        [self.link_ingress(), self.link_egress()]
            .iter()
            .filter_map(|p| crate::attachment::services_nest::pinned_cgroup_link(p).ok())
            .filter(|(cg, _)| *cg == self.root.id)
            .map(|(_, prog)| prog)
            .collect()
    }

    /// The refusal for pins this state directory does not own: names the
    /// other attachment and how to remove it. Nothing is changed.
    pub fn foreign(&self) -> ServicesError {
        let root = self.root.dir.display();
        let here = self
            .state
            .parent()
            .map_or_else(String::new, |p| p.display().to_string());
        let generation = SvcMaps::from_pins(&self.dir)
            .and_then(|m| m.generation_in_force())
            .map_or_else(|_| "?".to_string(), |g| g.to_string());
        // In force only where the kernel has its link (review 12 L4).
        let in_force = match unlinked(self).as_slice() {
            [] => format!("generation {generation} in force"),
            [(missing, _)] => format!(
                "generation {generation} PARTIALLY in force: its {missing} link is not in the kernel, only {} is enforced",
                if *missing == "egress" {
                    "ingress"
                } else {
                    "egress"
                }
            ),
            _ => format!(
                "generation {generation} in its maps but NOT in force: neither link is in the kernel"
            ),
        };
        let who = match self.owner_state_dir() {
            Some(dir) if dir == absolute(Path::new(&here)).display().to_string() => format!(
                "a segbpf whose SEGBPF_STATE_DIR is {dir} in another mount namespace (a container's), or an attach here that died before recording its state"
            ),
            Some(dir) => format!("the segbpf whose SEGBPF_STATE_DIR is {dir}"),
            None => "another segbpf that shares this pin root (SEGBPF_BPFFS) with another SEGBPF_STATE_DIR, or an attach here that died before recording its state".to_string(),
        };
        ServicesError::Foreign(format!(
            "services below {root} are attached already (pins {}, {in_force}), by {who}; this state directory ({here}) has no state for them, so it neither adopts nor changes them: nothing was changed. Use `segbpf status|reload|detach --services --cgroup-root {root}` with that SEGBPF_STATE_DIR (for a crashed attach, `segbpf detach --services --cgroup-root {root}` here removes it)",
            self.dir.display()
        ))
    }

    /// The state, if any.
    pub fn read_state(&self) -> Option<SvcState> {
        let text = std::fs::read_to_string(&self.state).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Takes the attachment's lock (an exclusive `flock` on its pin
    /// directory, held by the kernel until the returned value is dropped or
    /// the process dies): a reload and a rescan of the cgroup tree never
    /// interleave, so no cgroup entry of the slot a reload fills and puts
    /// in force is computed from another policy's service ids.
    pub fn lock(&self) -> Result<SvcLock, ServicesError> {
        let f = std::fs::File::open(&self.dir)
            .map_err(io(format!("opening {}", self.dir.display())))?;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(SvcLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ServicesError::Io {
                    what: format!("locking {}", self.dir.display()),
                    source: e,
                });
            }
        }
    }

    fn write_state(&self, s: &SvcState) -> Result<(), ServicesError> {
        if let Some(parent) = self.state.parent() {
            private_dir(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        let tmp = self.state.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(s).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.state).map_err(io(format!("writing {}", self.state.display())))
    }
}

/// The attachment's lock ([`SvcPaths::lock`]); released when dropped.
pub struct SvcLock(#[allow(dead_code, reason = "held for its flock")] std::fs::File);

/// What is in force, as recorded by the last attach or reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcState {
    /// The cgroup root.
    pub cgroup_root: PathBuf,
    /// Its cgroup id.
    pub cgroup_root_id: u64,
    /// The policy file.
    pub policy: PathBuf,
    /// Generation (increases with every applied policy).
    pub generation: u64,
    /// Slot in force.
    pub slot: u8,
    /// Audit mode.
    pub audit: bool,
    /// The services.
    pub services: Vec<ServiceInfo>,
    /// The service rules.
    pub rules: Vec<RuleInfo>,
    /// Live set edits (`segbpf set add|del --services`) over the file's
    /// sets: set name -> members in force.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set_overrides: crate::attachment::swap::Overrides,
    /// The generation whose policy a `rollback --services` restored as
    /// this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<u64>,
    /// The owner token of the attachment this state is for: the pin
    /// directory holds `owner:TOKEN:…` ([`SvcPaths::owner`]). Absent in
    /// the states of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u64>,
    /// The cgroup namespace the attach ran in (the inode of
    /// `/proc/self/ns/cgroup`): `cgroup_root` is a path of that
    /// namespace, meaningless in another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_ns: Option<u64>,
    /// The pin directory the attachment was made at (under the
    /// `SEGBPF_BPFFS` of its attach): where `status` points when run with
    /// another pin root. Absent in the states of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins: Option<PathBuf>,
}

/// This process's cgroup namespace (the inode of `/proc/self/ns/cgroup`).
fn cgroup_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/cgroup")
        .ok()
        .map(|m| m.ino())
}

/// Whose the pins of a cgroup root are, seen from one state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No pins: nothing is attached there from this pin root.
    Nobody,
    /// This state directory's attachment.
    Mine,
    /// Another state directory's (same pin root, another
    /// `SEGBPF_STATE_DIR`), or an attach that died before recording its
    /// state.
    Other,
}

/// The prefix of the owner mark, a directory in the pin directory.
const OWNER_PREFIX: &str = "owner:";

/// The owner marks in the pin directory `dir`: (token, the state
/// directory that made it, when the name could carry it, and that
/// directory's `st_dev:st_ino`, in marks of this version:
/// `owner:TOKEN:@DEV-INO[:PATH]`; bpffs allows no dot).
#[allow(clippy::type_complexity, reason = "one private helper")]
fn owner_marks(dir: &Path) -> Vec<(u64, Option<String>, Option<(u64, u64)>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(OWNER_PREFIX)?;
            let (token, state) = rest.split_once(':').unwrap_or((rest, ""));
            let token = u64::from_str_radix(token, 16).ok()?;
            let (id, state) = match state.strip_prefix('@') {
                Some(rest) => {
                    let (id, path) = rest.split_once(':').unwrap_or((rest, ""));
                    let id = id
                        .split_once('-')
                        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)));
                    (id, path)
                }
                None => (None, state),
            };
            let state = (!state.is_empty()).then(|| state.replace("%2F", "/").replace("%25", "%"));
            Some((token, state, id))
        })
        .collect()
}

/// The services maps, opened from their pins.
pub struct SvcMaps {
    cg: HashMap<MapData, u64, SvcCgroup>,
    cfg: Array<MapData, SvcConfig>,
    act: Array<MapData, u32>,
    v4: LpmTrie<MapData, PeerKeyV4, SvcClass>,
    v6: LpmTrie<MapData, PeerKeyV6, SvcClass>,
    ports: LpmTrie<MapData, PortKey, SvcRule>,
    peer: HashMap<MapData, SvcPeerKey, SvcClass>,
    stats: PerCpuArray<MapData, Counter>,
}

fn pinned(dir: &Path, name: &'static str) -> Result<MapData, ServicesError> {
    MapData::from_pin(dir.join(name)).map_err(kernel(format!("opening pinned map {name}")))
}

impl SvcMaps {
    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, ServicesError> {
        Ok(SvcMaps {
            cg: HashMap::try_from(Map::HashMap(pinned(dir, MAP_SVC_CG)?))
                .map_err(kernel(MAP_SVC_CG))?,
            cfg: Array::try_from(Map::Array(pinned(dir, MAP_SVC_CFG)?))
                .map_err(kernel(MAP_SVC_CFG))?,
            act: Array::try_from(Map::Array(pinned(dir, MAP_SVC_ACT)?))
                .map_err(kernel(MAP_SVC_ACT))?,
            v4: LpmTrie::try_from(Map::LpmTrie(pinned(dir, MAP_SVC_V4)?))
                .map_err(kernel(MAP_SVC_V4))?,
            v6: LpmTrie::try_from(Map::LpmTrie(pinned(dir, MAP_SVC_V6)?))
                .map_err(kernel(MAP_SVC_V6))?,
            ports: LpmTrie::try_from(Map::LpmTrie(pinned(dir, MAP_SVC_PORTS)?))
                .map_err(kernel(MAP_SVC_PORTS))?,
            peer: HashMap::try_from(Map::HashMap(pinned(dir, MAP_SVC_PEER)?))
                .map_err(kernel(MAP_SVC_PEER))?,
            stats: PerCpuArray::try_from(Map::PerCpuArray(pinned(dir, MAP_SVC_STATS)?))
                .map_err(kernel(MAP_SVC_STATS))?,
        })
    }

    /// The slot in force.
    pub fn active(&self) -> Result<u8, ServicesError> {
        Ok((self.act.get(&0, 0).map_err(kernel("reading SEG_SVC_ACT"))? & 1) as u8)
    }

    /// Fills `slot` with `c` (policy) and `cls` (cgroup entries), leaving
    /// the other slot's values in place.
    fn write_slot(
        &mut self,
        c: &SvcCompiled,
        cls: &Classification,
        slot: u8,
    ) -> Result<(), ServicesError> {
        for (l, k, v) in &c.peers_v4 {
            self.v4
                .insert(&Key::new(*l, *k), *v, 0)
                .map_err(kernel("writing SEG_SVC_V4"))?;
        }
        for (l, k, v) in &c.peers_v6 {
            self.v6
                .insert(&Key::new(*l, *k), *v, 0)
                .map_err(kernel("writing SEG_SVC_V6"))?;
        }
        for (l, k, v) in &c.ports {
            self.ports
                .insert(&Key::new(*l, *k), *v, 0)
                .map_err(kernel("writing SEG_SVC_PORTS"))?;
        }
        for (k, v) in &c.peer_classes {
            self.peer
                .insert(k, v, 0)
                .map_err(kernel("writing SEG_SVC_PEER"))?;
        }
        for (i, cfg) in &c.configs {
            let mut cfg = *cfg;
            if *i == u32::from(slot * SVC_SLOT_STRIDE) {
                cfg.max_level = u8::try_from(cls.max_level).unwrap_or(u8::MAX);
                // A new secret key for the stamps made under this policy.
                cfg.stamp_key = stamp_key()?;
            }
            self.cfg
                .set(*i, cfg, 0)
                .map_err(kernel("writing SEG_SVC_CFG"))?;
        }
        self.write_cgroups(cls, &[slot])
    }

    /// Writes the entries of `cls` for `slots`, keeping other slots' values.
    fn write_cgroups(&mut self, cls: &Classification, slots: &[u8]) -> Result<(), ServicesError> {
        for (id, e) in &cls.entries {
            let mut v = self.cg.get(id, 0).unwrap_or_default();
            for &s in slots {
                v.svc[usize::from(s & 1)] = e.svc;
                v.guard[usize::from(s & 1)] = u8::from(e.guard);
            }
            self.cg
                .insert(id, v, 0)
                .map_err(kernel("writing SEG_SVC_CG"))?;
        }
        // Cgroups this classification does not know: nothing in these slots
        // (an id of the old policy may name another service in the new one).
        let others: Vec<(u64, SvcCgroup)> = self
            .cg
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| !cls.entries.contains_key(k))
            .collect();
        for (k, mut v) in others {
            for &s in slots {
                v.svc[usize::from(s & 1)] = 0;
                v.guard[usize::from(s & 1)] = 0;
            }
            self.cg
                .insert(k, v, 0)
                .map_err(kernel("writing SEG_SVC_CG"))?;
        }
        Ok(())
    }

    /// Zeroes the packet counters of `slot` (before it is put in force:
    /// `status` counts the generation in force, not one two back that used
    /// the same slot).
    fn zero_counters(&mut self, slot: u8) -> Result<(), ServicesError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| kernel("counting CPUs")(e))?
            .max(1);
        let lo = u32::from(slot & 1) * u32::from(SVC_SLOT_STRIDE) * 4;
        for i in lo..lo + u32::from(SVC_SLOT_STRIDE) * 4 {
            let zero = aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])
                .map_err(kernel("zeroing SEG_SVC_STATS"))?;
            self.stats
                .set(i, zero, 0)
                .map_err(kernel("zeroing SEG_SVC_STATS"))?;
        }
        Ok(())
    }

    /// The generation of the policy in the slot in force.
    pub fn generation_in_force(&self) -> Result<u64, ServicesError> {
        let base = u32::from(self.active()? * SVC_SLOT_STRIDE);
        Ok(self
            .cfg
            .get(&base, 0)
            .map_err(kernel("reading SEG_SVC_CFG"))?
            .generation)
    }

    /// Puts `slot` in force: one u32 write.
    fn activate(&mut self, slot: u8) -> Result<(), ServicesError> {
        self.act
            .set(0, u32::from(slot & 1), 0)
            .map_err(kernel("writing SEG_SVC_ACT"))
    }

    /// Empties the policy entries of `old` (not in force).
    fn clear_slot(&mut self, old: u8) {
        let lo = old * SVC_SLOT_STRIDE;
        let in_old = |b: u8| b >= lo && b < lo.saturating_add(SVC_SLOT_STRIDE);
        let keys: Vec<_> = self.v4.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| in_old(k.data().slot)) {
            let _ = self.v4.remove(&k);
        }
        let keys: Vec<_> = self.v6.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| in_old(k.data().slot)) {
            let _ = self.v6.remove(&k);
        }
        let keys: Vec<_> = self.ports.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| in_old(k.data().slot)) {
            let _ = self.ports.remove(&k);
        }
        let keys: Vec<_> = self.peer.keys().filter_map(Result::ok).collect();
        for k in keys.into_iter().filter(|k| in_old(k.slot)) {
            let _ = self.peer.remove(&k);
        }
        // The globals keep their stamp key: a packet stamped under this
        // slot just before the flip still names its sender (as the other
        // slot's, so no service of the new policy) and keeps its need-peer
        // bit. The next reload that fills this slot draws a new one.
        let stamp_key = self
            .cfg
            .get(&u32::from(lo), 0)
            .map_or([0; 2], |g| g.stamp_key);
        let _ = self.cfg.set(
            u32::from(lo),
            SvcConfig {
                stamp_key,
                ..SvcConfig::default()
            },
            0,
        );
        for i in u32::from(lo) + 1..u32::from(lo) + u32::from(SVC_SLOT_STRIDE) {
            let _ = self.cfg.set(i, SvcConfig::default(), 0);
        }
    }

    /// Makes the cgroup table exactly `cls` (both slots equal): new
    /// entries first, then the ones that are gone removed. Returns
    /// (written, removed).
    pub fn sync_cgroups(&mut self, cls: &Classification) -> Result<(usize, usize), ServicesError> {
        let mut written = 0;
        for (id, e) in &cls.entries {
            let v = SvcCgroup {
                svc: [e.svc; 2],
                guard: [u8::from(e.guard); 2],
            };
            if self.cg.get(id, 0).ok() != Some(v) {
                self.cg
                    .insert(id, v, 0)
                    .map_err(kernel("writing SEG_SVC_CG"))?;
                written += 1;
            }
        }
        let stale: Vec<u64> = self
            .cg
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !cls.entries.contains_key(k))
            .collect();
        for k in &stale {
            let _ = self.cg.remove(k);
        }
        Ok((written, stale.len()))
    }

    /// Per service id of the slot in force: packets [ingress drop,
    /// ingress pass, egress drop, egress pass] summed over CPUs; id 0 is
    /// the sockets in no service (and the held ones, as drops).
    pub fn counters(&self) -> Result<Vec<[u64; 4]>, ServicesError> {
        let base = u32::from(self.active()? * SVC_SLOT_STRIDE);
        let mut out = Vec::new();
        for id in 0..u32::from(SVC_SLOT_STRIDE) {
            let mut row = [0u64; 4];
            for (j, cell) in row.iter_mut().enumerate() {
                let v = self
                    .stats
                    .get(&((base + id) * 4 + j as u32), 0)
                    .map_err(kernel("reading SEG_SVC_STATS"))?;
                *cell = v.iter().map(|c| c.packets).sum();
            }
            out.push(row);
        }
        Ok(out)
    }
}

fn service_paths(c: &SvcCompiled) -> Vec<(u8, String)> {
    c.services
        .iter()
        .map(|s| (s.id, s.cgroup.clone()))
        .collect()
}

/// Enforces `policy`'s services below `paths.root`: a fresh attach, or,
/// when the programs are already attached there (a restarted `attach`),
/// a reload of the maps they use (no gap).
pub fn attach(
    paths: &SvcPaths,
    policy: &Policy,
    policy_path: &Path,
    audit: bool,
) -> Result<SvcState, ServicesError> {
    if policy.services.is_empty() {
        return Err(ServicesError::NoServices(policy.source.clone()));
    }
    // Attaches run one at a time per pin root (every state directory that
    // shares it sees its lock): two first attaches at once would each
    // start the pins over, removing the other's links. The check of who
    // owns the pins and their making are under this one lock: of two
    // racers, the second finds the first's pins and adopts them only if
    // its own state directory made them, else it is refused.
    crate::attachment::services_nest::refuse_cgroup_namespace()?;
    let (attaching, made_root) = attach_lock(paths)?;
    let result = attach_locked(paths, policy, policy_path, audit);
    // A refused attach leaves nothing behind: not even the pin root it
    // made for its lock (removed while still locked, and only if empty;
    // an attach waiting on it finds it replaced and locks the new one).
    if result.is_err()
        && let Some(root) = made_root
    {
        let _ = std::fs::remove_dir(root);
    }
    drop(attaching);
    result
}

fn attach_locked(
    paths: &SvcPaths,
    policy: &Policy,
    policy_path: &Path,
    audit: bool,
) -> Result<SvcState, ServicesError> {
    check_depth(paths, policy)?;
    // A side directory left by a re-attach killed half-way (below),
    // whatever the kill point (before or after its swap, its links made
    // or not): the pins at `paths.dir` are what enforces by this state's
    // name (the leftover it replaced, or the new pins swapped in), so the
    // side goes. Its links, if any, were never more than those; the
    // kernel releases them a moment after their pins go (deferred work),
    // so their programs do not count as another attachment's below.
    let side = paths.next_dir();
    let mut stale = std::collections::BTreeSet::new();
    if side.exists() && paths.side_is_ours() {
        stale = SvcPaths {
            dir: side.clone(),
            ..paths.clone()
        }
        .linked_programs();
        if !stale.is_empty() {
            tracing::warn!(
                "removing the side directory {} of a re-attach from this state directory that was killed half-way ({} program(s) of it attached)",
                side.display(),
                stale.len()
            );
        }
        std::fs::remove_dir_all(&side).map_err(io(format!("removing {}", side.display())))?;
    }
    let mut rolled_back = false;
    // The programs of a leftover of this state directory (a crashed attach
    // or a killed detach) that enforce on this root: they stay attached
    // until this attach's own enforce, so the cgroup never has fewer
    // directions than the leftover had.
    let mut leftover = std::collections::BTreeSet::new();
    match paths.owner() {
        // An attach of this very state directory that died between its
        // owner mark and its state (kill -9): under the attach lock no
        // attach is live, so it is replaced by this attach.
        Owner::Other if paths.crashed_here() => {
            tracing::warn!(
                "replacing the pins {} of an attach from this state directory that died before recording its state",
                paths.dir.display()
            );
            leftover = paths.linked_programs();
            if leftover.is_empty() {
                std::fs::remove_dir_all(&paths.dir)
                    .map_err(io(format!("removing {}", paths.dir.display())))?;
                rolled_back = true;
            }
        }
        Owner::Other => return Err(paths.foreign()),
        Owner::Mine if paths.is_attached() => return reload(paths, policy, policy_path, audit),
        // This state directory's partial attachment (an attach or detach
        // killed half-way): replaced by this attach.
        Owner::Mine if paths.dir.exists() => {
            leftover = paths.linked_programs();
            if leftover.is_empty() {
                std::fs::remove_dir_all(&paths.dir)
                    .map_err(io(format!("removing {}", paths.dir.display())))?;
                rolled_back = true;
            }
        }
        _ => {}
    }
    // No other attachment's root above or below this one (checked in the
    // kernel) may come into force while this one is made: one fresh attach
    // at a time on this machine. The leftover's own programs do not count.
    let nesting = crate::attachment::services_nest::nest_lock()?;
    let exempt: std::collections::BTreeSet<u32> = leftover.union(&stale).copied().collect();
    let mut nested = crate::attachment::services_nest::refuse_nested(&paths.root, &exempt);
    // The kernel frees an unpinned link a moment later (deferred work).
    let mut tries = 0;
    while rolled_back && nested.is_err() && tries < 40 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        nested = crate::attachment::services_nest::refuse_nested(&paths.root, &exempt);
        tries += 1;
    }
    nested?;
    // Over an enforcing leftover, the new attachment is made in the side
    // directory and swapped in once its links enforce; else in place.
    let made = if leftover.is_empty() {
        paths.clone()
    } else {
        SvcPaths {
            dir: side.clone(),
            ..paths.clone()
        }
    };
    // `paths` from here: where this attach makes its pins; `made_for`:
    // where they end up.
    let made_for = paths;
    let paths = &made;
    // A partial attachment of this state directory (a crash between
    // pinning and attaching) is started over: nothing of it is attached.
    if paths.dir.exists() {
        let _ = std::fs::remove_dir_all(&paths.dir);
    }
    // The owner mark: this state directory's token, and its path for the
    // refusal another one gets.
    let owner = stamp_key()?[0];
    // The state directory exists from here on: its st_dev:st_ino goes in
    // the mark. Made here, it is removed again if this attach fails.
    let state_parent = paths.state.parent().map(Path::to_path_buf);
    let made_parent = state_parent.as_ref().is_some_and(|p| !p.exists());
    if let Some(parent) = &state_parent {
        private_dir(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let unmake_parent = || {
        if made_parent && let Some(parent) = &state_parent {
            let _ = std::fs::remove_dir(parent);
        }
    };
    let id = paths
        .state_dir_id()
        .map(|(d, i)| format!(":@{d}-{i}"))
        .unwrap_or_default();
    let here = paths
        .state
        .parent()
        .map(|p| absolute(p).display().to_string())
        .unwrap_or_default()
        .replace('%', "%25")
        .replace('/', "%2F");
    let mut mark = format!("{OWNER_PREFIX}{owner:016x}{id}");
    if mark.len() + here.len() < 250 {
        mark = format!("{mark}:{here}");
    }
    let marked = private_dir(&paths.dir)
        .and_then(|()| std::fs::create_dir(paths.dir.join(&mark)))
        .map_err(io(format!("marking {}", paths.dir.display())));
    if let Err(e) = marked {
        let _ = std::fs::remove_dir_all(&paths.dir);
        unmake_parent();
        return Err(e);
    }
    let generation = 1;
    let compiled = match compile_services(policy, 0, generation, audit) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&paths.dir);
            unmake_parent();
            return Err(e.into());
        }
    };
    let cls = classify(&paths.root, &service_paths(&compiled));
    let result = load_and_attach(paths, &compiled, &cls);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&paths.dir);
        unmake_parent();
        return Err(e);
    }
    // The attach lock is a file of this cgroup namespace and mount: an
    // attach from another one (or through a subtree mount) may have passed
    // its check at the same moment. With both links in the kernel now, the
    // later of two such attaches sees the other's: ours is undone (both
    // may back off; never both enforce).
    let raced = crate::attachment::services_nest::own_programs(&[
        paths.link_ingress(),
        paths.link_egress(),
    ])
    .and_then(|mut own| {
        own.extend(exempt.iter().copied());
        crate::attachment::services_nest::refuse_linked(&paths.root, &own, true, nesting.is_some())
    });
    if let Err(e) = raced {
        let _ = std::fs::remove_dir_all(&paths.dir);
        unmake_parent();
        return Err(e.into());
    }
    // Both new links enforce: swapped in for the leftover (one rename),
    // whose links then leave the cgroup with its pins.
    let paths = if leftover.is_empty() {
        paths
    } else {
        let target = &made_for.dir;
        if let Err(e) = exchange(&paths.dir, target) {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(e);
        }
        std::fs::remove_dir_all(&paths.dir)
            .map_err(io(format!("removing {}", paths.dir.display())))?;
        made_for
    };
    let state = SvcState {
        cgroup_root: paths.root.dir.clone(),
        cgroup_root_id: paths.root.id,
        policy: absolute(policy_path),
        generation,
        slot: 0,
        audit,
        services: compiled.services,
        rules: compiled.rules,
        set_overrides: crate::attachment::swap::Overrides::new(),
        restored: None,
        owner: Some(owner),
        cgroup_ns: cgroup_ns(),
        pins: Some(absolute(&paths.dir)),
    };
    paths.write_state(&state)?;
    record_history(paths, &state, policy_path);
    Ok(state)
}

/// Swaps the directories `a` and `b` (`renameat2(RENAME_EXCHANGE)`, one
/// step: each path always names a complete set of pins).
fn exchange(a: &Path, b: &Path) -> Result<(), ServicesError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default();
    let (ca, cb) = (c(a), c(b));
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(ServicesError::Io {
            what: format!("swapping {} and {}", a.display(), b.display()),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Refuses `policy` when a service's cgroup below `paths.root` lies
/// deeper than the programs read.
fn check_depth(paths: &SvcPaths, policy: &Policy) -> Result<(), ServicesError> {
    crate::policy::services::check_depth(
        policy,
        paths.root.level,
        &paths.root.dir.display().to_string(),
    )?;
    Ok(())
}

/// The lock that serialises the attaches at the pin root of `paths`
/// (an exclusive `flock` on the pin root directory, released when the
/// file is dropped or the process dies). Distinct from [`lock`], which
/// the reload of an adopting attach takes inside it.
/// Also returns the pin root when this call made it (a refused attach
/// removes it again).
fn attach_lock(paths: &SvcPaths) -> Result<(std::fs::File, Option<PathBuf>), ServicesError> {
    use std::os::unix::fs::MetadataExt as _;
    // The pin root: private to root (mode 0700), so no other local user
    // can hold it, and seen by every segbpf that shares these pins,
    // whatever its state directory.
    let root = paths.dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    loop {
        let made = !root.exists();
        private_dir(root).map_err(io(format!("creating {}", root.display())))?;
        let f = std::fs::File::open(root).map_err(io(format!("opening {}", root.display())))?;
        crate::attachment::dirs::lock_noting_holder(&f, root, "attach --services", None)
            .map_err(io(format!("locking {}", root.display())))?;
        // The directory locked must still be the pin root (a refused
        // attach that made it removes it, empty, before it unlocks).
        let held = f.metadata().map(|m| (m.dev(), m.ino())).ok();
        let now = std::fs::metadata(root).map(|m| (m.dev(), m.ino())).ok();
        if held.is_some() && held == now {
            return Ok((f, made.then(|| root.to_path_buf())));
        }
    }
}

/// An exclusive `flock` on `path` (made if missing, in a private
/// directory), held until the file is dropped or the process dies.
fn exclusive_lock(path: &Path) -> Result<std::fs::File, ServicesError> {
    if let Some(parent) = path.parent() {
        private_dir(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    f.lock()
        .map_err(io(format!("locking {}", path.display())))?;
    Ok(f)
}

/// Records `state` (applied from the text of `text`) in the history
/// `rollback --services` restores from. A failure is logged: the policy
/// is in force either way.
fn record_history(paths: &SvcPaths, state: &SvcState, text: &Path) {
    if let Err(e) = record(paths, state, text) {
        tracing::warn!("the services history was not updated: {e}");
    }
}

/// The lock that serialises changes of the services attachment at
/// `paths` (reload, set edits, rollback, the follower's rescans): released
/// when the file is dropped or the process dies.
pub fn lock(paths: &SvcPaths) -> Result<std::fs::File, ServicesError> {
    // No lock file for an attachment that does not exist.
    if !paths.state.exists() && !paths.dir.exists() {
        return Err(paths.not_attached());
    }
    // Nor for another state directory's pins: nothing is changed there.
    if paths.owner() == Owner::Other && paths.is_attached() {
        return Err(paths.foreign());
    }
    let path = paths.state.with_extension("lock");
    exclusive_lock(&path)
}

/// `path` made absolute (canonical when it exists), so the state names
/// the policy file whatever the working directory of a later reload.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::env::current_dir().map(|d| d.join(path)))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// Loads the object with the services maps pinned in `paths.dir` and
/// filled with `policy` (slot 0), without attaching anything: for
/// benchmarks (BPF_PROG_TEST_RUN) and tests. The caller removes the pins.
pub fn load_unattached(paths: &SvcPaths, policy: &Policy) -> Result<aya::Ebpf, ServicesError> {
    let compiled = compile_services(policy, 0, 1, false)?;
    let cls = classify(&paths.root, &service_paths(&compiled));
    load_filled(paths, &compiled, &cls)
}

fn load_and_attach(
    paths: &SvcPaths,
    compiled: &SvcCompiled,
    cls: &Classification,
) -> Result<(), ServicesError> {
    let mut ebpf = load_filled(paths, compiled, cls)?;
    attach_programs(paths, &mut ebpf)
}

fn load_filled(
    paths: &SvcPaths,
    compiled: &SvcCompiled,
    cls: &Classification,
) -> Result<aya::Ebpf, ServicesError> {
    let mut loader = EbpfLoader::new();
    // The interface maps of the object are unused here: keep them tiny.
    for (name, n) in [
        (segbpf_common::MAP_CT4_SETS, 1),
        (segbpf_common::MAP_CT4_WAYS, 1),
        (segbpf_common::MAP_CT6_SETS, 1),
        (segbpf_common::MAP_CT6_WAYS, 1),
        (segbpf_common::MAP_CT_SEEN, 1),
        (segbpf_common::MAP_CT_SEEN_F, 1),
        (segbpf_common::MAP_FRAG, 1),
        (segbpf_common::MAP_FRAG_NEW, 1),
        (segbpf_common::MAP_PEER_V4, 1),
        (segbpf_common::MAP_PEER_V6, 1),
        (segbpf_common::MAP_PORTS, 1),
        (segbpf_common::MAP_RULE_STATS, 1),
        (segbpf_common::MAP_DENIED0, 1),
        (segbpf_common::MAP_DENIED1, 1),
        (MAP_SVC_CG, 65_536),
        (MAP_SVC_V4, 1 << 20),
        (MAP_SVC_V6, 1 << 20),
        (MAP_SVC_PORTS, 1 << 20),
        (MAP_SVC_PEER, 16_384),
        (MAP_SVC_CT, DEFAULT_SVC_CT_ENTRIES),
    ] {
        loader.map_max_entries(name, n);
    }
    let ebpf = loader
        .load(crate::attachment::loader::EBPF_OBJECT)
        .map_err(kernel("loading the eBPF object"))?;
    private_dir(&paths.dir).map_err(io(format!("creating {}", paths.dir.display())))?;
    for name in SVC_PINNED_MAPS {
        let map = ebpf.map(name).ok_or_else(|| ServicesError::Kernel {
            what: format!("map {name}"),
            source: "missing from the eBPF object".into(),
        })?;
        map.pin(paths.dir.join(name))
            .map_err(kernel(format!("pinning {name}")))?;
    }
    {
        let mut maps = SvcMaps::from_pins(&paths.dir)?;
        maps.write_slot(compiled, cls, 0)?;
        maps.activate(0)?;
        // Both slots agree on the cgroups from the start.
        maps.sync_cgroups(cls)?;
    }
    Ok(ebpf)
}

/// A random secret key for the sender stamps of one policy slot
/// ([`SvcConfig::stamp_key`], 128 bits, not all 0).
fn stamp_key() -> Result<[u64; 2], ServicesError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open("/dev/urandom").map_err(io("opening /dev/urandom"))?;
    loop {
        let mut b = [0u8; 16];
        f.read_exact(&mut b).map_err(io("reading /dev/urandom"))?;
        let (lo, hi) = b.split_at(8);
        let k = [
            u64::from_ne_bytes(lo.try_into().unwrap_or([0; 8])),
            u64::from_ne_bytes(hi.try_into().unwrap_or([0; 8])),
        ];
        if k != [0, 0] {
            return Ok(k);
        }
    }
}

fn attach_programs(paths: &SvcPaths, ebpf: &mut aya::Ebpf) -> Result<(), ServicesError> {
    let cgroup = std::fs::File::open(&paths.root.dir)
        .map_err(io(format!("opening {}", paths.root.dir.display())))?;
    // Egress first: what a service sends is recorded (its identity, its
    // flows) before its peers' ingress looks for it.
    for (prog_name, attach_type, pin) in [
        (
            PROG_SVC_EGRESS,
            CgroupSkbAttachType::Egress,
            paths.link_egress(),
        ),
        (
            PROG_SVC_INGRESS,
            CgroupSkbAttachType::Ingress,
            paths.link_ingress(),
        ),
    ] {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(prog_name)
            .ok_or_else(|| ServicesError::Kernel {
                what: format!("program {prog_name}"),
                source: "missing from the eBPF object".into(),
            })?
            .try_into()
            .map_err(kernel(format!("program {prog_name}")))?;
        prog.load()
            .map_err(kernel(format!("loading {prog_name} (verifier)")))?;
        // A bpf_link on a cgroup is always attached as BPF_F_ALLOW_MULTI
        // (beside systemd's programs); link_create refuses explicit flags.
        let id = prog
            .attach(&cgroup, attach_type, CgroupAttachMode::Single)
            .map_err(kernel(format!(
                "attaching {prog_name} to {}",
                paths.root.dir.display()
            )))?;
        let link = prog
            .take_link(id)
            .map_err(kernel(format!("taking the {prog_name} link")))?;
        let fd_link = FdLink::try_from(link).map_err(kernel(
            "the kernel attached the cgroup program without a bpf_link (kernel >= 5.7 needed)",
        ))?;
        fd_link
            .pin(&pin)
            .map_err(kernel(format!("pinning {}", pin.display())))?;
    }
    Ok(())
}

/// What a change of the services policy applies.
#[derive(Clone, Debug)]
pub struct SvcChoice {
    /// The file whose text is applied (the policy file, or a copy of an
    /// earlier version of it kept in the history).
    pub text: PathBuf,
    /// The policy file it stands for (recorded in the state).
    pub source: PathBuf,
    /// Live set edits over the file's sets.
    pub overrides: crate::attachment::swap::Overrides,
    /// A rollback: the generation restored.
    pub restored: Option<u64>,
}

/// Applies `policy` to an attached services attachment, dropping live set
/// edits (the file wins): see [`apply`].
pub fn reload(
    paths: &SvcPaths,
    policy: &Policy,
    policy_path: &Path,
    audit: bool,
) -> Result<SvcState, ServicesError> {
    let _lock = lock(paths)?;
    if let Some(s) = paths.read_state()
        && !s.set_overrides.is_empty()
    {
        tracing::warn!(
            "the file's sets replace the live edits of set(s) {} (`segbpf reload --services --keep-set-edits` keeps them)",
            s.set_overrides
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    apply_locked(
        paths,
        policy,
        &SvcChoice {
            text: policy_path.to_path_buf(),
            source: policy_path.to_path_buf(),
            overrides: crate::attachment::swap::Overrides::new(),
            restored: None,
        },
        audit,
    )
}

/// `reload --services` (and a follower's SIGHUP): the file `policy_path`
/// applied, with the live set edits in force when `keep_set_edits` (the
/// file wins otherwise; the edits dropped are logged).
pub fn reload_file(
    paths: &SvcPaths,
    policy_path: &Path,
    audit: bool,
    keep_set_edits: bool,
) -> Result<SvcState, ServicesError> {
    let _lock = lock(paths)?;
    let overrides = paths
        .read_state()
        .map(|s| s.set_overrides)
        .unwrap_or_default();
    let overrides = if keep_set_edits {
        overrides
    } else {
        if !overrides.is_empty() {
            tracing::warn!(
                "the file's sets replace the live edits of set(s) {}",
                overrides.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        crate::attachment::swap::Overrides::new()
    };
    apply_choice(
        paths,
        &SvcChoice {
            text: policy_path.to_path_buf(),
            source: policy_path.to_path_buf(),
            overrides,
            restored: None,
        },
        audit,
    )
}

/// Loads `choice` (its text with its set edits) and applies it: see
/// [`apply_locked`]. The caller holds [`lock`].
pub fn apply_choice(
    paths: &SvcPaths,
    choice: &SvcChoice,
    audit: bool,
) -> Result<SvcState, ServicesError> {
    let sets = crate::attachment::swap::parse_overrides(&choice.overrides)
        .map_err(|e| ServicesError::Refused(e.to_string()))?;
    let policy = Policy::load_with_sets(&choice.text, &sets)
        .map_err(|e| ServicesError::Refused(e.to_string()))?;
    apply_locked(paths, &policy, choice, audit)
}

/// Applies `policy` (loaded from `choice`) to an attached services
/// attachment: the next slot is filled and put in force with one write;
/// on any failure the slot in force is untouched. The caller holds
/// [`lock`].
pub fn apply_locked(
    paths: &SvcPaths,
    policy: &Policy,
    choice: &SvcChoice,
    audit: bool,
) -> Result<SvcState, ServicesError> {
    if !paths.is_attached() {
        return Err(paths.not_attached());
    }
    if paths.owner() == Owner::Other {
        return Err(paths.foreign());
    }
    if policy.services.is_empty() {
        return Err(ServicesError::NoServices(policy.source.clone()));
    }
    check_depth(paths, policy)?;
    // No rescan of the follower runs from here until the state names the
    // new policy: it would write the old policy's ids into the new slot.
    let _lock = paths.lock()?;
    // A direction another tool detached is linked again first: a policy
    // is never said to be in force where its program does not run.
    for line in relink(paths)? {
        tracing::warn!("{line}");
    }
    let mut maps = SvcMaps::from_pins(&paths.dir)?;
    let cur = maps.active()?;
    let next = 1 - cur;
    let before = paths.read_state();
    let generation = before.as_ref().map_or(1, |s| s.generation) + 1;
    let compiled = compile_services(policy, next, generation, audit)?;
    let cls = classify(&paths.root, &service_paths(&compiled));
    // The next slot may hold leftovers of a failed reload: empty it first.
    maps.clear_slot(next);
    maps.write_slot(&compiled, &cls, next)?;
    maps.zero_counters(next)?;
    maps.activate(next)?;
    maps.clear_slot(cur);
    maps.sync_cgroups(&cls)?;
    let state = SvcState {
        cgroup_root: paths.root.dir.clone(),
        cgroup_root_id: paths.root.id,
        policy: absolute(&choice.source),
        generation,
        slot: next,
        audit,
        services: compiled.services,
        rules: compiled.rules,
        set_overrides: choice.overrides.clone(),
        restored: choice.restored,
        owner: before.as_ref().and_then(|s| s.owner),
        cgroup_ns: before.as_ref().and_then(|s| s.cgroup_ns).or_else(cgroup_ns),
        pins: Some(absolute(&paths.dir)),
    };
    paths.write_state(&state)?;
    record_history(paths, &state, &choice.text);
    Ok(state)
}

/// The directions whose pinned link the kernel does not have on the
/// cgroup root (detached by another tool, `bpftool link detach`): their
/// names, and the pin of each.
pub fn unlinked(paths: &SvcPaths) -> Vec<(&'static str, PathBuf)> {
    [
        ("egress", paths.link_egress()),
        ("ingress", paths.link_ingress()),
    ]
    .into_iter()
    .filter(|(_, p)| {
        !crate::attachment::services_nest::pinned_cgroup_link(p)
            .is_ok_and(|(cg, _)| cg == paths.root.id)
    })
    .collect()
}

/// Links again every direction of the attachment at `paths` whose link
/// another tool detached (see [`unlinked`]): a new link of the same
/// program on the cgroup root, pinned over the old one (egress first, as
/// at attach). The maps, and with them the policy in force, stay. Returns
/// one line per direction linked again; fails, naming what is missing, if
/// one cannot be. The caller holds [`lock`].
pub fn relink(paths: &SvcPaths) -> Result<Vec<String>, ServicesError> {
    use crate::attachment::services_nest::{
        BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS, relink_cgroup,
    };
    let mut done = Vec::new();
    for (dir, pin) in unlinked(paths) {
        let attach_type = if dir == "egress" {
            BPF_CGROUP_INET_EGRESS
        } else {
            BPF_CGROUP_INET_INGRESS
        };
        let id = relink_cgroup(&pin, &paths.root, attach_type).map_err(|source| {
            ServicesError::Io {
                what: format!(
                    "the {dir} link below {} is not in the kernel (detached by another tool) and could not be linked again, so only {} is enforced; `segbpf detach --services` then `attach --services` enforces both again",
                    paths.root.dir.display(),
                    if dir == "egress" { "ingress" } else { "egress" }
                ),
                source,
            }
        })?;
        done.push(format!(
            "the {dir} link below {} was detached by another tool: linked again (link {id})",
            paths.root.dir.display()
        ));
    }
    Ok(done)
}

/// Reclassifies the cgroup tree for the services in force (a cgroup made
/// or removed). Returns (entries written, entries removed).
pub fn rescan(paths: &SvcPaths, maps: &mut SvcMaps) -> Result<(usize, usize), ServicesError> {
    // Not between a reload's reading of the state and its switch (the
    // state lock, then the pin directory's: the order every change takes).
    let _lock = lock(paths)?;
    let _pins = paths.lock()?;
    let Some(state) = paths.read_state() else {
        return Ok((0, 0));
    };
    // Another state directory's pins: never written from this state.
    if paths.owner() != Owner::Mine {
        return Ok((0, 0));
    }
    // The state must name the policy in force (a reload that died between
    // its flip and its state leaves them apart): else nothing is written,
    // new cgroups stay held until a reload puts things right.
    if maps.generation_in_force()? != state.generation {
        return Ok((0, 0));
    }
    let services: Vec<(u8, String)> = state
        .services
        .iter()
        .map(|s| (s.id, s.cgroup.clone()))
        .collect();
    let cls = classify(&paths.root, &services);
    maps.sync_cgroups(&cls)
}

/// The guard directories to watch for the services in force.
pub fn guards(paths: &SvcPaths) -> Vec<PathBuf> {
    let Some(state) = paths.read_state() else {
        return Vec::new();
    };
    let services: Vec<(u8, String)> = state
        .services
        .iter()
        .map(|s| (s.id, s.cgroup.clone()))
        .collect();
    classify(&paths.root, &services).guards
}

/// Removes the attachment: links (the programs leave the cgroup), maps,
/// state. Returns whether anything was there.
pub fn detach(paths: &SvcPaths) -> Result<bool, ServicesError> {
    // A state here without its pins here (no pin directory, or one that
    // holds only another state directory's mark and no link, such as a
    // crashed attach's), while the kernel has services programs on its
    // cgroup root: the attachment lives at another pin root (another
    // `SEGBPF_BPFFS`). Removing the state (and stopping its follower)
    // would leave it enforcing unseen: refused, nothing changed.
    let pins_not_ours = !paths.dir.exists()
        || (paths.owner() == Owner::Other
            && !paths.link_ingress().exists()
            && !paths.link_egress().exists());
    if paths.state.exists()
        && pins_not_ours
        && crate::attachment::services_nest::cgroup_alive(paths.root.id).unwrap_or(false)
        && crate::attachment::services_nest::services_at(&paths.root.dir)?
    {
        let hint = pins_elsewhere(paths).map_or_else(String::new, |h| format!(" ({h})"));
        return Err(ServicesError::Refused(format!(
            "the services below {} are enforced by programs whose pins are not under this pin root ({}): the state {} is for an attachment made with another SEGBPF_BPFFS; run `segbpf detach --services --cgroup-root {}` with that SEGBPF_BPFFS{hint}. Nothing was changed",
            paths.root.dir.display(),
            paths
                .dir
                .parent()
                .map_or_else(String::new, |p| p.display().to_string()),
            paths.state.display(),
            paths.root.dir.display()
        )));
    }
    let existed = paths.dir.exists() || paths.state.exists() || paths.next_dir().exists();
    // The programs these pins (and a side directory's) have on the root.
    let mut linked = paths.linked_programs();
    linked.extend(
        SvcPaths {
            dir: paths.next_dir(),
            ..paths.clone()
        }
        .linked_programs(),
    );
    // What a re-attach killed half-way left beside the pins (its own, or
    // the leftover it replaced): removed with them, as the pins are,
    // whichever state directory detaches.
    let side = paths.next_dir();
    if side.exists() {
        std::fs::remove_dir_all(&side).map_err(io(format!("removing {}", side.display())))?;
    }
    for link in [paths.link_ingress(), paths.link_egress()] {
        if link.exists() {
            std::fs::remove_file(&link).map_err(io(format!("removing {}", link.display())))?;
        }
    }
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir)
            .map_err(io(format!("removing {}", paths.dir.display())))?;
    }
    remove_history(paths);
    let _ = std::fs::remove_file(paths.state.with_extension("lock"));
    let _ = std::fs::remove_file(paths.state.with_extension("attach.lock"));
    if paths.state.exists() {
        std::fs::remove_file(&paths.state)
            .map_err(io(format!("removing {}", paths.state.display())))?;
    }
    // The follower's claim file (a live follower exits: the attachment is
    // gone).
    let claim = paths.state.with_extension("follow.lock");
    if claim.exists() {
        let _ = std::fs::remove_file(&claim);
    }
    // A pending `--confirm` ends with the attachment (its guard stands
    // down; it must not remove a later attach).
    let pending = paths.pending_file();
    if pending.exists() {
        std::fs::remove_file(&pending).map_err(io(format!("removing {}", pending.display())))?;
    }
    // The kernel detaches an unpinned link a moment later (deferred
    // work): wait (2 s at most) until its programs have left the root, so
    // what `detach` reports is what the kernel has, and an attach right
    // after finds no program of this attachment there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !linked.is_empty()
        && std::time::Instant::now() < deadline
        && crate::attachment::services_nest::programs_at(&paths.root.dir)
            .is_ok_and(|at| !at.is_disjoint(&linked))
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(existed)
}

/// When the state at `paths` names pins under another pin root than
/// `paths`' (an attach made with another `SEGBPF_BPFFS`) and they exist:
/// the hint naming them and that pin root.
pub fn pins_elsewhere(paths: &SvcPaths) -> Option<String> {
    let pins = paths.read_state()?.pins?;
    if pins == absolute(&paths.dir) || !pins.exists() {
        return None;
    }
    let root = pins.parent()?;
    Some(format!(
        "the state {} names the pins {} (its attach ran with SEGBPF_BPFFS={}): run with that SEGBPF_BPFFS",
        paths.state.display(),
        pins.display(),
        root.display()
    ))
}

/// The history directory of the attachment at `paths`.
pub fn history_dir(paths: &SvcPaths) -> PathBuf {
    paths.state.with_extension("history")
}

fn keep() -> usize {
    std::env::var("SEGBPF_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 2)
        .unwrap_or(10)
}

/// The history, oldest first.
pub fn history(paths: &SvcPaths) -> Vec<crate::attachment::history::Entry> {
    std::fs::read_to_string(history_dir(paths).join("index.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Records `state`, applied from the text of `text`, in the history
/// `rollback --services` restores from (`STATE/services:ID.history/`).
pub fn record(paths: &SvcPaths, state: &SvcState, text: &Path) -> Result<(), ServicesError> {
    let d = history_dir(paths);
    private_dir(&d).map_err(io(format!("creating {}", d.display())))?;
    let copy = d.join(format!("{}.toml", state.generation));
    if text != copy {
        std::fs::copy(text, &copy).map_err(io(format!("saving {}", copy.display())))?;
    }
    // The state as applied (its services and rules with their ids): what
    // `flows --services` names a flow's rule and peer from while that
    // flow's entry is older than the policy in force.
    let judged = judged_file(paths, state.generation);
    let body = serde_json::to_vec(state).unwrap_or_default();
    std::fs::write(&judged, body).map_err(io(format!("writing {}", judged.display())))?;
    let mut entries = history(paths);
    for e in entries.iter().filter(|e| e.generation >= state.generation) {
        if e.generation > state.generation {
            let _ = std::fs::remove_file(judged_file(paths, e.generation));
        }
    }
    entries.retain(|e| e.generation < state.generation);
    entries.push(crate::attachment::history::Entry {
        generation: state.generation,
        source: state.policy.display().to_string(),
        copy,
        set_overrides: state.set_overrides.clone(),
        restored: state.restored,
        roles: None,
    });
    while entries.len() > keep() {
        let old = entries.remove(0);
        let _ = std::fs::remove_file(old.copy);
        let _ = std::fs::remove_file(judged_file(paths, old.generation));
    }
    let tmp = d.join("index.json.tmp");
    let body = serde_json::to_vec_pretty(&entries).unwrap_or_default();
    std::fs::write(&tmp, body).map_err(io(format!("writing {}", tmp.display())))?;
    let index = d.join("index.json");
    std::fs::rename(&tmp, &index).map_err(io(format!("writing {}", index.display())))
}

/// The file keeping the state generation `generation` was applied as.
fn judged_file(paths: &SvcPaths, generation: u64) -> PathBuf {
    history_dir(paths).join(format!("{generation}.state.json"))
}

/// The state generation `generation` was applied as (its services and
/// rules with their ids): the one in force, or one the history still
/// keeps. None: not kept (pruned, or recorded by a version that kept only
/// the policy text).
pub fn state_of_generation(paths: &SvcPaths, generation: u64) -> Option<SvcState> {
    if let Some(s) = paths.read_state().filter(|s| s.generation == generation) {
        return Some(s);
    }
    if !history(paths).iter().any(|e| e.generation == generation) {
        return None;
    }
    let text = std::fs::read(judged_file(paths, generation)).ok()?;
    serde_json::from_slice::<SvcState>(&text)
        .ok()
        .filter(|s| s.generation == generation)
}

/// Removes the history (with the attachment).
pub fn remove_history(paths: &SvcPaths) {
    let _ = std::fs::remove_dir_all(history_dir(paths));
}

/// Every services attachment under `roots` (their cgroup root ids).
pub fn list(roots: &Roots) -> Vec<u64> {
    std::fs::read_dir(&roots.bpffs)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix(PIN_PREFIX)?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the attachment at `paths` enforces: both its pinned links are
/// live in the kernel on the cgroup `paths.root.id`, and that cgroup
/// exists (a link whose cgroup was removed is on no cgroup: the kernel
/// says id 0, a moment after the cgroup is gone).
pub fn enforces(paths: &SvcPaths) -> bool {
    [paths.link_ingress(), paths.link_egress()].iter().all(|p| {
        crate::attachment::services_nest::pinned_cgroup_link(p)
            .is_ok_and(|(cg, _)| cg == paths.root.id)
    }) && crate::attachment::services_nest::cgroup_alive(paths.root.id).unwrap_or(true)
}

/// Whether what is left of the attachment at `paths` (pins, state) is of a
/// cgroup root that is gone, asked of the kernel: no cgroup with its id
/// exists, or its ingress link is on no cgroup (or on another one than
/// the attachment's id). `false` when the kernel cannot be asked (nothing
/// is removed then).
fn root_gone(paths: &SvcPaths) -> bool {
    match crate::attachment::services_nest::cgroup_alive(paths.root.id) {
        Ok(false) => return true,
        Ok(true) => {}
        Err(_) => return false,
    }
    match crate::attachment::services_nest::pinned_cgroup_link(&paths.link_ingress()) {
        Ok((cg, _)) => cg != paths.root.id,
        Err(_) => false,
    }
}

/// The ids of the attachments under `roots`: their pins and their states.
fn ids(roots: &Roots) -> std::collections::BTreeSet<u64> {
    let mut ids: std::collections::BTreeSet<u64> = list(roots).into_iter().collect();
    if let Ok(rd) = std::fs::read_dir(&roots.state) {
        ids.extend(rd.filter_map(Result::ok).filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(PIN_PREFIX)?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        }));
    }
    ids
}

/// Whether `st` was recorded in this cgroup namespace (its paths are
/// this namespace's; an older state without the namespace: assumed).
fn recorded_here(st: &SvcState) -> bool {
    st.cgroup_ns.is_none_or(|n| Some(n) == cgroup_ns())
}

/// The paths of the attachment `id` under `roots`, named by its state's
/// root when that is a path of this cgroup namespace, else by what is
/// known of it (the namespace's path and the cgroup id; only the id when
/// this state directory has no state for it).
fn gone_paths(roots: &Roots, id: u64, st: Option<&SvcState>) -> SvcPaths {
    let dir = match st {
        Some(st) if recorded_here(st) => st.cgroup_root.clone(),
        Some(st) => PathBuf::from(format!(
            "{} of another cgroup namespace (cgroup id {id})",
            st.cgroup_root.display()
        )),
        None => PathBuf::from(format!("cgroup id {id} (no state in this state directory)")),
    };
    SvcPaths::new(roots, CgroupRoot { dir, id, level: 0 })
}

fn read_state_of(roots: &Roots, id: u64) -> Option<SvcState> {
    let file = roots.state.join(format!("{PIN_PREFIX}{id}.json"));
    serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()
}

/// The attachments under `roots` whose cgroup is gone (removed, perhaps
/// made again with another id, `current`) and that are of the cgroup root
/// `dir`: their state names it, or they cannot be named by a path from
/// here (made in another cgroup namespace, whose paths are not this
/// one's, or pins without a state in this state directory: found from
/// the pins and judged by the kernel). [`detach`] removes what is left of
/// them, `status` reports them as not enforcing ([`root_gone`]).
pub fn gone_at(roots: &Roots, dir: &Path, current: Option<u64>) -> Vec<SvcPaths> {
    let want = absolute(dir);
    ids(roots)
        .into_iter()
        .filter(|id| Some(*id) != current)
        .filter_map(|id| {
            let st = read_state_of(roots, id);
            let named_here = st.as_ref().is_some_and(recorded_here);
            let wanted = !named_here
                || st
                    .as_ref()
                    .is_some_and(|st| st.cgroup_root == want || st.cgroup_root == dir);
            wanted.then(|| gone_paths(roots, id, st.as_ref()))
        })
        .filter(root_gone)
        .collect()
}

/// Every attachment under `roots` whose cgroup is gone, wherever it was
/// (for `status`).
pub fn gone_all(roots: &Roots) -> Vec<SvcPaths> {
    ids(roots)
        .into_iter()
        .map(|id| gone_paths(roots, id, read_state_of(roots, id).as_ref()))
        .filter(root_gone)
        .collect()
}

/// Entries of `SEG_SVC_CFG` (for callers sizing things).
pub const CFG_ENTRIES: u32 = SVC_CFG_ENTRIES;

#[cfg(test)]
mod tests {
    use super::*;

    /// Owner marks of this version carry the state directory's
    /// `st_dev-st_ino`; older ones do not (and never count as this state
    /// directory's crashed attach).
    #[test]
    fn owner_marks_parse_both_formats() {
        let dir = std::env::temp_dir().join(format!("segbpf-marks-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("owner:00000000000000ab:%2Frun%2Fsegbpf")).unwrap();
        std::fs::create_dir_all(dir.join("owner:00000000000000cd:@12-34:%2Ftmp%2Fa%25b")).unwrap();
        std::fs::create_dir_all(dir.join("owner:00000000000000ef:@5-6")).unwrap();
        let mut marks = owner_marks(&dir);
        marks.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            marks,
            vec![
                (0xab, Some("/run/segbpf".to_string()), None),
                (0xcd, Some("/tmp/a%b".to_string()), Some((12, 34))),
                (0xef, None, Some((5, 6))),
            ]
        );
    }
}
