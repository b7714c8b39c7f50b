//! Services: the cgroup_skb programs attached once at the cgroup v2 root.
//!
//! Per packet of a socket: (1) who the socket is — the deepest ancestor of
//! its cgroup with an entry in `SEG_SVC_CG` gives its service; a cgroup
//! below a *guard* (an ancestor of a service's cgroup) that has no entry
//! yet is held (dropped) until userspace classifies it, so a service whose
//! cgroup is re-created is never judged as "no service"; (2) a socket in
//! no service passes (except a loopback packet whose sender allowed it
//! only for `to_services`); (3) a service's socket: its own view of the
//! flow in `SEG_SVC_CT` (a reply, or a later packet of an allowed flow)
//! passes while it holds under the policy in force (`svc_flow`: the
//! generation, over loopback the peer's identity; a reply that does not
//! is judged as the packet that opened its flow); else its rules — address rules as for roles (peer trie, port
//! trie), and over loopback the peer's service: on ingress the sender's
//! stamp (below) names the sender's service; on egress `to_services`
//! rules match and the receiver is checked at its ingress; then ICMP echo
//! and the service's default. A packet that passes records the socket's
//! view (its cgroup, its service cgroup, its loopback peer's stamp).
//!
//! The sender's stamp (`svc_stamp.rs`): egress writes `skb->priority` of
//! every packet any socket sends towards the loopback device — a
//! service's socket: check bits (a keyed hash of the packet's 5-tuple and
//! the identity, the key new at every reload) | need-peer bit | slot |
//! service id; anything else (no service, held): 0 — so a packet carries
//! its own sender, set by the kernel path it took, and the loopback
//! ingress reads it back from the same skb, checks it against the packet,
//! then sets it to 0 so no receiver reads it. A priority that is no valid
//! stamp for its packet names no service and is counted
//! (`SVC_STATS_FORGED`). No table keyed by addresses is trusted for who
//! sent a packet (`segbpf_common::SVC_STAMP_CHECK_MASK` says why it
//! cannot be forged).
//!
//! The dry-run programs (`segbpf trace --services`, `DRY = true`) run the
//! same judgement in an instance of their own: the service (and the
//! loopback peer) come from `SEG_SVC_DRY` instead of the socket and the
//! stamp, the flow table is neither read nor written (a new flow is
//! judged), and nothing is written but the decision in `SEG_SVC_TRC`: no
//! stamp, no counter, no event. The live programs are `DRY = false`,
//! where none of this is compiled in.
//!
//! cgroup_skb packets start at the IP header; programs return 1 (pass) or
//! 0 (drop). Everything is read with `bpf_skb_load_bytes`; a header that
//! cannot be read is a drop.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use segbpf_common::{
    ACTION_ALLOW, Counter, DIR_EGRESS, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, PeerKeyV4, PeerKeyV6, PortKey, SVC_EVENTS_PER_SEC, SVC_FLOW_ANSWERED,
    SVC_FLOW_AUDITED, SVC_FLOW_INBOUND, SVC_FLOW_NEED_PEER, SVC_MAX_LEVEL, SVC_PEER_ANY,
    SVC_SLOT_STRIDE, SVC_STAMP_NEED_PEER, SVC_STATS_FORGED, SVC_TCP_IDLE_S, SVC_UDP_IDLE_S,
    SVC_WHY_DEFAULT, SVC_WHY_ICMP, SVC_WHY_NEED_PEER, SVC_WHY_RULE, SVC_WHY_UNPARSED, SvcConfig,
    SvcEvent, SvcFlow, SvcFlowKey, SvcPeerKey,
};

use crate::svc_maps::{
    SEG_SVC_ACT, SEG_SVC_CFG, SEG_SVC_CG, SEG_SVC_CT, SEG_SVC_EVENTS, SEG_SVC_PEER, SEG_SVC_PORTS,
    SEG_SVC_RATE, SEG_SVC_STATS, SEG_SVC_V4, SEG_SVC_V6,
};
use crate::svc_pkt::{ECHO_NONE, ECHO_REPLY, ECHO_REQUEST, Pkt};
use crate::svc_stamp::{NO_SENDER, Sender, make_stamp, read_stamp, set_stamp, stamp_sender};
use crate::svc_trace::{dry_who, record};
use crate::{lpmkey, svc_flow};

