//! The last-seen array: when a tracked flow of a remote address was last
//! created or refreshed, so that a packet of a remote with no recent flow
//! skips both connection-table lookups (two 48-byte-key misses) and goes
//! straight to the policy.
//!
//! One tick per bucket ([`CT_SEEN_BUCKETS`], an `ARRAY` pinned with the
//! connection tables and shared like them by every attachment of a
//! network namespace). Bucket [`ct_seen_bucket`]`(family, remote)` holds
//! the tick ([`ct_seen_tick`], about a second) of the latest
//! `last_seen_ns` any entry of that remote was given: the datapath writes
//! it whenever it makes an entry (before the insert) and whenever it
//! refreshes one, reading first and writing only an older value (at most
//! once a tick per bucket). So for every entry of the remote,
//! `bucket >= tick(entry.last_seen_ns) - 1` (two CPUs racing a write can
//! leave the older of two ticks read a moment apart). A packet whose
//! bucket is [`ct_seen_stale`] (older than the longest timeout of the
//! configuration in force plus the slack) cannot have a live entry, and
//! skips the lookups. Several remotes share a bucket by hash: a shared
//! bucket is only newer, so it costs the lookups, never a verdict. A
//! flood of new sources never writes it (only packets that get an entry
//! do).
//!
//! A remote with a live flow would still pay both lookups for every
//! other packet it sends (a known client probing a closed port, a flood
//! from a source the host also talks to). A second array of the same
//! kind, [`MAP_CT_SEEN_F`], is indexed by a hash of the flow rather than
//! the remote ([`ct_seen_flow_bucket`]: family, protocol, both ports and
//! the remote address) and written with the first: a packet whose remote
//! bucket is fresh but whose flow bucket is stale cannot have a live
//! entry either, and skips the lookups. Both buckets are always written
//! together, so each alone covers every entry: the rule above holds for
//! either array. The datapath carries both in one u32 ([`ct_seen_pack`]).
//!
//! **The remote's bucket also holds the local ports of its flows.** A
//! remote with a live flow keeps its bucket fresh, so its packets to any
//! other port (a client probing a closed port, a flood from a source the
//! host also talks to) would still read the flow's bucket and, when that is
//! fresh, pay both lookups: cache-cold, that costs what the rest of the
//! drop costs. Each bucket of [`MAP_CT_SEEN`] is a [`CtRemote`]: the tick,
//! and a 32-bit filter with one bit per entry's local port and protocol
//! ([`ct_port_bit`]). The datapath sets an entry's bit whenever it writes
//! the tick, before the insert, with an atomic OR (read first: a bit
//! already set is never written again); no bit is ever cleared while the
//! array lives. So every entry of the remote has its bit set, and a packet
//! whose bit is clear cannot have a live entry: it skips the lookups at
//! the cost of the one bucket read. Bits of shared buckets and of flows
//! long gone only cost lookups. The value padding the kernel gives a u32
//! array anyway (its values take 8 bytes) held the filter at no cost in
//! memory; the fingerprints below make the bucket 16 bytes. Seeding gives the bucket every bit ([`CT_PORTS_ALL`]) by an
//! atomic OR and raises its tick (below): a bit a running program sets
//! at the same moment is set either way, so nothing is lost; a seeded
//! bucket skips only on its tick.
//!
//! **The remote's bucket also holds fingerprints of its remotes.** A
//! bucket is shared by every remote address that hashes into it: on a
//! host with many peers most buckets are fresh, with the busy ports' bits
//! set, and a flood of new sources to such a port would pay the flow's
//! bucket and both lookups. Each bucket therefore also holds two 32-bit
//! fingerprints ([`ct_seen_remote_words`]: a second part of the same hash)
//! of the remotes whose entries wrote it, or [`CT_FP_OVER`] in the second
//! slot once a third remote came (every remote then looks up). A slot
//! goes from 0 to a fingerprint by an atomic compare-and-exchange of the
//! pair, and the second slot to [`CT_FP_OVER`] by an atomic OR of all
//! ones, which no other write can undo. Userspace's seeding makes a
//! bucket over by the same atomic OR, on the array mapped into its memory
//! ([`CT_SEEN_MAP_FLAGS`]): a plain write of the whole value (the map
//! update call, a byte copy) could show a slot half written to a
//! program on another interface. So every entry's remote has its
//! fingerprint in its bucket, or the bucket is over: a packet whose
//! fingerprint is in neither slot of a bucket that is not over cannot have
//! a live entry and skips the lookups. Slots are never cleared, like the
//! port bits: a bucket that saw three remotes is over for the array's
//! life, and costs the lookups as before. (With the hash unseeded, a
//! sender who can open flows, say 196,608 allowed openers, or IPv6
//! addresses chosen in its own prefix, can make every bucket over: that
//! costs the lookups of earlier builds, never a verdict, since nothing
//! clears a slot.)
//!
//! The arrays know only the entries made by programs that write them. An
//! instance may skip lookups only when its frozen global
//! [`GLOBAL_CT_SEEN`] is 1: set by userspace at load when every entry
//! the instance can find is in the array (a fresh instance with tables of
//! its own; an attachment, after userspace wrote the buckets of every
//! entry already in the namespace's tables, before its programs are
//! attached). Entries carry the interface, and only the program on an
//! interface makes entries of it, so an older build attached to another
//! interface (which makes entries without writing the array) never makes
//! an entry this instance looks up. Dry-run instances (`segbpf trace`)
//! load with 0: they share an attachment that may be of an older build.

