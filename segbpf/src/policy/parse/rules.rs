//! Rules: one direction's `[[...ingress]]` / `[[...egress]]` tables, each
//! with its peer (`from` / `to`, also used for a role's `hosts`), ports,
//! ICMP switches and interfaces.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::{
    Cx, Res, Val,
    diagnostics::{addr_kind, child, describe, index},
    int_of, is_valid_name, sorted,
};
use crate::policy::{
    AddrRange, Direction, Owner, PolicyErrorKind, PortRange, Rule, addr::parse_item,
    error::did_you_mean, ports::PortParseError,
};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Longest rule name (it becomes a metric label value).
pub(super) const MAX_RULE_NAME: usize = 64;

/// The keys of a rule whose peer key is `peer_key` (`from` or `to`).
fn rule_keys(peer_key: &'static str) -> [&'static str; 9] {
    [
        peer_key,
        "tcp",
        "udp",
        "icmp",
        "icmpv6",
        "proto",
        "interfaces",
        "name",
        "description",
    ]
}

/// The keys of a service rule (no `interfaces`; `from_services` /
/// `to_services` name local peers by service).
fn service_rule_keys(peer_key: &'static str, services_key: &'static str) -> [&'static str; 9] {
    [
        peer_key,
        services_key,
        "tcp",
        "udp",
        "icmp",
        "icmpv6",
        "proto",
        "name",
        "description",
    ]
}

/// The port of a well-known service name, for the hint given when a port
/// list names a service (`tcp = ["ssh"]`). Names are not accepted as ports:
/// what a policy means must not depend on each machine's /etc/services,
/// and `status`, `export` and the kernel show numbers.
pub(super) fn service_port(name: &str) -> Option<u16> {
    Some(match name.to_ascii_lowercase().as_str() {
        "ftp" => 21,
        "ssh" => 22,
        "telnet" => 23,
        "smtp" => 25,
        "domain" | "dns" => 53,
        "bootps" | "dhcp" => 67,
        "tftp" => 69,
        "http" | "www" => 80,
        "kerberos" => 88,
        "pop3" => 110,
        "ntp" => 123,
        "imap" => 143,
        "snmp" => 161,
        "ldap" => 389,
        "https" => 443,
        "smtps" | "submissions" => 465,
        "syslog" => 514,
        "submission" => 587,
        "ldaps" => 636,
        "imaps" => 993,
        "pop3s" => 995,
        "mssql" => 1433,
        "etcd" => 2379,
        "mysql" => 3306,
        "rdp" => 3389,
        "postgresql" | "postgres" => 5432,
        "amqp" => 5672,
        "redis" => 6379,
        "http-alt" => 8080,
        "mongodb" => 27017,
        _ => return None,
    })
}

/// A rule before ids are assigned, with its byte position in the file
/// and that of its `name` value, if it has one.
pub(super) struct Pending {
    pub(super) pos: usize,
    pub(super) rule: Rule,
    pub(super) name_span: Option<Range<usize>>,
}

