//! Map and program names, and the maps' default capacities.

#[cfg(doc)]
use crate::{
    Config, Counter, CtEntry, CtKey, CtKey4, EV_EMITTED, Event, FragEntry, FragKey, PeerClass,
    RateState, RuleRef, TraceResult,
};

// ---------------------------------------------------------------------------
// Map names (at most 15 characters: the kernel's BPF_OBJ_NAME_LEN - 1).
// ---------------------------------------------------------------------------

/// LPM trie: IPv4 peer address -> [`PeerClass`].
pub const MAP_PEER_V4: &str = "SEG_PEER_V4";
/// LPM trie: IPv6 peer address -> [`PeerClass`].
pub const MAP_PEER_V6: &str = "SEG_PEER_V6";
/// LPM trie: (class, protocol, destination port prefix) -> [`RuleRef`].
pub const MAP_PORTS: &str = "SEG_PORTS";
/// Array, two entries: the [`Config`] of each policy slot.
pub const MAP_CONFIG: &str = "SEG_CONFIG";
/// Array, one u32: the policy slot in force (0 or 1). Flipping it is the
/// one atomic write that switches policies.
pub const MAP_ACTIVE: &str = "SEG_ACTIVE";
/// Per-CPU array of [`Counter`]s indexed by `direction * STATS_LEN + reason`.
pub const MAP_STATS: &str = "SEG_STATS";
/// Per-CPU array of [`Counter`]s indexed by rule id: what each rule allowed.
pub const MAP_RULE_STATS: &str = "SEG_RULE_STATS";
/// Array, one entry: [`TraceResult`] written only by trace/record instances.
pub const MAP_TRACE: &str = "SEG_TRACE";
/// Per-CPU scratch entry for building a new connection-table entry.
/// Pinned with the attachment's own maps only so that `status` counts its
/// memory: the programs that list it (the packet programs) also list the
/// tail-call tables, which `status` never opens by id.
pub const MAP_CT_SCRATCH: &str = "SEG_CT_SCRATCH";
/// Ring buffer of [`Event`]s (drops, and audit-mode would-be drops).
pub const MAP_EVENTS: &str = "SEG_EVENTS";
/// Array, one entry: [`RateState`], the kernel's event rate limiter.
pub const MAP_RATE: &str = "SEG_RATE";
/// Per-CPU array of u64: events emitted, suppressed by the rate limit,
/// lost because the ring was full ([`EV_EMITTED`], ...).
pub const MAP_EVSTATS: &str = "SEG_EVSTATS";
/// LRU hash: [`CtKey`] -> [`CtEntry`], the assured flows of the builds
/// before the IPv6 table of our own ([`crate::MAP_CT6_SETS`]; IPv6 flows,
/// and IPv4 flows before the IPv4 tables). No program of this build uses
/// it; an attach moves its interface's flows out of a namespace's pin
/// (`segbpf::attachment::cttables::adopt`).
pub const MAP_CT: &str = "SEG_CT";
/// LRU hash: [`CtKey`] -> [`CtEntry`], the half-open flows of those builds
/// (see [`MAP_CT`]).
pub const MAP_CT_NEW: &str = "SEG_CT_NEW";
/// LRU hash: [`CtKey4`] -> [`CtEntry`], the assured IPv4 flows of the
/// builds before the IPv4 table of our own ([`crate::MAP_CT4_SETS`]). No
/// program of this build uses it; an attach moves its interface's flows
/// out of a namespace's pin (`segbpf::attachment::cttables::adopt`).
pub const MAP_CT4: &str = "SEG_CT4";
/// LRU hash: [`CtKey4`] -> [`CtEntry`], the half-open IPv4 flows of those
/// builds (see [`MAP_CT4`]).
pub const MAP_CT4_NEW: &str = "SEG_CT4_NEW";
/// Shared tables of earlier builds that a namespace may still have pinned
/// (another attachment of an older build): read, emptied of the
/// interface's flows at attach, removed with the namespace's other pins.
pub const LEGACY_SHARED_MAPS: [&str; 4] = [MAP_CT, MAP_CT_NEW, MAP_CT4, MAP_CT4_NEW];
/// LRU hash: [`FragKey`] -> [`FragEntry`], datagrams whose first fragment
/// passed on an assured flow.
pub const MAP_FRAG: &str = "SEG_FRAG";
/// LRU hash: [`FragKey`] -> [`FragEntry`], datagrams whose first fragment
/// passed on anything else (a rule, a half-open flow, a default).
pub const MAP_FRAG_NEW: &str = "SEG_FRAG_NEW";

