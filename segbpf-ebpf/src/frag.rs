//! Fragment tracking (as Cilium does): when the first fragment of a
//! datagram passes, its (source, destination, id, protocol) goes into an
//! LRU map; the datagram's later fragments pass only if they find it.
//! Later fragments that arrive before their first fragment, or whose first
//! fragment was dropped, are dropped and counted as `fragment-no-leader`.

use segbpf_common::{Config, FragEntry, FragKey};

use crate::{
    maps::SEG_FRAG,
    parse::{L3_IPV4, Parsed},
};

#[inline(always)]
fn key(p: &Parsed) -> FragKey {
    FragKey {
        family: if p.l3 == L3_IPV4 { 4 } else { 6 },
        proto: p.proto,
        _pad: [0; 2],
        id: p.frag_id,
        src: p.src,
        dst: p.dst,
    }
}

/// The entry of the datagram of a later fragment, if its first fragment
/// passed less than `cfg.frag_s` seconds ago.
#[inline(always)]
pub fn leader(cfg: &Config, p: &Parsed, now: u64) -> Option<FragEntry> {
    let e = SEG_FRAG.get_ptr(key(p))?;
    // SAFETY: points at a map value, valid during this program run.
    let e = unsafe { *e };
    if now.saturating_sub(e.first_seen_ns) > cfg.frag_s as u64 * 1_000_000_000 {
        return None;
    }
    Some(e)
}

/// Remembers that the first fragment of `p`'s datagram passed.
#[inline(always)]
pub fn remember(p: &Parsed, reason: u8, rule_id: u32, now: u64) {
    let e = FragEntry {
        first_seen_ns: now,
        rule_id,
        reason,
        _pad: [0; 3],
    };
    let _ = SEG_FRAG.insert(key(p), e, 0);
}
