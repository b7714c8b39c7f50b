//! roles.toml v1 → validated [`Policy`].
//!
//! The text is parsed with `toml`'s span-preserving [`DeTable`], so every
//! error names the line and column of the offending key or value (columns
//! count characters, both 1-based) and its dotted field path, e.g.
//! `roles.app.egress[1].tcp[0]`. Validation is strict: unknown keys, unknown
//! sets, bad addresses and ports, empty lists, empty roles and rules without
//! a protocol are errors, never silently ignored.
//!
//! The work is split by concern: `diagnostics` turns byte spans into
//! line:column positions and builds the errors, `document` reads the top
//! level (`version`, `[sets]`, `[defaults]`, `[base]`, `[roles]`) and
//! `rules` reads one direction's rules with their peers, ports and
//! interfaces.
//!
//! Every error is collected, not only the first: a bad key, value, set,
//! role or rule is recorded and the parser goes on with the next one
//! ([`parse_str_all`]). An item that failed is left out of what follows, so
//! one mistake is not reported again as a consequence (a set with a bad
//! address is not also an "unknown set" where a rule names it). Only a TOML
//! syntax error stops the parse: the file has no structure to go on with.

mod diagnostics;
mod document;
mod rules;
mod services;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use toml::{
    Spanned,
    de::{DeInteger, DeString, DeTable, DeValue},
};

use super::{AddrRange, Policy, PolicyError};

type Key<'i> = Spanned<DeString<'i>>;
type Val<'i> = Spanned<DeValue<'i>>;
type Res<T> = Result<T, PolicyError>;

/// The only policy format version this parser reads.
pub const VERSION: u32 = 1;

/// The largest accepted `defaults.log_rate` (drop events per second).
pub const MAX_LOG_RATE: u32 = 1_000_000;

/// Parses and validates roles.toml text; `source` names the file in errors.
/// The error reported is the first in the file; [`parse_str_all`] gives all.
pub fn parse_str(text: &str, source: &str) -> Result<Policy, PolicyError> {
    parse_str_with_sets(text, source, &BTreeMap::new())
}

/// Like [`parse_str`], returning every error found, in file order.
pub fn parse_str_all(text: &str, source: &str) -> Result<Policy, Vec<PolicyError>> {
    parse_all(text, source, &BTreeMap::new())
}

/// Like [`parse_str`], with the members of some sets replaced (live set
/// edits): every rule and role naming such a set sees the new members.
/// Naming a set the file does not define is an error.
pub fn parse_str_with_sets(
    text: &str,
    source: &str,
    overrides: &BTreeMap<String, Vec<AddrRange>>,
) -> Result<Policy, PolicyError> {
    parse_all(text, source, overrides).map_err(|mut errors| errors.swap_remove(0))
}

/// Parses with every error collected (never an empty list on failure),
/// sorted by position.
fn parse_all(
    text: &str,
    source: &str,
    overrides: &BTreeMap<String, Vec<AddrRange>>,
) -> Result<Policy, Vec<PolicyError>> {
    let mut cx = Cx::new(text, source);
    cx.overrides = overrides.clone();
    let doc = DeTable::parse(text).map_err(|e| vec![cx.toml_error(&e)])?;
    let policy = cx.policy(doc.get_ref());
    let mut errors = cx.errors.into_inner();
    match policy {
        Ok(p) if errors.is_empty() => Ok(p),
        Ok(_) => Err(sorted_errors(errors)),
        Err(e) => {
            errors.push(e);
            Err(sorted_errors(errors))
        }
    }
}

/// Errors in file order (those without a position first), each once.
fn sorted_errors(mut errors: Vec<PolicyError>) -> Vec<PolicyError> {
    errors.sort_by_key(|e| e.loc.map(|l| (l.line, l.column)));
    errors.dedup();
    errors
}

pub use services::unit_cgroup;

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
    /// Errors recorded so far (the parser goes on after each).
    errors: std::cell::RefCell<Vec<PolicyError>>,
    /// Service names named by rules, checked once every service is known.
    svc_refs: std::cell::RefCell<Vec<services::ServiceRef>>,
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
            errors: std::cell::RefCell::new(Vec::new()),
            svc_refs: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The value of `r`, or None with its error recorded.
    fn keep<T>(&self, r: Res<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.borrow_mut().push(e);
                None
            }
        }
    }

    /// How many errors have been recorded (to see whether a part failed).
    fn error_count(&self) -> usize {
        self.errors.borrow().len()
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
