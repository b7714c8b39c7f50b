//! segbpf kernel programs.
//!
//! `segbpf_xdp_ingress` judges every packet entering the interface. The work
//! is split by concern, as in Cilium's bpf/lib: `parse` (headers, bounds,
//! malformed-packet reasons), `lookup` (policy maps), `verdict` (combine
//! parse result, lookups and defaults), `stats` (counters and the dry-run
//! trace record), `maps` (every map definition).
#![no_std]
#![no_main]
#![allow(
    clippy::inline_always,
    reason = "BPF: helpers are inlined into the two programs so the verifier sees one function each, with packet bounds it can follow"
)]
#![allow(
    unused_crate_dependencies,
    reason = "the library target (lib.rs) exists only so segbpf can depend on this crate"
)]

mod cgroup;
mod ct;
mod denied;
mod events;
mod frag;
mod lookup;
mod maps;
mod parse;
mod stats;
mod svc_maps;
mod trafficgen;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_skb, classifier, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
};
use segbpf_common::{DIR_EGRESS, DIR_INGRESS, LINK_RAW_IP};

use crate::maps::SEGBPF_LINK;

/// Bytes of a TC skb made linear before parsing (every header we read
/// lies within them; the IPv6 extension walk is bounded to 1 KiB).
const TC_PULL_LEN: u32 = 1280;

/// XDP ingress: parse, look the peer up, apply the verdict.
#[xdp]
pub(crate) fn segbpf_xdp_ingress(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let pkt = parse::Bounds::new(ctx.data(), ctx.data_end(), len);
    // Without a link layer the frame starts at the IP header: its version
    // says which.
    let raw = if SEGBPF_LINK.load() == LINK_RAW_IP {
        Some(parse::raw_ip_ethertype(&pkt))
    } else {
        None
    };
    // SAFETY: reading a field of the kernel-provided context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let decision = verdict::decide(&pkt, raw, DIR_INGRESS, ifindex, len as u32);
    stats::record(&decision, DIR_INGRESS, len as u64);
    if decision.lets_through() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// TC egress: the same parser and verdict, with the destination as the peer.
#[classifier]
pub(crate) fn segbpf_tc_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    // Make the headers linear; if that fails the parser sees fewer bytes
    // and drops the packet as truncated rather than judging it unread.
    let _ = ctx.pull_data(if len < TC_PULL_LEN { len } else { TC_PULL_LEN });
    let pkt = parse::Bounds::new(ctx.data(), ctx.data_end(), len as usize);
    // Without a link layer the skb starts at the IP header: its protocol
    // field (an EtherType, network order) says which.
    let raw = if SEGBPF_LINK.load() == LINK_RAW_IP {
        Some(u16::from_be(ctx.skb.protocol() as u16))
    } else {
        None
    };
    // SAFETY: reading a field of the kernel-provided context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let decision = verdict::decide(&pkt, raw, DIR_EGRESS, ifindex, len);
    stats::record(&decision, DIR_EGRESS, u64::from(len));
    if decision.lets_through() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// The floor for benchmarks: an XDP program that only passes. Never
/// attached by segbpf; `cargo xtask bench` measures against it.
#[xdp]
pub(crate) fn segbpf_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark traffic generator, run only by `cargo xtask bench` through
/// BPF_PROG_TEST_RUN in live-frames mode (see `trafficgen`). Never attached.
#[xdp]
pub(crate) fn segbpf_xdp_gen(ctx: XdpContext) -> u32 {
    trafficgen::next(&ctx)
}

/// Services: every packet a socket receives, judged by its cgroup's
/// service (attached once at the cgroup v2 root, see `cgroup`).
#[cgroup_skb(ingress)]
pub(crate) fn segbpf_svc_ingress(ctx: SkBuffContext) -> i32 {
    cgroup::judge(&ctx, DIR_INGRESS)
}

/// Services: every packet a socket sends.
#[cgroup_skb(egress)]
pub(crate) fn segbpf_svc_egress(ctx: SkBuffContext) -> i32 {
    cgroup::judge(&ctx, DIR_EGRESS)
}

/// The floor for the services benchmark: a cgroup_skb program that only
/// passes. Never attached by segbpf.
#[cgroup_skb(ingress)]
pub(crate) fn segbpf_svc_empty(_ctx: SkBuffContext) -> i32 {
    cgroup::PASS
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
