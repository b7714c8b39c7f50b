//! The maps of the services programs (`cgroup.rs`). Names match the
//! `MAP_SVC_*` constants in `segbpf_common::services`. Sized small here:
//! interface attachments load the same object and never use them; the
//! services attachment sizes them at load.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use segbpf_common::{
    Counter, PeerKeyV4, PeerKeyV6, PortKey, SVC_CFG_ENTRIES, SVC_EVENT_RING_BYTES, SvcCgroup,
    SvcClass, SvcConfig, SvcDry, SvcFlow, SvcFlowKey, SvcPeerKey, SvcRule, SvcTrace,
};

/// cgroup id -> what the cgroup is (service, none, guard) in each slot.
#[map]
pub(crate) static SEG_SVC_CG: HashMap<u64, SvcCgroup> = HashMap::with_max_entries(1, 0);

/// Per (slot, service) configuration; id 0 of a slot: its globals.
#[map]
pub(crate) static SEG_SVC_CFG: Array<SvcConfig> = Array::with_max_entries(SVC_CFG_ENTRIES, 0);

/// Index 0: the services' slot in force.
#[map]
pub(crate) static SEG_SVC_ACT: Array<u32> = Array::with_max_entries(1, 0);

/// (slot byte, direction, IPv4 peer) -> class.
#[map]
pub(crate) static SEG_SVC_V4: LpmTrie<PeerKeyV4, SvcClass> = LpmTrie::with_max_entries(1, 0);

/// (slot byte, direction, IPv6 peer) -> class.
#[map]
pub(crate) static SEG_SVC_V6: LpmTrie<PeerKeyV6, SvcClass> = LpmTrie::with_max_entries(1, 0);

/// (slot byte, class, protocol, port prefix) -> rule.
#[map]
pub(crate) static SEG_SVC_PORTS: LpmTrie<PortKey, SvcRule> = LpmTrie::with_max_entries(1, 0);

/// (slot byte, direction, peer service) -> class of the rules naming it.
#[map]
pub(crate) static SEG_SVC_PEER: HashMap<SvcPeerKey, SvcClass> = HashMap::with_max_entries(1, 0);

/// Socket-side views of allowed flows.
#[map]
pub(crate) static SEG_SVC_CT: LruHashMap<SvcFlowKey, SvcFlow> = LruHashMap::with_max_entries(1, 0);

/// Per-CPU counters, index slot byte * 4 + dir * 2 + passed.
#[map]
pub(crate) static SEG_SVC_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(SVC_CFG_ENTRIES * 4, 0);

/// Dropped (or audited) packets of services, for the foreground attach.
#[map]
pub(crate) static SEG_SVC_EVENTS: RingBuf = RingBuf::with_byte_size(SVC_EVENT_RING_BYTES, 0);

/// Per CPU: the event rate limiter's window start (ns) and its count.
#[map]
pub(crate) static SEG_SVC_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Dry-run programs only: whom they judge as (filled by `segbpf trace
/// --services` in its own instance; never pinned).
#[map]
pub(crate) static SEG_SVC_DRY: Array<SvcDry> = Array::with_max_entries(1, 0);

/// Dry-run programs only: their decision.
#[map]
pub(crate) static SEG_SVC_TRC: Array<SvcTrace> = Array::with_max_entries(1, 0);
