//! Connection tracking: the connection-table key and value, their states
//! and default timeouts, and the fragment table of IP datagrams whose first
//! fragment passed.

#[cfg(doc)]
use crate::{Config, DIR_EGRESS, DIR_INGRESS, NO_RULE};
use bytemuck::{Pod, Zeroable};

/// Default connection-tracking timeouts (seconds), as in [`Config`].
pub mod ct_timeout {
    /// TCP before the reply (SYN sent).
    pub const TCP_SYN: u32 = 60;
    /// TCP established.
    pub const TCP_EST: u32 = 6 * 3600;
    /// TCP after RST, or FIN from both sides.
    pub const TCP_CLOSE: u32 = 10;
    /// UDP before the reply.
    pub const UDP: u32 = 30;
    /// UDP after the reply.
    pub const UDP_EST: u32 = 120;
    /// ICMP echo.
    pub const ICMP: u32 = 30;
    /// Fragments of one datagram.
    pub const FRAG: u32 = 30;
}

/// Connection-table key, from the host's point of view: the same key for
/// both directions of a flow. The IPv6 table (`SEG_CT6_SETS`) uses it;
/// the IPv4 table uses [`CtKey4`], and userspace reads its keys
/// widened to this form ([`CtKey4::widen`]). ICMP echo uses the echo id as `local_port`
/// and 0 as `remote_port`. The connection tables are shared by every
/// attachment of a network namespace, so the key holds the interface the
/// flow was seen on (`ifindex`, set at load from the kernel): a flow
/// opened on one interface never lets packets pass on another. 8-byte
/// aligned so the datapath builds and hashes it with word loads and stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// Port on this host (host order).
    pub local_port: u16,
    /// Port of the peer (host order).
    pub remote_port: u16,
    /// Index of the interface whose attachment tracks the flow.
    pub ifindex: u32,
    /// Explicit padding.
    pub _pad2: [u8; 4],
    /// Address on this host (IPv4 in the first 4 bytes), network order.
    pub local: [u8; 16],
    /// Address of the peer, network order.
    pub remote: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 48);
const _: () = assert!(core::mem::align_of::<CtKey>() == 8);

/// The largest interface index an IPv4 connection-table key
/// ([`CtKey4`]) holds: 24 bits. `attach` refuses an interface whose index
/// is larger, so the key's interface is always exact.
pub const CT4_MAX_IFINDEX: u32 = 0x00FF_FFFF;

/// Connection-table key of an IPv4 flow, from the host's point of view:
/// [`CtKey`] in 16 bytes, for the IPv4 tables (`SEG_CT4`, `SEG_CT4_NEW`).
/// A hash lookup costs about the key's length in hashing and comparing: a
/// third of the 48-byte key's. The interface is exact: its index (at most
/// [`CT4_MAX_IFINDEX`], which `attach` checks) shares a word with the
/// protocol, `proto_ifindex = ifindex << 8 | proto`. 8-byte aligned so
/// the datapath builds it with two word stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey4 {
    /// Address on this host, network order (its bytes as on the wire).
    pub local_be: u32,
    /// Address of the peer, network order.
    pub remote_be: u32,
    /// Port on this host (host order).
    pub local_port: u16,
    /// Port of the peer (host order).
    pub remote_port: u16,
    /// `ifindex << 8 | proto` (native order): the IP protocol in the low
    /// byte, the index of the interface whose attachment tracks the flow
    /// in the high 24 bits.
    pub proto_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);
const _: () = assert!(core::mem::align_of::<CtKey4>() == 8);

impl CtKey4 {
    /// The IP protocol.
    #[allow(
        clippy::inline_always,
        reason = "the datapath calls it per packet: no BPF-to-BPF call"
    )]
    #[inline(always)]
    pub const fn proto(&self) -> u8 {
        (self.proto_ifindex & 0xff) as u8
    }

    /// The interface index.
    pub const fn ifindex(&self) -> u32 {
        self.proto_ifindex >> 8
    }

    /// The [`CtKey`] of the same flow (family 4), the form every reader
    /// of the tables works with.
    pub fn widen(&self) -> CtKey {
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&self.local_be.to_ne_bytes());
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&self.remote_be.to_ne_bytes());
        CtKey {
            family: 4,
            proto: self.proto(),
            local_port: self.local_port,
            remote_port: self.remote_port,
            ifindex: self.ifindex(),
            local,
            remote,
            ..CtKey::default()
        }
    }
}

