//! Policy compiler: (policy, host roles, interface) -> kernel map contents.
//!
//! Design (Cilium-style address classes, see docs/architecture.md):
//! - For each direction, the address space of each family is cut into
//!   elementary intervals by every rule's peer ranges. Each interval's
//!   *class* is the set of rules whose peers contain it; equal sets share one
//!   class id. Maximal intervals of one class become minimal CIDRs in the
//!   peer trie, so the tries hold non-overlapping prefixes and one lookup
//!   finds the class.
//! - For each class, the port trie maps (class, protocol, port prefix) to
//!   the lowest rule id among the class's rules that allow that port. Port
//!   ranges become port prefixes; `proto = "any"` becomes a class-only
//!   prefix that every protocol and port falls back to.
//!
//! The kernel therefore does exactly two lookups per packet whatever the
//! number of rules, and the rule it finds is the lowest-id matching rule,
//! the same one the reference evaluator reports.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hash as _, Hasher},
};

use segbpf_common::{
    ACTION_ALLOW, ACTION_DROP, Config, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    MAX_RULES_PER_DIRECTION, PEER_KEY_HEADER_BITS, PORT_KEY_CLASS_BITS, PORT_KEY_PROTO_BITS,
    PeerClass, PeerKeyV4, PeerKeyV6, PortKey, RuleRef, ct_timeout,
};
use serde::{Deserialize, Serialize};

use crate::policy::{
    Action, AddrRange, Direction, Policy, PortRange, Rule, addr::range_to_prefixes, peerdefault,
};

/// A fast hasher for the compiler's own tables (address-class sets, map
/// keys), whose keys come from the policy, not from packets: the
/// multiply-rotate hash of rustc (FxHash) instead of SipHash, which cost a
/// tenth of a 10,000-rule compile.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u32(&mut self, w: u32) {
        self.write_u64(u64::from(w));
    }

    fn write_u8(&mut self, w: u8) {
        self.write_u64(u64::from(w));
    }

    fn write_usize(&mut self, w: usize) {
        self.write_u64(w as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Map capacities the compiled policy must fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `SEG_PEER_V4` max entries.
    pub peer_v4: u32,
    /// `SEG_PEER_V6` max entries.
    pub peer_v6: u32,
    /// `SEG_PORTS` max entries.
    pub ports: u32,
    /// `--ct-size`: the assured flows each family's connection table is
    /// sized for, with `segbpf_common::ct_new_entries(ct)` half-open ones
    /// (`segbpf_common::CtLayout::sets_for`).
    pub ct: u32,
    /// `SEG_FRAG` and `SEG_FRAG_NEW` max entries (each).
    pub frag: u32,
    /// `SEG_RULE_STATS` entries (rule ids must be below it).
    pub rule_stats: u32,
}

impl Capacity {
    /// The default capacities with per-rule counters sized for `policy`
    /// and room for reloads to grow it (twice its rules, at least 1,024).
    pub fn for_policy(policy: &Policy) -> Self {
        Capacity {
            rule_stats: (2 * policy.rules.len() as u32).max(1024),
            ..Capacity::default()
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            peer_v4: segbpf_common::DEFAULT_PEER_ENTRIES,
            peer_v6: segbpf_common::DEFAULT_PEER_ENTRIES,
            ports: segbpf_common::DEFAULT_PORT_ENTRIES,
            ct: segbpf_common::DEFAULT_CT_ENTRIES,
            frag: segbpf_common::DEFAULT_FRAG_ENTRIES,
            rule_stats: segbpf_common::DEFAULT_RULE_STATS,
        }
    }
}

/// Why a policy cannot be compiled for a host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    /// More rules in one direction than the compiler supports.
    #[error("{count} {direction} rules apply to this host; the limit is {limit}")]
    TooManyRules {
        /// Direction.
        direction: Direction,
        /// Rules that apply.
        count: usize,
        /// Limit.
        limit: usize,
    },
    /// A map would overflow. A policy must fit twice in the maps that both
    /// policy slots share (the peer and port tries): a reload writes the
    /// next policy beside the one in force, so a policy that fills more
    /// than half of one could attach and then never be reloaded.
    #[error(
        "the compiled policy needs {count} entries in {map}, which holds at most {limit}: {map} must hold {needed}{}; raise it with {}",
        if .needed > .count { " (twice that: a reload writes the next policy beside the one in force, and both slots share it)" } else { "" },
        capacity_hint(.map, *.needed)
    )]
    Capacity {
        /// Map name.
        map: &'static str,
        /// Entries the policy needs.
        count: usize,
        /// Entries the map must hold for the policy to attach and reload.
        needed: usize,
        /// Capacity.
        limit: u32,
    },
}

