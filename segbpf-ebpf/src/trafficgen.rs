//! Benchmark traffic generator (never attached by segbpf): an XDP program
//! that `cargo xtask bench` runs with BPF_PROG_TEST_RUN in live-frames mode
//! (BPF_F_TEST_XDP_LIVE_FRAMES, the technique of xdp-tools' xdp-trafficgen).
//! Each run rewrites the template frame (Ethernet + IPv4 without options +
//! UDP) with the next source address and port and returns `XDP_TX`, which
//! the kernel turns into a transmit on the interface the run is bound to
//! (a veth), so millions of distinct-flow packets per second reach the
//! peer. `SEG_GEN` holds the generator's state: index 0 the packet
//! counter, 1 the first source address (host order), 2 the number of
//! address bits that vary, 3 the number of source-port bits that vary.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::maps::SEG_GEN;

/// Ethernet header + IPv4 header (no options) + UDP header.
const FRAME_MIN: usize = 14 + 20 + 8;
const IP_OFF: usize = 14;
const UDP_OFF: usize = IP_OFF + 20;

#[inline(always)]
fn word(i: u32) -> u32 {
    SEG_GEN.get(i).copied().unwrap_or(0)
}

/// Rewrites the frame for the next flow and sends it out (`XDP_TX`).
#[inline(always)]
pub(crate) fn next(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + FRAME_MIN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(counter) = SEG_GEN.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the map's first value, valid for this run; the generator is
    // run by one thread, so a plain increment is enough.
    let n = unsafe {
        let n = *counter;
        *counter = n.wrapping_add(1);
        n
    };
    let abits = word(2) & 31;
    let pbits = word(3) & 15;
    let src = word(1).wrapping_add(n & ((1u32 << abits) - 1));
    let sport = 1024u16.wrapping_add(((n >> abits) & ((1u32 << pbits) - 1)) as u16);
    let ip = (start + IP_OFF) as *mut u8;
    let udp = (start + UDP_OFF) as *mut u8;
    // SAFETY: every write lies within the first FRAME_MIN bytes, which the
    // check above proved are inside the frame.
    unsafe {
        core::ptr::write_unaligned(ip.add(12).cast::<[u8; 4]>(), src.to_be_bytes());
        core::ptr::write_unaligned(udp.cast::<[u8; 2]>(), sport.to_be_bytes());
        // No UDP checksum (allowed for IPv4).
        core::ptr::write_unaligned(udp.add(6).cast::<[u8; 2]>(), [0, 0]);
        // The IPv4 header checksum, recomputed over its ten words.
        core::ptr::write_unaligned(ip.add(10).cast::<[u8; 2]>(), [0, 0]);
        let mut sum: u32 = 0;
        for i in 0..10 {
            let w = core::ptr::read_unaligned(ip.add(2 * i).cast::<[u8; 2]>());
            sum += u32::from(u16::from_be_bytes(w));
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        core::ptr::write_unaligned(ip.add(10).cast::<[u8; 2]>(), (!(sum as u16)).to_be_bytes());
    }
    xdp_action::XDP_TX
}
