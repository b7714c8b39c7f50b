//! roles.toml v1 → validated [`Policy`].
//!
//! The text is parsed with `toml`'s span-preserving [`DeTable`], so every
//! error names the line and column of the offending key or value (columns
//! count characters, both 1-based) and its dotted field path, e.g.
//! `roles.app.egress[1].tcp[0]`. Validation is strict: unknown keys, unknown
//! sets, bad addresses and ports, empty lists, empty roles and rules without
//! a protocol are errors, never silently ignored.

use std::{collections::HashMap, ops::Range};

use toml::{
    Spanned,
    de::{DeInteger, DeString, DeTable, DeValue},
};

use super::{
    Action, AddrRange, AddrSet, Defaults, Direction, Loc, Owner, Policy, PolicyError,
    PolicyErrorKind, PortRange, Role, Rule,
    addr::{AddrParseError, parse_item},
    ports::PortParseError,
};

type Key<'i> = Spanned<DeString<'i>>;
type Val<'i> = Spanned<DeValue<'i>>;
type Res<T> = Result<T, PolicyError>;

/// The only policy format version this parser reads.
pub const VERSION: u32 = 1;

/// The largest accepted `defaults.log_rate` (drop events per second).
pub const MAX_LOG_RATE: u32 = 1_000_000;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Parses and validates roles.toml text; `source` names the file in errors.
pub fn parse_str(text: &str, source: &str) -> Result<Policy, PolicyError> {
    let cx = Cx::new(text, source);
    let doc = DeTable::parse(text).map_err(|e| cx.toml_error(&e))?;
    cx.policy(doc.get_ref())
}

/// Whether `name` is a valid set or role name: `[A-Za-z_][A-Za-z0-9_-]*`.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parsing context: the text (for positions) and the sets seen so far.
struct Cx<'a> {
    text: &'a str,
    source: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
    /// Set name → its ranges, for resolving peers and hosts.
    sets: HashMap<String, Vec<AddrRange>>,
}

/// A rule before ids are assigned, with its byte position in the file.
struct Pending {
    pos: usize,
    rule: Rule,
}

impl<'a> Cx<'a> {
    fn new(text: &'a str, source: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            text,
            source,
            line_starts,
            sets: HashMap::new(),
        }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    fn loc(&self, offset: usize) -> Loc {
        let offset = offset.min(self.text.len());
        let idx = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts.get(idx).copied().unwrap_or(0);
        let col = match self.text.get(start..offset) {
            Some(s) => s.chars().count(),
            None => offset.saturating_sub(start),
        };
        Loc {
            line: u32::try_from(idx + 1).unwrap_or(u32::MAX),
            column: u32::try_from(col + 1).unwrap_or(u32::MAX),
        }
    }

    fn err(&self, span: Range<usize>, field: &str, kind: PolicyErrorKind) -> PolicyError {
        PolicyError::new(self.source, Some(self.loc(span.start)), field, kind)
    }

    // ----- TOML syntax errors -------------------------------------------

