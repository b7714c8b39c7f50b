//! The flow log: records of every flow (`start`, `active`, `end`) and
//! aggregates of denied traffic (`denied`), as JSON Lines, for `segbpf
//! flows --follow` and `segbpf attach --flow-log PATH` (docs/flows.md).
//!
//! One process per attachment is the *primary*: it holds the attachment's
//! flow-log lock, drains the kernel's denied tables ([`crate::observe::denied`]),
//! appends the `denied` records to the observed store
//! ([`crate::attachment::observed`], which `segbpf suggest` reads) and keeps the
//! pairs file behind `new_pair`. Any other follower reads the `denied`
//! records from the store, and takes over as primary when the primary
//! goes away. Flow records come from each process's own walk of the
//! connection tables.

use std::{
    collections::{HashSet, VecDeque},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use segbpf_common::{DIR_INGRESS, EVENT_AUDIT, IPPROTO_TCP, reason};
use serde::{Deserialize, Serialize};

use crate::{
    attachment::maps::MapsError,
    attachment::observed,
    attachment::pins::{Attachment, LockKind},
    attachment::state::State,
    host::clock,
    host::proto::{proto_name, tcp_flag_names},
    observe::denied::{Denied, Drainer},
    observe::flows::{self, Flow, FlowsError, FollowOptions, Follower},
    policy::{AddrRange, Policy},
};

/// Errors of the flow log.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    /// Reading the connection tables failed (or the attachment is gone).
    #[error(transparent)]
    Flows(#[from] FlowsError),
    /// Reading the denied tables failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The observed store's cap is not a size (`SEGBPF_OBSERVED_MAX_BYTES`).
    #[error("observed store cap: {0}")]
    Cap(String),
    /// A file could not be opened or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How the flow log reports.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Records of flows (`start`, `active`, `end`) from the connection
    /// tables; without it, only `denied` records.
    pub flows: bool,
    /// A `start` record when a flow is first seen.
    pub start: bool,
    /// An `active` record of each live flow this often.
    pub active_every: Duration,
    /// `denied` aggregates this often (at most 10 s).
    pub denied_every: Duration,
}

/// Default interval of `active` records.
pub const ACTIVE_EVERY: Duration = Duration::from_mins(1);
/// Default (and longest) interval of `denied` aggregates.
pub const DENIED_EVERY: Duration = Duration::from_secs(10);

/// One flow record (docs/flows.md has every field and its AWS VPC Flow
/// Logs and OCSF counterparts).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The JSON dialect's version ([`crate::JSON_SCHEMA`], docs/json.md).
    #[serde(default)]
    pub schema: u32,
    /// When the record was made, RFC 3339.
    pub time: String,
    /// The host's name.
    #[serde(default)]
    pub host: String,
    /// The interface.
    pub iface: String,
    /// The interface's network namespace: its label (`ip netns` name,
    /// `host`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The namespace's inode.
    #[serde(default)]
    pub netns_inode: u64,
    /// `start`, `active`, `end` or `denied`.
    pub state: String,
    /// The policy's verdict: `allow` (flows) or `drop` (denied packets).
    #[serde(default)]
    pub verdict: String,
    /// True when audit mode let through what the policy would have dropped.
    #[serde(default)]
    pub audit: bool,
    /// Protocol name (`tcp`, `udp`, `icmp`, `icmpv6`) or number.
    pub proto: String,
    /// The side that sent the first packet (absent for a packet that was
    /// not parsed as IP).
    pub src: Option<IpAddr>,
    /// Its port (ICMP echo: the echo id); absent in `denied` aggregates,
    /// which are per destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    /// The other side.
    pub dst: Option<IpAddr>,
    /// Its port (ICMP: the type in `denied` records, 0 for echo flows).
    pub dport: u16,
    /// `ingress` (a peer opened it, or the denied packet came in) or `egress`.
    pub opened_by: String,
    /// Packets from the originator.
    pub packets_orig: u64,
    /// Bytes (frame lengths) from the originator.
    pub bytes_orig: u64,
    /// Packets from the replier (0 in `denied` records).
    pub packets_reply: u64,
    /// Bytes from the replier.
    pub bytes_reply: u64,
    /// Time of the first packet, RFC 3339.
    pub first_seen: String,
    /// Time of the last packet, RFC 3339.
    pub last_seen: String,
    /// TCP flags seen, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
    /// The rule that let the flow through (docs/json.md's rule object;
    /// records of older versions named it by a string, read as its name).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::policy::compile::RuleJson::deserialize_compat"
    )]
    pub rule: Option<crate::policy::compile::RuleJson>,
    /// `denied`: why the packets were dropped (`default`, `invalid-rst`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `denied`: true when the counts are exact; false when the
    /// aggregate's kernel bucket was shared with another aggregate, so
    /// some of its packets may be among the unattributed ones (the
    /// `lost` line) and the counts are a lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<bool>,
    /// `denied`: the packets would have opened a flow (TCP SYN, UDP, ICMP
    /// echo request): connection attempts, not stray packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens_flow: Option<bool>,
    /// Flows: the connection state (`new`, `established`, `closing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_state: Option<String>,
    /// The policy's named sets that hold the peer, comma-separated;
    /// absent when none does.
    pub peer_set: Option<String>,
    /// The role whose rule let the flow through (`base` for base rules);
    /// else the roles this interface enforces, comma-separated.
    pub role: Option<String>,
    /// True the first time this attachment sees this (direction, peer set
    /// or peer address, protocol, port).
    pub new_pair: bool,
}

