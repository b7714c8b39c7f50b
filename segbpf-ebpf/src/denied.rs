//! Denied aggregates: each dropped (or audit-mode would-be dropped) packet
//! adds to its (direction, source, destination, protocol, destination
//! port, reason) aggregate in a bucket of the per-CPU table `SEG_DENY_SEL`
//! names: a seeded hash of the key picks the bucket, so a drop costs the
//! hash, an array slot and a key compare, never a hash-table insert, and a
//! flood of new sources costs what a flood of one does. Off with flow
//! accounting (`attach --flow-log off`).
//!
//! Under a flood (more than `DENIED_EXACT_PER_TICK` drops on a CPU in a
//! tick of about 134 ms) one drop in `DENIED_SAMPLE` goes to its
//! aggregate and the others only add to this CPU's `unsampled` count
//! (`SEG_DENY_RATE`): a drop then costs a per-CPU counter, and userspace
//! marks that drain's records as not exact.
//!
//! The first key to reach an empty bucket owns it until userspace empties
//! the table. A packet of another key that hashes there is counted in
//! `SEG_DENY_LOST` (not attributed) and marks the bucket shared, so its
//! readers say the numbers of that index are not exact. The exact counts
//! per direction and reason are `SEG_STATS` (`stats`). See
//! `segbpf_common::denied`.

use segbpf_common::{
    Config, DENIED_TICK_SHIFT, DeniedKey, EVENT_AUDIT, EVENT_DROP, bucket, denied_attributed,
};

use crate::{
    ct,
    maps::{SEG_DENY_LOST, SEG_DENY_RATE, SEG_DENY_SEL, SEG_DENYB0, SEG_DENYB1, SEGBPF_DENY_SEED},
    parse::{L3_IPV4, L3_IPV6, Parsed},
    verdict::Decision,
};

/// Adds the packet (`p` is None when parsing failed) to its aggregate.
#[inline(always)]
pub(crate) fn record(cfg: &Config, dir: u8, len: u32, p: Option<&Parsed>, d: &Decision, now: u64) {
    if cfg.flow_acct == 0 || !sampled(now) {
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
    let words = key.words();
    let index = bucket(&key, SEGBPF_DENY_SEED.load());
    let slot = if matches!(SEG_DENY_SEL.get(0), Some(&1)) {
        SEG_DENYB1.get_ptr_mut(index)
    } else {
        SEG_DENYB0.get_ptr_mut(index)
    };
    let Some(cell) = slot else {
        lost();
        return;
    };
    // SAFETY: this CPU's bucket of a per-CPU array, valid for this program
    // run; the program is not preempted on this CPU, and userspace resets
    // a table only after the selector left it and running programs ended.
    // `DeniedKey` is 40 bytes, 8-aligned: read as five u64.
    unsafe {
        if (*cell).packets == 0 {
            (*cell).key = key;
            (*cell).packets = 1;
            (*cell).bytes = u64::from(len);
            (*cell).first_ns = now;
            (*cell).last_ns = now;
            (*cell).tcp_flags = flags;
            return;
        }
        // Word by word, without branches: `==` on arrays becomes a
        // `memcmp`, which the BPF backend expands into a byte loop.
        let owner = (&raw const (*cell).key).cast::<u64>();
        let differ = (*owner ^ words[0])
            | (*owner.add(1) ^ words[1])
            | (*owner.add(2) ^ words[2])
            | (*owner.add(3) ^ words[3])
            | (*owner.add(4) ^ words[4]);
        if differ == 0 {
            (*cell).packets += 1;
            (*cell).bytes += u64::from(len);
            (*cell).last_ns = now;
            (*cell).tcp_flags |= flags;
            return;
        }
        (*cell).shared = 1;
    }
    lost();
}

/// Whether this drop goes to its aggregate (`denied_attributed` of this
/// CPU's count in the tick); when not, it is counted as unsampled.
#[inline(always)]
fn sampled(now: u64) -> bool {
    let Some(st) = SEG_DENY_RATE.get_ptr_mut(0) else {
        return true;
    };
    let tick = now >> DENIED_TICK_SHIFT;
    // SAFETY: this CPU's slot of a per-CPU array, valid for this program
    // run; the program is not preempted on this CPU.
    unsafe {
        if (*st).tick != tick {
            (*st).tick = tick;
            (*st).count = 0;
        }
        (*st).count += 1;
        if denied_attributed((*st).count) {
            return true;
        }
        (*st).unsampled += 1;
    }
    false
}

/// Counts one denied packet that was not attributed to an aggregate.
#[inline(always)]
fn lost() {
    if let Some(c) = SEG_DENY_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; no preemption.
        unsafe { *c += 1 };
    }
}
