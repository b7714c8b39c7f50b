//! Services (`[services.*]`, enforced by the cgroup_skb programs): map
//! names, the cgroup table's values, the per-service configuration, the
//! service-peer key and the flow table of socket-side views.
//!
//! Policy slots work as for interfaces, folded into the peer and port
//! keys' `slot` byte: `slot * SVC_SLOT_STRIDE + service id`, so one
//! [`SvcCgroup`] entry names a cgroup's service in both slots and a reload
//! flips [`MAP_SVC_ACT`] once.

use bytemuck::{Pod, Zeroable};

/// Hash: cgroup id (u64) -> [`SvcCgroup`].
pub const MAP_SVC_CG: &str = "SEG_SVC_CG";
/// Array of [`SvcConfig`], index `slot * SVC_SLOT_STRIDE + service id`
/// (id 0: the slot's globals).
pub const MAP_SVC_CFG: &str = "SEG_SVC_CFG";
/// Array, one u32: the services' policy slot in force (0 or 1).
pub const MAP_SVC_ACT: &str = "SEG_SVC_ACT";
/// LPM trie: (slot byte, direction, IPv4 peer) -> class.
pub const MAP_SVC_V4: &str = "SEG_SVC_V4";
/// LPM trie: (slot byte, direction, IPv6 peer) -> class.
pub const MAP_SVC_V6: &str = "SEG_SVC_V6";
/// LPM trie: (slot byte, class, protocol, port prefix) -> rule.
pub const MAP_SVC_PORTS: &str = "SEG_SVC_PORTS";
/// Hash: [`SvcPeerKey`] -> class of the rules naming that peer service.
pub const MAP_SVC_PEER: &str = "SEG_SVC_PEER";
/// LRU hash: [`SvcFlowKey`] -> [`SvcFlow`], one entry per socket side of
/// an allowed flow.
pub const MAP_SVC_CT: &str = "SEG_SVC_CT";
/// Per-CPU array of `Counter`s, index `(slot byte) * 4 + dir * 2 + passed`.
pub const MAP_SVC_STATS: &str = "SEG_SVC_STATS";
/// Ring buffer of [`SvcEvent`]s: packets of a service dropped (or let
/// through in audit mode), rate-limited in the kernel.
pub const MAP_SVC_EVENTS: &str = "SEG_SVC_EVENTS";
/// Per-CPU array, two u64: the event rate limiter's window start (ns) and
/// the events emitted in it.
pub const MAP_SVC_RATE: &str = "SEG_SVC_RATE";
/// Events per second and CPU the services programs emit at most.
pub const SVC_EVENTS_PER_SEC: u64 = 100;
/// Bytes of the services event ring.
pub const SVC_EVENT_RING_BYTES: u32 = 1 << 18;
/// Name of the cgroup_skb ingress program.
pub const PROG_SVC_INGRESS: &str = "segbpf_svc_ingress";
/// Name of the cgroup_skb egress program.
pub const PROG_SVC_EGRESS: &str = "segbpf_svc_egress";
/// Name of the empty cgroup_skb program (the benchmarks' floor).
pub const PROG_SVC_EMPTY: &str = "segbpf_svc_empty";
/// Name of the dry-run ingress program (`segbpf trace --services`): the
/// judgement of [`PROG_SVC_INGRESS`] that writes nothing but its record.
pub const PROG_SVC_DRY_INGRESS: &str = "segbpf_svc_dry_in";
/// Name of the dry-run egress program.
pub const PROG_SVC_DRY_EGRESS: &str = "segbpf_svc_dry_eg";
/// Whom the dry-run programs judge as (index 0, a [`SvcDry`]); never
/// pinned, filled in the dry-run instance only.
pub const MAP_SVC_DRY: &str = "SEG_SVC_DRY";
/// What the dry-run programs decided (index 0, a [`SvcTrace`]).
pub const MAP_SVC_TRC: &str = "SEG_SVC_TRC";
/// Name of the level probe (`svc_level.rs`): run once with
/// BPF_PROG_TEST_RUN, never attached.
pub const PROG_SVC_LEVEL: &str = "segbpf_svc_level";
/// The level probe's output: index L holds the id of the test socket's
/// cgroup's ancestor at absolute level L (0 below the socket's cgroup).
/// Never pinned; [`SVC_LEVELS`] `u64`s, so every object load (interface
/// attachments too) creates it at a few hundred bytes.
pub const MAP_SVC_LEVEL: &str = "SEG_SVC_LVL";
/// Levels the probe reads: 0..=32.
pub const SVC_LEVELS: u32 = 33;
/// [`SvcTrace::reason`]: a rule of the service allowed it.
pub const SVC_WHY_RULE: u8 = 1;
/// An ICMP echo request (`icmp = true`).
pub const SVC_WHY_ICMP: u8 = 2;
/// The service's default for the direction.
pub const SVC_WHY_DEFAULT: u8 = 3;
/// The sender may send only to named services, and this is none of them.
pub const SVC_WHY_NEED_PEER: u8 = 4;
/// A header that could not be read.
pub const SVC_WHY_UNPARSED: u8 = 5;

