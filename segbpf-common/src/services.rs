//! Services (`[services.*]`, enforced by the cgroup_skb programs): map
//! names, the cgroup table's values, the per-service configuration, the
//! service-peer key and the flow table of socket-side views.
//!
//! Policy slots work as for interfaces, folded into the peer and port
//! keys' `slot` byte: `slot * SVC_SLOT_STRIDE + service id`, so one
//! [`SvcCgroup`] entry names a cgroup's service in both slots and a reload
//! flips [`MAP_SVC_ACT`] once.

use bytemuck::{Pod, Zeroable};

/// Hash: cgroup id (u64) -> [`SvcCgroup`].
pub const MAP_SVC_CG: &str = "SEG_SVC_CG";
/// Array of [`SvcConfig`], index `slot * SVC_SLOT_STRIDE + service id`
/// (id 0: the slot's globals).
pub const MAP_SVC_CFG: &str = "SEG_SVC_CFG";
/// Array, one u32: the services' policy slot in force (0 or 1).
pub const MAP_SVC_ACT: &str = "SEG_SVC_ACT";
/// LPM trie: (slot byte, direction, IPv4 peer) -> class.
pub const MAP_SVC_V4: &str = "SEG_SVC_V4";
/// LPM trie: (slot byte, direction, IPv6 peer) -> class.
pub const MAP_SVC_V6: &str = "SEG_SVC_V6";
/// LPM trie: (slot byte, class, protocol, port prefix) -> rule.
pub const MAP_SVC_PORTS: &str = "SEG_SVC_PORTS";
/// Hash: [`SvcPeerKey`] -> class of the rules naming that peer service.
pub const MAP_SVC_PEER: &str = "SEG_SVC_PEER";
/// LRU hash: [`SvcFlowKey`] -> [`SvcFlow`], one entry per socket side of
/// an allowed flow.
pub const MAP_SVC_CT: &str = "SEG_SVC_CT";
/// Per-CPU array of `Counter`s, index `(slot byte) * 4 + dir * 2 + passed`.
pub const MAP_SVC_STATS: &str = "SEG_SVC_STATS";
/// Ring buffer of [`SvcEvent`]s: packets of a service dropped (or let
/// through in audit mode), rate-limited in the kernel.
pub const MAP_SVC_EVENTS: &str = "SEG_SVC_EVENTS";
/// Per-CPU array, two u64: the event rate limiter's window start (ns) and
/// the events emitted in it.
pub const MAP_SVC_RATE: &str = "SEG_SVC_RATE";
/// Events per second and CPU the services programs emit at most.
pub const SVC_EVENTS_PER_SEC: u64 = 100;
/// Bytes of the services event ring.
pub const SVC_EVENT_RING_BYTES: u32 = 1 << 18;
/// Name of the cgroup_skb ingress program.
pub const PROG_SVC_INGRESS: &str = "segbpf_svc_ingress";
/// Name of the cgroup_skb egress program.
pub const PROG_SVC_EGRESS: &str = "segbpf_svc_egress";
/// Name of the empty cgroup_skb program (the benchmarks' floor).
pub const PROG_SVC_EMPTY: &str = "segbpf_svc_empty";
/// Name of the dry-run ingress program (`segbpf trace --services`): the
/// judgement of [`PROG_SVC_INGRESS`] that writes nothing but its record.
pub const PROG_SVC_DRY_INGRESS: &str = "segbpf_svc_dry_in";
/// Name of the dry-run egress program.
pub const PROG_SVC_DRY_EGRESS: &str = "segbpf_svc_dry_eg";
/// Whom the dry-run programs judge as (index 0, a [`SvcDry`]); never
/// pinned, filled in the dry-run instance only.
pub const MAP_SVC_DRY: &str = "SEG_SVC_DRY";
/// What the dry-run programs decided (index 0, a [`SvcTrace`]).
pub const MAP_SVC_TRC: &str = "SEG_SVC_TRC";
/// [`SvcTrace::reason`]: a rule of the service allowed it.
pub const SVC_WHY_RULE: u8 = 1;
/// An ICMP echo request (`icmp = true`).
pub const SVC_WHY_ICMP: u8 = 2;
/// The service's default for the direction.
pub const SVC_WHY_DEFAULT: u8 = 3;
/// The sender may send only to named services, and this is none of them.
pub const SVC_WHY_NEED_PEER: u8 = 4;
/// A header that could not be read.
pub const SVC_WHY_UNPARSED: u8 = 5;

/// Every map the services attachment pins.
pub const SVC_PINNED_MAPS: [&str; 10] = [
    MAP_SVC_CG,
    MAP_SVC_CFG,
    MAP_SVC_ACT,
    MAP_SVC_V4,
    MAP_SVC_V6,
    MAP_SVC_PORTS,
    MAP_SVC_PEER,
    MAP_SVC_CT,
    MAP_SVC_STATS,
    MAP_SVC_EVENTS,
];

