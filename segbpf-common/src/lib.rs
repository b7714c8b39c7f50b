//! `#[repr(C)]` types and constants shared by the segbpf eBPF programs and
//! userspace: map keys and values, the configuration record, the list of
//! verdict reasons (one list for kernel and CLI) and map names/sizes.
//!
//! Every type is plain old data (`bytemuck::Pod`) with explicit padding and a
//! compile-time size check, so both sides agree on the byte layout. Fields in
//! network byte order carry a `_be` suffix. The `user` feature adds
//! `aya::Pod` so userspace can use the types with aya's typed maps.
#![no_std]

use bytemuck::{Pod, Zeroable};

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
/// Ring buffer of [`Event`]s (drops, and audit-mode would-be drops).
pub const MAP_EVENTS: &str = "SEG_EVENTS";
/// Array, one entry: [`RateState`], the kernel's event rate limiter.
pub const MAP_RATE: &str = "SEG_RATE";
/// Per-CPU array of u64: events emitted, suppressed by the rate limit,
/// lost because the ring was full ([`EV_EMITTED`], ...).
pub const MAP_EVSTATS: &str = "SEG_EVSTATS";
/// LRU hash: [`CtKey`] -> [`CtEntry`], the connection table of assured
/// flows (both sides spoke, and the originator spoke again after the reply).
pub const MAP_CT: &str = "SEG_CT";
/// LRU hash: [`CtKey`] -> [`CtEntry`], half-open flows (an opener seen,
/// not yet assured). A flood of openers can only evict entries here.
pub const MAP_CT_NEW: &str = "SEG_CT_NEW";
/// LRU hash: [`FragKey`] -> [`FragEntry`], datagrams whose first fragment
/// passed on an assured flow.
pub const MAP_FRAG: &str = "SEG_FRAG";
/// LRU hash: [`FragKey`] -> [`FragEntry`], datagrams whose first fragment
/// passed on anything else (a rule, a half-open flow, a default).
pub const MAP_FRAG_NEW: &str = "SEG_FRAG_NEW";

/// Every map an attachment pins (`SEG_TRACE` is private to each loaded instance).
pub const PINNED_MAPS: [&str; 14] = [
    MAP_PEER_V4,
    MAP_PEER_V6,
    MAP_PORTS,
    MAP_CONFIG,
    MAP_ACTIVE,
    MAP_STATS,
    MAP_RULE_STATS,
    MAP_CT,
    MAP_CT_NEW,
    MAP_FRAG,
    MAP_FRAG_NEW,
    MAP_EVENTS,
    MAP_RATE,
    MAP_EVSTATS,
];

/// Name of the XDP (ingress) program in the object file.
pub const PROG_XDP_INGRESS: &str = "segbpf_xdp_ingress";
/// Name of the TC (egress) program in the object file.
pub const PROG_TC_EGRESS: &str = "segbpf_tc_egress";
/// Name of the empty XDP program (the benchmarks' floor; never attached).
pub const PROG_XDP_EMPTY: &str = "segbpf_xdp_empty";
/// Name of the read-only global that selects the run mode ([`RUN_LIVE`], ...).
pub const GLOBAL_RUN_MODE: &str = "SEGBPF_RUN_MODE";
/// Name of the read-only global that gives the device's link layer
/// ([`LINK_ETHERNET`] or [`LINK_RAW_IP`]), set at load from its ARPHRD type.
pub const GLOBAL_LINK: &str = "SEGBPF_LINK";

/// Link layer: frames start with an Ethernet header (Ethernet, veth,
/// bridge, tap, vxlan, bond, loopback, ...).
pub const LINK_ETHERNET: u8 = 0;
/// Link layer: none, packets start at the IP header (tun, WireGuard, ipip,
/// gre, sit, ip6tnl, ppp, raw IP).
pub const LINK_RAW_IP: u8 = 1;

