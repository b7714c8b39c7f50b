//! Connection tracking of our own: an LRU hash keyed by the flow as the
//! host sees it (local/remote address and port), so both directions of a
//! flow find the same entry. TCP, UDP and ICMP echo are tracked. An entry
//! is made when a packet that opens a flow (TCP SYN without ACK, any UDP
//! datagram, an echo request) passes the policy; later packets of the flow
//! in either direction pass on the entry until it expires. Timeouts come
//! from `Config` and depend on the protocol and the TCP state; RST, or FIN
//! from both sides, shortens the entry's life to the closing timeout.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use segbpf_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_FIN_ORIG, CT_FIN_REPLY, CT_NEW, Config, CtEntry, CtKey,
    DIR_EGRESS, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    maps::SEG_CT,
    parse::{self, Bounds, L3_IPV4, Parsed},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_S: u64 = 1_000_000_000;

/// Current time for connection tracking, rate limiting and events: the
/// coarse monotonic clock (tick resolution, a few ms: ample for timeouts of
/// seconds, and much cheaper than a precise clock read in a VM).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn family(l3: u8) -> u8 {
    if l3 == L3_IPV4 { 4 } else { 6 }
}

/// Whether a packet of protocol `proto` / ICMP type is tracked, and its
/// "port" when it is ICMP (the echo id).
#[inline(always)]
fn is_echo(proto: u8, icmp_type: u8) -> bool {
    (proto == IPPROTO_ICMP && (icmp_type == 8 || icmp_type == 0))
        || (proto == IPPROTO_ICMPV6 && (icmp_type == 128 || icmp_type == 129))
}

/// The key of the packet's flow as seen from the host, or None if the
/// packet's protocol is not tracked.
#[inline(always)]
pub fn key(dir: u8, p: &Parsed) -> Option<CtKey> {
    let (sport, dport) = match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => (p.sport, p.dport),
        _ if is_echo(p.proto, p.icmp_type) => (p.echo_id, 0),
        _ => return None,
    };
    Some(make_key(
        dir,
        family(p.l3),
        p.proto,
        &p.src,
        &p.dst,
        sport,
        dport,
    ))
}

/// The key of the flow quoted by the ICMP error `p` travelling in `dir`
/// (the quoted packet went the other way), if it quotes a tracked protocol.
#[inline(always)]
pub fn related_key(pkt: &Bounds, dir: u8, p: &Parsed) -> Option<CtKey> {
    let q = parse::quoted(pkt, p)?;
    let quoted_dir = if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    };
    Some(make_key(
        quoted_dir,
        family(p.l3),
        q.proto,
        &q.src,
        &q.dst,
        q.sport,
        q.dport,
    ))
}

#[inline(always)]
fn make_key(
    dir: u8,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
) -> CtKey {
    // Ingress: the host is the destination; egress: the source. ICMP echo
    // has no remote "port": requests and replies share the id.
    let ingress = dir == DIR_INGRESS;
    let echo = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
    CtKey {
        family,
        proto,
        _pad: [0; 2],
        local_port: if echo {
            sport
        } else if ingress {
            dport
        } else {
            sport
        },
        remote_port: if echo {
            0
        } else if ingress {
            sport
        } else {
            dport
        },
        local: if ingress { *dst } else { *src },
        remote: if ingress { *src } else { *dst },
    }
}

/// Seconds an entry in `state` of protocol `proto` lives after its last packet.
#[inline(always)]
fn timeout_s(cfg: &Config, proto: u8, state: u8) -> u32 {
    match (proto, state) {
        (IPPROTO_TCP, CT_NEW) => cfg.ct_tcp_syn_s,
        (IPPROTO_TCP, CT_ESTABLISHED) => cfg.ct_tcp_est_s,
        (IPPROTO_TCP, _) => cfg.ct_tcp_close_s,
        (IPPROTO_UDP, CT_NEW) => cfg.ct_udp_s,
        (IPPROTO_UDP, _) => cfg.ct_udp_est_s,
        _ => cfg.ct_icmp_s,
    }
}

/// The live (not expired) entry of `key`, as a pointer into the map.
#[inline(always)]
pub fn lookup(cfg: &Config, key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = SEG_CT.get_ptr_mut(key)?;
    // SAFETY: `e` points at a value of the map, valid during this program
    // run; concurrent writers only store whole integer fields.
    let (last, state) = unsafe { ((*e).last_seen_ns, (*e).state) };
    let ttl = timeout_s(cfg, key.proto, state) as u64 * NS_PER_S;
    if now.saturating_sub(last) > ttl {
        return None;
    }
    Some(e)
}

/// Updates an entry for a packet of its flow travelling in `dir`.
#[inline(always)]
pub fn update(e: *mut CtEntry, dir: u8, p: &Parsed, now: u64) {
    // SAFETY: `e` comes from `lookup` in this run; plain stores of integer
    // fields (a racing CPU can at worst overwrite a timestamp or state).
    unsafe {
        (*e).last_seen_ns = now;
        let reply = dir != (*e).origin;
        if reply && (*e).state == CT_NEW {
            (*e).state = CT_ESTABLISHED;
        }
        if p.proto == IPPROTO_TCP {
            if p.tcp_flags & TCP_RST != 0 {
                (*e).state = CT_CLOSING;
            } else if p.tcp_flags & TCP_FIN != 0 {
                (*e).fin |= if reply { CT_FIN_REPLY } else { CT_FIN_ORIG };
                if (*e).fin == CT_FIN_ORIG | CT_FIN_REPLY {
                    (*e).state = CT_CLOSING;
                }
            }
        }
    }
}

/// Whether this packet, once allowed, opens a flow (makes an entry).
#[inline(always)]
pub fn opens_flow(p: &Parsed) -> bool {
    match p.proto {
        IPPROTO_TCP => p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
        IPPROTO_UDP => true,
        IPPROTO_ICMP => p.icmp_type == 8,
        IPPROTO_ICMPV6 => p.icmp_type == 128,
        _ => false,
    }
}

/// Records a new flow opened by a packet travelling in `dir`.
#[inline(always)]
pub fn create(key: &CtKey, dir: u8, rule_id: u32, now: u64) {
    let entry = CtEntry {
        last_seen_ns: now,
        rule_id,
        origin: dir,
        state: CT_NEW,
        fin: 0,
        _pad: 0,
    };
    // A full table evicts its least recently used entry (LRU map); a
    // failed insert only means the replies will be judged by the policy.
    let _ = SEG_CT.insert(key, entry, 0);
}
