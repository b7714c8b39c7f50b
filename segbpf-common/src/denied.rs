//! Denied-traffic aggregates: what the datapath dropped (or, in audit
//! mode, would have dropped), counted per (direction, source, destination,
//! protocol, destination port, reason) in a per-CPU hash, so a flood costs
//! a map update per packet, not a record.
//!
//! Two tables take turns: the kernel counts into the one
//! `SEG_DENY_SEL[0]` names, userspace flips the selector, waits for
//! programs already running to finish, then reads and empties the other
//! table. Nothing is lost between a read and a delete. A packet whose
//! aggregate finds its table full is counted in `SEG_DENY_LOST`.

#[cfg(doc)]
use crate::{DIR_EGRESS, DIR_INGRESS, EVENT_AUDIT, EVENT_DROP, reason};
use bytemuck::{Pod, Zeroable};

/// Key of a denied aggregate.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DeniedKey {
    /// 4, 6, or 0 when the packet was not parsed as IP.
    pub family: u8,
    /// IP protocol (0 when unknown).
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// Reason code of the drop (see [`reason`]).
    pub reason: u8,
    /// [`EVENT_DROP`] (dropped) or [`EVENT_AUDIT`] (audit mode let it pass).
    pub kind: u8,
    /// 1 when the packet would open a flow (TCP SYN without ACK, UDP,
    /// ICMP echo request): a connection attempt rather than a stray packet.
    pub opens: u8,
    /// Destination port, host order (ICMP: the type; 0 when none).
    pub dport: u16,
    /// Source address (IPv4 in the first 4 bytes), network order.
    pub src: [u8; 16],
    /// Destination address, network order.
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DeniedKey>() == 40);
const _: () = assert!(core::mem::align_of::<DeniedKey>() == 8);

/// Value of a denied aggregate (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DeniedStat {
    /// Packets.
    pub packets: u64,
    /// Bytes (frame lengths).
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns` of the first packet.
    pub first_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet.
    pub last_ns: u64,
    /// The OR of the TCP flags of the packets (0 for other protocols).
    pub tcp_flags: u8,
    /// Explicit padding.
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<DeniedStat>() == 40);

/// Per-CPU hash: [`DeniedKey`] -> [`DeniedStat`], the first of the two tables.
pub const MAP_DENIED0: &str = "SEG_DENIED0";
/// The second table.
pub const MAP_DENIED1: &str = "SEG_DENIED1";
/// Array, one u32: which table (0 or 1) the kernel counts into.
pub const MAP_DENY_SEL: &str = "SEG_DENY_SEL";
/// Array, two u32: 1 once an insert into that table failed (it is full):
/// until userspace empties it, a new aggregate is counted as lost at once
/// instead of trying (and failing) another insert. Userspace clears it
/// after emptying the table.
pub const MAP_DENY_FULL: &str = "SEG_DENY_FULL";
/// Per-CPU array, one u64: packets whose aggregate found its table full.
pub const MAP_DENY_LOST: &str = "SEG_DENY_LOST";
/// Capacity of each denied table (distinct aggregates between two flushes).
pub const DEFAULT_DENIED_ENTRIES: u32 = 16_384;
