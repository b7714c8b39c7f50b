//! The last-seen arrays (`SEG_CT_SEEN_X` by remote, `SEG_CT_SEEN_F` by
//! flow; see `segbpf_common::ctseen`): a packet whose remote's bucket is
//! stale, lacks its local port's bit or its remote's fingerprint, or
//! whose flow's bucket is stale, skips both connection-table lookups,
//! since no entry of it can be live; every entry made or refreshed writes
//! both of its buckets, its port's bit and its remote's fingerprint.
//! Shared by every attachment of the namespace, like the connection
//! tables.

use aya_ebpf::maps::Array;
use segbpf_common::{
    CT_FP_OVER, Config, CtKey, CtKey4, CtRemote, ct_seen_flow_bucket_v4, ct_seen_flow_bucket_words,
    ct_seen_horizon, ct_seen_pack, ct_seen_remote_v4, ct_seen_remote_words, ct_seen_tick,
    ct_u32_halves, ct_u32_pair,
};

use crate::maps::{SEG_CT_SEEN_F, SEG_CT_SEEN_X, SEGBPF_CT_SEEN};

/// An IPv6 key's remote bucket and fingerprint.
#[inline(always)]
pub(crate) fn remote(key: &CtKey) -> (u32, u32) {
    ct_seen_remote_words(key.family, remote_words(key))
}

/// An IPv6 key's flow bucket.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the key's first 8 bytes are its first aligned word of the 8-byte aligned CtKey: one aligned u64 load"
)]
pub(crate) fn flow_bucket(key: &CtKey) -> u32 {
    // SAFETY: the key's first 8 bytes (family, protocol, padding, ports)
    // are the first aligned u64 word of the 8-byte aligned `CtKey` (size
    // and alignment asserted in segbpf_common); any bit pattern is valid.
    let head = unsafe { (&raw const *key).cast::<u64>().read() };
    ct_seen_flow_bucket_words(head, remote_words(key))
}

/// An IPv6 key's remote address as two aligned words.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "`remote` sits at offset 32 of the 8-byte aligned CtKey: two aligned u64 loads, where an unaligned read would be sixteen byte loads"
)]
fn remote_words(key: &CtKey) -> [u64; 2] {
    // SAFETY: `key.remote` is 16 bytes at offset 32 of an 8-byte aligned
    // `CtKey` (size and alignment asserted in segbpf_common), so it is two
    // aligned u64 words; any bit pattern is a valid u64.
    unsafe { (&raw const key.remote).cast::<[u64; 2]>().read() }
}

/// An IPv4 key's remote bucket and fingerprint: the same as for the key
/// in the `CtKey` form (userspace seeds the arrays from either form).
#[inline(always)]
pub(crate) fn remote_v4(key: &CtKey4) -> (u32, u32) {
    ct_seen_remote_v4(key.remote_be)
}

/// An IPv4 key's flow bucket (as above).
#[inline(always)]
pub(crate) fn flow_bucket_v4(key: &CtKey4) -> u32 {
    ct_seen_flow_bucket_v4(key)
}

/// The key's two buckets packed (`ct_seen_pack`), when neither is stale
/// at `now` under `cfg` and the remote's bucket (`remote`: its index and
/// the remote's fingerprint) has the key's local-port bit (`port_bit`) and
/// may hold the remote (`CtRemote::may_hold`); None otherwise: no entry of
/// the key can be live, skip both lookups. The remote's bucket is read
/// first and the flow's hash (`flow`) computed only when it passes: a
/// source with no recent flow (every default drop of an unknown source), a
/// new source sharing a busy bucket, and a known source's packet to a port
/// none of its flows uses, pay one read. When the instance may not skip
/// (frozen global `SEGBPF_CT_SEEN` 0: set by userspace only when the
/// arrays cover every entry it can find), the buckets are returned
/// unread: look up.
#[inline(always)]
pub(crate) fn live_buckets(
    cfg: &Config,
    remote: (u32, u32),
    port_bit: u32,
    flow: impl FnOnce() -> u32,
    now: u64,
) -> Option<u32> {
    let (remote, fp) = remote;
    if SEGBPF_CT_SEEN.load() == 0 {
        return Some(ct_seen_pack(remote, flow()));
    }
    let horizon = ct_seen_horizon(cfg, now);
    if let Some(r) = SEG_CT_SEEN_X.get(remote)
        && (u64::from(r.tick) < horizon || r.ports & port_bit == 0 || !r.may_hold(fp))
    {
        return None;
    }
    let flow = flow();
    if older(&SEG_CT_SEEN_F, flow, horizon) {
        return None;
    }
    Some(ct_seen_pack(remote, flow))
}

