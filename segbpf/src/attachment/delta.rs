//! Incremental policy writes: the difference between the compiled maps in
//! force and the next ones, and the record of what a policy slot holds.
//!
//! A swap ([`crate::swap`]) keeps both policy slots equal when it can: the
//! slot in force holds generation G, and the other slot a *mirror* of it
//! (the same entries with the other slot bit, its `SEG_CONFIG` record
//! carrying generation G). The next policy is then written as a
//! [`Delta`]: only the entries that change, into the mirror, where no
//! packet looks; one atomic `SEG_ACTIVE` write puts it in force whole; after
//! the grace period the same delta turns the old slot into the new mirror.
//!
//! What the slot in force holds is known from a [`Snapshot`] file beside
//! the state (`IFACE.maps`), trusted only when the kernel agrees: its
//! generation is the one in force (`SEG_CONFIG`) and it names the kernel id
//! of the peer trie it was written for (a new attachment has new maps). A
//! slot is being edited while its `SEG_CONFIG` generation is 0; it is a
//! mirror only once its record carries the generation in force. Anything
//! else (no snapshot, another generation, a swap killed half way) falls
//! back to emptying the slot and writing the whole policy, as before.

use std::{collections::HashMap, hash::Hash, io::Write as _, path::Path};

use bytemuck::{Pod, Zeroable};
use segbpf_common::{PeerClass, PeerKeyV4, PeerKeyV6, PortKey, RuleRef};

use crate::policy::compile::{Compiled, FastMap, LpmEntry};

/// The entries of one trie that change: keys to delete, entries to write.
/// Keys carry slot 0; [`crate::attachment::maps::PolicyMaps::apply_delta`] sets the slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrieDelta<K, V> {
    /// Keys (prefix length, key data) the next policy does not have.
    pub delete: Vec<(u32, K)>,
    /// Entries the next policy adds or whose value changes.
    pub put: Vec<LpmEntry<K, V>>,
}

impl<K, V> TrieDelta<K, V> {
    /// Entries written or deleted.
    pub fn len(&self) -> usize {
        self.delete.len() + self.put.len()
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What changes between two compiled policies, trie by trie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// `SEG_PEER_V4`.
    pub v4: TrieDelta<PeerKeyV4, PeerClass>,
    /// `SEG_PEER_V6`.
    pub v6: TrieDelta<PeerKeyV6, PeerClass>,
    /// `SEG_PORTS`.
    pub ports: TrieDelta<PortKey, RuleRef>,
}

impl Delta {
    /// Map entries written or deleted (the `SEG_CONFIG` record aside).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.ports.len()
    }