/// cgroup_skb: let the packet pass.
pub(crate) const PASS: i32 = 1;
/// cgroup_skb: drop it.
pub(crate) const DROP: i32 = 0;
/// The loopback device's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// EtherTypes of `__sk_buff.protocol` (host order after conversion).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// No rule.
const NO_RULE: u32 = u32::MAX;

/// Who a socket is.
enum Who {
    /// A cgroup below a guard that userspace has not classified yet.
    Pending,
    /// Service id in the slot (0: none) and the cgroup id that made it so.
    Svc(u8, u64),
}

/// Judges one packet of `ctx`'s socket in direction `dir` (`DRY`: as the
/// dry-run programs, see the module doc).
#[inline(always)]
pub(crate) fn judge<const DRY: bool>(ctx: &SkBuffContext, dir: u8) -> i32 {
    let slot = match SEG_SVC_ACT.get(0) {
        Some(s) => (*s & 1) as u8,
        None => return DROP,
    };
    let base = slot * SVC_SLOT_STRIDE;
    let Some(globals) = SEG_SVC_CFG.get(u32::from(base)) else {
        return DROP;
    };
    if globals.present == 0 {
        // No policy written yet: fail closed.
        return DROP;
    }
    if DRY {
        let Some((svc, peer, lo)) = dry_who() else {
            return DROP;
        };
        let Some(cfg) = SEG_SVC_CFG.get(u32::from(base + svc)) else {
            return DROP;
        };
        let sender = Sender {
            tag: 0,
            svc: if dir == DIR_INGRESS && lo { peer } else { 0 },
            need_peer: false,
            other_slot: false,
        };
        let j = judge_service::<true>(ctx, dir, slot, base + svc, svc, 0, cfg, lo, sender, None);
        record(
            j.verdict == PASS && !j.refused,
            j.why,
            cfg.audit != 0,
            j.rule,
        );
        return j.verdict;
    }
    // SAFETY: reading a field of the kernel-provided context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let lo = ifindex == LOOPBACK_IFINDEX;
    let len = u64::from(ctx.len());
    // Every packet towards loopback leaves with its sender's stamp (0
    // unless a service's socket sends it): whatever priority the socket
    // set is overwritten, so no sender chooses its own stamp.
    let stamp_out = dir == DIR_EGRESS && lo;
    // A packet received over loopback: its sender from the stamp, read
    // once and checked against the packet; then the stamp is wiped so no
    // receiver ever reads it (SO_RCVPRIORITY / SCM_PRIORITY, whatever it
    // is and whatever the verdict). A priority that is no valid stamp for
    // this packet names no one and is counted.
    let mut parsed: Option<Pkt> = None;
    let sender = if dir == DIR_INGRESS && lo {
        let prio = read_stamp(ctx);
        set_stamp(ctx, 0);
        if prio == 0 {
            NO_SENDER
        } else {
            parsed = parse(ctx);
            if let Some(s) = stamp_sender(prio, parsed.as_ref(), slot) {
                s
            } else {
                count(base + SVC_STATS_FORGED, DIR_INGRESS, false, len);
                NO_SENDER
            }
        }
    } else {
        NO_SENDER
    };
    let (svc, svc_cg) = match identify(ctx, slot, globals.max_level) {
        Who::Pending => {
            if stamp_out {
                set_stamp(ctx, 0);
            }
            let pass = globals.audit != 0;
            count(base, dir, pass, len);
            return if pass { PASS } else { DROP };
        }
        Who::Svc(s, cg) => (s, cg),
    };
    if svc == 0 {
        if stamp_out {
            set_stamp(ctx, 0);
        }
        // No service: pass, unless its peer over loopback is a service
        // that may send only to named services.
        if sender.need_peer && globals.audit == 0 {
            count(base, dir, false, len);
            return DROP;
        }
        count(base, dir, true, len);
        return PASS;
    }
    let slotb = base + svc;
    let Some(cfg) = SEG_SVC_CFG.get(u32::from(slotb)) else {
        return DROP;
    };
    let Judged {
        verdict,
        refused,
        need_peer,
        pkt,
        ..
    } = judge_service::<false>(ctx, dir, slot, slotb, svc, svc_cg, cfg, lo, sender, parsed);
    if stamp_out {
        // A packet that cannot be read names no one.
        let stamp = match pkt {
            Some(p) => {
                let mut ident = (u32::from(slot) << 7) | u32::from(svc & 0x7f);
                if need_peer {
                    ident |= SVC_STAMP_NEED_PEER;
                }
                make_stamp(&globals.stamp_key, &p, ident)
            }
            None => 0,
        };
        set_stamp(ctx, stamp);
    }
    if refused && let Some(p) = pkt.as_ref() {
        emit(slotb, dir, p, cfg.audit != 0);
    }
    count(slotb, dir, verdict == PASS && !refused, len);
    verdict
}

