//! Services attachments never nest. Two attachments whose cgroup roots
//! are the same cgroup, or one below the other, both judge the packets of
//! the cgroups they share, and each overwrites the sender stamp the other
//! reads (docs/services.md): `to_services` would fail open. A fresh
//! `attach --services` therefore refuses a root with segbpf's services
//! programs attached at itself, at an ancestor or at a descendant.
//!
//! Identity and liveness come from the kernel, never from a state file:
//! `BPF_PROG_QUERY` lists the cgroup_skb programs attached at each cgroup
//! (directly, not inherited), and a program is segbpf's services program
//! by its kernel name. A state file left by a dead attachment blocks
//! nothing; a live attachment whose state file or pins are gone (another
//! pin root, a deleted state directory) is still found.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use segbpf_common::{PROG_SVC_EGRESS, PROG_SVC_INGRESS};

use crate::host::{
    bpf_sys::{self, BPF_LINK_TYPE_CGROUP, BPF_PROG_QUERY, bpf},
    cgroups::{CgroupRoot, cgroup2_mount},
};

/// Why a services attachment may not be made at a root.
#[derive(Debug, thiserror::Error)]
pub enum NestError {
    /// Another live attachment's root is this root, an ancestor or a
    /// descendant of it.
    #[error("{0}")]
    Nested(String),
    /// The kernel could not be asked.
    #[error("{what}: {source}")]
    Io {
        /// What was asked.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// `BPF_CGROUP_INET_INGRESS`, `BPF_CGROUP_INET_EGRESS`.
const ATTACH_TYPES: [u32; 2] = [0, 1];
/// The kernel keeps a program's name to 15 bytes (`BPF_OBJ_NAME_LEN - 1`).
const KERNEL_NAME_LEN: usize = 15;

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The ids of the programs attached directly at the cgroup `dir` for
/// `attach_type`.
fn attached(dir: &Path, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let f = std::fs::File::open(dir)?;
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: f.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_PROG_QUERY; the kernel writes
    // at most `prog_cnt` ids into `ids`, which outlives the call.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate((attr.prog_cnt as usize).min(64));
    Ok(ids)
}

/// The ids of the programs attached directly at the cgroup `dir`, both
/// directions.
pub fn programs_at(dir: &Path) -> std::io::Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for t in ATTACH_TYPES {
        out.extend(attached(dir, t)?);
    }
    Ok(out)
}

/// Whether `name` (a kernel program name) is one of segbpf's live
/// services programs.
fn is_services_program(name: &str) -> bool {
    [PROG_SVC_INGRESS, PROG_SVC_EGRESS]
        .iter()
        .any(|p| name == &p[..p.len().min(KERNEL_NAME_LEN)])
}

/// The ids of every loaded program that is a services program of segbpf.
fn services_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(is_services_program))
        .map(|p| p.id())
        .collect()
}

/// The ids of segbpf's services programs (of any pins) attached directly
/// at `dir`, asked of the kernel (none when it cannot be asked).
pub fn services_programs_at(dir: &Path) -> BTreeSet<u32> {
    let at = programs_at(dir).unwrap_or_default();
    if at.is_empty() {
        return at;
    }
    services_programs().intersection(&at).copied().collect()
}

/// Whether segbpf's services programs (of any pins) are attached
/// directly at `dir`, asked of the kernel.
pub fn services_at(dir: &Path) -> Result<bool, NestError> {
    let ours = services_programs();
    if ours.is_empty() {
        return Ok(false);
    }
    has_services(dir, &ours)
}

