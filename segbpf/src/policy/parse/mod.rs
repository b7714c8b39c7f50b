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

mod diagnostics;
mod document;
mod rules;
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
