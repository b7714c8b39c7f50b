//! `segbpf reload`: swap an attachment's policy atomically, without
//! reloading or re-attaching its programs ([`crate::swap`]).

use std::path::PathBuf;

use crate::{
    netns::Netns,
    pins::Attachment,
    swap::{self, ReloadRequest},
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
}

/// Runs `segbpf reload`.
pub fn run(args: Args, ns: &Netns) -> anyhow::Result<()> {
    let att = Attachment::new(&args.iface, ns);
    let out = swap::reload(
        &att,
        &ReloadRequest {
            policy: args.policy,
            confirm: args.confirm,
            force: args.force,
            redetect_roles: args.redetect_roles,
        },
    )?;
    println!("{out}");
    Ok(())
}
