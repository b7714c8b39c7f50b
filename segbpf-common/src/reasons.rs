//! Verdict reasons (one list for kernel and CLI, [`reason`]) and the record
//! a dry-run or record instance keeps of its last verdict ([`TraceResult`]).

use bytemuck::{Pod, Zeroable};

/// Rule id meaning "no rule" in [`TraceResult`].
pub const NO_RULE: u32 = u32::MAX;

// ---------------------------------------------------------------------------
// Verdict reasons: one shared list. Codes below `REASON_FIRST_DROP` pass.
// ---------------------------------------------------------------------------

/// Reason codes: why a packet passed or was dropped. They index `SEG_STATS`.
pub mod reason {
    /// Allowed by a policy rule.
    pub const PASS_RULE: u8 = 0;
    /// No rule matched and the direction's default is allow.
    pub const PASS_DEFAULT: u8 = 1;
    /// ARP: always allowed.
    pub const PASS_ARP: u8 = 2;
    /// IPv6 neighbour discovery / router advertisement / MLD: always allowed.
    pub const PASS_ND: u8 = 3;
    /// ICMP echo allowed by `defaults.icmp`.
    pub const PASS_ICMP: u8 = 4;
    /// Part of a tracked connection (a reply, or the originator going on).
    pub const PASS_CT: u8 = 5;
    /// ICMP error about a tracked connection (`defaults.icmp`).
    pub const PASS_RELATED: u8 = 6;
    /// Non-first fragment of a datagram whose first fragment passed.
    pub const PASS_FRAG: u8 = 7;
    /// Link-layer control frame to an IEEE 802.1 link-local group address
    /// (01:80:c2:00:00:00-0f) of a protocol that needs it: STP BPDU (802.3
    /// length + LLC 42-42-03), LACP/Marker (0x8809), EAPOL (0x888e), LLDP
    /// (0x88cc), PTP (0x88f7); `defaults.link_local`.
    pub const PASS_LINK_LOCAL: u8 = 8;

    /// First drop reason; every code from here on drops.
    pub const FIRST_DROP: u8 = 16;
    /// No rule matched and the direction's default is drop.
    pub const DROP_DEFAULT: u8 = 16;
    /// Frame shorter than an Ethernet header or a VLAN tag.
    pub const DROP_TRUNC_ETH: u8 = 17;
    /// More than two VLAN tags.
    pub const DROP_VLAN_DEPTH: u8 = 18;
    /// EtherType that is neither IPv4, IPv6 nor ARP.
    pub const DROP_ETHERTYPE: u8 = 19;
    /// IP header shorter than its minimum, or total/payload length beyond the frame.
    pub const DROP_TRUNC_IP: u8 = 20;
    /// Malformed IPv4 header: wrong version, IHL < 5, total length < IHL.
    pub const DROP_BAD_IPV4: u8 = 21;
    /// Malformed IPv6 header: wrong version.
    pub const DROP_BAD_IPV6: u8 = 22;
    /// IPv6 extension header chain truncated or longer than the parser's bound.
    pub const DROP_IPV6_EXT: u8 = 23;
    /// Non-first fragment whose first fragment was not seen or not allowed.
    pub const DROP_FRAGMENT: u8 = 24;
    /// Transport header truncated.
    pub const DROP_TRUNC_L4: u8 = 25;
    /// Malformed transport header: TCP data offset < 5, UDP length < 8.
    pub const DROP_BAD_L4: u8 = 26;
    /// Malformed ARP (truncated).
    pub const DROP_BAD_ARP: u8 = 27;
    /// Non-IP frame to a link-local group address that is not one of the
    /// control protocols of `PASS_LINK_LOCAL` (MPLS, PPPoE, MACsec, ...),
    /// or any link-local control frame while `defaults.link_local = false`.
    pub const DROP_LINK_LOCAL: u8 = 28;
    /// TCP RST of a tracked flow whose sequence number is outside the
    /// window seen for its direction (a blind reset); the flow is unchanged.
    pub const DROP_INVALID_RST: u8 = 29;
    /// TCP FIN of a tracked flow outside the window seen for its direction.
    pub const DROP_INVALID_FIN: u8 = 30;
    /// Any other TCP segment of a tracked flow whose sequence or
    /// acknowledgement number lies outside the window seen for it (a blind
    /// segment); the flow is unchanged.
    pub const DROP_INVALID_SEQ: u8 = 31;

    /// Every code in use (for iteration in userspace).
    pub const ALL: [u8; 25] = [
        PASS_RULE,
        PASS_DEFAULT,
        PASS_ARP,
        PASS_ND,
        PASS_ICMP,
        PASS_CT,
        PASS_RELATED,
        PASS_FRAG,
        PASS_LINK_LOCAL,
        DROP_DEFAULT,
        DROP_TRUNC_ETH,
        DROP_VLAN_DEPTH,
        DROP_ETHERTYPE,
        DROP_TRUNC_IP,
        DROP_BAD_IPV4,
        DROP_BAD_IPV6,
        DROP_IPV6_EXT,
        DROP_FRAGMENT,
        DROP_TRUNC_L4,
        DROP_BAD_L4,
        DROP_BAD_ARP,
        DROP_LINK_LOCAL,
        DROP_INVALID_RST,
        DROP_INVALID_FIN,
        DROP_INVALID_SEQ,
    ];

    /// Whether a packet with this reason is passed.
    pub const fn passes(code: u8) -> bool {
        code < FIRST_DROP
    }

    /// Stable machine name of a reason (used in CLI and JSON output).
    pub const fn name(code: u8) -> &'static str {
        match code {
            PASS_RULE => "rule",
            PASS_DEFAULT => "default-allow",
            PASS_ARP => "arp",
            PASS_ND => "ipv6-nd",
            PASS_ICMP => "icmp-default",
            PASS_CT => "established",
            PASS_RELATED => "icmp-related",
            PASS_FRAG => "fragment-of-allowed",
            PASS_LINK_LOCAL => "link-local",
            DROP_DEFAULT => "default-drop",
            DROP_TRUNC_ETH => "truncated-ethernet",
            DROP_VLAN_DEPTH => "vlan-too-deep",
            DROP_ETHERTYPE => "unsupported-ethertype",
            DROP_TRUNC_IP => "truncated-ip",
            DROP_BAD_IPV4 => "malformed-ipv4",
            DROP_BAD_IPV6 => "malformed-ipv6",
            DROP_IPV6_EXT => "ipv6-ext-chain",
            DROP_FRAGMENT => "fragment-no-leader",
            DROP_TRUNC_L4 => "truncated-l4",
            DROP_BAD_L4 => "malformed-l4",
            DROP_BAD_ARP => "malformed-arp",
            DROP_LINK_LOCAL => "link-local-denied",
            DROP_INVALID_RST => "invalid-rst",
            DROP_INVALID_FIN => "invalid-fin",
            DROP_INVALID_SEQ => "invalid-seq",
            _ => "unknown",
        }
    }
}

/// What a dry-run instance records about the last packet (`SEG_TRACE[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TraceResult {
    /// Rule id that allowed the packet, or [`NO_RULE`].
    pub rule_id: u32,
    /// Peer class found for the packet's peer address, or `u32::MAX`.
    pub class_id: u32,
    /// Reason code (see [`reason`]).
    pub reason: u8,
    /// IP protocol seen (0 for non-IP).
    pub proto: u8,
    /// Destination port seen, host order.
    pub dport: u16,
    /// Set to 1 by the program (distinguishes "not run" from "run").
    pub valid: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TraceResult>() == 16);
