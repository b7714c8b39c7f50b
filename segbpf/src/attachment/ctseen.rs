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
//! bucket is written whole, with every local port's bit
//! (`segbpf_common::CT_PORTS_ALL`) and its second fingerprint slot over
//! (`segbpf_common::CT_FP_OVER`): userspace cannot OR a bit in
//! atomically, and a bit or fingerprint a program sets between a read and
//! a write must not be lost; the seeded bucket then skips only on its
//! tick. (The programs only ever set bits and fill or overflow slots, so
//! whatever of theirs the seed's store overwrites, every bit stays set
//! and the second slot over.)

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
    for t in crate::attachment::cttables::tables() {
        for (k, _) in crate::attachment::cttables::read(ebpf, t)? {
            entries += 1;
            remotes.insert(ct_seen_bucket(k.family, &k.remote));
            flows.insert(ct_seen_flow_bucket(&k));
        }
    }
    // The whole remote bucket, every port's bit and the second
    // fingerprint slot over: a bit or fingerprint a running program sets
    // meanwhile is set or covered either way.
    write(ebpf, MAP_CT_SEEN, &remotes, |tick| CtRemote {
        tick,
        ports: CT_PORTS_ALL,
        fp: [0, CT_FP_OVER],
    })?;
    write(ebpf, MAP_CT_SEEN_F, &flows, |tick| tick)?;
    Ok(Seeded {
        entries,
        buckets: remotes.len() as u64,
        flow_buckets: flows.len() as u64,
    })
}

/// Writes `value(tick)` into each of `buckets` of the array `name`, the
/// clock read just before each write (see the module docs).
fn write<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    buckets: &BTreeSet<u32>,
    value: impl Fn(u32) -> V,
) -> Result<(), MapsError> {
    let map = ebpf.map_mut(name).ok_or(MapsError::Missing(name))?;
    let mut array: Array<&mut MapData, V> = Array::try_from(map).map_err(err(name))?;
    for b in buckets {
        let tick = ct_seen_tick(crate::host::clock::monotonic_ns());
        array.set(*b, value(tick), 0).map_err(err(name))?;
    }
    Ok(())
}
