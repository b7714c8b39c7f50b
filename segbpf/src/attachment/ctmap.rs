//! A namespace's connection table of one family (`SEG_CT4_*`,
//! `SEG_CT6_*`; layout and rules in `segbpf_common::cttable`) mapped into
//! this process: read by the sets' sequence, written under a set's lock
//! taken as the programs take it (a compare-and-exchange of the set's
//! first word), so a program racing a userspace write never sees half of
//! it.

use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use segbpf_common::{
    CtEntry, CtLayout, ct_assured, ct_key, ct_seen_tick, ct_slot, ct_tick, ct_words,
};

use crate::attachment::maps::MapsError;

/// One array mapped shared and writable.
struct Mapping {
    base: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        map: &'static str,
        populate: bool,
    ) -> Result<Self, MapsError> {
        // SAFETY: a shared read-write mapping of the array's values (an
        // mmapable array lays them out one after the other from offset
        // 0); the kernel checks the map's flags and size and fails
        // otherwise. Unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 },
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                map,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { base, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A table mapped into this process.
pub struct CtMap<L: CtLayout> {
    sets: Mapping,
    ways: Mapping,
    /// Sets (the array holds one element more: the secret).
    nsets: u32,
    layout: std::marker::PhantomData<L>,
}

/// The IPv4 table mapped.
pub type Ct4Map = CtMap<segbpf_common::Ct4>;
/// The IPv6 table mapped.
pub type Ct6Map = CtMap<segbpf_common::Ct6>;

/// How long a set may stay held, unchanged, before userspace takes it as
/// left by a writer that died holding it (a program holds a set for a few
/// dozen instructions; only a userspace writer killed between taking and
/// releasing a set can leave it held). It is then released, with a
/// warning, so the set's flows are found again.
const STUCK: std::time::Duration = std::time::Duration::from_millis(200);

impl<L: CtLayout> CtMap<L> {
    /// Maps the table whose arrays are `sets` and `ways` (their sizes as
    /// the kernel reports them: `sets_entries` elements of the sets'
    /// array, `ways_entries` of the entries').
    pub fn new(
        sets: BorrowedFd<'_>,
        sets_entries: u32,
        ways: BorrowedFd<'_>,
        ways_entries: u32,
    ) -> Result<Self, MapsError> {
        let nsets = sets_entries.saturating_sub(1);
        if !nsets.is_power_of_two()
            || u64::from(ways_entries) != u64::from(nsets) * u64::from(L::WAYS)
        {
            return Err(MapsError::Layout {
                map: L::SETS_MAP,
                reason: format!(
                    "{sets_entries} sets and {ways_entries} entries: not a power of two plus one, and {} entries per set",
                    L::WAYS
                ),
            });
        }
        Ok(Self {
            // The sets are read whole: mapped in at once, not page by page.
            sets: Mapping::new(
                sets,
                sets_entries as usize * size_of::<L::Set>(),
                L::SETS_MAP,
                true,
            )?,
            ways: Mapping::new(
                ways,
                ways_entries as usize * size_of::<CtEntry>(),
                L::WAYS_MAP,
                false,
            )?,
            nsets,
            layout: std::marker::PhantomData,
        })
    }

    /// The mask of the set index.
    pub const fn mask(&self) -> u32 {
        self.nsets - 1
    }

    fn set_ptr(&self, set: u32) -> *mut u64 {
        // SAFETY: `set` <= nsets: inside the mapping (callers mask it, or
        // pass nsets for the secret's element).
        unsafe {
            self.sets
                .base
                .cast::<L::Set>()
                .add(set.min(self.nsets) as usize)
                .cast::<u64>()
        }
    }

    fn way_ptr(&self, set: u32, way: u32) -> *mut CtEntry {
        let i = (set.min(self.nsets - 1) * L::WAYS + way.min(L::WAYS - 1)) as usize;
        // SAFETY: inside the mapping of nsets * WAYS entries.
        unsafe { self.ways.base.cast::<CtEntry>().add(i) }
    }

    fn word(&self, set: u32, i: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 of the mapped set (page-aligned base,
        // sets of whole words); the programs access it by aligned loads,
        // stores and atomics.
        unsafe { AtomicU64::from_ptr(self.set_ptr(set).add(i.min(L::SET_WORDS - 1))) }
    }

    /// The namespace's secret of the set hash.
    pub fn secret(&self) -> u64 {
        self.word(self.nsets, 0).load(Ordering::Acquire)
    }

    /// Waits until set `set` is not held (its word 0, even), and returns
    /// word 0; a set held unchanged for [`STUCK`] is released first.
    fn settled(&self, set: u32) -> u64 {
        let w = self.word(set, 0);
        let start = std::time::Instant::now();
        let mut seen = w.load(Ordering::Acquire);
        loop {
            let w0 = w.load(Ordering::Acquire);
            if w0 & 1 == 0 {
                return w0;
            }
            if w0 as u16 != seen as u16 {
                seen = w0;
            } else if start.elapsed() > STUCK
                && w.compare_exchange(
                    w0,
                    (w0 & !0xffff) | u64::from((w0 as u16).wrapping_add(1)),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                tracing::warn!(
                    "{}: set {set} was held for over {} ms by a writer that is gone: released",
                    L::SETS_MAP,
                    STUCK.as_millis()
                );
                continue;
            }
            std::thread::yield_now();
        }
    }

    /// A copy of set `set` taken while no writer held it.
    fn snapshot(&self, set: u32) -> (L::Set, [CtEntry; 4]) {
        loop {
            let w0 = self.settled(set);
            let mut s: L::Set = bytemuck::Zeroable::zeroed();
            for (i, w) in s.as_mut().iter_mut().enumerate() {
                *w = self.word(set, i).load(Ordering::Relaxed);
            }
            let mut e = [CtEntry::default(); 4];
            for (w, slot) in e.iter_mut().enumerate().take(L::WAYS as usize) {
                if s.as_ref()[ct_slot::<L>(w as u32) + L::TAG] != 0 {
                    // SAFETY: an entry of the mapping; its fields change
                    // in place (counters, timestamps) as they did in the
                    // LRU table; a torn copy of a counter is a reader's
                    // race the kernel tables had too.
                    *slot = unsafe { std::ptr::read_volatile(self.way_ptr(set, w as u32)) };
                }
            }
            fence(Ordering::Acquire);
            if self.word(set, 0).load(Ordering::Relaxed) as u16 == w0 as u16 {
                return (s, e);
            }
        }
    }

    /// The key of way `w` of the set `s`, if it holds one.
    fn key_of(s: &[u64], w: u32) -> Option<L::Key> {
        let slot = ct_slot::<L>(w);
        if s[slot + L::TAG] == 0 {
            return None;
        }
        let mut words: L::Words = bytemuck::Zeroable::zeroed();
        words
            .as_mut()
            .copy_from_slice(&s[slot..slot + L::KEY_WORDS]);
        Some(ct_key::<L>(words))
    }

    /// Every flow of the table: key, entry, assured.
    pub fn entries(&self) -> Result<Vec<(L::Key, CtEntry, bool)>, MapsError> {
        let mut out = Vec::new();
        for set in 0..self.nsets {
            // An empty set (most are) is skipped without the sequence: a
            // key written there right now is a flow made after this read.
            if (0..L::WAYS).all(|w| {
                self.word(set, ct_slot::<L>(w) + L::TAG)
                    .load(Ordering::Relaxed)
                    == 0
            }) {
                continue;
            }
            let (s, e) = self.snapshot(set);
            for w in 0..L::WAYS {
                if let Some(k) = Self::key_of(s.as_ref(), w) {
                    out.push((k, e[w as usize], ct_assured(s.as_ref(), w)));
                }
            }
        }
        Ok(out)
    }

    /// The two candidate sets of `key`.
    fn candidates(&self, key: &L::Key) -> (u32, u32) {
        L::candidate_sets(key, self.secret(), self.mask())
    }

    /// Way `way`'s tick in the header of set `set`: u32 index 1 + way
    /// (module docs of `segbpf_common::cttable`).
    fn tick(&self, set: u32, way: u32) -> &AtomicU32 {
        // SAFETY: an aligned u32 of the mapped set's header; programs
        // load and store it whole.
        unsafe {
            AtomicU32::from_ptr(
                self.set_ptr(set)
                    .cast::<u32>()
                    .add(1 + way.min(L::WAYS - 1) as usize),
            )
        }
    }

    /// Whether way `w` of the set now holds `key` (word by word).
    fn holds(&self, set: u32, w: u32, key: &L::Key) -> bool {
        let slot = ct_slot::<L>(w);
        ct_words::<L>(key)
            .as_ref()
            .iter()
            .enumerate()
            .all(|(i, k)| self.word(set, slot + i).load(Ordering::Relaxed) == *k)
    }

    /// The ways holding `key` (normally one; a race between two writers
    /// can leave a copy in each candidate set).
    fn find_all(&self, key: &L::Key) -> Vec<(u32, u32)> {
        let (a, b) = self.candidates(key);
        let mut out = Vec::new();
        for set in if a == b { vec![a] } else { vec![a, b] } {
            let (s, _) = self.snapshot(set);
            for w in 0..L::WAYS {
                if Self::key_of(s.as_ref(), w).as_ref() == Some(key) {
                    out.push((set, w));
                }
            }
        }
        out
    }

    /// Whether the table holds `key`.
    pub fn contains(&self, key: &L::Key) -> bool {
        !self.find_all(key).is_empty()
    }

    /// Takes set `set` (its sequence from even to odd), waiting while a
    /// program holds it.
    fn take(&self, set: u32) -> Held<'_, L> {
        let w = self.word(set, 0);
        loop {
            let w0 = self.settled(set);
            if w.compare_exchange(w0, w0 + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Held {
                    map: self,
                    set,
                    seq: (w0 as u16).wrapping_add(2),
                };
            }
        }
    }

    /// Removes every copy of `key`, with its way's assured bit; whether
    /// there was one.
    pub fn remove(&self, key: &L::Key) -> Result<bool, MapsError> {
        let mut removed = false;
        for (set, way) in self.find_all(key) {
            let held = self.take(set);
            let s = ct_slot::<L>(way);
            // Still there (a program may have replaced it before the lock).
            if self.holds(set, way, key) {
                for i in 0..L::KEY_WORDS {
                    self.word(set, s + i).store(0, Ordering::Relaxed);
                }
                let bit = 1u64 << (16 + way);
                let _ = self
                    .word(set, 0)
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w & !bit));
                removed = true;
            }
            drop(held);
        }
        Ok(removed)
    }

    /// Writes `entry` for `key`, assured or not, where a program's insert
    /// would (`segbpf-ebpf/src/cttable.rs`): its own way; else a free way
    /// (empty, or its tick below `horizon`, see
    /// `segbpf_common::ct_seen_horizon`) in the candidate set with fewer
    /// assured ways; else the least recently seen half-open way. Never a
    /// live assured way: when all are, nothing is written and this
    /// returns false. A way a program changed between the choice and the
    /// lock is chosen again.
    pub fn insert(
        &self,
        key: &L::Key,
        entry: &CtEntry,
        assured: bool,
        horizon: u64,
    ) -> Result<bool, MapsError> {
        loop {
            let Some((set, way, empty, own)) = self.choose(key, horizon) else {
                return Ok(false);
            };
            let held = self.take(set);
            let s = ct_slot::<L>(way);
            let cur = self.word(set, s + L::TAG).load(Ordering::Relaxed);
            let cur_assured = self.word(set, 0).load(Ordering::Relaxed) >> (16 + way) & 1 != 0;
            let dup = (0..L::WAYS).any(|w| w != way && self.holds(set, w, key));
            let tick = u64::from(self.tick(set, way).load(Ordering::Relaxed));
            // The key's own way or a dead one: another key there, assured
            // and live since the choice, is not overwritten.
            let taken = own && cur_assured && tick >= horizon && !self.holds(set, way, key);
            if (empty && cur != 0) || (!empty && !own && cur_assured) || taken || dup {
                // Changed since the choice (a program wrote it): again.
                drop(held);
                continue;
            }
            self.write_held(&held, way, key, entry, assured);
            drop(held);
            return Ok(true);
        }
    }

    /// The way `insert` writes `key` into: the set, the way, whether it
    /// is empty, and whether it is the key's own or a dead way (which may
    /// carry an assured bit); None when all the ways are live and assured.
    fn choose(&self, key: &L::Key, horizon: u64) -> Option<(u32, u32, bool, bool)> {
        if let Some((set, way)) = self.find_all(key).first() {
            return Some((*set, *way, false, true));
        }
        let (a, b) = self.candidates(key);
        // Per set: a free way (and whether empty), assured ways, the least
        // recently seen half-open way and its tick.
        let room = |set: u32| {
            let (s, _) = self.snapshot(set);
            let mut free = None;
            let mut assured = 0;
            let mut half_open: Option<(u32, u32)> = None;
            for w in 0..L::WAYS {
                let t = ct_tick(s.as_ref(), w);
                let empty = s.as_ref()[ct_slot::<L>(w) + L::TAG] == 0;
                if empty || u64::from(t) < horizon {
                    free = free.or(Some((w, empty)));
                } else if ct_assured(s.as_ref(), w) {
                    assured += 1;
                } else if half_open.is_none_or(|(_, old)| t < old) {
                    half_open = Some((w, t));
                }
            }
            (free, assured, half_open)
        };
        let ((f1, n1, h1), (f2, n2, h2)) = (room(a), room(b));
        let free = match (f1, f2) {
            (Some(_), Some(f)) if n2 < n1 => Some((b, f)),
            (Some(f), _) => Some((a, f)),
            (None, Some(f)) => Some((b, f)),
            (None, None) => None,
        };
        if let Some((set, (way, empty))) = free {
            return Some((set, way, empty, !empty));
        }
        match (h1, h2) {
            (Some((_, t1)), Some((w, t2))) if t2 < t1 => Some((b, w, false, false)),
            (Some((w, _)), _) => Some((a, w, false, false)),
            (None, Some((w, _))) => Some((b, w, false, false)),
            (None, None) => None,
        }
    }

    /// Writes the key and `entry` into `way` of the set `held` holds.
    fn write_held(
        &self,
        held: &Held<'_, L>,
        way: u32,
        key: &L::Key,
        entry: &CtEntry,
        assured: bool,
    ) {
        let set = held.set;
        let s = ct_slot::<L>(way);
        for (i, k) in ct_words::<L>(key).as_ref().iter().enumerate() {
            self.word(set, s + i).store(*k, Ordering::Relaxed);
        }
        self.tick(set, way).store(
            ct_seen_tick(crate::host::clock::monotonic_ns()),
            Ordering::Relaxed,
        );
        // SAFETY: the entry of the held way.
        unsafe { std::ptr::write_volatile(self.way_ptr(set, way), *entry) };
        let bit = 1u64 << (16 + way);
        let _ = self
            .word(set, 0)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(if assured { w | bit } else { w & !bit })
            });
    }
}

/// A set held by this process; released on drop (the sequence stored
/// back even, one step on).
struct Held<'a, L: CtLayout> {
    map: &'a CtMap<L>,
    set: u32,
    seq: u16,
}

impl<L: CtLayout> Drop for Held<'_, L> {
    fn drop(&mut self) {
        let seq = u64::from(self.seq);
        let _ =
            self.map
                .word(self.set, 0)
                .fetch_update(Ordering::Release, Ordering::Relaxed, |w| {
                    Some((w & !0xffff) | seq)
                });
    }
}