/// Reports a refused packet, at most `SVC_EVENTS_PER_SEC` per CPU.
#[inline(always)]
fn emit(slotb: u8, dir: u8, p: &Pkt, audit: bool) {
    let now = now_ns();
    let (Some(start), Some(n)) = (SEG_SVC_RATE.get_ptr_mut(0), SEG_SVC_RATE.get_ptr_mut(1)) else {
        return;
    };
    // SAFETY: valid per-CPU pointers returned by the lookups.
    let (start, n) = unsafe { (&mut *start, &mut *n) };
    if now.wrapping_sub(*start) > 1_000_000_000 {
        *start = now;
        *n = 0;
    }
    if *n >= SVC_EVENTS_PER_SEC {
        return;
    }
    *n += 1;
    let ev = SvcEvent {
        ts_ns: now,
        slot: slotb,
        dir,
        family: p.family,
        proto: p.proto,
        audit: u8::from(audit),
        _pad: [0; 3],
        sport_be: p.sport.to_be_bytes(),
        dport_be: p.dport.to_be_bytes(),
        _pad2: [0; 4],
        src_be: p.src,
        dst_be: p.dst,
    };
    let _ = SEG_SVC_EVENTS.output::<SvcEvent>(ev, 0);
}

/// What [`judge_service`] decided.
struct Judged {
    /// `PASS` or `DROP`.
    verdict: i32,
    /// The policy refuses the packet (audit mode: passed all the same).
    refused: bool,
    /// The flow passed only through `to_services`.
    need_peer: bool,
    /// The rule that allowed it (`NO_RULE`: none).
    rule: u32,
    /// `SVC_WHY_*` (0: the flow table; never in a dry run).
    why: u8,
    /// The packet as read (`None`: its headers could not be read).
    pkt: Option<Pkt>,
}

