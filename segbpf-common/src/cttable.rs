//! The connection tables: tables of our own, not kernel hash maps, one
//! per IP family ([`Ct4`]: 16-byte [`CtKey4`] keys; [`Ct6`]: 48-byte
//! [`CtKey`] keys), each the same design with its own layout
//! ([`CtLayout`]).
//!
//! One table holds the half-open and the assured flows of its family in a
//! network namespace, in two arrays pinned with the other shared maps:
//! the sets (of [`CtLayout::WAYS`] keys each) and the [`crate::CtEntry`]
//! of each way (at `set * WAYS + way`). A packet of a tracked flow costs
//! one hash of its key ([`ct_candidates`]) and the read of one or two
//! sets, instead of the kernel LRU hash's lookup; a new flow is written
//! into a free way instead of taking a node from the LRU's free lists
//! (BENCHMARKS.md, issue 24).
//!
//! A set is `SET_WORDS` u64 words:
//! - a header of `HDR` words: the set's sequence (u16, bits 0..16 of word
//!   0: odd while a writer holds the set), the assured bits (u16, bits
//!   16..32: bit `w` for way `w`), then one u32 tick per way (way `w`'s
//!   at u32 index `1 + w` of the set, [`ct_tick`]);
//! - the keys, `KEY_WORDS` words each ([`ct_slot`]); a way whose word
//!   `TAG` of its key is 0 is free (that word holds the protocol, never 0).
//!
//! IPv4 ([`Ct4`]): 64-byte sets (one cache line) of 3 ways, 2 header
//! words, keys of 2 words (the tag: the second). IPv6 ([`Ct6`]): 256-byte
//! sets of 4 ways, 3 header words, keys of 6 words (the tag: the first,
//! the family and the protocol).
//!
//! A way's tick ([`crate::ct_seen_tick`]) is written when its flow is made
//! and refreshed by every lookup that finds it, so it is never older than
//! the entry's `last_seen_ns`.
//!
//! **Two candidate sets per key**, from a hash keyed by a secret of the
//! namespace (kept in the element after the last set, [`ct_secret`]; a
//! sender cannot choose which flows share a set). A new flow takes, among
//! the ways of its two sets: a free way (empty, or one whose tick is
//! older than every timeout allows: no flow there is live) in the set with
//! fewer assured ways, else the least recently seen half-open way. Never a
//! live assured way: when all are assured the new flow is not tracked
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
//! **Size**: [`CtLayout::sets_for`] sets for a `--ct-size` of `ct`: room
//! for the `ct` assured and [`crate::ct_new_entries`] half-open flows of
//! the kernel tables it replaces in at most two thirds of the ways,
//! rounded up to a power of two (the mask of the set index). At two thirds
//! full a new flow still finds a free way among its candidates in all but
//! a small fraction of cases; at the default (81,920 flows) the IPv4
//! table is 42% full at most (196,608 ways), the IPv6 table 62%
//! (131,072).

use bytemuck::Pod;

use crate::{CtKey, CtKey4};

/// Flags of every table's arrays: `BPF_F_MMAPABLE`, so userspace maps them
/// and takes a set's lock as the programs do.
pub const CT_TABLE_FLAGS: u32 = 1 << 10;

/// One family's table: its key, its set layout, its maps and globals.
pub trait CtLayout: 'static {
    /// The key (a multiple of 8 bytes, 8-byte aligned).
    type Key: Pod + Eq;
    /// The key as words.
    type Words: Pod + AsRef<[u64]> + AsMut<[u64]>;
    /// One set.
    type Set: Pod + AsRef<[u64]> + AsMut<[u64]>;
    /// The array of sets (and, one element more, the secret).
    const SETS_MAP: &'static str;
    /// The array of entries.
    const WAYS_MAP: &'static str;
    /// The global holding the secret of the set hash (frozen at load; the
    /// namespace's value, [`ct_secret`]).
    const KEY_GLOBAL: &'static str;
    /// The global holding the mask of the set index (sets − 1, frozen at
    /// load from the namespace's array).
    const MASK_GLOBAL: &'static str;
    /// Words of a key.
    const KEY_WORDS: usize;
    /// Ways of a set.
    const WAYS: u32;
    /// Words of a set.
    const SET_WORDS: usize;
    /// Words of the header: the sequence, the assured bits and the ticks.
    const HDR: usize = Self::WAYS as usize / 2 + 1;
    /// The word of a key that is never 0 (0 marks a free way).
    const TAG: usize;
    /// The two candidate sets of `key` ([`ct_candidates`] of its words).
    fn candidate_sets(key: &Self::Key, secret: u64, mask: u32) -> (u32, u32);

    /// The sets of the table for a `--ct-size` of `ct` (module docs): the
    /// `ct + ct_new_entries(ct)` flows of the two kernel tables it
    /// replaces in at most two thirds of the ways, as a power of two.
    fn sets_for(ct: u32) -> u32 {
        sets_for(ct, Self::WAYS)
    }
}

