//! `segbpf suggest`: a policy that allows exactly the connection attempts
//! an attachment's policy denied (or, in audit mode, would have denied),
//! from the `denied` records of its observed store ([`crate::attachment::observed`]).
//!
//! The result is the policy in force, unchanged, with sets and rules
//! added for this host's role: peers that were seen on exactly the same
//! services share one set and one rule; each rule lists only the ports
//! seen (a run of three or more consecutive seen ports is written as a
//! range); every addition is named and commented with what it covers.
//! Only attempts denied by the direction's default count (not malformed
//! packets, invalid RSTs or fragments), and only packets that would open a
//! flow (so stray packets of dead connections suggest nothing). Attempts
//! the policy in force allows by now are left out. The text is checked by
//! parsing and compiling it before it is returned.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use segbpf_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    attachment::observed,
    attachment::pins::Attachment,
    attachment::state::State,
    host::clock,
    observe::flowlog::{self, FlowLog, Record},
    policy::compile::{self, Capacity},
    policy::{
        Direction, Policy, PolicyError,
        eval::{Packet, evaluate},
    },
};

/// Errors of `suggest`.
#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    /// Nothing is attached.
    #[error("segbpf is not attached to {0}")]
    NotAttached(String),
    /// The attachment's state could not be read.
    #[error(transparent)]
    State(#[from] crate::attachment::state::StateError),
    /// The policy in force could not be read.
    #[error("reading the policy in force ({path}): {source}")]
    PolicyText {
        /// Its file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The policy in force does not parse any more.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The store could not be read.
    #[error("reading the observed store {path}: {source}")]
    Store {
        /// The store.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The suggested policy does not compile (a bug: it is reported, not printed).
    #[error("the suggested policy does not compile: {0}")]
    Compile(String),
}

/// A suggested policy.
#[derive(Clone, Debug)]
pub struct Suggestion {
    /// The complete roles.toml.
    pub text: String,
    /// The role the rules were added to.
    pub role: String,
    /// Denied connection attempts (aggregates) it covers.
    pub attempts: u64,
    /// Rules added.
    pub rules: usize,
    /// Peers in the added sets.
    pub peers: usize,
}

/// One service: protocol and destination port (ICMP: the type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Service {
    proto: u8,
    port: u16,
}

/// A peer and what was seen of it.
type Member<'a> = (IpAddr, &'a Seen);

/// What was seen of one peer in one direction.
#[derive(Debug, Default)]
struct Seen {
    services: BTreeSet<Service>,
    attempts: u64,
    first: String,
    last: String,
}

