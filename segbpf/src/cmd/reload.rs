//! `segbpf reload`: swap an attachment's policy atomically, without
//! reloading or re-attaching its programs ([`crate::swap`]).

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    cmd::{NetnsOut, Output, print_json, print_line},
    netns::Netns,
    pins::Attachment,
    swap::{self, ReloadRequest, Swapped},
};

/// Arguments of `segbpf reload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface whose policy to replace.
    pub iface: String,
    /// Policy file (default: the file the attachment was last given).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Undo the change after SECS seconds unless `segbpf confirm IFACE` runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub confirm: Option<u64>,
    /// Apply even though an earlier change waits for `segbpf confirm`
    /// (that change's guard then stands down).
    #[arg(long)]
    pub force: bool,
    /// Work the host's roles out again (roles are otherwise kept from
    /// attach): from the interface's permanent addresses only, never from
    /// SLAAC, temporary or DHCP-dynamic ones; `--role` names given to
    /// attach stay.
    #[arg(long)]
    pub redetect_roles: bool,
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
}

/// Runs `segbpf reload`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let swapped = swap::reload(
        &att,
        &ReloadRequest {
            policy: args.policy,
            confirm: args.confirm,
            force: args.force,
            redetect_roles: args.redetect_roles,
        },
    )?;
    match args.output {
        Output::Json => print_json(&Reloaded {
            swap: &swapped,
            netns: NetnsOut::of(&att),
            applied: true,
            confirm_secs: args.confirm,
        })?,
        Output::Text => print_line(&swapped)?,
    }
    Ok(())
}