use crate::Config;

/// Array of [`CT_SEEN_BUCKETS`] [`CtRemote`]: the last-seen tick, the
/// local-port filter and the remotes' fingerprints of each bucket of
/// remote addresses. Shared per network namespace (see
/// [`crate::SHARED_MAPS`]). (Earlier builds had `SEG_CT_SEEN`, of u32
/// ticks, then `SEG_CT_SEEN_R`, without fingerprints: a namespace's pin of
/// either name is unused by this build and goes with the namespace's
/// tables.)
pub const MAP_CT_SEEN: &str = "SEG_CT_SEEN_X";

/// A bucket of [`MAP_CT_SEEN`]: the latest tick any entry of its remotes
/// was given, the bits ([`ct_port_bit`]) of those entries' local ports,
/// and the fingerprints of those remotes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtRemote {
    /// [`ct_seen_tick`] of the latest entry made or refreshed.
    pub tick: u32,
    /// One bit per local port and protocol of the remotes' entries, set
    /// atomically and never cleared; [`CT_PORTS_ALL`] when seeded.
    pub ports: u32,
    /// Fingerprints ([`ct_seen_remote_words`]) of the remotes' entries: 0
    /// free, set by an atomic compare-and-exchange of the pair and never
    /// cleared; the second [`CT_FP_OVER`] once a third remote came (set by
    /// an atomic OR) or when seeded.
    pub fp: [u32; 2],
}
const _: () = assert!(size_of::<CtRemote>() == 16);

/// Flags of [`MAP_CT_SEEN`]: `BPF_F_MMAPABLE`, so userspace's seeding
/// changes buckets by atomic operations on the mapped array, as the
/// programs do (never a plain store that could briefly clear a slot).
pub const CT_SEEN_MAP_FLAGS: u32 = 1 << 10;

/// The second fingerprint slot of a bucket whose remotes did not fit:
/// every packet of the bucket looks up. No fingerprint takes this value.
pub const CT_FP_OVER: u32 = u32::MAX;

/// Two adjacent u32 fields of a bucket (`lo` at the lower address: the
/// tick and the filter, or the two fingerprint slots) as one native-order
/// u64, the unit of the bucket's atomic operations.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_u32_pair(lo: u32, hi: u32) -> u64 {
    if cfg!(target_endian = "little") {
        u64::from(lo) | u64::from(hi) << 32
    } else {
        u64::from(lo) << 32 | u64::from(hi)
    }
}

/// The two u32 fields (`lo` at the lower address, then `hi`) of a pair
/// read as one native-order u64: the inverse of [`ct_u32_pair`].
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_u32_halves(pair: u64) -> (u32, u32) {
    if cfg!(target_endian = "little") {
        (pair as u32, (pair >> 32) as u32)
    } else {
        ((pair >> 32) as u32, pair as u32)
    }
}

