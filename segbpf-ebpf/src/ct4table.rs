//! The IPv4 connection table of our own (`SEG_CT4_SETS`, `SEG_CT4_WAYS`;
//! layout, hash, eviction and locking in `segbpf_common::ct4table`): one
//! table for half-open and assured IPv4 flows, two candidate sets of three
//! ways per key, a flow's class in its way's assured bit. The IPv6 flows
//! stay in the kernel's LRU tables (`SEG_CT`, `SEG_CT_NEW`); `CtTable` is
//! what `ct` needs of either.
//!
//! The lookup, the choice of a way for a new flow, the write of a new
//! entry and the marking are global BPF functions (`segbpf_ct4_find`,
//! `segbpf_ct4_own`, `segbpf_ct4_room`, `segbpf_ct4_write`, `segbpf_ct4_mark`), which the
//! verifier checks once per program rather than on every path that
//! reaches them (inlined, the packet programs verified at two to four
//! times the instructions; BENCHMARKS.md). Their arguments are scalars
//! (the key's two words, ticks) and, for the write, a map value of the
//! caller. The kernel allows 512 bytes of stack for a call chain, each
//! frame rounded up to 32: beside the error programs' 472 each function
//! they call must fit in 32 bytes (the lookup does); the error programs
//! never insert (ICMP errors open no flow, `verdict::judge`), so the
//! write, the larger one, is called from the packet programs only.

use aya_ebpf::maps::Array;
use segbpf_common::{
    CT4_WAYS, Ct4Set, CtEntry, CtKey4, RUN_DRY, ct_seen_tick, ct4_candidates, ct4_slot, ct4_words,
};

use crate::maps::{SEG_CT4_SETS, SEG_CT4_WAYS, SEGBPF_CT4_KEY, SEGBPF_CT4_MASK, SEGBPF_RUN_MODE};

/// A table of connection entries keyed by `K`.
pub(crate) trait CtTable<K> {
    /// The value of `key` and whether it is assured (in the IPv4 table, by
    /// its way's bit; an LRU table answers for its own kind, `lru_kind`).
    /// `now` refreshes the way's tick in the IPv4 table.
    fn find(&self, key: &K, now: u64, lru_kind: bool) -> Option<(*mut CtEntry, bool)>;
    /// Marks `key` assured or not (the IPv4 table only).
    fn mark(&self, key: &K, assured: bool) -> Result<(), i32>;
    /// Inserts or replaces `key`'s value, half-open. `horizon`: the tick
    /// below which no way holds a live flow (`ct_seen_horizon`).
    fn insert(&self, key: &K, value: &CtEntry, now: u64, horizon: u64) -> Result<(), i32>;
    /// Removes `key`.
    fn remove(&self, key: &K) -> Result<(), i32>;
}

impl<K> CtTable<K> for aya_ebpf::maps::LruHashMap<K, CtEntry> {
    #[inline(always)]
    fn find(&self, key: &K, _now: u64, lru_kind: bool) -> Option<(*mut CtEntry, bool)> {
        aya_ebpf::maps::LruHashMap::get_ptr_mut(self, key).map(|e| (e, lru_kind))
    }
    #[inline(always)]
    fn mark(&self, _key: &K, _assured: bool) -> Result<(), i32> {
        Err(-1)
    }
    #[inline(always)]
    fn insert(&self, key: &K, value: &CtEntry, _now: u64, _horizon: u64) -> Result<(), i32> {
        aya_ebpf::maps::LruHashMap::insert(self, key, value, 0)
    }
    #[inline(always)]
    fn remove(&self, key: &K) -> Result<(), i32> {
        aya_ebpf::maps::LruHashMap::remove(self, key)
    }
}

/// The IPv4 table: its sets and its entries.
pub(crate) struct Ct4Table {
    sets: &'static Array<Ct4Set>,
    ways: &'static Array<CtEntry>,
}

