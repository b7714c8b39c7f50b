//! Changes of the services attachment other than a reload: live set
//! edits (`segbpf set add|del --services`) and `segbpf rollback
//! --services`, with the history a rollback restores from.
//!
//! Each change is one switch of the policy slot, made under the
//! attachment's lock ([`engine::lock`]) by [`engine::apply_choice`]: the
//! whole next policy is written into the slot not in force and put in
//! force with one write, so a change that fails leaves the previous
//! policy in force. The history ([`engine::record`]) is `STATE/services:ID.history/`: a copy
//! of the text of every generation put in force (`N.toml`) and an index
//! (`index.json`, entries as for interfaces,
//! [`crate::attachment::history::Entry`]); the last `$SEGBPF_HISTORY`
//! (default 10) are kept.

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    attachment::{
        history::rollback_target,
        services::{self as engine, ServicesError, SvcChoice, SvcPaths, SvcState, history},
        swap::{MemberEdit, Overrides, edit_members, parse_overrides},
    },
    policy::{AddrRange, Policy},
};

/// Members in force of every set: the file's, with live edits applied.
pub fn sets_in_force(state: &SvcState) -> Result<Overrides, ServicesError> {
    let sets =
        parse_overrides(&state.set_overrides).map_err(|e| ServicesError::Refused(e.to_string()))?;
    let policy = Policy::load_with_sets(&state.policy, &sets)
        .map_err(|e| ServicesError::Refused(e.to_string()))?;
    Ok(policy
        .sets
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.ranges.iter().map(ToString::to_string).collect(),
            )
        })
        .collect())
}

/// The state in force, after linking again a direction another tool
/// detached ([`engine::relink`]): a change that changes nothing (a member
/// already there) still says the generation stays in force, so it must
/// be linked. The caller holds [`engine::lock`].
fn current(paths: &SvcPaths) -> Result<SvcState, ServicesError> {
    if !paths.is_attached() {
        return Err(paths.not_attached());
    }
    let state = paths.read_state().ok_or_else(|| paths.not_attached())?;
    if paths.owner() != engine::Owner::Other {
        let _pins = paths.lock()?;
        for line in engine::relink(paths)? {
            tracing::warn!("{line}");
        }
    }
    Ok(state)
}

/// `segbpf set add|del --services`: adds or removes `members` of `set`
/// in force, as one switch. Returns how many members changed and the
/// state now in force. Nothing changes on error; an edit that changes
/// nothing is [`ServicesError::Unchanged`] (no new generation).
pub fn edit_set(
    paths: &SvcPaths,
    set: &str,
    members: &[AddrRange],
    add: bool,
) -> Result<(usize, SvcState), ServicesError> {
    let _lock = engine::lock(paths)?;
    let state = current(paths)?;
    let current = if let Some(m) = state.set_overrides.get(set) {
        m.clone()
    } else {
        let mut sets = sets_in_force(&state)?;
        sets.remove(set).ok_or_else(|| {
            ServicesError::Refused(format!(
                "{}: no set named `{set}` (sets: {})",
                state.policy.display(),
                sets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?
    };
    let (next, changed) = match edit_members(current, members, add) {
        MemberEdit::Next(next, changed) => (next, changed),
        MemberEdit::NotMember(text) => {
            return Err(ServicesError::Refused(format!(
                "{text} is not a member of `{set}` (see `segbpf set list --services {set}`)"
            )));
        }
        MemberEdit::Unchanged(listed) => {
            return Err(ServicesError::Unchanged(format!(
                "set `{set}` already has {listed}: nothing changed, generation {} stays in force",
                state.generation
            )));
        }
    };
    let mut overrides = state.set_overrides.clone();
    overrides.insert(set.to_string(), next);
    // The text in force: the history's copy of this generation (the file
    // may have been edited since; an edit changes the set, nothing else).
    let text = history(paths)
        .into_iter()
        .find(|e| e.generation == state.generation)
        .map_or_else(|| state.policy.clone(), |e| e.copy);
    let s = engine::apply_choice(
        paths,
        &SvcChoice {
            text,
            source: state.policy.clone(),
            overrides,
            restored: None,
        },
        state.audit,
    )?;
    Ok((changed, s))
}

/// What `rollback --services` did.
#[derive(Debug, Serialize)]
pub struct SvcRolledBack {
    /// The generation whose policy was restored.
    pub restored_generation: u64,
    /// The generation now in force (a new one).
    pub generation: u64,
    /// The policy file it stands for.
    pub policy: PathBuf,
    /// The history's copy that was applied.
    pub history_file: PathBuf,
}

/// `segbpf rollback --services`: the history entry before the one in
/// force (or generation `to`), applied as a new generation that stands for
/// it (a second rollback goes further back).
pub fn rollback(paths: &SvcPaths, to: Option<u64>) -> Result<SvcRolledBack, ServicesError> {
    let _lock = engine::lock(paths)?;
    let state = current(paths)?;
    let mut entries = history(paths);
    // The index stores `restored` from the state; the state is the truth
    // for the generation in force.
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.generation == state.generation)
    {
        e.restored = state.restored;
    }
    let target = rollback_target(&entries, state.generation, to).map_err(|e| {
        ServicesError::Refused(format!("services below {}: {e}", paths.root.dir.display()))
    })?;
    let restored = target.restored.unwrap_or(target.generation);
    let s = engine::apply_choice(
        paths,
        &SvcChoice {
            text: target.copy.clone(),
            source: PathBuf::from(&target.source),
            overrides: target.set_overrides.clone(),
            restored: Some(restored),
        },
        state.audit,
    )?;
    Ok(SvcRolledBack {
        restored_generation: restored,
        generation: s.generation,
        policy: s.policy,
        history_file: target.copy,
    })
}