#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "two call sites, inlined")]
fn judge_service<const DRY: bool>(
    ctx: &SkBuffContext,
    dir: u8,
    slot: u8,
    slotb: u8,
    svc: u8,
    svc_cg: u64,
    cfg: &SvcConfig,
    lo: bool,
    sender: Sender,
    parsed: Option<Pkt>,
) -> Judged {
    let fail = if cfg.audit != 0 { PASS } else { DROP };
    let refuse = |pkt: Option<Pkt>, why: u8| Judged {
        verdict: fail,
        refused: pkt.is_some(),
        need_peer: false,
        rule: NO_RULE,
        why,
        pkt,
    };
    let parsed = match parsed {
        Some(p) => Some(p),
        None => parse(ctx),
    };
    let Some(p) = parsed else {
        return refuse(None, SVC_WHY_UNPARSED);
    };
    let own = view(&p, dir == DIR_EGRESS);
    // SAFETY: the helper reads the skb's socket; the context is the kernel's.
    let sock_cg = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let now = now_ns();
    // `sender`: the peer's service over loopback, from the stamp its
    // socket's egress put on this very packet (read by `judge`).
    // The peer a flow entry remembers: the stamp's identity (0: no
    // service) with the policy generation it was made under (each reload
    // flips the slot and adds 1), so an id a later policy gives another
    // service never matches an older entry, and every received loopback
    // flow — also one from no service — is judged again after a reload.
    let peer =
        (cfg.generation.wrapping_sub(u64::from(sender.other_slot)) << 8) | u64::from(sender.tag);
    // The flow's entry, when it is this socket's and live: a packet that
    // is part of the flow as the policy in force stands passes; any other
    // is judged by the rules below, a reply as the packet that opened its
    // flow (`svc_flow`).
    let mut reply = false;
    if !DRY
        && cfg.established != 0
        && let Some(e) = SEG_SVC_CT.get_ptr_mut(own)
    {
        // SAFETY: a valid pointer to the map value returned by the lookup.
        let entry = unsafe { &mut *e };
        if entry.sock_cg == sock_cg && fresh(entry, p.proto, now) {
            if svc_flow::current(entry, dir, lo, peer, cfg.generation) {
                entry.last_ns = now;
                if entry.flags & SVC_FLOW_AUDITED != 0 {
                    // A flow only audit mode lets through: each packet is
                    // one the policy refuses (passed, and reported).
                    return refuse(Some(p), SVC_WHY_DEFAULT);
                }
                return Judged {
                    verdict: PASS,
                    refused: false,
                    need_peer: entry.flags & SVC_FLOW_NEED_PEER != 0,
                    rule: entry.rule,
                    why: 0,
                    pkt: Some(p),
                };
            }
            // The kernel's own ACK or RST for a peer's closed socket
            // carries no stamp (`svc_flow::bare_ack_or_rst` says why only
            // the kernel can send one here); it changes nothing in the
            // entry.
            if lo && dir == DIR_INGRESS && sender.tag == 0 && svc_flow::bare_ack_or_rst(ctx, &p) {
                return Judged {
                    verdict: PASS,
                    refused: false,
                    need_peer: false,
                    rule: entry.rule,
                    why: 0,
                    pkt: Some(p),
                };
            }
            reply = svc_flow::is_reply(entry, dir);
        }
    }
    // `q` in direction `jdir`: what the rules judge (a reply: the packet
    // that opened its flow, in the direction it went).
    let (jdir, q) = if reply {
        (svc_flow::opposite(dir), svc_flow::reversed(&p))
    } else {
        (dir, p)
    };
    let mut rule = addr_rule(slotb, jdir, &q);
    let mut flags = if jdir == DIR_INGRESS {
        SVC_FLOW_INBOUND
    } else {
        0
    };
    if lo {
        if jdir == DIR_INGRESS {
            if !reply && sender.svc != 0 {
                let r = peer_rule(slotb, DIR_INGRESS, sender.svc, &q);
                if r < rule {
                    rule = r;
                }
            }
        } else if rule == NO_RULE {
            let r = peer_rule(slotb, DIR_EGRESS, SVC_PEER_ANY, &q);
            if r != NO_RULE {
                rule = r;
                flags |= SVC_FLOW_NEED_PEER;
                // A reply on a flow the egress allowed only towards named
                // services: its sender (from its stamp) must be one of
                // them; the entry then remembers it (`peer`), and only
                // that service's packets are replies on it.
                if reply {
                    let named = if sender.svc != 0 {
                        peer_rule(slotb, DIR_EGRESS, sender.svc, &q)
                    } else {
                        NO_RULE
                    };
                    if named == NO_RULE {
                        return refuse(Some(p), SVC_WHY_NEED_PEER);
                    }
                    rule = named;
                    flags |= SVC_FLOW_ANSWERED;
                }
            }
        }
    }
    // A sender allowed only towards named services: this service must be one.
    if sender.need_peer {
        let ok = sender.svc != 0
            && peer_rule(slot * SVC_SLOT_STRIDE + sender.svc, DIR_EGRESS, svc, &p) != NO_RULE;
        if !ok {
            return refuse(Some(p), SVC_WHY_NEED_PEER);
        }
    }
    let default = if jdir == DIR_INGRESS {
        cfg.ingress_default
    } else {
        cfg.egress_default
    };
    let why = if rule != NO_RULE {
        SVC_WHY_RULE
    } else if cfg.icmp != 0 && q.echo == ECHO_REQUEST {
        SVC_WHY_ICMP
    } else {
        SVC_WHY_DEFAULT
    };
    let allowed = why != SVC_WHY_DEFAULT || default == ACTION_ALLOW;
    let trackable = p.proto == IPPROTO_TCP
        || p.proto == IPPROTO_UDP
        || (p.echo != ECHO_NONE && (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6));
    if !allowed {
        // Audit mode passes it: remember the flow as refused, in the
        // direction of this packet, so the service's answers are not taken
        // for a flow it opened (which enforcement would then keep open).
        if !DRY && cfg.audit != 0 && cfg.established != 0 && trackable && !reply {
            let entry = SvcFlow {
                sock_cg,
                svc_cg,
                last_ns: now,
                peer,
                flags: flags | SVC_FLOW_AUDITED,
                rule: NO_RULE,
            };
            let _ = SEG_SVC_CT.insert(own, entry, 0);
        }
        return refuse(Some(p), why);
    }
    if !DRY && trackable {
        let entry = SvcFlow {
            sock_cg,
            svc_cg,
            last_ns: now,
            peer,
            flags,
            rule,
        };
        let _ = SEG_SVC_CT.insert(own, entry, 0);
    }
    Judged {
        verdict: PASS,
        refused: false,
        need_peer: flags & SVC_FLOW_NEED_PEER != 0,
        rule,
        why,
        pkt: Some(p),
    }
}