/// Whether segbpf's services programs are attached directly at `dir`.
fn has_services(dir: &Path, ours: &BTreeSet<u32>) -> Result<bool, NestError> {
    for t in ATTACH_TYPES {
        let ids = attached(dir, t).map_err(|source| NestError::Io {
            what: format!("querying the programs attached at {}", dir.display()),
            source,
        })?;
        if ids.iter().any(|id| ours.contains(id)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The first cgroup below `dir` (depth first) with segbpf's services
/// programs attached.
fn below(dir: &Path, ours: &BTreeSet<u32>) -> Result<Option<PathBuf>, NestError> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        // Removed meanwhile: nothing is attached below a cgroup that is gone.
        return Ok(None);
    };
    for e in rd.filter_map(Result::ok) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let p = e.path();
        match has_services(&p, ours) {
            Ok(true) => return Ok(Some(p)),
            Ok(false) => {}
            // A cgroup removed between the listing and the query.
            Err(_) if !p.exists() => continue,
            Err(e) => return Err(e),
        }
        if let Some(found) = below(&p, ours)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Refuses to enforce services where the absolute level of this cgroup
/// namespace's root cannot be found from the kernel (the level probe,
/// [`crate::attachment::services_level`]): the levels seen inside a cgroup
/// namespace (a container, `systemd-nspawn`, `unshare -C`) are not the
/// absolute levels the programs read (`bpf_skb_ancestor_cgroup_id`).
pub fn refuse_cgroup_namespace() -> Result<(), NestError> {
    let ns = crate::attachment::services_level::ns_root()
        .map_err(|e| NestError::Nested(e.to_string()))?;
    if !ns.complete {
        return Err(NestError::Nested(
            "this process's cgroup lies outside its cgroup namespace (it entered the namespace): the cgroups above the namespace's root are not known, so attachments there cannot be ruled out; run `segbpf attach --services` from a cgroup inside the namespace, or on the host".into(),
        ));
    }
    Ok(())
}

/// Every cgroup link of the kernel: (cgroup id, program id). A link gone
/// between the listing and the open is skipped.
fn cgroup_links() -> std::io::Result<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    while let Some(next) = bpf_sys::link_next_id(id)? {
        id = next;
        let Some(fd) = bpf_sys::link_by_id(id)? else {
            continue;
        };
        let info = bpf_sys::link_info(fd.as_fd())?;
        if info.link_type == BPF_LINK_TYPE_CGROUP {
            out.push((info.cgroup_id(), info.prog_id));
        }
    }
    Ok(out)
}

/// What the kernel says of a pinned cgroup link: the id of the cgroup it
/// is attached to (0 once that cgroup is gone: the kernel detaches a
/// link from a cgroup that dies) and its program's id.
pub fn pinned_cgroup_link(pin: &Path) -> std::io::Result<(u64, u32)> {
    let info = bpf_sys::link_info(bpf_sys::obj_get(pin)?.as_fd())?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        return Err(std::io::Error::other(format!(
            "{} is no cgroup link",
            pin.display()
        )));
    }
    Ok((info.cgroup_id(), info.prog_id))
}

/// `bpf_attr` for `BPF_LINK_CREATE` on a cgroup (no extra fields set).
#[repr(C)]
#[derive(Default)]
struct CgroupLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// `BPF_CGROUP_INET_INGRESS`.
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
/// `BPF_CGROUP_INET_EGRESS`.
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// Links the program of the pinned cgroup link `pin` to the cgroup `root`
/// again, after another tool detached that link (`bpftool link detach`:
/// the kernel then reports its cgroup as 0, and the link keeps its
/// program). The new link is pinned under a temporary name and renamed
/// over `pin`, so the pin never names nothing; the old link goes with its
/// pin. A pin whose link is attached to another cgroup, or a `root` whose
/// cgroup is not the one of id `root.id` (re-created), is refused. Returns
/// the new link's id.
pub fn relink_cgroup(pin: &Path, root: &CgroupRoot, attach_type: u32) -> std::io::Result<u32> {
    let step = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let old = bpf_sys::obj_get(pin).map_err(step(format!("opening {}", pin.display())))?;
    let info = bpf_sys::link_info(old.as_fd())
        .map_err(step(format!("asking the kernel about {}", pin.display())))?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        return Err(std::io::Error::other(format!(
            "{} is no cgroup link",
            pin.display()
        )));
    }
    if info.cgroup_id() != 0 {
        return Err(std::io::Error::other(format!(
            "link {} of {} is attached to cgroup {}, not detached",
            info.id,
            pin.display(),
            info.cgroup_id()
        )));
    }
    let prog = bpf_sys::prog_by_id(info.prog_id)
        .map_err(step(format!("opening program {}", info.prog_id)))?
        .ok_or_else(|| std::io::Error::other(format!("program {} is gone", info.prog_id)))?;
    let cgroup =
        std::fs::File::open(&root.dir).map_err(step(format!("opening {}", root.dir.display())))?;
    // The cgroup opened is the attachment's (by the kernel's id, read
    // through the descriptor, not the path).
    let id = std::os::unix::fs::MetadataExt::ino(
        &cgroup
            .metadata()
            .map_err(step(format!("the id of {}", root.dir.display())))?,
    );
    if id != root.id {
        return Err(std::io::Error::other(format!(
            "{} is cgroup {id} now, not {} (re-created): detach and attach again",
            root.dir.display(),
            root.id
        )));
    }
    let mut attr = CgroupLinkAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..CgroupLinkAttr::default()
    };
    // SAFETY: `attr` is the bpf_attr of BPF_LINK_CREATE (no pointers), a
    // command that returns a new descriptor.
    let link = unsafe { bpf_sys::bpf_fd(bpf_sys::BPF_LINK_CREATE, &mut attr) }.map_err(step(
        format!("linking program {} to {}", info.prog_id, root.dir.display()),
    ))?;
    // bpffs refuses dots in names.
    let mut tmp = pin.to_path_buf().into_os_string();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    bpf_sys::obj_pin(link.as_fd(), &tmp).map_err(step(format!("pinning {}", tmp.display())))?;
    if let Err(e) = std::fs::rename(&tmp, pin) {
        let _ = std::fs::remove_file(&tmp);
        return Err(step(format!(
            "renaming {} to {}",
            tmp.display(),
            pin.display()
        ))(e));
    }
    Ok(bpf_sys::link_info(link.as_fd()).map_or(0, |i| i.id))
}