/// How to give `map` room for `needed` entries.
fn capacity_hint(map: &str, needed: usize) -> String {
    match map {
        segbpf_common::MAP_PEER_V4 | segbpf_common::MAP_PEER_V6 => {
            format!("`--peer-entries {needed}` (attach and check)")
        }
        segbpf_common::MAP_PORTS => format!("`--port-entries {needed}` (attach and check)"),
        _ => "a new attach (`segbpf detach`, then `segbpf attach`), which sizes it for the policy"
            .to_string(),
    }
}

impl CompileError {
    /// The capacity error for `map`, which must hold `needed` entries for a
    /// policy of `count` and holds `limit`.
    fn capacity(map: &'static str, count: usize, needed: usize, limit: u32) -> Self {
        CompileError::Capacity {
            map,
            count,
            needed,
            limit,
        }
    }
}

/// A compiled rule's description, kept beside the maps for status and trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    /// Rule id (the value stored in the port trie).
    pub id: u32,
    /// Label such as `roles.web.ingress[0]`.
    pub label: String,
    /// Direction.
    pub direction: String,
    /// Peer as written.
    pub peer: String,
    /// Services, e.g. `tcp/80,443`.
    pub services: String,
    /// Line of the rule in the policy file.
    pub line: u32,
    /// The rule's slot in `SEG_RULE_STATS`, which is also the value the
    /// kernel reports for it. Equal to `id` on a fresh attach; kept across
    /// reloads for a rule that still exists, so its counters carry over.
    #[serde(default)]
    pub counter: u32,
    /// The rule's `name`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule's `description`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl RuleInfo {
    /// Describes a policy rule.
    pub fn from_rule(r: &Rule) -> Self {
        RuleInfo {
            id: r.id,
            label: r.label(),
            direction: r.direction.as_str().to_string(),
            peer: r.peer_text.clone(),
            services: r.services(),
            line: r.loc.line,
            counter: r.id,
            name: r.name.clone(),
            description: r.description.clone(),
        }
    }

    /// What makes two rules of successive policies "the same rule": its
    /// name when it has one, else owner, direction, peer and services (not
    /// the position in the file).
    pub fn identity(&self) -> String {
        match self.identity_key() {
            RuleIdentity::Name(name) => format!("name:{name}"),
            RuleIdentity::Rule(owner, peer, services) => format!("{owner}|{peer}|{services}"),
        }
    }

    /// [`RuleInfo::identity`] as borrowed parts (what `carry_counters`
    /// compares: no string is built for each of 10,000 rules).
    pub fn identity_key(&self) -> RuleIdentity<'_> {
        if let Some(name) = &self.name {
            return RuleIdentity::Name(name);
        }
        let owner = self.label.rsplit_once('[').map_or(&*self.label, |(a, _)| a);
        RuleIdentity::Rule(owner, &self.peer, &self.services)
    }

    /// The role the rule belongs to (`base` for a base rule), from its label.
    pub fn owner_role(&self) -> &str {
        let owner = self.label.rsplit_once('[').map_or(&*self.label, |(a, _)| a);
        let owner = owner.rsplit_once('.').map_or(owner, |(a, _)| a);
        owner.strip_prefix("roles.").unwrap_or(owner)
    }

    /// The rule's name, else its label: how metrics and events name it.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.label)
    }
}

/// What makes two rules of successive policies "the same rule"
/// ([`RuleInfo::identity_key`]): the name, or owner, peer and services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleIdentity<'a> {
    /// A named rule: its name.
    Name(&'a str),
    /// An unnamed rule: its owner (label without the index), peer as
    /// written and services.
    Rule(&'a str, &'a str, &'a str),
}

/// How JSON results name a rule (docs/json.md): the same object in
/// `trace`, `explain`, `flows` and flow records. `id` is always there; the
/// rest when the policy in force describes the rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleJson {
    /// Rule id (its counter slot as the kernel reports it).
    pub id: u32,
    /// The rule's `name`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Label such as `roles.web.ingress[0]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Line of the rule in the policy file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// `ingress` or `egress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// Peer as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Services, e.g. `tcp/80,443`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<String>,
}

impl RuleJson {
    /// The rule the kernel reported as `id`, described by `info` if known.
    pub fn new(id: u32, info: Option<&RuleInfo>) -> Self {
        match info {
            Some(i) => RuleJson {
                id: i.id,
                name: i.name.clone(),
                label: Some(i.label.clone()),
                line: Some(i.line),
                direction: Some(i.direction.clone()),
                peer: Some(i.peer.clone()),
                services: Some(i.services.clone()),
            },
            None => RuleJson {
                id,
                ..RuleJson::default()
            },
        }
    }

