//! Connection tracking of our own, keyed by the flow as the host sees it
//! (local/remote address and port), so both directions of a flow find the
//! same entry. TCP, UDP and ICMP echo are tracked. An entry is made when a
//! packet that opens a flow (TCP SYN without ACK, any UDP datagram, an echo
//! request) passes the policy; later packets of the flow in either
//! direction pass on the entry until it expires. Timeouts come from
//! `Config` and depend on the protocol and the TCP state; RST, or FIN from
//! both sides, shortens the entry's life to the closing timeout.
//!
//! Two classes of flow, so a flood cannot push out the flows that matter
//! (as netfilter's early drop spares assured entries): a new entry is
//! half-open; it becomes assured when the originator speaks again after a
//! reply (for TCP, an ACK that acknowledges the replier's SYN: a spoofed
//! source never sees that SYN, so a flood of openers only evicts other
//! half-open entries). A flow that closes (TCP RST, or FIN from both
//! sides) becomes half-open again, so closing flows are evicted before
//! established ones. Each family keeps both classes in one table of our
//! own (`cttable`) whose eviction takes half-open ways before assured
//! ones; a flow changes class by its way's bit.
//!
//! Every TCP segment of a tracked flow is checked against the window seen
//! for it before it changes anything (netfilter's `tcp_in_window`, reduced
//! to what a host firewall needs; RFC 5961's blind attacks): its sequence
//! number must not be beyond the sender's highest sequence plus the
//! receiver's largest window, its end not further back than that window
//! (at least 66,000 bytes: retransmissions, keep-alives, window probes),
//! and its acknowledgement must not be beyond what the other side sent nor
//! further back than the sender's largest window (at least 66,000). The
//! first segment of a side that has not spoken yet must acknowledge what
//! the other side sent (a RST exactly: the RST that refuses a SYN).
//! Anything else is dropped as `invalid-rst` / `invalid-fin` /
//! `invalid-seq` and changes nothing. One exception, as in netfilter: a
//! SYN outside the window from a side that spoke passes unchanged, so a
//! peer that lost its connection (a reboot) and reuses the port gets the
//! host's challenge ACK and can reset the stale flow. A SYN on a closing
//! flow is a new connection: judged by the policy.
//!
//! A RST in the window closes the flow only at the exact sequence the
//! receiver expects next (the highest sequence end seen from its sender),
//! or as the first segment of a side, answering the other side's opener.
//! A RST elsewhere in the window passes but changes nothing, as in
//! netfilter since Linux 5.19 (RFC 5961 3.2): the endpoint answers it with
//! a challenge ACK and a genuine peer resets again at the exact sequence,
//! so a blind attacker must hit the sequence exactly, not just the window.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use segbpf_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_FIN_ORIG, CT_FIN_REPLY, CT_NEW, CT_NO_WSCALE, Config, CtEntry,
    DIR_EGRESS, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ct_seen_pack,
    ct_timeout_s, reason,
};

use crate::{
    ctkey::{FlowKey, addrs, orient, quoted_addrs},
    ctseen,
    cttable::CtTable as _,
    maps::SEG_CT_SCRATCH,
    parse::{self, Bounds, Parsed},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_S: u64 = 1_000_000_000;
/// Least slack (bytes) below a side's highest sequence for
/// acknowledgements and retransmissions (netfilter's `MAXACKWINDOW` floor).
const MIN_BACK: i64 = 66_000;

/// Current time for connection tracking, rate limiting and events: the
/// coarse monotonic clock (tick resolution, a few ms: ample for timeouts of
/// seconds, and much cheaper than a precise clock read in a VM).
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether a packet of protocol `proto` / ICMP type is tracked, and its
/// "port" when it is ICMP (the echo id).
#[inline(always)]
fn is_echo(proto: u8, icmp_type: u8) -> bool {
    (proto == IPPROTO_ICMP && (icmp_type == 8 || icmp_type == 0))
        || (proto == IPPROTO_ICMPV6 && (icmp_type == 128 || icmp_type == 129))
}

/// The key of the packet's flow as seen from the host, or None if the
/// packet's protocol is not tracked, or it is not of the key's family.
#[inline(always)]
pub(crate) fn key<K: FlowKey>(dir: u8, p: &Parsed) -> Option<K> {
    if p.l3 != K::L3 {
        return None;
    }
    let (sport, dport) = match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => (p.sport, p.dport),
        _ if is_echo(p.proto, p.icmp_type) => (p.echo_id, 0),
        _ => return None,
    };
    K::make(&orient(dir, p.proto, addrs(p), sport, dport))
}

