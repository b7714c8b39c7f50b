//! The namespace's connection tables read and written in one key form.
//! IPv6 flows live in `SEG_CT` / `SEG_CT_NEW` under the 48-byte `CtKey`,
//! IPv4 flows in `SEG_CT4` / `SEG_CT4_NEW` under the 16-byte `CtKey4`
//! (a cheaper lookup in the datapath, see docs/architecture.md). Every
//! reader here gets `CtKey`s, an IPv4 key widened (`CtKey4::widen`), so
//! `flows`, flow logs, the state dump, `suggest`, reload's pruning and
//! the last-seen seeding work alike on both families.
//!
//! A namespace whose tables were made by an older build (one pair of
//! tables for both families) has no IPv4 tables until an attachment of
//! this build makes them: a missing IPv4 table reads as empty.

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData};
use segbpf_common::{CT_MAPS, CtEntry, CtKey, CtKey4};

use crate::attachment::{batch, maps::MapsError, pins::Attachment};

/// One connection table of the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// Its map name.
    pub name: &'static str,
    /// The table of assured flows (else half-open).
    pub assured: bool,
    /// Keyed by `CtKey4` (IPv4) rather than `CtKey`.
    pub v4: bool,
}

/// Every connection table: IPv6 assured, IPv6 half-open, IPv4 assured,
/// IPv4 half-open.
pub fn tables() -> impl Iterator<Item = Table> {
    CT_MAPS
        .into_iter()
        .map(|(name, assured, v4)| Table { name, assured, v4 })
}

/// A key form of the tables.
trait Form: aya::Pod + bytemuck::Pod {
    fn widen(&self) -> CtKey;
}

impl Form for CtKey {
    fn widen(&self) -> CtKey {
        *self
    }
}

impl Form for CtKey4 {
    fn widen(&self) -> CtKey {
        CtKey4::widen(self)
    }
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// Every entry of `map` (keys of form `K`): one batched read, or entry by
/// entry where the kernel does not do batches.
fn read_form<K: Form>(map: &Map, name: &'static str) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    if let Map::LruHashMap(data) | Map::HashMap(data) = map {
        match batch::read_all::<K, CtEntry>(data.fd().as_fd(), 1, false) {
            Ok((entries, cost)) => {
                tracing::debug!(
                    "read {name}: {} entries in {} bpf calls",
                    cost.entries,
                    cost.calls
                );
                return Ok(entries
                    .into_iter()
                    .filter_map(|(k, mut v)| Some((k.widen(), v.pop()?)))
                    .collect());
            }
            Err(e) if batch::unsupported(&e) => {}
            Err(io_error) => {
                return Err(MapsError::Map {
                    map: name,
                    source: aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error,
                    }
                    .into(),
                });
            }
        }
    }
    let table: HashMap<&MapData, K, CtEntry> = HashMap::try_from(map).map_err(err(name))?;
    table
        .iter()
        .map(|r| r.map(|(k, e)| (k.widen(), e)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err(name))
}

/// Every entry of the table `t` of a loaded instance, keys as `CtKey`.
pub fn read(ebpf: &aya::Ebpf, t: Table) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    let map = ebpf.map(t.name).ok_or(MapsError::Missing(t.name))?;
    if t.v4 {
        read_form::<CtKey4>(map, t.name)
    } else {
        read_form::<CtKey>(map, t.name)
    }
}

/// Every entry of the table `t` pinned for `att`, keys as `CtKey`. A
/// missing IPv4 table (made by an older build, see the module docs) is
/// empty.
pub fn read_pinned(att: &Attachment, t: Table) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    let path = att.map(t.name);
    if t.v4 && !path.exists() {
        return Ok(Vec::new());
    }
    let map = Map::LruHashMap(MapData::from_pin(&path).map_err(err(t.name))?);
    if t.v4 {
        read_form::<CtKey4>(&map, t.name)
    } else {
        read_form::<CtKey>(&map, t.name)
    }
}