/// The maps shared by every attachment of a network namespace (the
/// connection tables and their last-seen array), pinned once per
/// namespace and reused by each attachment's programs; the tables' keys
/// carry the interface.
pub const SHARED_MAPS: [&str; 6] = [
    crate::MAP_CT4_SETS,
    crate::MAP_CT4_WAYS,
    crate::MAP_CT6_SETS,
    crate::MAP_CT6_WAYS,
    crate::MAP_CT_SEEN,
    crate::MAP_CT_SEEN_F,
];

/// The maps each attachment pins for itself (not shared; the tail-call
/// tables, [`TAIL_MAPS`], aside).
pub const OWN_MAPS: [&str; 19] = [
    MAP_PEER_V4,
    MAP_PEER_V6,
    MAP_PORTS,
    crate::MAP_PORTMISS,
    MAP_CONFIG,
    MAP_ACTIVE,
    MAP_STATS,
    MAP_RULE_STATS,
    MAP_FRAG,
    MAP_FRAG_NEW,
    MAP_EVENTS,
    MAP_RATE,
    MAP_EVSTATS,
    crate::MAP_DENIED0,
    crate::MAP_DENIED1,
    crate::MAP_DENY_SEL,
    crate::MAP_DENY_LOST,
    crate::MAP_DENY_RATE,
    MAP_CT_SCRATCH,
];

/// Every map an attachment pins or uses from its namespace: its own
/// ([`OWN_MAPS`]) and the shared ones ([`SHARED_MAPS`]); `SEG_TRACE` is
/// private to each loaded instance.
pub const PINNED_MAPS: [&str; OWN_MAPS.len() + SHARED_MAPS.len()] =
    concat_names(OWN_MAPS, SHARED_MAPS);

