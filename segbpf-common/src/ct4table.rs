//! The IPv4 connection table: a table of our own, not a kernel hash map.
//!
//! One table holds the half-open and the assured IPv4 flows of a network
//! namespace, in two arrays pinned with the other shared maps:
//! [`MAP_CT4_SETS`] (sets of [`CT4_WAYS`] keys) and [`MAP_CT4_WAYS`] (the
//! [`crate::CtEntry`] of each way, at `set * CT4_WAYS + way`). A packet of
//! a tracked flow costs one hash of its 16-byte key ([`ct4_candidates`])
//! and the read of one or two 64-byte sets, instead of the kernel LRU
//! hash's lookup; a new flow is written into a free way instead of taking
//! a node from the LRU's free lists (BENCHMARKS.md, issue 24).
//!
//! A set is eight u64 words ([`Ct4Set`]):
//! - word 0: the set's sequence (u16, bits 0..16: odd while a writer holds
//!   the set), the assured bits (u16, bits 16..32: bit `w` for way `w`)
//!   and way 0's tick (u32, bits 32..64);
//! - word 1: the ticks of ways 1 (low half) and 2 (high half);
//! - words 2..8: the three keys, two words each ([`ct4_words`]); a way
//!   whose second word is 0 is free (a key's second word holds its
//!   protocol, never 0).
//!
//! A way's tick ([`crate::ct_seen_tick`]) is written when its flow is made
//! and refreshed by every lookup that finds it, so it is never older than
//! the entry's `last_seen_ns`.
//!
//! **Two candidate sets per key**, from a hash keyed by a secret of the
//! namespace (kept in the element after the last set, [`ct4_secret`]; a
//! sender cannot choose which flows share a set). A new flow takes, among
//! the six ways of its two sets: a free way (empty, or one whose tick is
//! older than every timeout allows: no flow there is live) in the set with
//! fewer assured ways, else the least recently seen half-open way. Never a
//! live assured way: when all six are assured the new flow is not tracked
//! (its replies meet the policy), so a flood of openers evicts only
//! half-open flows, as it did with the kernel's two LRU tables, and
//! spreading new flows by assured ways keeps sets full of assured flows
//! rare. A flow is promoted (or closes) by its assured bit, without a
//! copy.
//!
//! **Writers take the set**: a compare-and-exchange of word 0 from an even
//! sequence to the next (odd), the writes, then another back to even (the
//! sequence plus two). Readers compare keys without the lock and accept a match only
//! if the sequence was even and unchanged around the compare. The
//! datapath's lookups store the way's tick without the lock (an aligned
//! u32 of its own), and update a found entry's fields in place as they did
//! in the LRU table. Userspace (`segbpf::attachment::cttables`) maps both
//! arrays and takes sets the same way.
//!
//! **Size**: [`ct4_sets_for`] sets for a `--ct-size` of `ct`: room for the
//! `ct` assured and [`crate::ct_new_entries`] half-open flows of the
//! kernel tables it replaces in at most two thirds of the ways, rounded up
//! to a power of two (the mask of the set index). At two thirds full a
//! new flow still finds a free way among its six in all but a small
//! fraction of cases; at 42% (the default: 81,920 flows in 196,608 ways)
//! almost always.

use crate::CtKey4;

/// Array of [`Ct4Set`]: the sets of the IPv4 connection table, and one
/// element more that holds the namespace's secret ([`ct4_secret`]).
pub const MAP_CT4_SETS: &str = "SEG_CT4_SETS";
/// Array of [`crate::CtEntry`]: the entry of each way (`set * CT4_WAYS +
/// way`).
pub const MAP_CT4_WAYS: &str = "SEG_CT4_WAYS";
/// Ways per set.
pub const CT4_WAYS: u32 = 3;
/// Flags of both arrays: `BPF_F_MMAPABLE`, so userspace maps them and
/// takes a set's lock as the programs do.
pub const CT4_MAP_FLAGS: u32 = 1 << 10;
/// One set (see the module docs).
pub type Ct4Set = [u64; 8];
/// The global holding the secret of the set hash (frozen at load; the
/// namespace's value, [`ct4_secret`]).
pub const GLOBAL_CT4_KEY: &str = "SEGBPF_CT4_KEY";
/// The global holding the mask of the set index (sets − 1, frozen at
/// load from the namespace's array).
pub const GLOBAL_CT4_MASK: &str = "SEGBPF_CT4_MASK";
/// Sets of the default table ([`ct4_sets_for`] of the default `--ct-size`).
pub const DEFAULT_CT4_SETS: u32 = ct4_sets_for(crate::DEFAULT_CT_ENTRIES);

/// The sets of the table for a `--ct-size` of `ct` (module docs): the
/// `ct + ct_new_entries(ct)` flows of the two kernel tables it replaces in
/// at most two thirds of the ways, as a power of two.
pub const fn ct4_sets_for(ct: u32) -> u32 {
    let flows = ct as u64 + crate::ct_new_entries(ct) as u64;
    // flows <= 2/3 of the ways (3 per set): at least flows / 2 sets.
    let need = flows.div_ceil(2);
    let need = if need < 64 { 64 } else { need };
    let sets = need.next_power_of_two();
    if sets > 1 << 31 { 1 << 31 } else { sets as u32 }
}

/// Elements of [`MAP_CT4_SETS`] for `sets` sets: the sets and the secret.
pub const fn ct4_sets_entries(sets: u32) -> u32 {
    sets + 1
}

/// Elements of [`MAP_CT4_WAYS`] for `sets` sets.
pub const fn ct4_ways_entries(sets: u32) -> u32 {
    sets * CT4_WAYS
}

