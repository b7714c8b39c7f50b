//! What a services attachment has in force, for `status`: the links, the
//! policy and generation, and per service its cgroup (whether it exists
//! now, its id) and packet counters; the stream of its events for
//! `monitor --services`; its flow table for `flows --services`.

use serde::Serialize;

use crate::attachment::services::{SvcMaps, SvcPaths};

/// One service in force.
#[derive(Debug, Serialize)]
pub struct ServiceReport {
    /// Name.
    pub name: String,
    /// Path below the cgroup root.
    pub cgroup: String,
    /// Its cgroup id, when the cgroup exists now.
    pub cgroup_id: Option<u64>,
    /// Whether the programs can see its cgroup: false when it lies deeper
    /// than they read (`cgroup_level` above 16); such a service is not
    /// enforced (attach and reload refuse it).
    pub enforceable: bool,
    /// The absolute level of its cgroup in the hierarchy.
    pub cgroup_level: u32,
    /// Ingress default.
    pub ingress_default: String,
    /// Egress default.
    pub egress_default: String,
    /// Ingress rules.
    pub ingress_rules: usize,
    /// Egress rules.
    pub egress_rules: usize,
    /// Packets: ingress passed, ingress dropped, egress passed, egress dropped.
    pub packets: PacketCounts,
}

/// Packet counters of one service (or of the sockets in none).
#[derive(Debug, Default, Serialize)]
pub struct PacketCounts {
    /// Ingress packets passed.
    pub ingress_passed: u64,
    /// Ingress packets dropped.
    pub ingress_dropped: u64,
    /// Egress packets passed.
    pub egress_passed: u64,
    /// Egress packets dropped.
    pub egress_dropped: u64,
}

impl PacketCounts {
    fn of(row: [u64; 4]) -> Self {
        PacketCounts {
            ingress_dropped: row[0],
            ingress_passed: row[1],
            egress_dropped: row[2],
            egress_passed: row[3],
        }
    }
}

/// The services attachment of one cgroup root.
#[derive(Debug, Serialize)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "a JSON report: each flag is a field readers script against"
)]
pub struct SvcReport {
    /// The cgroup root.
    pub cgroup_root: String,
    /// Both programs attached (their pinned links are live in the kernel,
    /// on the root's cgroup).
    pub attached: bool,
    /// The cgroup root this attachment was made on is gone (removed,
    /// perhaps made again: another cgroup id), from the kernel: its pins
    /// and state are left, nothing of it enforces.
    pub cgroup_gone: bool,
    /// Policy file.
    pub policy: Option<String>,
    /// Generation in force.
    pub generation: u64,
    /// Audit mode.
    pub audit: bool,
    /// The services.
    pub services: Vec<ServiceReport>,
    /// Sockets in no service (and held sockets of unclassified cgroups, as drops).
    pub unserviced: PacketCounts,
    /// Packets received over loopback whose priority was no valid sender
    /// stamp for them (forged, replayed on another 5-tuple, or stamped
    /// under a key a reload has since replaced), judged as from no
    /// service; counted with the generation in force.
    pub stamps_refused: u64,
    /// Live set edits in force over the file's sets (`segbpf set
    /// --services`): set name -> members; `reload --services` goes back to
    /// the file.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set_overrides: std::collections::BTreeMap<String, Vec<String>>,
    /// The generation whose policy a `rollback --services` restored as
    /// the one in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<u64>,
    /// Whether a process follows the cgroup tree now (the holder of the
    /// follower's `flock`, from the kernel's lock table). While none does,
    /// a cgroup made below a guard is held (its sockets can neither send
    /// nor receive) until one runs.
    pub follower_running: bool,
    /// The follower's process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follower_pid: Option<u32>,
    /// A first attach made with `--confirm` waits for `segbpf confirm
    /// --services`: the Unix time it is removed at otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_deadline: Option<u64>,
    /// The pins are not this state directory's: another
    /// `SEGBPF_STATE_DIR` that shares the pin root made them (or an
    /// attach here died before recording its state). Policy, services and
    /// follower are then not reported from here.
    pub foreign: bool,
    /// The state directory that made them, when its owner mark names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_state_dir: Option<String>,
    /// The directions whose program the kernel has on the root through
    /// these pins (`ingress`, `egress`): one only is a partial attachment
    /// (an attach or detach killed half-way), which enforces that
    /// direction until `detach` or a new attach removes it.
    pub linked: Vec<&'static str>,
    /// The pins are the leftovers of an attach from this state directory
    /// that died before recording its state (the next attach from here
    /// replaces them; their links stay until the new ones enforce).
    pub crashed_attach: bool,
    /// The state here names pins under another pin root (its attach ran
    /// with another `SEGBPF_BPFFS`): which, and what to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pins_elsewhere: Option<String>,
    /// A side directory (`ROOT/services-next:ID`) left by a re-attach
    /// killed half-way: its path. The next attach or detach from this
    /// state directory removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side_dir: Option<String>,
    /// The directions whose program the kernel has on the root through
    /// the side directory's links: extra links beside `linked` (stricter,
    /// never looser: a packet passes only if every program passes it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub side_linked: Vec<&'static str>,
}