impl CtRemote {
    /// Whether a remote of fingerprint `fp` may have an entry in this
    /// bucket: its fingerprint is in a slot, or the bucket is over.
    #[allow(
        clippy::inline_always,
        reason = "the datapath calls it per packet: no BPF-to-BPF call"
    )]
    #[inline(always)]
    pub fn may_hold(&self, fp: u32) -> bool {
        self.fp[0] == fp || self.fp[1] == fp || self.fp[1] == CT_FP_OVER
    }
}
#[cfg(feature = "user")]
// SAFETY: `CtRemote` is `#[repr(C)]` plain old data without padding.
unsafe impl aya::Pod for CtRemote {}

/// The filter of a seeded bucket: every bit, so only the tick can skip.
pub const CT_PORTS_ALL: u32 = u32::MAX;

/// The filter bit of an entry's (or a packet's key's) local port and
/// protocol: one of 32, by a multiplicative hash.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_port_bit(proto: u8, local_port: u16) -> u32 {
    let k = u32::from(local_port) | u32::from(proto) << 16;
    1 << (k.wrapping_mul(0x9E37_79B1) >> 27)
}
/// Array of [`CT_SEEN_BUCKETS`] u32: the last-seen tick of each bucket of
/// flows ([`ct_seen_flow_bucket`]). Shared like [`MAP_CT_SEEN`].
pub const MAP_CT_SEEN_F: &str = "SEG_CT_SEEN_F";
/// Name of the frozen global that lets an instance skip lookups on a
/// stale bucket (1), or not (0, the default: always look up).
pub const GLOBAL_CT_SEEN: &str = "SEGBPF_CT_SEEN";
/// log2 of the number of buckets.
pub const CT_SEEN_BITS_LOG2: u32 = 16;
/// Buckets in [`MAP_CT_SEEN`] (1 MiB) and [`MAP_CT_SEEN_F`] (512 KiB:
/// the kernel pads each u32 value to 8 bytes).
pub const CT_SEEN_BUCKETS: u32 = 1 << CT_SEEN_BITS_LOG2;
/// A tick is 2^30 ns (1.07 s): a shift, not a division, in the datapath.
pub const CT_SEEN_TICK_SHIFT: u32 = 30;
/// Ticks added to the longest timeout before a bucket is stale: one for
/// the rounding down of both ticks, one for a racing write of an older
/// tick, one to spare.
pub const CT_SEEN_SLACK_TICKS: u64 = 3;

/// The tick of a `bpf_ktime_get_coarse_ns` time (the connection tables'
/// clock).
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_tick(ns: u64) -> u32 {
    (ns >> CT_SEEN_TICK_SHIFT) as u32
}

/// The bucket of a remote address (`family` 4 or 6; `remote` as in
/// `CtKey`: network order, an IPv4 address in the first four bytes and
/// the rest zero), in `0..CT_SEEN_BUCKETS`.
pub fn ct_seen_bucket(family: u8, remote: &[u8; 16]) -> u32 {
    ct_seen_remote(family, remote).0
}

/// [`ct_seen_bucket`] of the address read as two native-order u64 words
/// (the datapath loads them from the 8-byte aligned `CtKey`). A
/// multiplicative hash, unseeded: a sender who picks addresses sharing a
/// live remote's bucket only gets its packets looked up, as every packet
/// was before this array.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_bucket_words(family: u8, words: [u64; 2]) -> u32 {
    ct_seen_remote_words(family, words).0
}

/// The bucket ([`ct_seen_bucket_words`]) and the fingerprint of a remote
/// address: the hash's top bits and its low 31 bits with the lowest set,
/// so a fingerprint is never 0 (a free slot) nor [`CT_FP_OVER`]. Remotes
/// of one bucket share a fingerprint with a chance of about 2^-30: such a
/// remote only costs lookups.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_remote_words(family: u8, words: [u64; 2]) -> (u32, u32) {
    let k = words[0] ^ words[1].rotate_left(17) ^ u64::from(family);
    let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (
        (h >> (64 - CT_SEEN_BITS_LOG2)) as u32,
        (h as u32 & 0x7fff_ffff) | 1,
    )
}

