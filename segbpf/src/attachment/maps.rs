//! Typed access to the kernel maps: writing a compiled policy, reading
//! counters and the dry-run trace record, from a loaded instance or from an
//! attachment's pins.

use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use segbpf_common::{
    Config, Counter, DeniedRate, EV_EMITTED, EV_LOST, EV_SUPPRESSED, MAP_ACTIVE, MAP_CONFIG,
    MAP_DENY_LOST, MAP_DENY_RATE, MAP_EVSTATS, MAP_PEER_V4, MAP_PEER_V6, MAP_PORTMISS, MAP_PORTS,
    MAP_RULE_STATS, MAP_STATS, MAP_TRACE, PeerClass, PeerKeyV4, PeerKeyV6, PortKey, PortMiss,
    RuleRef, STATS_LEN, TraceResult,
};

use crate::{
    attachment::pins::Attachment,
    policy::{
        compile::{Compiled, LpmEntry},
        portmiss,
    },
};

/// Errors while reading or writing maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A map is missing from the object or the pin directory.
    #[error("map {0} not found")]
    Missing(&'static str),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The record of what a policy slot holds could not be written.
    #[error("recording the policy slot: {0}")]
    Snapshot(String),
    /// The policy to judge connections by could not be read.
    #[error("judging connections after the edit: {0}")]
    Judge(String),
    /// A map could not be mapped into memory.
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap {
        /// Map name.
        map: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A map's layout is not what this build makes.
    #[error("map {map}: {reason}")]
    Layout {
        /// Map name.
        map: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A flow's two candidate sets of the IPv4 connection table hold
    /// only live assured flows: it was not written (none is evicted).
    #[error("map {0}: both candidate sets of the flow hold only live assured flows")]
    Full(&'static str),
    /// A map could not be pinned.
    #[error("pinning {map} at {}: {source}", path.display())]
    Pin {
        /// Map name.
        map: &'static str,
        /// Where.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: aya::pin::PinError,
    },
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// The maps that make up one policy (both slots), opened from a loaded
/// instance or from an attachment's pins. A policy is installed by filling
/// the slot not in force (`write_slot`), then flipping `SEG_ACTIVE`
/// (`activate`): one atomic u32 write, after which every packet is judged
/// by the new slot whole. The old slot is then made its mirror
/// (`apply_delta`, see [`crate::attachment::delta`]), or emptied
/// (`clear_slot`) and written whole. Each of these writes the slot's port
/// fast-miss bitmap (`SEG_PORTMISS`) from the port entries the slot holds
/// after it (`policy::portmiss`).
pub struct PolicyMaps {
    v4: LpmTrie<MapData, PeerKeyV4, PeerClass>,
    v6: LpmTrie<MapData, PeerKeyV6, PeerClass>,
    ports: LpmTrie<MapData, PortKey, RuleRef>,
    /// `None` only for an object without the map (an older build's, in
    /// the benchmark), whose programs do not read it.
    portmiss: Option<Array<MapData, PortMiss>>,
    config: Array<MapData, Config>,
    active: Array<MapData, u32>,
    /// Kernel id of the peer trie (names these maps in a
    /// [`crate::attachment::delta::Snapshot`]).
    map_id: u32,
}

fn pinned(att: &Attachment, name: &'static str) -> Result<MapData, MapsError> {
    MapData::from_pin(att.map(name)).map_err(err(name))
}

impl PolicyMaps {
    /// Opens the policy maps of an attachment from its pins.
    pub fn from_pins(att: &Attachment) -> Result<Self, MapsError> {
        let v4 = pinned(att, MAP_PEER_V4)?;
        let map_id = v4.info().map_err(err(MAP_PEER_V4))?.id();
        Ok(PolicyMaps {
            map_id,
            v4: LpmTrie::try_from(Map::LpmTrie(v4)).map_err(err(MAP_PEER_V4))?,
            v6: LpmTrie::try_from(Map::LpmTrie(pinned(att, MAP_PEER_V6)?))
                .map_err(err(MAP_PEER_V6))?,
            ports: LpmTrie::try_from(Map::LpmTrie(pinned(att, MAP_PORTS)?))
                .map_err(err(MAP_PORTS))?,
            portmiss: match pinned(att, MAP_PORTMISS) {
                Ok(m) => Some(Array::try_from(Map::Array(m)).map_err(err(MAP_PORTMISS))?),
                // An attachment of an older build: its programs read no
                // bitmap, so there is none to keep. Only when the kernel
                // says so; otherwise the change fails and the policy in
                // force stays.
                Err(_) if programs_use(att, MAP_PORTMISS) == Some(false) => None,
                Err(e) => return Err(e),
            },
            config: Array::try_from(Map::Array(pinned(att, MAP_CONFIG)?))
                .map_err(err(MAP_CONFIG))?,
            active: Array::try_from(Map::Array(pinned(att, MAP_ACTIVE)?))
                .map_err(err(MAP_ACTIVE))?,
        })
    }

    /// The slot in force.
    pub fn active_slot(&self) -> Result<u8, MapsError> {
        Ok((self.active.get(&0, 0).map_err(err(MAP_ACTIVE))? & 1) as u8)
    }

    /// The configuration of a slot.
    pub fn config(&self, slot: u8) -> Result<Config, MapsError> {
        self.config
            .get(&u32::from(slot), 0)
            .map_err(err(MAP_CONFIG))
    }

    /// Kernel id of the peer trie.
    pub fn map_id(&self) -> u32 {
        self.map_id
    }

    /// Writes the configuration record of `slot` (never the slot in force:
    /// packets read it).
    pub fn set_config(&mut self, slot: u8, config: Config) -> Result<(), MapsError> {
        self.config
            .set(u32::from(slot), config, 0)
            .map_err(err(MAP_CONFIG))
    }

    /// Marks `slot` as being edited (its record's generation 0): until its
    /// record is written again, no swap takes it for a mirror.
    pub fn invalidate(&mut self, slot: u8) -> Result<(), MapsError> {
        let mut c = self.config(slot)?;
        c.generation = 0;
        self.set_config(slot, c)
    }

    /// Writes the port fast-miss bitmap of `slot` for the port entries
    /// `ports` (their slot byte ignored); never the slot in force.
    fn write_portmiss<V>(
        &mut self,
        slot: u8,
        ports: &[LpmEntry<PortKey, V>],
    ) -> Result<(), MapsError> {
        let Some(map) = &mut self.portmiss else {
            return Ok(());
        };
        let bits = portmiss::bitmap(ports);
        map.set(u32::from(slot), bits, 0).map_err(err(MAP_PORTMISS))
    }

    /// Applies `d` to the tries of `slot` (deletes first, so the maps never
    /// hold more than the larger of the two policies in that slot) and
    /// returns the entries written or deleted. A key to delete that is
    /// missing is an error: the slot did not hold what the delta assumed.
    /// `ports`: the port entries the slot holds once `d` is applied (the
    /// next policy's), for its fast-miss bitmap.
    pub fn apply_delta(
        &mut self,
        slot: u8,
        d: &crate::attachment::delta::Delta,
        ports: &[LpmEntry<PortKey, RuleRef>],
    ) -> Result<usize, MapsError> {
        for &(len, mut k) in &d.v4.delete {
            k.slot = slot;
            self.v4
                .remove(&Key::new(len, k))
                .map_err(err(MAP_PEER_V4))?;
        }
        for &(len, mut k) in &d.v6.delete {
            k.slot = slot;
            self.v6
                .remove(&Key::new(len, k))
                .map_err(err(MAP_PEER_V6))?;
        }
        for &(len, mut k) in &d.ports.delete {
            k.slot = slot;
            self.ports
                .remove(&Key::new(len, k))
                .map_err(err(MAP_PORTS))?;
        }
        for &(len, mut k, v) in &d.v4.put {
            k.slot = slot;
            self.v4
                .insert(&Key::new(len, k), v, 0)
                .map_err(err(MAP_PEER_V4))?;
        }
        for &(len, mut k, v) in &d.v6.put {
            k.slot = slot;
            self.v6
                .insert(&Key::new(len, k), v, 0)
                .map_err(err(MAP_PEER_V6))?;
        }
        for &(len, mut k, v) in &d.ports.put {
            k.slot = slot;
            self.ports
                .insert(&Key::new(len, k), v, 0)
                .map_err(err(MAP_PORTS))?;
        }
        self.write_portmiss(slot, ports)?;
        Ok(d.len())
    }

    /// Removes every trie entry of `slot`; returns how many.
    pub fn clear_slot(&mut self, slot: u8) -> Result<usize, MapsError> {
        let mut n = 0;
        let v4: Vec<_> = self
            .v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().slot == slot)
            .collect();
        for k in &v4 {
            self.v4.remove(k).map_err(err(MAP_PEER_V4))?;
        }
        n += v4.len();
        let v6: Vec<_> = self
            .v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().slot == slot)
            .collect();
        for k in &v6 {
            self.v6.remove(k).map_err(err(MAP_PEER_V6))?;
        }
        n += v6.len();
        let ports: Vec<_> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().slot == slot)
            .collect();
        for k in &ports {
            self.ports.remove(k).map_err(err(MAP_PORTS))?;
        }
        self.write_portmiss::<RuleRef>(slot, &[])?;
        Ok(n + ports.len())
    }

    /// Writes a compiled policy's tries and configuration into its slot
    /// (`c.config.active_slot`), which must not be the slot in force.
    pub fn write_slot(&mut self, c: &Compiled) -> Result<(), MapsError> {
        for (len, k, v) in &c.peers_v4 {
            self.v4
                .insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PEER_V4))?;
        }
        for (len, k, v) in &c.peers_v6 {
            self.v6
                .insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PEER_V6))?;
        }
        for (len, k, v) in &c.ports {
            self.ports
                .insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PORTS))?;
        }
        self.write_portmiss(c.config.active_slot, &c.ports)?;
        self.config
            .set(u32::from(c.config.active_slot), c.config, 0)
            .map_err(err(MAP_CONFIG))
    }

    /// Puts `slot` in force (the one atomic switch).
    pub fn activate(&mut self, slot: u8) -> Result<(), MapsError> {
        self.active
            .set(0, u32::from(slot), 0)
            .map_err(err(MAP_ACTIVE))
    }
}

