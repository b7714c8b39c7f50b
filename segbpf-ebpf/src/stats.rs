//! Counters and the dry-run trace record.

use segbpf_common::TraceResult;

use crate::{
    maps::{SEG_STATS, SEG_TRACE, SEGBPF_DRY_RUN},
    verdict::Decision,
};

/// Counts the decision, or in a dry-run instance records it for `segbpf trace`.
#[inline(always)]
pub fn record(d: &Decision) {
    if SEGBPF_DRY_RUN.load() != 0 {
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
        return;
    }
    if let Some(counter) = SEG_STATS.get_ptr_mut(d.reason as u32) {
        // SAFETY: per-CPU slot of this CPU; the program is not preempted
        // while it runs, so a plain increment is race free.
        unsafe { *counter += 1 };
    }
}