/// Every map the services attachment pins.
pub const SVC_PINNED_MAPS: [&str; 10] = [
    MAP_SVC_CG,
    MAP_SVC_CFG,
    MAP_SVC_ACT,
    MAP_SVC_V4,
    MAP_SVC_V6,
    MAP_SVC_PORTS,
    MAP_SVC_PEER,
    MAP_SVC_CT,
    MAP_SVC_STATS,
    MAP_SVC_EVENTS,
];

/// Service ids per slot: 1..=`MAX_SERVICES`; the slot byte is
/// `slot * SVC_SLOT_STRIDE + id`.
pub const SVC_SLOT_STRIDE: u8 = 128;
/// Most services one policy may define.
pub const MAX_SERVICES: usize = 126;
/// [`SvcCgroup::svc`]: a known cgroup in no service (its sockets pass).
pub const SVC_NONE: u8 = 0;
/// [`SvcPeerKey::peer`] of the class of every `to_services` rule (the
/// receiver is checked at its ingress).
pub const SVC_PEER_ANY: u8 = 255;
/// Deepest cgroup level (below the hierarchy's root) the programs look at.
pub const SVC_MAX_LEVEL: u32 = 16;
/// Default capacity of the flow table.
pub const DEFAULT_SVC_CT_ENTRIES: u32 = 65_536;
/// Entries of [`MAP_SVC_CFG`]: two slots of `SVC_SLOT_STRIDE`.
pub const SVC_CFG_ENTRIES: u32 = 256;

/// Value of the cgroup table: what a cgroup is in each policy slot.
/// Userspace writes the effective service (a cgroup below a service's
/// cgroup inherits it), so the deepest known ancestor of a socket's cgroup
/// decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcCgroup {
    /// Per slot: a service id (1..=126) or [`SVC_NONE`].
    pub svc: [u8; 2],
    /// Per slot: 1 when the cgroup is an ancestor of a service's cgroup.
    /// Its children that have no entry yet are not classified by
    /// userspace: their sockets are held (dropped) until it writes one.
    pub guard: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SvcCgroup>() == 4);

/// Per (slot, service) configuration; id 0 holds the slot's globals
/// (`generation`, `max_level`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcConfig {
    /// Policy generation.
    pub generation: u64,
    /// Ingress default (`ACTION_DROP` / `ACTION_ALLOW`).
    pub ingress_default: u8,
    /// Egress default.
    pub egress_default: u8,
    /// 1: replies to allowed flows pass.
    pub established: u8,
    /// 1: ICMP echo requests pass by default.
    pub icmp: u8,
    /// 1: audit mode (would-be drops pass).
    pub audit: u8,
    /// 1: this entry is a defined service (or the slot's globals).
    pub present: u8,
    /// Globals only: the deepest level of a known cgroup (0 = root).
    pub max_level: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Globals only: the secret key of the sender stamps made under this
    /// slot (128 random bits, [`svc_stamp_check`]; a new one each time a
    /// reload fills the slot, kept when the slot leaves force so a packet
    /// stamped just before a flip still names its sender). Only programs
    /// and `CAP_BPF`/`CAP_SYS_ADMIN` read it, never a packet.
    pub stamp_key: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<SvcConfig>() == 32);