/// The key of the flow quoted by the ICMP error `p` travelling in `dir`
/// (the quoted packet went the other way), if it quotes a tracked
/// protocol of the key's family.
#[inline(always)]
pub(crate) fn related_key<K: FlowKey>(pkt: &Bounds, dir: u8, p: &Parsed) -> Option<K> {
    if p.l3 != K::L3 {
        return None;
    }
    let q = parse::quoted(pkt, p)?;
    let quoted_dir = if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    };
    K::make(&orient(
        quoted_dir,
        q.proto,
        quoted_addrs(&q),
        q.sport,
        q.dport,
    ))
}

/// A live entry: where it is, and whether it is assured.
pub(crate) struct Tracked {
    /// The entry, a pointer into its map (valid during this program run).
    pub entry: *mut CtEntry,
    /// Assured rather than half-open (its way's bit).
    pub assured: bool,
    /// The key's last-seen buckets, packed (`ctseen::live_buckets`), for
    /// `update`.
    pub seen_bucket: u32,
    /// The key's remote's fingerprint (`ctseen`), for `update`.
    pub fp: u32,
}

/// The live entry of `key` for the packet `p`, from the family's table
/// (one entry per key, its class in its way's bit). An entry is dead when
/// it expired, when it is a flow audit mode let through while enforcement
/// is on, and for a TCP SYN when it is closing (the SYN opens a new
/// connection on the tuple: judged by the policy, its entry replaces the
/// closing one in the same way). A key whose
/// remote's last-seen bucket is stale or lacks its local port's bit, or
/// whose flow's bucket is stale, has no live entry: no lookup (`ctseen`).
#[inline(always)]
pub(crate) fn lookup<K: FlowKey>(cfg: &Config, key: &K, p: &Parsed, now: u64) -> Option<Tracked> {
    let remote = key.remote();
    let fp = remote.1;
    let seen_bucket = ctseen::live_buckets(cfg, remote, key.port_bit(), || key.flow_bucket(), now)?;
    let syn = p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
    let (e, assured) = K::table().find(key, now)?;
    live(cfg, key, e, now, syn).then_some(Tracked {
        entry: e,
        assured,
        seen_bucket,
        fp,
    })
}

/// Whether `entry` (of `key`) is in force for a packet (`syn`: a TCP SYN
/// without ACK) at `now` (see `lookup`).
#[inline(always)]
fn live<K: FlowKey>(cfg: &Config, key: &K, entry: *mut CtEntry, now: u64, syn: bool) -> bool {
    // SAFETY: `entry` points at a value of the map, valid during this
    // program run; concurrent writers only store whole integer fields.
    let (last, state, audit) = unsafe { ((*entry).last_seen_ns, (*entry).state, (*entry).audit) };
    // A flow audit mode let through against the policy is not a flow
    // once enforcement resumes: its packets are judged by the policy.
    if audit != 0 && cfg.audit == 0 {
        return false;
    }
    if syn && state == CT_CLOSING {
        return false;
    }
    let ttl = u64::from(ct_timeout_s(cfg, key.proto(), state)) * NS_PER_S;
    now.saturating_sub(last) <= ttl
}

/// 0 for the originator's side of the flow, 1 for the replier's.
#[inline(always)]
fn side(e: &CtEntry, dir: u8) -> usize {
    // Directions are 0 and 1: no branch (one verifier path for both sides).
    usize::from((dir ^ e.origin) & 1)
}

/// Signed distance from `b` to `a` in sequence space.
#[inline(always)]
fn dist(a: u32, b: u32) -> i64 {
    i64::from(a.wrapping_sub(b) as i32)
}

/// Whether a TCP segment from `side` of the flow `e` lies in the window
/// seen for it (see the module docs).
#[inline(always)]
fn tcp_in_window(e: &CtEntry, side: usize, p: &Parsed) -> bool {
    let me = side & 1;
    let other = me ^ 1;
    let flags = p.tcp_flags;
    let acks = flags & TCP_ACK != 0;
    if e.seen & (1 << me) == 0 {
        // This side's first segment answers the other side's opener.
        if !acks || (flags & TCP_RST != 0 && p.tcp_ack != e.seq_end[other]) {
            return false;
        }
    } else {
        let rwin = i64::from(e.max_win[other]);
        if dist(p.tcp_seq, e.seq_end[me]) > rwin.max(1)
            || dist(seq_end(p), e.seq_end[me]) < -rwin.max(MIN_BACK)
        {
            // A SYN from a side that spoke: a peer reusing the tuple (see
            // the module docs); it passes, and `update` ignores it.
            return flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        }
    }
    if acks {
        // An acknowledgement of a side that never spoke acknowledges
        // nothing that was sent.
        let acked = dist(p.tcp_ack, e.seq_end[other]);
        if e.seen & (1 << other) == 0
            || acked > 0
            || acked < -i64::from(e.max_win[me]).max(MIN_BACK)
        {
            return false;
        }
    }
    true
}

