//! segbpf kernel programs.
//!
//! `segbpf_xdp_ingress` judges every packet entering the interface,
//! `segbpf_tc_egress` every packet leaving it; each hands IPv6 packets to
//! its IPv6 twin (`*_v6`) with a tail call, so the verifier checks each
//! family's program alone (about half the paths each). Both hand the ICMP
//! errors that the related-flow check may judge to the hook's error
//! program (`*_err`), the only one that carries that check, so its paths
//! are verified once instead of on every path of the others. The work
//! is split by concern, as in Cilium's bpf/lib: `parse` (headers, bounds,
//! malformed-packet reasons), `lookup` (policy maps), `verdict` (combine
//! parse result, lookups and defaults), `stats` (counters and the dry-run
//! trace record), `maps` (every map definition).
#![no_std]
#![no_main]
// The BPF target has atomic loads and stores only (`target_has_atomic` is
// unset for it): the read-modify-writes of the last-seen buckets
// (`ctseen::note`: the filter's OR, the fingerprints' compare-and-exchange
// and OR) call the intrinsics, which LLVM emits as BPF_ATOMIC OR and
// BPF_CMPXCHG.
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core_intrinsics: the only way to an atomic OR or compare-and-exchange on this target"
)]
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
mod ctkey;
mod ctseen;
mod cttable;
mod denied;
mod events;
mod frag;
mod lookup;
mod lpmkey;
mod maps;
mod parse;
mod stats;
mod svc_flow;
mod svc_level;
mod svc_maps;
mod svc_pkt;
mod svc_stamp;
mod svc_trace;
mod trafficgen;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_skb, classifier, xdp},
    programs::{SkBuffContext, TcContext, XdpContext},
};
use segbpf_common::{
    CtKey, CtKey4, DIR_EGRESS, DIR_INGRESS, LINK_RAW_IP, RUN_DRY, TAIL_INDEX_ERR as TAIL_ERROR,
    TAIL_INDEX_V6 as TAIL_V6, reason,
};

use crate::maps::{SEG_TAIL_TC, SEG_TAIL_XDP, SEGBPF_LINK, SEGBPF_RUN_MODE};

/// Bytes of a TC skb made linear before parsing (every header we read
/// lies within them; the IPv6 extension walk is bounded to 1 KiB).
const TC_PULL_LEN: u32 = 1280;

/// What `enforce` decided.
enum Outcome {
    /// The packet goes on.
    Pass,
    /// The packet is dropped.
    Drop,
    /// An IPv6 packet in an IPv4 program: the IPv6 program judges it.
    HandOffV6,
    /// An ICMP error to check against the connection tables (see
    /// `verdict::hands_off_error`), its parse in `SEG_PARSED`: the error
    /// program judges it.
    HandOffError,
}

/// XDP ingress: IPv4 and everything that is not IP; IPv6 packets go on to
/// `segbpf_xdp_ingress_v6` (a tail call: each program is verified alone).
#[xdp]
pub(crate) fn segbpf_xdp_ingress(ctx: XdpContext) -> u32 {
    match xdp_enforce::<false>(&ctx) {
        Outcome::Pass => xdp_action::XDP_PASS,
        Outcome::Drop => xdp_action::XDP_DROP,
        Outcome::HandOffV6 => xdp_hand_off(&ctx, TAIL_V6),
        Outcome::HandOffError => xdp_hand_off(&ctx, TAIL_ERROR),
    }
}

/// Hands the packet to the ingress program at `index` of `SEG_TAIL_XDP`.
#[inline(always)]
fn xdp_hand_off(ctx: &XdpContext, index: u32) -> u32 {
    // SAFETY: a tail call with this program's own context; it returns only
    // if the table holds no program.
    unsafe { SEG_TAIL_XDP.tail_call(ctx, index) };
    hand_off_failed(DIR_INGRESS, (ctx.data_end() - ctx.data()) as u64);
    xdp_action::XDP_DROP
}

/// XDP ingress for IPv6 packets, reached only from `segbpf_xdp_ingress`.
#[xdp]
pub(crate) fn segbpf_xdp_ingress_v6(ctx: XdpContext) -> u32 {
    match xdp_enforce::<true>(&ctx) {
        Outcome::Pass => xdp_action::XDP_PASS,
        Outcome::HandOffError => xdp_hand_off(&ctx, TAIL_ERROR),
        Outcome::Drop | Outcome::HandOffV6 => xdp_action::XDP_DROP,
    }
}