/// [`ct_seen_remote_words`] of a remote address as in `CtKey`.
pub fn ct_seen_remote(family: u8, remote: &[u8; 16]) -> (u32, u32) {
    let mut w = [[0u8; 8]; 2];
    w[0].copy_from_slice(&remote[..8]);
    w[1].copy_from_slice(&remote[8..]);
    ct_seen_remote_words(family, [u64::from_ne_bytes(w[0]), u64::from_ne_bytes(w[1])])
}

/// [`ct_seen_bucket`]`(4, remote)` of an IPv4 remote as held by
/// [`crate::CtKey4::remote_be`] (its bytes in network order): an IPv4
/// flow's bucket is the same whichever key form it is read in.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_bucket_v4(remote_be: u32) -> u32 {
    ct_seen_remote_v4(remote_be).0
}

/// [`ct_seen_remote_words`] of an IPv4 remote as held by
/// [`crate::CtKey4::remote_be`], as [`ct_seen_bucket_v4`].
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_remote_v4(remote_be: u32) -> (u32, u32) {
    // The first word of the 16-byte form: the address's 4 bytes, then
    // zeros; the second word is zero.
    let w0 = if cfg!(target_endian = "little") {
        u64::from(remote_be)
    } else {
        u64::from(remote_be) << 32
    };
    ct_seen_remote_words(4, [w0, 0])
}

// The datapath reads `CtKey::remote` as two aligned u64 words.
const _: () = assert!(core::mem::offset_of!(crate::CtKey, remote) == 32);
// ... and the family, protocol and ports as the key's first u64 word.
const _: () = assert!(core::mem::offset_of!(crate::CtKey, remote_port) == 6);

/// The flow bucket of `key` (for [`MAP_CT_SEEN_F`]): a hash of the key's
/// family, protocol, ports and remote address, in `0..CT_SEEN_BUCKETS`.
pub fn ct_seen_flow_bucket(key: &crate::CtKey) -> u32 {
    let w: [u64; 6] = bytemuck::cast(*key);
    ct_seen_flow_bucket_words(w[0], [w[4], w[5]])
}

/// [`ct_seen_flow_bucket`] of the key's first u64 word (family, protocol,
/// padding, local and remote port: native order, the padding zero) and its
/// remote address as two native-order words.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_flow_bucket_words(head: u64, remote: [u64; 2]) -> u32 {
    let h = head.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ remote[0].wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ remote[1].wrapping_mul(0x1656_67B1_9E37_79F9);
    let h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (h >> (64 - CT_SEEN_BITS_LOG2)) as u32
}

/// [`ct_seen_flow_bucket`] of an IPv4 key in its 16-byte form: the same
/// bucket as for the key widened to `CtKey` (userspace seeds from that).
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_flow_bucket_v4(key: &crate::CtKey4) -> u32 {
    // `CtKey`'s first word: family 4, protocol, two zero bytes, local and
    // remote port (native order); its remote as for `ct_seen_bucket_v4`.
    let (head, w0) = if cfg!(target_endian = "little") {
        (
            4 | u64::from(key.proto()) << 8
                | u64::from(key.local_port) << 32
                | u64::from(key.remote_port) << 48,
            u64::from(key.remote_be),
        )
    } else {
        (
            4 << 56
                | u64::from(key.proto()) << 48
                | u64::from(key.local_port) << 16
                | u64::from(key.remote_port),
            u64::from(key.remote_be) << 32,
        )
    };
    ct_seen_flow_bucket_words(head, [w0, 0])
}

/// The two buckets of a key in one u32 (the remote's in the high half,
/// the flow's in the low half: [`CT_SEEN_BITS_LOG2`] is 16), as the
/// datapath carries them from the lookup to the update.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_pack(remote: u32, flow: u32) -> u32 {
    (remote << 16) | (flow & 0xffff)
}
const _: () = assert!(CT_SEEN_BITS_LOG2 == 16);