    /// The rule's name, else its label, else `#ID`: how text output names it.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.label.clone())
            .unwrap_or_else(|| format!("#{}", self.id))
    }

    /// Reads a flow record's `rule`: this object, or the bare name of
    /// records written before the JSON dialect (docs/json.md).
    pub fn deserialize_compat<'de, D>(d: D) -> Result<Option<RuleJson>, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Object(RuleJson),
            Name(String),
        }
        Ok(match Option::<Either>::deserialize(d)? {
            Some(Either::Object(r)) => Some(r),
            Some(Either::Name(n)) => Some(RuleJson {
                name: Some(n),
                ..RuleJson::default()
            }),
            None => None,
        })
    }
}

/// Gives the rules of `c` their counter slots: a rule that also exists in
/// `previous` keeps its slot (its counters carry over), a new rule takes
/// the lowest slot no rule uses. Rewrites the port trie's values to the
/// slots and returns the slots of `previous` no longer used (to be zeroed
/// once the new policy is in force).
pub fn carry_counters(
    c: &mut Compiled,
    previous: &[RuleInfo],
    limit: u32,
) -> Result<Vec<u32>, CompileError> {
    // Identity -> the previous slots of rules with that identity, first
    // rule first (equal rules keep their slots in order).
    let mut old: FastMap<RuleIdentity<'_>, std::collections::VecDeque<u32>> = FastMap::default();
    old.reserve(previous.len());
    for r in previous {
        old.entry(r.identity_key())
            .or_default()
            .push_back(r.counter);
    }
    let mut used = std::collections::BTreeSet::new();
    let mut pending = Vec::new();
    let mut kept = Vec::with_capacity(c.rules.len());
    for (i, r) in c.rules.iter().enumerate() {
        match old
            .get_mut(&r.identity_key())
            .and_then(std::collections::VecDeque::pop_front)
        {
            Some(slot) => {
                kept.push((i, slot));
                used.insert(slot);
            }
            None => pending.push(i),
        }
    }
    drop(old);
    for (i, slot) in kept {
        c.rules[i].counter = slot;
    }
    // Fresh slots avoid every slot the previous policy still uses, so no
    // counter is shared while both policies are in the kernel.
    let busy: std::collections::BTreeSet<u32> = previous
        .iter()
        .map(|r| r.counter)
        .chain(used.iter().copied())
        .collect();
    let mut next = 0u32;
    for i in pending {
        while busy.contains(&next) || used.contains(&next) {
            next += 1;
        }
        if next >= limit {
            return Err(CompileError::capacity(
                segbpf_common::MAP_RULE_STATS,
                next as usize + 1,
                next as usize + 1,
                limit,
            ));
        }
        c.rules[i].counter = next;
        used.insert(next);
    }
    let by_id: FastMap<u32, u32> = c.rules.iter().map(|r| (r.id, r.counter)).collect();
    for (_, _, v) in &mut c.ports {
        v.rule_id = by_id[&v.rule_id];
    }
    // The slots no rule kept, in the order of `previous`.
    Ok(previous
        .iter()
        .map(|r| r.counter)
        .filter(|slot| !used.contains(slot))
        .collect())
}

/// One LPM entry: full key prefix length (header bits included), key data, value.
pub type LpmEntry<K, V> = (u32, K, V);

/// Map contents for one attachment.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// `SEG_PEER_V4` entries.
    pub peers_v4: Vec<LpmEntry<PeerKeyV4, PeerClass>>,
    /// `SEG_PEER_V6` entries.
    pub peers_v6: Vec<LpmEntry<PeerKeyV6, PeerClass>>,
    /// `SEG_PORTS` entries.
    pub ports: Vec<LpmEntry<PortKey, RuleRef>>,
    /// The `SEG_CONFIG` record of the policy slot (`config.active_slot`).
    pub config: Config,
    /// The rules that apply to this host (both directions), by id.
    pub rules: Vec<RuleInfo>,
    /// Number of address classes.
    pub classes: u32,
    /// Every address class: its direction and the ids of the rules whose
    /// peers contain it (what a live set edit needs to find the class of
    /// an address whose rules change, see `crate::attachment::setindex`).
    pub class_rules: Vec<ClassRules>,
}

/// One address class of a compiled policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRules {
    /// Class id (the value in the peer tries, the class in port keys).
    pub id: u32,
    /// Direction key byte (`Direction::key_byte`).
    pub dir: u8,
    /// Policy rule ids whose peers contain the class's addresses, ascending.
    pub rules: Vec<u32>,
}