/// Suggests a policy for `att` from what it denied since `since` ago.
/// When no other process drains the attachment's denied tables, this
/// drains them first, so nothing waiting in the kernel is missed.
pub fn suggest(att: &Attachment, since: Duration) -> Result<Suggestion, SuggestError> {
    let store = att.observed_dir();
    let (state, text, source) = if att.is_attached() {
        drain_pending(att);
        let state = State::current(att)?;
        let (text, source) = applied_text(att, &state)?;
        (state, text, source)
    } else {
        // Detached: the store outlives the attachment with the state and
        // policy that were in force.
        let _ = observed::expire(&store);
        let kept = observed::detached_state(&store);
        // Only this namespace's store (the kernel's cookie, not the inode
        // a dead namespace may have left to a new one).
        if crate::attachment::pins::recorded_netns_cookie(&kept) != Some(att.netns.cookie) {
            return Err(SuggestError::NotAttached(att.describe()));
        }
        let state = State::read(&kept)?;
        let path = observed::detached_policy(&store);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| SuggestError::PolicyText { path, source })?;
        let source = state.policy.clone();
        (state, text, source)
    };
    let overrides = crate::attachment::swap::parse_overrides(&state.set_overrides)
        .map_err(|e| SuggestError::Compile(e.to_string()))?;
    let policy = Policy::load_with_sets(std::path::Path::new(&source), &overrides)
        .or_else(|_| Policy::from_str(&text, &source))?;
    let from = SystemTime::now()
        .checked_sub(since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let from_text = clock::rfc3339(from);
    let dir = att.observed_dir();
    let lines = observed::read_since(&dir, from).map_err(|source| SuggestError::Store {
        path: dir.clone(),
        source,
    })?;
    let mut seen: BTreeMap<(Direction, IpAddr), Seen> = BTreeMap::new();
    let mut attempts = 0;
    for l in lines {
        let Ok(r) = serde_json::from_str::<Record>(&l) else {
            continue;
        };
        let Some((dir, peer, service)) = attempt(&r) else {
            continue;
        };
        // Older than asked for, or allowed by now: nothing to add.
        if r.last_seen < from_text || !still_denied(&policy, &state.roles, att, dir, &r, service) {
            continue;
        }
        attempts += 1;
        let s = seen.entry((dir, peer)).or_default();
        s.services.insert(service);
        s.attempts += r.packets_orig;
        if s.first.is_empty() || r.first_seen < s.first {
            s.first.clone_from(&r.first_seen);
        }
        if r.last_seen > s.last {
            s.last.clone_from(&r.last_seen);
        }
    }
    let role = state
        .roles
        .first()
        .cloned()
        .unwrap_or_else(|| format!("suggested_{}", sanitize(&att.iface)));
    let new_role = state.roles.is_empty();
    let mut out = Additions::new(&policy, &role);
    // Peers with the same services in the same direction share a rule.
    let mut groups: BTreeMap<(Direction, Vec<Service>), Vec<Member>> = BTreeMap::new();
    for ((dir, peer), s) in &seen {
        groups
            .entry((*dir, s.services.iter().copied().collect()))
            .or_default()
            .push((*peer, s));
    }
    let peers = seen.len();
    for ((dir, services), members) in &groups {
        out.rule(*dir, services, members);
    }
    let rules = groups.len();
    let header = format!(
        "# Suggested by `segbpf suggest {}` at {}: {} rule(s) allowing the {} denied\n\
         # connection attempt aggregate(s) seen since {} that the policy above does\n\
         # not allow. Review each one before you enforce it.\n",
        att.iface,
        clock::rfc3339(SystemTime::now()),
        rules,
        attempts,
        from_text,
    );
    let locals = local_addresses(&state);
    let text = out.finish(&text, &header, new_role.then_some(locals.as_slice()));
    check(&text, &source, &role)?;
    Ok(Suggestion {
        text,
        role,
        attempts,
        rules,
        peers,
    })
}

/// Whether the policy in force still denies the attempt `r`.
fn still_denied(
    policy: &Policy,
    roles: &[String],
    att: &Attachment,
    dir: Direction,
    r: &Record,
    service: Service,
) -> bool {
    let (Some(src), Some(dst)) = (r.src, r.dst) else {
        return false;
    };
    let icmp = matches!(service.proto, IPPROTO_ICMP | IPPROTO_ICMPV6);
    let pkt = Packet {
        src,
        dst,
        proto: service.proto,
        dport: if icmp { 0 } else { service.port },
        icmp_type: if icmp {
            u8::try_from(service.port).unwrap_or(0)
        } else {
            0
        },
        hop_limit: 64,
    };
    !evaluate(policy, roles, Some(&att.iface), dir, &pkt).passes()
}

/// The direction, peer and service of a denied connection attempt, or
/// None for records that are not one.
fn attempt(r: &Record) -> Option<(Direction, IpAddr, Service)> {
    if r.state != "denied"
        || r.reason.as_deref() != Some("default-drop")
        || r.opens_flow != Some(true)
    {
        return None;
    }
    let proto = crate::host::proto::parse_proto(&r.proto).ok()?;
    if !matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6
    ) {
        return None;
    }
    let dir = if r.opened_by == "ingress" {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    Some((
        dir,
        r.peer()?,
        Service {
            proto,
            port: r.dport,
        },
    ))
}

/// The text of the policy in force and the file it stands for.
fn applied_text(att: &Attachment, state: &State) -> Result<(String, String), SuggestError> {
    let path = crate::attachment::history::at(att, state.generation)
        .map_or_else(|| PathBuf::from(&state.policy), |e| e.copy);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| SuggestError::PolicyText { path, source })?;
    Ok((text, state.policy.clone()))
}

/// Drains what waits in the kernel into the store, unless another process
/// is the flow log's primary (it drains at least every 10 s).
fn drain_pending(att: &Attachment) {
    let opts = flowlog::Options {
        flows: false,
        start: false,
        active_every: flowlog::ACTIVE_EVERY,
        denied_every: flowlog::DENIED_EVERY,
    };
    if let Ok(mut log) = FlowLog::open(att, opts)
        && log.is_primary()
        && let Err(e) = log.finish()
    {
        tracing::warn!("draining the denied tables of {}: {e}", att.describe());
    }
}

