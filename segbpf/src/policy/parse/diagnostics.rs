//! Diagnostics: byte spans to 1-based line and column, the errors the
//! parser reports (with the duplicate-key analysis of TOML syntax errors)
//! and the helpers that name fields (`roles.app.egress[1].tcp[0]`) and
//! describe values in messages.

use std::ops::Range;

use toml::de::DeValue;

use super::{Cx, Key, Val};
use crate::policy::{Loc, PolicyError, PolicyErrorKind, addr::AddrParseError, error::did_you_mean};

impl Cx<'_> {
    /// The 1-based line and column (in characters) of a byte offset.
    pub(super) fn loc(&self, offset: usize) -> Loc {
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

    pub(super) fn err(
        &self,
        span: Range<usize>,
        field: &str,
        kind: PolicyErrorKind,
    ) -> PolicyError {
        PolicyError::new(self.source, Some(self.loc(span.start)), field, kind)
    }

    // ----- TOML syntax errors -------------------------------------------

    /// Maps a toml error, recognising a set or role defined twice.
    pub(super) fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
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

    /// `k` is not one of `known`, the keys allowed under `parent`; the
    /// message says which one was probably meant.
    pub(super) fn unknown_key(&self, k: &Key<'_>, parent: &str, known: &[&str]) -> PolicyError {
        let key: &str = k.get_ref();
        let kind = PolicyErrorKind::UnknownKey(key.to_string());
        // A specific hint (`to` in an ingress rule) says more than a guess.
        let hint = if kind.to_string().contains(';') {
            None
        } else {
            did_you_mean(key, known.iter().copied())
        };
        self.err(k.span(), &child(parent, key), kind)
            .with_hint(hint)
    }

    pub(super) fn bad_value(&self, v: &Val<'_>, field: &str, msg: String) -> PolicyError {
        self.err(v.span(), field, PolicyErrorKind::BadValue(msg))
    }
}

pub(super) fn addr_kind(e: AddrParseError) -> PolicyErrorKind {
    match e {
        AddrParseError::Bad(m) => PolicyErrorKind::BadAddress(m),
        AddrParseError::Reversed => PolicyErrorKind::ReversedRange,
        AddrParseError::MixedFamily => PolicyErrorKind::BadAddress(e.to_string()),
        AddrParseError::Empty => PolicyErrorKind::EmptyRange,
    }
}

/// A short description of a value for messages: `string "deny"`, `integer 5`.
pub(super) fn describe(v: &DeValue<'_>) -> String {
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
pub(super) fn child(parent: &str, key: &str) -> String {
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
pub(super) fn index(field: &str, i: usize) -> String {
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