// SAFETY: the maps are statics the kernel owns; the struct holds only
// references.
unsafe impl Sync for Ct4Table {}

/// The namespace's IPv4 table.
pub(crate) static CT4: Ct4Table = Ct4Table {
    sets: &SEG_CT4_SETS,
    ways: &SEG_CT4_WAYS,
};

/// Way `w`'s tick, as a pointer into the header.
#[inline(always)]
#[allow(clippy::cast_ptr_alignment, reason = "u32 halves of aligned u64 words")]
fn tick_ptr(line: *mut Ct4Set, w: u32) -> *mut u32 {
    let base = line.cast::<u32>();
    // SAFETY: offsets 1..=3 u32 within the 64-byte value.
    unsafe {
        match w {
            0 => base.add(1),
            1 => base.add(2),
            _ => base.add(3),
        }
    }
}

/// The assured bits of the set (the second u16 of the header).
#[inline(always)]
#[allow(clippy::cast_ptr_alignment, reason = "u16 of an aligned u64 word")]
fn flags_ptr(line: *mut Ct4Set) -> *mut u16 {
    // SAFETY: offset 1 u16 within the 64-byte value.
    unsafe { line.cast::<u16>().add(1) }
}

/// What a scan of a set saw.
enum Scan {
    /// The key is in this way; the set's assured bits.
    Found(u32, u16),
    /// Not in this set.
    Absent,
    /// A writer held the set during the compare: unknown.
    Held,
}

/// Looks for the key (`k0`, `k1`) in the set of `line`, without the lock:
/// a match counts only if no writer held the set during the compare.
#[inline(always)]
fn scan(line: *mut Ct4Set, k0: u64, k1: u64) -> Scan {
    // SAFETY: `line` is a value of the array, valid for the run.
    let head = unsafe { core::ptr::read_volatile(line.cast::<u32>()) };
    let mut way = 0;
    let mut found = None;
    while way < CT4_WAYS {
        let slot = ct4_slot(way);
        // SAFETY: as above.
        let (w0, w1) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*line)[slot]),
                core::ptr::read_volatile(&raw const (*line)[slot + 1]),
            )
        };
        if w0 == k0 && w1 == k1 {
            found = Some(way);
            break;
        }
        way += 1;
    }
    // SAFETY: as above.
    if head & 1 != 0 || unsafe { core::ptr::read_volatile(line.cast::<u16>()) } != head as u16 {
        return Scan::Held;
    }
    match found {
        Some(w) => Scan::Found(w, (head >> 16) as u16),
        None => Scan::Absent,
    }
}

/// Scans of a set held by a writer before the lookup gives up (a writer
/// holds a set for a few dozen instructions; giving up judges the packet
/// by the policy, as a miss).
const SCAN_TRIES: u32 = 4;

/// `scan`, again while a writer holds the set (at most `SCAN_TRIES`).
#[inline(always)]
fn scan_settled(line: *mut Ct4Set, k0: u64, k1: u64) -> Scan {
    let mut i = 0;
    while i < SCAN_TRIES {
        match scan(line, k0, k1) {
            Scan::Held => {}
            seen => return seen,
        }
        i += 1;
    }
    Scan::Held
}

/// Whether way `w` of the held set `line` holds the key (`k0`, `k1`): a
/// way found before the set was taken may have changed since.
#[inline(always)]
fn holds(line: *mut Ct4Set, w: u32, k0: u64, k1: u64) -> bool {
    let s = ct4_slot(w);
    // SAFETY: as in `scan`.
    unsafe {
        core::ptr::read_volatile(&raw const (*line)[s]) == k0
            && core::ptr::read_volatile(&raw const (*line)[s + 1]) == k1
    }
}

/// `Ct4Table::insert`'s flag: the way held no key when chosen.
const WAS_EMPTY: u32 = 1 << 30;
/// `Ct4Table::insert`'s flag: the way may carry an assured bit (the key's own
/// way, or a dead one).
const MAY_EVICT_ASSURED: u32 = 1 << 31;
/// The set × 4 + way part of the choice passed to `write_words`.
const SET_WAY: u32 = (1 << 30) - 1;

