//! The compact compiled form of an attachment's policy, kept beside its
//! state (`IFACE.sets`) so that `segbpf set add|del` need not parse and
//! compile the whole policy: the members in force of every set, which
//! rules name which set, and the rules of every address class.
//!
//! A set edit changes the rules of the addresses in the *changed region*
//! only (the members added that the set did not cover, or the addresses
//! the removed members alone covered). [`SetIndex::edit`] recomputes the
//! address intervals of that region from the peer tries in force (the
//! [`Snapshot`]) and the class table, and leaves everything else as it is:
//! the result equals a fresh compile of the edited policy up to the
//! numbering of the classes. Whatever it cannot do this way (an edit that
//! needs a class the policy does not have yet, a removed member that a
//! rule also names in another way) it declines, and the caller takes the
//! full path (parse and compile).
//!
//! The file is trusted only when everything agrees: its checksum, the
//! generation in force (state, kernel and snapshot), the kernel id of the
//! peer trie, the hash of the policy file's text as it is now, the live set
//! edits and roles of the state. Any mismatch (a stale file, a policy file
//! edited since, a torn or altered file) means the full path.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    io::Write as _,
    path::Path,
};

use segbpf_common::{PEER_KEY_HEADER_BITS, PeerClass, PeerKeyV4, PeerKeyV6, PortKey, RuleRef};
use serde::{Deserialize, Serialize};

use crate::{
    attachment::delta::Snapshot,
    policy::{
        AddrRange, Direction, Policy,
        addr::{parse_item, range_to_prefixes},
        compile::{ClassRules, Compiled, FastMap, LpmEntry},
        peerdefault,
    },
};

const MAGIC: &str = "SEGSETS2";

/// A 64-bit hash of bytes (SipHash with fixed keys): detects a policy file
/// or index that changed, not a forger (the files are root's, 0600).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    #[allow(deprecated, reason = "SipHasher: fixed keys, the same in every run")]
    let mut h = std::hash::SipHasher::new_with_keys(0x7365_6762_7066_0001, 0x7365_7473_0000_0001);
    bytes.hash(&mut h);
    h.finish()
}

/// A fast 64-bit hash, 8 bytes a step (a 64x64-bit multiply folded, as
/// wyhash does; several times SipHash's speed): detects changed bytes,
/// not a forger. For what is hashed on every set edit (the policy file,
/// the live set edits), where SipHash of 1,000,000 members took tens of
/// milliseconds. Streaming: the bytes of several `write`s hash as their
/// concatenation would.
#[derive(Clone, Copy)]
pub struct FastHash {
    h: u64,
    /// Bytes of a word not complete yet (`n` of them).
    part: [u8; 8],
    n: usize,
    /// All bytes written.
    len: u64,
}

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;

fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

fn step(h: u64, w: u64) -> u64 {
    fold(h ^ w, P1).wrapping_add(w ^ P0)
}

impl FastHash {
    /// A hash of nothing yet.
    pub fn new() -> Self {
        FastHash {
            h: 0x7365_6762_7066_0002,
            part: [0; 8],
            n: 0,
            len: 0,
        }
    }

    /// Adds `bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.n > 0 {
            let take = (8 - self.n).min(bytes.len());
            self.part[self.n..self.n + take].copy_from_slice(&bytes[..take]);
            self.n += take;
            bytes = &bytes[take..];
            if self.n < 8 {
                return;
            }
            self.h = step(self.h, u64::from_le_bytes(self.part));
            self.n = 0;
        }
        let mut chunks = bytes.chunks_exact(8);
        let mut h = self.h;
        for c in &mut chunks {
            h = step(
                h,
                u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            );
        }
        self.h = h;
        let rest = chunks.remainder();
        self.part[..rest.len()].copy_from_slice(rest);
        self.n = rest.len();
    }

    /// The hash.
    pub fn finish(self) -> u64 {
        let mut tail = [0u8; 8];
        tail[..self.n].copy_from_slice(&self.part[..self.n]);
        let h = step(self.h, u64::from_le_bytes(tail));
        let h = fold(h ^ self.len, P0 ^ P1);
        fold(h, P1) ^ h
    }
}

impl Default for FastHash {
    fn default() -> Self {
        Self::new()
    }
}

/// [`FastHash`] of the policy file's bytes (what the index was compiled
/// from), of a live set edits file, of the index.
pub fn hash_policy(bytes: &[u8]) -> u64 {
    let mut h = FastHash::new();
    h.write(bytes);
    h.finish()
}

/// The hash of live set edits (as the state keeps them): [`hash_policy`]
/// of their bytes in the form of the state's live file (a header line,
/// then per set `COUNT NAME` and its members, one a line; see
/// `crate::attachment::state`), hashed as they stream: a state that keeps
/// them in that file has this hash already (its name).
pub fn hash_overrides(o: &BTreeMap<String, Vec<String>>) -> u64 {
    let mut h = FastHash::new();
    h.write(b"SEGLIVE1\n");
    for (name, members) in o {
        h.write(format!("{} {name}\n", members.len()).as_bytes());
        for m in members {
            h.write(m.as_bytes());
            h.write(b"\n");
        }
    }
    h.finish()
}

/// A rule that names at least one set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRefs {
    /// Policy rule id.
    pub rule: u32,
    /// Direction key byte.
    pub dir: u8,
    /// The sets its peer names.
    pub sets: Vec<String>,
    /// Its other peer items: `any` and literals.
    pub other: Vec<String>,
}

/// The compact compiled form (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetIndex {
    /// Generation it describes.
    pub generation: u64,
    /// Kernel id of the attachment's `SEG_PEER_V4` map.
    pub map_id: u32,
    /// The policy file (as the state names it).
    pub policy: String,
    /// [`hash_policy`] of that file's text when it was compiled.
    pub policy_hash: u64,
    /// [`hash_overrides`] of the live set edits compiled in.
    pub overrides_hash: u64,
    /// The host's roles it was compiled for.
    pub roles: Vec<String>,
    /// Members in force of every set not edited live, as `set list`
    /// prints them (the sets edited live are the state's, whose hash is
    /// `overrides_hash`: not kept twice).
    pub sets: BTreeMap<String, Vec<String>>,
    /// Rules (that apply to the host) naming sets.
    pub refs: Vec<SetRefs>,
    /// Every address class.
    pub classes: Vec<ClassRules>,
}

