//! The roles.toml policy: data model, loading and validation entry points.
//!
//! `parse` turns TOML text into a validated [`Policy`] (errors carry
//! file:line:column and the field), `addr` holds address/CIDR/range math,
//! `ports` port ranges, `roles` picks the host's roles and `eval` is the pure
//! reference evaluator that the kernel program is tested against.
//! `compile` turns a policy into kernel map contents (`portmiss`: the
//! port fast-miss bitmap of its port trie), `export` into an
//! nftables ruleset, and `import` an nftables ruleset into a policy.
//!
//! The policy layer is pure: it may import `host`, never `attachment`,
//! `observe`, `fleet` or `cmd`.

pub mod addr;
pub mod compile;
pub mod error;
pub mod eval;
pub mod export;
pub mod import;
pub mod lint;
pub mod parse;
pub mod peerdefault;
pub mod portmiss;
pub mod ports;
pub mod roles;
pub mod services;

use std::{fmt, path::Path};

pub use addr::AddrRange;
pub use error::{PolicyError, PolicyErrorKind};
pub use ports::PortRange;
use serde::Serialize;

/// A position in the policy file (1-based line and column).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Loc {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// What happens to a packet that no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop the packet.
    Drop,
    /// Let the packet pass.
    Allow,
}

/// Direction of traffic relative to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Entering the host: the peer is the source address.
    Ingress,
    /// Leaving the host: the peer is the destination address.
    Egress,
}

impl Direction {
    /// Both directions, ingress first.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The lowercase name used in roles.toml and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The direction byte used in kernel map keys.
    pub fn key_byte(self) -> u8 {
        match self {
            Direction::Ingress => segbpf_common::DIR_INGRESS,
            Direction::Egress => segbpf_common::DIR_EGRESS,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[defaults]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Defaults {
    /// Ingress default (omitted: drop).
    pub ingress: Action,
    /// Egress default (omitted: allow, so a policy that only writes ingress
    /// rules does not cut the host off; write `egress = "drop"` for
    /// default-deny outbound).
    pub egress: Action,
    /// Replies to allowed flows pass (omitted: true).
    pub established: bool,
    /// ICMP echo and error messages pass (omitted: true).
    pub icmp: bool,
    /// Drop events per second per interface, 0 = none (omitted: 10).
    pub log_rate: u32,
    /// Non-IP control frames to the IEEE 802.1 link-local group addresses
    /// (STP, LACP, LLDP, 802.1X) pass (omitted: true).
    pub link_local: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            ingress: Action::Drop,
            egress: Action::Allow,
            established: true,
            icmp: true,
            log_rate: 10,
            link_local: true,
        }
    }
}

impl Defaults {
    /// The default action of a direction.
    pub fn action(&self, dir: Direction) -> Action {
        match dir {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// A named address set from `[sets]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddrSet {
    /// Set name.
    pub name: String,
    /// Members as inclusive address ranges, as written (not merged).
    pub ranges: Vec<AddrRange>,
    /// Where the set is defined.
    pub loc: Loc,
}

/// Who a rule belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Owner {
    /// `[[base.ingress]]` / `[[base.egress]]`: applies to every role.
    Base,
    /// `[[roles.NAME.ingress]]` / `[[roles.NAME.egress]]`.
    Role(String),
    /// `[[services.NAME.ingress]]` / `[[services.NAME.egress]]`: enforced
    /// on the service's sockets (cgroup), never on an interface.
    Service(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Base => f.write_str("base"),
            Owner::Role(r) => write!(f, "roles.{r}"),
            Owner::Service(s) => write!(f, "services.{s}"),
        }
    }
}

/// One allow rule. Its id is its index in [`Policy::rules`] (file order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Index in [`Policy::rules`]; the lowest matching id is the one reported.
    pub id: u32,
    /// Base or role.
    pub owner: Owner,
    /// Ingress or egress.
    pub direction: Direction,
    /// Index of the rule within its `[[...]]` array (for labels like `roles.web.ingress[1]`).
    pub index: usize,
    /// The peer as written (`"any"`, set names, literals), for display.
    pub peer_text: String,
    /// Peer addresses, resolved from sets and literals (`any` = both whole families).
    pub peers: Vec<AddrRange>,
    /// Allowed TCP destination ports.
    pub tcp: Vec<PortRange>,
    /// Allowed UDP destination ports.
    pub udp: Vec<PortRange>,
    /// `icmp = true`: ICMP (IPv4) from/to the peers.
    pub icmp: bool,
    /// `icmpv6 = true`: ICMPv6 from/to the peers.
    pub icmpv6: bool,
    /// `proto = "any"`: every protocol and port.
    pub any_proto: bool,
    /// `interfaces = [...]`: only on these interfaces (None = all).
    pub interfaces: Option<Vec<String>>,
    /// Where the rule's table header (`[[...]]`) is.
    pub loc: Loc,
    /// `name = "..."`: a name unique in the policy, shown by `status`,
    /// `explain`, `trace` and the metrics (whose series keep it across edits).
    pub name: Option<String>,
    /// `description = "..."`: free text for people.
    pub description: Option<String>,
    /// Service rules only: `from_services` / `to_services`, the local
    /// peers by service name (in addition to the addresses of `peers`).
    pub peer_services: Vec<String>,
}