/// Refuses `root` when one of `ancestors` (cgroup ids this process cannot
/// see by path: above its cgroup namespace's root, and that root) has
/// segbpf's services programs linked, by the kernel's cgroup links.
fn refuse_linked_above(
    root: &CgroupRoot,
    ancestors: &[u64],
    ours: &BTreeSet<u32>,
    how: &str,
) -> Result<(), NestError> {
    if ancestors.is_empty() {
        return Ok(());
    }
    let links = cgroup_links().map_err(|source| NestError::Io {
        what: "listing the kernel's BPF links".into(),
        source,
    })?;
    for (cg, prog) in links {
        if ours.contains(&prog) && (ancestors.contains(&cg) || cg == root.id) {
            return Err(NestError::Nested(format!(
                "another services attachment enforces below cgroup id {cg}, which contains {} (outside this cgroup namespace, or its root): {how}; detach it first",
                root.dir.display()
            )));
        }
    }
    Ok(())
}

/// `FILEID_KERNFS`: a cgroup's file handle is its 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` holding a kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

/// Opens the cgroup `id` (whether or not a path of this process's mounts
/// leads to it: above a subtree mount, above this cgroup namespace's
/// root) by its file handle on the cgroup2 file system of `mount`.
/// `Ok(None)`: no such cgroup (gone).
fn open_cgroup_by_id(mount: &std::fs::File, id: u64) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::FromRawFd as _;
    let mut h = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `h` is a `struct file_handle` with its 8 bytes of handle,
    // alive for the call; `mount` is an open descriptor on cgroup2.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            std::ptr::from_mut(&mut h),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESTALE | libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(Some(unsafe { std::fs::File::from_raw_fd(rc as i32) }))
}

/// Whether the cgroup `id` exists, asked of the kernel (opened by its
/// handle on the cgroup v2 mount): a removed cgroup is gone at once, while
/// the kernel detaches its links a moment later.
pub fn cgroup_alive(id: u64) -> std::io::Result<bool> {
    let (mount, _) = cgroup2_mount().map_err(|e| std::io::Error::other(e.to_string()))?;
    let mount = std::fs::File::open(mount)?;
    Ok(open_cgroup_by_id(&mount, id)?.is_some())
}

/// The path of the cgroup `id` in this process's mounts, from the kernel
/// (the cgroup opened by its handle, its path read back): how an
/// attachment whose state names it by another cgroup namespace's path,
/// or that has no state here, is found. `None`: gone, or no path here.
pub fn cgroup_path(id: u64) -> Option<PathBuf> {
    let (mount, _) = cgroup2_mount().ok()?;
    let mount = std::fs::File::open(mount).ok()?;
    let cg = open_cgroup_by_id(&mount, id).ok()??;
    std::fs::read_link(format!("/proc/self/fd/{}", cg.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute() && p.is_dir())
}

/// Whether a cgroup below `dir` (not `dir` itself) has an id in `ids`;
/// the first found. Ids are the kernel's (a cgroup directory's inode).
fn below_ids(dir: &Path, ids: &BTreeSet<u64>) -> Option<u64> {
    use std::os::unix::fs::DirEntryExt as _;
    let rd = std::fs::read_dir(dir).ok()?;
    for e in rd.filter_map(Result::ok) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if ids.contains(&e.ino()) {
            return Some(e.ino());
        }
        if let Some(found) = below_ids(&e.path(), ids) {
            return Some(found);
        }
    }
    None
}