impl Cx<'_> {
    // ----- rules ---------------------------------------------------------

    pub(super) fn rules(
        &self,
        v: &Val<'_>,
        owner: &Owner,
        dir: Direction,
        field: &str,
        out: &mut Vec<Pending>,
    ) -> Res<()> {
        let DeValue::Array(a) = v.get_ref() else {
            return Err(self.bad_value(
                v,
                field,
                format!(
                    "expected an array of rule tables (write [[{field}]]), found {}",
                    describe(v.get_ref())
                ),
            ));
        };
        for (i, item) in a.iter().enumerate() {
            let f = index(field, i);
            let Some(t) = item.get_ref().as_table() else {
                self.keep::<()>(Err(self.bad_value(
                    item,
                    &f,
                    format!("expected a rule table, found {}", describe(item.get_ref())),
                )));
                continue;
            };
            let Some((rule, name_span)) = self.rule(t, item.span(), owner, dir, i, &f) else {
                continue;
            };
            out.push(Pending {
                pos: item.span().start,
                rule,
                name_span,
            });
        }
        Ok(())
    }

    /// One rule; None when it has errors (all of them recorded).
    fn rule(
        &self,
        t: &DeTable<'_>,
        span: Range<usize>,
        owner: &Owner,
        direction: Direction,
        idx: usize,
        field: &str,
    ) -> Option<(Rule, Option<Range<usize>>)> {
        let errors = self.error_count();
        let peer_key = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let service = matches!(owner, Owner::Service(_));
        let services_key = match direction {
            Direction::Ingress => "from_services",
            Direction::Egress => "to_services",
        };
        let mut peer_services = Vec::new();
        let mut peer = None;
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut icmp = false;
        let mut icmpv6 = false;
        let mut any_proto = false;
        let mut interfaces = None;
        let (mut name, mut name_span, mut description) = (None, None, None);
        for (k, v) in sorted(t) {
            let key: &str = k.get_ref();
            let f = child(field, key);
            let read: Res<()> = match key {
                _ if key == peer_key => self.peer(v, &f).map(|p| peer = Some(p)),
                _ if service && key == services_key => {
                    self.service_refs(v, &f).map(|n| peer_services = n)
                }
                "tcp" => self.ports(v, &f).map(|p| tcp = p),
                "udp" => self.ports(v, &f).map(|p| udp = p),
                "icmp" => self.boolean(v, &f, key).map(|b| icmp = b),
                "icmpv6" => self.boolean(v, &f, key).map(|b| icmpv6 = b),
                "proto" => match v.get_ref().as_str() {
                    Some("any") => {
                        any_proto = true;
                        Ok(())
                    }
                    _ => Err(self.bad_value(
                            v,
                            &f,
                            format!(
                                "`proto` only accepts \"any\" (list ports with `tcp`/`udp`, or use `icmp`/`icmpv6`), found {}",
                                describe(v.get_ref())
                            ),
                        )),
                },
                "interfaces" if !service => self.interfaces(v, &f).map(|i| interfaces = Some(i)),
                "name" => match v.get_ref().as_str() {
                    Some(s) if is_valid_name(s) && s.len() <= MAX_RULE_NAME => {
                        name = Some(s.to_string());
                        name_span = Some(v.span());
                        Ok(())
                    }
                    _ => Err(self.bad_value(
                        v,
                        &f,
                        format!(
                            "a rule name is a string of letters, digits, `_` and `-` starting with a letter or `_`, at most {MAX_RULE_NAME} bytes, found {}",
                            describe(v.get_ref())
                        ),
                    )),
                },
                "description" => match v.get_ref().as_str() {
                    Some(s) => {
                        description = Some(s.to_string());
                        Ok(())
                    }
                    None => Err(self.bad_value(
                        v,
                        &f,
                        format!("expected a string, found {}", describe(v.get_ref())),
                    )),
                },
                _ if service => Err(self.unknown_key(k, field, &service_rule_keys(peer_key, services_key))),
                _ => Err(self.unknown_key(k, field, &rule_keys(peer_key))),
            };
            self.keep(read);
        }
        // A rule with a bad key is not also missing its peer or protocol.
        if self.error_count() > errors {
            return None;
        }
        let peer = match peer {
            None if !peer_services.is_empty() => Some((String::new(), Vec::new())),
            p => p,
        };
        let Some((peer_text, peers)) = peer else {
            let what = if service {
                format!("`{peer_key}` or `{services_key}`")
            } else {
                format!("`{peer_key}`")
            };
            self.keep::<()>(Err(self.err(
                span,
                field,
                PolicyErrorKind::BadValue(format!(
                    "missing {what}: name the peer with `{peer_key} = \"any\"`, a set name, an address or a list of those"
                )),
            )));
            return None;
        };
        if tcp.is_empty() && udp.is_empty() && !icmp && !icmpv6 && !any_proto {
            self.keep::<()>(Err(self.err(span, field, PolicyErrorKind::NoProtocol)));
            return None;
        }
        Some((
            Rule {
                id: 0,
                owner: owner.clone(),
                direction,
                index: idx,
                peer_text,
                peers,
                tcp,
                udp,
                icmp,
                icmpv6,
                any_proto,
                interfaces,
                loc: self.loc(span.start),
                name,
                description,
                peer_services,
            },
            name_span,
        ))
    }

    /// A list's items, each read by `item`; every bad item is recorded and
    /// the first error returned (the list as a whole is bad).
    fn each<'v, 'i: 'v, T>(
        &self,
        items: impl Iterator<Item = &'v Val<'i>>,
        field: &str,
        item: impl Fn(&Val<'i>, &str) -> Res<T>,
    ) -> Res<Vec<T>> {
        let mut out = Vec::new();
        let mut first = None;
        for (i, v) in items.enumerate() {
            match item(v, &index(field, i)) {
                Ok(x) => out.push(x),
                Err(e) if first.is_none() => first = Some(e),
                Err(e) => {
                    self.keep::<()>(Err(e));
                }
            }
        }
        first.map_or(Ok(out), Err)
    }

    /// A peer or `hosts`: `"any"`, a set name, a literal, or a list of those.
    /// Returns the text as written and the resolved ranges.
    pub(super) fn peer(&self, v: &Val<'_>, field: &str) -> Res<(String, Vec<AddrRange>)> {
        match v.get_ref() {
            DeValue::String(s) => Ok((s.to_string(), self.peer_item(s, v.span(), field)?)),
            DeValue::Array(a) => {
                if a.is_empty() {
                    return Err(self.err(v.span(), field, PolicyErrorKind::EmptyList));
                }
                let items = self.each(a.iter(), field, |item, f| {
                    let DeValue::String(s) = item.get_ref() else {
                        return Err(self.bad_value(
                            item,
                            f,
                            format!(
                                "expected \"any\", a set name or an address string, found {}",
                                describe(item.get_ref())
                            ),
                        ));
                    };
                    Ok((s.to_string(), self.peer_item(s, item.span(), f)?))
                })?;
                let texts: Vec<String> = items.iter().map(|(t, _)| t.clone()).collect();
                let ranges = items.into_iter().flat_map(|(_, r)| r).collect();
                Ok((format!("[{}]", texts.join(", ")), ranges))
            }
            other => Err(self.bad_value(
                v,
                field,
                format!(
                    "expected \"any\", a set name, an address/CIDR/range or a list of those, found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn peer_item(&self, s: &str, span: Range<usize>, field: &str) -> Res<Vec<AddrRange>> {
        let t = s.trim();
        if t == "any" {
            return Ok(vec![AddrRange::any_v4(), AddrRange::any_v6()]);
        }
        if is_valid_name(t) {
            if let Some(r) = self.sets.get(t) {
                return Ok(r.clone());
            }
            let hint = did_you_mean(
                t,
                self.sets
                    .keys()
                    .map(String::as_str)
                    .chain(std::iter::once("any")),
            );
            return Err(self
                .err(span, field, PolicyErrorKind::UnknownSet(t.to_string()))
                .with_hint(hint));
        }
        parse_item(t)
            .map(|r| vec![r])
            .map_err(|e| self.err(span, field, addr_kind(e)))
    }

    /// `tcp` / `udp`: a non-empty list of ports and `"lo-hi"` ranges
    /// (a single port or range string is accepted too).
    fn ports(&self, v: &Val<'_>, field: &str) -> Res<Vec<PortRange>> {
        match v.get_ref() {
            DeValue::Array(a) => {
                if a.is_empty() {
                    return Err(self.err(v.span(), field, PolicyErrorKind::EmptyList));
                }
                self.each(a.iter(), field, |item, f| self.port(item, f))
            }
            DeValue::Integer(_) | DeValue::String(_) => Ok(vec![self.port(v, field)?]),
            other => Err(self.bad_value(
                v,
                field,
                format!(
                    "expected a list of ports such as [80, 443] or [\"2500-3300\"], found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn port(&self, v: &Val<'_>, field: &str) -> Res<PortRange> {
        let kind = match v.get_ref() {
            DeValue::Integer(i) => match int_of(i).map(u16::try_from) {
                Some(Ok(p)) => return Ok(PortRange::single(p)),
                _ => PolicyErrorKind::PortOutOfRange,
            },
            DeValue::String(s) => match PortRange::parse(s) {
                Ok(r) => return Ok(r),
                Err(PortParseError::Bad(m)) => {
                    // A service name: say its number rather than guess from
                    // /etc/services (see `service_port`).
                    let hint = service_port(s.trim()).map(|p| {
                        format!(
                            "`{}` is a service name; write its port number: {p}",
                            s.trim()
                        )
                    });
                    return Err(self
                        .err(v.span(), field, PolicyErrorKind::BadPort(m))
                        .with_hint(hint));
                }
                Err(PortParseError::OutOfRange) => PolicyErrorKind::PortOutOfRange,
                Err(PortParseError::Reversed) => PolicyErrorKind::ReversedPortRange,
                Err(PortParseError::Empty) => PolicyErrorKind::EmptyRange,
            },
            other => PolicyErrorKind::BadPort(format!(
                "expected a port number or a \"lo-hi\" string, found {}",
                describe(other)
            )),
        };
        Err(self.err(v.span(), field, kind))
    }

    /// `interfaces`: a non-empty list of interface names (one name string is
    /// accepted too).
    fn interfaces(&self, v: &Val<'_>, field: &str) -> Res<Vec<String>> {
        let items: Vec<(&Val<'_>, String)> = match v.get_ref() {
            DeValue::String(_) => vec![(v, field.to_string())],
            DeValue::Array(a) => {
                if a.is_empty() {
                    return Err(self.err(v.span(), field, PolicyErrorKind::EmptyList));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, item)| (item, index(field, i)))
                    .collect()
            }
            other => {
                return Err(self.bad_value(
                    v,
                    field,
                    format!(
                        "expected a list of interface names such as [\"eth1\"], found {}",
                        describe(other)
                    ),
                ));
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (item, f) in items {
            let name = match item.get_ref().as_str() {
                Some("") => Err("an interface name cannot be empty".to_string()),
                Some(s) if s.len() > MAX_IFNAME => Err(format!(
                    "interface name `{s}` is longer than {MAX_IFNAME} bytes"
                )),
                Some(s) if s.contains(['/', ' ', '\t']) => {
                    Err(format!("`{s}` is not a valid interface name"))
                }
                Some(s) => Ok(s.to_string()),
                None => Err(format!(
                    "expected an interface name string, found {}",
                    describe(item.get_ref())
                )),
            };
            out.push(name.map_err(|m| self.bad_value(item, &f, m))?);
        }
        Ok(out)
    }
}
