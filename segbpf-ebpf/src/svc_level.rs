//! The services' level probe. Inside a cgroup namespace the cgroup paths
//! userspace sees start at the namespace's root, not at the hierarchy's,
//! so userspace cannot know from them the absolute levels the services
//! programs walk (`bpf_skb_ancestor_cgroup_id`). This program, run once
//! with BPF_PROG_TEST_RUN (the kernel gives the test packet a socket of
//! the caller's cgroup), writes the id of that socket's cgroup's ancestor
//! at every absolute level 0..`SVC_LEVELS` into `SEG_SVC_LVL` (0 below the
//! socket's own cgroup); userspace finds its own cgroup's id there.

use aya_ebpf::{
    helpers::bpf_skb_ancestor_cgroup_id, macros::map, maps::Array, programs::SkBuffContext,
};
use segbpf_common::SVC_LEVELS;

use crate::cgroup::PASS;

/// Absolute level -> ancestor cgroup id of the test socket's cgroup.
#[map]
pub(crate) static SEG_SVC_LVL: Array<u64> = Array::with_max_entries(SVC_LEVELS, 0);

/// Writes every level's ancestor id; always passes.
#[inline(always)]
pub(crate) fn probe(ctx: &SkBuffContext) -> i32 {
    for level in 0..SVC_LEVELS {
        // SAFETY: the helper reads the skb's socket (0 when there is none
        // or the level lies below its cgroup); the context is the kernel's.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level as i32) };
        if let Some(slot) = SEG_SVC_LVL.get_ptr_mut(level) {
            // SAFETY: a valid pointer to the map value returned by the
            // lookup, within the map's value size.
            unsafe { *slot = id };
        }
    }
    PASS
}
