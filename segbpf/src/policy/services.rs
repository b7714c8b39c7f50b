//! Services compiler: `[services.*]` -> the contents of the services maps
//! for one policy slot.
//!
//! Each service gets an id (1..=126, file order) and its rules are
//! compiled with the interface compiler's address classes
//! ([`crate::policy::compile`]), with the slot byte `slot * 128 + id` in place of
//! the interface slot. `from_services` / `to_services` rules become one
//! class per (service, direction, peer service) in `SEG_SVC_PEER`, and on
//! egress one class of every `to_services` rule (peer `SVC_PEER_ANY`),
//! whose receiver is checked at its ingress.

use segbpf_common::{
    ACTION_ALLOW, ACTION_DROP, MAX_RULES_PER_DIRECTION, PeerKeyV4, PeerKeyV6, PortKey,
    SVC_PEER_ANY, SVC_SLOT_STRIDE, SvcClass, SvcConfig, SvcPeerKey, SvcRule,
};
use serde::{Deserialize, Serialize};

use crate::policy::{
    Action, Direction, Policy, Rule,
    compile::{CompileError, Compiled, LpmEntry, RuleInfo, compile_class_ports, compile_direction},
};

/// One service as compiled: its id in the slot and its cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Id in the slot (1..=126).
    pub id: u8,
    /// Path below the cgroup root.
    pub cgroup: String,
    /// Ingress default in force (`drop` / `allow`).
    pub ingress_default: String,
    /// Egress default in force.
    pub egress_default: String,
    /// Ingress rules.
    pub ingress_rules: usize,
    /// Egress rules.
    pub egress_rules: usize,
}

/// Map contents of one services slot.
#[derive(Clone, Debug, Default)]
pub struct SvcCompiled {
    /// `SEG_SVC_V4` entries.
    pub peers_v4: Vec<LpmEntry<PeerKeyV4, SvcClass>>,
    /// `SEG_SVC_V6` entries.
    pub peers_v6: Vec<LpmEntry<PeerKeyV6, SvcClass>>,
    /// `SEG_SVC_PORTS` entries.
    pub ports: Vec<LpmEntry<PortKey, SvcRule>>,
    /// `SEG_SVC_PEER` entries.
    pub peer_classes: Vec<(SvcPeerKey, SvcClass)>,
    /// `SEG_SVC_CFG` entries (index, record); the slot's globals at index
    /// `slot * 128` (its `max_level` is set by the attachment, which knows
    /// the cgroup tree).
    pub configs: Vec<(u32, SvcConfig)>,
    /// The services, by id.
    pub services: Vec<ServiceInfo>,
    /// Every service rule, by id.
    pub rules: Vec<RuleInfo>,
}

fn action_byte(a: Action) -> u8 {
    match a {
        Action::Drop => ACTION_DROP,
        Action::Allow => ACTION_ALLOW,
    }
}

fn action_name(a: Action) -> String {
    match a {
        Action::Drop => "drop".into(),
        Action::Allow => "allow".into(),
    }
}