    /// Whether no trie entry changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key with its slot bit cleared (keys of both slots compare equal).
trait Slotted: Copy + Eq + Hash {
    fn with_slot(self, slot: u8) -> Self;
}

impl Slotted for PeerKeyV4 {
    fn with_slot(mut self, slot: u8) -> Self {
        self.slot = slot;
        self
    }
}

impl Slotted for PeerKeyV6 {
    fn with_slot(mut self, slot: u8) -> Self {
        self.slot = slot;
        self
    }
}

impl Slotted for PortKey {
    fn with_slot(mut self, slot: u8) -> Self {
        self.slot = slot;
        self
    }
}

/// The entries with the slot of every key set to `slot`.
fn with_slot<K: Slotted, V: Copy>(entries: &[LpmEntry<K, V>], slot: u8) -> Vec<LpmEntry<K, V>> {
    entries
        .iter()
        .map(|&(l, k, v)| (l, k.with_slot(slot), v))
        .collect()
}

/// `c`'s entries with their keys moved to `slot` (the mirror of a policy
/// written for the other slot).
pub fn moved(c: &Compiled, slot: u8) -> Compiled {
    let mut m = c.clone();
    m.peers_v4 = with_slot(&c.peers_v4, slot);
    m.peers_v6 = with_slot(&c.peers_v6, slot);
    m.ports = with_slot(&c.ports, slot);
    m.config.active_slot = slot;
    m
}

/// Like [`moved`], taking `c` (no copy of its entries and rules).
pub fn into_slot(mut c: Compiled, slot: u8) -> Compiled {
    for (_, k, _) in &mut c.peers_v4 {
        *k = k.with_slot(slot);
    }
    for (_, k, _) in &mut c.peers_v6 {
        *k = k.with_slot(slot);
    }
    for (_, k, _) in &mut c.ports {
        *k = k.with_slot(slot);
    }
    c.config.active_slot = slot;
    c
}

/// The entries at the two ends of `old` and `new` that are the same at
/// the same positions (slots ignored): how many lead, how many trail.
/// Keys are unique within a trie, so an entry equal at the same position
/// is in both with the same value and belongs to no delta; and a key at
/// such a position is at no other position of either side.
fn common_ends<K: Slotted, V: Copy + Eq>(
    old: &[LpmEntry<K, V>],
    new: &[LpmEntry<K, V>],
) -> (usize, usize) {
    let same = |a: &LpmEntry<K, V>, b: &LpmEntry<K, V>| {
        a.0 == b.0 && a.2 == b.2 && a.1.with_slot(0) == b.1.with_slot(0)
    };
    let lead = old.iter().zip(new).take_while(|(a, b)| same(a, b)).count();
    let trail = old[lead..]
        .iter()
        .rev()
        .zip(new[lead..].iter().rev())
        .take_while(|(a, b)| same(a, b))
        .count();
    (lead, trail)
}

fn diff_trie<K: Slotted, V: Copy + Eq>(
    old: &[LpmEntry<K, V>],
    new: &[LpmEntry<K, V>],
) -> TrieDelta<K, V> {
    // Compilers and the set index emit entries in address order, so an
    // edit changes a run in the middle: only that run is hashed.
    let (lead, trail) = common_ends(old, new);
    let old = &old[lead..old.len() - trail];
    let new = &new[lead..new.len() - trail];
    let before: FastMap<(u32, K), V> = old
        .iter()
        .map(|&(l, k, v)| ((l, k.with_slot(0)), v))
        .collect();
    let mut after: FastMap<(u32, K), V> =
        FastMap::with_capacity_and_hasher(new.len(), std::hash::BuildHasherDefault::default());
    let mut put = Vec::new();
    for &(l, k, v) in new {
        let key = (l, k.with_slot(0));
        after.insert(key, v);
        if before.get(&key) != Some(&v) {
            put.push((l, key.1, v));
        }
    }
    // In the order of `old`, so a delta is the same from run to run.
    let delete = old
        .iter()
        .map(|&(l, k, _)| (l, k.with_slot(0)))
        .filter(|key| !after.contains_key(key))
        .collect();
    TrieDelta { delete, put }
}

/// The entries to delete and write to turn a slot holding `old` into one
/// holding `new` (slots of the keys are ignored).
pub fn diff(old: &Snapshot, new: &Compiled) -> Delta {
    Delta {
        v4: diff_trie(&old.peers_v4, &new.peers_v4),
        v6: diff_trie(&old.peers_v6, &new.peers_v6),
        ports: diff_trie(&old.ports, &new.ports),
    }
}

/// What one policy slot holds: the compiled tries of a generation, keys at
/// slot 0, and the kernel id of the peer trie they were written to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Generation of the policy.
    pub generation: u64,
    /// Kernel id of the attachment's `SEG_PEER_V4` map.
    pub map_id: u32,
    /// `SEG_PEER_V4` entries.
    pub peers_v4: Vec<LpmEntry<PeerKeyV4, PeerClass>>,
    /// `SEG_PEER_V6` entries.
    pub peers_v6: Vec<LpmEntry<PeerKeyV6, PeerClass>>,
    /// `SEG_PORTS` entries.
    pub ports: Vec<LpmEntry<PortKey, RuleRef>>,
}

const MAGIC: &[u8; 8] = b"SEGMAPS1";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    generation: u64,
    map_id: u32,
    v4: u32,
    v6: u32,
    ports: u32,
}
const _: () = assert!(core::mem::size_of::<Header>() == 32);

fn put_entries<K: Pod + Slotted, V: Pod>(out: &mut Vec<u8>, entries: &[LpmEntry<K, V>]) {
    out.reserve(entries.len() * (4 + size_of::<K>() + size_of::<V>()));
    for (l, k, v) in entries {
        out.extend_from_slice(&l.to_le_bytes());
        out.extend_from_slice(bytemuck::bytes_of(&k.with_slot(0)));
        out.extend_from_slice(bytemuck::bytes_of(v));
    }
}