/// Whether the attachment's programs read a map named `name`, from the
/// kernel: the map ids of its ICMP error programs (found through its
/// pinned tail-call tables; they judge with the same code as the packet
/// programs and make no tail call, so none of their maps is a program
/// array, see [`crate::attachment::memory`]; an older build's IPv6
/// programs likewise). `None` when the kernel does not say.
fn programs_use(att: &Attachment, name: &str) -> Option<bool> {
    let progs = crate::attachment::memory::leaf_programs(att);
    if progs.is_empty() {
        return None;
    }
    let mut uses = false;
    for p in progs {
        for id in p.map_ids().ok()?? {
            let info = aya::maps::MapInfo::from_id(id).ok()?;
            uses |= info.name_as_str() == Some(name);
        }
    }
    Some(uses)
}

impl PolicyMaps {
    /// Opens the policy maps of a loaded instance (duplicating their file
    /// descriptors, so the instance keeps its own).
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> Result<Self, MapsError> {
        fn dup(ebpf: &aya::Ebpf, name: &'static str) -> Result<MapData, MapsError> {
            use std::os::fd::AsFd as _;
            let map = ebpf.map(name).ok_or(MapsError::Missing(name))?;
            let fd = match map {
                Map::LpmTrie(d) | Map::Array(d) => {
                    d.fd()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| MapsError::Map {
                            map: name,
                            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                                call: "dup",
                                io_error: e,
                            }),
                        })?
                }
                _ => return Err(MapsError::Missing(name)),
            };
            MapData::from_fd(fd).map_err(err(name))
        }
        let v4 = dup(ebpf, MAP_PEER_V4)?;
        let map_id = v4.info().map_err(err(MAP_PEER_V4))?.id();
        Ok(PolicyMaps {
            map_id,
            v4: LpmTrie::try_from(Map::LpmTrie(v4)).map_err(err(MAP_PEER_V4))?,
            v6: LpmTrie::try_from(Map::LpmTrie(dup(ebpf, MAP_PEER_V6)?))
                .map_err(err(MAP_PEER_V6))?,
            ports: LpmTrie::try_from(Map::LpmTrie(dup(ebpf, MAP_PORTS)?))
                .map_err(err(MAP_PORTS))?,
            portmiss: match dup(ebpf, MAP_PORTMISS) {
                Ok(m) => Some(Array::try_from(Map::Array(m)).map_err(err(MAP_PORTMISS))?),
                Err(MapsError::Missing(_)) => None,
                Err(e) => return Err(e),
            },
            config: Array::try_from(Map::Array(dup(ebpf, MAP_CONFIG)?)).map_err(err(MAP_CONFIG))?,
            active: Array::try_from(Map::Array(dup(ebpf, MAP_ACTIVE)?)).map_err(err(MAP_ACTIVE))?,
        })
    }
}