impl Record {
    /// The record's word in text lines (and in AWS VPC Flow Logs):
    /// `accept`, `reject` (dropped) or `audit`.
    pub fn action_word(&self) -> &'static str {
        if self.audit {
            "audit"
        } else if self.verdict == "allow" {
            "accept"
        } else {
            "reject"
        }
    }

    /// The peer: the source of what came in, the destination of what went out.
    pub fn peer(&self) -> Option<IpAddr> {
        if self.opened_by == "ingress" {
            self.src
        } else {
            self.dst
        }
    }
}

/// Denied packets the kernel did not attribute to an aggregate (their
/// bucket belonged to another aggregate, or a flood was kept on a
/// sample), or
/// records the flow log could not keep: a line of its own, so nothing is
/// lost silently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// The JSON dialect's version ([`crate::JSON_SCHEMA`], docs/json.md).
    #[serde(default = "json_schema")]
    pub schema: u32,
    /// When, RFC 3339.
    pub time: String,
    /// The interface.
    pub iface: String,
    /// Always `lost`.
    pub state: LostState,
    /// What was lost: `denied` (packets).
    pub what: LostWhat,
    /// How many (`shared` + `unsampled`).
    #[serde(default)]
    pub packets: u64,
    /// Of them: their kernel bucket belonged to another aggregate.
    #[serde(default)]
    pub shared: u64,
    /// Of them: not sampled while the kernel kept a flood on a sample
    /// (one drop in `segbpf_common::DENIED_SAMPLE` per CPU).
    #[serde(default)]
    pub unsampled: u64,
}

fn json_schema() -> u32 {
    crate::JSON_SCHEMA
}

/// The `state` of a [`Lost`] line: only `lost`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LostState {
    /// `lost`.
    Lost,
}

/// What a [`Lost`] line counts: only `denied` (packets) so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LostWhat {
    /// `denied`: denied packets.
    Denied,
}

impl std::fmt::Display for LostWhat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostWhat::Denied => "denied",
        })
    }
}

impl Lost {
    /// A `lost` line the primary wrote to the observed store, for a
    /// follower; `None` for any other line (a record, another `what`).
    pub fn parse(line: &str) -> Option<Lost> {
        serde_json::from_str(line).ok()
    }
}

/// One line of the flow log.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Line {
    /// A flow or denied record.
    Record(Box<Record>),
    /// A loss report.
    Lost(Lost),
}

/// What the records name: the policy's sets and the interface's roles,
/// as of the policy generation in force.
#[derive(Debug, Default)]
struct Context {
    /// The host's name, for every record.
    host: String,
    generation: Option<u64>,
    sets: Vec<(String, Vec<AddrRange>)>,
    roles: Option<String>,
    state: Option<State>,
}

