//! Seeding the namespace's last-seen arrays (`SEG_CT_SEEN_X` by remote and
//! `SEG_CT_SEEN_F` by flow, see `segbpf_common::ctseen`) at attach: the
//! programs of this build write an entry's two buckets whenever they make
//! or refresh it, but entries
//! already in the shared connection tables (made by an earlier attachment
//! of the interface, possibly of an older build that does not know the
//! array) were never written. Before the new programs are attached, every
//! entry's bucket gets the current tick, so the array covers every entry
//! the programs can look up and they may skip the lookups of a stale
//! bucket (`SEGBPF_CT_SEEN` = 1). Writing the current tick, not the
//! entry's, never makes a bucket older than a tick a program wrote a
//! moment before (another attachment's, racing this write). A remote's
//! bucket gets every local port's bit (`segbpf_common::CT_PORTS_ALL`)
//! and its second fingerprint slot over (`segbpf_common::CT_FP_OVER`),
//! by atomic operations on the array mapped into this process, as the
//! programs make them: nothing a program wrote is overwritten, not even
//! for an instant (a plain write of the value could show a slot half
//! written); the seeded bucket then skips only on its tick.

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use segbpf_common::{
    CT_FP_OVER, CT_PORTS_ALL, CtRemote, MAP_CT_SEEN, MAP_CT_SEEN_F, ct_seen_bucket,
    ct_seen_flow_bucket, ct_seen_tick,
};

use crate::attachment::maps::MapsError;

/// What seeding did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    /// Entries found in the connection tables (both families).
    pub entries: u64,
    /// Remote buckets written (`SEG_CT_SEEN_X`: distinct buckets of those
    /// entries' remotes).
    pub buckets: u64,
    /// Flow buckets written (`SEG_CT_SEEN_F`).
    pub flow_buckets: u64,
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// Writes the current tick into the bucket of every entry of the
/// instance's connection tables (see the module docs). The caller has not
/// attached the instance's programs yet.
pub fn seed(ebpf: &mut Ebpf) -> Result<Seeded, MapsError> {
    let mut entries = 0;
    let mut remotes = BTreeSet::new();
    let mut flows = BTreeSet::new();
    // Both families' tables: an IPv4 key's buckets are the same in either
    // form (`segbpf_common::ct_seen_bucket_v4`, `ct_seen_flow_bucket_v4`).
    for (_, table) in crate::attachment::cttables::read_all(ebpf)? {
        for (k, _) in table {
            entries += 1;
            remotes.insert(ct_seen_bucket(k.family, &k.remote));
            flows.insert(ct_seen_flow_bucket(&k));
        }
    }
    seed_remotes(ebpf, &remotes)?;
    seed_flows(ebpf, &flows)?;
    Ok(Seeded {
        entries,
        buckets: remotes.len() as u64,
        flow_buckets: flows.len() as u64,
    })
}

/// Marks each of `buckets` of the remote array seen now, with every
/// port's bit and its second fingerprint slot over, by atomic operations
/// on the array mapped into this process (`CT_SEEN_MAP_FLAGS`), as the
/// programs change it: the tick raised (never lowered), the bits and the
/// slot ORed in. Nothing a running program wrote is ever overwritten, not
/// even for an instant.
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the fingerprint pair sits at offset 8 of a 16-byte bucket at a multiple of 16 from a page-aligned mapping: an aligned u64"
)]
fn seed_remotes(ebpf: &mut Ebpf, buckets: &BTreeSet<u32>) -> Result<(), MapsError> {
    use std::{
        os::fd::{AsFd as _, AsRawFd as _},
        sync::atomic::{AtomicU32, AtomicU64, Ordering},
    };
    let Some(aya::maps::Map::Array(data)) = ebpf.map(MAP_CT_SEEN) else {
        return Err(MapsError::Missing(MAP_CT_SEEN));
    };
    let entries = data.info().map_err(err(MAP_CT_SEEN))?.max_entries();
    let len = entries as usize * size_of::<CtRemote>();
    let fd = data.fd().as_fd().as_raw_fd();
    // SAFETY: a shared read-write mapping of the whole array (`len` bytes
    // of values, which an mmapable array map lays out one after the
    // other from offset 0); the kernel checks the map's flags and size
    // and fails otherwise. Unmapped below on every path.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MapsError::Mmap {
            map: MAP_CT_SEEN,
            source: std::io::Error::last_os_error(),
        });
    }
    let over = segbpf_common::ct_u32_pair(0, CT_FP_OVER);
    for b in buckets.iter().filter(|b| **b < entries) {
        let tick = ct_seen_tick(crate::host::clock::monotonic_ns());
        // SAFETY: bucket `b` lies inside the mapping (checked above); a
        // `CtRemote` is 16 bytes at a multiple of 16 from the page-aligned
        // base, so its tick and filter are aligned u32 and its fingerprint
        // pair an aligned u64 at offset 8; the programs change them only
        // by atomic operations and plain aligned stores of the tick.
        unsafe {
            let v = base.cast::<CtRemote>().add(*b as usize);
            AtomicU32::from_ptr(&raw mut (*v).tick).fetch_max(tick, Ordering::Relaxed);
            AtomicU32::from_ptr(&raw mut (*v).ports).fetch_or(CT_PORTS_ALL, Ordering::Relaxed);
            AtomicU64::from_ptr((&raw mut (*v).fp).cast::<u64>()).fetch_or(over, Ordering::Relaxed);
        }
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    Ok(())
}

/// Writes the current tick into each of `buckets` of the flow array, the
/// clock read just before each write (see the module docs).
fn seed_flows(ebpf: &mut Ebpf, buckets: &BTreeSet<u32>) -> Result<(), MapsError> {
    let map = ebpf
        .map_mut(MAP_CT_SEEN_F)
        .ok_or(MapsError::Missing(MAP_CT_SEEN_F))?;
    let mut array: Array<&mut MapData, u32> = Array::try_from(map).map_err(err(MAP_CT_SEEN_F))?;
    for b in buckets {
        let tick = ct_seen_tick(crate::host::clock::monotonic_ns());
        array.set(*b, tick, 0).map_err(err(MAP_CT_SEEN_F))?;
    }
    Ok(())
}