/// Run mode of a loaded instance: enforce, count, track state.
pub const RUN_LIVE: u8 = 0;
/// Run mode: judge with the shared maps but write nothing (no counters, no
/// connection or fragment state); record the decision in `SEG_TRACE`.
pub const RUN_DRY: u8 = 1;
/// Run mode: like live (state is tracked, counters move) and also record
/// each decision in `SEG_TRACE` (tests of stateful sequences).
pub const RUN_RECORD: u8 = 2;

// ---------------------------------------------------------------------------
// Default capacities. The LPM tries are created with BPF_F_NO_PREALLOC, so a
// large max_entries costs no memory until entries are inserted.
// ---------------------------------------------------------------------------

/// Default capacity of each peer trie (both directions and both slots share it).
pub const DEFAULT_PEER_ENTRIES: u32 = 4 * 1024 * 1024;
/// Default capacity of the port trie.
pub const DEFAULT_PORT_ENTRIES: u32 = 1024 * 1024;
/// Default capacity of the connection table (`--ct-size`).
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
/// Default size of the event ring buffer in bytes (a power of two).
pub const DEFAULT_EVENT_RING_BYTES: u32 = 1 << 20;
/// Index in `SEG_EVSTATS`: events written to the ring.
pub const EV_EMITTED: u32 = 0;
/// Index in `SEG_EVSTATS`: events not written because of the rate limit.
pub const EV_SUPPRESSED: u32 = 1;
/// Index in `SEG_EVSTATS`: events lost because the ring was full.
pub const EV_LOST: u32 = 2;
/// Default capacity of each fragment table (assured and other).
pub const DEFAULT_FRAG_ENTRIES: u32 = 8_192;
/// Smallest capacity of the half-open connection table.
pub const MIN_CT_NEW_ENTRIES: u32 = 1024;

/// Capacity of the half-open connection table for an assured table of
/// `ct` entries: a quarter of it, at least [`MIN_CT_NEW_ENTRIES`].
pub const fn ct_new_entries(ct: u32) -> u32 {
    let q = ct / 4;
    if q < MIN_CT_NEW_ENTRIES {
        MIN_CT_NEW_ENTRIES
    } else {
        q
    }
}
/// Counters per direction in `SEG_STATS` (one per reason code).
pub const STATS_LEN: u32 = 64;
/// Default number of per-rule counters (`SEG_RULE_STATS`); attach sizes the
/// map to the policy's rule count.
pub const DEFAULT_RULE_STATS: u32 = 8192;
/// Largest number of rules per direction the compiler accepts.
pub const MAX_RULES_PER_DIRECTION: usize = 16384;

// ---------------------------------------------------------------------------
// Directions, actions, protocols.
// ---------------------------------------------------------------------------

/// Direction byte in keys: traffic entering the host (peer = source address).
pub const DIR_INGRESS: u8 = 0;
/// Direction byte in keys: traffic leaving the host (peer = destination address).
pub const DIR_EGRESS: u8 = 1;

/// Default action: drop.
pub const ACTION_DROP: u8 = 0;
/// Default action: allow.
pub const ACTION_ALLOW: u8 = 1;

/// IP protocol numbers the datapath understands.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// A packet and byte counter (one per CPU in the per-CPU maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (length of the frame as the program saw it).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Rule id meaning "no rule" in [`TraceResult`].
pub const NO_RULE: u32 = u32::MAX;

// ---------------------------------------------------------------------------
// Verdict reasons: one shared list. Codes below `REASON_FIRST_DROP` pass.
// ---------------------------------------------------------------------------