/// Checks that `c` fits both slots of the maps `capacity` describes (what
/// [`compile`] checks, for maps computed without it).
pub fn check_capacity(c: &Compiled, capacity: Capacity) -> Result<(), CompileError> {
    fits_twice(MAP_V4, c.peers_v4.len(), capacity.peer_v4)?;
    fits_twice(MAP_V6, c.peers_v6.len(), capacity.peer_v6)?;
    fits_twice(MAP_PORTS, c.ports.len(), capacity.ports)
}

/// A policy that does not compile for one of the hosts that `check` and
/// `fleet push` try.
#[derive(Debug, thiserror::Error)]
#[error("{policy}: compiling for role {roles}: {reason}")]
pub struct HostCompileError {
    /// Policy file.
    pub policy: String,
    /// The host's roles, joined by `+`.
    pub roles: String,
    /// Why (in the message, not a source: printed once).
    pub reason: CompileError,
}

/// One host per role of `policy` (what `check` and `fleet push` compile
/// for by default).
pub fn one_host_per_role(policy: &Policy) -> Vec<Vec<String>> {
    policy.roles.iter().map(|r| vec![r.name.clone()]).collect()
}

/// Compiles `policy` for each host of `hosts` (a host is a set of roles)
/// with `capacity`, as a first attach would (no interface: rules limited
/// to interfaces are left out). `check` and `fleet push` validate with it.
pub fn compile_hosts(
    policy: &Policy,
    hosts: Vec<Vec<String>>,
    capacity: Capacity,
) -> Result<Vec<(Vec<String>, Compiled)>, HostCompileError> {
    hosts
        .into_iter()
        .map(|roles| {
            let c = compile(policy, &roles, None, 0, 1, capacity).map_err(|reason| {
                HostCompileError {
                    policy: policy.source.clone(),
                    roles: roles.join("+"),
                    reason,
                }
            })?;
            Ok((roles, c))
        })
        .collect()
}

/// Compiles the rules that apply to a host with `roles` on `iface` into
/// map contents for `slot`.
pub fn compile(
    policy: &Policy,
    roles: &[String],
    iface: Option<&str>,
    slot: u8,
    generation: u64,
    capacity: Capacity,
) -> Result<Compiled, CompileError> {
    let mut out = Compiled {
        config: Config {
            generation,
            ingress_default: action_byte(policy.defaults.ingress),
            egress_default: action_byte(policy.defaults.egress),
            icmp: u8::from(policy.defaults.icmp),
            established: u8::from(policy.defaults.established),
            active_slot: slot,
            log_rate: policy.defaults.log_rate,
            ct_tcp_syn_s: ct_timeout::TCP_SYN,
            ct_tcp_est_s: ct_timeout::TCP_EST,
            ct_tcp_close_s: ct_timeout::TCP_CLOSE,
            ct_udp_s: ct_timeout::UDP,
            ct_udp_est_s: ct_timeout::UDP_EST,
            ct_icmp_s: ct_timeout::ICMP,
            frag_s: ct_timeout::FRAG,
            link_local: u8::from(policy.defaults.link_local),
            flow_acct: 1,
            ..Config::default()
        },
        ..Compiled::default()
    };
    let mut next_class: u32 = 0;
    for dir in Direction::ALL {
        let rules: Vec<&Rule> = policy.rules_for(roles, iface, dir).collect();
        if rules.len() > MAX_RULES_PER_DIRECTION {
            return Err(CompileError::TooManyRules {
                direction: dir,
                count: rules.len(),
                limit: MAX_RULES_PER_DIRECTION,
            });
        }
        out.rules
            .extend(rules.iter().map(|r| RuleInfo::from_rule(r)));
        compile_direction(&rules, dir, slot, &mut next_class, &mut out);
    }
    out.rules.sort_by_key(|r| r.id);
    out.classes = next_class;
    // The tries hold both policy slots: the policy must fit twice.
    fits_twice(MAP_V4, out.peers_v4.len(), capacity.peer_v4)?;
    fits_twice(MAP_V6, out.peers_v6.len(), capacity.peer_v6)?;
    fits_twice(MAP_PORTS, out.ports.len(), capacity.ports)?;
    let max_id = out
        .rules
        .iter()
        .map(|r| r.id as usize + 1)
        .max()
        .unwrap_or(0);
    if max_id > capacity.rule_stats as usize {
        return Err(CompileError::capacity(
            segbpf_common::MAP_RULE_STATS,
            max_id,
            max_id,
            capacity.rule_stats,
        ));
    }
    Ok(out)
}