/// The snapshot file's bytes of the tries of `c` (keys written at slot 0)
/// as written to the maps whose peer trie has kernel id `map_id`: what
/// `Snapshot::of(c, map_id).to_bytes()` gives, without the copy.
pub fn snapshot_bytes(c: &Compiled, map_id: u32) -> Vec<u8> {
    let header = Header {
        magic: *MAGIC,
        generation: c.config.generation,
        map_id,
        v4: c.peers_v4.len() as u32,
        v6: c.peers_v6.len() as u32,
        ports: c.ports.len() as u32,
    };
    let mut out = bytemuck::bytes_of(&header).to_vec();
    put_entries(&mut out, &c.peers_v4);
    put_entries(&mut out, &c.peers_v6);
    put_entries(&mut out, &c.ports);
    out
}

fn take_entries<K: Pod, V: Pod>(bytes: &mut &[u8], n: u32) -> Option<Vec<LpmEntry<K, V>>> {
    let size = 4 + size_of::<K>() + size_of::<V>();
    let total = (n as usize).checked_mul(size)?;
    if bytes.len() < total {
        return None;
    }
    let (mine, rest) = bytes.split_at(total);
    *bytes = rest;
    Some(
        mine.chunks_exact(size)
            .map(|c| {
                let l = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let k: K = bytemuck::pod_read_unaligned(&c[4..4 + size_of::<K>()]);
                let v: V = bytemuck::pod_read_unaligned(&c[4 + size_of::<K>()..]);
                (l, k, v)
            })
            .collect(),
    )
}

impl Snapshot {
    /// The snapshot of `c` as written to the maps whose peer trie has
    /// kernel id `map_id`.
    pub fn of(c: &Compiled, map_id: u32) -> Self {
        Snapshot {
            generation: c.config.generation,
            map_id,
            peers_v4: with_slot(&c.peers_v4, 0),
            peers_v6: with_slot(&c.peers_v6, 0),
            ports: with_slot(&c.ports, 0),
        }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            magic: *MAGIC,
            generation: self.generation,
            map_id: self.map_id,
            v4: self.peers_v4.len() as u32,
            v6: self.peers_v6.len() as u32,
            ports: self.ports.len() as u32,
        };
        let mut out = bytemuck::bytes_of(&header).to_vec();
        put_entries(&mut out, &self.peers_v4);
        put_entries(&mut out, &self.peers_v6);
        put_entries(&mut out, &self.ports);
        out
    }

    /// Parses a file's bytes; None unless they are a whole snapshot.
    pub fn from_bytes(mut bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Header>() {
            return None;
        }
        let header: Header = bytemuck::pod_read_unaligned(&bytes[..size_of::<Header>()]);
        if header.magic != *MAGIC {
            return None;
        }
        bytes = &bytes[size_of::<Header>()..];
        let snap = Snapshot {
            generation: header.generation,
            map_id: header.map_id,
            peers_v4: take_entries(&mut bytes, header.v4)?,
            peers_v6: take_entries(&mut bytes, header.v6)?,
            ports: take_entries(&mut bytes, header.ports)?,
        };
        bytes.is_empty().then_some(snap)
    }

    /// Reads the snapshot at `path`, if there is a whole one.
    pub fn read(path: &Path) -> Option<Self> {
        Self::from_bytes(&std::fs::read(path).ok()?)
    }

    /// Writes the snapshot to `path` atomically (mode 0600).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_bytes(path, &self.to_bytes())
    }
}

/// Writes snapshot bytes ([`Snapshot::to_bytes`], [`snapshot_bytes`]) to
/// `path` atomically (mode 0600).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("maps.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
    }
    std::fs::rename(&tmp, path)
}

impl Snapshot {
    /// Applies `d` to the snapshot (what the kernel does to a slot), for
    /// tests that check a chain of deltas against a fresh compile.
    pub fn apply(&mut self, d: &Delta) {
        fn one<K: Slotted, V: Copy>(entries: &mut Vec<LpmEntry<K, V>>, d: &TrieDelta<K, V>) {
            let gone: std::collections::HashSet<(u32, K)> = d.delete.iter().copied().collect();
            let mut by_key: HashMap<(u32, K), V> = entries
                .iter()
                .map(|&(l, k, v)| ((l, k.with_slot(0)), v))
                .filter(|(key, _)| !gone.contains(key))
                .collect();
            for &(l, k, v) in &d.put {
                by_key.insert((l, k.with_slot(0)), v);
            }
            *entries = by_key.into_iter().map(|((l, k), v)| (l, k, v)).collect();
        }
        one(&mut self.peers_v4, &d.v4);
        one(&mut self.peers_v6, &d.v6);
        one(&mut self.ports, &d.ports);
    }

