//! Flows: a snapshot of an attachment's connection tables with each
//! flow's accounting, like `conntrack -L`, for `segbpf flows`.
//!
//! The kernel counts, in each connection-table entry, the packets and bytes
//! of each direction (the originator's and the replier's), the OR of the
//! TCP flags seen, the first and last packet times, and the rule that let
//! the first packet through. Entries whose timeout has passed are left out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use segbpf_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_NEW, CtEntry, CtKey, DIR_INGRESS, IPPROTO_TCP, IPPROTO_UDP,
    MAP_CT, MAP_CT_NEW, NO_RULE, ct_timeout_s,
};
use serde::Serialize;

use crate::{
    clock,
    maps::{self, MapsError},
    pins::Attachment,
    proto::proto_name,
    state::State,
};

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
    /// `assured` (both sides spoke, then the originator again) or `half-open`.
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
    /// TCP flags seen, as letters (`S`, `A`, `F`, `R`, `P`, `U`), both sides.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tcp_flags: String,
    /// The rule that let the first packet through: its name, else its
    /// label; absent when a default let it through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
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
    for (name, table) in [(MAP_CT, "assured"), (MAP_CT_NEW, "half-open")] {
        let err = |source| MapsError::Map { map: name, source };
        let data = MapData::from_pin(att.map(name)).map_err(err)?;
        let ct: BpfHashMap<MapData, CtKey, CtEntry> =
            BpfHashMap::try_from(Map::LruHashMap(data)).map_err(err)?;
        for (k, e) in ct.iter().flatten() {
            let ttl_ns = u64::from(ct_timeout_s(&cfg, k.proto, e.state)) * 1_000_000_000;
            if now.saturating_sub(e.last_seen_ns) > ttl_ns {
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

/// One flow record of `segbpf flows --follow` (JSON Lines).
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// When the record was made, RFC 3339.
    pub time: String,
    /// The interface.
    pub iface: String,
    /// `start` (a new flow), `active` (periodic, while it lives) or `end`
    /// (closed by FIN/RST, expired, evicted or pruned).
    pub state: &'static str,
    /// `accept`: the flow was let through.
    pub action: &'static str,
    /// The flow and its counters.
    #[serde(flatten)]
    pub flow: Flow,
}

/// How [`Follower`] reports.
#[derive(Clone, Copy, Debug)]
pub struct FollowOptions {
    /// A record when a flow is first seen.
    pub start: bool,
    /// An `active` record of each live flow this often.
    pub active_every: std::time::Duration,
}

/// Turns successive snapshots into flow records.
#[derive(Debug)]
pub struct Follower {
    opts: FollowOptions,
    iface: String,
    seen: std::collections::HashMap<FlowId, (Flow, std::time::Instant)>,
}

impl Follower {
    /// A follower of `att`'s flows.
    pub fn new(att: &Attachment, opts: FollowOptions) -> Self {
        Follower {
            opts,
            iface: att.iface.clone(),
            seen: std::collections::HashMap::new(),
        }
    }

    /// The records due since the last call, given the flows now.
    pub fn step(&mut self, now: Vec<(FlowId, Flow)>) -> Vec<Record> {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let mut live = std::collections::HashSet::new();
        for (id, f) in now {
            live.insert(id);
            let closing = f.state == "closing";
            match self.seen.get_mut(&id) {
                None => {
                    if self.opts.start {
                        out.push(self.record("start", &f));
                    }
                    if closing {
                        out.push(self.record("end", &f));
                    }
                    self.seen.insert(id, (f, t));
                }
                Some((last, _)) if last.state == "closing" => *last = f,
                Some((last, emitted)) => {
                    if closing {
                        *last = f;
                        let f = last.clone();
                        out.push(self.record("end", &f));
                    } else if t.duration_since(*emitted) >= self.opts.active_every {
                        *emitted = t;
                        *last = f;
                        let f = last.clone();
                        out.push(self.record("active", &f));
                    } else {
                        *last = f;
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
            if let Some((f, _)) = self.seen.remove(&id)
                && f.state != "closing"
            {
                out.push(self.record("end", &f));
            }
        }
        out
    }

    fn record(&self, state: &'static str, f: &Flow) -> Record {
        Record {
            time: clock::rfc3339(std::time::SystemTime::now()),
            iface: self.iface.clone(),
            state,
            action: "accept",
            flow: f.clone(),
        }
    }
}

fn flow(k: &CtKey, e: &CtEntry, table: &'static str, state: Option<&State>) -> Flow {
    let addr = |b: [u8; 16]| -> IpAddr {
        if k.family == 4 {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(b))
        }
    };
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
    let rule = (e.rule_id != NO_RULE).then(|| {
        state.and_then(|s| s.rule(e.rule_id)).map_or_else(
            || format!("#{}", e.rule_id),
            |r| r.display_name().to_string(),
        )
    });
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
        tcp_flags: if k.proto == IPPROTO_TCP {
            crate::proto::tcp_flag_letters(e.tcp_flags)
        } else {
            String::new()
        },
        rule,
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
        let att = crate::pins::Roots {
            bpffs: "/nonexistent".into(),
            state: "/nonexistent".into(),
        }
        .attachment(
            "eth0",
            &crate::netns::Netns {
                inode: 1,
                cookie: 1,
                label: None,
            },
        );
        let mut f = Follower::new(
            &att,
            FollowOptions {
                start: true,
                active_every: std::time::Duration::ZERO,
            },
        );
        let open = CtEntry {
            state: CT_ESTABLISHED,
            first_seen_ns: 5,
            packets: [1, 1],
            ..CtEntry::default()
        };
        let closing = CtEntry {
            state: CT_CLOSING,
            packets: [4, 3],
            ..open
        };
        let states = |rs: Vec<Record>| rs.iter().map(|r| r.state).collect::<Vec<_>>();
        assert_eq!(states(f.step(vec![sample(open)])), ["start"]);
        assert_eq!(states(f.step(vec![sample(open)])), ["active"]);
        let end = f.step(vec![sample(closing)]);
        assert_eq!(states(end.clone()), ["end"]);
        assert_eq!(end[0].flow.packets_orig, 4);
        assert!(f.step(vec![sample(closing)]).is_empty(), "one end per flow");
        assert!(
            f.step(vec![]).is_empty(),
            "its disappearance says nothing more"
        );
        // A flow that leaves the table without a close ends too.
        assert_eq!(states(f.step(vec![sample(open)])), ["start"]);
        assert_eq!(states(f.step(vec![])), ["end"]);
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
        assert_eq!((f.tcp_flags.as_str(), f.rule), ("SA", None));
    }
}
