//! The connection tables of our own, one per IP family (`SEG_CT4_SETS` /
//! `SEG_CT4_WAYS` for IPv4, `SEG_CT6_SETS` / `SEG_CT6_WAYS` for IPv6;
//! layout, hash, eviction and locking in `segbpf_common::cttable`): one
//! table for half-open and assured flows, two candidate sets per key, a
//! flow's class in its way's assured bit. `CtTable` is what `ct` needs of
//! either; `SetTable` is the one implementation, generic over the layout.
//!
//! The lookup, the choice of a way for a new flow, the write of a new
//! entry and the marking are global BPF functions (`segbpf_ct4_*`,
//! `segbpf_ct6_*`: find, own, room, write, mark), which the verifier
//! checks once per program rather than on every path that reaches them
//! (inlined, the packet programs verified at two to four times the
//! instructions; BENCHMARKS.md). Their arguments are scalars (an IPv4
//! key's two words, ticks) or memory of the caller (an IPv6 key, checked
//! for its size by the verifier; a map value for the write). The kernel
//! allows 512 bytes of stack for a call chain, each frame rounded up to
//! 32: beside the error programs' 472 each function they call must fit in
//! 32 bytes (the lookup does); the error programs never insert (ICMP
//! errors open no flow, `verdict::judge`), so the write, the larger one,
//! is called from the packet programs only.

use aya_ebpf::maps::Array;
use segbpf_common::{
    Ct4, Ct6, CtEntry, CtKey, CtKey4, CtLayout, RUN_DRY, ct_candidates, ct_seen_tick, ct_slot,
    ct_words,
};

use crate::maps::{
    SEG_CT4_SETS, SEG_CT4_WAYS, SEG_CT6_SETS, SEG_CT6_WAYS, SEGBPF_CT4_KEY, SEGBPF_CT4_MASK,
    SEGBPF_CT6_KEY, SEGBPF_CT6_MASK, SEGBPF_RUN_MODE,
};

/// A table of connection entries keyed by `K`.
pub(crate) trait CtTable<K> {
    /// The value of `key` and whether it is assured (its way's bit). `now`
    /// refreshes the way's tick.
    fn find(&self, key: &K, now: u64) -> Option<(*mut CtEntry, bool)>;
    /// Marks `key` assured or not.
    fn mark(&self, key: &K, assured: bool) -> Result<(), i32>;
    /// Inserts or replaces `key`'s value, half-open. `horizon`: the tick
    /// below which no way holds a live flow (`ct_seen_horizon`).
    fn insert(&self, key: &K, value: &CtEntry, now: u64, horizon: u64) -> Result<(), i32>;
}

/// A key's words as the table code reads them: by value (the IPv4 key's
/// two words, in registers) or in the caller's memory (the IPv6 key's six).
pub(crate) trait KeyWords: Copy {
    /// Word `i` of the key.
    fn word(self, i: usize) -> u64;
}

impl KeyWords for [u64; 2] {
    #[inline(always)]
    fn word(self, i: usize) -> u64 {
        self[i & 1]
    }
}

/// A key in memory: six words from a pointer the verifier checked.
#[derive(Clone, Copy)]
pub(crate) struct KeyAt(*const u64);

impl KeyWords for KeyAt {
    #[inline(always)]
    fn word(self, i: usize) -> u64 {
        // SAFETY: the pointer is a `CtKey` (six words, 8-byte aligned) on
        // the BPF stack of this program run: made from a reference by
        // `SetTable::insert`, or from a global function's argument, checked
        // for its size by the verifier and for null by `key_at`; `i` < 6
        // at every call. Plain reads: nothing else can write a run's stack
        // and the table code writes only map memory, so the key does not
        // change during a call and the compiler may keep a word it read
        // in a register across a set's scan.
        unsafe { self.0.add(i % 6).read() }
    }
}

/// A table of our own: its sets, its entries and its frozen globals.
pub(crate) struct SetTable<L: CtLayout> {
    sets: &'static Array<L::Set>,
    ways: &'static Array<CtEntry>,
}

