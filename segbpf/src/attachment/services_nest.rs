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
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use segbpf_common::{PROG_SVC_EGRESS, PROG_SVC_INGRESS};

use crate::host::cgroups::{CgroupRoot, cgroup2_mount};

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

/// `BPF_PROG_QUERY`.
const BPF_PROG_QUERY: libc::c_long = 16;
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
    // SAFETY: `attr` is a #[repr(C)] prefix of bpf_attr that lives for the
    // call, its size is passed; the kernel writes at most `prog_cnt` ids
    // into `ids`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    ids.truncate((attr.prog_cnt as usize).min(64));
    Ok(ids)
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

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, a
/// constant of the kernel's).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Refuses to enforce services from inside a cgroup namespace other than
/// the initial one (a container's, `systemd-nspawn`, `unshare -C`): there
/// the cgroup v2 mount's root is not the hierarchy's, so every level this
/// process can see is off from the absolute level the programs read
/// (`bpf_skb_ancestor_cgroup_id`), no socket would be found in its
/// service, and the nesting check could not see attachments above.
/// Asked of the kernel: the namespace of this process.
pub fn refuse_cgroup_namespace() -> Result<(), NestError> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata("/proc/self/ns/cgroup").map_err(|source| NestError::Io {
        what: "reading /proc/self/ns/cgroup".into(),
        source,
    })?;
    // A namespace whose root is the hierarchy's own root (a container
    // started from the root cgroup) sees the true levels: the cgroup v2
    // mount's root is then the root cgroup, id 1.
    let root_is_hierarchy_root = cgroup2_mount()
        .ok()
        .and_then(|(m, _)| std::fs::metadata(m).ok())
        .is_some_and(|m| m.ino() == 1);
    if ns.ino() != INIT_CGROUP_NS_INO && !root_is_hierarchy_root {
        return Err(NestError::Nested(
            "this process runs in a cgroup namespace other than the host's (a container, systemd-nspawn, `unshare -C`): services cannot be enforced from here (the cgroup levels seen here are not the kernel's); run `segbpf attach --services` on the host".into(),
        ));
    }
    Ok(())
}

/// The lock every fresh services attach on this machine holds from its
/// nesting check until its programs are attached: an exclusive `flock` on
/// the cgroup v2 hierarchy's root directory, the one file every segbpf
/// sees whatever its state or pin directories, so two attaches at nested
/// (or equal) roots cannot both pass the check.
pub fn nest_lock() -> Result<std::fs::File, NestError> {
    let (mount, _) = cgroup2_mount().map_err(|e| NestError::Io {
        what: "finding the cgroup v2 mount".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let dir = std::fs::File::open(&mount).map_err(|source| NestError::Io {
        what: format!("opening {}", mount.display()),
        source,
    })?;
    dir.lock().map_err(|source| NestError::Io {
        what: format!("locking {}", mount.display()),
        source,
    })?;
    Ok(dir)
}

/// Refuses `root` when segbpf's services programs are attached, in the
/// kernel, at `root` itself, at one of its ancestors up to the cgroup v2
/// mount, or at a cgroup below it; the error names that cgroup.
pub fn refuse_nested(root: &CgroupRoot) -> Result<(), NestError> {
    let ours = services_programs();
    if ours.is_empty() {
        return Ok(());
    }
    let how = "services attachments must not nest: both would judge the cgroups they share and overwrite each other's sender stamp, so `to_services` would not hold";
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
    Ok(())
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