impl Context {
    fn refresh(&mut self, att: &Attachment) {
        if self.host.is_empty() {
            // The UTS namespace's host name, as `hostname` prints it.
            self.host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
        }
        let state = State::current(att).ok();
        let generation = state.as_ref().map(|s| s.generation);
        if generation == self.generation && self.state.is_some() {
            return;
        }
        self.generation = generation;
        self.roles = state
            .as_ref()
            .filter(|s| !s.roles.is_empty())
            .map(|s| s.roles.join(","));
        self.sets = state
            .as_ref()
            .and_then(|s| applied_policy(att, s))
            .map(|p| p.sets.into_iter().map(|s| (s.name, s.ranges)).collect())
            .unwrap_or_default();
        self.state = state;
    }

    fn peer_set(&self, ip: Option<IpAddr>) -> Option<String> {
        let ip = ip?;
        let names: Vec<&str> = self
            .sets
            .iter()
            .filter(|(_, ranges)| ranges.iter().any(|r| r.contains(ip)))
            .map(|(n, _)| n.as_str())
            .collect();
        (!names.is_empty()).then(|| names.join(","))
    }
}

/// The policy in force on `att` (the history's copy of the applied text
/// with its set edits, else the policy file), if it can be read.
pub fn applied_policy(att: &Attachment, state: &State) -> Option<Policy> {
    let overrides = crate::attachment::swap::parse_overrides(&state.set_overrides).ok()?;
    let path = crate::attachment::history::at(att, state.generation)
        .map_or_else(|| PathBuf::from(&state.policy), |e| e.copy);
    Policy::load_with_sets(&path, &overrides).ok()
}

/// Most pairs remembered for `new_pair`; the oldest are forgotten first.
const MAX_PAIRS: usize = 100_000;

/// The pairs seen, in the order first seen.
#[derive(Debug)]
struct Pairs {
    order: VecDeque<String>,
    seen: HashSet<String>,
    dirty: bool,
}

impl Pairs {
    fn load(path: &std::path::Path) -> Self {
        let order: VecDeque<String> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Pairs {
            seen: order.iter().cloned().collect(),
            order,
            dirty: false,
        }
    }

    /// Whether `key` is new (and remembers it).
    fn observe(&mut self, key: String) -> bool {
        if self.seen.contains(&key) {
            return false;
        }
        if self.order.len() >= MAX_PAIRS
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        self.dirty = true;
        true
    }

    fn save(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.order)?)?;
        std::fs::rename(&tmp, path)?;
        self.dirty = false;
        Ok(())
    }
}

impl crate::observe::flows::Filter {
    /// Whether a flow record (`flows --follow`) is shown.
    pub fn record(&self, r: &Record) -> bool {
        self.matches(
            [r.sport, Some(r.dport)],
            [r.src, r.dst],
            r.verdict != "allow",
            r.audit,
            r.rule.as_ref(),
        )
    }
}

/// Where a process that is not the primary asks it to drain now (a token).
fn drain_request_path(att: &Attachment) -> std::path::PathBuf {
    att.observed_dir().with_extension("drain")
}

/// Where the primary writes the token of the last request it answered.
fn drain_done_path(att: &Attachment) -> std::path::PathBuf {
    att.observed_dir().with_extension("drained")
}

/// The token of a drain request not answered yet.
fn pending_drain_request(att: &Attachment) -> Option<String> {
    let token = std::fs::read_to_string(drain_request_path(att)).ok()?;
    let done = std::fs::read_to_string(drain_done_path(att)).unwrap_or_default();
    (!token.is_empty() && token != done).then_some(token)
}

/// How [`drain_now`] went.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// This process was the primary and drained the tables itself.
    Here,
    /// The primary drained them at this process's request.
    ByPrimary,
    /// The primary did not answer within the wait (an older segbpf, or
    /// a primary that is stuck): the store may lack the last interval.
    NoAnswer,
}

/// Makes what waits in the kernel's denied tables reach the observed
/// store now (`suggest`: data no older than the last second): drained
/// here when no other process is the primary, else the primary is asked
/// (it steps every second) and this waits up to `wait` for its answer.
pub fn drain_now(att: &Attachment, wait: Duration) -> Result<Drained, FlowLogError> {
    let opts = Options {
        flows: false,
        start: false,
        active_every: ACTIVE_EVERY,
        denied_every: DENIED_EVERY,
    };
    let mut log = FlowLog::open(att, opts)?;
    if log.is_primary() {
        log.finish()?;
        return Ok(Drained::Here);
    }
    drop(log);
    let token = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let path = drain_request_path(att);
    std::fs::write(&path, &token).map_err(|source| FlowLogError::Io {
        what: "asking the primary to drain",
        path: path.clone(),
        source,
    })?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if std::fs::read_to_string(drain_done_path(att)).is_ok_and(|d| d == token) {
            return Ok(Drained::ByPrimary);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Drained::NoAnswer)
}