/// Takes the set of `line` (sequence even to odd by compare-and-exchange
/// of word 0); None if held or raced.
#[inline(always)]
fn take(line: *mut Ct4Set) -> Option<()> {
    // SAFETY: word 0 is an aligned u64 of the value.
    let w0 = unsafe { core::ptr::read_volatile(&raw const (*line)[0]) };
    if w0 & 1 != 0 {
        return None;
    }
    // SAFETY: as above.
    let taken = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::Acquire },
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(&raw mut (*line)[0], w0, w0 + 1)
        .1
    };
    taken.then_some(())
}

/// Releases a set taken by `take`: the sequence one step on (even), by a
/// compare-and-exchange of word 0, which orders the writes before it on
/// every architecture (lookups store way 0's tick in the same word without
/// the lock: retried, and after a few tries a plain store of the
/// sequence, ordered after the writes on x86-64).
#[inline(always)]
fn release(line: *mut Ct4Set) {
    // SAFETY: the first u16 of the value; this CPU holds the set, so the
    // sequence is the odd one it took it with.
    let seq = unsafe { core::ptr::read_volatile(line.cast::<u16>()) }.wrapping_add(1);
    let mut i = 0;
    while i < 3 {
        // SAFETY: word 0 is an aligned u64 of the value.
        let w0 = unsafe { core::ptr::read_volatile(&raw const (*line)[0]) };
        // SAFETY: as above.
        let done = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::Release },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(&raw mut (*line)[0], w0, (w0 & !0xffff) | u64::from(seq))
            .1
        };
        if done {
            return;
        }
        i += 1;
    }
    // SAFETY: the first u16 of the value.
    unsafe { core::ptr::write_volatile(line.cast::<u16>(), seq) }
}

/// What a new key may take in one set (`choose`), packed in a u64 so
/// the global function's frame stays small: the least recently seen
/// half-open way's tick (bits 0..32) and way (32..34, `ROOM_HALF_OPEN`
/// if any), a free way (35..37, `ROOM_FREE` if any; `ROOM_EMPTY` if it
/// is empty), the set's assured ways (39..41).
type Room = u64;
const ROOM_HALF_OPEN: u64 = 1 << 34;
const ROOM_FREE: u64 = 1 << 37;
const ROOM_EMPTY: u64 = 1 << 38;

/// The way of a room's field at `shift` (2 bits).
#[inline(always)]
const fn room_way(room: Room, shift: u32) -> u32 {
    ((room >> shift) & 3) as u32
}

/// What a new key may take in the set of `line` (`horizon`: see
/// `CtTable::insert`): a free way (empty, or its tick below the horizon:
/// no live flow), the least recently seen half-open way, and how many
/// ways are assured.
#[inline(always)]
fn choose(line: *mut Ct4Set, horizon: u32) -> Room {
    // SAFETY: as in `scan`.
    let flags = unsafe { core::ptr::read_volatile(flags_ptr(line)) };
    let mut room: Room = 0;
    let mut i = 0;
    while i < CT4_WAYS {
        // SAFETY: as in `scan`.
        let (k1, t) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*line)[ct4_slot(i) + 1]),
                core::ptr::read_volatile(tick_ptr(line, i)),
            )
        };
        if k1 == 0 || t < horizon {
            if room & ROOM_FREE == 0 {
                room |= ROOM_FREE | (u64::from(i) << 35) | if k1 == 0 { ROOM_EMPTY } else { 0 };
            }
        } else if flags & (1 << i) != 0 {
            room += 1 << 39;
        } else if room & ROOM_HALF_OPEN == 0 || t < room as u32 {
            room = (room & !0x7_ffff_ffff) | ROOM_HALF_OPEN | (u64::from(i) << 32) | u64::from(t);
        }
        i += 1;
    }
    room
}