/// Whether bucket `index` of `array` holds a tick older than `horizon`
/// (`ct_seen_horizon`); false when unsure (no bucket): look up.
#[inline(always)]
fn older(array: &Array<u32>, index: u32, horizon: u64) -> bool {
    match array.get(index) {
        Some(seen) => u64::from(*seen) < horizon,
        None => false,
    }
}

/// Records that an entry of `bucket` (both halves: its remote and its
/// flow) with the local-port bit `port_bit`, of a remote of fingerprint
/// `fp`, was made or refreshed at `now`: each bucket gets `now`'s tick
/// unless it holds it already (read first: a busy remote or flow writes
/// its bucket at most once a tick), and the remote's bucket gets the bit,
/// by an atomic OR unless it holds it already (bits are never cleared, so
/// a bit read as set stays set), and the fingerprint (`note_fp`).
#[inline(always)]
pub(crate) fn note(bucket: u32, port_bit: u32, fp: u32, now: u64) {
    let tick = ct_seen_tick(now);
    if let Some(r) = SEG_CT_SEEN_X.get_ptr_mut(bucket >> 16) {
        note_remote(r, port_bit, tick);
        note_fp(r, fp);
    }
    if let Some(p) = SEG_CT_SEEN_F.get_ptr_mut(bucket & 0xffff) {
        // SAFETY: `p` points at a u32 value of the array, valid during
        // this program run; a racing CPU stores a whole u32 (its own tick,
        // read a moment apart: `segbpf_common::CT_SEEN_SLACK_TICKS` covers
        // it).
        unsafe {
            if core::ptr::read_volatile(p) < tick {
                core::ptr::write_volatile(p, tick);
            }
        }
    }
}

/// The tick as for the flow's bucket, then the port's bit.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "a CtRemote is a 16-byte value of an array map, whose values the kernel aligns to 8 bytes"
)]
fn note_remote(r: *mut CtRemote, port_bit: u32, tick: u32) {
    // SAFETY: `r` points at a value of the array, valid during this
    // program run and 8-byte aligned (array values are); the tick is a
    // plain u32 store as for the flow's bucket; the filter is changed only
    // by an atomic OR of the value's first 8 bytes, tick and filter (the
    // tick's half ORed with zero), so no bit another CPU or userspace's
    // seeding sets is lost.
    unsafe {
        if core::ptr::read_volatile(&raw const (*r).tick) < tick {
            core::ptr::write_volatile(&raw mut (*r).tick, tick);
        }
        if core::ptr::read_volatile(&raw const (*r).ports) & port_bit == 0 {
            core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                r.cast::<u64>(),
                ct_u32_pair(0, port_bit),
            );
        }
    }
}

/// Puts the remote's fingerprint `fp` into the bucket `r`, unless it may
/// hold it already (read first: a slot once set is never cleared, and the
/// second slot once over stays over). A free slot takes it by one atomic
/// compare-and-exchange of the pair; when no slot is free, or the
/// exchange lost a race, the second slot is made over by an atomic OR of
/// all ones, which no write undoes. Either way the bucket may hold `fp`
/// before the caller inserts the entry.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the fingerprint pair sits at offset 8 of a CtRemote, an 8-byte aligned array value: one aligned u64"
)]
fn note_fp(r: *mut CtRemote, fp: u32) {
    // SAFETY: `r` points at a value of the array, valid during this
    // program run and 8-byte aligned; the pair `fp` at offset 8 is one
    // aligned u64, changed only by atomic operations: the exchange and OR
    // below, and userspace's seeding (an OR of the second slot over).
    unsafe {
        let pair = (&raw mut (*r).fp).cast::<u64>();
        let cur = core::ptr::read_volatile(pair);
        let (lo, hi) = ct_u32_halves(cur);
        if lo == fp || hi == fp || hi == CT_FP_OVER {
            return;
        }
        let want = if lo == 0 {
            ct_u32_pair(fp, hi)
        } else if hi == 0 {
            ct_u32_pair(lo, fp)
        } else {
            0
        };
        if want != 0
            && core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::Relaxed },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(pair, cur, want)
            .1
        {
            return;
        }
        core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            pair,
            ct_u32_pair(0, CT_FP_OVER),
        );
    }
}