/// The verdict for a packet of a tracked flow: `PASS_CT`, or for a TCP
/// segment outside the window `DROP_INVALID_RST` / `DROP_INVALID_FIN` /
/// `DROP_INVALID_SEQ`. Reads the entry only (trace instances judge
/// without writing).
#[inline(always)]
pub(crate) fn check(t: &Tracked, dir: u8, p: &Parsed) -> u8 {
    if p.proto != IPPROTO_TCP {
        return reason::PASS_CT;
    }
    // SAFETY: `t.entry` points at a live map value (see `lookup`); read in
    // place (no stack copy), a racing update can at worst make this
    // misjudge one segment as in or out of window.
    let e = unsafe { &*t.entry };
    if tcp_in_window(e, side(e, dir), p) {
        reason::PASS_CT
    } else if p.tcp_flags & TCP_RST != 0 {
        reason::DROP_INVALID_RST
    } else if p.tcp_flags & TCP_FIN != 0 {
        reason::DROP_INVALID_FIN
    } else {
        reason::DROP_INVALID_SEQ
    }
}

/// Sequence end of a TCP segment: `seq + payload`, SYN and FIN count one.
#[inline(always)]
fn seq_end(p: &Parsed) -> u32 {
    p.tcp_seq
        .wrapping_add(p.tcp_len)
        .wrapping_add(u32::from(p.tcp_flags & TCP_SYN != 0))
        .wrapping_add(u32::from(p.tcp_flags & TCP_FIN != 0))
}

/// Records a TCP segment of `side` in the entry: highest sequence end,
/// largest window (scaled once both SYNs offered scaling), window scale.
#[inline(always)]
fn track_tcp(e: &mut CtEntry, side: usize, p: &Parsed) {
    let s = side & 1;
    let end = seq_end(p);
    if p.tcp_flags & TCP_SYN != 0 {
        e.wscale[s] = p.tcp_wscale;
        if s == 1 {
            e.isn_reply = p.tcp_seq;
        }
    }
    if e.seen & (1 << s) == 0 || (end.wrapping_sub(e.seq_end[s]) as i32) > 0 {
        e.seq_end[s] = end;
    }
    e.seen |= 1 << s;
    let scaled =
        p.tcp_flags & TCP_SYN == 0 && e.wscale[0] != CT_NO_WSCALE && e.wscale[1] != CT_NO_WSCALE;
    let win = if scaled {
        u32::from(p.tcp_win) << e.wscale[s].min(14)
    } else {
        u32::from(p.tcp_win)
    };
    if win > e.max_win[s] {
        e.max_win[s] = win;
    }
}

/// Flow accounting: one packet of `len` bytes from `side`, and its TCP
/// flags. Each side has its own counters, so ingress and egress of one
/// flow never race; two CPUs handling the same side of one flow at the same
/// instant (rare: a NIC steers a flow to one queue) can lose one count.
#[inline(always)]
fn account(e: *mut CtEntry, side: usize, len: u32, tcp_flags: u8) {
    let s = side & 1;
    // SAFETY: `e` points at a live map value for this program run; plain
    // stores of integer fields.
    unsafe {
        (*e).packets[s] = (*e).packets[s].wrapping_add(1);
        (*e).bytes[s] = (*e).bytes[s].wrapping_add(u64::from(len));
        (*e).tcp_flags |= tcp_flags;
    }
}

/// Updates an entry for a packet of its flow travelling in `dir` (a packet
/// `check` passed and let change the flow), marks a half-open flow assured
/// when the originator speaks after a reply, and a closing one half-open
/// again. With flow accounting (`acct`), the packet is counted in the
/// entry.
#[inline(always)]
pub(crate) fn update<K: FlowKey>(
    t: &Tracked,
    key: &K,
    dir: u8,
    p: &Parsed,
    now: u64,
    len: u32,
    acct: bool,
) {
    // SAFETY: `t.entry` comes from `lookup` in this run; plain stores of
    // integer fields (a racing CPU can at worst overwrite a timestamp,
    // a state or a sequence end).
    let e = unsafe { &mut *t.entry };
    let side = side(e, dir);
    if p.proto == IPPROTO_TCP
        && e.seen & (1 << side) != 0
        && (p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
            || (p.tcp_flags & TCP_RST != 0 && p.tcp_seq != e.seq_end[side]))
    {
        // A SYN from a side that spoke changes nothing (see
        // `tcp_in_window`), nor does a RST in the window but not at the
        // sequence the receiver expects (RFC 5961: it answers with a
        // challenge ACK; a genuine peer then resets at the exact sequence).
        return;
    }
    e.last_seen_ns = now;
    ctseen::note(t.seen_bucket, key.port_bit(), t.fp, now);
    if acct {
        account(t.entry, side, len, p.tcp_flags);
    }
    let reply = side == 1;
    let replied = e.state != CT_NEW;
    if reply && e.state == CT_NEW {
        e.state = CT_ESTABLISHED;
    }
    // The originator's TCP segment assures the flow only if it
    // acknowledges the replier's SYN (a spoofed opener never saw it).
    let mut assures = !reply && replied;
    if p.proto == IPPROTO_TCP {
        track_tcp(e, side, p);
        assures = assures && p.tcp_flags & TCP_ACK != 0 && dist(p.tcp_ack, e.isn_reply) >= 1;
        if p.tcp_flags & TCP_RST != 0 {
            e.state = CT_CLOSING;
        } else if p.tcp_flags & TCP_FIN != 0 {
            e.fin |= if reply { CT_FIN_REPLY } else { CT_FIN_ORIG };
            if e.fin == CT_FIN_ORIG | CT_FIN_REPLY {
                e.state = CT_CLOSING;
            }
        }
        if t.assured && e.state == CT_CLOSING {
            // A closing flow is half-open again: under pressure it goes
            // before any established flow.
            let _ = K::table().mark(key, false);
            return;
        }
    }
    if !t.assured && assures && e.state == CT_ESTABLISHED {
        // Both sides spoke and the originator again: assured, by the
        // way's bit (no copy).
        let _ = K::table().mark(key, true);
    }
}