/// The primary's part: the lock, the drainer and the store.
struct Primary {
    _lock: std::fs::File,
    drainer: Option<Drainer>,
    store: observed::Writer,
}

/// A flow log of one attachment.
pub struct FlowLog {
    att: Attachment,
    opts: Options,
    follower: Option<Follower>,
    primary: Option<Primary>,
    tail: Option<observed::Tail>,
    ctx: Context,
    pairs: Pairs,
    next_denied: Instant,
    store_cap: u64,
}

impl std::fmt::Debug for FlowLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowLog")
            .field("att", &self.att.describe())
            .field("primary", &self.primary.is_some())
            .finish_non_exhaustive()
    }
}

impl FlowLog {
    /// A flow log of `att`; it becomes the primary if no other process is.
    pub fn open(att: &Attachment, opts: Options) -> Result<Self, FlowLogError> {
        if !att.is_attached() {
            return Err(FlowsError::NotAttached(att.describe()).into());
        }
        let mut log = FlowLog {
            att: att.clone(),
            follower: opts.flows.then(|| {
                Follower::new(FollowOptions {
                    start: opts.start,
                    active_every: opts.active_every,
                })
            }),
            opts,
            primary: None,
            tail: None,
            ctx: Context::default(),
            pairs: Pairs::load(&att.pairs_file()),
            next_denied: Instant::now() + opts.denied_every.min(DENIED_EVERY),
            store_cap: observed::cap_from_env().map_err(FlowLogError::Cap)?,
        };
        log.try_become_primary()?;
        if log.primary.is_none() {
            log.tail = Some(observed::Tail::at_end(att.observed_dir()));
        }
        Ok(log)
    }

    /// Whether this process drains the denied tables.
    pub fn is_primary(&self) -> bool {
        self.primary.is_some()
    }

