//! Flows: a snapshot of an attachment's connection tables with each
//! flow's accounting, like `conntrack -L`, for `segbpf flows`.
//!
//! The kernel counts, in each connection-table entry, the packets and bytes
//! of each direction (the originator's and the replier's), the OR of the
//! TCP flags seen, the first and last packet times, and the rule that let
//! the first packet through. Entries whose timeout has passed are left out.

use std::net::IpAddr;

use segbpf_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_NEW, CtEntry, CtKey, DIR_INGRESS, IPPROTO_TCP, IPPROTO_UDP,
    NO_RULE, ct_entry_live,
};
use serde::Serialize;

use crate::{
    attachment::maps::{self, MapsError},
    attachment::pins::Attachment,
    attachment::state::State,
    host::clock,
    host::proto::proto_name,
};

/// What `flows` and `monitor` show (`--port`, `--peer`, `--verdict`,
/// `--rule`, as `hubble observe` filters): a record is shown when it
/// matches every filter given, and a filter given more than once matches
/// any of its values. An empty filter shows everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Either end's port (ICMP: the echo id or type, as the record has it).
    pub ports: Vec<u16>,
    /// Either end's address is in one of these.
    pub peers: Vec<crate::policy::AddrRange>,
    /// `allow`, `drop` or `audit` (audit mode let through what the policy drops).
    pub verdict: Option<FilterVerdict>,
    /// The rule that let the flow through: its name, label or id.
    pub rules: Vec<String>,
}

/// The verdicts a [`Filter`] selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FilterVerdict {
    /// Let through by the policy.
    Allow,
    /// Dropped by the policy (in audit mode too).
    Drop,
    /// Let through by audit mode although the policy drops it.
    Audit,
}

impl Filter {
    /// Whether no filter is given.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.peers.is_empty()
            && self.verdict.is_none()
            && self.rules.is_empty()
    }

    /// The common test: ports, addresses, verdict (`drop`, `allow`) with
    /// audit, and the rule.
    /// The common test of [`Filter::flow`] and of flow records' and
    /// events' own (`flowlog`, `telemetry`).
    pub fn matches(
        &self,
        ports: [Option<u16>; 2],
        addrs: [Option<IpAddr>; 2],
        verdict_drop: bool,
        audit: bool,
        rule: Option<&crate::policy::compile::RuleJson>,
    ) -> bool {
        let port_ok =
            self.ports.is_empty() || ports.iter().flatten().any(|p| self.ports.contains(p));
        let peer_ok = self.peers.is_empty()
            || addrs
                .iter()
                .flatten()
                .any(|a| self.peers.iter().any(|r| r.contains(*a)));
        let verdict_ok = match self.verdict {
            None => true,
            Some(FilterVerdict::Allow) => !verdict_drop,
            Some(FilterVerdict::Drop) => verdict_drop,
            Some(FilterVerdict::Audit) => audit,
        };
        let rule_ok = self.rules.is_empty()
            || rule.is_some_and(|r| {
                self.rules.iter().any(|want| {
                    r.name.as_deref() == Some(want)
                        || r.label.as_deref() == Some(want)
                        || want.trim_start_matches('#') == r.id.to_string()
                })
            });
        port_ok && peer_ok && verdict_ok && rule_ok
    }

    /// Whether a tracked flow is shown.
    pub fn flow(&self, f: &Flow) -> bool {
        self.matches(
            [Some(f.sport), Some(f.dport)],
            [Some(f.src), Some(f.dst)],
            f.audit,
            f.audit,
            f.rule.as_ref(),
        )
    }
}

