//! Connection-table keys, one form per IP family, each with its own
//! table of our own (`cttable`): IPv4 flows in `SEG_CT4_SETS` /
//! `SEG_CT4_WAYS` under the 16-byte `CtKey4`, IPv6 flows in
//! `SEG_CT6_SETS` / `SEG_CT6_WAYS` under the 48-byte `CtKey`. A lookup
//! costs about its key's length in hashing and comparing, so an IPv4
//! packet pays a third of what the 48-byte key costs. `ct` is generic
//! over the form: each program carries only its family's key and table.
//!
//! Both forms hold the interface the flow was seen on (`SEGBPF_IFINDEX`,
//! set at load from the kernel): a flow opened on one interface never lets
//! a packet pass on another. `CtKey4` holds 24 bits of it; `attach`
//! refuses a larger index, and an instance loaded with one anyway tracks
//! no IPv4 flow (its packets are judged by the policy alone): fail closed.

use segbpf_common::{
    CT4_MAX_IFINDEX, Ct4, Ct6, CtKey, CtKey4, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6,
    ct_port_bit,
};

use crate::{
    ctseen,
    cttable::{CT4, CT6, CtTable, SetTable},
    maps::SEGBPF_IFINDEX,
    parse::{L3_IPV4, L3_IPV6, Parsed, Quoted},
};

/// A flow as the host sees it: ports oriented (local, remote) from a
/// packet's (source, destination) and direction; each key form picks the
/// addresses (`ingress`: the host is the destination). The addresses are
/// carried as two words each ([`addrs`], [`quoted_addrs`]): a copy of a
/// 16-byte array through a reference compiled to a byte loop or a
/// `memmove` call (LLVM loses the parser's 8-byte alignment on the way).
pub(crate) struct Oriented {
    pub proto: u8,
    pub ingress: bool,
    pub src: [u64; 2],
    pub dst: [u64; 2],
    pub local_port: u16,
    pub remote_port: u16,
}

// `addrs` and `quoted_addrs` read the address fields as aligned words.
const _: () = assert!(core::mem::align_of::<Parsed>() == 8);
const _: () = assert!(core::mem::offset_of!(Parsed, src) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Parsed, dst) % 8 == 0);
const _: () = assert!(core::mem::align_of::<Quoted>() == 8);
const _: () = assert!(core::mem::offset_of!(Quoted, src) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Quoted, dst) % 8 == 0);

/// A packet's (source, destination) addresses as words.
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the address fields sit at 8-byte aligned offsets of 8-byte aligned structs (asserted above): aligned word loads, where a byte-array copy became a byte loop or a memmove call"
)]
#[inline(always)]
pub(crate) fn addrs(p: &Parsed) -> ([u64; 2], [u64; 2]) {
    // SAFETY: `src` and `dst` are 16 bytes at 8-byte aligned offsets of
    // the 8-byte aligned `Parsed` (asserted above): two aligned u64 words
    // each; any bit pattern is a valid u64.
    unsafe {
        (
            (&raw const p.src).cast::<[u64; 2]>().read(),
            (&raw const p.dst).cast::<[u64; 2]>().read(),
        )
    }
}

/// A quoted packet's (source, destination) addresses as words.
#[allow(
    clippy::cast_ptr_alignment,
    reason = "the address fields sit at 8-byte aligned offsets of 8-byte aligned structs (asserted above): aligned word loads, where a byte-array copy became a byte loop or a memmove call"
)]
#[inline(always)]
pub(crate) fn quoted_addrs(q: &Quoted) -> ([u64; 2], [u64; 2]) {
    // SAFETY: as in `addrs`, for the 8-byte aligned `Quoted`.
    unsafe {
        (
            (&raw const q.src).cast::<[u64; 2]>().read(),
            (&raw const q.dst).cast::<[u64; 2]>().read(),
        )
    }
}

/// An address's bytes from its words (the inverse of the reads above).
#[inline(always)]
fn bytes(w: [u64; 2]) -> [u8; 16] {
    // SAFETY: [u64; 2] and [u8; 16] have the same size and every bit
    // pattern is valid for both.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) }
}

/// The first 4 bytes of an address (an IPv4 address), in memory order.
#[inline(always)]
fn first4(w: [u64; 2]) -> u32 {
    if cfg!(target_endian = "little") {
        w[0] as u32
    } else {
        (w[0] >> 32) as u32
    }
}