/// How another attachment's cgroup stands to a root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relation {
    Same,
    Ancestor,
    Descendant,
}

/// The cgroup of another live services link (a program named as
/// segbpf's services programs, not one of `own`) at `root`, an ancestor
/// or a descendant of it, all from the kernel: its cgroup links
/// (`BPF_LINK_GET_NEXT_ID`), the ancestors the level probe names, the
/// cgroups below `root`, and for each other link's cgroup, the cgroups
/// below it (opened by id, so a cgroup above a subtree mount or above
/// this cgroup namespace is seen too).
fn linked_relative(
    root: &CgroupRoot,
    own: &BTreeSet<u32>,
) -> Result<Option<(u64, Relation)>, NestError> {
    let programs: BTreeSet<u32> = services_programs().difference(own).copied().collect();
    if programs.is_empty() {
        return Ok(None);
    }
    let links = cgroup_links().map_err(|source| NestError::Io {
        what: "listing the kernel's BPF links".into(),
        source,
    })?;
    // A link whose cgroup is gone (id 0) enforces nothing.
    let others: BTreeSet<u64> = links
        .iter()
        .filter(|(cg, prog)| *cg != 0 && programs.contains(prog))
        .map(|(cg, _)| *cg)
        .collect();
    if others.is_empty() {
        return Ok(None);
    }
    if others.contains(&root.id) {
        return Ok(Some((root.id, Relation::Same)));
    }
    let ns = crate::attachment::services_level::ns_root()
        .map_err(|e| NestError::Nested(e.to_string()))?;
    if let Some(cg) = ns.ancestors.iter().find(|a| others.contains(a)) {
        return Ok(Some((*cg, Relation::Ancestor)));
    }
    if let Some(cg) = below_ids(&root.dir, &others) {
        return Ok(Some((cg, Relation::Descendant)));
    }
    let mount = std::fs::File::open(&root.dir).map_err(|source| NestError::Io {
        what: format!("opening {}", root.dir.display()),
        source,
    })?;
    let want = BTreeSet::from([root.id]);
    for cg in others {
        let dir = open_cgroup_by_id(&mount, cg).map_err(|source| NestError::Io {
            what: format!(
                "opening cgroup id {cg} (another services attachment's) to see whether it contains {}",
                root.dir.display()
            ),
            source,
        })?;
        let Some(dir) = dir else { continue };
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        if below_ids(&path, &want).is_some() {
            return Ok(Some((cg, Relation::Ancestor)));
        }
    }
    Ok(None)
}

/// Refuses `root` when the kernel has another services attachment's link
/// (a program other than `own`) at `root`, an ancestor (also one no path
/// of this process shows: above a subtree mount of cgroup2 or above this
/// cgroup namespace's root) or a descendant. `raced`: the check made
/// after this attach's own links were created.
/// `nest_lock_held`: whether this attach held [`nest_lock`] (named in the
/// error of a race: without it, a nested attach in this very namespace
/// may have passed its check at the same moment).
pub fn refuse_linked(
    root: &CgroupRoot,
    own: &BTreeSet<u32>,
    raced: bool,
    nest_lock_held: bool,
) -> Result<(), NestError> {
    let Some((cg, rel)) = linked_relative(root, own)? else {
        return Ok(());
    };
    let at = match rel {
        Relation::Same => format!("at {} itself", root.dir.display()),
        Relation::Ancestor => format!("at cgroup id {cg}, an ancestor of {}", root.dir.display()),
        Relation::Descendant => format!("at cgroup id {cg}, below {}", root.dir.display()),
    };
    let how = "services attachments must not nest: both would judge the cgroups they share and overwrite each other's sender stamp, so `to_services` would not hold";
    Err(NestError::Nested(if raced {
        format!(
            "another services attachment came into force {at} while this one was attached ({past}): {how}; this attach was undone (the previous state is untouched; if both raced, both were undone): retry, or detach the other one first",
            past = if nest_lock_held {
                "from another cgroup namespace or mount, past the attach lock"
            } else {
                "this attach went on without the machine-wide lock on the cgroup v2 root, which a process that is not root held, so another attach may have passed its check at the same moment; or it came from another cgroup namespace or mount"
            }
        )
    } else {
        format!(
            "another services attachment enforces {at} (found from the kernel's links; it may be invisible by path here: above a subtree mount of cgroup2 or this cgroup namespace): {how}; detach it first"
        )
    }))
}

