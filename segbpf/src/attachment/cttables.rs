//! The namespace's connection tables read and written in one key form.
//! IPv6 flows live in the kernel LRU tables `SEG_CT` / `SEG_CT_NEW` under
//! the 48-byte `CtKey`; IPv4 flows in the table of our own
//! (`segbpf_common::ct4table`, mapped by [`crate::attachment::ct4map`])
//! under the 16-byte `CtKey4`, half-open and assured alike, a way's bit
//! telling them apart. Every reader here gets `CtKey`s, an IPv4 key widened
//! (`CtKey4::widen`), and sees the IPv4 table as two tables (its assured
//! and its half-open flows), so `flows`, flow logs, the state dump,
//! `suggest`, reload's pruning and the last-seen seeding work alike on
//! both families.
//!
//! Earlier builds kept IPv4 flows in LRU tables: `SEG_CT4` / `SEG_CT4_NEW`
//! (`segbpf_common::LEGACY_SHARED_MAPS`), and before those in `SEG_CT` /
//! `SEG_CT_NEW` with the IPv6 flows. A namespace whose other attachments
//! still run such a build keeps those pins: they are read and pruned here
//! too, and an attach moves its own interface's IPv4 flows out of them
//! into the table of our own ([`adopt`]).

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData};
use segbpf_common::{
    CT_MAPS, CtEntry, CtKey, CtKey4, MAP_CT, MAP_CT_NEW, MAP_CT4, MAP_CT4_NEW, MAP_CT4_SETS,
    MAP_CT4_WAYS,
};

use crate::attachment::{batch, ct4map::Ct4Map, maps::MapsError, pins::Attachment};

/// One connection table of the namespace, as readers see it: the IPv4
/// table of our own shows as two (its assured flows, its half-open ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// Its map name (the IPv4 table's sets for both of its views).
    pub name: &'static str,
    /// The table of assured flows (else half-open).
    pub assured: bool,
    /// The IPv4 table (keys `CtKey4`) rather than an IPv6 LRU table.
    pub v4: bool,
}

/// Every connection table: IPv6 assured, IPv6 half-open, IPv4 assured,
/// IPv4 half-open.
pub fn tables() -> impl Iterator<Item = Table> {
    CT_MAPS
        .into_iter()
        .map(|(name, assured)| Table {
            name,
            assured,
            v4: false,
        })
        .chain([true, false].map(|assured| Table {
            name: MAP_CT4_SETS,
            assured,
            v4: true,
        }))
}

/// A key form of the LRU tables.
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

/// Every entry of the LRU table `map` (keys of form `K`): one batched
/// read, or entry by entry where the kernel does not do batches.
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

/// The IPv4 table of `sets` and `ways` (arrays) mapped.
fn map_arrays(sets: &MapData, ways: &MapData) -> Result<Ct4Map, MapsError> {
    let n = sets.info().map_err(err(MAP_CT4_SETS))?.max_entries();
    let m = ways.info().map_err(err(MAP_CT4_WAYS))?.max_entries();
    Ct4Map::new(sets.fd().as_fd(), n, ways.fd().as_fd(), m)
}

fn array<'a>(ebpf: &'a aya::Ebpf, name: &'static str) -> Result<&'a MapData, MapsError> {
    match ebpf.map(name) {
        Some(Map::Array(d)) => Ok(d),
        Some(_) => Err(MapsError::Layout {
            map: name,
            reason: "not an array".to_string(),
        }),
        None => Err(MapsError::Missing(name)),
    }
}

/// The IPv4 table of a loaded instance, mapped.
pub fn map_v4(ebpf: &aya::Ebpf) -> Result<Ct4Map, MapsError> {
    map_arrays(array(ebpf, MAP_CT4_SETS)?, array(ebpf, MAP_CT4_WAYS)?)
}

/// The IPv4 table pinned for `att`, mapped; None when the namespace has
/// none (its tables were made by an earlier build).
pub fn map_v4_pinned(att: &Attachment) -> Result<Option<Ct4Map>, MapsError> {
    let (sets, ways) = (att.map(MAP_CT4_SETS), att.map(MAP_CT4_WAYS));
    if !sets.exists() || !ways.exists() {
        return Ok(None);
    }
    let sets = MapData::from_pin(&sets).map_err(err(MAP_CT4_SETS))?;
    let ways = MapData::from_pin(&ways).map_err(err(MAP_CT4_WAYS))?;
    map_arrays(&sets, &ways).map(Some)
}

/// The earlier builds' LRU table of IPv4 flows of the class `assured`.
const fn legacy(assured: bool) -> &'static str {
    if assured { MAP_CT4 } else { MAP_CT4_NEW }
}