/// The interface's addresses (for a new role's `hosts`).
fn local_addresses(state: &State) -> Vec<String> {
    crate::host::netif::addresses(&state.iface)
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The sets and rules to add, as text.
struct Additions<'a> {
    policy: &'a Policy,
    role: String,
    sets: String,
    rules: String,
    /// Each added set and its addresses as a TOML list body.
    lists: Vec<(String, String)>,
    names: BTreeSet<String>,
}

impl<'a> Additions<'a> {
    fn new(policy: &'a Policy, role: &str) -> Self {
        let mut names: BTreeSet<String> = policy.sets.iter().map(|s| s.name.clone()).collect();
        names.extend(policy.rules.iter().filter_map(|r| r.name.clone()));
        Additions {
            policy,
            role: role.to_string(),
            sets: String::new(),
            rules: String::new(),
            lists: Vec::new(),
            names,
        }
    }

    fn unique(&mut self, base: &str) -> String {
        let mut n = 1;
        loop {
            let name = format!("{base}_{n}");
            if self.names.insert(name.clone()) {
                return name;
            }
            n += 1;
        }
    }

    fn rule(&mut self, dir: Direction, services: &[Service], members: &[Member]) {
        let d = dir.as_str();
        let set = self.unique(&format!("seen_{}_{d}", sanitize(&self.role)));
        let name = self
            .unique(&format!("suggested_{}_{d}", sanitize(&self.role)))
            .replace('_', "-");
        let first = members
            .iter()
            .map(|(_, s)| s.first.as_str())
            .min()
            .unwrap_or("");
        let last = members
            .iter()
            .map(|(_, s)| s.last.as_str())
            .max()
            .unwrap_or("");
        let packets: u64 = members.iter().map(|(_, s)| s.attempts).sum();
        let what = describe(services);
        let addrs: Vec<String> = members.iter().map(|(ip, _)| format!("\"{ip}\"")).collect();
        self.lists.push((set.clone(), addrs.join(", ")));
        let _ = writeln!(
            self.sets,
            "# {} peer(s) seen {} on {what}, {first} to {last}\n{set} = [{}]",
            members.len(),
            if dir == Direction::Ingress {
                "connecting in"
            } else {
                "connected to"
            },
            addrs.join(", ")
        );
        let peer_key = if dir == Direction::Ingress {
            "from"
        } else {
            "to"
        };
        let _ = write!(
            self.rules,
            "\n# {} packet(s) of denied connection attempts, {first} to {last}.\n\
             [[roles.{}.{d}]]\n\
             name = \"{name}\"\n\
             description = \"denied attempts on {what} {} {} peer(s), {first} to {last}\"\n\
             {peer_key} = \"{set}\"\n",
            packets,
            self.role,
            if dir == Direction::Ingress {
                "from"
            } else {
                "to"
            },
            members.len(),
        );
        for (key, ports) in port_lists(services) {
            let _ = writeln!(self.rules, "{key} = [{ports}]");
        }
        if services.iter().any(|s| s.proto == IPPROTO_ICMP) {
            let _ = writeln!(self.rules, "icmp = true");
        }
        if services.iter().any(|s| s.proto == IPPROTO_ICMPV6) {
            let _ = writeln!(self.rules, "icmpv6 = true");
        }
    }

    /// The policy text with the additions: sets right after the `[sets]`
    /// header (or in a new `[sets]` table), rules at the end, and a new
    /// role when the host had none.
    fn finish(self, text: &str, header: &str, new_role_hosts: Option<&[String]>) -> String {
        if self.rules.is_empty() {
            return format!("{text}\n{header}# Nothing was denied: nothing to add.\n");
        }
        let mut out = String::new();
        let sets_header = text.lines().position(|l| {
            let t = l.trim();
            t == "[sets]" || (t.starts_with("[sets]") && t[6..].trim_start().starts_with('#'))
        });
        let mut rules = self.rules.clone();
        if let Some(i) = sets_header {
            for (n, l) in text.lines().enumerate() {
                out.push_str(l);
                out.push('\n');
                if n == i {
                    out.push_str(&self.sets);
                }
            }
            out.push('\n');
            out.push_str(header);
        } else {
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
            out.push('\n');
            out.push_str(header);
            if self.policy.sets.is_empty() {
                let _ = write!(out, "[sets]\n{}", self.sets);
            } else {
                // Sets written another way (inline, dotted keys): a second
                // [sets] table would not parse, so the rules list the
                // addresses themselves.
                for (set, list) in &self.lists {
                    rules = rules.replace(&format!("= \"{set}\"\n"), &format!("= [{list}]\n"));
                }
            }
        }
        if let Some(hosts) = new_role_hosts {
            let list: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
            let _ = write!(
                out,
                "\n# This host enforced no role: a new one for its addresses.\n[roles.{}]\nhosts = [{}]\n",
                self.role,
                list.join(", ")
            );
        }
        out.push_str(&rules);
        out
    }
}

