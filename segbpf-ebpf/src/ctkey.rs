//! Connection-table keys, one form per IP family, each with its own pair
//! of tables: IPv4 flows in `SEG_CT4` / `SEG_CT4_NEW` under the 16-byte
//! `CtKey4`, IPv6 flows in `SEG_CT` / `SEG_CT_NEW` under the 48-byte
//! `CtKey`. A hash lookup costs about its key's length, so an IPv4 packet
//! pays a third of what the shared 48-byte key cost it. `ct` is generic
//! over the form: each program carries only its family's key and tables.
//!
//! Both forms hold the interface the flow was seen on (`SEGBPF_IFINDEX`,
//! set at load from the kernel): a flow opened on one interface never lets
//! a packet pass on another. `CtKey4` holds 24 bits of it; `attach`
//! refuses a larger index, and an instance loaded with one anyway tracks
//! no IPv4 flow (its packets are judged by the policy alone): fail closed.

use aya_ebpf::maps::LruHashMap;
use segbpf_common::{
    CT4_MAX_IFINDEX, CtEntry, CtKey, CtKey4, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6,
};

use crate::{
    ctseen,
    maps::{SEG_CT, SEG_CT_NEW, SEG_CT4, SEG_CT4_NEW, SEGBPF_IFINDEX},
    parse::{L3_IPV4, L3_IPV6},
};

/// A flow as the host sees it: addresses and ports oriented (local,
/// remote) from a packet's (source, destination) and direction.
pub(crate) struct Oriented<'a> {
    pub proto: u8,
    pub local: &'a [u8; 16],
    pub remote: &'a [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// Orients a packet's addresses and ports: ingress, the host is the
/// destination; egress, the source. ICMP echo has no remote "port":
/// requests and replies share the id (`sport` holds it).
#[inline(always)]
pub(crate) fn orient<'a>(
    dir: u8,
    proto: u8,
    src: &'a [u8; 16],
    dst: &'a [u8; 16],
    sport: u16,
    dport: u16,
) -> Oriented<'a> {
    let ingress = dir == DIR_INGRESS;
    let echo = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
    Oriented {
        proto,
        local: if ingress { dst } else { src },
        remote: if ingress { src } else { dst },
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

/// A connection-table key form and its two tables.
pub(crate) trait FlowKey: Sized + 'static {
    /// The parser's family (`parse::L3_*`) of the packets it keys.
    const L3: u8;
    /// The key of the flow `o` on this instance's interface, or None when
    /// this form cannot hold it exactly (then the flow is not tracked).
    fn make(o: &Oriented<'_>) -> Option<Self>;
    /// The IP protocol.
    fn proto(&self) -> u8;
    /// The remote's last-seen bucket (`ctseen`).
    fn seen_bucket(&self) -> u32;
    /// The table of assured flows.
    fn assured() -> &'static LruHashMap<Self, CtEntry>;
    /// The table of half-open flows.
    fn half_open() -> &'static LruHashMap<Self, CtEntry>;
}

impl FlowKey for CtKey4 {
    const L3: u8 = L3_IPV4;

    #[inline(always)]
    fn make(o: &Oriented<'_>) -> Option<Self> {
        let ifindex = SEGBPF_IFINDEX.load();
        // A frozen global: the verifier knows it, only one branch is kept.
        if ifindex > CT4_MAX_IFINDEX {
            return None;
        }
        let a = |b: &[u8; 16]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        Some(CtKey4 {
            local_be: a(o.local),
            remote_be: a(o.remote),
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
    fn seen_bucket(&self) -> u32 {
        ctseen::bucket_v4(self)
    }

    #[inline(always)]
    fn assured() -> &'static LruHashMap<Self, CtEntry> {
        &SEG_CT4
    }

    #[inline(always)]
    fn half_open() -> &'static LruHashMap<Self, CtEntry> {
        &SEG_CT4_NEW
    }
}

impl FlowKey for CtKey {
    const L3: u8 = L3_IPV6;

    #[inline(always)]
    fn make(o: &Oriented<'_>) -> Option<Self> {
        Some(CtKey {
            family: 6,
            proto: o.proto,
            _pad: [0; 2],
            local_port: o.local_port,
            remote_port: o.remote_port,
            local: *o.local,
            remote: *o.remote,
            ifindex: SEGBPF_IFINDEX.load(),
            _pad2: [0; 4],
        })
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn seen_bucket(&self) -> u32 {
        ctseen::bucket(self)
    }

    #[inline(always)]
    fn assured() -> &'static LruHashMap<Self, CtEntry> {
        &SEG_CT
    }

    #[inline(always)]
    fn half_open() -> &'static LruHashMap<Self, CtEntry> {
        &SEG_CT_NEW
    }
}
