//! segbpf kernel programs.
//!
//! `segbpf_xdp_ingress` judges every packet entering the interface. The work
//! is split by concern, as in Cilium's bpf/lib: `parse` (headers, bounds,
//! malformed-packet reasons), `lookup` (policy maps), `verdict` (combine
//! parse result, lookups and defaults), `stats` (counters and the dry-run
//! trace record), `maps` (every map definition).
#![no_std]
#![no_main]

mod lookup;
mod maps;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use segbpf_common::{DIR_INGRESS, reason};

/// XDP ingress: parse, look the peer up, apply the verdict.
#[xdp]
pub fn segbpf_xdp_ingress(ctx: XdpContext) -> u32 {
    let pkt = parse::Bounds::new(ctx.data(), ctx.data_end());
    let decision = verdict::decide(&pkt, DIR_INGRESS);
    stats::record(&decision);
    if reason::passes(decision.reason) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; no kernel code panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
