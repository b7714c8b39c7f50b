//! The default class of a peer trie: a shallower trie for the same
//! function.
//!
//! The compiler's sweep tiles one direction's address space with disjoint
//! prefixes. When a rule names `any`, every gap between the other rules'
//! peers becomes prefixes of that class: up to two per bit around every
//! named range, so the trie path to a named address (a known source) runs
//! through one node per bit. Measured in the benchmark (`SEGBPF_BENCH_ONLY=lookups`):
//! one lookup of 198.18.0.7 in the 10-rule bench policy's tiling cost
//! about 160 ns, against 10 ns once the gaps' class is one entry.
//!
//! [`elide`] keeps the function and drops the gaps: when the disjoint
//! entries of one (slot, direction) cover the whole space, the class with
//! the most entries becomes one header-only entry (the slot and direction
//! bytes, no address bits), and its other entries go. The entries left
//! are still disjoint, so an address in one of them matches it and the
//! header-only entry, and the longest match is its own; any other address
//! matches only the header-only entry, whose class it had. [`expand`] is
//! the inverse: the maximal disjoint intervals of such a list.

use segbpf_common::{PEER_KEY_HEADER_BITS, PeerClass};

/// One trie entry: (prefix length, key, class), the compiler's
/// `LpmEntry` (spelled out here so this module does not import the
/// compiler that calls it).
type LpmEntry<K, V> = (u32, K, V);

/// The host-part mask of a prefix of `plen` bits in a `bits`-bit space.
fn host_mask(plen: u32, bits: u32) -> u128 {
    let max = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    if plen >= bits { 0 } else { max >> plen }
}

/// `entries`: the disjoint tiling of one (slot, direction) of a `bits`-bit
/// family (`addr`: a key's address, `header`: the header-only key). Returns
/// the same function with the most frequent class (ties: the lowest id) as
/// one header-only entry, or `entries` unchanged when they do not cover the
/// whole space (an address in no class must miss) or nothing is saved.
pub fn elide<K: Copy>(
    entries: Vec<LpmEntry<K, PeerClass>>,
    bits: u32,
    addr: impl Fn(&K) -> u128,
    header: K,
) -> Vec<LpmEntry<K, PeerClass>> {
    if entries.is_empty() || entries.iter().any(|e| e.0 <= PEER_KEY_HEADER_BITS) {
        return entries;
    }
    let mut spans: Vec<(u128, u128)> = entries
        .iter()
        .map(|(len, k, _)| {
            let a = addr(k);
            (a, a | host_mask(len - PEER_KEY_HEADER_BITS, bits))
        })
        .collect();
    spans.sort_unstable();
    let max = host_mask(0, bits);
    let mut next = 0u128;
    let mut full = false;
    for (s, e) in spans {
        if s != next {
            return entries;
        }
        if e == max {
            full = true;
            break;
        }
        next = e + 1;
    }
    if !full {
        return entries;
    }
    let mut count: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for (_, _, c) in &entries {
        *count.entry(c.class_id).or_default() += 1;
    }
    // Most entries; ties to the lowest class id (max_by_key keeps the last
    // maximum, so iterate from the highest id down).
    let Some((&class_id, &n)) = count.iter().rev().max_by_key(|(_, n)| **n) else {
        return entries;
    };
    if n < 2 {
        return entries;
    }
    let mut out = Vec::with_capacity(entries.len() + 1 - n);
    out.push((PEER_KEY_HEADER_BITS, header, PeerClass { class_id }));
    out.extend(entries.into_iter().filter(|e| e.2.class_id != class_id));
    out
}

/// The maximal intervals `(start, end, class)` of one (slot, direction)'s
/// entries (`addr`: a key's address), disjoint tiling or [`elide`]d.
pub fn expand<K>(
    entries: &[&LpmEntry<K, PeerClass>],
    bits: u32,
    addr: impl Fn(&K) -> u128,
) -> Vec<(u128, u128, u32)> {
    let max = host_mask(0, bits);
    let default = entries
        .iter()
        .find(|e| e.0 <= PEER_KEY_HEADER_BITS)
        .map(|e| e.2.class_id);
    let mut v: Vec<(u128, u128, u32)> = entries
        .iter()
        .filter(|e| e.0 > PEER_KEY_HEADER_BITS)
        .map(|(len, k, c)| {
            let plen = (len - PEER_KEY_HEADER_BITS).min(bits);
            let a = addr(k);
            (a, a | host_mask(plen, bits), c.class_id)
        })
        .collect();
    v.sort_unstable();
    if let Some(d) = default {
        let mut filled = Vec::with_capacity(2 * v.len() + 1);
        let mut next = Some(0u128);
        for (s, e, c) in v {
            if let Some(n) = next
                && n < s
            {
                filled.push((n, s - 1, d));
            }
            filled.push((s, e, c));
            next = if e == max { None } else { Some(e + 1) };
        }
        if let Some(n) = next {
            filled.push((n, max, d));
        }
        v = filled;
    }
    merge(v)
}