/// The program ids of the pinned cgroup links `pins` (this attachment's own).
pub fn own_programs(pins: &[PathBuf]) -> Result<BTreeSet<u32>, NestError> {
    pins.iter()
        .map(|p| {
            pinned_cgroup_link(p)
                .map(|(_, prog)| prog)
                .map_err(|source| NestError::Io {
                    what: format!("reading the link {}", p.display()),
                    source,
                })
        })
        .collect()
}

/// The lock every fresh services attach on this machine holds from its
/// nesting check until its programs are attached: an exclusive `flock` on
/// the cgroup v2 hierarchy's root directory, the one file every segbpf
/// sees whatever its state or pin directories, so two attaches at nested
/// (or equal) roots do not both pass the check. Any local user may open
/// that directory and lock it: a holder that is not root is waited for
/// one second only (named on stderr), then the attach goes on without
/// it (`None`); the check of the kernel's links after the attach
/// ([`refuse_linked`]) still undoes a nested one.
pub fn nest_lock() -> Result<Option<std::fs::File>, NestError> {
    let (mount, _) = cgroup2_mount().map_err(|e| NestError::Io {
        what: "finding the cgroup v2 mount".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let dir = std::fs::File::open(&mount).map_err(|source| NestError::Io {
        what: format!("opening {}", mount.display()),
        source,
    })?;
    let got = crate::attachment::dirs::lock_noting_holder(
        &dir,
        &mount,
        "attach --services",
        Some(std::time::Duration::from_secs(1)),
    )
    .map_err(|source| NestError::Io {
        what: format!("locking {}", mount.display()),
        source,
    })?;
    if !got {
        tracing::warn!(
            "attach --services: the lock on {} is held by a process that is not root; going on without it (an attachment that comes into force above or below this one meanwhile is found in the kernel after the attach, and this one is undone)",
            mount.display()
        );
        return Ok(None);
    }
    Ok(Some(dir))
}

/// Refuses `root` when segbpf's services programs are attached, in the
/// kernel, at `root` itself, at one of its ancestors up to the cgroup v2
/// mount, or at a cgroup below it; the error names that cgroup. The
/// programs `own` (a leftover this attach replaces) do not count.
pub fn refuse_nested(root: &CgroupRoot, own: &BTreeSet<u32>) -> Result<(), NestError> {
    let ours: BTreeSet<u32> = services_programs().difference(own).copied().collect();
    if ours.is_empty() {
        return Ok(());
    }
    let how = "services attachments must not nest: both would judge the cgroups they share and overwrite each other's sender stamp, so `to_services` would not hold";
    let ns = crate::attachment::services_level::ns_root()
        .map_err(|e| NestError::Nested(e.to_string()))?;
    refuse_linked_above(root, &ns.ancestors, &ours, how)?;
    if has_services(&root.dir, &ours)? {
        return Err(NestError::Nested(format!(
            "services are already enforced below {} by another services attachment (made with other pins: another `SEGBPF_BPFFS`): {how}; detach it first",
            root.dir.display()
        )));
    }
    let mount = cgroup2_mount()
        .ok()
        .and_then(|(m, _)| m.canonicalize().ok());
    for dir in root.dir.ancestors().skip(1) {
        if mount.as_deref().is_none_or(|m| !dir.starts_with(m)) {
            break;
        }
        if has_services(dir, &ours)? {
            return Err(NestError::Nested(format!(
                "another services attachment enforces below {}, which contains {}: {how}; put this policy's services into that attachment's policy, or `segbpf detach --services --cgroup-root {}` first",
                dir.display(),
                root.dir.display(),
                dir.display()
            )));
        }
    }
    if let Some(dir) = below(&root.dir, &ours)? {
        return Err(NestError::Nested(format!(
            "another services attachment enforces below {}, which lies below {}: {how}; put its services into this policy, or `segbpf detach --services --cgroup-root {}` first",
            dir.display(),
            root.dir.display(),
            dir.display()
        )));
    }
    // What no path shows (above a subtree mount): the kernel's links.
    refuse_linked(root, own, false, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_the_programs_names_cut_to_15_bytes() {
        assert!(is_services_program("segbpf_svc_ingr"));
        assert!(is_services_program("segbpf_svc_egre"));
        assert!(!is_services_program("segbpf_svc_dry_"));
        assert!(!is_services_program("segbpf_svc_empt"));
        assert!(!is_services_program("sd_fw_ingress"));
    }
}
