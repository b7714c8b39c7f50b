//! Counters and the dry-run trace record.

use segbpf_common::{Counter, RUN_DRY, RUN_LIVE, STATS_LEN, TraceResult, reason};

use crate::{
    maps::{SEG_RULE_STATS, SEG_STATS, SEG_TRACE, SEGBPF_RUN_MODE},
    verdict::Decision,
};

/// Adds one packet of `bytes` to a per-CPU counter.
#[inline(always)]
fn bump(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: this CPU's slot of a per-CPU array; the program is not
        // preempted while it runs, so plain increments are race free.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts the decision per direction and reason, and per rule when a rule
/// judged it (live and record instances); records it in `SEG_TRACE`
/// (trace and record instances).
#[inline(always)]
pub(crate) fn record(d: &Decision, dir: u8, bytes: u64) {
    let mode = SEGBPF_RUN_MODE.load();
    if mode != RUN_LIVE {
        if let Some(slot) = SEG_TRACE.get_ptr_mut(0) {
            // SAFETY: `slot` points at the map's only value, valid for the
            // program's run; TraceResult is plain data.
            unsafe {
                *slot = TraceResult {
                    rule_id: d.rule_id,
                    class_id: d.class_id,
                    reason: d.reason,
                    proto: d.proto,
                    dport: d.dport,
                    valid: 1,
                    _pad: [0; 3],
                };
            }
        }
        if mode == RUN_DRY {
            return;
        }
    }
    bump(
        SEG_STATS.get_ptr_mut(u32::from(dir) * STATS_LEN + u32::from(d.reason)),
        bytes,
    );
    if d.reason == reason::PASS_RULE {
        bump(SEG_RULE_STATS.get_ptr_mut(d.rule_id), bytes);
    }
}
