//! Kernel memory an attachment holds, as the kernel accounts it: the
//! `memlock` of each program and map (`/proc/self/fdinfo`), found from the
//! attachment's pinned programs and the map ids the kernel lists for them,
//! so maps that are not pinned (scratch space, read-only globals) count
//! too. The connection tables are shared by every attachment of the
//! network namespace and are counted apart, once.

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
    let mut own_maps = BTreeSet::new();
    let mut bytes = 0;
    for prog in [att.prog_xdp(), att.prog_tc()] {
        let Ok(info) = ProgramInfo::from_pin(&prog) else {
            continue;
        };
        bytes += info.memory_locked().map_or(0, u64::from);
        if let Ok(Some(ids)) = info.map_ids() {
            own_maps.extend(ids.into_iter().filter(|id| !shared.contains(id)));
        }
    }
    // Pinned maps no program uses (none today) still hold memory.
    for name in segbpf_common::PINNED_MAPS {
        if segbpf_common::SHARED_MAPS.contains(&name) {
            continue;
        }
        if let Ok(info) = MapInfo::from_pin(att.map(name)) {
            own_maps.insert(info.id());
        }
    }
    bytes += own_maps
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
