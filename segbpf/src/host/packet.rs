//! Packet builder: Ethernet frames with optional VLAN tags, IPv4 (with
//! options and fragment fields) or IPv6 (with extension headers), and a TCP,
//! UDP, ICMP/ICMPv6 or raw transport. Used by `segbpf trace` and by the
//! BPF_PROG_TEST_RUN fixture tests, which then cut or patch the bytes to
//! make malformed variants (the offsets of each header are returned).

use std::net::IpAddr;

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// An IPv6 extension header to insert before the transport header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext {
    /// Header type (0 hop-by-hop, 43 routing, 44 fragment, 60 destination options, 51 AH).
    pub kind: u8,
    /// The header's bytes after its next-header byte (length byte included);
    /// for the fragment header: 7 bytes.
    pub body: Vec<u8>,
}

impl Ext {
    /// An 8-byte options header (hop-by-hop, destination options, routing) filled with PadN.
    pub fn options(kind: u8) -> Self {
        Ext {
            kind,
            body: vec![0, 1, 4, 0, 0, 0, 0],
        }
    }

    /// A fragment header with `offset` in 8-byte units.
    pub fn fragment(offset: u16, more: bool, id: u32) -> Self {
        let off = (offset << 3) | u16::from(more);
        let mut body = vec![0];
        body.extend_from_slice(&off.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        Ext { kind: 44, body }
    }
}

/// IPv4 fragment fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag4 {
    /// Offset in 8-byte units.
    pub offset: u16,
    /// More-fragments flag.
    pub more: bool,
}

/// Description of a packet to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    /// Source address (its family picks IPv4 or IPv6).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol of the transport header.
    pub proto: u8,
    /// Source port (TCP/UDP) or ICMP echo id.
    pub sport: u16,
    /// Destination port (TCP/UDP).
    pub dport: u16,
    /// TCP flags.
    pub tcp_flags: u8,
    /// TCP sequence number.
    pub tcp_seq: u32,
    /// TCP acknowledgement number.
    pub tcp_ack: u32,
    /// TCP window field.
    pub tcp_window: u16,
    /// TCP options (padded with NOPs to 4 bytes by the builder).
    pub tcp_options: Vec<u8>,
    /// ICMP/ICMPv6 type.
    pub icmp_type: u8,
    /// VLAN ids, outermost first (two tags: 802.1ad outer, 802.1Q inner).
    pub vlans: Vec<u16>,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 options (padded to 4 bytes by the builder).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment fields.
    pub frag4: Frag4,
    /// IPv4 identification.
    pub ipv4_id: u16,
    /// IPv6 extension headers, in order.
    pub ipv6_ext: Vec<Ext>,
    /// Transport payload.
    pub payload: Vec<u8>,
}

/// A built frame and where its headers start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    /// Frame bytes.
    pub bytes: Vec<u8>,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
}