/// Errors reading the flows.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// Nothing to read.
    #[error("segbpf is not attached to {0}")]
    NotAttached(String),
    /// A table could not be read.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// One tracked flow.
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    /// Protocol name (`tcp`, `udp`, `icmp`, `icmpv6`) or number.
    pub proto: String,
    /// The side that sent the first packet.
    pub src: IpAddr,
    /// Its port (ICMP echo: the echo id).
    pub sport: u16,
    /// The other side.
    pub dst: IpAddr,
    /// Its port (0 for ICMP echo).
    pub dport: u16,
    /// `ingress` (a peer opened it) or `egress` (this host opened it).
    pub opened_by: &'static str,
    /// Connection state: `new` (no reply yet), `established` or `closing`
    /// (`ct_state`: a flow record's `state` is the record's kind).
    #[serde(rename = "ct_state")]
    pub state: &'static str,
    /// `assured` (both sides spoke, then the originator acknowledged the
    /// reply) or `half-open` (no acknowledged reply yet, or closing).
    pub table: &'static str,
    /// Packets from the originator.
    pub packets_orig: u64,
    /// Bytes (frame lengths) from the originator.
    pub bytes_orig: u64,
    /// Packets from the replier.
    pub packets_reply: u64,
    /// Bytes from the replier.
    pub bytes_reply: u64,
    /// Time of the first packet, RFC 3339.
    pub first_seen: String,
    /// Time of the last packet, RFC 3339.
    pub last_seen: String,
    /// The same, monotonic ns (for the follower).
    #[serde(skip)]
    pub last_seen_ns: u64,
    /// TCP flags seen, both sides, by name (`SYN`, `ACK`, `FIN`, `RST`,
    /// `PSH`, `URG`, `ECE`, `CWR`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<&'static str>,
    /// The rule that let the first packet through (docs/json.md's rule
    /// object); absent when a default let it through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<crate::policy::compile::RuleJson>,
    /// The role whose rule let the first packet through (`base` for a
    /// base rule); absent when a default let it through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Audit mode let the flow through although the policy would have
    /// dropped its first packet.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}

/// The live flows of `att`, oldest first.
pub fn snapshot(att: &Attachment) -> Result<Vec<Flow>, FlowsError> {
    Ok(snapshot_keyed(att)?.into_iter().map(|(_, f)| f).collect())
}

/// What identifies one flow over time: its key and its first packet's
/// time (a tuple reused by a new connection is a new flow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId {
    key: CtKey,
    first_seen_ns: u64,
}

/// Like [`snapshot`], with each flow's identity.
pub fn snapshot_keyed(att: &Attachment) -> Result<Vec<(FlowId, Flow)>, FlowsError> {
    if !att.is_attached() {
        return Err(FlowsError::NotAttached(att.describe()));
    }
    let cfg = maps::pinned_config(att)?;
    let state = State::current(att).ok();
    let now = clock::monotonic_ns();
    let mut out = Vec::new();
    // Both families' tables (`crate::attachment::cttables`): IPv4 keys
    // read widened to `CtKey`.
    for (t, entries) in crate::attachment::cttables::read_all_pinned(att)? {
        let table = if t.assured { "assured" } else { "half-open" };
        for (k, e) in entries {
            // The tables are the namespace's: this interface's flows only
            // (none when the state, which names the interface, is unreadable).
            if state.as_ref().is_none_or(|s| s.ifindex != k.ifindex) {
                continue;
            }
            // The datapath's rule: an expired entry (or an audit one
            // once audit mode is off) is no flow, although still stored.
            if !ct_entry_live(&cfg, k.proto, &e, now) {
                continue;
            }
            let id = FlowId {
                key: k,
                first_seen_ns: e.first_seen_ns,
            };
            out.push((id, flow(&k, &e, table, state.as_ref())));
        }
    }
    out.sort_by(|a, b| a.1.first_seen.cmp(&b.1.first_seen));
    Ok(out)
}

/// How [`Follower`] reports.
#[derive(Clone, Copy, Debug)]
pub struct FollowOptions {
    /// A record when a flow is first seen.
    pub start: bool,
    /// An `active` record of each live flow this often.
    pub active_every: std::time::Duration,
}

/// How long a closed flow stays quiet before its `end` record (the
/// closing table timeout is 10 s, so it ends before it expires).
const CLOSE_SETTLE_NS: u64 = 3_000_000_000;