// SAFETY: the maps are statics the kernel owns; the struct holds only
// references.
unsafe impl<L: CtLayout> Sync for SetTable<L> {}

/// The namespace's IPv4 table.
pub(crate) static CT4: SetTable<Ct4> = SetTable {
    sets: &SEG_CT4_SETS,
    ways: &SEG_CT4_WAYS,
};

/// The namespace's IPv6 table.
pub(crate) static CT6: SetTable<Ct6> = SetTable {
    sets: &SEG_CT6_SETS,
    ways: &SEG_CT6_WAYS,
};

/// A set, as words.
type Line = *mut u64;

/// Word `i` of the set.
#[inline(always)]
fn word(line: Line, i: usize) -> u64 {
    // SAFETY: `line` is a value of a sets array, valid for the run; every
    // index is below its layout's `SET_WORDS` (constants of the layout).
    unsafe { core::ptr::read_volatile(line.add(i)) }
}

/// Writes word `i` of the set (the caller holds it).
#[inline(always)]
fn set_word(line: Line, i: usize, v: u64) {
    // SAFETY: as in `word`.
    unsafe { core::ptr::write_volatile(line.add(i), v) }
}

/// Way `w`'s tick, as a pointer into the header (u32 index `1 + w`).
#[inline(always)]
#[allow(clippy::cast_ptr_alignment, reason = "u32 halves of aligned u64 words")]
fn tick_ptr(line: Line, w: u32) -> *mut u32 {
    // SAFETY: u32 index 1 + w < 2 * HDR, within the header.
    unsafe { line.cast::<u32>().add(1 + (w & 3) as usize) }
}