/// The socket's service from the deepest known ancestor of its cgroup.
#[inline(always)]
fn identify(ctx: &SkBuffContext, slot: u8, max_level: u8) -> Who {
    let mut svc = 0u8;
    let mut svc_cg = 0u64;
    let mut guard = false;
    let s = (slot & 1) as usize;
    for level in 0..=SVC_MAX_LEVEL {
        if level > u32::from(max_level) + 1 {
            break;
        }
        // SAFETY: the helper reads the skb's socket; the context is the kernel's.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level as i32) };
        if id == 0 {
            break;
        }
        match SEG_SVC_CG.get_ptr(id) {
            Some(e) => {
                // SAFETY: a valid pointer to the map value returned by the lookup.
                let e = unsafe { &*e };
                svc = e.svc[s];
                svc_cg = if svc != 0 { id } else { 0 };
                guard = e.guard[s] != 0;
            }
            None if guard => return Who::Pending,
            None => {
                // Below a classified cgroup: inherits it.
            }
        }
    }
    // A service's sub-cgroups inherit its entry's cgroup id only when the
    // entry itself is the service's; userspace writes inherited entries
    // with the service id, so find the service cgroup from the id.
    Who::Svc(svc, svc_cg)
}

/// The flow as the local socket sees it: on egress the source is local,
/// on ingress the destination.
#[inline(always)]
fn view(p: &Pkt, src_is_local: bool) -> SvcFlowKey {
    let (laddr_be, raddr_be, lport, rport) = if src_is_local {
        (p.src, p.dst, p.sport, p.dport)
    } else {
        (p.dst, p.src, p.dport, p.sport)
    };
    SvcFlowKey {
        family: p.family,
        proto: p.proto,
        lport_be: lport.to_be_bytes(),
        rport_be: rport.to_be_bytes(),
        _pad: [0; 2],
        laddr_be,
        raddr_be,
    }
}

/// The lowest rule of the service allowing the packet's peer address.
#[inline(always)]
fn addr_rule(slotb: u8, dir: u8, p: &Pkt) -> u32 {
    // SAFETY: `src` and `dst` sit at offsets 0 and 16 of the 8-byte
    // aligned `Pkt` (asserted in `svc_pkt`).
    let addr = unsafe { lpmkey::words(if dir == DIR_INGRESS { &p.src } else { &p.dst }) };
    let class = if p.family == 4 {
        let key = lpmkey::peer_v4(slotb, dir, addr[0]);
        // SAFETY: built by `peer_v4`.
        SEG_SVC_V4
            .get(unsafe { key.as_key::<PeerKeyV4>() })
            .map(|c| c.class_id)
    } else {
        let key = lpmkey::peer_v6(slotb, dir, addr);
        // SAFETY: built by `peer_v6`.
        SEG_SVC_V6
            .get(unsafe { key.as_key::<PeerKeyV6>() })
            .map(|c| c.class_id)
    };
    match class {
        Some(c) => port_rule(slotb, c, p),
        None => NO_RULE,
    }
}

/// The lowest rule of the service naming `peer` (or any, for `to_services`).
#[inline(always)]
fn peer_rule(slotb: u8, dir: u8, peer: u8, p: &Pkt) -> u32 {
    let key = SvcPeerKey {
        slot: slotb,
        dir,
        peer,
        _pad: 0,
    };
    match SEG_SVC_PEER.get_ptr(key) {
        // SAFETY: a valid pointer to the map value returned by the lookup.
        Some(c) => port_rule(slotb, unsafe { (*c).class_id }, p),
        None => NO_RULE,
    }
}

#[inline(always)]
fn port_rule(slotb: u8, class_id: u32, p: &Pkt) -> u32 {
    let key = lpmkey::port(slotb, class_id, p.proto, p.dport);
    // SAFETY: built by `port`.
    SEG_SVC_PORTS
        .get(unsafe { key.as_key::<PortKey>() })
        .map_or(NO_RULE, |r| r.rule_id)
}

