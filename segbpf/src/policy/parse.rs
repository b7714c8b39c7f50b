//! roles.toml v1 → validated [`Policy`].
//!
//! The text is parsed with `toml`'s span-preserving [`DeTable`], so every
//! error names the line and column of the offending key or value (columns
//! count characters, both 1-based) and its dotted field path, e.g.
//! `roles.app.egress[1].tcp[0]`. Validation is strict: unknown keys, unknown
//! sets, bad addresses and ports, empty lists, empty roles and rules without
//! a protocol are errors, never silently ignored.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
};

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
    parse_str_with_sets(text, source, &BTreeMap::new())
}

/// Like [`parse_str`], with the members of some sets replaced (live set
/// edits): every rule and role naming such a set sees the new members.
/// Naming a set the file does not define is an error.
pub fn parse_str_with_sets(
    text: &str,
    source: &str,
    overrides: &BTreeMap<String, Vec<AddrRange>>,
) -> Result<Policy, PolicyError> {
    let mut cx = Cx::new(text, source);
    cx.overrides = overrides.clone();
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
    /// Live set edits replacing the members of these sets.
    overrides: BTreeMap<String, Vec<AddrRange>>,
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
            overrides: BTreeMap::new(),
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
        let line_start = self
            .text
            .get(..span.start)?
            .rfind('\n')
            .map_or(0, |i| i + 1);
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
        let mut sets = match sets {
            Some(v) => self.sets(v)?,
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
            set.ranges = ranges.clone();
        }
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
            match key {
                "ingress" => d.ingress = self.action(val, &field, key)?,
                "egress" => d.egress = self.action(val, &field, key)?,
                "established" => d.established = self.boolean(val, &field, key)?,
                "icmp" => d.icmp = self.boolean(val, &field, key)?,
                "log_rate" => d.log_rate = self.log_rate(val, &field)?,
                "link_local" => d.link_local = self.boolean(val, &field, key)?,
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
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn parse(text: &str) -> Policy {
        match parse_str(text, "t.toml") {
            Ok(p) => p,
            Err(e) => panic!("unexpected error: {e}\n{text}"),
        }
    }

    fn err(text: &str) -> PolicyError {
        match parse_str(text, "t.toml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's line:column, field and kind.
    #[track_caller]
    fn check(text: &str, line: u32, col: u32, field: &str, kind: PolicyErrorKind) {
        let e = err(text);
        assert_eq!(
            (e.line_col(), e.field.as_str(), &e.kind),
            (Some((line, col)), field, &kind),
            "got: {e}"
        );
        assert_eq!(e.source, "t.toml");
    }

    /// Like [`check`] for kinds that carry a message: matches the variant
    /// and asserts the message contains `needle`.
    #[track_caller]
    fn check_msg(text: &str, line: u32, col: u32, field: &str, needle: &str) -> PolicyError {
        let e = err(text);
        assert_eq!(
            (e.line_col(), e.field.as_str()),
            (Some((line, col)), field),
            "got: {e}"
        );
        assert!(e.to_string().contains(needle), "`{e}` lacks `{needle}`");
        e
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    // ----- the example ---------------------------------------------------

    const EXAMPLE: &str = include_str!("../../../examples/roles.toml");

    #[test]
    fn example_parses() {
        let p = parse(EXAMPLE);
        assert_eq!(p.version, 1);
        assert_eq!(p.source, "t.toml");
        let sets: Vec<_> = p
            .sets
            .iter()
            .map(|s| (s.name.as_str(), s.loc.line))
            .collect();
        assert_eq!(
            sets,
            [
                ("admin_net", 4),
                ("web_nodes", 5),
                ("app_nodes", 6),
                ("db_nodes", 7),
                ("lb", 8),
                ("backup", 9)
            ]
        );
        assert_eq!(p.sets[3].ranges.len(), 2);
        assert!(!p.sets[3].ranges[1].family_is_v4());
        assert_eq!(
            p.defaults,
            Defaults {
                ingress: Action::Drop,
                egress: Action::Drop,
                established: true,
                icmp: true,
                log_rate: 10,
                link_local: true,
            }
        );
        let roles: Vec<_> = p
            .roles
            .iter()
            .map(|r| (r.name.as_str(), r.hosts_text.as_deref(), r.loc))
            .collect();
        assert_eq!(
            roles,
            [
                (
                    "web",
                    Some("web_nodes"),
                    Loc {
                        line: 30,
                        column: 1
                    }
                ),
                (
                    "app",
                    Some("app_nodes"),
                    Loc {
                        line: 41,
                        column: 1
                    }
                ),
                (
                    "db",
                    Some("db_nodes"),
                    Loc {
                        line: 56,
                        column: 1
                    }
                ),
            ]
        );
        assert_eq!(p.rules.len(), 9);
        let rules: Vec<_> = p
            .rules
            .iter()
            .map(|r| {
                (
                    r.id,
                    r.label(),
                    r.loc.line,
                    r.peer_text.as_str(),
                    r.services(),
                )
            })
            .collect();
        let want = [
            (0, "base.ingress[0]", 18, "admin_net", "tcp/22"),
            (1, "base.egress[0]", 22, "any", "udp/53,123"),
            (2, "base.egress[1]", 26, "any", "tcp/80,443"),
            (3, "roles.web.ingress[0]", 33, "any", "tcp/80,443"),
            (4, "roles.web.egress[0]", 37, "app_nodes", "tcp/8080"),
            (5, "roles.app.ingress[0]", 44, "web_nodes", "tcp/8080"),
            (6, "roles.app.egress[0]", 48, "db_nodes", "tcp/5432,3306"),
            (7, "roles.app.egress[1]", 52, "[backup]", "tcp/2500-3300"),
            (8, "roles.db.ingress[0]", 59, "app_nodes", "tcp/5432,3306"),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|&(id, l, line, peer, svc)| (id, l.to_string(), line, peer, svc.to_string()))
            .collect();
        assert_eq!(rules, want);
        for (i, r) in p.rules.iter().enumerate() {
            assert_eq!(r.id as usize, i);
            assert_eq!(r.loc.column, 1);
            assert_eq!(r.interfaces, None);
        }
        // Resolution: `any` is both families, sets are copied, literals parsed.
        assert_eq!(p.rules[1].peers, [AddrRange::any_v4(), AddrRange::any_v6()]);
        assert_eq!(p.rules[6].peers, p.sets[3].ranges);
        assert_eq!(p.rules[7].tcp, [PortRange { lo: 2500, hi: 3300 }]);
        assert!(p.rules[0].peers[0].contains(ip("10.10.0.63")));
        assert!(!p.rules[0].peers[0].contains(ip("10.10.0.64")));
        assert_eq!(p.role("db").map(|r| r.hosts.len()), Some(2));
    }

    #[test]
    fn example_on_disk_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/roles.toml");
        let p = Policy::load(&path).expect("examples/roles.toml loads");
        assert_eq!(p.rules.len(), 9);
        assert!(p.source.ends_with("roles.toml"));
    }

    // ----- accepted forms ------------------------------------------------

    #[test]
    fn defaults_when_omitted() {
        let p = parse("version = 1\n[roles.r]\nhosts = \"any\"\n");
        assert_eq!(p.defaults, Defaults::default());
        assert_eq!(p.defaults.egress, Action::Allow);
        assert_eq!(p.defaults.log_rate, 10);
        assert!(p.sets.is_empty() && p.rules.is_empty());
        assert_eq!(p.roles[0].hosts, [AddrRange::any_v4(), AddrRange::any_v6()]);
        let p = parse("version = 1\n[defaults]\negress = \"drop\"\nlog_rate = 0\n");
        assert_eq!(p.defaults.ingress, Action::Drop);
        assert_eq!(p.defaults.egress, Action::Drop);
        assert_eq!(p.defaults.log_rate, 0);
        let p = parse(
            "version = 1\n[defaults]\ningress = \"allow\"\nestablished = false\nicmp = false\nlog_rate = 1_000_000\nlink_local = false\n",
        );
        assert_eq!(
            p.defaults,
            Defaults {
                ingress: Action::Allow,
                egress: Action::Allow,
                established: false,
                icmp: false,
                log_rate: 1_000_000,
                link_local: false,
            }
        );
        assert!(parse("version = 1\n").rules.is_empty());
    }

    #[test]
    fn peer_forms() {
        let p = parse(
            "version = 1
[sets]
backup = \"10.10.2.50\"
[[base.egress]]
to = [\"backup\", \"10.0.0.1\", \"fd00::/64\", \"10.0.1.1-10.0.1.5\"]
udp = [\"53\"]
[[base.ingress]]
from = \"192.0.2.0/24\"
icmp = true
",
        );
        let r = &p.rules[0];
        assert_eq!(
            r.peer_text,
            "[backup, 10.0.0.1, fd00::/64, 10.0.1.1-10.0.1.5]"
        );
        assert_eq!(r.peers.len(), 4);
        assert_eq!(r.peers[0], p.sets[0].ranges[0]);
        assert!(r.peers[2].contains(ip("fd00::ffff")));
        assert!(r.peers[3].contains(ip("10.0.1.5")));
        assert_eq!(r.udp, [PortRange::single(53)]);
        let r = &p.rules[1];
        assert_eq!(r.peer_text, "192.0.2.0/24");
        assert!(r.icmp && !r.icmpv6 && r.tcp.is_empty());
    }

    #[test]
    fn protocol_forms() {
        let p = parse(
            "version = 1
[[base.ingress]]
from = \"any\"
proto = \"any\"
interfaces = [\"eth1\", \"bond0.100\"]
[[base.ingress]]
from = \"any\"
icmpv6 = true
icmp = false
[[base.ingress]]
from = \"any\"
tcp = [0, 65535, \"1024-2047\"]
udp = 5353
[[base.ingress]]
from = \"any\"
tcp = \"8000-8099\"
",
        );
        assert!(p.rules[0].any_proto);
        assert_eq!(
            p.rules[0].interfaces.as_deref(),
            Some(&["eth1".to_string(), "bond0.100".to_string()][..])
        );
        assert!(p.rules[1].icmpv6 && !p.rules[1].icmp);
        assert_eq!(
            p.rules[2].tcp,
            [
                PortRange::single(0),
                PortRange::single(65535),
                PortRange { lo: 1024, hi: 2047 }
            ]
        );
        assert_eq!(p.rules[2].udp, [PortRange::single(5353)]);
        assert_eq!(p.rules[3].tcp, [PortRange { lo: 8000, hi: 8099 }]);
    }

    #[test]
    fn rule_ids_follow_file_order() {
        let p = parse(
            "version = 1
[[roles.b.ingress]]
from = \"any\"
tcp = [1]

[[base.egress]]
to = \"any\"
tcp = [2]

[roles.a]
hosts = \"10.0.0.1\"
egress = [{ to = \"any\", tcp = [3] }, { to = \"any\", tcp = [4] }]

[[roles.b.ingress]]
from = \"any\"
tcp = [5]

[[base.ingress]]
from = \"any\"
tcp = [6]
",
        );
        let got: Vec<_> = p
            .rules
            .iter()
            .map(|r| (r.id, r.tcp[0].lo, r.label(), r.loc))
            .collect();
        let l = |line, column| Loc { line, column };
        assert_eq!(
            got,
            [
                (0, 1, "roles.b.ingress[0]".to_string(), l(2, 1)),
                (1, 2, "base.egress[0]".to_string(), l(6, 1)),
                (2, 3, "roles.a.egress[0]".to_string(), l(12, 11)),
                (3, 4, "roles.a.egress[1]".to_string(), l(12, 38)),
                (4, 5, "roles.b.ingress[1]".to_string(), l(14, 1)),
                (5, 6, "base.ingress[0]".to_string(), l(18, 1)),
            ]
        );
        // Roles in file order; a role with rules but no hosts is fine.
        let roles: Vec<_> = p.roles.iter().map(|r| (r.name.as_str(), r.loc)).collect();
        assert_eq!(roles, [("b", l(2, 9)), ("a", l(10, 1))]);
        assert_eq!(p.roles[0].hosts_text, None);
        assert!(p.roles[0].hosts.is_empty());
    }

    #[test]
    fn columns_count_characters() {
        // `é` is two bytes; the column is in characters.
        check_msg(
            "version = 1\n[sets]\na = [\"é\", \"10.0.0.300\"]\n",
            3,
            6,
            "sets.a[0]",
            "not an IPv4 or IPv6 address",
        );
        check_msg(
            "version = 1\n[sets]\na = [\"1.1.1.1\", \"é\", \"10.0.0.300\"]\n",
            3,
            17,
            "sets.a[1]",
            "`é`",
        );
        check(
            "version = 1\n[sets] # é\nb = \"any\"\nc = [\"10.0.0.1\", \"10.0.0.9-10.0.0.1\"]\n",
            3,
            5,
            "sets.b",
            PolicyErrorKind::BadAddress(
                "`any` is not an address; sets hold addresses, CIDRs and ranges, not set names"
                    .into(),
            ),
        );
        check(
            "version = 1\n[sets]\nc = [\"é\", \"10.0.0.9-10.0.0.1\"]\n",
            3,
            6,
            "sets.c[0]",
            PolicyErrorKind::BadAddress("`é` is not an IPv4 or IPv6 address".into()),
        );
        check(
            "version = 1\n[sets]\nc = [\"10.0.0.1\", \"10.0.0.9-10.0.0.1\"] # é\n",
            3,
            18,
            "sets.c[1]",
            PolicyErrorKind::ReversedRange,
        );
        check(
            "version = 1\r\n[sets]\r\n\"é\" = [\"10.0.0.9-10.0.0.1\"]\r\n",
            3,
            1,
            "sets.\"é\"",
            PolicyErrorKind::BadValue(
                "invalid set name `é`: use a letter or `_` first, then letters, digits, `_` or `-`"
                    .into(),
            ),
        );
    }

    // ----- every error kind ----------------------------------------------

    #[test]
    fn io_error() {
        let e = Policy::load(std::path::Path::new("/nonexistent/segbpf/roles.toml"))
            .expect_err("missing file");
        assert!(matches!(e.kind, PolicyErrorKind::Io(_)));
        assert_eq!(e.line_col(), None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/segbpf/roles.toml: cannot read the policy file: "),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_errors() {
        let e = err("version = 1\n[sets\n");
        assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
        assert_eq!(e.line_col(), Some((2, 6)));
        assert_eq!(e.field, "");
        assert!(
            e.to_string().starts_with("t.toml:2:6: invalid TOML: "),
            "{e}"
        );
        let e = err("version = 1\nfoo = \n");
        assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
        assert_eq!(e.line_col(), Some((2, 7)));
        let e = err("version = 1\n[sets]\na = [\"10.0.0.1\"\n");
        assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
        assert_eq!(e.line_col().map(|(l, _)| l), Some(3));
        // A key repeated inside a rule is TOML's duplicate key, with the path.
        let e = err("version = 1\n[[base.ingress]]\nfrom = \"any\"\ntcp = [1]\ntcp = [2]\n");
        assert_eq!(
            (e.line_col(), e.field.as_str(), &e.kind),
            (
                Some((5, 1)),
                "base.ingress.tcp",
                &PolicyErrorKind::Toml("duplicate key `tcp`".into())
            )
        );
        // `[sets]` twice.
        let e = err("version = 1\n[sets]\na = \"10.0.0.1\"\n[sets]\nb = \"10.0.0.2\"\n");
        assert_eq!(e.line_col(), Some((4, 2)));
        assert!(matches!(e.kind, PolicyErrorKind::Toml(_)), "{e}");
    }

    #[test]
    fn version_errors() {
        check(
            "[sets]\na = \"10.0.0.1\"\n",
            1,
            1,
            "version",
            PolicyErrorKind::VersionMissing,
        );
        check("", 1, 1, "version", PolicyErrorKind::VersionMissing);
        check(
            "version = 2\n",
            1,
            11,
            "version",
            PolicyErrorKind::UnsupportedVersion(2),
        );
        check(
            "# policy\n  version = -1\n",
            2,
            13,
            "version",
            PolicyErrorKind::UnsupportedVersion(-1),
        );
        check_msg(
            "version = \"1\"\n",
            1,
            11,
            "version",
            "`version` must be the integer 1, found string \"1\"",
        );
        check_msg("version = 1.0\n", 1, 11, "version", "found float 1.0");
        assert_eq!(parse("version = 0x1\n").version, 1);
    }

    #[test]
    fn unknown_keys() {
        check(
            "version = 1\nrole = {}\n",
            2,
            1,
            "role",
            PolicyErrorKind::UnknownKey("role".into()),
        );
        check(
            "version = 1\n[defaults]\nforward = \"drop\"\n",
            3,
            1,
            "defaults.forward",
            PolicyErrorKind::UnknownKey("forward".into()),
        );
        check(
            "version = 1\n[[base.forward]]\nfrom = \"any\"\n",
            2,
            8,
            "base.forward",
            PolicyErrorKind::UnknownKey("forward".into()),
        );
        check(
            "version = 1\n[roles.web]\nhost = \"any\"\n",
            3,
            1,
            "roles.web.host",
            PolicyErrorKind::UnknownKey("host".into()),
        );
        check(
            "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\ntcp = [80]\nports = [1]\n",
            5,
            1,
            "roles.web.ingress[0].ports",
            PolicyErrorKind::UnknownKey("ports".into()),
        );
    }

    #[test]
    fn wrong_peer_key_has_a_hint() {
        let e = err("version = 1\n[[base.ingress]]\nto = \"any\"\ntcp = [22]\n");
        assert_eq!(
            (e.line_col(), e.field.as_str(), &e.kind),
            (
                Some((3, 1)),
                "base.ingress[0].to",
                &PolicyErrorKind::UnknownKey("to".into())
            )
        );
        assert_eq!(
            e.to_string(),
            "t.toml:3:1: base.ingress[0].to: unknown key `to`; ingress rules name the peer with `from`, egress rules with `to`"
        );
        check(
            "version = 1\n[[roles.app.egress]]\ntcp = [22]\n  from = \"any\"\n",
            4,
            3,
            "roles.app.egress[0].from",
            PolicyErrorKind::UnknownKey("from".into()),
        );
    }

    #[test]
    fn unknown_sets() {
        check(
            "version = 1\n[sets]\nbackup = \"10.0.0.1\"\n[[roles.app.egress]]\nto = [\"backup\", \"bakup\"]\ntcp = [1]\n",
            5,
            17,
            "roles.app.egress[0].to[1]",
            PolicyErrorKind::UnknownSet("bakup".into()),
        );
        check(
            "version = 1\n[roles.web]\nhosts = \"web_nodes\"\n",
            3,
            9,
            "roles.web.hosts",
            PolicyErrorKind::UnknownSet("web_nodes".into()),
        );
    }

    #[test]
    fn bad_addresses() {
        check(
            "version = 1\n[sets]\nnet = [\"10.0.0.0/8\", \"10.0.0.1/24\"]\n",
            3,
            22,
            "sets.net[1]",
            PolicyErrorKind::BadAddress(
                "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?".into(),
            ),
        );
        check_msg(
            "version = 1\n[[base.ingress]]\nfrom = \"10.0.0.300\"\ntcp = [1]\n",
            3,
            8,
            "base.ingress[0].from",
            "bad address: `10.0.0.300` is not an IPv4 or IPv6 address",
        );
        check_msg(
            "version = 1\n[sets]\nx = [\"10.0.0.1-fd00::1\"]\n",
            3,
            6,
            "sets.x[0]",
            "cannot mix IPv4 and IPv6",
        );
        check_msg(
            "version = 1\n[sets]\nx = [\"10.0.0.0/40\"]\n",
            3,
            6,
            "sets.x[0]",
            "too long for IPv4",
        );
        check_msg(
            "version = 1\n[sets]\nx = [10]\n",
            3,
            6,
            "sets.x[0]",
            "expected an address, CIDR or range string, found integer 10",
        );
        check_msg(
            "version = 1\n[roles.r]\nhosts = [\"10.0.0.1\", 5]\n",
            3,
            22,
            "roles.r.hosts[1]",
            "found integer 5",
        );
    }

    #[test]
    fn address_ranges() {
        check(
            "version = 1\n[sets]\nx = [\"10.0.0.5-\"]\n",
            3,
            6,
            "sets.x[0]",
            PolicyErrorKind::EmptyRange,
        );
        check(
            "version = 1\n[[base.egress]]\nto = \"10.10.1.19-10.10.1.10\"\nudp = [1]\n",
            3,
            6,
            "base.egress[0].to",
            PolicyErrorKind::ReversedRange,
        );
        check(
            "version = 1\n[sets]\nx = \"fd00::9-fd00::1\"\n",
            3,
            5,
            "sets.x",
            PolicyErrorKind::ReversedRange,
        );
    }

    #[test]
    fn port_errors() {
        let rule = |ports: &str| {
            format!("version = 1\n[[roles.app.egress]]\nto = \"any\"\ntcp = {ports}\n")
        };
        check(
            &rule("[80, 65536]"),
            4,
            12,
            "roles.app.egress[0].tcp[1]",
            PolicyErrorKind::PortOutOfRange,
        );
        check(
            &rule("[-1]"),
            4,
            8,
            "roles.app.egress[0].tcp[0]",
            PolicyErrorKind::PortOutOfRange,
        );
        check(
            &rule("[\"1-70000\"]"),
            4,
            8,
            "roles.app.egress[0].tcp[0]",
            PolicyErrorKind::PortOutOfRange,
        );
        check(
            &rule("[22, \"3300-2500\"]"),
            4,
            12,
            "roles.app.egress[0].tcp[1]",
            PolicyErrorKind::ReversedPortRange,
        );
        check(
            &rule("[\"8000-\"]"),
            4,
            8,
            "roles.app.egress[0].tcp[0]",
            PolicyErrorKind::EmptyRange,
        );
        check(
            &rule("[\"http\"]"),
            4,
            8,
            "roles.app.egress[0].tcp[0]",
            PolicyErrorKind::BadPort(
                "`http` is not a port number or a \"lo-hi\" port range".into(),
            ),
        );
        check(
            &rule("[1.5]"),
            4,
            8,
            "roles.app.egress[0].tcp[0]",
            PolicyErrorKind::BadPort(
                "expected a port number or a \"lo-hi\" string, found float 1.5".into(),
            ),
        );
        check_msg(
            &rule("true"),
            4,
            7,
            "roles.app.egress[0].tcp",
            "expected a list of ports",
        );
    }

    #[test]
    fn duplicates() {
        check(
            "version = 1\n[sets]\na = [\"10.0.0.1\"]\na = [\"10.0.0.2\"]\n",
            4,
            1,
            "sets.a",
            PolicyErrorKind::DuplicateSet("a".into()),
        );
        check(
            "version = 1\n[roles.web]\nhosts = \"any\"\n\n[roles.web]\nhosts = \"any\"\n",
            5,
            8,
            "roles.web",
            PolicyErrorKind::DuplicateRole("web".into()),
        );
        check(
            "version = 1\n[roles.web]\nhosts = \"any\"\n[roles]\nweb = { hosts = \"any\" }\n",
            5,
            1,
            "roles.web",
            PolicyErrorKind::DuplicateRole("web".into()),
        );
        check(
            "version = 1\n[roles]\ndb = { hosts = \"any\" }\n[ roles . \"db\" ]\n",
            4,
            11,
            "roles.db",
            PolicyErrorKind::DuplicateRole("db".into()),
        );
        // A rule table after a role's own table is not a duplicate.
        parse(
            "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\ntcp = [1]\n[roles.web]\nhosts = \"any\"\n",
        );
    }

    #[test]
    fn empty_roles() {
        check(
            "version = 1\n[roles.web]\n",
            2,
            1,
            "roles.web",
            PolicyErrorKind::RoleEmpty("web".into()),
        );
        check(
            "version = 1\n[roles.ok]\nhosts = \"any\"\n[roles.web]\ningress = []\negress = []\n",
            4,
            1,
            "roles.web",
            PolicyErrorKind::RoleEmpty("web".into()),
        );
        check(
            "version = 1\n[roles]\nweb = {}\n",
            3,
            7,
            "roles.web",
            PolicyErrorKind::RoleEmpty("web".into()),
        );
    }

    #[test]
    fn rules_need_a_protocol() {
        check(
            "version = 1\n[[roles.web.ingress]]\nfrom = \"any\"\n",
            2,
            1,
            "roles.web.ingress[0]",
            PolicyErrorKind::NoProtocol,
        );
        check(
            "version = 1\n[roles.web]\nhosts = \"any\"\n[[roles.web.egress]]\nto = \"any\"\ntcp = [1]\n[[roles.web.egress]]\nto = \"any\"\nicmp = false\nicmpv6 = false\n",
            7,
            1,
            "roles.web.egress[1]",
            PolicyErrorKind::NoProtocol,
        );
        check(
            "version = 1\n[base]\ningress = [ { from = \"any\" } ]\n",
            3,
            13,
            "base.ingress[0]",
            PolicyErrorKind::NoProtocol,
        );
    }

    #[test]
    fn bad_values() {
        check_msg(
            "version = 1\n[defaults]\ningress = \"deny\"\n",
            3,
            11,
            "defaults.ingress",
            "`ingress` must be \"drop\" or \"allow\", found string \"deny\"",
        );
        check_msg(
            "version = 1\n[defaults]\nestablished = \"yes\"\n",
            3,
            15,
            "defaults.established",
            "must be true or false",
        );
        check_msg(
            "version = 1\n[defaults]\nlog_rate = 1000001\n",
            3,
            12,
            "defaults.log_rate",
            "from 0 to 1000000",
        );
        check_msg(
            "version = 1\n[defaults]\nlog_rate = -1\n",
            3,
            12,
            "defaults.log_rate",
            "from 0 to 1000000",
        );
        check_msg(
            "version = 1\ndefaults = 3\n",
            2,
            12,
            "defaults",
            "must be a table",
        );
        check_msg(
            "version = 1\n[[base.ingress]]\ntcp = [22]\n",
            2,
            1,
            "base.ingress[0]",
            "missing `from`",
        );
        check_msg(
            "version = 1\n[[roles.x.egress]]\ntcp = [22]\n",
            2,
            1,
            "roles.x.egress[0]",
            "missing `to`",
        );
        check_msg(
            "version = 1\n[[base.egress]]\nto = \"any\"\nproto = \"tcp\"\n",
            4,
            9,
            "base.egress[0].proto",
            "`proto` only accepts \"any\"",
        );
        check_msg(
            "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = 1\n",
            4,
            8,
            "base.egress[0].icmp",
            "`icmp` must be true or false, found integer 1",
        );
        check_msg(
            "version = 1\n[[base.egress]]\nto = 5\nicmp = true\n",
            3,
            6,
            "base.egress[0].to",
            "expected \"any\", a set name",
        );
        check_msg(
            "version = 1\n[roles.web.ingress]\nfrom = \"any\"\ntcp = [1]\n",
            2,
            1,
            "roles.web.ingress",
            "write [[roles.web.ingress]]",
        );
        check_msg(
            "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = true\ninterfaces = [\"eth0\", \"\"]\n",
            5,
            23,
            "base.egress[0].interfaces[1]",
            "cannot be empty",
        );
        check_msg(
            "version = 1\n[[base.egress]]\nto = \"any\"\nicmp = true\ninterfaces = [\"averyveryverylongname\"]\n",
            5,
            15,
            "base.egress[0].interfaces[0]",
            "longer than 15 bytes",
        );
    }

    #[test]
    fn set_and_role_names() {
        check_msg(
            "version = 1\n[sets]\nany = [\"10.0.0.1\"]\n",
            3,
            1,
            "sets.any",
            "`any` is reserved",
        );
        check_msg(
            "version = 1\n[sets]\n1net = [\"10.0.0.1\"]\n",
            3,
            1,
            "sets.1net",
            "invalid set name `1net`",
        );
        check_msg(
            "version = 1\n[roles.\"web app\"]\nhosts = \"any\"\n",
            2,
            8,
            "roles.\"web app\"",
            "invalid role name `web app`",
        );
        check_msg(
            "version = 1\nsets = [1]\n",
            2,
            8,
            "sets",
            "`sets` must be a table",
        );
        let p = parse("version = 1\n[sets]\n_a-1 = \"::1\"\n[roles.web-1]\nhosts = \"_a-1\"\n");
        assert_eq!(p.roles[0].hosts, p.sets[0].ranges);
    }

    #[test]
    fn empty_lists() {
        check(
            "version = 1\n[sets]\nweb = []\n",
            3,
            7,
            "sets.web",
            PolicyErrorKind::EmptyList,
        );
        check(
            "version = 1\n[[base.ingress]]\nfrom = []\ntcp = [1]\n",
            3,
            8,
            "base.ingress[0].from",
            PolicyErrorKind::EmptyList,
        );
        check(
            "version = 1\n[[base.ingress]]\nfrom = \"any\"\ntcp = []\n",
            4,
            7,
            "base.ingress[0].tcp",
            PolicyErrorKind::EmptyList,
        );
        check(
            "version = 1\n[[base.ingress]]\nfrom = \"any\"\nudp = [1]\ninterfaces = []\n",
            5,
            14,
            "base.ingress[0].interfaces",
            PolicyErrorKind::EmptyList,
        );
        check(
            "version = 1\n[roles.r]\nhosts = []\n",
            3,
            9,
            "roles.r.hosts",
            PolicyErrorKind::EmptyList,
        );
    }

    #[test]
    fn error_display_format() {
        let e = err("version = 1\n[defaults]\ningress = \"deny\"\n");
        assert_eq!(
            e.to_string(),
            "t.toml:3:11: defaults.ingress: `ingress` must be \"drop\" or \"allow\", found string \"deny\""
        );
        let e = err("version = 1\n[sets]\nweb_nodes = [\"10.10.1.19-10.10.1.10\"]\n");
        assert_eq!(
            e.to_string(),
            "t.toml:3:14: sets.web_nodes[0]: reversed range: the first address is above the last"
        );
    }
}