/// The way a new key takes given the rooms of its two sets (see
/// `Ct4Table::insert`), as set × 4 + way with `Ct4Table::insert`'s flags.
#[inline(always)]
fn pick(s1: u32, r1: Room, s2: u32, r2: Room) -> Option<u32> {
    let free = |set: u32, room: Room| {
        // A dead way may still carry its assured bit.
        (set * 4 + room_way(room, 35))
            | if room & ROOM_EMPTY != 0 {
                WAS_EMPTY
            } else {
                MAY_EVICT_ASSURED
            }
    };
    let (f1, f2) = (r1 & ROOM_FREE != 0, r2 & ROOM_FREE != 0);
    if f1 && (!f2 || r1 >> 39 <= r2 >> 39) {
        return Some(free(s1, r1));
    }
    if f2 {
        return Some(free(s2, r2));
    }
    let (h1, h2) = (r1 & ROOM_HALF_OPEN != 0, r2 & ROOM_HALF_OPEN != 0);
    if h1 && (!h2 || r1 as u32 <= r2 as u32) {
        return Some(s1 * 4 + room_way(r1, 32));
    }
    if h2 {
        return Some(s2 * 4 + room_way(r2, 32));
    }
    None
}

impl Ct4Table {
    /// The two candidate sets of the key.
    #[inline(always)]
    fn candidates(k0: u64, k1: u64) -> (u32, u32) {
        ct4_candidates(k0, k1, SEGBPF_CT4_KEY.load(), SEGBPF_CT4_MASK.load())
    }

    /// The set, line, way and the set's assured bits holding the key.
    #[inline(always)]
    fn find_words(&self, k0: u64, k1: u64) -> Option<(u32, *mut Ct4Set, u32, u16)> {
        let (s1, s2) = Self::candidates(k0, k1);
        let l1 = self.sets.get_ptr_mut(s1)?;
        if let Scan::Found(w, f) = scan_settled(l1, k0, k1) {
            return Some((s1, l1, w, f));
        }
        let l2 = self.sets.get_ptr_mut(s2)?;
        match scan_settled(l2, k0, k1) {
            Scan::Found(w, f) => Some((s2, l2, w, f)),
            _ => None,
        }
    }

    #[inline(always)]
    fn mark_words(&self, k0: u64, k1: u64, assured: bool) -> Result<(), i32> {
        let (_, line, way, _) = self.find_words(k0, k1).ok_or(-1)?;
        take(line).ok_or(-1)?;
        if !holds(line, way, k0, k1) {
            release(line);
            return Err(-1);
        }
        let f = flags_ptr(line);
        // SAFETY: the header's flags; this CPU holds the set.
        unsafe {
            let v = core::ptr::read_volatile(f);
            let v = if assured {
                v | (1 << way)
            } else {
                v & !(1 << way)
            };
            core::ptr::write_volatile(f, v);
        }
        release(line);
        Ok(())
    }

    /// The key's own way, as set × 4 + way: `Ok(Some)`, `Ok(None)` when
    /// neither candidate set holds it, `Err` when a set stayed held (it
    /// may be there).
    #[inline(always)]
    fn own_words(&self, k0: u64, k1: u64) -> Result<Option<u32>, i32> {
        let (s1, s2) = Self::candidates(k0, k1);
        let l1 = self.sets.get_ptr_mut(s1).ok_or(-1)?;
        match scan_settled(l1, k0, k1) {
            Scan::Found(w, _) => return Ok(Some(s1 * 4 + w)),
            Scan::Held => return Err(-1),
            Scan::Absent => {}
        }
        let l2 = self.sets.get_ptr_mut(s2).ok_or(-1)?;
        match scan_settled(l2, k0, k1) {
            Scan::Found(w, _) => Ok(Some(s2 * 4 + w)),
            Scan::Held => Err(-1),
            Scan::Absent => Ok(None),
        }
    }