impl CtKey {
    /// The [`CtKey4`] of an IPv4 key, or None for an IPv6 key, or an
    /// interface index beyond [`CT4_MAX_IFINDEX`] (no IPv4 table holds it).
    pub fn narrow(&self) -> Option<CtKey4> {
        if self.family != 4 || self.ifindex > CT4_MAX_IFINDEX {
            return None;
        }
        let a = |b: &[u8; 16]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        Some(CtKey4 {
            local_be: a(&self.local),
            remote_be: a(&self.remote),
            local_port: self.local_port,
            remote_port: self.remote_port,
            proto_ifindex: self.ifindex << 8 | u32::from(self.proto),
        })
    }
}

/// Connection state: opened, no reply seen yet.
pub const CT_NEW: u8 = 1;
/// Connection state: a reply was seen.
pub const CT_ESTABLISHED: u8 = 2;
/// Connection state: TCP RST, or FIN from both sides. A closing flow is
/// half-open again (its way's assured bit cleared), so it is evicted
/// before any established one.
pub const CT_CLOSING: u8 = 3;
/// `CtEntry::fin` bit: FIN seen from the originator.
pub const CT_FIN_ORIG: u8 = 1;
/// `CtEntry::fin` bit: FIN seen from the replier.
pub const CT_FIN_REPLY: u8 = 2;

/// `CtEntry::seen` bit / index of the originator's side in the per-side arrays.
pub const CT_SIDE_ORIG: usize = 0;
/// Index of the replier's side in the per-side arrays.
pub const CT_SIDE_REPLY: usize = 1;
/// `CtEntry::wscale` of a side that sent no window-scale option.
pub const CT_NO_WSCALE: u8 = 0xff;

/// Connection-table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet.
    pub last_seen_ns: u64,
    /// Rule that allowed the first packet ([`NO_RULE`] for a default allow).
    pub rule_id: u32,
    /// Direction of the first packet ([`DIR_INGRESS`] / [`DIR_EGRESS`]).
    pub origin: u8,
    /// [`CT_NEW`], [`CT_ESTABLISHED`] or [`CT_CLOSING`].
    pub state: u8,
    /// FIN bits ([`CT_FIN_ORIG`], [`CT_FIN_REPLY`]).
    pub fin: u8,
    /// TCP: bit `1 << side` once a segment of that side was seen.
    pub seen: u8,
    /// TCP, per side ([`CT_SIDE_ORIG`], [`CT_SIDE_REPLY`]): the highest
    /// sequence number sent plus one (`seq + len`, SYN and FIN count one).
    pub seq_end: [u32; 2],
    /// TCP, per side: the largest window that side advertised (scaled).
    pub max_win: [u32; 2],
    /// TCP, per side: the window-scale option of its SYN ([`CT_NO_WSCALE`] if none).
    pub wscale: [u8; 2],
    /// Flow accounting: the OR of the TCP flags seen, both sides.
    pub tcp_flags: u8,
    /// 1 when audit mode let the flow's first packet through although the
    /// policy would have dropped it: the flow is tracked (so its replies
    /// are not reported again), and forgotten once enforcement resumes.
    pub audit: u8,
    /// TCP: the initial sequence number of the replier's SYN (valid once
    /// the replier's side is seen): the handshake's last ACK must
    /// acknowledge it before the flow is assured.
    pub isn_reply: u32,
    /// Flow accounting: `bpf_ktime_get_coarse_ns` of the first packet.
    pub first_seen_ns: u64,
    /// Flow accounting, per side ([`CT_SIDE_ORIG`], [`CT_SIDE_REPLY`]):
    /// packets that passed on this entry (the first one included).
    pub packets: [u64; 2],
    /// Flow accounting, per side: bytes (frame lengths) of those packets.
    pub bytes: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 80);

/// Seconds an entry in `state` of protocol `proto` lives after its last
/// packet, from the configuration in force: the datapath expires entries
/// by it and `segbpf flows` leaves expired ones out by the same rule.
#[inline(always)]
pub fn ct_timeout_s(cfg: &crate::Config, proto: u8, state: u8) -> u32 {
    use crate::{IPPROTO_TCP, IPPROTO_UDP};
    match (proto, state) {
        (IPPROTO_TCP, CT_NEW) => cfg.ct_tcp_syn_s,
        (IPPROTO_TCP, CT_ESTABLISHED) => cfg.ct_tcp_est_s,
        (IPPROTO_TCP, _) => cfg.ct_tcp_close_s,
        (IPPROTO_UDP, CT_NEW) => cfg.ct_udp_s,
        (IPPROTO_UDP, _) => cfg.ct_udp_est_s,
        _ => cfg.ct_icmp_s,
    }
}

