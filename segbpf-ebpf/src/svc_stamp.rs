//! The sender stamp of loopback packets (`skb->priority`), written by the
//! services egress program and checked by the ingress program: identity
//! bits (need-peer | slot << 7 | service id) and check bits that are a
//! keyed hash of the packet's 5-tuple and the identity
//! (`segbpf_common::svc_stamp_check`, the key is the slot's secret in
//! `SEG_SVC_CFG`). A stamp is valid only on the packet it was made for:
//! one read off another packet (a packet tap on `lo`) and replayed on
//! another 5-tuple, or made under a key a reload has replaced, names no
//! service (fail closed).

use aya_ebpf::programs::SkBuffContext;
use segbpf_common::{
    SVC_SLOT_STRIDE, SVC_STAMP_ID_MASK, SVC_STAMP_IDENT_MASK, SVC_STAMP_NEED_PEER, svc_stamp_check,
};

use crate::{svc_maps::SEG_SVC_CFG, svc_pkt::Pkt};

/// The sender of a packet received over loopback, from its stamp.
#[derive(Clone, Copy)]
pub(crate) struct Sender {
    /// The stamp's identity bits (slot << 7 | service id); 0: no service,
    /// or no valid stamp.
    pub(crate) tag: u8,
    /// The sender's service id in the slot in force (0: none or unknown:
    /// stamped under the other slot, just before a reload's flip).
    pub(crate) svc: u8,
    /// The sender passed its egress only through `to_services`.
    pub(crate) need_peer: bool,
    /// The stamp was made under the slot not in force (the previous
    /// policy: a reload flipped while the packet was in flight).
    pub(crate) other_slot: bool,
}

/// No sender: no valid stamp, or not over loopback.
pub(crate) const NO_SENDER: Sender = Sender {
    tag: 0,
    svc: 0,
    need_peer: false,
    other_slot: false,
};

/// The priority the packet arrived with.
#[inline(always)]
pub(crate) fn read_stamp(ctx: &SkBuffContext) -> u32 {
    // SAFETY: reading a field of the kernel-provided context.
    unsafe { (*ctx.skb.skb).priority }
}

/// Writes the sender stamp of a packet leaving towards loopback (or 0 on
/// one received, once read).
#[inline(always)]
pub(crate) fn set_stamp(ctx: &SkBuffContext, stamp: u32) {
    // SAFETY: a write to a field of the kernel-provided context that
    // cgroup_skb programs may write (the kernel's cg_skb_is_valid_access).
    unsafe { (*ctx.skb.skb).priority = stamp };
}

/// The stamp for `p` sent with identity `ident` under the key `key`.
#[inline(always)]
pub(crate) fn make_stamp(key: &[u64; 2], p: &Pkt, ident: u32) -> u32 {
    let ident = ident & SVC_STAMP_IDENT_MASK;
    svc_stamp_check(
        key,
        p.family,
        p.proto,
        words(&p.src),
        words(&p.dst),
        p.sport,
        p.dport,
        ident,
    ) | ident
}

/// An address of a [`Pkt`] as two words (`segbpf_common::svc_stamp_addr`:
/// its bytes read little-endian), read with two 8-byte loads.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "Pkt is repr(C, align(8)) with src at 0 and dst at 16 (asserted in svc_pkt.rs)"
)]
fn words(a: &[u8; 16]) -> [u64; 2] {
    // SAFETY: `a` is `Pkt::src` or `Pkt::dst`: 16 readable bytes at an
    // 8-aligned offset of a `#[repr(C, align(8))]` struct (checked by the
    // asserts on `Pkt`); any bit pattern is a valid u64.
    let w: [u64; 2] = unsafe { core::ptr::read(a.as_ptr().cast::<[u64; 2]>()) };
    [u64::from_le(w[0]), u64::from_le(w[1])]
}

/// The sender of a packet received over loopback with priority `prio`
/// (not 0): `None` when it is no valid stamp for this packet (forged,
/// replayed on another 5-tuple, made under a key since replaced, or a
/// packet that cannot be read); the caller judges it as from no service.
/// A stamp made under the other slot (a reload flipped while the packet
/// was in flight) names no service in the slot in force (its need-peer
/// bit still holds).
#[inline(always)]
pub(crate) fn stamp_sender(prio: u32, p: Option<&Pkt>, slot: u8) -> Option<Sender> {
    let p = p?;
    let stamp_slot = ((prio >> 7) & 1) as u8;
    let g = SEG_SVC_CFG.get(u32::from(stamp_slot * SVC_SLOT_STRIDE))?;
    let key = g.stamp_key;
    if key[0] == 0 && key[1] == 0 {
        return None;
    }
    if make_stamp(&key, p, prio) != prio {
        return None;
    }
    let id = (prio & 0x7f) as u8;
    let same_slot = stamp_slot == (slot & 1);
    Some(Sender {
        tag: if id != 0 {
            (prio & SVC_STAMP_ID_MASK) as u8
        } else {
            0
        },
        svc: if same_slot { id } else { 0 },
        need_peer: prio & SVC_STAMP_NEED_PEER != 0,
        other_slot: !same_slot,
    })
}