/// Service ids per slot: 1..=`MAX_SERVICES`; the slot byte is
/// `slot * SVC_SLOT_STRIDE + id`.
pub const SVC_SLOT_STRIDE: u8 = 128;
/// Most services one policy may define.
pub const MAX_SERVICES: usize = 126;
/// [`SvcCgroup::svc`]: a known cgroup in no service (its sockets pass).
pub const SVC_NONE: u8 = 0;
/// [`SvcPeerKey::peer`] of the class of every `to_services` rule (the
/// receiver is checked at its ingress).
pub const SVC_PEER_ANY: u8 = 255;
/// Deepest cgroup level (below the hierarchy's root) the programs look at.
pub const SVC_MAX_LEVEL: u32 = 16;
/// Default capacity of the flow table.
pub const DEFAULT_SVC_CT_ENTRIES: u32 = 65_536;
/// Entries of [`MAP_SVC_CFG`]: two slots of `SVC_SLOT_STRIDE`.
pub const SVC_CFG_ENTRIES: u32 = 256;

/// Value of the cgroup table: what a cgroup is in each policy slot.
/// Userspace writes the effective service (a cgroup below a service's
/// cgroup inherits it), so the deepest known ancestor of a socket's cgroup
/// decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcCgroup {
    /// Per slot: a service id (1..=126) or [`SVC_NONE`].
    pub svc: [u8; 2],
    /// Per slot: 1 when the cgroup is an ancestor of a service's cgroup.
    /// Its children that have no entry yet are not classified by
    /// userspace: their sockets are held (dropped) until it writes one.
    pub guard: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SvcCgroup>() == 4);

/// Per (slot, service) configuration; id 0 holds the slot's globals
/// (`generation`, `max_level`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcConfig {
    /// Policy generation.
    pub generation: u64,
    /// Ingress default (`ACTION_DROP` / `ACTION_ALLOW`).
    pub ingress_default: u8,
    /// Egress default.
    pub egress_default: u8,
    /// 1: replies to allowed flows pass.
    pub established: u8,
    /// 1: ICMP echo requests pass by default.
    pub icmp: u8,
    /// 1: audit mode (would-be drops pass).
    pub audit: u8,
    /// 1: this entry is a defined service (or the slot's globals).
    pub present: u8,
    /// Globals only: the deepest level of a known cgroup (0 = root).
    pub max_level: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Globals only: the nonce of the sender stamps made under this slot
    /// (random, [`SVC_STAMP_NONCE_MASK`] bits, never 0; a new one each
    /// time a reload fills the slot, kept when the slot leaves force so a
    /// packet stamped just before a flip still names its sender).
    pub nonce: u32,
    /// Explicit padding.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SvcConfig>() == 24);

/// Value of the services' peer tries and peer table: a class (the
/// layout of `PeerClass`; its own type so the programs' lookups are their
/// own code, apart from the interface programs').
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcClass {
    /// Class id.
    pub class_id: u32,
}
const _: () = assert!(core::mem::size_of::<SvcClass>() == 4);

/// Value of the services' port trie: the allowing rule (the layout of
/// `RuleRef`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcRule {
    /// Service rule id.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<SvcRule>() == 4);

/// Key of the service-peer table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcPeerKey {
    /// Slot byte of the judging service.
    pub slot: u8,
    /// `DIR_INGRESS` (`from_services`) or `DIR_EGRESS` (`to_services`).
    pub dir: u8,
    /// Peer service id in the same slot, or [`SVC_PEER_ANY`].
    pub peer: u8,
    /// Explicit padding.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SvcPeerKey>() == 4);

/// A flow as one local socket sees it. IPv4 addresses use the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcFlowKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// Local port (ICMP echo: the id), network order.
    pub lport_be: [u8; 2],
    /// Remote port (ICMP echo: 0), network order.
    pub rport_be: [u8; 2],
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// Local address, network order.
    pub laddr_be: [u8; 16],
    /// Remote address, network order.
    pub raddr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SvcFlowKey>() == 40);

/// [`SvcFlow::flags`]: the flow's sender passed its egress only through
/// `to_services`; the receiver's ingress checks it is one of them.
pub const SVC_FLOW_NEED_PEER: u32 = 1;
/// [`SvcFlow::flags`]: the entry was made by a packet the socket received
/// (its peer's port may be reused by another local process later: over
/// loopback a later packet must come from the same peer service).
pub const SVC_FLOW_INBOUND: u32 = 2;
/// [`SvcFlow::flags`], with [`SVC_FLOW_NEED_PEER`] on a flow the socket
/// opened: a reply over loopback named the answering service, which
/// [`SvcFlow::peer`] now holds; only its stamp makes later replies part
/// of the flow (without the flag, every reply is checked against the
/// `to_services` rules).
pub const SVC_FLOW_ANSWERED: u32 = 4;