const MAP_V4: &str = segbpf_common::MAP_PEER_V4;
const MAP_V6: &str = segbpf_common::MAP_PEER_V6;
const MAP_PORTS: &str = segbpf_common::MAP_PORTS;

/// Entries a map shared by both policy slots must hold for a policy of
/// `count` entries: the slot in force and the one a reload fills.
pub fn both_slots(count: usize) -> usize {
    count.saturating_mul(2)
}

fn fits_twice(map: &'static str, count: usize, limit: u32) -> Result<(), CompileError> {
    let needed = both_slots(count);
    if needed > limit as usize {
        return Err(CompileError::capacity(map, count, needed, limit));
    }
    Ok(())
}

fn action_byte(a: Action) -> u8 {
    match a {
        Action::Drop => ACTION_DROP,
        Action::Allow => ACTION_ALLOW,
    }
}

/// A set of rules, as a bitset over the direction's local rule indexes
/// (which are in rule-id order, so the lowest set bit is the lowest id).
pub(crate) type RuleSet = Vec<u64>;

pub(crate) fn compile_direction(
    rules: &[&Rule],
    dir: Direction,
    slot: u8,
    next_class: &mut u32,
    out: &mut Compiled,
) {
    let words = rules.len().div_ceil(64).max(1);
    // The classes: their sets in id order, found by the hash of the set
    // (hashed once per segment; the table holds hashes, so growing it
    // never hashes a set again). A set is copied once, when it becomes a
    // class: the sweep hands every segment's set by reference (10,000
    // rules: sets of 157 words).
    let first_class = *next_class;
    let mut class_sets: Vec<(u32, RuleSet)> = Vec::new();
    let mut by_hash: FastMap<u64, Vec<u32>> = FastMap::default();
    let mut intern = |set: &[u64]| -> u32 {
        let h = {
            let mut hasher = FastHasher::default();
            set.hash(&mut hasher);
            hasher.finish()
        };
        let ids = by_hash.entry(h).or_default();
        if let Some(&id) = ids
            .iter()
            .find(|&&id| class_sets[(id - first_class) as usize].1 == set)
        {
            return id;
        }
        let id = *next_class;
        *next_class += 1;
        ids.push(id);
        class_sets.push((id, set.to_vec()));
        id
    };

    for v6 in [false, true] {
        let bits = if v6 { 128 } else { 32 };
        let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
        let (first_v4, first_v6) = (out.peers_v4.len(), out.peers_v6.len());
        let ranges: Vec<(u128, u128, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.peers.iter().filter_map(move |p| match (p, v6) {
                    (AddrRange::V4 { start, end }, false) => {
                        Some((u128::from(*start), u128::from(*end), i))
                    }
                    (AddrRange::V6 { start, end }, true) => Some((*start, *end, i)),
                    _ => None,
                })
            })
            .collect();
        // Contiguous segments of one class merge (equal sets, equal ids).
        let mut segments: Vec<(u128, u128, u32)> = Vec::new();
        sweep_each(&ranges, max, words, |pos, end, set| {
            let id = intern(set);
            match segments.last_mut() {
                Some(last) if last.1.checked_add(1) == Some(pos) && last.2 == id => last.1 = end,
                _ => segments.push((pos, end, id)),
            }
        });
        for (start, end, class_id) in segments {
            for (prefix, len) in range_to_prefixes(start, end, bits) {
                let value = PeerClass { class_id };
                if v6 {
                    let key = PeerKeyV6 {
                        slot,
                        dir: dir.key_byte(),
                        addr_be: prefix.to_be_bytes(),
                    };
                    out.peers_v6.push((PEER_KEY_HEADER_BITS + len, key, value));
                } else {
                    let key = PeerKeyV4 {
                        slot,
                        dir: dir.key_byte(),
                        addr_be: (prefix as u32).to_be_bytes(),
                    };
                    out.peers_v4.push((PEER_KEY_HEADER_BITS + len, key, value));
                }
            }
        }
        // The most frequent class as one header-only entry (a shallower
        // trie for the same function, see `peerdefault`).
        let d = dir.key_byte();
        if v6 {
            let tail = out.peers_v6.split_off(first_v6);
            let header = PeerKeyV6 {
                slot,
                dir: d,
                addr_be: [0; 16],
            };
            out.peers_v6.extend(peerdefault::elide(
                tail,
                128,
                |k| u128::from_be_bytes(k.addr_be),
                header,
            ));
        } else {
            let tail = out.peers_v4.split_off(first_v4);
            let header = PeerKeyV4 {
                slot,
                dir: d,
                addr_be: [0; 4],
            };
            out.peers_v4.extend(peerdefault::elide(
                tail,
                32,
                |k| u128::from(u32::from_be_bytes(k.addr_be)),
                header,
            ));
        }
    }

    drop(by_hash);
    for (class_id, set) in &class_sets {
        let members: Vec<usize> = iter_bits(set).collect();
        compile_class_ports(rules, &members, *class_id, slot, &mut out.ports);
        out.class_rules.push(ClassRules {
            id: *class_id,
            dir: dir.key_byte(),
            rules: members.iter().map(|&i| rules[i].id).collect(),
        });
    }
}