/// Value of the services' peer tries and peer table: a class (the
/// layout of `PeerClass`; its own type so the programs' lookups are their
/// own code, apart from the interface programs').
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcClass {
    /// Class id.
    pub class_id: u32,
}
const _: () = assert!(core::mem::size_of::<SvcClass>() == 4);

/// Value of the services' port trie: the allowing rule (the layout of
/// `RuleRef`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcRule {
    /// Service rule id.
    pub rule_id: u32,
}
const _: () = assert!(core::mem::size_of::<SvcRule>() == 4);

/// Key of the service-peer table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcPeerKey {
    /// Slot byte of the judging service.
    pub slot: u8,
    /// `DIR_INGRESS` (`from_services`) or `DIR_EGRESS` (`to_services`).
    pub dir: u8,
    /// Peer service id in the same slot, or [`SVC_PEER_ANY`].
    pub peer: u8,
    /// Explicit padding.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SvcPeerKey>() == 4);

/// A flow as one local socket sees it. IPv4 addresses use the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcFlowKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// Local port (ICMP echo: the id), network order.
    pub lport_be: [u8; 2],
    /// Remote port (ICMP echo: 0), network order.
    pub rport_be: [u8; 2],
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// Local address, network order.
    pub laddr_be: [u8; 16],
    /// Remote address, network order.
    pub raddr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SvcFlowKey>() == 40);

/// [`SvcFlow::flags`]: the flow's sender passed its egress only through
/// `to_services`; the receiver's ingress checks it is one of them.
pub const SVC_FLOW_NEED_PEER: u32 = 1;
/// [`SvcFlow::flags`]: the entry was made by a packet the socket received
/// (its peer's port may be reused by another local process later: over
/// loopback a later packet must come from the same peer service).
pub const SVC_FLOW_INBOUND: u32 = 2;
/// [`SvcFlow::flags`], with [`SVC_FLOW_NEED_PEER`] on a flow the socket
/// opened: a reply over loopback named the answering service, which
/// [`SvcFlow::peer`] now holds; only its stamp makes later replies part
/// of the flow (without the flag, every reply is checked against the
/// `to_services` rules).
pub const SVC_FLOW_ANSWERED: u32 = 4;
/// [`SvcFlow::flags`]: a flow only audit mode let through (the rules
/// refused its first packet). Every packet of it is reported as one the
/// policy refuses, and the entry keeps the direction of that first
/// packet, so when enforcement starts (a new generation) the flow is
/// judged again as what it is, never as a reply to the service's own
/// answer.
pub const SVC_FLOW_AUDITED: u32 = 8;

/// A socket side of an allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcFlow {
    /// The socket's own cgroup id: only sockets of that cgroup use the entry.
    pub sock_cg: u64,
    /// The service cgroup the socket was in (0: none). A record only: a
    /// local peer learns who sent a packet from its stamp, never from here.
    pub svc_cg: u64,
    /// Last packet, ns (`bpf_ktime_get_coarse_ns`).
    pub last_ns: u64,
    /// Over loopback, an entry made by a received packet (or, on a flow
    /// the socket opened through `to_services`, by the reply that named
    /// the answering service, [`SVC_FLOW_ANSWERED`]): the sender's
    /// identity from that packet's stamp, `generation << 8 | stamp &`
    /// [`SVC_STAMP_ID_MASK`] (the slot bit and the service id, with the
    /// policy generation the stamp was made under; identity bits 0: no
    /// service or no valid stamp, still with the generation). A later packet is part of the flow only with the same
    /// identity: a local process that reuses the 4-tuple (closed or
    /// shared) is judged anew, and so is a flow after a reload.
    pub peer: u64,
    /// `SVC_FLOW_*`.
    pub flags: u32,
    /// Rule that allowed it (`u32::MAX`: a default).
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<SvcFlow>() == 40);