    fn try_become_primary(&mut self) -> Result<(), FlowLogError> {
        let io = |what, path: PathBuf| move |source| FlowLogError::Io { what, path, source };
        let lock = self
            .att
            .lock_file(LockKind::FlowLog)
            .map_err(io("opening", self.att.lock_path(LockKind::FlowLog)))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io("locking", self.att.lock_path(LockKind::FlowLog))(e));
            }
        }
        // Another primary may have remembered pairs since we loaded them.
        self.pairs = Pairs::load(&self.att.pairs_file());
        let drainer = match Drainer::open(&self.att) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(
                    "no denied aggregates for {}: {e} (the running programs predate them; `segbpf detach` and attach again)",
                    self.att.describe()
                );
                None
            }
        };
        self.primary = Some(Primary {
            _lock: lock,
            drainer,
            store: observed::Writer::new(self.att.observed_dir(), self.store_cap),
        });
        Ok(())
    }

    /// The lines due now. Call it about once a second.
    pub fn step(&mut self) -> Result<Vec<Line>, FlowLogError> {
        self.ctx.refresh(&self.att);
        let mut out = Vec::new();
        if let Some(follower) = &mut self.follower {
            let now = flows::snapshot_keyed(&self.att)?;
            for (state, f) in follower.step(now) {
                let r = self.flow_record(state, f);
                out.push(Line::Record(Box::new(r)));
            }
        }
        if self.primary.is_none() {
            if let Some(tail) = &mut self.tail {
                for l in tail.read_new() {
                    if let Ok(r) = serde_json::from_str::<Record>(&l) {
                        out.push(Line::Record(Box::new(r)));
                    } else if let Some(lost) = Lost::parse(&l) {
                        out.push(Line::Lost(lost));
                    }
                }
            }
            self.try_become_primary()?;
        }
        // A drain request (`suggest` while this process is the primary)
        // is answered at once rather than at the next interval.
        let requested = self
            .primary
            .is_some()
            .then(|| pending_drain_request(&self.att))
            .flatten();
        if self.primary.is_some() && (Instant::now() >= self.next_denied || requested.is_some()) {
            self.next_denied = Instant::now() + self.opts.denied_every.min(DENIED_EVERY);
            out.extend(self.drain()?);
            if let Some(token) = requested
                && let Err(e) = std::fs::write(drain_done_path(&self.att), token)
            {
                tracing::warn!("answering a drain request of {}: {e}", self.att.describe());
            }
        }
        if self.primary.is_some() {
            let path = self.att.pairs_file();
            if let Err(e) = self.pairs.save(&path) {
                tracing::warn!("saving {}: {e}", path.display());
            }
        }
        Ok(out)
    }

    /// A last drain (the primary's), when the log stops.
    pub fn finish(&mut self) -> Result<Vec<Line>, FlowLogError> {
        if self.primary.is_none() || !self.att.is_attached() {
            return Ok(Vec::new());
        }
        self.ctx.refresh(&self.att);
        let out = self.drain()?;
        let _ = self.pairs.save(&self.att.pairs_file());
        Ok(out)
    }

    fn drain(&mut self) -> Result<Vec<Line>, FlowLogError> {
        let Some(primary) = &mut self.primary else {
            return Ok(Vec::new());
        };
        let Some(drainer) = &mut primary.drainer else {
            return Ok(Vec::new());
        };
        let drained = drainer.drain()?;
        let mut aggregates = drained.aggregates;
        aggregates.sort_by_key(|a| a.first_ns);
        let mut out = Vec::new();
        let mut stored = Vec::new();
        for a in aggregates {
            let r = self.denied_record(&a);
            if let Ok(l) = serde_json::to_string(&r) {
                stored.push(l);
            }
            out.push(Line::Record(Box::new(r)));
        }
        if drained.lost > 0 {
            tracing::warn!(
                "{} denied packets on {} were not attributed to an aggregate: their kernel bucket belonged to another (the records marked \"exact\": false may be short of them)",
                drained.lost,
                self.att.describe()
            );
        }
        if drained.unsampled > 0 {
            tracing::info!(
                "{} denied packets on {} were counted but not attributed: a flood (over {} drops per CPU in {} ms) was aggregated on a sample of 1 in {}; this drain's records are marked \"exact\": false",
                drained.unsampled,
                self.att.describe(),
                segbpf_common::DENIED_EXACT_PER_TICK,
                (1u64 << segbpf_common::DENIED_TICK_SHIFT) / 1_000_000,
                segbpf_common::DENIED_SAMPLE
            );
        }
        if drained.lost + drained.unsampled > 0 {
            let lost = Lost {
                schema: crate::JSON_SCHEMA,
                time: clock::rfc3339(SystemTime::now()),
                iface: self.att.iface.clone(),
                state: LostState::Lost,
                what: LostWhat::Denied,
                packets: drained.lost + drained.unsampled,
                shared: drained.lost,
                unsampled: drained.unsampled,
            };
            // In the store too, so followers (`flows --follow` beside the
            // primary) show it; `suggest` reads only records.
            if let Ok(l) = serde_json::to_string(&lost) {
                stored.push(l);
            }
            out.push(Line::Lost(lost));
        }
        if let Some(primary) = &mut self.primary
            && let Err(e) = primary.store.append(&stored)
        {
            tracing::warn!(
                "observed store {}: {e}; {} denied records not kept for `segbpf suggest`",
                self.att.observed_dir().display(),
                stored.len()
            );
        }
        Ok(out)
    }

    fn pair(
        &mut self,
        dir: &str,
        peer: Option<IpAddr>,
        set: Option<&str>,
        proto: &str,
        port: u16,
    ) -> bool {
        let who = set.map_or_else(
            || peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
            str::to_string,
        );
        self.pairs.observe(format!("{dir}|{who}|{proto}|{port}"))
    }

    fn flow_record(&mut self, state: &'static str, f: Flow) -> Record {
        let peer = if f.opened_by == "ingress" {
            f.src
        } else {
            f.dst
        };
        let peer_set = self.ctx.peer_set(Some(peer));
        let new_pair = self.pair(
            f.opened_by,
            Some(peer),
            peer_set.as_deref(),
            &f.proto,
            f.dport,
        );
        Record {
            schema: crate::JSON_SCHEMA,
            time: clock::rfc3339(SystemTime::now()),
            host: self.ctx.host.clone(),
            iface: self.att.iface.clone(),
            netns: self.att.netns.label.clone(),
            netns_inode: self.att.netns.inode,
            state: state.to_string(),
            verdict: if f.audit { "drop" } else { "allow" }.to_string(),
            audit: f.audit,
            proto: f.proto,
            src: Some(f.src),
            sport: Some(f.sport),
            dst: Some(f.dst),
            dport: f.dport,
            opened_by: f.opened_by.to_string(),
            packets_orig: f.packets_orig,
            bytes_orig: f.bytes_orig,
            packets_reply: f.packets_reply,
            bytes_reply: f.bytes_reply,
            first_seen: f.first_seen,
            last_seen: f.last_seen,
            tcp_flags: f.tcp_flags.iter().map(|s| (*s).to_string()).collect(),
            rule: f.rule,
            reason: None,
            exact: None,
            opens_flow: None,
            ct_state: Some(f.state.to_string()),
            peer_set,
            role: f.role.or_else(|| self.ctx.roles.clone()),
            new_pair,
        }
    }

    fn denied_record(&mut self, a: &Denied) -> Record {
        let k = &a.key;
        let dir = if k.dir == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        let (src, dst) = (a.src(), a.dst());
        let peer = if k.dir == DIR_INGRESS { src } else { dst };
        let peer_set = self.ctx.peer_set(peer);
        let proto = proto_name(k.proto);
        let new_pair = self.pair(dir, peer, peer_set.as_deref(), &proto, k.dport);
        let wall = |ns: u64| clock::rfc3339(clock::wall_of_monotonic(ns));
        Record {
            schema: crate::JSON_SCHEMA,
            time: clock::rfc3339(SystemTime::now()),
            host: self.ctx.host.clone(),
            iface: self.att.iface.clone(),
            netns: self.att.netns.label.clone(),
            netns_inode: self.att.netns.inode,
            state: "denied".to_string(),
            verdict: "drop".to_string(),
            audit: k.kind == EVENT_AUDIT,
            proto,
            src,
            sport: None,
            dst,
            dport: k.dport,
            opened_by: dir.to_string(),
            packets_orig: a.packets,
            bytes_orig: a.bytes,
            packets_reply: 0,
            bytes_reply: 0,
            first_seen: wall(a.first_ns),
            last_seen: wall(a.last_ns),
            tcp_flags: if k.proto == IPPROTO_TCP {
                tcp_flag_names(a.tcp_flags)
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            },
            rule: None,
            reason: Some(reason::name(k.reason).to_string()),
            exact: Some(a.exact),
            opens_flow: Some(k.opens != 0),
            ct_state: None,
            peer_set,
            role: self.ctx.roles.clone(),
            new_pair,
        }
    }
}