/// XDP ingress for the ICMP errors the two programs above hand on (see
/// `verdict::hands_off_error`): judged from their parse in `SEG_PARSED`.
#[xdp]
pub(crate) fn segbpf_xdp_ingress_err(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let pkt = parse::Bounds::new(ctx.data(), ctx.data_end(), len);
    // SAFETY: reading a field of the kernel-provided context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match enforce_error(&pkt, DIR_INGRESS, ifindex, len as u32) {
        Outcome::Pass => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn xdp_enforce<const V6: bool>(ctx: &XdpContext) -> Outcome {
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
    enforce::<V6>(&pkt, raw, DIR_INGRESS, ifindex, len as u32)
}

/// TC egress: the same parser and verdict, with the destination as the
/// peer; IPv6 packets go on to `segbpf_tc_egress_v6`.
#[classifier]
pub(crate) fn segbpf_tc_egress(ctx: TcContext) -> i32 {
    match tc_enforce::<false>(&ctx) {
        Outcome::Pass => TC_ACT_OK,
        Outcome::Drop => TC_ACT_SHOT,
        Outcome::HandOffV6 => tc_hand_off(&ctx, TAIL_V6),
        Outcome::HandOffError => tc_hand_off(&ctx, TAIL_ERROR),
    }
}

/// Hands the packet to the egress program at `index` of `SEG_TAIL_TC`.
#[inline(always)]
fn tc_hand_off(ctx: &TcContext, index: u32) -> i32 {
    // SAFETY: as in `xdp_hand_off`.
    unsafe { SEG_TAIL_TC.tail_call(ctx, index) };
    hand_off_failed(DIR_EGRESS, u64::from(ctx.len()));
    TC_ACT_SHOT
}

/// TC egress for IPv6 packets, reached only from `segbpf_tc_egress`.
#[classifier]
pub(crate) fn segbpf_tc_egress_v6(ctx: TcContext) -> i32 {
    match tc_enforce::<true>(&ctx) {
        Outcome::Pass => TC_ACT_OK,
        Outcome::HandOffError => tc_hand_off(&ctx, TAIL_ERROR),
        Outcome::Drop | Outcome::HandOffV6 => TC_ACT_SHOT,
    }
}

/// TC egress for the ICMP errors the two programs above hand on (the
/// headers are already linear: the program that handed it on pulled them).
#[classifier]
pub(crate) fn segbpf_tc_egress_err(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let pkt = parse::Bounds::new(ctx.data(), ctx.data_end(), len as usize);
    // SAFETY: reading a field of the kernel-provided context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match enforce_error(&pkt, DIR_EGRESS, ifindex, len) {
        Outcome::Pass => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn tc_enforce<const V6: bool>(ctx: &TcContext) -> Outcome {
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
    enforce::<V6>(&pkt, raw, DIR_EGRESS, ifindex, len)
}

/// An IPv6 packet whose program was missing from the tail-call table
/// (never, once userspace loaded the instance): dropped, counted as a
/// default drop. Fail closed.
#[inline(always)]
fn hand_off_failed(dir: u8, bytes: u64) {
    stats::record(&verdict::unconfigured(), dir, bytes);
}

/// Judges the packet in `pkt` (`raw`: where it begins, see `parse::parse`)
/// travelling in `dir` on `ifindex`: parse, decide (`verdict`), then
/// report a drop (`events`, `denied`; live and record instances) and count
/// the decision (`stats`). `V6`: the program's IP family (see
/// `parse::parse`); an IPv4 program hands IPv6 packets on before it reads
/// the configuration, so each packet reads it once.
#[inline(always)]
fn enforce<const V6: bool>(
    pkt: &parse::Bounds,
    raw: Option<u16>,
    dir: u8,
    ifindex: u32,
    len: u32,
) -> Outcome {
    // This CPU's slot: scratch for the IPv6 parser (see `parse::parse`),
    // then a copy of what the parser learned, from which the verdict (and
    // an error program handed the packet) judges: the verifier reads it
    // back as plain numbers, so the parser's paths (the extension-header
    // walk's, for IPv6) meet before the verdict instead of each carrying
    // its own copy of it through the rest of the program.
    let Some(slot) = maps::SEG_PARSED.get_ptr_mut(0) else {
        return Outcome::Drop;
    };
    let scratch = if V6 {
        // SAFETY: a field of this CPU's slot (not read through `slot`
        // while the parser uses it).
        unsafe { &raw mut (*slot).l4_off }
    } else {
        core::ptr::null_mut()
    };
    let parsed = parse::parse::<V6>(pkt, raw, scratch);
    if !V6 && matches!(parsed, Err(parse::HAND_OFF_V6)) {
        return Outcome::HandOffV6;
    }
    // Both families judge from the copy: for IPv4 too it halves what the
    // verifier walks (86,000 instructions processed to 48,000, the load
    // 100 ms to 50) at no measured cost per packet (BENCHMARKS.md, issue
    // 24's seventh session).
    let parsed: Result<&parse::Parsed, u8> = match &parsed {
        Ok(p) => {
            // SAFETY: this CPU's slot of a per-CPU array, valid for the
            // program run; nothing else uses it meanwhile. `black_box`
            // keeps the compiler from reusing the values it wrote.
            unsafe {
                core::ptr::copy_nonoverlapping(p, slot, 1);
                Ok(&*core::hint::black_box(slot))
            }
        }
        Err(r) => Err(*r),
    };
    let Some(cfg) = lookup::config() else {
        // Unreadable configuration: fail closed.
        let d = verdict::unconfigured();
        stats::record(&d, dir, u64::from(len));
        return Outcome::Drop;
    };
    if let Ok(p) = parsed
        && verdict::hands_off_error(cfg, p)
    {
        // The parse is in this CPU's slot already (above).
        return Outcome::HandOffError;
    }
    // Each program carries its own family's connection tables only.
    if V6 {
        finish::<CtKey>(pkt, cfg, &parsed, dir, ifindex, len, false)
    } else {
        finish::<CtKey4>(pkt, cfg, &parsed, dir, ifindex, len, false)
    }
}

/// Judges the ICMP error handed on by a packet program (its parse in this
/// CPU's `SEG_PARSED` slot, read back as plain numbers) in `pkt`, with the
/// related-flow check. A slot that does not hold such an error (never: the
/// packet programs write it before they hand on) drops, counted as a
/// default drop. Fail closed.
#[inline(always)]
fn enforce_error(pkt: &parse::Bounds, dir: u8, ifindex: u32, len: u32) -> Outcome {
    let Some(slot) = maps::SEG_PARSED.get_ptr_mut(0) else {
        hand_off_failed(dir, u64::from(len));
        return Outcome::Drop;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program
    // run, written by the program that handed the packet on (a tail call
    // runs on the same CPU, nothing runs in between).
    let p = unsafe { &*slot };
    if !verdict::is_error_to_relate(p) {
        hand_off_failed(dir, u64::from(len));
        return Outcome::Drop;
    }
    let Some(cfg) = lookup::config() else {
        hand_off_failed(dir, u64::from(len));
        return Outcome::Drop;
    };
    // Judged in full (rules, defaults, the related flow) under the
    // configuration in force now, like any packet that arrives after a
    // reload: `decide` checks tracking and `defaults.icmp` itself.
    // An ICMP error is never a tracked flow itself (`ct::key` gives none):
    // the key form only types that path. The related flow is looked up in
    // the tables of the error's family (`verdict::related_flow_lives`).
    finish::<CtKey4>(pkt, cfg, &Ok(p), dir, ifindex, len, true)
}

/// Decides (`related`: see `verdict::hands_off_error`), then reports a drop
/// and counts the decision.
#[inline(always)]
fn finish<K: ctkey::FlowKey>(
    pkt: &parse::Bounds,
    cfg: &segbpf_common::Config,
    parsed: &Result<&parse::Parsed, u8>,
    dir: u8,
    ifindex: u32,
    len: u32,
    related: bool,
) -> Outcome {
    // Trace instances judge with the live state but never change it.
    let writes = SEGBPF_RUN_MODE.load() != RUN_DRY;
    let now = ct::now();
    let d = verdict::decide::<K>(pkt, cfg, parsed, dir, now, writes, len, related);
    if writes && !reason::passes(d.reason) {
        let p = parsed.as_ref().ok().copied();
        events::report(cfg, dir, ifindex, len, p, &d, now);
        denied::record(cfg, dir, len, p, &d, now);
    }
    stats::record(&d, dir, u64::from(len));
    if d.lets_through() {
        Outcome::Pass
    } else {
        Outcome::Drop
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
    cgroup::judge::<false>(&ctx, DIR_INGRESS)
}

/// Services: every packet a socket sends.
#[cgroup_skb(egress)]
pub(crate) fn segbpf_svc_egress(ctx: SkBuffContext) -> i32 {
    cgroup::judge::<false>(&ctx, DIR_EGRESS)
}

/// `segbpf trace --services`: the ingress judgement, writing nothing but
/// its record (`cgroup`, `DRY`); loaded only in a dry-run instance of
/// its own, never attached.
#[cgroup_skb(ingress)]
pub(crate) fn segbpf_svc_dry_in(ctx: SkBuffContext) -> i32 {
    cgroup::judge::<true>(&ctx, DIR_INGRESS)
}

/// `segbpf trace --services`: the egress judgement (see above).
#[cgroup_skb(egress)]
pub(crate) fn segbpf_svc_dry_eg(ctx: SkBuffContext) -> i32 {
    cgroup::judge::<true>(&ctx, DIR_EGRESS)
}

/// The floor for the services benchmark: a cgroup_skb program that only
/// passes. Never attached by segbpf.
#[cgroup_skb(ingress)]
pub(crate) fn segbpf_svc_empty(_ctx: SkBuffContext) -> i32 {
    cgroup::PASS
}

/// The level probe: writes the ancestors of the test socket's cgroup
/// (`svc_level`). Run once by userspace with BPF_PROG_TEST_RUN; never
/// attached.
#[cgroup_skb(ingress)]
pub(crate) fn segbpf_svc_level(ctx: SkBuffContext) -> i32 {
    svc_level::probe(&ctx)
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