/// The sender's identity on a loopback packet: the egress program writes
/// `skb->priority` of every packet a socket sends towards the loopback
/// device (of a service: check bits | [`SVC_STAMP_NEED_PEER`] | slot << 7
/// | service id; of anything else: 0), after netfilter's POSTROUTING, and
/// the ingress program on loopback reads it back: the same skb, in the
/// same network namespace, nothing in the kernel's loopback path rewrites
/// it. The check bits are [`svc_stamp_check`]: a keyed hash (SipHash-1-3
/// with the slot's secret [`SvcConfig::stamp_key`]) of the packet's
/// family, protocol, addresses and ports and the identity bits
/// ([`SVC_STAMP_IDENT_MASK`]), never 0. A stamp read off one packet (a
/// packet tap on `lo` sees priorities) is therefore worth nothing on
/// another 5-tuple, nor after a reload drew a new key; guessing it
/// succeeds with probability 2^-23 per packet. A priority a process may
/// set for itself (`SO_PRIORITY` 0..6 without `CAP_NET_ADMIN`/
/// `CAP_NET_RAW`) is never a stamp, and the stamp of a socket's packets
/// is overwritten anyway. The ingress program sets the priority back to 0
/// once it has read it, so no receiver below the cgroup root reads a
/// stamp (`SO_RCVPRIORITY`).
pub const SVC_STAMP_CHECK_MASK: u32 = 0xffff_fe00;
/// Stamp bit: the sender passed its egress only through `to_services`;
/// the receiver's ingress checks it is one of them.
pub const SVC_STAMP_NEED_PEER: u32 = 0x100;
/// Stamp bits naming the sender: the policy slot (bit 7) and the service
/// id in it (bits 0..6).
pub const SVC_STAMP_ID_MASK: u32 = 0xff;
/// Stamp bits the check covers besides the packet: need-peer, slot, id.
pub const SVC_STAMP_IDENT_MASK: u32 = 0x1ff;
/// Index of the services' stats (`slot * SVC_SLOT_STRIDE +` this, in
/// [`MAP_SVC_STATS`]'s slot bytes; no service has this id): loopback
/// packets received with a priority that is not a valid stamp for them
/// (forged, replayed on another 5-tuple or from before a key change),
/// judged as from no service. Its `dir = ingress, passed = 0` counter
/// holds them.
pub const SVC_STATS_FORGED: u8 = 127;

/// One SipHash round.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per loopback packet: no BPF-to-BPF call"
)]
#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 of a 40-byte message given as five little-endian words.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per loopback packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn siphash13_40(key: &[u64; 2], m: &[u64; 5]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < 5 {
        v[3] ^= m[i];
        sip_round(&mut v);
        v[0] ^= m[i];
        i += 1;
    }
    // The last block: the length (40) in the top byte, no tail bytes.
    let b = 40u64 << 56;
    v[3] ^= b;
    sip_round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// An address (IPv4: the first 4 bytes, the rest 0) as the two words
/// [`svc_stamp_check`] takes: its bytes read little-endian.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per loopback packet: no BPF-to-BPF call"
)]
#[inline(always)]
pub fn svc_stamp_addr(a: &[u8; 16]) -> [u64; 2] {
    let w = |o: usize| {
        u64::from_le_bytes([
            a[o],
            a[o + 1],
            a[o + 2],
            a[o + 3],
            a[o + 4],
            a[o + 5],
            a[o + 6],
            a[o + 7],
        ])
    };
    [w(0), w(8)]
}

