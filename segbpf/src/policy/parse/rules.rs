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
    ports::PortParseError,
};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Longest rule name (it becomes a metric label value).
pub(super) const MAX_RULE_NAME: usize = 64;

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
                return Err(self.bad_value(
                    item,
                    &f,
                    format!("expected a rule table, found {}", describe(item.get_ref())),
                ));
            };
            let (rule, name_span) = self.rule(t, item.span(), owner, dir, i, &f)?;
            out.push(Pending {
                pos: item.span().start,
                rule,
                name_span,
            });
        }
        Ok(())
    }

    fn rule(
        &self,
        t: &DeTable<'_>,
        span: Range<usize>,
        owner: &Owner,
        direction: Direction,
        idx: usize,
        field: &str,
    ) -> Res<(Rule, Option<Range<usize>>)> {
        let peer_key = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
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
            match key {
                _ if key == peer_key => peer = Some(self.peer(v, &f)?),
                "tcp" => tcp = self.ports(v, &f)?,
                "udp" => udp = self.ports(v, &f)?,
                "icmp" => icmp = self.boolean(v, &f, key)?,
                "icmpv6" => icmpv6 = self.boolean(v, &f, key)?,
                "proto" => match v.get_ref().as_str() {
                    Some("any") => any_proto = true,
                    _ => {
                        return Err(self.bad_value(
                            v,
                            &f,
                            format!(
                                "`proto` only accepts \"any\" (list ports with `tcp`/`udp`, or use `icmp`/`icmpv6`), found {}",
                                describe(v.get_ref())
                            ),
                        ));
                    }
                },
                "interfaces" => interfaces = Some(self.interfaces(v, &f)?),
                "name" => match v.get_ref().as_str() {
                    Some(s) if is_valid_name(s) && s.len() <= MAX_RULE_NAME => {
                        name = Some(s.to_string());
                        name_span = Some(v.span());
                    }
                    _ => {
                        return Err(self.bad_value(
                            v,
                            &f,
                            format!(
                                "a rule name is a string of letters, digits, `_` and `-` starting with a letter or `_`, at most {MAX_RULE_NAME} bytes, found {}",
                                describe(v.get_ref())
                            ),
                        ));
                    }
                },
                "description" => match v.get_ref().as_str() {
                    Some(s) => description = Some(s.to_string()),
                    None => {
                        return Err(self.bad_value(
                            v,
                            &f,
                            format!("expected a string, found {}", describe(v.get_ref())),
                        ));
                    }
                },
                _ => return Err(self.unknown_key(k, field)),
            }
        }
        let Some((peer_text, peers)) = peer else {
            return Err(self.err(
                span,
                field,
                PolicyErrorKind::BadValue(format!(
                    "missing `{peer_key}`: name the peer with `{peer_key} = \"any\"`, a set name, an address or a list of those"
                )),
            ));
        };
        if tcp.is_empty() && udp.is_empty() && !icmp && !icmpv6 && !any_proto {
            return Err(self.err(span, field, PolicyErrorKind::NoProtocol));
        }
        Ok((
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
            },
            name_span,
        ))
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
                let mut texts = Vec::with_capacity(a.len());
                let mut ranges = Vec::new();
                for (i, item) in a.iter().enumerate() {
                    let f = index(field, i);
                    let DeValue::String(s) = item.get_ref() else {
                        return Err(self.bad_value(
                            item,
                            &f,
                            format!(
                                "expected \"any\", a set name or an address string, found {}",
                                describe(item.get_ref())
                            ),
                        ));
                    };
                    ranges.extend(self.peer_item(s, item.span(), &f)?);
                    texts.push(s.to_string());
                }
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
            return match self.sets.get(t) {
                Some(r) => Ok(r.clone()),
                None => Err(self.err(span, field, PolicyErrorKind::UnknownSet(t.to_string()))),
            };
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
                a.iter()
                    .enumerate()
                    .map(|(i, item)| self.port(item, &index(field, i)))
                    .collect()
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
                Err(PortParseError::Bad(m)) => PolicyErrorKind::BadPort(m),
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