    /// Writes `value` and the key into set × 4 + way (`sw_tick` low
    /// half; the tick in the high half), half-open, under the set's lock:
    /// the key first, then the entry (readers accept neither until the
    /// release).
    #[inline(always)]
    fn write_words(
        &self,
        sw_tick: u64,
        k0: u64,
        k1: u64,
        value: *const CtEntry,
    ) -> Result<(), i32> {
        let flags = sw_tick as u32;
        let sw = flags & SET_WAY;
        // Both lookups before the set is taken: no call while it is held.
        let line = self.sets.get_ptr_mut(sw >> 2).ok_or(-1)?;
        let dst = self
            .ways
            .get_ptr_mut((sw >> 2) * CT4_WAYS + (sw & 3))
            .ok_or(-1)?
            .cast::<u64>();
        take(line).ok_or(-1)?;
        let way = sw & 3;
        let s = ct4_slot(way);
        let f = flags_ptr(line);
        // What another CPU wrote since the choice: a key into the empty
        // way, or the way's flow made assured. Not overwritten: the new
        // flow is not tracked (its replies meet the policy).
        // SAFETY: as in `scan`; this CPU holds the set.
        let changed = unsafe {
            (flags & WAS_EMPTY != 0 && core::ptr::read_volatile(&raw const (*line)[s + 1]) != 0)
                || (flags & MAY_EVICT_ASSURED == 0 && core::ptr::read_volatile(f) & (1 << way) != 0)
        };
        if changed {
            release(line);
            return Err(-2);
        }
        // SAFETY: as in `scan`; this CPU holds the set.
        unsafe {
            core::ptr::write_volatile(&raw mut (*line)[s], k0);
            core::ptr::write_volatile(&raw mut (*line)[s + 1], k1);
            core::ptr::write_volatile(tick_ptr(line, way), (sw_tick >> 32) as u32);
            core::ptr::write_volatile(f, core::ptr::read_volatile(f) & !(1 << way));
        }
        let src = value.cast::<u64>();
        let mut j = 0;
        while j < size_of::<CtEntry>() / 8 {
            // SAFETY: both are 8-byte aligned CtEntry values.
            unsafe {
                core::ptr::write_volatile(dst.add(j), core::ptr::read_volatile(src.add(j)));
            }
            j += 1;
        }
        release(line);
        Ok(())
    }
}

impl CtTable<CtKey4> for Ct4Table {
    #[inline(always)]
    fn find(&self, key: &CtKey4, now: u64, _lru_kind: bool) -> Option<(*mut CtEntry, bool)> {
        let [k0, k1] = ct4_words(key);
        let r = segbpf_ct4_find(k0, k1, u64::from(ct_seen_tick(now)));
        if r < 0 {
            return None;
        }
        let e = self.ways.get_ptr_mut((r >> 1) as u32)?;
        Some((e, r & 1 != 0))
    }

    #[inline(always)]
    fn mark(&self, key: &CtKey4, assured: bool) -> Result<(), i32> {
        let [k0, k1] = ct4_words(key);
        if segbpf_ct4_mark(k0, k1, u64::from(assured)) < 0 {
            Err(-1)
        } else {
            Ok(())
        }
    }

    /// The way a new key takes (`segbpf_common::ct4table`): its own;
    /// else a free way, in the candidate set with fewer assured ways (so
    /// assured flows spread over both and a set seldom fills with them);
    /// else the least recently seen half-open way of the two sets. Never a
    /// live assured way: when all six are, and when a set stays held (the
    /// key's own way unknown), the new flow is not tracked. The write
    /// checks the choice again under the set's lock (`write_words`).
    #[inline(always)]
    fn insert(&self, key: &CtKey4, value: &CtEntry, now: u64, horizon: u64) -> Result<(), i32> {
        let [k0, k1] = ct4_words(key);
        let tick = u64::from(ct_seen_tick(now));
        let own = segbpf_ct4_own(k0, k1);
        let sw = if own >= 0 {
            own as u32 | MAY_EVICT_ASSURED
        } else if own == -1 {
            let (s1, s2) = Self::candidates(k0, k1);
            let r1 = segbpf_ct4_room(u64::from(s1), horizon);
            let r2 = segbpf_ct4_room(u64::from(s2), horizon);
            if r1 < 0 || r2 < 0 {
                return Err(-1);
            }
            pick(s1, r1 as u64, s2, r2 as u64).ok_or(-1)?
        } else {
            return Err(-1);
        };
        if segbpf_ct4_write(u64::from(sw) | tick << 32, k0, k1, value) == 0 {
            Ok(())
        } else {
            Err(-1)
        }
    }

