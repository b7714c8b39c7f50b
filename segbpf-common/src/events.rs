//! Drop and audit events in the ring buffer, the kernel's event rate
//! limiter and the event counters (`SEG_EVSTATS`).

#[cfg(doc)]
use crate::{DIR_EGRESS, DIR_INGRESS, reason};
use bytemuck::{Pod, Zeroable};

/// Index in `SEG_EVSTATS`: events written to the ring.
pub const EV_EMITTED: u32 = 0;
/// Index in `SEG_EVSTATS`: events not written because of the rate limit.
pub const EV_SUPPRESSED: u32 = 1;
/// Index in `SEG_EVSTATS`: events lost because the ring was full.
pub const EV_LOST: u32 = 2;

/// The event rate limiter's state (`SEG_RATE[0]`): fixed windows of
/// `log_burst / log_rate` seconds, each allowing `log_burst` events, so
/// over any span T at most `log_rate * T + log_burst` events are written
/// (plus, at most, one per other CPU racing at a window's last slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RateState {
    /// End of the current window (`bpf_ktime_get_coarse_ns`), set when
    /// the window opens, so a packet compares instead of dividing.
    pub window_end_ns: u64,
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
