//! The per-slot configuration record ([`Config`]), the default actions,
//! and the read-only globals set at load: run mode, link layer and interface.

use bytemuck::{Pod, Zeroable};

/// Name of the read-only global that selects the run mode ([`RUN_LIVE`], ...).
pub const GLOBAL_RUN_MODE: &str = "SEGBPF_RUN_MODE";
/// Name of the read-only global that gives the device's link layer
/// ([`LINK_ETHERNET`] or [`LINK_RAW_IP`]), set at load from its ARPHRD type.
pub const GLOBAL_LINK: &str = "SEGBPF_LINK";
/// Name of the read-only global that gives the index of the interface an
/// instance is attached to (0 for instances attached nowhere): the
/// connection-table keys carry it ([`crate::CtKey::ifindex`]).
pub const GLOBAL_IFINDEX: &str = "SEGBPF_IFINDEX";

/// Link layer: frames start with an Ethernet header (Ethernet, veth,
/// bridge, tap, vxlan, bond, loopback, ...).
pub const LINK_ETHERNET: u8 = 0;
/// Link layer: none, packets start at the IP header (tun, WireGuard, ipip,
/// gre, sit, ip6tnl, ppp, raw IP).
pub const LINK_RAW_IP: u8 = 1;

/// Run mode of a loaded instance: enforce, count, track state.
pub const RUN_LIVE: u8 = 0;
/// Run mode: judge with the shared maps but write nothing (no counters, no
/// connection or fragment state); record the decision in `SEG_TRACE`.
pub const RUN_DRY: u8 = 1;
/// Run mode: like live (state is tracked, counters move) and also record
/// each decision in `SEG_TRACE` (tests of stateful sequences).
pub const RUN_RECORD: u8 = 2;

/// Default action: drop.
pub const ACTION_DROP: u8 = 0;
/// Default action: allow.
pub const ACTION_ALLOW: u8 = 1;

/// Configuration record, one per policy slot (`SEG_CONFIG[slot]`), written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Config {
    /// Policy generation (increases with every applied policy).
    pub generation: u64,
    /// Default for ingress when no rule matches: [`ACTION_DROP`] or [`ACTION_ALLOW`].
    pub ingress_default: u8,
    /// Default for egress when no rule matches.
    pub egress_default: u8,
    /// 1 when ICMP echo, and errors about tracked flows, pass by default.
    pub icmp: u8,
    /// 1 when replies to allowed flows pass (connection tracking).
    pub established: u8,
    /// Slot of the peer/port maps in force (0 or 1).
    pub active_slot: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
    /// Drop events per second (0 = none).
    pub log_rate: u32,
    /// Connection-tracking timeouts, seconds: TCP before the reply.
    pub ct_tcp_syn_s: u32,
    /// TCP after the reply (established).
    pub ct_tcp_est_s: u32,
    /// TCP after RST or FIN from both sides.
    pub ct_tcp_close_s: u32,
    /// UDP (and other tracked protocols) before the reply.
    pub ct_udp_s: u32,
    /// UDP after the reply.
    pub ct_udp_est_s: u32,
    /// ICMP echo.
    pub ct_icmp_s: u32,
    /// Fragment table entries, seconds after the first fragment.
    pub frag_s: u32,
    /// Events allowed in one burst (the rate limiter's bucket size).
    pub log_burst: u32,
    /// 1 in audit mode: packets the policy would drop pass, each reported
    /// as an `audit` event.
    pub audit: u8,
    /// 1 when non-IP frames to the IEEE 802.1 link-local group addresses
    /// pass (`defaults.link_local`).
    pub link_local: u8,
    /// 1 when connection-table entries count packets, bytes and TCP flags
    /// per direction (flow accounting); 0 with `attach --flow-log off`.
    pub flow_acct: u8,
    /// Explicit padding.
    pub _pad3: [u8; 1],
}
const _: () = assert!(core::mem::size_of::<Config>() == 56);
