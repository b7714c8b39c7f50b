//! The namespace's connection tables read and written in one key form.
//! Each family's flows live in its table of our own
//! (`segbpf_common::cttable`, mapped by [`crate::attachment::ctmap`]):
//! IPv4 under the 16-byte `CtKey4`, IPv6 under the 48-byte `CtKey`,
//! half-open and assured alike, a way's bit telling them apart. Every
//! reader here gets `CtKey`s, an IPv4 key widened (`CtKey4::widen`), and
//! sees each table as two (its assured and its half-open flows), so
//! `flows`, flow logs, the state dump, `suggest`, reload's pruning and the
//! last-seen seeding work alike on both families.
//!
//! Earlier builds kept flows in kernel LRU tables: IPv6 (and, before the
//! IPv4 tables, IPv4) flows in `SEG_CT` / `SEG_CT_NEW` under `CtKey`, IPv4
//! flows in `SEG_CT4` / `SEG_CT4_NEW` under `CtKey4`
//! (`segbpf_common::LEGACY_SHARED_MAPS`). A namespace whose other
//! attachments still run such a build keeps those pins: they are read and
//! pruned here too, and an attach moves its own interface's flows out of
//! them into the tables of our own ([`adopt`]).

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData};
use segbpf_common::{
    Ct4, Ct6, CtEntry, CtKey, CtKey4, CtLayout, MAP_CT, MAP_CT_NEW, MAP_CT4, MAP_CT4_NEW,
};

use crate::attachment::{
    batch,
    ctmap::{Ct4Map, Ct6Map, CtMap},
    maps::MapsError,
    pins::Attachment,
};

/// One connection table of the namespace, as readers see it: each
/// family's table of our own shows as two (its assured flows, its
/// half-open ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// Its map name (the table's sets for both of its views).
    pub name: &'static str,
    /// The assured flows (else half-open).
    pub assured: bool,
    /// The IPv4 table (keys `CtKey4`) rather than the IPv6 one.
    pub v4: bool,
}