/// Whether a flow entry is still live.
#[inline(always)]
fn fresh(e: &SvcFlow, proto: u8, now: u64) -> bool {
    let idle_s = if proto == IPPROTO_TCP {
        SVC_TCP_IDLE_S
    } else {
        SVC_UDP_IDLE_S
    };
    now.wrapping_sub(e.last_ns) <= idle_s * 1_000_000_000
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn count(slotb: u8, dir: u8, passed: bool, len: u64) {
    let idx = u32::from(slotb) * 4 + u32::from(dir) * 2 + u32::from(passed);
    if let Some(c) = SEG_SVC_STATS.get_ptr_mut(idx) {
        // SAFETY: a valid per-CPU pointer returned by the lookup.
        let c: &mut Counter = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len;
    }
}

/// IPv6 extension headers walked before the transport header; a packet
/// with more is not parsed (and so refused).
const IPV6_MAX_EXT: usize = 8;

/// The transport protocol of an IPv6 packet whose fixed header names
/// `next`, the offset of its transport header, and whether it is a later
/// fragment (no transport header: judged by protocol, as IPv4's). Walks
/// Hop-by-Hop (0), Routing (43), Fragment (44), Destination Options (60)
/// and AH (51); `None` when a header cannot be read or there are more
/// than [`IPV6_MAX_EXT`].
#[inline(always)]
fn ipv6_transport(ctx: &SkBuffContext, next: u8) -> Option<(u8, usize, bool)> {
    let mut next = next;
    let mut off = 40usize;
    // One step per extension header, and one more to reach the transport
    // header after the last of them.
    for _ in 0..=IPV6_MAX_EXT {
        match next {
            0 | 43 | 60 => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            51 => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            44 => {
                let f: [u8; 4] = ctx.load(off).ok()?;
                next = f[0];
                off += 8;
                if u16::from_be_bytes([f[2], f[3]]) & 0xfff8 != 0 {
                    return Some((next, off, true));
                }
            }
            _ => return Some((next, off, false)),
        }
    }
    None
}

/// Reads the IP header and the ports (or the ICMP echo id). `None`: a
/// header that cannot be read (the caller drops the packet).
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Pkt> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut p = Pkt {
        family: 0,
        proto: 0,
        echo: ECHO_NONE,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
        l4_off: 0,
        l4_len: 0,
    };
    let l4: usize;
    if ethertype == ETH_P_IP {
        let h: [u8; 20] = ctx.load(0).ok()?;
        if h[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        p.family = 4;
        p.proto = h[9];
        p.src[..4].copy_from_slice(&h[12..16]);
        p.dst[..4].copy_from_slice(&h[16..20]);
        // A later fragment has no transport header: judged by protocol.
        let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        if frag_off != 0 {
            return Some(p);
        }
        l4 = ihl;
        p.l4_len = u16::from_be_bytes([h[2], h[3]]).saturating_sub(ihl as u16);
    } else if ethertype == ETH_P_IPV6 {
        let h: [u8; 40] = ctx.load(0).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        p.family = 6;
        p.src.copy_from_slice(&h[8..24]);
        p.dst.copy_from_slice(&h[24..40]);
        // The transport header follows any extension headers (a Hop-by-Hop
        // header, for one, the kernel itself puts on large GSO packets
        // over loopback); the protocol is the last header's.
        let (proto, off, later_fragment) = ipv6_transport(ctx, h[6])?;
        p.proto = proto;
        if later_fragment {
            return Some(p);
        }
        l4 = off;
        // The payload length counts the extension headers too.
        p.l4_len = u16::from_be_bytes([h[4], h[5]]).saturating_sub((off - 40) as u16);
    } else {
        return None;
    }
    p.l4_off = l4 as u16;
    if p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP {
        let ports: [u8; 4] = ctx.load(l4).ok()?;
        p.sport = u16::from_be_bytes([ports[0], ports[1]]);
        p.dport = u16::from_be_bytes([ports[2], ports[3]]);
    } else if (p.proto == IPPROTO_ICMP && p.family == 4)
        || (p.proto == IPPROTO_ICMPV6 && p.family == 6)
    {
        let icmp: [u8; 8] = ctx.load(l4).ok()?;
        let id = u16::from_be_bytes([icmp[4], icmp[5]]);
        let (request, reply) = if p.family == 4 { (8, 0) } else { (128, 129) };
        if icmp[0] == request {
            p.echo = ECHO_REQUEST;
            p.sport = id;
        } else if icmp[0] == reply {
            p.echo = ECHO_REPLY;
            p.dport = id;
        }
    }
    Some(p)
}
