//! The last-seen arrays (`SEG_CT_SEEN` by remote, `SEG_CT_SEEN_F` by flow;
//! see `segbpf_common::ctseen`): a packet whose remote's bucket or whose
//! flow's bucket is stale skips both connection-table lookups, since no
//! entry of it can be live; every entry made or refreshed writes both of
//! its buckets. Shared by every attachment of the namespace, like the
//! connection tables.

use aya_ebpf::maps::Array;
use segbpf_common::{
    Config, CtKey, CtKey4, ct_seen_bucket_v4, ct_seen_bucket_words, ct_seen_flow_bucket_v4,
    ct_seen_flow_bucket_words, ct_seen_pack, ct_seen_stale, ct_seen_tick,
};

use crate::maps::{SEG_CT_SEEN, SEG_CT_SEEN_F, SEGBPF_CT_SEEN};

/// An IPv6 key's two buckets, its remote's and its flow's, packed
/// (`ct_seen_pack`; computed once per packet: the lookup keeps them for
/// the update).
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "`remote` sits at offset 32 of the 8-byte aligned CtKey: two aligned u64 loads, where an unaligned read would be sixteen byte loads"
)]
pub(crate) fn bucket(key: &CtKey) -> u32 {
    // SAFETY: `key.remote` is 16 bytes at offset 32 of an 8-byte aligned
    // `CtKey` (size and alignment asserted in segbpf_common), so it is two
    // aligned u64 words; the key's first 8 bytes (family, protocol,
    // padding, ports) are its first aligned word; any bit pattern is a
    // valid u64.
    let (head, words) = unsafe {
        (
            (&raw const *key).cast::<u64>().read(),
            (&raw const key.remote).cast::<[u64; 2]>().read(),
        )
    };
    ct_seen_pack(
        ct_seen_bucket_words(key.family, words),
        ct_seen_flow_bucket_words(head, words),
    )
}

/// An IPv4 key's two buckets, packed: the same as for the key in the
/// `CtKey` form (userspace seeds the arrays from either form).
#[inline(always)]
pub(crate) fn bucket_v4(key: &CtKey4) -> u32 {
    ct_seen_pack(
        ct_seen_bucket_v4(key.remote_be),
        ct_seen_flow_bucket_v4(key),
    )
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
    stale_in(&SEG_CT_SEEN, cfg, bucket >> 16, now)
        || stale_in(&SEG_CT_SEEN_F, cfg, bucket & 0xffff, now)
}

#[inline(always)]
fn stale_in(array: &Array<u32>, cfg: &Config, index: u32, now: u64) -> bool {
    match array.get(index) {
        Some(seen) => ct_seen_stale(cfg, *seen, now),
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