/// Writes a compiled policy into a freshly loaded instance (its slot, then
/// puts that slot in force). Attach and in-process tests use it.
pub fn write_policy(ebpf: &mut aya::Ebpf, c: &Compiled) -> Result<(), MapsError> {
    let mut m = PolicyMaps::from_ebpf(ebpf)?;
    m.write_slot(c)?;
    m.activate(c.config.active_slot)
}

/// Sums a per-CPU array of [`Counter`]s over CPUs, entry by entry.
fn sum_counters(map: &Map, name: &'static str) -> Result<Vec<Counter>, MapsError> {
    let arr: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map).map_err(err(name))?;
    (0..arr.len())
        .map(|i| {
            arr.get(&i, 0).map_err(err(name)).map(|v| {
                v.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                })
            })
        })
        .collect()
}

/// Counters per direction and reason: `[ingress, egress]`, each indexed by
/// reason code.
pub type ReasonCounters = [Vec<Counter>; 2];

fn split_directions(all: Vec<Counter>) -> ReasonCounters {
    let n = STATS_LEN as usize;
    let ingress = all.iter().take(n).copied().collect();
    let egress = all.iter().skip(n).take(n).copied().collect();
    [ingress, egress]
}

/// Counters per direction and reason of a loaded instance.
pub fn stats(ebpf: &aya::Ebpf) -> Result<ReasonCounters, MapsError> {
    let map = ebpf.map(MAP_STATS).ok_or(MapsError::Missing(MAP_STATS))?;
    Ok(split_directions(sum_counters(map, MAP_STATS)?))
}