/// Reason codes: why a packet passed or was dropped. They index `SEG_STATS`.
pub mod reason {
    /// Allowed by a policy rule.
    pub const PASS_RULE: u8 = 0;
    /// No rule matched and the direction's default is allow.
    pub const PASS_DEFAULT: u8 = 1;
    /// ARP: always allowed.
    pub const PASS_ARP: u8 = 2;
    /// IPv6 neighbour discovery / router advertisement / MLD: always allowed.
    pub const PASS_ND: u8 = 3;
    /// ICMP echo allowed by `defaults.icmp`.
    pub const PASS_ICMP: u8 = 4;
    /// Part of a tracked connection (a reply, or the originator going on).
    pub const PASS_CT: u8 = 5;
    /// ICMP error about a tracked connection (`defaults.icmp`).
    pub const PASS_RELATED: u8 = 6;
    /// Non-first fragment of a datagram whose first fragment passed.
    pub const PASS_FRAG: u8 = 7;
    /// Non-IP frame to an IEEE 802.1 link-local group address
    /// (01:80:c2:00:00:00-0f: STP, LACP, LLDP, 802.1X), `defaults.link_local`.
    pub const PASS_LINK_LOCAL: u8 = 8;

    /// First drop reason; every code from here on drops.
    pub const FIRST_DROP: u8 = 16;
    /// No rule matched and the direction's default is drop.
    pub const DROP_DEFAULT: u8 = 16;
    /// Frame shorter than an Ethernet header or a VLAN tag.
    pub const DROP_TRUNC_ETH: u8 = 17;
    /// More than two VLAN tags.
    pub const DROP_VLAN_DEPTH: u8 = 18;
    /// EtherType that is neither IPv4, IPv6 nor ARP.
    pub const DROP_ETHERTYPE: u8 = 19;
    /// IP header shorter than its minimum, or total/payload length beyond the frame.
    pub const DROP_TRUNC_IP: u8 = 20;
    /// Malformed IPv4 header: wrong version, IHL < 5, total length < IHL.
    pub const DROP_BAD_IPV4: u8 = 21;
    /// Malformed IPv6 header: wrong version.
    pub const DROP_BAD_IPV6: u8 = 22;
    /// IPv6 extension header chain truncated or longer than the parser's bound.
    pub const DROP_IPV6_EXT: u8 = 23;
    /// Non-first fragment whose first fragment was not seen or not allowed.
    pub const DROP_FRAGMENT: u8 = 24;
    /// Transport header truncated.
    pub const DROP_TRUNC_L4: u8 = 25;
    /// Malformed transport header: TCP data offset < 5, UDP length < 8.
    pub const DROP_BAD_L4: u8 = 26;
    /// Malformed ARP (truncated).
    pub const DROP_BAD_ARP: u8 = 27;
    /// Link-local control frame while `defaults.link_local = false`.
    pub const DROP_LINK_LOCAL: u8 = 28;
    /// TCP RST of a tracked flow whose sequence number is outside the
    /// window seen for its direction (a blind reset); the flow is unchanged.
    pub const DROP_INVALID_RST: u8 = 29;
    /// TCP FIN of a tracked flow outside the window seen for its direction.
    pub const DROP_INVALID_FIN: u8 = 30;

    /// Every code in use (for iteration in userspace).
    pub const ALL: [u8; 24] = [
        PASS_RULE,
        PASS_DEFAULT,
        PASS_ARP,
        PASS_ND,
        PASS_ICMP,
        PASS_CT,
        PASS_RELATED,
        PASS_FRAG,
        PASS_LINK_LOCAL,
        DROP_DEFAULT,
        DROP_TRUNC_ETH,
        DROP_VLAN_DEPTH,
        DROP_ETHERTYPE,
        DROP_TRUNC_IP,
        DROP_BAD_IPV4,
        DROP_BAD_IPV6,
        DROP_IPV6_EXT,
        DROP_FRAGMENT,
        DROP_TRUNC_L4,
        DROP_BAD_L4,
        DROP_BAD_ARP,
        DROP_LINK_LOCAL,
        DROP_INVALID_RST,
        DROP_INVALID_FIN,
    ];

    /// Whether a packet with this reason is passed.
    pub const fn passes(code: u8) -> bool {
        code < FIRST_DROP
    }

