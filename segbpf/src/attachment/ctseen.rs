//! Seeding the namespace's last-seen array (`SEG_CT_SEEN`, see
//! `segbpf_common::ctseen`) at attach: the programs of this build write a
//! remote's bucket whenever they make or refresh an entry, but entries
//! already in the shared connection tables (made by an earlier attachment
//! of the interface, possibly of an older build that does not know the
//! array) were never written. Before the new programs are attached, every
//! entry's bucket gets the current tick, so the array covers every entry
//! the programs can look up and they may skip the lookups of a stale
//! bucket (`SEGBPF_CT_SEEN` = 1). Writing the current tick, not the
//! entry's, never makes a bucket older than a tick a program wrote a
//! moment before (another attachment's, racing this write).

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use segbpf_common::{MAP_CT_SEEN, ct_seen_bucket, ct_seen_tick};

use crate::attachment::maps::MapsError;

/// What seeding did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    /// Entries found in the connection tables (both families).
    pub entries: u64,
    /// Buckets written (distinct buckets of those entries).
    pub buckets: u64,
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// Writes the current tick into the bucket of every entry of the
/// instance's connection tables (see the module docs). The caller has not
/// attached the instance's programs yet.
pub fn seed(ebpf: &mut Ebpf) -> Result<Seeded, MapsError> {
    let mut entries = 0;
    let mut buckets = BTreeSet::new();
    // Both families' tables: an IPv4 key's bucket is the same in either
    // form (`segbpf_common::ct_seen_bucket_v4`).
    for t in crate::attachment::cttables::tables() {
        for (k, _) in crate::attachment::cttables::read(ebpf, t)? {
            entries += 1;
            buckets.insert(ct_seen_bucket(k.family, &k.remote));
        }
    }
    let map = ebpf
        .map_mut(MAP_CT_SEEN)
        .ok_or(MapsError::Missing(MAP_CT_SEEN))?;
    let mut seen: Array<&mut MapData, u32> = Array::try_from(map).map_err(err(MAP_CT_SEEN))?;
    for b in &buckets {
        // The clock read just before each write (see the module docs).
        let tick = ct_seen_tick(crate::host::clock::monotonic_ns());
        seen.set(*b, tick, 0).map_err(err(MAP_CT_SEEN))?;
    }
    Ok(Seeded {
        entries,
        buckets: buckets.len() as u64,
    })
}