/// Port-trie entries of one class.
pub(crate) fn compile_class_ports(
    rules: &[&Rule],
    members: &[usize],
    class_id: u32,
    slot: u8,
    out: &mut Vec<LpmEntry<PortKey, RuleRef>>,
) {
    let key = |proto: u8, port: u16| PortKey {
        slot,
        class_be: class_id.to_be_bytes(),
        proto,
        port_be: port.to_be_bytes(),
    };
    // `proto = "any"`: class-only prefix, the fallback for every protocol.
    let any_min = members.iter().copied().find(|&i| rules[i].any_proto);
    if let Some(i) = any_min {
        out.push((
            PORT_KEY_CLASS_BITS,
            key(0, 0),
            RuleRef {
                rule_id: rules[i].id,
            },
        ));
    }
    // Protocols without ports: one protocol-wide prefix.
    for (proto, allowed) in [
        (IPPROTO_ICMP, (|r: &Rule| r.icmp) as fn(&Rule) -> bool),
        (IPPROTO_ICMPV6, |r: &Rule| r.icmpv6),
    ] {
        let first = members
            .iter()
            .copied()
            .find(|&i| allowed(rules[i]) || rules[i].any_proto);
        if let Some(i) = first
            && Some(i) != any_min
        {
            out.push((
                PORT_KEY_PROTO_BITS,
                key(proto, 0),
                RuleRef {
                    rule_id: rules[i].id,
                },
            ));
        }
    }
    let mut local = members.to_vec();
    local.sort_unstable();
    local.dedup();
    let local_words = local.len().div_ceil(64).max(1);
    // TCP and UDP: the lowest rule per port, as non-overlapping port prefixes.
    for (proto, ports) in [
        (
            IPPROTO_TCP,
            (|r: &Rule| &r.tcp[..]) as fn(&Rule) -> &[PortRange],
        ),
        (IPPROTO_UDP, |r: &Rule| &r.udp[..]),
    ] {
        // The sweep runs over the class's members only (bit j is
        // `local[j]`, ascending, so the lowest bit is still the lowest
        // rule): sets of a few words, not of the direction's every rule.
        let mut ranges: Vec<(u128, u128, usize)> = Vec::new();
        for (j, &i) in local.iter().enumerate() {
            for p in ports(rules[i]) {
                ranges.push((u128::from(p.lo), u128::from(p.hi), j));
            }
        }
        if ranges.is_empty() {
            continue;
        }
        if let Some(j) = any_min.and_then(|i| local.binary_search(&i).ok()) {
            ranges.push((0, u128::from(u16::MAX), j));
        }
        for (start, end, set) in sweep(&ranges, u128::from(u16::MAX), local_words) {
            let Some(i) = iter_bits(&set).next().map(|j| local[j]) else {
                continue;
            };
            if Some(i) == any_min {
                continue; // the class-only prefix already answers this
            }
            for (prefix, len) in range_to_prefixes(start, end, 16) {
                out.push((
                    PORT_KEY_PROTO_BITS + len,
                    key(proto, prefix as u16),
                    RuleRef {
                        rule_id: rules[i].id,
                    },
                ));
            }
        }
    }
}

/// Sweeps inclusive ranges `(start, end, item)` over `0..=max` and returns
/// the maximal intervals covered by at least one range, each with the set
/// of items covering it. Adjacent intervals with equal sets are merged.
pub(crate) fn sweep(
    ranges: &[(u128, u128, usize)],
    max: u128,
    words: usize,
) -> Vec<(u128, u128, RuleSet)> {
    let mut out: Vec<(u128, u128, RuleSet)> = Vec::new();
    sweep_each(ranges, max, words, |pos, end, active| {
        match out.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(pos) && last.2 == active => last.1 = end,
            _ => out.push((pos, end, active.to_vec())),
        }
    });
    out
}