/// Compiles every service of `policy` into slot `slot` (0 or 1).
pub fn compile_services(
    policy: &Policy,
    slot: u8,
    generation: u64,
    audit: bool,
) -> Result<SvcCompiled, CompileError> {
    let slot = slot & 1;
    let base = slot * SVC_SLOT_STRIDE;
    let mut out = SvcCompiled::default();
    let mut tmp = Compiled::default();
    let mut next_class: u32 = 0;
    out.configs.push((
        u32::from(base),
        SvcConfig {
            generation,
            established: u8::from(policy.defaults.established),
            icmp: u8::from(policy.defaults.icmp),
            audit: u8::from(audit),
            present: 1,
            ..SvcConfig::default()
        },
    ));
    let id_of = |name: &str| {
        policy
            .services
            .iter()
            .position(|s| s.name == name)
            .map(|i| i as u8 + 1)
    };
    for (i, svc) in policy.services.iter().enumerate() {
        let id = i as u8 + 1;
        let slotb = base + id;
        let mut counts = [0usize; 2];
        for (d, dir) in Direction::ALL.into_iter().enumerate() {
            let rules: Vec<&Rule> = policy
                .service_rules
                .iter()
                .filter(|r| {
                    r.direction == dir
                        && matches!(&r.owner, crate::policy::Owner::Service(n) if *n == svc.name)
                })
                .collect();
            counts[d] = rules.len();
            if rules.len() > MAX_RULES_PER_DIRECTION {
                return Err(CompileError::TooManyRules {
                    direction: dir,
                    count: rules.len(),
                    limit: MAX_RULES_PER_DIRECTION,
                });
            }
            compile_direction(&rules, dir, slotb, &mut next_class, &mut tmp);
            // Peer services: one class per named peer; on egress also the
            // class of every to_services rule.
            let mut peers: Vec<u8> = Vec::new();
            for r in &rules {
                for n in &r.peer_services {
                    if let Some(pid) = id_of(n)
                        && !peers.contains(&pid)
                    {
                        peers.push(pid);
                    }
                }
            }
            let mut groups: Vec<(u8, Vec<usize>)> = peers
                .iter()
                .map(|&pid| {
                    let members = rules
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.peer_services.iter().any(|n| id_of(n) == Some(pid)))
                        .map(|(k, _)| k)
                        .collect();
                    (pid, members)
                })
                .collect();
            if dir == Direction::Egress && !peers.is_empty() {
                let members = rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !r.peer_services.is_empty())
                    .map(|(k, _)| k)
                    .collect();
                groups.push((SVC_PEER_ANY, members));
            }
            for (peer, members) in groups {
                let class_id = next_class;
                next_class += 1;
                compile_class_ports(&rules, &members, class_id, slotb, &mut tmp.ports);
                out.peer_classes.push((
                    SvcPeerKey {
                        slot: slotb,
                        dir: dir.key_byte(),
                        peer,
                        _pad: 0,
                    },
                    SvcClass { class_id },
                ));
            }
        }
        let ingress = svc.default_action(&policy.defaults, Direction::Ingress);
        let egress = svc.default_action(&policy.defaults, Direction::Egress);
        out.configs.push((
            u32::from(slotb),
            SvcConfig {
                generation,
                ingress_default: action_byte(ingress),
                egress_default: action_byte(egress),
                established: u8::from(policy.defaults.established),
                icmp: u8::from(policy.defaults.icmp),
                audit: u8::from(audit),
                present: 1,
                ..SvcConfig::default()
            },
        ));
        out.services.push(ServiceInfo {
            name: svc.name.clone(),
            id,
            cgroup: svc.cgroup.clone(),
            ingress_default: action_name(ingress),
            egress_default: action_name(egress),
            ingress_rules: counts[0],
            egress_rules: counts[1],
        });
    }
    out.peers_v4 = tmp
        .peers_v4
        .into_iter()
        .map(|(l, k, v)| {
            (
                l,
                k,
                SvcClass {
                    class_id: v.class_id,
                },
            )
        })
        .collect();
    out.peers_v6 = tmp
        .peers_v6
        .into_iter()
        .map(|(l, k, v)| {
            (
                l,
                k,
                SvcClass {
                    class_id: v.class_id,
                },
            )
        })
        .collect();
    out.ports = tmp
        .ports
        .into_iter()
        .map(|(l, k, v)| (l, k, SvcRule { rule_id: v.rule_id }))
        .collect();
    out.rules = policy
        .service_rules
        .iter()
        .map(RuleInfo::from_rule)
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use segbpf_common::DIR_INGRESS;

    use super::*;

    const P: &str = concat!(
        include_str!("../../../tests/fixtures/services_app_db_other.toml"),
        r#"[[services.db.ingress]]
from_services = ["app"]
tcp = [3306]
[[services.app.egress]]
to = ["127.0.0.1", "::1"]
tcp = [3306]
[[services.app.egress]]
to_services = ["db"]
udp = [53]
"#
    );

    #[test]
    fn services_get_ids_slots_and_peer_classes() {
        let p = Policy::from_str(P, "p.toml").unwrap();
        let c = compile_services(&p, 1, 7, false).unwrap();
        assert_eq!(
            c.services
                .iter()
                .map(|s| (s.name.as_str(), s.id))
                .collect::<Vec<_>>(),
            vec![("app", 1), ("db", 2), ("other", 3)]
        );
        // Globals of slot 1 at 128, then one record per service.
        assert_eq!(c.configs[0].0, 128);
        assert_eq!(c.configs[1].0, 129);
        assert_eq!(c.configs[1].1.egress_default, ACTION_DROP);
        assert_eq!(c.configs[2].1.egress_default, ACTION_ALLOW);
        // db's ingress names app (id 1).
        assert!(
            c.peer_classes
                .iter()
                .any(|(k, _)| k.slot == 130 && k.dir == DIR_INGRESS && k.peer == 1)
        );
        // app's egress: the to_services class for db and the ANY class.
        let app_egress: Vec<u8> = c
            .peer_classes
            .iter()
            .filter(|(k, _)| k.slot == 129)
            .map(|(k, _)| k.peer)
            .collect();
        assert_eq!(app_egress, vec![2, SVC_PEER_ANY]);
        // Address rules of app only in its slot byte.
        assert!(c.peers_v4.iter().all(|(_, k, _)| k.slot == 129));
        assert!(!c.peers_v4.is_empty() && !c.peers_v6.is_empty());
        assert!(
            c.ports
                .iter()
                .all(|(_, k, _)| k.slot == 129 || k.slot == 130)
        );
    }
}

