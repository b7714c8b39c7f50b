//! Policy errors: what went wrong, in which file, at which line and column,
//! and in which field (a dotted TOML path such as `roles.app.egress[1].tcp[0]`).
//!
//! [`PolicyError`] displays as `FILE:LINE:COL: FIELD: MESSAGE`; the position
//! is left out when it is unknown (I/O errors) and the field when there is
//! none (TOML syntax errors). A hint (`did you mean `ingress`?`) follows
//! the message when there is one. [`did_you_mean`] picks the closest known
//! name for such hints.

use std::{fmt, path::Path};

use super::Loc;

/// An error found while reading, parsing or validating a roles.toml.
///
/// `Display` and `std::error::Error` are written by hand rather than derived
/// with thiserror: thiserror treats a field named `source` as the underlying
/// error, and here `source` is the file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file the policy came from, as given by the caller.
    pub source: String,
    /// Where in the file (None when unknown, e.g. the file cannot be read).
    pub loc: Option<Loc>,
    /// The dotted TOML path of the offending field, e.g. `sets.web_nodes[0]`;
    /// empty when the error is not about one field (syntax errors, I/O).
    pub field: String,
    /// What went wrong.
    pub kind: PolicyErrorKind,
    /// A suggestion appended to the message (`did you mean `admins`?`).
    pub hint: Option<String>,
}

impl PolicyError {
    /// An error at `loc` in `field` of `source`.
    pub fn new(
        source: impl Into<String>,
        loc: Option<Loc>,
        field: impl Into<String>,
        kind: PolicyErrorKind,
    ) -> Self {
        PolicyError {
            source: source.into(),
            loc,
            field: field.into(),
            kind,
            hint: None,
        }
    }

    /// The same error with a hint appended to its message.
    #[must_use]
    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    /// The policy file at `path` could not be read.
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        PolicyError {
            source: path.display().to_string(),
            loc: None,
            field: String::new(),
            kind: PolicyErrorKind::Io(e.to_string()),
            hint: None,
        }
    }

    /// `(line, column)`, both 1-based, when the position is known.
    pub fn line_col(&self) -> Option<(u32, u32)> {
        self.loc.map(|l| (l.line, l.column))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(loc) = self.loc {
            write!(f, ":{}:{}", loc.line, loc.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.kind)?;
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

/// `did you mean `x`?` for the name in `known` closest to `given`, when one
/// is close enough to be a typo (a small edit distance, or one is the other
/// with a letter or two added: `admin` / `admins`, `ingres` / `ingress`).
pub fn did_you_mean<'a>(given: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let given_l = given.to_ascii_lowercase();
    let best = known
        .into_iter()
        .filter(|k| *k != given)
        .map(|k| (edit_distance(&given_l, &k.to_ascii_lowercase()), k))
        .min_by_key(|(d, k)| (*d, k.len()))?;
    let limit = match given.chars().count() {
        0..=3 => 1,
        4..=7 => 2,
        _ => 3,
    };
    (best.0 <= limit).then(|| format!("did you mean `{}`?", best.1))
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl std::error::Error for PolicyError {}

/// The kinds of policy errors; each displays as a self-contained message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyErrorKind {
    /// The file could not be read (the I/O error's message).
    #[error("cannot read the policy file: {0}")]
    Io(String),
    /// The text is not valid TOML (the toml parser's message).
    #[error("invalid TOML: {0}")]
    Toml(String),
    /// There is no top-level `version`.
    #[error("`version` is missing; start the file with `version = 1`")]
    VersionMissing,
    /// `version` is an integer other than 1.
    #[error("unsupported version {0}; this segbpf reads version 1")]
    UnsupportedVersion(i64),
    /// A key that is not part of the format (the key's name).
    #[error("unknown key `{0}`{hint}", hint = unknown_key_hint(.0))]
    UnknownKey(String),
    /// A peer or `hosts` names a set that `[sets]` does not define.
    #[error("unknown set `{0}`; define it under [sets] or write an address, CIDR or range")]
    UnknownSet(String),
    /// `from_services` / `to_services` names a service that `[services]`
    /// does not define.
    #[error("unknown service `{0}`; define it as [services.{0}]")]
    UnknownService(String),
    /// An address, CIDR or range that does not parse (the reason).
    #[error("bad address: {0}")]
    BadAddress(String),
    /// A range with a missing end (`"10.0.0.1-"`, `"80-"`).
    #[error("empty range: a range needs both ends, `first-last`")]
    EmptyRange,
    /// An address range whose first address is above its last.
    #[error("reversed range: the first address is above the last")]
    ReversedRange,
    /// A port outside 0-65535.
    #[error("port out of range: ports are 0-65535")]
    PortOutOfRange,
    /// A port range whose low port is above its high port.
    #[error("reversed port range: the low port is above the high port")]
    ReversedPortRange,
    /// A port that is neither an integer nor a `"lo-hi"` string (the reason).
    #[error("bad port: {0}")]
    BadPort(String),
    /// A set defined twice (its name).
    #[error("set `{0}` is defined twice")]
    DuplicateSet(String),
    /// A role defined twice (its name).
    #[error("role `{0}` is defined twice")]
    DuplicateRole(String),
    /// A rule name used twice (the name and the line of its first use).
    #[error("rule name `{0}` is already used by the rule at line {1}; names must be unique")]
    DuplicateRuleName(String, u32),
    /// A role with neither `hosts` nor rules (its name).
    #[error("role `{0}` has no `hosts` and no rules")]
    RoleEmpty(String),
    /// A rule without any protocol key.
    #[error(
        "rule allows no protocol; add `tcp = [...]`, `udp = [...]`, `icmp = true`, `icmpv6 = true` or `proto = \"any\"`"
    )]
    NoProtocol,
    /// A value of the wrong type or an invalid value (the explanation).
    #[error("{0}")]
    BadValue(String),
    /// An empty list where at least one item is required.
    #[error("empty list; give at least one item")]
    EmptyList,
}