/// The directions of the links pinned at `ingress` and `egress` that the
/// kernel has on the cgroup `root`.
fn linked_at(
    root: u64,
    ingress: std::path::PathBuf,
    egress: std::path::PathBuf,
) -> Vec<&'static str> {
    [("ingress", ingress), ("egress", egress)]
        .into_iter()
        .filter(|(_, p)| {
            crate::attachment::services_nest::pinned_cgroup_link(p).is_ok_and(|(cg, _)| cg == root)
        })
        .map(|(d, _)| d)
        .collect()
}

/// The report of the attachment at `paths`.
pub fn report(paths: &SvcPaths) -> SvcReport {
    // The pending confirmation before the state: the guard removes the
    // attachment first and its record last, so a report that finds no
    // record reads what is left after the guard acted.
    let confirm_deadline = crate::attachment::services_guard::pending(paths).map(|p| p.deadline);
    let side = SvcPaths {
        dir: paths.next_dir(),
        ..paths.clone()
    };
    let attached = crate::attachment::services::enforces(paths);
    let cgroup_gone =
        crate::attachment::services_nest::cgroup_alive(paths.root.id).is_ok_and(|alive| !alive);
    let foreign = !cgroup_gone && paths.owner() == crate::attachment::services::Owner::Other;
    let state = paths.read_state().filter(|_| !foreign);
    let counters = SvcMaps::from_pins(&paths.dir)
        .and_then(|m| m.counters())
        .unwrap_or_default();
    let row = |id: usize| counters.get(id).copied().unwrap_or_default();
    let follower = (!foreign)
        .then(|| crate::attachment::cgroup_follow::follower_in_kernel(paths))
        .flatten();
    let services = state
        .as_ref()
        .map(|s| {
            s.services
                .iter()
                .map(|svc| ServiceReport {
                    name: svc.name.clone(),
                    cgroup: svc.cgroup.clone(),
                    cgroup_id: crate::host::cgroups::cgroup_id(&paths.root.dir.join(&svc.cgroup))
                        .ok(),
                    enforceable: crate::host::cgroups::reachable(&paths.root, &svc.cgroup),
                    cgroup_level: crate::policy::services::cgroup_level(
                        paths.root.level,
                        &svc.cgroup,
                    ),
                    ingress_default: svc.ingress_default.clone(),
                    egress_default: svc.egress_default.clone(),
                    ingress_rules: svc.ingress_rules,
                    egress_rules: svc.egress_rules,
                    packets: PacketCounts::of(row(usize::from(svc.id))),
                })
                .collect()
        })
        .unwrap_or_default();
    SvcReport {
        cgroup_root: paths.root.dir.display().to_string(),
        attached,
        cgroup_gone,
        policy: state.as_ref().map(|s| s.policy.display().to_string()),
        generation: state.as_ref().map_or_else(
            || {
                SvcMaps::from_pins(&paths.dir)
                    .and_then(|m| m.generation_in_force())
                    .unwrap_or(0)
            },
            |s| s.generation,
        ),
        audit: state.as_ref().is_some_and(|s| s.audit),
        services,
        unserviced: PacketCounts::of(row(0)),
        stamps_refused: row(usize::from(segbpf_common::SVC_STATS_FORGED))[0],
        set_overrides: state
            .as_ref()
            .map(|s| s.set_overrides.clone())
            .unwrap_or_default(),
        restored: state.as_ref().and_then(|s| s.restored),
        confirm_deadline,
        follower_running: follower.is_some(),
        follower_pid: follower,
        foreign,
        owner_state_dir: foreign.then(|| paths.owner_state_dir()).flatten(),
        linked: linked_at(paths.root.id, paths.link_ingress(), paths.link_egress()),
        crashed_attach: paths.crashed_here(),
        pins_elsewhere: crate::attachment::services::pins_elsewhere(paths),
        side_dir: side.dir.exists().then(|| side.dir.display().to_string()),
        side_linked: linked_at(paths.root.id, side.link_ingress(), side.link_egress()),
    }
}