/// Every entry of the table `t` of a loaded instance, keys as `CtKey`.
pub fn read(ebpf: &aya::Ebpf, t: Table) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    if t.v4 {
        return Ok(view(&map_v4(ebpf)?.entries()?, t.assured));
    }
    let map = ebpf.map(t.name).ok_or(MapsError::Missing(t.name))?;
    read_form::<CtKey>(map, t.name)
}

/// Every entry of the table `t` pinned for `att`, keys as `CtKey`: for
/// the IPv4 views, the table of our own and an earlier build's LRU table
/// the namespace still has (module docs); a missing one is empty.
pub fn read_pinned(att: &Attachment, t: Table) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    if !t.v4 {
        let map = Map::LruHashMap(MapData::from_pin(att.map(t.name)).map_err(err(t.name))?);
        return read_form::<CtKey>(&map, t.name);
    }
    let mut out = match map_v4_pinned(att)? {
        Some(m) => view(&m.entries()?, t.assured),
        None => Vec::new(),
    };
    out.extend(read_legacy(att, t.assured)?);
    Ok(out)
}

/// A table's entries, keys as `CtKey`.
pub type Entries = Vec<(CtKey, CtEntry)>;

/// Every table of a loaded instance with its entries ([`tables`]' order),
/// the IPv4 table read once for both of its views.
pub fn read_all(ebpf: &aya::Ebpf) -> Result<Vec<(Table, Entries)>, MapsError> {
    let v4 = map_v4(ebpf)?.entries()?;
    tables()
        .map(|t| {
            if t.v4 {
                Ok((t, view(&v4, t.assured)))
            } else {
                read(ebpf, t).map(|e| (t, e))
            }
        })
        .collect()
}

/// Every table pinned for `att` with its entries ([`tables`]' order; as
/// [`read_pinned`]), the IPv4 table read once for both of its views: a
/// flow that changes class meanwhile is seen in one of them, not in none.
pub fn read_all_pinned(att: &Attachment) -> Result<Vec<(Table, Entries)>, MapsError> {
    let v4 = match map_v4_pinned(att)? {
        Some(m) => m.entries()?,
        None => Vec::new(),
    };
    tables()
        .map(|t| {
            if !t.v4 {
                return read_pinned(att, t).map(|e| (t, e));
            }
            let mut out = view(&v4, t.assured);
            out.extend(read_legacy(att, t.assured)?);
            Ok((t, out))
        })
        .collect()
}

/// The flows of one class of the IPv4 table's entries.
fn view(entries: &[(CtKey4, CtEntry, bool)], assured: bool) -> Vec<(CtKey, CtEntry)> {
    entries
        .iter()
        .filter(|(_, _, a)| *a == assured)
        .map(|(k, e, _)| (k.widen(), *e))
        .collect()
}

/// An earlier build's LRU table of IPv4 flows of the class `assured`
/// pinned for `att`, if the namespace still has it.
fn read_legacy(att: &Attachment, assured: bool) -> Result<Vec<(CtKey, CtEntry)>, MapsError> {
    let old = legacy(assured);
    let path = att.map(old);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = Map::LruHashMap(MapData::from_pin(&path).map_err(err(old))?);
    read_form::<CtKey4>(&map, old)
}

/// Removes `keys` from the table `t` pinned for `att` (for the IPv4
/// views, from the table of our own and from an earlier build's LRU
/// table); a key that is gone already (expired, moved, evicted) or that
/// the table cannot hold is skipped. Returns how many were removed.
pub fn remove_pinned(att: &Attachment, t: Table, keys: &[CtKey]) -> Result<usize, MapsError> {
    let mut removed = 0;
    if !t.v4 {
        let data = MapData::from_pin(att.map(t.name)).map_err(err(t.name))?;
        let mut ct: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(err(t.name))?;
        for k in keys {
            removed += usize::from(ct.remove(k).is_ok());
        }
        return Ok(removed);
    }
    let narrow: Vec<CtKey4> = keys.iter().filter_map(CtKey::narrow).collect();
    if let Some(m) = map_v4_pinned(att)? {
        for k in &narrow {
            removed += usize::from(m.remove(k)?);
        }
    }
    let old = legacy(t.assured);
    let path = att.map(old);
    if path.exists() {
        let data = MapData::from_pin(&path).map_err(err(old))?;
        let mut ct: HashMap<MapData, CtKey4, CtEntry> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(err(old))?;
        for k in &narrow {
            removed += usize::from(ct.remove(k).is_ok());
        }
    }
    Ok(removed)
}

