//! `[services.NAME]`: a service's cgroup (`cgroup = "..."` or `unit =
//! "..."`), its own `defaults` and its `[[services.NAME.ingress]]` /
//! `egress` rules (read by `rules`, with `from_services` / `to_services`),
//! and the check that every service a rule names is defined.

use std::ops::Range;

use toml::de::DeValue;

use super::{
    Cx, Res, Val,
    diagnostics::{child, describe, index},
    is_valid_name,
    rules::Pending,
    sorted,
};
use crate::policy::{
    Action, Direction, Owner, PolicyErrorKind, Service, ServiceTarget, error::did_you_mean,
};

/// The keys of a `[services.NAME]` table.
const SERVICE_KEYS: [&str; 5] = ["cgroup", "unit", "defaults", "ingress", "egress"];
/// Unit types that have a cgroup of their own.
const UNIT_SUFFIXES: [&str; 6] = [".service", ".scope", ".slice", ".socket", ".mount", ".swap"];

/// A service name that a rule names, with where, for the check once every
/// service is known.
pub(super) struct ServiceRef {
    pub(super) name: String,
    pub(super) span: Range<usize>,
    pub(super) field: String,
}

/// The cgroup of a systemd unit in systemd's default layout: a slice
/// `a-b.slice` is `a.slice/a-b.slice`, `-.slice` the root, any other
/// unit is in `system.slice` (a unit with `Slice=` set names its cgroup
/// with `cgroup = "..."`).
pub fn unit_cgroup(unit: &str) -> String {
    if unit == "-.slice" {
        return String::new();
    }
    if let Some(stem) = unit.strip_suffix(".slice") {
        let parts: Vec<&str> = stem.split('-').collect();
        let mut path = Vec::new();
        for i in 1..=parts.len() {
            path.push(format!("{}.slice", parts[..i].join("-")));
        }
        return path.join("/");
    }
    format!("system.slice/{unit}")
}

/// A `cgroup` path: relative to the cgroup root (one leading `/` is
/// allowed and dropped: `/a/b` is `a/b` below the root), no `.`/`..`, no
/// empty components (no `//`, no trailing `/`).
fn cgroup_path(s: &str) -> Result<String, String> {
    let t = s.strip_prefix('/').unwrap_or(s);
    if t.is_empty() {
        return Err(
            "`cgroup` names a cgroup below the root; the root itself cannot be a service".into(),
        );
    }
    for part in t.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!(
                "`{s}` is not a cgroup path: write the path below the cgroup root, e.g. \"system.slice/app.service\", without `.`, `..`, `//` or a trailing `/`"
            ));
        }
        if part.chars().any(char::is_control) {
            return Err(format!("`{s}` holds a control character"));
        }
    }
    Ok(t.to_string())
}

