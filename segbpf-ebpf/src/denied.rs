//! Denied aggregates: each dropped (or audit-mode would-be dropped) packet
//! adds to its (direction, source, destination, protocol, destination
//! port, reason) aggregate in the per-CPU table `SEG_DENY_SEL` names, so a
//! flood costs a hash update, not a record. Off with flow accounting
//! (`attach --flow-log off`). A full table counts the packet in
//! `SEG_DENY_LOST` and is marked in `SEG_DENY_FULL`, so later new
//! aggregates skip the insert until userspace empties it (see
//! `segbpf_common::denied`).

use segbpf_common::{Config, DeniedKey, DeniedStat, EVENT_AUDIT, EVENT_DROP};

use crate::{
    ct,
    maps::{SEG_DENIED0, SEG_DENIED1, SEG_DENY_FULL, SEG_DENY_LOST, SEG_DENY_SEL},
    parse::{L3_IPV4, L3_IPV6, Parsed},
    verdict::Decision,
};

/// Adds the packet (`p` is None when parsing failed) to its aggregate.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference: a by-value key or value would be copied again onto the BPF stack"
)]
pub(crate) fn record(cfg: &Config, dir: u8, len: u32, p: Option<&Parsed>, d: &Decision, now: u64) {
    if cfg.flow_acct == 0 {
        return;
    }
    let kind = if d.audit { EVENT_AUDIT } else { EVENT_DROP };
    // Built in one literal per case (not zeroed, then overwritten): LLVM
    // turns the zeroing of the address bytes into a byte-loop `memset`.
    let key = match p {
        Some(p) => DeniedKey {
            family: match p.l3 {
                L3_IPV4 => 4,
                L3_IPV6 => 6,
                _ => 0,
            },
            proto: p.proto,
            dir,
            reason: d.reason,
            kind,
            opens: u8::from(ct::opens_flow(p)),
            dport: if p.dport == 0 {
                u16::from(p.icmp_type)
            } else {
                p.dport
            },
            src: p.src,
            dst: p.dst,
        },
        None => DeniedKey {
            family: 0,
            proto: 0,
            dir,
            reason: d.reason,
            kind,
            opens: 0,
            dport: 0,
            src: [0; 16],
            dst: [0; 16],
        },
    };
    let flags = p.map_or(0, |p| p.tcp_flags);
    let second = matches!(SEG_DENY_SEL.get(0), Some(&1));
    let slot = if second {
        SEG_DENIED1.get_ptr_mut(&key)
    } else {
        SEG_DENIED0.get_ptr_mut(&key)
    };
    if let Some(v) = slot {
        // SAFETY: this CPU's value of a per-CPU hash element, valid for
        // this program run; the program is not preempted on this CPU.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += u64::from(len);
            (*v).last_ns = now;
            (*v).tcp_flags |= flags;
        }
        return;
    }
    // A table that was full stays full until userspace empties it: count
    // the packet as lost without another insert that would fail (a
    // spoofed flood of new aggregates then costs a lookup, not two).
    let table = u32::from(second);
    if matches!(SEG_DENY_FULL.get(table), Some(&1)) {
        lost();
        return;
    }
    let v = DeniedStat {
        packets: 1,
        bytes: u64::from(len),
        first_ns: now,
        last_ns: now,
        tcp_flags: flags,
        _pad: [0; 7],
    };
    // BPF_ANY: if another CPU made the element meanwhile, this writes only
    // this CPU's value, which was empty.
    let inserted = if second {
        SEG_DENIED1.insert(&key, &v, 0)
    } else {
        SEG_DENIED0.insert(&key, &v, 0)
    };
    if inserted.is_err() {
        if let Some(full) = SEG_DENY_FULL.get_ptr_mut(table) {
            // SAFETY: a value of an array map, valid for this run; a u32
            // store (CPUs racing here all store 1).
            unsafe { *full = 1 };
        }
        lost();
    }
}

/// Counts one denied packet that could not be aggregated.
#[inline(always)]
fn lost() {
    if let Some(c) = SEG_DENY_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; no preemption.
        unsafe { *c += 1 };
    }
}