const fn sets_for(ct: u32, ways: u32) -> u32 {
    let flows = ct as u64 + crate::ct_new_entries(ct) as u64;
    // flows <= 2/3 of the ways.
    let need = (flows * 3).div_ceil(2 * ways as u64);
    let need = if need < 64 { 64 } else { need };
    let sets = need.next_power_of_two();
    if sets > 1 << 28 { 1 << 28 } else { sets as u32 }
}

/// The IPv4 table.
#[derive(Clone, Copy, Debug)]
pub struct Ct4;

/// The IPv6 table.
#[derive(Clone, Copy, Debug)]
pub struct Ct6;

/// The IPv4 table's array of sets.
pub const MAP_CT4_SETS: &str = "SEG_CT4_SETS";
/// The IPv4 table's array of entries.
pub const MAP_CT4_WAYS: &str = "SEG_CT4_WAYS";
/// The IPv6 table's array of sets.
pub const MAP_CT6_SETS: &str = "SEG_CT6_SETS";
/// The IPv6 table's array of entries.
pub const MAP_CT6_WAYS: &str = "SEG_CT6_WAYS";
/// The IPv4 table's secret ([`CtLayout::KEY_GLOBAL`]).
pub const GLOBAL_CT4_KEY: &str = "SEGBPF_CT4_KEY";
/// The IPv4 table's mask ([`CtLayout::MASK_GLOBAL`]).
pub const GLOBAL_CT4_MASK: &str = "SEGBPF_CT4_MASK";
/// The IPv6 table's secret ([`CtLayout::KEY_GLOBAL`]).
pub const GLOBAL_CT6_KEY: &str = "SEGBPF_CT6_KEY";
/// The IPv6 table's mask ([`CtLayout::MASK_GLOBAL`]).
pub const GLOBAL_CT6_MASK: &str = "SEGBPF_CT6_MASK";
/// One set of the IPv4 table: 64 bytes.
pub type Ct4Set = [u64; 8];
/// One set of the IPv6 table: 256 bytes.
pub type Ct6Set = [u64; 32];
/// Sets of the default IPv4 table.
pub const DEFAULT_CT4_SETS: u32 = sets_for(crate::DEFAULT_CT_ENTRIES, 3);
/// Sets of the default IPv6 table.
pub const DEFAULT_CT6_SETS: u32 = sets_for(crate::DEFAULT_CT_ENTRIES, 4);

impl CtLayout for Ct4 {
    type Key = CtKey4;
    type Words = [u64; 2];
    type Set = Ct4Set;
    const SETS_MAP: &'static str = MAP_CT4_SETS;
    const WAYS_MAP: &'static str = MAP_CT4_WAYS;
    const KEY_GLOBAL: &'static str = GLOBAL_CT4_KEY;
    const MASK_GLOBAL: &'static str = GLOBAL_CT4_MASK;
    const KEY_WORDS: usize = 2;
    const WAYS: u32 = 3;
    const SET_WORDS: usize = 8;
    const TAG: usize = 1;

    fn candidate_sets(key: &CtKey4, secret: u64, mask: u32) -> (u32, u32) {
        ct_candidates(&ct_words::<Self>(key), secret, mask)
    }
}

impl CtLayout for Ct6 {
    type Key = CtKey;
    type Words = [u64; 6];
    type Set = Ct6Set;
    const SETS_MAP: &'static str = MAP_CT6_SETS;
    const WAYS_MAP: &'static str = MAP_CT6_WAYS;
    const KEY_GLOBAL: &'static str = GLOBAL_CT6_KEY;
    const MASK_GLOBAL: &'static str = GLOBAL_CT6_MASK;
    const KEY_WORDS: usize = 6;
    const WAYS: u32 = 4;
    const SET_WORDS: usize = 32;
    const TAG: usize = 0;

    fn candidate_sets(key: &CtKey, secret: u64, mask: u32) -> (u32, u32) {
        ct_candidates(&ct_words::<Self>(key), secret, mask)
    }
}

// The layouts fit their sets, the keys their words.
const _: () = assert!(Ct4::HDR + Ct4::KEY_WORDS * Ct4::WAYS as usize <= Ct4::SET_WORDS);
const _: () = assert!(Ct6::HDR + Ct6::KEY_WORDS * Ct6::WAYS as usize <= Ct6::SET_WORDS);
const _: () = assert!(size_of::<CtKey4>() == 8 * Ct4::KEY_WORDS);
const _: () = assert!(size_of::<CtKey>() == 8 * Ct6::KEY_WORDS);
const _: () = assert!(size_of::<Ct4Set>() == 8 * Ct4::SET_WORDS);
const _: () = assert!(size_of::<Ct6Set>() == 8 * Ct6::SET_WORDS);
const _: () = assert!(DEFAULT_CT4_SETS == 65_536);
const _: () = assert!(DEFAULT_CT6_SETS == 32_768);