/// The peer items of a rule's `peer_text` (a string, or `[a, b]`).
fn peer_items(text: &str) -> Vec<&str> {
    match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(inner) => inner.split(", ").map(str::trim).collect(),
        None => vec![text.trim()],
    }
}

/// Maps with their new contents after a set edit (keys at slot 0).
#[derive(Clone, Debug, Default)]
pub struct Edited {
    /// `SEG_PEER_V4` entries.
    pub peers_v4: Vec<LpmEntry<PeerKeyV4, PeerClass>>,
    /// `SEG_PEER_V6` entries.
    pub peers_v6: Vec<LpmEntry<PeerKeyV6, PeerClass>>,
    /// `SEG_PORTS` entries.
    pub ports: Vec<LpmEntry<PortKey, RuleRef>>,
    /// The classes left.
    pub classes: Vec<ClassRules>,
    /// Addresses whose rules changed: IPv4 (as u128) and IPv6 ranges.
    pub region: [Vec<(u128, u128)>; 2],
}

/// Inclusive ranges sorted and merged.
fn normalize(mut r: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    r.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if last.1 == u128::MAX || s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` minus `b` (both normalized).
fn subtract(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 < cur {
            j += 1;
        }
        let mut k = j;
        let mut done = false;
        while k < b.len() && b[k].0 <= e {
            if b[k].0 > cur {
                out.push((cur, b[k].0 - 1));
            }
            if b[k].1 >= e {
                done = true;
                break;
            }
            cur = cur.max(b[k].1 + 1);
            k += 1;
        }
        if !done && cur <= e {
            out.push((cur, e));
        }
    }
    out
}

fn intersects(a: &[(u128, u128)], b: &[(u128, u128)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].1 < b[j].0 {
            i += 1;
        } else if b[j].1 < a[i].0 {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

/// The ranges of one family (`v6`) of `ranges`, as u128.
fn family(ranges: &[AddrRange], v6: bool) -> Vec<(u128, u128)> {
    ranges
        .iter()
        .filter_map(|r| match (r, v6) {
            (AddrRange::V4 { start, end }, false) => Some((u128::from(*start), u128::from(*end))),
            (AddrRange::V6 { start, end }, true) => Some((*start, *end)),
            _ => None,
        })
        .collect()
}

/// Peer-trie keys of either family, generic over the two key types.
trait PeerKey: Copy {
    const BITS: u32;
    fn dir(&self) -> u8;
    fn addr(&self) -> u128;
    fn make(dir: u8, addr: u128) -> Self;
}

impl PeerKey for PeerKeyV4 {
    const BITS: u32 = 32;
    fn dir(&self) -> u8 {
        self.dir
    }
    fn addr(&self) -> u128 {
        u128::from(u32::from_be_bytes(self.addr_be))
    }
    fn make(dir: u8, addr: u128) -> Self {
        PeerKeyV4 {
            slot: 0,
            dir,
            addr_be: (addr as u32).to_be_bytes(),
        }
    }
}

impl PeerKey for PeerKeyV6 {
    const BITS: u32 = 128;
    fn dir(&self) -> u8 {
        self.dir
    }
    fn addr(&self) -> u128 {
        u128::from_be_bytes(self.addr_be)
    }
    fn make(dir: u8, addr: u128) -> Self {
        PeerKeyV6 {
            slot: 0,
            dir,
            addr_be: addr.to_be_bytes(),
        }
    }
}

/// The maximal intervals `(start, end, class)` of one direction's entries
/// (a disjoint tiling, or one with its default class as a header-only
/// entry, see `peerdefault`).
fn intervals<K: PeerKey>(entries: &[LpmEntry<K, PeerClass>], dir: u8) -> Vec<(u128, u128, u32)> {
    let mine: Vec<&LpmEntry<K, PeerClass>> =
        entries.iter().filter(|(_, k, _)| k.dir() == dir).collect();
    peerdefault::expand(&mine, K::BITS, PeerKey::addr)
}

fn merge(v: Vec<(u128, u128, u32)>) -> Vec<(u128, u128, u32)> {
    let mut out: Vec<(u128, u128, u32)> = Vec::with_capacity(v.len());
    for (s, e, c) in v {
        match out.last_mut() {
            Some(last) if last.2 == c && last.1 != u128::MAX && last.1 + 1 == s => last.1 = e,
            _ => out.push((s, e, c)),
        }
    }
    out
}

/// `old` with the addresses of `region` given the class `new_class` of
/// their old class (None: no class), cut at every boundary of both.
fn overlay(
    old: &[(u128, u128, u32)],
    region: &[(u128, u128)],
    max: u128,
    mut new_class: impl FnMut(Option<u32>) -> Result<Option<u32>, String>,
) -> Result<Vec<(u128, u128, u32)>, String> {
    let mut points: Vec<u128> = Vec::with_capacity(2 * (old.len() + region.len()));
    for &(s, e, _) in old {
        points.push(s);
        if e < max {
            points.push(e + 1);
        }
    }
    for &(s, e) in region {
        points.push(s);
        if e < max {
            points.push(e + 1);
        }
    }
    points.sort_unstable();
    points.dedup();
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(old.len() + region.len());
    for (n, &s) in points.iter().enumerate() {
        let e = points.get(n + 1).map_or(max, |p| p - 1);
        while i < old.len() && old[i].1 < s {
            i += 1;
        }
        while j < region.len() && region[j].1 < s {
            j += 1;
        }
        let class = (i < old.len() && old[i].0 <= s).then(|| old[i].2);
        let in_region = j < region.len() && region[j].0 <= s;
        let class = if in_region { new_class(class)? } else { class };
        if let Some(c) = class {
            out.push((s, e, c));
        }
    }
    Ok(merge(out))
}

/// The entries of one direction's intervals, as the compiler writes them
/// (its default class elided, see `peerdefault`).
fn entries_of<K: PeerKey>(iv: &[(u128, u128, u32)], dir: u8) -> Vec<LpmEntry<K, PeerClass>> {
    peerdefault::elide(tiling(iv, dir), K::BITS, PeerKey::addr, K::make(dir, 0))
}

fn tiling<K: PeerKey>(iv: &[(u128, u128, u32)], dir: u8) -> Vec<LpmEntry<K, PeerClass>> {
    let mut out = Vec::with_capacity(iv.len());
    for &(s, e, c) in iv {
        for (prefix, len) in range_to_prefixes(s, e, K::BITS) {
            out.push((
                PEER_KEY_HEADER_BITS + len,
                K::make(dir, prefix),
                PeerClass { class_id: c },
            ));
        }
    }
    out
}

impl SetIndex {
    /// The index of `c`, compiled from `policy` (whose text hashes to
    /// `policy_hash`, with `overrides`) for `roles`, written to the maps
    /// whose peer trie has kernel id `map_id`.
    pub fn build(
        policy: &Policy,
        state_policy: &str,
        policy_hash: u64,
        overrides: &BTreeMap<String, Vec<String>>,
        roles: &[String],
        c: &Compiled,
        map_id: u32,
    ) -> Self {
        let names: std::collections::HashSet<&str> =
            policy.sets.iter().map(|s| s.name.as_str()).collect();
        let refs = c
            .rules
            .iter()
            .filter_map(|info| {
                let rule = policy.rules.get(info.id as usize)?;
                let (sets, other): (Vec<&str>, Vec<&str>) = peer_items(&rule.peer_text)
                    .into_iter()
                    .partition(|i| names.contains(i));
                (!sets.is_empty()).then(|| SetRefs {
                    rule: info.id,
                    dir: rule.direction.key_byte(),
                    sets: sets.into_iter().map(String::from).collect(),
                    other: other.into_iter().map(String::from).collect(),
                })
            })
            .collect();
        SetIndex {
            generation: c.config.generation,
            map_id,
            policy: state_policy.to_string(),
            policy_hash,
            overrides_hash: hash_overrides(overrides),
            roles: roles.to_vec(),
            sets: policy
                .sets
                .iter()
                .filter(|s| !overrides.contains_key(&s.name))
                .map(|s| {
                    (
                        s.name.clone(),
                        s.ranges.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect(),
            refs,
            classes: c.class_rules.clone(),
        }
    }

    /// The file's bytes: a line `SEGSETS2 <checksum>` ([`hash_policy`] of
    /// the rest), then JSON. (`SEGSETS1` files, of earlier versions, are
    /// not read: the next set edit takes the full path and writes this form.)
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!("{MAGIC} {:016x}\n", hash_policy(&body)).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Parses a file's bytes; None unless whole and its checksum holds.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(&bytes[..nl]).ok()?;
        let sum = head.strip_prefix(MAGIC)?.strip_prefix(' ')?;
        let body = &bytes[nl + 1..];
        if u64::from_str_radix(sum, 16).ok()? != hash_policy(body) {
            return None;
        }
        serde_json::from_slice(body).ok()
    }

    /// Reads the index at `path`, if there is a whole one.
    pub fn read(path: &Path) -> Option<Self> {
        Self::from_bytes(&std::fs::read(path).ok()?)
    }

    /// Writes the index to `path` atomically (mode 0600).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = path.with_extension("sets.tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&self.to_bytes())?;
        }
        std::fs::rename(&tmp, path)
    }

    fn ranges_of(&self, set: &str, live: &Overrides) -> Result<Vec<AddrRange>, String> {
        live.get(set)
            .or_else(|| self.sets.get(set))
            .ok_or_else(|| format!("no set `{set}` in the index"))?
            .iter()
            .map(|m| parse_item(m).map_err(|e| format!("set {set}: {m}: {e}")))
            .collect()
    }

    /// The maps in force (`snap`, of this index's generation) with the
    /// members of `set` replaced by `next`. Err says why the edit needs
    /// the full path (nothing is decided wrongly: the caller compiles).
    /// `old` are the set's members in force (as parsed from `self.sets`);
    /// `live` the live set edits (the members of the sets not in `self.sets`).
    pub fn edit(
        &self,
        live: &Overrides,
        snap: &Snapshot,
        set: &str,
        old: &[AddrRange],
        next: &[AddrRange],
    ) -> Result<Edited, String> {
        let cap = self.classes.len();
        let (by_set, rules_of) = self.tables();
        let unknown = snap
            .peers_v4
            .iter()
            .map(|(_, _, c)| c.class_id)
            .chain(snap.peers_v6.iter().map(|(_, _, c)| c.class_id))
            .find(|c| !rules_of.contains_key(c));
        if let Some(c) = unknown {
            return Err(format!(
                "class {c} of the maps in force is not in the index"
            ));
        }
        let dirs = Direction::ALL.map(Direction::key_byte);
        // The maximal intervals of each direction (ingress, egress) and
        // family (v4, v6), as the compiler's sweep made them.
        let mut iv: [[Vec<(u128, u128, u32)>; 2]; 2] =
            dirs.map(|d| [intervals(&snap.peers_v4, d), intervals(&snap.peers_v6, d)]);
        let mut region_out: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
        for v6 in [false, true] {
            let before = normalize(family(old, v6));
            let after = normalize(family(next, v6));
            let gained = subtract(&after, &before);
            let lost = subtract(&before, &after);
            if !gained.is_empty() && !lost.is_empty() {
                return Err("members both added and removed".into());
            }
            let (region, add) = if lost.is_empty() {
                (gained, true)
            } else {
                (lost, false)
            };
            if region.is_empty() {
                continue;
            }
            for (di, dir) in dirs.into_iter().enumerate() {
                let a = self.named_rules(live, set, dir, v6, &region, add)?;
                if a.is_empty() {
                    continue;
                }
                let mut next_class = Self::class_step(&by_set, &rules_of, dir, &a, add);
                let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
                let list = &mut iv[di][usize::from(v6)];
                *list = overlay(list, &region, max, &mut next_class)?;
            }
            region_out[usize::from(v6)] = region;
        }
        // Class ids as a fresh compile gives them: in the order the classes
        // first appear (ingress then egress, IPv4 then IPv6, ascending
        // addresses). Classes no address maps to any more go, with their
        // port entries (a fresh compile would not make them).
        let mut renum: FastMap<u32, u32> =
            FastMap::with_capacity_and_hasher(cap, std::hash::BuildHasherDefault::default());
        for lists in &iv {
            for list in lists {
                for &(_, _, c) in list {
                    let n = renum.len() as u32;
                    renum.entry(c).or_insert(n);
                }
            }
        }
        let mut out = Edited {
            region: region_out,
            ..Edited::default()
        };
        for (di, dir) in dirs.into_iter().enumerate() {
            let [v4, v6] = &mut iv[di];
            for l in [&mut *v4, &mut *v6] {
                for (_, _, c) in l.iter_mut() {
                    *c = renum[c];
                }
            }
            out.peers_v4.extend(entries_of::<PeerKeyV4>(v4, dir));
            out.peers_v6.extend(entries_of::<PeerKeyV6>(v6, dir));
        }
        out.ports = snap
            .ports
            .iter()
            .filter_map(|&(l, mut k, v)| {
                let c = renum.get(&u32::from_be_bytes(k.class_be))?;
                k.class_be = c.to_be_bytes();
                Some((l, k, v))
            })
            .collect();
        out.classes = self
            .classes
            .iter()
            .filter_map(|c| {
                Some(ClassRules {
                    id: *renum.get(&c.id)?,
                    ..c.clone()
                })
            })
            .collect();
        out.classes.sort_by_key(|c| c.id);
        Ok(out)
    }
}

/// Live set edits: members by set name.
type Overrides = BTreeMap<String, Vec<String>>;

/// The class tables of an index: by (direction, rules) and rules by id.
type ByRules<'a> = FastMap<(u8, &'a [u32]), u32>;
type RulesOf<'a> = FastMap<u32, &'a [u32]>;

/// The span `(first, last)` of a peer entry that is not header-only.
fn span<K: PeerKey>(e: &LpmEntry<K, PeerClass>) -> (u128, u128) {
    let plen = e.0.saturating_sub(PEER_KEY_HEADER_BITS).min(K::BITS);
    let a = e.1.addr();
    let host = if plen >= K::BITS {
        0
    } else if K::BITS == 128 {
        u128::MAX >> plen
    } else {
        ((1u128 << K::BITS) - 1) >> plen
    };
    (a, a | host)
}

/// Whether entry `y` starts right after `x` ends, with the same class.
fn continues<K: PeerKey>(x: &LpmEntry<K, PeerClass>, y: &LpmEntry<K, PeerClass>) -> bool {
    let (_, xe) = span(x);
    x.2.class_id == y.2.class_id && xe != u128::MAX && xe + 1 == span(y).0
}

/// Rewrites the entries of direction `dir` in `list` (one family, both
/// directions) for the addresses of `region` (normalized, not empty),
/// touching only the maximal intervals that overlap it and their
/// neighbours; returns the new list. `Ok(None)`: the list is not in the
/// form this needs (the direction's entries contiguous, in address order,
/// disjoint, no header-only entry) or the result may need one (it reaches
/// both ends of the space); the caller works on the whole.
fn splice_region<K: PeerKey>(
    list: &[LpmEntry<K, PeerClass>],
    dir: u8,
    rank: impl Fn(u8) -> usize,
    region: &[(u128, u128)],
    mut new_class: impl FnMut(Option<u32>) -> Result<Option<u32>, String>,
) -> Result<Option<Vec<LpmEntry<K, PeerClass>>>, String> {
    let max = if K::BITS == 128 {
        u128::MAX
    } else {
        (1u128 << K::BITS) - 1
    };
    let (r0, r1) = if let Some(f) = list.iter().position(|e| e.1.dir() == dir) {
        let n = list[f..].iter().take_while(|e| e.1.dir() == dir).count();
        (f, f + n)
    } else {
        let p = list
            .iter()
            .position(|e| rank(e.1.dir()) > rank(dir))
            .unwrap_or(list.len());
        (p, p)
    };
    if list[r1..].iter().any(|e| e.1.dir() == dir) {
        return Ok(None);
    }
    let run = &list[r0..r1];
    let mut prev: Option<u128> = None;
    for e in run {
        if e.0 <= PEER_KEY_HEADER_BITS {
            return Ok(None);
        }
        let (s, end) = span(e);
        if prev.is_some_and(|p| s <= p) {
            return Ok(None);
        }
        prev = Some(end);
    }
    // One window per region range: the maximal intervals it overlaps and
    // the one on either side; windows that meet are joined.
    let mut windows: Vec<(usize, usize, usize, usize)> = Vec::new(); // entries a..b, region i..j
    for (ri, &(rs, re)) in region.iter().enumerate() {
        let a0 = run.partition_point(|e| span(e).1 < rs);
        let mut a = a0.saturating_sub(1);
        while a > 0 && continues(&run[a - 1], &run[a]) {
            a -= 1;
        }
        let b0 = run.partition_point(|e| span(e).0 <= re);
        let mut b = (b0 + 1).min(run.len());
        while b < run.len() && continues(&run[b - 1], &run[b]) {
            b += 1;
        }
        match windows.last_mut() {
            Some(w) if a <= w.1 => {
                w.1 = w.1.max(b);
                w.3 = ri + 1;
            }
            _ => windows.push((a, b, ri, ri + 1)),
        }
    }
    let mut out: Vec<LpmEntry<K, PeerClass>> = Vec::with_capacity(list.len() + 64);
    out.extend_from_slice(&list[..r0]);
    let mut at = 0;
    for &(a, b, i, j) in &windows {
        out.extend_from_slice(&run[at..a]);
        let mut iv: Vec<(u128, u128, u32)> = Vec::with_capacity(b - a);
        for e in &run[a..b] {
            let (s, end) = span(e);
            match iv.last_mut() {
                Some(last) if last.2 == e.2.class_id && last.1 != u128::MAX && last.1 + 1 == s => {
                    last.1 = end;
                }
                _ => iv.push((s, end, e.2.class_id)),
            }
        }
        let next = overlay(&iv, &region[i..j], max, &mut new_class)?;
        out.extend(tiling::<K>(&next, dir));
        at = b;
    }
    out.extend_from_slice(&run[at..]);
    let run_now = &out[r0..];
    if let (Some(f), Some(l)) = (run_now.first(), run_now.last())
        && span(f).0 == 0
        && span(l).1 == max
    {
        // Perhaps the whole space: the compiler would elide its most
        // frequent class (`peerdefault`), which needs the whole list.
        return Ok(None);
    }
    out.extend_from_slice(&list[r1..]);
    Ok(Some(out))
}

/// The classes of one direction's entries of one family in the order
/// their addresses first appear (ascending addresses; an elided default
/// class where the other entries leave a gap). None: not in address order.
fn classes_in_order<K: PeerKey>(
    list: &[LpmEntry<K, PeerClass>],
    dir: u8,
    mut seen: impl FnMut(u32) -> bool,
) -> Option<()> {
    let max = if K::BITS == 128 {
        u128::MAX
    } else {
        (1u128 << K::BITS) - 1
    };
    let mine = || list.iter().filter(|e| e.1.dir() == dir);
    let default = mine()
        .find(|e| e.0 <= PEER_KEY_HEADER_BITS)
        .map(|e| e.2.class_id);
    let mut next: Option<u128> = Some(0);
    for e in mine().filter(|e| e.0 > PEER_KEY_HEADER_BITS) {
        let (s, end) = span(e);
        match next {
            Some(n) if s >= n => {
                if s > n
                    && let Some(d) = default
                    && seen(d)
                {
                    return Some(());
                }
            }
            _ => return None,
        }
        if seen(e.2.class_id) {
            return Some(());
        }
        next = end.checked_add(1);
    }
    if let (Some(d), Some(n)) = (default, next)
        && n <= max
    {
        seen(d);
    }
    Some(())
}

impl SetIndex {
    /// The rules of direction `dir` that name `set`, checked for a removal
    /// of `region` (family `v6`): a rule that also reaches these addresses
    /// another way keeps them, which only the full path decides (Err).
    fn named_rules(
        &self,
        live: &Overrides,
        set: &str,
        dir: u8,
        v6: bool,
        region: &[(u128, u128)],
        add: bool,
    ) -> Result<Vec<u32>, String> {
        let named: Vec<&SetRefs> = self
            .refs
            .iter()
            .filter(|r| r.dir == dir && r.sets.iter().any(|s| s == set))
            .collect();
        if !add {
            for r in &named {
                let mut other = Vec::new();
                for s in r.sets.iter().filter(|s| *s != set) {
                    other.extend(family(&self.ranges_of(s, live)?, v6));
                }
                for item in &r.other {
                    let range = if item == "any" {
                        if v6 {
                            AddrRange::any_v6()
                        } else {
                            AddrRange::any_v4()
                        }
                    } else {
                        parse_item(item).map_err(|e| format!("{item}: {e}"))?
                    };
                    other.extend(family(&[range], v6));
                }
                if intersects(&normalize(other), region) {
                    return Err(format!(
                        "rule {} also names the removed addresses another way",
                        r.rule
                    ));
                }
            }
        }
        Ok(named.iter().map(|r| r.rule).collect())
    }

    /// The class an address of class `class` gets when the rules `a` (of
    /// direction `dir`) gain (`add`) or lose it; Err when the policy has
    /// no such class (the full path makes it).
    fn class_step<'s>(
        by_set: &'s ByRules<'_>,
        rules_of: &'s RulesOf<'_>,
        dir: u8,
        a: &'s [u32],
        add: bool,
    ) -> impl FnMut(Option<u32>) -> Result<Option<u32>, String> + 's {
        move |class: Option<u32>| {
            let mut rules: Vec<u32> = match class {
                Some(c) => rules_of
                    .get(&c)
                    .ok_or_else(|| format!("class {c} is not in the index"))?
                    .to_vec(),
                None => Vec::new(),
            };
            if add {
                rules.extend(a);
                rules.sort_unstable();
                rules.dedup();
            } else {
                rules.retain(|r| !a.contains(r));
            }
            if rules.is_empty() {
                return Ok(None);
            }
            by_set
                .get(&(dir, &rules[..]))
                .copied()
                .map(Some)
                .ok_or_else(|| "the edit needs an address class the policy has not".into())
        }
    }

    fn tables(&self) -> (ByRules<'_>, RulesOf<'_>) {
        let cap = self.classes.len();
        let mut by_set: ByRules<'_> =
            FastMap::with_capacity_and_hasher(cap, std::hash::BuildHasherDefault::default());
        let mut rules_of: RulesOf<'_> =
            FastMap::with_capacity_and_hasher(cap, std::hash::BuildHasherDefault::default());
        for c in &self.classes {
            by_set.insert((c.dir, &c.rules), c.id);
            rules_of.insert(c.id, &c.rules);
        }
        (by_set, rules_of)
    }

    /// Like [`SetIndex::edit`], working on the changed region only: the
    /// addresses `region` (IPv4 as u128, IPv6; each normalized) gain
    /// (`add`) or lose the rules naming `set`. For an add the region may
    /// be the members added as given (addresses the set already covered
    /// keep their class); for a removal it must be the addresses no other
    /// member of the set covers. Only the maximal intervals that overlap
    /// the region (found by binary search) and their neighbours are
    /// recomputed; the other entries are copied. `Ok(None)`: the maps are
    /// not in the form this needs (a header-only default class in an
    /// edited direction, class ids a fresh compile would number
    /// differently); the caller then uses [`SetIndex::edit`]. Err: the full
    /// path, as for [`SetIndex::edit`]. `live`: as for [`SetIndex::edit`].
    pub fn edit_region(
        &self,
        live: &Overrides,
        snap: &Snapshot,
        set: &str,
        region: [Vec<(u128, u128)>; 2],
        add: bool,
    ) -> Result<Option<Edited>, String> {
        let (by_set, rules_of) = self.tables();
        // Every class of the maps in force is in the index (ids are small:
        // a table, not a hash per entry).
        let top = self
            .classes
            .iter()
            .map(|c| c.id)
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut known = vec![false; top];
        for c in &self.classes {
            known[c.id as usize] = true;
        }
        let is_known = |c: u32| known.get(c as usize).copied().unwrap_or(false);
        if let Some(c) = snap
            .peers_v4
            .iter()
            .map(|e| e.2.class_id)
            .chain(snap.peers_v6.iter().map(|e| e.2.class_id))
            .find(|&c| !is_known(c))
        {
            return Err(format!(
                "class {c} of the maps in force is not in the index"
            ));
        }
        let dirs = Direction::ALL.map(Direction::key_byte);
        let rank = |d: u8| dirs.iter().position(|x| *x == d).unwrap_or(dirs.len());
        let mut v4 = std::borrow::Cow::Borrowed(&snap.peers_v4);
        let mut v6l = std::borrow::Cow::Borrowed(&snap.peers_v6);
        for (fi, v6) in [false, true].into_iter().enumerate() {
            let r = &region[fi];
            if r.is_empty() {
                continue;
            }
            for dir in dirs {
                let a = self.named_rules(live, set, dir, v6, r, add)?;
                if a.is_empty() {
                    continue;
                }
                let step = Self::class_step(&by_set, &rules_of, dir, &a, add);
                if v6 {
                    let Some(l) = splice_region(&v6l, dir, rank, r, step)? else {
                        return Ok(None);
                    };
                    v6l = std::borrow::Cow::Owned(l);
                } else {
                    let Some(l) = splice_region(&v4, dir, rank, r, step)? else {
                        return Ok(None);
                    };
                    v4 = std::borrow::Cow::Owned(l);
                }
            }
        }
        // Class ids as a fresh compile numbers them (first appearance):
        // taken only when that is the numbering in force.
        let mut order: Vec<u32> = Vec::with_capacity(self.classes.len());
        let mut seen = vec![false; top];
        let total = self.classes.len();
        for dir in dirs {
            let mut see = |c: u32| {
                if let Some(s) = seen.get_mut(c as usize)
                    && !*s
                {
                    *s = true;
                    order.push(c);
                }
                order.len() == total
            };
            if classes_in_order(&v4, dir, &mut see).is_none()
                || classes_in_order(&v6l, dir, &mut see).is_none()
            {
                return Ok(None);
            }
        }
        if order.iter().enumerate().any(|(n, &c)| n as u32 != c) {
            return Ok(None);
        }
        let present = |c: u32| seen.get(c as usize).copied().unwrap_or(false);
        Ok(Some(Edited {
            peers_v4: v4.into_owned(),
            peers_v6: v6l.into_owned(),
            ports: snap
                .ports
                .iter()
                .filter(|(_, k, _)| present(u32::from_be_bytes(k.class_be)))
                .copied()
                .collect(),
            classes: self
                .classes
                .iter()
                .filter(|c| present(c.id))
                .cloned()
                .collect(),
            region,
        }))
    }
}

/// The region of a set edit, per family (IPv4 as u128, IPv6), normalized:
/// for an add (`current` None), the members added; for a removal, the
/// addresses of the removed members that no member left covers (`current`:
/// the set's members before the edit as text, and which of them the edit
/// removes). One pass: a member is parsed (a plain dotted quad without the
/// general parser) and kept only if it overlaps a removed one; only those
/// are looked up among the removed.
pub fn edit_region_of<'t>(
    members: &[AddrRange],
    current: Option<(impl Iterator<Item = &'t str>, impl Fn(&str) -> bool)>,
) -> Result<[Vec<(u128, u128)>; 2], String> {
    let changed = [false, true].map(|v6| normalize(family(members, v6)));
    let Some((current, removed)) = current else {
        return Ok(changed);
    };
    let mut cover: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
    // The span of each family's removed addresses: most members are
    // outside it and need no search.
    let span = changed
        .each_ref()
        .map(|c| c.first().zip(c.last()).map(|(f, l)| (f.0, l.1)));
    for text in current {
        let range = match fast_v4(text) {
            Some(a) => AddrRange::V4 { start: a, end: a },
            None => parse_item(text).map_err(|e| format!("{text}: {e}"))?,
        };
        let (fi, s, e) = match range {
            AddrRange::V4 { start, end } => (0, u128::from(start), u128::from(end)),
            AddrRange::V6 { start, end } => (1, start, end),
        };
        if !span[fi].is_some_and(|(lo, hi)| s <= hi && e >= lo) {
            continue;
        }
        let ch = &changed[fi];
        let i = ch.partition_point(|r| r.1 < s);
        if i < ch.len() && ch[i].0 <= e && !removed(text) {
            cover[fi].push((s, e));
        }
    }
    Ok([0, 1].map(|fi| subtract(&changed[fi], &normalize(std::mem::take(&mut cover[fi])))))
}

/// A dotted-quad IPv4 address without anything else (the common member),
/// parsed without the general parser; None for anything else.
fn fast_v4(t: &str) -> Option<u32> {
    let b = t.as_bytes();
    if b.len() < 7 || b.len() > 15 {
        return None;
    }
    let (mut out, mut part, mut digits, mut dots) = (0u32, 0u32, 0, 0);
    for &c in b {
        match c {
            b'0'..=b'9' => {
                // No leading zeros (the general parser refuses them too).
                if digits == 1 && part == 0 {
                    return None;
                }
                part = part * 10 + u32::from(c - b'0');
                digits += 1;
                if part > 255 {
                    return None;
                }
            }
            b'.' if digits > 0 && dots < 3 => {
                out = out << 8 | part;
                (part, digits) = (0, 0);
                dots += 1;
            }
            _ => return None,
        }
    }
    (dots == 3 && digits > 0).then_some(out << 8 | part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_sets() {
        assert_eq!(normalize(vec![(5, 9), (0, 3), (4, 4)]), vec![(0, 9)]);
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (50, 200)]),
            vec![(0, 9), (21, 49)]
        );
        assert_eq!(subtract(&[(0, u128::MAX)], &[(0, u128::MAX)]), vec![]);
        assert!(intersects(&[(0, 5)], &[(5, 9)]));
        assert!(!intersects(&[(0, 4)], &[(5, 9)]));
        assert_eq!(peer_items("[a, 10.0.0.1]"), vec!["a", "10.0.0.1"]);
        assert_eq!(peer_items("any"), vec!["any"]);
    }

    #[test]
    fn overlay_cuts_and_merges() {
        let old = vec![(0, 9, 1), (20, 29, 2)];
        let got = overlay(&old, &[(5, 24)], 100, |c| Ok(Some(c.map_or(3, |c| c + 10)))).unwrap();
        assert_eq!(
            got,
            vec![
                (0, 4, 1),
                (5, 9, 11),
                (10, 19, 3),
                (20, 24, 12),
                (25, 29, 2)
            ]
        );
        let merged = overlay(&old, &[(10, 19)], 100, |_| Ok(Some(1))).unwrap();
        assert_eq!(merged, vec![(0, 19, 1), (20, 29, 2)]);
    }

    const POLICY: &str = r#"
version = 1
[sets]
a = ["10.0.0.0/28", "fd00:1::/64"]
b = ["10.0.1.0/24"]
c = ["10.0.0.8/29", "10.0.2.0/25"]
[defaults]
ingress = "drop"
egress = "drop"
[[base.ingress]]
from = "a"
tcp = [22]
[roles.web]
hosts = "any"
[[roles.web.ingress]]
from = ["b", "c"]
tcp = [80, 443]
[[roles.web.ingress]]
from = "c"
udp = ["1000-1100"]
[[roles.web.ingress]]
from = ["b", "10.0.5.0/24"]
tcp = [8080]
[[roles.web.egress]]
to = "a"
proto = "any"
[[roles.web.egress]]
to = ["b", "10.9.0.0/16"]
tcp = [5432]
"#;

    fn compiled(sets: &BTreeMap<String, Vec<String>>) -> (Policy, Compiled) {
        let parsed: BTreeMap<String, Vec<AddrRange>> = sets
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter().map(|m| parse_item(m).unwrap()).collect(),
                )
            })
            .collect();
        let p = crate::policy::parse::parse_str_with_sets(POLICY, "t.toml", &parsed).unwrap();
        let c = crate::policy::compile::compile(
            &p,
            &["web".to_string()],
            None,
            0,
            1,
            crate::policy::compile::Capacity::default(),
        )
        .unwrap();
        (p, c)
    }

    /// The compiler-level differential test of the fast path: after every
    /// set edit of a random sequence that the index takes, its maps equal a
    /// fresh compile of the edited policy (class ids included); edits it
    /// declines are compiled, and the next index comes from that compile.
    #[test]
    fn index_edits_equal_a_fresh_compile() {
        let mut fast = 0;
        let mut declined = 0;
        for seed in 1..=60u64 {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut below = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let (p, c) = compiled(&sets);
            let mut idx = SetIndex::build(&p, "t.toml", 0, &sets, &[], &c, 1);
            let mut snap = Snapshot::of(&c, 1);
            for _ in 0..30 {
                let name = ["a", "b", "c"][below(3) as usize].to_string();
                let old_text = sets.get(&name).or(idx.sets.get(&name)).cloned().unwrap();
                let mut next_text = old_text.clone();
                let add = next_text.is_empty() || below(3) != 0;
                if add {
                    let m = match below(5) {
                        0 => format!("10.0.{}.{}", below(6), below(256)),
                        1 => format!("10.0.{}.0/{}", below(6), 24 + below(9)),
                        2 => format!("fd00:1::{:x}", below(4096)),
                        3 => format!("10.7.{}.{}", below(4), below(256)),
                        _ => format!("10.0.3.{}-10.0.3.{}", below(100), 100 + below(100)),
                    };
                    if next_text.contains(&m) {
                        continue;
                    }
                    next_text.push(m);
                } else {
                    next_text.remove(below(next_text.len() as u64) as usize);
                }
                let parse = |t: &[String]| -> Vec<AddrRange> {
                    t.iter().map(|m| parse_item(m).unwrap()).collect()
                };
                sets.insert(name.clone(), next_text.clone());
                let (p, fresh) = compiled(&sets);
                if let Ok(e) = idx.edit(&sets, &snap, &name, &parse(&old_text), &parse(&next_text))
                {
                    fast += 1;
                    let got = Snapshot {
                        generation: fresh.config.generation,
                        map_id: 1,
                        peers_v4: e.peers_v4,
                        peers_v6: e.peers_v6,
                        ports: e.ports,
                    };
                    assert_eq!(
                        got.clone().sorted(),
                        Snapshot::of(&fresh, 1).sorted(),
                        "seed {seed}: {name} {old_text:?} -> {next_text:?}"
                    );
                    assert_eq!(e.classes, fresh.class_rules, "seed {seed}: classes");
                    snap = got;
                    idx.classes = e.classes;
                } else {
                    declined += 1;
                    idx = SetIndex::build(&p, "t.toml", 0, &sets, &[], &fresh, 1);
                    snap = Snapshot::of(&fresh, 1);
                }
            }
        }
        assert!(
            fast > 300 && declined > 50,
            "fast {fast}, declined {declined}"
        );
    }

    /// The same differential test for [`SetIndex::edit_region`] (the
    /// changed region only, the region from [`edit_region_of`]): whenever
    /// it takes an edit, its maps and classes equal a fresh compile's; it
    /// must take most of them, and decline (Err) exactly when the whole
    /// edit declines.
    #[test]
    fn region_edits_equal_a_fresh_compile() {
        let (mut local, mut whole, mut declined) = (0, 0, 0);
        for seed in 1..=80u64 {
            let mut rng = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            let mut below = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let (pol, comp) = compiled(&sets);
            let mut idx = SetIndex::build(&pol, "t.toml", 0, &sets, &[], &comp, 1);
            let mut snap = Snapshot::of(&comp, 1);
            for _ in 0..30 {
                let name = ["a", "b", "c"][below(3) as usize].to_string();
                let old_text = sets.get(&name).or(idx.sets.get(&name)).cloned().unwrap();
                let mut next_text = old_text.clone();
                let add = next_text.is_empty() || below(3) != 0;
                let mut changed = Vec::new();
                let tries = 1 + below(3);
                for _ in 0..tries {
                    if add {
                        let m = match below(6) {
                            0 => format!("10.0.{}.{}", below(6), below(256)),
                            1 => format!("10.0.{}.0/{}", below(6), 24 + below(9)),
                            2 => format!("fd00:1::{:x}", below(4096)),
                            3 => format!("10.7.{}.{}", below(4), below(256)),
                            4 => format!("10.9.{}.{}", below(2), below(256)),
                            _ => format!("10.0.3.{}-10.0.3.{}", below(100), 100 + below(100)),
                        };
                        if next_text.contains(&m) || changed.contains(&m) {
                            continue;
                        }
                        changed.push(m.clone());
                        next_text.push(m);
                    } else if !next_text.is_empty() {
                        changed.push(next_text.remove(below(next_text.len() as u64) as usize));
                    }
                }
                if changed.is_empty() {
                    continue;
                }
                let parse = |t: &[String]| -> Vec<AddrRange> {
                    t.iter().map(|m| parse_item(m).unwrap()).collect()
                };
                sets.insert(name.clone(), next_text.clone());
                let (p, fresh) = compiled(&sets);
                let region = edit_region_of(
                    &parse(&changed),
                    (!add).then(|| {
                        (old_text.iter().map(String::as_str), |t: &str| {
                            changed.iter().any(|c| c == t)
                        })
                    }),
                )
                .unwrap();
                let by_whole = idx.edit(&sets, &snap, &name, &parse(&old_text), &parse(&next_text));
                let e = match idx.edit_region(&sets, &snap, &name, region, add) {
                    Ok(Some(e)) => {
                        local += 1;
                        assert!(by_whole.is_ok(), "seed {seed}: the whole edit declined");
                        e
                    }
                    Ok(None) => {
                        whole += 1;
                        by_whole.unwrap()
                    }
                    Err(_) => {
                        assert!(by_whole.is_err(), "seed {seed}: the region edit declined");
                        declined += 1;
                        idx = SetIndex::build(&p, "t.toml", 0, &sets, &[], &fresh, 1);
                        snap = Snapshot::of(&fresh, 1);
                        continue;
                    }
                };
                let got = Snapshot {
                    generation: fresh.config.generation,
                    map_id: 1,
                    peers_v4: e.peers_v4,
                    peers_v6: e.peers_v6,
                    ports: e.ports,
                };
                assert_eq!(
                    got.clone().sorted(),
                    Snapshot::of(&fresh, 1).sorted(),
                    "seed {seed}: {name} {old_text:?} -> {next_text:?}"
                );
                assert_eq!(e.classes, fresh.class_rules, "seed {seed}: classes");
                snap = got;
                idx.classes = e.classes;
            }
        }
        eprintln!("local {local}, whole {whole}, declined {declined}");
        assert!(
            local > 400 && declined > 30,
            "local {local}, whole {whole}, declined {declined}"
        );
    }

    #[test]
    fn fast_hash_streams_and_tells_bytes_apart() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = hash_policy(&bytes);
        for cut in [0, 1, 7, 8, 9, 500, 999, 1000] {
            let mut h = FastHash::new();
            h.write(&bytes[..cut]);
            h.write(&bytes[cut..]);
            assert_eq!(h.finish(), whole, "cut at {cut}");
        }
        let mut one = FastHash::new();
        for b in &bytes {
            one.write(std::slice::from_ref(b));
        }
        assert_eq!(one.finish(), whole);
        let mut other = bytes.clone();
        other[500] ^= 1;
        assert_ne!(hash_policy(&other), whole);
        assert_ne!(hash_policy(&bytes[..999]), whole);
        assert_ne!(hash_policy(&[0u8; 8]), hash_policy(&[0u8; 16]));
    }

    #[test]
    fn fast_v4_agrees_with_the_parser() {
        for t in [
            "10.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "1.2.3.256",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "1.2.3.4/32",
            "10.0.0.0/8",
            "::1",
            "1.2.3.4-1.2.3.5",
            "",
        ] {
            if let Some(a) = fast_v4(t) {
                assert_eq!(
                    parse_item(t).ok(),
                    Some(AddrRange::V4 { start: a, end: a }),
                    "{t}"
                );
            } else if let Ok(AddrRange::V4 { start, end }) = parse_item(t) {
                assert!(start != end || t.contains('/'), "{t} parses to one address");
            }
        }
    }

    #[test]
    fn a_torn_or_altered_index_is_refused() {
        let idx = SetIndex {
            generation: 3,
            map_id: 7,
            policy: "/p.toml".into(),
            policy_hash: 1,
            overrides_hash: 2,
            roles: vec!["web".into()],
            sets: BTreeMap::from([("a".to_string(), vec!["10.0.0.1".to_string()])]),
            refs: Vec::new(),
            classes: Vec::new(),
        };
        let bytes = idx.to_bytes();
        assert_eq!(SetIndex::from_bytes(&bytes), Some(idx));
        assert_eq!(SetIndex::from_bytes(&bytes[..bytes.len() - 1]), None);
        let altered = String::from_utf8(bytes)
            .unwrap()
            .replace("10.0.0.1", "10.0.0.2");
        assert_eq!(SetIndex::from_bytes(altered.as_bytes()), None);
    }
}