    /// Maps a toml error, recognising a set or role defined twice.
    fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        let msg = e.message().trim().replace('\n', "; ");
        let span = e.span();
        if msg.starts_with("duplicate key")
            && let Some(span) = &span
            && let Some(dup) = self.duplicate(span.clone())
        {
            return dup;
        }
        PolicyError::new(
            self.source,
            span.map(|s| self.loc(s.start)),
            "",
            PolicyErrorKind::Toml(msg),
        )
    }

    /// Works out the full path of a duplicated key from the text around it:
    /// the enclosing `[header]` (or the header the key is in) plus any
    /// dotted prefix. `sets.NAME` → DuplicateSet, `roles.NAME` → DuplicateRole.
    fn duplicate(&self, span: Range<usize>) -> Option<PolicyError> {
        let key = unquote(self.text.get(span.clone())?);
        let line_start = self.text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        let before = self.text.get(line_start..span.start)?.trim_start();
        let mut path = if let Some(header) = before.strip_prefix('[') {
            split_dotted(header.trim_start_matches('['))
        } else {
            let mut p = self.enclosing_header(line_start);
            p.extend(split_dotted(before));
            p
        };
        path.push(key.clone());
        let field = path
            .iter()
            .fold(String::new(), |acc, k| child(&acc, k.as_str()));
        let kind = match path.as_slice() {
            [a, name] if a == "sets" => PolicyErrorKind::DuplicateSet(name.clone()),
            [a, name] if a == "roles" => PolicyErrorKind::DuplicateRole(name.clone()),
            _ => PolicyErrorKind::Toml(format!("duplicate key `{key}`")),
        };
        Some(self.err(span, &field, kind))
    }

    /// The path of the last `[table]` / `[[array]]` header before `line_start`.
    fn enclosing_header(&self, line_start: usize) -> Vec<String> {
        let Some(head) = self.text.get(..line_start) else {
            return Vec::new();
        };
        for line in head.lines().rev() {
            let t = line.trim();
            let Some(inner) = t.strip_prefix('[') else {
                continue;
            };
            let inner = inner.trim_start_matches('[');
            let Some(end) = inner.find(']') else {
                continue;
            };
            let rest = inner[end..].trim_start_matches(']').trim();
            if rest.is_empty() || rest.starts_with('#') {
                return split_dotted(&inner[..end]);
            }
        }
        Vec::new()
    }

    // ----- document -----------------------------------------------------

    fn policy(mut self, root: &DeTable<'_>) -> Res<Policy> {
        let mut version = None;
        let mut sets = None;
        let mut defaults = None;
        let mut base = None;
        let mut roles = None;
        for (k, v) in sorted(root) {
            let key: &str = k.get_ref();
            match key {
                "version" => version = Some(v),
                "sets" => sets = Some(v),
                "defaults" => defaults = Some(v),
                "base" => base = Some(v),
                "roles" => roles = Some(v),
                _ => return Err(self.unknown_key(k, "")),
            }
        }
        let Some(version) = version else {
            return Err(self.err(0..0, "version", PolicyErrorKind::VersionMissing));
        };
        let version = self.version(version)?;
        let sets = match sets {
            Some(v) => self.sets(v)?,
            None => Vec::new(),
        };
        for s in &sets {
            self.sets.insert(s.name.clone(), s.ranges.clone());
        }
        let defaults = match defaults {
            Some(v) => self.defaults(v)?,
            None => Defaults::default(),
        };
        let mut pending = Vec::new();
        if let Some(v) = base {
            self.base(v, &mut pending)?;
        }
        let roles = match roles {
            Some(v) => self.roles(v, &mut pending)?,
            None => Vec::new(),
        };
        pending.sort_by_key(|p| p.pos);
        let mut rules = Vec::with_capacity(pending.len());
        for (id, p) in pending.into_iter().enumerate() {
            let mut rule = p.rule;
            rule.id = u32::try_from(id).unwrap_or(u32::MAX);
            rules.push(rule);
        }
        Ok(Policy {
            source: self.source.to_string(),
            version,
            sets,
            defaults,
            rules,
            roles,
        })
    }

    fn unknown_key(&self, k: &Key<'_>, parent: &str) -> PolicyError {
        let key: &str = k.get_ref();
        self.err(
            k.span(),
            &child(parent, key),
            PolicyErrorKind::UnknownKey(key.to_string()),
        )
    }

    fn bad_value(&self, v: &Val<'_>, field: &str, msg: String) -> PolicyError {
        self.err(v.span(), field, PolicyErrorKind::BadValue(msg))
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
            Some(Ok(n)) => Err(self.err(
                v.span(),
                "version",
                PolicyErrorKind::UnsupportedVersion(n),
            )),
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
            self.check_name(k, &field, "set")?;
            let ranges = self.addr_list(val, &field)?;
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
                for (i, item) in a.iter().enumerate() {
                    let f = index(field, i);
                    match item.get_ref() {
                        DeValue::String(s) => out.push(self.set_member(s, item.span(), &f)?),
                        other => {
                            return Err(self.bad_value(
                                item,
                                &f,
                                format!(
                                    "expected an address, CIDR or range string, found {}",
                                    describe(other)
                                ),
                            ));
                        }
                    }
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
                format!("`defaults` must be a table, found {}", describe(v.get_ref())),
            ));
        };
        let mut d = Defaults::default();
        for (k, val) in sorted(t) {
            let key: &str = k.get_ref();
            let field = child("defaults", key);
            match key {
                "ingress" => d.ingress = self.action(val, &field, key)?,
                "egress" => d.egress = self.action(val, &field, key)?,
                "established" => d.established = self.boolean(val, &field, key)?,
                "icmp" => d.icmp = self.boolean(val, &field, key)?,
                "log_rate" => d.log_rate = self.log_rate(val, &field)?,
                _ => return Err(self.unknown_key(k, "defaults")),
            }
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

    fn boolean(&self, v: &Val<'_>, field: &str, key: &str) -> Res<bool> {
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
                _ => return Err(self.unknown_key(k, "base")),
            };
            self.rules(val, &Owner::Base, dir, &child("base", key), out)?;
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
            self.check_name(k, &field, "role")?;
            let Some(rt) = val.get_ref().as_table() else {
                return Err(self.bad_value(
                    val,
                    &field,
                    format!(
                        "role `{name}` must be a table ([roles.{name}]), found {}",
                        describe(val.get_ref())
                    ),
                ));
            };
            let owner = Owner::Role(name.to_string());
            let mut hosts = None;
            let before = out.len();
            for (rk, rv) in sorted(rt) {
                let key: &str = rk.get_ref();
                let f = child(&field, key);
                match key {
                    "hosts" => hosts = Some(self.peer(rv, &f)?),
                    "ingress" => self.rules(rv, &owner, Direction::Ingress, &f, out)?,
                    "egress" => self.rules(rv, &owner, Direction::Egress, &f, out)?,
                    _ => return Err(self.unknown_key(rk, &field)),
                }
            }
            if hosts.is_none() && out.len() == before {
                return Err(self.err(
                    val.span(),
                    &field,
                    PolicyErrorKind::RoleEmpty(name.to_string()),
                ));
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

    // ----- rules ---------------------------------------------------------

    fn rules(
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
            let rule = self.rule(t, item.span(), owner, dir, i, &f)?;
            out.push(Pending {
                pos: item.span().start,
                rule,
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
    ) -> Res<Rule> {
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
        Ok(Rule {
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
        })
    }

    /// A peer or `hosts`: `"any"`, a set name, a literal, or a list of those.
    /// Returns the text as written and the resolved ranges.
    fn peer(&self, v: &Val<'_>, field: &str) -> Res<(String, Vec<AddrRange>)> {
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

/// A table's entries in file order (the map itself is ordered by key).
fn sorted<'t, 'i>(t: &'t DeTable<'i>) -> Vec<(&'t Key<'i>, &'t Val<'i>)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

fn int_of(i: &DeInteger<'_>) -> Option<i128> {
    i128::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok()
}

fn addr_kind(e: AddrParseError) -> PolicyErrorKind {
    match e {
        AddrParseError::Bad(m) => PolicyErrorKind::BadAddress(m),
        AddrParseError::Reversed => PolicyErrorKind::ReversedRange,
        AddrParseError::MixedFamily => PolicyErrorKind::BadAddress(e.to_string()),
        AddrParseError::Empty => PolicyErrorKind::EmptyRange,
    }
}

/// A short description of a value for messages: `string "deny"`, `integer 5`.
fn describe(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("string {s:?}"),
        DeValue::Integer(i) => format!("integer {i}"),
        DeValue::Float(f) => format!("float {f}"),
        DeValue::Boolean(b) => format!("boolean {b}"),
        DeValue::Datetime(d) => format!("datetime {d}"),
        DeValue::Array(_) => "an array".to_string(),
        DeValue::Table(_) => "a table".to_string(),
    }
}

/// `parent.key`, quoting `key` when it is not a bare TOML key.
fn child(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// `field[i]`.
fn index(field: &str, i: usize) -> String {
    format!("{field}[{i}]")
}

/// Strips one pair of TOML quotes from a key as written.
fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_string();
        }
    }
    s.to_string()
}

/// Splits a dotted key prefix such as `roles.web.` or `"a" . b` into parts.
fn split_dotted(s: &str) -> Vec<String> {
    let s = s.split(']').next().unwrap_or("");
    s.split('.')
        .map(unquote)
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {}