/// Removes `keys` from the table `t` pinned for `att`; a key that is gone
/// already (expired, moved, evicted) or that the table cannot hold is
/// skipped. Returns how many were removed.
pub fn remove_pinned(att: &Attachment, t: Table, keys: &[CtKey]) -> Result<usize, MapsError> {
    let data = MapData::from_pin(att.map(t.name)).map_err(err(t.name))?;
    let mut removed = 0;
    if t.v4 {
        let mut ct: HashMap<MapData, CtKey4, CtEntry> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(err(t.name))?;
        for k in keys.iter().filter_map(CtKey::narrow) {
            removed += usize::from(ct.remove(&k).is_ok());
        }
    } else {
        let mut ct: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(err(t.name))?;
        for k in keys {
            removed += usize::from(ct.remove(k).is_ok());
        }
    }
    Ok(removed)
}

/// `BPF_NOEXIST`: insert only where the key has no entry.
const BPF_NOEXIST: u64 = 1;

/// Moves the IPv4 flows of the interface `ifindex` that a build before
/// the IPv4 tables left in `SEG_CT` / `SEG_CT_NEW` into the IPv4 tables
/// of a loaded instance (assured to assured, half-open to half-open), so
/// they go on passing once its programs are attached in place of that
/// build's (a namespace whose other attachments kept the tables). An
/// entry the IPv4 table holds already is kept. Moved, not copied: an old
/// copy left behind could bring back, at a later attach, a flow a reload
/// has pruned from the IPv4 table since. Only this interface's programs
/// make its entries, and the caller has not attached them yet. Returns
/// how many entries were moved.
pub fn adopt_v4(ebpf: &mut aya::Ebpf, ifindex: u32) -> Result<u64, MapsError> {
    use segbpf_common::{MAP_CT, MAP_CT_NEW, MAP_CT4, MAP_CT4_NEW};
    let mut moved = 0;
    for (from, to) in [(MAP_CT, MAP_CT4), (MAP_CT_NEW, MAP_CT4_NEW)] {
        let t = Table {
            name: from,
            assured: from == MAP_CT,
            v4: false,
        };
        let old: Vec<(CtKey, CtKey4, CtEntry)> = read(ebpf, t)?
            .into_iter()
            .filter(|(k, _)| k.ifindex == ifindex)
            .filter_map(|(k, e)| Some((k, k.narrow()?, e)))
            .collect();
        if old.is_empty() {
            continue;
        }
        {
            let map = ebpf.map_mut(to).ok_or(MapsError::Missing(to))?;
            let mut table: HashMap<&mut MapData, CtKey4, CtEntry> =
                HashMap::try_from(map).map_err(err(to))?;
            for (_, k, e) in &old {
                moved += u64::from(table.insert(k, e, BPF_NOEXIST).is_ok());
            }
        }
        let map = ebpf.map_mut(from).ok_or(MapsError::Missing(from))?;
        let mut table: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(map).map_err(err(from))?;
        for (k, _, _) in &old {
            let _ = table.remove(k); // may have been evicted meanwhile
        }
    }
    Ok(moved)
}

/// Entries of connection tables: live flows per table, and expired ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Live entries in the assured tables (both families).
    pub assured: u64,
    /// Live entries in the half-open tables (both families).
    pub half_open: u64,
    /// Entries of either table that are no longer flows
    /// ([`segbpf_common::ct_entry_live`] is false): they stay in their LRU
    /// table until a new flow reuses the slot.
    pub expired: u64,
}

impl Fill {
    fn add(&mut self, assured: bool, live: bool) {
        match (live, assured) {
            (false, _) => self.expired += 1,
            (true, true) => self.assured += 1,
            (true, false) => self.half_open += 1,
        }
    }
}

/// The namespace's connection tables pinned for `att`, counted by the
/// datapath's rule ([`segbpf_common::ct_entry_live`] with the
/// configuration in force and the monotonic clock now): the interface
/// `ifindex`'s entries, and every interface's.
pub fn pinned_fill(att: &Attachment, ifindex: u32) -> Result<[Fill; 2], MapsError> {
    let cfg = crate::attachment::maps::pinned_config(att)?;
    let now = crate::host::clock::monotonic_ns();
    let (mut mine, mut all) = (Fill::default(), Fill::default());
    for t in tables() {
        for (k, e) in read_pinned(att, t)? {
            let live = segbpf_common::ct_entry_live(&cfg, k.proto, &e, now);
            all.add(t.assured, live);
            if k.ifindex == ifindex {
                mine.add(t.assured, live);
            }
        }
    }
    Ok([mine, all])
}
