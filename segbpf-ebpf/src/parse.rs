//! Packet parsing: Ethernet, up to two VLAN tags, ARP, IPv4 (IHL and total
//! length checked), IPv6 (bounded extension-header walk), TCP, UDP, ICMP,
//! ICMPv6. Every read is bounds-checked against the end of the packet;
//! anything that cannot be fully validated yields a drop reason, never a
//! pass. Fields are read as integers, never as Rust enums.

use core::mem::size_of;

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, reason};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ARP_HLEN: usize = 8;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;

/// Largest number of IPv6 extension headers walked before giving up.
pub const MAX_IPV6_EXT: usize = 8;
/// Largest IPv6 extension-header chain (bytes) accepted.
const MAX_IPV6_EXT_BYTES: usize = 1024;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Layer-3 kind of a parsed packet.
pub const L3_ARP: u8 = 1;
/// IPv4.
pub const L3_IPV4: u8 = 4;
/// IPv6.
pub const L3_IPV6: u8 = 6;

/// The packet's start and end, as the program context gives them.
pub struct Bounds {
    start: usize,
    end: usize,
}

impl Bounds {
    /// Wraps `data`/`data_end` of an XDP or TC context.
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Bounds { start, end }
    }

    /// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return None;
        }
        Some(at as *const T)
    }

    /// Reads `N` bytes at `offset`.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let p = self.ptr_at::<[u8; N]>(offset)?;
        // SAFETY: `ptr_at` checked that offset..offset+N lies within the
        // packet; [u8; N] has alignment 1, so any address is aligned.
        Some(unsafe { *p })
    }

    #[inline(always)]
    fn be16_at(&self, offset: usize) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes::<2>(offset)?))
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// What the parser learned about a packet it could fully validate.
pub struct Parsed {
    /// [`L3_ARP`], [`L3_IPV4`] or [`L3_IPV6`].
    pub l3: u8,
    /// IP protocol of the transport header (0 for ARP).
    pub proto: u8,
    /// Source address (IPv4 in the first 4 bytes), network order.
    pub src: [u8; 16],
    /// Destination address (IPv4 in the first 4 bytes), network order.
    pub dst: [u8; 16],
    /// Source port, host order (0 without ports).
    pub sport: u16,
    /// Destination port, host order (0 without ports).
    pub dport: u16,
    /// ICMP/ICMPv6 type (0 otherwise).
    pub icmp_type: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
}

impl Parsed {
    fn empty(l3: u8) -> Self {
        Parsed {
            l3,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            icmp_type: 0,
            hop_limit: 0,
        }
    }
}

/// Parses a packet from its Ethernet header on. `Err` carries the drop reason.
#[inline(always)]
pub fn parse(pkt: &Bounds) -> Result<Parsed, u8> {
    let mut ethertype = pkt.be16_at(12).ok_or(reason::DROP_TRUNC_ETH)?;
    let mut off = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, and 802.1ad outer tag for QinQ).
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = pkt.be16_at(off + 2).ok_or(reason::DROP_TRUNC_ETH)?;
        off += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = pkt.be16_at(off + 2).ok_or(reason::DROP_TRUNC_ETH)?;
            off += VLAN_HLEN;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Err(reason::DROP_VLAN_DEPTH);
            }
        }
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, off),
        ETH_P_IPV6 => parse_ipv6(pkt, off),
        ETH_P_ARP => {
            // Fixed part, then sender/target hardware and protocol addresses.
            let h = pkt.bytes::<ARP_HLEN>(off).ok_or(reason::DROP_BAD_ARP)?;
            let len = ARP_HLEN + 2 * (h[4] as usize + h[5] as usize);
            if off + len > pkt.len() {
                return Err(reason::DROP_BAD_ARP);
            }
            Ok(Parsed::empty(L3_ARP))
        }
        _ => Err(reason::DROP_ETHERTYPE),
    }
}

