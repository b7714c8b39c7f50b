//! Packet parsing: Ethernet, up to two VLAN tags, ARP, IEEE 802.1
//! link-local control frames (STP, LACP/Marker, EAPOL, LLDP, PTP only),
//! IPv4 (IHL and total length checked), IPv6 (bounded extension-header
//! walk), TCP (sequence, window, window-scale option), UDP, ICMP, ICMPv6.
//! On devices without a link-layer header (tun,
//! WireGuard, ip tunnels, ppp) the packet starts at the IP header and the
//! program names its EtherType. Every read is bounds-checked against the
//! end of the packet; anything that cannot be fully validated yields a drop
//! reason, never a pass. Fields are read as integers, never as Rust enums.
//!
//! A leading fragment is judged on what it carries: its transport header
//! must be whole inside the fragment, but lengths that describe the whole
//! datagram (the UDP length) are not checked against the fragment.

use core::mem::size_of;

use segbpf_common::{CT_NO_WSCALE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, reason};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ARP_HLEN: usize = 8;
/// Link-layer control protocols that may use the IEEE 802.1 link-local
/// group addresses (see `is_link_control`): slow protocols (LACP, Marker,
/// 802.3ah OAM), 802.1X PAE (EAPOL, MACsec key agreement), LLDP, PTP.
const ETH_P_SLOW: u16 = 0x8809;
const ETH_P_PAE: u16 = 0x888e;
const ETH_P_LLDP: u16 = 0x88cc;
const ETH_P_1588: u16 = 0x88f7;
/// Largest 802.3 length field; larger values are EtherTypes.
const ETH_MAX_LEN: u16 = 1500;
/// LLC header of a spanning-tree BPDU: DSAP and SSAP 0x42, UI frame.
const LLC_STP: [u8; 3] = [0x42, 0x42, 0x03];
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// TCP option kinds: end of list, no-operation, window scale.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WSCALE: u8 = 3;
/// Largest number of TCP options (NOPs included) walked looking for the
/// window scale: Linux puts it 5th, Windows 3rd, macOS 3rd of 8.
const MAX_TCP_OPTS: usize = 8;
/// Largest window-scale shift (RFC 7323).
const MAX_WSCALE: u8 = 14;
/// TCP SYN flag.
const TCP_SYN: u8 = 0x02;

/// Largest number of IPv6 extension headers walked before giving up.
pub(crate) const MAX_IPV6_EXT: usize = 8;
/// Largest IPv6 extension-header chain (bytes) accepted.
const MAX_IPV6_EXT_BYTES: usize = 1024;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// Layer-3 kind of a parsed packet: ARP.
pub(crate) const L3_ARP: u8 = 1;
/// A non-IP frame to an IEEE 802.1 link-local group address.
pub(crate) const L2_LINK_LOCAL: u8 = 2;
/// IPv4.
pub(crate) const L3_IPV4: u8 = 4;
/// IPv6.
pub(crate) const L3_IPV6: u8 = 6;

/// The packet's start and end as the program context gives them, and its
/// length on the wire. XDP frames are linear (`wire_len == end - start`);
/// a TC skb may carry more bytes than its linear part, so IP and transport
/// length fields are checked against `wire_len` while every read is
/// checked against `end`.
pub(crate) struct Bounds {
    start: usize,
    end: usize,
    wire_len: usize,
}

impl Bounds {
    /// Wraps `data`/`data_end` of an XDP or TC context and the packet's full length.
    #[inline(always)]
    pub(crate) fn new(start: usize, end: usize, wire_len: usize) -> Self {
        Bounds {
            start,
            end,
            wire_len,
        }
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

    /// Length of the packet on the wire (length fields are checked against it).
    #[inline(always)]
    fn len(&self) -> usize {
        self.wire_len
    }
}

/// An IPv4 address in a 16-byte address field: its 4 bytes, then zeros.
/// Built from two 64-bit words: `[0; 16]` followed by a 4-byte copy
/// compiles to a byte-at-a-time `memset` call of the other 12 bytes.
#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    let w: [u64; 2] = [u64::from(u32::from_ne_bytes(a)), 0];
    // SAFETY: [u64; 2] and [u8; 16] have the same size and every bit
    // pattern is valid for both; on the little-endian BPF target the
    // address lands in bytes 0..4.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) }
}

