//! Denied-traffic aggregates: what the datapath dropped (or, in audit
//! mode, would have dropped), counted per (direction, source, destination,
//! protocol, destination port, reason) in per-CPU arrays of buckets, so a
//! drop costs a hash of its key and an array slot, never a hash-table
//! insert, and a flood of new sources costs what a flood of one does.
//!
//! Each CPU has [`DENIED_BUCKETS`] buckets per table; a packet's key picks
//! one by a seeded hash ([`bucket`]). The first key to reach an empty
//! bucket owns it until userspace empties the table: its packets are
//! counted there exactly. A packet whose bucket another key owns is not
//! attributed: it is counted in `SEG_DENY_LOST` and the bucket is marked
//! [`DeniedBucket::shared`], so the owner's record (and any record of the
//! same index) says its numbers may be incomplete. The exact totals per
//! direction and reason stay in `SEG_STATS`.
//!
//! Two tables take turns: the kernel counts into the one
//! `SEG_DENY_SEL[0]` names, userspace flips the selector, waits for
//! programs already running to finish, then reads and empties the other
//! table. Nothing is lost between a read and a reset.

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

impl DeniedKey {
    /// The key as five little 64-bit words (what [`bucket`] hashes and the
    /// kernel compares).
    #[allow(
        clippy::inline_always,
        reason = "the datapath calls it per dropped packet: no BPF-to-BPF call"
    )]
    #[inline(always)]
    pub fn words(&self) -> [u64; 5] {
        bytemuck::cast(*self)
    }
}

/// One bucket of a denied table (one per CPU and index): the key that owns
/// it and that key's packets on this CPU since the table was emptied.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DeniedBucket {
    /// The owner's key (meaningless while `packets` is 0: the bucket is empty).
    pub key: DeniedKey,
    /// Packets of the owner.
    pub packets: u64,
    /// Bytes (frame lengths) of the owner.
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns` of the owner's first packet.
    pub first_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the owner's last packet.
    pub last_ns: u64,
    /// The OR of the owner's TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// 1 once a packet of another key hashed here and was counted in
    /// `SEG_DENY_LOST` instead: records of this index are then not exact.
    pub shared: u8,
    /// Explicit padding.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<DeniedBucket>() == 80);

/// Per-CPU array of [`DENIED_BUCKETS`] [`DeniedBucket`]s, the first of the
/// two tables.
pub const MAP_DENIED0: &str = "SEG_DENYB0";
/// The second table.
pub const MAP_DENIED1: &str = "SEG_DENYB1";
/// Array, one u32: which table (0 or 1) the kernel counts into.
pub const MAP_DENY_SEL: &str = "SEG_DENY_SEL";
/// Per-CPU array, one u64: denied packets not attributed to an aggregate
/// because their bucket was owned by another key.
pub const MAP_DENY_LOST: &str = "SEG_DENY_LOST";
/// Per-CPU array, one [`DeniedRate`]: the flood state that decides which
/// drops go to their aggregate ([`denied_attributed`]).
pub const MAP_DENY_RATE: &str = "SEG_DENY_RATE";
/// A tick of the flood state: 2^27 ns (about 134 ms) of the kernel's
/// coarse clock.
pub const DENIED_TICK_SHIFT: u32 = 27;
/// Drops per CPU and tick that all go to their aggregates (about 7,600 a
/// second per CPU): below it every aggregate is exact.
pub const DENIED_EXACT_PER_TICK: u64 = 1_024;
/// Above [`DENIED_EXACT_PER_TICK`], one drop in this many (per CPU) goes
/// to its aggregate; the others are counted in [`DeniedRate::unsampled`].
pub const DENIED_SAMPLE: u64 = 16;
const _: () = assert!(DENIED_SAMPLE.is_power_of_two());

/// The flood state of one CPU (`SEG_DENY_RATE`): under a flood the denied
/// aggregates are kept on a sample, so a drop then costs a counter, not
/// a hash, a bucket and a key compare. The exact counts per direction and
/// reason stay in `SEG_STATS`; every unsampled drop is counted here, so
/// the aggregates, the shared-bucket losses and `unsampled` still add up
/// to every denied packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DeniedRate {
    /// `now >> DENIED_TICK_SHIFT` of the tick `count` is of.
    pub tick: u64,
    /// Drops on this CPU in that tick.
    pub count: u64,
    /// Drops not given to their aggregate because of the sample, since the
    /// attachment was made (userspace takes differences).
    pub unsampled: u64,
}
const _: () = assert!(core::mem::size_of::<DeniedRate>() == 24);

/// Whether the `n`-th drop (from 1) of a tick on a CPU goes to its
/// aggregate: all of the first [`DENIED_EXACT_PER_TICK`], then one in
/// [`DENIED_SAMPLE`]. The kernel and the tests share it.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per dropped packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn denied_attributed(n: u64) -> bool {
    n <= DENIED_EXACT_PER_TICK || n & (DENIED_SAMPLE - 1) == 0
}

/// Buckets per CPU in each denied table (a power of two).
pub const DENIED_BUCKETS: u32 = 8_192;
const _: () = assert!(DENIED_BUCKETS.is_power_of_two());
/// Name of the read-only global that seeds [`bucket`], random per
/// instance (set at load): which keys share a bucket cannot be chosen
/// from outside.
pub const GLOBAL_DENY_SEED: &str = "SEGBPF_DENY_SEED";

/// The bucket index of `key` under `seed`: a multiplicative hash of the
/// key's words, in `0..DENIED_BUCKETS`. The kernel and userspace share it.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per dropped packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn bucket(key: &DeniedKey, seed: u64) -> u32 {
    let w = key.words();
    // Independent multiplies (they pipeline), folded, then one more mix.
    let h = (w[0] ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ w[1].wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ w[2].wrapping_mul(0x1656_67B1_9E37_79F9)
        ^ w[3].wrapping_mul(0x85EB_CA77_C2B2_AE63)
        ^ w[4].wrapping_mul(0x27D4_EB2F_1656_67C5);
    let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h >> (64 - DENIED_BUCKETS.trailing_zeros())) as u32
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn buckets_are_in_range_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let mut k = DeniedKey {
                family: 4,
                proto: 6,
                dport: 22,
                ..DeniedKey::default()
            };
            k.src[..4].copy_from_slice(&(0xC612_0000 + i).to_be_bytes());
            let b = bucket(&k, 7);
            assert!(b < DENIED_BUCKETS);
            seen.insert(b);
        }
        // 4,096 sources in 8,192 buckets: about 3,200 distinct by chance;
        // a poor hash (the source ignored) would give a handful.
        assert!(seen.len() > 2_900, "{}", seen.len());
    }

    #[test]
    fn the_seed_moves_keys() {
        let k = DeniedKey {
            family: 4,
            dport: 80,
            ..DeniedKey::default()
        };
        let moved = (1..64).filter(|s| bucket(&k, *s) != bucket(&k, 0)).count();
        assert!(moved > 50, "{moved}");
    }

    #[test]
    fn a_flood_is_sampled_and_a_trickle_is_not() {
        let kept = |n: u64| (1..=n).filter(|i| denied_attributed(*i)).count() as u64;
        assert_eq!(kept(DENIED_EXACT_PER_TICK), DENIED_EXACT_PER_TICK);
        let flood = DENIED_EXACT_PER_TICK + 16_000;
        assert_eq!(kept(flood), DENIED_EXACT_PER_TICK + 16_000 / DENIED_SAMPLE);
    }
}
