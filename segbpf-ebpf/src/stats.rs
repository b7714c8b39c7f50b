//! Counters and the dry-run trace record.

use segbpf_common::{RUN_DRY, RUN_LIVE, TraceResult};

use crate::{
    maps::{SEG_STATS, SEG_TRACE, SEGBPF_RUN_MODE},
    verdict::Decision,
};

/// Counts the decision (live and record instances) and records it in
/// `SEG_TRACE` (trace and record instances).
#[inline(always)]
pub fn record(d: &Decision) {
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
    if let Some(counter) = SEG_STATS.get_ptr_mut(d.reason as u32) {
        // SAFETY: per-CPU slot of this CPU; the program is not preempted
        // while it runs, so a plain increment is race free.
        unsafe { *counter += 1 };
    }
}
