//! Typed access to the kernel maps: writing a compiled policy, reading
//! counters and the dry-run trace record, from a loaded instance or from an
//! attachment's pins.

use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use segbpf_common::{
    Config, MAP_CONFIG, MAP_PEER_V4, MAP_PEER_V6, MAP_PORTS, MAP_STATS, MAP_TRACE, PeerClass,
    PeerKeyV4, PeerKeyV6, PortKey, RuleRef, STATS_LEN, TraceResult,
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

/// Sums the per-CPU counters of a `SEG_STATS` map.
fn sum_stats(map: &Map) -> Result<Vec<u64>, MapsError> {
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(err(MAP_STATS))?;
    (0..STATS_LEN)
        .map(|i| {
            arr.get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .map_err(err(MAP_STATS))
        })
        .collect()
}

/// Counters (one per reason code) of a loaded instance.
pub fn stats(ebpf: &aya::Ebpf) -> Result<Vec<u64>, MapsError> {
    sum_stats(ebpf.map(MAP_STATS).ok_or(MapsError::Missing(MAP_STATS))?)
}

/// Counters (one per reason code) of an attachment, from its pins.
pub fn pinned_stats(att: &Attachment) -> Result<Vec<u64>, MapsError> {
    let data = MapData::from_pin(att.map(MAP_STATS)).map_err(err(MAP_STATS))?;
    sum_stats(&Map::PerCpuArray(data))
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
