//! Policy lookups: two per packet whatever the number of rules.
//! 1. peer trie (v4 or v6): (slot, direction, peer address) -> class id;
//! 2. port trie: (slot, class, protocol, destination port) -> rule id,
//!    skipped for a TCP or UDP port the slot's fast-miss bitmap
//!    (`SEG_PORTMISS`, two array reads) says no entry can match.
//!
//! Port ranges are stored as port prefixes, so a range costs a handful of
//! trie entries and never a loop in the kernel.

use segbpf_common::{
    Config, IPPROTO_TCP, IPPROTO_UDP, PORTMISS_ANY, PORTMISS_WORDS, PeerKeyV4, PeerKeyV6, PortKey,
    PortMiss, portmiss_bit,
};

use crate::{
    lpmkey,
    maps::{SEG_ACTIVE, SEG_CONFIG, SEG_PEER_V4, SEG_PEER_V6, SEG_PORTMISS, SEG_PORTS},
    parse::{L3_IPV4, Parsed},
};

/// The configuration of the policy slot in force (a reference into the
/// map, not a copy). The slot is read once per packet, so every lookup of
/// the packet uses one policy. `None` only if a map is unreadable.
#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    let slot = *SEG_ACTIVE.get(0)? & 1;
    SEG_CONFIG.get(slot)
}

/// Class of the packet's peer (source on ingress, destination on egress).
#[inline(always)]
pub(crate) fn peer_class(slot: u8, dir: u8, p: &Parsed, peer_is_src: bool) -> Option<u32> {
    // SAFETY: `src` and `dst` sit at 8-byte aligned offsets of the 8-byte
    // aligned `Parsed` (asserted in `ctkey`).
    let addr = unsafe { lpmkey::words(if peer_is_src { &p.src } else { &p.dst }) };
    if p.l3 == L3_IPV4 {
        let key = lpmkey::peer_v4(slot, dir, addr[0]);
        // SAFETY: built by `peer_v4`.
        SEG_PEER_V4
            .get(unsafe { key.as_key::<PeerKeyV4>() })
            .map(|c| c.class_id)
    } else {
        let key = lpmkey::peer_v6(slot, dir, addr);
        // SAFETY: built by `peer_v6`.
        SEG_PEER_V6
            .get(unsafe { key.as_key::<PeerKeyV6>() })
            .map(|c| c.class_id)
    }
}

/// The rule allowing (class, protocol, destination port), if any: the
/// port trie, unless the slot's fast-miss bitmap says no entry of it can
/// match (TCP and UDP only; an unreadable bitmap sends the packet to the
/// trie, which alone decides).
#[inline(always)]
pub(crate) fn port_rule(slot: u8, class_id: u32, proto: u8, dport: u16) -> Option<u32> {
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        && let Some(m) = SEG_PORTMISS.get(u32::from(slot & 1))
        && !may_match(m, class_id, proto, dport)
    {
        return None;
    }
    port_trie(slot, class_id, proto, dport)
}

/// Whether the bit of (class, proto, port) or the class's whole-protocol
/// bit is set in `m` (one branch for both: fewer verifier paths).
#[inline(always)]
fn may_match(m: &PortMiss, class_id: u32, proto: u8, dport: u16) -> bool {
    let a = portmiss_bit(class_id, proto, dport);
    let b = portmiss_bit(class_id, PORTMISS_ANY, 0);
    // Masked to the bitmap: the indices are in bounds (no check emitted).
    let wa = m.words[(a as usize >> 6) & (PORTMISS_WORDS - 1)];
    let wb = m.words[(b as usize >> 6) & (PORTMISS_WORDS - 1)];
    ((wa >> (a & 63)) | (wb >> (b & 63))) & 1 != 0
}

/// The port trie's rule for (class, protocol, destination port), if any.
#[inline(always)]
fn port_trie(slot: u8, class_id: u32, proto: u8, dport: u16) -> Option<u32> {
    let key = lpmkey::port(slot, class_id, proto, dport);
    // SAFETY: built by `port`.
    SEG_PORTS
        .get(unsafe { key.as_key::<PortKey>() })
        .map(|r| r.rule_id)
}