    /// The entries sorted, for comparing two snapshots as sets.
    #[must_use]
    pub fn sorted(mut self) -> Self {
        self.peers_v4
            .sort_by_key(|&(l, k, _)| (l, k.dir, k.addr_be));
        self.peers_v6
            .sort_by_key(|&(l, k, _)| (l, k.dir, k.addr_be));
        self.ports
            .sort_by_key(|&(l, k, _)| (l, k.class_be, k.proto, k.port_be));
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{
        AddrRange, Policy,
        addr::parse_item,
        compile::{Capacity, carry_counters, compile},
        parse::parse_str_with_sets,
    };

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
[[roles.web.egress]]
to = "a"
proto = "any"
[[roles.web.egress]]
to = ["b", "10.9.0.0/16"]
tcp = [5432]
"#;

    /// A small xorshift generator (deterministic, no dependency).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn member(rng: &mut Rng) -> String {
        match rng.below(4) {
            0 => format!("10.0.{}.{}", rng.below(4), rng.below(256)),
            1 => format!("10.0.{}.0/{}", rng.below(4), 24 + rng.below(9)),
            2 => format!("fd00:1::{:x}", rng.below(4096)),
            _ => {
                let lo = rng.below(200);
                format!("10.0.3.{lo}-10.0.3.{}", lo + rng.below(50))
            }
        }
    }