/// What the parser learned about a packet it could fully validate.
///
/// Laid out with the addresses first and 8-byte aligned, so that clearing
/// and copying them compiles to word stores: at byte alignment LLVM's BPF
/// backend emits byte-at-a-time `memset`/`memcpy` loops (a measured part of
/// the per-packet cost).
#[repr(C, align(8))]
pub(crate) struct Parsed {
    /// Source address (IPv4 in the first 4 bytes), network order.
    pub src: [u8; 16],
    /// Destination address (IPv4 in the first 4 bytes), network order.
    pub dst: [u8; 16],
    /// [`L3_ARP`], [`L3_IPV4`] or [`L3_IPV6`].
    pub l3: u8,
    /// IP protocol of the transport header (0 for ARP).
    pub proto: u8,
    /// Source port, host order (0 without ports).
    pub sport: u16,
    /// Destination port, host order (0 without ports).
    pub dport: u16,
    /// ICMP/ICMPv6 type (0 otherwise).
    pub icmp_type: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`].
    pub frag: u8,
    /// Protocol that keys the fragment table: the IPv4 protocol, or the
    /// next header of the IPv6 fragment header (the same for the leading
    /// fragment and its followers whatever headers follow it).
    pub frag_proto: u8,
    /// IPv4 identification or IPv6 fragment id (fragments only).
    pub frag_id: u32,
    /// ICMP/ICMPv6 echo id (the echo's "port").
    pub echo_id: u16,
    /// TCP sequence number.
    pub tcp_seq: u32,
    /// TCP acknowledgement number.
    pub tcp_ack: u32,
    /// TCP window field (unscaled).
    pub tcp_win: u16,
    /// TCP window-scale option of a SYN (`CT_NO_WSCALE` when absent).
    pub tcp_wscale: u8,
    /// TCP payload bytes in this packet.
    pub tcp_len: u32,
    /// Offset of the transport header (for ICMP errors: where the quoted packet starts - 8).
    pub l4_off: usize,
    /// End of the IP datagram (offset).
    pub limit: usize,
}

/// Not a fragment.
pub(crate) const FRAG_NONE: u8 = 0;
/// First fragment of a fragmented datagram (offset 0, more fragments).
pub(crate) const FRAG_FIRST: u8 = 1;
/// Non-first fragment: no transport header, ports unknown.
pub(crate) const FRAG_LATER: u8 = 2;

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
            tcp_flags: 0,
            frag: FRAG_NONE,
            frag_proto: 0,
            frag_id: 0,
            echo_id: 0,
            tcp_seq: 0,
            tcp_ack: 0,
            tcp_win: 0,
            tcp_wscale: CT_NO_WSCALE,
            tcp_len: 0,
            l4_off: 0,
            limit: 0,
        }
    }
}

/// The EtherType of a packet that starts at its IP header, from the IP
/// version nibble (XDP on a device without a link-layer header). A packet
/// too short to tell is handed to the IPv4 parser, which reports it
/// truncated.
#[inline(always)]
pub(crate) fn raw_ip_ethertype(pkt: &Bounds) -> u16 {
    // Two bytes: every IP header is longer, and see `tcp_wscale`.
    match pkt.bytes::<2>(0) {
        Some(b) if b[0] >> 4 == 6 => ETH_P_IPV6,
        Some(b) if b[0] >> 4 != 4 => ETH_P_UNKNOWN,
        _ => ETH_P_IP,
    }
}

/// Not an EtherType the parser knows (never matches).
const ETH_P_UNKNOWN: u16 = 0xffff;

/// Whether the frame goes to an IEEE 802.1 link-local group address,
/// 01:80:c2:00:00:00 to 01:80:c2:00:00:0f (STP, LACP, LLDP, 802.1X...).
#[inline(always)]
fn to_link_local_group(pkt: &Bounds) -> bool {
    match pkt.bytes::<6>(0) {
        Some(d) => {
            d[0] == 0x01
                && d[1] == 0x80
                && d[2] == 0xc2
                && d[3] == 0
                && d[4] == 0
                && d[5] & 0xf0 == 0
        }
        None => false,
    }
}

/// Whether a frame to a link-local group address is one of the control
/// protocols allowed there: an STP/RSTP/MSTP BPDU (an 802.3 length, then
/// LLC 42-42-03), LACP/Marker/OAM (0x8809), EAPOL (0x888e), LLDP (0x88cc)
/// or PTP (0x88f7). `off` is where the frame's payload starts, after the
/// EtherType or length field.
#[inline(always)]
fn is_link_control(pkt: &Bounds, off: usize, ethertype: u16) -> bool {
    match ethertype {
        ETH_P_SLOW | ETH_P_PAE | ETH_P_LLDP | ETH_P_1588 => true,
        len if (3..=ETH_MAX_LEN).contains(&len) => pkt.bytes::<3>(off) == Some(LLC_STP),
        _ => false,
    }
}

/// Not a reason: what `parse::<false>` returns for an IPv6 packet, which
/// the IPv6 program judges (the caller hands the packet on; it is never
/// counted). Above every reason, so it would count as a drop.
pub(crate) const HAND_OFF_V6: u8 = 0xff;

/// The IP parser of the program's family: `V6` false for the IPv4
/// program (an IPv6 packet is `Err(HAND_OFF_V6)`), true for the IPv6 one
/// (which only receives IPv6 packets: an IPv4 one there is refused).
#[inline(always)]
fn parse_ip<const V6: bool>(
    pkt: &Bounds,
    off: usize,
    ethertype: u16,
    scratch: *mut usize,
) -> Result<Parsed, u8> {
    match ethertype {
        ETH_P_IP if !V6 => parse_ipv4(pkt, off),
        ETH_P_IPV6 if V6 => parse_ipv6(pkt, off, scratch),
        ETH_P_IPV6 => Err(HAND_OFF_V6),
        _ => Err(reason::DROP_ETHERTYPE),
    }
}

/// Parses a packet. `raw` is `None` when it begins with an Ethernet
/// header, else the EtherType of the IP header it begins with (devices
/// without a link layer). `Err` carries the drop reason, or
/// [`HAND_OFF_V6`] (see [`parse_ip`]). Each program is built with one
/// IP family (`V6`), so the verifier never walks the other's paths.
/// `scratch`: where the IPv6 extension-header walk may park its offset
/// (a per-CPU map slot, see `opaque`), or null.
#[inline(always)]
pub(crate) fn parse<const V6: bool>(
    pkt: &Bounds,
    raw: Option<u16>,
    scratch: *mut usize,
) -> Result<Parsed, u8> {
    if let Some(ethertype) = raw {
        return parse_ip::<V6>(pkt, 0, ethertype, scratch);
    }
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
        ETH_P_IP | ETH_P_IPV6 => parse_ip::<V6>(pkt, off, ethertype, scratch),
        ETH_P_ARP => {
            // Fixed part, then sender/target hardware and protocol addresses.
            let h = pkt.bytes::<ARP_HLEN>(off).ok_or(reason::DROP_BAD_ARP)?;
            let len = ARP_HLEN + 2 * (h[4] as usize + h[5] as usize);
            if off + len > pkt.len() {
                return Err(reason::DROP_BAD_ARP);
            }
            Ok(Parsed::empty(L3_ARP))
        }
        // Bridges never forward frames to these addresses: they stay on
        // one link. Only the control protocols that need them are link
        // control frames; anything else sent there (MPLS, PPPoE, MACsec
        // data, an unknown EtherType) is dropped as link-local-denied.
        _ if to_link_local_group(pkt) => {
            if is_link_control(pkt, off, ethertype) {
                Ok(Parsed::empty(L2_LINK_LOCAL))
            } else {
                Err(reason::DROP_LINK_LOCAL)
            }
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
    let mut p = Parsed::empty(L3_IPV4);
    p.proto = hdr[9];
    p.frag_proto = hdr[9];
    p.hop_limit = hdr[8];
    p.src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    if frag & 0x3fff != 0 {
        p.frag_id = u32::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        if frag & 0x1fff != 0 {
            // A non-first fragment carries no transport header to judge.
            p.frag = FRAG_LATER;
            return Ok(p);
        }
        p.frag = FRAG_FIRST;
    }
    parse_l4(pkt, off + ihl, off + tot_len, p)
}

#[inline(always)]
fn parse_ipv6(pkt: &Bounds, off: usize, scratch: *mut usize) -> Result<Parsed, u8> {
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
                let off_m = u16::from_be_bytes([ext[2], ext[3]]);
                nexthdr = ext[0];
                p.frag_proto = nexthdr;
                l4 += IPV6_FRAG_HLEN;
                if off_m & 0xfff9 != 0 {
                    p.frag_id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                    if off_m & 0xfff8 != 0 {
                        // Non-first fragment: no transport header to judge.
                        p.proto = nexthdr;
                        p.frag = FRAG_LATER;
                        return Ok(p);
                    }
                    p.frag = FRAG_FIRST;
                }
            }
            _ => {
                done = true;
                break;
            }
        }
        // Past an extension header the offset goes through memory the
        // verifier does not follow (`scratch`) and comes back bounded only by the
        // check below: every mix of header kinds then reaches the next
        // step with the same offset range, so the verifier walks the next
        // step once instead of once per mix (without it this walk alone
        // cost about 170,000 processed instructions).
        l4 = opaque(l4, scratch);
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

/// `v`, as the verifier sees a number read from a map: any value. Stored
/// at `scratch` (a per-CPU map slot the caller hands over) and read back;
/// `v` itself when there is none.
#[inline(always)]
fn opaque(v: usize, scratch: *mut usize) -> usize {
    if scratch.is_null() {
        return v;
    }
    // SAFETY: `scratch` points into this CPU's slot of a per-CPU array,
    // valid for the program run, used by nothing else while the parser
    // runs (see `parse`).
    unsafe {
        core::ptr::write_volatile(scratch, v);
        core::ptr::read_volatile(scratch)
    }
}

/// Parses the transport header at `off`; `limit` is the end of the IP
/// datagram (the header must lie inside it, not just inside the frame).
#[inline(always)]
fn parse_l4(pkt: &Bounds, off: usize, limit: usize, mut p: Parsed) -> Result<Parsed, u8> {
    p.l4_off = off;
    p.limit = limit;
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
            p.tcp_seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            p.tcp_ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            p.tcp_flags = h[13];
            p.tcp_win = u16::from_be_bytes([h[14], h[15]]);
            p.tcp_len = (limit - off - doff) as u32;
            if p.tcp_flags & TCP_SYN != 0 {
                p.tcp_wscale = tcp_wscale(pkt, off, doff);
            }
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
            // The UDP length covers the whole datagram: only an unfragmented
            // one must fit in this packet (a leading fragment carries part).
            if p.frag == FRAG_NONE && off + len > limit {
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
            p.echo_id = u16::from_be_bytes([h[4], h[5]]);
        }
        _ => {}
    }
    Ok(p)
}

/// The window-scale option among the options of the TCP header at `off`
/// of `doff` bytes (a SYN's),
/// or `CT_NO_WSCALE`. A malformed option list ends the walk: the flow is
/// then tracked without scaling, which only narrows the RST window.
#[inline(always)]
fn tcp_wscale(pkt: &Bounds, off: usize, doff: usize) -> u8 {
    let mut rel = TCP_MIN_HLEN;
    for _ in 0..MAX_TCP_OPTS {
        // Read first, then check against the header's end: had the header
        // check come first, the compiler (which knows the header lies in
        // an XDP frame) would drop the read's own bounds check, which the
        // verifier needs. Two bytes at a time (kind and length); a lone
        // EOL/NOP in the last byte holds no scale anyway.
        let Some(o) = pkt.bytes::<2>(off + rel) else {
            break;
        };
        if rel + 2 > doff || o[0] == TCPOPT_EOL {
            break;
        }
        if o[0] == TCPOPT_WSCALE && o[1] == 3 {
            let Some(v) = pkt.bytes::<3>(off + rel) else {
                break;
            };
            if rel + 3 > doff {
                break;
            }
            return if v[2] > MAX_WSCALE { MAX_WSCALE } else { v[2] };
        }
        let step = match (o[0], o[1]) {
            (TCPOPT_NOP, _) => 1,
            (_, len) if len < 2 => 0, // malformed: stop
            (_, len) => len as usize,
        };
        if step == 0 || rel + step >= doff {
            break;
        }
        // `rel` < `doff` <= 60, so the mask changes nothing; it gives
        // every path the same bounds at the loop head, so the verifier
        // prunes them instead of exploring each mix of NOPs and options.
        rel = (rel + step) & 63;
    }
    CT_NO_WSCALE
}

/// ICMP destination unreachable / time exceeded / parameter problem, and
/// ICMPv6 destination unreachable / packet too big / time exceeded /
/// parameter problem: the messages that quote a packet.
#[inline(always)]
pub(crate) fn is_icmp_error(l3: u8, proto: u8, icmp_type: u8) -> bool {
    if l3 == L3_IPV4 && proto == IPPROTO_ICMP {
        matches!(icmp_type, 3 | 11 | 12)
    } else if l3 == L3_IPV6 && proto == IPPROTO_ICMPV6 {
        matches!(icmp_type, 1..=4)
    } else {
        false
    }
}

/// The packet quoted by an ICMP error: protocol, addresses and the first
/// 4 bytes after its IP header (ports, or type/code/checksum of an echo
/// followed by its id at +4).
#[repr(C, align(8))]
pub(crate) struct Quoted {
    /// Quoted source address.
    pub src: [u8; 16],
    /// Quoted destination address.
    pub dst: [u8; 16],
    /// Protocol of the quoted packet.
    pub proto: u8,
    /// Quoted source port (echo id for a quoted echo).
    pub sport: u16,
    /// Quoted destination port (0 for a quoted echo).
    pub dport: u16,
}

/// Parses the packet quoted by the ICMP error `p` (IP header without
/// extension headers, then 8 bytes). None if anything does not fit: the
/// error then relates to no flow (the outer packet itself was valid).
#[inline(always)]
pub(crate) fn quoted(pkt: &Bounds, p: &Parsed) -> Option<Quoted> {
    // Bounded for the verifier (the IPv6 program reads `l4_off` back from
    // a map): every transport header starts within the first 2 KiB.
    let off = (p.l4_off & 0x7ff) + ICMP_HLEN;
    let mut q = Quoted {
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
    };
    let l4 = if p.l3 == L3_IPV4 {
        let h = pkt.bytes::<IPV4_MIN_HLEN>(off)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
            return None;
        }
        q.proto = h[9];
        q.src = v4_mapped([h[12], h[13], h[14], h[15]]);
        q.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
        off + ihl
    } else {
        let h = pkt.bytes::<IPV6_HLEN>(off)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        q.proto = h[6];
        q.src.copy_from_slice(&h[8..24]);
        q.dst.copy_from_slice(&h[24..40]);
        off + IPV6_HLEN
    };
    if l4 + 8 > p.limit {
        return None;
    }
    let b = pkt.bytes::<8>(l4)?;
    match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            q.sport = u16::from_be_bytes([b[0], b[1]]);
            q.dport = u16::from_be_bytes([b[2], b[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => q.sport = u16::from_be_bytes([b[4], b[5]]),
        _ => return None,
    }
    Some(q)
}
