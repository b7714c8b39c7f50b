//! Packet and byte counters (`SEG_STATS`, `SEG_RULE_STATS`).

use bytemuck::{Pod, Zeroable};

/// Counters per direction in `SEG_STATS` (one per reason code).
pub const STATS_LEN: u32 = 64;

/// A packet and byte counter (one per CPU in the per-CPU maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (length of the frame as the program saw it).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