/// [`sweep`] without the merging: `each(start, end, set)` for every
/// segment between two successive range boundaries that some range
/// covers, in address order, with the set of items covering it (borrowed:
/// nothing is copied per segment).
pub(crate) fn sweep_each(
    ranges: &[(u128, u128, usize)],
    max: u128,
    words: usize,
    mut each: impl FnMut(u128, u128, &[u64]),
) {
    // Events: (position, +1/-1, item); a range ending at `max` has no end event.
    let mut events: Vec<(u128, bool, usize)> = Vec::with_capacity(ranges.len() * 2);
    for &(s, e, i) in ranges {
        events.push((s, true, i));
        if e < max {
            events.push((e + 1, false, i));
        }
    }
    events.sort_unstable();
    // How many ranges of each item cover the sweep position.
    let mut count: FastMap<usize, u32> = FastMap::default();
    count.reserve(ranges.len());
    let mut active: RuleSet = vec![0; words];
    let mut active_n = 0usize;
    let mut k = 0;
    while k < events.len() {
        let pos = events[k].0;
        while k < events.len() && events[k].0 == pos {
            let (_, add, i) = events[k];
            let c = count.entry(i).or_insert(0);
            if add {
                *c += 1;
                if *c == 1 {
                    active[i / 64] |= 1 << (i % 64);
                    active_n += 1;
                }
            } else {
                *c -= 1;
                if *c == 0 {
                    active[i / 64] &= !(1 << (i % 64));
                    active_n -= 1;
                }
            }
            k += 1;
        }
        let end = if k < events.len() {
            events[k].0 - 1
        } else {
            max
        };
        if active_n == 0 {
            continue;
        }
        each(pos, end, &active);
    }
}

