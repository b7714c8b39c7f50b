//! Kernel memory an attachment holds, as the kernel accounts it: the
//! `memlock` of each program and map (`/proc/self/fdinfo`), found from the
//! attachment's pinned programs, its pinned maps (the tail-call tables
//! too), the programs in its pinned tail-call tables (the IPv6 programs
//! and the ICMP error programs), and the map ids the kernel lists for the
//! programs that make no tail call (the ICMP error programs; before them,
//! the IPv6 programs), so maps that are not pinned (scratch space,
//! read-only globals) count too. The connection tables are
//! shared by every attachment of the network namespace and are counted
//! apart, once.
//!
//! A program array is never opened by id, only through its pin: opening a
//! map by id gives it a user reference again, and when a program array's
//! user references fall to zero a second time before the kernel's
//! deferred clear of the first time has run, the kernel keeps one map
//! reference forever (`prog_array_map_clear` in `kernel/bpf/arraymap.c`
//! takes a reference and queues a work item that is already queued, so
//! only one of the two references is dropped). A `status` while a detach
//! or a reload retires a tail-call table could otherwise leave that table
//! in the kernel for good. The ICMP error programs make no tail call, so
//! the ids they list hold no program array; the ids the attached IPv4
//! programs and the IPv6 programs (which hand ICMP errors on) list are not
//! opened. A table of an older build (one entry) holds only an IPv6
//! program, which then made no tail call.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    maps::{MapData, MapInfo},
    programs::ProgramInfo,
};
use serde::Serialize;

use crate::attachment::pins::Attachment;

/// Kernel memory held by one attachment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Bytes held by the attachment's own programs and maps.
    pub attachment_bytes: u64,
    /// Bytes held by the namespace's connection tables, which every
    /// attachment of the namespace shares (counted once per namespace).
    pub shared_bytes: u64,
    /// Live attachments of the namespace that share them (this one included).
    pub shared_by: usize,
}

impl Memory {
    /// What the attachment holds plus its share of the namespace's tables.
    pub fn total_bytes(&self) -> u64 {
        self.attachment_bytes + self.shared_bytes
    }
}

/// The `memlock` line of an fd's fdinfo (bytes).
fn memlock(fd: BorrowedFd<'_>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn map_memlock(id: u32) -> Option<u64> {
    let fd = MapInfo::from_id(id).ok()?.fd().ok()?;
    memlock(fd.as_fd())
}

/// Map ids of the namespace's shared tables of `att`.
fn shared_ids(att: &Attachment) -> BTreeSet<u32> {
    segbpf_common::SHARED_MAPS
        .iter()
        .filter_map(|m| MapInfo::from_pin(att.map(m)).ok())
        .map(|i| i.id())
        .collect()
}

/// The kernel memory `att` holds; zero for what cannot be read (an
/// attachment that is gone).
pub fn of(att: &Attachment) -> Memory {
    let shared = shared_ids(att);
    let mut bytes = 0;
    // The attachment's own pinned maps (the tail-call tables too), through
    // their pins: never a program array by id (see the module's doc).
    let mut pinned = BTreeSet::new();
    for name in segbpf_common::OWN_MAPS
        .iter()
        .chain(segbpf_common::TAIL_MAPS.iter())
    {
        let Ok(map) = MapData::from_pin(att.map(name)) else {
            continue;
        };
        let Ok(info) = map.info() else {
            continue;
        };
        if pinned.insert(info.id()) {
            bytes += memlock(map.fd().as_fd()).unwrap_or(0);
        }
    }
    let attached = [att.prog_xdp(), att.prog_tc()]
        .into_iter()
        .filter_map(|prog| ProgramInfo::from_pin(&prog).ok());
    for info in attached {
        bytes += info.memory_locked().map_or(0, u64::from);
    }
    for info in tail_programs(att) {
        bytes += info.memory_locked().map_or(0, u64::from);
    }
    // The maps that are not pinned (scratch space, read-only globals), as
    // the programs that make no tail call list them: no id here is a
    // program array.
    let mut unpinned = BTreeSet::new();
    for info in leaf_programs(att) {
        if let Ok(Some(ids)) = info.map_ids() {
            unpinned.extend(
                ids.into_iter()
                    .filter(|id| !shared.contains(id) && !pinned.contains(id)),
            );
        }
    }
    bytes += unpinned
        .iter()
        .filter_map(|id| map_memlock(*id))
        .sum::<u64>();
    let shared_bytes = segbpf_common::SHARED_MAPS
        .iter()
        .filter_map(|m| MapData::from_pin(att.map(m)).ok())
        .filter_map(|d| memlock(d.fd().as_fd()))
        .sum();
    Memory {
        attachment_bytes: bytes,
        shared_bytes,
        shared_by: att.sharing().len(),
    }
}

/// The programs in the attachment's pinned tail-call tables (the IPv6
/// and ICMP error programs the attached ones hand packets to).
pub(crate) fn tail_programs(att: &Attachment) -> Vec<ProgramInfo> {
    programs_in_tables(att, false)
}

/// The programs in the attachment's pinned tail-call tables that make no
/// tail call themselves, so that no map id they list is a program array
/// (see the module's doc): the ICMP error programs (index 1), or in a
/// table of one entry (an older build) its IPv6 program.
pub(crate) fn leaf_programs(att: &Attachment) -> Vec<ProgramInfo> {
    programs_in_tables(att, true)
}

fn programs_in_tables(att: &Attachment, leaves_only: bool) -> Vec<ProgramInfo> {
    let mut ids = BTreeSet::new();
    for map in segbpf_common::TAIL_MAPS
        .iter()
        .filter_map(|name| MapData::from_pin(att.map(name)).ok())
    {
        let Ok(info) = map.info() else {
            continue;
        };
        let entries = info.max_entries();
        for index in 0..entries.min(segbpf_common::TAIL_INDEX_ERR + 1) {
            if leaves_only && entries > 1 && index != segbpf_common::TAIL_INDEX_ERR {
                continue;
            }
            ids.extend(prog_array_at(map.fd().as_fd(), index));
        }
    }
    if ids.is_empty() {
        return Vec::new();
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .collect()
}

/// The id of the program at `index` of a program array: the kernel
/// answers a lookup from userspace with the program's id.
fn prog_array_at(map: BorrowedFd<'_>, index: u32) -> Option<u32> {
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key = index;
    let mut id = 0u32;
    let mut attr = Lookup {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_mut(&mut id) as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the bpf_attr of BPF_MAP_LOOKUP_ELEM; the kernel
    // reads `key` and writes the 4-byte `id`, both alive for the call. The
    // map is the pinned one `map` names, never opened by id.
    let rc =
        unsafe { crate::host::bpf_sys::bpf(crate::host::bpf_sys::BPF_MAP_LOOKUP_ELEM, &mut attr) };
    rc.is_ok().then_some(id)
}

/// Bytes as people read them: `24.3 MiB`.
pub fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    #[allow(
        clippy::cast_precision_loss,
        reason = "a display figure with one decimal"
    )]
    let mib = bytes as f64 / MIB;
    format!("{mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_display() {
        let m = Memory {
            attachment_bytes: 3 * 1024 * 1024,
            shared_bytes: 1024 * 1024 / 2,
            shared_by: 2,
        };
        assert_eq!(m.total_bytes(), 3 * 1024 * 1024 + 512 * 1024);
        assert_eq!(human(m.total_bytes()), "3.5 MiB");
    }
}
