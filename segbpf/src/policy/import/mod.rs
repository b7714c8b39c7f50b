//! `segbpf import`: per-host nftables and iptables rulesets -> one roles.toml.
//!
//! The rulesets are read by the real tools, never by a parser of our own:
//! each file is loaded into a private scratch network namespace
//! ([`scratch`]) with `nft -f` or `iptables-nft-restore`/`ip6tables-nft-restore`,
//! read back with `nft -j list ruleset`, and the namespace is removed. The
//! JSON becomes an intermediate form of ordered rules ([`ruleset`]), whose
//! source lines are found in the files ([`source`]); [`map`] turns the
//! hosts' rules into one policy and a warning for everything it cannot
//! express; [`verify`] runs a differential test of each original ruleset
//! (real packets in a scratch namespace) against the imported policy's
//! reference evaluator.
//!
//! See docs/import.md for the mapping table.

pub mod map;
pub mod ruleset;
pub mod scratch;
pub mod source;
pub mod verify;

use std::{fmt, path::PathBuf};

use serde::Serialize;

use crate::policy::{AddrRange, PolicyError};

/// Errors of the import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An input file could not be read.
    #[error("{file}: cannot read the ruleset: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// An input is empty (a pipe already read, an empty file).
    #[error(
        "{file}: the input is empty: no ruleset to import (a pipe or /dev/stdin can be read only once: give each --host its own)"
    )]
    Empty {
        /// The file.
        file: String,
    },
    /// The input holds no filter chain on the input or output hook:
    /// nothing that filters this host's traffic. Imported, it would be
    /// "no rules, accept everything".
    #[error(
        "{file}: no filter chain on the input or output hook: nothing that filters, so nothing to import (it would import as allow-all){hint}"
    )]
    NoFilter {
        /// The file.
        file: String,
        /// A hint on where the rules may be (empty when none).
        hint: String,
    },
    /// The firewall tool refused the file (its messages name the lines).
    #[error("{file}: {tool} refused the ruleset:\n{message}")]
    Refused {
        /// The file.
        file: String,
        /// The tool (`nft`, `iptables-nft-restore`, ...).
        tool: String,
        /// The tool's messages, with the file's lines.
        message: String,
    },
    /// The JSON a tool printed (or a JSON input file) is not a ruleset.
    #[error("{file}: {message}")]
    Json {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A scratch namespace, interface or tool could not be set up or run.
    #[error("scratch namespace: {0}")]
    Scratch(String),
    /// A bad `--host` or `--hosts` argument.
    #[error("{0}")]
    Argument(String),
    /// The generated policy does not parse (a bug in the import).
    #[error("the imported policy does not validate (a bug in segbpf import): {0}")]
    Generated(#[from] PolicyError),
}

/// Which tool's files are imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// nftables files for `nft -f`, or `nft -j list ruleset` JSON.
    Nft,
    /// `iptables-save` / `ip6tables-save` files.
    Iptables,
}

/// One `--host ROLE=FILE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFile {
    /// The role the host takes.
    pub role: String,
    /// Its ruleset file.
    pub file: PathBuf,
}

impl HostFile {
    /// Parses `ROLE=FILE`.
    pub fn parse(s: &str) -> Result<Self, ImportError> {
        let (role, file) = s
            .split_once('=')
            .ok_or_else(|| ImportError::Argument(format!("--host {s}: expected ROLE=FILE")))?;
        check_name(role, "--host", s)?;
        if file.is_empty() {
            return Err(ImportError::Argument(format!(
                "--host {s}: the file is missing"
            )));
        }
        Ok(HostFile {
            role: role.to_string(),
            file: PathBuf::from(file),
        })
    }
}

/// One `--hosts ROLE=SET|ADDRESSES`: which addresses take a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsArg {
    /// The role.
    pub role: String,
    /// A set name from the rulesets, or comma-separated addresses, CIDRs, ranges.
    pub value: HostsValue,
}

/// The right side of `--hosts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostsValue {
    /// A set of the rulesets.
    Set(String),
    /// Addresses, CIDRs or ranges, as written.
    Addresses(Vec<String>),
}

impl HostsArg {
    /// Parses `ROLE=SET` or `ROLE=ADDR[,ADDR...]`.
    pub fn parse(s: &str) -> Result<Self, ImportError> {
        let (role, value) = s.split_once('=').ok_or_else(|| {
            ImportError::Argument(format!("--hosts {s}: expected ROLE=SET or ROLE=ADDRESSES"))
        })?;
        check_name(role, "--hosts", s)?;
        let items: Vec<String> = value
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if items.is_empty() {
            return Err(ImportError::Argument(format!(
                "--hosts {s}: no set or address"
            )));
        }
        let addr = |x: &str| crate::policy::addr::parse_item(x).is_ok();
        let value = if items.len() == 1 && !addr(&items[0]) {
            HostsValue::Set(items[0].clone())
        } else {
            if let Some(bad) = items.iter().find(|x| !addr(x)) {
                return Err(ImportError::Argument(format!(
                    "--hosts {s}: `{bad}` is not an address, CIDR or range"
                )));
            }
            HostsValue::Addresses(items)
        };
        Ok(HostsArg {
            role: role.to_string(),
            value,
        })
    }
}