/// Orients a packet's addresses and ports: ingress, the host is the
/// destination; egress, the source. ICMP echo has no remote "port":
/// requests and replies share the id (`sport` holds it).
#[inline(always)]
pub(crate) fn orient(
    dir: u8,
    proto: u8,
    (src, dst): ([u64; 2], [u64; 2]),
    sport: u16,
    dport: u16,
) -> Oriented {
    let ingress = dir == DIR_INGRESS;
    let echo = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
    Oriented {
        proto,
        ingress,
        src,
        dst,
        local_port: if echo || !ingress { sport } else { dport },
        remote_port: if echo {
            0
        } else if ingress {
            sport
        } else {
            dport
        },
    }
}

/// A connection-table key form and its table.
pub(crate) trait FlowKey: Sized + 'static {
    /// The parser's family (`parse::L3_*`) of the packets it keys.
    const L3: u8;
    /// The key of the flow `o` on this instance's interface, or None when
    /// this form cannot hold it exactly (then the flow is not tracked).
    fn make(o: &Oriented) -> Option<Self>;
    /// The IP protocol.
    fn proto(&self) -> u8;
    /// The local port (host byte order, as the key holds it).
    fn local_port(&self) -> u16;
    /// The local port's bit in the remote's last-seen bucket
    /// (`segbpf_common::ct_port_bit`).
    #[inline(always)]
    fn port_bit(&self) -> u32 {
        ct_port_bit(self.proto(), self.local_port())
    }
    /// The remote's last-seen bucket and fingerprint (`ctseen`).
    fn remote(&self) -> (u32, u32);
    /// The flow's last-seen bucket (`ctseen`).
    fn flow_bucket(&self) -> u32;
    /// The table's type.
    type Table: CtTable<Self> + 'static;
    /// The table of the form's flows, half-open and assured (a flow's
    /// class is its way's bit).
    fn table() -> &'static Self::Table;
}

impl FlowKey for CtKey4 {
    const L3: u8 = L3_IPV4;

    #[inline(always)]
    fn make(o: &Oriented) -> Option<Self> {
        let ifindex = SEGBPF_IFINDEX.load();
        // A frozen global: the verifier knows it, only one branch is kept.
        if ifindex > CT4_MAX_IFINDEX {
            return None;
        }
        let (src, dst) = (first4(o.src), first4(o.dst));
        Some(CtKey4 {
            local_be: if o.ingress { dst } else { src },
            remote_be: if o.ingress { src } else { dst },
            local_port: o.local_port,
            remote_port: o.remote_port,
            proto_ifindex: ifindex << 8 | u32::from(o.proto),
        })
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        CtKey4::proto(self)
    }

    #[inline(always)]
    fn local_port(&self) -> u16 {
        self.local_port
    }

    #[inline(always)]
    fn remote(&self) -> (u32, u32) {
        ctseen::remote_v4(self)
    }

    #[inline(always)]
    fn flow_bucket(&self) -> u32 {
        ctseen::flow_bucket_v4(self)
    }

    type Table = SetTable<Ct4>;

    #[inline(always)]
    fn table() -> &'static SetTable<Ct4> {
        &CT4
    }
}

impl FlowKey for CtKey {
    const L3: u8 = L3_IPV6;

    #[inline(always)]
    fn make(o: &Oriented) -> Option<Self> {
        Some(CtKey {
            family: 6,
            proto: o.proto,
            _pad: [0; 2],
            local_port: o.local_port,
            remote_port: o.remote_port,
            local: bytes(if o.ingress { o.dst } else { o.src }),
            remote: bytes(if o.ingress { o.src } else { o.dst }),
            ifindex: SEGBPF_IFINDEX.load(),
            _pad2: [0; 4],
        })
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn local_port(&self) -> u16 {
        self.local_port
    }

    #[inline(always)]
    fn remote(&self) -> (u32, u32) {
        ctseen::remote(self)
    }

    #[inline(always)]
    fn flow_bucket(&self) -> u32 {
        ctseen::flow_bucket(self)
    }

    type Table = SetTable<Ct6>;

    #[inline(always)]
    fn table() -> &'static SetTable<Ct6> {
        &CT6
    }
}