/// Counters per direction and reason of an attachment, from its pins.
pub fn pinned_stats(att: &Attachment) -> Result<ReasonCounters, MapsError> {
    let data = MapData::from_pin(att.map(MAP_STATS)).map_err(err(MAP_STATS))?;
    Ok(split_directions(sum_counters(
        &Map::PerCpuArray(data),
        MAP_STATS,
    )?))
}

/// Per-rule counters (indexed by rule id) of an attachment, from its pins.
pub fn pinned_rule_stats(att: &Attachment) -> Result<Vec<Counter>, MapsError> {
    let data = MapData::from_pin(att.map(MAP_RULE_STATS)).map_err(err(MAP_RULE_STATS))?;
    sum_counters(&Map::PerCpuArray(data), MAP_RULE_STATS)
}

/// Event counters of an attachment: emitted, suppressed by the rate limit,
/// lost because the ring was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventStats {
    /// Events written to the ring.
    pub emitted: u64,
    /// Events not written because of the kernel rate limit.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub lost: u64,
}

/// An attachment's event counters, from its pins.
pub fn pinned_event_stats(att: &Attachment) -> Result<EventStats, MapsError> {
    let data = MapData::from_pin(att.map(MAP_EVSTATS)).map_err(err(MAP_EVSTATS))?;
    let map = Map::PerCpuArray(data);
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(&map).map_err(err(MAP_EVSTATS))?;
    let sum = |i: u32| -> Result<u64, MapsError> {
        Ok(arr.get(&i, 0).map_err(err(MAP_EVSTATS))?.iter().sum())
    };
    Ok(EventStats {
        emitted: sum(EV_EMITTED)?,
        suppressed: sum(EV_SUPPRESSED)?,
        lost: sum(EV_LOST)?,
    })
}

/// An attachment's pinned `SEG_DENY_RATE` (the per-CPU flood sample of
/// the denied aggregates), or `None` when it has no pin (an attachment
/// made by a segbpf without the flood sample).
pub fn pinned_deny_rate(
    att: &Attachment,
) -> Result<Option<PerCpuArray<MapData, DeniedRate>>, MapsError> {
    match pinned(att, MAP_DENY_RATE) {
        Ok(m) => PerCpuArray::try_from(Map::PerCpuArray(m))
            .map(Some)
            .map_err(err(MAP_DENY_RATE)),
        Err(_) => Ok(None),
    }
}

