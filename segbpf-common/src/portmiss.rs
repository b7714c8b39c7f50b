//! The port fast-miss: one bitmap per policy slot, read before the port
//! trie. Bit [`portmiss_bit`]`(class, proto, port)` is set for every TCP
//! or UDP (class, port) the slot's port trie holds an entry for, and bit
//! `portmiss_bit(class, PORTMISS_ANY, 0)` for every class with an entry
//! that covers whole protocols (`proto = "any"`, or a TCP/UDP entry for
//! every port). When neither bit of a TCP or UDP packet's (class, port)
//! is set, no entry of the trie can match it: the packet skips the trie
//! walk. Bits are shared by hashing, so a set bit only says "look in the
//! trie" (other classes' ports can set it); a clear bit is exact.
//!
//! The bitmap is a function of the slot's port-trie entries alone
//! (userspace: `policy::portmiss`), written beside them by every writer
//! of a slot (whole writes, deltas, set edits), so it is never behind the
//! trie it guards.

use bytemuck::{Pod, Zeroable};

/// Array, two entries: the [`PortMiss`] bitmap of each policy slot.
pub const MAP_PORTMISS: &str = "SEG_PORTMISS";

/// log2 of the bits per slot.
pub const PORTMISS_BITS_LOG2: u32 = 20;
/// u64 words per slot (2^20 bits, 128 KiB).
pub const PORTMISS_WORDS: usize = 1 << (PORTMISS_BITS_LOG2 - 6);
/// The protocol code of a class's whole-protocol bit (never a TCP or UDP
/// bit: those use the protocol number).
pub const PORTMISS_ANY: u8 = 0;

/// One slot's bitmap (the value of [`MAP_PORTMISS`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PortMiss {
    /// Bit `i` is bit `i % 64` of word `i / 64`.
    pub words: [u64; PORTMISS_WORDS],
}
const _: () = assert!(core::mem::size_of::<PortMiss>() == PORTMISS_WORDS * 8);

// SAFETY: a `#[repr(C)]` array of u64: no padding, every bit pattern
// valid, all zeros valid (bytemuck implements these for arrays up to a
// few thousand elements only).
unsafe impl Zeroable for PortMiss {}
// SAFETY: as above.
unsafe impl Pod for PortMiss {}

/// The bit of (class, protocol, port) in a slot's bitmap, in
/// `0..2^PORTMISS_BITS_LOG2`: a multiplicative hash (the kernel and
/// userspace share it; unseeded, so a compiled policy always gives the
/// same bitmap). `proto` is `IPPROTO_TCP`, `IPPROTO_UDP` or
/// [`PORTMISS_ANY`] (then `port` is 0).
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet judged by the policy: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn portmiss_bit(class_id: u32, proto: u8, port: u16) -> u32 {
    let k = (u64::from(class_id) << 32) | (u64::from(proto) << 16) | u64::from(port);
    let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h >> (64 - PORTMISS_BITS_LOG2)) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn bits_are_in_range_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for class in 0..16u32 {
            for port in 0..4096u16 {
                let b = portmiss_bit(class, 6, port);
                assert!(b < 1 << PORTMISS_BITS_LOG2);
                seen.insert(b);
            }
        }
        // 65,536 keys in 2^20 bits: about 63,500 distinct by chance; a
        // hash that ignored the class would give 4,096.
        assert!(seen.len() > 62_000, "{}", seen.len());
        assert_ne!(portmiss_bit(1, 6, 22), portmiss_bit(1, 17, 22));
    }
}
