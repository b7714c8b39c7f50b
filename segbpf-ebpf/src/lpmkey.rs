//! LPM-trie keys (`{ prefix_len: u32, data }`) built as whole aligned
//! words, for the policy tries (`lookup`) and the services tries
//! (`cgroup`).
//!
//! The key types are byte-packed (`PeerKeyV4`: slot and direction bytes,
//! then the address at byte 6 of the key; `PortKey`: the class at byte
//! 5). Built field by field, the compiler writes them a byte at a time
//! (it may not assume an unaligned word store is allowed: the verifier
//! refuses unaligned stack access). Here they are composed in registers
//! and stored as three aligned words, which the helper reads back as
//! bytes: the same key bytes in fewer instructions, one builder for the
//! policy and the services tries.

use aya_ebpf::maps::lpm_trie::Key;
use segbpf_common::{PEER_KEY_HEADER_BITS, PORT_KEY_PROTO_BITS, PeerKeyV4, PeerKeyV6, PortKey};

// The words are composed in little-endian byte order, the BPF target's.
const _: () = assert!(cfg!(target_endian = "little"));

/// A key's bytes in three aligned words.
#[repr(C, align(8))]
pub(crate) struct KeyWords([u64; 3]);

// Every key built here fits in the words, at an alignment they cover.
const _: () = assert!(size_of::<Key<PeerKeyV4>>() <= size_of::<KeyWords>());
const _: () = assert!(size_of::<Key<PeerKeyV6>>() <= size_of::<KeyWords>());
const _: () = assert!(size_of::<Key<PortKey>>() <= size_of::<KeyWords>());
const _: () = assert!(align_of::<Key<PeerKeyV6>>() <= align_of::<KeyWords>());
const _: () = assert!(align_of::<Key<PortKey>>() <= align_of::<KeyWords>());

/// The first word of a peer key: the prefix length (`u32`, native order:
/// the kernel reads it as one), slot, direction, then the address's first
/// two bytes (`a`: the address's first 8 bytes as a native word).
#[inline(always)]
fn peer_head(bits: u32, slot: u8, dir: u8, a: u64) -> u64 {
    u64::from(PEER_KEY_HEADER_BITS + bits) | u64::from(slot) << 32 | u64::from(dir) << 40 | a << 48
}

/// The full-length IPv4 peer key (`PeerKeyV4`) of `slot`, `dir` and the
/// address whose first 8 bytes (network order, as in memory) are `a`.
#[inline(always)]
pub(crate) fn peer_v4(slot: u8, dir: u8, a: u64) -> KeyWords {
    KeyWords([peer_head(32, slot, dir, a), (a >> 16) & 0xffff, 0])
}

/// The full-length IPv6 peer key (`PeerKeyV6`) of `slot`, `dir` and the
/// address held in the two native words `[a, b]` (its bytes in memory
/// order).
#[inline(always)]
pub(crate) fn peer_v6(slot: u8, dir: u8, [a, b]: [u64; 2]) -> KeyWords {
    KeyWords([peer_head(128, slot, dir, a), a >> 16 | b << 48, b >> 16])
}

/// The full-length port key (`PortKey`) of `slot`, `class_id`, `proto`
/// and the destination port `dport` (host order).
#[inline(always)]
pub(crate) fn port(slot: u8, class_id: u32, proto: u8, dport: u16) -> KeyWords {
    let class = u64::from(u32::from_ne_bytes(class_id.to_be_bytes()));
    let port = u64::from(u16::from_ne_bytes(dport.to_be_bytes()));
    KeyWords([
        u64::from(PORT_KEY_PROTO_BITS + 16) | u64::from(slot) << 32 | (class & 0xff_ffff) << 40,
        class >> 24 | u64::from(proto) << 8 | port << 16,
        0,
    ])
}

impl KeyWords {
    /// The words as the key they hold.
    ///
    /// # Safety
    /// The words must have been built for `T` by this module's function
    /// of that key type (`peer_v4`: `PeerKeyV4`, `peer_v6`: `PeerKeyV6`,
    /// `port`: `PortKey`).
    #[inline(always)]
    pub(crate) unsafe fn as_key<T>(&self) -> &Key<T> {
        // SAFETY: the caller's contract: the bytes are a `Key<T>`'s, which
        // fits in the words (asserted above) and needs at most their
        // 8-byte alignment; `T` is plain bytes (`Pod`).
        unsafe { &*(&raw const self.0).cast::<Key<T>>() }
    }
}

/// An address field (16 bytes at an 8-byte aligned offset of an 8-byte
/// aligned struct) as two native words.
///
/// # Safety
/// `addr` must be 8-byte aligned.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the caller guarantees 8-byte alignment: two aligned word loads"
)]
pub(crate) unsafe fn words(addr: &[u8; 16]) -> [u64; 2] {
    // SAFETY: 16 bytes at an 8-byte aligned address (the caller's
    // contract): two aligned u64 words; any bit pattern is a valid u64.
    unsafe { (&raw const *addr).cast::<[u64; 2]>().read() }
}
