//! The port fast-miss bitmap of one policy slot
//! (`segbpf_common::portmiss`): which (class, TCP or UDP port) pairs the
//! slot's port trie may hold an entry for. The kernel reads two bits of it
//! before the port trie and skips the trie walk when both are clear: a
//! known source to a port no rule of its class allows is dropped without
//! the walk (measured: about 20 ns of a drop at 10 rules, 90 ns at 10,000
//! classes; BENCHMARKS.md).
//!
//! [`bitmap`] is a function of the port-trie entries alone, so every
//! writer of a slot (a whole write, a delta, a set edit, the mirror of
//! the other slot) writes the bitmap of the entries the slot holds after
//! it, and a fresh compile gives the same bits.

use segbpf_common::{
    IPPROTO_TCP, IPPROTO_UDP, PORT_KEY_CLASS_BITS, PORT_KEY_PROTO_BITS, PORTMISS_ANY, PortKey,
    PortMiss, portmiss_bit,
};

/// One trie entry: (prefix length, key, value), the compiler's
/// `LpmEntry` (spelled out so this module does not import the compiler).
type LpmEntry<K, V> = (u32, K, V);

fn set(m: &mut PortMiss, bit: u32) {
    m.words[(bit >> 6) as usize] |= 1 << (bit & 63);
}

/// The bitmap of a slot whose port trie holds `ports` (their slot byte is
/// ignored). Every TCP/UDP (class, port) an entry covers sets its bit; an
/// entry covering a whole protocol or every protocol of a class sets the
/// class's whole-protocol bit; an entry shorter than a class (none is
/// compiled) sets every bit.
pub fn bitmap<V>(ports: &[LpmEntry<PortKey, V>]) -> Box<PortMiss> {
    let mut m = Box::new(<PortMiss as bytemuck::Zeroable>::zeroed());
    for (len, k, _) in ports {
        let class = u32::from_be_bytes(k.class_be);
        if *len < PORT_KEY_CLASS_BITS {
            m.words.fill(u64::MAX);
            return m;
        }
        if *len <= PORT_KEY_PROTO_BITS {
            // Every protocol of the class, or every port of one (only
            // TCP and UDP bits are ever read).
            if *len < PORT_KEY_PROTO_BITS || k.proto == IPPROTO_TCP || k.proto == IPPROTO_UDP {
                set(&mut m, portmiss_bit(class, PORTMISS_ANY, 0));
            }
            continue;
        }
        if k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP {
            continue;
        }
        let host_bits = 16 - (len - PORT_KEY_PROTO_BITS).min(16);
        let first = u32::from(u16::from_be_bytes(k.port_be)) & !((1u32 << host_bits) - 1);
        for port in first..first + (1 << host_bits) {
            set(&mut m, portmiss_bit(class, k.proto, port as u16));
        }
    }
    m
}

/// Whether the kernel's fast-miss check lets (class, proto, port) go on to
/// the trie (its reading of the bitmap, for tests).
pub fn may_match(m: &PortMiss, class: u32, proto: u8, port: u16) -> bool {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return true;
    }
    let bit = |b: u32| m.words[(b >> 6) as usize] >> (b & 63) & 1 != 0;
    bit(portmiss_bit(class, proto, port)) || bit(portmiss_bit(class, PORTMISS_ANY, 0))
}

#[cfg(test)]
mod tests {
    use segbpf_common::RuleRef;

    use super::*;

    fn key(class: u32, proto: u8, port: u16) -> PortKey {
        PortKey {
            slot: 0,
            class_be: class.to_be_bytes(),
            proto,
            port_be: port.to_be_bytes(),
        }
    }

    /// The trie's answer by longest match over `entries`.
    fn trie_matches(entries: &[LpmEntry<PortKey, RuleRef>], k: PortKey) -> bool {
        let bits = |k: PortKey| -> u64 {
            u64::from_be_bytes([
                0,
                0,
                0,
                k.class_be[0],
                k.class_be[1],
                k.class_be[2],
                k.class_be[3],
                k.proto,
            ]) << 16
                | u64::from(u16::from_be_bytes(k.port_be))
        };
        let want = bits(k);
        entries.iter().any(|(len, e, _)| {
            // Key bits after the slot byte: 56 of them.
            let plen = len - 8;
            let shift = 56 - plen;
            plen == 0 || (bits(*e) >> shift) == (want >> shift)
        })
    }

    #[test]
    fn a_clear_bit_means_no_entry_matches() {
        let r = RuleRef { rule_id: 1 };
        let entries = vec![
            (PORT_KEY_PROTO_BITS + 16, key(1, IPPROTO_TCP, 22), r),
            // 8192..=8199
            (PORT_KEY_PROTO_BITS + 13, key(2, IPPROTO_TCP, 8192), r),
            (PORT_KEY_PROTO_BITS, key(3, IPPROTO_UDP, 0), r),
            (PORT_KEY_CLASS_BITS, key(4, 0, 0), r),
            (
                PORT_KEY_PROTO_BITS,
                key(5, segbpf_common::IPPROTO_ICMP, 0),
                r,
            ),
            (PORT_KEY_PROTO_BITS + 16, key(6, IPPROTO_UDP, 53), r),
        ];
        let m = bitmap(&entries);
        let mut skipped = 0;
        for class in 0..8 {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                for port in (0..=u16::MAX).step_by(7).chain([22, 53, 8192, 8199, 8200]) {
                    let matches = trie_matches(&entries, key(class, proto, port));
                    let may = may_match(&m, class, proto, port);
                    assert!(
                        may || !matches,
                        "class {class} proto {proto} port {port}: trie matches, bitmap skips it"
                    );
                    skipped += usize::from(!may);
                }
            }
        }
        // Nearly everything that does not match is skipped (shared bits
        // are rare at a few hundred set bits in 2^20): all of the six
        // classes without a whole-protocol entry but their few ports.
        assert!(skipped > 6 * 2 * 9_300, "{skipped}");
        assert!(!may_match(&m, 1, IPPROTO_TCP, 23));
        assert!(!may_match(&m, 5, IPPROTO_TCP, 22));
        assert!(may_match(&m, 4, IPPROTO_UDP, 9));
        assert!(may_match(&m, 3, IPPROTO_UDP, 9));
    }

    #[test]
    fn an_entry_shorter_than_a_class_sets_everything() {
        let mut k = key(0, 0, 0);
        k.class_be = [0; 4];
        let m = bitmap(&[(8, k, RuleRef { rule_id: 0 })]);
        assert!(m.words.iter().all(|w| *w == u64::MAX));
    }
}