impl PacketSpec {
    /// A packet of protocol `proto` between two addresses (ports 0, TTL 64).
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8) -> Self {
        PacketSpec {
            src,
            dst,
            proto,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            tcp_seq: 1,
            tcp_ack: 0,
            tcp_window: 65535,
            tcp_options: Vec::new(),
            icmp_type: 0,
            vlans: Vec::new(),
            ttl: 64,
            ipv4_options: Vec::new(),
            frag4: Frag4::default(),
            ipv4_id: 0x1234,
            ipv6_ext: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A TCP SYN.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        PacketSpec {
            sport,
            dport,
            tcp_flags: TCP_SYN,
            ..Self::new(src, dst, IPPROTO_TCP)
        }
    }

    /// A UDP datagram with a small payload.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        PacketSpec {
            sport,
            dport,
            payload: b"segbpf".to_vec(),
            ..Self::new(src, dst, IPPROTO_UDP)
        }
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) echo request.
    pub fn echo(src: IpAddr, dst: IpAddr) -> Self {
        let (proto, ty) = if src.is_ipv4() {
            (IPPROTO_ICMP, 8)
        } else {
            (IPPROTO_ICMPV6, 128)
        };
        PacketSpec {
            icmp_type: ty,
            sport: 0x5e9b,
            ..Self::new(src, dst, proto)
        }
    }

    /// Builds the frame.
    ///
    /// # Panics
    ///
    /// If the source and destination addresses are of different families.
    pub fn build(&self) -> Built {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        let l3 = f.len();
        let l4_bytes = self.transport();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let ihl = 5 + opts.len() / 4;
                let tot = ihl * 4 + l4_bytes.len();
                let frag = (self.frag4.offset & 0x1fff) | if self.frag4.more { 0x2000 } else { 0 };
                let mut h = vec![(4 << 4) | ihl as u8, 0];
                h.extend_from_slice(&(tot as u16).to_be_bytes());
                h.extend_from_slice(&self.ipv4_id.to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&opts);
                let csum = checksum(&h);
                h[10..12].copy_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let kinds: Vec<u8> = self.ipv6_ext.iter().map(|e| e.kind).collect();
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = kinds.get(i + 1).copied().unwrap_or(self.proto);
                    ext.push(next);
                    ext.extend_from_slice(&e.body);
                }
                let first = kinds.first().copied().unwrap_or(self.proto);
                let plen = ext.len() + l4_bytes.len();
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(plen as u16).to_be_bytes());
                f.extend_from_slice(&[first, self.ttl]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("PacketSpec: source and destination families differ"),
        }
        let l4 = f.len();
        f.extend_from_slice(&l4_bytes);
        Built { bytes: f, l3, l4 }
    }

    fn transport(&self) -> Vec<u8> {
        let mut t = Vec::new();
        match self.proto {
            IPPROTO_TCP => {
                let mut opts = self.tcp_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(1); // NOP
                }
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&self.tcp_seq.to_be_bytes());
                t.extend_from_slice(&self.tcp_ack.to_be_bytes());
                t.extend_from_slice(&[((5 + opts.len() / 4) as u8) << 4, self.tcp_flags]);
                t.extend_from_slice(&self.tcp_window.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                t.extend_from_slice(&opts);
            }
            IPPROTO_UDP => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                t.extend_from_slice(&[0, 0]);
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                t.extend_from_slice(&[self.icmp_type, 0, 0, 0]);
                t.extend_from_slice(&self.sport.to_be_bytes()); // echo id
                t.extend_from_slice(&1u16.to_be_bytes()); // echo seq
            }
            _ => {}
        }
        t.extend_from_slice(&self.payload);
        t
    }
}

