//! Typed access to the kernel maps: writing a compiled policy, reading
//! counters and the dry-run trace record, from a loaded instance or from an
//! attachment's pins.

use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use segbpf_common::{
    Config, Counter, MAP_CONFIG, MAP_PEER_V4, MAP_PEER_V6, MAP_PORTS, MAP_RULE_STATS, MAP_STATS,
    MAP_TRACE, PeerClass, PeerKeyV4, PeerKeyV6, PortKey, RuleRef, STATS_LEN, TraceResult,
};

use crate::{compile::Compiled, pins::Attachment};

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
}

fn err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// Writes a compiled policy's tries, then its configuration (which makes
/// the policy's slot the active one), into a loaded instance.
pub fn write_policy(ebpf: &mut aya::Ebpf, c: &Compiled) -> Result<(), MapsError> {
    {
        let map = ebpf
            .map_mut(MAP_PEER_V4)
            .ok_or(MapsError::Missing(MAP_PEER_V4))?;
        let mut trie: LpmTrie<&mut MapData, PeerKeyV4, PeerClass> =
            LpmTrie::try_from(map).map_err(err(MAP_PEER_V4))?;
        for (len, k, v) in &c.peers_v4 {
            trie.insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PEER_V4))?;
        }
    }
    {
        let map = ebpf
            .map_mut(MAP_PEER_V6)
            .ok_or(MapsError::Missing(MAP_PEER_V6))?;
        let mut trie: LpmTrie<&mut MapData, PeerKeyV6, PeerClass> =
            LpmTrie::try_from(map).map_err(err(MAP_PEER_V6))?;
        for (len, k, v) in &c.peers_v6 {
            trie.insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PEER_V6))?;
        }
    }
    {
        let map = ebpf
            .map_mut(MAP_PORTS)
            .ok_or(MapsError::Missing(MAP_PORTS))?;
        let mut trie: LpmTrie<&mut MapData, PortKey, RuleRef> =
            LpmTrie::try_from(map).map_err(err(MAP_PORTS))?;
        for (len, k, v) in &c.ports {
            trie.insert(&Key::new(*len, *k), v, 0)
                .map_err(err(MAP_PORTS))?;
        }
    }
    let map = ebpf
        .map_mut(MAP_CONFIG)
        .ok_or(MapsError::Missing(MAP_CONFIG))?;
    let mut cfg: Array<&mut MapData, Config> = Array::try_from(map).map_err(err(MAP_CONFIG))?;
    cfg.set(0, c.config, 0).map_err(err(MAP_CONFIG))?;
    Ok(())
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

/// The configuration record of an attachment, from its pins.
pub fn pinned_config(att: &Attachment) -> Result<Config, MapsError> {
    let data = MapData::from_pin(att.map(MAP_CONFIG)).map_err(err(MAP_CONFIG))?;
    let map = Map::Array(data);
    let arr: Array<&MapData, Config> = Array::try_from(&map).map_err(err(MAP_CONFIG))?;
    arr.get(&0, 0).map_err(err(MAP_CONFIG))
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

/// Pins every shared map of a loaded instance into the attachment's directory.
pub fn pin_all(ebpf: &mut aya::Ebpf, att: &Attachment) -> anyhow::Result<()> {
    for name in segbpf_common::PINNED_MAPS {
        let path = att.map(name);
        ebpf.map_mut(name)
            .ok_or(MapsError::Missing(name))?
            .pin(&path)
            .map_err(|e| anyhow::anyhow!("pinning {name} at {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Entries in an attachment's connection table (live and not yet evicted;
/// expired entries count until the LRU reuses them).
pub fn pinned_ct_fill(att: &Attachment) -> Result<u64, MapsError> {
    use segbpf_common::{CtEntry, CtKey, MAP_CT};
    let data = MapData::from_pin(att.map(MAP_CT)).map_err(err(MAP_CT))?;
    let map = Map::LruHashMap(data);
    let ct: aya::maps::HashMap<&MapData, CtKey, CtEntry> =
        aya::maps::HashMap::try_from(&map).map_err(err(MAP_CT))?;
    Ok(ct.keys().filter(Result::is_ok).count() as u64)
}