#[inline(always)]
fn parse_ipv4(pkt: &Bounds, off: usize) -> Result<Parsed, u8> {
    let hdr = pkt
        .bytes::<IPV4_MIN_HLEN>(off)
        .ok_or(reason::DROP_TRUNC_IP)?;
    if hdr[0] >> 4 != 4 {
        return Err(reason::DROP_BAD_IPV4);
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(reason::DROP_BAD_IPV4);
    }
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if tot_len < ihl {
        return Err(reason::DROP_BAD_IPV4);
    }
    // The datagram (header and options included) must lie inside the frame;
    // bytes after it are link-layer padding and are ignored.
    if off + tot_len > pkt.len() {
        return Err(reason::DROP_TRUNC_IP);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if frag & 0x1fff != 0 {
        // A non-first fragment carries no transport header to judge.
        return Err(reason::DROP_FRAGMENT);
    }
    let mut p = Parsed::empty(L3_IPV4);
    p.proto = hdr[9];
    p.hop_limit = hdr[8];
    p.src[..4].copy_from_slice(&hdr[12..16]);
    p.dst[..4].copy_from_slice(&hdr[16..20]);
    parse_l4(pkt, off + ihl, off + tot_len, p)
}

#[inline(always)]
fn parse_ipv6(pkt: &Bounds, off: usize) -> Result<Parsed, u8> {
    let hdr = pkt.bytes::<IPV6_HLEN>(off).ok_or(reason::DROP_TRUNC_IP)?;
    if hdr[0] >> 4 != 6 {
        return Err(reason::DROP_BAD_IPV6);
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let limit = off + IPV6_HLEN + payload_len;
    if limit > pkt.len() {
        return Err(reason::DROP_TRUNC_IP);
    }
    let mut p = Parsed::empty(L3_IPV6);
    p.hop_limit = hdr[7];
    p.src.copy_from_slice(&hdr[8..24]);
    p.dst.copy_from_slice(&hdr[24..40]);

    let mut nexthdr = hdr[6];
    let mut l4 = off + IPV6_HLEN;
    let mut done = false;
    // Bounded walk over at most MAX_IPV6_EXT extension headers; the last
    // pass only recognises the transport header.
    for i in 0..=MAX_IPV6_EXT {
        let is_ext = matches!(
            nexthdr,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        );
        if is_ext && i == MAX_IPV6_EXT {
            return Err(reason::DROP_IPV6_EXT);
        }
        match nexthdr {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let ext = pkt.bytes::<2>(l4).ok_or(reason::DROP_IPV6_EXT)?;
                let len = if nexthdr == NEXTHDR_AUTH {
                    (ext[1] as usize + 2) * 4
                } else {
                    (ext[1] as usize + 1) * 8
                };
                nexthdr = ext[0];
                l4 += len;
            }
            NEXTHDR_FRAGMENT => {
                let ext = pkt
                    .bytes::<IPV6_FRAG_HLEN>(l4)
                    .ok_or(reason::DROP_IPV6_EXT)?;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Err(reason::DROP_FRAGMENT);
                }
                nexthdr = ext[0];
                l4 += IPV6_FRAG_HLEN;
            }
            _ => {
                done = true;
                break;
            }
        }
        if l4 > limit || l4 > off + IPV6_HLEN + MAX_IPV6_EXT_BYTES {
            return Err(reason::DROP_IPV6_EXT);
        }
    }
    if !done {
        return Err(reason::DROP_IPV6_EXT);
    }
    p.proto = nexthdr;
    parse_l4(pkt, l4, limit, p)
}

/// Parses the transport header at `off`; `limit` is the end of the IP
/// datagram (the header must lie inside it, not just inside the frame).
#[inline(always)]
fn parse_l4(pkt: &Bounds, off: usize, limit: usize, mut p: Parsed) -> Result<Parsed, u8> {
    match p.proto {
        IPPROTO_TCP => {
            let h = pkt
                .bytes::<TCP_MIN_HLEN>(off)
                .ok_or(reason::DROP_TRUNC_L4)?;
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < TCP_MIN_HLEN {
                return Err(reason::DROP_BAD_L4);
            }
            if off + doff > limit {
                return Err(reason::DROP_TRUNC_L4);
            }
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        IPPROTO_UDP => {
            let h = pkt.bytes::<UDP_HLEN>(off).ok_or(reason::DROP_TRUNC_L4)?;
            if off + UDP_HLEN > limit {
                return Err(reason::DROP_TRUNC_L4);
            }
            let len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if len < UDP_HLEN {
                return Err(reason::DROP_BAD_L4);
            }
            if off + len > limit {
                return Err(reason::DROP_TRUNC_L4);
            }
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h = pkt.bytes::<ICMP_HLEN>(off).ok_or(reason::DROP_TRUNC_L4)?;
            if off + ICMP_HLEN > limit {
                return Err(reason::DROP_TRUNC_L4);
            }
            p.icmp_type = h[0];
        }
        _ => {}
    }
    Ok(p)
}