/// Every connection table view: IPv6 assured, IPv6 half-open, IPv4
/// assured, IPv4 half-open.
pub fn tables() -> impl Iterator<Item = Table> {
    [false, true].into_iter().flat_map(|v4| {
        [true, false].map(move |assured| Table {
            name: if v4 { Ct4::SETS_MAP } else { Ct6::SETS_MAP },
            assured,
            v4,
        })
    })
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

/// The table of `L` whose arrays are `sets` and `ways`, mapped.
fn map_arrays<L: CtLayout>(sets: &MapData, ways: &MapData) -> Result<CtMap<L>, MapsError> {
    let n = sets.info().map_err(err(L::SETS_MAP))?.max_entries();
    let m = ways.info().map_err(err(L::WAYS_MAP))?.max_entries();
    CtMap::new(sets.fd().as_fd(), n, ways.fd().as_fd(), m)
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

/// The table of `L` of a loaded instance, mapped.
pub fn map_table<L: CtLayout>(ebpf: &aya::Ebpf) -> Result<CtMap<L>, MapsError> {
    map_arrays::<L>(array(ebpf, L::SETS_MAP)?, array(ebpf, L::WAYS_MAP)?)
}

/// The IPv4 table of a loaded instance, mapped.
pub fn map_v4(ebpf: &aya::Ebpf) -> Result<Ct4Map, MapsError> {
    map_table::<Ct4>(ebpf)
}

/// The IPv6 table of a loaded instance, mapped.
pub fn map_v6(ebpf: &aya::Ebpf) -> Result<Ct6Map, MapsError> {
    map_table::<Ct6>(ebpf)
}

/// The table of `L` pinned for `att`, mapped; None when the namespace has
/// none (its tables were made by an earlier build).
pub fn map_pinned<L: CtLayout>(att: &Attachment) -> Result<Option<CtMap<L>>, MapsError> {
    let (sets, ways) = (att.map(L::SETS_MAP), att.map(L::WAYS_MAP));
    if !sets.exists() || !ways.exists() {
        return Ok(None);
    }
    let sets = MapData::from_pin(&sets).map_err(err(L::SETS_MAP))?;
    let ways = MapData::from_pin(&ways).map_err(err(L::WAYS_MAP))?;
    map_arrays::<L>(&sets, &ways).map(Some)
}

/// The element after the last set of `L`'s table pinned for `att`, read
/// by one lookup (the table is not mapped): the number of sets and the
/// element's first two words (the namespace's secret, and the
/// `--ct-size` the table was made for, or 0 for a table of a build that
/// did not record it); None when the namespace has no such table.
pub fn pinned_extra<L: CtLayout>(att: &Attachment) -> Result<Option<(u32, [u64; 2])>, MapsError>
where
    L::Set: aya::Pod,
{
    let path = att.map(L::SETS_MAP);
    if !path.exists() {
        return Ok(None);
    }
    let (sets, array) = sets_array::<L>(MapData::from_pin(&path).map_err(err(L::SETS_MAP))?)?;
    let extra = array.get(&sets, 0).map_err(err(L::SETS_MAP))?;
    let w = extra.as_ref();
    Ok(Some((sets, [w[0], w[1]])))
}

/// Writes the element after the last set of `L`'s table of a loaded
/// instance: the namespace's `secret` and the `--ct-size` `ct` the table
/// was made for (before any program of the instance runs).
pub fn write_extra<L: CtLayout>(ebpf: &aya::Ebpf, secret: u64, ct: u32) -> Result<(), MapsError>
where
    L::Set: aya::Pod,
{
    // The map as the kernel has it (a table joined from its pin may
    // differ in size from the object's definition, which aya's bounds
    // check would use).
    let fd = array(ebpf, L::SETS_MAP)?
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| MapsError::Map {
            map: L::SETS_MAP,
            source: aya::sys::SyscallError {
                call: "dup",
                io_error,
            }
            .into(),
        })?;
    let (sets, mut array) = sets_array::<L>(MapData::from_fd(fd).map_err(err(L::SETS_MAP))?)?;
    let mut extra: L::Set = bytemuck::Zeroable::zeroed();
    extra.as_mut()[0] = secret;
    extra.as_mut()[1] = u64::from(ct);
    array.set(sets, extra, 0).map_err(err(L::SETS_MAP))
}

/// `L`'s sets array as the kernel sized it (`data`): the index of the
/// element after its last set (the number of sets), and the array.
fn sets_array<L: CtLayout>(
    data: MapData,
) -> Result<(u32, aya::maps::Array<MapData, L::Set>), MapsError>
where
    L::Set: aya::Pod,
{
    let sets = data
        .info()
        .map_err(err(L::SETS_MAP))?
        .max_entries()
        .saturating_sub(1);
    let array = aya::maps::Array::try_from(Map::Array(data)).map_err(err(L::SETS_MAP))?;
    Ok((sets, array))
}

/// The earlier builds' LRU tables that may hold flows of the view `t`:
/// (name, whether its keys are `CtKey4`).
fn legacy(t: Table) -> Vec<(&'static str, bool)> {
    let wide = if t.assured { MAP_CT } else { MAP_CT_NEW };
    if t.v4 {
        vec![
            (if t.assured { MAP_CT4 } else { MAP_CT4_NEW }, true),
            (wide, false),
        ]
    } else {
        vec![(wide, false)]
    }
}

/// A table's entries, keys as `CtKey`.
pub type Entries = Vec<(CtKey, CtEntry)>;

/// Every flow of both tables: key (widened), entry, assured.
type Flows = Vec<(CtKey, CtEntry, bool)>;

fn widen4(entries: Vec<(CtKey4, CtEntry, bool)>) -> Flows {
    entries
        .into_iter()
        .map(|(k, e, a)| (k.widen(), e, a))
        .collect()
}

/// The flows of the view `t` among `flows` (both tables' flows).
fn view(flows: &Flows, t: Table) -> Entries {
    flows
        .iter()
        .filter(|(k, _, a)| *a == t.assured && (k.family == 4) == t.v4)
        .map(|(k, e, _)| (*k, *e))
        .collect()
}

/// Every flow of a loaded instance's two tables.
fn flows(ebpf: &aya::Ebpf) -> Result<Flows, MapsError> {
    let mut out = widen4(map_v4(ebpf)?.entries()?);
    out.extend(map_v6(ebpf)?.entries()?);
    Ok(out)
}

/// Every flow of the two tables pinned for `att`, and of the earlier
/// builds' LRU tables the namespace still has.
fn flows_pinned(att: &Attachment) -> Result<Flows, MapsError> {
    let mut out = match map_pinned::<Ct4>(att)? {
        Some(m) => widen4(m.entries()?),
        None => Vec::new(),
    };
    if let Some(m) = map_pinned::<Ct6>(att)? {
        out.extend(m.entries()?);
    }
    for (name, assured) in [
        (MAP_CT4, true),
        (MAP_CT4_NEW, false),
        (MAP_CT, true),
        (MAP_CT_NEW, false),
    ] {
        let path = att.map(name);
        if !path.exists() {
            continue;
        }
        let map = Map::LruHashMap(MapData::from_pin(&path).map_err(err(name))?);
        let old = if name == MAP_CT4 || name == MAP_CT4_NEW {
            read_form::<CtKey4>(&map, name)?
        } else {
            read_form::<CtKey>(&map, name)?
        };
        out.extend(old.into_iter().map(|(k, e)| (k, e, assured)));
    }
    Ok(out)
}

/// Every entry of the view `t` of a loaded instance, keys as `CtKey`.
pub fn read(ebpf: &aya::Ebpf, t: Table) -> Result<Entries, MapsError> {
    let flows = if t.v4 {
        widen4(map_v4(ebpf)?.entries()?)
    } else {
        map_v6(ebpf)?.entries()?
    };
    Ok(view(&flows, t))
}

/// Every view of a loaded instance with its entries ([`tables`]' order),
/// each table read once for both of its views.
pub fn read_all(ebpf: &aya::Ebpf) -> Result<Vec<(Table, Entries)>, MapsError> {
    let flows = flows(ebpf)?;
    Ok(tables().map(|t| (t, view(&flows, t))).collect())
}

/// Every view pinned for `att` with its entries ([`tables`]' order): the
/// tables of our own and the earlier builds' LRU tables the namespace
/// still has (module docs), each read once: a flow that changes class
/// meanwhile is seen in one view, not in none.
pub fn read_all_pinned(att: &Attachment) -> Result<Vec<(Table, Entries)>, MapsError> {
    let flows = flows_pinned(att)?;
    Ok(tables().map(|t| (t, view(&flows, t))).collect())
}

/// Removes `keys` from the view `t` pinned for `att` (from the family's
/// table of our own and from the earlier builds' LRU tables); a key that
/// is gone already (expired, moved, evicted) or that the table cannot hold
/// is skipped. Returns how many were removed.
pub fn remove_pinned(att: &Attachment, t: Table, keys: &[CtKey]) -> Result<usize, MapsError> {
    let mut removed = 0;
    if t.v4 {
        let narrow: Vec<CtKey4> = keys.iter().filter_map(CtKey::narrow).collect();
        if let Some(m) = map_pinned::<Ct4>(att)? {
            for k in &narrow {
                removed += usize::from(m.remove(k)?);
            }
        }
    } else if let Some(m) = map_pinned::<Ct6>(att)? {
        for k in keys.iter().filter(|k| k.family == 6) {
            removed += usize::from(m.remove(k)?);
        }
    }
    for (name, narrow) in legacy(t) {
        let path = att.map(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(err(name))?;
        if narrow {
            let mut ct: HashMap<MapData, CtKey4, CtEntry> =
                HashMap::try_from(Map::LruHashMap(data)).map_err(err(name))?;
            for k in keys.iter().filter_map(CtKey::narrow) {
                removed += usize::from(ct.remove(&k).is_ok());
            }
        } else {
            let mut ct: HashMap<MapData, CtKey, CtEntry> =
                HashMap::try_from(Map::LruHashMap(data)).map_err(err(name))?;
            for k in keys {
                removed += usize::from(ct.remove(k).is_ok());
            }
        }
    }
    Ok(removed)
}

/// Writes `entry` for `key` into the table of a loaded instance that
/// holds its family, assured or half-open (tests). A key whose two
/// candidate sets are full evicts a half-open flow, as a program's insert
/// would, and is refused (`MapsError::Full`) when they hold only live
/// assured flows.
pub fn insert(
    ebpf: &mut aya::Ebpf,
    key: &CtKey,
    entry: &CtEntry,
    assured: bool,
) -> Result<(), MapsError> {
    let written = match key.narrow() {
        Some(k) => map_v4(ebpf)?.insert(&k, entry, assured, 0)?,
        None if key.family == 6 => map_v6(ebpf)?.insert(key, entry, assured, 0)?,
        None => {
            return Err(MapsError::Layout {
                map: Ct4::SETS_MAP,
                reason: format!("no table holds a key of family {}", key.family),
            });
        }
    };
    if written {
        Ok(())
    } else {
        Err(MapsError::Full(if key.family == 4 {
            Ct4::SETS_MAP
        } else {
            Ct6::SETS_MAP
        }))
    }
}

/// Moves the flows of the interface `ifindex` that earlier builds left in
/// the LRU tables pinned for `att` (`SEG_CT` / `SEG_CT_NEW`, `SEG_CT4` /
/// `SEG_CT4_NEW`) into the tables of our own of a loaded instance (assured
/// stays assured, half-open half-open), so they go on passing once its
/// programs are attached in place of that build's (a namespace whose
/// other attachments kept the tables). A flow the table holds already is
/// kept. Moved, not copied: an old copy left behind could bring back, at
/// a later attach, a flow a reload has pruned from the table since. Only
/// this interface's programs make its entries, and the caller has not
/// attached them yet. Returns how many entries were moved.
pub fn adopt(ebpf: &mut aya::Ebpf, ifindex: u32, att: &Attachment) -> Result<u64, MapsError> {
    // Every older table's entries of this interface, then one entry per
    // key: an older build could hold a key twice (a dead assured copy and
    // the live half-open flow of a new connection on its tuple); the one
    // seen last is the flow.
    let mut found: Vec<(&'static str, bool, Entries)> = Vec::new();
    for (name, narrow, assured) in [
        (MAP_CT, false, true),
        (MAP_CT_NEW, false, false),
        (MAP_CT4, true, true),
        (MAP_CT4_NEW, true, false),
    ] {
        let path = att.map(name);
        if !path.exists() {
            continue;
        }
        let map = Map::LruHashMap(MapData::from_pin(&path).map_err(err(name))?);
        let old: Entries = if narrow {
            read_form::<CtKey4>(&map, name)?
        } else {
            read_form::<CtKey>(&map, name)?
        };
        let old: Entries = old
            .into_iter()
            .filter(|(k, _)| k.ifindex == ifindex)
            .collect();
        if !old.is_empty() {
            found.push((name, assured, old));
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let mut latest: std::collections::HashMap<CtKey, (CtEntry, bool)> =
        std::collections::HashMap::new();
    for (_, assured, old) in &found {
        for (k, e) in old {
            let newer = latest
                .get(k)
                .is_none_or(|(seen, _)| e.last_seen_ns > seen.last_seen_ns);
            if newer {
                latest.insert(*k, (*e, *assured));
            }
        }
    }
    let moved = move_into(ebpf, &latest)?;
    for (name, _, old) in &found {
        let data = MapData::from_pin(att.map(name)).map_err(err(name))?;
        if *name == MAP_CT4 || *name == MAP_CT4_NEW {
            let mut table: HashMap<MapData, CtKey4, CtEntry> =
                HashMap::try_from(Map::LruHashMap(data)).map_err(err(name))?;
            for k in old.iter().filter_map(|(k, _)| k.narrow()) {
                let _ = table.remove(&k); // may have been evicted meanwhile
            }
        } else {
            let mut table: HashMap<MapData, CtKey, CtEntry> =
                HashMap::try_from(Map::LruHashMap(data)).map_err(err(name))?;
            for (k, _) in old {
                let _ = table.remove(k);
            }
        }
    }
    Ok(moved)
}

/// Writes `flows` (key: entry, assured) into the tables of `ebpf` where
/// they have no entry for them yet; returns how many were written. A flow
/// whose candidate sets hold only live assured flows is not written (a
/// warning): its replies meet the policy, as a new flow's would.
fn move_into(
    ebpf: &aya::Ebpf,
    flows: &std::collections::HashMap<CtKey, (CtEntry, bool)>,
) -> Result<u64, MapsError> {
    let (m4, m6) = (map_v4(ebpf)?, map_v6(ebpf)?);
    let mut n = 0;
    for (k, (e, assured)) in flows {
        let written = match k.narrow() {
            Some(k4) if !m4.contains(&k4) => m4.insert(&k4, e, *assured, 0)?,
            None if k.family == 6 && !m6.contains(k) => m6.insert(k, e, *assured, 0)?,
            _ => continue,
        };
        if written {
            n += 1;
        } else {
            tracing::warn!(
                "an older table's flow was not moved: its candidate sets hold only live assured flows"
            );
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