    /// Stable machine name of a reason (used in CLI and JSON output).
    pub const fn name(code: u8) -> &'static str {
        match code {
            PASS_RULE => "rule",
            PASS_DEFAULT => "default-allow",
            PASS_ARP => "arp",
            PASS_ND => "ipv6-nd",
            PASS_ICMP => "icmp-default",
            PASS_CT => "established",
            PASS_RELATED => "icmp-related",
            PASS_FRAG => "fragment-of-allowed",
            PASS_LINK_LOCAL => "link-local",
            DROP_DEFAULT => "default-drop",
            DROP_TRUNC_ETH => "truncated-ethernet",
            DROP_VLAN_DEPTH => "vlan-too-deep",
            DROP_ETHERTYPE => "unsupported-ethertype",
            DROP_TRUNC_IP => "truncated-ip",
            DROP_BAD_IPV4 => "malformed-ipv4",
            DROP_BAD_IPV6 => "malformed-ipv6",
            DROP_IPV6_EXT => "ipv6-ext-chain",
            DROP_FRAGMENT => "fragment-no-leader",
            DROP_TRUNC_L4 => "truncated-l4",
            DROP_BAD_L4 => "malformed-l4",
            DROP_BAD_ARP => "malformed-arp",
            DROP_LINK_LOCAL => "link-local-denied",
            DROP_INVALID_RST => "invalid-rst",
            DROP_INVALID_FIN => "invalid-fin",
            _ => "unknown",
        }
    }
}

// ---------------------------------------------------------------------------
// Map keys and values.
// ---------------------------------------------------------------------------

/// Data part of an IPv4 peer-trie key (the kernel's LPM key is
/// `{ prefixlen: u32, data }`). Bytes are matched in order, so `slot` and
/// `dir` are always fully covered by the prefix: prefixlen = 16 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PeerKeyV4 {
    /// Policy slot (double buffer index, see [`Config::active_slot`]).
    pub slot: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// Peer address, network order.
    pub addr_be: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PeerKeyV4>() == 6);

/// Data part of an IPv6 peer-trie key; prefixlen = 16 + CIDR length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PeerKeyV6 {
    /// Policy slot.
    pub slot: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// Peer address, network order.
    pub addr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PeerKeyV6>() == 18);

/// Bits of the peer keys before the address.
pub const PEER_KEY_HEADER_BITS: u32 = 16;

/// Value of the peer tries: the address class (the set of rules whose peer
/// list contains the address, numbered by the compiler).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PeerClass {
    /// Class id (unique across directions within one compiled policy).
    pub class_id: u32,
}
const _: () = assert!(core::mem::size_of::<PeerClass>() == 4);

/// Data part of a port-trie key: prefixlen = 8 + 32 + 8 + port prefix
/// length (0..=16). Protocols without ports use `port_be = 0` with a port
/// prefix of 0; a rule with `proto = "any"` is stored with prefixlen 40
/// (class only), so it matches every protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortKey {
    /// Policy slot.
    pub slot: u8,
    /// Class id, network order (so LPM bits follow its significance).
    pub class_be: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// Destination port, network order (0 for protocols without ports).
    pub port_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);

/// Bits of a port key up to and including the class.
pub const PORT_KEY_CLASS_BITS: u32 = 40;
/// Bits of a port key up to and including the protocol.
pub const PORT_KEY_PROTO_BITS: u32 = 48;

/// Value of the port trie: the rule that allows this (class, proto, port).
/// When several rules match, the compiler stores the lowest rule id, so
/// kernel and reference evaluator attribute a packet to the same rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RuleRef {
    /// Rule id (index into the compiled rule table).
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<RuleRef>() == 4);