/// The key as the two words a set stores.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct4_words(key: &CtKey4) -> [u64; 2] {
    let b: &[u64; 2] = bytemuck::cast_ref(key);
    *b
}

/// The key of two words ([`ct4_words`] reversed).
pub fn ct4_key(words: [u64; 2]) -> CtKey4 {
    bytemuck::cast(words)
}

/// The two candidate sets of the key of words `k0`, `k1`, for the
/// namespace's `secret` and the table's `mask` (sets − 1). The same
/// function in the datapath and in userspace.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct4_candidates(k0: u64, k1: u64, secret: u64, mask: u32) -> (u32, u32) {
    // Each word keyed and multiplied, then a full 64-bit finalizer
    // (MurmurHash3's fmix64), so every bit of the key reaches every bit of
    // both set indices: a sender cannot fill one set by varying bits the
    // index ignores.
    let h = (k0 ^ secret).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (k1 ^ secret.rotate_left(32)).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let h = (h ^ (h >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    let h = (h ^ (h >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    let h = h ^ (h >> 33);
    ((h >> 32) as u32 & mask, h as u32 & mask)
}

/// The index in a set of way `w`'s first key word.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub const fn ct4_slot(w: u32) -> usize {
    2 + 2 * (w as usize % CT4_WAYS as usize)
}

/// Way `w`'s tick in the set `s` (module docs).
pub const fn ct4_tick(s: &Ct4Set, w: u32) -> u32 {
    match w {
        0 => (s[0] >> 32) as u32,
        1 => s[1] as u32,
        _ => (s[1] >> 32) as u32,
    }
}

/// Whether way `w` of the set `s` holds an assured flow.
pub const fn ct4_assured(s: &Ct4Set, w: u32) -> bool {
    (s[0] >> (16 + w)) & 1 != 0
}

/// The namespace's secret, as the element after the last set holds it
/// (its first word).
pub const fn ct4_secret(extra: &Ct4Set) -> u64 {
    extra[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_has_room_for_both_kernel_tables() {
        assert_eq!(DEFAULT_CT4_SETS, 65_536);
        let ways = u64::from(DEFAULT_CT4_SETS) * u64::from(CT4_WAYS);
        let flows = u64::from(crate::DEFAULT_CT_ENTRIES)
            + u64::from(crate::ct_new_entries(crate::DEFAULT_CT_ENTRIES));
        assert!(flows * 3 <= ways * 2, "{flows} flows in {ways} ways");
        for ct in [1024u32, 1025, 50_000, 65_536, 100_000, 1 << 26] {
            let sets = ct4_sets_for(ct);
            assert!(sets.is_power_of_two(), "{ct}: {sets}");
            let flows = u64::from(ct) + u64::from(crate::ct_new_entries(ct));
            assert!(flows * 3 <= u64::from(sets) * 3 * 2, "{ct}: {sets}");
            assert!(
                u64::from(sets) / 2 * 3 * 2 < flows * 3,
                "{ct}: {sets} is not the least"
            );
        }
    }

    #[test]
    fn keys_and_words_round_trip_and_a_key_never_looks_free() {
        let k = CtKey4 {
            local_be: 0x0102_0304,
            remote_be: 0x0506_0708,
            local_port: 80,
            remote_port: 40_000,
            proto_ifindex: 7 << 8 | 6,
        };
        let w = ct4_words(&k);
        assert_eq!(ct4_key(w), k);
        assert_ne!(w[1], 0, "the second word holds the protocol");
        let (a, b) = ct4_candidates(w[0], w[1], 42, 1023);
        assert!(a < 1024 && b < 1024);
        assert_ne!(
            ct4_candidates(w[0], w[1], 43, 1023),
            (a, b),
            "the secret moves the sets"
        );
    }

    #[test]
    fn header_fields_read_back() {
        let mut s: Ct4Set = [0; 8];
        s[0] = 4 | (0b101 << 16) | (7u64 << 32);
        s[1] = 8 | (9u64 << 32);
        assert_eq!(
            [ct4_tick(&s, 0), ct4_tick(&s, 1), ct4_tick(&s, 2)],
            [7, 8, 9]
        );
        assert!(ct4_assured(&s, 0) && !ct4_assured(&s, 1) && ct4_assured(&s, 2));
    }

    #[test]
    fn every_key_byte_moves_both_sets() {
        // For each byte of the key, and a few secrets, changing the byte
        // changes each set index for most values (an index that ignores a
        // byte would let a sender fill a set by varying it).
        let k = CtKey4 {
            local_be: 0x1401_0a0a,
            remote_be: 0x0100_12c6,
            local_port: 80,
            remote_port: 40_000,
            proto_ifindex: 3 << 8 | 6,
        };
        let [k0, k1] = ct4_words(&k);
        for secret in [1u64, 0x1234_5678_9abc_def1, u64::MAX] {
            let (set_a, set_b) = ct4_candidates(k0, k1, secret, 0xffff);
            for byte in 0..16 {
                let (mut same_a, mut same_b) = (0, 0);
                for v in 1..=255u64 {
                    let (x0, x1) = if byte < 8 {
                        (k0 ^ (v << (8 * byte)), k1)
                    } else {
                        (k0, k1 ^ (v << (8 * (byte - 8))))
                    };
                    let (other_a, other_b) = ct4_candidates(x0, x1, secret, 0xffff);
                    same_a += u32::from(other_a == set_a);
                    same_b += u32::from(other_b == set_b);
                }
                assert!(
                    same_a <= 2 && same_b <= 2,
                    "byte {byte}: {same_a} / {same_b} of 255 keep a set"
                );
            }
        }
    }
}