/// Streams the events of the attachment at `paths` to `on_event` until
/// `stop` is set or the attachment is gone. While it runs, it holds the
/// monitor lock: the follower leaves the ring to it (see
/// [`crate::attachment::cgroup_follow::monitor_lock_path`]).
pub fn stream_events(
    paths: &SvcPaths,
    stop: &std::sync::atomic::AtomicBool,
    mut on_event: impl FnMut(crate::attachment::cgroup_follow::Refused),
) -> Result<(), crate::attachment::services::ServicesError> {
    use crate::attachment::{
        cgroup_follow::{self as follow, FollowEvent},
        services::ServicesError,
    };
    if !paths.is_attached() {
        return Err(paths.not_attached());
    }
    let lock_path = follow::monitor_lock_path(paths);
    let io = |what: String| move |source| ServicesError::Io { what, source };
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    lock.try_lock().map_err(|_| {
        ServicesError::Refused(format!(
            "another `segbpf monitor --services` reads the events below {}",
            paths.root.dir.display()
        ))
    })?;
    let mut ring = follow::open_ring(paths);
    if ring.is_none() {
        return Err(ServicesError::Refused(format!(
            "the services attachment below {} has no event ring (attached by an older segbpf: `segbpf detach --services` and attach again)",
            paths.root.dir.display()
        )));
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && paths.is_attached() {
        follow::drain(&mut ring, paths, &mut |ev| {
            if let FollowEvent::Refused(r) = ev {
                on_event(r);
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(lock);
    Ok(())
}

/// One event of the services attachment as a JSON Lines record of
/// docs/json.md: the one dialect of `monitor --services -o json` and
/// `attach --services --log-format json` (`verdict` and `audit`, no
/// `action`).
#[derive(Debug, Serialize)]
pub struct SvcEventRecord {
    /// Always `event`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When it was read (RFC 3339).
    pub time: String,
    /// Always `drop`: the policy's decision.
    pub verdict: &'static str,
    /// Audit mode let the packet through.
    pub audit: bool,
    /// The service (`?` when its policy is no longer in force).
    pub service: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the number.
    pub proto: String,
    /// Source address.
    pub src: std::net::IpAddr,
    /// Source port (ICMP echo: the id).
    pub sport: u16,
    /// Destination address.
    pub dst: std::net::IpAddr,
    /// Destination port.
    pub dport: u16,
}

impl SvcEventRecord {
    /// The record of `r`, read now.
    pub fn of(r: &crate::attachment::cgroup_follow::Refused) -> Self {
        SvcEventRecord {
            kind: "event",
            time: crate::host::clock::rfc3339(std::time::SystemTime::now()),
            verdict: "drop",
            audit: r.action == "audit",
            service: r.service.clone(),
            direction: r.direction,
            proto: crate::host::proto::proto_name(r.proto),
            src: r.src,
            sport: r.sport,
            dst: r.dst,
            dport: r.dport,
        }
    }
}

/// The rule of a flow record (docs/json.md's rule object).
#[derive(Debug, Serialize)]
pub struct SvcFlowRule {
    /// The service rule's id.
    pub id: u32,
    /// `services.db.ingress[0]`.
    pub label: String,
    /// Its `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its line in the policy file.
    pub line: u32,
    /// `ingress` or `egress`.
    pub direction: String,
    /// The peer as written.
    pub peer: String,
    /// `tcp/3306`, ...
    pub services: String,
}

/// One socket's view of an allowed flow (`SEG_SVC_CT`).
#[derive(Debug, Serialize)]
pub struct SvcFlowRecord {
    /// The service of the socket (None: its cgroup is no service of the
    /// policy in force).
    pub service: Option<String>,
    /// Over loopback: the peer socket's service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_service: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the number.
    pub proto: String,
    /// Source of the flow's first packet.
    pub src: std::net::IpAddr,
    /// Its source port (ICMP echo: the id).
    pub sport: u16,
    /// Destination of the flow's first packet.
    pub dst: std::net::IpAddr,
    /// Its destination port.
    pub dport: u16,
    /// `ingress` (the service received the first packet) or `egress`.
    pub opened_by: &'static str,
    /// The last packet (RFC 3339).
    pub last_seen: String,
    /// The rule that allowed the flow, from the policy of the generation
    /// that judged it: left out for a default; `Some(None)` (`null`) when
    /// that generation's policy is no longer kept (`judged_by_generation`
    /// says which it was), rather than a rule of another policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Option<SvcFlowRule>>,
    /// The policy generation that judged the flow (its flow entry's
    /// record).
    pub judged_by_generation: u64,
    /// A flow only audit mode lets through (its policy refuses it): listed
    /// only while the attachment is in audit mode, then marked (left out
    /// when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}

/// The flows of the attachment at `paths`, as its sockets see them.
pub fn flows(
    paths: &SvcPaths,
) -> Result<Vec<SvcFlowRecord>, crate::attachment::services::ServicesError> {
    use crate::attachment::services::ServicesError;
    use segbpf_common::{SVC_FLOW_AUDITED, SVC_FLOW_INBOUND, SvcFlow, SvcFlowKey};
    if !paths.is_attached() {
        return Err(paths.not_attached());
    }
    let state = paths.read_state();
    // Service cgroup id -> name, for the cgroups that exist now.
    let names: std::collections::HashMap<u64, String> = state
        .iter()
        .flat_map(|s| s.services.iter())
        .filter_map(|svc| {
            crate::host::cgroups::cgroup_id(&paths.root.dir.join(&svc.cgroup))
                .ok()
                .map(|id| (id, svc.name.clone()))
        })
        .collect();
    let map =
        aya::maps::MapData::from_pin(paths.dir.join(segbpf_common::MAP_SVC_CT)).map_err(|e| {
            ServicesError::Kernel {
                what: format!("opening {}", segbpf_common::MAP_SVC_CT),
                source: Box::new(e),
            }
        })?;
    let ct: aya::maps::HashMap<_, SvcFlowKey, SvcFlow> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).map_err(|e| {
            ServicesError::Kernel {
                what: format!("opening {}", segbpf_common::MAP_SVC_CT),
                source: Box::new(e),
            }
        })?;
    let mut out = Vec::new();
    // Generation -> its state (None: not kept), read once each.
    let mut kept: std::collections::HashMap<u64, Option<crate::attachment::services::SvcState>> =
        std::collections::HashMap::new();
    // A flow only audit mode let through is no flow once enforcement is
    // on: the programs judge its packets by the policy again.
    let audit_now = state.as_ref().is_some_and(|s| s.audit);
    for (k, v) in ct.iter().filter_map(Result::ok) {
        let audit = v.flags & SVC_FLOW_AUDITED != 0;
        if audit && !audit_now {
            continue;
        }
        let ip = |b| crate::host::proto::ip_from(k.family, b);
        let (l, r) = (
            (ip(k.laddr_be), u16::from_be_bytes(k.lport_be)),
            (ip(k.raddr_be), u16::from_be_bytes(k.rport_be)),
        );
        let inbound = v.flags & SVC_FLOW_INBOUND != 0;
        let ((src, sport), (dst, dport)) = if inbound { (r, l) } else { (l, r) };
        // The rule ids and service ids of the entry are those of the
        // generation that judged it, which a reload may have given to
        // others: named from that generation's state, or not at all.
        let judged = v.peer >> 8;
        let judge = kept
            .entry(judged)
            .or_insert_with(|| crate::attachment::services::state_of_generation(paths, judged));
        let rule = (v.rule != u32::MAX).then(|| {
            judge.as_ref().and_then(|s| {
                s.rules
                    .iter()
                    .find(|x| x.id == v.rule)
                    .map(|x| SvcFlowRule {
                        id: x.id,
                        label: x.label.clone(),
                        name: x.name.clone(),
                        line: x.line,
                        direction: x.direction.clone(),
                        peer: x.peer.clone(),
                        services: x.services.clone(),
                    })
            })
        });
        out.push(SvcFlowRecord {
            service: names.get(&v.svc_cg).cloned(),
            peer_service: peer_name(judge.as_ref(), v.peer),
            proto: crate::host::proto::proto_name(k.proto),
            src,
            sport,
            dst,
            dport,
            opened_by: if inbound { "ingress" } else { "egress" },
            last_seen: crate::host::clock::rfc3339(crate::host::clock::wall_of_monotonic(
                v.last_ns,
            )),
            rule,
            judged_by_generation: judged,
            audit,
        });
    }
    out.sort_by(|a, b| (&a.service, a.dport, a.sport).cmp(&(&b.service, b.dport, b.sport)));
    Ok(out)
}

/// The name of a flow's local peer service from its recorded identity
/// (`generation << 8 | slot bit << 7 | service id`, see
/// `segbpf_common::SvcFlow::peer`), in `state`, the state of the
/// generation it names (None: not kept); 0 (no service) names nobody.
fn peer_name(state: Option<&crate::attachment::services::SvcState>, peer: u64) -> Option<String> {
    let state = state?;
    let id = peer & u64::from(segbpf_common::SVC_STAMP_ID_MASK);
    if id == 0 || peer >> 8 != state.generation || (id >> 7) as u8 != state.slot & 1 {
        return None;
    }
    let svc = (id & 0x7f) as u8;
    state
        .services
        .iter()
        .find(|s| s.id == svc)
        .map(|s| s.name.clone())
}