/// The deepest absolute level of the cgroup hierarchy (0: its root) whose
/// cgroup the services programs read when they look for a socket's
/// service: they walk the socket's ancestors from level 0 down to this
/// one (`segbpf_common::SVC_MAX_LEVEL`), so a service's cgroup below it
/// would never be seen and its sockets would count as no service.
pub const MAX_CGROUP_LEVEL: u32 = segbpf_common::SVC_MAX_LEVEL;

/// A service whose cgroup lies deeper than [`MAX_CGROUP_LEVEL`] below the
/// hierarchy's root: it could not be enforced.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file}:{line}:{column}: services.{name}.{field}: cgroup `{cgroup}` would be at level {level} of the cgroup hierarchy ({root_level} for the cgroup root {root}, plus {depth} below it); the services programs read a socket's cgroups down to level {max} only, so this service could not be enforced: name a cgroup at most {room} levels below the cgroup root"
)]
pub struct TooDeep {
    /// The policy file.
    pub file: String,
    /// Line of the `cgroup`/`unit` value.
    pub line: u32,
    /// Its column.
    pub column: u32,
    /// The service.
    pub name: String,
    /// `cgroup` or `unit`.
    pub field: &'static str,
    /// The cgroup path below the root.
    pub cgroup: String,
    /// Its absolute level.
    pub level: u32,
    /// The cgroup root.
    pub root: String,
    /// The root's absolute level.
    pub root_level: u32,
    /// Components below the root.
    pub depth: u32,
    /// [`MAX_CGROUP_LEVEL`].
    pub max: u32,
    /// How many levels below the root are left.
    pub room: u32,
}

/// The absolute level of the cgroup `rel` (a path below a root at
/// `root_level`).
pub fn cgroup_level(root_level: u32, rel: &str) -> u32 {
    root_level + rel.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// Refuses a policy with a service whose cgroup, below a cgroup root at
/// absolute level `root_level` (named `root` in the message), lies deeper
/// than [`MAX_CGROUP_LEVEL`]: the first such service, with its file, line
/// and field.
pub fn check_depth(policy: &Policy, root_level: u32, root: &str) -> Result<(), Box<TooDeep>> {
    for s in &policy.services {
        let level = cgroup_level(root_level, &s.cgroup);
        if level > MAX_CGROUP_LEVEL {
            return Err(Box::new(TooDeep {
                file: policy.source.clone(),
                line: s.target_loc.line,
                column: s.target_loc.column,
                name: s.name.clone(),
                field: match s.target {
                    crate::policy::ServiceTarget::Cgroup(_) => "cgroup",
                    crate::policy::ServiceTarget::Unit(_) => "unit",
                },
                cgroup: s.cgroup.clone(),
                level,
                root: root.to_string(),
                root_level,
                depth: level - root_level,
                max: MAX_CGROUP_LEVEL,
                room: MAX_CGROUP_LEVEL.saturating_sub(root_level),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    fn policy(depth: usize) -> Policy {
        let path: Vec<String> = (1..=depth).map(|i| format!("l{i}")).collect();
        Policy::from_str(
            &format!(
                "version = 1\n[services.deep]\ncgroup = \"{}\"\n",
                path.join("/")
            ),
            "deep.toml",
        )
        .unwrap()
    }

    #[test]
    fn a_service_below_the_programs_walk_is_refused_with_its_line() {
        // The programs read levels 0..=16: 16 below the hierarchy's root is
        // the deepest; a root at level 1 leaves 15.
        assert!(check_depth(&policy(16), 0, "/sys/fs/cgroup").is_ok());
        assert!(check_depth(&policy(15), 1, "/sys/fs/cgroup/x").is_ok());
        let e = check_depth(&policy(16), 1, "/sys/fs/cgroup/x").unwrap_err();
        assert_eq!((e.line, e.level, e.field), (3, 17, "cgroup"));
        let msg = e.to_string();
        assert!(
            msg.contains(":3:") && msg.contains("services.deep.cgroup"),
            "{msg}"
        );
        assert!(check_depth(&policy(17), 0, "/sys/fs/cgroup").is_err());
    }
}