/// The longest connection-tracking timeout of `cfg`, seconds: no entry
/// lives longer since its `last_seen_ns`.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_max_timeout_s(cfg: &Config) -> u32 {
    cfg.ct_tcp_syn_s
        .max(cfg.ct_tcp_est_s)
        .max(cfg.ct_tcp_close_s)
        .max(cfg.ct_udp_s)
        .max(cfg.ct_udp_est_s)
        .max(cfg.ct_icmp_s)
}

/// Whether a bucket last written at tick `seen` proves that no entry of
/// its remotes is live at `now_ns` under `cfg` (module docs: every
/// entry's `last_seen_ns` is at most a tick after `seen`; a tick is
/// longer than a second, so `max_timeout + slack` ticks exceed the
/// longest timeout past the latest possible `last_seen_ns`): the tick of
/// `now_ns` is beyond `seen` by more than the longest timeout plus
/// [`CT_SEEN_SLACK_TICKS`], that is `seen` is below [`ct_seen_horizon`].
pub fn ct_seen_stale(cfg: &Config, seen: u32, now_ns: u64) -> bool {
    u64::from(seen) < ct_seen_horizon(cfg, now_ns)
}

/// The oldest tick a bucket may hold at `now_ns` under `cfg` and still
/// cover a live entry: a bucket holding less is [`ct_seen_stale`]. The
/// datapath computes it once per packet and compares each bucket with it
/// (unit test against the rule as stated above).
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn ct_seen_horizon(cfg: &Config, now_ns: u64) -> u64 {
    u64::from(ct_seen_tick(now_ns))
        .saturating_sub(u64::from(ct_max_timeout_s(cfg)) + CT_SEEN_SLACK_TICKS)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn v4(a: u32) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&a.to_be_bytes());
        r
    }

    #[test]
    fn the_horizon_says_what_stale_says() {
        let mut cfg = Config::default();
        for max in [0u32, 1, 5, 30, 120, 432_000, u32::MAX] {
            cfg.ct_tcp_est_s = max;
            for now_tick in [
                0u64,
                1,
                2,
                3,
                4,
                100,
                432_003,
                432_004,
                1 << 31,
                u64::from(u32::MAX),
            ] {
                let now = (now_tick << CT_SEEN_TICK_SHIFT) + 12_345;
                let h = ct_seen_horizon(&cfg, now);
                for seen in [
                    0u32,
                    1,
                    2,
                    96,
                    97,
                    98,
                    431_999,
                    432_000,
                    432_001,
                    u32::MAX - 1,
                    u32::MAX,
                ] {
                    // The rule as the module states it: the tick now is
                    // beyond the bucket's by more than the longest timeout
                    // and the slack.
                    let stated = u64::from(ct_seen_tick(now))
                        > u64::from(seen) + u64::from(max) + CT_SEEN_SLACK_TICKS;
                    assert_eq!(
                        u64::from(seen) < h,
                        stated,
                        "max {max} now tick {now_tick} seen {seen}"
                    );
                }
            }
        }
    }

    #[test]
    fn buckets_are_in_range_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for a in 0..65_536u32 {
            let b = ct_seen_bucket(4, &v4(0xC612_0000 | a));
            assert!(b < CT_SEEN_BUCKETS);
            seen.insert(b);
        }
        // 65,536 consecutive addresses in 65,536 buckets: about 41,400
        // distinct by chance.
        assert!(seen.len() > 40_000, "{}", seen.len());
        let mut six = std::collections::HashSet::new();
        for a in 0..4096u32 {
            let mut r = [0u8; 16];
            r[0] = 0xfd;
            r[12..].copy_from_slice(&a.to_be_bytes());
            six.insert(ct_seen_bucket(6, &r));
        }
        assert!(six.len() > 3_900, "{}", six.len());
        assert_ne!(
            ct_seen_bucket(4, &v4(1)),
            ct_seen_bucket(6, &v4(1)),
            "the family is part of the hash"
        );
    }

    #[test]
    fn flow_buckets_are_in_range_spread_and_see_every_field() {
        let key = |lport: u16, rport: u16, proto: u8, a: u32| crate::CtKey {
            family: 4,
            proto,
            local_port: lport,
            remote_port: rport,
            remote: v4(a),
            ..crate::CtKey::default()
        };
        let mut seen = std::collections::HashSet::new();
        for p in 0..65_536u32 {
            let b = ct_seen_flow_bucket(&key(80, p as u16, 6, 0xC612_0007));
            assert!(b < CT_SEEN_BUCKETS);
            seen.insert(b);
        }
        // One remote's 65,536 source ports: about 41,400 distinct buckets.
        assert!(seen.len() > 40_000, "{}", seen.len());
        let base = ct_seen_flow_bucket(&key(80, 40_000, 6, 0xC612_0007));
        for other in [
            key(81, 40_000, 6, 0xC612_0007),
            key(80, 40_001, 6, 0xC612_0007),
            key(80, 40_000, 17, 0xC612_0007),
            key(80, 40_000, 6, 0xC612_0008),
        ] {
            assert_ne!(ct_seen_flow_bucket(&other), base, "{other:?}");
        }
        // The local address and the interface are not in the hash (a
        // shared bucket is only newer: it costs lookups, never a verdict).
        let mut k = key(80, 40_000, 6, 0xC612_0007);
        k.local = v4(1);
        k.ifindex = 9;
        assert_eq!(ct_seen_flow_bucket(&k), base);
        assert_eq!(ct_seen_pack(0xabcd, 0x1234), 0xabcd_1234);
    }

    /// Brute force over timeouts, write times and clock times: whenever an
    /// entry refreshed at `last` (its bucket written at that time's tick,
    /// or one tick earlier by a racing write) is live at `now` under the
    /// timeout `ttl`, the bucket is not stale.
    #[test]
    fn a_stale_bucket_never_hides_a_live_entry() {
        const S: u64 = 1_000_000_000;
        let tick = 1u64 << CT_SEEN_TICK_SHIFT;
        for ttl in [0u32, 1, 2, 3, 30, 120, 21_600] {
            let cfg = Config {
                ct_tcp_est_s: ttl,
                ..Config::default()
            };
            for base in [0u64, 5 * S, 1_000_000 * S + 123_456_789] {
                for step in 0..400u64 {
                    let last = base + step * (tick / 7);
                    for race in [0u32, 1] {
                        let seen = ct_seen_tick(last).saturating_sub(race);
                        // Quarter seconds: the first few, and around the
                        // timeout, where a stale verdict could go wrong.
                        let near = u64::from(ttl).saturating_sub(8) * 4;
                        let ds = (0..40).chain(near..near + 80);
                        for d in ds {
                            let now = last + d * S / 4 + step % 3;
                            let live = now - last <= u64::from(ttl) * S;
                            assert!(
                                !(live && ct_seen_stale(&cfg, seen, now)),
                                "ttl {ttl} last {last} now {now} seen {seen}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_ipv4_flow_has_one_flow_bucket_in_both_key_forms() {
        for (a, lp, rp, proto) in [
            (0u32, 0u16, 0u16, 6u8),
            (0xC612_0001, 80, 40_000, 6),
            (0xFFFF_FFFF, 65_535, 65_535, 17),
            (0x0A00_0002, 53, 1, 1),
        ] {
            let wide = crate::CtKey {
                family: 4,
                proto,
                local_port: lp,
                remote_port: rp,
                ifindex: 7,
                local: v4(0xC613_0001),
                remote: v4(a),
                ..crate::CtKey::default()
            };
            let narrow = wide.narrow().expect("an IPv4 key narrows");
            assert_eq!(
                ct_seen_flow_bucket_v4(&narrow),
                ct_seen_flow_bucket(&wide),
                "{wide:?}"
            );
        }
    }

    #[test]
    fn a_port_bit_is_one_bit_and_the_ports_spread_over_all_32() {
        let mut seen = 0u32;
        for port in 0..=u16::MAX {
            for proto in [1u8, 6, 17, 58] {
                let b = ct_port_bit(proto, port);
                assert_eq!(b.count_ones(), 1, "{proto} {port}");
                seen |= b;
            }
        }
        assert_eq!(seen, u32::MAX);
        // The common service ports do not all share one bit, and the
        // protocol is part of the hash.
        let service: u32 = [22u16, 53, 80, 443, 5432, 8080]
            .iter()
            .fold(0, |a, p| a | ct_port_bit(6, *p));
        assert!(service.count_ones() >= 4, "{service:#x}");
        assert!((0..64u16).any(|p| ct_port_bit(6, p) != ct_port_bit(17, p)));
        // 1,000 consecutive ports: each bit taken about 1000/32 times.
        let mut n = [0u32; 32];
        for p in 30_000..31_000u16 {
            n[ct_port_bit(17, p).trailing_zeros() as usize] += 1;
        }
        assert!(n.iter().all(|c| (10..=60).contains(c)), "{n:?}");
    }

    #[test]
    fn an_ipv4_remote_has_one_bucket_in_both_key_forms() {
        for a in [0u32, 1, 0xC612_0001, 0xFFFF_FFFF, 0x0A00_0002] {
            let r = v4(a);
            let be = u32::from_ne_bytes([r[0], r[1], r[2], r[3]]);
            assert_eq!(ct_seen_bucket_v4(be), ct_seen_bucket(4, &r), "{a:#x}");
        }
    }

    #[test]
    fn halves_undo_a_pair_and_match_the_fields_in_memory() {
        for (lo, hi) in [(0, 0), (1, 0), (0, CT_FP_OVER), (0xdead_beef, 7)] {
            let pair = ct_u32_pair(lo, hi);
            assert_eq!(ct_u32_halves(pair), (lo, hi));
            let fields: [u32; 2] = bytemuck::cast(pair);
            assert_eq!(fields, [lo, hi], "lo at the lower address");
        }
    }

    #[test]
    fn a_fingerprint_is_never_free_nor_over_and_tells_a_bucket_s_remotes_apart() {
        let mut by_bucket: std::collections::HashMap<u32, std::vec::Vec<u32>> =
            std::collections::HashMap::new();
        for a in (0..200_000u32).map(|i| 0xC612_0000u32.wrapping_add(i * 7)) {
            let r = v4(a);
            let be = u32::from_ne_bytes([r[0], r[1], r[2], r[3]]);
            let (bucket, fp) = ct_seen_remote(4, &r);
            assert_eq!(
                ct_seen_remote_v4(be),
                (bucket, fp),
                "{a:#x}: both key forms"
            );
            assert_eq!(bucket, ct_seen_bucket(4, &r));
            assert!(fp != 0 && fp != CT_FP_OVER, "{a:#x}: {fp:#x}");
            by_bucket.entry(bucket).or_default().push(fp);
        }
        // Remotes of one bucket have distinct fingerprints.
        let shared = by_bucket
            .values()
            .filter(|fps| {
                let mut f = (*fps).clone();
                f.sort_unstable();
                f.dedup();
                f.len() < fps.len()
            })
            .count();
        assert_eq!(shared, 0, "buckets with two remotes of one fingerprint");
        // `may_hold`: a slot's fingerprint, or anything once over.
        let b = CtRemote {
            fp: [5, 7],
            ..CtRemote::default()
        };
        assert!(b.may_hold(5) && b.may_hold(7) && !b.may_hold(9));
        let over = CtRemote {
            fp: [5, CT_FP_OVER],
            ..CtRemote::default()
        };
        assert!(over.may_hold(9));
        assert!(
            !CtRemote::default().may_hold(9),
            "an empty bucket holds none"
        );
    }

    #[test]
    fn a_bucket_goes_stale_after_the_longest_timeout() {
        let cfg = Config {
            ct_tcp_est_s: 10,
            ct_udp_s: 30,
            ..Config::default()
        };
        assert_eq!(ct_max_timeout_s(&cfg), 30);
        let t = |s: u64| s << CT_SEEN_TICK_SHIFT;
        assert!(!ct_seen_stale(&cfg, 100, t(100 + 33)));
        assert!(ct_seen_stale(&cfg, 100, t(100 + 34)));
        assert!(
            ct_seen_stale(&cfg, 0, t(1_000)),
            "a never-written bucket, long after boot"
        );
        assert!(!ct_seen_stale(&cfg, 0, t(20)), "shortly after boot");
    }
}