/// `a` then `b` (the length is checked at compile time).
const fn concat_names<const A: usize, const B: usize, const C: usize>(
    a: [&'static str; A],
    b: [&'static str; B],
) -> [&'static str; C] {
    assert!(A + B == C);
    let mut out = [""; C];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < B {
        out[A + j] = b[j];
        j += 1;
    }
    out
}

/// Name of the XDP (ingress) program in the object file.
pub const PROG_XDP_INGRESS: &str = "segbpf_xdp_ingress";
/// Name of the TC (egress) program in the object file.
pub const PROG_TC_EGRESS: &str = "segbpf_tc_egress";
/// Name of the XDP program that judges IPv6 packets: the ingress program
/// hands them to it through `SEG_TAIL_XDP` (a tail call), so each program
/// is verified without the other family's paths.
pub const PROG_XDP_INGRESS_V6: &str = "segbpf_xdp_ingress_v6";
/// Name of the TC program that judges IPv6 packets (see
/// [`PROG_XDP_INGRESS_V6`]; through `SEG_TAIL_TC`).
pub const PROG_TC_EGRESS_V6: &str = "segbpf_tc_egress_v6";
/// Name of the XDP program that judges the ICMP errors checked against the
/// connection tables (the quoted flow): both ingress programs hand them to
/// it through `SEG_TAIL_XDP`, so the verifier walks that rare path once
/// instead of on every path of the two programs.
pub const PROG_XDP_INGRESS_ERR: &str = "segbpf_xdp_ingress_err";
/// Name of the TC program for those ICMP errors (see
/// [`PROG_XDP_INGRESS_ERR`]; through `SEG_TAIL_TC`).
pub const PROG_TC_EGRESS_ERR: &str = "segbpf_tc_egress_err";
/// Index of the IPv6 program in a tail-call table.
pub const TAIL_INDEX_V6: u32 = 0;
/// Index of the ICMP error program in a tail-call table.
pub const TAIL_INDEX_ERR: u32 = 1;
/// The ingress program's tail-call table: index 0 holds
/// [`PROG_XDP_INGRESS_V6`], index 1 [`PROG_XDP_INGRESS_ERR`].
pub const MAP_TAIL_XDP: &str = "SEG_TAIL_XDP";
/// The egress program's tail-call table: index 0 holds [`PROG_TC_EGRESS_V6`],
/// index 1 [`PROG_TC_EGRESS_ERR`].
pub const MAP_TAIL_TC: &str = "SEG_TAIL_TC";
/// The tail-call tables. Each loaded instance fills its own; an
/// attachment pins them (the kernel empties a program array when its last
/// pin or descriptor goes), but a dry-run instance never shares them, so
/// it cannot put its programs behind the live ones. Not in
/// [`PINNED_MAPS`] for that reason.
pub const TAIL_MAPS: [&str; 2] = [MAP_TAIL_XDP, MAP_TAIL_TC];
/// Name of the empty XDP program (the benchmarks' floor; never attached).
pub const PROG_XDP_EMPTY: &str = "segbpf_xdp_empty";
/// Name of the benchmark traffic generator (XDP, run in live-frames mode
/// by `cargo xtask bench`; never attached).
pub const PROG_XDP_GEN: &str = "segbpf_xdp_gen";
/// Name of the traffic generator's state map (never pinned).
pub const MAP_GEN: &str = "SEG_GEN";

// ---------------------------------------------------------------------------
// Default capacities. The LPM tries are created with BPF_F_NO_PREALLOC, so a
// large max_entries costs no memory until entries are inserted.
// ---------------------------------------------------------------------------

/// Default capacity of each peer trie (both directions and both slots share it).
pub const DEFAULT_PEER_ENTRIES: u32 = 4 * 1024 * 1024;
/// Default capacity of the port trie.
pub const DEFAULT_PORT_ENTRIES: u32 = 1024 * 1024;
/// Default number of assured flows the connection tables hold
/// (`--ct-size`), with a quarter as many half-open ones
/// ([`ct_new_entries`]), shared by every attachment of a network
/// namespace. Each family's table ([`crate::cttable`]) has room for both:
/// IPv4 65,536 sets, 4 MiB of sets and 15 MiB of entries here; IPv6
/// 32,768 sets, 8 MiB of sets and 10 MiB of entries.
pub const DEFAULT_CT_ENTRIES: u32 = 65_536;
/// Default size of the event ring buffer in bytes (a power of two).
pub const DEFAULT_EVENT_RING_BYTES: u32 = 1 << 20;

/// Default capacity of each fragment table (assured and other).
pub const DEFAULT_FRAG_ENTRIES: u32 = 8_192;
/// Fewest half-open flows a connection table is sized for.
pub const MIN_CT_NEW_ENTRIES: u32 = 1024;

/// Half-open flows a connection table is sized for beside `ct` assured
/// ones (`--ct-size`): a quarter of it, at least [`MIN_CT_NEW_ENTRIES`].
pub const fn ct_new_entries(ct: u32) -> u32 {
    let q = ct / 4;
    if q < MIN_CT_NEW_ENTRIES {
        MIN_CT_NEW_ENTRIES
    } else {
        q
    }
}

/// Default number of per-rule counters (`SEG_RULE_STATS`); attach sizes the
/// map to the policy's rule count.
pub const DEFAULT_RULE_STATS: u32 = 8192;
/// Largest number of rules per direction the compiler accepts.
pub const MAX_RULES_PER_DIRECTION: usize = 16384;
