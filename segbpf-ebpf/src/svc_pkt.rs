//! The fields of a packet the services programs judge (`cgroup.rs` reads
//! them, `svc_stamp.rs` hashes them into the sender stamp).

/// Which echo message an ICMP packet is ([`Pkt::echo`]).
pub(crate) const ECHO_NONE: u8 = 0;
pub(crate) const ECHO_REQUEST: u8 = 1;
pub(crate) const ECHO_REPLY: u8 = 2;

/// The fields of a packet the programs judge; the addresses first, 8-aligned: the stamp reads them as words.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct Pkt {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) echo: u8,
    /// Source / destination port; ICMP echo: the id as the requester's port.
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// Offset of the transport header (0: none, a later fragment).
    pub(crate) l4_off: u16,
    /// Length of the transport segment by the IP header (IPv4: total
    /// length less the IP header; IPv6: the payload length less the
    /// extension headers).
    pub(crate) l4_len: u16,
}
const _: () = assert!(core::mem::offset_of!(Pkt, src) == 0);
const _: () = assert!(core::mem::offset_of!(Pkt, dst) == 16);
const _: () = assert!(core::mem::align_of::<Pkt>() == 8);
