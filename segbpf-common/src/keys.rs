//! Policy map keys and values: the peer tries (address -> class) and the
//! port trie ((class, protocol, port) -> rule), with the direction and
//! protocol numbers they carry.

#[cfg(doc)]
use crate::Config;
use bytemuck::{Pod, Zeroable};

// ---------------------------------------------------------------------------
// Directions and protocols.
// ---------------------------------------------------------------------------

/// Direction byte in keys: traffic entering the host (peer = source address).
pub const DIR_INGRESS: u8 = 0;
/// Direction byte in keys: traffic leaving the host (peer = destination address).
pub const DIR_EGRESS: u8 = 1;

/// IP protocol numbers the datapath understands.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

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