/// Adjacent intervals of one class as one.
fn merge(v: Vec<(u128, u128, u32)>) -> Vec<(u128, u128, u32)> {
    let mut out: Vec<(u128, u128, u32)> = Vec::with_capacity(v.len());
    for (s, e, c) in v {
        match out.last_mut() {
            Some(last) if last.2 == c && last.1 != u128::MAX && last.1 + 1 == s => last.1 = e,
            _ => out.push((s, e, c)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::addr::range_to_prefixes;

    /// A tiling of the IPv4 space from `(start, end, class)` intervals, as
    /// the compiler makes it (keys are plain addresses here).
    fn tiling(iv: &[(u128, u128, u32)]) -> Vec<LpmEntry<u128, PeerClass>> {
        iv.iter()
            .flat_map(|&(s, e, c)| {
                range_to_prefixes(s, e, 32)
                    .into_iter()
                    .map(move |(p, l)| (PEER_KEY_HEADER_BITS + l, p, PeerClass { class_id: c }))
            })
            .collect()
    }

    /// The class of `a` by longest prefix match over `entries`.
    fn lpm(entries: &[LpmEntry<u128, PeerClass>], a: u128) -> Option<u32> {
        entries
            .iter()
            .filter(|(len, p, _)| {
                let m = host_mask(len - PEER_KEY_HEADER_BITS, 32);
                a & !m == *p & !m
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, c)| c.class_id)
    }

    #[test]
    fn the_gaps_class_becomes_one_entry_and_every_address_keeps_its_class() {
        let max = u128::from(u32::MAX);
        // 10.0.0.0/24 class 1, 10.0.1.7 class 2, 198.18.0.0/24 class 1, the
        // rest class 0 (an `any` rule).
        let iv = [
            (0, 0x0a00_0000 - 1, 0),
            (0x0a00_0000, 0x0a00_00ff, 1),
            (0x0a00_0100, 0x0a00_0106, 0),
            (0x0a00_0107, 0x0a00_0107, 2),
            (0x0a00_0108, 0xc612_0000 - 1, 0),
            (0xc612_0000, 0xc612_00ff, 1),
            (0xc612_0100, max, 0),
        ];
        let full = tiling(&iv);
        let short = elide(full.clone(), 32, |k| *k, 0);
        assert!(
            short.len() < full.len() / 4,
            "{} of {}",
            short.len(),
            full.len()
        );
        assert_eq!(
            short[0],
            (PEER_KEY_HEADER_BITS, 0, PeerClass { class_id: 0 })
        );
        for &(s, e, _) in &iv {
            for a in [s, s + 1, u128::midpoint(s, e), e.saturating_sub(1), e] {
                let a = a.min(e);
                assert_eq!(lpm(&short, a), lpm(&full, a), "address {a:#x}");
            }
        }
        let refs: Vec<_> = short.iter().collect();
        assert_eq!(expand(&refs, 32, |k| *k), iv.to_vec());
        let refs: Vec<_> = full.iter().collect();
        assert_eq!(expand(&refs, 32, |k| *k), iv.to_vec());
    }

    #[test]
    fn a_tiling_with_gaps_is_left_alone() {
        // No `any`: an address in no class must miss the trie.
        let full = tiling(&[(0x0a00_0000, 0x0a00_00ff, 1), (0x0a00_0107, 0x0a00_0107, 2)]);
        assert_eq!(elide(full.clone(), 32, |k| *k, 0), full);
        let whole = tiling(&[(0, u128::from(u32::MAX), 3)]);
        assert_eq!(elide(whole.clone(), 32, |k| *k, 0), whole);
    }

    #[test]
    fn ipv6_space_and_ties_are_handled() {
        let iv = [(0, (1u128 << 120) - 1, 5), (1u128 << 120, u128::MAX, 4)];
        let full: Vec<LpmEntry<u128, PeerClass>> = iv
            .iter()
            .flat_map(|&(s, e, c)| {
                range_to_prefixes(s, e, 128)
                    .into_iter()
                    .map(move |(p, l)| (PEER_KEY_HEADER_BITS + l, p, PeerClass { class_id: c }))
            })
            .collect();
        let short = elide(full.clone(), 128, |k| *k, 0);
        // 1 entry of class 5 (::/8), 8 of class 4: class 4 is the default.
        assert_eq!(short.len(), 2);
        assert_eq!(short[0].2.class_id, 4);
        let refs: Vec<_> = short.iter().collect();
        assert_eq!(expand(&refs, 128, |k| *k), iv.to_vec());
    }
}
