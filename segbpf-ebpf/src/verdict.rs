//! The verdict: combines the parse result, the two policy lookups and the
//! defaults. Order: always-allowed L2 control traffic, policy rules (lowest
//! matching rule id), the ICMP default, the direction's default.

use segbpf_common::{ACTION_ALLOW, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, NO_RULE, reason};

use crate::{
    lookup,
    parse::{self, Bounds, L3_ARP, L3_IPV4, L3_IPV6, Parsed},
};

/// The outcome for one packet.
pub struct Decision {
    /// Reason code (passes when below `reason::FIRST_DROP`).
    pub reason: u8,
    /// Allowing rule id or `NO_RULE`.
    pub rule_id: u32,
    /// Peer class or `u32::MAX`.
    pub class_id: u32,
    /// Transport protocol (0 when unknown).
    pub proto: u8,
    /// Destination port (0 when none).
    pub dport: u16,
}

impl Decision {
    #[inline(always)]
    fn early(reason: u8) -> Self {
        Decision {
            reason,
            rule_id: NO_RULE,
            class_id: u32::MAX,
            proto: 0,
            dport: 0,
        }
    }
}

/// Decides the fate of the packet in `pkt` travelling in direction `dir`.
#[inline(always)]
pub fn decide(pkt: &Bounds, dir: u8) -> Decision {
    let p = match parse::parse(pkt) {
        Ok(p) => p,
        Err(r) => return Decision::early(r),
    };
    if p.l3 == L3_ARP {
        return Decision::early(reason::PASS_ARP);
    }
    if is_neighbour_discovery(&p) {
        return Decision::early(reason::PASS_ND);
    }
    let mut d = Decision::early(reason::DROP_DEFAULT);
    d.proto = p.proto;
    d.dport = p.dport;
    let Some(cfg) = lookup::config() else {
        // Unreadable configuration: fail closed.
        return d;
    };
    if let Some(class_id) = lookup::peer_class(cfg.active_slot, dir, &p, dir == DIR_INGRESS) {
        d.class_id = class_id;
        if let Some(rule_id) = lookup::port_rule(cfg.active_slot, class_id, p.proto, p.dport) {
            d.rule_id = rule_id;
            d.reason = reason::PASS_RULE;
            return d;
        }
    }
    if cfg.icmp != 0 && is_default_icmp(&p) {
        d.reason = reason::PASS_ICMP;
        return d;
    }
    let default = if dir == DIR_INGRESS {
        cfg.ingress_default
    } else {
        cfg.egress_default
    };
    if default == ACTION_ALLOW {
        d.reason = reason::PASS_DEFAULT;
    }
    d
}

/// IPv6 neighbour discovery (RS/RA/NS/NA, hop limit 255) and MLD (hop
/// limit 1): always allowed, or IPv6 stops working.
#[inline(always)]
fn is_neighbour_discovery(p: &Parsed) -> bool {
    if p.l3 != L3_IPV6 || p.proto != IPPROTO_ICMPV6 {
        return false;
    }
    match p.icmp_type {
        133..=136 => p.hop_limit == 255,
        130..=132 | 143 => p.hop_limit == 1,
        _ => false,
    }
}

/// ICMP echo and error messages that `defaults.icmp = true` lets through.
#[inline(always)]
fn is_default_icmp(p: &Parsed) -> bool {
    if p.l3 == L3_IPV4 && p.proto == IPPROTO_ICMP {
        // echo reply, destination unreachable, echo request, time exceeded, parameter problem
        matches!(p.icmp_type, 0 | 3 | 8 | 11 | 12)
    } else if p.l3 == L3_IPV6 && p.proto == IPPROTO_ICMPV6 {
        // unreachable, packet too big, time exceeded, parameter problem, echo request/reply
        matches!(p.icmp_type, 1..=4 | 128 | 129)
    } else {
        false
    }
}