/// The check bits ([`SVC_STAMP_CHECK_MASK`], never all 0) of the stamp
/// with identity `ident` ([`SVC_STAMP_IDENT_MASK`] bits) on a packet:
/// family (4 or 6), IP protocol, source and destination address (as
/// [`svc_stamp_addr`] gives them) and the ports as the programs read them
/// (ICMP echo: the id as the requester's port). Both programs compute it
/// from the same skb; the key never leaves the maps.
#[allow(
    clippy::inline_always,
    reason = "the datapath calls it per loopback packet: no BPF-to-BPF call"
)]
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the packet's fields as the programs hold them"
)]
pub fn svc_stamp_check(
    key: &[u64; 2],
    family: u8,
    proto: u8,
    src: [u64; 2],
    dst: [u64; 2],
    sport: u16,
    dport: u16,
    ident: u32,
) -> u32 {
    let last = (u64::from(sport) << 48)
        | (u64::from(dport) << 32)
        | (u64::from(proto) << 24)
        | (u64::from(family) << 16)
        | u64::from(ident & SVC_STAMP_IDENT_MASK);
    let h = siphash13_40(key, &[src[0], src[1], dst[0], dst[1], last]);
    let c = ((h >> 32) as u32) & SVC_STAMP_CHECK_MASK;
    if c == 0 { 1 << 9 } else { c }
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    /// SipHash-1-3 against an independent reading of the reference
    /// algorithm (byte-wise message, generic rounds), for a few keys and
    /// messages.
    #[test]
    fn siphash13_matches_a_bytewise_reference() {
        fn reference(k0: u64, k1: u64, msg: &[u8]) -> u64 {
            let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
            let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
            let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
            let mut v3 = k1 ^ 0x7465_6462_7974_6573;
            let round = |v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64| {
                *v0 = v0.wrapping_add(*v1);
                *v1 = v1.rotate_left(13) ^ *v0;
                *v0 = v0.rotate_left(32);
                *v2 = v2.wrapping_add(*v3);
                *v3 = v3.rotate_left(16) ^ *v2;
                *v0 = v0.wrapping_add(*v3);
                *v3 = v3.rotate_left(21) ^ *v0;
                *v2 = v2.wrapping_add(*v1);
                *v1 = v1.rotate_left(17) ^ *v2;
                *v2 = v2.rotate_left(32);
            };
            let full = msg.len() / 8;
            for i in 0..full {
                let mut b = [0u8; 8];
                b.copy_from_slice(&msg[i * 8..i * 8 + 8]);
                let m = u64::from_le_bytes(b);
                v3 ^= m;
                round(&mut v0, &mut v1, &mut v2, &mut v3);
                v0 ^= m;
            }
            let mut last = (msg.len() as u64 & 0xff) << 56;
            for (i, b) in msg[full * 8..].iter().enumerate() {
                last |= u64::from(*b) << (8 * i);
            }
            v3 ^= last;
            round(&mut v0, &mut v1, &mut v2, &mut v3);
            v0 ^= last;
            v2 ^= 0xff;
            for _ in 0..3 {
                round(&mut v0, &mut v1, &mut v2, &mut v3);
            }
            v0 ^ v1 ^ v2 ^ v3
        }
        let mut x = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let key = [next(), next()];
            let m = [next(), next(), next(), next(), next()];
            let mut bytes = [0u8; 40];
            for (i, w) in m.iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            assert_eq!(siphash13_40(&key, &m), reference(key[0], key[1], &bytes));
        }
    }

    /// The arguments of one [`svc_stamp_check`] call.
    #[derive(Clone, Copy)]
    struct Stamp {
        key: [u64; 2],
        family: u8,
        proto: u8,
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        ident: u32,
    }

    /// One change of a [`Stamp`]'s arguments.
    type Change = fn(&mut Stamp);

    impl Stamp {
        fn check(&self) -> u32 {
            svc_stamp_check(
                &self.key,
                self.family,
                self.proto,
                svc_stamp_addr(&self.src),
                svc_stamp_addr(&self.dst),
                self.sport,
                self.dport,
                self.ident,
            )
        }
    }

    /// Every field of the packet, every identity bit and the key change
    /// the check bits; they are never 0 and stay inside their mask.
    #[test]
    fn stamp_check_binds_packet_identity_and_key() {
        let mut lo6 = [0u8; 16];
        lo6[15] = 1;
        let base = Stamp {
            key: [0x1111_2222_3333_4444, 0x5555_6666_7777_8888],
            family: 6,
            proto: 17,
            src: lo6,
            dst: lo6,
            sport: 40000,
            dport: 3306,
            ident: 0x81,
        };
        let base_check = base.check();
        assert_ne!(base_check, 0);
        assert_eq!(base_check & !SVC_STAMP_CHECK_MASK, 0);
        // (what changes, the change): each alone must change the bits.
        let variants: [(&str, Change); 11] = [
            ("key's low bit", |s| s.key[0] ^= 1),
            ("key's high bit", |s| s.key[1] ^= 1 << 63),
            ("family", |s| s.family = 4),
            ("proto", |s| s.proto = 6),
            ("source address", |s| s.src[0] = 0xfd),
            ("destination address", |s| s.dst[0] = 0xfd),
            ("source port", |s| s.sport = 40001),
            ("destination port", |s| s.dport = 3307),
            ("identity 0x82", |s| s.ident = 0x82),
            ("identity 0x01", |s| s.ident = 0x01),
            ("identity 0x181", |s| s.ident = 0x181),
        ];
        for (what, change) in variants {
            let mut v = base;
            change(&mut v);
            assert_ne!(
                v.check(),
                base_check,
                "{what} left the check bits unchanged"
            );
        }
        // Over many source ports the check bits spread over their mask.
        let mut seen_bits = 0u32;
        let mut distinct = [0u32; 64];
        for p in 0..64u16 {
            let c = Stamp {
                sport: 40000 + p,
                ..base
            }
            .check();
            assert_ne!(c, 0);
            seen_bits |= c;
            distinct[usize::from(p)] = c;
        }
        assert_eq!(seen_bits, SVC_STAMP_CHECK_MASK);
        distinct.sort_unstable();
        assert!(distinct.windows(2).all(|w| w[0] != w[1]));
    }
}

