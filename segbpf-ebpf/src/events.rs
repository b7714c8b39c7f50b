//! Drop events: a versioned record per dropped (or, in audit mode, would-be
//! dropped) packet into the `SEG_EVENTS` ring buffer, behind a rate limiter
//! in the kernel so a flood of denied traffic costs a counter increment,
//! not a ring-buffer write, per packet. Fixed windows of
//! `log_burst / log_rate` seconds allow `log_burst` events each; events
//! over the limit and events lost to a full ring are counted separately in
//! `SEG_EVSTATS`.

use segbpf_common::{
    Config, EV_EMITTED, EV_LOST, EV_SUPPRESSED, EVENT_AUDIT, EVENT_DROP, EVENT_VERSION, Event,
};

use crate::{
    maps::{SEG_EVENTS, SEG_EVSTATS, SEG_RATE},
    parse::{L3_IPV4, L3_IPV6, Parsed},
    verdict::Decision,
};

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = SEG_EVSTATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array; no preemption.
        unsafe { *c += 1 };
    }
}

/// Whether the rate limiter lets one more event through now.
#[inline(always)]
fn admit(cfg: &Config, now: u64) -> bool {
    let Some(st) = SEG_RATE.get_ptr_mut(0) else {
        return false;
    };
    let burst = u64::from(if cfg.log_burst == 0 { 1 } else { cfg.log_burst });
    // SAFETY: the map's only value, valid for this run. CPUs racing here
    // can at worst let one extra event each through at a window's edge.
    unsafe {
        // The window's length is divided out once per window, not per
        // packet (a 64-bit division is a measurable part of a drop).
        if now >= (*st).window_end_ns {
            (*st).window_end_ns = now + burst * 1_000_000_000 / u64::from(cfg.log_rate);
            (*st).count = 0;
        }
        if (*st).count >= burst {
            return false;
        }
        (*st).count += 1;
    }
    true
}

/// Reports a dropped packet (`p` is None when parsing failed).
#[inline(always)]
pub(crate) fn report(
    cfg: &Config,
    dir: u8,
    ifindex: u32,
    len: u32,
    p: Option<&Parsed>,
    d: &Decision,
    now: u64,
) {
    if cfg.log_rate == 0 {
        return;
    }
    if !admit(cfg, now) {
        count(EV_SUPPRESSED);
        return;
    }
    let Some(mut entry) = SEG_EVENTS.reserve::<Event>(0) else {
        count(EV_LOST);
        return;
    };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring-buffer
    // record of size_of::<Event>(); every field (padding included) is
    // written before submit, so no stale bytes reach userspace.
    unsafe {
        (*e).version = EVENT_VERSION;
        (*e).kind = if d.audit { EVENT_AUDIT } else { EVENT_DROP };
        (*e).dir = dir;
        (*e).reason = d.reason;
        (*e)._pad = 0;
        (*e).ifindex = ifindex;
        (*e).len = len;
        (*e).ts_ns = now;
        (*e).generation = cfg.generation;
        (*e)._pad2 = [0; 4];
        if let Some(p) = p {
            (*e).family = match p.l3 {
                L3_IPV4 => 4,
                L3_IPV6 => 6,
                _ => 0,
            };
            (*e).proto = p.proto;
            (*e).tcp_flags = p.tcp_flags;
            (*e).src = p.src;
            (*e).dst = p.dst;
            (*e).sport = if p.sport == 0 { p.echo_id } else { p.sport };
            (*e).dport = if p.dport == 0 {
                u16::from(p.icmp_type)
            } else {
                p.dport
            };
        } else {
            (*e).family = 0;
            (*e).proto = 0;
            (*e).tcp_flags = 0;
            (*e).src = [0; 16];
            (*e).dst = [0; 16];
            (*e).sport = 0;
            (*e).dport = 0;
        }
    }
    entry.submit(0);
    count(EV_EMITTED);
}