/// Which record a flow is due: `start`, `active` or `end` (see
/// `docs/flows.md`), with the flow as it is now.
pub type Due = (&'static str, Flow);

/// Turns successive snapshots into the records due.
#[derive(Debug)]
pub struct Follower {
    opts: FollowOptions,
    /// Each flow seen: as last seen, its last record's time, and whether it ended.
    seen: std::collections::HashMap<FlowId, (Flow, std::time::Instant, bool)>,
}

impl Follower {
    /// A follower reporting by `opts`.
    pub fn new(opts: FollowOptions) -> Self {
        Follower {
            opts,
            seen: std::collections::HashMap::new(),
        }
    }

    /// The records due since the last call, given the flows now.
    pub fn step(&mut self, now: Vec<(FlowId, Flow)>) -> Vec<Due> {
        self.step_at(now, clock::monotonic_ns())
    }

    /// [`Follower::step`] at monotonic time `mono_ns`.
    fn step_at(&mut self, now: Vec<(FlowId, Flow)>, mono_ns: u64) -> Vec<Due> {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let mut live = std::collections::HashSet::new();
        for (id, f) in now {
            live.insert(id);
            // A closed flow ends once its last packets (the final ACKs)
            // are behind it, so the end record has its final counters.
            let settled =
                f.state == "closing" && mono_ns.saturating_sub(f.last_seen_ns) >= CLOSE_SETTLE_NS;
            match self.seen.get_mut(&id) {
                None => {
                    if self.opts.start {
                        out.push(self.record("start", &f));
                    }
                    if settled {
                        out.push(self.record("end", &f));
                    }
                    self.seen.insert(id, (f, t, settled));
                }
                Some((last, _, true)) => *last = f,
                Some((last, emitted, ended)) => {
                    let closing = f.state == "closing";
                    *last = f;
                    if settled {
                        *ended = true;
                        let f = last.clone();
                        out.push(self.record("end", &f));
                    } else if !closing && t.duration_since(*emitted) >= self.opts.active_every {
                        *emitted = t;
                        let f = last.clone();
                        out.push(self.record("active", &f));
                    }
                }
            }
        }
        // Gone from the tables (expired, evicted, pruned): an end record
        // with the last counters, unless one was given at its close.
        let gone: Vec<FlowId> = self
            .seen
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some((f, _, false)) = self.seen.remove(&id) {
                out.push(self.record("end", &f));
            }
        }
        out
    }

    #[allow(
        clippy::unused_self,
        reason = "kept a method so every record is made one way"
    )]
    fn record(&self, state: &'static str, f: &Flow) -> Due {
        (state, f.clone())
    }
}