/// Elements of the sets' array for `sets` sets: the sets and the secret.
pub const fn ct_sets_entries(sets: u32) -> u32 {
    sets + 1
}

/// Elements of the entries' array of `L` for `sets` sets.
pub const fn ct_ways_entries<L: CtLayout>(sets: u32) -> u32 {
    sets * L::WAYS
}

/// The key as the words a set stores.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_words<L: CtLayout>(key: &L::Key) -> L::Words {
    bytemuck::cast(*key)
}

/// The key of its words ([`ct_words`] reversed).
pub fn ct_key<L: CtLayout>(words: L::Words) -> L::Key {
    bytemuck::cast(words)
}

/// Multipliers of the key's words in the set hash (odd 64-bit constants).
const MULT: [u64; 6] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x85EB_CA77_C2B2_AE63,
    0x27D4_EB2F_1656_67C5,
    0xFF51_AFD7_ED55_8CCD,
];
/// Rotations of the secret per word of the key.
const ROT: [u32; 6] = [0, 32, 16, 48, 8, 40];

/// The two candidate sets of the key of `words`, for the namespace's
/// `secret` and the table's `mask` (sets − 1). The same function in the
/// datapath and in userspace.
///
/// Two words (an IPv4 key): each word keyed and multiplied, the products
/// combined, then a full 64-bit finalizer (MurmurHash3's fmix64), so
/// every bit of the key reaches every bit of both set indices (a sender
/// cannot fill one set by varying bits the index ignores). The IPv4
/// table's first build hashed so; a pinned table keeps its flows where it
/// put them.
///
/// More words (an IPv6 key): the words are mixed in one after the other
/// (keyed, multiplied, the high half folded down) before the finalizer.
/// Combined products would let a sender cancel changes: a change in a
/// word's top bits changes only its product's top bits, so two such
/// changes in two words (a port's high byte and an address's last byte)
/// could leave the sum as it was. Mixed in turn, each word's change has
/// reached every bit before the next word comes.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_candidates<const N: usize>(words: &[u64; N], secret: u64, mask: u32) -> (u32, u32) {
    let mut h = 0u64;
    let mut i = 0;
    if N == 2 {
        while i < N {
            h ^= (words[i] ^ secret.rotate_left(ROT[i])).wrapping_mul(MULT[i]);
            i += 1;
        }
    } else {
        h = secret;
        while i < N && i < MULT.len() {
            h = (h ^ words[i] ^ secret.rotate_left(ROT[i])).wrapping_mul(MULT[i]);
            h ^= h >> 29;
            i += 1;
        }
    }
    let h = (h ^ (h >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    let h = (h ^ (h >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    let h = h ^ (h >> 33);
    ((h >> 32) as u32 & mask, h as u32 & mask)
}

/// The index in a set of `L`'s way `w`'s first key word.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub const fn ct_slot<L: CtLayout>(w: u32) -> usize {
    L::HDR + L::KEY_WORDS * (w % L::WAYS) as usize
}

/// Way `w`'s tick in the set `s` (module docs): u32 index `1 + w`.
pub fn ct_tick(s: &[u64], w: u32) -> u32 {
    let i = 1 + w as usize;
    let word = s.get(i / 2).copied().unwrap_or(0);
    if i.is_multiple_of(2) {
        word as u32
    } else {
        (word >> 32) as u32
    }
}

/// Whether way `w` of the set `s` holds an assured flow.
pub fn ct_assured(s: &[u64], w: u32) -> bool {
    (s.first().copied().unwrap_or(0) >> (16 + w)) & 1 != 0
}

/// The namespace's secret, as the element after the last set holds it
/// (its first word).
pub fn ct_secret(extra: &[u64]) -> u64 {
    extra.first().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn check_sizing<L: CtLayout>() {
        for ct in [1024u32, 1025, 50_000, 65_536, 100_000, 1 << 26] {
            let sets = L::sets_for(ct);
            let ways = u64::from(sets) * u64::from(L::WAYS);
            assert!(sets.is_power_of_two(), "{ct}: {sets}");
            let flows = u64::from(ct) + u64::from(crate::ct_new_entries(ct));
            assert!(flows * 3 <= ways * 2, "{ct}: {sets}");
            assert!(ways / 2 * 2 < flows * 3, "{ct}: {sets} is not the least");
        }
    }

    #[test]
    fn the_default_tables_have_room_for_both_kernel_tables() {
        assert_eq!(Ct4::sets_for(crate::DEFAULT_CT_ENTRIES), DEFAULT_CT4_SETS);
        assert_eq!(Ct6::sets_for(crate::DEFAULT_CT_ENTRIES), DEFAULT_CT6_SETS);
        check_sizing::<Ct4>();
        check_sizing::<Ct6>();
    }

    fn key4() -> CtKey4 {
        CtKey4 {
            local_be: 0x1401_0a0a,
            remote_be: 0x0100_12c6,
            local_port: 80,
            remote_port: 40_000,
            proto_ifindex: 3 << 8 | 6,
        }
    }

    fn key6() -> CtKey {
        CtKey {
            family: 6,
            proto: 6,
            local_port: 80,
            remote_port: 40_000,
            ifindex: 3,
            local: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            remote: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            ..CtKey::default()
        }
    }

    #[test]
    fn keys_and_words_round_trip_and_a_key_never_looks_free() {
        let k = key4();
        let w = ct_words::<Ct4>(&k);
        assert_eq!(ct_key::<Ct4>(w), k);
        assert_ne!(w[Ct4::TAG], 0, "the tag word holds the protocol");
        let (a, b) = ct_candidates(&w, 42, 1023);
        assert!(a < 1024 && b < 1024);
        assert_ne!(
            ct_candidates(&w, 43, 1023),
            (a, b),
            "the secret moves the sets"
        );
        let k = key6();
        let w = ct_words::<Ct6>(&k);
        assert_eq!(ct_key::<Ct6>(w), k);
        assert_ne!(w[Ct6::TAG], 0, "the tag word holds the family");
    }

    #[test]
    fn the_ipv4_hash_is_the_one_pinned_tables_were_filled_with() {
        // The hash of the first build of the IPv4 table: a namespace's
        // pinned table keeps its flows where that build put them.
        let [k0, k1] = ct_words::<Ct4>(&key4());
        let secret = 0x1234_5678_9abc_def1u64;
        let h = (k0 ^ secret).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (k1 ^ secret.rotate_left(32)).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let h = (h ^ (h >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        let h = (h ^ (h >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        let h = h ^ (h >> 33);
        assert_eq!(
            ct_candidates(&[k0, k1], secret, 0xffff),
            ((h >> 32) as u32 & 0xffff, h as u32 & 0xffff)
        );
    }

    #[test]
    fn header_fields_read_back() {
        let mut s: Ct4Set = [0; 8];
        s[0] = 4 | (0b101 << 16) | (7u64 << 32);
        s[1] = 8 | (9u64 << 32);
        assert_eq!([ct_tick(&s, 0), ct_tick(&s, 1), ct_tick(&s, 2)], [7, 8, 9]);
        assert!(ct_assured(&s, 0) && !ct_assured(&s, 1) && ct_assured(&s, 2));
        let mut s: Ct6Set = [0; 32];
        s[2] = 10;
        assert_eq!(ct_tick(&s, 3), 10);
        assert_eq!(ct_slot::<Ct6>(0), 3);
        assert_eq!(ct_slot::<Ct6>(3), 21);
    }

    fn every_byte_moves_both_sets<const N: usize>(words: [u64; N]) {
        // For each byte of the key, and a few secrets, changing the byte
        // changes each set index for most values (an index that ignores a
        // byte would let a sender fill a set by varying it).
        for secret in [1u64, 0x1234_5678_9abc_def1, u64::MAX] {
            let (set_a, set_b) = ct_candidates(&words, secret, 0xffff);
            for byte in 0..8 * N {
                let (mut same_a, mut same_b) = (0, 0);
                for v in 1..=255u64 {
                    let mut x = words;
                    x[byte / 8] ^= v << (8 * (byte % 8));
                    let (other_a, other_b) = ct_candidates(&x, secret, 0xffff);
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

    #[test]
    fn changes_in_two_fields_do_not_cancel() {
        // The remote's last byte (top byte of the last word) and the
        // remote port's high byte (top byte of the first word), varied
        // together: 65,536 keys. Combined products would put them in 256
        // pairs of sets whatever the secret; mixed in turn they spread.
        for secret in [1u64, 0x1234_5678_9abc_def1, u64::MAX] {
            let mut pairs = std::collections::BTreeSet::new();
            for last in 0..=255u8 {
                for port_hi in 0..=255u16 {
                    let mut k = key6();
                    k.remote[15] = last;
                    k.remote_port = port_hi << 8 | 0x34;
                    pairs.insert(ct_candidates(&ct_words::<Ct6>(&k), secret, 0xffff));
                }
            }
            assert!(pairs.len() > 60_000, "{} pairs of 65,536", pairs.len());
        }
    }

    #[test]
    fn every_key_byte_moves_both_sets() {
        every_byte_moves_both_sets(ct_words::<Ct4>(&key4()));
        every_byte_moves_both_sets(ct_words::<Ct6>(&key6()));
    }
}