/// A hint appended to "unknown key" messages for common mistakes.
fn unknown_key_hint(key: &str) -> &'static str {
    match key {
        "to" | "from" => "; ingress rules name the peer with `from`, egress rules with `to`",
        "port" | "ports" | "dport" => "; list ports per protocol: `tcp = [...]`, `udp = [...]`",
        "host" => "; did you mean `hosts`?",
        "protocol" | "protocols" => "; use `proto = \"any\"` or `tcp`/`udp`/`icmp`/`icmpv6`",
        "interface" | "iface" => "; did you mean `interfaces = [\"eth0\"]`?",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_position_and_field() {
        let e = PolicyError::new(
            "roles.toml",
            Some(Loc {
                line: 3,
                column: 14,
            }),
            "sets.web_nodes[0]",
            PolicyErrorKind::ReversedRange,
        );
        assert_eq!(
            e.to_string(),
            "roles.toml:3:14: sets.web_nodes[0]: reversed range: the first address is above the last"
        );
        assert_eq!(e.line_col(), Some((3, 14)));
    }

    #[test]
    fn display_without_position_or_field() {
        let e = PolicyError::io(
            Path::new("/etc/segbpf/roles.toml"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
        );
        assert_eq!(
            e.to_string(),
            "/etc/segbpf/roles.toml: cannot read the policy file: not found"
        );
        assert_eq!(e.line_col(), None);
        let e = PolicyError::new(
            "p.toml",
            Some(Loc { line: 1, column: 5 }),
            "",
            PolicyErrorKind::Toml("duplicate key".into()),
        );
        assert_eq!(e.to_string(), "p.toml:1:5: invalid TOML: duplicate key");
    }

    #[test]
    fn did_you_mean_picks_a_close_name_only() {
        let keys = ["hosts", "ingress", "egress"];
        assert_eq!(
            did_you_mean("ingres", keys).as_deref(),
            Some("did you mean `ingress`?")
        );
        assert_eq!(
            did_you_mean("admin", ["web", "admins"]).as_deref(),
            Some("did you mean `admins`?")
        );
        assert_eq!(did_you_mean("colour", keys), None);
        assert_eq!(did_you_mean("db", ["web", "app"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn unknown_key_hints() {
        assert_eq!(
            PolicyErrorKind::UnknownKey("to".into()).to_string(),
            "unknown key `to`; ingress rules name the peer with `from`, egress rules with `to`"
        );
        assert_eq!(
            PolicyErrorKind::UnknownKey("colour".into()).to_string(),
            "unknown key `colour`"
        );
    }
}