/// A packet of a service that was dropped (or, `audit = 1`, would have
/// been and was let through).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SvcEvent {
    /// `bpf_ktime_get_ns` when it was judged.
    pub ts_ns: u64,
    /// Slot byte of the service (`slot * SVC_SLOT_STRIDE + id`).
    pub slot: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// 1: audit mode, the packet passed.
    pub audit: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
    /// Source port (ICMP echo: the id), network order.
    pub sport_be: [u8; 2],
    /// Destination port, network order.
    pub dport_be: [u8; 2],
    /// Explicit padding.
    pub _pad2: [u8; 4],
    /// Source address, network order (IPv4: first 4 bytes).
    pub src_be: [u8; 16],
    /// Destination address, network order.
    pub dst_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SvcEvent>() == 56);

// SAFETY: #[repr(C)], explicit padding, bytemuck::Pod.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcEvent {}

/// Idle timeout of a TCP flow entry, seconds.
pub const SVC_TCP_IDLE_S: u64 = 7_440;
/// Idle timeout of a UDP or ICMP flow entry, seconds.
pub const SVC_UDP_IDLE_S: u64 = 180;

// SAFETY: all types are #[repr(C)], have no padding holes (explicit
// `_pad` fields) and are `bytemuck::Pod`.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcCgroup {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcConfig {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcPeerKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcFlowKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcFlow {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcClass {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcRule {}

/// Whom a dry-run program judges a packet as (`SEG_SVC_DRY[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcDry {
    /// The service's id in the slot in force (1..=`MAX_SERVICES`).
    pub svc: u8,
    /// Ingress over loopback: the sending socket's service id (0: none).
    pub peer: u8,
    /// 1: the packet goes over loopback.
    pub loopback: u8,
    /// Explicit padding.
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SvcDry>() == 8);

/// What a dry-run program decided (`SEG_SVC_TRC[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcTrace {
    /// 1: written by a run (userspace zeroes it before each run).
    pub valid: u8,
    /// 1: the policy allows it.
    pub allowed: u8,
    /// `SVC_WHY_*`.
    pub reason: u8,
    /// 1: audit mode (a drop would pass).
    pub audit: u8,
    /// The rule that allowed it (`u32::MAX`: none).
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<SvcTrace>() == 8);

// SAFETY: #[repr(C)], explicit padding, bytemuck::Pod.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcDry {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SvcTrace {}