/// Configuration record, one per policy slot (`SEG_CONFIG[slot]`), written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Config {
    /// Policy generation (increases with every applied policy).
    pub generation: u64,
    /// Default for ingress when no rule matches: [`ACTION_DROP`] or [`ACTION_ALLOW`].
    pub ingress_default: u8,
    /// Default for egress when no rule matches.
    pub egress_default: u8,
    /// 1 when ICMP echo, and errors about tracked flows, pass by default.
    pub icmp: u8,
    /// 1 when replies to allowed flows pass (connection tracking).
    pub established: u8,
    /// Slot of the peer/port maps in force (0 or 1).
    pub active_slot: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
    /// Drop events per second (0 = none).
    pub log_rate: u32,
    /// Connection-tracking timeouts, seconds: TCP before the reply.
    pub ct_tcp_syn_s: u32,
    /// TCP after the reply (established).
    pub ct_tcp_est_s: u32,
    /// TCP after RST or FIN from both sides.
    pub ct_tcp_close_s: u32,
    /// UDP (and other tracked protocols) before the reply.
    pub ct_udp_s: u32,
    /// UDP after the reply.
    pub ct_udp_est_s: u32,
    /// ICMP echo.
    pub ct_icmp_s: u32,
    /// Fragment table entries, seconds after the first fragment.
    pub frag_s: u32,
    /// Events allowed in one burst (the rate limiter's bucket size).
    pub log_burst: u32,
    /// 1 in audit mode: packets the policy would drop pass, each reported
    /// as an `audit` event.
    pub audit: u8,
    /// 1 when non-IP frames to the IEEE 802.1 link-local group addresses
    /// pass (`defaults.link_local`).
    pub link_local: u8,
    /// Explicit padding.
    pub _pad3: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Config>() == 56);

/// The event rate limiter's state (`SEG_RATE[0]`): fixed windows of
/// `log_burst / log_rate` seconds, each allowing `log_burst` events, so
/// over any span T at most `log_rate * T + log_burst` events are written
/// (plus, at most, one per other CPU racing at a window's last slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RateState {
    /// Start of the current window (`bpf_ktime_get_coarse_ns`).
    pub window_start_ns: u64,
    /// Events written in the current window.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);

/// Version of [`Event`]'s layout; bumped on any change.
pub const EVENT_VERSION: u8 = 1;
/// [`Event::kind`]: the packet was dropped.
pub const EVENT_DROP: u8 = 1;
/// [`Event::kind`]: audit mode, the packet would have been dropped and passed.
pub const EVENT_AUDIT: u8 = 2;

/// A drop (or audit) event in the ring buffer. Versioned: readers check
/// [`Event::version`] before reading the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Event {
    /// [`EVENT_VERSION`].
    pub version: u8,
    /// [`EVENT_DROP`] or [`EVENT_AUDIT`].
    pub kind: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// 4, 6, or 0 when the packet was not IP (or not parsed that far).
    pub family: u8,
    /// IP protocol (0 when unknown).
    pub proto: u8,
    /// Reason code (see [`reason`]).
    pub reason: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Interface index the program runs on.
    pub ifindex: u32,
    /// Frame length in bytes.
    pub len: u32,
    /// `bpf_ktime_get_coarse_ns` when the packet was judged.
    pub ts_ns: u64,
    /// Policy generation in force.
    pub generation: u64,
    /// Source port, host order (ICMP: echo id).
    pub sport: u16,
    /// Destination port, host order (ICMP: type in the low byte).
    pub dport: u16,
    /// Explicit padding.
    pub _pad2: [u8; 4],
    /// Source address (IPv4 in the first 4 bytes), network order.
    pub src: [u8; 16],
    /// Destination address, network order.
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Event>() == 72);

/// Default connection-tracking timeouts (seconds), as in [`Config`].
pub mod ct_timeout {
    /// TCP before the reply (SYN sent).
    pub const TCP_SYN: u32 = 60;
    /// TCP established.
    pub const TCP_EST: u32 = 6 * 3600;
    /// TCP after RST, or FIN from both sides.
    pub const TCP_CLOSE: u32 = 10;
    /// UDP before the reply.
    pub const UDP: u32 = 30;
    /// UDP after the reply.
    pub const UDP_EST: u32 = 120;
    /// ICMP echo.
    pub const ICMP: u32 = 30;
    /// Fragments of one datagram.
    pub const FRAG: u32 = 30;
}