fn flow(k: &CtKey, e: &CtEntry, table: &'static str, state: Option<&State>) -> Flow {
    let addr = |b| crate::host::proto::ip_from(k.family, b);
    let (local, remote) = (addr(k.local), addr(k.remote));
    let ingress = e.origin == DIR_INGRESS;
    let (src, sport, dst, dport) = if ingress {
        (remote, k.remote_port, local, k.local_port)
    } else {
        (local, k.local_port, remote, k.remote_port)
    };
    let (src, sport, dst, dport) = if matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP) {
        (src, sport, dst, dport)
    } else {
        // ICMP echo: the id is the local "port" whichever side asked.
        (src, k.local_port, dst, 0)
    };
    let wall = |ns: u64| clock::rfc3339(clock::wall_of_monotonic(ns));
    let info = state.and_then(|s| s.rule(e.rule_id));
    let rule =
        (e.rule_id != NO_RULE).then(|| crate::policy::compile::RuleJson::new(e.rule_id, info));
    let role = info.map(|r| r.owner_role().to_string());
    Flow {
        proto: proto_name(k.proto),
        src,
        sport,
        dst,
        dport,
        opened_by: if ingress { "ingress" } else { "egress" },
        state: match e.state {
            CT_NEW => "new",
            CT_ESTABLISHED => "established",
            CT_CLOSING => "closing",
            _ => "unknown",
        },
        table,
        packets_orig: e.packets[0],
        bytes_orig: e.bytes[0],
        packets_reply: e.packets[1],
        bytes_reply: e.bytes[1],
        first_seen: wall(e.first_seen_ns),
        last_seen: wall(e.last_seen_ns),
        last_seen_ns: e.last_seen_ns,
        tcp_flags: if k.proto == IPPROTO_TCP {
            crate::host::proto::tcp_flag_names(e.tcp_flags)
        } else {
            Vec::new()
        },
        rule,
        role,
        audit: e.audit != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: CtEntry) -> (FlowId, Flow) {
        let k = CtKey {
            family: 4,
            proto: IPPROTO_TCP,
            local_port: 80,
            remote_port: 4000,
            ..CtKey::default()
        };
        let id = FlowId {
            key: k,
            first_seen_ns: state.first_seen_ns,
        };
        (id, flow(&k, &state, "assured", None))
    }

    #[test]
    fn a_follower_starts_reports_and_ends_each_flow_once() {
        let mut f = Follower::new(FollowOptions {
            start: true,
            active_every: std::time::Duration::ZERO,
        });
        let open = CtEntry {
            state: CT_ESTABLISHED,
            first_seen_ns: 5,
            packets: [1, 1],
            ..CtEntry::default()
        };
        let closing = CtEntry {
            state: CT_CLOSING,
            packets: [4, 3],
            last_seen_ns: 10 * 1_000_000_000,
            ..open
        };
        let last_ack = CtEntry {
            packets: [5, 3],
            ..closing
        };
        let at = |s: u64| 10 * 1_000_000_000 + s * 1_000_000_000;
        let states = |rs: Vec<Due>| rs.iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(states(f.step_at(vec![sample(open)], at(0))), ["start"]);
        assert_eq!(states(f.step_at(vec![sample(open)], at(0))), ["active"]);
        assert!(
            f.step_at(vec![sample(closing)], at(0)).is_empty(),
            "a flow just closed waits for its last packets"
        );
        let end = f.step_at(vec![sample(last_ack)], at(4));
        assert_eq!(states(end.clone()), ["end"]);
        assert_eq!(end[0].1.packets_orig, 5, "the final counters");
        assert!(
            f.step_at(vec![sample(last_ack)], at(5)).is_empty(),
            "one end per flow"
        );
        assert!(
            f.step_at(vec![], at(6)).is_empty(),
            "its disappearance says nothing more"
        );
        // A flow that leaves the table without a settled close ends too.
        assert_eq!(states(f.step_at(vec![sample(open)], at(7))), ["start"]);
        assert_eq!(states(f.step_at(vec![], at(7))), ["end"]);
    }

    #[test]
    fn a_flow_reads_from_its_originator() {
        let mut k = CtKey {
            family: 4,
            proto: IPPROTO_TCP,
            local_port: 8080,
            remote_port: 40000,
            ..CtKey::default()
        };
        k.local[..4].copy_from_slice(&[198, 18, 0, 10]);
        k.remote[..4].copy_from_slice(&[198, 18, 0, 5]);
        let e = CtEntry {
            origin: DIR_INGRESS,
            state: CT_ESTABLISHED,
            rule_id: NO_RULE,
            packets: [3, 2],
            bytes: [200, 9000],
            tcp_flags: 0x12,
            ..CtEntry::default()
        };
        let f = flow(&k, &e, "assured", None);
        assert_eq!(
            (f.src.to_string(), f.sport, f.dst.to_string(), f.dport),
            ("198.18.0.5".into(), 40000, "198.18.0.10".into(), 8080)
        );
        assert_eq!(
            (f.opened_by, f.state, f.bytes_reply),
            ("ingress", "established", 9000)
        );
        assert_eq!((f.tcp_flags, f.rule), (vec!["SYN", "ACK"], None));
    }

    #[test]
    fn filters_select_by_port_peer_verdict_and_rule() {
        use super::{Filter, FilterVerdict};
        use crate::policy::compile::RuleJson;
        let flow = |dport: u16, audit: bool, rule: Option<&str>| super::Flow {
            proto: "tcp".into(),
            src: "198.18.0.9".parse().unwrap(),
            sport: 40000,
            dst: "198.18.0.1".parse().unwrap(),
            dport,
            opened_by: "ingress",
            state: "established",
            table: "assured",
            packets_orig: 1,
            bytes_orig: 60,
            packets_reply: 1,
            bytes_reply: 60,
            first_seen: String::new(),
            last_seen: String::new(),
            last_seen_ns: 0,
            tcp_flags: vec!["SYN"],
            rule: rule.map(|n| RuleJson {
                id: 3,
                name: Some(n.into()),
                label: Some("roles.web.ingress[0]".into()),
                ..RuleJson::default()
            }),
            role: None,
            audit,
        };
        let web = flow(443, false, Some("web-in"));
        let audited = flow(8080, true, None);
        assert!(Filter::default().is_empty() && Filter::default().flow(&web));
        let f = Filter {
            ports: vec![443],
            ..Filter::default()
        };
        assert!(f.flow(&web) && !f.flow(&audited));
        let f = Filter {
            ports: vec![40000],
            ..Filter::default()
        };
        assert!(f.flow(&web), "either end's port");
        let f = Filter {
            peers: vec!["198.18.0.8/29".parse().unwrap()],
            ..Filter::default()
        };
        assert!(f.flow(&web));
        let f = Filter {
            peers: vec!["198.19.0.0/16".parse().unwrap()],
            ..Filter::default()
        };
        assert!(!f.flow(&web));
        for (v, web_ok, audited_ok) in [
            (FilterVerdict::Allow, true, false),
            (FilterVerdict::Drop, false, true),
            (FilterVerdict::Audit, false, true),
        ] {
            let f = Filter {
                verdict: Some(v),
                ..Filter::default()
            };
            assert_eq!(
                (f.flow(&web), f.flow(&audited)),
                (web_ok, audited_ok),
                "{v:?}"
            );
        }
        for want in ["web-in", "roles.web.ingress[0]", "3", "#3"] {
            let f = Filter {
                rules: vec![want.into()],
                ..Filter::default()
            };
            assert!(f.flow(&web) && !f.flow(&audited), "{want}");
        }
        let f = Filter {
            ports: vec![443],
            verdict: Some(FilterVerdict::Drop),
            ..Filter::default()
        };
        assert!(!f.flow(&web), "every filter must match");
    }
}
