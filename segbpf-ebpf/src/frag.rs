//! Fragment tracking (as Cilium does): when the first fragment of a
//! datagram passes, its (source, destination, id, protocol) goes into an
//! LRU map; the datagram's later fragments pass only if they find it.
//! Later fragments that arrive before their first fragment, or whose first
//! fragment was dropped, are dropped and counted as `fragment-no-leader`.
//!
//! The protocol in the key is the one both the leader and its followers
//! carry (for IPv6, the fragment header's next header). Like connection
//! tracking, two tables keep a flood from evicting what matters: datagrams
//! of assured flows go to `SEG_FRAG`, all others to `SEG_FRAG_NEW`, so a
//! flood of spoofed leading fragments only evicts entries of the latter.

use segbpf_common::{Config, FragEntry, FragKey};

use crate::{
    maps::{SEG_FRAG, SEG_FRAG_NEW},
    parse::{L3_IPV4, Parsed},
};

#[inline(always)]
fn key(p: &Parsed) -> FragKey {
    FragKey {
        family: if p.l3 == L3_IPV4 { 4 } else { 6 },
        proto: p.frag_proto,
        _pad: [0; 2],
        id: p.frag_id,
        src: p.src,
        dst: p.dst,
    }
}

/// The entry of the datagram of a later fragment, if its first fragment
/// passed less than `cfg.frag_s` seconds ago.
#[inline(always)]
pub(crate) fn leader(cfg: &Config, p: &Parsed, now: u64) -> Option<FragEntry> {
    let k = key(p);
    let e = match SEG_FRAG.get_ptr(k) {
        Some(e) => e,
        None => SEG_FRAG_NEW.get_ptr(k)?,
    };
    // SAFETY: points at a map value, valid during this program run.
    let e = unsafe { *e };
    if now.saturating_sub(e.first_seen_ns) > u64::from(cfg.frag_s) * 1_000_000_000 {
        return None;
    }
    Some(e)
}

/// Remembers that the first fragment of `p`'s datagram passed, in the
/// assured table when it passed on an assured flow.
#[inline(always)]
pub(crate) fn remember(p: &Parsed, reason: u8, rule_id: u32, now: u64, assured: bool) {
    let e = FragEntry {
        first_seen_ns: now,
        rule_id,
        reason,
        _pad: [0; 3],
    };
    let k = key(p);
    let _ = if assured {
        SEG_FRAG.insert(k, e, 0)
    } else {
        SEG_FRAG_NEW.insert(k, e, 0)
    };
}