/// Whether a connection-table `entry` of protocol `proto` is a tracked
/// flow at `now` (`CLOCK_MONOTONIC` ns, the base of the kernel's coarse
/// stamps) under the configuration in force `cfg`: its last packet is at
/// most [`ct_timeout_s`] old, and it is not a flow audit mode let through
/// while audit mode is now off. This is the datapath's rule (the entry
/// stays in its LRU table until evicted, dead); `segbpf flows`, `status`
/// and the metrics count by it.
#[inline]
pub fn ct_entry_live(cfg: &crate::Config, proto: u8, entry: &CtEntry, now: u64) -> bool {
    if entry.audit != 0 && cfg.audit == 0 {
        return false;
    }
    let ttl_ns = u64::from(ct_timeout_s(cfg, proto, entry.state)) * 1_000_000_000;
    now.saturating_sub(entry.last_seen_ns) <= ttl_ns
}

/// Fragment-table key: one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol of the datagram.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// IPv4 identification (16 bits) or IPv6 fragment id.
    pub id: u32,
    /// Source address, network order.
    pub src: [u8; 16],
    /// Destination address, network order.
    pub dst: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Fragment-table value: the first fragment passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragEntry {
    /// `bpf_ktime_get_coarse_ns` of the first fragment.
    pub first_seen_ns: u64,
    /// Rule that allowed the first fragment ([`NO_RULE`] if none).
    pub rule_id: u32,
    /// Reason the first fragment passed.
    pub reason: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragEntry>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_live_until_its_state_timeout_and_audit_entries_only_in_audit_mode() {
        use crate::{Config, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
        const S: u64 = 1_000_000_000;
        let cfg = Config {
            ct_tcp_syn_s: 60,
            ct_tcp_est_s: 3600,
            ct_tcp_close_s: 10,
            ct_udp_s: 30,
            ct_udp_est_s: 120,
            ct_icmp_s: 20,
            ..Config::default()
        };
        let at = |state, last| CtEntry {
            state,
            last_seen_ns: last,
            ..CtEntry::default()
        };
        let now = 10_000 * S;
        // Exactly the timeout old is live (the kernel's `<=`), a ns more is not.
        for (proto, state, ttl) in [
            (IPPROTO_TCP, CT_NEW, 60),
            (IPPROTO_TCP, CT_ESTABLISHED, 3600),
            (IPPROTO_TCP, CT_CLOSING, 10),
            (IPPROTO_UDP, CT_NEW, 30),
            (IPPROTO_UDP, CT_ESTABLISHED, 120),
            (IPPROTO_ICMP, CT_NEW, 20),
        ] {
            assert!(ct_entry_live(&cfg, proto, &at(state, now - ttl * S), now));
            assert!(!ct_entry_live(
                &cfg,
                proto,
                &at(state, now - ttl * S - 1),
                now
            ));
        }
        // A stamp after `now` (another CPU's coarse clock) is live.
        assert!(ct_entry_live(
            &cfg,
            IPPROTO_TCP,
            &at(CT_CLOSING, now + S),
            now
        ));
        let audited = CtEntry {
            audit: 1,
            ..at(CT_ESTABLISHED, now)
        };
        assert!(!ct_entry_live(&cfg, IPPROTO_TCP, &audited, now));
        let audit_on = Config { audit: 1, ..cfg };
        assert!(ct_entry_live(&audit_on, IPPROTO_TCP, &audited, now));
    }

    #[test]
    fn an_ipv4_key_narrows_and_widens_back() {
        let k = CtKey {
            family: 4,
            proto: 6,
            local_port: 443,
            remote_port: 50_000,
            ifindex: CT4_MAX_IFINDEX,
            local: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote: [198, 19, 255, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..CtKey::default()
        };
        let n = k.narrow().expect("an IPv4 key");
        assert_eq!(n.proto(), 6);
        assert_eq!(n.ifindex(), CT4_MAX_IFINDEX);
        assert_eq!(n.local_be.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(n.widen(), k);
    }

    #[test]
    fn no_ipv4_key_for_ipv6_or_an_index_beyond_24_bits() {
        let k = CtKey {
            family: 4,
            ifindex: CT4_MAX_IFINDEX + 1,
            ..CtKey::default()
        };
        assert_eq!(k.narrow(), None);
        let k = CtKey {
            family: 6,
            ifindex: 1,
            ..CtKey::default()
        };
        assert_eq!(k.narrow(), None);
    }
}
