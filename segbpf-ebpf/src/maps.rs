//! Every map of the datapath. Names are `SEG_*` (at most 15 characters) and
//! match the constants in `segbpf_common`; docs/architecture.md has the
//! catalogue with key/value layouts and sizes.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use segbpf_common::{
    CT_SEEN_BUCKETS, CT_SEEN_MAP_FLAGS, CT_TABLE_FLAGS, Config, Counter, Ct4, Ct4Set, Ct6, Ct6Set,
    CtEntry, CtRemote, DEFAULT_CT4_SETS, DEFAULT_CT6_SETS, DEFAULT_EVENT_RING_BYTES,
    DEFAULT_FRAG_ENTRIES, DEFAULT_PEER_ENTRIES, DEFAULT_PORT_ENTRIES, DEFAULT_RULE_STATS,
    DENIED_BUCKETS, DeniedBucket, DeniedRate, FragEntry, FragKey, PeerClass, PeerKeyV4, PeerKeyV6,
    PortKey, PortMiss, RateState, RuleRef, STATS_LEN, TraceResult, ct_sets_entries,
    ct_ways_entries,
};

/// IPv4 peer address (with slot and direction) -> address class.
#[map]
pub(crate) static SEG_PEER_V4: LpmTrie<PeerKeyV4, PeerClass> =
    LpmTrie::with_max_entries(DEFAULT_PEER_ENTRIES, 0);

/// IPv6 peer address (with slot and direction) -> address class.
#[map]
pub(crate) static SEG_PEER_V6: LpmTrie<PeerKeyV6, PeerClass> =
    LpmTrie::with_max_entries(DEFAULT_PEER_ENTRIES, 0);

/// (slot, class, protocol, destination-port prefix) -> allowing rule.
#[map]
pub(crate) static SEG_PORTS: LpmTrie<PortKey, RuleRef> =
    LpmTrie::with_max_entries(DEFAULT_PORT_ENTRIES, 0);

/// Per policy slot: the port fast-miss bitmap of `SEG_PORTS` (see
/// `segbpf_common::portmiss`).
#[map]
pub(crate) static SEG_PORTMISS: Array<PortMiss> = Array::with_max_entries(2, 0);

/// One configuration per policy slot: defaults, generation, limits.
#[map]
pub(crate) static SEG_CONFIG: Array<Config> = Array::with_max_entries(2, 0);

/// Index 0: the slot in force. Userspace fills the other slot, then flips
/// this one u32: a packet reads it once and sees one whole policy.
#[map]
pub(crate) static SEG_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU packet/byte counters, indexed by direction * STATS_LEN + reason code.
#[map]
pub(crate) static SEG_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * STATS_LEN, 0);

/// Per-CPU packet/byte counters of what each rule allowed, indexed by rule id.
#[map]
pub(crate) static SEG_RULE_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(DEFAULT_RULE_STATS, 0);

/// Index 0: the decision of the last packet, written only by trace/record instances.
#[map]
pub(crate) static SEG_TRACE: Array<TraceResult> = Array::with_max_entries(1, 0);

/// The IPv4 connection table's sets (`segbpf_common::cttable`: half-open
/// and assured IPv4 flows in one table of our own), shared by both
/// directions and by every attachment of the network namespace, and sized
/// from `--ct-size` (`CtLayout::sets_for`); the element after the last set
/// holds the namespace's secret. Mappable: userspace takes a set's lock as
/// the programs do.
#[map]
pub(crate) static SEG_CT4_SETS: Array<Ct4Set> =
    Array::with_max_entries(ct_sets_entries(DEFAULT_CT4_SETS), CT_TABLE_FLAGS);

/// The IPv4 connection table's entries, one per way (`set * 3 + way`).
#[map]
pub(crate) static SEG_CT4_WAYS: Array<CtEntry> =
    Array::with_max_entries(ct_ways_entries::<Ct4>(DEFAULT_CT4_SETS), CT_TABLE_FLAGS);

/// The IPv6 connection table's sets, as `SEG_CT4_SETS` (256-byte sets of
/// four ways).
#[map]
pub(crate) static SEG_CT6_SETS: Array<Ct6Set> =
    Array::with_max_entries(ct_sets_entries(DEFAULT_CT6_SETS), CT_TABLE_FLAGS);

/// The IPv6 connection table's entries, one per way (`set * 4 + way`).
#[map]
pub(crate) static SEG_CT6_WAYS: Array<CtEntry> =
    Array::with_max_entries(ct_ways_entries::<Ct6>(DEFAULT_CT6_SETS), CT_TABLE_FLAGS);

/// The last-seen tick, local-port filter and remotes' fingerprints of each
/// bucket of remote addresses (see `segbpf_common::ctseen`), shared like
/// `SEG_CT`; mappable, so userspace seeds it by atomic operations.
#[map]
pub(crate) static SEG_CT_SEEN_X: Array<CtRemote> =
    Array::with_max_entries(CT_SEEN_BUCKETS, CT_SEEN_MAP_FLAGS);

/// The last-seen tick of each bucket of flows (family, protocol, ports,
/// remote address; see `segbpf_common::ctseen`), shared like `SEG_CT`.
#[map]
pub(crate) static SEG_CT_SEEN_F: Array<u32> = Array::with_max_entries(CT_SEEN_BUCKETS, 0);