/// A flow-log file: appended to, reopened on request (after logrotate
/// moved it away). Mode 0640: the records name hosts and ports.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: std::fs::File,
}

impl FileSink {
    /// Opens (creating) `path` for appending.
    pub fn open(path: PathBuf) -> Result<Self, FlowLogError> {
        let file = Self::open_file(&path)?;
        Ok(FileSink { path, file })
    }

    fn open_file(path: &std::path::Path) -> Result<std::fs::File, FlowLogError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| FlowLogError::Io {
                what: "opening flow log",
                path: path.to_path_buf(),
                source,
            })
    }

    /// Opens the path again (the old file may have been renamed).
    pub fn reopen(&mut self) -> Result<(), FlowLogError> {
        self.file = Self::open_file(&self.path)?;
        Ok(())
    }

    /// Appends `lines` in one write.
    pub fn write(&mut self, lines: &[Line]) -> Result<(), FlowLogError> {
        use std::io::Write as _;
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for l in lines {
            if let Ok(j) = serde_json::to_string(l) {
                text.push_str(&j);
                text.push('\n');
            }
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| FlowLogError::Io {
                what: "writing flow log",
                path: self.path.clone(),
                source,
            })
    }
}

/// A flow log running on its own thread (`segbpf attach`): it steps
/// every second, writes to its file if it has one, and stops with a last
/// drain.
#[derive(Debug)]
pub struct Runner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reopen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Runner {
    /// Starts a flow log of `att`; with `sink`, every line goes to it.
    pub fn spawn(
        att: &Attachment,
        opts: Options,
        sink: Option<FileSink>,
    ) -> Result<Self, FlowLogError> {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        };
        let mut log = FlowLog::open(att, opts)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reopen = Arc::new(AtomicBool::new(false));
        let (stop2, reopen2) = (stop.clone(), reopen.clone());
        let mut sink = sink;
        let thread = std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || {
                let write = |sink: &mut Option<FileSink>, lines: Vec<Line>| {
                    if let Some(s) = sink
                        && let Err(e) = s.write(&lines)
                    {
                        tracing::warn!("{e}; {} flow records lost", lines.len());
                    }
                };
                let mut last_error: Option<String> = None;
                loop {
                    if reopen2.swap(false, Ordering::Relaxed)
                        && let Some(s) = &mut sink
                        && let Err(e) = s.reopen()
                    {
                        tracing::warn!("{e}; still writing to the old file");
                    }
                    match log.step() {
                        Ok(lines) => write(&mut sink, lines),
                        Err(FlowLogError::Flows(FlowsError::NotAttached(_))) => return,
                        Err(e) => {
                            // Once per distinct failure, not every second.
                            let text = e.to_string();
                            if last_error.as_deref() != Some(&text) {
                                tracing::warn!("flow log: {text}");
                                last_error = Some(text);
                            }
                        }
                    }
                    for _ in 0..10 {
                        if stop2.load(Ordering::Relaxed) {
                            match log.finish() {
                                Ok(lines) => write(&mut sink, lines),
                                Err(e) => tracing::warn!("flow log: {e}"),
                            }
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|source| FlowLogError::Io {
                what: "starting the flow log thread for",
                path: att.state.clone(),
                source,
            })?;
        Ok(Runner {
            stop,
            reopen,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Reopens the file at its next step (SIGHUP, after logrotate).
    pub fn reopen(&self) {
        self.reopen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops after a last drain, and waits for it.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_lost_line_parses_back_and_prints_the_same() {
        let line = r#"{"schema":1,"time":"2026-12-06T09:50:40.263Z","iface":"eth0","state":"lost","what":"denied","packets":1234,"shared":34,"unsampled":1200}"#;
        let lost = Lost::parse(line).expect("a lost line");
        assert_eq!(lost.packets, 1234);
        assert_eq!(lost.shared, 34);
        assert_eq!(lost.unsampled, 1200);
        assert_eq!(lost.what.to_string(), "denied");
        assert_eq!(serde_json::to_string(&lost).ok().as_deref(), Some(line));
        assert_eq!(
            serde_json::to_string(&Line::Lost(lost)).ok().as_deref(),
            Some(line)
        );
    }

    #[test]
    fn a_record_or_another_loss_is_no_stored_lost_line() {
        let record = r#"{"schema":1,"time":"2026-12-06T09:50:40.263Z","host":"h","iface":"eth0","state":"denied","verdict":"drop","proto":"tcp","src":"198.18.0.1","dst":"198.18.0.2","packets":3,"bytes":180}"#;
        assert_eq!(Lost::parse(record), None);
        let other =
            r#"{"schema":1,"time":"t","iface":"eth0","state":"lost","what":"records","packets":1}"#;
        assert_eq!(Lost::parse(other), None);
        let not_lost =
            r#"{"schema":1,"time":"t","iface":"eth0","state":"end","what":"denied","packets":1}"#;
        assert_eq!(Lost::parse(not_lost), None);
        assert_eq!(Lost::parse("not json"), None);
    }

    #[test]
    fn pairs_are_new_once_and_bounded() {
        let mut p = Pairs {
            order: VecDeque::new(),
            seen: HashSet::new(),
            dirty: false,
        };
        assert!(p.observe("ingress|app|tcp|5432".into()));
        assert!(!p.observe("ingress|app|tcp|5432".into()));
        assert!(p.observe("ingress|app|tcp|3306".into()));
        for i in 0..MAX_PAIRS {
            p.observe(format!("k{i}"));
        }
        assert_eq!(p.order.len(), MAX_PAIRS);
        assert!(
            p.observe("ingress|app|tcp|5432".into()),
            "the oldest pairs are forgotten first"
        );
    }
}
