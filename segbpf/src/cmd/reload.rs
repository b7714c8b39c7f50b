//! `segbpf reload`: swap an attachment's policy atomically, without
//! reloading or re-attaching its programs ([`crate::attachment::swap`]).

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    attachment::pins::Attachment,
    attachment::state::State,
    attachment::swap::{self, ReloadRequest, Swapped},
    cmd::{NetnsOut, Output, print_json, print_line},
    host::netns::Netns,
    policy::Policy,
};

/// Arguments of `segbpf reload`.
#[derive(Debug, clap::Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line flags: each bool is one independent switch"
)]
pub struct Args {
    /// Interface whose policy to replace (or --services).
    #[arg(required_unless_present = "services")]
    pub iface: Option<String>,
    /// Replace the services attachment's policy (docs/services.md).
    #[arg(long, conflicts_with_all = ["iface", "confirm", "force", "redetect_roles"])]
    pub services: bool,
    /// With --services: the cgroup root it is attached below (default: the
    /// cgroup v2 mount).
    #[arg(long, value_name = "DIR", requires = "services")]
    pub cgroup_root: Option<PathBuf>,
    /// Policy file (default: the file the attachment was last given).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Undo the change after SECS seconds unless `segbpf confirm IFACE` runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Apply even though an earlier change waits for `segbpf confirm`
    /// (that change's guard then stands down), or though the policy would
    /// cut the SSH session this command runs in (the `ssh-session` lint of
    /// `segbpf check`, for a session whose server address is on IFACE or
    /// whose client is routed out of IFACE; refused otherwise, unless
    /// --confirm guards it).
    #[arg(long)]
    pub force: bool,
    /// Keep live set edits (`segbpf set add|del`) over the file's sets.
    /// Without it the file wins and the edits are dropped, with a warning
    /// naming them.
    #[arg(long)]
    pub keep_set_edits: bool,
    /// Work the host's roles out again (roles are otherwise kept from
    /// attach): from the interface's permanent addresses only, never from
    /// SLAAC, temporary or DHCP-dynamic ones; `--role` names given to
    /// attach stay.
    #[arg(long)]
    pub redetect_roles: bool,
    /// With --services: accept a policy file writable by users other than
    /// root (refused by default, as at attach).
    #[arg(long, requires = "services")]
    pub insecure_policy: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The result of `reload` in JSON.
#[derive(Serialize)]
struct Reloaded<'a> {
    #[serde(flatten)]
    swap: &'a Swapped,
    #[serde(flatten)]
    netns: NetnsOut,
    /// Always true: a change that was not applied is an error.
    applied: bool,
    /// Seconds until the change is undone unless confirmed (`--confirm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    confirm_secs: Option<u64>,
    /// Sets whose live edits the reload dropped (the file won).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dropped_set_edits: Vec<String>,
}

/// `p` as the state names it: canonical, as `attach` and the swap record
/// it (status, the JSON result and the state agree); a file that cannot be
/// resolved (missing: the reload then fails naming it) absolute, `.` and
/// `..` resolved by name.
pub fn absolute(p: &std::path::Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    let mut out = PathBuf::new();
    for c in std::path::absolute(p)?.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Runs `segbpf reload`.
pub fn run(mut args: Args, ns: &Netns) -> anyhow::Result<()> {
    let Some(iface) = args.iface.clone() else {
        return crate::cmd::services::reload(
            args.cgroup_root,
            args.policy,
            args.insecure_policy,
            args.keep_set_edits,
            args.output,
        );
    };
    // The policy by its canonical path, as the state records it: the JSON
    // result and `status` name the same file.
    if let Some(p) = &args.policy {
        args.policy = Some(absolute(p)?);
    }
    let att = Attachment::new(&iface, ns);
    // Without the rule table (10,000 rule descriptions at 10,000 rules):
    // the checks below need the policy, mode, roles and set edits only.
    let before = State::current_head(&att).ok();
    if let Some(state) = &before {
        // The lockout check: a policy that cuts the SSH session this runs
        // in is refused unless guarded (--confirm) or forced.
        let path = args
            .policy
            .clone()
            .unwrap_or_else(|| PathBuf::from(&state.policy));
        // (Parsed only when it can matter: unguarded, with an SSH session live.)
        if args.confirm.is_none()
            && !args.force
            // A reload keeps the mode: in audit mode nothing is enforced.
            && !state.audit
            && crate::attachment::trust::any_ssh_session()
            && let Ok(policy) = Policy::load(&path)
            && let Some(m) =
                crate::attachment::trust::cuts_ssh_session(&policy, &state.roles, &iface)
        {
            anyhow::bail!(
                "{}: refused: {m} [ssh-session]; nothing was changed (reload with --confirm SECS to apply it guarded, or --force)",
                path.display()
            );
        }
    }
    let dropped_set_edits: Vec<String> = match &before {
        Some(s) if !args.keep_set_edits => s.set_overrides.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let swapped = swap::reload(
        &att,
        &ReloadRequest {
            policy: args.policy,
            confirm: args.confirm,
            force: args.force,
            redetect_roles: args.redetect_roles,
            keep_set_edits: args.keep_set_edits,
        },
    )?;
    if !dropped_set_edits.is_empty() {
        tracing::warn!(
            "dropped the live edits of set(s) {} on {}: the file's members are in force (`segbpf reload --keep-set-edits` keeps them)",
            dropped_set_edits.join(", "),
            att.describe()
        );
    }
    match args.output {
        Output::Json => print_json(&Reloaded {
            swap: &swapped,
            netns: NetnsOut::of(&att),
            applied: true,
            confirm_secs: args.confirm,
            dropped_set_edits,
        })?,
        Output::Text => print_line(&swapped)?,
    }
    Ok(())
}
