//! The document: the top-level keys (`version`, `[sets]`, `[defaults]`,
//! `[base]`, `[roles]`), the assembly of the validated [`Policy`] and rule
//! ids in file order.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::{
    Cx, Key, MAX_LOG_RATE, Res, VERSION, Val,
    diagnostics::{addr_kind, child, describe, index},
    int_of, is_valid_name,
    rules::Pending,
    sorted,
};
use crate::policy::{
    Action, AddrRange, AddrSet, Defaults, Direction, Owner, Policy, PolicyError, PolicyErrorKind,
    Role,
    addr::{AddrParseError, parse_item},
};

/// The top-level keys.
const TOP_KEYS: [&str; 6] = ["version", "sets", "defaults", "base", "roles", "services"];
/// The keys of `[defaults]`.
const DEFAULTS_KEYS: [&str; 6] = [
    "ingress",
    "egress",
    "established",
    "icmp",
    "log_rate",
    "link_local",
];
/// The keys of a `[roles.NAME]` table.
const ROLE_KEYS: [&str; 3] = ["hosts", "ingress", "egress"];

impl Cx<'_> {
    // ----- document -----------------------------------------------------

    pub(super) fn policy(&mut self, root: &DeTable<'_>) -> Res<Policy> {
        let mut version = None;
        let mut sets = None;
        let mut defaults = None;
        let mut base = None;
        let mut roles = None;
        let mut services = None;
        for (k, v) in sorted(root) {
            let key: &str = k.get_ref();
            match key {
                "version" => version = Some(v),
                "sets" => sets = Some(v),
                "defaults" => defaults = Some(v),
                "base" => base = Some(v),
                "roles" => roles = Some(v),
                "services" => services = Some(v),
                _ => {
                    self.keep::<()>(Err(self.unknown_key(k, "", &TOP_KEYS)));
                }
            }
        }
        let version = if let Some(v) = version {
            self.keep(self.version(v)).unwrap_or(VERSION)
        } else {
            self.keep::<()>(Err(self.err(
                0..0,
                "version",
                PolicyErrorKind::VersionMissing,
            )));
            VERSION
        };
        let mut sets = match sets {
            Some(v) => self.keep(self.sets(v)).unwrap_or_default(),
            None => Vec::new(),
        };
        for (name, ranges) in &self.overrides {
            let Some(set) = sets.iter_mut().find(|s| &s.name == name) else {
                return Err(PolicyError::new(
                    self.source,
                    None,
                    format!("sets.{name}"),
                    PolicyErrorKind::UnknownSet(name.clone()),
                ));
            };
            set.ranges.clone_from(ranges);
        }
        for s in &sets {
            self.sets.insert(s.name.clone(), s.ranges.clone());
        }
        let defaults = match defaults {
            Some(v) => self.keep(self.defaults(v)).unwrap_or_default(),
            None => Defaults::default(),
        };
        let mut pending = Vec::new();
        if let Some(v) = base {
            self.keep(self.base(v, &mut pending));
        }
        let roles = match roles {
            Some(v) => self.keep(self.roles(v, &mut pending)).unwrap_or_default(),
            None => Vec::new(),
        };
        let mut svc_pending = Vec::new();
        let services = match services {
            Some(v) => self
                .keep(self.services(v, &mut svc_pending))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        self.check_service_refs(&services);
        if services.len() > segbpf_common::MAX_SERVICES {
            self.keep::<()>(Err(self.err(
                0..0,
                "services",
                PolicyErrorKind::BadValue(format!(
                    "{} services; at most {} fit",
                    services.len(),
                    segbpf_common::MAX_SERVICES
                )),
            )));
        }
        pending.sort_by_key(|p| p.pos);
        svc_pending.sort_by_key(|p| p.pos);
        let mut names: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
        let mut by_pos: Vec<_> = pending.iter().chain(&svc_pending).collect();
        by_pos.sort_by_key(|p| p.pos);
        for p in by_pos {
            if let (Some(name), Some(span)) = (&p.rule.name, &p.name_span) {
                if let Some(first) = names.get(name.as_str()) {
                    self.keep::<()>(Err(self.err(
                        span.clone(),
                        &format!("{}.name", p.rule.label()),
                        PolicyErrorKind::DuplicateRuleName(name.clone(), *first),
                    )));
                    continue;
                }
                names.insert(name, p.rule.loc.line);
            }
        }
        let mut rules = Vec::with_capacity(pending.len());
        for (id, p) in pending.into_iter().enumerate() {
            let mut rule = p.rule;
            rule.id = u32::try_from(id).unwrap_or(u32::MAX);
            rules.push(rule);
        }
        let mut service_rules = Vec::with_capacity(svc_pending.len());
        for (id, p) in svc_pending.into_iter().enumerate() {
            let mut rule = p.rule;
            rule.id = u32::try_from(id).unwrap_or(u32::MAX);
            service_rules.push(rule);
        }
        Ok(Policy {
            source: self.source.to_string(),
            version,
            sets,
            defaults,
            rules,
            roles,
            services,
            service_rules,
        })
    }

    fn version(&self, v: &Val<'_>) -> Res<u32> {
        let DeValue::Integer(i) = v.get_ref() else {
            return Err(self.bad_value(
                v,
                "version",
                format!(
                    "`version` must be the integer {VERSION}, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        match int_of(i).map(i64::try_from) {
            Some(Ok(n)) if n == i64::from(VERSION) => Ok(VERSION),
            Some(Ok(n)) => {
                Err(self.err(v.span(), "version", PolicyErrorKind::UnsupportedVersion(n)))
            }
            _ => Err(self.bad_value(
                v,
                "version",
                format!("`version` must be the integer {VERSION}, found {i}"),
            )),
        }
    }

    // ----- [sets] --------------------------------------------------------

    fn sets(&self, v: &Val<'_>) -> Res<Vec<AddrSet>> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                "sets",
                format!(
                    "`sets` must be a table of `name = [addresses]`, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut out = Vec::new();
        for (k, val) in sorted(t) {
            let name: &str = k.get_ref();
            let field = child("sets", name);
            if self.keep(self.check_name(k, &field, "set")).is_none() {
                continue;
            }
            // A set with a bad member is still defined (with no members):
            // rules naming it are not also reported as naming an unknown set.
            let ranges = self.keep(self.addr_list(val, &field)).unwrap_or_default();
            out.push(AddrSet {
                name: name.to_string(),
                ranges,
                loc: self.loc(k.span().start),
            });
        }
        Ok(out)
    }

    fn check_name(&self, k: &Key<'_>, field: &str, what: &str) -> Res<()> {
        let name: &str = k.get_ref();
        if what == "set" && name == "any" {
            return Err(self.err(
                k.span(),
                field,
                PolicyErrorKind::BadValue(
                    "`any` is reserved (it means every address); choose another set name".into(),
                ),
            ));
        }
        if !is_valid_name(name) {
            return Err(self.err(
                k.span(),
                field,
                PolicyErrorKind::BadValue(format!(
                    "invalid {what} name `{name}`: use a letter or `_` first, then letters, digits, `_` or `-`"
                )),
            ));
        }
        Ok(())
    }

    /// A set's members: one address string or a non-empty list of them.
    fn addr_list(&self, v: &Val<'_>, field: &str) -> Res<Vec<AddrRange>> {
        match v.get_ref() {
            DeValue::String(s) => Ok(vec![self.set_member(s, v.span(), field)?]),
            DeValue::Array(a) => {
                if a.is_empty() {
                    return Err(self.err(v.span(), field, PolicyErrorKind::EmptyList));
                }
                let mut out = Vec::with_capacity(a.len());
                let errors = self.error_count();
                for (i, item) in a.iter().enumerate() {
                    let f = index(field, i);
                    let member = match item.get_ref() {
                        DeValue::String(s) => self.set_member(s, item.span(), &f),
                        other => Err(self.bad_value(
                            item,
                            &f,
                            format!(
                                "expected an address, CIDR or range string, found {}",
                                describe(other)
                            ),
                        )),
                    };
                    out.extend(self.keep(member));
                }
                if self.error_count() > errors {
                    out.clear();
                }
                Ok(out)
            }
            other => Err(self.bad_value(
                v,
                field,
                format!(
                    "expected a list of addresses, CIDRs or ranges, found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn set_member(&self, s: &str, span: Range<usize>, field: &str) -> Res<AddrRange> {
        parse_item(s).map_err(|e| {
            let kind = match e {
                AddrParseError::Bad(_) if is_valid_name(s.trim()) => {
                    PolicyErrorKind::BadAddress(format!(
                        "`{}` is not an address; sets hold addresses, CIDRs and ranges, not set names",
                        s.trim()
                    ))
                }
                e => addr_kind(e),
            };
            self.err(span, field, kind)
        })
    }

    // ----- [defaults] ----------------------------------------------------

    fn defaults(&self, v: &Val<'_>) -> Res<Defaults> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                "defaults",
                format!(
                    "`defaults` must be a table, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut d = Defaults::default();
        for (k, val) in sorted(t) {
            let key: &str = k.get_ref();
            let field = child("defaults", key);
            let set = match key {
                "ingress" => self.action(val, &field, key).map(|a| d.ingress = a),
                "egress" => self.action(val, &field, key).map(|a| d.egress = a),
                "established" => self.boolean(val, &field, key).map(|b| d.established = b),
                "icmp" => self.boolean(val, &field, key).map(|b| d.icmp = b),
                "log_rate" => self.log_rate(val, &field).map(|n| d.log_rate = n),
                "link_local" => self.boolean(val, &field, key).map(|b| d.link_local = b),
                _ => Err(self.unknown_key(k, "defaults", &DEFAULTS_KEYS)),
            };
            self.keep(set);
        }
        Ok(d)
    }

    fn action(&self, v: &Val<'_>, field: &str, key: &str) -> Res<Action> {
        match v.get_ref().as_str() {
            Some("drop") => Ok(Action::Drop),
            Some("allow") => Ok(Action::Allow),
            _ => Err(self.bad_value(
                v,
                field,
                format!(
                    "`{key}` must be \"drop\" or \"allow\", found {}",
                    describe(v.get_ref())
                ),
            )),
        }
    }

    pub(super) fn boolean(&self, v: &Val<'_>, field: &str, key: &str) -> Res<bool> {
        v.get_ref().as_bool().ok_or_else(|| {
            self.bad_value(
                v,
                field,
                format!(
                    "`{key}` must be true or false, found {}",
                    describe(v.get_ref())
                ),
            )
        })
    }

    fn log_rate(&self, v: &Val<'_>, field: &str) -> Res<u32> {
        let n = match v.get_ref() {
            DeValue::Integer(i) => int_of(i),
            _ => None,
        };
        n.and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= MAX_LOG_RATE)
            .ok_or_else(|| {
                self.bad_value(
                    v,
                    field,
                    format!(
                        "`log_rate` must be an integer from 0 to {MAX_LOG_RATE} (drop events per second; 0 = none), found {}",
                        describe(v.get_ref())
                    ),
                )
            })
    }

    // ----- [base] and [roles] --------------------------------------------

    fn base(&self, v: &Val<'_>, out: &mut Vec<Pending>) -> Res<()> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                "base",
                format!(
                    "`base` must hold [[base.ingress]] and [[base.egress]] rules, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        for (k, val) in sorted(t) {
            let key: &str = k.get_ref();
            let dir = match key {
                "ingress" => Direction::Ingress,
                "egress" => Direction::Egress,
                _ => {
                    self.keep::<()>(Err(self.unknown_key(k, "base", &["ingress", "egress"])));
                    continue;
                }
            };
            self.keep(self.rules(val, &Owner::Base, dir, &child("base", key), out));
        }
        Ok(())
    }

    fn roles(&self, v: &Val<'_>, out: &mut Vec<Pending>) -> Res<Vec<Role>> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                "roles",
                format!(
                    "`roles` must hold [roles.NAME] tables, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut roles = Vec::new();
        for (k, val) in sorted(t) {
            let name: &str = k.get_ref();
            let field = child("roles", name);
            if self.keep(self.check_name(k, &field, "role")).is_none() {
                continue;
            }
            let Some(rt) = val.get_ref().as_table() else {
                self.keep::<()>(Err(self.bad_value(
                    val,
                    &field,
                    format!(
                        "role `{name}` must be a table ([roles.{name}]), found {}",
                        describe(val.get_ref())
                    ),
                )));
                continue;
            };
            let owner = Owner::Role(name.to_string());
            let mut hosts = None;
            let before = out.len();
            let errors = self.error_count();
            for (rk, rv) in sorted(rt) {
                let key: &str = rk.get_ref();
                let f = child(&field, key);
                match key {
                    "hosts" => hosts = self.keep(self.peer(rv, &f)),
                    "ingress" => {
                        self.keep(self.rules(rv, &owner, Direction::Ingress, &f, out));
                    }
                    "egress" => {
                        self.keep(self.rules(rv, &owner, Direction::Egress, &f, out));
                    }
                    _ => {
                        self.keep::<()>(Err(self.unknown_key(rk, &field, &ROLE_KEYS)));
                    }
                }
            }
            // A role whose keys were all wrong is not also reported empty.
            if hosts.is_none() && out.len() == before && self.error_count() == errors {
                self.keep::<()>(Err(self.err(
                    val.span(),
                    &field,
                    PolicyErrorKind::RoleEmpty(name.to_string()),
                )));
            }
            let (hosts_text, hosts) = match hosts {
                Some((text, ranges)) => (Some(text), ranges),
                None => (None, Vec::new()),
            };
            roles.push(Role {
                name: name.to_string(),
                hosts_text,
                hosts,
                loc: self.loc(val.span().start),
            });
        }
        Ok(roles)
    }
}