/// Writes `entry` for `key` into the table of a loaded instance that
/// holds its family, assured or half-open (tests). An IPv4 key whose two
/// candidate sets are full evicts a half-open flow, as a program's insert
/// would, and is refused (`MapsError::Full`) when they hold only live
/// assured flows.
pub fn insert(
    ebpf: &mut aya::Ebpf,
    key: &CtKey,
    entry: &CtEntry,
    assured: bool,
) -> Result<(), MapsError> {
    if let Some(k) = key.narrow() {
        if !map_v4(ebpf)?.insert(&k, entry, assured, 0)? {
            return Err(MapsError::Full(MAP_CT4_SETS));
        }
        return Ok(());
    }
    let name = if assured { MAP_CT } else { MAP_CT_NEW };
    let map = ebpf.map_mut(name).ok_or(MapsError::Missing(name))?;
    let mut table: HashMap<&mut MapData, CtKey, CtEntry> =
        HashMap::try_from(map).map_err(err(name))?;
    table.insert(key, entry, 0).map_err(err(name))
}

/// Moves the IPv4 flows of the interface `ifindex` that earlier builds
/// left in LRU tables into the IPv4 table of a loaded instance (assured
/// stays assured, half-open half-open), so they go on passing once its
/// programs are attached in place of that build's (a namespace whose
/// other attachments kept the tables): from the instance's `SEG_CT` /
/// `SEG_CT_NEW` (the builds before any IPv4 table), and from the
/// namespace's `SEG_CT4` / `SEG_CT4_NEW` pins of `att` (the builds before
/// the table of our own). A flow the IPv4 table holds already is kept.
/// Moved, not copied: an old copy left behind could bring back, at a
/// later attach, a flow a reload has pruned from the IPv4 table since.
/// Only this interface's programs make its entries, and the caller has
/// not attached them yet. Returns how many entries were moved.
pub fn adopt(
    ebpf: &mut aya::Ebpf,
    ifindex: u32,
    att: Option<&Attachment>,
) -> Result<u64, MapsError> {
    let mut moved = 0;
    let mine = |k: &CtKey| k.ifindex == ifindex;
    for assured in [true, false] {
        let from = if assured { MAP_CT } else { MAP_CT_NEW };
        let old: Vec<(CtKey, CtEntry)> = read(
            ebpf,
            Table {
                name: from,
                assured,
                v4: false,
            },
        )?
        .into_iter()
        .filter(|(k, _)| mine(k) && k.narrow().is_some())
        .collect();
        if !old.is_empty() {
            moved += move_into(ebpf, &old, assured)?;
            let map = ebpf.map_mut(from).ok_or(MapsError::Missing(from))?;
            let mut table: HashMap<&mut MapData, CtKey, CtEntry> =
                HashMap::try_from(map).map_err(err(from))?;
            for (k, _) in &old {
                let _ = table.remove(k); // may have been evicted meanwhile
            }
        }
        let Some(att) = att else { continue };
        let name = legacy(assured);
        let path = att.map(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(err(name))?;
        let map = Map::LruHashMap(data);
        let old: Vec<(CtKey, CtEntry)> = read_form::<CtKey4>(&map, name)?
            .into_iter()
            .filter(|(k, _)| mine(k))
            .collect();
        if old.is_empty() {
            continue;
        }
        moved += move_into(ebpf, &old, assured)?;
        let mut table: HashMap<MapData, CtKey4, CtEntry> =
            HashMap::try_from(map).map_err(err(name))?;
        for k in old.iter().filter_map(|(k, _)| k.narrow()) {
            let _ = table.remove(&k);
        }
    }
    Ok(moved)
}

/// Writes `flows` into the IPv4 table of `ebpf` where it has no entry for
/// them yet; returns how many were written.
fn move_into(
    ebpf: &aya::Ebpf,
    flows: &[(CtKey, CtEntry)],
    assured: bool,
) -> Result<u64, MapsError> {
    let m = map_v4(ebpf)?;
    let mut n = 0;
    for (k, e) in flows {
        if let Some(k4) = k.narrow()
            && !m.contains(&k4)
        {
            if m.insert(&k4, e, assured, 0)? {
                n += 1;
            } else {
                tracing::warn!(
                    "an older table's IPv4 flow was not moved: its two candidate sets hold only live assured flows"
                );
            }
        }
    }
    Ok(n)
}

/// Entries of connection tables: live flows per table, and expired ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Live entries in the assured tables (both families).
    pub assured: u64,
    /// Live entries in the half-open tables (both families).
    pub half_open: u64,
    /// Entries of either table that are no longer flows
    /// ([`segbpf_common::ct_entry_live`] is false): they stay in their
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
    for (t, entries) in read_all_pinned(att)? {
        for (k, e) in entries {
            let live = segbpf_common::ct_entry_live(&cfg, k.proto, &e, now);
            all.add(t.assured, live);
            if k.ifindex == ifindex {
                mine.add(t.assured, live);
            }
        }
    }
    Ok([mine, all])
}