impl PacketSpec {
    /// The datagram this spec builds, cut into fragments as an IP stack
    /// cuts it: the transport header keeps the whole datagram's lengths
    /// (a UDP length covers every fragment), and only the first fragment
    /// carries it. `cuts` are the offsets into the fragmentable part where
    /// a new fragment starts (multiples of 8, increasing, inside it).
    ///
    /// IPv4: the fragmentable part is the IP payload; the id is
    /// `ipv4_id`, and `frag4` is ignored. IPv6: the first `unfragmentable`
    /// headers of `ipv6_ext` stay in every fragment, then comes a fragment
    /// header with `id`; the remaining extension headers and the transport
    /// are fragmentable (`ipv6_ext` must not hold a fragment header).
    pub fn fragments(&self, unfragmentable: usize, cuts: &[usize], id: u32) -> Vec<Built> {
        let whole = PacketSpec {
            frag4: Frag4::default(),
            ..self.clone()
        }
        .build();
        let f = &whole.bytes;
        let l3 = whole.l3;
        let v4 = self.src.is_ipv4();
        // Start of the fragmentable part, and where the next-header byte
        // that must point at the fragment header is (IPv6).
        let (unfrag_end, next_at) = if v4 {
            (l3 + usize::from(f[l3] & 0x0f) * 4, 0)
        } else {
            let mut at = l3 + 40;
            let mut next_at = l3 + 6;
            for e in &self.ipv6_ext[..unfragmentable] {
                next_at = at;
                at += 1 + e.body.len();
            }
            (at, next_at)
        };
        let part = &f[unfrag_end..];
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.insert(0, 0);
        bounds.push(part.len());
        bounds
            .windows(2)
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let more = b < part.len();
                let mut out = f[..unfrag_end].to_vec();
                let l4;
                if v4 {
                    let ihl = unfrag_end - l3;
                    let tot = (ihl + b - a) as u16;
                    out[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                    out[l3 + 4..l3 + 6].copy_from_slice(&(id as u16).to_be_bytes());
                    let off = ((a / 8) as u16 & 0x1fff) | if more { 0x2000 } else { 0 };
                    out[l3 + 6..l3 + 8].copy_from_slice(&off.to_be_bytes());
                    out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                    let csum = checksum(&out[l3..l3 + ihl]);
                    out[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
                    l4 = out.len();
                } else {
                    let inner_next = out[next_at];
                    out[next_at] = 44;
                    let off = (((a / 8) as u16) << 3) | u16::from(more);
                    out.push(inner_next);
                    out.push(0);
                    out.extend_from_slice(&off.to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                    let plen = (out.len() - l3 - 40 + b - a) as u16;
                    out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
                    l4 = out.len();
                }
                out.extend_from_slice(&part[a..b]);
                Built { bytes: out, l3, l4 }
            })
            .collect()
    }
}

impl Built {
    /// The IP packet (the frame without its Ethernet header and VLAN tags),
    /// e.g. to quote it in an ICMP error.
    pub fn ip_packet(&self) -> &[u8] {
        &self.bytes[self.l3..]
    }
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame (always allowed by the datapath).
pub fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 198, 18, 0, 1]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 2]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_tcp_layout() {
        let b = PacketSpec::tcp(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            1000,
            80,
        )
        .build();
        assert_eq!(b.l3, 14);
        assert_eq!(b.l4, 34);
        assert_eq!(b.bytes.len(), 54);
        assert_eq!(checksum(&b.bytes[14..34]), 0, "valid IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([b.bytes[36], b.bytes[37]]), 80);
    }

    #[test]
    fn fragments_carry_the_datagram_udp_length() {
        let mut s = PacketSpec::udp(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            5,
            53,
        );
        s.payload = vec![7; 3000];
        let frags = s.fragments(0, &[1480, 2960], 0x77);
        assert_eq!(frags.len(), 3);
        let first = &frags[0].bytes;
        assert_eq!(
            u16::from_be_bytes([first[38], first[39]]),
            3008,
            "UDP length of the datagram"
        );
        assert_eq!(
            u16::from_be_bytes([first[16], first[17]]),
            1500,
            "IPv4 total length"
        );
        assert_eq!(&first[20..22], &[0x20, 0], "more fragments, offset 0");
        assert_eq!(checksum(&first[14..34]), 0);
        let last = &frags[2].bytes;
        assert_eq!(
            u16::from_be_bytes([last[20], last[21]]),
            2960 / 8,
            "offset, no MF"
        );
        let total: usize = frags.iter().map(|b| b.bytes.len() - 34).sum();
        assert_eq!(total, 3008);

        let mut s6 = PacketSpec::udp(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            5,
            53,
        );
        s6.payload = vec![7; 100];
        s6.ipv6_ext = vec![Ext::options(0), Ext::options(60)];
        let frags = s6.fragments(1, &[64], 9);
        let first = &frags[0].bytes;
        assert_eq!(
            first[14 + 40],
            44,
            "hop-by-hop points to the fragment header"
        );
        assert_eq!(
            first[14 + 48],
            60,
            "fragment header points to destination options"
        );
        assert_eq!(&first[14 + 50..14 + 52], &[0, 1], "offset 0, more");
        assert_eq!(first[14 + 56], 17, "destination options point to UDP");
        assert_eq!(
            u16::from_be_bytes([first[14 + 64 + 4], first[14 + 64 + 5]]),
            108
        );
        let second = &frags[1].bytes;
        assert_eq!(
            &second[14 + 50..14 + 52],
            &[0, 8 << 3],
            "offset 64 bytes, last"
        );
        assert_eq!(
            u16::from_be_bytes([second[18], second[19]]) as usize,
            second.len() - 54
        );
    }

    #[test]
    fn ipv6_ext_chain_links_next_headers() {
        let mut s = PacketSpec::udp(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            5,
            53,
        );
        s.ipv6_ext = vec![Ext::options(0), Ext::fragment(0, true, 7)];
        s.vlans = vec![10, 20];
        let b = s.build();
        assert_eq!(&b.bytes[12..14], &[0x88, 0xa8]);
        assert_eq!(&b.bytes[16..18], &[0x81, 0x00]);
        assert_eq!(b.l3, 22);
        assert_eq!(b.bytes[b.l3 + 6], 0, "first next header is hop-by-hop");
        assert_eq!(b.bytes[b.l3 + 40], 44, "hop-by-hop points to fragment");
        assert_eq!(b.bytes[b.l3 + 48], 17, "fragment points to UDP");
        assert_eq!(b.l4, b.l3 + 56);
    }
}
