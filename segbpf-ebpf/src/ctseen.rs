//! The last-seen array (`SEG_CT_SEEN`, see `segbpf_common::ctseen`): a
//! packet whose remote's bucket is stale skips both connection-table
//! lookups, since no entry of that remote can be live; every entry made or
//! refreshed writes its remote's bucket. Shared by every attachment of the
//! namespace, like the connection tables.

use segbpf_common::{
    Config, CtKey, CtKey4, ct_seen_bucket_v4, ct_seen_bucket_words, ct_seen_stale, ct_seen_tick,
};

use crate::maps::{SEG_CT_SEEN, SEGBPF_CT_SEEN};

/// The bucket of an IPv6 key's remote address (computed once per packet:
/// the lookup keeps it for the update).
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "`remote` sits at offset 32 of the 8-byte aligned CtKey: two aligned u64 loads, where an unaligned read would be sixteen byte loads"
)]
pub(crate) fn bucket(key: &CtKey) -> u32 {
    // SAFETY: `key.remote` is 16 bytes at offset 32 of an 8-byte aligned
    // `CtKey` (size and alignment asserted in segbpf_common), so it is two
    // aligned u64 words; any bit pattern is a valid u64.
    let words = unsafe { (&raw const key.remote).cast::<[u64; 2]>().read() };
    ct_seen_bucket_words(key.family, words)
}

/// The bucket of an IPv4 key's remote address: the same as for the
/// address in a `CtKey` (userspace seeds the array from either form).
#[inline(always)]
pub(crate) fn bucket_v4(key: &CtKey4) -> u32 {
    ct_seen_bucket_v4(key.remote_be)
}

/// Whether no entry of the remotes of `bucket` can be live at `now` under
/// `cfg`: the instance may skip (frozen global `SEGBPF_CT_SEEN`, set by
/// userspace only when the array covers every entry it can find) and the
/// bucket is stale. When unsure (skipping off, no bucket), false: look up.
#[inline(always)]
pub(crate) fn stale(cfg: &Config, bucket: u32, now: u64) -> bool {
    if SEGBPF_CT_SEEN.load() == 0 {
        return false;
    }
    match SEG_CT_SEEN.get(bucket) {
        Some(seen) => ct_seen_stale(cfg, *seen, now),
        None => false,
    }
}

/// Records that an entry of a remote of `bucket` was made or refreshed at
/// `now`: the bucket gets `now`'s tick unless it holds it already (read
/// first: a busy remote writes its bucket at most once a tick).
#[inline(always)]
pub(crate) fn note(bucket: u32, now: u64) {
    let Some(p) = SEG_CT_SEEN.get_ptr_mut(bucket) else {
        return;
    };
    let tick = ct_seen_tick(now);
    // SAFETY: `p` points at a u32 value of the array, valid during this
    // program run; a racing CPU stores a whole u32 (its own tick, read a
    // moment apart: `segbpf_common::CT_SEEN_SLACK_TICKS` covers it).
    unsafe {
        if core::ptr::read_volatile(p) < tick {
            core::ptr::write_volatile(p, tick);
        }
    }
}
