//! The dry-run programs' own maps (`segbpf trace --services`): whom they
//! judge as, and the record of their decision. Only `DRY = true` code of
//! `cgroup.rs` calls these; the live programs never do.

use segbpf_common::{MAX_SERVICES, SvcTrace};

use crate::svc_maps::{SEG_SVC_DRY, SEG_SVC_TRC};

/// The service, the loopback peer's service and whether the packet goes
/// over loopback, as userspace asked; `None` (the caller drops, nothing
/// is recorded): no valid service id.
#[inline(always)]
pub(crate) fn dry_who() -> Option<(u8, u8, bool)> {
    let d = SEG_SVC_DRY.get(0)?;
    let max = MAX_SERVICES as u8;
    if d.svc == 0 || d.svc > max || d.peer > max {
        return None;
    }
    Some((d.svc, d.peer, d.loopback != 0))
}

/// Records the decision of a dry run.
#[inline(always)]
pub(crate) fn record(allowed: bool, why: u8, audit: bool, rule: u32) {
    if let Some(t) = SEG_SVC_TRC.get_ptr_mut(0) {
        // SAFETY: a valid pointer to the map value returned by the lookup.
        let t = unsafe { &mut *t };
        *t = SvcTrace {
            valid: 1,
            allowed: u8::from(allowed),
            reason: why,
            audit: u8::from(audit),
            rule,
        };
    }
}