    #[inline(always)]
    fn remove(&self, key: &CtKey4) -> Result<(), i32> {
        let [k0, k1] = ct4_words(key);
        if let Some((_, line, w, _)) = self.find_words(k0, k1) {
            take(line).ok_or(-1)?;
            if holds(line, w, k0, k1) {
                let s = ct4_slot(w);
                let f = flags_ptr(line);
                // SAFETY: as in `scan`; this CPU holds the set. The way's
                // assured bit goes with its key.
                unsafe {
                    core::ptr::write_volatile(&raw mut (*line)[s + 1], 0);
                    core::ptr::write_volatile(&raw mut (*line)[s], 0);
                    core::ptr::write_volatile(f, core::ptr::read_volatile(f) & !(1 << w));
                }
            }
            release(line);
        }
        Ok(())
    }
}

/// The lookup of the IPv4 table, a global BPF function: the entry's index
/// (set × 3 + way) shifted left by one, with the way's assured bit, or
/// -1. Refreshes the way's tick to `tick`, except in a dry-run instance
/// (it changes nothing).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_find(k0: u64, k1: u64, tick: u64) -> i64 {
    let Some((set, line, way, flags)) = CT4.find_words(k0, k1) else {
        return -1;
    };
    if SEGBPF_RUN_MODE.load() != RUN_DRY {
        let p = tick_ptr(line, way);
        let tick = tick as u32;
        // SAFETY: a u32 of the header; a racing store writes a whole u32.
        unsafe {
            if core::ptr::read_volatile(p) != tick {
                core::ptr::write_volatile(p, tick);
            }
        }
    }
    (i64::from(set * CT4_WAYS + way) << 1) | i64::from((flags >> way) & 1)
}

/// Marking a way assured or not, a global BPF function (0, or -1 when the
/// key is gone or its set is held).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_mark(k0: u64, k1: u64, assured: u64) -> i64 {
    match CT4.mark_words(k0, k1, assured != 0) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// The key's own way, a global BPF function: set × 4 + way, -1 when
/// neither candidate set holds it, -2 when a set stayed held.
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_own(k0: u64, k1: u64) -> i64 {
    match CT4.own_words(k0, k1) {
        Ok(Some(sw)) => i64::from(sw),
        Ok(None) => -1,
        Err(_) => -2,
    }
}

/// What a new key may take in set `set` (`choose`, a `Room`), a global
/// BPF function; -1 when there is no such set.
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_room(set: u64, horizon: u64) -> i64 {
    let Some(line) = CT4.sets.get_ptr_mut(set as u32) else {
        return -1;
    };
    choose(line, horizon.min(u64::from(u32::MAX)) as u32) as i64
}

/// `value` and the key written to set × 4 + way with `Ct4Table::insert`'s
/// flags (low half of `sw_tick`, the tick in the high half), a global BPF
/// function: 0, or -2 when the way changed since the choice, -1 on any
/// other failure (`value`: a map value of the caller, checked for its
/// size by the verifier).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_write(sw_tick: u64, k0: u64, k1: u64, value: *const CtEntry) -> i64 {
    if value.is_null() {
        return -1;
    }
    match CT4.write_words(sw_tick, k0, k1, value) {
        Ok(()) => 0,
        Err(e) => i64::from(e),
    }
}