/// Connection-table key, from the host's point of view: the same key for
/// both directions of a flow. ICMP echo uses the echo id as `local_port`
/// and 0 as `remote_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// Port on this host (host order).
    pub local_port: u16,
    /// Port of the peer (host order).
    pub remote_port: u16,
    /// Address on this host (IPv4 in the first 4 bytes), network order.
    pub local: [u8; 16],
    /// Address of the peer, network order.
    pub remote: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

/// Connection state: opened, no reply seen yet.
pub const CT_NEW: u8 = 1;
/// Connection state: a reply was seen.
pub const CT_ESTABLISHED: u8 = 2;
/// Connection state: TCP RST, or FIN from both sides.
pub const CT_CLOSING: u8 = 3;
/// `CtEntry::fin` bit: FIN seen from the originator.
pub const CT_FIN_ORIG: u8 = 1;
/// `CtEntry::fin` bit: FIN seen from the replier.
pub const CT_FIN_REPLY: u8 = 2;

/// `CtEntry::seen` bit / index of the originator's side in the per-side arrays.
pub const CT_SIDE_ORIG: usize = 0;
/// Index of the replier's side in the per-side arrays.
pub const CT_SIDE_REPLY: usize = 1;
/// `CtEntry::wscale` of a side that sent no window-scale option.
pub const CT_NO_WSCALE: u8 = 0xff;

/// Connection-table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet.
    pub last_seen_ns: u64,
    /// Rule that allowed the first packet ([`NO_RULE`] for a default allow).
    pub rule_id: u32,
    /// Direction of the first packet ([`DIR_INGRESS`] / [`DIR_EGRESS`]).
    pub origin: u8,
    /// [`CT_NEW`], [`CT_ESTABLISHED`] or [`CT_CLOSING`].
    pub state: u8,
    /// FIN bits ([`CT_FIN_ORIG`], [`CT_FIN_REPLY`]).
    pub fin: u8,
    /// TCP: bit `1 << side` once a segment of that side was seen.
    pub seen: u8,
    /// TCP, per side ([`CT_SIDE_ORIG`], [`CT_SIDE_REPLY`]): the highest
    /// sequence number sent plus one (`seq + len`, SYN and FIN count one).
    pub seq_end: [u32; 2],
    /// TCP, per side: the largest window that side advertised (scaled).
    pub max_win: [u32; 2],
    /// TCP, per side: the window-scale option of its SYN ([`CT_NO_WSCALE`] if none).
    pub wscale: [u8; 2],
    /// Explicit padding.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

/// Fragment-table key: one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol of the datagram.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// IPv4 identification (16 bits) or IPv6 fragment id.
    pub id: u32,
    /// Source address, network order.
    pub src: [u8; 16],
    /// Destination address, network order.
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Fragment-table value: the first fragment passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragEntry {
    /// `bpf_ktime_get_coarse_ns` of the first fragment.
    pub first_seen_ns: u64,
    /// Rule that allowed the first fragment ([`NO_RULE`] if none).
    pub rule_id: u32,
    /// Reason the first fragment passed.
    pub reason: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragEntry>() == 16);

/// What a dry-run instance records about the last packet (`SEG_TRACE[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TraceResult {
    /// Rule id that allowed the packet, or [`NO_RULE`].
    pub rule_id: u32,
    /// Peer class found for the packet's peer address, or `u32::MAX`.
    pub class_id: u32,
    /// Reason code (see [`reason`]).
    pub reason: u8,
    /// IP protocol seen (0 for non-IP).
    pub proto: u8,
    /// Destination port seen, host order.
    pub dport: u16,
    /// Set to 1 by the program (distinguishes "not run" from "run").
    pub valid: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TraceResult>() == 16);

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for the shared types (aya's typed maps need it).
    use super::*;

    // SAFETY: all types are #[repr(C)], have no padding holes (explicit
    // `_pad` fields) and are `bytemuck::Pod`.
    unsafe impl aya::Pod for PeerKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerClass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TraceResult {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragEntry {}
}