    fn compiled(
        sets: &BTreeMap<String, Vec<String>>,
        slot: u8,
        generation: u64,
        previous: &[crate::policy::compile::RuleInfo],
    ) -> Compiled {
        let parsed: BTreeMap<String, Vec<AddrRange>> = sets
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter().map(|m| parse_item(m).unwrap()).collect(),
                )
            })
            .collect();
        let p: Policy = parse_str_with_sets(POLICY, "t.toml", &parsed).expect("parses");
        let roles = vec!["web".to_string()];
        let mut c = compile(&p, &roles, None, slot, generation, Capacity::default()).unwrap();
        carry_counters(&mut c, previous, 1024).unwrap();
        c
    }

    #[test]
    fn snapshots_round_trip_and_refuse_torn_files() {
        let sets = BTreeMap::new();
        let c = compiled(&sets, 1, 7, &[]);
        let s = Snapshot::of(&c, 42);
        assert!(s.peers_v4.iter().all(|(_, k, _)| k.slot == 0));
        let bytes = s.to_bytes();
        assert_eq!(Snapshot::from_bytes(&bytes), Some(s.clone()));
        // A truncated or extended file is no snapshot.
        assert_eq!(Snapshot::from_bytes(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Snapshot::from_bytes(&longer), None);
        assert_eq!(Snapshot::from_bytes(b"SEGMAPS0"), None);
    }

    #[test]
    fn an_unchanged_policy_has_an_empty_delta_and_one_member_a_small_one() {
        let sets = BTreeMap::new();
        let a = compiled(&sets, 0, 1, &[]);
        let b = compiled(&sets, 1, 2, &a.rules);
        assert!(diff(&Snapshot::of(&a, 1), &b).is_empty());
        let mut more = BTreeMap::new();
        more.insert(
            "b".to_string(),
            vec!["10.0.1.0/24".to_string(), "10.0.9.9".to_string()],
        );
        let c = compiled(&more, 0, 3, &b.rules);
        let d = diff(&Snapshot::of(&b, 1), &c);
        assert!(!d.is_empty() && d.len() <= 2, "{d:?}");
        assert!(d.ports.is_empty(), "no new class: {d:?}");
    }

    /// Trimming the common ends changes no delta: against the whole-trie
    /// diff, on tries edited in the middle, at the ends, reordered, with
    /// values changed in place and slots differing.
    #[test]
    fn trimmed_diff_equals_the_whole_diff() {
        fn whole(
            old: &[LpmEntry<PortKey, u32>],
            new: &[LpmEntry<PortKey, u32>],
        ) -> TrieDelta<PortKey, u32> {
            let put = new
                .iter()
                .filter(|&&(l, k, v)| {
                    !old.iter().any(|&(l2, k2, v2)| {
                        l2 == l && k2.with_slot(0) == k.with_slot(0) && v2 == v
                    })
                })
                .map(|&(l, k, v)| (l, k.with_slot(0), v))
                .collect();
            let delete = old
                .iter()
                .filter(|&&(l, k, _)| {
                    !new.iter()
                        .any(|&(l2, k2, _)| l2 == l && k2.with_slot(0) == k.with_slot(0))
                })
                .map(|&(l, k, _)| (l, k.with_slot(0)))
                .collect();
            TrieDelta { delete, put }
        }
        let key = |i: u32, slot: u8| {
            let mut k = PortKey::zeroed();
            k.class_be = i.to_be_bytes();
            k.with_slot(slot)
        };
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let n = rng.below(12) as u32;
            let old: Vec<LpmEntry<PortKey, u32>> = (0..n).map(|i| (40, key(i * 2, 0), i)).collect();
            let mut new: Vec<LpmEntry<PortKey, u32>> = old
                .iter()
                .map(|&(l, k, v)| (l, k.with_slot(1), v))
                .collect();
            for _ in 0..rng.below(4) {
                match rng.below(4) {
                    0 => new.insert(
                        rng.below(new.len() as u64 + 1) as usize,
                        (40, key(rng.below(40) as u32 * 2 + 1, 1), 7),
                    ),
                    1 if !new.is_empty() => drop(new.remove(rng.below(new.len() as u64) as usize)),
                    2 if !new.is_empty() => {
                        let i = rng.below(new.len() as u64) as usize;
                        new[i].2 += 100;
                    }
                    3 if new.len() > 1 => {
                        let i = rng.below(new.len() as u64) as usize;
                        let j = rng.below(new.len() as u64) as usize;
                        new.swap(i, j);
                    }
                    _ => {}
                }
            }
            new.dedup_by_key(|e| e.1.with_slot(0));
            let mut seen = std::collections::HashSet::new();
            new.retain(|e| seen.insert(e.1.with_slot(0)));
            let got = diff_trie(&old, &new);
            let TrieDelta { delete, put } = whole(&old, &new);
            assert_eq!(got.delete, delete, "seed {seed}: {old:?} -> {new:?}");
            assert_eq!(got.put, put, "seed {seed}: {old:?} -> {new:?}");
        }
    }

    /// The differential edit test over the compiler: after every edit of a
    /// random sequence (set edits, a member added that makes new classes,
    /// reloads back to the file), the slot that received only the deltas
    /// equals a fresh compile of the resulting policy.
    #[test]
    fn a_chain_of_deltas_equals_a_fresh_compile() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut sets: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut prev = compiled(&sets, 0, 1, &[]);
            let mut slot = Snapshot::of(&prev, 9);
            for step in 0..25u64 {
                if rng.below(6) == 0 {
                    sets.clear(); // reload: the file wins
                } else {
                    let name = ["a", "b", "c"][rng.below(3) as usize].to_string();
                    let file: Vec<String> = match name.as_str() {
                        "a" => vec!["10.0.0.0/28".into(), "fd00:1::/64".into()],
                        "b" => vec!["10.0.1.0/24".into()],
                        _ => vec!["10.0.0.8/29".into(), "10.0.2.0/25".into()],
                    };
                    let members = sets.entry(name).or_insert(file);
                    if rng.below(3) == 0 && !members.is_empty() {
                        let i = rng.below(members.len() as u64) as usize;
                        members.remove(i);
                    } else {
                        members.push(member(&mut rng));
                    }
                }
                let next = compiled(&sets, (step % 2) as u8, step + 2, &prev.rules);
                let d = diff(&slot, &next);
                slot.apply(&d);
                slot.generation = next.config.generation;
                // A fresh compile knows no counters: rule ids stand for
                // themselves. Map the slot's counter slots back to ids.
                let id_of: HashMap<u32, u32> =
                    next.rules.iter().map(|r| (r.counter, r.id)).collect();
                let mut seen = slot.clone();
                for (_, _, v) in &mut seen.ports {
                    v.rule_id = id_of[&v.rule_id];
                }
                let fresh = Snapshot::of(&compiled(&sets, 0, step + 2, &[]), 9);
                assert_eq!(
                    seen.sorted(),
                    fresh.sorted(),
                    "seed {seed} step {step}: sets {sets:?}"
                );
                prev = next;
            }
        }
    }
}