/// Per-CPU scratch space for a new connection-table entry: built here,
/// then inserted (an entry is too large for the 512-byte BPF stack next to
/// the parser's state). Not pinned: each instance has its own.
#[map]
pub(crate) static SEG_CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU: what the parser learned about the IPv6 packet being judged,
/// and about an ICMP error handed to the error programs (see
/// `main::enforce`). Not pinned: each instance has its own.
#[map]
pub(crate) static SEG_PARSED: PerCpuArray<crate::parse::Parsed> =
    PerCpuArray::with_max_entries(1, 0);

/// Datagrams whose first fragment passed on an assured flow.
#[map]
pub(crate) static SEG_FRAG: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_ENTRIES, 0);

/// Datagrams whose first fragment passed otherwise (rule, half-open flow, default).
#[map]
pub(crate) static SEG_FRAG_NEW: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(DEFAULT_FRAG_ENTRIES, 0);

/// Drop/audit events for userspace (`segbpf attach`, `segbpf monitor`).
#[map]
pub(crate) static SEG_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENT_RING_BYTES, 0);

/// Index 0: the event rate limiter's window.
#[map]
pub(crate) static SEG_RATE: Array<RateState> = Array::with_max_entries(1, 0);

/// Per-CPU: events emitted, suppressed by the rate limit, lost to a full ring.
#[map]
pub(crate) static SEG_EVSTATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Denied aggregates, first table of buckets (see `segbpf_common::denied`).
#[map]
pub(crate) static SEG_DENYB0: PerCpuArray<DeniedBucket> =
    PerCpuArray::with_max_entries(DENIED_BUCKETS, 0);

/// Denied aggregates, second table of buckets.
#[map]
pub(crate) static SEG_DENYB1: PerCpuArray<DeniedBucket> =
    PerCpuArray::with_max_entries(DENIED_BUCKETS, 0);

/// Index 0: the denied table (0 or 1) the datapath counts into; userspace
/// flips it before it empties the other one.
#[map]
pub(crate) static SEG_DENY_SEL: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU: denied packets not attributed to an aggregate (their bucket
/// was owned by another key).
#[map]
pub(crate) static SEG_DENY_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU flood state of the denied aggregates: which drops go to their
/// aggregate, and the count of those that do not (`segbpf_common::DeniedRate`).
#[map]
pub(crate) static SEG_DENY_RATE: PerCpuArray<DeniedRate> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: the IPv6 ingress program (`segbpf_xdp_ingress_v6`), filled by
/// userspace at load. The ingress program hands IPv6 packets to it.
/// Index 1: the ingress error program (`segbpf_xdp_ingress_err`), to which
/// both ingress programs hand the ICMP errors they would check against the
/// connection tables (see `verdict::hands_off_error`).
#[map]
pub(crate) static SEG_TAIL_XDP: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Index 0: the IPv6 egress program (`segbpf_tc_egress_v6`); index 1: the
/// egress error program (`segbpf_tc_egress_err`).
#[map]
pub(crate) static SEG_TAIL_TC: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Benchmark traffic generator state (see `trafficgen`): packet counter, first
/// source address, varying address bits, varying port bits. Used only by
/// `segbpf_xdp_gen`.
#[map]
pub(crate) static SEG_GEN: Array<u32> = Array::with_max_entries(4, 0);

/// Run mode (`segbpf_common::RUN_*`): live instances enforce, count and
/// track; `segbpf trace` loads a dry-run instance that shares the live maps
/// but changes nothing and records its decision in `SEG_TRACE`; tests may
/// load a record instance (live behaviour plus `SEG_TRACE`). A frozen
/// read-only global, so the verifier prunes the untaken branches from the
/// live program.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_RUN_MODE: Global<u8> = Global::new(0);

/// Link layer of the device (`segbpf_common::LINK_ETHERNET` or
/// `LINK_RAW_IP`), set at load from the device's ARPHRD type; frozen, so
/// the verifier drops the other parser entry from the program.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_LINK: Global<u8> = Global::new(0);

/// Index of the interface the instance is attached to, set at load (0 for
/// instances attached nowhere); frozen. Connection-table keys carry it,
/// since the tables are shared by every attachment of the namespace.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_IFINDEX: Global<u32> = Global::new(0);

/// 1 when the instance may skip the connection-table lookups of a packet
/// whose remote's `SEG_CT_SEEN_X` bucket is stale: set at load by userspace
/// when the array covers every entry the instance can look up (see
/// `segbpf_common::ctseen`); 0, the default, always looks up. Frozen.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_CT_SEEN: Global<u8> = Global::new(0);

/// Seed of the denied aggregates' bucket hash (`segbpf_common::bucket`),
/// random per instance, set at load; frozen.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_DENY_SEED: Global<u64> = Global::new(0);

/// Secret of the IPv4 connection table's set hash
/// (`segbpf_common::ct_candidates`): the namespace's, read from its
/// table at load (`segbpf_common::ct_secret`); frozen.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_CT4_KEY: Global<u64> = Global::new(0);

/// Mask of the IPv4 connection table's set index (sets − 1), from the
/// namespace's table at load; frozen.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_CT4_MASK: Global<u32> = Global::new(DEFAULT_CT4_SETS - 1);

/// Secret of the IPv6 connection table's set hash, as `SEGBPF_CT4_KEY`.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_CT6_KEY: Global<u64> = Global::new(0);

/// Mask of the IPv6 connection table's set index, as `SEGBPF_CT4_MASK`.
#[unsafe(no_mangle)]
pub(crate) static SEGBPF_CT6_MASK: Global<u32> = Global::new(DEFAULT_CT6_SETS - 1);