/// The assured bits of the set (the second u16 of the header).
#[inline(always)]
#[allow(clippy::cast_ptr_alignment, reason = "u16 of an aligned u64 word")]
fn flags_ptr(line: Line) -> *mut u16 {
    // SAFETY: offset 1 u16 within the header.
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

/// Whether way `w` of the set `line` holds the key: its tag word first
/// (the most distinct, and 0 in a free way), then the others.
#[inline(always)]
fn way_holds<L: CtLayout, W: KeyWords>(line: Line, w: u32, k: W) -> bool {
    let slot = ct_slot::<L>(w);
    if word(line, slot + L::TAG) != k.word(L::TAG) {
        return false;
    }
    let mut i = 0;
    while i < L::KEY_WORDS {
        if i != L::TAG && word(line, slot + i) != k.word(i) {
            return false;
        }
        i += 1;
    }
    true
}

/// Looks for the key in the set of `line`, without the lock: a match
/// counts only if no writer held the set during the compare.
#[inline(always)]
fn scan<L: CtLayout, W: KeyWords>(line: Line, k: W) -> Scan {
    // SAFETY: the header's first u32.
    let head = unsafe { core::ptr::read_volatile(line.cast::<u32>()) };
    let mut way = 0;
    let mut found = None;
    while way < L::WAYS {
        if way_holds::<L, W>(line, way, k) {
            found = Some(way);
            break;
        }
        way += 1;
    }
    // SAFETY: the header's first u16.
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
fn scan_settled<L: CtLayout, W: KeyWords>(line: Line, k: W) -> Scan {
    let mut i = 0;
    while i < SCAN_TRIES {
        match scan::<L, W>(line, k) {
            Scan::Held => {}
            seen => return seen,
        }
        i += 1;
    }
    Scan::Held
}

/// `SetTable::insert`'s flag: the way held no key when chosen.
const WAS_EMPTY: u32 = 1 << 30;
/// `SetTable::insert`'s flag: the way may carry an assured bit (the key's
/// own way, or a dead one).
const MAY_EVICT_ASSURED: u32 = 1 << 31;
/// The set × 4 + way part of the choice passed to `write_words`.
const SET_WAY: u32 = (1 << 30) - 1;

/// Takes the set of `line` (sequence even to odd by compare-and-exchange
/// of word 0); None if held or raced.
#[inline(always)]
fn take(line: Line) -> Option<()> {
    let w0 = word(line, 0);
    if w0 & 1 != 0 {
        return None;
    }
    // SAFETY: word 0 is an aligned u64 of the value.
    let taken = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::Acquire },
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(line, w0, w0 + 1)
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
fn release(line: Line) {
    // SAFETY: the first u16 of the value; this CPU holds the set, so the
    // sequence is the odd one it took it with.
    let seq = unsafe { core::ptr::read_volatile(line.cast::<u16>()) }.wrapping_add(1);
    let mut i = 0;
    while i < 3 {
        let w0 = word(line, 0);
        // SAFETY: as in `take`.
        let done = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { core::intrinsics::AtomicOrdering::Release },
                { core::intrinsics::AtomicOrdering::Relaxed },
            >(line, w0, (w0 & !0xffff) | u64::from(seq))
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
/// is empty), the set's assured ways (39..42).
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
fn choose<L: CtLayout>(line: Line, horizon: u32) -> Room {
    // SAFETY: the header's assured bits.
    let flags = unsafe { core::ptr::read_volatile(flags_ptr(line)) };
    let mut room: Room = 0;
    let mut i = 0;
    while i < L::WAYS {
        let tag = word(line, ct_slot::<L>(i) + L::TAG);
        // SAFETY: the way's tick in the header.
        let t = unsafe { core::ptr::read_volatile(tick_ptr(line, i)) };
        if tag == 0 || t < horizon {
            if room & ROOM_FREE == 0 {
                room |= ROOM_FREE | (u64::from(i) << 35) | if tag == 0 { ROOM_EMPTY } else { 0 };
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
/// `SetTable::insert`), as set × 4 + way with `SetTable::insert`'s flags.
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

/// The frozen globals of a layout: the secret and the mask.
pub(crate) trait Globals {
    /// The namespace's secret of the set hash.
    fn secret() -> u64;
    /// The mask of the set index.
    fn mask() -> u32;
    /// The two candidate sets of a key.
    fn candidates<W: KeyWords>(k: W) -> (u32, u32);
}

impl Globals for Ct4 {
    #[inline(always)]
    fn secret() -> u64 {
        SEGBPF_CT4_KEY.load()
    }
    #[inline(always)]
    fn mask() -> u32 {
        SEGBPF_CT4_MASK.load()
    }
    #[inline(always)]
    fn candidates<W: KeyWords>(k: W) -> (u32, u32) {
        ct_candidates(&[k.word(0), k.word(1)], Self::secret(), Self::mask())
    }
}

impl Globals for Ct6 {
    #[inline(always)]
    fn secret() -> u64 {
        SEGBPF_CT6_KEY.load()
    }
    #[inline(always)]
    fn mask() -> u32 {
        SEGBPF_CT6_MASK.load()
    }
    #[inline(always)]
    fn candidates<W: KeyWords>(k: W) -> (u32, u32) {
        ct_candidates(
            &[
                k.word(0),
                k.word(1),
                k.word(2),
                k.word(3),
                k.word(4),
                k.word(5),
            ],
            Self::secret(),
            Self::mask(),
        )
    }
}

impl<L: CtLayout + Globals> SetTable<L> {
    /// Set `set` as words.
    #[inline(always)]
    fn line(&self, set: u32) -> Option<Line> {
        self.sets.get_ptr_mut(set).map(<*mut L::Set>::cast::<u64>)
    }

    /// The set, line, way and the set's assured bits holding the key.
    #[inline(always)]
    fn find_words<W: KeyWords>(&self, k: W) -> Option<(u32, Line, u32, u16)> {
        let (s1, s2) = L::candidates(k);
        let l1 = self.line(s1)?;
        if let Scan::Found(w, f) = scan_settled::<L, W>(l1, k) {
            return Some((s1, l1, w, f));
        }
        let l2 = self.line(s2)?;
        match scan_settled::<L, W>(l2, k) {
            Scan::Found(w, f) => Some((s2, l2, w, f)),
            _ => None,
        }
    }

    /// The lookup: the entry's index (set × ways + way) shifted left by
    /// one, with the way's assured bit, or -1. Refreshes the way's tick
    /// to `tick`, except in a dry-run instance (it changes nothing).
    #[inline(always)]
    fn find_index<W: KeyWords>(&self, k: W, tick: u64) -> i64 {
        let Some((set, line, way, flags)) = self.find_words(k) else {
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
        (i64::from(set * L::WAYS + way) << 1) | i64::from((flags >> way) & 1)
    }

    #[inline(always)]
    fn mark_words<W: KeyWords>(&self, k: W, assured: bool) -> i64 {
        let Some((_, line, way, _)) = self.find_words(k) else {
            return -1;
        };
        if take(line).is_none() {
            return -1;
        }
        if !way_holds::<L, W>(line, way, k) {
            release(line);
            return -1;
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
        0
    }

    /// The key's own way, as set × 4 + way; -1 when neither candidate set
    /// holds it, -2 when a set stayed held (it may be there).
    #[inline(always)]
    fn own_words<W: KeyWords>(&self, k: W) -> i64 {
        let (s1, s2) = L::candidates(k);
        let Some(l1) = self.line(s1) else {
            return -2;
        };
        match scan_settled::<L, W>(l1, k) {
            Scan::Found(w, _) => return i64::from(s1 * 4 + w),
            Scan::Held => return -2,
            Scan::Absent => {}
        }
        let Some(l2) = self.line(s2) else {
            return -2;
        };
        match scan_settled::<L, W>(l2, k) {
            Scan::Found(w, _) => i64::from(s2 * 4 + w),
            Scan::Held => -2,
            Scan::Absent => -1,
        }
    }

    /// What a new key may take in set `set` (`choose`, a `Room`); -1 when
    /// there is no such set.
    #[inline(always)]
    fn room(&self, set: u64, horizon: u64) -> i64 {
        let Some(line) = self.line(set as u32) else {
            return -1;
        };
        choose::<L>(line, horizon.min(u64::from(u32::MAX)) as u32) as i64
    }

    /// Writes `value` and the key into set × 4 + way (`sw_tick` low
    /// half, with `insert`'s flags; the tick in the high half), half-open,
    /// under the set's lock: the key first, then the entry (readers accept
    /// neither until the release). 0, or -2 when the way changed since
    /// the choice, -1 on any other failure.
    #[inline(always)]
    fn write_words<W: KeyWords>(
        &self,
        sw_tick: u64,
        k: W,
        value: *const CtEntry,
        horizon: u64,
    ) -> i64 {
        let flags = sw_tick as u32;
        let sw = flags & SET_WAY;
        let way = sw & 3;
        if way >= L::WAYS {
            return -1;
        }
        // Both lookups before the set is taken: no call while it is held.
        let Some(line) = self.line(sw >> 2) else {
            return -1;
        };
        let Some(dst) = self.ways.get_ptr_mut((sw >> 2) * L::WAYS + way) else {
            return -1;
        };
        let dst = dst.cast::<u64>();
        if take(line).is_none() {
            return -1;
        }
        let slot = ct_slot::<L>(way);
        let flags_at = flags_ptr(line);
        // What another CPU wrote since the choice: a key into the empty
        // way; the way's flow made assured; or, for the key's own way or a
        // dead one (which may carry an assured bit), another key there,
        // assured and live. Not overwritten: the new flow is not tracked
        // (its replies meet the policy).
        // SAFETY: the header's flags and the way's tick; this CPU holds
        // the set.
        let (assured, tick) = unsafe {
            (
                core::ptr::read_volatile(flags_at) & (1 << way) != 0,
                core::ptr::read_volatile(tick_ptr(line, way)),
            )
        };
        let changed = if flags & WAS_EMPTY != 0 {
            word(line, slot + L::TAG) != 0
        } else if flags & MAY_EVICT_ASSURED != 0 {
            assured && u64::from(tick) >= horizon && !way_holds::<L, W>(line, way, k)
        } else {
            assured
        };
        if changed {
            release(line);
            return -2;
        }
        let mut i = 0;
        while i < L::KEY_WORDS {
            set_word(line, slot + i, k.word(i));
            i += 1;
        }
        // SAFETY: the header's tick and flags; this CPU holds the set.
        unsafe {
            core::ptr::write_volatile(tick_ptr(line, way), (sw_tick >> 32) as u32);
            core::ptr::write_volatile(flags_at, core::ptr::read_volatile(flags_at) & !(1 << way));
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
        0
    }

    /// The entry of a lookup's index (`find_index`).
    #[inline(always)]
    fn entry(&self, r: i64) -> Option<(*mut CtEntry, bool)> {
        if r < 0 {
            return None;
        }
        let e = self.ways.get_ptr_mut((r >> 1) as u32)?;
        Some((e, r & 1 != 0))
    }

    /// The way a new key takes (`segbpf_common::cttable`), given its own
    /// way (`own`: `own_words`) and the rooms of its candidate sets:
    /// its own; else a free way, in the candidate set with fewer assured
    /// ways (so assured flows spread over both and a set seldom fills
    /// with them); else the least recently seen half-open way of the two
    /// sets. Never a live assured way: when all are, and when a set stays
    /// held (the key's own way unknown), the new flow is not tracked. The
    /// write checks the choice again under the set's lock (`write_words`).
    #[inline(always)]
    fn place<W: KeyWords>(k: W, own: i64, room: impl Fn(u32) -> i64) -> Option<u32> {
        if own >= 0 {
            return Some(own as u32 | MAY_EVICT_ASSURED);
        }
        if own != -1 {
            return None;
        }
        let (s1, s2) = L::candidates(k);
        let r1 = room(s1);
        let r2 = room(s2);
        if r1 < 0 || r2 < 0 {
            return None;
        }
        pick(s1, r1 as u64, s2, r2 as u64)
    }
}

impl CtTable<CtKey4> for SetTable<Ct4> {
    #[inline(always)]
    fn find(&self, key: &CtKey4, now: u64) -> Option<(*mut CtEntry, bool)> {
        let [k0, k1] = ct_words::<Ct4>(key);
        self.entry(segbpf_ct4_find(k0, k1, u64::from(ct_seen_tick(now))))
    }

    #[inline(always)]
    fn mark(&self, key: &CtKey4, assured: bool) -> Result<(), i32> {
        let [k0, k1] = ct_words::<Ct4>(key);
        if segbpf_ct4_mark(k0, k1, u64::from(assured)) < 0 {
            Err(-1)
        } else {
            Ok(())
        }
    }

    #[inline(always)]
    fn insert(&self, key: &CtKey4, value: &CtEntry, now: u64, horizon: u64) -> Result<(), i32> {
        let [k0, k1] = ct_words::<Ct4>(key);
        let tick = u64::from(ct_seen_tick(now));
        let sw = Self::place([k0, k1], segbpf_ct4_own(k0, k1), |s| {
            segbpf_ct4_room(u64::from(s), horizon)
        })
        .ok_or(-1)?;
        if segbpf_ct4_write(u64::from(sw) | tick << 32, k0, k1, value, horizon) == 0 {
            Ok(())
        } else {
            Err(-1)
        }
    }
}

impl CtTable<CtKey> for SetTable<Ct6> {
    #[inline(always)]
    fn find(&self, key: &CtKey, now: u64) -> Option<(*mut CtEntry, bool)> {
        self.entry(segbpf_ct6_find(key, u64::from(ct_seen_tick(now))))
    }

    #[inline(always)]
    fn mark(&self, key: &CtKey, assured: bool) -> Result<(), i32> {
        if segbpf_ct6_mark(key, u64::from(assured)) < 0 {
            Err(-1)
        } else {
            Ok(())
        }
    }

    #[inline(always)]
    fn insert(&self, key: &CtKey, value: &CtEntry, now: u64, horizon: u64) -> Result<(), i32> {
        let tick = u64::from(ct_seen_tick(now));
        let k = KeyAt(core::ptr::from_ref(key).cast::<u64>());
        let sw = Self::place(k, segbpf_ct6_own(key), |s| {
            segbpf_ct6_room(u64::from(s), horizon)
        })
        .ok_or(-1)?;
        if segbpf_ct6_write(u64::from(sw) | tick << 32, key, value, horizon) == 0 {
            Ok(())
        } else {
            Err(-1)
        }
    }
}

/// An IPv6 key argument of a global function as words; None for null (the
/// verifier lets a caller pass null for memory).
#[inline(always)]
fn key_at(key: *const CtKey) -> Option<KeyAt> {
    (!key.is_null()).then(|| KeyAt(key.cast::<u64>()))
}

/// The lookup of the IPv4 table, a global BPF function: the entry's index
/// (set × 3 + way) shifted left by one, with the way's assured bit, or
/// -1. Refreshes the way's tick to `tick`, except in a dry-run instance.
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_find(k0: u64, k1: u64, tick: u64) -> i64 {
    CT4.find_index([k0, k1], tick)
}

/// Marking a way of the IPv4 table assured or not, a global BPF function
/// (0, or -1 when the key is gone or its set is held).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_mark(k0: u64, k1: u64, assured: u64) -> i64 {
    CT4.mark_words([k0, k1], assured != 0)
}

/// The key's own way in the IPv4 table, a global BPF function: set × 4 +
/// way, -1 when neither candidate set holds it, -2 when a set stayed held.
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_own(k0: u64, k1: u64) -> i64 {
    CT4.own_words([k0, k1])
}

/// What a new key may take in set `set` of the IPv4 table (a `Room`), a
/// global BPF function; -1 when there is no such set.
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_room(set: u64, horizon: u64) -> i64 {
    CT4.room(set, horizon)
}

/// `value` and the key written to set × 4 + way of the IPv4 table with
/// `insert`'s flags (low half of `sw_tick`, the tick in the high half), a
/// global BPF function: 0, or -2 when the way changed since the choice,
/// -1 on any other failure (`value`: a map value of the caller, checked
/// for its size by the verifier; `horizon`: as `CtTable::insert`'s).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct4_write(
    sw_tick: u64,
    k0: u64,
    k1: u64,
    value: *const CtEntry,
    horizon: u64,
) -> i64 {
    if value.is_null() {
        return -1;
    }
    CT4.write_words(sw_tick, [k0, k1], value, horizon)
}

/// The lookup of the IPv6 table (`segbpf_ct4_find` for a key in the
/// caller's memory).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct6_find(key: *const CtKey, tick: u64) -> i64 {
    match key_at(key) {
        Some(k) => CT6.find_index(k, tick),
        None => -1,
    }
}

/// Marking a way of the IPv6 table (`segbpf_ct4_mark`).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct6_mark(key: *const CtKey, assured: u64) -> i64 {
    match key_at(key) {
        Some(k) => CT6.mark_words(k, assured != 0),
        None => -1,
    }
}

/// The key's own way in the IPv6 table (`segbpf_ct4_own`).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct6_own(key: *const CtKey) -> i64 {
    match key_at(key) {
        Some(k) => CT6.own_words(k),
        None => -2,
    }
}

/// What a new key may take in set `set` of the IPv6 table
/// (`segbpf_ct4_room`).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct6_room(set: u64, horizon: u64) -> i64 {
    CT6.room(set, horizon)
}

/// The write of the IPv6 table (`segbpf_ct4_write`).
#[unsafe(no_mangle)]
#[inline(never)]
#[allow(
    unreachable_pub,
    reason = "a global BPF function: exported, so the verifier checks it once"
)]
pub extern "C" fn segbpf_ct6_write(
    sw_tick: u64,
    key: *const CtKey,
    value: *const CtEntry,
    horizon: u64,
) -> i64 {
    if value.is_null() {
        return -1;
    }
    match key_at(key) {
        Some(k) => CT6.write_words(sw_tick, k, value, horizon),
        None => -1,
    }
}