fn check_name(role: &str, opt: &str, s: &str) -> Result<(), ImportError> {
    let ok = role
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ImportError::Argument(format!(
            "{opt} {s}: `{role}` is not a role name (letters, digits, `_`, `-`; starting with a letter or `_`)"
        )))
    }
}

/// Where a rule comes from: a file and, when it could be found, a line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// The file (as given, or an included file).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// The rule as written (or as nft lists it).
    pub text: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// What a warning is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// NAT (snat, dnat, masquerade, redirect).
    Nat,
    /// Packet or connection marks.
    Mark,
    /// A drop or reject before an accept it overlaps (an exception).
    DropBeforeAccept,
    /// A drop or reject in a chain whose policy accepts (a deny rule).
    Deny,
    /// A rate limit on an accept rule.
    RateLimit,
    /// Connection-tracking helpers.
    Helper,
    /// A source-port match (the stateless reply idiom).
    SourcePort,
    /// A match or statement segbpf has no equivalent of.
    Unsupported,
    /// A chain, table or family segbpf does not filter (forward, arp, ...).
    Ignored,
    /// A difference between hosts or an approximation worth knowing.
    Approximation,
}

impl WarningKind {
    /// The name shown in brackets.
    pub fn as_str(self) -> &'static str {
        match self {
            WarningKind::Nat => "nat",
            WarningKind::Mark => "mark",
            WarningKind::DropBeforeAccept => "drop-before-accept",
            WarningKind::Deny => "deny",
            WarningKind::RateLimit => "rate-limit",
            WarningKind::Helper => "helper",
            WarningKind::SourcePort => "source-port",
            WarningKind::Unsupported => "unsupported",
            WarningKind::Ignored => "ignored",
            WarningKind::Approximation => "approximation",
        }
    }
}

/// Something the import could not express exactly.
#[derive(Clone, Debug, Serialize)]
pub struct Warning {
    /// The rule (or file) it is about.
    pub origin: Origin,
    /// The roles of the hosts whose files have it (a file included by
    /// several hosts' files is warned about once).
    pub roles: Vec<String>,
    /// What kind.
    pub kind: WarningKind,
    /// What the original does.
    pub message: String,
    /// What segbpf does instead.
    pub instead: String,
    /// The packets the warning is about (for `--verify`: differences on
    /// these were reported); None when it cannot be said.
    #[serde(skip)]
    pub scope: Option<map::Scope>,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: warning: {}: {}; segbpf: {} [{}]",
            self.origin,
            self.origin.text,
            self.message,
            self.instead,
            self.kind.as_str()
        )
    }
}

/// One host's ruleset as the tools read it.
#[derive(Clone, Debug)]
pub struct Host {
    /// The `--host` argument.
    pub input: HostFile,
    /// The file as given, for messages.
    pub file: String,
    /// The ruleset.
    pub ruleset: ruleset::Ruleset,
}

/// The result of an import.
#[derive(Debug)]
pub struct Imported {
    /// The roles.toml text.
    pub text: String,
    /// The same, parsed (it always validates).
    pub policy: crate::policy::Policy,
    /// The warnings, in host and line order.
    pub warnings: Vec<Warning>,
    /// The hosts read.
    pub hosts: Vec<Host>,
}

/// Reads every host file with the real tools (each in its own scratch
/// namespace) and maps them to one policy.
pub fn import(
    flavor: Flavor,
    hosts: &[HostFile],
    hosts_args: &[HostsArg],
) -> Result<Imported, ImportError> {
    if hosts.is_empty() {
        return Err(ImportError::Argument(
            "no --host ROLE=FILE given".to_string(),
        ));
    }
    if let Some(a) = hosts_args
        .iter()
        .find(|a| !hosts.iter().any(|h| h.role == a.role))
    {
        return Err(ImportError::Argument(format!(
            "--hosts {}=...: no --host {}=FILE",
            a.role, a.role
        )));
    }
    let mut read = Vec::new();
    for h in hosts {
        let text = read_input(&h.file)?;
        let ruleset = ruleset::read(flavor, &h.file, &text)?;
        read.push(Host {
            input: h.clone(),
            file: h.file.display().to_string(),
            ruleset,
        });
    }
    let (text, warnings) = map::map(&read, hosts_args)?;
    let policy = crate::policy::Policy::from_str(&text, "imported roles.toml")?;
    Ok(Imported {
        text,
        policy,
        warnings,
        hosts: read,
    })
}

/// Reads one input once, into memory: everything after (the tools, the
/// source lines, `--verify`) works on these bytes, so a pipe or
/// `/dev/stdin` gives the same ruleset to each. An empty input is refused:
/// read as a ruleset it would be "no rules, accept everything".
pub fn read_input(path: &std::path::Path) -> Result<String, ImportError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        file: file.clone(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(ImportError::Empty { file });
    }
    Ok(text)
}

/// The addresses a role's hosts have in the imported policy (first of each
/// family), used by `--verify` as the host's own address.
pub fn role_addresses(policy: &crate::policy::Policy, role: &str) -> Vec<AddrRange> {
    policy
        .role(role)
        .map(|r| r.hosts.clone())
        .unwrap_or_default()
}
