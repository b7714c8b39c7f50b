//! Files left by network namespaces that are gone: the pin and state
//! directories `net/INODE/` of a namespace that no longer exists (a
//! container that stopped, `ip netns del`) stay until the machine reboots,
//! as nothing runs in that namespace to detach. [`prune`] removes them.
//!
//! Liveness comes from the kernel, never from a file:
//! - a namespace is alive while something refers to it: a task that runs
//!   in it (`/proc/PID/task/TID/ns/net`), an open descriptor
//!   (`/proc/PID/fd/*` reading `net:[INODE]`) or a bind mount in any mount
//!   namespace (`nsfs` lines of `/proc/PID/mountinfo`, as `ip netns add`
//!   makes). Any of these, seen or not, keeps the files;
//! - even with no reference found, the files of a namespace stay while
//!   any of its pinned links is still attached to an interface
//!   ([`crate::attachment::liveness::pinned_link_ifindex`]: 0 once the kernel
//!   detached it): removing that pin could detach a program that still
//!   enforces somewhere (a reference this process cannot see, or a
//!   physical device moved back to the initial namespace). Removing the
//!   pins of detached links changes nothing in the kernel's filtering;
//! - a change in progress there (its update lock held) keeps them too.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::{debug, info, warn};

use crate::{attachment::pins::Roots, host::netns::Netns};

/// Removes the pin and state directories of every network namespace
/// that is gone (see the module's documentation); `current` is the
/// caller's namespace (never touched). Returns the inodes removed.
/// Failures are logged: nothing here may stop an attach.
pub fn prune(roots: &Roots, current: &Netns) -> Vec<u64> {
    let keys = namespace_keys(roots, current);
    if keys.is_empty() {
        return Vec::new();
    }
    let live = live_namespaces();
    let mut removed = Vec::new();
    for inode in keys {
        if live.contains(&inode) {
            continue;
        }
        let pins = roots.bpffs.join("net").join(inode.to_string());
        if let Some(link) = attached_link(&pins) {
            debug!(
                "network namespace net:[{inode}] has no reference left, but {} is still attached: its files stay",
                link.display()
            );
            continue;
        }
        let state = roots.state.join("net").join(inode.to_string());
        // A change in progress there holds its update lock: leave it be.
        let Some(_locks) = take_locks(&state) else {
            debug!("network namespace net:[{inode}]: a change holds its lock; its files stay");
            continue;
        };
        let mut ok = true;
        for dir in [&pins, &state] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!("removing {}: {e}", dir.display());
                    ok = false;
                }
                _ => {}
            }
        }
        if ok {
            info!(
                "removed the segbpf files of network namespace net:[{inode}], which is gone ({}, {})",
                pins.display(),
                state.display()
            );
            removed.push(inode);
        }
    }
    removed
}

/// Every update lock of the attachments under `state` (`*.update.lock`),
/// taken without waiting; `None` when one is held.
fn take_locks(state: &Path) -> Option<Vec<std::fs::File>> {
    let mut held = Vec::new();
    for entry in std::fs::read_dir(state)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        if !entry
            .file_name()
            .to_string_lossy()
            .ends_with(".update.lock")
        {
            continue;
        }
        let file = std::fs::File::open(entry.path()).ok()?;
        file.try_lock().ok()?;
        held.push(file);
    }
    Some(held)
}

/// The namespace inodes that have a directory under either root's
/// `net/`, but the caller's.
fn namespace_keys(roots: &Roots, current: &Netns) -> BTreeSet<u64> {
    [&roots.bpffs, &roots.state]
        .iter()
        .filter_map(|root| std::fs::read_dir(root.join("net")).ok())
        .flat_map(|rd| rd.filter_map(Result::ok))
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|&inode| inode != current.inode)
        .collect()
}

/// Every network namespace something on this machine refers to, as far
/// as this process can see.
fn live_namespaces() -> BTreeSet<u64> {
    let mut live = BTreeSet::new();
    let mut mount_namespaces = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return live;
    };
    for pid in procs.filter_map(Result::ok) {
        if pid
            .file_name()
            .to_str()
            .is_none_or(|n| n.parse::<u32>().is_err())
        {
            continue;
        }
        let dir = pid.path();
        for task in std::fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if let Ok(m) = std::fs::metadata(task.path().join("ns/net")) {
                live.insert(m.ino());
            }
        }
        for fd in std::fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|t| net_inode(&t.to_string_lossy()))
            {
                live.insert(inode);
            }
        }
        // Bind mounts: once per mount namespace.
        let mnt = std::fs::metadata(dir.join("ns/mnt")).map_or(0, |m| m.ino());
        if mount_namespaces.insert(mnt)
            && let Ok(mountinfo) = std::fs::read_to_string(dir.join("mountinfo"))
        {
            live.extend(mountinfo.lines().filter_map(nsfs_mount_inode));
        }
    }
    live
}

/// `net:[INODE]`, the target of a namespace file's link.
fn net_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The namespace of an `nsfs` bind mount line of `mountinfo`
/// (`... 4 ... nsfs net:[4026532290] ... - nsfs nsfs rw`).
fn nsfs_mount_inode(line: &str) -> Option<u64> {
    let (fields, fs) = line.split_once(" - ")?;
    if fs.split_whitespace().next() != Some("nsfs") {
        return None;
    }
    // The root field (4th) names the namespace.
    net_inode(fields.split_whitespace().nth(3)?)
}

/// The first pinned link under `pins` (`IFACE/link_*`) that the kernel
/// still has attached to an interface, or that cannot be read (kept, to
/// be safe).
fn attached_link(pins: &Path) -> Option<PathBuf> {
    let links = std::fs::read_dir(pins)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .flat_map(|iface| {
            std::fs::read_dir(iface.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
        })
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link_"))
        });
    for link in links {
        match crate::attachment::liveness::pinned_link_ifindex(&link) {
            Ok(0) => {}
            Ok(_) => return Some(link),
            Err(e) => {
                warn!("reading the pinned link {}: {e}", link.display());
                return Some(link);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_references_are_read() {
        assert_eq!(net_inode("net:[4026532290]"), Some(4_026_532_290));
        assert_eq!(net_inode("mnt:[4026532290]"), None);
        assert_eq!(net_inode("socket:[12]"), None);
        let line = "812 29 0:4 net:[4026532290] /run/netns/a rw shared:1 - nsfs nsfs rw";
        assert_eq!(nsfs_mount_inode(line), Some(4_026_532_290));
        let other = "30 29 0:26 / /sys/fs/bpf rw shared:2 - bpf bpf rw";
        assert_eq!(nsfs_mount_inode(other), None);
    }

    #[test]
    fn this_processs_namespace_is_live() {
        let me = Netns::current().unwrap();
        assert!(live_namespaces().contains(&me.inode));
    }
}