/// Denied drops the kernel left unsampled since attach (a flood kept on a
/// sample), summed over CPUs: the one reader of `SEG_DENY_RATE` (status,
/// the metrics and the denied drain all count by it).
pub fn deny_unsampled(rate: &PerCpuArray<MapData, DeniedRate>) -> Result<u64, MapsError> {
    let v = rate.get(&0, 0).map_err(err(MAP_DENY_RATE))?;
    Ok(v.iter().map(|r| r.unsampled).sum())
}

/// Denied packets an attachment's kernel did not give to an aggregate
/// since attach (their bucket had another owner, or a flood was kept on a
/// sample), from its pins.
pub fn pinned_denied_lost(att: &Attachment) -> Result<u64, MapsError> {
    let lost: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(att, MAP_DENY_LOST)?))
            .map_err(err(MAP_DENY_LOST))?;
    let shared: u64 = lost.get(&0, 0).map_err(err(MAP_DENY_LOST))?.iter().sum();
    let unsampled = match pinned_deny_rate(att)? {
        Some(rate) => deny_unsampled(&rate)?,
        None => 0,
    };
    Ok(shared + unsampled)
}

/// The configuration in force of an attachment, from its pins.
pub fn pinned_config(att: &Attachment) -> Result<Config, MapsError> {
    let m = PolicyMaps::from_pins(att)?;
    m.config(m.active_slot()?)
}

/// Reads and clears the dry-run record of a loaded dry-run instance.
pub fn take_trace(ebpf: &mut aya::Ebpf) -> Result<TraceResult, MapsError> {
    let map = ebpf
        .map_mut(MAP_TRACE)
        .ok_or(MapsError::Missing(MAP_TRACE))?;
    let mut arr: Array<&mut MapData, TraceResult> = Array::try_from(map).map_err(err(MAP_TRACE))?;
    let t = arr.get(&0, 0).map_err(err(MAP_TRACE))?;
    arr.set(0, TraceResult::default(), 0)
        .map_err(err(MAP_TRACE))?;
    Ok(t)
}

/// Pins every map of a loaded instance that userspace shares, and its
/// tail-call tables, into the attachment's directory (the namespace's
/// shared connection tables were pinned when they were made, see
/// [`crate::attachment::loader::load_attachment`]).
pub fn pin_all(ebpf: &mut aya::Ebpf, att: &Attachment) -> Result<(), MapsError> {
    // The tail-call tables too: the kernel empties a program array when
    // the last pin or descriptor of it goes, which would leave the
    // attached programs without their IPv6 half once this process exits.
    for name in segbpf_common::OWN_MAPS
        .into_iter()
        .chain(segbpf_common::TAIL_MAPS)
    {
        let path = att.map(name);
        ebpf.map_mut(name)
            .ok_or(MapsError::Missing(name))?
            .pin(&path)
            .map_err(|e| MapsError::Pin {
                map: name,
                path: path.clone(),
                source: e,
            })?;
    }
    Ok(())
}

/// Entries in one of an attachment's LRU tables (`SEG_FRAG`,
/// `SEG_FRAG_NEW`) for which `mine` holds, expired entries included until
/// the LRU reuses them; also returns every entry (the table's fill). The
/// connection tables are counted by flow liveness instead
/// ([`crate::attachment::cttables::pinned_fill`]).
pub fn pinned_fill<K: aya::Pod, V: aya::Pod>(
    att: &Attachment,
    name: &'static str,
    mine: impl Fn(&K) -> bool,
) -> Result<(u64, u64), MapsError> {
    let data = MapData::from_pin(att.map(name)).map_err(err(name))?;
    let map = Map::LruHashMap(data);
    let table: aya::maps::HashMap<&MapData, K, V> =
        aya::maps::HashMap::try_from(&map).map_err(err(name))?;
    let (mut own, mut all) = (0, 0);
    for k in table.keys().flatten() {
        all += 1;
        own += u64::from(mine(&k));
    }
    Ok((own, all))
}

/// Entries in an attachment's fragment tables: (assured, other).
pub fn pinned_frag_fill(att: &Attachment) -> Result<(u64, u64), MapsError> {
    use segbpf_common::{FragEntry, FragKey, MAP_FRAG, MAP_FRAG_NEW};
    Ok((
        pinned_fill::<FragKey, FragEntry>(att, MAP_FRAG, |_| true)?.0,
        pinned_fill::<FragKey, FragEntry>(att, MAP_FRAG_NEW, |_| true)?.0,
    ))
}