/// The TCP and UDP ports of `services` as TOML list bodies, by protocol
/// name (protocols without ports left out).
fn port_lists(services: &[Service]) -> Vec<(&'static str, String)> {
    [("tcp", IPPROTO_TCP), ("udp", IPPROTO_UDP)]
        .into_iter()
        .filter_map(|(name, proto)| {
            let ports: Vec<u16> = services
                .iter()
                .filter(|s| s.proto == proto)
                .map(|s| s.port)
                .collect();
            (!ports.is_empty()).then(|| (name, port_list(&ports)))
        })
        .collect()
}

/// `tcp/5432 udp/53` style description.
fn describe(services: &[Service]) -> String {
    let mut parts = Vec::new();
    for (name, ports) in port_lists(services) {
        parts.push(format!(
            "{name}/{}",
            ports.replace('"', "").replace(", ", ",")
        ));
    }
    if services.iter().any(|s| s.proto == IPPROTO_ICMP) {
        parts.push("icmp".into());
    }
    if services.iter().any(|s| s.proto == IPPROTO_ICMPV6) {
        parts.push("icmpv6".into());
    }
    parts.join(" ")
}

/// Sorted ports as a TOML list body: runs of three or more consecutive
/// ports (every one of them seen) as `"lo-hi"`.
fn port_list(ports: &[u16]) -> String {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            out.push(format!("\"{}-{}\"", ports[i], ports[j]));
            i = j + 1;
        } else {
            out.push(ports[i].to_string());
            i += 1;
        }
    }
    out.join(", ")
}

/// Parses and compiles the suggestion for `role`.
fn check(text: &str, source: &str, role: &str) -> Result<(), SuggestError> {
    let policy = Policy::from_str(text, &format!("suggestion for {source}"))
        .map_err(|e| SuggestError::Compile(e.to_string()))?;
    let roles = vec![role.to_string()];
    compile::compile(&policy, &roles, None, 0, 1, Capacity::for_policy(&policy))
        .map_err(|e| SuggestError::Compile(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runs_of_seen_ports_become_ranges() {
        assert_eq!(
            port_list(&[5432, 22, 8080, 8081, 8082, 9000, 9001]),
            "22, 5432, \"8080-8082\", 9000, 9001"
        );
    }

    #[test]
    fn sets_go_under_the_sets_header_and_rules_at_the_end() {
        let text = "version = 1\n[sets]\napp = [\"198.18.0.20\"]\n[defaults]\ningress = \"drop\"\negress = \"drop\"\n[roles.db]\nhosts = \"any\"\n";
        let policy = Policy::from_str(text, "t").expect("parses");
        let mut a = Additions::new(&policy, "db");
        let seen = Seen {
            services: [Service {
                proto: IPPROTO_TCP,
                port: 5432,
            }]
            .into(),
            attempts: 3,
            first: "2026-11-22T08:00:00Z".into(),
            last: "2026-11-22T08:01:00Z".into(),
        };
        let ip: IpAddr = "198.18.0.20".parse().expect("ip");
        a.rule(
            Direction::Ingress,
            &[Service {
                proto: IPPROTO_TCP,
                port: 5432,
            }],
            &[(ip, &seen)],
        );
        let out = a.finish(text, "# header\n", None);
        check(&out, "t", "db").expect("the result compiles");
        let p = Policy::from_str(&out, "t").expect("parses");
        let r = p
            .rules
            .iter()
            .find(|r| r.name.as_deref() == Some("suggested-db-ingress-1"))
            .expect("rule");
        assert_eq!(r.peer_text, "seen_db_ingress_1");
        assert!(
            out.find("seen_db_ingress_1 = [") < out.find("[defaults]"),
            "{out}"
        );
    }
}
