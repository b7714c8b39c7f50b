//! Services: when a packet may ride on its socket's flow entry
//! (`SEG_SVC_CT`), and what the rules judge when it may not.
//!
//! An entry remembers the policy generation it was made (or last judged)
//! under, in `SvcFlow::peer` (`generation << 8 | identity`). A packet uses
//! it only while that is still the policy in force and, over loopback
//! where a peer's identity matters, only with the identity the entry
//! remembers (see [`current`]). Any other hit on a live entry of the
//! socket is judged again by the rules in force (`cgroup.rs`): a packet
//! in the direction that opened the flow as a new flow, a reply as the
//! packet that opened its flow ([`is_reply`], [`reversed`]) — so a reload
//! that no longer allows a flow cuts it at its next packet, either way,
//! and one that still allows it lets it go on under the new generation.
//! One exception, [`bare_ack_or_rst`]: the kernel's own TCP control
//! packets, which carry no stamp.

use aya_ebpf::programs::SkBuffContext;
use segbpf_common::{
    DIR_EGRESS, DIR_INGRESS, IPPROTO_TCP, SVC_FLOW_ANSWERED, SVC_FLOW_INBOUND, SVC_FLOW_NEED_PEER,
    SvcFlow,
};

use crate::svc_pkt::{ECHO_REPLY, ECHO_REQUEST, Pkt};

/// TCP header flags (byte 13).
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Whether packet of direction `dir` (`lo`: over loopback; `peer`: its
/// sender's identity as `cgroup.rs` computes it for an entry, 0 identity
/// bits when not received over loopback) is part of the flow `e` as the
/// policy in force (`generation`) stands:
///
/// * received over loopback on a flow the socket received (its sender's
///   service was judged) or on one its egress allowed only through
///   `to_services` once a reply named the answering service
///   (`SVC_FLOW_ANSWERED`; before that, none is part of it): the same
///   identity made under the same generation (a stamp made under
///   the slot just left counts as the previous generation, so a packet in
///   flight across a reload's flip still matches);
/// * sent over loopback on a flow the socket received: yes — the peer's
///   identity is on the peer's packets only, so the flow is judged again
///   at the next packet its peer sends;
/// * anything else: made under the generation in force.
#[inline(always)]
pub(crate) fn current(e: &SvcFlow, dir: u8, lo: bool, peer: u64, generation: u64) -> bool {
    let inbound = e.flags & SVC_FLOW_INBOUND != 0;
    if lo && dir == DIR_INGRESS && inbound {
        return e.peer == peer;
    }
    if lo && dir == DIR_INGRESS && e.flags & SVC_FLOW_NEED_PEER != 0 {
        // Not answered yet: every reply is checked against the rules.
        return e.flags & SVC_FLOW_ANSWERED != 0 && e.peer == peer;
    }
    if lo && dir == DIR_EGRESS && inbound {
        return true;
    }
    e.peer >> 8 == generation
}

/// Whether a packet of direction `dir` goes against the direction that
/// opened flow `e` (a reply).
#[inline(always)]
pub(crate) fn is_reply(e: &SvcFlow, dir: u8) -> bool {
    (e.flags & SVC_FLOW_INBOUND != 0) != (dir == DIR_INGRESS)
}

/// The direction opposite `dir`.
#[inline(always)]
pub(crate) fn opposite(dir: u8) -> u8 {
    if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

/// A reply turned into the packet that opened its flow: addresses and
/// ports swapped, an echo reply as its request (and back).
#[inline(always)]
pub(crate) fn reversed(p: &Pkt) -> Pkt {
    let echo = if p.echo == ECHO_REPLY {
        ECHO_REQUEST
    } else if p.echo == ECHO_REQUEST {
        ECHO_REPLY
    } else {
        p.echo
    };
    Pkt {
        echo,
        sport: p.dport,
        dport: p.sport,
        src: p.dst,
        dst: p.src,
        ..*p
    }
}

/// A TCP segment that carries nothing but an acknowledgement or a reset:
/// flags ACK and/or RST only (no SYN, FIN, PSH, URG, ECE, CWR), no
/// payload (the IP header's length is exactly the TCP header's). A
/// header that cannot be read, or a length that does not add up (a
/// later fragment, a GSO packet longer than the 16-bit length), is not.
///
/// The caller lets such a segment pass without a sender stamp, received
/// over loopback on a live TCP entry of the receiving socket. Why: when a
/// client has closed first, its side of the connection is a TIME_WAIT
/// (or orphaned FIN_WAIT2) mini-socket, and the kernel answers the
/// server's FIN — and any late segment — from its per-CPU TCP control
/// socket, which belongs to no service: an ACK (or RST) without the
/// client's stamp. Refused, the server's socket stays in LAST-ACK
/// retransmitting its FIN for minutes. Why nobody else can use this: to
/// put a segment on that 4-tuple a process needs a socket bound to it
/// (the port is the peer's, held by its socket or its TIME_WAIT) or a
/// raw socket (`CAP_NET_RAW`); a new socket that takes over a TIME_WAIT
/// 4-tuple (`tcp_tw_reuse`) starts with a SYN, which this refuses, and
/// reaches no state that sends anything else without the receiver's
/// answer. And what passes carries no data: it can acknowledge or reset
/// the receiver's side of a connection, never write into it.
#[inline(always)]
pub(crate) fn bare_ack_or_rst(ctx: &SkBuffContext, p: &Pkt) -> bool {
    if p.proto != IPPROTO_TCP || p.l4_off == 0 {
        return false;
    }
    let Ok(h) = ctx.load::<[u8; 14]>(usize::from(p.l4_off)) else {
        return false;
    };
    let header = u16::from(h[12] >> 4) * 4;
    let flags = h[13];
    header >= 20 && p.l4_len == header && flags != 0 && flags & !(TCP_ACK | TCP_RST) == 0
}