impl Cx<'_> {
    pub(super) fn services(&self, v: &Val<'_>, out: &mut Vec<Pending>) -> Res<Vec<Service>> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                "services",
                format!(
                    "`services` must hold [services.NAME] tables, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let mut services: Vec<Service> = Vec::new();
        for (k, val) in sorted(t) {
            let name: &str = k.get_ref();
            let field = child("services", name);
            if !is_valid_name(name) {
                self.keep::<()>(Err(self.err(
                    k.span(),
                    &field,
                    PolicyErrorKind::BadValue(format!(
                        "invalid service name `{name}`: use a letter or `_` first, then letters, digits, `_` or `-`"
                    )),
                )));
                continue;
            }
            let Some(st) = val.get_ref().as_table() else {
                self.keep::<()>(Err(self.bad_value(
                    val,
                    &field,
                    format!(
                        "service `{name}` must be a table ([services.{name}]), found {}",
                        describe(val.get_ref())
                    ),
                )));
                continue;
            };
            let owner = Owner::Service(name.to_string());
            let mut target = None;
            let mut target_loc = None;
            let (mut ingress_default, mut egress_default) = (None, None);
            let errors = self.error_count();
            for (sk, sv) in sorted(st) {
                let key: &str = sk.get_ref();
                let f = child(&field, key);
                match key {
                    "cgroup" | "unit" => {
                        if target.is_some() {
                            self.keep::<()>(Err(self.bad_value(
                                sv,
                                &f,
                                "a service has one of `cgroup` and `unit`, not both".into(),
                            )));
                            continue;
                        }
                        target = self.keep(self.service_target(key, sv, &f));
                        target_loc = Some(self.loc(sv.span().start));
                    }
                    "defaults" => {
                        if let Some((i, e)) = self.keep(self.service_defaults(sv, &f)) {
                            ingress_default = i;
                            egress_default = e;
                        }
                    }
                    "ingress" => {
                        self.keep(self.rules(sv, &owner, Direction::Ingress, &f, out));
                    }
                    "egress" => {
                        self.keep(self.rules(sv, &owner, Direction::Egress, &f, out));
                    }
                    _ => {
                        self.keep::<()>(Err(self.unknown_key(sk, &field, &SERVICE_KEYS)));
                    }
                }
            }
            let Some(target) = target else {
                if self.error_count() == errors {
                    self.keep::<()>(Err(self.err(
                        val.span(),
                        &field,
                        PolicyErrorKind::BadValue(format!(
                            "service `{name}` names no cgroup: add `cgroup = \"system.slice/{name}.service\"` or `unit = \"{name}.service\"`"
                        )),
                    )));
                }
                continue;
            };
            let cgroup = match &target {
                ServiceTarget::Cgroup(c) => c.clone(),
                ServiceTarget::Unit(u) => unit_cgroup(u),
            };
            if let Some(other) = services.iter().find(|s| s.cgroup == cgroup) {
                self.keep::<()>(Err(self.err(
                    val.span(),
                    &field,
                    PolicyErrorKind::BadValue(format!(
                        "cgroup `{cgroup}` is already service `{}` (line {})",
                        other.name, other.loc.line
                    )),
                )));
                continue;
            }
            services.push(Service {
                name: name.to_string(),
                target,
                cgroup,
                ingress_default,
                egress_default,
                loc: self.loc(val.span().start),
                target_loc: target_loc.unwrap_or_else(|| self.loc(val.span().start)),
            });
        }
        Ok(services)
    }

    fn service_target(&self, key: &str, v: &Val<'_>, field: &str) -> Res<ServiceTarget> {
        let Some(s) = v.get_ref().as_str() else {
            return Err(self.bad_value(
                v,
                field,
                format!("`{key}` must be a string, found {}", describe(v.get_ref())),
            ));
        };
        if key == "cgroup" {
            return cgroup_path(s)
                .map(ServiceTarget::Cgroup)
                .map_err(|m| self.bad_value(v, field, m));
        }
        let ok = !s.contains('/')
            && !s.starts_with('.')
            && UNIT_SUFFIXES
                .iter()
                .any(|suf| s.len() > suf.len() && s.ends_with(suf))
            && !s.chars().any(|c| c.is_control() || c.is_whitespace());
        if !ok {
            return Err(self.bad_value(
                v,
                field,
                format!(
                    "`{s}` is not a unit name with a cgroup: write e.g. \"mysql.service\" (one of {}), or name the cgroup with `cgroup = \"...\"`",
                    UNIT_SUFFIXES.join(", ")
                ),
            ));
        }
        Ok(ServiceTarget::Unit(s.to_string()))
    }

    /// `defaults = { ingress = "drop", egress = "allow" }`.
    fn service_defaults(&self, v: &Val<'_>, field: &str) -> Res<(Option<Action>, Option<Action>)> {
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.bad_value(
                v,
                field,
                format!(
                    "`defaults` must be a table such as {{ ingress = \"drop\", egress = \"drop\" }}, found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        let (mut ingress, mut egress) = (None, None);
        for (k, val) in sorted(t) {
            let key: &str = k.get_ref();
            let f = child(field, key);
            let a = match key {
                "ingress" | "egress" => match val.get_ref().as_str() {
                    Some("drop") => Action::Drop,
                    Some("allow") => Action::Allow,
                    _ => {
                        self.keep::<()>(Err(self.bad_value(
                            val,
                            &f,
                            format!(
                                "`{key}` must be \"drop\" or \"allow\", found {}",
                                describe(val.get_ref())
                            ),
                        )));
                        continue;
                    }
                },
                _ => {
                    self.keep::<()>(Err(self.unknown_key(k, field, &["ingress", "egress"])));
                    continue;
                }
            };
            if key == "ingress" {
                ingress = Some(a);
            } else {
                egress = Some(a);
            }
        }
        Ok((ingress, egress))
    }

    /// `from_services` / `to_services`: a service name or a non-empty
    /// list of them, checked once every service is known.
    pub(super) fn service_refs(&self, v: &Val<'_>, field: &str) -> Res<Vec<String>> {
        let items: Vec<(&Val<'_>, String)> = match v.get_ref() {
            DeValue::String(_) => vec![(v, field.to_string())],
            DeValue::Array(a) if a.is_empty() => {
                return Err(self.err(v.span(), field, PolicyErrorKind::EmptyList));
            }
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, item)| (item, index(field, i)))
                .collect(),
            other => {
                return Err(self.bad_value(
                    v,
                    field,
                    format!(
                        "expected a list of service names such as [\"app\"], found {}",
                        describe(other)
                    ),
                ));
            }
        };
        let mut out = Vec::new();
        for (item, f) in items {
            let Some(name) = item.get_ref().as_str().filter(|s| is_valid_name(s)) else {
                return Err(self.bad_value(
                    item,
                    &f,
                    format!(
                        "expected a service name, found {}",
                        describe(item.get_ref())
                    ),
                ));
            };
            self.svc_refs.borrow_mut().push(ServiceRef {
                name: name.to_string(),
                span: item.span(),
                field: f,
            });
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Every service a rule names must be defined.
    pub(super) fn check_service_refs(&self, services: &[Service]) {
        let refs = std::mem::take(&mut *self.svc_refs.borrow_mut());
        for r in refs {
            if services.iter().any(|s| s.name == r.name) {
                continue;
            }
            let hint = did_you_mean(&r.name, services.iter().map(|s| s.name.as_str()));
            self.keep::<()>(Err(self
                .err(r.span, &r.field, PolicyErrorKind::UnknownService(r.name))
                .with_hint(hint)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unit_cgroup;
    use crate::policy::{Action, Direction, Owner, Policy, ServiceTarget};

    const ISSUE: &str = r#"version = 1
[sets]
app_nodes = ["198.18.0.0/24"]
db_nodes = ["198.18.1.0/24"]
[services.app]
cgroup = "system.slice/app.service"   # a path below the cgroup v2 root
defaults = { egress = "drop" }
[services.db]
unit = "mysql.service"

[[services.db.ingress]]
from_services = ["app"]
tcp = [3306]
[[services.db.ingress]]
from = "app_nodes"
tcp = [3306]
[[services.app.egress]]
to = ["127.0.0.1", "::1", "db_nodes"]
tcp = [3306]
"#;

    fn errors(text: &str) -> Vec<String> {
        crate::policy::parse::parse_str_all(text, "p.toml")
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_issue_example_parses() {
        let p = Policy::from_str(ISSUE, "p.toml").unwrap();
        assert_eq!(p.services.len(), 2);
        assert_eq!(p.services[0].cgroup, "system.slice/app.service");
        assert_eq!(p.services[1].cgroup, "system.slice/mysql.service");
        assert_eq!(
            p.services[1].target,
            ServiceTarget::Unit("mysql.service".into())
        );
        assert_eq!(
            p.services[0].default_action(&p.defaults, Direction::Egress),
            Action::Drop
        );
        assert_eq!(
            p.services[1].default_action(&p.defaults, Direction::Egress),
            Action::Allow
        );
        // Service rules have their own ids and never reach interfaces.
        assert!(p.rules.is_empty());
        assert_eq!(p.service_rules.len(), 3);
        assert_eq!(p.service_rules[0].peer_services, vec!["app".to_string()]);
        assert!(p.service_rules[0].peers.is_empty());
        assert_eq!(p.service_rules[0].owner, Owner::Service("db".into()));
        assert_eq!(p.service_rules[0].label(), "services.db.ingress[0]");
        assert!(!p.service_rules[1].applies(&[], None));
    }

    #[test]
    fn an_unknown_service_is_an_error_with_its_position() {
        let text = ISSUE.replace(r#"from_services = ["app"]"#, r#"from_services = ["ap"]"#);
        assert_eq!(
            errors(&text),
            vec![
                "p.toml:12:18: services.db.ingress[0].from_services[0]: unknown service `ap`; define it as [services.ap]; did you mean `app`?"
            ]
        );
    }

    #[test]
    fn bad_services_are_errors() {
        let e = errors("version = 1\n[services.a]\ncgroup = \"x\"\nunit = \"x.service\"\n");
        assert!(
            e[0].contains("p.toml:4:8: services.a.unit: a service has one of"),
            "{e:?}"
        );
        let e = errors("version = 1\n[services.a]\ndefaults = { egress = \"drop\" }\n");
        assert!(e[0].contains("service `a` names no cgroup"), "{e:?}");
        let e = errors("version = 1\n[services.a]\ncgroup = \"../x\"\n");
        assert!(e[0].contains("is not a cgroup path"), "{e:?}");
        // One leading `/` is the root's; no empty part anywhere else.
        for bad in ["/x/", "x/", "x//y", "//x", "/"] {
            let e = errors(&format!("version = 1\n[services.a]\ncgroup = \"{bad}\"\n"));
            assert!(
                e[0].contains("is not a cgroup path") || e[0].contains("the root itself"),
                "{bad}: {e:?}"
            );
        }
        let e = errors("version = 1\n[services.a]\nunit = \"mysql\"\n");
        assert!(e[0].contains("is not a unit name"), "{e:?}");
        let e = errors(
            "version = 1\n[services.a]\ncgroup = \"a\"\n[[services.a.ingress]]\nfrom = \"any\"\ntcp = [1]\ninterfaces = [\"eth0\"]\n",
        );
        assert!(e[0].contains("unknown key `interfaces`"), "{e:?}");
        let e = errors(
            "version = 1\n[services.a]\ncgroup = \"a\"\n[[services.a.ingress]]\ntcp = [1]\n",
        );
        assert!(e[0].contains("missing `from` or `from_services`"), "{e:?}");
        let e =
            errors("version = 1\n[services.a]\ncgroup = \"a\"\n[services.b]\ncgroup = \"/a\"\n");
        assert!(e[0].contains("cgroup `a` is already service `a`"), "{e:?}");
        // from_services belongs to services, not roles.
        let e = errors(
            "version = 1\n[roles.r]\nhosts = \"any\"\n[[roles.r.ingress]]\nfrom_services = [\"a\"]\ntcp = [1]\n",
        );
        assert!(e[0].contains("unknown key `from_services`"), "{e:?}");
    }

    #[test]
    fn units_resolve_to_systemd_cgroups() {
        assert_eq!(unit_cgroup("mysql.service"), "system.slice/mysql.service");
        assert_eq!(unit_cgroup("user.slice"), "user.slice");
        assert_eq!(
            unit_cgroup("machine-qemu.slice"),
            "machine.slice/machine-qemu.slice"
        );
        assert_eq!(unit_cgroup("-.slice"), "");
    }
}