/// A socket side of an allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcFlow {
    /// The socket's own cgroup id: only sockets of that cgroup use the entry.
    pub sock_cg: u64,
    /// The service cgroup the socket was in (0: none). A record only: a
    /// local peer learns who sent a packet from its stamp, never from here.
    pub svc_cg: u64,
    /// Last packet, ns (`bpf_ktime_get_coarse_ns`).
    pub last_ns: u64,
    /// Over loopback, an entry made by a received packet (or, on a flow
    /// the socket opened through `to_services`, by the reply that named
    /// the answering service, [`SVC_FLOW_ANSWERED`]): the sender's
    /// identity from that packet's stamp, `generation << 8 | stamp &`
    /// [`SVC_STAMP_ID_MASK`] (the slot bit and the service id, with the
    /// policy generation the stamp was made under; identity bits 0: no
    /// service or no valid stamp, still with the generation). A later packet is part of the flow only with the same
    /// identity: a local process that reuses the 4-tuple (closed or
    /// shared) is judged anew, and so is a flow after a reload.
    pub peer: u64,
    /// `SVC_FLOW_*`.
    pub flags: u32,
    /// Rule that allowed it (`u32::MAX`: a default).
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<SvcFlow>() == 40);

/// The sender's identity on a loopback packet: the egress program writes
/// `skb->priority` of every packet a socket sends towards the loopback
/// device (of a service: the attachment's nonce | [`SVC_STAMP_NEED_PEER`]
/// | slot << 7 | service id; of anything else: 0), after netfilter's
/// POSTROUTING, and the ingress program on loopback reads it back: the
/// same skb, in the same network namespace, nothing in the kernel's
/// loopback path rewrites it. These bits carry the nonce of the slot the
/// stamp was made under ([`SvcConfig::nonce`] of the slot's globals), a
/// random value chosen each time a policy fills the slot, never 0: a priority a process may set for itself (`SO_PRIORITY` 0..6
/// without `CAP_NET_ADMIN`/`CAP_NET_RAW`) is never a stamp, and the
/// stamp of a socket's packets is overwritten anyway. The ingress
/// program sets the priority back to 0 once it has read it, so no
/// receiver below the cgroup root reads a stamp (`SO_RCVPRIORITY`).
pub const SVC_STAMP_NONCE_MASK: u32 = 0xffff_fe00;
/// Stamp bit: the sender passed its egress only through `to_services`;
/// the receiver's ingress checks it is one of them.
pub const SVC_STAMP_NEED_PEER: u32 = 0x100;
/// Stamp bits naming the sender: the policy slot (bit 7) and the service
/// id in it (bits 0..6).
pub const SVC_STAMP_ID_MASK: u32 = 0xff;

/// A packet of a service that was dropped (or, `audit = 1`, would have
/// been and was let through).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcEvent {
    /// `bpf_ktime_get_ns` when it was judged.
    pub ts_ns: u64,
    /// Slot byte of the service (`slot * SVC_SLOT_STRIDE + id`).
    pub slot: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// 1: audit mode, the packet passed.
    pub audit: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
    /// Source port (ICMP echo: the id), network order.
    pub sport_be: [u8; 2],
    /// Destination port, network order.
    pub dport_be: [u8; 2],
    /// Explicit padding.
    pub _pad2: [u8; 4],
    /// Source address, network order (IPv4: first 4 bytes).
    pub src_be: [u8; 16],
    /// Destination address, network order.
    pub dst_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SvcEvent>() == 56);

// SAFETY: #[repr(C)], explicit padding, bytemuck::Pod.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcEvent {}

/// Idle timeout of a TCP flow entry, seconds.
pub const SVC_TCP_IDLE_S: u64 = 7_440;
/// Idle timeout of a UDP or ICMP flow entry, seconds.
pub const SVC_UDP_IDLE_S: u64 = 180;

// SAFETY: all types are #[repr(C)], have no padding holes (explicit
// `_pad` fields) and are `bytemuck::Pod`.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcCgroup {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcConfig {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcPeerKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcFlowKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcFlow {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcClass {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcRule {}

/// Whom a dry-run program judges a packet as (`SEG_SVC_DRY[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcDry {
    /// The service's id in the slot in force (1..=`MAX_SERVICES`).
    pub svc: u8,
    /// Ingress over loopback: the sending socket's service id (0: none).
    pub peer: u8,
    /// 1: the packet goes over loopback.
    pub loopback: u8,
    /// Explicit padding.
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SvcDry>() == 8);

/// What a dry-run program decided (`SEG_SVC_TRC[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcTrace {
    /// 1: written by a run (userspace zeroes it before each run).
    pub valid: u8,
    /// 1: the policy allows it.
    pub allowed: u8,
    /// `SVC_WHY_*`.
    pub reason: u8,
    /// 1: audit mode (a drop would pass).
    pub audit: u8,
    /// The rule that allowed it (`u32::MAX`: none).
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<SvcTrace>() == 8);

// SAFETY: #[repr(C)], explicit padding, bytemuck::Pod.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcDry {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcTrace {}
