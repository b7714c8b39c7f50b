//! The last-seen arrays (`SEG_CT_SEEN` by remote, `SEG_CT_SEEN_F` by flow;
//! see `segbpf_common::ctseen`): a packet whose remote's bucket or whose
//! flow's bucket is stale skips both connection-table lookups, since no
//! entry of it can be live; every entry made or refreshed writes both of
//! its buckets. Shared by every attachment of the namespace, like the
//! connection tables.

use aya_ebpf::maps::Array;
use segbpf_common::{
    Config, CtKey, CtKey4, ct_seen_bucket_v4, ct_seen_bucket_words, ct_seen_flow_bucket_v4,
    ct_seen_flow_bucket_words, ct_seen_horizon, ct_seen_pack, ct_seen_tick,
};

use crate::maps::{SEG_CT_SEEN, SEG_CT_SEEN_F, SEGBPF_CT_SEEN};

/// An IPv6 key's remote bucket.
#[inline(always)]
pub(crate) fn remote_bucket(key: &CtKey) -> u32 {
    ct_seen_bucket_words(key.family, remote_words(key))
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

/// An IPv4 key's remote bucket: the same as for the key in the `CtKey`
/// form (userspace seeds the arrays from either form).
#[inline(always)]
pub(crate) fn remote_bucket_v4(key: &CtKey4) -> u32 {
    ct_seen_bucket_v4(key.remote_be)
}

/// An IPv4 key's flow bucket (as above).
#[inline(always)]
pub(crate) fn flow_bucket_v4(key: &CtKey4) -> u32 {
    ct_seen_flow_bucket_v4(key)
}

/// The key's two buckets packed (`ct_seen_pack`), when neither is stale
/// at `now` under `cfg`; None when one is: no entry of the key can be
/// live, skip both lookups. The remote's bucket is read first and the
/// flow's hash (`flow`) computed only when it is fresh: a source with no
/// recent flow (every default drop of an unknown source) pays one hash.
/// When the instance may not skip (frozen global `SEGBPF_CT_SEEN` 0: set
/// by userspace only when the arrays cover every entry it can find), the
/// buckets are returned unread: look up.
#[inline(always)]
pub(crate) fn live_buckets(
    cfg: &Config,
    remote: u32,
    flow: impl FnOnce() -> u32,
    now: u64,
) -> Option<u32> {
    if SEGBPF_CT_SEEN.load() == 0 {
        return Some(ct_seen_pack(remote, flow()));
    }
    let horizon = ct_seen_horizon(cfg, now);
    if older(&SEG_CT_SEEN, remote, horizon) {
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
/// flow) was made or refreshed at `now`: each bucket gets `now`'s tick
/// unless it holds it already (read first: a busy remote or flow writes
/// its bucket at most once a tick).
#[inline(always)]
pub(crate) fn note(bucket: u32, now: u64) {
    let tick = ct_seen_tick(now);
    note_in(&SEG_CT_SEEN, bucket >> 16, tick);
    note_in(&SEG_CT_SEEN_F, bucket & 0xffff, tick);
}

#[inline(always)]
fn note_in(array: &Array<u32>, index: u32, tick: u32) {
    let Some(p) = array.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: `p` points at a u32 value of the array, valid during this
    // program run; a racing CPU stores a whole u32 (its own tick, read a
    // moment apart: `segbpf_common::CT_SEEN_SLACK_TICKS` covers it).
    unsafe {
        if core::ptr::read_volatile(p) < tick {
            core::ptr::write_volatile(p, tick);
        }
    }
}