impl Rule {
    /// A label such as `roles.web.ingress[1]` or `base.egress[0]`.
    pub fn label(&self) -> String {
        format!("{}.{}[{}]", self.owner, self.direction, self.index)
    }

    /// The rule's name, else its label.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.label())
    }

    /// Whether the rule applies on a host with `roles` on interface `iface`.
    pub fn applies(&self, roles: &[String], iface: Option<&str>) -> bool {
        let owner_ok = match &self.owner {
            Owner::Base => true,
            Owner::Role(r) => roles.iter().any(|x| x == r),
            // Service rules are enforced on sockets, not on interfaces.
            Owner::Service(_) => return false,
        };
        let iface_ok = match (&self.interfaces, iface) {
            (None, _) => true,
            (Some(list), Some(i)) => list.iter().any(|x| x == i),
            (Some(_), None) => false,
        };
        owner_ok && iface_ok
    }

    /// A short description of what the rule allows, e.g. `tcp/80,443 udp/53`.
    pub fn services(&self) -> String {
        let mut parts = Vec::new();
        if self.any_proto {
            parts.push("any".to_string());
        }
        let join = |v: &[PortRange]| {
            v.iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.tcp.is_empty() {
            parts.push(format!("tcp/{}", join(&self.tcp)));
        }
        if !self.udp.is_empty() {
            parts.push(format!("udp/{}", join(&self.udp)));
        }
        if self.icmp {
            parts.push("icmp".to_string());
        }
        if self.icmpv6 {
            parts.push("icmpv6".to_string());
        }
        parts.join(" ")
    }
}

/// A role from `[roles.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Role {
    /// Role name.
    pub name: String,
    /// `hosts` as written, if any.
    pub hosts_text: Option<String>,
    /// Addresses of hosts that take this role (empty when `hosts` is absent).
    pub hosts: Vec<AddrRange>,
    /// Where `[roles.NAME]` is.
    pub loc: Loc,
}

/// Where a service's cgroup is written: `cgroup = "..."` or `unit = "..."`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTarget {
    /// `cgroup = "system.slice/app.service"`: a path below the cgroup root.
    Cgroup(String),
    /// `unit = "mysql.service"`: the unit's cgroup in systemd's layout.
    Unit(String),
}

/// A service from `[services.NAME]`: the sockets of one cgroup (a systemd
/// unit, a container) and its own rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// `cgroup` or `unit` as written.
    pub target: ServiceTarget,
    /// The cgroup path below the cgroup root (`unit` resolved with
    /// systemd's default layout), without leading or trailing `/`.
    pub cgroup: String,
    /// `defaults = { ingress = ... }`: this service's own ingress default.
    pub ingress_default: Option<Action>,
    /// `defaults = { egress = ... }`: this service's own egress default.
    pub egress_default: Option<Action>,
    /// Where `[services.NAME]` is.
    pub loc: Loc,
    /// Where its `cgroup` or `unit` value is.
    pub target_loc: Loc,
}

impl Service {
    /// The service's default in `dir`: its own, else the policy's.
    pub fn default_action(&self, defaults: &Defaults, dir: Direction) -> Action {
        match dir {
            Direction::Ingress => self.ingress_default.unwrap_or(defaults.ingress),
            Direction::Egress => self.egress_default.unwrap_or(defaults.egress),
        }
    }
}

/// A parsed and validated roles.toml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// File the policy came from (as given), used in messages.
    pub source: String,
    /// `version` (always 1 today).
    pub version: u32,
    /// `[sets]`, file order.
    pub sets: Vec<AddrSet>,
    /// `[defaults]`.
    pub defaults: Defaults,
    /// Every rule (base and roles, both directions), file order; `rules[i].id == i`.
    pub rules: Vec<Rule>,
    /// Roles, file order.
    pub roles: Vec<Role>,
    /// Services, file order (`[services.NAME]`).
    pub services: Vec<Service>,
    /// Every service rule, file order; `service_rules[i].id == i` (their
    /// own numbering: the interface programs never see them).
    pub service_rules: Vec<Rule>,
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
        parse::parse_str(&text, &path.display().to_string())
    }

    /// Reads and validates a policy file, returning every error found (in
    /// file order) rather than the first.
    pub fn load_all(path: &Path) -> Result<Policy, Vec<PolicyError>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![PolicyError::io(path, e)])?;
        parse::parse_str_all(&text, &path.display().to_string())
    }

    /// Reads a policy file with the members of some sets replaced (live
    /// set edits, see `segbpf set`).
    pub fn load_with_sets(
        path: &Path,
        sets: &std::collections::BTreeMap<String, Vec<AddrRange>>,
    ) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, e))?;
        parse::parse_str_with_sets(&text, &path.display().to_string(), sets)
    }

    /// Parses and validates policy text; `source` names it in errors.
    pub fn from_str(text: &str, source: &str) -> Result<Policy, PolicyError> {
        parse::parse_str(text, source)
    }

    /// Looks a service up by name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Looks a role up by name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// The rules that apply to a host with `roles` on `iface`, in one direction.
    pub fn rules_for<'a>(
        &'a self,
        roles: &'a [String],
        iface: Option<&'a str>,
        dir: Direction,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.direction == dir && r.applies(roles, iface))
    }
}
