//! Navigating an attachment's policy history: `rollback --to N`, rollbacks
//! that walk further back one step at a time, and what changed between
//! two generations, or between a file and the policy in force (`segbpf
//! diff`). The history itself is [`crate::attachment::history`]; a rollback is a swap
//! ([`crate::attachment::swap::swap`]) of a history copy, so it is as atomic and as
//! guarded as any reload.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    attachment::history::{self, Entry},
    attachment::pins::Attachment,
    attachment::state::State,
    attachment::swap::{self, Choice, Guarded, RolledBack, Settings, SwapError},
};

/// Restores generation `to`, or (None) the policy before the one in
/// force; a generation made by a rollback stands for the one it restored,
/// so a second rollback goes further back rather than undoing the first.
/// The roles (and `--role` arguments) recorded with the entry are put
/// back with its policy. Refused like a reload when it would cut the SSH session this runs in,
/// unless `guarded` says `--confirm` or `--force`.
pub fn rollback(
    att: &Attachment,
    to: Option<u64>,
    guarded: Guarded,
) -> Result<RolledBack, SwapError> {
    let mut target: Option<Entry> = None;
    let swapped = guarded.run(att, || {
        swap::swap_choosing(att, |state| {
            let entries = history::list(att);
            let e = history::rollback_target(&entries, state.generation, to)
                .map_err(|m| SwapError::Refused(format!("{}: {m}", att.describe())))?;
            target = Some(e.clone());
            let choice = Choice::copy_of(
                e.copy.clone(),
                PathBuf::from(&e.source),
                e.set_overrides.clone(),
            );
            // The roles in force with it, when the entry recorded them
            // (older entries did not: the roles in force stay).
            let settings = Settings {
                exact_roles: e
                    .roles
                    .as_ref()
                    .map(|r| (r.roles.clone(), r.role_args.clone())),
                ..Settings::default()
            };
            let roles = e.roles.as_ref().map_or(&state.roles, |r| &r.roles);
            guarded.refuse_lockout(
                att,
                &choice,
                roles,
                &format!(
                    "rollback of {} to generation {}",
                    att.describe(),
                    e.generation
                ),
            )?;
            Ok((choice, settings))
        })
    })?;
    let Some(prev) = target else {
        return Err(SwapError::Refused("no history entry was chosen".into()));
    };
    // What the new generation stands for: the restored entry's original.
    let original = prev.restored.unwrap_or(prev.generation);
    let mut swapped = swapped;
    if let Err(e) = history::mark_restored(att, swapped.generation, original) {
        swapped.warnings.push(format!(
            "the history does not say generation {} restored {original} (a second rollback will undo this one): {e}",
            swapped.generation
        ));
    }
    Ok(RolledBack {
        restored_generation: prev.generation,
        source: prev.source,
        swap: swapped,
    })
}

/// Why a side of a diff could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The attachment has no state: nothing is in force.
    #[error("{0}")]
    State(#[from] crate::attachment::state::StateError),
    /// A generation the history does not keep.
    #[error("generation {generation} of {which} is not in the history (kept: {kept})")]
    NotKept {
        /// The generation asked for.
        generation: u64,
        /// The attachment.
        which: String,
        /// The generations kept.
        kept: String,
    },
    /// A file or history copy that cannot be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One side of a diff: a generation in the history, or a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// The policy in force (the history copy of the current generation).
    InForce,
    /// A generation kept in the history.
    Generation(u64),
    /// A policy file.
    File(PathBuf),
}

impl Side {
    /// A number is a generation, anything else a file.
    pub fn parse(s: &str) -> Side {
        s.parse::<u64>()
            .map_or_else(|_| Side::File(PathBuf::from(s)), Side::Generation)
    }
}

/// A side's text and how to name it.
#[derive(Clone, Debug, Serialize)]
pub struct Text {
    /// `generation 4 (roles.toml)` or the file's path.
    pub label: String,
    /// The generation, when the side is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Live set edits in force with it (generations only).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set_overrides: std::collections::BTreeMap<String, Vec<String>>,
    /// The policy text.
    #[serde(skip)]
    pub text: String,
}

/// Reads one side of a diff of `att`'s history.
pub fn read_side(att: &Attachment, side: &Side) -> Result<Text, DiffError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| DiffError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let generation = match side {
        Side::File(path) => {
            return Ok(Text {
                label: path.display().to_string(),
                generation: None,
                set_overrides: std::collections::BTreeMap::default(),
                text: read(path)?,
            });
        }
        Side::InForce => State::current(att)?.generation,
        Side::Generation(g) => *g,
    };
    let entries = history::list(att);
    let Some(e) = entries.iter().find(|e| e.generation == generation) else {
        return Err(DiffError::NotKept {
            generation,
            which: att.describe(),
            kept: entries
                .iter()
                .map(|e| e.generation.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    Ok(Text {
        label: format!("generation {generation} ({})", e.source),
        generation: Some(generation),
        set_overrides: e.set_overrides.clone(),
        text: read(&e.copy)?,
    })
}

/// One line of a diff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", content = "line", rename_all = "lowercase")]
pub enum Line {
    /// In both.
    Same(String),
    /// Only in the second.
    Add(String),
    /// Only in the first.
    Del(String),
}

/// A line diff of `a` and `b` (longest common subsequence; policies are
/// small enough for the quadratic table).
pub fn diff_lines(old: &str, new: &str) -> Vec<Line> {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    let (olen, nlen) = (old.len(), new.len());
    // common[o][n]: the longest common run of old[o..] and new[n..].
    let mut common = vec![vec![0u32; nlen + 1]; olen + 1];
    for o in (0..olen).rev() {
        for n in (0..nlen).rev() {
            common[o][n] = if old[o] == new[n] {
                common[o + 1][n + 1] + 1
            } else {
                common[o + 1][n].max(common[o][n + 1])
            };
        }
    }
    let (mut o, mut n) = (0, 0);
    let mut out = Vec::new();
    while o < olen || n < nlen {
        if o < olen && n < nlen && old[o] == new[n] {
            out.push(Line::Same(old[o].to_string()));
            o += 1;
            n += 1;
        } else if o < olen && (n == nlen || common[o + 1][n] >= common[o][n + 1]) {
            out.push(Line::Del(old[o].to_string()));
            o += 1;
        } else {
            out.push(Line::Add(new[n].to_string()));
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_added_and_removed_lines() {
        let a = "version = 1\n[[base.ingress]]\nfrom = \"any\"\ntcp = [22]\n";
        let b = "version = 1\n[[base.ingress]]\nfrom = \"admin\"\ntcp = [22]\n";
        let d = diff_lines(a, b);
        assert_eq!(
            d,
            vec![
                Line::Same("version = 1".into()),
                Line::Same("[[base.ingress]]".into()),
                Line::Del("from = \"any\"".into()),
                Line::Add("from = \"admin\"".into()),
                Line::Same("tcp = [22]".into()),
            ]
        );
        assert!(diff_lines(a, a).iter().all(|l| matches!(l, Line::Same(_))));
        assert_eq!(diff_lines("", "x"), vec![Line::Add("x".into())]);
    }

    #[test]
    fn sides_are_generations_or_files() {
        assert_eq!(Side::parse("4"), Side::Generation(4));
        assert_eq!(Side::parse("roles.toml"), Side::File("roles.toml".into()));
    }
}