/// Whether this packet, once allowed, opens a flow (makes an entry).
#[inline(always)]
pub(crate) fn opens_flow(p: &Parsed) -> bool {
    match p.proto {
        IPPROTO_TCP => p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
        IPPROTO_UDP => true,
        IPPROTO_ICMP => p.icmp_type == 8,
        IPPROTO_ICMPV6 => p.icmp_type == 128,
        _ => false,
    }
}

/// Writes a fresh entry for the flow opened by `p` travelling in `dir`
/// into `e`, field by field (an entry is too large to copy around on the
/// BPF stack).
#[allow(
    clippy::too_many_arguments,
    reason = "the entry, the flow's opening packet, the accounting switch and the audit mark"
)]
#[inline(always)]
fn fill_new(
    e: &mut CtEntry,
    rule_id: u32,
    dir: u8,
    p: &Parsed,
    now: u64,
    len: u32,
    acct: bool,
    audit: bool,
) {
    e.last_seen_ns = now;
    e.rule_id = rule_id;
    e.origin = dir;
    e.state = CT_NEW;
    // Volatile stores: LLVM merges adjacent plain zero stores into a
    // byte-at-a-time `memset` call on BPF (fields of 2-byte alignment).
    // SAFETY: plain stores to fields of `e`, a valid exclusive reference.
    unsafe {
        core::ptr::write_volatile(&raw mut e.fin, 0);
        core::ptr::write_volatile(&raw mut e.seen, 0);
        core::ptr::write_volatile(&raw mut e.seq_end, [0; 2]);
        core::ptr::write_volatile(&raw mut e.max_win, [0; 2]);
        core::ptr::write_volatile(&raw mut e.isn_reply, 0);
    }
    e.wscale = [CT_NO_WSCALE; 2];
    e.tcp_flags = if acct { p.tcp_flags } else { 0 };
    e.audit = u8::from(audit);
    e.first_seen_ns = now;
    e.packets = [u64::from(acct), 0];
    e.bytes = [if acct { u64::from(len) } else { 0 }, 0];
    if p.proto == IPPROTO_TCP {
        track_tcp(e, 0, p);
    }
}

/// Records a new flow opened by a packet travelling in `dir`, half-open,
/// in the family's table.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the flow's key, its opening packet, the accounting switch and the audit mark"
)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "insert from the scratch map value itself: a by-value entry would be copied onto the BPF stack"
)]
pub(crate) fn create<K: FlowKey>(
    cfg: &Config,
    key: &K,
    dir: u8,
    p: &Parsed,
    rule_id: u32,
    now: u64,
    len: u32,
    acct: bool,
    audit: bool,
) {
    // A full table evicts: a way of a dead or else the least recently
    // seen half-open flow (`cttable`); a failed insert only means the
    // replies will be judged by the policy.
    let Some(e) = SEG_CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program
    // run; nothing else uses it while this program runs on this CPU.
    let e = unsafe { &mut *e };
    fill_new(e, rule_id, dir, p, now, len, acct, audit);
    // The bucket first: a packet of the flow on another CPU never finds the
    // entry behind a stale bucket.
    let (remote, fp) = key.remote();
    ctseen::note(
        ct_seen_pack(remote, key.flow_bucket()),
        key.port_bit(),
        fp,
        now,
    );
    let horizon = segbpf_common::ct_seen_horizon(cfg, now);
    let _ = K::table().insert(key, &*e, now, horizon);
}