fn iter_bits(set: &[u64]) -> impl Iterator<Item = usize> + '_ {
    set.iter().enumerate().flat_map(|(w, &bits)| {
        let mut b = bits;
        std::iter::from_fn(move || {
            if b == 0 {
                return None;
            }
            let t = b.trailing_zeros() as usize;
            b &= b - 1;
            Some(w * 64 + t)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_str(text, "test.toml").expect("policy parses")
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn sweep_merges_and_splits() {
        let r = sweep(&[(0, 9, 0), (5, 14, 1), (15, 20, 1)], 100, 1);
        assert_eq!(r, vec![(0, 4, vec![1]), (5, 9, vec![3]), (10, 20, vec![2])]);
    }

    #[test]
    fn sweep_handles_full_u128_space() {
        let r = sweep(&[(0, u128::MAX, 0), (10, 10, 1)], u128::MAX, 1);
        assert_eq!(
            r,
            vec![(0, 9, vec![1]), (10, 10, vec![3]), (11, u128::MAX, vec![1])]
        );
    }

    #[test]
    fn the_class_of_the_gaps_is_one_entry_not_a_tiling() {
        // Three scattered /32s and `any`: the disjoint tiling needed about
        // two prefixes per bit around each /32 (a deep trie path to each of
        // them, 160 ns a lookup in the bench); with the gaps' class as one
        // header-only entry it is the three /32s and that entry.
        let p = policy(
            r#"
version = 1
[roles.r]
hosts = "any"
[[roles.r.ingress]]
from = ["10.0.0.1", "172.16.5.9", "198.18.0.7"]
tcp = [22]
[[roles.r.ingress]]
from = "any"
udp = [53]
"#,
        );
        let c = compile(&p, &roles(&["r"]), None, 0, 1, Capacity::default()).unwrap();
        let ingress: Vec<_> = c
            .peers_v4
            .iter()
            .filter(|(_, k, _)| k.dir == segbpf_common::DIR_INGRESS)
            .collect();
        assert_eq!(ingress.len(), 4, "{ingress:?}");
        let default = ingress.iter().find(|e| e.0 == PEER_KEY_HEADER_BITS);
        let named = ingress.iter().find(|e| e.1.addr_be == [198, 18, 0, 7]);
        match (default, named) {
            (Some(d), Some(n)) => {
                assert_eq!(n.0, PEER_KEY_HEADER_BITS + 32);
                assert_ne!(d.2, n.2, "the named address has its own class");
            }
            other => panic!("entries {ingress:?}: {other:?}"),
        }
    }

    const SMALL: &str = r#"
version = 1
[sets]
a = ["10.0.0.0/24"]
b = ["10.0.0.128/25", "fd00::/64"]
[defaults]
ingress = "drop"
egress = "allow"
[[base.ingress]]
from = "a"
tcp = [22]
[roles.r]
hosts = "a"
[[roles.r.ingress]]
from = "b"
tcp = ["20-30", 443]
[[roles.r.ingress]]
from = "any"
proto = "any"
"#;

    #[test]
    fn classes_cover_overlaps_and_ports_take_lowest_rule() {
        let p = policy(SMALL);
        let c = compile(&p, &roles(&["r"]), None, 0, 1, Capacity::default()).unwrap();
        // Ingress v4 intervals: any\a (two sides), a\b, a∩b -> 3 classes in v4,
        // v6: fd00::/64 and the rest of any -> 1 more class.
        assert_eq!(c.classes, 4);
        // a∩b = 10.0.0.128/25 must map to a class whose tcp/22 is rule 0 and
        // tcp/25 is rule 1 (lowest id), and udp/9 falls back to the any rule (2).
        let find_v4 = |addr: [u8; 4]| {
            c.peers_v4
                .iter()
                .filter(|(len, k, _)| {
                    let plen = len - PEER_KEY_HEADER_BITS;
                    let a = u32::from_be_bytes(k.addr_be);
                    let x = u32::from_be_bytes(addr);
                    let mask = if plen == 0 {
                        0
                    } else {
                        u32::MAX << (32 - plen)
                    };
                    x & mask == a
                })
                // Longest match: the class of the gaps is one header-only
                // entry under the others (`peerdefault`).
                .max_by_key(|(len, _, _)| *len)
                .map(|(_, _, v)| v.class_id)
                .into_iter()
                .collect::<Vec<_>>()
        };
        let class = find_v4([10, 0, 0, 200]);
        assert_eq!(class.len(), 1, "a class");
        let lookup = |class: u32, proto: u8, port: u16| {
            c.ports
                .iter()
                .filter(|(len, k, _)| {
                    k.class_be == class.to_be_bytes()
                        && (*len == PORT_KEY_CLASS_BITS
                            || (k.proto == proto && {
                                let plen = len - PORT_KEY_PROTO_BITS;
                                let mask = if plen == 0 {
                                    0
                                } else {
                                    u16::MAX << (16 - plen)
                                };
                                port & mask == u16::from_be_bytes(k.port_be)
                            }))
                })
                .max_by_key(|(len, _, _)| *len)
                .map(|(_, _, v)| v.rule_id)
        };
        assert_eq!(lookup(class[0], IPPROTO_TCP, 22), Some(0));
        assert_eq!(lookup(class[0], IPPROTO_TCP, 25), Some(1));
        assert_eq!(lookup(class[0], IPPROTO_TCP, 443), Some(1));
        assert_eq!(lookup(class[0], IPPROTO_UDP, 9), Some(2));
        let outside = find_v4([192, 0, 2, 1]);
        assert_eq!(lookup(outside[0], IPPROTO_TCP, 22), Some(2));
        assert_eq!(c.config.ingress_default, ACTION_DROP);
        assert_eq!(c.config.egress_default, ACTION_ALLOW);
    }

    #[test]
    fn rules_of_other_roles_are_not_compiled() {
        let p = policy(SMALL);
        let c = compile(&p, &[], None, 0, 1, Capacity::default()).unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.classes, 1);
    }

    #[test]
    fn capacity_is_enforced() {
        let p = policy(SMALL);
        let cap = Capacity {
            peer_v4: 1,
            ..Capacity::default()
        };
        let err = compile(&p, &roles(&["r"]), None, 0, 1, cap).unwrap_err();
        assert!(matches!(
            err,
            CompileError::Capacity {
                map: "SEG_PEER_V4",
                ..
            }
        ));
    }

    #[test]
    fn a_policy_must_fit_both_slots_of_the_shared_tries() {
        let p = policy(SMALL);
        let c = compile(&p, &roles(&["r"]), None, 0, 1, Capacity::default()).unwrap();
        let n = c.peers_v4.len();
        assert!(n > 1);
        // Exactly twice its prefixes: it attaches, and a reload has room.
        let cap = |v4: usize| Capacity {
            peer_v4: v4 as u32,
            ..Capacity::default()
        };
        compile(&p, &roles(&["r"]), None, 0, 1, cap(2 * n)).unwrap();
        // One less: it would fit one slot, but a reload never could.
        let err = compile(&p, &roles(&["r"]), None, 0, 1, cap(2 * n - 1)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("needs {n} entries in SEG_PEER_V4"))
                && text.contains(&format!("holds at most {}", 2 * n - 1))
                && text.contains(&format!("--peer-entries {}", 2 * n)),
            "{text}"
        );
        let ports = c.ports.len();
        let err = compile(
            &p,
            &roles(&["r"]),
            None,
            0,
            1,
            Capacity {
                ports: (2 * ports - 1) as u32,
                ..Capacity::default()
            },
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("--port-entries {}", 2 * ports)),
            "{err}"
        );
    }
}
